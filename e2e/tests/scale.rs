//! Operator convergence at scale (a measurement, not a default test): N
//! HndsrServices (default 1000, `HNDSR_E2E_SCALE_N`) with one pod each are
//! created at once; the test reports how long until every one is Ready for
//! its generation, then checks the steady state: no object changes and no
//! status writes over 20 s.
//!
//! Run: `cargo test -p hndsr-e2e --test scale -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams, PostParams};

use hndsr_crds::{HndsrService, conditions};
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::{fixtures, shared, wait};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn versions<K>(api: &Api<K>) -> anyhow::Result<BTreeMap<String, String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|o| {
            let m = o.meta();
            (
                m.name.clone().unwrap_or_default(),
                m.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect())
}

#[tokio::test]
#[ignore = "a measurement: minutes of CPU; run with --ignored"]
async fn operator_converges_on_many_hndsrservices() -> anyhow::Result<()> {
    let n: usize = std::env::var("HNDSR_E2E_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let ns = shared::namespace("e2e-scale").await?;
    fixtures::install_crd(&ns.client).await?;
    for i in 0..n.div_ceil(250) {
        fixtures::create_node(&ns.client, &format!("scale-node-{i}"), 0, 260).await?;
    }
    let mut operator = Operator::start(
        &ns.shared.kubeconfig,
        &ns.shared.dir.join("logs"),
        &OperatorOptions::for_namespace(&ns.name),
    )
    .await?;
    let api: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);

    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let svc: HndsrService = serde_json::from_value(serde_json::json!({
                    "apiVersion": format!("{}/{}", hndsr_crds::GROUP, hndsr_crds::VERSION),
                    "kind": hndsr_crds::KIND,
                    "metadata": { "name": format!("sr-{i:04}") },
                    "spec": {
                        "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
                        "replicas": 1,
                        "resources": { "gpu": 0 },
                    },
                }))?;
                api.create(&PostParams::default(), &svc).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let created = start.elapsed();

    let ready = wait::until(
        format!("{n} HndsrServices Ready"),
        Duration::from_secs(900),
        || async {
            let list = api.list(&ListParams::default()).await?.items;
            let ready = list
                .iter()
                .filter(|s| {
                    let st = s.status.as_ref();
                    st.and_then(|st| st.observed_generation) == s.metadata.generation
                        && st.is_some_and(|st| {
                            st.conditions
                                .iter()
                                .any(|c| c.type_ == conditions::READY && c.status == "True")
                        })
                })
                .count();
            Ok::<_, kube::Error>((ready == n).then_some(()))
        },
    )
    .await;
    let converged = start.elapsed();
    operator.check_running()?;
    ready?;
    println!("scale: {n} HndsrServices created in {created:.1?}, all Ready after {converged:.1?}");

    // Steady state: nothing changes, no status writes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let before = (versions(&api).await?, versions(&deployments).await?);
    let metrics_before = operator.metrics().await.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = (versions(&api).await?, versions(&deployments).await?);
    let metrics_after = operator.metrics().await.unwrap_or_default();
    let applies = metric(&metrics_after, "hndsr_operator_applies_total")
        - metric(&metrics_before, "hndsr_operator_applies_total");
    let status_patches = metric(&metrics_after, "hndsr_operator_status_patches_total")
        - metric(&metrics_before, "hndsr_operator_status_patches_total");
    println!("scale: steady state over 20 s: {applies} applies, {status_patches} status patches");
    assert!(before == after, "objects changed in steady state");
    assert_eq!(status_patches, 0.0, "status writes in steady state");
    Ok(())
}

//! Autoscaling end to end: the operator's HorizontalPodAutoscaler, driven by
//! the real HPA controller reading `hndsr_active_requests` through the
//! custom-metrics API (a test server behind an APIService), scales the
//! Deployment up to `maxReplicas` under load and back down to `minReplicas`.
//!
//! Its own test binary, so the cluster-wide APIService belongs to this test only.

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, PostParams};

use hndsr_crds::{HndsrService, conditions, labels};
use hndsr_e2e::metrics_server::MetricsServer;
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::{fixtures, shared, wait};

const TIMEOUT: Duration = Duration::from_secs(120);
const METRIC: &str = hndsr_crds::contract::metrics::ACTIVE_REQUESTS;

#[tokio::test]
async fn hpa_scales_on_active_requests_between_min_and_max() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-hpa").await?;
    fixtures::install_crd(&ns.client).await?;
    let metrics = MetricsServer::start(
        ns.client.clone(),
        &ns.name,
        &[METRIC, hndsr_crds::contract::metrics::QUEUE_DEPTH],
    )
    .await?;
    metrics.set(&ns.name, METRIC, "1");
    let mut operator = Operator::start(
        &ns.shared.kubeconfig,
        &ns.shared.dir.join("logs"),
        &OperatorOptions::for_namespace(&ns.name),
    )
    .await?;

    let fast = serde_json::json!({
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [{ "type": "Pods", "value": 4, "periodSeconds": 1 }],
    });
    let svc: HndsrService = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{}/{}", hndsr_crds::GROUP, hndsr_crds::VERSION),
        "kind": hndsr_crds::KIND,
        "metadata": { "name": "sr" },
        "spec": {
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "resources": { "gpu": 1 },
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "metric": "activeRequests",
                "targetPerPod": { "activeRequests": "2" },
                "behavior": { "scaleUp": fast, "scaleDown": fast },
            },
        },
    }))?;
    let services: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    services.create(&PostParams::default(), &svc).await?;

    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ns.client.clone(), &ns.name);
    let hpa = wait::until("HPA sr", TIMEOUT, || async { hpas.get_opt("sr").await }).await?;
    let metric_names: Vec<String> = hpa
        .spec
        .metrics
        .iter()
        .flatten()
        .filter_map(|m| m.pods.as_ref().map(|p| p.metric.name.clone()))
        .collect();
    assert!(
        metric_names.contains(&METRIC.to_owned()),
        "{metric_names:?}"
    );

    let selector = format!(
        "{}=sr,{}={}",
        labels::SERVICE,
        labels::ROLE,
        labels::ROLE_SERVING
    );
    fixtures::wait_pods_ready(&ns.client, &ns.name, &selector, 1, TIMEOUT).await?;

    // Load: 6 active requests per pod against a target of 2 → 3 pods (the max).
    metrics.set(&ns.name, METRIC, "6");
    fixtures::wait_deployment_ready(&ns.client, &ns.name, "sr", 3, TIMEOUT).await?;
    fixtures::wait_pods_ready(&ns.client, &ns.name, &selector, 3, TIMEOUT).await?;
    wait::until("status.readyReplicas 3", TIMEOUT, || async {
        let s = services.get("sr").await?;
        let ready = s.status.as_ref().is_some_and(|st| {
            st.ready_replicas == Some(3)
                && st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == conditions::READY && c.status == "True")
        });
        Ok::<_, kube::Error>(ready.then_some(()))
    })
    .await?;

    // Idle: back to minReplicas.
    metrics.set(&ns.name, METRIC, "0");
    fixtures::wait_deployment_ready(&ns.client, &ns.name, "sr", 1, TIMEOUT).await?;
    operator.check_running()?;

    metrics.shutdown().await?;
    Ok(())
}

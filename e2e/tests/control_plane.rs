//! The control plane itself: it comes up with the pinned versions, installs
//! the HndsrService CRD (CEL rules enforced by the real apiserver), schedules
//! GPU pods onto the fake GPU nodes and leaves them Pending when no node has
//! enough GPUs.
//!
//! Needs the binaries from `bash e2e/scripts/build-binaries.sh`; fails (never
//! skips) without them.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use hndsr_e2e::{GPU_RESOURCE, bins, fixtures, shared, wait};

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn control_plane_runs_the_pinned_versions_with_fake_gpu_nodes() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-up").await?;

    let version = ns.client.apiserver_version().await?;
    assert_eq!(
        version.git_version,
        bins::KUBERNETES_VERSION,
        "apiserver version stamp"
    );

    // Other tests add nodes of their own; the standing ones are gpu-node-*.
    let nodes: Vec<Node> = Api::<Node>::all(ns.client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|n| {
            n.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("gpu-node-"))
        })
        .collect();
    assert_eq!(nodes.len(), 2, "two fake GPU nodes");
    for node in &nodes {
        let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let gpus = allocatable
            .and_then(|a| a.get(GPU_RESOURCE))
            .map(|q| q.0.as_str());
        assert_eq!(gpus, Some("4"), "GPUs on {:?}", node.metadata.name);
    }
    Ok(())
}

#[tokio::test]
async fn crd_installs_and_becomes_established() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-crd").await?;
    let crd = fixtures::install_crd(&ns.client).await?;
    assert_eq!(crd.spec.group, hndsr_crds::GROUP);
    assert_eq!(crd.spec.names.kind, hndsr_crds::KIND);
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["hsvc".to_owned()][..])
    );
    Ok(())
}

fn hndsr_service_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(hndsr_crds::GROUP, hndsr_crds::VERSION, hndsr_crds::KIND);
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn hndsr_service(name: &str, spec: serde_json::Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{}/{}", hndsr_crds::GROUP, hndsr_crds::VERSION),
        "kind": hndsr_crds::KIND,
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

/// Creates `name` with `spec`, which the API server must refuse; its error.
async fn rejection(
    api: &Api<DynamicObject>,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<String> {
    let bad = hndsr_service(name, spec)?;
    match api.create(&PostParams::default(), &bad).await {
        Ok(_) => anyhow::bail!("{name} was admitted"),
        Err(err) => Ok(err.to_string()),
    }
}

#[tokio::test]
async fn invalid_hndsrservice_is_rejected_with_the_cel_message() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-cel").await?;
    fixtures::install_crd(&ns.client).await?;
    let api = hndsr_service_api(&ns.client, &ns.name);

    let bad = hndsr_service(
        "min-above-max",
        serde_json::json!({
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "autoscaling": { "minReplicas": 5, "maxReplicas": 2 },
        }),
    )?;
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("minReplicas > maxReplicas must be rejected");
    let kube::Error::Api(status) = &err else {
        anyhow::bail!("expected an API error, got {err}");
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status
            .message
            .contains("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
        "CEL message missing: {}",
        status.message
    );

    let err = rejection(
        &api,
        "hndsr-without-weights",
        serde_json::json!({ "model": { "image": "hndsr/server:e2e", "backend": "hndsr" } }),
    )
    .await?;
    assert!(err.contains("backend hndsr needs model.weights"), "{err}");

    let err = rejection(
        &api,
        "uri-without-manifest",
        serde_json::json!({ "model": {
            "image": "hndsr/server:e2e",
            "backend": "hndsr",
            "weights": { "uri": "https://models.example/blob/42", "sha256": "a".repeat(64) },
        } }),
    )
    .await?;
    assert!(
        err.contains("weights.uri does not end in .safetensors, or has a query"),
        "{err}"
    );

    let err = rejection(
        &api,
        "realistic-with-projection",
        serde_json::json!({ "model": {
            "image": "hndsr/server:e2e",
            "backend": "hndsr",
            "profile": "realistic",
            "projectionSteps": 5,
            "weights": { "bundled": true, "sha256": "a".repeat(64) },
        } }),
    )
    .await?;
    assert!(
        err.contains("model.projectionSteps must be 0 with profile realistic"),
        "{err}"
    );

    let err = rejection(
        &api,
        "keda-settings-for-hpa",
        serde_json::json!({
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "autoscaling": { "maxReplicas": 2, "keda": { "idleSecondsBeforeZero": 60 } },
        }),
    )
    .await?;
    assert!(
        err.contains("autoscaling.keda needs provider keda"),
        "{err}"
    );

    let err = rejection(
        &api,
        "cors-wildcard",
        serde_json::json!({
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "serving": { "corsOrigins": ["*"], "trustedProxies": ["10.0.0.0/8"] },
        }),
    )
    .await?;
    assert!(
        err.contains("serving.corsOrigins must be explicit origins"),
        "{err}"
    );

    // The same object made valid is accepted.
    let good = hndsr_service(
        "valid",
        serde_json::json!({
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "autoscaling": { "minReplicas": 1, "maxReplicas": 2 },
            "serving": {
                "corsOrigins": ["https://app.example:8443"],
                "trustedProxies": ["10.0.0.0/8", "fd00::1", "192.168.1.7"],
            },
        }),
    )?;
    api.create(&PostParams::default(), &good)
        .await
        .context("valid HndsrService")?;
    Ok(())
}

#[tokio::test]
async fn gpu_pods_are_bound_to_fake_gpu_nodes_and_become_ready() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-gpu").await?;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    deployments
        .create(
            &PostParams::default(),
            &fixtures::gpu_deployment("gpu-app", 2, 1),
        )
        .await?;

    let pods = fixtures::wait_pods_ready(&ns.client, &ns.name, "app=gpu-app", 2, TIMEOUT).await?;
    for pod in &pods {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        assert!(node.starts_with("gpu-node-"), "pod bound to {node:?}");
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        assert_eq!(phase, Some("Running"));
    }
    fixtures::wait_deployment_ready(&ns.client, &ns.name, "gpu-app", 2, TIMEOUT).await?;
    Ok(())
}

#[tokio::test]
async fn pods_needing_more_gpus_than_any_node_has_stay_pending() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-nogpu").await?;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    // Each node has 4 GPUs: a 5-GPU pod can never be placed, whatever the
    // other tests running at the same time hold.
    deployments
        .create(
            &PostParams::default(),
            &fixtures::gpu_deployment("too-big", 1, 5),
        )
        .await?;

    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let lp = ListParams::default().labels("app=too-big");
    let pod = wait::until("an Unschedulable too-big pod", TIMEOUT, || async {
        let list = pods.list(&lp).await?;
        Ok::<_, kube::Error>(list.items.into_iter().find(fixtures::unschedulable))
    })
    .await?;

    let status = pod.status.as_ref().context("pod status")?;
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let message = scheduled_message(&pod);
    assert!(
        message.contains(&format!("Insufficient {GPU_RESOURCE}")),
        "{message}"
    );
    assert!(
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn pods_beyond_the_gpus_of_their_node_stay_pending() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-full").await?;
    let node = format!("{}-node", ns.name);
    fixtures::create_dedicated_node(&ns.client, &node, &ns.name, 2).await?;
    let mut deployment = fixtures::gpu_deployment("fill", 3, 1);
    fixtures::dedicate(&mut deployment, &ns.name);
    Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await?;

    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let lp = ListParams::default().labels("app=fill");
    let (ready, pending) = wait::until("2 Ready and 1 Unschedulable pods", TIMEOUT, || async {
        let list = pods.list(&lp).await?.items;
        let ready: Vec<Pod> = list
            .iter()
            .filter(|p| fixtures::pod_ready(p))
            .cloned()
            .collect();
        let pending: Vec<Pod> = list
            .iter()
            .filter(|p| fixtures::unschedulable(p))
            .cloned()
            .collect();
        Ok::<_, kube::Error>((ready.len() == 2 && pending.len() == 1).then_some((ready, pending)))
    })
    .await?;
    for pod in &ready {
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(node.as_str())
        );
    }
    let message = scheduled_message(&pending[0]);
    assert!(
        message.contains(&format!("Insufficient {GPU_RESOURCE}")),
        "{message}"
    );

    Api::<Node>::all(ns.client.clone())
        .delete(&node, &Default::default())
        .await?;
    Ok(())
}

fn scheduled_message(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")
        .and_then(|c| c.message.clone())
        .unwrap_or_default()
}

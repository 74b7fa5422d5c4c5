//! Objects and waits the tests share: the HndsrService CRD from the
//! repository, GPU workloads, pod readiness.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use crate::{Error, GPU_RESOURCE, Result, bins, wait};

/// Field manager of everything the tests apply.
pub const FIELD_MANAGER: &str = "hndsr-e2e";

/// The committed CRD manifest (`make generate` writes it).
pub fn crd_path() -> PathBuf {
    bins::repo_root().join("crds/hndsrservice.yaml")
}

/// Server-side-applies `crds/hndsrservice.yaml` and waits until it is
/// Established. Safe to call from several tests at once.
pub async fn install_crd(client: &Client) -> Result<CustomResourceDefinition> {
    apply_crd_file(
        client,
        &crd_path(),
        "reading the CRD manifest (generate it with `make generate`)",
    )
    .await
}

/// Server-side-applies the CustomResourceDefinition in `path` (KEDA's too)
/// and waits until it is Established; `reading` names the read in errors.
pub async fn apply_crd_file(
    client: &Client,
    path: &std::path::Path,
    reading: &'static str,
) -> Result<CustomResourceDefinition> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        op: reading,
        path: path.to_owned(),
        source,
    })?;
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).map_err(|e| Error::Kubeconfig {
            path: path.to_owned(),
            message: format!("not a CustomResourceDefinition: {e}"),
        })?;
    let name = crd.metadata.name.clone().unwrap_or_default();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(Error::kube(format!("applying CRD {name}")))?;
    wait::until(
        format!("CRD {name} Established"),
        Duration::from_secs(60),
        || async {
            let crd = api.get(&name).await?;
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            Ok::<_, kube::Error>(established.then_some(crd))
        },
    )
    .await
}

/// A Deployment of `replicas` pods each requesting (and limited to) `gpus`
/// `nvidia.com/gpu`.
pub fn gpu_deployment(name: &str, replicas: i32, gpus: u32) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "containers": [{
                        "name": "server",
                        "image": "hndsr/e2e-fake:0",
                        "resources": {
                            "requests": { "cpu": "100m", "memory": "64Mi", GPU_RESOURCE: gpus.to_string() },
                            "limits": { GPU_RESOURCE: gpus.to_string() },
                        },
                    }],
                },
            },
        },
    }))
    .expect("the Deployment literal is valid")
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until exactly `count` pods match `selector` and all are Ready;
/// returns them.
pub async fn wait_pods_ready(
    client: &Client,
    ns: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(selector);
    wait::until(
        format!("{count} Ready pods matching {selector} in {ns}"),
        timeout,
        || async {
            let pods = api.list(&lp).await?.items;
            let live: Vec<Pod> = pods
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let ok = live.len() == count && live.iter().all(pod_ready);
            Ok::<_, kube::Error>(ok.then_some(live))
        },
    )
    .await
}

/// Waits until the Deployment's status reports `replicas` ready replicas for
/// its current generation.
pub async fn wait_deployment_ready(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
    timeout: Duration,
) -> Result<Deployment> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait::until(
        format!("Deployment {ns}/{name} with {replicas} ready replicas"),
        timeout,
        || async {
            let Some(d) = api.get_opt(name).await? else {
                return Ok::<_, kube::Error>(None);
            };
            let status = d.status.clone().unwrap_or_default();
            let ok = status.observed_generation == d.metadata.generation
                && status.ready_replicas.unwrap_or(0) == replicas
                && status.updated_replicas.unwrap_or(0) == replicas
                && status.replicas.unwrap_or(0) == replicas;
            Ok(ok.then_some(d))
        },
    )
    .await
}

/// Whether the scheduler reports `pod` as unschedulable (`PodScheduled=False`,
/// reason `Unschedulable`).
pub fn unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

/// Label and taint key of a node dedicated to one test.
pub const DEDICATED_KEY: &str = "hndsr.io/e2e-dedicated";

/// Creates a fake GPU node only one test uses: labelled and tainted
/// (`NoSchedule`) with [`DEDICATED_KEY`]`=<owner>`, so that nothing else lands
/// on it. Pair it with [`dedicate`]. Waits until kwok reports it Ready.
pub async fn create_dedicated_node(
    client: &Client,
    name: &str,
    owner: &str,
    gpus: u32,
) -> Result<Node> {
    let mut value = crate::cluster::fake_node(name, gpus);
    value["metadata"]["labels"][DEDICATED_KEY] = owner.into();
    value["spec"]["taints"] = serde_json::json!([
        { "key": DEDICATED_KEY, "value": owner, "effect": "NoSchedule" }
    ]);
    let node: Node = serde_json::from_value(value).expect("the fake node literal is a valid Node");
    let api: Api<Node> = Api::all(client.clone());
    api.create(&PostParams::default(), &node)
        .await
        .map_err(Error::kube(format!("creating node {name}")))?;
    wait::until(
        format!("node {name} Ready"),
        Duration::from_secs(60),
        || async {
            let node = api.get(name).await?;
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok::<_, kube::Error>(ready.then_some(node))
        },
    )
    .await
}

/// Pins a Deployment's pods to the node made by [`create_dedicated_node`] for `owner`.
pub fn dedicate(deployment: &mut Deployment, owner: &str) {
    let pod = deployment
        .spec
        .template
        .spec
        .as_mut()
        .expect("a Deployment with a pod spec");
    pod.node_selector = Some([(DEDICATED_KEY.to_owned(), owner.to_owned())].into());
    pod.tolerations = Some(vec![
        serde_json::from_value(serde_json::json!({
            "key": DEDICATED_KEY, "operator": "Equal", "value": owner, "effect": "NoSchedule"
        }))
        .expect("a valid toleration"),
    ]);
}

/// Creates an extra untainted fake node with room for `pods` pods and `gpus`
/// GPUs (for scale tests that need more pods than the standing nodes hold).
pub async fn create_node(client: &Client, name: &str, gpus: u32, pods: u32) -> Result<Node> {
    let mut value = crate::cluster::fake_node(name, gpus);
    for field in ["capacity", "allocatable"] {
        value["status"][field]["pods"] = pods.to_string().into();
    }
    let node: Node = serde_json::from_value(value).expect("the fake node literal is a valid Node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .map_err(Error::kube(format!("creating node {name}")))
}

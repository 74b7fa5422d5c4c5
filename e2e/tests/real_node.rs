//! The real path: `HndsrService` → operator → Deployment → a container
//! running the `hndsr-server` image (pulled from the local registry) on the
//! real node → Service (kube-proxy) → client.
//!
//! Its own test binary: the control plane here carries the registry and the
//! real node (root only; `make images` first). A missing prerequisite fails
//! with the command that provides it.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use hndsr_crds::{HndsrService, conditions, labels};
use hndsr_e2e::node::{POOL_LABEL, POOL_REAL};
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::{bins, fixtures, shared, wait};

const TIMEOUT: Duration = Duration::from_secs(180);
const SAMPLE: &str = "docs/samples/nile-256.png";
const WEIGHTS_MANIFEST: &str = "server/models/hndsr-medium.json";

fn weights_sha256() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(bins::repo_root().join(WEIGHTS_MANIFEST))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)?;
    Ok(manifest["sha256"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{WEIGHTS_MANIFEST} has no sha256"))?
        .to_owned())
}

/// A CPU HndsrService on the real node: the committed weights the image
/// ships, at the fast profile.
fn cpu_service(name: &str, image: &str, sha256: &str) -> anyhow::Result<HndsrService> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "hndsr.io/v1alpha1",
        "kind": "HndsrService",
        "metadata": { "name": name },
        "spec": {
            "model": {
                "image": image,
                "backend": "hndsr",
                "weights": { "bundled": true, "sha256": sha256 },
                "profile": "fast",
            },
            "resources": {
                "gpu": 0,
                "cpu": { "request": "250m" },
                "memory": { "request": "512Mi", "limit": "3Gi" },
                "nodeSelector": { POOL_LABEL: POOL_REAL },
            },
            "replicas": 1,
        },
    }))?)
}

/// `POST path` with `body` over HTTP/1.1 to `addr`; (status, headers, body).
async fn post(addr: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header in {} bytes", raw.len()))?;
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {headers:?}"))?;
    Ok((status, headers, raw[split + 4..].to_vec()))
}

/// Width and height from a PNG's IHDR.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}

async fn server_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<Option<Pod>> {
    let lp = ListParams::default().labels(&format!("{}={name}", labels::INSTANCE));
    Ok(pods.list(&lp).await?.items.into_iter().next())
}

/// A namespace with the CRD and an operator, and HndsrService `name` whose
/// pod on the real node is Ready; returns when it is, with the elapsed time.
struct Running {
    ns: shared::TestNamespace,
    operator: Operator,
    svcs: Api<HndsrService>,
    pods: Api<Pod>,
    pod: Pod,
    applied: Instant,
    ready_after: Duration,
}

async fn run_service(prefix: &str, name: &str) -> anyhow::Result<Running> {
    let ns = shared::namespace_with_real_node(prefix).await?;
    let images = ns
        .shared
        .images
        .clone()
        .expect("a real-node plane has images");
    fixtures::install_crd(&ns.client).await?;
    let operator = Operator::start(
        &ns.shared.kubeconfig,
        &ns.shared.dir.join("logs"),
        &OperatorOptions::for_namespace(&ns.name),
    )
    .await?;
    let svcs: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    let applied = Instant::now();
    svcs.create(
        &PostParams::default(),
        &cpu_service(name, &images.server, &weights_sha256()?)?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let pod = wait::until("the server pod to be Ready", TIMEOUT, || async {
        Ok::<_, anyhow::Error>(server_pod(&pods, name).await?.filter(fixtures::pod_ready))
    })
    .await?;
    Ok(Running {
        ns,
        operator,
        svcs,
        pods,
        pod,
        applied,
        ready_after: applied.elapsed(),
    })
}

impl Running {
    async fn finish(mut self, name: &str) -> anyhow::Result<()> {
        self.svcs.delete(name, &DeleteParams::default()).await?;
        self.operator.check_running()?;
        self.operator.stop();
        self.ns.delete().await?;
        Ok(())
    }
}

#[tokio::test]
async fn an_hndsr_service_serves_through_its_service_from_a_real_pod() -> anyhow::Result<()> {
    let name = "real";
    let run = run_service("e2e-real", name).await?;
    let (pod, ready_after) = (&run.pod, run.ready_after);
    let spec = pod.spec.as_ref().expect("a pod has a spec");
    assert_eq!(spec.node_name.as_deref(), Some(hndsr_e2e::node::NODE_NAME));
    let status = pod.status.as_ref().expect("a ready pod has a status");
    let started = status.container_statuses.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.name == "server")?
            .state
            .as_ref()?
            .running
            .as_ref()?
            .started_at
            .clone()
    });
    let ready_at = status
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.clone());
    let (Some(started), Some(ready_at)) = (started, ready_at) else {
        anyhow::bail!("the pod lacks a start or Ready time: {status:?}");
    };
    assert!(
        ready_at.0 > started.0,
        "Ready ({:?}) must come after the server started ({:?}) and warmed up",
        ready_at.0,
        started.0
    );

    wait::until("the HndsrService to be Ready", TIMEOUT, || async {
        let svc = run.svcs.get(name).await?;
        let ready = svc.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == conditions::READY && c.status == "True")
        });
        Ok::<_, kube::Error>(ready.then_some(()))
    })
    .await?;

    // Through the Service's ClusterIP, as a client in the cluster would.
    let service = Api::<Service>::namespaced(run.ns.client.clone(), &run.ns.name)
        .get(name)
        .await?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow::anyhow!("Service {name} has no ClusterIP"))?;
    let port = 80;
    let sample = std::fs::read(bins::repo_root().join(SAMPLE))?;
    let addr = format!("{ip}:{port}");
    let (status, headers, body) = wait::until("a 200 through the Service", TIMEOUT, || async {
        let answer = post(&addr, "/v1/upscale?scale=4", &sample).await?;
        Ok::<_, anyhow::Error>((answer.0 == 200).then_some(answer))
    })
    .await?;
    let first_200 = run.applied.elapsed();
    assert_eq!(status, 200, "{headers}");
    assert_eq!(png_size(&body), Some((1024, 1024)), "{headers}");
    eprintln!(
        "real node: apply -> pod Ready {:.1}s, apply -> first 200 through the Service {:.1}s",
        ready_after.as_secs_f64(),
        first_200.as_secs_f64()
    );
    run.finish(name).await
}

#[tokio::test]
async fn a_killed_server_container_is_restarted_by_the_kubelet() -> anyhow::Result<()> {
    let name = "killed";
    let run = run_service("e2e-kill", name).await?;
    let (ns, pods, pod) = (&run.ns, &run.pods, &run.pod);
    let pod_name = pod.metadata.name.clone().expect("a pod has a name");

    // SIGKILL the server process itself (PID 1 of its container).
    let kubectl = &ns.shared.binaries.kubectl;
    let out = std::process::Command::new(kubectl)
        .arg(format!("--kubeconfig={}", ns.shared.kubeconfig.display()))
        .args(["-n", &ns.name, "exec", &pod_name, "-c", "server", "--"])
        .args(["/usr/local/bin/hndsr-server", "--version"])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container_pid = find_container_pid(pod)?;
    std::process::Command::new("kill")
        .args(["-KILL", &container_pid.to_string()])
        .status()?;

    let restarted = wait::until(
        "the server container to restart and be Ready",
        TIMEOUT,
        || async {
            let pod = pods.get(&pod_name).await?;
            let restarts = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.name == "server"))
                .map_or(0, |c| c.restart_count);
            Ok::<_, kube::Error>((restarts >= 1 && fixtures::pod_ready(&pod)).then_some(restarts))
        },
    )
    .await?;
    assert_eq!(restarted, 1);
    run.finish(name).await
}

/// The host pid of the pod's server process: the `hndsr-server` whose
/// environment names the pod (the kubelet sets `HOSTNAME` to the pod name).
fn find_container_pid(pod: &Pod) -> anyhow::Result<u32> {
    let name = pod.metadata.name.as_deref().expect("a pod has a name");
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"/usr/local/bin/hndsr-server") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("HOSTNAME={name}").as_bytes())
        {
            return Ok(pid);
        }
    }
    anyhow::bail!("no hndsr-server process of pod {name} on this host")
}

//! The real path: `HndsrService` → operator → Deployment → a container
//! running the `hndsr-server` image (pulled from the local registry) on the
//! real node → Service (kube-proxy) → client.
//!
//! Its own test binary: the control plane here carries the registry and the
//! real node (root only; `make images` first). A missing prerequisite fails
//! with the command that provides it.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use hndsr_crds::{HndsrService, conditions, labels};
use hndsr_e2e::node::{POOL_LABEL, POOL_REAL};
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::{bins, fixtures, shared, wait};

const TIMEOUT: Duration = Duration::from_secs(180);
const SAMPLE: &str = "docs/samples/nile-256.png";
/// After a server is SIGKILLed: the kubelet notices the exit (PLEG), the
/// pod turns NotReady, the endpoint is withdrawn and kube-proxy resyncs.
const KILL_WINDOW: Duration = Duration::from_secs(3);
const WEIGHTS_MANIFEST: &str = "server/models/hndsr.json";

fn weights_sha256() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(bins::repo_root().join(WEIGHTS_MANIFEST))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)?;
    Ok(manifest["sha256"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{WEIGHTS_MANIFEST} has no sha256"))?
        .to_owned())
}

/// A CPU HndsrService on the real node: the committed weights the image
/// ships, at the fast profile; `extra` is merged into its spec.
fn cpu_service_with(
    name: &str,
    image: &str,
    sha256: &str,
    extra: serde_json::Value,
) -> anyhow::Result<HndsrService> {
    let mut svc = serde_json::json!({
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
        },
    });
    if let (Some(spec), Some(extra)) = (svc["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    Ok(serde_json::from_value(svc)?)
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

/// The pods of HndsrService `name`.
async fn service_pods(pods: &Api<Pod>, name: &str) -> kube::Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("{}={name}", labels::INSTANCE));
    Ok(pods.list(&lp).await?.items)
}

async fn server_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<Option<Pod>> {
    Ok(service_pods(pods, name).await?.into_iter().next())
}

/// Waits until HndsrService `name` reports Ready.
async fn wait_service_ready(svcs: &Api<HndsrService>, name: &str) -> anyhow::Result<()> {
    Ok(
        wait::until(format!("HndsrService {name} Ready"), TIMEOUT, || async {
            let svc = svcs.get(name).await?;
            let ready = svc.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == conditions::READY && c.status == "True")
            });
            Ok::<_, kube::Error>(ready.then_some(()))
        })
        .await?,
    )
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
    run_service_with(prefix, name, serde_json::json!({ "replicas": 1 })).await
}

async fn run_service_with(
    prefix: &str,
    name: &str,
    extra: serde_json::Value,
) -> anyhow::Result<Running> {
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
        &cpu_service_with(name, &images.server, &weights_sha256()?, extra)?,
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

    wait_service_ready(&run.svcs, name).await?;

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
        "real node: apply -> pod Ready {:.1}s (container start -> Ready {}s, whole seconds), \
         apply -> first 200 through the Service {:.1}s",
        ready_after.as_secs_f64(),
        ready_at.0.as_second() - started.0.as_second(),
        first_200.as_secs_f64()
    );
    run.finish(name).await
}

#[tokio::test]
async fn a_killed_server_container_is_restarted_while_clients_get_retryable_answers()
-> anyhow::Result<()> {
    let name = "killed";
    let run = run_service_with("e2e-kill", name, no_rate_limit(2)).await?;
    wait_rolled_out(&run, name, 2).await?;
    let (ns, pods, pod) = (&run.ns, &run.pods, &run.pod);
    let pod_name = pod.metadata.name.clone().expect("a pod has a name");

    // logs/exec reach the kubelet through the apiserver (its client certificate).
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

    let clients = 2;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(routable_service(&run, name).await?, clients, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SIGKILL the server process itself (PID 1 of its container).
    let container_pid = find_container_pid(pod)?;
    std::process::Command::new("kill")
        .args(["-KILL", &container_pid.to_string()])
        .status()?;
    let killed = Instant::now();

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
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = stop_load(&stop, load).await?;
    eprintln!(
        "real node SIGKILL: Ready again after {:.1}s; {} {:?}",
        back.as_secs_f64(),
        answers.summary(),
        answers
            .other
            .iter()
            .map(|(at, what)| format!(
                "{what} at kill+{:.2}s",
                at.saturating_duration_since(killed).as_secs_f64()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(restarted, 1);
    // What was in flight on the killed process is lost with it, and so may
    // be what kube-proxy still sends to its address until the kubelet has
    // reported the container gone and the endpoint is withdrawn. Past that
    // window, and while the container restarts and warms up, clients get
    // only answers or refusals (a refused connection reached no server:
    // safe to retry).
    let late: Vec<_> = answers
        .other
        .iter()
        .filter(|(at, _)| at.saturating_duration_since(killed) > KILL_WINDOW)
        .collect();
    assert!(
        late.is_empty(),
        "failures later than {KILL_WINDOW:?} after the kill: {late:?} (all: {answers:?})"
    );
    assert!(answers.ok > 0, "{answers:?}");
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

/// What a client saw during a load run.
#[derive(Debug, Default)]
struct Answers {
    ok: usize,
    retryable_503: usize,
    /// Connection refused: the request reached no server (safe to retry).
    refused: usize,
    /// Anything else, with when it happened.
    other: Vec<(Instant, String)>,
}

impl Answers {
    /// One line for the figures the tests print.
    fn summary(&self) -> String {
        format!(
            "answers: {} ok, {} 503+Retry-After, {} refused, {} other",
            self.ok,
            self.retryable_503,
            self.refused,
            self.other.len()
        )
    }

    /// Some answers, and every one a 200 or a 503 with Retry-After.
    fn assert_lossless(&self, what: &str) {
        assert!(self.ok > 0, "{self:?}");
        assert!(
            self.other.is_empty() && self.refused == 0,
            "{what} lost requests: {self:?}"
        );
    }

    fn add(&mut self, other: Self) {
        self.ok += other.ok;
        self.retryable_503 += other.retryable_503;
        self.refused += other.refused;
        self.other.extend(other.other);
    }
}

async fn stop_load(
    stop: &std::sync::atomic::AtomicBool,
    clients: Vec<tokio::task::JoinHandle<Answers>>,
) -> anyhow::Result<Answers> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Answers::default();
    for client in clients {
        answers.add(client.await?);
    }
    Ok(answers)
}

/// `clients` loops of POSTs of the sample to `addr` until `stop` is set.
fn start_load(
    addr: String,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Answers>> {
    let sample = std::sync::Arc::new(
        std::fs::read(bins::repo_root().join(SAMPLE)).expect("the committed sample"),
    );
    (0..clients)
        .map(|_| {
            let (addr, stop, sample) = (addr.clone(), stop.clone(), sample.clone());
            tokio::spawn(async move {
                let mut answers = Answers::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match post(&addr, "/v1/upscale?scale=4", &sample).await {
                        Ok((200, _, _)) => answers.ok += 1,
                        Ok((503, headers, _))
                            if headers.to_ascii_lowercase().contains("retry-after:") =>
                        {
                            answers.retryable_503 += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok((status, headers, _)) => answers.other.push((
                            Instant::now(),
                            format!("{status}: {}", headers.lines().next().unwrap_or("")),
                        )),
                        Err(e)
                            if e.downcast_ref::<std::io::Error>().is_some_and(|e| {
                                e.kind() == std::io::ErrorKind::ConnectionRefused
                            }) =>
                        {
                            answers.refused += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => answers
                            .other
                            .push((Instant::now(), format!("connection: {e}"))),
                    }
                }
                answers
            })
        })
        .collect()
}

async fn requests_served(pod_ip: &str) -> u64 {
    let Some((200, body)) =
        hndsr_e2e::process::http_get(&format!("{pod_ip}:8080"), "/metrics").await
    else {
        return 0;
    };
    body.lines()
        .filter(|l| l.starts_with("hndsr_requests_total{") && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn the_hpa_scales_on_what_the_pods_report_through_prometheus() -> anyhow::Result<()> {
    let name = "scaled";
    let fast = serde_json::json!({
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [{ "type": "Pods", "value": 4, "periodSeconds": 1 }],
    });
    let run = run_service_with(
        "e2e-hpa-real",
        name,
        serde_json::json!({
            "serving": { "maxConcurrent": 1, "maxQueueDepth": 16, "rateLimitPerHour": 0 },
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "metric": "activeRequests",
                "targetPerPod": { "activeRequests": "500m" },
                "behavior": { "scaleUp": fast, "scaleDown": fast },
            },
        }),
    )
    .await?;
    let first_pod = run.pod.metadata.name.clone().expect("a pod has a name");
    let addr = routable_service(&run, name).await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(run.ns.client.clone(), &run.ns.name);
    let deployments: Api<Deployment> = Api::namespaced(run.ns.client.clone(), &run.ns.name);

    // Load through the Service until a pod the HPA added has served.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_start = Instant::now();
    let clients = start_load(addr, 3, stop.clone());
    let decided = wait::until("the HPA to want more than 1 replica", TIMEOUT, || async {
        let hpa = hpas.get(name).await?;
        let desired = hpa.status.map_or(0, |s| s.desired_replicas);
        Ok::<_, kube::Error>((desired > 1).then(|| load_start.elapsed()))
    })
    .await?;
    let served = wait::until(
        "a pod the HPA added to serve a request",
        TIMEOUT,
        || async {
            for pod in service_pods(&run.pods, name).await? {
                if pod.metadata.name.as_deref() == Some(first_pod.as_str())
                    || !fixtures::pod_ready(&pod)
                {
                    continue;
                }
                if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone())
                    && requests_served(&ip).await > 0
                {
                    return Ok(Some(load_start.elapsed()));
                }
            }
            Ok::<_, kube::Error>(None)
        },
    )
    .await?;
    let answers = stop_load(&stop, clients).await?;
    let peak = deployments.get(name).await?.spec.replicas.unwrap_or(0);

    // Idle again: back to minReplicas (the adapter's rule reads a 1-minute max).
    let idle = Instant::now();
    wait::until(
        "the Deployment back to 1 replica",
        Duration::from_secs(240),
        || async {
            let replicas = deployments.get(name).await?.spec.replicas;
            Ok::<_, kube::Error>((replicas == Some(1)).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "real node HPA: load start -> HPA wants more {:.1}s -> a new pod served {:.1}s; \
         peak {peak} replicas; idle -> 1 replica {:.1}s; {}",
        decided.as_secs_f64(),
        served.as_secs_f64(),
        idle.elapsed().as_secs_f64(),
        answers.summary()
    );
    assert!((2..=3).contains(&peak), "peak {peak} replicas, max 3");
    answers.assert_lossless("scaling");
    run.finish(name).await
}

/// `IP:80` of the service's ClusterIP, once a request through it succeeds:
/// a pod that just turned Ready takes a moment (EndpointSlice, then
/// kube-proxy's next sync) to be routable, and until then kube-proxy
/// refuses connections to a Service without endpoints.
async fn routable_service(run: &Running, name: &str) -> anyhow::Result<String> {
    let ip = Api::<Service>::namespaced(run.ns.client.clone(), &run.ns.name)
        .get(name)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow::anyhow!("Service {name} has no ClusterIP"))?;
    let addr = format!("{ip}:80");
    wait::until(format!("{addr} to route to a pod"), TIMEOUT, || async {
        Ok::<_, std::convert::Infallible>(
            hndsr_e2e::process::http_get(&addr, "/readyz")
                .await
                .filter(|(status, _)| *status == 200)
                .map(|_| ()),
        )
    })
    .await?;
    Ok(addr)
}

/// Waits until the Deployment has rolled out its current generation with
/// `replicas` ready pods and nothing else.
async fn wait_rolled_out(run: &Running, name: &str, replicas: i32) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(run.ns.client.clone(), &run.ns.name);
    Ok(wait::until(
        format!("Deployment {name} rolled out with {replicas} ready replicas"),
        TIMEOUT,
        || async {
            let d = deployments.get(name).await?;
            let generation = d.metadata.generation;
            let done = d.status.is_some_and(|s| {
                s.observed_generation == generation
                    && s.replicas == Some(replicas)
                    && s.updated_replicas == Some(replicas)
                    && s.ready_replicas == Some(replicas)
            });
            Ok::<_, kube::Error>(done.then_some(()))
        },
    )
    .await?)
}

fn no_rate_limit(replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "replicas": replicas,
        "serving": { "rateLimitPerHour": 0, "drainSeconds": 20 },
    })
}

async fn patch_spec(run: &Running, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
    let patch = serde_json::json!({ "spec": spec });
    run.svcs
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_rolling_update_under_steady_load_loses_no_request() -> anyhow::Result<()> {
    let name = "rolled";
    let run = run_service_with("e2e-roll", name, no_rate_limit(2)).await?;
    wait_rolled_out(&run, name, 2).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = start_load(routable_service(&run, name).await?, 2, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A new pod template (the request timeout is an env var of the server).
    patch_spec(
        &run,
        name,
        serde_json::json!({ "serving": { "requestTimeoutSeconds": 29 } }),
    )
    .await?;
    let started = Instant::now();
    // Let the new generation reach the Deployment, then wait for its rollout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_rolled_out(&run, name, 2).await?;
    let rolled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answers = stop_load(&stop, clients).await?;
    eprintln!(
        "real node rolling update: {:.1}s; {}",
        rolled.as_secs_f64(),
        answers.summary()
    );
    answers.assert_lossless("a rolling update");
    run.finish(name).await
}

#[tokio::test]
async fn a_scale_down_under_load_loses_no_in_flight_request() -> anyhow::Result<()> {
    let name = "shrunk";
    let run = run_service_with("e2e-shrink", name, no_rate_limit(3)).await?;
    wait_rolled_out(&run, name, 3).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = start_load(routable_service(&run, name).await?, 3, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    patch_spec(&run, name, serde_json::json!({ "replicas": 1 })).await?;
    let started = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(run.ns.client.clone(), &run.ns.name);
    // Until the removed pods are gone, not just unready: their drain is
    // what this checks.
    wait::until("2 of 3 pods gone", TIMEOUT, || async {
        let pods = service_pods(&run.pods, name).await?;
        let replicas = deployments.get(name).await?.spec.replicas;
        Ok::<_, kube::Error>((replicas == Some(1) && pods.len() == 1).then_some(()))
    })
    .await?;
    let gone = started.elapsed();
    let answers = stop_load(&stop, clients).await?;
    eprintln!(
        "real node scale-down 3 -> 1 under load: pods gone after {:.1}s; {}",
        gone.as_secs_f64(),
        answers.summary()
    );
    answers.assert_lossless("a scale-down");
    run.finish(name).await
}

#[tokio::test]
async fn the_chart_runs_the_operator_in_cluster_under_its_service_account() -> anyhow::Result<()> {
    let ns = shared::namespace_with_real_node("e2e-chart").await?;
    let images = ns
        .shared
        .images
        .clone()
        .expect("a real-node plane has images");
    fixtures::install_crd(&ns.client).await?;
    let (repository, tag) = images
        .operator
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("no tag in {}", images.operator))?;
    // The chart's registry prefix, as a user points it at theirs.
    let (registry, repository) = repository
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("no registry in {}", images.operator))?;
    let home = tempfile::tempdir()?;
    let helm = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new(&ns.shared.binaries.helm)
            .env("KUBECONFIG", &ns.shared.kubeconfig)
            .env("HELM_CACHE_HOME", home.path().join("cache"))
            .env("HELM_CONFIG_HOME", home.path().join("config"))
            .env("HELM_DATA_HOME", home.path().join("data"))
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "helm {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let chart = bins::repo_root().join("charts/hndsr-operator");
    let chart = chart.to_str().expect("a UTF-8 path");
    // The operator watches this test's namespace only (a Role there), from
    // its own image on the real node, as its ServiceAccount.
    helm(&[
        "install",
        "hndsr",
        chart,
        "--namespace",
        &ns.name,
        "--skip-crds",
        "--wait",
        "--timeout",
        "180s",
        "--set",
        &format!(
            "image.registry={registry},image.repository={repository},image.tag={tag},replicaCount=1"
        ),
        "--set",
        &format!("watchNamespace={}", ns.name),
        "--set",
        &format!(
            "nodeSelector.{}={POOL_REAL}",
            POOL_LABEL.replace('.', "\\.")
        ),
    ])?;

    let name = "in-cluster";
    let svcs: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    svcs.create(
        &PostParams::default(),
        &cpu_service_with(
            name,
            &images.server,
            &weights_sha256()?,
            serde_json::json!({ "replicas": 1 }),
        )?,
    )
    .await?;
    // Made Ready by the in-cluster operator (the only one watching here).
    wait_service_ready(&svcs, name).await?;
    // Its pod really runs and was reconciled by the chart's operator pod.
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let operator_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=hndsr-operator"))
        .await?;
    let operator_pod = operator_pods
        .items
        .first()
        .ok_or_else(|| anyhow::anyhow!("no operator pod"))?;
    assert_eq!(
        operator_pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref()),
        Some(hndsr_e2e::node::NODE_NAME)
    );
    assert!(
        operator_pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .is_some_and(|sa| sa != "default"),
        "the operator runs as the chart's ServiceAccount"
    );

    svcs.delete(name, &DeleteParams::default()).await?;
    helm(&["uninstall", "hndsr", "--namespace", &ns.name, "--wait"])?;
    ns.delete().await?;
    Ok(())
}

/// Serves the committed weights and manifest over HTTP on the node's
/// address (pods reach the host there, through the bridge; the host's
/// 127.0.0.1 is not theirs). Returns the base URL.
async fn serve_weights() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    use axum::routing::get;
    let models = bins::repo_root().join("server/models");
    let weights = std::sync::Arc::new(std::fs::read(models.join("hndsr.safetensors"))?);
    let manifest = std::sync::Arc::new(std::fs::read(models.join("hndsr.json"))?);
    let app = axum::Router::new()
        .route(
            "/models/hndsr.safetensors",
            get(move || {
                let w = weights.clone();
                async move { w.as_ref().clone() }
            }),
        )
        .route(
            "/models/hndsr.json",
            get(move || {
                let m = manifest.clone();
                async move { m.as_ref().clone() }
            }),
        );
    let address = hndsr_e2e::node::host_address()?;
    let listener = tokio::net::TcpListener::bind((address.as_str(), 0)).await?;
    let url = format!("http://{}/models", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

#[tokio::test]
async fn weights_from_a_url_are_fetched_and_digest_checked_in_a_real_pod() -> anyhow::Result<()> {
    let ns = shared::namespace_with_real_node("e2e-fetch").await?;
    let images = ns
        .shared
        .images
        .clone()
        .expect("a real-node plane has images");
    fixtures::install_crd(&ns.client).await?;
    let mut opts = OperatorOptions::for_namespace(&ns.name);
    opts.extra_args
        .push(format!("--fetcher-image={}", images.fetch));
    let mut operator =
        Operator::start(&ns.shared.kubeconfig, &ns.shared.dir.join("logs"), &opts).await?;
    let (base, server) = serve_weights().await?;
    let sha256 = weights_sha256()?;
    let svcs: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let with_uri = |digest: &str| {
        serde_json::json!({
            "replicas": 1,
            "model": {
                "image": images.server,
                "backend": "hndsr",
                "weights": { "uri": format!("{base}/hndsr.safetensors"), "sha256": digest },
                "profile": "fast",
            },
        })
    };

    // The right digest: downloaded by the init container, then served.
    let good = "fetched";
    svcs.create(
        &PostParams::default(),
        &cpu_service_with(good, &images.server, &sha256, with_uri(&sha256))?,
    )
    .await?;
    let pod = wait::until("the fetched pod to be Ready", TIMEOUT, || async {
        Ok::<_, anyhow::Error>(server_pod(&pods, good).await?.filter(fixtures::pod_ready))
    })
    .await?;
    let fetch = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "fetch-weights"))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    assert_eq!(
        fetch,
        Some(0),
        "the init container downloaded and checked the weights"
    );

    // A wrong digest: the init container refuses the file, the server never starts.
    let bad = "wrong-digest";
    let wrong = "0".repeat(64);
    svcs.create(
        &PostParams::default(),
        &cpu_service_with(bad, &images.server, &wrong, with_uri(&wrong))?,
    )
    .await?;
    let failed = wait::until(
        "the init container to fail on the digest",
        TIMEOUT,
        || async {
            let Some(pod) = server_pod(&pods, bad).await? else {
                return Ok::<_, anyhow::Error>(None);
            };
            let code = pod
                .status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.name == "fetch-weights"))
                .and_then(|c| {
                    let state = c.last_state.as_ref()?.terminated.as_ref().or(c
                        .state
                        .as_ref()?
                        .terminated
                        .as_ref())?;
                    Some(state.exit_code)
                });
            Ok(code
                .filter(|c| *c != 0)
                .map(|c| (c, fixtures::pod_ready(&pod))))
        },
    )
    .await?;
    assert!(
        !failed.1,
        "a pod whose weights fail the digest must not be Ready"
    );

    for name in [good, bad] {
        svcs.delete(name, &DeleteParams::default()).await?;
    }
    server.abort();
    operator.check_running()?;
    operator.stop();
    ns.delete().await?;
    Ok(())
}

/// A 32×32 PNG: a probe the server answers in milliseconds, so the time to
/// "served" is the time to routing, not to inference.
fn probe_png() -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Serving pods of `name` (the Service's selection).
async fn serving_pods(pods: &Api<Pod>, name: &str) -> kube::Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}={}",
        labels::SERVICE,
        labels::ROLE,
        labels::ROLE_SERVING
    ));
    Ok(pods.list(&lp).await?.items)
}

/// Scales `name` to `replicas` serving pods and probes its Service until a
/// pod that was not serving before has answered; returns that time and
/// whether the pod was a promoted standby pod.
async fn scale_up_until_a_new_pod_serves(
    run: &Running,
    name: &str,
    addr: &str,
    replicas: i32,
) -> anyhow::Result<(Duration, bool)> {
    let before: Vec<String> = serving_pods(&run.pods, name)
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let probe = probe_png()?;
    let start = Instant::now();
    patch_spec(run, name, serde_json::json!({ "replicas": replicas })).await?;
    let served = wait::until("a new serving pod to answer", TIMEOUT, || async {
        // A few probes per round: kube-proxy picks a backend at random.
        for _ in 0..4 {
            let _ = post(addr, "/v1/upscale?scale=4", &probe).await;
        }
        for pod in serving_pods(&run.pods, name).await? {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            if before.contains(&pod_name) {
                continue;
            }
            if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone())
                && requests_served(&ip).await > 0
            {
                let promoted = pod_name.starts_with(&format!("{name}-standby-"));
                return Ok(Some((start.elapsed(), promoted)));
            }
        }
        Ok::<_, anyhow::Error>(None)
    })
    .await?;
    Ok(served)
}

/// Waits until the service reports `standby` ready standby pods and
/// `serving` ready serving pods.
async fn wait_pools(run: &Running, name: &str, serving: i32, standby: i32) -> anyhow::Result<()> {
    wait::until(
        format!("{name}: {serving} serving and {standby} standby pods ready"),
        TIMEOUT,
        || async {
            let s = run.svcs.get(name).await?;
            let ok = s.status.as_ref().is_some_and(|st| {
                st.ready_replicas == Some(serving)
                    && st.replicas == Some(serving)
                    && st.standby_replicas == Some(standby)
            });
            Ok::<_, kube::Error>(ok.then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Prewarm on the real node with the real server image: every scale-up is
/// served by a promoted standby pod, far sooner than by a cold pod, and the
/// pool refills. Measures replica decision → first request answered by the
/// new serving pod, over repeated scale-ups, next to the cold path.
#[tokio::test]
async fn a_scale_up_is_served_by_a_promoted_standby_pod_within_seconds() -> anyhow::Result<()> {
    let name = "warm";
    let run = run_service_with(
        "e2e-prewarm",
        name,
        serde_json::json!({
            "replicas": 1,
            "serving": { "rateLimitPerHour": 0, "drainSeconds": 2 },
            "prewarm": { "standbyReplicas": 1 },
            // Up to four pods at once (serving, standby, the cold pod a
            // promotion replaces, the refill) beside the other tests' pods
            // on a 2-CPU node: a small request keeps them all schedulable.
            "resources": {
                "gpu": 0,
                "cpu": { "request": "100m" },
                "memory": { "request": "512Mi", "limit": "3Gi" },
                "nodeSelector": { POOL_LABEL: POOL_REAL },
            },
        }),
    )
    .await?;
    wait_pools(&run, name, 1, 1).await?;
    let addr = routable_service(&run, name).await?;

    let rounds: usize = std::env::var("HNDSR_E2E_PREWARM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut promoted = Vec::new();
    for _ in 0..rounds {
        let (took, was_standby) = scale_up_until_a_new_pod_serves(&run, name, &addr, 2).await?;
        assert!(
            was_standby,
            "the new serving pod was a cold one, not a promoted standby pod"
        );
        promoted.push(took);
        // The pool refills; then back to one serving pod.
        wait_pools(&run, name, 2, 1).await?;
        patch_spec(&run, name, serde_json::json!({ "replicas": 1 })).await?;
        wait_pools(&run, name, 1, 1).await?;
    }

    // The cold path: no standby pod to promote.
    patch_spec(
        &run,
        name,
        serde_json::json!({ "prewarm": { "standbyReplicas": 0 } }),
    )
    .await?;
    wait_pools(&run, name, 1, 0).await?;
    wait::until("the standby pods gone", TIMEOUT, || async {
        let left = service_pods(&run.pods, name)
            .await?
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(labels::ROLE))
                    .map(String::as_str)
                    == Some(labels::ROLE_STANDBY)
            })
            .count();
        Ok::<_, kube::Error>((left == 0).then_some(()))
    })
    .await?;
    let (cold, was_standby) = scale_up_until_a_new_pod_serves(&run, name, &addr, 2).await?;
    assert!(!was_standby);

    let p50 = percentile(&promoted, 0.5);
    let p90 = percentile(&promoted, 0.9);
    eprintln!(
        "real node prewarm: replica decision -> first answer from the new serving pod: \
         promoted standby p50 {:.2}s p90 {:.2}s max {:.2}s over {rounds} scale-ups; \
         cold pod {:.2}s",
        p50.as_secs_f64(),
        p90.as_secs_f64(),
        percentile(&promoted, 1.0).as_secs_f64(),
        cold.as_secs_f64()
    );
    assert!(
        p50 < cold,
        "promotion (p50 {p50:?}) is no faster than a cold pod ({cold:?})"
    );
    run.finish(name).await
}

/// When the Deployment `name` is at zero replicas with no pod left.
async fn wait_scaled_to_zero(
    deployments: &Api<Deployment>,
    pods: &Api<Pod>,
    name: &str,
) -> anyhow::Result<Instant> {
    Ok(wait::until(
        "KEDA to scale the idle Deployment to 0",
        TIMEOUT,
        || async {
            let replicas = deployments.get(name).await?.spec.replicas;
            let left = service_pods(pods, name).await?;
            Ok::<_, kube::Error>((replicas == Some(0) && left.is_empty()).then(Instant::now))
        },
    )
    .await?)
}

/// Provider keda with `minReplicas: 0` on the real node, with KEDA and
/// Prometheus of the plane: idle, KEDA scales the Deployment to zero and
/// the Service answers through the operator's zero responder; a request
/// there gets 503 + Retry-After (never a refused connection) and wakes the
/// service, and a client that honours Retry-After is served by the new pod.
#[tokio::test]
async fn keda_scales_an_idle_service_to_zero_and_a_request_brings_it_back() -> anyhow::Result<()> {
    let name = "zero";
    let idle_seconds = 10;
    let ns = shared::namespace_with_real_node("e2e-keda").await?;
    let images = ns
        .shared
        .images
        .clone()
        .expect("a real-node plane has images");
    let prometheus = ns
        .shared
        .prometheus
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the real-node plane runs Prometheus"))?;
    fixtures::install_crd(&ns.client).await?;
    let mut opts = OperatorOptions::for_namespace(&ns.name);
    opts.extra_args = vec![
        format!("--keda-prometheus-url=http://{prometheus}"),
        format!("--zero-responder-ip={}", hndsr_e2e::node::host_address()?),
        "--zero-retry-after-seconds=1".into(),
    ];
    let mut operator =
        Operator::start(&ns.shared.kubeconfig, &ns.shared.dir.join("logs"), &opts).await?;
    // Prometheus scrapes the operator: KEDA's wake trigger reads its gauge.
    hndsr_e2e::monitoring::add_scrape_target(
        &hndsr_e2e::monitoring::targets_dir(&ns.shared.dir),
        &format!("operator-{}", ns.name),
        operator.metrics_addr(),
    )?;
    let svcs: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let spec = serde_json::json!({
        "serving": { "rateLimitPerHour": 0, "drainSeconds": 2 },
        "autoscaling": {
            "minReplicas": 0,
            "maxReplicas": 2,
            "provider": "keda",
            "keda": { "pollingIntervalSeconds": 1, "idleSecondsBeforeZero": idle_seconds },
        },
    });
    let created = Instant::now();
    svcs.create(
        &PostParams::default(),
        &cpu_service_with(name, &images.server, &weights_sha256()?, spec)?,
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);

    // Idle from the start: KEDA scales the new Deployment to zero (it
    // starts the idle clock at creation), its pod goes away and the status
    // says so.
    let to_zero = wait_scaled_to_zero(&deployments, &pods, name).await?;
    let to_zero = to_zero.duration_since(created);
    wait::until("Ready=False/ScaledToZero", TIMEOUT, || async {
        let svc = svcs.get(name).await?;
        let ready = svc.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == conditions::READY)
        });
        Ok::<_, kube::Error>(
            ready
                .filter(|c| c.reason == conditions::reasons::SCALED_TO_ZERO)
                .map(|_| ()),
        )
    })
    .await?;

    // At zero, through the Service as a client in the cluster: an immediate
    // 503 with Retry-After from the zero responder.
    let ip = Api::<Service>::namespaced(ns.client.clone(), &ns.name)
        .get(name)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow::anyhow!("Service {name} has no ClusterIP"))?;
    let addr = format!("{ip}:80");
    let sample = std::fs::read(bins::repo_root().join(SAMPLE))?;
    let asked = Instant::now();
    let (status, headers, body) = post(&addr, "/v1/upscale?scale=4", &sample).await?;
    let first_answer = asked.elapsed();
    assert_eq!(status, 503, "{headers}");
    let lower = headers.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{headers}");
    let error: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(error["type"], "scaled_to_zero", "{error}");

    // A client that honours Retry-After: every answer is a 503 until the
    // woken pod serves; a refused connection would be the silent failure
    // scale to zero must not have.
    let mut refusals = 0;
    let (status, headers, body) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match post(&addr, "/v1/upscale?scale=4", &sample).await {
            Ok((503, _, _)) => refusals += 1,
            Ok(answer) => break answer,
            Err(e) => anyhow::bail!("request {} after the wake failed: {e}", refusals + 2),
        }
        anyhow::ensure!(
            asked.elapsed() < TIMEOUT,
            "not served within {TIMEOUT:?} of the first request at zero"
        );
    };
    let served_after = asked.elapsed();
    assert_eq!(status, 200, "{headers}");
    assert_eq!(png_size(&body), Some((1024, 1024)), "{headers}");
    let replicas = deployments.get(name).await?.spec.replicas;
    assert_eq!(replicas, Some(1), "one request wakes one pod");

    // Served by a pod again: the route to the responder is gone.
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let zero_slice = format!("{name}-zero");
    wait::until("the zero EndpointSlice to be removed", TIMEOUT, || async {
        Ok::<_, kube::Error>(slices.get_opt(&zero_slice).await?.is_none().then_some(()))
    })
    .await?;

    // Idle again after serving: back to zero once idleSecondsBeforeZero has
    // passed without load, and the Service routes to the responder again.
    let served_at = Instant::now();
    let idle_again = wait_scaled_to_zero(&deployments, &pods, name)
        .await?
        .duration_since(served_at);
    assert!(
        idle_again >= Duration::from_secs(idle_seconds - 2),
        "back to zero {idle_again:?} after serving, before the {idle_seconds}s idle period"
    );
    wait::until("the zero EndpointSlice again", TIMEOUT, || async {
        Ok::<_, kube::Error>(slices.get_opt(&zero_slice).await?.map(|_| ()))
    })
    .await?;
    let (status, headers, _) = post(&addr, "/v1/upscale?scale=4", &sample).await?;
    assert_eq!(status, 503, "at zero again: {headers}");
    // Through all of it the ScaledObject was written once: KEDA's own
    // writes to it (finalizer, status) are no drift to revert.
    let metrics = operator.metrics().await.unwrap_or_default();
    assert!(
        metrics.contains(r#"hndsr_operator_applies_total{kind="ScaledObject"} 1"#),
        "{metrics}"
    );
    eprintln!(
        "real node KEDA: create -> 0 replicas {:.1}s; at zero: first answer (503) {:.0}ms; \
         first request -> 200 from the woken pod {:.1}s ({refusals} retries at Retry-After 1s); \
         served -> 0 replicas again {:.1}s (idleSecondsBeforeZero {idle_seconds})",
        to_zero.as_secs_f64(),
        first_answer.as_secs_f64() * 1000.0,
        served_after.as_secs_f64(),
        idle_again.as_secs_f64(),
    );
    svcs.delete(name, &DeleteParams::default()).await?;
    operator.check_running()?;
    operator.stop();
    ns.delete().await?;
    Ok(())
}

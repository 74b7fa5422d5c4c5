//! Starting and stopping one control plane: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok on 127.0.0.1, plus fake
//! GPU nodes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::bins::{self, Binaries};
use crate::certs::{FRONT_PROXY_CLIENT_CN, NodeIdentity, Pki};
use crate::keda::Keda;
use crate::monitoring::Monitoring;
use crate::node::{self, NodeConfig, RealNode};
use crate::process::{Proc, free_port, http_get, log_tail};
use crate::registry::{Images, Registry};
use crate::{Error, Result, wait};

/// The extended resource the fake nodes advertise.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Annotation kwok selects its nodes by (`--manage-nodes-with-annotation-selector`).
const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// Service CIDR of the apiserver (its first address is in the serving cert); a
/// /16 leaves room for the 1000-object measurements.
const SERVICE_CIDR: &str = "10.0.0.0/16";

/// The fake GPU nodes to create.
#[derive(Debug, Clone)]
pub struct FakeNodes {
    /// How many nodes.
    pub count: usize,
    /// `nvidia.com/gpu` capacity of each.
    pub gpus_per_node: u32,
    /// Nodes are named `<prefix>-0`, `<prefix>-1`, ...
    pub name_prefix: String,
}

impl Default for FakeNodes {
    fn default() -> Self {
        Self {
            count: 2,
            gpus_per_node: 4,
            name_prefix: "gpu-node".to_owned(),
        }
    }
}

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Working directory: certificates, etcd data, logs, the kubeconfig.
    /// Emptied at start.
    pub dir: PathBuf,
    /// The fake GPU nodes.
    pub nodes: FakeNodes,
    /// `--horizontal-pod-autoscaler-sync-period` of the controller-manager.
    pub hpa_sync_period: Duration,
    /// How long each component may take to become ready.
    pub start_timeout: Duration,
    /// Also start the image registry (with `make images` output pushed to
    /// it) and a real node (kubelet + containerd + kube-proxy; root only).
    pub real_node: bool,
}

impl ControlPlaneOptions {
    /// Defaults: 2 nodes × 4 GPUs, HPA sync every 2 s, 120 s per component.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            nodes: FakeNodes::default(),
            hpa_sync_period: Duration::from_secs(2),
            start_timeout: Duration::from_secs(120),
            real_node: false,
        }
    }
}

/// A running control plane. Dropping it stops every process.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    pki: Pki,
    bins: Binaries,
    /// In start order; stopped in reverse.
    procs: Vec<Proc>,
    registry: Option<Registry>,
    images: Option<Images>,
    node: Option<RealNode>,
    monitoring: Option<Monitoring>,
    keda: Option<Keda>,
}

impl ControlPlane {
    /// Starts every component, waits until each is ready, creates the fake
    /// nodes and waits until kwok reports them Ready.
    ///
    /// Children are spawned from the thread that polls this future and die
    /// with it (see [`crate::process`]): run it with `block_on` on a thread
    /// that outlives the control plane, never inside `tokio::spawn`.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self> {
        let bins = Binaries::locate()?;
        let dir = opts.dir.clone();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(Error::io("removing", &dir))?;
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(Error::io("creating", &logs))?;
        let identity = if opts.real_node {
            node::identity()?
        } else {
            NodeIdentity {
                name: node::NODE_NAME.to_owned(),
                addresses: vec!["127.0.0.1".to_owned()],
            }
        };
        let pki = Pki::generate(&dir.join("pki"), &identity)?;

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let apiserver_port = free_port()?;
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki)?;

        let mut plane = Self {
            dir: dir.clone(),
            kubeconfig,
            server,
            pki,
            bins,
            procs: Vec::new(),
            registry: None,
            images: None,
            node: None,
            monitoring: None,
            keda: None,
        };
        let timeout = opts.start_timeout;

        // etcd
        let etcd = plane.etcd_args(etcd_client, etcd_peer);
        plane.spawn("etcd", &plane.bins.etcd.clone(), &etcd, &logs)?;
        plane.wait_etcd(etcd_client, timeout).await?;

        // kube-apiserver
        let apiserver = plane.apiserver_args(
            etcd_client,
            apiserver_port,
            opts.real_node.then(|| identity.addresses[0].as_str()),
        );
        plane.spawn(
            "kube-apiserver",
            &plane.bins.kube_apiserver.clone(),
            &apiserver,
            &logs,
        )?;
        let client = plane.wait_apiserver(timeout).await?;

        // controllers, scheduler, fake kubelets
        let kcm = plane.controller_manager_args(&opts)?;
        plane.spawn(
            "kube-controller-manager",
            &plane.bins.kube_controller_manager.clone(),
            &kcm,
            &logs,
        )?;
        let scheduler = plane.scheduler_args()?;
        plane.spawn(
            "kube-scheduler",
            &plane.bins.kube_scheduler.clone(),
            &scheduler,
            &logs,
        )?;
        let kwok = plane.kwok_args();
        plane.spawn("kwok", &plane.bins.kwok.clone(), &kwok, &logs)?;

        plane.create_nodes(&client, &opts.nodes).await?;
        plane
            .wait_nodes_ready(&client, &opts.nodes, timeout)
            .await?;
        // The service-account controller runs in the controller-manager: the
        // default ServiceAccount appearing means the controllers are working.
        plane
            .wait_default_service_account(&client, "default", timeout)
            .await?;
        if opts.real_node {
            plane.start_real_node(&client, &identity, timeout).await?;
        }
        Ok(plane)
    }

    async fn start_real_node(
        &mut self,
        client: &Client,
        identity: &NodeIdentity,
        timeout: Duration,
    ) -> Result<()> {
        let registry = Registry::start(&self.bins, &self.dir, timeout).await?;
        let images = registry.push_images()?;
        let registry_addr = registry.addr().to_owned();
        self.registry = Some(registry);
        let node_dir = self.dir.join("node");
        let cfg = NodeConfig {
            dir: &node_dir,
            server: &self.server,
            pki: &self.pki,
            bins: &self.bins,
            address: &identity.addresses[0],
            registry: &registry_addr,
            pause_image: &images.pause,
        };
        self.node = Some(RealNode::start(&cfg, client, timeout).await?);
        self.images = Some(images);
        self.monitoring = Some(
            Monitoring::start(&self.bins, &self.dir, &self.kubeconfig, client, timeout).await?,
        );
        self.keda =
            Some(Keda::start(&self.bins, &self.dir, &self.kubeconfig, client, timeout).await?);
        Ok(())
    }

    /// The images in the local registry (with a real node only).
    pub fn images(&self) -> Option<&Images> {
        self.images.as_ref()
    }

    /// `127.0.0.1:PORT` of Prometheus (with a real node only).
    pub fn prometheus(&self) -> Option<&str> {
        self.monitoring.as_ref().map(Monitoring::prometheus_addr)
    }

    /// `127.0.0.1:PORT` of the local registry (with a real node only).
    pub fn registry(&self) -> Option<&str> {
        self.registry.as_ref().map(Registry::addr)
    }

    /// The admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The working directory (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificates.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The programs in use (kubectl and helm included).
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// A new admin client. Make one per tokio runtime: a client's connection
    /// pool lives on the runtime that created it.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Fails when any component has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(keda) = &mut self.keda {
            keda.check_running()?;
        }
        if let Some(monitoring) = &mut self.monitoring {
            monitoring.check_running()?;
        }
        if let Some(node) = &mut self.node {
            node.check_running()?;
        }
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }

    /// Pids of the running components, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
    }

    /// Stops every component, the last started first.
    pub fn stop(&mut self) {
        if let Some(mut keda) = self.keda.take() {
            keda.stop();
        }
        if let Some(mut monitoring) = self.monitoring.take() {
            monitoring.stop();
        }
        if let Some(mut node) = self.node.take() {
            node.stop();
        }
        if let Some(mut registry) = self.registry.take() {
            registry.stop();
        }
        while let Some(mut proc) = self.procs.pop() {
            proc.stop(Duration::from_secs(10));
        }
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String], logs: &Path) -> Result<()> {
        tracing::debug!(name, ?args, "starting");
        let proc = Proc::spawn(name, program, args, logs, &[])?;
        self.procs.push(proc);
        Ok(())
    }

    fn etcd_args(&self, client: u16, peer: u16) -> Vec<String> {
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        vec![
            "--name=e2e".into(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=e2e={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ]
    }

    /// With `node_address` (a real node), pods must reach the apiserver:
    /// it binds every address and advertises the node's, and the `kubernetes`
    /// Service's endpoints point there (kube-proxy routes 10.0.0.1:443).
    fn apiserver_args(
        &self,
        etcd_client: u16,
        port: u16,
        node_address: Option<&str>,
    ) -> Vec<String> {
        let p = &self.pki;
        let path = |p: &PathBuf| p.display().to_string();
        let (bind, advertise, reconciler) = match node_address {
            Some(address) => ("0.0.0.0", address, "lease"),
            None => ("127.0.0.1", "127.0.0.1", "none"),
        };
        vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!("--endpoint-reconciler-type={reconciler}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", self.dir.join("apiserver").display()),
            format!("--tls-cert-file={}", path(&p.apiserver_cert)),
            format!("--tls-private-key-file={}", path(&p.apiserver_key)),
            format!("--client-ca-file={}", path(&p.ca_cert)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!(
                "--service-account-key-file={}",
                path(&p.service_account_pub)
            ),
            format!(
                "--service-account-signing-key-file={}",
                path(&p.service_account_key)
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Node: the real node's kubelet (and NodeRestriction) by its identity.
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!(
                "--kubelet-client-certificate={}",
                path(&p.apiserver_kubelet_client_cert)
            ),
            format!(
                "--kubelet-client-key={}",
                path(&p.apiserver_kubelet_client_key)
            ),
            format!("--kubelet-certificate-authority={}", path(&p.ca_cert)),
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--allow-privileged=true".into(),
            format!(
                "--requestheader-client-ca-file={}",
                path(&p.front_proxy_ca_cert)
            ),
            format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}"),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!(
                "--proxy-client-cert-file={}",
                path(&p.front_proxy_client_cert)
            ),
            format!(
                "--proxy-client-key-file={}",
                path(&p.front_proxy_client_key)
            ),
            // Room for the 1000-object measurements.
            "--max-requests-inflight=1000".into(),
            "--max-mutating-requests-inflight=500".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]
    }

    fn component_common(&self, name: &str) -> Result<Vec<String>> {
        let kubeconfig = self.kubeconfig.display().to_string();
        Ok(vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", self.dir.join(name).display()),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ])
    }

    fn controller_manager_args(&self, opts: &ControlPlaneOptions) -> Result<Vec<String>> {
        let p = &self.pki;
        let mut args = self.component_common("kube-controller-manager")?;
        args.extend([
            format!(
                "--service-account-private-key-file={}",
                p.service_account_key.display()
            ),
            format!("--root-ca-file={}", p.ca_cert.display()),
            format!("--cluster-signing-cert-file={}", p.ca_cert.display()),
            format!("--cluster-signing-key-file={}", p.ca_key.display()),
            "--use-service-account-credentials=false".into(),
            format!(
                "--horizontal-pod-autoscaler-sync-period={}ms",
                opts.hpa_sync_period.as_millis()
            ),
            // Tests scale down within seconds, not the default 5 minutes.
            "--horizontal-pod-autoscaler-downscale-stabilization=5s".into(),
            "--concurrent-deployment-syncs=20".into(),
            "--concurrent-replicaset-syncs=20".into(),
            "--concurrent-gc-syncs=50".into(),
        ]);
        Ok(args)
    }

    fn scheduler_args(&self) -> Result<Vec<String>> {
        self.component_common("kube-scheduler")
    }

    fn kwok_args(&self) -> Vec<String> {
        let stages = bins::repo_root().join("e2e/kwok/stages.yaml");
        vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--config={}", stages.display()),
            "--manage-all-nodes=false".into(),
            format!(
                "--manage-nodes-with-annotation-selector={}={}",
                KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
            ),
            "--cidr=10.128.0.1/16".into(),
            "--node-ip=10.127.0.1".into(),
        ]
    }

    async fn wait_etcd(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if let Some((200, body)) = http_get(&format!("127.0.0.1:{port}"), "/health").await
                && body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.timeout("etcd /health", timeout, "etcd"));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    async fn wait_apiserver(&mut self, timeout: Duration) -> Result<Client> {
        let start = Instant::now();
        let client = self.client().await?;
        loop {
            self.check_running()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            if client.request_text(req).await.is_ok() {
                return Ok(client);
            }
            if start.elapsed() > timeout {
                return Err(self.timeout("kube-apiserver /readyz", timeout, "kube-apiserver"));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    async fn create_nodes(&self, client: &Client, nodes: &FakeNodes) -> Result<()> {
        let api: Api<Node> = Api::all(client.clone());
        for i in 0..nodes.count {
            let name = format!("{}-{i}", nodes.name_prefix);
            let node: Node = serde_json::from_value(fake_node(&name, nodes.gpus_per_node))
                .expect("the fake node literal is a valid Node");
            api.create(&PostParams::default(), &node)
                .await
                .map_err(Error::kube(format!("creating node {name}")))?;
        }
        Ok(())
    }

    async fn wait_nodes_ready(
        &mut self,
        client: &Client,
        nodes: &FakeNodes,
        timeout: Duration,
    ) -> Result<()> {
        let api: Api<Node> = Api::all(client.clone());
        let start = Instant::now();
        loop {
            self.check_running()?;
            let mut ready = 0;
            for i in 0..nodes.count {
                let name = format!("{}-{i}", nodes.name_prefix);
                if let Ok(node) = api.get(&name).await
                    && node_schedulable(&node)
                {
                    ready += 1;
                }
            }
            if ready == nodes.count {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.timeout(
                    "the fake nodes to be Ready and untainted",
                    timeout,
                    "kwok",
                ));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    async fn wait_default_service_account(
        &mut self,
        client: &Client,
        ns: &str,
        timeout: Duration,
    ) -> Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let start = Instant::now();
        loop {
            self.check_running()?;
            if api.get_opt("default").await.ok().flatten().is_some() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.timeout(
                    "the default ServiceAccount (kube-controller-manager)",
                    timeout,
                    "kube-controller-manager",
                ));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    fn timeout(&self, what: &str, waited: Duration, log_of: &str) -> Error {
        let log = self.dir.join("logs").join(format!("{log_of}.log"));
        Error::Timeout {
            what: what.to_owned(),
            waited,
            detail: format!("; last lines of {}:\n{}", log.display(), log_tail(&log, 30)),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client for the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let err = |message: String| Error::Kubeconfig {
        path: path.to_owned(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(Error::kube("building a client"))
}

fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<()> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: hndsr-e2e\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: hndsr-e2e-admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n\
         contexts:\n\
         - name: hndsr-e2e\n  context:\n    cluster: hndsr-e2e\n    user: hndsr-e2e-admin\n\
         current-context: hndsr-e2e\n",
        ca = pki.ca_cert.display(),
        cert = pki.admin_cert.display(),
        key = pki.admin_key.display(),
    );
    std::fs::write(path, text).map_err(Error::io("writing", path))
}

/// A Node kwok manages, advertising `gpus` GPUs.
pub(crate) fn fake_node(name: &str, gpus: u32) -> serde_json::Value {
    let resources = serde_json::json!({
        "cpu": "1000",
        "memory": "8Ti",
        "pods": "250",
        "ephemeral-storage": "1Ti",
        GPU_RESOURCE: gpus.to_string(),
    });
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": { KWOK_NODE_ANNOTATION.0: KWOK_NODE_ANNOTATION.1 },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {},
        "status": {
            "capacity": resources.clone(),
            "allocatable": resources,
        },
    })
}

/// Ready and without the not-ready / unreachable taints.
fn node_schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
    ready && !tainted
}

//! A real node beside the kwok GPU nodes: containerd + runc + the CNI bridge,
//! kubelet and kube-proxy, registered with the local control plane. Pods on
//! it really run (the server image, pulled from the local registry), get pod
//! IPs the host can dial, and Services reach them through kube-proxy's
//! iptables rules.
//!
//! The host side (prerequisites, and undoing every host change: processes,
//! mounts, network namespaces, the bridge, iptables chains, cgroups, sysctls)
//! is `e2e/scripts/node-host.sh`. A janitor started from it sweeps when the
//! harness stops *or dies*: it gets SIGTERM as its parent-death signal.
//!
//! Paths are fixed (`/var/lib/hndsr-node`, `/run/hndsr-node`), so one real
//! node runs per machine: the janitor holds a lock from before the first
//! host change until its sweep is done.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::Api;

use crate::bins::{self, Binaries};
use crate::certs::{NodeIdentity, Pki};
use crate::process::{Proc, free_port, log_tail};
use crate::{Error, Result, wait};

/// The real node's name.
pub const NODE_NAME: &str = "hndsr-node";
/// Label every real node carries: CPU HndsrServices select it with a
/// `nodeSelector`; the kwok GPU nodes carry `…=gpu`.
pub const POOL_LABEL: &str = "hndsr.io/pool";
/// [`POOL_LABEL`]'s value on the real node.
pub const POOL_REAL: &str = "cpu";
/// Pod CIDR of the node (CNI host-local allocates from it).
pub const POD_CIDR: &str = "10.244.0.0/24";

const NODE_ROOT: &str = "/var/lib/hndsr-node";
const NODE_RUN: &str = "/run/hndsr-node";
const BRIDGE: &str = "hndsr0";
const HOST_SCRIPT: &str = "e2e/scripts/node-host.sh";

/// What the node needs from the control plane.
#[derive(Debug, Clone)]
pub struct NodeConfig<'a> {
    /// Directory for the node's configuration files and logs.
    pub dir: &'a Path,
    /// The apiserver URL.
    pub server: &'a str,
    /// The control plane's certificates (the node's included).
    pub pki: &'a Pki,
    /// The programs.
    pub bins: &'a Binaries,
    /// The node's address ([`host_address`]).
    pub address: &'a str,
    /// `host:port` of the registry the sandbox image and the pods' images
    /// come from (plain HTTP on loopback).
    pub registry: &'a str,
    /// The pod sandbox image (in `registry`).
    pub pause_image: &'a str,
}

/// A running real node. Dropping it stops its programs and sweeps the host.
#[derive(Debug)]
pub struct RealNode {
    dir: PathBuf,
    /// containerd, kubelet, kube-proxy; stopped in reverse.
    procs: Vec<Proc>,
    janitor: Option<Proc>,
}

/// The host's first global IPv4 address: the kubelet refuses a loopback
/// node IP, and the apiserver dials the kubelet there.
pub fn host_address() -> Result<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .map_err(|source| Error::Spawn {
            name: "ip (iproute2)".into(),
            source,
        })?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(BRIDGE) && !l.contains(" cni"))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next().map(str::to_owned)
        })
        .ok_or_else(|| Error::Setup("the real node needs a non-loopback IPv4 address".into()))
}

/// The identity the node's certificates are made for.
pub fn identity() -> Result<NodeIdentity> {
    Ok(NodeIdentity {
        name: NODE_NAME.to_owned(),
        addresses: vec![host_address()?, "127.0.0.1".to_owned()],
    })
}

impl RealNode {
    /// Sweeps leftovers, starts containerd, kubelet and kube-proxy and waits
    /// until the Node is Ready. Spawn from a long-lived thread, as for
    /// [`crate::ControlPlane::start`].
    pub async fn start(cfg: &NodeConfig<'_>, client: &Client, timeout: Duration) -> Result<Self> {
        let logs = cfg.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(Error::io("creating", &logs))?;
        // The janitor first: it takes the node lock, checks the
        // prerequisites, sweeps what a killed run left; from then on every
        // host change is undone even when this process is killed.
        let janitor = Proc::spawn_with_death_signal(
            "node-janitor",
            Path::new("bash"),
            &[
                bins::repo_root().join(HOST_SCRIPT).display().to_string(),
                "janitor".into(),
            ],
            &logs,
            "TERM",
        )?;
        let mut node = Self {
            dir: cfg.dir.to_owned(),
            procs: Vec::new(),
            janitor: Some(janitor),
        };
        node.wait_janitor(Duration::from_secs(150)).await?;
        for d in [cfg.dir, Path::new(NODE_ROOT), Path::new(NODE_RUN)] {
            std::fs::create_dir_all(d).map_err(Error::io("creating", d))?;
        }

        let files = write_configs(cfg)?;
        let containerd = Proc::spawn(
            "containerd",
            Path::new("containerd"),
            &[format!("--config={}", files.containerd.display())],
            &logs,
            &[],
        )?;
        node.procs.push(containerd);
        node.wait_containerd(timeout).await?;

        let kubelet = Proc::spawn(
            "kubelet",
            &cfg.bins.kubelet,
            &kubelet_args(cfg, &files),
            &logs,
            &[],
        )?;
        node.procs.push(kubelet);
        let proxy = Proc::spawn(
            "kube-proxy",
            &cfg.bins.kube_proxy,
            &[
                format!("--config={}", files.kube_proxy.display()),
                "--v=1".into(),
            ],
            &logs,
            &[],
        )?;
        node.procs.push(proxy);
        node.wait_ready(client, timeout).await?;
        Ok(node)
    }

    /// Fails when containerd, kubelet or kube-proxy has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }

    /// Where the node's logs are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Stops the programs and undoes every host change.
    pub fn stop(&mut self) {
        while let Some(mut proc) = self.procs.pop() {
            proc.stop(Duration::from_secs(10));
        }
        if let Some(mut janitor) = self.janitor.take() {
            // SIGTERM makes the janitor sweep; give it the time to.
            janitor.stop(Duration::from_secs(60));
        }
    }

    async fn wait_janitor(&mut self, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let janitor = self.janitor.as_mut().expect("the janitor runs until stop");
            if std::fs::read_to_string(janitor.log()).is_ok_and(|l| l.contains("janitor ready")) {
                return Ok(());
            }
            if let Err(e) = janitor.check_running() {
                return Err(Error::Setup(format!("the real node cannot start: {e}")));
            }
            if start.elapsed() > timeout {
                return Err(self.timeout(
                    "the node janitor (lock, prerequisites)",
                    timeout,
                    "node-janitor",
                ));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    async fn wait_containerd(&mut self, timeout: Duration) -> Result<()> {
        let sock = Path::new(NODE_RUN).join("containerd.sock");
        let start = std::time::Instant::now();
        while !sock.exists() {
            self.check_running()?;
            if start.elapsed() > timeout {
                return Err(self.timeout("containerd's socket", timeout, "containerd"));
            }
            tokio::time::sleep(wait::POLL).await;
        }
        Ok(())
    }

    async fn wait_ready(&mut self, client: &Client, timeout: Duration) -> Result<()> {
        let api: Api<Node> = Api::all(client.clone());
        let start = std::time::Instant::now();
        loop {
            self.check_running()?;
            if let Ok(node) = api.get(NODE_NAME).await
                && node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.timeout("the real node to be Ready", timeout, "kubelet"));
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    fn timeout(&self, what: &str, waited: Duration, log_of: &str) -> Error {
        let log = self.log_dir().join(format!("{log_of}.log"));
        Error::Timeout {
            what: what.to_owned(),
            waited,
            detail: format!("; last lines of {}:\n{}", log.display(), log_tail(&log, 30)),
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Files {
    containerd: PathBuf,
    kubelet: PathBuf,
    kubelet_kubeconfig: PathBuf,
    kube_proxy: PathBuf,
}

fn write_configs(cfg: &NodeConfig<'_>) -> Result<Files> {
    let d = cfg.dir;
    let files = Files {
        containerd: d.join("containerd.toml"),
        kubelet: d.join("kubelet.yaml"),
        kubelet_kubeconfig: d.join("kubelet.kubeconfig"),
        kube_proxy: d.join("kube-proxy.yaml"),
    };
    let cni_dir = d.join("cni");
    let certs_dir = d.join("certs.d");
    let registry_dir = certs_dir.join(cfg.registry);
    for dir in [&cni_dir, &registry_dir] {
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    }
    let write =
        |path: &Path, text: String| std::fs::write(path, text).map_err(Error::io("writing", path));

    write(
        &files.containerd,
        containerd_config(cfg, &cni_dir, &certs_dir),
    )?;
    write(&cni_dir.join("10-hndsr.conflist"), cni_conflist())?;
    write(
        &registry_dir.join("hosts.toml"),
        registry_hosts(cfg.registry),
    )?;
    write(
        &files.kubelet_kubeconfig,
        kubeconfig(
            cfg.server,
            &cfg.pki.ca_cert,
            &cfg.pki.kubelet_client_cert,
            &cfg.pki.kubelet_client_key,
        ),
    )?;
    write(&files.kubelet, kubelet_config(cfg)?)?;
    let proxy_kubeconfig = d.join("kube-proxy.kubeconfig");
    write(
        &proxy_kubeconfig,
        kubeconfig(
            cfg.server,
            &cfg.pki.ca_cert,
            &cfg.pki.kube_proxy_cert,
            &cfg.pki.kube_proxy_key,
        ),
    )?;
    write(&files.kube_proxy, kube_proxy_config(&proxy_kubeconfig)?)?;
    Ok(files)
}

/// containerd 1.6, config version 2: private root, state and socket; CRI with
/// runc (cgroupfs), our CNI config, our registry, our sandbox image.
fn containerd_config(cfg: &NodeConfig<'_>, cni_dir: &Path, certs_dir: &Path) -> String {
    format!(
        r#"version = 2
root = "{NODE_ROOT}/containerd"
state = "{NODE_RUN}/containerd"

[grpc]
  address = "{NODE_RUN}/containerd.sock"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{NODE_ROOT}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The VM lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        pause = cfg.pause_image,
        cni = cni_dir.display(),
        certs = certs_dir.display(),
    )
}

/// The registry on loopback speaks plain HTTP.
fn registry_hosts(registry: &str) -> String {
    format!(
        "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

fn cni_conflist() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "hndsr",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": format!("{NODE_ROOT}/cni-ipam"),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    })
    .to_string()
}

fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: node\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n\
         contexts:\n- name: local\n  context:\n    cluster: local\n    user: node\ncurrent-context: local\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

fn kubelet_config(cfg: &NodeConfig<'_>) -> Result<String> {
    let sock = format!("unix://{NODE_RUN}/containerd.sock");
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // The host's cgroups are v1 (hybrid); kubelet 1.35+ refuses them otherwise.
        "failCgroupV1": false,
        // containerd 1.6 lacks the RuntimeConfig call; the kubelet uses this.
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": sock,
        "imageServiceEndpoint": sock,
        "address": cfg.address,
        "port": free_port()?,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port()?,
        "tlsCertFile": cfg.pki.kubelet_serving_cert,
        "tlsPrivateKeyFile": cfg.pki.kubelet_serving_key,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": cfg.pki.ca_cert },
        },
        "authorization": { "mode": "Webhook" },
        "failSwapOn": false,
        // A shared build machine's disk and memory are not the node's to guard.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "resolvConf": "",
        "podCIDR": POD_CIDR,
        "maxPods": 40,
        "serializeImagePulls": false,
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "registerNode": true,
    });
    Ok(serde_json::to_string_pretty(&config).expect("a JSON literal serializes"))
}

fn kubelet_args(cfg: &NodeConfig<'_>, files: &Files) -> Vec<String> {
    vec![
        format!("--config={}", files.kubelet.display()),
        format!("--kubeconfig={}", files.kubelet_kubeconfig.display()),
        format!("--hostname-override={NODE_NAME}"),
        format!("--node-ip={}", cfg.address),
        format!("--node-labels={POOL_LABEL}={POOL_REAL}"),
        // The VM lacks CAP_SYS_RESOURCE: the default -999 cannot be set.
        "--oom-score-adj=0".into(),
        format!("--root-dir={NODE_ROOT}/kubelet"),
        format!("--cert-dir={NODE_ROOT}/pki"),
        "--v=1".into(),
    ]
}

fn kube_proxy_config(kubeconfig: &Path) -> Result<String> {
    let config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": { "kubeconfig": kubeconfig },
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        // No IPVS here; no oom_score_adj below 0 (no CAP_SYS_RESOURCE).
        "oomScoreAdj": 0,
        // Leave the host's conntrack table size alone.
        "conntrack": { "maxPerCore": 0, "min": 0 },
        // NodePorts on 127.0.0.1 need route_localnet; nothing uses them here.
        "iptables": { "localhostNodePorts": false },
        "metricsBindAddress": format!("127.0.0.1:{}", free_port()?),
        "healthzBindAddress": format!("127.0.0.1:{}", free_port()?),
    });
    Ok(serde_json::to_string_pretty(&config).expect("a JSON literal serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_config_is_a_bridge_with_host_local_addresses_in_the_pod_cidr() {
        let v: serde_json::Value = serde_json::from_str(&cni_conflist()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["bridge"], BRIDGE);
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
    }

    #[test]
    fn the_registry_is_reached_over_plain_http() {
        let hosts = registry_hosts("127.0.0.1:5000");
        assert!(
            hosts.starts_with("server = \"http://127.0.0.1:5000\""),
            "{hosts}"
        );
        assert!(
            hosts.contains("capabilities = [\"pull\", \"resolve\"]"),
            "{hosts}"
        );
    }
}

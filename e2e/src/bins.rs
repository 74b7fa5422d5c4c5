//! Where the control-plane programs are, and which versions.
//!
//! `e2e/scripts/build-binaries.sh` builds them into
//! `$HNDSR_E2E_BIN_DIR` (default `~/.cache/hndsr/e2e-bin`), one directory per
//! tool and version. The versions here must match the script's.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `k8s.io/kubernetes` version of kube-apiserver, -controller-manager, -scheduler and kubectl.
pub const KUBERNETES_VERSION: &str = "v1.36.3";
/// `go.etcd.io/etcd/server/v3` version.
pub const ETCD_VERSION: &str = "v3.6.16";
/// `sigs.k8s.io/kwok` version.
pub const KWOK_VERSION: &str = "v0.8.0";
/// `helm.sh/helm/v3` version.
pub const HELM_VERSION: &str = "v3.22.0";
/// `github.com/distribution/distribution/v3` version (the image registry).
pub const DISTRIBUTION_VERSION: &str = "v3.1.2";
/// `github.com/prometheus/prometheus` module version (Prometheus 3.16.0).
pub const PROMETHEUS_VERSION: &str = "v0.316.0";
/// `sigs.k8s.io/prometheus-adapter` version.
pub const PROMETHEUS_ADAPTER_VERSION: &str = "v0.12.0";

/// `github.com/kedacore/keda/v2` version (operator and metrics adapter).
pub const KEDA_VERSION: &str = "v2.21.0";

/// `github.com/argoproj/argo-cd/v3` version (application controller, repo
/// server, and the CLI's offline `argocd admin`).
pub const ARGOCD_VERSION: &str = "v3.6.2";

/// The command that builds the binaries (run from the repository root).
pub const BUILD_COMMAND: &str = "bash e2e/scripts/build-binaries.sh";

/// Environment variable overriding the binary cache directory.
pub const BIN_DIR_ENV: &str = "HNDSR_E2E_BIN_DIR";

/// Paths of every program the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-apiserver
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager
    pub kube_controller_manager: PathBuf,
    /// kube-scheduler
    pub kube_scheduler: PathBuf,
    /// kubectl
    pub kubectl: PathBuf,
    /// etcd
    pub etcd: PathBuf,
    /// kwok
    pub kwok: PathBuf,
    /// helm
    pub helm: PathBuf,
    /// kubelet (the real node)
    pub kubelet: PathBuf,
    /// kube-proxy (the real node)
    pub kube_proxy: PathBuf,
    /// registry (distribution)
    pub registry: PathBuf,
    /// prometheus
    pub prometheus: PathBuf,
    /// promtool
    pub promtool: PathBuf,
    /// prometheus-adapter
    pub prometheus_adapter: PathBuf,
    /// KEDA's operator (with its gRPC metrics service)
    pub keda: PathBuf,
    /// KEDA's external-metrics apiserver
    pub keda_adapter: PathBuf,
    /// KEDA's CRDs (`*.yaml`)
    pub keda_crds: PathBuf,
    /// Argo CD (one binary; `ARGOCD_BINARY_NAME` picks the role)
    pub argocd: PathBuf,
    /// Argo CD's CRDs (`*-crd.yaml`)
    pub argocd_crds: PathBuf,
    /// The scripts Argo CD's image puts on PATH (`git-verify-wrapper.sh`, ...)
    pub argocd_scripts: PathBuf,
}

impl Binaries {
    /// Finds every binary in the cache, failing (never skipping) with the
    /// build command when one is missing.
    pub fn locate() -> Result<Self> {
        Self::locate_in(&cache_dir())
    }

    /// [`Binaries::locate`] in the cache directory `root`.
    pub fn locate_in(root: &Path) -> Result<Self> {
        let k8s = root.join(format!("kubernetes-{KUBERNETES_VERSION}"));
        let node = root.join(format!("kubernetes-node-{KUBERNETES_VERSION}"));
        let prometheus = root.join(format!("prometheus-{PROMETHEUS_VERSION}"));
        let keda = root.join(format!("keda-{KEDA_VERSION}"));
        let argocd = root.join(format!("argo-cd-{ARGOCD_VERSION}"));
        let bins = Self {
            kube_apiserver: k8s.join("kube-apiserver"),
            kube_controller_manager: k8s.join("kube-controller-manager"),
            kube_scheduler: k8s.join("kube-scheduler"),
            kubectl: k8s.join("kubectl"),
            etcd: root.join(format!("etcd-{ETCD_VERSION}")).join("etcd"),
            kwok: root.join(format!("kwok-{KWOK_VERSION}")).join("kwok"),
            helm: root.join(format!("helm-{HELM_VERSION}")).join("helm"),
            kubelet: node.join("kubelet"),
            kube_proxy: node.join("kube-proxy"),
            registry: root
                .join(format!("distribution-{DISTRIBUTION_VERSION}"))
                .join("registry"),
            prometheus: prometheus.join("prometheus"),
            promtool: prometheus.join("promtool"),
            prometheus_adapter: root
                .join(format!("prometheus-adapter-{PROMETHEUS_ADAPTER_VERSION}"))
                .join("adapter"),
            keda: keda.join("keda"),
            keda_adapter: keda.join("keda-adapter"),
            keda_crds: keda.join("crds"),
            argocd: argocd.join("argocd"),
            argocd_crds: argocd.join("crds"),
            argocd_scripts: argocd.join("bin"),
        };
        for path in [
            &bins.kube_apiserver,
            &bins.kube_controller_manager,
            &bins.kube_scheduler,
            &bins.kubectl,
            &bins.etcd,
            &bins.kwok,
            &bins.helm,
            &bins.kubelet,
            &bins.kube_proxy,
            &bins.registry,
            &bins.prometheus,
            &bins.promtool,
            &bins.prometheus_adapter,
            &bins.keda,
            &bins.keda_adapter,
            &bins.keda_crds.join("keda.sh_scaledobjects.yaml"),
            &bins.argocd,
            &bins.argocd_crds.join("application-crd.yaml"),
            &bins.argocd_scripts.join("git-verify-wrapper.sh"),
        ] {
            if !path.is_file() {
                return Err(Error::MissingBinary { path: path.clone() });
            }
        }
        Ok(bins)
    }
}

/// The binary cache: `$HNDSR_E2E_BIN_DIR` or `~/.cache/hndsr/e2e-bin`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    home.join(".cache/hndsr/e2e-bin")
}

/// The repository root (the workspace this crate belongs to).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the repository root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_fails_naming_the_build_command() {
        let empty = tempfile::tempdir().unwrap();
        let err = Binaries::locate_in(empty.path()).unwrap_err().to_string();
        assert!(err.contains(BUILD_COMMAND), "{err}");
        assert!(err.contains("kubernetes-v1.36.3/kube-apiserver"), "{err}");
    }
}

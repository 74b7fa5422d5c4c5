//! Real metrics for the real node: Prometheus scrapes the server pods the
//! way a cluster without the Prometheus Operator does (Kubernetes service
//! discovery, the pods' `prometheus.io/*` annotations, which the operator
//! sets, and `namespace` / `pod` labels), and prometheus-adapter serves
//! `custom.metrics.k8s.io` from it with the chart's own rules
//! (`charts/hndsr-operator/files/prometheus-adapter-rules.yaml`), so the
//! operator's HPAs scale on what the pods report.

use std::path::Path;
use std::time::Duration;

use kube::Client;

use crate::bins::{self, Binaries};
use crate::metrics_server::register_api_service;
use crate::process::{Proc, free_port, wait_http_ok};
use crate::{Error, Result};

/// The chart's prometheus-adapter rules, used unchanged.
pub const ADAPTER_RULES: &str = "charts/hndsr-operator/files/prometheus-adapter-rules.yaml";
/// How often Prometheus scrapes the pods here (tests want fast reactions; a
/// cluster would use 15 s).
pub const SCRAPE_INTERVAL: &str = "2s";

/// Prometheus and prometheus-adapter, running.
#[derive(Debug)]
pub struct Monitoring {
    prometheus: Proc,
    adapter: Proc,
    prometheus_addr: String,
}

/// The directory of file-based scrape targets under the plane's `dir`:
/// operators the tests run on the host ([`add_scrape_target`]).
pub fn targets_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("prometheus").join("targets")
}

/// Makes Prometheus scrape `addr` (`host:port`, `/metrics`) as job
/// `hndsr-operator`: a target file in `targets`, which Prometheus watches.
pub fn add_scrape_target(targets: &Path, name: &str, addr: &str) -> Result<()> {
    std::fs::create_dir_all(targets).map_err(Error::io("creating", targets))?;
    let path = targets.join(format!("{name}.json"));
    let text = serde_json::json!([{ "targets": [addr], "labels": { "instance_name": name } }]);
    // Written aside and renamed, so Prometheus never reads half a file.
    let partial = targets.join(format!(".{name}.json.partial"));
    std::fs::write(&partial, text.to_string()).map_err(Error::io("writing", &partial))?;
    std::fs::rename(&partial, &path).map_err(Error::io("renaming", &path))
}

/// The scrape configuration: every pod annotated `prometheus.io/scrape:
/// "true"`, at its `prometheus.io/port` and `prometheus.io/path`, labelled
/// with its namespace and pod (what the adapter rules attribute series by)
/// and its HndsrService (what the chart's alerts group by); and the
/// operators in `targets` ([`add_scrape_target`]), whose zero responder's
/// wake requests KEDA reads.
pub fn prometheus_config(kubeconfig: &Path, targets: &Path) -> String {
    format!(
        r#"global:
  scrape_interval: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
scrape_configs:
  - job_name: hndsr-pods
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: {kubeconfig}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_phase]
        action: drop
        regex: Pending|Succeeded|Failed
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        target_label: __metrics_path__
        regex: (.+)
      - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: (.+);(.+)
        replacement: $1:$2
        target_label: __address__
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_hndsr_io_service]
        target_label: hndsr_io_service
  - job_name: hndsr-operator
    file_sd_configs:
      - files: ["{targets}/*.json"]
        refresh_interval: 5s
"#,
        kubeconfig = kubeconfig.display(),
        targets = targets.display()
    )
}

impl Monitoring {
    /// Starts Prometheus and the adapter, registers the adapter's APIService
    /// and waits until it is Available.
    pub async fn start(
        bins: &Binaries,
        dir: &Path,
        kubeconfig: &Path,
        client: &Client,
        timeout: Duration,
    ) -> Result<Self> {
        let logs = dir.join("logs");
        let prom_dir = dir.join("prometheus");
        std::fs::create_dir_all(&prom_dir).map_err(Error::io("creating", &prom_dir))?;
        let config = prom_dir.join("prometheus.yml");
        std::fs::write(&config, prometheus_config(kubeconfig, &targets_dir(dir)))
            .map_err(Error::io("writing", &config))?;
        let prometheus_addr = format!("127.0.0.1:{}", free_port()?);
        let prometheus = Proc::spawn(
            "prometheus",
            &bins.prometheus,
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
                format!("--web.listen-address={prometheus_addr}"),
                "--storage.tsdb.retention.time=2h".into(),
                "--log.level=warn".into(),
            ],
            &logs,
            &[],
        )?;
        let adapter_port = free_port()?;
        let kubeconfig = kubeconfig.display().to_string();
        let adapter = Proc::spawn(
            "prometheus-adapter",
            &bins.prometheus_adapter,
            &[
                format!("--secure-port={adapter_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--cert-dir={}", dir.join("prometheus-adapter").display()),
                format!("--lister-kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--prometheus-url=http://{prometheus_addr}/"),
                // Default 10m: a new pod's series would wait that long.
                "--metrics-relist-interval=5s".into(),
                format!(
                    "--config={}",
                    bins::repo_root().join(ADAPTER_RULES).display()
                ),
                "--v=1".into(),
            ],
            &logs,
            &[],
        )?;
        let mut monitoring = Self {
            prometheus,
            adapter,
            prometheus_addr,
        };
        monitoring.wait_prometheus(timeout).await?;
        register_api_service(client, "kube-system", "prometheus-adapter", adapter_port).await?;
        Ok(monitoring)
    }

    /// `127.0.0.1:PORT` of Prometheus.
    pub fn prometheus_addr(&self) -> &str {
        &self.prometheus_addr
    }

    /// Fails when Prometheus or the adapter has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.prometheus.check_running()?;
        self.adapter.check_running()
    }

    /// Stops both.
    pub fn stop(&mut self) {
        self.adapter.stop(Duration::from_secs(5));
        self.prometheus.stop(Duration::from_secs(5));
    }

    async fn wait_prometheus(&mut self, timeout: Duration) -> Result<()> {
        let addr = self.prometheus_addr.clone();
        let log = self.prometheus.log().to_owned();
        wait_http_ok(
            &addr,
            "/-/ready",
            "Prometheus /-/ready",
            &log,
            timeout,
            || self.check_running(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrape_config_keeps_annotated_pods_with_namespace_and_pod_labels() {
        let config = prometheus_config(Path::new("/k"), Path::new("/t"));
        assert!(config.contains(r#"files: ["/t/*.json"]"#), "{config}");
        assert!(config.contains("kubeconfig_file: /k"), "{config}");
        assert!(config.contains("__meta_kubernetes_pod_annotation_prometheus_io_scrape"));
        assert!(config.contains("target_label: namespace"));
        assert!(config.contains("target_label: pod"));
    }
}

//! KEDA for the real node: its operator (which scales ScaledObjects'
//! targets between zero and one and serves their metrics over gRPC) and its
//! metrics adapter (the `external.metrics.k8s.io` apiserver KEDA's HPAs
//! read), run as local processes built from KEDA's Go module.
//!
//! Out of a cluster both need what their Deployments would mount: a
//! kubeconfig, the namespace variables, and the mutual-TLS directory
//! (`ca.crt`, `tls.crt`, `tls.key`) of their gRPC link, which the harness
//! writes instead of KEDA's in-cluster certificate rotation. The
//! aggregator cannot reach a loopback Endpoint, so the adapter's APIService
//! goes through an ExternalName Service to `localhost`, as for
//! prometheus-adapter.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::bins::Binaries;
use crate::fixtures::{FIELD_MANAGER, apply_crd_file};
use crate::metrics_server::register_aggregated_api;
use crate::process::{Proc, free_port, wait_http_ok};
use crate::{Error, Result, certs};

/// The namespace KEDA's processes say they run in.
pub const NAMESPACE: &str = "keda";

/// KEDA's operator and metrics adapter, running.
#[derive(Debug)]
pub struct Keda {
    operator: Proc,
    adapter: Proc,
}

impl Keda {
    /// Installs KEDA's CRDs, starts both processes, registers the
    /// adapter's APIService and waits until it is Available.
    pub async fn start(
        bins: &Binaries,
        dir: &Path,
        kubeconfig: &Path,
        client: &Client,
        timeout: Duration,
    ) -> Result<Self> {
        install_crds(client, &bins.keda_crds).await?;
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE },
        }))
        .expect("the Namespace literal is valid");
        Api::<Namespace>::all(client.clone())
            .patch(
                NAMESPACE,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&namespace),
            )
            .await
            .map_err(Error::kube("creating the keda namespace"))?;

        let logs = dir.join("logs");
        let certs = dir.join("keda-certs");
        certs::mutual_tls_dir(&certs, "keda-operator")?;
        let kubeconfig = kubeconfig.display().to_string();
        let env = [
            ("KUBECONFIG", kubeconfig.as_str()),
            ("WATCH_NAMESPACE", ""),
            ("POD_NAMESPACE", NAMESPACE),
            ("KEDA_CLUSTER_OBJECT_NAMESPACE", NAMESPACE),
        ];
        let probe = format!("127.0.0.1:{}", free_port()?);
        let grpc = format!("127.0.0.1:{}", free_port()?);
        let operator = Proc::spawn(
            "keda-operator",
            &bins.keda,
            &[
                format!("--metrics-bind-address=127.0.0.1:{}", free_port()?),
                format!("--health-probe-bind-address={probe}"),
                format!("--metrics-service-bind-address={grpc}"),
                format!("--cert-dir={}", certs.display()),
                "--enable-cert-rotation=false".into(),
                "--enable-webhook-patching=false".into(),
                "--enable-apiservice-patching=false".into(),
                "--leader-elect=false".into(),
                "--zap-log-level=info".into(),
            ],
            &logs,
            &env,
        )?;
        let adapter_port = free_port()?;
        let adapter = Proc::spawn(
            "keda-adapter",
            &bins.keda_adapter,
            &[
                format!("--secure-port={adapter_port}"),
                // Its own metrics server: on every interface, port 8080
                // unless told otherwise.
                format!("--port={}", free_port()?),
                "--bind-address=127.0.0.1".into(),
                format!("--cert-dir={}", certs.display()),
                format!("--kubeconfig={kubeconfig}"),
                format!("--lister-kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--metrics-service-address={grpc}"),
                "--metrics-service-grpc-authority=localhost".into(),
            ],
            &logs,
            &env,
        )?;
        let mut keda = Self { operator, adapter };
        keda.wait_operator(&probe, timeout).await?;
        register_aggregated_api(
            client,
            NAMESPACE,
            "keda-metrics-apiserver",
            adapter_port,
            "external.metrics.k8s.io",
            "v1beta1",
        )
        .await?;
        Ok(keda)
    }

    /// Fails when either process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.operator.check_running()?;
        self.adapter.check_running()
    }

    /// KEDA operator's log (scaling decisions).
    pub fn operator_log(&self) -> &Path {
        self.operator.log()
    }

    /// Stops both.
    pub fn stop(&mut self) {
        self.adapter.stop(Duration::from_secs(5));
        self.operator.stop(Duration::from_secs(5));
    }

    async fn wait_operator(&mut self, probe: &str, timeout: Duration) -> Result<()> {
        let log = self.operator.log().to_owned();
        wait_http_ok(
            probe,
            "/readyz",
            "KEDA operator /readyz",
            &log,
            timeout,
            || self.check_running(),
        )
        .await
    }
}

/// Applies every CRD in `dir` and waits until each is Established.
async fn install_crds(client: &Client, dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(Error::io("reading", dir))?;
    for entry in entries {
        let path = entry.map_err(Error::io("reading", dir))?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            apply_crd_file(client, &path, "reading a KEDA CRD").await?;
        }
    }
    Ok(())
}

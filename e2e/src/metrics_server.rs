//! A test custom-metrics API server, so the real HPA controller can scale on
//! `hndsr_active_requests` / `hndsr_queue_depth` without Prometheus.
//!
//! It serves `custom.metrics.k8s.io/v1beta2` over TLS on 127.0.0.1 (axum,
//! self-signed certificate) and is registered with an APIService whose
//! Service is `type: ExternalName, externalName: localhost`, which the
//! aggregator in kube-apiserver dials directly. A test sets the per-pod value
//! of a metric in a namespace with [`MetricsServer::set`]; every pod matching
//! the HPA's label selector reports that value.
//!
//! [`MetricsServer::shutdown`] deletes the APIService before the server
//! stops: an unavailable aggregated API breaks discovery, and with it garbage
//! collection and namespace deletion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use rcgen::{CertificateParams, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::fixtures::FIELD_MANAGER;
use crate::{Error, Result, wait};

/// API group and version served.
pub const GROUP: &str = "custom.metrics.k8s.io";
/// API version served.
pub const VERSION: &str = "v1beta2";
/// Name of the APIService.
pub const API_SERVICE: &str = "v1beta2.custom.metrics.k8s.io";

/// (namespace, metric) → value of every matching pod (a Kubernetes quantity).
type Values = Arc<Mutex<HashMap<(String, String), String>>>;

#[derive(Clone)]
struct AppState {
    client: Client,
    values: Values,
    metrics: Arc<Vec<String>>,
}

/// A running custom-metrics server, registered with the apiserver.
pub struct MetricsServer {
    client: Client,
    values: Values,
    task: tokio::task::JoinHandle<()>,
    service_namespace: String,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Serves `metrics` (pod metrics by name), registers the APIService with
    /// its ExternalName Service in `service_namespace`, and waits until the
    /// apiserver reports the APIService Available.
    pub async fn start(client: Client, service_namespace: &str, metrics: &[&str]) -> Result<Self> {
        let key = KeyPair::generate().map_err(|source| Error::Cert {
            what: "metrics server key",
            source,
        })?;
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .and_then(|p| p.self_signed(&key))
            .map_err(|source| Error::Cert {
                what: "metrics server certificate",
                source,
            })?;
        let tls = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
        })
        .map_err(|e| Error::Shared(format!("metrics server TLS config: {e}")))?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::io("binding", "127.0.0.1:0"))?;
        let port = listener
            .local_addr()
            .map_err(Error::io("reading address of", "metrics server"))?
            .port();
        let values: Values = Arc::default();
        let state = AppState {
            client: client.clone(),
            values: values.clone(),
            metrics: Arc::new(metrics.iter().map(|m| (*m).to_owned()).collect()),
        };
        let app = Router::new()
            .route(&format!("/apis/{GROUP}/{VERSION}"), get(discovery))
            .route(
                &format!(
                    "/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/pods/{{name}}/{{metric}}"
                ),
                get(pod_metric),
            )
            .with_state(state);
        let task = tokio::spawn(serve(listener, acceptor, app));

        let server = Self {
            client: client.clone(),
            values,
            task,
            service_namespace: service_namespace.to_owned(),
        };
        server.register(port).await?;
        Ok(server)
    }

    /// Every pod in `namespace` reports `value` for `metric` from now on.
    pub fn set(&self, namespace: &str, metric: &str, value: &str) {
        self.values
            .lock()
            .expect("metric values lock")
            .insert((namespace.to_owned(), metric.to_owned()), value.to_owned());
    }

    async fn register(&self, port: u16) -> Result<()> {
        register_api_service(
            &self.client,
            &self.service_namespace,
            "e2e-custom-metrics",
            port,
        )
        .await
    }

    /// Deletes the APIService, waits until it is gone, then stops serving.
    pub async fn shutdown(self) -> Result<()> {
        let api: Api<APIService> = Api::all(self.client.clone());
        let _ = api.delete(API_SERVICE, &DeleteParams::default()).await;
        wait::until("APIService deleted", Duration::from_secs(30), || async {
            api.get_opt(API_SERVICE)
                .await
                .map(|s| s.is_none().then_some(()))
        })
        .await?;
        self.task.abort();
        Ok(())
    }
}

/// Registers `custom.metrics.k8s.io/v1beta2` as served on `localhost:port`
/// (an ExternalName Service `service` in `namespace`; aggregated servers
/// cannot sit behind loopback Endpoints) and waits until it is Available.
pub async fn register_api_service(
    client: &Client,
    namespace: &str,
    service_name: &str,
    port: u16,
) -> Result<()> {
    register_aggregated_api(client, namespace, service_name, port, GROUP, VERSION).await
}

/// Registers `group/version` as served on `localhost:port` the same way
/// (KEDA's `external.metrics.k8s.io` too) and waits until it is Available.
pub async fn register_aggregated_api(
    client: &Client,
    namespace: &str,
    service_name: &str,
    port: u16,
    group: &str,
    version: &str,
) -> Result<()> {
    let api_service_name = format!("{version}.{group}");
    let service: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": service_name, "namespace": namespace },
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{ "name": "https", "port": port, "protocol": "TCP" }],
        },
    }))
    .expect("the Service literal is valid");
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(
            service_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&service),
        )
        .await
        .map_err(Error::kube(format!("applying the {group} Service")))?;
    let api_service: APIService = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": { "name": api_service_name },
        "spec": {
            "group": group,
            "version": version,
            "service": { "namespace": namespace, "name": service_name, "port": port },
            "insecureSkipTLSVerify": true,
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }))
    .expect("the APIService literal is valid");
    let api: Api<APIService> = Api::all(client.clone());
    api.patch(
        &api_service_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&api_service),
    )
    .await
    .map_err(Error::kube(format!("applying the {group} APIService")))?;
    wait::until(
        format!("APIService {api_service_name} Available"),
        Duration::from_secs(60),
        || async {
            let s = api.get(&api_service_name).await?;
            let available = s
                .status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Available" && c.status == "True")
                });
            Ok::<_, kube::Error>(available.then_some(()))
        },
    )
    .await
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move {
                    use tower::ServiceExt as _;
                    app.oneshot(req).await
                }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

async fn discovery(State(state): State<AppState>) -> Json<serde_json::Value> {
    let resources: Vec<serde_json::Value> = state
        .metrics
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": format!("pods/{m}"),
                "singularName": "",
                "namespaced": true,
                "kind": "MetricValueList",
                "verbs": ["get"],
            })
        })
        .collect();
    Json(serde_json::json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": resources,
    }))
}

async fn pod_metric(
    State(state): State<AppState>,
    Path((namespace, name, metric)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let value = state
        .values
        .lock()
        .expect("metric values lock")
        .get(&(namespace.clone(), metric.clone()))
        .cloned();
    let Some(value) = value else {
        return (
            StatusCode::NOT_FOUND,
            format!("no value for {metric} in {namespace}"),
        )
            .into_response();
    };
    let pods: Api<Pod> = Api::namespaced(state.client.clone(), &namespace);
    let mut lp = ListParams::default();
    if let Some(selector) = query.get("labelSelector") {
        lp = lp.labels(selector);
    }
    let names: Vec<String> = match pods.list(&lp).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .filter(|n| name == "*" || *n == name)
            .collect(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let items: Vec<serde_json::Value> = names
        .iter()
        .map(|pod| {
            serde_json::json!({
                "describedObject": { "kind": "Pod", "namespace": namespace, "name": pod, "apiVersion": "/v1" },
                "metric": { "name": metric },
                "timestamp": now,
                "windowSeconds": 60,
                "value": value,
            })
        })
        .collect();
    Json(serde_json::json!({
        "kind": "MetricValueList",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {},
        "items": items,
    }))
    .into_response()
}

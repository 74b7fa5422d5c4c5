//! Scale to zero, the part a client sees: the zero responder.
//!
//! While a KEDA service with `minReplicas: 0` has no ready serving pod, the
//! controller points its Service at this responder (EndpointSlice
//! `<name>-zero`, [`crate::builders::zero_slice_name`]). Every request gets
//! an immediate `503` with `Retry-After` and the server's JSON error shape
//! (`"type": "scaled_to_zero"`), never a refused connection, and sets the
//! gauge `hndsr_operator_wake_requested{hndsr_namespace, hndsr_service}` to
//! 1, which the ScaledObject's wake trigger reads from Prometheus: KEDA then
//! scales the Deployment to one pod, the controller removes the slice once
//! a pod is ready, and the client's retry is served.
//!
//! The responder learns which service a request was for from its `Host`
//! header (`<name>.<namespace>[.svc[.<domain>]][:port]`, or the Service's
//! cluster IP); a bare `<name>` wakes every service of that name at zero.
//! A request it cannot attribute still gets the 503, and wakes nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::api::core::v1::Pod;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::builders::{WAKE_METRIC, WAKE_NAMESPACE_LABEL, WAKE_SERVICE_LABEL};
use crate::effective::EffectiveSpec;
use crate::metrics::Metrics;

/// Default `Retry-After` of the responder (`--zero-retry-after-seconds`):
/// about KEDA's polling interval plus a warm pod's start.
pub const DEFAULT_RETRY_AFTER_SECONDS: u32 = 10;

/// Whether the Service of a service should point at the responder now:
/// KEDA may scale it to zero and no serving pod is ready (at zero, and
/// while the first pod after zero starts).
#[must_use]
pub fn at_zero(eff: &EffectiveSpec, serving_pods: &[Pod]) -> bool {
    eff.scales_to_zero() && crate::standby::ready_count(serving_pods) == 0
}

/// The services the responder answers for, and its metrics.
#[derive(Debug, Clone)]
pub struct ZeroResponder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `(namespace, name)` → the Service's cluster IP, when known.
    services: RwLock<HashMap<(String, String), Option<IpAddr>>>,
    cluster_domain: String,
    retry_after_seconds: u32,
    wake: IntGaugeVec,
    requests: IntCounterVec,
}

impl ZeroResponder {
    /// A responder with no service at zero; registers its metrics in
    /// `metrics`.
    ///
    /// # Panics
    /// Never in practice: the metric names are static and unique.
    #[must_use]
    pub fn new(metrics: &Metrics, cluster_domain: &str, retry_after_seconds: u32) -> Self {
        let wake = IntGaugeVec::new(
            Opts::new(
                WAKE_METRIC,
                "1 while a service at zero replicas has been asked for and has no ready pod.",
            ),
            &[WAKE_NAMESPACE_LABEL, WAKE_SERVICE_LABEL],
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new(
                "hndsr_operator_zero_requests_total",
                "Requests the zero responder answered with 503, by service (empty: unattributed).",
            ),
            &[WAKE_NAMESPACE_LABEL, WAKE_SERVICE_LABEL],
        )
        .expect("valid metric");
        metrics.register(Box::new(wake.clone()));
        metrics.register(Box::new(requests.clone()));
        Self {
            inner: Arc::new(Inner {
                services: RwLock::new(HashMap::new()),
                cluster_domain: cluster_domain.to_owned(),
                retry_after_seconds,
                wake,
                requests,
            }),
        }
    }

    /// Whether `ns/name` is registered as at zero.
    #[must_use]
    pub fn contains(&self, ns: &str, name: &str) -> bool {
        self.read().contains_key(&(ns.to_owned(), name.to_owned()))
    }

    /// Registers `ns/name` as at zero.
    pub fn insert(&self, ns: &str, name: &str, cluster_ip: Option<IpAddr>) {
        self.write()
            .insert((ns.to_owned(), name.to_owned()), cluster_ip);
    }

    /// `ns/name` has a ready pod again (or is gone): forget it and clear its
    /// wake request, so KEDA's wake trigger goes quiet.
    pub fn remove(&self, ns: &str, name: &str) {
        if self
            .write()
            .remove(&(ns.to_owned(), name.to_owned()))
            .is_some()
        {
            let _ = self.inner.wake.remove_label_values(&[ns, name]);
        }
    }

    /// The services at zero a request with `host` was for.
    #[must_use]
    pub fn targets(&self, host: &str) -> Vec<(String, String)> {
        targets(&self.read(), host, &self.inner.cluster_domain)
    }

    /// Answers one request: wakes its service and says when to retry.
    fn answer(&self, host: &str) -> Response {
        let targets = self.targets(host);
        for (ns, name) in &targets {
            self.inner.wake.with_label_values(&[ns, name]).set(1);
            self.inner.requests.with_label_values(&[ns, name]).inc();
        }
        if targets.is_empty() {
            self.inner.requests.with_label_values(&["", ""]).inc();
            tracing::warn!(%host, "zero responder: request for no service at zero");
        } else {
            tracing::info!(%host, ?targets, "zero responder: woke a service at zero");
        }
        let retry = self.inner.retry_after_seconds;
        let body = serde_json::json!({
            "error": format!(
                "the service is scaled to zero; a pod is starting, retry after {retry}s"
            ),
            "type": "scaled_to_zero",
        });
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::RETRY_AFTER, retry.to_string()),
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
            body.to_string(),
        )
            .into_response()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, String), Option<IpAddr>>> {
        self.inner
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<(String, String), Option<IpAddr>>> {
        self.inner
            .services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Which registered services `host` names (see the module docs).
fn targets(
    services: &HashMap<(String, String), Option<IpAddr>>,
    host: &str,
    cluster_domain: &str,
) -> Vec<(String, String)> {
    let host = strip_port(host.trim())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return services
            .iter()
            .filter(|(_, cip)| **cip == Some(ip))
            .map(|(k, _)| k.clone())
            .collect();
    }
    let suffix = format!(".svc.{cluster_domain}");
    let short = host
        .strip_suffix(&suffix)
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let mut found: Vec<(String, String)> = match short.split_once('.') {
        Some((name, ns)) if !ns.contains('.') => services
            .keys()
            .filter(|(kns, kname)| kns == ns && kname == name)
            .cloned()
            .collect(),
        Some(_) => Vec::new(),
        None => services
            .keys()
            .filter(|(_, kname)| kname == short)
            .cloned()
            .collect(),
    };
    found.sort();
    found
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`; a bare IPv6 stays whole.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The responder's router: every method and path gets the same answer.
pub fn router(responder: ZeroResponder) -> Router {
    Router::new().fallback(answer).with_state(responder)
}

async fn answer(State(responder): State<ZeroResponder>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    responder.answer(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> HashMap<(String, String), Option<IpAddr>> {
        HashMap::from([
            (
                ("ml".to_owned(), "sr".to_owned()),
                Some("10.96.0.7".parse().unwrap()),
            ),
            (("geo".to_owned(), "sr".to_owned()), None),
            (("ml".to_owned(), "other".to_owned()), None),
        ])
    }

    fn t(host: &str) -> Vec<String> {
        targets(&registry(), host, "cluster.local")
            .into_iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect()
    }

    #[test]
    fn a_host_names_its_service_in_every_dns_form() {
        for host in [
            "sr.ml",
            "sr.ml:80",
            "sr.ml.svc",
            "sr.ml.svc.cluster.local",
            "SR.ML.svc.cluster.local.:8080",
        ] {
            assert_eq!(t(host), ["ml/sr"], "{host}");
        }
        assert_eq!(t("other.ml.svc.cluster.local"), ["ml/other"]);
    }

    #[test]
    fn a_bare_name_wakes_every_namespace_with_it_and_an_ip_its_service() {
        assert_eq!(t("sr"), ["geo/sr", "ml/sr"]);
        assert_eq!(t("sr:80"), ["geo/sr", "ml/sr"]);
        assert_eq!(t("10.96.0.7"), ["ml/sr"]);
        assert_eq!(t("10.96.0.7:80"), ["ml/sr"]);
    }

    #[test]
    fn unknown_hosts_wake_nothing() {
        for host in [
            "",
            "sr.elsewhere",
            "x.y.z.example.com",
            "10.0.0.1",
            "[::1]:80",
        ] {
            assert!(t(host).is_empty(), "{host}");
        }
    }

    #[tokio::test]
    async fn a_request_at_zero_gets_503_with_retry_after_and_sets_the_wake_gauge() {
        let metrics = Metrics::new();
        let z = ZeroResponder::new(&metrics, "cluster.local", 7);
        z.insert("ml", "sr", None);
        let res = z.answer("sr.ml:80");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "7");
        let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "scaled_to_zero");
        let text = metrics.render();
        assert!(
            text.contains(
                r#"hndsr_operator_wake_requested{hndsr_namespace="ml",hndsr_service="sr"} 1"#
            ),
            "{text}"
        );
        // A ready pod again: the wake request is cleared.
        z.remove("ml", "sr");
        assert!(!z.contains("ml", "sr"));
        assert!(!metrics.render().contains("hndsr_operator_wake_requested{"));
        // Unattributed requests still get the 503.
        assert_eq!(z.answer("nobody").status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

//! The operator's own HTTP endpoints: `/metrics` (Prometheus text),
//! `/healthz` (liveness: the process and its runtime answer) and `/readyz`.
//!
//! `/readyz` turns true once the watch caches of the children and pods have
//! synced, **regardless of leadership**: a follower is a healthy, ready
//! standby. Gating readiness on leadership would make a rolling update of
//! the operator Deployment wait forever (the new pod could not become ready
//! while the old one holds the Lease, and the old one is not removed until
//! the new one is ready), and would drop followers from the metrics Service.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::metrics::Metrics;

/// Shared state of the probe/metrics server.
#[derive(Debug, Clone, Default)]
pub struct HttpState {
    /// The registry rendered at `/metrics`.
    pub metrics: Metrics,
    /// Set once the caches have synced.
    pub ready: Arc<AtomicBool>,
}

/// The router: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
///
/// # Errors
/// Serving failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(state: HttpState, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut stream, req.as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut buf)
            .await
            .unwrap();
        server.abort();
        let code = buf[9..12].parse().unwrap();
        (code, buf)
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let state = HttpState::default();
        assert_eq!(get_status(state.clone(), "/healthz").await.0, 200);
        assert_eq!(get_status(state.clone(), "/readyz").await.0, 503);
        state.ready.store(true, Ordering::Release);
        assert_eq!(get_status(state.clone(), "/readyz").await.0, 200);
        state.metrics.leader.set(1);
        let (code, body) = get_status(state, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("hndsr_operator_leader 1"));
    }
}

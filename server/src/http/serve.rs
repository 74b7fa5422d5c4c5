//! The accept loop: axum's `serve`, plus the header-read timeout it lacks.
//!
//! axum 0.8's `serve` builds hyper connections without a timer, and hyper
//! then leaves its request-head timeout inert: a client that opens a
//! connection and dribbles (or never finishes) its request line and headers
//! holds a socket and a task for as long as it likes, and a graceful
//! shutdown waits on it. This loop serves each connection with hyper-util's
//! builder (HTTP/1), a tokio timer and `header_read_timeout`, hands
//! the router the peer address as axum's `ConnectInfo`, and on `stop` stops
//! accepting and lets every connection finish its request before closing
//! (hyper-util's `GracefulShutdown`, what axum's graceful shutdown does).
//! At most `max_connections` connections are open at once: at the cap the
//! loop stops accepting, so further clients wait in the kernel's listen
//! queue (answered once a connection closes) instead of each costing a
//! task and a socket here. Hand-written because axum 0.8.9 exposes no
//! builder to configure.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::Layer as _;

/// Pause after an accept error (out of file descriptors, say) before the
/// next accept, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How connections are served.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionPolicy {
    /// Longest wait for a request's line and headers.
    pub header_read_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
    /// Gauge of open connections.
    pub open: IntGauge,
}

/// Counts one open connection; frees its slot on drop.
struct Open {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves `app` on `listener` until `stop` completes, then waits for the
/// open connections to finish their requests and close.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    policy: ConnectionPolicy,
    stop: impl Future<Output = ()>,
) {
    let header_read_timeout = policy.header_read_timeout;
    let slots = Arc::new(Semaphore::new(
        policy.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    // HTTP/1 only: the auto builder's HTTP/2 detection reads up to 24 bytes
    // with no timeout (a client sending "P" and nothing more would hold the
    // connection), and nothing here needs prior-knowledge HTTP/2.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    // Fired when accepting stops: connections that have not sent a byte yet
    // are dropped then (they hold a graceful-shutdown watcher, which the
    // final wait would otherwise wait on for a whole header-read timeout).
    let closing = CancellationToken::new();
    tokio::pin!(stop);
    loop {
        // A slot first: at the cap, nothing is accepted until one frees.
        let slot = tokio::select! {
            () = &mut stop => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        // Wraps the router (no per-route re-layering), as axum's own
        // `into_make_service_with_connect_info` does.
        let service = TowerToHyperService::new(
            axum::Extension(ConnectInfo::<SocketAddr>(peer)).layer(app.clone()),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let closing = closing.clone();
        policy.open.inc();
        let open = Open {
            _slot: slot,
            gauge: policy.open.clone(),
        };
        tokio::spawn(async move {
            let _open = open;
            // hyper's header timer starts with the first byte: a connection
            // that sends nothing is dropped here. (`peek`, not `readable`:
            // readiness can be reported early.)
            let mut first = [0u8; 1];
            tokio::select! {
                () = closing.cancelled() => return,
                peeked = tokio::time::timeout(header_read_timeout, stream.peek(&mut first)) => {
                    if peeked.is_err() {
                        tracing::debug!(%peer, "no request within the header-read timeout");
                        return;
                    }
                }
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    graceful.shutdown().await;
}

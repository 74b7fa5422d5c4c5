//! Middleware: metrics tracking, the body-size check and the per-client
//! rate limit of the upscale routes; `Connection: close` while draining.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hndsr_contract::http as paths;
use http_body_util::BodyExt as _;

use super::AppState;
use super::rate_limit::client_ip;
use crate::error::{Error, Failure, REQUEST_ID};
use crate::lifecycle::Readiness;
use crate::metrics::{Metrics, Outcome};

/// The largest body accepted on `path`.
pub(super) fn body_limit(state: &AppState, path: &str) -> usize {
    let limits = state.core.limits();
    if path == paths::UPSCALE_PATH {
        limits.max_payload_bytes
    } else {
        limits.max_json_bytes()
    }
}

/// Counts the request when it ends, however it ends: the single place
/// `hndsr_requests_total`, `hndsr_rejections_total` and the request
/// duration are recorded.
pub(super) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut pending = Pending {
        metrics: state.metrics.clone(),
        started: Instant::now(),
        done: false,
    };
    let res = next.run(req).await;
    pending.done = true;
    let (outcome, rejection) = match res.extensions().get::<Failure>() {
        None if res.status().is_success() => (Outcome::Ok, None),
        None => (Outcome::Error, None),
        Some(f) if f.rejection => (Outcome::Rejected, Some(f.reason)),
        Some(f) if f.reason == "timeout" => (Outcome::Timeout, None),
        Some(f) if f.reason == "out_of_memory" => (Outcome::OutOfMemory, None),
        Some(_) => (Outcome::Error, None),
    };
    state
        .metrics
        .record_request(outcome, rejection, pending.started.elapsed());
    res
}

/// While the server drains, every HTTP/1 response carries `Connection:
/// close`: a keep-alive client (or a proxy's pooled connection) then
/// reconnects, through the Service, to a pod that is not going away,
/// instead of collecting 503s here until the drain ends. hyper closes the
/// connection once such a response is written.
pub(super) async fn close_when_draining(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let http1 = req.version() <= Version::HTTP_11;
    let mut res = next.run(req).await;
    if http1 && state.lifecycle.readiness() == Readiness::Draining {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Runs the rest of the stack with the request's id in [`REQUEST_ID`], so
/// an error answer can name it.
pub(super) async fn scope_request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(super::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    REQUEST_ID.scope(id, next.run(req)).await
}

/// Records a disconnect when the request future is dropped unfinished.
struct Pending {
    metrics: Arc<Metrics>,
    started: Instant,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .record_request(Outcome::Disconnected, None, self.started.elapsed());
        }
    }
}

/// Refuses a declared Content-Length above the limit before reading a byte.
pub(super) async fn content_length(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let limit = body_limit(&state, req.uri().path());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Error::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}

/// Applies the per-client rate limit. A request that admission is about to
/// refuse (warming up, draining, every slot taken) is not charged: a client
/// that honours the 503's Retry-After would otherwise spend its hourly
/// budget on refusals. The look at admission is taken just before it
/// happens, so a slot that frees or fills in between can tip that one
/// request either way; nothing else depends on it.
pub(super) async fn rate_limit(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let refused_anyway = state.lifecycle.readiness() != Readiness::Ready
        || state.core.in_flight() >= state.core.limits().max_queue_depth.get();
    if let Some(limiter) = state.limiter.as_ref().filter(|_| !refused_anyway) {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let client = client_ip(peer, req.headers(), &state.http.trusted_proxies);
        if let Err(e) = limiter.check(client) {
            tracing::debug!(%client, "rate limited");
            let (parts, body) = req.into_parts();
            return reject_unread(&parts.headers, body, e).await;
        }
    }
    next.run(req).await
}

/// Unread body bytes a rejection reads and throws away before answering.
const DISCARD_LIMIT: usize = 1024 * 1024;
/// How long a rejection spends on that.
const DISCARD_TIME: Duration = Duration::from_secs(2);

/// Answers `error` to a request whose body has not been read.
///
/// hyper closes a connection whose request body is left unread, and a client
/// still sending then sees a reset instead of the 503/429 (and its
/// Retry-After). So a cheap rejection first reads and discards a bounded
/// amount of body; past that bound the connection is closed on purpose
/// (`Connection: close`). Clients that send `Expect: 100-continue` never
/// send the body at all: for them nothing is read (hyper would answer the
/// first read with `100 Continue`, inviting the upload) and the connection
/// closes after the answer. Hand-written: tower-http has no lingering close.
pub(super) async fn reject_unread(headers: &HeaderMap, body: Body, error: Error) -> Response {
    let expects_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        let mut res = error.into_response();
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return res;
    }
    let drained = tokio::time::timeout(DISCARD_TIME, discard(body, DISCARD_LIMIT))
        .await
        .unwrap_or(false);
    let mut res = error.into_response();
    if !drained {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Reads and drops up to `limit` bytes; true when the body ended within it.
async fn discard(mut body: Body, limit: usize) -> bool {
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(data) = frame.data_ref() {
            seen += data.len();
            if seen > limit {
                return false;
            }
        }
    }
    true
}

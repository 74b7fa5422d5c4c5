//! The HTTP layer: axum router, edge layers and handlers.
//!
//! Upscale routes pass, outermost first: metrics tracking (the one place
//! requests are counted) → Content-Length check against the body limit
//! (413) → per-client rate limit (429) → the handler, which takes an
//! admission ticket (503), reads the body under the limit and calls the
//! core within the request deadline (504). Every route also gets request
//! ids (X-Request-Id), tracing and, when configured, CORS.

mod body;
mod edge;
mod handlers;
pub mod openapi;
pub mod rate_limit;
pub(crate) mod serve;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use hndsr_contract::http as paths;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::config::{HttpConfig, ModelConfig};
use crate::core::Core;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

pub use self::handlers::{InfoResponse, JsonUpscaleRequest, JsonUpscaleResponse, UpscaleQuery};
pub use self::rate_limit::RateLimiter;

/// The JSON endpoint compatible with the original service's clients.
pub const LEGACY_UPSCALE_PATH: &str = "/upscale";

/// Header naming the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Header in which a client asks for a shorter deadline than the server's
/// `REQUEST_TIMEOUT_S`, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// Header set to `true` when a response was shared with an identical request.
pub const COALESCED_HEADER: &str = "x-hndsr-coalesced";

/// Everything the handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The admission core.
    pub core: Core,
    /// Metrics registry (behind an `Arc`: the state is cloned for every
    /// middleware of every request, and `Metrics` is many handles).
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub lifecycle: Arc<Lifecycle>,
    /// Per-client limiter; `None` when disabled.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Edge policy.
    pub http: Arc<HttpConfig>,
    /// Model selection (reported by `/v1/info`).
    pub model: Arc<ModelConfig>,
}

/// Builds the router. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so the rate limiter
/// sees peer addresses.
pub fn router(state: AppState) -> Router {
    let upscale = Router::new()
        .route(paths::UPSCALE_PATH, post(handlers::upscale_raw))
        .route(LEGACY_UPSCALE_PATH, post(handlers::upscale_json))
        .route_layer(from_fn_with_state(state.clone(), edge::rate_limit))
        .route_layer(from_fn_with_state(state.clone(), edge::content_length))
        .route_layer(from_fn_with_state(state.clone(), edge::track));

    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let mut router = Router::new()
        .route(paths::HEALTHZ_PATH, get(handlers::healthz))
        .route(paths::READYZ_PATH, get(handlers::readyz))
        .route(paths::METRICS_PATH, get(handlers::metrics))
        .route(paths::INFO_PATH, get(handlers::info))
        .route(paths::OPENAPI_PATH, get(handlers::openapi))
        .merge(upscale)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state.clone());

    if !state.http.cors_origins.is_empty() {
        let origins = state
            .http
            .cors_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect::<Vec<HeaderValue>>();
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::CONTENT_TYPE,
                    request_id.clone(),
                    HeaderName::from_static(TIMEOUT_HEADER),
                ])
                .expose_headers([
                    request_id.clone(),
                    header::RETRY_AFTER,
                    HeaderName::from_static("server-timing"),
                    HeaderName::from_static(COALESCED_HEADER),
                ]),
        );
    }
    router
        .layer(from_fn_with_state(state.clone(), edge::close_when_draining))
        .layer(axum::middleware::from_fn(edge::scope_request_id))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                .make_span_with(|req: &axum::extract::Request| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id = %id
                    )
                }),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

//! Route handlers. Each is a thin adapter: extract, call the core, shape
//! the answer. Errors are [`Error`]s and become the one JSON error shape.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hndsr_contract::http as paths;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body::read_body;
use super::edge::{body_limit, reject_unread};
use super::{AppState, COALESCED_HEADER, LEGACY_UPSCALE_PATH, TIMEOUT_HEADER};
use crate::codec::{Container, OutputPrefs, PngCompression};
use crate::core::{Answer, Deadline, Ticket, Timings, UpscaleRequest, Upscaled};
use crate::error::{Error, ErrorBody, jittered_retry_after};
use crate::lifecycle::Readiness;

/// Query parameters of `POST /v1/upscale`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UpscaleQuery {
    /// Upscaling factor; default: the server's `HNDSR_SCALE`.
    pub scale: Option<u32>,
    /// Diffusion sampling steps (`hndsr` backend); default: `HNDSR_SAMPLING_STEPS`.
    pub steps: Option<u32>,
    /// Seed of the stochastic parts; default 0. Same input, parameters and
    /// seed give the same output.
    pub seed: Option<u64>,
    /// PNG deflate level of the answer: `none`, `fast` (default) or `best`.
    pub compression: Option<PngCompression>,
}

/// Body of `POST /upscale` (the original service's JSON API).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JsonUpscaleRequest {
    /// The input image (PNG, JPEG or TIFF), base64; a `data:` URL prefix is accepted.
    pub image: String,
    /// Upscaling factor; default: the server's `HNDSR_SCALE`.
    #[serde(default)]
    pub scale: Option<u32>,
    /// Diffusion sampling steps; default: `HNDSR_SAMPLING_STEPS`.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Seed; default 0.
    #[serde(default)]
    pub seed: Option<u64>,
    /// PNG deflate level of the answer: `none`, `fast` (default) or `best`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub compression: Option<PngCompression>,
}

/// Answer of `POST /upscale`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JsonUpscaleResponse {
    /// The output image, base64 (PNG; TIFF when the input was TIFF).
    pub image: String,
    /// `png` or `tiff`.
    pub format: String,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// The factor applied.
    pub scale: u32,
    /// The model that produced it.
    pub model: String,
    /// Time waiting for a backend permit, in milliseconds.
    pub queue_ms: f64,
    /// Time in the backend, in milliseconds.
    pub inference_ms: f64,
}

/// Answer of `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// `warming_up`, `ready`, `draining` or `unhealthy` (device lost).
    pub status: String,
}

/// Limits reported by `/v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoLimits {
    /// Backend calls at once.
    pub max_concurrent: usize,
    /// Requests in flight before 503.
    pub max_queue_depth: usize,
    /// Whole-request deadline, seconds.
    pub request_timeout_s: u64,
    /// Largest input in pixels.
    pub max_image_pixels: u64,
    /// Largest output in pixels.
    pub max_output_pixels: u64,
    /// Largest raw body in bytes.
    pub max_payload_bytes: usize,
    /// Requests per client per hour; 0 = unlimited.
    pub rate_limit_per_hour: u32,
    /// Host memory (MiB) for the image buffers of all requests at once;
    /// absent: no budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mb: Option<u64>,
    /// Slowest accepted upload, bytes per second (after a grace period);
    /// 0: no minimum.
    pub min_upload_bytes_per_s: u64,
    /// Most open connections; more wait in the listen queue.
    pub max_connections: usize,
    /// Estimated service time of a 256² input at the default scale on
    /// this pod now, seconds (0 before warm-up).
    pub estimated_seconds_256: f64,
    /// The factor deadline admission multiplies estimates by now (the
    /// recent 95th percentile of measured ÷ estimated, at least 1.2).
    pub deadline_margin: f64,
    /// How much slower each computation runs with all `max_concurrent`
    /// running at once than alone (measured at warm-up; 1 before it).
    /// Admission charges a request for the computations beside it.
    pub shared_slowdown: f64,
}

/// Answer of `/v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoResponse {
    /// Server version.
    pub version: String,
    /// Backend kind.
    pub backend: String,
    /// Model name and version.
    pub model: String,
    /// sha256 of the weights (or of a fixed id for weight-less backends).
    pub model_digest: String,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// `fp32`, `fp16`, `bf16`.
    pub precision: String,
    /// Accepted factors.
    pub scales: Vec<u32>,
    /// Factor used when a request names none.
    pub default_scale: u32,
    /// Serving profile (`fast`, `quality`, `realistic`; `hndsr` only):
    /// `HNDSR_PROFILE`, else `realistic` for weights trained for realistic
    /// inputs, else the device's default. The four settings below are its values,
    /// with any knob configured on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// DDIM steps used when a request names none: the configured
    /// `HNDSR_SAMPLING_STEPS`, else the profile's; 0 for backends without
    /// diffusion.
    pub sampling_steps: u32,
    /// Whether μ is the mean over the 8 flips / 90° rotations of each tile.
    pub self_ensemble: bool,
    /// LR tile edge, in pixels, the `hndsr` backend cuts images into
    /// (`HNDSR_TILE`, else the weights' recommendation); absent for
    /// backends that do not tile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tile: Option<u32>,
    /// Conjugate-gradient steps of the projection of each output onto the
    /// images that downsample exactly to the input (`HNDSR_PROJECTION_STEPS`,
    /// else the weights' recommendation; 0: off).
    pub projection_steps: u32,
    /// Most tiles per forward pass across concurrent requests (0: each
    /// request alone): `HNDSR_BATCH_TILES`, else 16 on CUDA and 0 on the CPU.
    pub batch_tiles: usize,
    /// Limits in force.
    pub limits: InfoLimits,
}

/// The request's deadline (see [`deadline`]) and an admission ticket,
/// unless the server is not (or no longer) ready.
fn admit(state: &AppState, headers: &HeaderMap) -> Result<(Deadline, Ticket), Error> {
    let deadline = deadline(state, headers)?;
    if !state.core.healthy() {
        return Err(Error::DeviceLost {
            retry_after: jittered_retry_after(),
        });
    }
    if state.lifecycle.readiness() != Readiness::Ready {
        return Err(Error::Unavailable {
            retry_after: jittered_retry_after(),
        });
    }
    state.core.admit().map(|ticket| (deadline, ticket))
}

/// The request's deadline: the server's `REQUEST_TIMEOUT_S`, or the
/// shorter one the client asks for in [`TIMEOUT_HEADER`] (a longer one is
/// cut to the server's).
fn deadline(state: &AppState, headers: &HeaderMap) -> Result<Deadline, Error> {
    let max = state.core.limits().request_timeout;
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(Deadline::after(max));
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "{TIMEOUT_HEADER} must be a positive whole number of milliseconds (at most {})",
                max.as_millis()
            ))
        })?;
    Ok(Deadline::after(Duration::from_millis(ms).min(max)))
}

/// Runs `work` under the request's deadline.
async fn with_deadline<T>(
    deadline: Deadline,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout_at(deadline.at.into(), work)
        .await
        .map_err(|_| Error::Timeout {
            timeout: deadline.length,
        })?
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn server_timing(t: &Timings) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "queue;dur={:.1}, decode;dur={:.1}, inference;dur={:.1}, encode;dur={:.1}, estimate;dur={:.1}",
        ms(t.queue),
        ms(t.decode),
        ms(t.inference),
        ms(t.encode),
        ms(t.estimate)
    );
    s
}

fn with_answer_headers(mut res: Response, answer: &Answer) -> Response {
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&server_timing(&answer.upscaled.timings)) {
        headers.insert("server-timing", v);
    }
    if answer.coalesced {
        headers.insert(COALESCED_HEADER, HeaderValue::from_static("true"));
    }
    res
}

/// Upscale an image sent as the raw body.
#[utoipa::path(
    post,
    path = paths::UPSCALE_PATH,
    tag = "upscale",
    params(
        ("scale" = Option<u32>, Query, description = "Upscaling factor; default: the server's HNDSR_SCALE."),
        ("steps" = Option<u32>, Query, description = "Diffusion sampling steps (hndsr backend); default: HNDSR_SAMPLING_STEPS."),
        ("seed" = Option<u64>, Query, description = "Seed of the stochastic parts; default 0."),
        ("compression" = Option<String>, Query, description = "PNG deflate level of the answer: none (largest, cheapest to encode), fast (default) or best (smallest, several times the encode time)."),
        ("x-request-timeout-ms" = Option<u64>, Header, description = "This request's deadline in milliseconds; default and maximum: the server's REQUEST_TIMEOUT_S (a longer one is cut to it)."),
        ("accept" = Option<String>, Header, description = "image/tiff asks for an uncompressed TIFF answer (cheapest to encode); image/png (or anything else) for PNG; default: the input's container."),
    ),
    request_body(
        description = "The image: PNG, JPEG or TIFF; 8 or 16 bit; gray, gray+alpha, RGB or RGBA.",
        content(("image/png"), ("image/jpeg"), ("image/tiff"), ("application/octet-stream")),
    ),
    responses(
        (status = 200, description = "The upscaled image, same bit depth and channels as the input; PNG, or TIFF for TIFF input.",
            content(("image/png"), ("image/tiff")),
            headers(("server-timing" = String, description = "queue, decode, inference, encode durations in ms"),
                    ("x-request-id" = String, description = "Request id"))),
        (status = 400, description = "Corrupt image or malformed request", body = ErrorBody),
        (status = 408, description = "The body arrived slower than the minimum upload rate (type slow_upload); the connection is closed", body = ErrorBody),
        (status = 413, description = "Body, image or output over its limit, or a decompression bomb", body = ErrorBody),
        (status = 415, description = "Not PNG, JPEG or TIFF", body = ErrorBody),
        (status = 422, description = "Unsupported scale or steps, or the estimated service time alone is over the deadline (type deadline_too_slow)", body = ErrorBody),
        (status = 429, description = "Rate limit exceeded (Retry-After)", body = ErrorBody),
        (status = 500, description = "Backend failure (a stable message; details in the server log under the request id)", body = ErrorBody),
        (status = 503, description = "At capacity, the estimated wait would pass the deadline (type deadline_wait), device out of memory or lost, warming up or draining (Retry-After)", body = ErrorBody),
        (status = 504, description = "Deadline exceeded; the work was cancelled", body = ErrorBody),
    )
)]
pub(super) async fn upscale_raw(
    State(state): State<AppState>,
    query: Result<Query<UpscaleQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            let error = Error::BadRequest(e.body_text());
            return Ok(reject_unread(&headers, body, error).await);
        }
    };
    let (deadline, ticket) = match admit(&state, &headers) {
        Ok(admitted) => admitted,
        Err(e) => return Ok(reject_unread(&headers, body, e).await),
    };
    let limit = body_limit(&state, paths::UPSCALE_PATH);
    let answer = with_deadline(deadline, async {
        let image = read_body(body, limit, state.http.min_upload_bytes_per_s).await?;
        let req = UpscaleRequest {
            image,
            scale: q.scale,
            steps: q.steps,
            seed: q.seed.unwrap_or(0),
            deadline,
            output: OutputPrefs {
                format: accepted_container(&headers),
                compression: q.compression.unwrap_or_default(),
            },
        };
        state.core.upscale(&ticket, req).await
    })
    .await?;
    let up = &answer.upscaled;
    let res = ([(header::CONTENT_TYPE, up.content_type)], up.image.clone()).into_response();
    Ok(with_answer_headers(res, &answer))
}

/// Upscale a base64 image in JSON (the original service's API).
#[utoipa::path(
    post,
    path = LEGACY_UPSCALE_PATH,
    tag = "upscale",
    params(
        ("x-request-timeout-ms" = Option<u64>, Header, description = "This request's deadline in milliseconds; default and maximum: the server's REQUEST_TIMEOUT_S."),
    ),
    request_body = JsonUpscaleRequest,
    responses(
        (status = 200, description = "The upscaled image, base64", body = JsonUpscaleResponse),
        (status = 400, description = "Malformed JSON or base64, or corrupt image", body = ErrorBody),
        (status = 408, description = "The body arrived slower than the minimum upload rate (type slow_upload); the connection is closed", body = ErrorBody),
        (status = 413, description = "Body, image or output over its limit", body = ErrorBody),
        (status = 415, description = "Not PNG, JPEG or TIFF", body = ErrorBody),
        (status = 422, description = "Unsupported scale or steps, or the estimated service time alone is over the deadline (type deadline_too_slow)", body = ErrorBody),
        (status = 429, description = "Rate limit exceeded (Retry-After)", body = ErrorBody),
        (status = 500, description = "Backend failure (a stable message; details in the server log under the request id)", body = ErrorBody),
        (status = 503, description = "At capacity, the estimated wait would pass the deadline (type deadline_wait), device out of memory or lost, warming up or draining (Retry-After)", body = ErrorBody),
        (status = 504, description = "Deadline exceeded; the work was cancelled", body = ErrorBody),
    )
)]
pub(super) async fn upscale_json(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let (deadline, ticket) = match admit(&state, &headers) {
        Ok(admitted) => admitted,
        Err(e) => return Ok(reject_unread(&headers, body, e).await),
    };
    let limit = body_limit(&state, LEGACY_UPSCALE_PATH);
    let answer = with_deadline(deadline, async {
        let raw = read_body(body, limit, state.http.min_upload_bytes_per_s).await?;
        // Parsing and base64-decoding up to MAX_PAYLOAD_MB is CPU work: keep
        // it off the tokio workers.
        let up = off_worker(move || parse_json_request(&raw, deadline)).await??;
        state.core.upscale(&ticket, up).await
    })
    .await?;
    let (upscaled, model) = (
        Arc::clone(&answer.upscaled),
        state.core.info().model.clone(),
    );
    let body = off_worker(move || json_response_body(&upscaled, model)).await??;
    let response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    Ok(with_answer_headers(response, &answer))
}

/// Liveness: the process runs, its inference threads are alive and its
/// device usable.
#[utoipa::path(get, path = paths::HEALTHZ_PATH, tag = "probes",
    responses((status = 200, description = "Alive"), (status = 503, description = "An inference thread died or the device is lost (a sticky CUDA error): restart the process")))]
pub(super) async fn healthz(State(state): State<AppState>) -> StatusCode {
    if state.core.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Readiness: warmed up, healthy and not draining.
#[utoipa::path(get, path = paths::READYZ_PATH, tag = "probes",
    responses((status = 200, description = "Ready", body = ReadyResponse),
              (status = 503, description = "Warming up, draining or unhealthy", body = ReadyResponse)))]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadyResponse>) {
    let r = state.lifecycle.readiness();
    let healthy = state.core.healthy();
    let status = match r {
        _ if !healthy => "unhealthy",
        Readiness::Ready => "ready",
        Readiness::WarmingUp => "warming_up",
        Readiness::Draining => "draining",
    };
    let code = if healthy && r == Readiness::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(ReadyResponse {
            status: status.to_owned(),
        }),
    )
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = paths::METRICS_PATH, tag = "probes",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Model, backend, device, limits and version.
#[utoipa::path(get, path = paths::INFO_PATH, tag = "info",
    responses((status = 200, description = "Server description", body = InfoResponse)))]
pub(super) async fn info(State(state): State<AppState>) -> Json<InfoResponse> {
    let i = state.core.info();
    let l = state.core.limits();
    Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        backend: i.backend.clone(),
        model: i.model.clone(),
        model_digest: i.model_digest.clone(),
        device: i.device.clone(),
        precision: i.precision.clone(),
        scales: i.scales.clone(),
        default_scale: state.core.default_scale(),
        profile: i.profile.clone(),
        sampling_steps: i.default_steps,
        self_ensemble: i.self_ensemble,
        tile: i.tile,
        projection_steps: i.projection_steps,
        batch_tiles: i.batch_tiles,
        limits: InfoLimits {
            max_concurrent: l.max_concurrent.get(),
            max_queue_depth: l.max_queue_depth.get(),
            request_timeout_s: l.request_timeout.as_secs(),
            max_image_pixels: l.max_image_pixels,
            max_output_pixels: l.max_output_pixels,
            max_payload_bytes: l.max_payload_bytes,
            rate_limit_per_hour: state.http.rate_limit_per_hour.map_or(0, |n| n.get()),
            memory_budget_mb: l.memory_budget_mib,
            min_upload_bytes_per_s: state.http.min_upload_bytes_per_s,
            max_connections: state.http.max_connections,
            estimated_seconds_256: state
                .core
                .estimate(256, 256, state.core.default_scale())
                .as_secs_f64(),
            deadline_margin: state.core.deadline_margin(),
            shared_slowdown: state.core.shared_slowdown(),
        },
    })
}

/// This document.
#[utoipa::path(get, path = paths::OPENAPI_PATH, tag = "info",
    responses((status = 200, description = "The OpenAPI document")))]
pub(super) async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
}

/// Unknown routes get the JSON error shape too.
pub(super) async fn not_found() -> Error {
    Error::NotFound
}

/// Known routes with the wrong method get the JSON error shape too.
pub(super) async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

/// Runs CPU-heavy request/response work on the blocking pool.
async fn off_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))
}

fn parse_json_request(raw: &[u8], deadline: Deadline) -> Result<UpscaleRequest, Error> {
    let req: JsonUpscaleRequest = serde_json::from_slice(raw)
        .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))?;
    let b64 = req
        .image
        .split_once(";base64,")
        .map_or(req.image.as_str(), |(_, data)| data);
    // `base64` wraps its output at 76 columns; decoders like Python's skip
    // the line breaks, and so does this one (any ASCII whitespace).
    let compact: std::borrow::Cow<'_, [u8]> = if b64.bytes().any(|b| b.is_ascii_whitespace()) {
        b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect()
    } else {
        b64.as_bytes().into()
    };
    let image = BASE64
        .decode(&compact)
        .map_err(|e| Error::BadRequest(format!("`image` is not valid base64: {e}")))?;
    Ok(UpscaleRequest {
        image: Bytes::from(image),
        scale: req.scale,
        steps: req.steps,
        seed: req.seed.unwrap_or(0),
        deadline,
        output: OutputPrefs {
            format: None,
            compression: req.compression.unwrap_or_default(),
        },
    })
}

/// The answer's container from `Accept`: the one of `image/png` and
/// `image/tiff` with the higher quality value (PNG on a tie); `None` when
/// the client names neither (the input's container then, as always).
fn accepted_container(headers: &HeaderMap) -> Option<Container> {
    let mut best: Option<(f32, Container)> = None;
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let container = match parts.next().map(str::to_ascii_lowercase).as_deref() {
                Some("image/png") => Container::Png,
                Some("image/tiff") => Container::Tiff,
                _ => continue,
            };
            let q = parts
                .find_map(|p| p.strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            let better = best.is_none_or(|(bq, bc)| {
                q > bq || (q == bq && container == Container::Png && bc != Container::Png)
            });
            if q > 0.0 && better {
                best = Some((q, container));
            }
        }
    }
    best.map(|(_, c)| c)
}

fn json_response_body(up: &Upscaled, model: String) -> Result<Vec<u8>, Error> {
    let body = JsonUpscaleResponse {
        image: BASE64.encode(&up.image),
        format: if up.content_type == "image/tiff" {
            "tiff"
        } else {
            "png"
        }
        .to_owned(),
        width: up.width,
        height: up.height,
        scale: up.scale,
        model,
        queue_ms: ms(up.timings.queue),
        inference_ms: ms(up.timings.inference),
    };
    serde_json::to_vec(&body).map_err(|e| Error::Internal(format!("encoding the JSON answer: {e}")))
}

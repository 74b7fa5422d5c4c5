//! The one error type of the request path, its one status-code mapping and
//! its one JSON shape, `{"error": "...", "type": "..."}`.
//!
//! Every variant has a bounded [`Error::reason`] label (a `&'static str`), used
//! as the JSON `type`, as the `reason` label of `hndsr_rejections_total` and,
//! for failures, as the outcome of `hndsr_requests_total`.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::backend::BackendError;

/// Why a request failed. Cloneable so one coalesced computation can hand the
/// same failure to every waiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request body is larger than `MAX_PAYLOAD_MB`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The image header announces more pixels than allowed (input or output).
    #[error("{what} of {width}x{height} ({pixels} pixels) exceeds the limit of {limit} pixels")]
    ImageTooLarge {
        /// `image` or `output`.
        what: &'static str,
        /// Width in pixels.
        width: u64,
        /// Height in pixels.
        height: u64,
        /// `width * height`.
        pixels: u64,
        /// The budget.
        limit: u64,
    },
    /// Decoding, upscaling and encoding the image would need more host
    /// memory than the server's whole budget (`HNDSR_MEMORY_BUDGET_MB`).
    #[error(
        "this image needs about {needed_mib} MiB of server memory at this scale; the server's budget for all requests is {budget_mib} MiB"
    )]
    MemoryBudget {
        /// Estimated need.
        needed_mib: u64,
        /// The whole budget.
        budget_mib: u64,
    },
    /// The decoder hit its memory limits (a decompression bomb).
    #[error("decoding the image exceeds the decoder memory limit: {0}")]
    DecodeLimit(String),
    /// Not PNG, JPEG or TIFF.
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    /// The bytes are not a valid image of the detected format.
    #[error("the image could not be decoded: {0}")]
    CorruptImage(String),
    /// Malformed request: bad query, bad JSON, bad base64.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// Well-formed but not processable: unsupported scale or layout.
    #[error("cannot process the request: {0}")]
    Unprocessable(String),
    /// Per-client rate limit exceeded.
    #[error("rate limit exceeded; retry after {}s", .retry_after.as_secs())]
    RateLimited {
        /// When the client may try again.
        retry_after: Duration,
    },
    /// In-flight requests are at `MAX_QUEUE_DEPTH`; nothing was queued.
    #[error("the server is at capacity; retry after {}s", .retry_after.as_secs())]
    Overloaded {
        /// Jittered back-off hint.
        retry_after: Duration,
    },
    /// The server is draining for shutdown or not warmed up yet.
    #[error("the server is not accepting work (starting up or shutting down)")]
    Unavailable {
        /// Back-off hint.
        retry_after: Duration,
    },
    /// The device ran out of memory; the server stays ready.
    #[error("the device ran out of memory; retry after {}s", .retry_after.as_secs())]
    OutOfMemory {
        /// Jittered back-off hint.
        retry_after: Duration,
    },
    /// The work ahead of this request and its own estimated service time
    /// would not fit in what is left of its deadline; nothing was queued.
    #[error(
        "the server would need about {:.1}s for this request (queue ahead and safety margin included) and {:.1}s are left of its deadline; retry after {}s",
        .estimate.as_secs_f64(), .remaining.as_secs_f64(), .retry_after.as_secs()
    )]
    DeadlineWait {
        /// Estimated wait + service, margin applied.
        estimate: Duration,
        /// What was left of the deadline.
        remaining: Duration,
        /// When the queue ahead should have drained enough.
        retry_after: Duration,
    },
    /// Running this request now, beside the computations running, would
    /// slow one of them past its deadline; nothing was queued.
    #[error(
        "the server is busy with requests this one would slow past their deadlines; retry after {}s",
        .retry_after.as_secs()
    )]
    DeadlineCrowded {
        /// When the computation it would slow should be done.
        retry_after: Duration,
    },
    /// This request alone would take longer than its deadline on this
    /// server, whatever the queue.
    #[error(
        "this request would take about {:.1}s on this server alone ({out_width}x{out_height} output pixels; safety margin included), over its deadline of {:.1}s{}",
        .estimate.as_secs_f64(), .limit.as_secs_f64(),
        if .limit < .server_max { format!("; a longer {} (up to {} ms) or a smaller image would fit", crate::http::TIMEOUT_HEADER, .server_max.as_millis()) } else { "; send a smaller image".to_owned() }
    )]
    DeadlineTooSlow {
        /// Estimated service time alone, margin applied.
        estimate: Duration,
        /// The request's deadline.
        limit: Duration,
        /// The server's longest deadline (`REQUEST_TIMEOUT_S`).
        server_max: Duration,
        /// Output width.
        out_width: u64,
        /// Output height.
        out_height: u64,
    },
    /// The client sent its body slower than the minimum upload rate.
    #[error(
        "the request body arrived slower than {min_bytes_per_s} bytes/s; the connection is closed"
    )]
    SlowUpload {
        /// The minimum rate.
        min_bytes_per_s: u64,
    },
    /// The device is lost (sticky CUDA error); the process is restarting.
    #[error("the server's device failed; retry after {}s (another replica will answer)", .retry_after.as_secs())]
    DeviceLost {
        /// Back-off hint.
        retry_after: Duration,
    },
    /// The whole-request deadline passed; the work was cancelled.
    #[error("the request did not finish within {}s and was cancelled", .timeout.as_secs())]
    Timeout {
        /// The deadline.
        timeout: Duration,
    },
    /// The backend panicked; the inference thread survived.
    #[error("the backend failed unexpectedly")]
    BackendPanic,
    /// The backend reported a failure.
    #[error("backend failure: {0}")]
    Backend(String),
    /// Work was cancelled before it finished (all waiters left).
    #[error("the request was cancelled")]
    Cancelled,
    /// No such route.
    #[error("not found")]
    NotFound,
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A bug or an unexpected state of the server.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every value [`Error::reason`] can return, for pre-registering metric labels.
pub const ALL_REASONS: &[&str] = &[
    "payload_too_large",
    "image_too_large",
    "decode_limit",
    "unsupported_media_type",
    "invalid_image",
    "bad_request",
    "unprocessable",
    "rate_limited",
    "overloaded",
    "unavailable",
    "out_of_memory",
    "deadline_wait",
    "deadline_too_slow",
    "slow_upload",
    "device_lost",
    "timeout",
    "backend_panic",
    "backend_error",
    "cancelled",
    "not_found",
    "method_not_allowed",
    "internal",
];

impl Error {
    /// The HTTP status of this error.
    #[must_use]
    pub const fn status(&self) -> StatusCode {
        match self {
            Self::PayloadTooLarge { .. }
            | Self::ImageTooLarge { .. }
            | Self::MemoryBudget { .. }
            | Self::DecodeLimit(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedFormat(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::CorruptImage(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. }
            | Self::Unavailable { .. }
            | Self::OutOfMemory { .. }
            | Self::DeadlineWait { .. }
            | Self::DeadlineCrowded { .. }
            | Self::DeviceLost { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineTooSlow { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::SlowUpload { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // 499 is not a registered status; nobody is listening anyway.
            Self::Cancelled | Self::BackendPanic | Self::Backend(_) | Self::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The bounded label: JSON `type`, metric `reason`/`outcome`.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::ImageTooLarge { .. } | Self::MemoryBudget { .. } => "image_too_large",
            Self::DecodeLimit(_) => "decode_limit",
            Self::UnsupportedFormat(_) => "unsupported_media_type",
            Self::CorruptImage(_) => "invalid_image",
            Self::BadRequest(_) => "bad_request",
            Self::Unprocessable(_) => "unprocessable",
            Self::RateLimited { .. } => "rate_limited",
            Self::Overloaded { .. } => "overloaded",
            Self::Unavailable { .. } => "unavailable",
            Self::OutOfMemory { .. } => "out_of_memory",
            Self::DeadlineWait { .. } | Self::DeadlineCrowded { .. } => "deadline_wait",
            Self::DeadlineTooSlow { .. } => "deadline_too_slow",
            Self::SlowUpload { .. } => "slow_upload",
            Self::DeviceLost { .. } => "device_lost",
            Self::Timeout { .. } => "timeout",
            Self::BackendPanic => "backend_panic",
            Self::Backend(_) => "backend_error",
            Self::Cancelled => "cancelled",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }

    /// Whether the request was turned away before any model work (counted
    /// in `hndsr_rejections_total`).
    #[must_use]
    pub const fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::PayloadTooLarge { .. }
                | Self::ImageTooLarge { .. }
                | Self::MemoryBudget { .. }
                | Self::DecodeLimit(_)
                | Self::UnsupportedFormat(_)
                | Self::CorruptImage(_)
                | Self::BadRequest(_)
                | Self::Unprocessable(_)
                | Self::RateLimited { .. }
                | Self::Overloaded { .. }
                | Self::Unavailable { .. }
                | Self::DeadlineWait { .. }
                | Self::DeadlineCrowded { .. }
                | Self::DeadlineTooSlow { .. }
                | Self::SlowUpload { .. }
                | Self::NotFound
                | Self::MethodNotAllowed
        )
    }

    /// The Retry-After hint, for the errors that have one.
    #[must_use]
    pub const fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after }
            | Self::Overloaded { retry_after }
            | Self::Unavailable { retry_after }
            | Self::OutOfMemory { retry_after }
            | Self::DeadlineWait { retry_after, .. }
            | Self::DeadlineCrowded { retry_after }
            | Self::DeviceLost { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Maps a backend failure. `OutOfMemory` gets a jittered retry hint.
    #[must_use]
    pub fn from_backend(err: BackendError) -> Self {
        match err {
            BackendError::Cancelled => Self::Cancelled,
            BackendError::OutOfMemory(_) => Self::OutOfMemory {
                retry_after: jittered_retry_after(),
            },
            BackendError::InvalidInput(m) => Self::Unprocessable(m),
            BackendError::DeviceLost(m) => {
                tracing::error!(error = %m, "the device is lost; /healthz fails from now on");
                Self::DeviceLost {
                    retry_after: jittered_retry_after(),
                }
            }
            BackendError::Load(m) | BackendError::Internal(m) => Self::Backend(m),
        }
    }
}

/// A Retry-After of 1 to 3 seconds, spread so rejected clients do not come
/// back in lock-step.
#[must_use]
pub fn jittered_retry_after() -> Duration {
    Duration::from_secs(rand::random_range(1..=3))
}

tokio::task_local! {
    /// The id of the request the current task serves (`X-Request-Id`), set
    /// by the HTTP layer, so an error answer can name it.
    pub static REQUEST_ID: String;
}

/// The JSON error body.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable message. For server-side failures a stable text: the
    /// details (libtorch's message, file paths) are in the server's log
    /// under the request id.
    pub error: String,
    /// Machine-readable, bounded error type (e.g. `overloaded`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request's `X-Request-Id`, to find it in the server's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Error {
    /// Whether the message carries server internals (libtorch text, paths,
    /// states) that stay in the log.
    const fn is_internal(&self) -> bool {
        matches!(
            self,
            Self::BackendPanic | Self::Backend(_) | Self::Internal(_)
        )
    }

    /// What the client reads: the message, or a stable text for internal
    /// failures.
    #[must_use]
    pub fn public_message(&self) -> String {
        match self {
            Self::BackendPanic | Self::Backend(_) => {
                "the model failed on this request; the server log has the details under its request id".to_owned()
            }
            Self::Internal(_) => {
                "internal server error; the server log has the details under the request id".to_owned()
            }
            other => other.to_string(),
        }
    }
}

/// Stored in the response extensions so the metrics middleware can count
/// the failure by its label without parsing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// [`Error::reason`].
    pub reason: &'static str,
    /// [`Error::is_rejection`].
    pub rejection: bool,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Clone::clone).ok();
        if self.is_internal() {
            tracing::error!(error = %self, reason = self.reason(), "request failed");
        }
        let body = ErrorBody {
            error: self.public_message(),
            kind: self.reason().to_owned(),
            request_id,
        };
        let mut res = (self.status(), Json(body)).into_response();
        if let Some(after) = self.retry_after() {
            // Whole seconds, at least 1 (RFC 9110 delay-seconds).
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, Self::SlowUpload { .. }) {
            // The rest of the body is not worth waiting for.
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res.extensions_mut().insert(Failure {
            reason: self.reason(),
            rejection: self.is_rejection(),
        });
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let samples = [
            Error::PayloadTooLarge { limit: 1 },
            Error::DecodeLimit(String::new()),
            Error::Timeout {
                timeout: Duration::from_secs(1),
            },
            Error::BackendPanic,
            Error::Cancelled,
            Error::Internal(String::new()),
        ];
        for e in samples {
            assert!(ALL_REASONS.contains(&e.reason()), "{}", e.reason());
        }
    }

    #[tokio::test]
    async fn internal_failures_answer_a_stable_message_and_the_request_id() {
        use http_body_util::BodyExt as _;
        let leaky = Error::Backend(
            "torch error during conv: /opt/libtorch/include/ATen/core.h:12 shape mismatch"
                .to_owned(),
        );
        let res = REQUEST_ID
            .scope("req-42".to_owned(), async { leaky.into_response() })
            .await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert!(
            !body.error.contains("torch") && !body.error.contains('/'),
            "{}",
            body.error
        );
        assert_eq!(body.kind, "backend_error");
        assert_eq!(body.request_id.as_deref(), Some("req-42"));
        for e in [
            Error::Internal("state x at src/core.rs".to_owned()),
            Error::BackendPanic,
        ] {
            assert!(
                !e.public_message().contains("src/"),
                "{}",
                e.public_message()
            );
        }
        // A client's own mistake keeps its explanation.
        let bad = Error::Unprocessable("scale 5 is not supported".to_owned());
        assert!(bad.public_message().contains("scale 5"));
    }

    #[test]
    fn retry_after_is_whole_seconds() {
        let res = Error::RateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
    }
}

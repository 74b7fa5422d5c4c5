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
            Self::Overloaded { .. } | Self::Unavailable { .. } | Self::OutOfMemory { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            | Self::OutOfMemory { retry_after } => Some(*retry_after),
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

/// The JSON error body.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Machine-readable, bounded error type (e.g. `overloaded`).
    #[serde(rename = "type")]
    pub kind: String,
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
        let body = ErrorBody {
            error: self.to_string(),
            kind: self.reason().to_owned(),
        };
        let mut res = (self.status(), Json(body)).into_response();
        if let Some(after) = self.retry_after() {
            // Whole seconds, at least 1 (RFC 9110 delay-seconds).
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
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

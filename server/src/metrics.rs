//! Prometheus metrics of the server, in their own [`Registry`].
//!
//! Names come from [`hndsr_contract::metrics`] (the operator's autoscaler
//! reads them). Every label value is a `&'static str` from a closed set and
//! is registered at start-up, so series exist (at 0) before the first event.

use std::time::Duration;

use hndsr_contract::metrics as names;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::error::ALL_REASONS;

/// Buckets of the queue-wait and inference histograms: finer than the
/// request buckets at the low end, where queue waits usually are.
pub const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Histogram: CPU seconds of the thread that ran each stage of a request.
pub const STAGE_CPU_SECONDS: &str = "hndsr_stage_cpu_seconds";

/// A stage of a request's service (label `stage` of [`STAGE_CPU_SECONDS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Image file → planar samples (blocking pool).
    Decode,
    /// Planar samples → the backend's tensor (inference thread).
    ToTensor,
    /// The model itself: the inference thread's CPU (libtorch's intra-op
    /// workers and a GPU's time are not in it).
    Model,
    /// The backend's tensor → planar samples (inference thread).
    FromTensor,
    /// Planar samples → the answer's file (blocking pool).
    Encode,
}

impl Stage {
    /// Every stage, in request order.
    pub const ALL: [Self; 5] = [
        Self::Decode,
        Self::ToTensor,
        Self::Model,
        Self::FromTensor,
        Self::Encode,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::ToTensor => "to_tensor",
            Self::Model => "model",
            Self::FromTensor => "from_tensor",
            Self::Encode => "encode",
        }
    }
}

/// Gauge: the admission slots (`MAX_QUEUE_DEPTH`), constant for the
/// process: `hndsr_admitted_requests` at this value means new requests get
/// 503 `overloaded` (the chart's queue-saturation alert compares the two).
pub const MAX_QUEUE_DEPTH: &str = "hndsr_max_queue_depth";
/// Counter: requests answered from another request's computation.
pub const COALESCED_TOTAL: &str = "hndsr_coalesced_requests_total";
/// Gauge: clients tracked by the rate limiter.
pub const RATE_LIMITER_CLIENTS: &str = "hndsr_rate_limiter_clients";
/// Counter: clients the rate limiter forgot to make room (least recently
/// seen first) while its table was full.
pub const RATE_LIMITER_EVICTIONS_TOTAL: &str = "hndsr_rate_limiter_evictions_total";
/// Gauge: open client connections.
pub const OPEN_CONNECTIONS: &str = "hndsr_open_connections";
/// Histogram: tiles per forward pass of the model (several requests' tiles
/// when batching across requests is on).
pub const BATCH_TILES: &str = "hndsr_batch_tiles";
/// Buckets of [`BATCH_TILES`].
pub const BATCH_TILES_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Histogram: measured ÷ estimated service time of finished computations.
pub const ESTIMATE_RATIO: &str = "hndsr_service_estimate_ratio";
/// Buckets of [`ESTIMATE_RATIO`].
pub const ESTIMATE_RATIO_BUCKETS: &[f64] =
    &[0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0];

/// How a request ended (label `outcome` of `hndsr_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Ok,
    /// Turned away before model work (see [`crate::Error::is_rejection`]).
    Rejected,
    /// Deadline passed; 504.
    Timeout,
    /// Device out of memory; 503.
    OutOfMemory,
    /// The client went away before the answer.
    Disconnected,
    /// Any other failure; 5xx.
    Error,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Self; 6] = [
        Self::Ok,
        Self::Rejected,
        Self::Timeout,
        Self::OutOfMemory,
        Self::Disconnected,
        Self::Error,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::OutOfMemory => "out_of_memory",
            Self::Disconnected => "disconnected",
            Self::Error => "error",
        }
    }
}

/// The server's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests currently running on the backend (holding a permit).
    pub active_requests: IntGauge,
    /// Admitted computations waiting for a backend permit.
    pub queue_depth: IntGauge,
    /// Requests holding an admission slot (uploading, waiting or running).
    pub admitted_requests: IntGauge,
    max_queue_depth: IntGauge,
    request_duration: Histogram,
    queue_wait: Histogram,
    inference: Histogram,
    requests: IntCounterVec,
    rejections: IntCounterVec,
    coalesced: IntCounter,
    /// Clients tracked by the rate limiter.
    pub rate_limiter_clients: IntGauge,
    /// Clients evicted from the rate limiter's full table.
    pub rate_limiter_evictions: IntCounter,
    /// Open client connections.
    pub open_connections: IntGauge,
    estimate_ratio: Histogram,
    /// Tiles per forward pass.
    pub batch_tiles: Histogram,
    stage_cpu: prometheus::HistogramVec,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: names and label sets are constants and distinct.
    #[must_use]
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid histogram")
        };
        let m = Self {
            active_requests: IntGauge::new(
                names::ACTIVE_REQUESTS,
                "Requests currently running on the backend.",
            )
            .expect("valid gauge"),
            queue_depth: IntGauge::new(
                names::QUEUE_DEPTH,
                "Admitted requests waiting for a backend permit.",
            )
            .expect("valid gauge"),
            admitted_requests: IntGauge::new(
                names::ADMITTED_REQUESTS,
                "Requests holding an admission slot: uploading, waiting or running (MAX_QUEUE_DEPTH bounds it).",
            )
            .expect("valid gauge"),
            max_queue_depth: IntGauge::new(
                MAX_QUEUE_DEPTH,
                "Admission slots (MAX_QUEUE_DEPTH): hndsr_admitted_requests at this value turns new requests away (503 overloaded).",
            )
            .expect("valid gauge"),
            request_duration: hist(
                names::REQUEST_DURATION_SECONDS,
                "Whole upscale request duration in seconds (admitted requests; rejections are not timed).",
                names::REQUEST_DURATION_BUCKETS,
            ),
            queue_wait: hist(
                names::QUEUE_WAIT_SECONDS,
                "Time spent waiting for a backend permit in seconds.",
                STAGE_BUCKETS,
            ),
            inference: hist(
                names::INFERENCE_SECONDS,
                "Time spent in the backend in seconds.",
                STAGE_BUCKETS,
            ),
            requests: IntCounterVec::new(
                Opts::new(
                    names::REQUESTS_TOTAL,
                    "Finished upscale requests by outcome.",
                ),
                &["outcome"],
            )
            .expect("valid counter"),
            rejections: IntCounterVec::new(
                Opts::new(
                    names::REJECTIONS_TOTAL,
                    "Rejected upscale requests by reason.",
                ),
                &["reason"],
            )
            .expect("valid counter"),
            coalesced: IntCounter::new(
                COALESCED_TOTAL,
                "Requests answered by sharing an identical concurrent request's computation.",
            )
            .expect("valid counter"),
            rate_limiter_clients: IntGauge::new(
                RATE_LIMITER_CLIENTS,
                "Clients currently tracked by the rate limiter.",
            )
            .expect("valid gauge"),
            rate_limiter_evictions: IntCounter::new(
                RATE_LIMITER_EVICTIONS_TOTAL,
                "Clients the rate limiter forgot, least recently seen first, to make room in its full table.",
            )
            .expect("valid counter"),
            open_connections: IntGauge::new(OPEN_CONNECTIONS, "Open client connections.")
                .expect("valid gauge"),
            stage_cpu: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    STAGE_CPU_SECONDS,
                    "CPU seconds of the thread that ran each stage of a request (model: the inference thread only, not libtorch's workers).",
                )
                .buckets(STAGE_BUCKETS.to_vec()),
                &["stage"],
            )
            .expect("valid histogram"),
            batch_tiles: hist(
                BATCH_TILES,
                "Tiles per forward pass of the model (tiles of concurrent requests when batching is on).",
                BATCH_TILES_BUCKETS,
            ),
            estimate_ratio: hist(
                ESTIMATE_RATIO,
                "Measured / estimated service time (decode + inference + encode) of finished computations.",
                ESTIMATE_RATIO_BUCKETS,
            ),
            registry,
        };
        for outcome in Outcome::ALL {
            m.requests.with_label_values(&[outcome.as_str()]);
        }
        for reason in ALL_REASONS {
            m.rejections.with_label_values(&[*reason]);
        }
        for stage in Stage::ALL {
            m.stage_cpu.with_label_values(&[stage.as_str()]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 16] = [
            Box::new(m.active_requests.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.admitted_requests.clone()),
            Box::new(m.max_queue_depth.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.inference.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.rejections.clone()),
            Box::new(m.coalesced.clone()),
            Box::new(m.rate_limiter_clients.clone()),
            Box::new(m.rate_limiter_evictions.clone()),
            Box::new(m.open_connections.clone()),
            Box::new(m.estimate_ratio.clone()),
            Box::new(m.batch_tiles.clone()),
            Box::new(m.stage_cpu.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("distinct metric names");
        }
        m
    }

    /// Exports the admission cap, `MAX_QUEUE_DEPTH` (once, at start-up).
    pub fn set_max_queue_depth(&self, slots: usize) {
        self.max_queue_depth
            .set(i64::try_from(slots).unwrap_or(i64::MAX));
    }

    /// Counts one finished upscale request. The single place requests are
    /// counted (called by the HTTP metrics middleware).
    pub fn record_request(
        &self,
        outcome: Outcome,
        rejection_reason: Option<&'static str>,
        took: Duration,
    ) {
        self.requests.with_label_values(&[outcome.as_str()]).inc();
        if let Some(reason) = rejection_reason {
            self.rejections.with_label_values(&[reason]).inc();
        }
        // Rejections take microseconds: counted above, they would pull the
        // latency quantiles down exactly when the pod is overloaded.
        if outcome != Outcome::Rejected {
            self.request_duration.observe(took.as_secs_f64());
        }
    }

    /// Records the time a computation waited for its permit.
    pub fn observe_queue_wait(&self, took: Duration) {
        self.queue_wait.observe(took.as_secs_f64());
    }

    /// Records the time a computation spent in the backend.
    pub fn observe_inference(&self, took: Duration) {
        self.inference.observe(took.as_secs_f64());
    }

    /// Records how far a computation's estimate was from its measured
    /// service time (nothing before the estimator is calibrated).
    pub fn observe_estimate(&self, estimate: Duration, measured: Duration) {
        if !estimate.is_zero() {
            self.estimate_ratio
                .observe(measured.as_secs_f64() / estimate.as_secs_f64());
        }
    }

    /// Records the CPU time a stage of a request took.
    pub fn observe_stage_cpu(&self, stage: Stage, cpu: Duration) {
        self.stage_cpu
            .with_label_values(&[stage.as_str()])
            .observe(cpu.as_secs_f64());
    }

    /// Counts a request that joined another's computation.
    pub fn inc_coalesced(&self) {
        self.coalesced.inc();
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_but_not_timed() {
        let m = Metrics::new();
        m.record_request(
            Outcome::Rejected,
            Some("overloaded"),
            Duration::from_micros(40),
        );
        m.record_request(Outcome::Ok, None, Duration::from_secs(2));
        m.record_request(Outcome::Timeout, None, Duration::from_secs(30));
        assert_eq!(m.request_duration.get_sample_count(), 2);
        assert_eq!(m.requests.with_label_values(&["rejected"]).get(), 1);
    }

    #[test]
    fn the_admission_cap_is_exported() {
        let m = Metrics::new();
        m.set_max_queue_depth(20);
        let text = m.render();
        assert!(
            text.contains("# TYPE hndsr_max_queue_depth gauge"),
            "{text}"
        );
        assert!(text.contains("\nhndsr_max_queue_depth 20\n"), "{text}");
    }
}

//! The operator's own Prometheus metrics. Labels are bounded: `result` is
//! `ok`/`error`, `reason` is [`crate::error::Error::reason`], `kind` is a
//! child kind's static name.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// Buckets of `hndsr_operator_reconcile_duration_seconds`: a reconcile is a
/// few API calls at most, so the interesting range is milliseconds.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the operator exports, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes by `result` (`ok` | `error`).
    pub reconciles: IntCounterVec,
    /// Duration of one reconcile pass.
    pub reconcile_duration: Histogram,
    /// Failed reconcile passes by `reason`.
    pub reconcile_errors: IntCounterVec,
    /// Server-side applies of children by `kind`; flat in steady state.
    pub applies: IntCounterVec,
    /// Status patches of `HndsrService` objects; flat in steady state.
    pub status_patches: prometheus::IntCounter,
    /// Standby pods promoted into the serving set (prewarm).
    pub promotions: prometheus::IntCounter,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: the names are static and unique, so registration
    /// cannot fail.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "hndsr_operator_reconciles_total",
                "Reconcile passes by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "hndsr_operator_reconcile_duration_seconds",
                "Duration of one reconcile pass.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "hndsr_operator_reconcile_errors_total",
                "Failed reconcile passes by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let applies = IntCounterVec::new(
            Opts::new(
                "hndsr_operator_applies_total",
                "Server-side applies of child objects by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let status_patches = prometheus::IntCounter::new(
            "hndsr_operator_status_patches_total",
            "Status patches of HndsrService objects.",
        )
        .expect("valid metric");
        let promotions = prometheus::IntCounter::new(
            "hndsr_operator_standby_promotions_total",
            "Warm standby pods promoted into the serving set.",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "hndsr_operator_leader",
            "1 while this replica holds the leader lease.",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_duration.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(applies.clone()),
            Box::new(status_patches.clone()),
            Box::new(promotions.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            reconciles,
            reconcile_duration,
            reconcile_errors,
            applies,
            status_patches,
            promotions,
            leader,
        }
    }

    /// Registers a further collector (the zero responder's metrics).
    ///
    /// # Panics
    /// When a metric of the same name is already registered: a programming
    /// error caught by the tests.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry.register(collector).expect("unique metric");
    }

    /// Records one finished reconcile pass.
    pub fn observe_reconcile(&self, took: Duration, error_reason: Option<&'static str>) {
        self.reconcile_duration.observe(took.as_secs_f64());
        match error_reason {
            None => self.reconciles.with_label_values(&["ok"]).inc(),
            Some(reason) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.reconcile_errors.with_label_values(&[reason]).inc();
            }
        }
    }

    /// The text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bounded_labels() {
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(3), None);
        m.observe_reconcile(Duration::from_millis(3), Some("apply"));
        m.leader.set(1);
        let text = m.render();
        assert!(text.contains(r#"hndsr_operator_reconciles_total{result="ok"} 1"#));
        assert!(text.contains(r#"hndsr_operator_reconcile_errors_total{reason="apply"} 1"#));
        assert!(text.contains("hndsr_operator_leader 1"));
        assert!(text.contains("hndsr_operator_reconcile_duration_seconds_bucket"));
    }
}

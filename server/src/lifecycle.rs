//! Process lifecycle: warming up → ready → draining.
//!
//! `/readyz` is true only between the end of the warm-up and the start of
//! the drain. Shutdown is driven by a [`CancellationToken`](crate::backend::CancellationToken)
//! handed to [`crate::server::Server::run`] (SIGTERM/SIGINT in the binary, a
//! test's own token in tests).

use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Loading or warming up the model.
    WarmingUp,
    /// Serving.
    Ready,
    /// Shutting down; finishing in-flight requests.
    Draining,
}

/// Shared lifecycle flags.
#[derive(Debug, Default)]
pub struct Lifecycle {
    warmed: AtomicBool,
    draining: AtomicBool,
}

impl Lifecycle {
    /// A lifecycle in the warming-up state.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The model is warm.
    pub fn mark_warmed(&self) {
        self.warmed.store(true, Ordering::SeqCst);
    }

    /// Shutdown has begun.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The current state.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        if self.draining.load(Ordering::SeqCst) {
            Readiness::Draining
        } else if self.warmed.load(Ordering::SeqCst) {
            Readiness::Ready
        } else {
            Readiness::WarmingUp
        }
    }
}

//! Assembles a serving process: core + HTTP + lifecycle, and runs it until
//! shutdown.
//!
//! [`Server::run`] serves at once (so `/healthz` answers during a long
//! warm-up), warms the backend up on an inference thread and only then
//! turns `/readyz` true. When the shutdown token fires: `/readyz` turns
//! false, new upscale requests get 503, in-flight requests finish (up to
//! `DRAIN_SECONDS`), then the listener closes and `run` returns.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::backend::{Backend, BackendError, CancellationToken};
use crate::config::{Config, ModelConfig};
use crate::core::Core;
use crate::http::{self, AppState, RateLimiter};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

/// How often the rate limiter forgets clients whose budget is whole again.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How often the drain checks for remaining in-flight requests.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Time after the drain to let responses flush and connections close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Building, starting or warming up the backend failed.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// The listener failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the backend the configuration names.
///
/// # Errors
/// [`BackendError::Load`] when the backend is not compiled in or fails to load.
pub fn build_backend(model: &ModelConfig) -> Result<Arc<dyn Backend>, BackendError> {
    #[cfg(feature = "torch")]
    {
        crate::backend::torch::build(model)
    }
    #[cfg(not(feature = "torch"))]
    {
        Err(BackendError::Load(format!(
            "backend `{}` is not compiled into this binary (built without the `torch` feature)",
            model.backend.as_str()
        )))
    }
}

/// A configured, not yet running server.
#[derive(Debug)]
pub struct Server {
    state: AppState,
}

impl Server {
    /// Starts the inference threads for `backend` under `config`.
    ///
    /// # Errors
    /// When the core cannot start (see [`Core::start`]).
    pub fn new(config: Config, backend: Arc<dyn Backend>) -> Result<Self, ServerError> {
        let metrics = Metrics::new();
        metrics.set_max_queue_depth(config.limits.max_queue_depth.get());
        let core = Core::start(
            backend,
            config.limits.clone(),
            config.model.scale,
            metrics.clone(),
        )?;
        let limiter = config
            .http
            .rate_limit_per_hour
            .map(|n| Arc::new(RateLimiter::new(n, metrics.clone())));
        Ok(Self {
            state: AppState {
                core,
                metrics: Arc::new(metrics),
                lifecycle: Arc::new(Lifecycle::new()),
                limiter,
                http: Arc::new(config.http),
                model: Arc::new(config.model),
            },
        })
    }

    /// The shared state (core, metrics, lifecycle) for inspection.
    #[must_use]
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router, for serving elsewhere or for in-process tests.
    pub fn router(&self) -> Router {
        http::router(self.state.clone())
    }

    /// Warms up, serves on `listener` until `shutdown` fires, then drains.
    ///
    /// # Errors
    /// When warm-up fails (after a clean shutdown of the listener) or the
    /// listener fails.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let state = self.state;
        let drain = state.core.limits().drain;

        // A failed warm-up is kept here *before* it triggers the shutdown, so
        // the exit status cannot depend on which task the runtime finishes first.
        let warm_up_failure = Arc::new(Mutex::new(None));
        let warm_up = {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            let failure = Arc::clone(&warm_up_failure);
            tokio::spawn(async move {
                match state.core.warm_up().await {
                    Ok(()) => {
                        state.lifecycle.mark_warmed();
                        tracing::info!("warm-up done; ready");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "warm-up failed; shutting down");
                        *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                        shutdown.cancel();
                    }
                }
            })
        };

        if let Some(limiter) = state.limiter.clone() {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => limiter.sweep(),
                    }
                }
            });
        }

        let drained = {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                state.lifecycle.start_draining();
                tracing::info!(in_flight = state.core.in_flight(), "draining");
                let finished = tokio::time::timeout(drain, async {
                    while state.core.in_flight() > 0 {
                        tokio::time::sleep(DRAIN_POLL).await;
                    }
                })
                .await;
                if finished.is_err() {
                    tracing::warn!(in_flight = state.core.in_flight(), "drain deadline passed");
                }
            }
        };

        let app = http::router(state.clone());
        tracing::info!(addr = %listener.local_addr()?, "listening");
        let policy = http::serve::ConnectionPolicy {
            header_read_timeout: state.http.header_read_timeout,
            max_connections: state.http.max_connections,
            open: state.metrics.open_connections.clone(),
        };
        let serve = http::serve::serve(listener, app, policy, drained);
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain + CLOSE_GRACE).await;
        };
        tokio::select! {
            () = serve => {}
            () = deadline => tracing::warn!("connections still open after the drain; closing them"),
        }
        tracing::info!("stopped");

        warm_up.abort();
        if let Some(e) = warm_up_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(e.into());
        }
        Ok(())
    }
}

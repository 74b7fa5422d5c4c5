//! The model backend interface, and the backends behind it.
//!
//! A [`Backend`] is synchronous and blocking: the core calls it only from its
//! dedicated inference threads (never from tokio workers), one job per
//! thread at a time, with at most `MAX_CONCURRENT` jobs running at once. It
//! must check the [`CancellationToken`] between units of work (tiles,
//! diffusion steps) and return [`BackendError::Cancelled`] promptly once it
//! is cancelled; the caller holds the request's GPU permit until `upscale`
//! has returned, so cancellation is what frees capacity after a timeout or a
//! client disconnect.

use std::cell::Cell;
use std::fmt;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

pub mod fake;
#[cfg(feature = "torch")]
pub mod torch;

/// CPU time of the tensor conversions a backend ran on the calling thread
/// during its last `upscale` (zero for backends without tensors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversionCpu {
    /// Planar samples → the backend's input tensor.
    pub to_tensor: Duration,
    /// The output tensor → planar samples.
    pub from_tensor: Duration,
}

thread_local! {
    static CONVERSIONS: Cell<ConversionCpu> = const { Cell::new(ConversionCpu {
        to_tensor: Duration::ZERO,
        from_tensor: Duration::ZERO,
    }) };
}

/// Adds to the calling thread's conversion CPU time (backends call it).
pub fn record_conversions(to_tensor: Duration, from_tensor: Duration) {
    CONVERSIONS.with(|c| {
        let mut v = c.get();
        v.to_tensor += to_tensor;
        v.from_tensor += from_tensor;
        c.set(v);
    });
}

/// Takes (and zeroes) the calling thread's conversion CPU time.
#[must_use]
pub fn take_conversions() -> ConversionCpu {
    CONVERSIONS.with(|c| c.replace(ConversionCpu::default()))
}

/// A decoded image as planar `f32` samples in `[0, 1]`, channel-major (CHW).
#[derive(Clone, PartialEq)]
pub struct Planar {
    /// 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    pub channels: u8,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `channels * height * width` samples, plane after plane.
    pub data: Vec<f32>,
}

impl fmt::Debug for Planar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planar")
            .field("channels", &self.channels)
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

/// One unit of backend work: upscale `image` by `scale`.
#[derive(Debug, Clone)]
pub struct Job {
    /// The input image.
    pub image: Planar,
    /// Integer upscaling factor (validated against [`BackendInfo::scales`]).
    pub scale: u32,
    /// Diffusion sampling steps; `None` means the backend's configured default.
    pub steps: Option<u32>,
    /// Seed for any stochastic part, so a result is reproducible.
    pub seed: u64,
}

/// What a backend reports about itself (served by `/v1/info`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendInfo {
    /// Backend kind: `bicubic`, `hndsr`, or a test backend's name.
    pub backend: String,
    /// Model name and version (for `bicubic`, `bicubic`).
    pub model: String,
    /// sha256 of the weights, or of a fixed string for weight-less backends;
    /// part of the request-coalescing key.
    pub model_digest: String,
    /// Device the work runs on: `cpu`, `cuda:0`, ...
    pub device: String,
    /// Numeric precision: `fp32`, `fp16`, `bf16`.
    pub precision: String,
    /// Upscaling factors this backend accepts.
    pub scales: Vec<u32>,
    /// Serving profile in force (`fast`, `quality`, `realistic`); `None` for backends
    /// without knobs (`bicubic`).
    pub profile: Option<String>,
    /// DDIM steps used when a request names none (0 for backends without
    /// diffusion).
    pub default_steps: u32,
    /// Whether μ is a geometric self-ensemble (`hndsr` only).
    pub self_ensemble: bool,
    /// LR tile edge images are cut into (`hndsr` only).
    pub tile: Option<u32>,
    /// Conjugate-gradient steps of the projection onto the images that
    /// downsample to the input (0: off; `hndsr` only).
    pub projection_steps: u32,
    /// Most tiles per forward pass across concurrent requests (0: each
    /// request alone; `hndsr` only).
    pub batch_tiles: usize,
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The cancellation token fired and the work stopped.
    #[error("cancelled")]
    Cancelled,
    /// The device ran out of memory; caches were freed and the backend is usable.
    #[error("device out of memory: {0}")]
    OutOfMemory(String),
    /// The job cannot be run as asked (unsupported scale, channel count, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Loading or warming up the model failed.
    #[error("loading the model failed: {0}")]
    Load(String),
    /// The device is unusable for good (a lost CUDA context, an illegal
    /// memory access, a device-side assert): every later call would fail
    /// too, so the process must be restarted (`/healthz` fails).
    #[error("the device is lost: {0}")]
    DeviceLost(String),
    /// Anything else the backend reports.
    #[error("backend failure: {0}")]
    Internal(String),
}

/// A model that upscales images. See the module docs for the threading and
/// cancellation contract.
pub trait Backend: Send + Sync + 'static {
    /// Static facts about the backend.
    fn info(&self) -> BackendInfo;

    /// Prepares the calling inference thread (e.g. its libtorch thread
    /// count). Called once on each inference thread before it takes work.
    fn init_thread(&self) {}

    /// How much work upscaling a `width`×`height` image by `scale` with
    /// `steps` diffusion steps (`None`: the default) is, in output pixels
    /// computed: the admission core's service-time estimate is
    /// proportional to it. The default is the output's pixels; a tiling
    /// backend counts its overlapping tiles (a 512² input cut into 256²
    /// tiles computes about twice its pixels, a 256² one once) and a
    /// diffusion backend its passes.
    fn work(&self, width: u32, height: u32, scale: u32, _steps: Option<u32>) -> u64 {
        u64::from(width) * u64::from(height) * u64::from(scale) * u64::from(scale)
    }

    /// Hands the backend the server's metrics, for what only it can observe
    /// (forward passes and their sizes). Called once, before any work.
    fn attach_metrics(&self, _metrics: &crate::metrics::Metrics) {}

    /// Runs the model once on a small input so the first real request does
    /// not pay for lazy initialisation. Called on an inference thread before
    /// `/readyz` turns true.
    fn warm_up(&self) -> Result<(), BackendError>;

    /// Upscales one image. Blocking; checks `cancel` between units of work.
    fn upscale(&self, job: &Job, cancel: &CancellationToken) -> Result<Planar, BackendError>;
}

//! libtorch backends behind the [`Backend`] trait.
//!
//! [`build`] turns the model configuration into a backend: `bicubic` is
//! [`TorchBicubic`], `hndsr` is [`TorchHndsr`] (the trained model, its
//! weights sha256-checked). A backend that cannot load stops the start-up:
//! never a silent fallback to bicubic.
//!
//! `tch::Tensor` is `Send` but not `Sync`, and a backend is shared by every
//! inference thread. [`TorchBicubic`] holds no tensors at all; [`TorchHndsr`]
//! keeps a small pool of model replicas and lends each call one of them
//! exclusively, so no tensor is ever used from two threads at once.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hndsr_torch::hndsr::{HndsrError, HndsrModel, Precision, TileBatcher};
use hndsr_torch::tch::{Device, Kind, Tensor};
use hndsr_torch::tiling::TileConfig;
use hndsr_torch::{BICUBIC_TILES, BicubicUpscaler, TorchError};
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, BackendInfo, CancellationToken, Job, Planar};
use crate::config::{BackendKind, MAX_SAMPLING_STEPS, ModelConfig};
use crate::profile::{self, Knobs, Profile};

/// Upscaling factors the bicubic backend accepts.
pub const BICUBIC_SCALES: [u32; 4] = [2, 3, 4, 8];

/// Identity of the bicubic "model": its digest stands in for a weights hash
/// in the request-coalescing key; bump it if the output ever changes.
const BICUBIC_MODEL_ID: &str = "bicubic-v1";

/// Builds the backend `cfg` asks for, on the device it names.
///
/// # Errors
/// [`BackendError::Load`] when the backend or device cannot be used, with a
/// message an operator can act on.
pub fn build(cfg: &ModelConfig) -> Result<Arc<dyn Backend>, BackendError> {
    tracing::info!(
        torch_threads = cfg.torch_threads.get(),
        "libtorch intra-op threads per inference thread"
    );
    // Loading runs libtorch kernels, and the first parallel kernel on a
    // thread gives that thread an OpenMP worker pool for the life of the
    // thread. Left on the caller (the main thread), that pool would count
    // against the cores beside every inference thread's own, and OpenMP then
    // parks idle workers at once instead of spinning: many small kernels
    // (24² tiles) pay a wake-up each, ≈25% of a 64² request on 2 cores
    // (docs/benchmarks.md). A thread that ends takes its pool with it.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("hndsr-load".to_owned())
            .spawn_scoped(scope, || load(cfg))
            .map_err(|e| BackendError::Load(format!("cannot start the loading thread: {e}")))?
            .join()
            .unwrap_or_else(|_| {
                Err(BackendError::Load(
                    "the backend panicked while loading".to_owned(),
                ))
            })
    })
}

/// Builds the configured backend on the calling thread.
fn load(cfg: &ModelConfig) -> Result<Arc<dyn Backend>, BackendError> {
    match cfg.backend {
        BackendKind::Bicubic => Ok(Arc::new(TorchBicubic::new(cfg)?)),
        BackendKind::Hndsr => Ok(Arc::new(TorchHndsr::new(cfg)?)),
    }
}

/// Bicubic interpolation with libtorch's `upsample_bicubic2d`, tiled for
/// large images, on CPU or CUDA.
#[derive(Debug)]
pub struct TorchBicubic {
    upscaler: BicubicUpscaler,
    info: BackendInfo,
    torch_threads: NonZeroUsize,
}

impl TorchBicubic {
    /// Opens the configured device and checks the configuration.
    ///
    /// # Errors
    /// [`BackendError::Load`] for an unusable device, a precision other than
    /// fp32 or a default scale outside [`BICUBIC_SCALES`].
    pub fn new(cfg: &ModelConfig) -> Result<Self, BackendError> {
        if let Some(p) = cfg.precision.as_deref().filter(|p| *p != "fp32") {
            return Err(BackendError::Load(format!(
                "the bicubic backend computes in fp32 only; precision {p:?} was requested"
            )));
        }
        if !BICUBIC_SCALES.contains(&cfg.scale) {
            return Err(BackendError::Load(format!(
                "the bicubic backend supports scales {BICUBIC_SCALES:?}; default scale {} was requested",
                cfg.scale
            )));
        }
        let device =
            hndsr_torch::open_device(&cfg.device).map_err(|e| BackendError::Load(e.to_string()))?;
        let upscaler = BicubicUpscaler::new(device, BICUBIC_TILES)
            .map_err(|e| BackendError::Load(e.to_string()))?;
        let info = BackendInfo {
            backend: "bicubic".to_owned(),
            model: "bicubic".to_owned(),
            model_digest: hex::encode(Sha256::digest(BICUBIC_MODEL_ID.as_bytes())),
            device: hndsr_torch::device_name(device),
            precision: "fp32".to_owned(),
            scales: BICUBIC_SCALES.to_vec(),
            profile: None,
            default_steps: 0,
            self_ensemble: false,
            tile: None,
            projection_steps: 0,
            batch_tiles: 0,
        };
        Ok(Self {
            upscaler,
            info,
            torch_threads: cfg.torch_threads,
        })
    }
}

impl Backend for TorchBicubic {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn init_thread(&self) {
        set_torch_threads(self.torch_threads);
        use_own_stream(self.upscaler.device());
    }

    fn warm_up(&self) -> Result<(), BackendError> {
        warm_up(self, 16, 4)
    }

    fn upscale(&self, job: &Job, cancel: &CancellationToken) -> Result<Planar, BackendError> {
        check_scale(&self.info, job.scale)?;
        let input = timed_to_tensor(&job.image)?;
        let output = self
            .upscaler
            .upscale(&input, i64::from(job.scale), || cancel.is_cancelled())
            .map_err(backend_error)?;
        timed_from_tensor(&output, job.image.channels)
    }
}

/// The HNDSR model: neural-operator estimate refined by DDIM steps.
///
/// Each call borrows a replica from the pool and returns it afterwards;
/// replicas are loaded on demand, so there are never more than the number
/// of calls that ran at once (at most `MAX_CONCURRENT`). A replica whose call
/// panicked is dropped rather than returned. Every load re-checks the digest.
#[derive(Debug)]
pub struct TorchHndsr {
    source: WeightsSource,
    idle: Mutex<Vec<HndsrModel>>,
    info: BackendInfo,
    /// The tiling every replica uses (checked once, when the first loads).
    tiles: TileConfig,
    torch_threads: NonZeroUsize,
    /// Merges concurrent requests' tile batches into shared passes (or
    /// runs each alone), and counts every pass.
    batcher: TileBatcher,
    /// `hndsr_batch_tiles`, once the server attaches its metrics.
    passes: Arc<OnceLock<prometheus::Histogram>>,
}

/// Tiles per forward pass across requests on CUDA when not configured:
/// 4 requests' 256² tiles (on the CPU, merged passes are no faster).
const CUDA_BATCH_TILES: usize = 16;

/// What every replica is loaded from.
#[derive(Debug)]
struct WeightsSource {
    path: PathBuf,
    sha256: String,
    device: Device,
    precision: Precision,
}

impl WeightsSource {
    fn load(&self) -> Result<HndsrModel, BackendError> {
        HndsrModel::load(&self.path, &self.sha256, self.device, self.precision)
            .map_err(|e| load_error(&e))
    }
}

impl TorchHndsr {
    /// Loads the weights (refusing a digest mismatch) on the configured
    /// device and precision.
    ///
    /// # Errors
    /// [`BackendError::Load`] for missing or mismatching weights, an unusable
    /// device or precision, or a default scale the weights were not trained for.
    pub fn new(cfg: &ModelConfig) -> Result<Self, BackendError> {
        let missing = |what: &str| BackendError::Load(format!("the hndsr backend needs {what}"));
        let path = cfg
            .weights_path
            .clone()
            .ok_or_else(|| missing("a weights path"))?;
        let sha256 = cfg
            .weights_sha256
            .clone()
            .ok_or_else(|| missing("the weights' sha256"))?;
        let device =
            hndsr_torch::open_device(&cfg.device).map_err(|e| BackendError::Load(e.to_string()))?;
        // Unset: fp16 on CUDA, where it scores as fp32 (docs/model-log.md#precision)
        // for half the memory traffic; fp32 on the CPU.
        let precision: Precision = match cfg.precision.as_deref() {
            Some(p) => p.parse().map_err(|e: HndsrError| load_error(&e))?,
            None if device.is_cuda() => Precision::Fp16,
            None => Precision::Fp32,
        };
        // libtorch has CPU kernels for fp16 / bf16 (hndsr-train measures
        // their quality with them), but they are slower than fp32 there:
        // nothing to serve with.
        if precision != Precision::Fp32 && device == Device::Cpu {
            return Err(BackendError::Load(format!(
                "precision {precision} needs a CUDA device; use fp32 on the CPU"
            )));
        }
        let source = WeightsSource {
            path,
            sha256,
            device,
            precision,
        };
        let model = source.load()?;
        let scale = u32::try_from(model.scale())
            .map_err(|_| BackendError::Load(format!("weights for scale {}", model.scale())))?;
        if cfg.scale != scale {
            return Err(BackendError::Load(format!(
                "the weights are trained for scale {scale}; default scale {} was requested",
                cfg.scale
            )));
        }
        let manifest = model.manifest();
        let inputs = match manifest.inputs() {
            hndsr_torch::hndsr::Inputs::Matched => profile::Inputs::Matched,
            hndsr_torch::hndsr::Inputs::Realistic => profile::Inputs::Realistic,
        };
        let profile = cfg
            .profile
            .unwrap_or_else(|| Profile::default_for(&cfg.device, inputs));
        let configured = Knobs {
            steps: cfg.sampling_steps,
            self_ensemble: cfg.self_ensemble,
            tile: cfg.tile,
            projection_steps: cfg.projection_steps,
        };
        let recommended = Knobs {
            steps: manifest.default_steps,
            self_ensemble: manifest.self_ensemble,
            tile: manifest.tile.and_then(|t| u32::try_from(t).ok()),
            projection_steps: manifest.projection_steps,
        };
        let settings = profile::resolve(profile, configured, recommended);
        profile::check_pairing(&settings, inputs).map_err(BackendError::Load)?;
        let default_steps = settings.steps;
        if default_steps > MAX_SAMPLING_STEPS {
            return Err(BackendError::Load(format!(
                "the weights' manifest asks for {default_steps} default steps; at most {MAX_SAMPLING_STEPS} are allowed"
            )));
        }
        let (self_ensemble, tile, projection_steps) = (
            settings.self_ensemble,
            i64::from(settings.tile),
            settings.projection_steps,
        );
        tracing::info!(
            profile = profile.as_str(),
            configured_profile = ?cfg.profile.map(Profile::as_str),
            inputs = manifest.inputs().as_str(),
            default_steps,
            self_ensemble,
            tile,
            projection_steps,
            configured = ?configured,
            manifest = ?recommended,
            "hndsr serving settings (configuration, else the profile; quality's are the weights' manifest)"
        );
        let info = BackendInfo {
            backend: "hndsr".to_owned(),
            model: format!("{}-{}", manifest.model, manifest.version),
            model_digest: model.digest().to_owned(),
            device: hndsr_torch::device_name(device),
            precision: precision.as_str().to_owned(),
            scales: vec![scale],
            profile: Some(profile.as_str().to_owned()),
            default_steps,
            self_ensemble,
            tile: u32::try_from(tile).ok(),
            projection_steps,
            batch_tiles: cfg.batch_tiles.unwrap_or(if device.is_cuda() {
                CUDA_BATCH_TILES
            } else {
                0
            }),
        };
        let model = model
            .with_self_ensemble(self_ensemble)
            .with_tile(tile)
            .and_then(|m| m.with_projection_steps(projection_steps))
            .map_err(|e| load_error(&e))?;
        let tiles = model.tiles();
        let passes: Arc<OnceLock<prometheus::Histogram>> = Arc::new(OnceLock::new());
        let observed = Arc::clone(&passes);
        let batcher = TileBatcher::new(
            info.batch_tiles,
            cfg.batch_wait,
            Some(Box::new(move |n| {
                if let Some(h) = observed.get() {
                    #[allow(clippy::cast_precision_loss)]
                    h.observe(n as f64);
                }
            })),
        );
        let backend = Self {
            source,
            idle: Mutex::new(vec![model]),
            info,
            tiles,
            torch_threads: cfg.torch_threads,
            batcher,
            passes,
        };
        // One replica per inference thread, loaded (and digest-checked)
        // before `/readyz` can turn true: a request never pays for a load,
        // and a load that fails (device memory, weights changed on the
        // volume) stops the start-up instead of failing requests later.
        for _ in 1..cfg.replicas.get() {
            let replica = backend.load_replica()?;
            backend.checkin(replica);
        }
        Ok(backend)
    }

    fn load_replica(&self) -> Result<HndsrModel, BackendError> {
        self.source
            .load()?
            .with_self_ensemble(self.info.self_ensemble)
            .with_tiles(self.tiles)
            .and_then(|m| m.with_projection_steps(self.info.projection_steps))
            .map_err(|e| load_error(&e))
    }

    fn checkout(&self) -> Result<HndsrModel, BackendError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(model) => Ok(model),
            // Not reached while replicas = MAX_CONCURRENT; kept so a pool
            // that ever runs short loads rather than fails.
            None => self.load_replica(),
        }
    }

    fn checkin(&self, model: HndsrModel) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(model);
    }
}

impl Backend for TorchHndsr {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn init_thread(&self) {
        set_torch_threads(self.torch_threads);
        use_own_stream(self.source.device);
    }

    fn attach_metrics(&self, metrics: &crate::metrics::Metrics) {
        let _ = self.passes.set(metrics.batch_tiles.clone());
    }

    fn work(&self, width: u32, height: u32, scale: u32, steps: Option<u32>) -> u64 {
        // One regression pass, then one denoiser pass per DDIM step (about
        // as costly per pixel): a request at 20 steps on a 0-step profile
        // is not estimated as one pass.
        let passes = 1 + u64::from(steps.unwrap_or(self.info.default_steps));
        tiled_work(&self.tiles, width, height, scale).saturating_mul(passes)
    }

    fn warm_up(&self) -> Result<(), BackendError> {
        warm_up(self, 32, self.info.scales[0])
    }

    fn upscale(&self, job: &Job, cancel: &CancellationToken) -> Result<Planar, BackendError> {
        check_scale(&self.info, job.scale)?;
        let input = timed_to_tensor(&job.image)?;
        let steps = job.steps.unwrap_or(self.info.default_steps);
        let model = self.checkout()?;
        let token = cancel.clone();
        let runner = self.batcher.runner(Arc::new(move || token.is_cancelled()));
        let output =
            model.upscale_image_via(&input, steps, job.seed, &|| cancel.is_cancelled(), &runner);
        self.checkin(model);
        timed_from_tensor(&output.map_err(backend_error)?, job.image.channels)
    }
}

/// Output pixels the tiles of a `width`×`height` image compute at `scale`
/// (overlaps counted twice), by the same rules as `run_tiled`.
fn tiled_work(tiles: &TileConfig, width: u32, height: u32, scale: u32) -> u64 {
    let axis = |len: u32| {
        let len = i64::from(len);
        let t = hndsr_torch::tiling::axis_tile(len, tiles.tile, tiles.overlap);
        let n = i64::try_from(hndsr_torch::tiling::tile_starts(len, t, tiles.overlap).len())
            .unwrap_or(i64::MAX);
        u64::try_from(n.saturating_mul(t)).unwrap_or(u64::MAX)
    };
    axis(width)
        .saturating_mul(axis(height))
        .saturating_mul(u64::from(scale) * u64::from(scale))
}

/// Sets the calling thread's libtorch intra-op thread count (OpenMP keeps
/// it per thread, so every inference thread sets its own).
fn set_torch_threads(n: NonZeroUsize) {
    hndsr_torch::tch::set_num_threads(i32::try_from(n.get()).unwrap_or(i32::MAX));
}

/// Gives the calling inference thread a CUDA stream of its own, so the
/// threads' kernels and copies do not queue behind each other (nothing to do
/// on the CPU). Should libtorch refuse, the thread stays on the default
/// stream: slower, still correct.
fn use_own_stream(device: Device) {
    match hndsr_torch::stream::use_own_stream(device) {
        Ok(Some(stream)) => tracing::debug!(%stream, "inference thread on its own CUDA stream"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "inference thread stays on the default CUDA stream"),
    }
}

/// Runs one small grey RGB image through `backend` at its default steps.
fn warm_up(backend: &dyn Backend, side: u32, scale: u32) -> Result<(), BackendError> {
    let n = 3 * side as usize * side as usize;
    let job = Job {
        image: Planar {
            channels: 3,
            width: side,
            height: side,
            data: vec![0.5; n],
        },
        scale,
        steps: None,
        seed: 0,
    };
    backend.upscale(&job, &CancellationToken::new()).map(drop)
}

/// Refuses a factor the backend does not offer.
fn check_scale(info: &BackendInfo, scale: u32) -> Result<(), BackendError> {
    if info.scales.contains(&scale) {
        return Ok(());
    }
    Err(BackendError::InvalidInput(format!(
        "scale {scale} is not supported by the {} backend (supported: {:?})",
        info.backend, info.scales
    )))
}

/// Loading errors become [`BackendError::Load`] with the model's message,
/// but a device lost while loading is a lost device (`/healthz` fails).
fn load_error(e: &HndsrError) -> BackendError {
    let message = format!("loading the hndsr model: {e}");
    match e {
        HndsrError::Torch(TorchError::DeviceLost { .. }) => BackendError::DeviceLost(message),
        _ => BackendError::Load(message),
    }
}

/// Maps the torch crate's errors onto the server's classes.
fn backend_error(e: TorchError) -> BackendError {
    match e {
        TorchError::Cancelled => BackendError::Cancelled,
        TorchError::OutOfMemory { .. } => BackendError::OutOfMemory(e.to_string()),
        TorchError::DeviceLost { .. } => BackendError::DeviceLost(e.to_string()),
        TorchError::InvalidInput(msg) => BackendError::InvalidInput(msg),
        TorchError::InvalidDevice { .. } | TorchError::CudaUnavailable { .. } => {
            BackendError::Load(e.to_string())
        }
        TorchError::InvalidTiling(_) | TorchError::Internal(_) | TorchError::Torch { .. } => {
            BackendError::Internal(e.to_string())
        }
    }
}

/// [`planar_to_tensor`], its thread CPU time recorded for the stage metrics.
fn timed_to_tensor(image: &Planar) -> Result<Tensor, BackendError> {
    let started = cpu_time::ThreadTime::now();
    let t = planar_to_tensor(image);
    super::record_conversions(started.elapsed(), std::time::Duration::ZERO);
    t
}

/// [`tensor_to_planar`], its thread CPU time recorded for the stage metrics.
fn timed_from_tensor(t: &Tensor, channels: u8) -> Result<Planar, BackendError> {
    let started = cpu_time::ThreadTime::now();
    let p = tensor_to_planar(t, channels);
    super::record_conversions(std::time::Duration::ZERO, started.elapsed());
    p
}

/// Planar CHW samples → a `[1, C, H, W]` f32 tensor (copied).
fn planar_to_tensor(image: &Planar) -> Result<Tensor, BackendError> {
    if !(1..=4).contains(&image.channels) {
        return Err(BackendError::InvalidInput(format!(
            "{} channels; 1 to 4 are supported",
            image.channels
        )));
    }
    let (c, h, w) = (
        usize::from(image.channels),
        image.height as usize,
        image.width as usize,
    );
    if h == 0 || w == 0 {
        return Err(BackendError::InvalidInput("empty image".to_owned()));
    }
    if image.data.len() != c * h * w {
        return Err(BackendError::InvalidInput(format!(
            "{} samples for a {c}x{h}x{w} image",
            image.data.len()
        )));
    }
    Tensor::f_from_slice(image.data.as_slice())
        .and_then(|t| t.f_view([1, c as i64, h as i64, w as i64]))
        .map_err(|e| backend_error(TorchError::from_tch("image to tensor", e)))
}

/// A `[1, C, H, W]` tensor → planar CHW samples.
fn tensor_to_planar(t: &Tensor, channels: u8) -> Result<Planar, BackendError> {
    let internal = |what: String| BackendError::Internal(format!("backend output: {what}"));
    let (_, c, h, w) = t
        .size4()
        .map_err(|_| internal(format!("shape {:?}", t.size())))?;
    if c != i64::from(channels) {
        return Err(internal(format!("{c} channels, expected {channels}")));
    }
    let data = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_flatten(0, -1))
        .and_then(|t| Vec::<f32>::try_from(&t))
        .map_err(|e| backend_error(TorchError::from_tch("tensor to image", e)))?;
    let dim = |v: i64| u32::try_from(v).map_err(|_| internal(format!("dimension {v}")));
    Ok(Planar {
        channels,
        width: dim(w)?,
        height: dim(h)?,
        data,
    })
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    #[test]
    fn a_device_lost_while_loading_is_a_lost_device() {
        let lost = HndsrError::Torch(TorchError::DeviceLost {
            op: "synchronize a CUDA stream",
            message: "an illegal memory access was encountered".to_owned(),
        });
        assert_matches!(load_error(&lost), BackendError::DeviceLost(m) if m.contains("illegal memory access"));
        let other = HndsrError::Config("no such block".to_owned());
        assert_matches!(load_error(&other), BackendError::Load(m) if m.contains("no such block"));
    }

    fn cfg() -> ModelConfig {
        ModelConfig {
            backend: BackendKind::Bicubic,
            scale: 4,
            device: "cpu".to_owned(),
            weights_path: None,
            weights_sha256: None,
            profile: None,
            sampling_steps: Some(20),
            self_ensemble: None,
            tile: None,
            projection_steps: None,
            precision: None,
            torch_threads: NonZeroUsize::MIN,
            replicas: NonZeroUsize::MIN,
            batch_tiles: None,
            batch_wait: std::time::Duration::from_millis(2),
        }
    }

    fn image(channels: u8, width: u32, height: u32) -> Planar {
        let n = usize::from(channels) * width as usize * height as usize;
        let data = (0..n).map(|i| (i % 97) as f32 / 96.0).collect();
        Planar {
            channels,
            width,
            height,
            data,
        }
    }

    fn job(image: Planar, scale: u32) -> Job {
        Job {
            image,
            scale,
            steps: None,
            seed: 0,
        }
    }

    #[test]
    fn info_describes_the_bicubic_backend() {
        let backend = build(&cfg()).expect("bicubic on cpu");
        let info = backend.info();
        assert_eq!(info.backend, "bicubic");
        assert_eq!(info.model, "bicubic");
        assert_eq!(info.device, "cpu");
        assert_eq!(info.precision, "fp32");
        assert_eq!(info.scales, vec![2, 3, 4, 8]);
        assert_eq!(
            info.model_digest,
            hex::encode(Sha256::digest(b"bicubic-v1"))
        );
        backend.warm_up().expect("warm-up");
    }

    #[test]
    fn each_inference_thread_gets_the_configured_libtorch_thread_count() {
        let backend = build(&ModelConfig {
            torch_threads: NonZeroUsize::new(3).unwrap(),
            ..cfg()
        })
        .expect("bicubic on cpu");
        for _ in 0..2 {
            let backend = Arc::clone(&backend);
            let threads = std::thread::spawn(move || {
                backend.init_thread();
                hndsr_torch::tch::get_num_threads()
            })
            .join()
            .unwrap();
            assert_eq!(threads, 3);
        }
    }

    /// Tiny random weights in `dir`, and an hndsr configuration for them.
    fn tiny_hndsr(dir: &std::path::Path) -> ModelConfig {
        use hndsr_torch::hndsr::{HndsrConfig, Manifest};
        let path = dir.join("tiny.safetensors");
        let tiny = HndsrConfig::tiny();
        let model = HndsrModel::random(&tiny, Device::Cpu, 3).unwrap();
        let manifest = model
            .save(&path, Manifest::untrained(&tiny, model.parameter_count()))
            .unwrap();
        ModelConfig {
            backend: BackendKind::Hndsr,
            weights_path: Some(path),
            weights_sha256: Some(manifest.sha256),
            ..cfg()
        }
    }

    #[test]
    fn tiled_work_counts_the_overlapping_tiles() {
        let tiles = hndsr_torch::hndsr::tiles_for(256, Device::Cpu);
        // One tile up to 256 + overlap; beyond, overlapping 256² tiles.
        assert_eq!(tiled_work(&tiles, 256, 256, 4), 1024 * 1024);
        assert_eq!(tiled_work(&tiles, 200, 100, 4), 800 * 400);
        let big = tiled_work(&tiles, 512, 512, 4);
        assert!(big > 4 * 1024 * 1024, "overlaps are work too: {big}");
        let small = hndsr_torch::hndsr::tiles_for(24, Device::Cpu);
        assert!(
            tiled_work(&small, 256, 256, 4) > 2 * 1024 * 1024,
            "24² tiles overlap a lot"
        );
    }

    #[test]
    fn diffusion_steps_are_work_too() {
        let dir = tempfile::tempdir().unwrap();
        let backend = TorchHndsr::new(&tiny_hndsr(dir.path())).expect("tiny weights");
        let one_pass = backend.work(64, 64, 4, Some(0));
        assert_eq!(one_pass, 256 * 256, "one tile, one pass");
        assert_eq!(backend.work(64, 64, 4, Some(3)), 4 * one_pass);
        assert_eq!(
            backend.work(64, 64, 4, None),
            21 * one_pass,
            "the configured default: 20 steps"
        );
    }

    #[test]
    fn every_inference_thread_has_a_model_replica_before_serving() {
        let dir = tempfile::tempdir().unwrap();
        let hndsr = |replicas: usize| ModelConfig {
            replicas: NonZeroUsize::new(replicas).unwrap(),
            ..tiny_hndsr(dir.path())
        };
        let backend = TorchHndsr::new(&hndsr(3)).expect("tiny weights");
        assert_eq!(backend.idle.lock().unwrap().len(), 3);
        let one = TorchHndsr::new(&hndsr(1)).expect("tiny weights");
        assert_eq!(one.idle.lock().unwrap().len(), 1);
    }

    #[test]
    fn hndsr_refuses_reduced_precision_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        for precision in ["fp16", "bf16"] {
            let err = TorchHndsr::new(&ModelConfig {
                precision: Some(precision.to_owned()),
                ..tiny_hndsr(dir.path())
            })
            .expect_err("refused");
            assert_matches!(&err, BackendError::Load(msg) if msg.contains("needs a CUDA device"), "{err}");
        }
    }

    #[test]
    fn hndsr_without_weights_is_refused_clearly() {
        let err = build(&ModelConfig {
            backend: BackendKind::Hndsr,
            ..cfg()
        })
        .err()
        .expect("refused");
        assert_matches!(&err, BackendError::Load(msg) if msg.contains("weights path"));
    }

    #[test]
    fn unusable_settings_fail_to_load() {
        for bad in [
            ModelConfig {
                precision: Some("fp16".to_owned()),
                ..cfg()
            },
            ModelConfig { scale: 5, ..cfg() },
            ModelConfig {
                device: "cuda:99".to_owned(),
                ..cfg()
            },
        ] {
            assert_matches!(build(&bad).err(), Some(BackendError::Load(_)), "{bad:?}");
        }
    }

    #[test]
    fn upscales_every_channel_count() {
        let backend = TorchBicubic::new(&cfg()).expect("backend");
        for channels in 1..=4 {
            let out = backend
                .upscale(&job(image(channels, 7, 5), 3), &CancellationToken::new())
                .expect("upscale");
            assert_eq!((out.channels, out.width, out.height), (channels, 21, 15));
            assert_eq!(out.data.len(), usize::from(channels) * 21 * 15);
            assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let backend = TorchBicubic::new(&cfg()).expect("backend");
        let flat = Planar {
            channels: 2,
            width: 9,
            height: 4,
            data: vec![0.25; 2 * 9 * 4],
        };
        let out = backend
            .upscale(&job(flat, 8), &CancellationToken::new())
            .expect("upscale");
        assert!(out.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn cancelled_jobs_stop() {
        let backend = TorchBicubic::new(&cfg()).expect("backend");
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert_matches!(
            backend.upscale(&job(image(3, 8, 8), 2), &cancel),
            Err(BackendError::Cancelled)
        );
    }

    #[test]
    fn bad_jobs_are_invalid_input() {
        let backend = TorchBicubic::new(&cfg()).expect("backend");
        let token = CancellationToken::new();
        assert_matches!(
            backend.upscale(&job(image(3, 8, 8), 5), &token),
            Err(BackendError::InvalidInput(_))
        );
        let mut short = image(3, 8, 8);
        short.data.pop();
        assert_matches!(
            backend.upscale(&job(short, 2), &token),
            Err(BackendError::InvalidInput(_))
        );
        assert_matches!(
            backend.upscale(&job(image(5, 2, 2), 2), &token),
            Err(BackendError::InvalidInput(_))
        );
    }
}

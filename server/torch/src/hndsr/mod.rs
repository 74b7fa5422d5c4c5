//! HNDSR: a neural-operator regressor with a residual diffusion refiner.
//!
//! - [`config`]: network shapes (`tiny`, `small`, `base` presets).
//! - [`spectral`]: the Fourier layer (fp32 FFTs, grid-size-independent weights).
//! - [`net`]: encoder, pixel-shuffle decoder (→ μ) and the residual U-Net.
//! - [`diffusion`]: cosine schedule, seeded host noise, DDIM (η = 0).
//! - [`manifest`]: the JSON that travels with a weight file (config, sha256,
//!   training data and command, evaluation figures).
//!
//! [`HndsrModel`] is the inference entry point the server's `hndsr` backend
//! wraps: load (digest-checked) → `upscale_image` (tiled, cancellable) or
//! `upscale` (one batch of tiles). `steps = 0` returns the regression output
//! μ; `steps > 0` adds the denoised residual after that many DDIM steps.
//!
//! Determinism: the initial noise of each tile comes from SplitMix64 seeded
//! with `seed` mixed with a hash of the tile's input samples, so a tile's
//! output does not depend on which batch it is in or where it sits in it,
//! and every device draws the same noise for a seed.
//!
//! Threading: the model holds tensors, so it is `Send` but not `Sync`; run
//! it on one inference thread (or behind a mutex). Each call takes a no-grad
//! guard on the calling thread.

mod batched;
pub mod config;
pub mod diffusion;
pub mod manifest;
pub mod net;
pub mod residual;
pub mod spectral;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::{fmt, fs};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, TchError, Tensor, nn};

use crate::error::{TchResultExt, TorchError};
use crate::tiling::{TileConfig, run_tiled};

pub use batched::{Batched, PassObserver, TileBatcher};
pub use config::{Encoder, HndsrConfig, Prediction, ResidualNorm};
pub use manifest::{EvalFigure, Inputs, Manifest, TrainingInfo, manifest_path};
pub use net::{HndsrNet, SelfEnsemble};

/// LR tile edge of [`default_tiles`]: a 256² input is one tile (→ 1024² at
/// ×4) instead of nine overlapping 128² ones (measured through the server:
/// half the latency), and larger tiles waste less on overlaps.
pub const DEFAULT_TILE: i64 = 256;

/// Smallest LR tile edge a manifest or a server may ask for: below it the
/// 10-pixel overlap of [`tiles_for`] would be most of every tile.
pub const MIN_TILE: i64 = 16;

/// Largest LR tile edge a manifest or a server may ask for (4096² HR at ×4).
pub const MAX_TILE: i64 = 1024;

/// Most conjugate-gradient steps a manifest or a server may ask the
/// LR-consistency projection for ([`HndsrModel::with_projection_steps`]).
pub const MAX_PROJECTION_STEPS: u32 = 100;

/// Checks a refiner strength asked for by a manifest or a caller: the share
/// of the sampled residual added to μ, in (0, 1].
pub fn check_refiner_strength(strength: f64) -> Result<(), String> {
    if strength > 0.0 && strength <= 1.0 {
        Ok(())
    } else {
        Err(format!("refiner strength {strength} is outside (0, 1]"))
    }
}

/// Checks a projection step count asked for by a manifest or a server.
pub fn check_projection_steps(steps: u32) -> Result<(), String> {
    if steps <= MAX_PROJECTION_STEPS {
        Ok(())
    } else {
        Err(format!(
            "projection steps {steps} is above the maximum of {MAX_PROJECTION_STEPS}"
        ))
    }
}

/// Pixels at each shared tile edge whose output [`tiles_for`] drops: the
/// tile borders, where the reflect padding differs from the real
/// neighbourhood.
const TILE_MARGIN: i64 = 4;

/// LR pixels per model call: tiles are batched up to this area, 4 tiles of
/// 256² on CUDA. On the CPU, one 256² tile per call (batching large tiles
/// costs time there, docs/benchmarks.md) but small tiles go in batches of
/// about 128², which saves the per-call overhead of many small ones.
const CUDA_BATCH_PIXELS: i64 = 4 * 256 * 256;
const CPU_BATCH_PIXELS: i64 = 128 * 128;

/// Tiling on `device` for tiles of `edge` LR pixels: overlap 10 (the least
/// that leaves room to cross-fade past two 4-pixel margins) or edge / 16,
/// whichever is larger, and as many tiles per model call as fit the
/// device's batch area. The Fourier layers see the whole tile, so tiled
/// output is close to but not exactly the whole-image output, and the tile
/// edge is a quality setting: the layers keep a fixed number of modes, which
/// span the frequencies the network was trained on only when the tile is
/// the size of the training crops (a manifest's `tile`;
/// docs/model-log.md#tile-size).
#[must_use]
pub fn tiles_for(edge: i64, device: Device) -> TileConfig {
    let budget = if device.is_cuda() {
        CUDA_BATCH_PIXELS
    } else {
        CPU_BATCH_PIXELS
    };
    TileConfig {
        tile: edge,
        overlap: (2 * TILE_MARGIN + 2).max(edge / 16),
        margin: TILE_MARGIN,
        batch: usize::try_from(budget / (edge * edge).max(1))
            .unwrap_or(1)
            .max(1),
    }
}

/// Default tiling on `device`: [`tiles_for`] [`DEFAULT_TILE`] (overlap 16,
/// margin 4; batches of 4 on CUDA, 1 on the CPU).
#[must_use]
pub fn default_tiles(device: Device) -> TileConfig {
    tiles_for(DEFAULT_TILE, device)
}

/// Checks a tile edge asked for by a manifest or a server.
pub fn check_tile(edge: i64) -> Result<(), String> {
    if (MIN_TILE..=MAX_TILE).contains(&edge) {
        Ok(())
    } else {
        Err(format!(
            "tile edge {edge} is outside [{MIN_TILE}, {MAX_TILE}] LR pixels"
        ))
    }
}

/// Numeric precision of the convolutions. FFTs always run in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit float everywhere (the only choice on CPU).
    Fp32,
    /// fp16 weights and activations on CUDA, fp32 spectral weights and FFTs.
    Fp16,
    /// bf16 weights and activations on CUDA, fp32 spectral weights and FFTs.
    Bf16,
}

impl Precision {
    /// The tensor kind of activations.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// `fp32`, `fp16` or `bf16`, as `/v1/info` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = HndsrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            "bf16" => Ok(Precision::Bf16),
            other => Err(HndsrError::Config(format!(
                "unknown precision {other:?}: expected fp32, fp16 or bf16"
            ))),
        }
    }
}

/// Why loading or saving a model failed. Inference errors are
/// [`TorchError`]s, the crate's runtime error.
#[derive(Debug, thiserror::Error)]
pub enum HndsrError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is missing a field, malformed, or inconsistent.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The weights' sha256 is not the one asked for (or the manifest's).
    #[error("weights {path}: sha256 is {actual}, expected {expected}")]
    DigestMismatch {
        /// The weight file.
        path: PathBuf,
        /// The digest that was required.
        expected: String,
        /// The digest of the file's bytes.
        actual: String,
    },
    /// The weight file does not fit the network (names, shapes, dtypes).
    #[error("weights {path}: {message}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// An invalid configuration or precision / device combination.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A libtorch failure.
    #[error(transparent)]
    Torch(#[from] TorchError),
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Number of scalar parameters in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
}

/// Parameters of the regression path (encoder and decoder, without the
/// diffusion denoiser): the figure to compare with super-resolution
/// networks from the literature.
pub fn regression_parameter_count(vs: &nn::VarStore) -> i64 {
    vs.variables()
        .iter()
        .filter(|(name, _)| name.starts_with("encoder.") || name.starts_with("decoder."))
        .map(|(_, t)| t.numel())
        .sum::<usize>() as i64
}

/// Runs `f` and turns a tch panic (tch's infallible ops panic on libtorch
/// errors) into a classified [`TorchError`], so out-of-memory stays
/// recoverable for the server.
fn guarded<T>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, TorchError>,
) -> Result<T, TorchError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic without message".to_owned());
            Err(TorchError::from_tch(op, TchError::Torch(message)))
        }
    }
}

/// A loaded HNDSR network bound to one device and precision.
#[derive(Debug)]
pub struct HndsrModel {
    vs: nn::VarStore,
    net: HndsrNet,
    manifest: Manifest,
    precision: Precision,
    tiles: TileConfig,
    self_ensemble: bool,
    projection_steps: u32,
    refiner_strength: f64,
}

impl HndsrModel {
    /// A randomly initialised model (tests, training from scratch).
    /// `seed` seeds libtorch's global generator for the initialisation.
    pub fn random(cfg: &HndsrConfig, device: Device, seed: u64) -> Result<Self, HndsrError> {
        cfg.validate().map_err(HndsrError::Config)?;
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let net = HndsrNet::new(&vs.root(), cfg);
        let manifest = Manifest::untrained(cfg, parameter_count(&vs));
        Ok(Self {
            vs,
            net,
            manifest,
            precision: Precision::Fp32,
            tiles: default_tiles(device),
            self_ensemble: false,
            projection_steps: 0,
            refiner_strength: 1.0,
        })
    }

    /// Loads `weights` (a `.safetensors` file) and the manifest next to it
    /// ([`manifest_path`]). Refuses the weights unless their sha256 equals
    /// both `expected_sha256` (hex, case-insensitive) and the manifest's.
    /// The bytes that were hashed are the bytes that are loaded.
    /// fp16 / bf16 run on any device; on the CPU they are slower than fp32
    /// (the server refuses them there) and serve to measure their quality.
    pub fn load(
        weights: &Path,
        expected_sha256: &str,
        device: Device,
        precision: Precision,
    ) -> Result<Self, HndsrError> {
        let bytes = fs::read(weights).map_err(|source| HndsrError::Io {
            op: "read",
            path: weights.to_owned(),
            source,
        })?;
        let actual = sha256_hex(&bytes);
        let expected = expected_sha256.trim().to_ascii_lowercase();
        if actual != expected {
            return Err(HndsrError::DigestMismatch {
                path: weights.to_owned(),
                expected,
                actual,
            });
        }
        let manifest = Manifest::read(&manifest_path(weights))?;
        if manifest.sha256.to_ascii_lowercase() != actual {
            return Err(HndsrError::DigestMismatch {
                path: weights.to_owned(),
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        manifest.config.validate().map_err(HndsrError::Config)?;

        let mut vs = nn::VarStore::new(device);
        let net = HndsrNet::new(&vs.root(), &manifest.config);
        load_weights_from_bytes(&vs, &bytes, weights)?;
        cast_keeping_spectral(&mut vs, precision);
        // A replica goes back to a pool that other inference threads, on
        // other CUDA streams, borrow from: its weights are finished first.
        crate::stream::synchronize(device)?;
        let refiner_strength = manifest.refiner_strength.unwrap_or(1.0);
        Ok(Self {
            vs,
            net,
            manifest,
            precision,
            tiles: default_tiles(device),
            self_ensemble: false,
            projection_steps: 0,
            refiner_strength,
        })
    }

    /// Saves the weights (fp32 safetensors) to `weights` and `manifest`
    /// (with its `sha256`, `weights` and `config` fields filled in) next to
    /// them. Returns the written manifest.
    pub fn save(&self, weights: &Path, manifest: Manifest) -> Result<Manifest, HndsrError> {
        if self.precision != Precision::Fp32 {
            return Err(HndsrError::Config("save an fp32 model".into()));
        }
        save_weights(&self.vs, self.net.config(), weights, manifest)
    }

    /// Replaces the tiling used by [`HndsrModel::upscale_image`].
    pub fn with_tiles(mut self, tiles: TileConfig) -> Result<Self, HndsrError> {
        tiles.validate()?;
        self.tiles = tiles;
        Ok(self)
    }

    /// Cuts images into tiles of `edge` LR pixels: [`tiles_for`] on the
    /// model's device.
    pub fn with_tile(self, edge: i64) -> Result<Self, HndsrError> {
        check_tile(edge).map_err(HndsrError::Config)?;
        let tiles = tiles_for(edge, self.device());
        self.with_tiles(tiles)
    }

    /// Computes μ as the mean over the 8 flips / 90° rotations of the input
    /// (geometric self-ensemble, see [`HndsrNet::regress_self_ensemble`]):
    /// 8× the regression work, for every step count.
    #[must_use]
    pub fn with_self_ensemble(mut self, on: bool) -> Self {
        self.self_ensemble = on;
        self
    }

    /// Whether μ is a self-ensemble.
    pub fn self_ensemble(&self) -> bool {
        self.self_ensemble
    }

    /// Projects every upscaled image onto the images that degrade exactly
    /// to its input ([`crate::consistency::project`]) with `steps`
    /// conjugate-gradient steps (0 = off, at most
    /// [`MAX_PROJECTION_STEPS`]): the output then agrees with the input in
    /// the band the input carries. On the whole image, on the CPU, after
    /// the tiles are blended.
    pub fn with_projection_steps(mut self, steps: u32) -> Result<Self, HndsrError> {
        check_projection_steps(steps).map_err(HndsrError::Config)?;
        self.projection_steps = steps;
        Ok(self)
    }

    /// Conjugate-gradient steps of the LR-consistency projection (0 = off).
    pub fn projection_steps(&self) -> u32 {
        self.projection_steps
    }

    /// Adds `strength` × the sampled residual to μ at `steps > 0`, in
    /// (0, 1]. Loaded models start at their manifest's `refiner_strength`
    /// (1 where it has none).
    pub fn with_refiner_strength(mut self, strength: f64) -> Result<Self, HndsrError> {
        check_refiner_strength(strength).map_err(HndsrError::Config)?;
        self.refiner_strength = strength;
        Ok(self)
    }

    /// Share of the sampled residual added to μ at `steps > 0`.
    pub fn refiner_strength(&self) -> f64 {
        self.refiner_strength
    }

    /// Changes the tiling used by [`HndsrModel::upscale_image`] in place.
    pub fn set_tiles(&mut self, tiles: TileConfig) -> Result<(), HndsrError> {
        tiles.validate()?;
        self.tiles = tiles;
        Ok(())
    }

    /// The network configuration.
    pub fn config(&self) -> &HndsrConfig {
        self.net.config()
    }

    /// The manifest the weights came with.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// sha256 of the weight file (`"untrained"` for a random model).
    pub fn digest(&self) -> &str {
        &self.manifest.sha256
    }

    /// The fixed upscaling factor.
    pub fn scale(&self) -> i64 {
        self.net.config().scale
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The precision of the convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The tiling used by [`HndsrModel::upscale_image`].
    pub fn tiles(&self) -> TileConfig {
        self.tiles
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> i64 {
        parameter_count(&self.vs)
    }

    /// The network, for callers that need the raw passes (evaluation).
    pub fn net(&self) -> &HndsrNet {
        &self.net
    }

    /// The variables (training, tests).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Upscales one batch of tiles: `batch` is `[B, 3, h, w]` f32 in [0, 1]
    /// (any device); returns `[B, 3, s·h, s·w]` f32 in [0, 1] on the model's
    /// device. `steps = 0` returns μ. `cancel` is called before each DDIM
    /// step; when it returns true the call returns
    /// [`TorchError::Cancelled`] without running another step.
    pub fn upscale(
        &self,
        batch: &Tensor,
        steps: u32,
        seed: u64,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError> {
        let cfg = self.net.config();
        match batch.size4() {
            Ok((b, c, h, w)) if b >= 1 && c == cfg.channels && h >= 1 && w >= 1 => {}
            _ => {
                return Err(TorchError::InvalidInput(format!(
                    "expected [B, {}, H, W], got {:?}",
                    cfg.channels,
                    batch.size()
                )));
            }
        }
        if batch.kind() != Kind::Float {
            return Err(TorchError::InvalidInput(format!(
                "expected f32 samples, got {:?}",
                batch.kind()
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let x = batch
            .f_to_device(self.device())
            .op("copy tiles to device")?;
        // Per-tile noise seeds, from the input samples (before any cast).
        let seeds: Vec<u64> = if steps > 0 {
            guarded("hash tiles", || {
                Ok((0..x.size()[0])
                    .map(|i| mix(seed, diffusion::content_hash_on(&x.get(i))))
                    .collect())
            })?
        } else {
            Vec::new()
        };
        guarded("hndsr forward", || {
            let x = x.to_kind(self.precision.kind());
            // The denoiser is conditioned on one pass's own μ and features
            // (what it trained on); its residual is added to the served μ.
            let (mu, conditioning) = if self.self_ensemble {
                let e = self
                    .net
                    .regress_self_ensemble_checked(&x, cancel)
                    .ok_or(TorchError::Cancelled)?;
                (e.mean, (e.identity, e.features))
            } else {
                let (mu, features) = self.net.regress(&x);
                (mu.shallow_clone(), (mu, features))
            };
            let y = if steps == 0 {
                mu
            } else {
                let (mu_pass, features) = conditioning;
                let residual = self.sample_residual(&mu_pass, &features, steps, &seeds, cancel)?;
                mu + residual * self.refiner_strength
            };
            Ok(y.to_kind(Kind::Float).clamp(0.0, 1.0))
        })
    }

    /// DDIM to the residual `HR − μ` (on the HR grid), from `σ(start)·ε`
    /// at the config's `start_time`: a zero residual (μ itself) under
    /// that much noise. `mu` and `features` come from one regression pass.
    fn sample_residual(
        &self,
        mu: &Tensor,
        features: &Tensor,
        steps: u32,
        seeds: &[u64],
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError> {
        let cfg = self.net.config();
        let cond = self.net.condition(mu, features);
        let (b, _, h, w) = features.size4().expect("features are NCHW");
        let c = cfg.unshuffled_channels();
        let per_tile = (c * h * w) as usize;
        let noise: Vec<Tensor> = seeds
            .iter()
            .map(|&s| diffusion::normal_noise_on(s, per_tile, mu.device()).view([1, c, h, w]))
            .collect();
        let (_, sigma) = diffusion::alpha_sigma(cfg.start_time);
        let x = Tensor::cat(&noise, 0)
            .to_device(mu.device())
            .to_kind(Kind::Float)
            * sigma;
        let x = diffusion::ddim(x, cfg.start_time, steps, cfg.prediction, cancel, |x, t| {
            let t_batch = Tensor::full([b], t, (Kind::Float, mu.device()));
            self.net
                .denoise(&x.to_kind(cond.kind()), &t_batch, &cond)
                .to_kind(Kind::Float)
        })
        .ok_or(TorchError::Cancelled)?;
        Ok(residual::decode(cfg, &x, mu).to_kind(mu.kind()))
    }

    /// Upscales one image `[1, C, H, W]` (C = 1 gray, 2 gray+alpha, 3 RGB,
    /// 4 RGBA; f32 in [0, 1], any device) through overlapping tiles, batched
    /// [`TileConfig::batch`] at a time. Gray is run as three equal channels
    /// and averaged back; alpha is upscaled bicubically; with
    /// [`HndsrModel::with_projection_steps`] the colour is then projected
    /// onto the images that degrade to the input. Returns
    /// `[1, C, s·H, s·W]` f32 in [0, 1] on the CPU. `cancel` is checked
    /// between tile batches, self-ensemble passes, DDIM steps and
    /// projection steps.
    pub fn upscale_image(
        &self,
        image: &Tensor,
        steps: u32,
        seed: u64,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError> {
        self.upscale_image_via(image, steps, seed, cancel, &Direct)
    }

    /// [`HndsrModel::upscale_image`] with each batch of tiles run by
    /// `runner` (which may merge it with other callers' tiles, see
    /// [`crate::batch`]) instead of by [`HndsrModel::upscale`] directly.
    pub fn upscale_image_via(
        &self,
        image: &Tensor,
        steps: u32,
        seed: u64,
        cancel: &dyn Fn() -> bool,
        runner: &dyn TileRunner,
    ) -> Result<Tensor, TorchError> {
        let (n, c, _, _) = image.size4().map_err(|_| {
            TorchError::InvalidInput(format!("expected NCHW, got {:?}", image.size()))
        })?;
        if n != 1 || !(1..=4).contains(&c) {
            return Err(TorchError::InvalidInput(format!(
                "expected one image with 1-4 channels, got {:?}",
                image.size()
            )));
        }
        if image.kind() != Kind::Float {
            return Err(TorchError::InvalidInput(format!(
                "expected f32 samples, got {:?}",
                image.kind()
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let scale = self.scale();
        let x = image
            .f_to_device(self.device())
            .op("copy image to device")?;
        let colour_channels = if c >= 3 { 3 } else { 1 };
        let colour = x.f_narrow(1, 0, colour_channels).op("split alpha")?;
        let rgb = if colour_channels == 1 {
            colour.f_expand([1, 3, -1, -1], false).op("gray to rgb")?
        } else {
            colour
        };
        let up = run_tiled(
            &rgb,
            scale,
            &self.tiles,
            |tiles| runner.run(self, tiles, steps, seed, cancel),
            cancel,
        )?;
        let mut up = if colour_channels == 1 {
            up.f_mean_dim(1, true, Kind::Float).op("rgb to gray")?
        } else {
            up
        };
        // Projection and alpha on the model's device, like the blend: the
        // finished image crosses to the host once.
        if self.projection_steps > 0 {
            let input = x.f_narrow(1, 0, colour_channels).op("split colour")?;
            up = crate::consistency::project(&up, &input, scale, self.projection_steps, cancel)?;
        }
        if c == 2 || c == 4 {
            let alpha = x.f_narrow(1, c - 1, 1).op("split alpha")?;
            let alpha = crate::bicubic::upsample_bicubic(&alpha, scale)?
                .f_clamp(0.0, 1.0)
                .op("clamp alpha")?;
            up = Tensor::f_cat(&[&up, &alpha], 1).op("join alpha")?;
        }
        up.f_to_device(Device::Cpu).op("copy output to host")
    }
}

/// Runs one batch of an image's tiles through a model: what
/// [`HndsrModel::upscale_image_via`] calls for each batch.
pub trait TileRunner {
    /// Upscales `tiles` (`[B, 3, h, w]`) as [`HndsrModel::upscale`] does.
    ///
    /// # Errors
    /// As [`HndsrModel::upscale`].
    fn run(
        &self,
        model: &HndsrModel,
        tiles: Tensor,
        steps: u32,
        seed: u64,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError>;
}

/// Runs each batch on the calling model, alone.
#[derive(Debug, Clone, Copy)]
pub struct Direct;

impl TileRunner for Direct {
    fn run(
        &self,
        model: &HndsrModel,
        tiles: Tensor,
        steps: u32,
        seed: u64,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError> {
        model.upscale(&tiles, steps, seed, cancel)
    }
}

/// Combines the request seed and a tile's content hash.
fn mix(seed: u64, content: u64) -> u64 {
    diffusion::SplitMix64::new(seed ^ content.rotate_left(17)).next_u64()
}

/// Writes `vs` to `weights` as fp32 safetensors and the manifest next to it.
pub fn save_weights(
    vs: &nn::VarStore,
    cfg: &HndsrConfig,
    weights: &Path,
    mut manifest: Manifest,
) -> Result<Manifest, HndsrError> {
    if weights.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(HndsrError::Config(format!(
            "weights must be a .safetensors file, got {}",
            weights.display()
        )));
    }
    vs.save(weights)
        .map_err(|e| TorchError::from_tch("save weights", e))?;
    let bytes = fs::read(weights).map_err(|source| HndsrError::Io {
        op: "read back",
        path: weights.to_owned(),
        source,
    })?;
    manifest.sha256 = sha256_hex(&bytes);
    manifest.config = cfg.clone();
    manifest.scale = cfg.scale;
    manifest.parameters = parameter_count(vs);
    manifest.weights = weights
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    manifest.write(&manifest_path(weights))?;
    Ok(manifest)
}

/// Casts every float variable of `vs` to `precision` except the spectral
/// weights, which stay exactly as loaded (fp32; the FFTs run in fp32). The
/// cast rounds every variable, so exact copies of the spectral ones are
/// kept across it.
fn cast_keeping_spectral(vs: &mut nn::VarStore, precision: Precision) {
    let spectral: Vec<(String, Tensor)> = if precision == Precision::Fp32 {
        Vec::new()
    } else {
        vs.variables()
            .into_iter()
            .filter(|(name, _)| name.contains("spectral"))
            .map(|(name, var)| (name, tch::no_grad(|| var.copy())))
            .collect()
    };
    match precision {
        Precision::Fp32 => {}
        Precision::Fp16 => vs.half(),
        Precision::Bf16 => vs.bfloat16(),
    }
    let mut variables = vs.variables();
    for (name, exact) in &spectral {
        if let Some(var) = variables.get_mut(name) {
            tch::no_grad(|| var.set_data(exact));
        }
    }
}

/// Copies every variable of `vs` from the safetensors `bytes`; every
/// variable must be present with its exact shape, as f32.
pub fn load_weights_from_bytes(
    vs: &nn::VarStore,
    bytes: &[u8],
    path: &Path,
) -> Result<(), HndsrError> {
    let bad = |message: String| HndsrError::Weights {
        path: path.to_owned(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    // Every tensor of the file must be a variable of the network the
    // manifest describes: a manifest naming fewer blocks, no local branch or
    // a smaller U-Net than the file holds would otherwise load a truncated
    // network without complaint (its variables all exist in the file).
    let variables = vs.variables();
    let mut extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !variables.contains_key(*n))
        .map(ToOwned::to_owned)
        .collect();
    if !extra.is_empty() {
        extra.sort();
        let shown = extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        return Err(bad(format!(
            "{} tensor(s) the manifest's config has no place for ({shown}{}): the manifest does not describe these weights",
            extra.len(),
            if extra.len() > 5 { ", ..." } else { "" }
        )));
    }
    let _no_grad = tch::no_grad_guard();
    for (name, mut var) in variables {
        let view = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "{name}: dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            return Err(bad(format!(
                "{name}: shape {shape:?}, expected {:?}",
                var.size()
            )));
        }
        let src = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)
            .and_then(|t| t.f_to_device(var.device()))
            .map_err(|e| bad(format!("{name}: {e}")))?;
        var.f_copy_(&src).map_err(|e| bad(format!("{name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_precision_keeps_the_spectral_weights_exact() {
        for precision in [Precision::Fp16, Precision::Bf16] {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let _net = HndsrNet::new(&vs.root(), &HndsrConfig::tiny());
            let before: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .map(|(n, v)| (n, tch::no_grad(|| v.copy())))
                .collect();
            cast_keeping_spectral(&mut vs, precision);
            let after = vs.variables();
            let mut spectral = 0;
            for (name, exact) in &before {
                let var = &after[name];
                if name.contains("spectral") {
                    spectral += 1;
                    assert_eq!(var.kind(), Kind::Float, "{name}");
                    assert!(var.equal(exact), "{name} was rounded by the cast");
                } else {
                    assert_ne!(var.kind(), Kind::Float, "{name} is cast");
                }
            }
            assert!(spectral > 0, "the tiny network has spectral weights");
        }
    }
}

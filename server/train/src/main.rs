//! `hndsr-train`: trains the HNDSR model on CPU or GPU, evaluates it on the
//! held-out regions, and exports weights with their manifest.
//!
//! ```text
//! hndsr-train train  --config small --out ckpt/ --steps 4000 [--resume]
//! hndsr-train eval   --weights ckpt/latest.safetensors --steps 0,4,20,50 --table eval.md
//! hndsr-train report --weights server/models/hndsr.safetensors --split validation
//! hndsr-train export --checkpoint ckpt/ --out server/models/hndsr.safetensors
//! hndsr-train soup   --weights a.safetensors,b.safetensors --out soup.safetensors --version 1.0.0
//! ```

mod bandlimit;
mod bench;
mod data;
mod degrade;
mod grow;
mod linear;
mod metrics;
mod probe;
mod report;
mod soup;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use hndsr_torch::hndsr::diffusion::{self, SplitMix64};
use hndsr_torch::hndsr::net;
use hndsr_torch::hndsr::residual;
use hndsr_torch::hndsr::{
    EvalFigure, HndsrConfig, HndsrModel, HndsrNet, Inputs, MAX_PROJECTION_STEPS, MAX_TILE,
    MIN_TILE, Manifest, Precision, ResidualNorm, TrainingInfo, load_weights_from_bytes,
    manifest_path, parameter_count, regression_parameter_count, save_weights,
};
use hndsr_torch::{consistency, open_device, upsample_bicubic};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

#[derive(Debug, Parser)]
#[command(version, about = "Train and evaluate the HNDSR super-resolution model")]
struct Cli {
    /// libtorch intra-op threads.
    #[arg(long, env = "HNDSR_THREADS", default_value_t = 2, global = true)]
    threads: i32,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, env = "HNDSR_DEVICE", default_value = "cpu", global = true)]
    device: String,
    /// Directory written by server/scripts/fetch-data.sh.
    #[arg(long, env = "HNDSR_DATA", global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train from random crops of the training regions; resumable.
    Train(TrainArgs),
    /// PSNR / SSIM on the held-out regions: bicubic vs the model.
    Eval(EvalArgs),
    /// The model card's quality table: a split, both degradations, the
    /// server's profiles.
    Report(report::ReportArgs),
    /// Copy a checkpoint's weights out with a full manifest.
    Export(ExportArgs),
    /// Average weights of one shape variable by variable (a model soup),
    /// e.g. runs fine-tuned from one parent with different seeds.
    Soup(soup::SoupArgs),
    /// Latency per tile at several DDIM step counts and batch sizes.
    Bench(bench::BenchArgs),
    /// Denoiser error per noise level on the held-out data (x̂₀ from one
    /// noisy residual vs the residual's own energy).
    Probe(probe::ProbeArgs),
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Preset (tiny, small, medium, base, medium-no-spectral, imdn, wide) or a
    /// JSON file with a config.
    #[arg(long, default_value = "small")]
    config: String,
    /// Checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Total optimiser steps (including those of a resumed run).
    #[arg(long, default_value_t = 4000)]
    steps: u64,
    /// Stop (and checkpoint) after this many minutes of this run.
    #[arg(long)]
    minutes: Option<f64>,
    /// Crops per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// HR crop edge (multiple of the scale).
    #[arg(long, default_value_t = 96)]
    crop: i64,
    /// Peak learning rate (AdamW, cosine decay after 100 warm-up steps).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Regression loss: `l1` (robust, the default) or `mse` (what PSNR
    /// measures; for a last low-learning-rate phase).
    #[arg(long, value_enum, default_value_t = Loss::L1)]
    loss: Loss,
    /// Weight of the denoiser loss (0 trains the regression path only).
    #[arg(long, default_value_t = 1.0, value_parser = loss_weight, allow_hyphen_values = true)]
    denoiser_weight: f64,
    /// Weight of an equivariance term: each step also runs μ on the batch
    /// under a random flip / 90° rotation, maps it back and penalises the
    /// mean absolute difference to the plain μ (twice the regression work;
    /// pushes the plain output towards what the self-ensemble averages to).
    #[arg(long, default_value_t = 0.0, value_parser = loss_weight, allow_hyphen_values = true)]
    equivariance: f64,
    /// Train what self-ensembling servers serve: the regression loss is
    /// taken on μ averaged over the 8 flips / 90° rotations of the batch,
    /// each mapped back (8× the regression work per step), so the network
    /// is free to make the eight disagree where their mean gains.
    #[arg(long, conflicts_with_all = ["equivariance", "freeze_regressor"])]
    ensemble_loss: bool,
    /// Training sources and their share of the crops, `name=weight,...`
    /// (aero, bluemarble, landsat, rgbn, oblique1, oblique3, yell_meadow,
    /// yell_road; weights are normalised).
    #[arg(long, default_value = "aero=0.5,bluemarble=0.5")]
    mix: String,
    /// Probability that a crop of a colour source is turned gray (luma,
    /// replicated), so gray inputs like aero's are not rare.
    #[arg(long, default_value_t = 0.0)]
    gray_fraction: f64,
    /// Largest zoom-out factor: a zoomed crop takes up to this many times
    /// the crop's edge from the image and shrinks it (antialiased bicubic),
    /// so textures also appear finer than the photographs hold them
    /// (1 = off).
    #[arg(long, default_value_t = 1.0)]
    zoom_max: f64,
    /// Probability that a crop is zoomed out (with `--zoom-max` > 1).
    #[arg(long, default_value_t = 0.5)]
    zoom_fraction: f64,
    /// Probability that a crop is negated (`1 − crop`; the degradation is
    /// linear, so the pair stays exact).
    #[arg(long, default_value_t = 0.0)]
    negate_fraction: f64,
    /// Probability that a crop's LR input is made by the realistic
    /// degradation (blur, noise, 8 bits, JPEG; `degrade.rs`) instead of
    /// the training one, so the network learns to restore real inputs.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    realistic_fraction: f64,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 250)]
    save_every: u64,
    /// Seed for initialisation, crops and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in `--out` (optimiser moments restart).
    #[arg(long)]
    resume: bool,
    /// Train the denoiser only: μ and the encoder stay fixed (no L1 term).
    #[arg(long)]
    freeze_regressor: bool,
    /// Start the warm-up + cosine learning-rate schedule at this run's
    /// first step instead of step 0.
    #[arg(long)]
    restart_schedule: bool,
    /// Start a new run from these weights (`.safetensors` with its manifest;
    /// the config comes from the manifest), e.g. to fine-tune shipped weights.
    #[arg(long, conflicts_with_all = ["resume", "config"])]
    init: Option<PathBuf>,
    /// With `--init`: grow the network's dense local branches to this many
    /// hidden channels (the new channels start silent, so the output starts
    /// exactly as the initial weights' output).
    #[arg(long, requires = "init")]
    local: Option<i64>,
    /// With `--init`: grow the operator encoder to this many Fourier blocks,
    /// appended after the trained ones and starting as the identity.
    #[arg(long, requires = "init")]
    blocks: Option<i64>,
    /// With `--init`: keep this many Fourier modes per axis (the new, higher
    /// frequencies start at zero, so the output starts exactly as the initial
    /// weights' output).
    #[arg(long, requires = "init")]
    modes: Option<i64>,
    /// With `--init`: start the denoiser from scratch instead of the initial
    /// weights' (e.g. to train a refiner for a final, frozen regressor).
    #[arg(long, requires = "init")]
    fresh_denoiser: bool,
    /// With `--fresh-denoiser`: how the residual is scaled for the denoiser
    /// (`global` or `detail`, per sample; `residual.rs`).
    #[arg(long, value_parser = residual_norm, requires = "fresh_denoiser")]
    residual_norm: Option<ResidualNorm>,
    /// With `--fresh-denoiser`: the residual's scale factor.
    #[arg(long, requires = "fresh_denoiser")]
    residual_scale: Option<f64>,
    /// With `--fresh-denoiser`: where sampling starts on the noise schedule,
    /// in (0, 1] (the denoiser trains on `t ∈ (0, start]`).
    #[arg(long, requires = "fresh_denoiser")]
    start_time: Option<f64>,
    /// Run the cosine decay over this run's wall time (`--minutes`) instead
    /// of its steps, so a run on a machine of unknown speed still ends at the
    /// low learning rate.
    #[arg(long, requires = "minutes")]
    time_schedule: bool,
}

/// The regression path's training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Loss {
    /// Mean absolute error.
    L1,
    /// Mean squared error.
    Mse,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Weights (`.safetensors`, manifest alongside).
    #[arg(long)]
    weights: PathBuf,
    /// DDIM step counts to evaluate.
    #[arg(long, value_delimiter = ',', default_value = "0,4,20,50")]
    steps: Vec<u32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the network's convolutions (the FFTs stay fp32).
    /// fp16 / bf16 also run on the CPU, slowly, which measures the
    /// quality they cost without a GPU.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Write the Markdown table here.
    #[arg(long)]
    table: Option<PathBuf>,
    /// Store the figures in the weights' manifest (needs every source).
    #[arg(long, conflicts_with = "sources")]
    update_manifest: bool,
    /// Evaluate only these sources' held-out sets, e.g. `aero,oblique1`
    /// (default: all of them).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// Also measure steps = 0 through tiles of this many LR pixels, as a
    /// server cuts them (`tiles_for`: overlap 10 or more, margin 4), and
    /// with `--self-ensemble` the self-ensemble through them too (what a
    /// server whose manifest recommends this tile serves).
    #[arg(long)]
    tiled: Option<i64>,
    /// Also measure steps = 0 as the mean over the 8 flips / 90° rotations
    /// of the input (geometric self-ensemble, 8× the work).
    #[arg(long)]
    self_ensemble: bool,
    /// Evaluate at most this many tiles per set (evenly spaced), to bound
    /// the time of many-step runs on a CPU.
    #[arg(long)]
    max_tiles: Option<usize>,
    /// Also measure every step count (and the self-ensemble, and with
    /// `--tiled` the tiled rows) projected onto the images that degrade
    /// exactly to the input, with this many CG steps (what a server does
    /// with `projection_steps`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PROJECTION_STEPS)))]
    project: Option<u32>,
    /// Also measure a learned linear baseline: per HR position, one K×K
    /// filter over the LR pixels, fitted by least squares to crops of the
    /// training regions of `--linear-mix` (K odd, e.g. 9).
    #[arg(long)]
    linear: Option<i64>,
    /// Also measure the in-band bound: the HR image low-passed to the LR
    /// grid's Nyquist limit, which no method restoring only that band
    /// beats (it reads the HR image: a yardstick, not a method).
    #[arg(long)]
    band_limit: bool,
    /// Also split every row's squared error into the part inside the band
    /// the LR grid carries and the part above it (a second table).
    #[arg(long)]
    band_split: bool,
    /// Sources and shares of the linear baseline's training crops.
    #[arg(long, default_value = "aero=0.4,bluemarble=0.15,landsat=0.3,rgbn=0.15")]
    linear_mix: String,
    /// Number of 96² training crops the linear baseline is fitted to.
    #[arg(long, default_value_t = 4096)]
    linear_crops: usize,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Checkpoint directory written by `train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Destination `.safetensors` (manifest written alongside).
    #[arg(long)]
    out: PathBuf,
    /// Version label for the manifest.
    #[arg(long, default_value = "0.1.0")]
    version: String,
    /// DDIM steps a server should use when its deployment names none
    /// (written into the manifest; pick what the evaluation favours).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1000))]
    default_steps: Option<u32>,
    /// Whether servers should self-ensemble μ when their deployment does not
    /// say (written into the manifest).
    #[arg(long)]
    self_ensemble: Option<bool>,
    /// LR tile edge servers should cut images into when their deployment
    /// does not say (written into the manifest): the training crops' LR
    /// size, the domain the Fourier layers learned their modes on.
    #[arg(long, value_parser = clap::value_parser!(i64).range(MIN_TILE..=MAX_TILE))]
    tile: Option<i64>,
    /// Conjugate-gradient steps of the LR-consistency projection servers
    /// should run when their deployment does not say (written into the
    /// manifest).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_PROJECTION_STEPS)))]
    projection_steps: Option<u32>,
    /// Share of the refiner's sampled residual servers add to μ at
    /// `steps > 0`, in (0, 1] (written into the manifest; pick it on
    /// validation with `report --refiner-strengths`).
    #[arg(long, value_parser = refiner_strength)]
    refiner_strength: Option<f64>,
    /// The inputs the weights were trained for, `matched` or `realistic`
    /// (written into the manifest; servers pair `realistic` weights with
    /// the `realistic` profile and never project them).
    #[arg(long, default_value = "matched", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<Inputs>()))]
    inputs: Inputs,
}

/// Training progress kept next to the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    config: HndsrConfig,
    step: u64,
    seconds: f64,
    commands: Vec<String>,
    log: Vec<String>,
    /// Every source any run of this checkpoint drew crops from (checkpoints
    /// from before this field trained on aero and Blue Marble).
    #[serde(default = "default_sources")]
    sources: Vec<String>,
    /// With `--init`: the initial weights' training data, from their manifest.
    #[serde(default)]
    inherited_data: Vec<String>,
    /// The largest `--realistic-fraction` any run of this checkpoint used.
    #[serde(default)]
    realistic_fraction: f64,
}

impl TrainState {
    /// A run that has not taken a step yet.
    fn new(config: HndsrConfig) -> Self {
        Self {
            config,
            step: 0,
            seconds: 0.0,
            commands: Vec::new(),
            log: Vec::new(),
            sources: Vec::new(),
            inherited_data: Vec::new(),
            realistic_fraction: 0.0,
        }
    }
}

fn default_sources() -> Vec<String> {
    vec!["aero".into(), "bluemarble".into()]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tch::set_num_threads(cli.threads);
    let device = open_device(&cli.device)?;
    let data = match &cli.data {
        Some(d) => d.clone(),
        None => PathBuf::from(std::env::var("HOME").context("HOME")?).join(".cache/hndsr/data"),
    };
    match cli.command {
        Command::Train(args) => train(&args, &data, device),
        Command::Eval(args) => eval(&args, &data, device),
        Command::Report(args) => report::report(&args, &data, device),
        Command::Export(args) => export(&args),
        Command::Soup(args) => {
            let m = soup::soup(&args)?;
            println!("{} sha256 {}", m.version, m.sha256);
            Ok(())
        }
        Command::Bench(args) => bench::bench(&args, device, cli.threads),
        Command::Probe(args) => probe::probe(&args, &data, device),
    }
}

/// The command as a reader would type it (binary name without its path).
fn command_line() -> String {
    std::iter::once("hndsr-train".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A preset by name, or a JSON file holding an [`HndsrConfig`].
fn config_from(name: &str) -> Result<HndsrConfig> {
    if let Some(cfg) = HndsrConfig::preset(name) {
        return Ok(cfg);
    }
    let path = Path::new(name);
    if !path.is_file() {
        bail!(
            "unknown config {name:?}: not a preset ({}) nor a JSON file",
            HndsrConfig::PRESETS.map(|(name, _)| name).join(", ")
        );
    }
    let cfg: HndsrConfig = serde_json::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("parse config {}", path.display()))?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// A probability: a number in [0, 1].
fn refiner_strength(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{text}: {e}"))?;
    hndsr_torch::hndsr::check_refiner_strength(value).map(|()| value)
}

fn residual_norm(text: &str) -> Result<ResidualNorm, String> {
    match text {
        "global" => Ok(ResidualNorm::Global),
        "detail" => Ok(ResidualNorm::Detail),
        other => Err(format!("expected global or detail, got '{other}'")),
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        Ok(p) => Err(format!("{p} is not a probability (0 to 1)")),
        Err(e) => Err(e.to_string()),
    }
}

/// A loss term's weight: a finite number ≥ 0.
fn loss_weight(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(w),
        Ok(w) => Err(format!("{w} is not a weight (finite, ≥ 0)")),
        Err(e) => Err(e.to_string()),
    }
}

fn train(args: &TrainArgs, data_dir: &Path, device: Device) -> Result<()> {
    let augment = data::Augment {
        gray_fraction: args.gray_fraction,
        zoom_max: args.zoom_max,
        zoom_fraction: args.zoom_fraction,
        negate_fraction: args.negate_fraction,
    };
    augment
        .validate()
        .context("--gray-fraction / --zoom-max / --zoom-fraction / --negate-fraction")?;
    std::fs::create_dir_all(&args.out)?;
    let mix = data::parse_mix(&args.mix)?;
    let state_path = args.out.join("state.json");
    let weights = args.out.join("latest.safetensors");
    let init = match &args.init {
        Some(path) => Some((path, Manifest::read(&manifest_path(path))?)),
        None => None,
    };
    let mut state = if args.resume {
        let s: TrainState = serde_json::from_str(
            &std::fs::read_to_string(&state_path).context("read state.json to resume")?,
        )?;
        s
    } else if let Some((_, m)) = &init {
        let mut config = m.config.clone();
        if let Some(local) = args.local {
            config.local = local;
        }
        if let Some(blocks) = args.blocks {
            config.blocks = blocks;
        }
        if let Some(modes) = args.modes {
            config.modes = modes;
        }
        if let Some(norm) = args.residual_norm {
            config.residual_norm = norm;
        }
        if let Some(scale) = args.residual_scale {
            config.residual_scale = scale;
        }
        if let Some(start) = args.start_time {
            config.start_time = start;
        }
        config.validate().map_err(anyhow::Error::msg)?;
        grow::check_growth(&m.config, &config)?;
        let inherited_data = inherit_data(&m.training.data);
        TrainState {
            commands: vec![format!(
                "(initial weights {}, {} steps: {})",
                m.version, m.training.steps, m.training.command
            )],
            inherited_data,
            ..TrainState::new(config)
        }
    } else {
        TrainState::new(config_from(&args.config)?)
    };
    for (name, _) in &mix {
        if !state.sources.contains(name) {
            state.sources.push(name.clone());
        }
    }
    state.realistic_fraction = state.realistic_fraction.max(args.realistic_fraction);
    state.commands.push(command_line());
    let cfg = state.config.clone();
    if args.crop % cfg.scale != 0 {
        bail!("crop must be a multiple of {}", cfg.scale);
    }

    tch::manual_seed(args.seed as i64 + state.step as i64);
    let vs = nn::VarStore::new(device);
    let net = HndsrNet::new(&vs.root(), &cfg);
    if args.resume {
        let bytes = std::fs::read(&weights)?;
        load_weights_from_bytes(&vs, &bytes, &weights)?;
    } else if let Some((path, manifest)) = &init {
        let fresh = grow::init_from(&vs, path, manifest, args.fresh_denoiser)?;
        let (denoiser, other): (Vec<_>, Vec<_>) =
            fresh.iter().partition(|name| name.starts_with("denoiser."));
        println!(
            "from {}; new variables: {other:?}{}",
            path.display(),
            if args.fresh_denoiser {
                format!("; a fresh denoiser ({} variables)", denoiser.len())
            } else {
                String::new()
            }
        );
    }
    println!(
        "config {} ({} encoder; {} parameters, {} in the regression path), start at step {}",
        cfg.name,
        cfg.body_label(),
        parameter_count(&vs),
        regression_parameter_count(&vs),
        state.step
    );
    let set = data::TrainSet::load(data_dir, args.crop, &mix, augment)?;
    let mut rng = SplitMix64::new(args.seed ^ state.step.wrapping_mul(0x9E37));
    let mut opt = nn::AdamW {
        wd: 1e-4,
        ..Default::default()
    }
    .build(&vs, args.lr)?;

    let started = Instant::now();
    let start_step = state.step;
    let (mut l1_acc, mut dn_acc, mut n_acc) = (0.0, 0.0, 0u32);
    let save = |state: &TrainState| -> Result<()> {
        let manifest = Manifest::untrained(&cfg, 0);
        save_weights(&vs, &cfg, &weights, manifest)?;
        std::fs::write(&state_path, serde_json::to_string_pretty(state)?)?;
        Ok(())
    };
    while state.step < args.steps {
        if args
            .minutes
            .is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0)
        {
            println!("time limit reached");
            break;
        }
        let origin = if args.restart_schedule { start_step } else { 0 };
        let step = state.step - origin;
        let warm = ((step + 1) as f64 / 100.0).min(1.0);
        let progress = match args.minutes {
            Some(m) if args.time_schedule => {
                (started.elapsed().as_secs_f64() / (m * 60.0)).min(1.0)
            }
            _ => step as f64 / (args.steps - origin) as f64,
        };
        opt.set_lr(
            args.lr * warm * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
        );

        let hr = set.batch(&mut rng, args.batch);
        let lr_img = degrade::training_batch(&hr, cfg.scale, args.realistic_fraction, &mut rng)?
            .to_device(device);
        let hr = hr.to_device(device);
        // μ for the regression loss, and the one pass's μ and features the
        // denoiser is conditioned on (as when serving).
        let (mu, mu_pass, features) = if args.freeze_regressor {
            let (mu, features) = tch::no_grad(|| net.regress(&lr_img));
            (mu.shallow_clone(), mu, features)
        } else if args.ensemble_loss {
            let e = net
                .regress_self_ensemble_checked(&lr_img, &|| false)
                .expect("never cancelled");
            (e.mean, e.identity, e.features)
        } else {
            let (mu, features) = net.regress(&lr_img);
            (mu.shallow_clone(), mu, features)
        };
        let error = &mu - &hr;
        let l1 = error.abs().mean(Kind::Float);
        l1_acc += l1.double_value(&[]);
        let mut loss = if args.freeze_regressor {
            Tensor::zeros([], (Kind::Float, device))
        } else {
            match args.loss {
                Loss::L1 => l1,
                Loss::Mse => error.square().mean(Kind::Float),
            }
        };
        if args.equivariance > 0.0 && !args.freeze_regressor {
            // One of the seven symmetries other than the identity.
            let g = 1 + (rng.next_u64() % 7) as i64;
            let (rot, flip) = (g >> 1, g & 1 == 1);
            let (turned, _) = net.regress(&net::transform(&lr_img, rot, flip));
            let back = net::untransform(&turned, rot, flip);
            loss += (&mu - back).abs().mean(Kind::Float) * args.equivariance;
        }
        if args.denoiser_weight > 0.0 {
            let mu_pass = mu_pass.detach();
            let residual = residual::encode(&cfg, &hr, &mu_pass);
            let b = args.batch as i64;
            // Only the part of the schedule that sampling visits.
            let t = Tensor::rand([b], (Kind::Float, device)) * cfg.start_time;
            let eps = residual.randn_like();
            let (alpha, sigma) = diffusion::alpha_sigma_tensor(&t);
            let x_t = &alpha * &residual + &sigma * &eps;
            let cond = net.condition(&mu_pass, &features.detach());
            let out = net.denoise(&x_t, &t, &cond);
            let target = diffusion::target(cfg.prediction, &residual, &eps, &alpha, &sigma);
            let dn = (out - target).square().mean(Kind::Float);
            dn_acc += dn.double_value(&[]);
            loss += dn * args.denoiser_weight;
        }
        opt.backward_step_clip_norm(&loss, 1.0);
        n_acc += 1;
        state.step += 1;

        if state.step % 25 == 0 {
            let line = format!(
                "step {} l1 {:.5} denoiser {:.4} {:.2} s/step",
                state.step,
                l1_acc / f64::from(n_acc),
                dn_acc / f64::from(n_acc),
                started.elapsed().as_secs_f64() / (state.step - start_step) as f64
            );
            println!("{line}");
            state.log.push(line);
            (l1_acc, dn_acc, n_acc) = (0.0, 0.0, 0);
        }
        if state.step % args.save_every == 0 {
            state.seconds += started.elapsed().as_secs_f64();
            save(&state)?;
            state.seconds -= started.elapsed().as_secs_f64();
        }
    }
    state.seconds += started.elapsed().as_secs_f64();
    save(&state)?;
    println!("saved {} at step {}", weights.display(), state.step);
    Ok(())
}

fn export(args: &ExportArgs) -> Result<()> {
    let state: TrainState = serde_json::from_str(&std::fs::read_to_string(
        args.checkpoint.join("state.json"),
    )?)?;
    let src = args.checkpoint.join("latest.safetensors");
    let bytes = std::fs::read(&src)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = HndsrNet::new(&vs.root(), &state.config);
    load_weights_from_bytes(&vs, &bytes, &src)?;
    check_inputs_label(args.inputs, state.realistic_fraction, args.projection_steps)?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let manifest = Manifest {
        version: format!("{}-{}", args.version, state.config.name),
        training: TrainingInfo {
            data: training_data(&state),
            command: state.commands.join(" && "),
            steps: state.step,
            notes: format!(
                "{:.0} s of training; last log: {}",
                state.seconds,
                state.log.last().cloned().unwrap_or_default()
            ),
        },
        default_steps: args.default_steps,
        self_ensemble: args.self_ensemble,
        tile: args.tile,
        projection_steps: args.projection_steps,
        refiner_strength: args.refiner_strength,
        inputs: Some(args.inputs),
        ..Manifest::untrained(&state.config, 0)
    };
    let written = save_weights(&vs, &state.config, &args.out, manifest)?;
    println!("{} sha256 {}", args.out.display(), written.sha256);
    Ok(())
}

/// Refuses a manifest label the training contradicts: `realistic` for
/// weights that never saw a realistic input, or with the projection (which
/// inverts the matched degradation only).
fn check_inputs_label(
    inputs: Inputs,
    realistic_fraction: f64,
    projection_steps: Option<u32>,
) -> Result<()> {
    if inputs == Inputs::Realistic {
        if realistic_fraction <= 0.0 {
            bail!(
                "--inputs realistic: this checkpoint was never trained on realistic inputs (train with --realistic-fraction)"
            );
        }
        if projection_steps.unwrap_or(0) > 0 {
            bail!(
                "--inputs realistic with --projection-steps: the projection inverts the matched degradation only; export with --projection-steps 0"
            );
        }
    }
    Ok(())
}

/// The data lines of initial weights' manifest, each marked as inherited,
/// once. Their degradation lines are dropped: every generation degrades
/// with the one `data::degrade`, which [`training_data`] states once.
fn inherit_data(lines: &[String]) -> Vec<String> {
    let mut inherited: Vec<String> = Vec::new();
    for line in lines {
        let bare = line.trim_start_matches("initial weights: ");
        if bare.starts_with("LR =") {
            continue;
        }
        let line = format!("initial weights: {bare}");
        if !inherited.contains(&line) {
            inherited.push(line);
        }
    }
    inherited
}

/// The manifest's description of the training data: the initial weights'
/// (if any), then each source's training region, then the degradation.
fn training_data(state: &TrainState) -> Vec<String> {
    let mut lines = state.inherited_data.clone();
    for name in &state.sources {
        let Ok(spec) = data::spec(name) else { continue };
        let line = format!(
            "{} ({}): all columns except the held-out {}..{} and an 8-pixel gap",
            spec.label, spec.file, spec.holdout.0, spec.holdout.1
        );
        if !lines.iter().any(|l| l.starts_with(spec.label)) {
            lines.push(line);
        }
    }
    if !lines.iter().any(|l| l.starts_with("LR =")) {
        lines.push(
            "LR = clamp(_upsample_bicubic2d_aa(HR, HR/4, align_corners=false), 0, 1), f32".into(),
        );
    }
    if state.realistic_fraction > 0.0 {
        let line = format!(
            "up to {:.0}% of the crops: LR = the realistic degradation (Gaussian blur σ {}–{} HR px, the same ÷4, noise σ {}–{} levels, 8-bit, JPEG quality {}–{})",
            100.0 * state.realistic_fraction,
            degrade::BLUR_SIGMA.0,
            degrade::BLUR_SIGMA.1,
            degrade::NOISE_LEVELS.0,
            degrade::NOISE_LEVELS.1,
            degrade::JPEG_QUALITY.0,
            degrade::JPEG_QUALITY.1
        );
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines
}

fn eval(args: &EvalArgs, data_dir: &Path, device: Device) -> Result<()> {
    let manifest_path = manifest_path(&args.weights);
    let manifest = Manifest::read(&manifest_path)?;
    let model = HndsrModel::load(&args.weights, &manifest.sha256, device, args.precision)?;
    let tiled = |ensemble: bool| -> Result<Option<HndsrModel>> {
        let Some(tile) = args.tiled else {
            return Ok(None);
        };
        let model = HndsrModel::load(&args.weights, &manifest.sha256, device, args.precision)?;
        Ok(Some(model.with_tile(tile)?.with_self_ensemble(ensemble)))
    };
    let tiled_plain = tiled(false)?;
    let tiled_ensemble = if args.self_ensemble {
        tiled(true)?
    } else {
        None
    };
    let ensemble = if args.self_ensemble {
        Some(
            HndsrModel::load(&args.weights, &manifest.sha256, device, args.precision)?
                .with_self_ensemble(true),
        )
    } else {
        None
    };
    let scale = model.scale();
    let linear = match args.linear {
        Some(k) => Some(fit_linear(args, k, scale, data_dir)?),
        None => None,
    };
    let mut sets = data::eval_sets(data_dir, scale, &args.sources)?;
    if let Some(max) = args.max_tiles {
        for set in &mut sets {
            set.keep_evenly(max);
        }
    }
    let never = || false;
    // One model's output, projected with `iters` CG steps when given (what
    // a server with `projection_steps` returns).
    let run = |m: &HndsrModel, lr: &Tensor, steps: u32, iters: Option<u32>| -> Result<Tensor> {
        let y = m.upscale_image(lr, steps, args.seed, &never)?;
        Ok(match iters {
            Some(n) => consistency::project(&y, lr, scale, n, &never)?,
            None => y,
        })
    };
    let mut figures = Vec::new();
    let mut splits = Vec::new();
    for set in &sets {
        let reduce = |x: &Tensor| {
            if set.gray {
                x.mean_dim(1, true, Kind::Float)
            } else {
                x.shallow_clone()
            }
        };
        let mut measure = |method: &str,
                           steps: Option<u32>,
                           run: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>|
         -> Result<()> {
            let started = Instant::now();
            let (mut p, mut s, mut inside, mut above) = (0.0, 0.0, 0.0, 0.0);
            for hr in &set.images {
                let lr = data::degrade(hr, scale);
                let sr = reduce(&run(&lr, hr)?);
                let hr = reduce(hr);
                p += metrics::psnr(&sr, &hr, scale);
                s += metrics::ssim(&sr, &hr, scale);
                if args.band_split {
                    let (i, a) = bandlimit::error_split(&sr, &hr, scale, scale);
                    (inside, above) = (inside + i, above + a);
                }
            }
            let n = set.images.len() as f64;
            if args.band_split {
                splits.push((inside / n, above / n));
            }
            let fig = EvalFigure {
                source: set.name.clone(),
                // Only the network's rows (those with a step count) depend
                // on the precision.
                method: if args.precision == Precision::Fp32 || steps.is_none() {
                    method.into()
                } else {
                    format!("{method} ({})", args.precision)
                },
                steps,
                psnr_db: p / n,
                ssim: s / n,
            };
            println!(
                "{} | {} {:?} | PSNR {:.3} dB | SSIM {:.4} | {:.1} s",
                fig.source,
                fig.method,
                fig.steps,
                fig.psnr_db,
                fig.ssim,
                started.elapsed().as_secs_f64()
            );
            figures.push(fig);
            Ok(())
        };
        measure("bicubic", None, &|lr, _| {
            Ok(upsample_bicubic(lr, scale)?.clamp(0.0, 1.0))
        })?;
        for &steps in &args.steps {
            measure("hndsr", Some(steps), &|lr, _| run(&model, lr, steps, None))?;
            // Steps 0 are projected below, beside the self-ensemble.
            if let Some(iters) = args.project.filter(|_| steps > 0) {
                let label = format!("hndsr, projected ({iters} CG)");
                measure(&label, Some(steps), &|lr, _| {
                    run(&model, lr, steps, Some(iters))
                })?;
            }
        }
        if let Some(ensemble) = &ensemble {
            measure("hndsr, ×8 self-ensemble", Some(0), &|lr, _| {
                run(ensemble, lr, 0, None)
            })?;
        }
        if let Some(iters) = args.project {
            let plain = std::iter::once(("hndsr", &model));
            for (name, m) in plain.chain(ensemble.as_ref().map(|e| ("hndsr, ×8", e))) {
                let label = format!("{name}, projected ({iters} CG)");
                measure(&label, Some(0), &|lr, _| run(m, lr, 0, Some(iters)))?;
            }
        }
        if args.band_limit {
            measure(
                "HR low-passed to the LR Nyquist (in-band bound)",
                None,
                &|_, hr| Ok(bandlimit::low_pass(hr, scale)),
            )?;
        }
        if let Some((label, linear)) = &linear {
            measure(label, None, &|lr, _| Ok(linear.upscale(lr)))?;
        }
        for (tiled, suffix) in [(&tiled_plain, ""), (&tiled_ensemble, ", ×8 self-ensemble")] {
            if let Some(tiled) = tiled {
                let label = format!("hndsr, {}² LR tiles{suffix}", tiled.tiles().tile);
                measure(&label, Some(0), &|lr, _| run(tiled, lr, 0, None))?;
                if let Some(iters) = args.project {
                    let projected = format!("{label}, projected ({iters} CG)");
                    measure(&projected, Some(0), &|lr, _| run(tiled, lr, 0, Some(iters)))?;
                }
            }
        }
    }
    let mut table = markdown_table(&model, &figures);
    if args.band_split {
        table.push_str(&split_table(&figures, &splits));
    }
    println!("{table}");
    if let Some(path) = &args.table {
        std::fs::write(path, &table)?;
    }
    if args.update_manifest {
        let mut m = manifest;
        m.eval.extend(figures);
        m.write(&manifest_path)?;
    }
    Ok(())
}

/// Fits the linear baseline of `eval --linear K` and names it for the table.
fn fit_linear(
    args: &EvalArgs,
    k: i64,
    scale: i64,
    data_dir: &Path,
) -> Result<(String, linear::LinearSr)> {
    const CROP: i64 = 96;
    const BATCH: usize = 64;
    let started = Instant::now();
    let mix = data::parse_mix(&args.linear_mix)?;
    let set = data::TrainSet::load(data_dir, CROP, &mix, data::Augment::gray(0.0))?;
    let mut rng = SplitMix64::new(args.seed);
    let mut fit = linear::Fit::new(k, scale)?;
    let mut left = args.linear_crops;
    while left > 0 {
        let hr = set.batch(&mut rng, left.min(BATCH));
        fit.add(&data::degrade(&hr, scale), &hr);
        left = left.saturating_sub(BATCH);
    }
    let fitted = fit.solve()?;
    println!(
        "linear baseline: {k}×{k} taps fitted to {} crops of {CROP}² ({}) in {:.1} s",
        args.linear_crops,
        args.linear_mix,
        started.elapsed().as_secs_f64()
    );
    Ok((format!("linear {k}×{k} least squares"), fitted))
}

/// The table of `eval --band-split`: for each row of `figures`, its mean
/// squared error inside and above the band the LR grid carries (`splits`,
/// in the same order).
fn split_table(figures: &[EvalFigure], splits: &[(f64, f64)]) -> String {
    let mut out = String::from(
        "\nSquared error by band (×10⁻⁴; in band: below the LR grid's Nyquist limit, \
         DCT-II cut as for the in-band bound; same shaved pixels as the PSNR):\n\n\
         | held-out set | method | DDIM steps | in band | above band | sum |\n\
         |---|---|---|---:|---:|---:|\n",
    );
    for (f, (inside, above)) in figures.iter().zip(splits) {
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
            f.source,
            f.method,
            f.steps.map_or("–".to_owned(), |n| n.to_string()),
            inside * 1e4,
            above * 1e4,
            (inside + above) * 1e4
        ));
    }
    out
}

fn markdown_table(model: &HndsrModel, figures: &[EvalFigure]) -> String {
    let mut out = format!(
        "Model `{}` ({} parameters, sha256 `{}`), ×{}; PSNR (dB) / SSIM, border of {} px shaved.\n\n\
         | held-out set | method | DDIM steps | PSNR (dB) | SSIM | Δ PSNR vs bicubic |\n\
         |---|---|---|---|---|---|\n",
        model.manifest().version,
        model.parameter_count(),
        &model.digest()[..model.digest().len().min(12)],
        model.scale(),
        model.scale()
    );
    for f in figures {
        let base = figures
            .iter()
            .find(|b| b.source == f.source && b.method == "bicubic")
            .map_or(f.psnr_db, |b| b.psnr_db);
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.4} | {:+.2} |\n",
            f.source,
            f.method,
            f.steps.map_or("–".to_owned(), |s| s.to_string()),
            f.psnr_db,
            f.ssim,
            f.psnr_db - base
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_is_a_preset_or_a_json_file() {
        assert_eq!(config_from("medium").unwrap(), HndsrConfig::medium());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.json");
        let wide = HndsrConfig {
            name: "wide".into(),
            width: 40,
            ..HndsrConfig::tiny()
        };
        std::fs::write(&path, serde_json::to_string(&wide).unwrap()).unwrap();
        assert_eq!(config_from(path.to_str().unwrap()).unwrap(), wide);
    }

    #[test]
    fn the_manifest_lists_inherited_data_then_each_source_once() {
        let state = TrainState {
            config: HndsrConfig::tiny(),
            step: 0,
            seconds: 0.0,
            commands: Vec::new(),
            log: Vec::new(),
            sources: vec!["aero".into(), "landsat".into(), "aero".into()],
            inherited_data: vec!["initial weights: aero from PyWavelets".into()],
            realistic_fraction: 0.0,
        };
        let lines = training_data(&state);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(lines[0], "initial weights: aero from PyWavelets");
        assert!(lines[1].starts_with("aero (PyWavelets 1.9.0)") && lines[1].contains("344..512"));
        assert!(lines[2].starts_with("Landsat 8") && lines[2].contains("0..512"));
        assert!(lines[3].starts_with("LR = "));
        // A run with realistic inputs says so, once.
        let realistic = TrainState {
            realistic_fraction: 0.5,
            ..state
        };
        let lines = training_data(&realistic);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[4].starts_with("up to 50% of the crops: LR = the realistic degradation"),
            "{}",
            lines[4]
        );
    }

    #[test]
    fn inherited_data_is_marked_once_and_the_degradation_stated_once() {
        let parent = [
            "initial weights: aero from PyWavelets",
            "initial weights: LR = clamp(...)",
            "aero from PyWavelets",
            "Landsat 8 30 m",
            "LR = clamp(...)",
        ]
        .map(String::from);
        let inherited = inherit_data(&parent);
        assert_eq!(
            inherited,
            [
                "initial weights: aero from PyWavelets",
                "initial weights: Landsat 8 30 m"
            ]
        );
        let state = TrainState {
            sources: vec!["aero".into()],
            inherited_data: inherited,
            ..TrainState::new(HndsrConfig::tiny())
        };
        let lines = training_data(&state);
        assert_eq!(
            lines.iter().filter(|l| l.contains("LR = ")).count(),
            1,
            "{lines:#?}"
        );
        assert!(lines.last().unwrap().starts_with("LR = "));
    }

    #[test]
    fn loss_weights_must_be_finite_and_not_negative() {
        let parse = |flag: &str, value: &str| {
            Cli::try_parse_from(["hndsr-train", "train", "--out", "ck", flag, value])
        };
        for flag in ["--equivariance", "--denoiser-weight"] {
            assert!(parse(flag, "0.1").is_ok(), "{flag} 0.1");
            assert!(parse(flag, "0").is_ok(), "{flag} 0");
            for bad in ["-0.5", "inf", "NaN", "lots"] {
                let err = parse(flag, bad).unwrap_err().to_string();
                assert!(err.contains(flag), "{flag} {bad}: {err}");
            }
        }
    }

    #[test]
    fn the_refiners_units_change_only_with_a_fresh_denoiser_and_strengths_are_checked() {
        let train = |extra: &[&str]| {
            let mut argv = vec!["hndsr-train", "train", "--out", "ck"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let fresh = ["--init", "w.safetensors", "--fresh-denoiser"];
        let units = ["--residual-norm", "detail", "--start-time", "0.8"];
        assert!(train(&[&fresh[..], &units[..]].concat()).is_ok());
        // New units without a fresh denoiser, or a fresh one without --init.
        assert!(train(&[&fresh[..1], &fresh[1..2], &units[..]].concat()).is_err());
        assert!(train(&["--fresh-denoiser"]).is_err());
        let err = train(&[&fresh[..], &["--residual-norm", "local"][..]].concat())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected global or detail"), "{err}");

        let export = |strength: &str| {
            Cli::try_parse_from([
                "hndsr-train",
                "export",
                "--checkpoint",
                "ck",
                "--out",
                "w.safetensors",
                "--refiner-strength",
                strength,
            ])
        };
        assert!(export("0.5").is_ok());
        for bad in ["0", "1.5", "-1", "NaN", "half"] {
            assert!(export(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ensemble_loss_excludes_the_equivariance_term_and_a_frozen_regressor() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["hndsr-train", "train", "--out", "ck", "--ensemble-loss"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        assert!(parse(&[]).is_ok());
        for extra in [&["--equivariance", "0.1"][..], &["--freeze-regressor"]] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains("cannot be used with"), "{extra:?}: {err}");
        }
    }

    #[test]
    fn a_partial_evaluation_cannot_overwrite_the_manifest() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["hndsr-train", "eval", "--weights", "w.safetensors"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        assert!(parse(&["--sources", "aero,oblique1"]).is_ok());
        assert!(parse(&["--update-manifest"]).is_ok());
        let err = parse(&["--sources", "aero", "--update-manifest"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
        let err = data::eval_sets(
            Path::new("/nonexistent"),
            4,
            &["aero".into(), "nope".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown source \"nope\""), "{err}");
    }

    #[test]
    fn an_unknown_or_invalid_config_is_refused_with_the_reason() {
        let err = config_from("huge").unwrap_err().to_string();
        assert!(err.contains("not a preset"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        let bad = HndsrConfig {
            unet: vec![12],
            ..HndsrConfig::tiny()
        };
        std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
        let err = config_from(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("multiples of 8"), "{err}");
    }

    #[test]
    fn the_realistic_label_needs_realistic_training_and_no_projection() {
        check_inputs_label(Inputs::Realistic, 1.0, Some(0)).unwrap();
        check_inputs_label(Inputs::Realistic, 0.5, None).unwrap();
        check_inputs_label(Inputs::Matched, 0.0, Some(5)).unwrap();
        let err = check_inputs_label(Inputs::Realistic, 0.0, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("never trained on realistic inputs"),
            "{err}"
        );
        let err = check_inputs_label(Inputs::Realistic, 1.0, Some(5)).unwrap_err();
        assert!(err.to_string().contains("--projection-steps 0"), "{err}");

        let cli = Cli::try_parse_from([
            "hndsr-train",
            "export",
            "--checkpoint",
            "c",
            "--out",
            "o.safetensors",
            "--version",
            "1",
            "--inputs",
            "realistic",
        ])
        .unwrap();
        let Command::Export(args) = cli.command else {
            panic!("export")
        };
        assert_eq!(args.inputs, Inputs::Realistic);
        assert!(
            Cli::try_parse_from([
                "hndsr-train",
                "export",
                "--checkpoint",
                "c",
                "--out",
                "o",
                "--version",
                "1",
                "--inputs",
                "blurry",
            ])
            .is_err()
        );
    }
}

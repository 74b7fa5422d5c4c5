//! `hndsr-train bench`: model latency per LR tile (256² → 1024² by
//! default) for each combination of DDIM steps, batch size and precision, on
//! the device the command was given. Random inputs: the cost of the network
//! does not depend on the pixels.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hndsr_torch::device_name;
use hndsr_torch::hndsr::{HndsrModel, Manifest, Precision, manifest_path};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Weights (`.safetensors`, manifest alongside).
    #[arg(long, default_value = "server/models/hndsr.safetensors")]
    weights: PathBuf,
    /// Edge of the square LR tile, in pixels.
    #[arg(long, default_value_t = 256)]
    tile: i64,
    /// DDIM step counts.
    #[arg(long, value_delimiter = ',', default_value = "0,20,50")]
    steps: Vec<u32>,
    /// Tiles per forward call.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<i64>,
    /// Precisions (fp16 / bf16 are meant for CUDA; on the CPU they run,
    /// slower than fp32).
    #[arg(long, value_delimiter = ',', default_value = "fp32")]
    precision: Vec<Precision>,
    /// Self-ensemble settings (`false,true` measures both).
    #[arg(long, value_delimiter = ',', default_value = "false")]
    self_ensemble: Vec<bool>,
    /// Timed calls per combination (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: u32,
    /// Stop repeating a combination once its timed calls took this long
    /// (at least one call is always timed).
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    /// Append the Markdown rows to this file.
    #[arg(long)]
    table: Option<PathBuf>,
}

/// One measured combination.
struct Row {
    precision: Precision,
    self_ensemble: bool,
    steps: u32,
    batch: i64,
    calls: Vec<Duration>,
}

impl Row {
    fn median_ms(&self) -> f64 {
        let mut ms: Vec<f64> = self.calls.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        }
    }
}

/// Waits until the device has finished the work queued so far.
fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

pub fn bench(args: &BenchArgs, device: Device, threads: i32) -> Result<()> {
    if args.tile < 8 || args.batch.iter().any(|&b| b < 1) || args.repeats == 0 {
        bail!("--tile must be ≥ 8, every --batch ≥ 1 and --repeats ≥ 1");
    }
    let manifest = Manifest::read(&manifest_path(&args.weights))
        .with_context(|| format!("manifest of {}", args.weights.display()))?;
    let never = || false;
    let mut rows = Vec::new();
    for (&precision, &self_ensemble) in args
        .precision
        .iter()
        .flat_map(|p| args.self_ensemble.iter().map(move |e| (p, e)))
    {
        let model = HndsrModel::load(&args.weights, &manifest.sha256, device, precision)?
            .with_self_ensemble(self_ensemble);
        let scale = model.scale();
        for &batch in &args.batch {
            let x = Tensor::rand(
                [batch, model.config().channels, args.tile, args.tile],
                (Kind::Float, device),
            );
            for &steps in &args.steps {
                // Warm-up: cuDNN autotuning, allocator growth, lazy kernels.
                // Every DDIM step runs the same kernels, so one step is enough.
                let _warm = model.upscale(&x, steps.min(1), 0, &never)?;
                sync(device);
                let mut row = Row {
                    precision,
                    self_ensemble,
                    steps,
                    batch,
                    calls: Vec::new(),
                };
                let budget = Instant::now();
                for _ in 0..args.repeats {
                    let started = Instant::now();
                    let y = model.upscale(&x, steps, 0, &never)?;
                    sync(device);
                    row.calls.push(started.elapsed());
                    debug_assert_eq!(y.size()[2], args.tile * scale);
                    if budget.elapsed().as_secs_f64() > args.max_seconds {
                        break;
                    }
                }
                let ms = row.median_ms();
                println!(
                    "{} {precision} self-ensemble {self_ensemble} steps {steps:>2} batch {batch}: {ms:.1} ms per call, {:.1} ms per tile ({} calls)",
                    device_name(device),
                    ms / batch as f64,
                    row.calls.len()
                );
                rows.push(row);
            }
        }
    }

    let scale = manifest.config.scale;
    let mut md = format!(
        "Model `{}` ({} parameters, sha256 `{}`), {t}² → {T}² tiles, device `{}`, \
         {threads} CPU threads; median of the timed calls after a warm-up call.\n\n\
         | precision | self-ensemble | DDIM steps | batch | ms per call | ms per tile | timed calls |\n\
         |---|---|---|---|---|---|---|\n",
        manifest.version,
        manifest.parameters,
        &manifest.sha256[..12],
        device_name(device),
        t = args.tile,
        T = args.tile * scale,
    );
    for row in &rows {
        let ms = row.median_ms();
        md += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |\n",
            row.precision,
            if row.self_ensemble { "×8" } else { "–" },
            row.steps,
            row.batch,
            ms,
            ms / row.batch as f64,
            row.calls.len()
        );
    }
    println!("\n{md}");
    if let Some(path) = &args.table {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        writeln!(f, "{md}")?;
    }
    Ok(())
}

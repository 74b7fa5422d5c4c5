//! `hndsr-train probe`: how well the denoiser recovers the clean residual
//! from one noisy version of it, per noise level, on the held-out data —
//! the quantity DDIM builds its samples from. A denoiser that has learnt
//! something predicts x̂₀ with less error than the trivial guess 0 (whose
//! error is the residual's own energy); where its error exceeds that, DDIM
//! adds more than it recovers. `r` is the scaled, unshuffled residual the
//! denoiser works on (`hndsr_torch::hndsr::residual::encode`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use hndsr_torch::hndsr::diffusion::{self, SplitMix64};
use hndsr_torch::hndsr::residual;
use hndsr_torch::hndsr::{HndsrModel, Manifest, Precision, manifest_path};
use tch::{Device, Kind, Tensor};

use crate::data;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Weights (`.safetensors`, manifest alongside).
    #[arg(long)]
    weights: PathBuf,
    /// Noise levels t in (0, 1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.05,0.1,0.2,0.3,0.5,0.7,0.9,0.98"
    )]
    t: Vec<f64>,
    /// Noise draws per image and level.
    #[arg(long, default_value_t = 4)]
    draws: u32,
    /// Evaluate at most this many tiles per set (evenly spaced).
    #[arg(long, default_value_t = 4)]
    max_tiles: usize,
}

pub fn probe(args: &ProbeArgs, data_dir: &Path, device: Device) -> Result<()> {
    let manifest = Manifest::read(&manifest_path(&args.weights))?;
    let model = HndsrModel::load(&args.weights, &manifest.sha256, device, Precision::Fp32)?;
    let net = model.net();
    let cfg = net.config().clone();
    let _no_grad = tch::no_grad_guard();
    let mut rng = SplitMix64::new(0);
    println!(
        "| held-out set | t | α | σ | mean r² | MSE(x̂₀) | MSE(x̂₀) / mean r² |\n|---|---|---|---|---|---|---|"
    );
    for set in data::eval_sets(data_dir, cfg.scale, &[])? {
        let n = set.images.len();
        let keep = args.max_tiles.clamp(1, n);
        let images: Vec<&Tensor> = (0..keep).map(|k| &set.images[k * n / keep]).collect();
        for &t in &args.t {
            let (alpha, sigma) = diffusion::alpha_sigma(t);
            let (mut energy, mut err, mut count) = (0.0, 0.0, 0.0);
            for hr in &images {
                let hr = hr.to_device(device);
                let lr = data::degrade(&hr, cfg.scale);
                let (mu, features) = net.regress(&lr);
                let cond = net.condition(&mu, &features);
                let r = residual::encode(&cfg, &hr, &mu);
                for _ in 0..args.draws {
                    tch::manual_seed((rng.next_u64() >> 1) as i64);
                    let eps = r.randn_like();
                    let x_t = &r * alpha + &eps * sigma;
                    let t_batch = Tensor::full([r.size()[0]], t, (Kind::Float, device));
                    let out = net.denoise(&x_t, &t_batch, &cond);
                    let (x0, _) =
                        diffusion::split_prediction(cfg.prediction, &out, &x_t, alpha, sigma);
                    energy += r.square().mean(Kind::Float).double_value(&[]);
                    err += (x0 - &r).square().mean(Kind::Float).double_value(&[]);
                    count += 1.0;
                }
            }
            println!(
                "| {} | {t:.2} | {alpha:.3} | {sigma:.3} | {:.4} | {:.4} | {:.3} |",
                set.name.split(',').next().unwrap_or_default(),
                energy / count,
                err / count,
                err / energy
            );
        }
    }
    Ok(())
}

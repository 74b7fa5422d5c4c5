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

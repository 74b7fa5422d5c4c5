//! The in-band bound of `eval --band-limit`: the HR image itself, low-passed
//! to the Nyquist limit of the LR grid. Every frequency the LR grid can
//! carry is kept exactly and everything above it is dropped, so no method
//! that restores only the band the input can represent does better (by
//! Parseval, its squared error is at least the energy above that band).
//! How far a model's PSNR lies above this bound is what it recovers of the
//! finer detail: edges it can place, textures it can predict.
//!
//! The cut is made on the DCT-II coefficients of each channel, i.e. the
//! DFT of the image mirrored at its borders, so the borders do not wrap
//! around. It needs the HR image, so it is a yardstick for the evaluation
//! table and never a method a server could run.
//!
//! Hand-written: a mirror, one real 2-D FFT and a mask, in the trainer's
//! own tch.

use tch::{Kind, Tensor};

/// `hr` `[N, C, H, W]` with every DCT-II frequency at or above the Nyquist
/// limit of a grid `scale` times coarser removed (per axis: index
/// `k ≥ ⌈H / scale⌉`, i.e. `k / 2H ≥ 1 / (2·scale)` cycles per pixel).
/// Not clamped: the exact orthogonal projection onto that band.
pub fn low_pass(hr: &Tensor, scale: i64) -> Tensor {
    let (_, _, h, w) = hr.size4().expect("NCHW");
    let x = hr.to_kind(Kind::Double);
    let x = Tensor::cat(&[&x, &x.flip([2])], 2);
    let x = Tensor::cat(&[&x, &x.flip([3])], 3); // [N, C, 2H, 2W]
    let spectrum = x.fft_rfft2(None::<&[i64]>, [2, 3], "backward"); // [N, C, 2H, W + 1]
    let (kh, kw) = ((h + scale - 1) / scale, (w + scale - 1) / scale);
    let device = hr.device();
    let rows = Tensor::arange(2 * h, (Kind::Int64, device));
    let keep_rows = rows.lt(kh).logical_or(&rows.gt(2 * h - kh));
    let cols = Tensor::arange(w + 1, (Kind::Int64, device));
    let keep_cols = cols.lt(kw);
    let mask = keep_rows
        .view([2 * h, 1])
        .logical_and(&keep_cols.view([1, w + 1]))
        .to_kind(Kind::Double);
    (spectrum * mask)
        .fft_irfft2(Some([2 * h, 2 * w].as_slice()), [2, 3], "backward")
        .narrow(2, 0, h)
        .narrow(3, 0, w)
        .to_kind(hr.kind())
}

/// Where `sr`'s error against `hr` lies: the mean squared error of its
/// in-band part ([`low_pass`] of the error) and of the rest, over the
/// pixels `border` in from the edges (as the PSNR is taken). On the whole
/// image (`border` 0) the two add up to the MSE: the parts are orthogonal.
pub fn error_split(sr: &Tensor, hr: &Tensor, scale: i64, border: i64) -> (f64, f64) {
    let error = (sr - hr).to_kind(Kind::Double);
    let in_band = low_pass(&error, scale);
    let above = &error - &in_band;
    let mse = |x: &Tensor| {
        crate::metrics::shave(x, border)
            .square()
            .mean(Kind::Double)
            .double_value(&[])
    };
    (mse(&in_band), mse(&above))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    /// `[1, 1, h, w]` DCT-II basis image of indices (`ky`, `kx`).
    fn basis(h: i64, w: i64, ky: i64, kx: i64) -> Tensor {
        let y = (Tensor::arange(h, (Kind::Double, tch::Device::Cpu)) + 0.5) * (PI * ky as f64)
            / h as f64;
        let x = (Tensor::arange(w, (Kind::Double, tch::Device::Cpu)) + 0.5) * (PI * kx as f64)
            / w as f64;
        (y.cos().view([h, 1]) * x.cos().view([1, w])).view([1, 1, h, w])
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    #[test]
    fn frequencies_below_the_lr_nyquist_pass_and_those_above_vanish() {
        let (h, w, scale) = (24, 32, 4); // kept: ky < 6, kx < 8
        for (ky, kx) in [(0, 0), (5, 0), (0, 7), (5, 7), (3, 2)] {
            let b = basis(h, w, ky, kx);
            let d = max_abs(&(low_pass(&b, scale) - &b));
            assert!(d < 1e-9, "({ky}, {kx}) is in band but changed by {d}");
        }
        for (ky, kx) in [(6, 0), (0, 8), (6, 8), (23, 31), (2, 12), (11, 3)] {
            let out = max_abs(&low_pass(&basis(h, w, ky, kx), scale));
            assert!(out < 1e-9, "({ky}, {kx}) is above the band but left {out}");
        }
    }

    #[test]
    fn it_is_a_projection_that_keeps_the_in_band_part_of_a_mixture() {
        let (h, w, scale) = (20, 28, 4); // kept: ky < 5, kx < 7
        let low = basis(h, w, 2, 3) * 0.3 + basis(h, w, 0, 0) * 0.5;
        let high = basis(h, w, 9, 1) * 0.2 + basis(h, w, 1, 20) * 0.1;
        let x = (&low + &high).repeat([2, 3, 1, 1]).to_kind(Kind::Float);
        let y = low_pass(&x, scale);
        assert_eq!(y.size(), x.size());
        assert_eq!(y.kind(), Kind::Float);
        let want = low.repeat([2, 3, 1, 1]).to_kind(Kind::Float);
        assert!(max_abs(&(&y - want)) < 1e-5);
        assert!(
            max_abs(&(low_pass(&y, scale) - &y)) < 1e-5,
            "not idempotent"
        );
    }

    #[test]
    fn the_error_splits_into_orthogonal_in_band_and_above_band_parts() {
        let (h, w, scale) = (20, 28, 4); // kept: ky < 5, kx < 7
        let hr = (basis(h, w, 1, 2) * 0.2 + 0.5).to_kind(Kind::Float);
        let low = basis(h, w, 3, 1) * 0.05;
        let high = basis(h, w, 8, 9) * 0.03;
        let sr = (&hr + &low + &high).to_kind(Kind::Float);
        let energy = |t: &Tensor| t.square().mean(Kind::Double).double_value(&[]);
        let (inside, above) = error_split(&sr, &hr, scale, 0);
        assert!((inside - energy(&low)).abs() < 1e-9, "{inside}");
        assert!((above - energy(&high)).abs() < 1e-9, "{above}");
        let total = energy(&(&sr - &hr).to_kind(Kind::Double));
        assert!((inside + above - total).abs() < 1e-9);
        let (inside, above) = error_split(&hr, &hr, scale, 2);
        assert!(inside < 1e-15 && above < 1e-15);
    }
}

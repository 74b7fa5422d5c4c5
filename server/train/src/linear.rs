//! A learned linear baseline: for each of the scale² positions of an HR
//! pixel inside its LR pixel, one K×K filter over the LR neighbourhood
//! (plus a bias), fitted by least squares to the training crops. It is the
//! best any linear, shift-invariant method can do on that data (bicubic is
//! one such filter once K ≥ 5), so it tells how much of the model's gain
//! over bicubic a linear filter already gets and how much needs the
//! network's non-linear priors.
//!
//! Hand-written rather than taken from a crate: it is a few tensor
//! reshapes around a normal-equation solve, in the trainer's own tch.

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

/// A fitted filter bank.
#[derive(Debug)]
pub struct LinearSr {
    k: i64,
    scale: i64,
    /// `[k² + 1, scale²]`, f64.
    weights: Tensor,
}

/// Accumulates the normal equations of the least-squares fit.
#[derive(Debug)]
pub struct Fit {
    k: i64,
    scale: i64,
    ata: Tensor,
    atb: Tensor,
    rows: i64,
}

/// `[N, C, h, w]` LR → one row per LR pixel and channel: its K×K
/// neighbourhood (reflected at the border) and a 1 for the bias.
fn features(lr: &Tensor, k: i64) -> Tensor {
    let (n, c, h, w) = lr.size4().expect("NCHW");
    let r = k / 2;
    let cols = lr
        .reshape([n * c, 1, h, w])
        .to_kind(Kind::Double)
        .reflection_pad2d([r, r, r, r])
        .im2col([k, k], [1, 1], [0, 0], [1, 1]) // [n·c, k², h·w]
        .permute([0, 2, 1])
        .reshape([-1, k * k]);
    let ones = Tensor::ones([cols.size()[0], 1], (Kind::Double, lr.device()));
    Tensor::cat(&[cols, ones], 1)
}

/// `[N, C, H, W]` HR → one row per LR pixel and channel: its scale² HR
/// pixels, in the row order of [`features`].
fn targets(hr: &Tensor, scale: i64) -> Tensor {
    let (n, c, h, w) = hr.size4().expect("NCHW");
    hr.reshape([n * c, 1, h, w])
        .to_kind(Kind::Double)
        .pixel_unshuffle(scale) // [n·c, s², h/s, w/s]
        .permute([0, 2, 3, 1])
        .reshape([-1, scale * scale])
}

impl Fit {
    /// An empty fit of `k`×`k` filters (odd `k`) for `scale`.
    pub fn new(k: i64, scale: i64) -> Result<Self> {
        if k < 1 || k % 2 == 0 {
            bail!("the filter size must be odd and positive, got {k}");
        }
        let dim = k * k + 1;
        Ok(Self {
            k,
            scale,
            ata: Tensor::zeros([dim, dim], (Kind::Double, tch::Device::Cpu)),
            atb: Tensor::zeros([dim, scale * scale], (Kind::Double, tch::Device::Cpu)),
            rows: 0,
        })
    }

    /// Adds the pairs (`lr`, `hr`), `[N, C, h, w]` and `[N, C, h·s, w·s]`.
    pub fn add(&mut self, lr: &Tensor, hr: &Tensor) {
        let a = features(lr, self.k).to_device(tch::Device::Cpu);
        let b = targets(hr, self.scale).to_device(tch::Device::Cpu);
        self.ata += a.tr().matmul(&a);
        self.atb += a.tr().matmul(&b);
        self.rows += a.size()[0];
    }

    /// Solves the normal equations, with a ridge of `1e-8` of the mean
    /// diagonal so flat data cannot make them singular.
    pub fn solve(&self) -> Result<LinearSr> {
        if self.rows == 0 {
            bail!("no training pairs were added");
        }
        let dim = self.ata.size()[0];
        let ridge = self.ata.diagonal(0, 0, 1).mean(Kind::Double) * 1e-8;
        let eye = Tensor::eye(dim, (Kind::Double, tch::Device::Cpu));
        let weights = Tensor::linalg_solve(&(&self.ata + eye * ridge), &self.atb, true);
        Ok(LinearSr {
            k: self.k,
            scale: self.scale,
            weights,
        })
    }
}

impl LinearSr {
    /// `[N, C, h, w]` LR → `[N, C, h·s, w·s]` in [0, 1], f32.
    pub fn upscale(&self, lr: &Tensor) -> Tensor {
        let (n, c, h, w) = lr.size4().expect("NCHW");
        let s = self.scale;
        features(lr, self.k)
            .matmul(&self.weights.to_device(lr.device()))
            .reshape([n * c, h, w, s * s])
            .permute([0, 3, 1, 2])
            .pixel_shuffle(s)
            .reshape([n, c, h * s, w * s])
            .clamp(0.0, 1.0)
            .to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data;
    use hndsr_torch::upsample_bicubic;

    fn mse(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).square().mean(Kind::Double).double_value(&[])
    }

    /// Smooth random images with some structure, `[n, c, size, size]`.
    fn images(n: i64, c: i64, size: i64) -> Tensor {
        tch::manual_seed(3);
        let noise = Tensor::rand([n, c, size / 8, size / 8], (Kind::Float, tch::Device::Cpu));
        upsample_bicubic(&noise, 8).unwrap().clamp(0.0, 1.0)
    }

    #[test]
    fn rows_of_features_and_targets_line_up() {
        // An HR image whose 4×4 blocks are constant: the fitted filter must
        // reproduce it from the LR pixel at the centre tap alone.
        let lr = Tensor::rand([2, 3, 6, 5], (Kind::Float, tch::Device::Cpu));
        let hr = lr
            .repeat_interleave_self_int(4, 2, None)
            .repeat_interleave_self_int(4, 3, None);
        let mut fit = Fit::new(3, 4).unwrap();
        fit.add(&lr, &hr);
        let sr = fit.solve().unwrap().upscale(&lr);
        assert!(mse(&sr, &hr) < 1e-10, "mse {}", mse(&sr, &hr));
    }

    #[test]
    fn the_fit_is_at_least_as_good_as_bicubic_on_its_own_data() {
        // Bicubic ×4 is one of the 5×5 filter banks, so the least-squares
        // fit cannot be worse on the pairs it was fitted to.
        let hr = images(4, 3, 64);
        let lr = data::degrade(&hr, 4);
        let mut fit = Fit::new(5, 4).unwrap();
        fit.add(&lr, &hr);
        let linear = fit.solve().unwrap().upscale(&lr);
        let bicubic = upsample_bicubic(&lr, 4).unwrap().clamp(0.0, 1.0);
        let shave = |x: &Tensor| x.narrow(2, 8, 48).narrow(3, 8, 48);
        let (l, b) = (
            mse(&shave(&linear), &shave(&hr)),
            mse(&shave(&bicubic), &shave(&hr)),
        );
        assert!(l < b, "linear {l} vs bicubic {b}");
    }

    #[test]
    fn bad_sizes_and_empty_fits_are_refused() {
        assert!(Fit::new(4, 4).is_err());
        assert!(Fit::new(0, 4).is_err());
        let err = Fit::new(3, 4).unwrap().solve().unwrap_err();
        assert!(err.to_string().contains("no training pairs"), "{err}");
    }
}

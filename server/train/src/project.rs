//! Projection of an SR estimate onto the images that degrade to its input:
//! `y + Dᵀ(DDᵀ)⁻¹(x − Dy)`, with `D` the antialiased bicubic downsampling of
//! the training data. The true HR image is in that set, so the projection
//! never moves an estimate farther from it (in the L2 sense), when `D` is
//! the real degradation.

use tch::{Kind, Tensor};

use crate::data::downsample as down;

/// `Dᵀ v` for an LR-sized `v`, through autograd (D is linear).
fn down_t(v: &Tensor, hr_shape: &[i64], scale: i64) -> Tensor {
    let y = Tensor::zeros(hr_shape, (Kind::Float, v.device())).set_requires_grad(true);
    let out = (down(&y, scale) * v).sum(Kind::Float);
    let grads = Tensor::run_backward(&[out], &[&y], false, false);
    grads[0].shallow_clone()
}

/// `y` projected with `iters` conjugate-gradient iterations on `DDᵀz = x − Dy`.
pub fn project(y: &Tensor, x: &Tensor, scale: i64, iters: usize) -> Tensor {
    let shape = y.size();
    let a = |v: &Tensor| down(&down_t(v, &shape, scale), scale);
    let b = tch::no_grad(|| x - down(y, scale));
    let mut z = b.zeros_like();
    let mut r = b.shallow_clone();
    let mut p = r.shallow_clone();
    let mut rs = r.square().sum(Kind::Double).double_value(&[]);
    for _ in 0..iters {
        if rs < 1e-20 {
            break;
        }
        let ap = a(&p).detach();
        let alpha = rs / (&p * &ap).sum(Kind::Double).double_value(&[]);
        z = &z + &p * alpha;
        r = &r - &ap * alpha;
        let rs_new = r.square().sum(Kind::Double).double_value(&[]);
        p = &r + &p * (rs_new / rs);
        rs = rs_new;
    }
    (y + down_t(&z, &shape, scale).detach()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_projection_degrades_to_the_input_and_moves_closer_to_the_truth() {
        tch::manual_seed(5);
        let hr = (Tensor::rand([1, 1, 32, 40], (Kind::Float, Device::Cpu)) * 0.8 + 0.1).avg_pool2d(
            [3, 3],
            [1, 1],
            [1, 1],
            false,
            true,
            None::<i64>,
        );
        let x = down(&hr, 4);
        // An estimate with both kinds of error: some D sees, some it cannot.
        let y = &hr + Tensor::randn([1, 1, 32, 40], (Kind::Float, Device::Cpu)) * 0.05;
        let p = project(&y, &x, 4, 30);
        let residual = (down(&p, 4) - &x).abs().max().double_value(&[]);
        assert!(
            residual < 1e-3,
            "D(projection) is off the input by {residual}"
        );
        let err = |t: &Tensor| (t - &hr).square().mean(Kind::Double).double_value(&[]);
        assert!(err(&p) < err(&y) * 0.99, "{} vs {}", err(&p), err(&y));
    }
}

//! The degradation the HNDSR model is trained to invert, and the projection
//! of an upscaled image onto the images that degrade exactly to its input.
//!
//! `D` is antialiased bicubic downsampling by the scale
//! (`_upsample_bicubic2d_aa` to the LR size). The projection of an estimate
//! `y` is `y + Dᵀ(DDᵀ)⁻¹(x − Dy)`, the nearest image (in L2) whose `D` is
//! the input `x`; `(DDᵀ)⁻¹` is applied by conjugate gradients on the LR
//! grid, `Dᵀ` is libtorch's backward of `D`. When `x` really is `D` of the
//! true image, the truth is in that set, so the projection never moves an
//! estimate farther from it: it restores what the network left wrong in
//! the band the input carries and leaves the rest alone.

use tch::{Kind, Tensor};

use crate::error::{TchResultExt, TorchError};

/// `D`: the antialiased bicubic downsampling by `scale` of `[N, C, H, W]`
/// (H and W multiples of `scale`). The training data's degradation, before
/// its clamp.
pub fn downsample(hr: &Tensor, scale: i64) -> Result<Tensor, TorchError> {
    let (_, _, h, w) = hr.size4().op("downsample: shape")?;
    hr.f_internal_upsample_bicubic2d_aa([h / scale, w / scale], false, None::<f64>, None::<f64>)
        .op("downsample")
}

/// `Dᵀ v` for an LR-sized `v`, onto `hr_size`.
fn downsample_t(v: &Tensor, hr_size: &[i64]) -> Result<Tensor, TorchError> {
    let lr_size = &v.size()[2..];
    Tensor::f_internal_upsample_bicubic2d_aa_backward(
        v,
        lr_size,
        hr_size,
        false,
        None::<f64>,
        None::<f64>,
    )
    .op("downsample adjoint")
}

/// `y` (`[N, C, s·H, s·W]`) projected onto the images whose [`downsample`]
/// is `x` (`[N, C, H, W]`), with `steps` conjugate-gradient steps, then
/// clamped to [0, 1]. `cancel` is checked before each step. `steps = 0`
/// returns `y` unchanged.
pub fn project(
    y: &Tensor,
    x: &Tensor,
    scale: i64,
    steps: u32,
    cancel: &dyn Fn() -> bool,
) -> Result<Tensor, TorchError> {
    if steps == 0 {
        return Ok(y.shallow_clone());
    }
    let hr_size = y.size();
    let lr_size = x.size();
    let expected: Vec<i64> = hr_size
        .iter()
        .enumerate()
        .map(|(i, &d)| if i >= 2 { d / scale } else { d })
        .collect();
    if hr_size.len() != 4
        || expected != lr_size
        || hr_size[2] % scale != 0
        || hr_size[3] % scale != 0
    {
        return Err(TorchError::InvalidInput(format!(
            "projection: the estimate {hr_size:?} is not ×{scale} of the input {lr_size:?}"
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let dot = |a: &Tensor, b: &Tensor| -> Result<f64, TorchError> {
        (a * b)
            .f_sum(Kind::Double)
            .and_then(|s| s.f_double_value(&[]))
            .op("projection: dot product")
    };
    // Solve DDᵀ z = x − D y.
    let b = (x - downsample(y, scale)?).to_kind(Kind::Float);
    // Own storage each: `z` and `r` are updated in place below.
    let mut z = b.zeros_like();
    let mut r = b.copy();
    let mut p = b;
    let mut rs = dot(&r, &r)?;
    let floor = rs * 1e-12;
    for _ in 0..steps {
        if cancel() {
            return Err(TorchError::Cancelled);
        }
        if rs <= floor || rs == 0.0 {
            break;
        }
        let ap = downsample(&downsample_t(&p, &hr_size)?, scale)?;
        let alpha = rs / dot(&p, &ap)?;
        z += &p * alpha;
        r -= ap * alpha;
        let next = dot(&r, &r)?;
        p = &r + p * (next / rs);
        rs = next;
    }
    (y + downsample_t(&z, &hr_size)?)
        .f_clamp(0.0, 1.0)
        .op("projection: clamp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn smooth(shape: [i64; 4], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        (Tensor::rand(shape, (Kind::Float, Device::Cpu)) * 0.8 + 0.1).avg_pool2d(
            [3, 3],
            [1, 1],
            [1, 1],
            false,
            true,
            None::<i64>,
        )
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn the_adjoint_is_the_transpose_of_the_downsampling() {
        // <D u, v> = <u, Dᵀ v> for random u, v.
        let u = Tensor::randn([1, 3, 24, 20], (Kind::Double, Device::Cpu));
        let v = Tensor::randn([1, 3, 6, 5], (Kind::Double, Device::Cpu));
        let left = (downsample(&u, 4).unwrap() * &v)
            .sum(Kind::Double)
            .double_value(&[]);
        let right = (&u * downsample_t(&v, &u.size()).unwrap())
            .sum(Kind::Double)
            .double_value(&[]);
        assert!(
            (left - right).abs() < 1e-9 * left.abs().max(1.0),
            "{left} vs {right}"
        );
    }

    #[test]
    fn the_projection_degrades_to_the_input_and_moves_closer_to_the_truth() {
        let hr = smooth([1, 3, 32, 40], 5);
        let x = downsample(&hr, 4).unwrap();
        // An estimate with both kinds of error: some D sees, some it cannot.
        let y = (&hr + Tensor::randn([1, 3, 32, 40], (Kind::Float, Device::Cpu)) * 0.05)
            .clamp(0.0, 1.0);
        let p = project(&y, &x, 4, 30, &never).unwrap();
        let residual = (downsample(&p, 4).unwrap() - &x)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            residual < 1e-3,
            "D(projection) is off the input by {residual}"
        );
        let err = |t: &Tensor| (t - &hr).square().mean(Kind::Double).double_value(&[]);
        assert!(err(&p) < err(&y) * 0.95, "{} vs {}", err(&p), err(&y));
        // An image already consistent with its input stays as it was.
        let again = project(&hr, &x, 4, 30, &never).unwrap();
        assert!((again - &hr).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn zero_steps_is_the_identity_and_cancellation_stops_it() {
        let hr = smooth([1, 1, 16, 16], 6);
        let x = downsample(&hr, 4).unwrap();
        let y = hr.zeros_like();
        assert!(project(&y, &x, 4, 0, &never).unwrap().equal(&y));
        let err = project(&y, &x, 4, 5, &|| true).unwrap_err();
        assert!(matches!(err, TorchError::Cancelled), "{err:?}");
    }

    #[test]
    fn an_estimate_of_another_size_is_refused() {
        let x = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([1, 3, 30, 32], (Kind::Float, Device::Cpu));
        let err = project(&y, &x, 4, 3, &never).unwrap_err();
        assert!(matches!(err, TorchError::InvalidInput(_)), "{err:?}");
    }
}

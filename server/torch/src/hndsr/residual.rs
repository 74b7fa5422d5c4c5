//! The residual the denoiser works on: `HR − μ` in the denoiser's units,
//! pixel-unshuffled onto the LR grid. Training ([`encode`]) and sampling
//! ([`decode`]) share one definition of those units, [`gain`].
//!
//! With [`ResidualNorm::Detail`] the units are per sample: the residual is
//! divided by the RMS of the input's own fine detail ([`detail_rms`]). Residual
//! energy differs about tenfold between sources (a Landsat tile against a
//! meadow photograph); one global scale leaves the denoiser with inputs of
//! very different variance, and its noise schedule fits none of them. μ is
//! known when sampling, so the same figure can be computed on both sides.

use tch::{Kind, Tensor};

use super::config::{HndsrConfig, ResidualNorm};

/// Smallest detail RMS the per-sample gain divides by (one 8-bit level):
/// a flat tile has almost no detail, and its residual is noise-sized.
pub const DETAIL_FLOOR: f64 = 1.0 / 255.0;

/// RMS per sample of the input's own fine detail: `L − mean₃ₓ₃(L)` with
/// `L = box↓(μ)` (the LR image μ stands for), as f32 `[B, 1, 1, 1]`. `mu`
/// is `[B, C, s·h, s·w]`. What the regression cannot restore scales with
/// the detail the input already shows; on the validation split this leaves
/// the normalised residual's energy within about 3× across sources (one
/// global scale: about 25×).
pub fn detail_rms(mu: &Tensor, scale: i64) -> Tensor {
    let b = mu.size()[0];
    let lr = mu.to_kind(Kind::Float).avg_pool2d(
        [scale, scale],
        [scale, scale],
        [0, 0],
        false,
        true,
        None::<i64>,
    );
    let low = lr.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>);
    (lr - low)
        .square()
        .view([b, -1])
        .mean_dim(1, true, Kind::Float)
        .sqrt()
        .view([b, 1, 1, 1])
}

/// Per-sample factor from `HR − μ` (image units) to the denoiser's units,
/// f32 `[B, 1, 1, 1]`.
pub fn gain(cfg: &HndsrConfig, mu: &Tensor) -> Tensor {
    match cfg.residual_norm {
        ResidualNorm::Global => Tensor::full(
            [mu.size()[0], 1, 1, 1],
            cfg.residual_scale,
            (Kind::Float, mu.device()),
        ),
        ResidualNorm::Detail => {
            detail_rms(mu, cfg.scale)
                .clamp_min(DETAIL_FLOOR)
                .reciprocal()
                * cfg.residual_scale
        }
    }
}

/// The denoiser's clean sample for `hr`: `((HR − μ) · gain)` unshuffled,
/// `[B, C·s², h, w]` f32.
pub fn encode(cfg: &HndsrConfig, hr: &Tensor, mu: &Tensor) -> Tensor {
    ((hr.to_kind(Kind::Float) - mu.to_kind(Kind::Float)) * gain(cfg, mu)).pixel_unshuffle(cfg.scale)
}

/// Inverse of [`encode`]: the residual `[B, C, s·h, s·w]` (f32, image
/// units) that the denoiser's sample `x` stands for, given the same μ.
pub fn decode(cfg: &HndsrConfig, x: &Tensor, mu: &Tensor) -> Tensor {
    (x.to_kind(Kind::Float) / gain(cfg, mu)).pixel_shuffle(cfg.scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn cfg(residual_norm: ResidualNorm) -> HndsrConfig {
        HndsrConfig {
            residual_norm,
            residual_scale: 2.0,
            ..HndsrConfig::tiny()
        }
    }

    /// A 16² image with `amplitude` of detail on its 4² LR grid.
    fn textured(seed: i64, amplitude: f64) -> Tensor {
        tch::manual_seed(seed);
        (Tensor::rand([1, 3, 4, 4], (Kind::Float, Device::Cpu)) * amplitude + 0.3)
            .upsample_nearest2d([16, 16], None::<f64>, None::<f64>)
    }

    #[test]
    fn global_units_are_the_configured_scale_for_every_sample() {
        let mu = Tensor::cat(&[textured(1, 0.01), textured(2, 0.4)], 0);
        let g = gain(&cfg(ResidualNorm::Global), &mu);
        assert_eq!(Vec::<f32>::try_from(g.flatten(0, -1)).unwrap(), [2.0, 2.0]);
    }

    #[test]
    fn detail_units_follow_each_samples_detail_and_stop_at_the_floor() {
        let busy = textured(3, 0.4);
        let calm = (&busy - 0.3) * 0.25 + 0.3;
        let flat = Tensor::full([1, 3, 16, 16], 0.5, (Kind::Float, Device::Cpu));
        let mu = Tensor::cat(&[&busy, &calm, &flat], 0);
        let g = Vec::<f64>::try_from(gain(&cfg(ResidualNorm::Detail), &mu).flatten(0, -1)).unwrap();
        // A quarter of the detail, four times the gain.
        assert!((g[1] / g[0] - 4.0).abs() < 1e-3, "{g:?}");
        assert!((g[2] - 2.0 / DETAIL_FLOOR).abs() < 1e-2, "{g:?}");
        assert!(g[0] > 2.0 && g[0] < 2.0 / DETAIL_FLOOR, "{g:?}");
    }

    #[test]
    fn decode_undoes_encode_per_sample() {
        for norm in [ResidualNorm::Global, ResidualNorm::Detail] {
            let cfg = cfg(norm);
            let mu = Tensor::cat(&[textured(4, 0.05), textured(5, 0.3)], 0);
            let hr = &mu + Tensor::cat(&[textured(6, 0.02), textured(7, 0.2)], 0) - 0.3;
            let x = encode(&cfg, &hr, &mu);
            assert_eq!(x.size(), [2, 3 * 16, 4, 4]);
            let back = decode(&cfg, &x, &mu) + &mu;
            let err = (back - &hr).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{norm:?}: {err}");
        }
    }

    #[test]
    fn detail_normalised_residuals_of_different_energy_come_out_alike() {
        // Two tiles whose residual and detail differ tenfold: one unit.
        let cfg = cfg(ResidualNorm::Detail);
        let busy = textured(8, 0.3);
        let calm = (&busy - 0.3) * 0.1 + 0.3;
        let r = textured(9, 0.2) - 0.3;
        let x_busy = encode(&cfg, &(&busy + &r), &busy);
        let x_calm = encode(&cfg, &(&calm + &r * 0.1), &calm);
        let err = (x_busy - x_calm).abs().max().double_value(&[]);
        assert!(err < 1e-3, "{err}");
    }
}

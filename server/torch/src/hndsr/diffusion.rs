//! Cosine noise schedule, seeded noise and deterministic DDIM (η = 0).
//!
//! Time is continuous, `t ∈ [0, 1]`; `ᾱ(t) = cos²(((t + s)/(1 + s))·π/2)`
//! normalised so `ᾱ(0) = 1`, with `s = 0.008`. `α = √ᾱ`, `σ = √(1 − ᾱ)`.

use tch::{Device, Kind, Tensor};

use super::config::Prediction;

const COSINE_OFFSET: f64 = 0.008;

/// `(α, σ)` at time `t`.
pub fn alpha_sigma(t: f64) -> (f64, f64) {
    let f =
        |t: f64| ((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * std::f64::consts::FRAC_PI_2).cos();
    let abar = (f(t) / f(0.0)).powi(2).clamp(0.0, 1.0);
    (abar.sqrt(), (1.0 - abar).sqrt())
}

/// Per-sample `(α, σ)` for a tensor of times `[B]`, shaped `[B, 1, 1, 1]`.
pub fn alpha_sigma_tensor(t: &Tensor) -> (Tensor, Tensor) {
    let f0 = (COSINE_OFFSET / (1.0 + COSINE_OFFSET) * std::f64::consts::FRAC_PI_2).cos();
    let f: Tensor =
        ((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * std::f64::consts::FRAC_PI_2).cos() / f0;
    let abar = (&f * &f).clamp(0.0, 1.0);
    let alpha = abar.sqrt().view([-1, 1, 1, 1]);
    let sigma = (abar.ones_like() - &abar)
        .clamp_min(0.0)
        .sqrt()
        .view([-1, 1, 1, 1]);
    (alpha, sigma)
}

/// Training target for the denoiser given clean `x0`, noise `eps` and the
/// per-sample `(α, σ)`.
pub fn target(
    prediction: Prediction,
    x0: &Tensor,
    eps: &Tensor,
    alpha: &Tensor,
    sigma: &Tensor,
) -> Tensor {
    match prediction {
        Prediction::V => alpha * eps - sigma * x0,
        Prediction::X0 => x0.shallow_clone(),
    }
}

/// `(x̂₀, ε̂)` from the network output at `(α, σ)`.
pub fn split_prediction(
    prediction: Prediction,
    out: &Tensor,
    x_t: &Tensor,
    alpha: f64,
    sigma: f64,
) -> (Tensor, Tensor) {
    match prediction {
        Prediction::V => {
            let x0 = x_t * alpha - out * sigma;
            let eps = x_t * sigma + out * alpha;
            (x0, eps)
        }
        Prediction::X0 => {
            let x0 = out.shallow_clone();
            // At σ → 0 the noise is irrelevant (α' x̂₀ + σ' ε̂ with σ' ≤ σ).
            let eps = if sigma > 1e-6 {
                (x_t - &x0 * alpha) / sigma
            } else {
                x_t.zeros_like()
            };
            (x0, eps)
        }
    }
}

/// The DDIM time grid for `steps` steps from `start`:
/// `start = t₀ > t₁ > … > t_steps = 0`, evenly spaced.
pub fn time_grid(start: f64, steps: u32) -> Vec<f64> {
    (0..=steps)
        .rev()
        .map(|k| start * f64::from(k) / f64::from(steps))
        .collect()
}

/// SplitMix64: a tiny, well-mixed generator. Noise is produced on the host
/// from it so a seed means the same noise on every device and every
/// libtorch build, and no global torch RNG state is shared between threads.
/// Deterministic DDIM (η = 0) from `x` at `t = start` down to `t = 0` in
/// `steps` evenly spaced steps. `predict(x_t, t)` returns the network's
/// output for `prediction` (f32, shaped like `x`). `cancel` runs before each
/// step; `None` means it asked to stop and no further step ran.
pub fn ddim(
    mut x: Tensor,
    start: f64,
    steps: u32,
    prediction: Prediction,
    cancel: &dyn Fn() -> bool,
    mut predict: impl FnMut(&Tensor, f64) -> Tensor,
) -> Option<Tensor> {
    for pair in time_grid(start, steps).windows(2) {
        if cancel() {
            return None;
        }
        let (t, t_next) = (pair[0], pair[1]);
        let out = predict(&x, t);
        let (alpha, sigma) = alpha_sigma(t);
        let (x0, eps) = split_prediction(prediction, &out, &x, alpha, sigma);
        let (a_next, s_next) = alpha_sigma(t_next);
        x = x0 * a_next + eps * s_next;
    }
    Some(x)
}

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// `n` standard normal samples (Box–Muller) from `seed`, on the host: the
/// definition of the noise stream [`normal_noise_on`] computes on a device.
pub fn normal_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_unit(), rng.next_unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// SplitMix64's increment and output mix, as wrapping `i64` constants for
/// tensor arithmetic (the same bits as the `u64` ones).
const GOLDEN: i64 = 0x9E37_79B9_7F4A_7C15_u64 as i64;
const MIX1: i64 = 0xBF58_476D_1CE4_E5B9_u64 as i64;
const MIX2: i64 = 0x94D0_49BB_1331_11EB_u64 as i64;

/// `x >>> k` on an `i64` tensor (the logical shift SplitMix64 uses; torch's
/// is arithmetic on signed integers).
fn shr(x: &Tensor, k: i64) -> Tensor {
    x.bitwise_right_shift_tensor_scalar(k)
        .bitwise_and((1_i64 << (64 - k)) - 1)
}

/// SplitMix64's output function on every element of an `i64` tensor
/// (wrapping arithmetic, two's complement: the bits of the `u64` version).
fn mix64(z: &Tensor) -> Tensor {
    let z = (z.bitwise_xor_tensor(&shr(z, 30))) * MIX1;
    let z = (z.bitwise_xor_tensor(&shr(&z, 27))) * MIX2;
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// [`normal_noise`] computed on `device` with tensor operations: the same
/// stream (output `k` of SplitMix64 is the mix of `seed + (k + 1)·golden`,
/// so every sample is computed independently) and the same Box–Muller
/// pairs, as an `[n]` f32 tensor. Nothing crosses from the host but the
/// seed.
pub fn normal_noise_on(seed: u64, n: usize, device: Device) -> Tensor {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let pairs = (n + 1) / 2;
    let k = Tensor::arange(2 * pairs, (Kind::Int64, device));
    #[allow(clippy::cast_possible_wrap)]
    let state = (k + 1) * GOLDEN + seed as i64;
    let bits = mix64(&state);
    // ((z >>> 11) + 1) / 2^53: uniform in (0, 1], exactly as next_unit.
    let unit = (shr(&bits, 11).to_kind(Kind::Double) + 1.0) / 9_007_199_254_740_992.0;
    let unit = unit.view([pairs, 2]);
    let (u1, u2) = (unit.select(1, 0), unit.select(1, 1));
    let r = (u1.log() * -2.0).sqrt();
    let a = u2 * std::f64::consts::TAU;
    Tensor::stack(&[&r * a.cos(), r * a.sin()], 1)
        .view([2 * pairs])
        .narrow(0, 0, n)
        .to_kind(Kind::Float)
}

/// A content hash of a tile, computed where the tile is: the f32 bits of
/// every sample times a per-position SplitMix64 weight, summed with
/// wrapping `i64` arithmetic, then mixed once on the host. Only the sum
/// crosses to the host; tiles that differ in any sample get different
/// noise, and a tile gets the same noise wherever it sits in a batch.
pub fn content_hash_on(x: &Tensor) -> u64 {
    let bits = x
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1])
        .view_dtype(Kind::Int)
        .to_kind(Kind::Int64);
    let k = Tensor::arange(bits.size()[0], (Kind::Int64, x.device()));
    let weights = mix64(&((k + 1) * GOLDEN));
    let sum = (bits * weights).sum(Kind::Int64).int64_value(&[]);
    #[allow(clippy::cast_sign_loss)]
    SplitMix64::new(sum as u64).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_on_a_device_is_the_host_stream() {
        for (seed, n) in [
            (0_u64, 1_usize),
            (7, 10),
            (u64::MAX, 1001),
            (0x1234_5678_9ABC, 4096),
        ] {
            let host = normal_noise(seed, n);
            let device = Vec::<f32>::try_from(&normal_noise_on(seed, n, Device::Cpu)).unwrap();
            assert_eq!(device.len(), n);
            let worst = host
                .iter()
                .zip(&device)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0_f32, f32::max);
            assert!(worst < 1e-6, "seed {seed}, n {n}: {worst}");
        }
    }

    #[test]
    fn the_device_content_hash_tells_tiles_apart() {
        let a = Tensor::from_slice(&[0.25_f32, 0.5, 0.75, 1.0]).view([1, 1, 2, 2]);
        let b = Tensor::from_slice(&[0.25_f32, 0.5, 0.75, 0.999]).view([1, 1, 2, 2]);
        let swapped = Tensor::from_slice(&[0.5_f32, 0.25, 0.75, 1.0]).view([1, 1, 2, 2]);
        assert_eq!(content_hash_on(&a), content_hash_on(&a.copy()));
        assert_ne!(content_hash_on(&a), content_hash_on(&b));
        assert_ne!(
            content_hash_on(&a),
            content_hash_on(&swapped),
            "positions count"
        );
    }

    /// With a predictor that knows the clean sample, DDIM must return it
    /// exactly, for both parameterisations and any step count: this pins
    /// the x̂₀ / ε̂ conversions and the update against the training target.
    #[test]
    fn ddim_with_an_oracle_predictor_returns_the_clean_sample() {
        let x0 = Tensor::randn([2, 3, 5, 4], (Kind::Float, Device::Cpu)) * 0.3;
        let noise = Tensor::randn([2, 3, 5, 4], (Kind::Float, Device::Cpu));
        for prediction in [Prediction::V, Prediction::X0] {
            for steps in [1, 4, 20] {
                let oracle = |x_t: &Tensor, t: f64| {
                    let (alpha, sigma) = alpha_sigma(t);
                    let eps = (x_t - &x0 * alpha) / sigma.max(1e-12);
                    let a = Tensor::from(alpha as f32);
                    let s = Tensor::from(sigma as f32);
                    target(prediction, &x0, &eps, &a, &s)
                };
                for start in [1.0, 0.6] {
                    let (alpha, sigma) = alpha_sigma(start);
                    let x = if start < 1.0 {
                        &x0 * alpha + &noise * sigma
                    } else {
                        noise.shallow_clone()
                    };
                    let out = ddim(x, start, steps, prediction, &|| false, oracle)
                        .expect("not cancelled");
                    let err = (&out - &x0).abs().max().double_value(&[]);
                    assert!(
                        err < 1e-4,
                        "{prediction:?}, {steps} steps from {start}: max error {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_truncated_grid_starts_where_asked_and_ends_clean() {
        assert_eq!(time_grid(1.0, 4), [1.0, 0.75, 0.5, 0.25, 0.0]);
        let grid = time_grid(0.8, 4);
        assert_eq!(grid.len(), 5);
        assert!((grid[0] - 0.8).abs() < 1e-12 && grid[4] == 0.0);
        assert!(grid.windows(2).all(|p| (p[0] - p[1] - 0.2).abs() < 1e-12));
    }

    #[test]
    fn ddim_stops_before_the_next_step_when_cancelled() {
        let calls = std::cell::Cell::new(0);
        let cancel = || {
            calls.set(calls.get() + 1);
            calls.get() > 2
        };
        let mut predicted = 0;
        let out = ddim(
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            1.0,
            10,
            Prediction::V,
            &cancel,
            |x, _| {
                predicted += 1;
                x.zeros_like()
            },
        );
        assert!(out.is_none());
        assert_eq!(predicted, 2);
    }
}

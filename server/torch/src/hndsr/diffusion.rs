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

/// The DDIM time grid for `steps` steps: `1 = t₀ > t₁ > … > t_steps = 0`.
pub fn time_grid(steps: u32) -> Vec<f64> {
    (0..=steps)
        .rev()
        .map(|k| f64::from(k) / f64::from(steps))
        .collect()
}

/// SplitMix64: a tiny, well-mixed generator. Noise is produced on the host
/// from it so a seed means the same noise on every device and every
/// libtorch build, and no global torch RNG state is shared between threads.
/// Deterministic DDIM (η = 0) from `x` at `t = 1` down to `t = 0` in
/// `steps` evenly spaced steps. `predict(x_t, t)` returns the network's
/// output for `prediction` (f32, shaped like `x`). `cancel` runs before each
/// step; `None` means it asked to stop and no further step ran.
pub fn ddim(
    mut x: Tensor,
    steps: u32,
    prediction: Prediction,
    cancel: &dyn Fn() -> bool,
    mut predict: impl FnMut(&Tensor, f64) -> Tensor,
) -> Option<Tensor> {
    for pair in time_grid(steps).windows(2) {
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

/// `n` standard normal samples (Box–Muller) from `seed`.
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

/// FNV-1a over the bytes of a CPU f32 tensor: a cheap content hash.
pub fn content_hash(x: &Tensor) -> u64 {
    let flat = x
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    let values = Vec::<f32>::try_from(&flat).expect("f32 tensor to vec");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

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
                let out = ddim(noise.shallow_clone(), steps, prediction, &|| false, oracle)
                    .expect("not cancelled");
                let err = (&out - &x0).abs().max().double_value(&[]);
                assert!(err < 1e-4, "{prediction:?}, {steps} steps: max error {err}");
            }
        }
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

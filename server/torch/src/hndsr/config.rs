//! Model hyper-parameters, serialised into the weights manifest so a weight
//! file always travels with the shape of the network that reads it.

use serde::{Deserialize, Serialize};

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// v = α·ε − σ·x₀ (stable at both ends of the schedule).
    V,
    /// The clean residual x₀ directly.
    X0,
}

/// The regression path's body on the LR grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoder {
    /// HNDSR's operator encoder: `blocks` Fourier blocks of `width`
    /// channels (a spectral convolution with `modes` modes, a gated
    /// depthwise 3×3, a pointwise 1×1 and a dense 3×3 pair of `local`
    /// hidden channels), then a 3×3 conv + GELU before the shuffle conv.
    /// `modes: 0` drops the spectral convolution (its ablation).
    #[default]
    Fourier,
    /// The literature baseline: IMDN's body (Hui et al., "Lightweight Image
    /// Super-Resolution with Information Multi-distillation Network", ACM
    /// MM 2019): `blocks` information multi-distillation blocks of `width`
    /// channels with contrast-aware channel attention, a 1×1 fusion of
    /// every block's output, a 3×3 conv and a long skip, then one 3×3 conv
    /// into the pixel shuffle. `modes` and `local` are unused.
    Imdn,
}

impl Encoder {
    /// Name for tables and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Fourier => "HNDSR (Fourier)",
            Self::Imdn => "IMDN",
        }
    }
}

/// How the residual `HR − μ` is brought to the denoiser's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidualNorm {
    /// `(HR − μ) · residual_scale` for every sample alike.
    #[default]
    Global,
    /// `(HR − μ) · residual_scale / d(μ)` per sample, where `d(μ)` is the
    /// RMS of the input's own fine detail (floored; `residual.rs`):
    /// residual energy differs more than tenfold between sources, and μ,
    /// unlike HR, is known when sampling.
    Detail,
}

/// A preset's constructor.
pub type Preset = fn() -> HndsrConfig;

/// Shape of an HNDSR network. The upscaling factor is fixed per network
/// (decoder = conv + pixel shuffle); the operator encoder's weights do not
/// depend on the grid size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HndsrConfig {
    /// Preset name (`tiny`, `small`, `base`) or a custom label.
    pub name: String,
    /// Colour channels the network sees (3; gray images are replicated).
    pub channels: i64,
    /// Fixed upscaling factor.
    pub scale: i64,
    /// The regression path's body (a manifest without the field is HNDSR's
    /// own, [`Encoder::Fourier`]).
    #[serde(default)]
    pub encoder: Encoder,
    /// Operator encoder width (channels on the LR grid).
    pub width: i64,
    /// Number of Fourier blocks.
    pub blocks: i64,
    /// Kept Fourier modes per axis (clipped to what a small grid has); 0
    /// leaves the Fourier blocks without their spectral convolution.
    pub modes: i64,
    /// Hidden channels of the dense 3×3 conv pair each Fourier block adds
    /// for local detail (0 = none; the first `small` weights, 0.1.0, have
    /// none, so a manifest without the field reads as 0).
    #[serde(default)]
    pub local: i64,
    /// Reflect padding (LR pixels) around the grid before the Fourier blocks,
    /// so their periodic boundary does not wrap one image edge onto the other.
    pub pad: i64,
    /// Denoiser U-Net channels per level (each level halves the grid).
    pub unet: Vec<i64>,
    /// Denoiser target.
    pub prediction: Prediction,
    /// The residual `HR − μ` is multiplied by this before diffusion so the
    /// denoiser works on roughly unit-variance data.
    pub residual_scale: f64,
    /// Per-sample or global residual scaling (a manifest without the field
    /// reads as [`ResidualNorm::Global`]).
    #[serde(default)]
    pub residual_norm: ResidualNorm,
    /// Where sampling starts on the noise schedule, in (0, 1]: from
    /// `σ(start)·ε` around μ (a zero residual) rather than from pure noise
    /// at 1, so the steps are spent where the residual is still visible.
    /// The denoiser trains on `t ∈ (0, start]` (a manifest without the
    /// field reads as 1, the full schedule).
    #[serde(default = "full_schedule")]
    pub start_time: f64,
}

const fn full_schedule() -> f64 {
    1.0
}

impl HndsrConfig {
    /// ≈0.6 M parameters: for tests and CPU smoke runs.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            channels: 3,
            scale: 4,
            encoder: Encoder::Fourier,
            width: 16,
            blocks: 2,
            modes: 8,
            local: 8,
            pad: 4,
            unet: vec![32, 64],
            prediction: Prediction::V,
            residual_scale: 10.0,
            residual_norm: ResidualNorm::Global,
            start_time: 1.0,
        }
    }

    /// A CPU-trainable middle size (width 24, 3 blocks, 12 modes, local 48).
    pub fn small() -> Self {
        Self {
            name: "small".into(),
            width: 24,
            blocks: 3,
            modes: 12,
            local: 48,
            unet: vec![32, 64, 64],
            ..Self::tiny()
        }
    }

    /// Deeper than `small` (6 blocks, width 32, local 64: 3.5× its local
    /// 3×3 compute) with fewer Fourier modes; ≈2.6 M parameters. Trains at
    /// about 0.22 s per step (batch 8, 96² crops) on two CPU cores. Its
    /// residual scale is 30, which brings the residual near unit variance
    /// (at 10 the denoiser did worse than predicting zero from mid noise
    /// levels up: `hndsr-train probe`, docs/model.md).
    pub fn medium() -> Self {
        Self {
            name: "medium".into(),
            width: 32,
            blocks: 6,
            modes: 8,
            local: 64,
            residual_scale: 30.0,
            ..Self::small()
        }
    }

    /// ≈7 M parameters: the design size from `shared/design/MODEL.md`.
    pub fn base() -> Self {
        Self {
            name: "base".into(),
            width: 32,
            blocks: 4,
            modes: 16,
            local: 64,
            unet: vec![64, 128, 128],
            ..Self::tiny()
        }
    }

    /// `medium` without the spectral convolutions (`modes: 0`): the
    /// ablation that shows what the Fourier layers add.
    pub fn medium_no_spectral() -> Self {
        Self {
            name: "medium-no-spectral".into(),
            modes: 0,
            ..Self::medium()
        }
    }

    /// IMDN as published for ×4 (64 channels, 6 blocks; ≈0.7 M parameters
    /// in the regression path) behind HNDSR's interface, with `medium`'s
    /// denoiser: the literature baseline HNDSR is measured against.
    pub fn imdn() -> Self {
        Self {
            name: "imdn".into(),
            encoder: Encoder::Imdn,
            width: 64,
            blocks: 6,
            modes: 0,
            local: 0,
            ..Self::medium()
        }
    }

    /// HNDSR's blocks without the spectral convolutions, wider and deeper
    /// (width 48, 8 blocks, local 96; ≈0.75 M parameters in the regression
    /// path, IMDN's size): the design that matches IMDN trained the same
    /// way, where the spectral branch added nothing (docs/model.md). Its
    /// refiner works on per-sample residual units from `t = 0.8`.
    pub fn wide() -> Self {
        Self {
            name: "wide".into(),
            width: 48,
            blocks: 8,
            modes: 0,
            local: 96,
            residual_scale: 1.0,
            residual_norm: ResidualNorm::Detail,
            start_time: 0.8,
            ..Self::medium()
        }
    }

    /// Every preset, by name: the one table [`HndsrConfig::preset`] reads.
    pub const PRESETS: [(&'static str, Preset); 7] = [
        ("tiny", Self::tiny),
        ("small", Self::small),
        ("medium", Self::medium),
        ("base", Self::base),
        ("medium-no-spectral", Self::medium_no_spectral),
        ("imdn", Self::imdn),
        ("wide", Self::wide),
    ];

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        Self::PRESETS
            .iter()
            .find(|(preset, _)| *preset == name)
            .map(|(_, make)| make())
    }

    /// Name of the regression path's body for tables and logs (HNDSR's
    /// blocks without spectral convolutions say so).
    pub fn body_label(&self) -> &'static str {
        match self.encoder {
            Encoder::Fourier if self.modes == 0 => "HNDSR (no spectral convolutions)",
            encoder => encoder.label(),
        }
    }

    /// The denoiser works on `pixel_unshuffle(residual, scale)`.
    pub fn unshuffled_channels(&self) -> i64 {
        self.channels * self.scale * self.scale
    }

    /// Checks the invariants the network relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.channels < 1
            || self.scale < 1
            || self.width < 1
            || self.blocks < 1
            || self.modes < 0
            || self.local < 0
        {
            return Err(format!("non-positive size in {self:?}"));
        }
        // IMDN splits a quarter of each block's channels off three times.
        if self.encoder == Encoder::Imdn && (self.width < 8 || self.width % 4 != 0) {
            return Err(format!(
                "an IMDN encoder needs a width that is a multiple of 4 and at least 8, got {}",
                self.width
            ));
        }
        if self.unet.is_empty() || self.unet.iter().any(|&c| c < 8 || c % 8 != 0) {
            return Err(format!(
                "unet channels must be non-empty multiples of 8 (group norm), got {:?}",
                self.unet
            ));
        }
        if self.pad < 0 || self.residual_scale.is_nan() || self.residual_scale <= 0.0 {
            return Err("pad must be >= 0 and residual_scale > 0".into());
        }
        if !(self.start_time > 0.0 && self.start_time <= 1.0) {
            return Err(format!(
                "start_time must be in (0, 1], got {}",
                self.start_time
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_config_without_local_reads_as_no_local_branch() {
        let mut json = serde_json::to_value(HndsrConfig::small()).unwrap();
        json.as_object_mut().unwrap().remove("local");
        let cfg: HndsrConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.local, 0);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn a_manifest_config_without_encoder_reads_as_hndsrs_own() {
        let mut json = serde_json::to_value(HndsrConfig::medium()).unwrap();
        json.as_object_mut().unwrap().remove("encoder");
        let cfg: HndsrConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg, HndsrConfig::medium());
    }

    #[test]
    fn a_manifest_config_without_the_refiner_fields_reads_as_the_global_full_schedule() {
        let mut json = serde_json::to_value(HndsrConfig::medium()).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("residual_norm");
        fields.remove("start_time");
        let cfg: HndsrConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.residual_norm, ResidualNorm::Global);
        assert_eq!(cfg.start_time, 1.0);
        assert_eq!(cfg, HndsrConfig::medium());
    }

    #[test]
    fn a_start_time_outside_the_schedule_is_refused() {
        for start_time in [0.0, -0.5, 1.5, f64::NAN] {
            let cfg = HndsrConfig {
                start_time,
                ..HndsrConfig::tiny()
            };
            assert!(
                cfg.validate().unwrap_err().contains("start_time"),
                "{start_time}"
            );
        }
    }

    #[test]
    fn every_preset_name_is_known_and_valid() {
        for (name, _) in HndsrConfig::PRESETS {
            let cfg = HndsrConfig::preset(name).unwrap();
            assert_eq!(cfg.name, name);
            assert_eq!(cfg.validate(), Ok(()), "{name}");
        }
        assert_eq!(HndsrConfig::preset("huge"), None);
    }

    #[test]
    fn tables_name_the_body_with_or_without_spectral_convolutions() {
        assert_eq!(HndsrConfig::medium().body_label(), "HNDSR (Fourier)");
        assert_eq!(
            HndsrConfig::wide().body_label(),
            "HNDSR (no spectral convolutions)"
        );
        assert_eq!(HndsrConfig::imdn().body_label(), "IMDN");
    }

    #[test]
    fn an_imdn_width_that_cannot_be_split_is_refused() {
        let cfg = HndsrConfig {
            width: 30,
            ..HndsrConfig::imdn()
        };
        assert!(cfg.validate().unwrap_err().contains("multiple of 4"));
    }

    #[test]
    fn a_negative_local_width_is_refused() {
        let cfg = HndsrConfig {
            local: -1,
            ..HndsrConfig::tiny()
        };
        assert!(cfg.validate().is_err());
    }
}

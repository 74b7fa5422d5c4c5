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
    /// Operator encoder width (channels on the LR grid).
    pub width: i64,
    /// Number of Fourier blocks.
    pub blocks: i64,
    /// Kept Fourier modes per axis (clipped to what a small grid has).
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
}

impl HndsrConfig {
    /// ≈0.6 M parameters: for tests and CPU smoke runs.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            channels: 3,
            scale: 4,
            width: 16,
            blocks: 2,
            modes: 8,
            local: 8,
            pad: 4,
            unet: vec![32, 64],
            prediction: Prediction::V,
            residual_scale: 10.0,
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

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "medium" => Some(Self::medium()),
            "base" => Some(Self::base()),
            _ => None,
        }
    }

    /// The denoiser works on `pixel_unshuffle(residual, scale)`.
    pub fn unshuffled_channels(&self) -> i64 {
        self.channels * self.scale * self.scale
    }

    /// Checks the invariants the network relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.channels < 1 || self.scale < 1 || self.width < 1 || self.modes < 1 || self.local < 0
        {
            return Err(format!("non-positive size in {self:?}"));
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
    fn a_negative_local_width_is_refused() {
        let cfg = HndsrConfig {
            local: -1,
            ..HndsrConfig::tiny()
        };
        assert!(cfg.validate().is_err());
    }
}

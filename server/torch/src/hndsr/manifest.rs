//! The manifest that travels with a weight file: what the weights are, how
//! they were made, and how well they do. `<name>.safetensors` comes with
//! `<name>.json` ([`manifest_path`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::HndsrError;
use super::config::HndsrConfig;

/// Model family name written into every manifest.
pub const MODEL_NAME: &str = "hndsr";

/// The manifest next to a weight file: same stem, `.json` extension.
pub fn manifest_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// How the weights were produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Data sources, with package versions and the held-out split.
    pub data: Vec<String>,
    /// The command line that trained the weights.
    pub command: String,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Anything a reader needs to reproduce or judge the run.
    pub notes: String,
}

/// One measured evaluation figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalFigure {
    /// Evaluation set (source and held-out region).
    pub source: String,
    /// `bicubic` or `hndsr`.
    pub method: String,
    /// DDIM steps (`None` for bicubic).
    pub steps: Option<u32>,
    /// PSNR in dB.
    pub psnr_db: f64,
    /// SSIM.
    pub ssim: f64,
}

/// The inputs a set of weights was trained for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inputs {
    /// The one degradation the training pairs were made with (antialiased
    /// bicubic ÷ scale, 8 bits): what the LR-consistency projection inverts.
    #[default]
    Matched,
    /// Real-sensor-like inputs: unknown blur, noise and JPEG on top of the
    /// downsampling. The projection does not apply to them.
    Realistic,
}

impl Inputs {
    /// The name in manifests, flags and `/v1/info`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Realistic => "realistic",
        }
    }
}

impl std::str::FromStr for Inputs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "matched" => Ok(Self::Matched),
            "realistic" => Ok(Self::Realistic),
            other => Err(format!("inputs {other:?}: expected matched or realistic")),
        }
    }
}

/// Everything known about one weight file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MODEL_NAME`].
    pub model: String,
    /// Weights version, e.g. `0.1.0-small`.
    pub version: String,
    /// Network shape.
    pub config: HndsrConfig,
    /// Fixed upscaling factor.
    pub scale: i64,
    /// Weight file name, relative to the manifest.
    pub weights: String,
    /// Lower-case hex sha256 of the weight file.
    pub sha256: String,
    /// Scalar parameters.
    pub parameters: i64,
    /// How the weights were trained.
    pub training: TrainingInfo,
    /// Measured figures (empty until evaluated).
    pub eval: Vec<EvalFigure>,
    /// DDIM steps to serve when the deployment names none: the step count
    /// these weights were evaluated best at (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_steps: Option<u32>,
    /// Whether servers should compute μ as a geometric self-ensemble when
    /// their deployment does not say (absent in older manifests: no).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_ensemble: Option<bool>,
    /// LR tile edge servers should cut images into when their deployment
    /// does not say: the LR size of the training crops, the domain on which
    /// the Fourier layers learned their modes (absent in older manifests:
    /// [`super::DEFAULT_TILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<i64>,
    /// Conjugate-gradient steps of the LR-consistency projection servers
    /// should run when their deployment does not say (absent in older
    /// manifests: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_steps: Option<u32>,
    /// Share of the refiner's sampled residual added to μ at `steps > 0`,
    /// in (0, 1] (absent in older manifests: 1, all of it). Below 1 the
    /// output trades some of the restored detail for fidelity: chosen on
    /// validation ([`super::check_refiner_strength`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner_strength: Option<f64>,
    /// The inputs these weights were trained for (absent in older
    /// manifests: [`Inputs::Matched`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Inputs>,
}

impl Manifest {
    /// The inputs these weights were trained for.
    #[must_use]
    pub fn inputs(&self) -> Inputs {
        self.inputs.unwrap_or_default()
    }

    /// The manifest of a randomly initialised network.
    pub fn untrained(cfg: &HndsrConfig, parameters: i64) -> Self {
        Self {
            model: MODEL_NAME.into(),
            version: format!("untrained-{}", cfg.name),
            config: cfg.clone(),
            scale: cfg.scale,
            weights: String::new(),
            sha256: "untrained".into(),
            parameters,
            training: TrainingInfo::default(),
            eval: Vec::new(),
            default_steps: None,
            self_ensemble: None,
            tile: None,
            projection_steps: None,
            refiner_strength: None,
            inputs: None,
        }
    }

    /// Reads and checks a manifest.
    pub fn read(path: &Path) -> Result<Self, HndsrError> {
        let text = std::fs::read_to_string(path).map_err(|source| HndsrError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| HndsrError::Manifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if manifest.model != MODEL_NAME || manifest.scale != manifest.config.scale {
            return Err(HndsrError::Manifest {
                path: path.to_owned(),
                message: format!(
                    "model {:?} scale {} does not describe an {MODEL_NAME} network of scale {}",
                    manifest.model, manifest.scale, manifest.config.scale
                ),
            });
        }
        if let Some(tile) = manifest.tile {
            super::check_tile(tile).map_err(|message| HndsrError::Manifest {
                path: path.to_owned(),
                message,
            })?;
        }
        if let Some(steps) = manifest.projection_steps {
            super::check_projection_steps(steps).map_err(|message| HndsrError::Manifest {
                path: path.to_owned(),
                message,
            })?;
        }
        if let Some(strength) = manifest.refiner_strength {
            super::check_refiner_strength(strength).map_err(|message| HndsrError::Manifest {
                path: path.to_owned(),
                message,
            })?;
        }
        if manifest.inputs() == Inputs::Realistic && manifest.projection_steps.unwrap_or(0) > 0 {
            return Err(HndsrError::Manifest {
                path: path.to_owned(),
                message: "weights for realistic inputs recommend the LR-consistency projection, \
                          which inverts the matched degradation only: set projection_steps to 0"
                    .into(),
            });
        }
        Ok(manifest)
    }

    /// Writes the manifest as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<(), HndsrError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| HndsrError::Manifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text + "\n").map_err(|source| HndsrError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_steps_is_optional_and_round_trips() {
        let m = Manifest::untrained(&HndsrConfig::tiny(), 1);
        let json = serde_json::to_value(&m).unwrap();
        assert!(
            json.get("default_steps").is_none(),
            "older readers see no new key"
        );
        let back: Manifest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.default_steps, None);

        let mut with = json;
        with["default_steps"] = 0.into();
        let back: Manifest = serde_json::from_value(with).unwrap();
        assert_eq!(back.default_steps, Some(0));
        assert_eq!(serde_json::to_value(&back).unwrap()["default_steps"], 0);
    }

    #[test]
    fn tile_is_optional_round_trips_and_is_range_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m = Manifest::untrained(&HndsrConfig::tiny(), 1);
        m.write(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("tile"));
        assert_eq!(Manifest::read(&path).unwrap().tile, None);

        m.tile = Some(24);
        m.write(&path).unwrap();
        assert_eq!(Manifest::read(&path).unwrap().tile, Some(24));

        for bad in [0, 15, 1025, -24] {
            m.tile = Some(bad);
            m.write(&path).unwrap();
            let err = Manifest::read(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("tile edge {bad} is outside [16, 1024]")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn projection_steps_are_optional_round_trip_and_are_range_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m = Manifest::untrained(&HndsrConfig::tiny(), 1);
        m.write(&path).unwrap();
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("projection")
        );
        assert_eq!(Manifest::read(&path).unwrap().projection_steps, None);
        m.projection_steps = Some(20);
        m.write(&path).unwrap();
        assert_eq!(Manifest::read(&path).unwrap().projection_steps, Some(20));
        m.projection_steps = Some(101);
        m.write(&path).unwrap();
        let err = Manifest::read(&path).unwrap_err().to_string();
        assert!(err.contains("above the maximum of 100"), "{err}");
    }

    #[test]
    fn refiner_strength_is_optional_round_trips_and_is_range_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m = Manifest::untrained(&HndsrConfig::tiny(), 1);
        m.write(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("strength"));
        assert_eq!(Manifest::read(&path).unwrap().refiner_strength, None);
        m.refiner_strength = Some(0.5);
        m.write(&path).unwrap();
        assert_eq!(Manifest::read(&path).unwrap().refiner_strength, Some(0.5));
        for bad in [0.0, -0.1, 1.5] {
            m.refiner_strength = Some(bad);
            m.write(&path).unwrap();
            let err = Manifest::read(&path).unwrap_err().to_string();
            assert!(err.contains("refiner strength"), "{bad}: {err}");
        }
    }

    #[test]
    fn inputs_default_to_matched_and_realistic_weights_refuse_the_projection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m = Manifest::untrained(&HndsrConfig::tiny(), 1);
        m.projection_steps = Some(5);
        m.write(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("inputs"));
        assert_eq!(Manifest::read(&path).unwrap().inputs(), Inputs::Matched);

        m.inputs = Some(Inputs::Realistic);
        m.write(&path).unwrap();
        let err = Manifest::read(&path).unwrap_err().to_string();
        assert!(err.contains("set projection_steps to 0"), "{err}");

        m.projection_steps = Some(0);
        m.write(&path).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains(r#""inputs": "realistic""#)
        );
        assert_eq!(Manifest::read(&path).unwrap().inputs(), Inputs::Realistic);
        assert_eq!("realistic".parse::<Inputs>(), Ok(Inputs::Realistic));
        assert!(
            "blurry"
                .parse::<Inputs>()
                .unwrap_err()
                .contains("matched or realistic")
        );
    }
}

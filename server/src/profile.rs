//! Serving profiles: named settings of the `hndsr` backend's
//! latency/quality knobs (diffusion steps, self-ensemble, tile edge,
//! projection steps).
//!
//! - `fast`: one network pass per 256² LR tile (a 256² input is one tile),
//!   no self-ensemble, no diffusion, no projection. What a CPU can answer
//!   in about a second.
//! - `quality`: what the weights' manifest recommends (the shipped weights:
//!   24² tiles, ×8 self-ensemble, 5 projection steps): about +0.1 dB for
//!   tens of times the work, a GPU's profile.
//! - `realistic`: `fast`'s settings on weights trained for real-sensor
//!   inputs (blur, noise, JPEG; their manifest says `inputs: realistic`),
//!   never with the projection, which inverts the matched degradation only.
//!
//! The default follows the weights, then the device: `realistic` for
//! realistic weights, else CPU → `fast`, CUDA → `quality`. A knob
//! configured on its own (`HNDSR_TILE`, ...) wins over the profile, which
//! wins over the manifest. [`resolve`] is that rule and [`check_pairing`]
//! the one between profile and weights, without torch.

use hndsr_contract::profile as names;

/// LR tile edge of the `fast` profile: a 256² input is one tile.
pub const FAST_TILE: u32 = 256;

/// Tile edge when neither the configuration, the profile nor the manifest
/// names one.
pub const FALLBACK_TILE: u32 = 256;

/// Default DDIM steps when neither the configuration, the profile nor the
/// weights' manifest names any.
pub const FALLBACK_SAMPLING_STEPS: u32 = 20;

/// A named serving profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Whole 256² tiles, one pass, no diffusion, no projection.
    Fast,
    /// The weights' manifest recommendations.
    Quality,
    /// `fast` on weights trained for realistic inputs; no projection.
    Realistic,
}

impl Profile {
    /// The name used in flags, env vars, the CRD and `/v1/info`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fast => names::FAST,
            Self::Quality => names::QUALITY,
            Self::Realistic => names::REALISTIC,
        }
    }

    /// The profile served when none is configured: `realistic` for weights
    /// trained for realistic inputs; otherwise `fast` on the CPU (the
    /// manifest's profile takes tens of seconds per 256² image there),
    /// `quality` on CUDA.
    #[must_use]
    pub fn default_for(device: &str, inputs: Inputs) -> Self {
        if inputs == Inputs::Realistic {
            Self::Realistic
        } else if device.trim().eq_ignore_ascii_case("cpu") {
            Self::Fast
        } else {
            Self::Quality
        }
    }
}

/// The knobs a profile sets; `None` leaves a knob to the next source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Knobs {
    /// DDIM steps (0: the neural-operator estimate alone).
    pub steps: Option<u32>,
    /// Geometric self-ensemble of μ.
    pub self_ensemble: Option<bool>,
    /// LR tile edge.
    pub tile: Option<u32>,
    /// Conjugate-gradient steps of the LR-consistency projection.
    pub projection_steps: Option<u32>,
}

/// The settings in force: every knob decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The profile they came from.
    pub profile: Profile,
    /// DDIM steps when a request names none.
    pub steps: u32,
    /// Geometric self-ensemble.
    pub self_ensemble: bool,
    /// LR tile edge.
    pub tile: u32,
    /// Projection steps (0: off).
    pub projection_steps: u32,
}

impl Profile {
    /// What this profile sets, given what the weights recommend.
    #[must_use]
    pub fn knobs(self, manifest: Knobs) -> Knobs {
        match self {
            Self::Fast => Knobs {
                steps: Some(0),
                self_ensemble: Some(false),
                tile: Some(FAST_TILE),
                projection_steps: Some(0),
            },
            Self::Quality => manifest,
            Self::Realistic => Knobs {
                steps: Some(manifest.steps.unwrap_or(0)),
                projection_steps: Some(0),
                ..Self::Fast.knobs(manifest)
            },
        }
    }
}

/// What the weights were trained for: their manifest's `inputs` (kept
/// here, not taken from the model crate, so that the rule builds without
/// libtorch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    /// The training degradation (the projection inverts it).
    Matched,
    /// Real-sensor-like inputs (blur, noise, JPEG).
    Realistic,
}

/// Refuses a profile, or a projection, the weights were not trained for:
/// `realistic` needs realistic weights, and the projection (which inverts
/// the matched degradation) never runs on realistic weights.
///
/// # Errors
/// The reason, naming what to change.
pub fn check_pairing(settings: &Settings, inputs: Inputs) -> Result<(), String> {
    match inputs {
        Inputs::Matched if settings.profile == Profile::Realistic => Err(format!(
            "profile {} needs weights trained for realistic inputs (manifest inputs: realistic; \
             the project's image ships them as {}), these are for matched inputs",
            names::REALISTIC,
            hndsr_contract::bundled::REALISTIC_WEIGHTS_FILE,
        )),
        Inputs::Realistic if settings.projection_steps > 0 => Err(format!(
            "{} projection steps on weights for realistic inputs: the LR-consistency \
             projection inverts the matched degradation only; set the projection steps to 0",
            settings.projection_steps
        )),
        _ => Ok(()),
    }
}

/// The settings of `profile`: each knob from `configured`, else the
/// profile, else the fallbacks.
#[must_use]
pub fn resolve(profile: Profile, configured: Knobs, manifest: Knobs) -> Settings {
    let from_profile = profile.knobs(manifest);
    Settings {
        profile,
        steps: configured
            .steps
            .or(from_profile.steps)
            .unwrap_or(FALLBACK_SAMPLING_STEPS),
        self_ensemble: configured
            .self_ensemble
            .or(from_profile.self_ensemble)
            .unwrap_or(false),
        tile: configured
            .tile
            .or(from_profile.tile)
            .unwrap_or(FALLBACK_TILE),
        projection_steps: configured
            .projection_steps
            .or(from_profile.projection_steps)
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the shipped weights' manifest recommends.
    const SHIPPED: Knobs = Knobs {
        steps: Some(0),
        self_ensemble: Some(true),
        tile: Some(24),
        projection_steps: Some(5),
    };

    #[test]
    fn the_weights_then_the_device_pick_the_default_profile() {
        for (device, inputs, expected) in [
            ("cpu", Inputs::Matched, Profile::Fast),
            ("cuda", Inputs::Matched, Profile::Quality),
            ("cuda:1", Inputs::Matched, Profile::Quality),
            ("cpu", Inputs::Realistic, Profile::Realistic),
            ("cuda", Inputs::Realistic, Profile::Realistic),
        ] {
            assert_eq!(
                Profile::default_for(device, inputs),
                expected,
                "{device} {inputs:?}"
            );
        }
    }

    #[test]
    fn realistic_is_fast_without_the_projection_and_keeps_the_manifests_steps() {
        let s = resolve(Profile::Realistic, Knobs::default(), SHIPPED);
        assert_eq!(
            (s.steps, s.self_ensemble, s.tile, s.projection_steps),
            (0, false, FAST_TILE, 0)
        );
        let four = Knobs {
            steps: Some(4),
            ..SHIPPED
        };
        assert_eq!(resolve(Profile::Realistic, Knobs::default(), four).steps, 4);
        assert_eq!(
            resolve(Profile::Realistic, Knobs::default(), Knobs::default()).steps,
            0,
            "no recommendation: the regression output alone"
        );
    }

    #[test]
    fn profiles_and_weights_must_agree() {
        let realistic = resolve(Profile::Realistic, Knobs::default(), SHIPPED);
        let err = check_pairing(&realistic, Inputs::Matched).unwrap_err();
        assert!(
            err.contains("needs weights trained for realistic inputs"),
            "{err}"
        );
        check_pairing(&realistic, Inputs::Realistic).unwrap();

        // The projection never runs on realistic weights, whoever asks.
        let quality = resolve(Profile::Quality, Knobs::default(), SHIPPED);
        check_pairing(&quality, Inputs::Matched).unwrap();
        let err = check_pairing(&quality, Inputs::Realistic).unwrap_err();
        assert!(err.contains("set the projection steps to 0"), "{err}");
        let configured = Knobs {
            projection_steps: Some(3),
            ..Knobs::default()
        };
        let err = check_pairing(
            &resolve(Profile::Realistic, configured, SHIPPED),
            Inputs::Realistic,
        )
        .unwrap_err();
        assert!(err.contains("3 projection steps"), "{err}");
        check_pairing(
            &resolve(Profile::Fast, Knobs::default(), SHIPPED),
            Inputs::Realistic,
        )
        .unwrap();
    }

    #[test]
    fn fast_ignores_the_manifest() {
        let s = resolve(Profile::Fast, Knobs::default(), SHIPPED);
        assert_eq!(
            (s.steps, s.self_ensemble, s.tile, s.projection_steps),
            (0, false, FAST_TILE, 0)
        );
    }

    #[test]
    fn quality_is_the_manifest_with_fallbacks() {
        let s = resolve(Profile::Quality, Knobs::default(), SHIPPED);
        assert_eq!(
            (s.steps, s.self_ensemble, s.tile, s.projection_steps),
            (0, true, 24, 5)
        );
        let bare = resolve(Profile::Quality, Knobs::default(), Knobs::default());
        assert_eq!(
            (
                bare.steps,
                bare.self_ensemble,
                bare.tile,
                bare.projection_steps
            ),
            (FALLBACK_SAMPLING_STEPS, false, FALLBACK_TILE, 0)
        );
    }

    #[test]
    fn a_configured_knob_wins_over_the_profile() {
        let configured = Knobs {
            tile: Some(64),
            projection_steps: Some(3),
            ..Knobs::default()
        };
        let s = resolve(Profile::Fast, configured, SHIPPED);
        assert_eq!(
            (s.steps, s.self_ensemble, s.tile, s.projection_steps),
            (0, false, 64, 3)
        );
        let s = resolve(
            Profile::Quality,
            Knobs {
                self_ensemble: Some(false),
                ..Knobs::default()
            },
            SHIPPED,
        );
        assert!(!s.self_ensemble);
        assert_eq!(s.tile, 24);
    }

    #[test]
    fn names_match_the_contract() {
        for p in [Profile::Fast, Profile::Quality, Profile::Realistic] {
            assert!(names::ALL.contains(&p.as_str()));
            let parsed = <Profile as clap::ValueEnum>::from_str(p.as_str(), false).unwrap();
            assert_eq!(parsed, p);
        }
    }
}

//! `hndsr-train soup`: the weighted mean of several weights of one network
//! shape, variable by variable (a "model soup", Wortsman et al. 2022). Runs
//! fine-tuned from the same parent with different seeds stay in one basin
//! of the loss, and their mean often generalises better than each of them.
//!
//! The coefficients must sum to 1 (an affine combination keeps the mean's
//! scale; a negative one extrapolates along the difference of two runs).
//! Serving hints (steps, self-ensemble, tile) are the first input's.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use hndsr_torch::hndsr::{
    HndsrNet, Manifest, TrainingInfo, load_weights_from_bytes, manifest_path, save_weights,
    sha256_hex,
};
use tch::{Device, nn};

#[derive(Debug, Args)]
pub struct SoupArgs {
    /// Weights to average (`.safetensors`, manifest alongside), two or
    /// more, all of the same config.
    #[arg(long, value_delimiter = ',', required = true)]
    weights: Vec<PathBuf>,
    /// Each input's coefficient, in order (default: equal shares); they
    /// must sum to 1.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    coefficients: Vec<f64>,
    /// Destination `.safetensors` (manifest written alongside).
    #[arg(long)]
    out: PathBuf,
    /// Version label for the manifest.
    #[arg(long)]
    version: String,
}

/// The coefficients `args` names, or equal shares; checked.
fn coefficients(given: &[f64], inputs: usize) -> Result<Vec<f64>> {
    if inputs < 2 {
        bail!("a soup needs two or more weights, got {inputs}");
    }
    if given.is_empty() {
        return Ok(vec![1.0 / inputs as f64; inputs]);
    }
    if given.len() != inputs {
        bail!(
            "{} coefficients for {inputs} weights: give one per input",
            given.len()
        );
    }
    if let Some(c) = given.iter().find(|c| !c.is_finite()) {
        bail!("coefficient {c} is not a finite number");
    }
    let sum: f64 = given.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        bail!("the coefficients sum to {sum}, not 1");
    }
    Ok(given.to_vec())
}

/// One input: its manifest and its variables, checked against the
/// manifest's digest and config.
fn load(path: &Path) -> Result<(Manifest, nn::VarStore)> {
    let manifest = Manifest::read(&manifest_path(path))?;
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let digest = sha256_hex(&bytes);
    if digest != manifest.sha256 {
        bail!(
            "{}: sha256 {digest}, its manifest says {}",
            path.display(),
            manifest.sha256
        );
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = HndsrNet::new(&vs.root(), &manifest.config);
    load_weights_from_bytes(&vs, &bytes, path)?;
    Ok((manifest, vs))
}

pub fn soup(args: &SoupArgs) -> Result<Manifest> {
    let shares = coefficients(&args.coefficients, args.weights.len())?;
    let inputs = args
        .weights
        .iter()
        .map(|p| load(p))
        .collect::<Result<Vec<_>>>()?;
    let (first, _) = &inputs[0];
    let cfg = first.config.clone();
    for ((manifest, _), path) in inputs.iter().zip(&args.weights).skip(1) {
        if manifest.config != cfg {
            bail!(
                "{} has config {:?}, {} has {:?}: only weights of one shape can be averaged",
                path.display(),
                manifest.config,
                args.weights[0].display(),
                cfg
            );
        }
    }
    let out = nn::VarStore::new(Device::Cpu);
    let _net = HndsrNet::new(&out.root(), &cfg);
    let sources: Vec<_> = inputs.iter().map(|(_, vs)| vs.variables()).collect();
    tch::no_grad(|| {
        for (name, mut var) in out.variables() {
            let mean = sources
                .iter()
                .zip(&shares)
                .map(|(vars, &share)| &vars[&name] * share)
                .reduce(|a, b| a + b)
                .expect("two or more inputs");
            var.copy_(&mean);
        }
    });
    let mut data: Vec<String> = Vec::new();
    for (m, _) in &inputs {
        for line in &m.training.data {
            if !data.contains(line) {
                data.push(line.clone());
            }
        }
    }
    let parts: Vec<String> = inputs
        .iter()
        .zip(&shares)
        .map(|((m, _), share)| {
            format!(
                "{share} × {} (sha256 {}, {} steps: {})",
                m.version, m.sha256, m.training.steps, m.training.command
            )
        })
        .collect();
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let manifest = Manifest {
        version: format!("{}-{}", args.version, cfg.name),
        training: TrainingInfo {
            data,
            command: format!("{} — of: {}", crate::command_line(), parts.join("; ")),
            steps: inputs.iter().map(|(m, _)| m.training.steps).sum(),
            notes: format!(
                "weighted mean of {} weights, variable by variable; steps is the sum of theirs",
                inputs.len()
            ),
        },
        default_steps: first.default_steps,
        self_ensemble: first.self_ensemble,
        tile: first.tile,
        projection_steps: first.projection_steps,
        ..Manifest::untrained(&cfg, 0)
    };
    Ok(save_weights(&out, &cfg, &args.out, manifest)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hndsr_torch::hndsr::HndsrConfig;
    use tch::Tensor;

    /// Random tiny weights saved under `dir/name.safetensors`.
    fn weights(dir: &Path, name: &str, seed: i64, cfg: &HndsrConfig) -> PathBuf {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = HndsrNet::new(&vs.root(), cfg);
        // Zero-initialised layers would make every mean trivially right.
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&Tensor::randn_like(&v));
            }
        });
        let path = dir.join(format!("{name}.safetensors"));
        let manifest = Manifest {
            version: name.into(),
            tile: Some(24),
            ..Manifest::untrained(cfg, 0)
        };
        save_weights(&vs, cfg, &path, manifest).unwrap();
        path
    }

    fn args(weights: Vec<PathBuf>, coefficients: Vec<f64>, out: PathBuf) -> SoupArgs {
        SoupArgs {
            weights,
            coefficients,
            out,
            version: "9.9.9".into(),
        }
    }

    #[test]
    fn every_variable_is_the_weighted_mean_of_the_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HndsrConfig::tiny();
        let (a, b) = (
            weights(dir.path(), "a", 1, &cfg),
            weights(dir.path(), "b", 2, &cfg),
        );
        let out = dir.path().join("soup.safetensors");
        let m = soup(&args(
            vec![a.clone(), b.clone()],
            vec![0.25, 0.75],
            out.clone(),
        ))
        .unwrap();
        assert_eq!(m.version, format!("9.9.9-{}", cfg.name));
        assert_eq!(m.tile, Some(24), "serving hints come from the first input");
        assert!(
            m.training.command.contains("0.25 × a"),
            "{}",
            m.training.command
        );
        let (_, va) = load(&a).unwrap();
        let (_, vb) = load(&b).unwrap();
        let (_, vs) = load(&out).unwrap();
        let (va, vb) = (va.variables(), vb.variables());
        let mut checked = 0;
        for (name, v) in vs.variables() {
            let want = &va[&name] * 0.25 + &vb[&name] * 0.75;
            let off = (&v - want).abs().max().double_value(&[]);
            assert!(off < 1e-6, "{name} is off by {off}");
            checked += 1;
        }
        assert!(checked > 10, "only {checked} variables");
    }

    #[test]
    fn the_default_is_equal_shares_and_extrapolation_is_allowed() {
        assert_eq!(coefficients(&[], 4).unwrap(), vec![0.25; 4]);
        assert_eq!(coefficients(&[1.5, -0.5], 2).unwrap(), vec![1.5, -0.5]);
    }

    #[test]
    fn bad_coefficients_are_refused() {
        for (given, n, says) in [
            (vec![], 1, "two or more"),
            (vec![0.5, 0.5], 3, "one per input"),
            (vec![0.5, 0.6], 2, "sum to"),
            (vec![f64::NAN, 1.0], 2, "finite"),
        ] {
            let err = coefficients(&given, n).unwrap_err().to_string();
            assert!(err.contains(says), "{given:?}: {err}");
        }
    }

    #[test]
    fn weights_of_other_shapes_or_altered_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HndsrConfig::tiny();
        let a = weights(dir.path(), "a", 1, &cfg);
        let wider = HndsrConfig {
            modes: cfg.modes + 2,
            ..cfg.clone()
        };
        let b = weights(dir.path(), "b", 2, &wider);
        let out = dir.path().join("soup.safetensors");
        let err = soup(&args(vec![a.clone(), b], vec![], out.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("one shape"), "{err}");

        let c = weights(dir.path(), "c", 3, &cfg);
        let mut bytes = std::fs::read(&c).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&c, bytes).unwrap();
        let err = soup(&args(vec![a, c], vec![], out.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("its manifest says"), "{err}");
        assert!(!out.exists(), "nothing written for refused inputs");
    }
}

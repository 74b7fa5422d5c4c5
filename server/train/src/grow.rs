//! Starting a run from trained weights, optionally in a larger network.
//!
//! Growing keeps the function: the grown network's output starts exactly as
//! the initial weights' output, so a fine-tune begins where they ended and
//! only adds capacity. Two ways to grow, both along axes whose new parts can
//! start silent:
//! - wider dense local branches (`local`): the old hidden channels keep
//!   their weights, the new ones get a fresh first conv and a zero slice of
//!   the (zero-initialised) second conv;
//! - more Fourier blocks (`blocks`), appended after the trained ones: every
//!   branch that feeds a new block's sum starts at zero, so the block is the
//!   identity (`x + gelu(0)`) while its gradients are not zero;
//! - more Fourier modes (`modes`): the trained frequencies keep their
//!   weights (rows `0..m` and `−m..−1`, columns `0..m`), the new ones start
//!   at zero, so on every grid the layer first passes exactly the spectrum
//!   it passed before.
//!
//! Width, scale and the denoiser's shape cannot grow this way (they change
//! what the trained layers see) and are rejected. The denoiser can instead
//! start afresh (`fresh_denoiser`), which is also the only way to change
//! the units and schedule it works in (`residual_norm`, `residual_scale`,
//! `start_time`): a refiner trained for a final, frozen regressor.

use std::path::Path;

use anyhow::{Context, Result, bail};
use hndsr_torch::hndsr::{HndsrConfig, HndsrNet, Manifest, load_weights_from_bytes};
use tch::{Device, Tensor, nn};

/// Checks that `grown` only differs from `base` in `blocks` / `local` /
/// `modes`, and not downwards.
pub fn check_growth(base: &HndsrConfig, grown: &HndsrConfig) -> Result<()> {
    if grown.blocks < base.blocks || grown.local < base.local || grown.modes < base.modes {
        bail!(
            "can only grow: the initial weights have {} blocks, local {} and {} modes, \
             asked for {}, {} and {}",
            base.blocks,
            base.local,
            base.modes,
            grown.blocks,
            grown.local,
            grown.modes
        );
    }
    // The refiner's units and schedule may change: the denoiser then
    // starts afresh (`init_from(…, fresh_denoiser)`).
    let same_rest = HndsrConfig {
        blocks: base.blocks,
        local: base.local,
        modes: base.modes,
        residual_norm: base.residual_norm,
        residual_scale: base.residual_scale,
        start_time: base.start_time,
        ..grown.clone()
    };
    if &same_rest != base {
        bail!("only blocks, local and modes can grow from initial weights");
    }
    Ok(())
}

/// Copies the weights in `init` (whose manifest is `manifest`) into `vs`
/// (built for a config that [`check_growth`] accepted) and silences what is
/// new. With `fresh_denoiser` the denoiser keeps the initialisation `vs`
/// was built with. Returns the names of the variables not taken from
/// `init`, sorted.
pub fn init_from(
    vs: &nn::VarStore,
    init: &Path,
    manifest: &Manifest,
    fresh_denoiser: bool,
) -> Result<Vec<String>> {
    let bytes = std::fs::read(init).with_context(|| format!("read {}", init.display()))?;
    let old = nn::VarStore::new(Device::Cpu);
    let _net = HndsrNet::new(&old.root(), &manifest.config);
    load_weights_from_bytes(&old, &bytes, init)?;
    let old = old.variables();
    let old_blocks = manifest.config.blocks;
    let old_modes = manifest.config.modes;
    let _no_grad = tch::no_grad_guard();
    let mut fresh = Vec::new();
    for (name, mut var) in vs.variables() {
        if fresh_denoiser && name.starts_with("denoiser.") {
            fresh.push(name);
            continue;
        }
        match old.get(&name) {
            Some(src) if src.size() == var.size() => var.copy_(src),
            Some(src) => {
                let (old_size, new_size) = (src.size(), var.size());
                let grows = old_size.len() == new_size.len()
                    && old_size.iter().zip(&new_size).all(|(o, n)| o <= n);
                if !grows {
                    bail!(
                        "{name}: {} has shape {old_size:?}, the network {new_size:?}",
                        init.display()
                    );
                }
                if is_spectral_weight(&name) {
                    copy_modes(&mut var, src, old_modes);
                } else {
                    leading_slice(&var, &old_size).copy_(src);
                }
            }
            None => {
                if silenced_in_new_block(&name, old_blocks) {
                    let _ = var.zero_();
                }
                fresh.push(name);
            }
        }
    }
    fresh.sort();
    Ok(fresh)
}

/// Whether `name` is a spectral weight, `[in, out, 2·modes, modes]`.
fn is_spectral_weight(name: &str) -> bool {
    name.ends_with(".spectral.w_re") || name.ends_with(".spectral.w_im")
}

/// Copies spectral weights of `old_modes` modes into `var`, which has more:
/// the non-negative rows `0..m` to the top, the negative rows `−m..−1` to
/// the bottom of `var`'s `2·modes` rows, columns `0..m`; every new
/// frequency is zero.
fn copy_modes(var: &mut Tensor, src: &Tensor, old_modes: i64) {
    let rows = var.size()[2];
    let _ = var.zero_();
    let corner = |t: &Tensor, start: i64| t.narrow(2, start, old_modes).narrow(3, 0, old_modes);
    corner(var, 0).copy_(&src.narrow(2, 0, old_modes));
    corner(var, rows - old_modes).copy_(&src.narrow(2, old_modes, old_modes));
}

/// The `[0..size[0], 0..size[1], …]` view of `t`.
fn leading_slice(t: &Tensor, size: &[i64]) -> Tensor {
    size.iter()
        .enumerate()
        .fold(t.shallow_clone(), |v, (dim, &n)| v.narrow(dim as i64, 0, n))
}

/// Whether `name` is a variable of a block appended by growth (index ≥
/// `old_blocks`) that must start at zero: every branch summed into the
/// block's output. The gate and the local branch's first conv keep their
/// random start (their outputs are multiplied by a zero branch).
fn silenced_in_new_block(name: &str, old_blocks: i64) -> bool {
    let Some(rest) = name.strip_prefix("encoder.block") else {
        return false;
    };
    let Some((index, var)) = rest.split_once('.') else {
        return false;
    };
    let Ok(index) = index.parse::<i64>() else {
        return false;
    };
    index >= old_blocks
        && ["spectral.", "pointwise.", "depthwise.", "local2."]
            .iter()
            .any(|p| var.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hndsr_torch::hndsr::{manifest_path, save_weights};
    use tch::Kind;

    /// A `cfg` network whose every weight is noised (the zero-started convs
    /// are not zero), saved with its manifest in a temporary directory.
    fn trained_looking(
        cfg: &HndsrConfig,
    ) -> (
        nn::VarStore,
        HndsrNet,
        tempfile::TempDir,
        std::path::PathBuf,
    ) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = HndsrNet::new(&vs.root(), cfg);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let noise = v.randn_like() * 0.05;
                v.copy_(&(&v + noise));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_weights(&vs, cfg, &path, Manifest::untrained(cfg, 0)).unwrap();
        (vs, net, dir, path)
    }

    #[test]
    fn growth_is_only_more_blocks_wider_local_branches_or_more_modes() {
        let base = HndsrConfig::tiny();
        let deeper = HndsrConfig {
            blocks: base.blocks + 2,
            local: base.local * 2,
            ..base.clone()
        };
        check_growth(&base, &deeper).unwrap();
        check_growth(&base, &base).unwrap();
        let shallower = HndsrConfig {
            blocks: base.blocks - 1,
            ..base.clone()
        };
        assert!(check_growth(&base, &shallower).is_err());
        let wider = HndsrConfig {
            width: base.width * 2,
            ..base.clone()
        };
        let err = check_growth(&base, &wider).unwrap_err().to_string();
        assert!(err.contains("only blocks, local and modes"), "{err}");
        let fewer_modes = HndsrConfig {
            modes: base.modes - 1,
            ..base.clone()
        };
        assert!(check_growth(&base, &fewer_modes).is_err());
    }

    #[test]
    fn a_grown_network_starts_with_the_initial_output_and_can_learn() {
        tch::manual_seed(3);
        let base = HndsrConfig::tiny();
        let (_old_vs, old_net, _dir, path) = trained_looking(&base);

        let grown = HndsrConfig {
            blocks: base.blocks + 2,
            local: base.local + 8,
            modes: base.modes + 3,
            ..base.clone()
        };
        check_growth(&base, &grown).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = HndsrNet::new(&vs.root(), &grown);
        let fresh = init_from(
            &vs,
            &path,
            &Manifest::read(&manifest_path(&path)).unwrap(),
            false,
        )
        .unwrap();
        assert!(
            fresh
                .iter()
                .all(|n| n.starts_with("encoder.block2.") || n.starts_with("encoder.block3."))
        );
        assert!(!fresh.is_empty());

        // On a grid with room for the new modes, and on one too small for
        // even the old ones.
        for (h, w) in [(6, 5), (30, 26)] {
            let lr = Tensor::rand([2, 3, h, w], (Kind::Float, Device::Cpu));
            let (before, _) = tch::no_grad(|| old_net.regress(&lr));
            let (after, _) = tch::no_grad(|| net.regress(&lr));
            let diff = (&after - &before).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{h}x{w}: grown output differs by {diff}");
        }
        let lr = Tensor::rand([2, 3, 30, 26], (Kind::Float, Device::Cpu));
        let (after, _) = net.regress(&lr);

        // The new parts get gradients, so training can use them.
        after.square().mean(Kind::Float).backward();
        let vars = vs.variables();
        for name in [
            "encoder.block3.pointwise.weight",
            "encoder.block0.local2.weight",
            "encoder.block0.spectral.w_re",
        ] {
            let grad = vars[name].grad();
            assert!(
                grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}"
            );
        }
        let widened = &vars["encoder.block0.local2.weight"];
        let new_slice = widened.narrow(1, base.local, 8);
        assert_eq!(new_slice.abs().sum(Kind::Float).double_value(&[]), 0.0);
        // The new modes start at zero and learn: their gradient is not zero.
        let spectral = &vars["encoder.block0.spectral.w_re"];
        let new_rows = spectral.narrow(2, base.modes, 6);
        assert_eq!(new_rows.abs().sum(Kind::Float).double_value(&[]), 0.0);
        let new_grad = spectral.grad().narrow(2, base.modes, 6);
        assert!(new_grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn a_fresh_denoiser_keeps_the_regressor_and_may_change_its_units() {
        tch::manual_seed(5);
        let base = HndsrConfig::tiny();
        let (old_vs, _old, _dir, path) = trained_looking(&base);

        let refined = HndsrConfig {
            residual_norm: hndsr_torch::hndsr::ResidualNorm::Detail,
            residual_scale: 0.5,
            start_time: 0.8,
            ..base.clone()
        };
        check_growth(&base, &refined).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = HndsrNet::new(&vs.root(), &refined);
        let manifest = Manifest::read(&manifest_path(&path)).unwrap();
        let fresh = init_from(&vs, &path, &manifest, true).unwrap();
        assert!(!fresh.is_empty() && fresh.iter().all(|n| n.starts_with("denoiser.")));
        let (old, new) = (old_vs.variables(), vs.variables());
        let same = |name: &str| (&old[name] - &new[name]).abs().max().double_value(&[]) == 0.0;
        assert!(
            same("decoder.conv2.weight"),
            "the regressor is the initial one"
        );
        // The output conv starts at zero again, not at the trained values.
        assert!(!same("denoiser.output.weight"));
        assert_eq!(
            new["denoiser.output.weight"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
}

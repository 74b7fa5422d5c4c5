//! HNDSR on a GPU: fp32 / fp16 / bf16 against the CPU. Not run in any
//! session so far (no GPU); run on a CUDA machine with
//! `cargo test -p hndsr-torch --features cuda-tests --test hndsr_cuda`.
#![cfg(feature = "cuda-tests")]

use hndsr_torch::hndsr::{HndsrConfig, HndsrModel, Manifest, Precision};
use hndsr_torch::open_device;
use hndsr_torch::tch::{Device, Kind, Tensor};

#[test]
fn reduced_precision_on_cuda_stays_close_to_cpu_fp32() {
    let device = open_device("cuda").expect("a CUDA device");
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("tiny.safetensors");
    let cpu = HndsrModel::random(&HndsrConfig::tiny(), Device::Cpu, 1).unwrap();
    let manifest = cpu
        .save(&weights, Manifest::untrained(cpu.config(), 0))
        .unwrap();
    let x = Tensor::rand([1, 3, 40, 48], (Kind::Float, Device::Cpu));
    let never = || false;
    let want = cpu.upscale_image(&x, 4, 7, &never).unwrap();
    for (precision, tol) in [
        (Precision::Fp32, 1e-3),
        (Precision::Fp16, 2e-2),
        (Precision::Bf16, 5e-2),
    ] {
        let gpu = HndsrModel::load(&weights, &manifest.sha256, device, precision).unwrap();
        let got = gpu.upscale_image(&x, 4, 7, &never).unwrap();
        let diff = (&got - &want).abs().mean(Kind::Float).double_value(&[]);
        assert!(diff < tol, "{precision}: mean |gpu - cpu| = {diff}");
    }
}

/// Tiles, blending, self-ensemble, the projection and alpha all on the
/// GPU (nothing crosses to the host before the end): the same image as the
/// CPU's, for RGB, RGBA and gray + alpha, with and without diffusion.
#[test]
fn the_whole_path_on_cuda_matches_the_cpu() {
    let device = open_device("cuda").expect("a CUDA device");
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("tiny.safetensors");
    let cpu = HndsrModel::random(&HndsrConfig::tiny(), Device::Cpu, 2).unwrap();
    let manifest = cpu
        .save(&weights, Manifest::untrained(cpu.config(), 0))
        .unwrap();
    let setup = |m: HndsrModel| {
        m.with_tile(16)
            .unwrap()
            .with_self_ensemble(true)
            .with_projection_steps(5)
            .unwrap()
    };
    let cpu = setup(cpu);
    let gpu = setup(HndsrModel::load(&weights, &manifest.sha256, device, Precision::Fp32).unwrap());
    let never = || false;
    for channels in [3, 4, 2] {
        let x = Tensor::rand([1, channels, 40, 48], (Kind::Float, Device::Cpu));
        for steps in [0, 3] {
            let want = cpu.upscale_image(&x, steps, 7, &never).unwrap();
            let got = gpu.upscale_image(&x, steps, 7, &never).unwrap();
            assert_eq!(
                got.device(),
                Device::Cpu,
                "the answer comes back to the host"
            );
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(
                diff < 2e-3,
                "{channels} channels, {steps} steps: max |gpu - cpu| = {diff}"
            );
        }
    }
}

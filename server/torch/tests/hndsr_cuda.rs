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

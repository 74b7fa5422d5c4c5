//! GPU checks; run on a CUDA machine with
//! `cargo test -p hndsr-torch --features cuda-tests --test cuda`.
#![cfg(feature = "cuda-tests")]

use hndsr_torch::tch::{Device, Tensor};
use hndsr_torch::{BICUBIC_TILES, BicubicUpscaler, open_device};

#[test]
fn cuda_opens_and_bicubic_matches_cpu() {
    let device = open_device("cuda").expect("a CUDA device");
    assert_eq!(device, Device::Cuda(0));
    assert!(hndsr_torch::tch::Cuda::is_available());
    let img = Tensor::rand([1, 3, 64, 80], (hndsr_torch::tch::Kind::Float, Device::Cpu));
    let gpu = BicubicUpscaler::new(device, BICUBIC_TILES)
        .unwrap()
        .upscale(&img, 4, || false)
        .unwrap();
    let cpu = BicubicUpscaler::new(Device::Cpu, BICUBIC_TILES)
        .unwrap()
        .upscale(&img, 4, || false)
        .unwrap();
    let diff = (&gpu - &cpu).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max |gpu - cpu| = {diff}");
}

//! GPU checks; run on a CUDA machine with
//! `cargo test -p hndsr-torch --features cuda-tests --test cuda`.
#![cfg(feature = "cuda-tests")]

use hndsr_torch::tch::{Cuda, Device, Kind, Tensor};
use hndsr_torch::{BICUBIC_TILES, BicubicUpscaler, open_device};

#[test]
fn cuda_opens_and_bicubic_matches_cpu() {
    let device = open_device("cuda").expect("a CUDA device");
    assert_eq!(device, Device::Cuda(0));
    assert!(Cuda::is_available());
    let img = Tensor::rand([1, 3, 64, 80], (Kind::Float, Device::Cpu));
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

/// Every inference thread takes a stream of its own from libtorch's pool
/// (`hndsr_torch::stream`): a fresh thread is on the default stream, after
/// `use_own_stream` on a pool stream no other thread has, and its work
/// there gives the CPU's answer.
#[test]
fn every_thread_gets_a_stream_of_its_own() {
    use hndsr_torch::stream::{current_stream, synchronize, use_own_stream};

    let device = open_device("cuda").expect("a CUDA device");
    let img = Tensor::rand([1, 3, 64, 80], (Kind::Float, Device::Cpu));
    let cpu = BicubicUpscaler::new(Device::Cpu, BICUBIC_TILES)
        .unwrap()
        .upscale(&img, 4, || false)
        .unwrap();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let img = img.copy();
            std::thread::spawn(move || {
                let fresh = current_stream(device).unwrap().expect("a CUDA stream");
                assert!(fresh.is_default(), "a new thread starts on {fresh}");
                let own = use_own_stream(device).unwrap().expect("a CUDA stream");
                assert!(!own.is_default());
                assert_eq!(current_stream(device).unwrap(), Some(own));
                let gpu = BicubicUpscaler::new(device, BICUBIC_TILES)
                    .unwrap()
                    .upscale(&img, 4, || false)
                    .unwrap();
                synchronize(device).unwrap();
                (own, gpu)
            })
        })
        .collect();
    let mut seen = Vec::new();
    for h in handles {
        let (own, gpu) = h.join().unwrap();
        let diff = (&gpu - &cpu).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "on stream {own}: max |gpu - cpu| = {diff}");
        assert!(!seen.contains(&own), "stream {own} handed out twice");
        seen.push(own);
    }
}

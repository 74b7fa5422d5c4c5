//! HNDSR on a GPU: fp32 / fp16 / bf16 against the CPU. Not run in any
//! session so far (no GPU); run on a CUDA machine with
//! `cargo test -p hndsr-torch --features cuda-tests --test hndsr_cuda`.
#![cfg(feature = "cuda-tests")]

use std::path::PathBuf;

use hndsr_torch::hndsr::{HndsrConfig, HndsrModel, Manifest, Precision};
use hndsr_torch::open_device;
use hndsr_torch::tch::{Device, Kind, Tensor};

/// Tiny random weights, saved: the directory holding them (keep it alive),
/// the CPU model, its file and its digest.
fn tiny(seed: u64) -> (tempfile::TempDir, HndsrModel, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("tiny.safetensors");
    let cpu = HndsrModel::random(&HndsrConfig::tiny(), Device::Cpu, seed).unwrap();
    let sha256 = cpu
        .save(&weights, Manifest::untrained(cpu.config(), 0))
        .unwrap()
        .sha256;
    (dir, cpu, weights, sha256)
}

#[test]
fn reduced_precision_on_cuda_stays_close_to_cpu_fp32() {
    let device = open_device("cuda").expect("a CUDA device");
    let (_dir, cpu, weights, sha256) = tiny(1);
    let x = Tensor::rand([1, 3, 40, 48], (Kind::Float, Device::Cpu));
    let never = || false;
    let want = cpu.upscale_image(&x, 4, 7, &never).unwrap();
    for (precision, tol) in [
        (Precision::Fp32, 1e-3),
        (Precision::Fp16, 2e-2),
        (Precision::Bf16, 5e-2),
    ] {
        let gpu = HndsrModel::load(&weights, &sha256, device, precision).unwrap();
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
    let (_dir, cpu, weights, sha256) = tiny(2);
    let setup = |m: HndsrModel| {
        m.with_tile(16)
            .unwrap()
            .with_self_ensemble(true)
            .with_projection_steps(5)
            .unwrap()
    };
    let cpu = setup(cpu);
    let gpu = setup(HndsrModel::load(&weights, &sha256, device, Precision::Fp32).unwrap());
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

/// About 50 ms of GPU work queued on the calling thread's current stream
/// (sixteen 4096² matmuls): whatever is queued after it finishes late.
fn busy(device: Device) {
    let a = Tensor::randn([4096, 4096], (Kind::Float, device)) / 64.0;
    let mut x = a.shallow_clone();
    for _ in 0..16 {
        x = x.matmul(&a);
    }
}

/// Concurrent images merged into shared passes while every thread runs on
/// its own CUDA stream, as the server's inference threads do: tiles cross
/// from the followers' streams to the leader's and the shares back, and
/// each image still gets what it gets alone. GPU work queued ahead of each
/// thread's tiles, and ahead of the merged pass (from the pass observer,
/// on the leader's stream), makes a missing synchronisation show as
/// unwritten memory.
#[test]
fn merged_passes_across_thread_streams_match_each_image_alone() {
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Duration;

    use hndsr_torch::hndsr::TileBatcher;
    use hndsr_torch::stream::{synchronize, use_own_stream};

    let device = open_device("cuda").expect("a CUDA device");
    let (_dir, _, weights, sha256) = tiny(3);
    let passes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&passes);
    // 40×40 at 16² tiles is 5×5 tiles: a pass of 75 takes the three images.
    let batcher = Arc::new(TileBatcher::new(
        75,
        Duration::from_secs(5),
        Some(Box::new(move |tiles| {
            seen.lock().unwrap().push(tiles);
            busy(device);
        })),
    ));
    let start = Arc::new(Barrier::new(3));
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let (batcher, start) = (Arc::clone(&batcher), Arc::clone(&start));
            let (weights, sha256) = (weights.clone(), sha256.clone());
            std::thread::spawn(move || {
                use_own_stream(device).unwrap().expect("a CUDA stream");
                let model = HndsrModel::load(&weights, &sha256, device, Precision::Fp32)
                    .unwrap()
                    .with_tile(16)
                    .unwrap();
                let never = || false;
                let mut worst = 0f64;
                for _ in 0..10 {
                    // Already on the device, so the tiles are cut by
                    // kernels queued behind `busy`, not by a synchronous
                    // copy from the host.
                    let input =
                        (Tensor::rand([1, 3, 40, 40], (Kind::Float, device)) + f64::from(i)) / 3.0;
                    let alone = model.upscale_image(&input, 0, 5, &never).unwrap();
                    synchronize(device).unwrap();
                    start.wait();
                    busy(device);
                    let runner = batcher.runner(Arc::new(|| false));
                    let merged = model
                        .upscale_image_via(&input, 0, 5, &never, &runner)
                        .unwrap();
                    let diff = (&merged - &alone).abs().max().double_value(&[]);
                    worst = worst.max(diff);
                }
                worst
            })
        })
        .collect();
    for h in handles {
        let diff = h.join().unwrap();
        assert!(diff < 2e-3, "merged differs from alone by {diff}");
    }
    let passes = passes.lock().unwrap().clone();
    assert_eq!(passes, vec![75; 10], "three images per pass, every round");
}

/// A replica loaded (and cast to fp16) on one thread's CUDA stream and used
/// at once on another's, as the server's replica pool lends them: the
/// weights are complete when the second stream reads them.
#[test]
fn a_replica_loaded_on_one_stream_serves_on_another() {
    use hndsr_torch::stream::use_own_stream;

    let device = open_device("cuda").expect("a CUDA device");
    let (_dir, cpu, weights, sha256) = tiny(4);
    let x = Tensor::rand([1, 3, 40, 48], (Kind::Float, Device::Cpu));
    let never = || false;
    let want = cpu.upscale_image(&x, 0, 7, &never).unwrap();
    for round in 0..5 {
        let (w, s) = (weights.clone(), sha256.clone());
        let replica = std::thread::spawn(move || {
            use_own_stream(device).unwrap();
            HndsrModel::load(&w, &s, device, Precision::Fp16).unwrap()
        })
        .join()
        .unwrap();
        let x = x.copy();
        let got = std::thread::spawn(move || {
            use_own_stream(device).unwrap();
            replica.upscale_image(&x, 0, 7, &|| false).unwrap()
        })
        .join()
        .unwrap();
        let diff = (&got - &want).abs().mean(Kind::Float).double_value(&[]);
        assert!(diff < 2e-2, "round {round}: mean |gpu fp16 - cpu| = {diff}");
    }
}

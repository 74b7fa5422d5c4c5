//! Bicubic and tiling against libtorch and an independent reference.

use std::cell::Cell;

use hndsr_torch::tch::{Device, Kind, Tensor};
use hndsr_torch::{BicubicUpscaler, TileConfig, TorchError, run_tiled, upsample_bicubic};

/// Tiled vs whole-image bicubic: with a margin of at least the kernel's
/// 2-pixel reach, every blended output pixel was computed from the same
/// input pixels as in the whole image; only the float rounding of the
/// source coordinate differs (tile-local vs global), and the blend weights
/// sum to 1 only up to f32 rounding. Measured: 1.2e-7 at x2 and x4 (exact
/// binary fractions), 3.5e-6 at x3. One 8-bit grey level is 3.9e-3.
const TILED_TOLERANCE: f64 = 1e-5;

/// A deterministic test image: smooth gradients, a sharp-edged square
/// and hash noise, in [0, 1].
fn test_image(channels: i64, h: i64, w: i64) -> Tensor {
    let mut data = Vec::with_capacity((channels * h * w) as usize);
    for c in 0..channels {
        for y in 0..h {
            for x in 0..w {
                let smooth =
                    0.5 + 0.25 * ((x as f32 * 0.11 + c as f32).sin() * (y as f32 * 0.07).cos());
                let square = if (h / 4..h / 2).contains(&y) && (w / 3..w / 2).contains(&x) {
                    0.3
                } else {
                    0.0
                };
                let mut hash = (c * 7919 + y * 104_729 + x * 1_299_709) as u32;
                hash ^= hash >> 13;
                hash = hash.wrapping_mul(0x5bd1_e995);
                hash ^= hash >> 15;
                let noise = (hash % 1000) as f32 / 1000.0 * 0.2 - 0.1;
                data.push((smooth + square + noise).clamp(0.0, 1.0));
            }
        }
    }
    Tensor::from_slice(&data).view([1, channels, h, w])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Keys cubic convolution, a = -0.75 (libtorch's choice).
fn keys(d: f64) -> f64 {
    let a = -0.75;
    let d = d.abs();
    if d <= 1.0 {
        (a + 2.0) * d * d * d - (a + 3.0) * d * d + 1.0
    } else if d < 2.0 {
        a * d * d * d - 5.0 * a * d * d + 8.0 * a * d - 4.0 * a
    } else {
        0.0
    }
}

/// Independent separable bicubic (half-pixel centres, clamped borders).
fn reference_bicubic(src: &[f32], h: usize, w: usize, scale: usize) -> Vec<f64> {
    let taps = |o: usize, n: usize| -> [(usize, f64); 4] {
        let s = (o as f64 + 0.5) / scale as f64 - 0.5;
        let i = s.floor();
        let t = s - i;
        let idx = |k: f64| (i + k).clamp(0.0, (n - 1) as f64) as usize;
        [
            (idx(-1.0), keys(t + 1.0)),
            (idx(0.0), keys(t)),
            (idx(1.0), keys(1.0 - t)),
            (idx(2.0), keys(2.0 - t)),
        ]
    };
    let (oh, ow) = (h * scale, w * scale);
    let mut out = vec![0.0; oh * ow];
    for oy in 0..oh {
        let ty = taps(oy, h);
        for ox in 0..ow {
            let tx = taps(ox, w);
            out[oy * ow + ox] = ty
                .iter()
                .flat_map(|&(y, wy)| {
                    tx.iter()
                        .map(move |&(x, wx)| f64::from(src[y * w + x]) * wy * wx)
                })
                .sum();
        }
    }
    out
}

fn whole_image_upscaler() -> BicubicUpscaler {
    BicubicUpscaler::new(
        Device::Cpu,
        TileConfig {
            tile: 4096,
            overlap: 8,
            margin: 2,
            batch: 1,
        },
    )
    .unwrap()
}

#[test]
fn whole_image_path_equals_libtorch_exactly() {
    let img = test_image(3, 37, 53);
    for scale in [2, 3, 4, 8] {
        let ours = whole_image_upscaler()
            .upscale(&img, scale, || false)
            .unwrap();
        let direct = img
            .upsample_bicubic2d([37 * scale, 53 * scale], false, None::<f64>, None::<f64>)
            .clamp(0.0, 1.0);
        assert_eq!(ours.size(), [1, 3, 37 * scale, 53 * scale]);
        assert_eq!(ours.kind(), Kind::Float);
        assert!(
            ours.equal(&direct),
            "scale {scale}: max diff {}",
            max_abs_diff(&ours, &direct)
        );
    }
}

#[test]
fn libtorch_bicubic_matches_an_independent_reference() {
    let (h, w, scale) = (11usize, 17usize, 4usize);
    let img = test_image(1, h as i64, w as i64);
    let src = Vec::<f32>::try_from(&img.flatten(0, -1)).unwrap();
    let expected = reference_bicubic(&src, h, w, scale);
    let got = upsample_bicubic(&img, scale as i64).unwrap();
    let got = Vec::<f32>::try_from(&got.flatten(0, -1)).unwrap();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(g, e)| (f64::from(*g) - e).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-5,
        "max deviation from the reference kernel: {worst}"
    );
}

#[test]
fn output_is_clamped_to_unit_range() {
    // A hard 0/1 checkerboard makes bicubic overshoot on both sides.
    let data: Vec<f32> = (0..64).map(|i| ((i / 8 + i % 8) % 2) as f32).collect();
    let img = Tensor::from_slice(&data).view([1, 1, 8, 8]);
    let raw = upsample_bicubic(&img, 4).unwrap();
    assert!(raw.max().double_value(&[]) > 1.0 && raw.min().double_value(&[]) < 0.0);
    let out = whole_image_upscaler().upscale(&img, 4, || false).unwrap();
    assert!(out.max().double_value(&[]) <= 1.0 && out.min().double_value(&[]) >= 0.0);
}

#[test]
fn tiled_matches_whole_image_without_seams() {
    let img = test_image(3, 150, 203);
    let tiles = TileConfig {
        tile: 48,
        overlap: 8,
        margin: 2,
        batch: 3,
    };
    for scale in [2, 3, 4] {
        let whole = whole_image_upscaler()
            .upscale(&img, scale, || false)
            .unwrap();
        let tiled = BicubicUpscaler::new(Device::Cpu, tiles)
            .unwrap()
            .upscale(&img, scale, || false)
            .unwrap();
        assert_eq!(tiled.size(), whole.size());
        let diff = max_abs_diff(&tiled, &whole);
        eprintln!("scale {scale}: max |tiled - whole| = {diff:e}");
        assert!(
            diff < TILED_TOLERANCE,
            "scale {scale}: max |tiled - whole| = {diff}"
        );
    }
}

#[test]
fn the_seam_check_would_catch_unblended_tiles() {
    // Abutting tiles with no overlap show the kernel's border clamping at
    // every tile edge: the comparison above is sensitive to seams.
    let img = test_image(1, 96, 96);
    let hard = TileConfig {
        tile: 32,
        overlap: 0,
        margin: 0,
        batch: 4,
    };
    let whole = whole_image_upscaler().upscale(&img, 4, || false).unwrap();
    let seamed = BicubicUpscaler::new(Device::Cpu, hard)
        .unwrap()
        .upscale(&img, 4, || false)
        .unwrap();
    assert!(max_abs_diff(&seamed, &whole) > 100.0 * TILED_TOLERANCE);
}

#[test]
fn alpha_and_gray_images_keep_their_channels() {
    for channels in 1..=4 {
        let img = test_image(channels, 20, 30);
        let out = whole_image_upscaler().upscale(&img, 3, || false).unwrap();
        assert_eq!(out.size(), [1, channels, 60, 90]);
    }
}

#[test]
fn cancellation_stops_between_tile_batches() {
    let img = test_image(3, 100, 100);
    let cfg = TileConfig {
        tile: 40,
        overlap: 8,
        margin: 2,
        batch: 2,
    };
    let calls = Cell::new(0);
    let checks = Cell::new(0);
    let result = run_tiled(
        &img,
        2,
        &cfg,
        |batch| {
            calls.set(calls.get() + 1);
            upsample_bicubic(&batch, 2)
        },
        || {
            checks.set(checks.get() + 1);
            // Cancel after the first batch has been computed.
            calls.get() >= 1
        },
    );
    assert!(matches!(result, Err(TorchError::Cancelled)), "{result:?}");
    assert_eq!(calls.get(), 1, "the model ran after cancellation");
    assert_eq!(checks.get(), 2);
}

#[test]
fn cancelled_before_start_runs_nothing() {
    let img = test_image(3, 16, 16);
    let calls = Cell::new(0);
    let result = run_tiled(
        &img,
        2,
        &TileConfig {
            tile: 64,
            overlap: 8,
            margin: 2,
            batch: 1,
        },
        |batch| {
            calls.set(calls.get() + 1);
            upsample_bicubic(&batch, 2)
        },
        || true,
    );
    assert!(matches!(result, Err(TorchError::Cancelled)));
    assert_eq!(calls.get(), 0);
}

#[test]
fn tiles_are_batched() {
    // 100 px with tile 40 / overlap 8 -> 3 tiles per axis -> 9 tiles.
    let img = test_image(1, 100, 100);
    let cfg = TileConfig {
        tile: 40,
        overlap: 8,
        margin: 2,
        batch: 4,
    };
    let mut sizes = Vec::new();
    let out = run_tiled(
        &img,
        2,
        &cfg,
        |batch| {
            sizes.push(batch.size()[0]);
            upsample_bicubic(&batch, 2)
        },
        || false,
    )
    .unwrap();
    assert_eq!(sizes, [4, 4, 1]);
    assert_eq!(out.size(), [1, 1, 200, 200]);
}

#[test]
fn a_model_returning_the_wrong_shape_is_an_error() {
    let img = test_image(1, 100, 100);
    let cfg = TileConfig {
        tile: 40,
        overlap: 8,
        margin: 2,
        batch: 4,
    };
    let result = run_tiled(&img, 2, &cfg, |batch| upsample_bicubic(&batch, 3), || false);
    // A model that answers the wrong shape is a server-side bug, not bad input.
    assert!(matches!(result, Err(TorchError::Internal(_))), "{result:?}");
}

#[test]
fn rejects_non_float_input() {
    let img = Tensor::zeros([1, 3, 8, 8], (Kind::Uint8, Device::Cpu));
    let result = whole_image_upscaler().upscale(&img, 2, || false);
    assert!(matches!(result, Err(TorchError::InvalidInput(_))));
}

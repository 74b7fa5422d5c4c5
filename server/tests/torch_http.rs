//! The server over real HTTP with the libtorch backends (feature `torch`;
//! CPU, so it runs on any machine with libtorch): bicubic, and the HNDSR
//! model in its tiny configuration.

#![cfg(feature = "torch")]
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{TestServer, config, png, start_with_backend};
use hndsr_server::backend::BackendInfo;
use hndsr_server::config::Config;
use hndsr_server::server::build_backend;
use hndsr_torch::hndsr::{HndsrConfig, HndsrModel, Inputs, Manifest};
use image::GenericImageView as _;

async fn start_bicubic() -> TestServer {
    let cfg = config(&[
        "--backend",
        "bicubic",
        "--device",
        "cpu",
        "--max-concurrent",
        "2",
    ]);
    let backend = build_backend(&cfg.model).expect("bicubic backend builds on CPU");
    start_with_backend(cfg, backend).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bicubic_upscales_over_http() {
    let s = start_bicubic().await;
    let info = s.info().await;
    assert_eq!(info["backend"], "bicubic");
    assert_eq!(info["device"], "cpu");

    let res = s.upscale(png(16, 12, 3), "scale=4").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/png");
    let out = image::load_from_memory(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(out.dimensions(), (64, 48));

    let res = s.upscale(png(16, 12, 3), "scale=5").await;
    assert_eq!(res.status(), 422, "a scale bicubic does not offer");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_of_a_request_reports_its_cpu_time() {
    let s = start_bicubic().await;
    let sum = |text: &str, stage: &str| -> f64 {
        let prefix = format!("hndsr_stage_cpu_seconds_sum{{stage=\"{stage}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing"))
    };
    let before = s.metrics().await;
    for i in 0..3 {
        assert_eq!(s.upscale(png(256, 256, i), "scale=4").await.status(), 200);
    }
    let after = s.metrics().await;
    for stage in ["decode", "to_tensor", "model", "from_tensor", "encode"] {
        let spent = sum(&after, stage) - sum(&before, stage);
        assert!(spent > 0.0, "{stage}: {spent}");
    }
    s.stop().await;
}

/// Writes randomly initialised tiny HNDSR weights and their manifest;
/// returns the weights path and sha256.
fn tiny_weights(dir: &std::path::Path) -> (String, String) {
    tiny_weights_with(dir, |_| {})
}

/// [`tiny_weights`] with the manifest's serving recommendations set by `edit`.
fn tiny_weights_with(dir: &std::path::Path, edit: impl FnOnce(&mut Manifest)) -> (String, String) {
    let cfg = HndsrConfig::tiny();
    let model = HndsrModel::random(&cfg, hndsr_torch::tch::Device::Cpu, 7).expect("tiny model");
    let path = dir.join("tiny.safetensors");
    let mut manifest = Manifest::untrained(&cfg, model.parameter_count());
    edit(&mut manifest);
    let manifest = model.save(&path, manifest).expect("save");
    (path.to_str().unwrap().to_owned(), manifest.sha256)
}

/// A server configuration with the `hndsr` backend on `weights` (expected
/// digest `sha256`) plus the extra server `args`.
fn hndsr_config(weights: &str, sha256: &str, args: &[&str]) -> Config {
    let mut argv = vec![
        "--backend",
        "hndsr",
        "--weights-path",
        weights,
        "--weights-sha256",
        sha256,
    ];
    argv.extend_from_slice(args);
    config(&argv)
}

/// The backend info of tiny weights whose manifest `edit` sets up, served
/// with the extra server `args`.
fn hndsr_info(edit: impl FnOnce(&mut Manifest), args: &[&str]) -> Result<BackendInfo, String> {
    let dir = tempfile::tempdir().unwrap();
    let (weights, sha256) = tiny_weights_with(dir.path(), edit);
    build_backend(&hndsr_config(&weights, &sha256, args).model)
        .map(|backend| backend.info())
        .map_err(|e| e.to_string())
}

/// As [`hndsr_info`] with the `quality` profile (the manifest's settings).
fn quality_info(edit: impl FnOnce(&mut Manifest), args: &[&str]) -> Result<BackendInfo, String> {
    let mut argv = vec!["--profile", "quality"];
    argv.extend_from_slice(args);
    hndsr_info(edit, &argv)
}

/// Tiny weights whose manifest recommends what the shipped weights do.
fn like_shipped(m: &mut Manifest) {
    m.default_steps = Some(0);
    m.self_ensemble = Some(true);
    m.tile = Some(24);
    m.projection_steps = Some(5);
}

#[test]
fn the_cpu_serves_the_fast_profile_unless_told_otherwise() {
    let fast = hndsr_info(like_shipped, &[]).unwrap();
    assert_eq!(fast.profile.as_deref(), Some("fast"), "the CPU's default");
    assert_eq!(
        (
            fast.default_steps,
            fast.self_ensemble,
            fast.tile,
            fast.projection_steps
        ),
        (0, false, Some(256), 0),
        "the manifest's slow settings are not served"
    );
    let quality = hndsr_info(like_shipped, &["--profile", "quality"]).unwrap();
    assert_eq!(quality.profile.as_deref(), Some("quality"));
    assert_eq!(
        (
            quality.default_steps,
            quality.self_ensemble,
            quality.tile,
            quality.projection_steps
        ),
        (0, true, Some(24), 5)
    );
    let tuned = hndsr_info(like_shipped, &["--projection-steps", "3"]).unwrap();
    assert_eq!(
        (tuned.profile.as_deref(), tuned.projection_steps, tuned.tile),
        (Some("fast"), 3, Some(256)),
        "a knob set on its own wins over the profile"
    );
}

/// Tiny weights labelled as trained for realistic inputs (never projected).
fn realistic(m: &mut Manifest) {
    like_shipped(m);
    m.projection_steps = Some(0);
    m.inputs = Some(Inputs::Realistic);
}

#[test]
fn realistic_weights_serve_the_realistic_profile_and_matched_ones_refuse_it() {
    let info = hndsr_info(realistic, &[]).unwrap();
    assert_eq!(
        info.profile.as_deref(),
        Some("realistic"),
        "the weights decide"
    );
    assert_eq!(
        (
            info.default_steps,
            info.self_ensemble,
            info.tile,
            info.projection_steps
        ),
        (0, false, Some(256), 0)
    );
    let on_gpu_default = hndsr_info(realistic, &["--profile", "quality"]).unwrap();
    assert_eq!(
        on_gpu_default.projection_steps, 0,
        "the manifest's, not projected"
    );

    let err = hndsr_info(like_shipped, &["--profile", "realistic"]).unwrap_err();
    assert!(
        err.contains("needs weights trained for realistic inputs"),
        "{err}"
    );
    let err = hndsr_info(realistic, &["--projection-steps", "5"]).unwrap_err();
    assert!(
        err.contains("inverts the matched degradation only"),
        "{err}"
    );
    // A manifest that recommends the projection for realistic weights is
    // refused as it is read.
    let err = hndsr_info(
        |m| {
            like_shipped(m);
            m.inputs = Some(Inputs::Realistic);
        },
        &[],
    )
    .unwrap_err();
    assert!(err.contains("set projection_steps to 0"), "{err}");
}

#[test]
fn hndsr_quality_settings_come_from_the_config_else_the_manifest() {
    let hndsr_info = |edit: &dyn Fn(&mut Manifest), args: &[&str]| quality_info(|m| edit(m), args);
    let steps = |recommended: Option<u32>, args: &[&str]| {
        hndsr_info(&|m: &mut Manifest| m.default_steps = recommended, args)
            .unwrap()
            .default_steps
    };
    assert_eq!(steps(Some(0), &[]), 0, "the manifest's recommendation");
    assert_eq!(
        steps(Some(0), &["--sampling-steps", "7"]),
        7,
        "the configuration wins"
    );
    assert_eq!(steps(None, &["--sampling-steps", "0"]), 0);
    assert_eq!(steps(None, &[]), 20, "neither: the fallback");
    let err = hndsr_info(&|m: &mut Manifest| m.default_steps = Some(5000), &[]).unwrap_err();
    assert!(err.contains("5000"), "{err}");

    let ensemble = |recommended: Option<bool>, args: &[&str]| {
        hndsr_info(&|m: &mut Manifest| m.self_ensemble = recommended, args)
            .unwrap()
            .self_ensemble
    };
    assert!(ensemble(Some(true), &[]), "the manifest's recommendation");
    assert!(
        !ensemble(Some(true), &["--self-ensemble", "false"]),
        "the configuration wins"
    );
    assert!(ensemble(None, &["--self-ensemble", "true"]));
    assert!(!ensemble(None, &[]), "neither: off");

    let tile = |recommended: Option<i64>, args: &[&str]| {
        hndsr_info(&|m: &mut Manifest| m.tile = recommended, args)
            .unwrap()
            .tile
    };
    assert_eq!(
        tile(Some(24), &[]),
        Some(24),
        "the manifest's recommendation"
    );
    assert_eq!(
        tile(Some(24), &["--tile", "64"]),
        Some(64),
        "the configuration wins"
    );
    assert_eq!(tile(None, &[]), Some(256), "neither: the default");

    let projection = |recommended: Option<u32>, args: &[&str]| {
        hndsr_info(&|m: &mut Manifest| m.projection_steps = recommended, args)
            .unwrap()
            .projection_steps
    };
    assert_eq!(
        projection(Some(20), &[]),
        20,
        "the manifest's recommendation"
    );
    assert_eq!(
        projection(Some(20), &["--projection-steps", "0"]),
        0,
        "the configuration wins"
    );
    assert_eq!(projection(None, &[]), 0, "neither: off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hndsr_tiny_model_upscales_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, sha256) = tiny_weights(dir.path());
    let cfg = hndsr_config(
        &weights,
        &sha256,
        &[
            "--sampling-steps",
            "2",
            "--self-ensemble",
            "true",
            "--tile",
            "16",
            "--projection-steps",
            "5",
            "--max-concurrent",
            "2",
        ],
    );
    let backend = build_backend(&cfg.model).expect("hndsr backend loads tiny weights");
    let s = start_with_backend(cfg, backend).await;
    let info = s.info().await;
    assert_eq!(info["backend"], "hndsr");
    assert_eq!(info["profile"], "fast", "the CPU's default");
    assert_eq!(info["model_digest"], sha256.as_str());
    assert_eq!(info["sampling_steps"], 2, "the configured default");
    assert_eq!(info["self_ensemble"], true);
    assert_eq!(
        info["tile"], 16,
        "a 20-pixel-wide input is cut into two tiles"
    );
    assert_eq!(info["projection_steps"], 5);

    for query in ["scale=4", "scale=4&steps=0", "scale=4&steps=2&seed=3"] {
        let res = s.upscale(png(20, 12, 5), query).await;
        assert_eq!(res.status(), 200, "{query}");
        let out = image::load_from_memory(&res.bytes().await.unwrap()).unwrap();
        assert_eq!(out.dimensions(), (80, 48), "{query}");
    }
    let res = s.upscale(png(20, 12, 5), "scale=2").await;
    assert_eq!(
        res.status(),
        422,
        "a scale the weights were not trained for"
    );
    s.stop().await;
}

#[test]
fn hndsr_refuses_weights_whose_digest_differs() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, _) = tiny_weights(dir.path());
    let cfg = hndsr_config(&weights, &"ab".repeat(32), &[]);
    let err = build_backend(&cfg.model).err().expect("refused");
    assert!(err.to_string().contains("sha256"), "{err}");
}

#[test]
fn the_contract_tile_range_is_the_model_crates() {
    use hndsr_torch::hndsr::{MAX_TILE, MIN_TILE};
    assert_eq!(i64::from(hndsr_contract::tile::MIN), MIN_TILE);
    assert_eq!(i64::from(hndsr_contract::tile::MAX), MAX_TILE);
}

#[test]
fn the_contract_projection_bound_is_the_model_crates() {
    assert_eq!(
        hndsr_contract::projection::MAX_STEPS,
        hndsr_torch::hndsr::MAX_PROJECTION_STEPS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_forward_passes_and_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, sha256) = tiny_weights(dir.path());
    let serve = |batch: &'static str| {
        let cfg = hndsr_config(
            &weights,
            &sha256,
            &[
                "--max-concurrent",
                "2",
                "--batch-tiles",
                batch,
                "--batch-wait-ms",
                "1000",
            ],
        );
        let backend = build_backend(&cfg.model).expect("tiny weights");
        start_with_backend(cfg, backend)
    };
    let passes = |text: &str| -> (u64, f64) {
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let count = value("hndsr_batch_tiles_count") as u64;
        (count, value("hndsr_batch_tiles_sum"))
    };
    let pair = |s: &TestServer| {
        let (a, b) = (png(16, 16, 1), png(16, 16, 2));
        let (ca, cb) = (s.client.clone(), s.client.clone());
        let url = s.url("/v1/upscale?scale=4");
        let url2 = url.clone();
        async move {
            let (ra, rb) = tokio::join!(
                async move {
                    ca.post(url)
                        .body(a)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap()
                },
                async move {
                    cb.post(url2)
                        .body(b)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap()
                },
            );
            (ra, rb)
        }
    };

    let alone = serve("0").await;
    assert_eq!(
        alone.info().await["batch_tiles"],
        0,
        "off on the CPU by default"
    );
    let before = passes(&alone.metrics().await);
    let expected = pair(&alone).await;
    let after = passes(&alone.metrics().await);
    assert_eq!(after.0 - before.0, 2, "two requests, two passes");
    alone.stop().await;

    let batched = serve("2").await;
    assert_eq!(batched.info().await["batch_tiles"], 2);
    let before = passes(&batched.metrics().await);
    let got = pair(&batched).await;
    let after = passes(&batched.metrics().await);
    assert_eq!(after.0 - before.0, 1, "two requests, one shared pass");
    assert!((after.1 - before.1 - 2.0).abs() < 1e-9, "of two tiles");
    // The same to within one 8-bit step (a merged pass may round a value
    // on a quantisation boundary the other way).
    let close = |a: &[u8], b: &[u8]| {
        let a = image::load_from_memory(a).unwrap().to_rgb8();
        let b = image::load_from_memory(b).unwrap().to_rgb8();
        a.dimensions() == b.dimensions()
            && a.pixels()
                .zip(b.pixels())
                .all(|(p, q)| p.0.iter().zip(q.0).all(|(x, y)| x.abs_diff(y) <= 1))
    };
    assert!(close(&got.0, &expected.0), "each gets its own answer");
    assert!(close(&got.1, &expected.1));
    batched.stop().await;
}

//! The server over real HTTP with the libtorch backends (feature `torch`;
//! CPU, so it runs on any machine with libtorch): bicubic, and the HNDSR
//! model in its tiny configuration.

#![cfg(feature = "torch")]
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{TestServer, config, png, start_with_backend};
use hndsr_server::server::build_backend;
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

/// Writes randomly initialised tiny HNDSR weights and their manifest;
/// returns the weights path and sha256.
fn tiny_weights(dir: &std::path::Path) -> (String, String) {
    tiny_weights_recommending(dir, None)
}

/// [`tiny_weights`] whose manifest recommends `default_steps`.
fn tiny_weights_recommending(
    dir: &std::path::Path,
    default_steps: Option<u32>,
) -> (String, String) {
    use hndsr_torch::hndsr::{HndsrConfig, HndsrModel, Manifest};
    let cfg = HndsrConfig::tiny();
    let model = HndsrModel::random(&cfg, hndsr_torch::tch::Device::Cpu, 7).expect("tiny model");
    let path = dir.join("tiny.safetensors");
    let manifest = Manifest {
        default_steps,
        ..Manifest::untrained(&cfg, model.parameter_count())
    };
    let manifest = model.save(&path, manifest).expect("save");
    (path.to_str().unwrap().to_owned(), manifest.sha256)
}

#[test]
fn hndsr_default_steps_come_from_the_config_else_the_manifest_else_twenty() {
    let default_steps = |recommended: Option<u32>, configured: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let (weights, sha256) = tiny_weights_recommending(dir.path(), recommended);
        let mut args = vec![
            "--backend",
            "hndsr",
            "--weights-path",
            &weights,
            "--weights-sha256",
            &sha256,
        ];
        if let Some(steps) = configured {
            args.extend(["--sampling-steps", steps]);
        }
        let backend = build_backend(&config(&args).model).expect("tiny weights load");
        backend.info().default_steps
    };
    assert_eq!(
        default_steps(Some(0), None),
        0,
        "the manifest's recommendation"
    );
    assert_eq!(
        default_steps(Some(0), Some("7")),
        7,
        "the configuration wins"
    );
    assert_eq!(default_steps(None, Some("0")), 0);
    assert_eq!(default_steps(None, None), 20, "neither: the fallback");
    let dir = tempfile::tempdir().unwrap();
    let (weights, sha256) = tiny_weights_recommending(dir.path(), Some(5000));
    let cfg = config(&[
        "--backend",
        "hndsr",
        "--weights-path",
        &weights,
        "--weights-sha256",
        &sha256,
    ]);
    let err = build_backend(&cfg.model).err().expect("refused");
    assert!(err.to_string().contains("5000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hndsr_tiny_model_upscales_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, sha256) = tiny_weights(dir.path());
    let cfg = config(&[
        "--backend",
        "hndsr",
        "--weights-path",
        &weights,
        "--weights-sha256",
        &sha256,
        "--sampling-steps",
        "2",
        "--max-concurrent",
        "2",
    ]);
    let backend = build_backend(&cfg.model).expect("hndsr backend loads tiny weights");
    let s = start_with_backend(cfg, backend).await;
    let info = s.info().await;
    assert_eq!(info["backend"], "hndsr");
    assert_eq!(info["model_digest"], sha256.as_str());
    assert_eq!(info["sampling_steps"], 2, "the configured default");

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
    let cfg = config(&[
        "--backend",
        "hndsr",
        "--weights-path",
        &weights,
        "--weights-sha256",
        &"ab".repeat(32),
    ]);
    let err = build_backend(&cfg.model).err().expect("refused");
    assert!(err.to_string().contains("sha256"), "{err}");
}

//! The server over real HTTP with the libtorch bicubic backend (feature
//! `torch`; CPU, so it runs on any machine with libtorch).

#![cfg(feature = "torch")]
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{TestServer, config, png, start_with_backend};
use hndsr_contract::http as paths;
use hndsr_server::server::build_backend;
use image::GenericImageView as _;
use serde_json::Value;

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
    let info: Value = s
        .client
        .get(s.url(paths::INFO_PATH))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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

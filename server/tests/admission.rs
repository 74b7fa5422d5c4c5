//! Admission over real HTTP with the fake backend: refusals by estimate
//! (deadlines), slow uploads, the connection cap, a lost device, and what
//! an error tells the client.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{HOLD, TestServer, eventually, png, start, start_unready};
use hndsr_contract::http as paths;
use hndsr_server::backend::fake::{Failure, FakeBackend};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A server whose fake backend takes `per_mpx` per output megapixel, from
/// the warm-up on (so the estimator is calibrated on that pace).
async fn paced(args: &[&str], per_mpx: Duration) -> TestServer {
    let backend = Arc::new(FakeBackend::new(Duration::ZERO));
    backend.set_delay_per_output_megapixel(per_mpx);
    let s = start_unready(args, Arc::clone(&backend)).await;
    s.wait_ready().await;
    backend.reset_counts();
    s
}

async fn body(res: reqwest::Response) -> Value {
    res.json().await.expect("JSON error body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_cannot_finish_in_its_deadline_is_refused_at_once() {
    // 10 s per output megapixel: the fake's pace dominates the codecs'
    // (debug builds, a busy machine), so the estimates are the pace's.
    let s = paced(&["--request-timeout-s", "2"], Duration::from_secs(10)).await;
    // 256² ×4 is 1.05 output megapixels: about 10.5 s at this pace.
    let limits = &s.info().await["limits"];
    let est = limits["estimated_seconds_256"].as_f64().unwrap();
    assert!((8.0..20.0).contains(&est), "calibrated to the pace: {est}");
    assert!((limits["deadline_margin"].as_f64().unwrap() - 1.2).abs() < 1e-9);

    // The deadline is 2 s.
    let started = Instant::now();
    let res = s.upscale(png(256, 256, 1), "scale=4").await;
    assert_eq!(res.status(), 422);
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    let b = body(res).await;
    assert_eq!(b["type"], "deadline_too_slow");
    let msg = b["error"].as_str().unwrap();
    assert!(
        msg.contains("1024x1024") && msg.contains("deadline of 2.0s"),
        "{msg}"
    );
    assert_eq!(s.backend.calls(), 0, "no work was started");

    // A client's shorter deadline is held to the same rule, and the answer
    // says how long a deadline it may ask for.
    let ask = |ms: &'static str| {
        s.client
            .post(s.url(paths::UPSCALE_PATH))
            .header("x-request-timeout-ms", ms)
            .body(png(32, 32, 2))
            .send()
    };
    let res = ask("100").await.unwrap();
    assert_eq!(res.status(), 422);
    let msg = body(res).await["error"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("x-request-timeout-ms (up to 2000 ms)"),
        "{msg}"
    );
    assert_eq!(
        ask("1500").await.unwrap().status(),
        200,
        "0.016 Mpx (0.16 s) fits 1.5 s"
    );
    assert_eq!(ask("soon").await.unwrap().status(), 400);
    assert_eq!(ask("0").await.unwrap().status(), 400);

    let text = s.metrics().await;
    assert!(
        text.contains(r#"hndsr_rejections_total{reason="deadline_too_slow"} 2"#),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_is_charged_for_the_computations_it_would_share_the_device_with() {
    // Two permits on one core: two calls at once run at half speed each.
    let backend = Arc::new(FakeBackend::new(Duration::ZERO));
    backend.set_delay_per_output_megapixel(Duration::from_secs(10));
    backend.share_cores(Some(1));
    let s = start_unready(
        &["--request-timeout-s", "5", "--max-concurrent", "2"],
        Arc::clone(&backend),
    )
    .await;
    s.wait_ready().await;
    backend.reset_counts();
    let slowdown = s.info().await["limits"]["shared_slowdown"]
        .as_f64()
        .unwrap();
    assert!(
        (1.5..2.5).contains(&slowdown),
        "warm-up measured it: {slowdown}"
    );

    // 0.26 output megapixels: about 2.6 s alone (3.1 s with the margin),
    // admitted with a deadline of 4 s.
    let first = {
        let (c, url, body) = (
            s.client.clone(),
            s.url(paths::UPSCALE_PATH),
            png(128, 128, 1),
        );
        tokio::spawn(async move {
            c.post(url)
                .header("x-request-timeout-ms", "4000")
                .body(body)
                .send()
                .await
                .unwrap()
        })
    };
    eventually("the first runs", || async { s.backend.running() == 1 }).await;

    // A permit is free, so there is no wait; but beside the first it
    // would run at half speed, ~5.2 s, past its 5 s deadline. Alone it
    // would have fitted.
    let res = s.upscale(png(128, 128, 2), "scale=4").await;
    assert_eq!(res.status(), 503);
    let b = body(res).await;
    assert_eq!(b["type"], "deadline_wait");
    assert!(
        b["error"].as_str().unwrap().contains("would need about"),
        "{b}"
    );

    // 0.15 Mpx fits its own deadline (~2.9 s shared), but would hold the
    // first back ~1.4 s: past the first's 4 s. Refused to keep the
    // admitted one on time.
    let res = s.upscale(png(96, 96, 3), "scale=4").await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let b = body(res).await;
    assert_eq!(b["type"], "deadline_wait");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("slow past their deadlines"),
        "{b}"
    );

    // A small one (0.04 s, 0.08 s shared) fits beside it.
    assert_eq!(s.upscale(png(16, 16, 4), "scale=4").await.status(), 200);
    let res = first.await.unwrap();
    assert_eq!(res.status(), 200, "the admitted request met its deadline");
    assert_eq!(s.backend.calls(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_up_calibration_is_not_counted_as_active_requests() {
    // Autoscalers read hndsr_active_requests: a pod calibrating on every
    // permit at once must not look busy with clients.
    let backend = Arc::new(FakeBackend::new(Duration::ZERO));
    backend.set_delay_per_output_megapixel(Duration::from_secs(10));
    backend.share_cores(Some(1));
    let s = start_unready(&["--max-concurrent", "2"], Arc::clone(&backend)).await;
    eventually("calibration on both permits", || async {
        s.backend.running() == 2
    })
    .await;
    let text = s.metrics().await;
    assert!(text.contains("hndsr_active_requests 0"), "{text}");
    s.wait_ready().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_the_queue_would_make_late_gets_503_and_retry_after() {
    let s = paced(
        &["--request-timeout-s", "5", "--max-concurrent", "1"],
        Duration::from_secs(10),
    )
    .await;
    // 0.26 output megapixels: about 2.6 s, admitted (×1.2 is within 5 s).
    let first = {
        let (c, url, body) = (
            s.client.clone(),
            s.url(paths::UPSCALE_PATH),
            png(128, 128, 1),
        );
        tokio::spawn(async move { c.post(url).body(body).send().await.unwrap() })
    };
    eventually("the first runs", || async { s.backend.running() == 1 }).await;

    // The same again would wait ~2.5 s for the only permit, then run
    // ~2.6 s: past its 5 s deadline. Refused at once, with a hint.
    let started = Instant::now();
    let res = s.upscale(png(128, 128, 2), "scale=4").await;
    assert_eq!(res.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    assert_eq!(body(res).await["type"], "deadline_wait");

    // A small one (0.04 s) fits behind it.
    assert_eq!(s.upscale(png(16, 16, 3), "scale=4").await.status(), 200);

    let res = first.await.unwrap();
    assert_eq!(res.status(), 200, "the admitted request met its deadline");
    let timing = res.headers()["server-timing"].to_str().unwrap().to_owned();
    assert!(timing.contains("estimate;dur="), "{timing}");
    assert_eq!(s.backend.calls(), 2);
    let text = s.metrics().await;
    assert!(
        text.contains(r#"hndsr_rejections_total{reason="deadline_wait"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("hndsr_service_estimate_ratio_count 2"),
        "{text}"
    );
    s.stop().await;
}

/// Sends a request head announcing `len` bytes, then `chunk` bytes every
/// `every`; returns what the server answered (until it closed).
async fn trickle(addr: std::net::SocketAddr, len: usize, chunk: usize, every: Duration) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/upscale HTTP/1.1\r\nhost: t\r\ncontent-type: image/png\r\ncontent-length: {len}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < len {
            tokio::time::sleep(every).await;
            if wr.write_all(&vec![0u8; chunk]).await.is_err() {
                break;
            }
            sent += chunk;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, rd.read_to_end(&mut answer)).await;
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_uploader_loses_its_slot_while_normal_clients_are_served() {
    let s = start(
        &[
            "--max-queue-depth",
            "2",
            "--max-concurrent",
            "1",
            "--min-upload-kib-s",
            "16",
        ],
        Duration::ZERO,
    )
    .await;
    let started = Instant::now();
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(trickle(s.addr, 100_000, 10, Duration::from_millis(200))))
        .collect();
    eventually("both slots held by the uploads", || async {
        s.state.core.in_flight() == 2
    })
    .await;
    assert_eq!(
        s.upscale(png(8, 8, 0), "").await.status(),
        503,
        "queue full"
    );

    // Within a few seconds the trickles are cut and normal clients served.
    for t in slow {
        let answer = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("slow_upload"), "{answer}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for i in 0..3 {
        assert_eq!(s.upscale(png(8, 8, i), "").await.status(), 200);
    }
    let text = s.metrics().await;
    assert!(
        text.contains(r#"hndsr_rejections_total{reason="slow_upload"} 2"#),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_connections_are_capped() {
    let s = start(
        &[
            "--max-connections",
            "3",
            "--header-read-timeout-s",
            "1",
            "--min-upload-kib-s",
            "0",
        ],
        Duration::ZERO,
    )
    .await;
    let open = || s.state.metrics.open_connections.get();
    // The test client's pooled connections idle out first.
    eventually("idle connections closed", || async { open() == 0 }).await;
    // Requests whose bodies never come hold their connections.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = "POST /v1/upscale HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n";
        tcp.write_all(head.as_bytes()).await.unwrap();
        held.push(tcp);
    }
    eventually("the cap reached", || async { open() == 3 }).await;

    let fresh = || {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let waited = fresh()
        .get(s.url(paths::HEALTHZ_PATH))
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(
        waited.is_err_and(|e| e.is_timeout()),
        "not served at the cap"
    );
    assert_eq!(open(), 3);

    drop(held);
    let res = fresh()
        .get(s.url(paths::HEALTHZ_PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "served once connections closed");
    s.stop().await;
}

#[tokio::test]
async fn a_lost_device_fails_liveness_and_turns_traffic_away() {
    let s = start(&[], Duration::ZERO).await;
    let probe = |path: &'static str| s.client.get(s.url(path)).send();
    assert_eq!(probe(paths::HEALTHZ_PATH).await.unwrap().status(), 200);

    s.backend.fail_next(Failure::DeviceLost);
    let res = s.upscale(png(4, 4, 1), "").await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let b = body(res).await;
    assert_eq!(b["type"], "device_lost");
    assert!(
        !b["error"].as_str().unwrap().contains("illegal memory"),
        "{b}"
    );

    assert_eq!(probe(paths::HEALTHZ_PATH).await.unwrap().status(), 503);
    let ready = probe(paths::READYZ_PATH).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(body(ready).await["status"], "unhealthy");
    // Later requests go elsewhere at once, without touching the device.
    let res = s.upscale(png(4, 4, 2), "").await;
    assert_eq!(res.status(), 503);
    assert_eq!(body(res).await["type"], "device_lost");
    assert_eq!(s.backend.calls(), 1);
    s.stop().await;
}

#[tokio::test]
async fn server_failures_name_the_request_id_not_the_internals() {
    let s = start(&[], Duration::ZERO).await;
    s.backend.fail_next(Failure::Internal);
    let res = s.upscale(png(4, 4, 1), "").await;
    assert_eq!(res.status(), 500);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let b = body(res).await;
    assert_eq!(b["type"], "backend_error");
    assert!(
        !b["error"].as_str().unwrap().contains("fake failure"),
        "{b}"
    );
    assert_eq!(b["request_id"], id.as_str());

    // Clients' own errors still explain themselves.
    let res = s.upscale(b"not an image".to_vec(), "").await;
    assert_eq!(res.status(), 415);
    assert!(body(res).await["request_id"].is_string());
    s.stop().await;
}

#[tokio::test]
async fn a_timed_out_computation_teaches_the_estimator() {
    let s = start(&["--request-timeout-s", "1"], HOLD).await;
    let before = s.state.core.estimate(64, 64, 4);
    assert_eq!(s.upscale(png(64, 64, 1), "scale=4").await.status(), 504);
    eventually("the estimate rose", || async {
        s.state.core.estimate(64, 64, 4) > before
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoding_does_not_wait_for_the_backend_permit() {
    let s = start(&["--max-concurrent", "1"], HOLD).await;
    let held = {
        let (c, url, body) = (s.client.clone(), s.url(paths::UPSCALE_PATH), png(8, 8, 1));
        tokio::spawn(async move { c.post(url).body(body).send().await })
    };
    eventually("the only permit is taken", || async {
        s.backend.running() == 1
    })
    .await;
    // A valid header (admission's probe passes) over corrupt pixel data:
    // refused as soon as it is decoded, while the permit stays taken.
    let mut corrupt = png(64, 64, 2);
    let n = corrupt.len();
    corrupt.truncate(n - 40);
    let started = Instant::now();
    let res = s.upscale(corrupt, "").await;
    assert_eq!(res.status(), 400);
    assert_eq!(body(res).await["type"], "invalid_image");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.backend.running(), 1);
    s.backend.set_delay(Duration::ZERO);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    s.stop().await;
}

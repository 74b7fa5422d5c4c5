//! The server over real HTTP on 127.0.0.1:0 with the fake backend.
//!
//! Tests hold backend calls with a long fake delay and release them by
//! setting the delay to zero, so they assert on states, not on timings;
//! every wait is bounded by `common::WAIT`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{HOLD, eventually, png, png_bomb_header, start, start_unready};
use hndsr_contract::{http as paths, metrics as names};
use hndsr_server::backend::fake::{Failure, FakeBackend};
use image::{DynamicImage, GenericImageView as _, ImageBuffer, ImageFormat};
use serde_json::Value;

async fn error_type(res: reqwest::Response) -> String {
    let body: Value = res.json().await.expect("JSON error body");
    assert!(body["error"].is_string(), "{body}");
    body["type"].as_str().expect("type").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_503_with_retry_after_at_once() {
    let s = start(&["--max-concurrent", "4", "--max-queue-depth", "20"], HOLD).await;
    let mut held = Vec::new();
    for i in 0..20_u8 {
        let (c, url, body) = (s.client.clone(), s.url("/v1/upscale?scale=2"), png(4, 4, i));
        held.push(tokio::spawn(async move {
            c.post(url).body(body).send().await.expect("send").status()
        }));
    }
    eventually("20 requests in flight", || async {
        s.state.core.in_flight() == 20
    })
    .await;
    eventually("4 backend calls running", || async {
        s.backend.running() == 4
    })
    .await;

    let res = s.upscale(png(4, 4, 200), "scale=2").await;
    assert_eq!(res.status(), 503);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    assert_eq!(error_type(res).await, "overloaded");
    assert_eq!(
        s.backend.max_running(),
        4,
        "never more than MAX_CONCURRENT calls"
    );

    s.backend.set_delay(Duration::ZERO);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert!(
        s.metrics()
            .await
            .contains(r#"hndsr_rejections_total{reason="overloaded"} 1"#)
    );
    s.stop().await;
}

/// A client still sending its body when the server turns it away must read
/// the 503 (and its Retry-After), not a connection reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_client_still_sending_reads_the_503() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let s = start(&["--max-concurrent", "1", "--max-queue-depth", "1"], HOLD).await;
    let (c, url) = (s.client.clone(), s.url("/v1/upscale?scale=2"));
    let held = tokio::spawn(async move { c.post(url).body(png(4, 4, 1)).send().await });
    eventually("the one slot taken", || async {
        s.state.core.in_flight() == 1
    })
    .await;

    let body = vec![0_u8; 512 * 1024];
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/upscale HTTP/1.1\r\nhost: {}\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(16 * 1024) {
        conn.write_all(chunk)
            .await
            .expect("the server reads the body it rejects");
        tokio::task::yield_now().await;
    }
    let mut answer = vec![0_u8; 4096];
    let n = tokio::time::timeout(common::WAIT, conn.read(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after:"), "{answer}");

    s.backend.set_delay(Duration::ZERO);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_stays_bounded_through_timeouts_and_disconnects() {
    let s = start(
        &[
            "--max-concurrent",
            "2",
            "--max-queue-depth",
            "20",
            "--request-timeout-s",
            "1",
        ],
        HOLD,
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..6_u8 {
        // These time out on the server (504) while holding permits.
        let (c, url, body) = (s.client.clone(), s.url("/v1/upscale"), png(4, 4, i));
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for i in 10..14_u8 {
        // These disconnect early.
        let (c, url, body) = (s.client.clone(), s.url("/v1/upscale"), png(4, 4, i));
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .body(body)
                .timeout(Duration::from_millis(100))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            Ok(status) => assert_eq!(status, 504),
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
    }
    eventually("every backend call stopped", || async {
        s.backend.running() == 0
    })
    .await;
    assert!(
        s.backend.max_running() <= 2,
        "max running {}",
        s.backend.max_running()
    );
    assert!(s.backend.cancelled() >= 1, "the backend saw cancellations");
    eventually("in-flight back to 0", || async {
        s.state.core.in_flight() == 0
    })
    .await;

    // Capacity is intact afterwards.
    s.backend.set_delay(Duration::ZERO);
    assert_eq!(s.upscale(png(4, 4, 99), "").await.status(), 200);
    assert!(s.backend.max_running() <= 2);
    let text = s.metrics().await;
    assert!(
        text.contains(&format!("{} 0", names::ACTIVE_REQUESTS)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 0", names::QUEUE_DEPTH)),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn timeout_answers_504_and_cancels_the_backend() {
    let s = start(&["--request-timeout-s", "1"], HOLD).await;
    let res = s.upscale(png(4, 4, 1), "scale=2").await;
    assert_eq!(res.status(), 504);
    assert_eq!(error_type(res).await, "timeout");
    eventually("backend saw the cancel", || async {
        s.backend.cancelled() == 1
    })
    .await;
    eventually("backend call returned", || async {
        s.backend.running() == 0
    })
    .await;
    assert!(
        s.metrics()
            .await
            .contains(r#"hndsr_requests_total{outcome="timeout"} 1"#)
    );
    s.stop().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_backend() {
    let s = start(&[], HOLD).await;
    let client = {
        let (c, url) = (s.client.clone(), s.url(paths::UPSCALE_PATH));
        tokio::spawn(async move { c.post(url).body(png(4, 4, 1)).send().await })
    };
    eventually("backend call running", || async {
        s.backend.running() == 1
    })
    .await;
    // Dropping the request future closes its connection: a client disconnect.
    client.abort();
    eventually("backend saw the cancel", || async {
        s.backend.cancelled() == 1
    })
    .await;
    eventually("disconnect counted", || async {
        s.metrics()
            .await
            .contains(r#"hndsr_requests_total{outcome="disconnected"} 1"#)
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let s = start(&["--max-payload-mb", "1"], Duration::ZERO).await;
    let res = s.upscale(vec![0; 1024 * 1024 + 1], "").await;
    assert_eq!(res.status(), 413);
    assert_eq!(error_type(res).await, "payload_too_large");

    // Chunked, with no Content-Length: the limit still applies while reading.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = "POST /v1/upscale HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..20 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if tcp.write_all(&frame).await.is_err() {
            break; // the server answered and closed early
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(s.backend.calls(), 0);
    s.stop().await;
}

#[tokio::test]
async fn the_memory_budget_refuses_what_cannot_fit_and_queues_what_can() {
    // 60x60 at x4: about 4 MiB of buffers; 100x100: about 11 MiB.
    let run_two = |args: &'static [&'static str]| async move {
        let s = start(args, Duration::from_millis(300)).await;
        let (a, b) = tokio::join!(
            s.upscale(png(60, 60, 1), "scale=4"),
            s.upscale(png(60, 60, 2), "scale=4")
        );
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        let most = s.backend.max_running();
        let too_big = s.upscale(png(100, 100, 3), "scale=4").await;
        s.stop().await;
        (most, too_big)
    };

    let (most, too_big) = run_two(&["--memory-budget-mb", "6"]).await;
    assert_eq!(most, 1, "the second request waited for the first's memory");
    assert_eq!(too_big.status(), 413);
    let body: Value = too_big.json().await.unwrap();
    assert_eq!(body["type"], "image_too_large", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("budget for all requests is 6 MiB"),
        "{body}"
    );

    let (most, too_big) = run_two(&["--memory-budget-mb", "0"]).await;
    assert_eq!(most, 2, "no budget: both ran at once");
    assert_eq!(too_big.status(), 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = start(&["--header-read-timeout-s", "1"], Duration::ZERO).await;
    // Partial headers; the first byte of an HTTP/2 preface; nothing at all.
    for partial in ["POST /v1/upscale HTTP/1.1\r\nhost: t\r\n", "P", ""] {
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(partial.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("still open after 5 s with {partial:?}"))
            .ok();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed only after the timeout"
        );
    }
    // A client that does finish its request is served as before.
    assert_eq!(s.upscale(png(2, 2, 1), "").await.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_client_expecting_100_continue_is_refused_without_being_asked_to_upload() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let backend = std::sync::Arc::new(FakeBackend::new(Duration::ZERO));
    backend.hold_warm_up(true);
    let s = start_unready(&[], backend.clone()).await;
    eventually("warm-up started", || async { backend.warm_ups() == 1 }).await;
    // Warming up: admission answers 503. The client waits for 100 Continue
    // before it sends its 5 MB; it must get the 503 instead.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = "POST /v1/upscale HTTP/1.1\r\nhost: t\r\ncontent-type: image/png\r\n\
                content-length: 5000000\r\nexpect: 100-continue\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    backend.hold_warm_up(false);
    s.wait_ready().await;
    s.stop().await;
}

#[tokio::test]
async fn decompression_bomb_header_is_refused_before_decoding() {
    let s = start(&[], Duration::ZERO).await;
    let res = s.upscale(png_bomb_header(100_000, 100_000), "").await;
    assert!(
        res.status() == 413 || res.status() == 422,
        "{}",
        res.status()
    );
    assert_eq!(error_type(res).await, "image_too_large");

    // Within the input budget but over the output budget (16x the input budget) at x8.
    let s2 = start(&["--max-image-pixels", "100"], Duration::ZERO).await;
    let res = s2.upscale(png(10, 10, 0), "scale=8").await;
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("output"),
        "{body}"
    );
    assert_eq!(s.backend.calls() + s2.backend.calls(), 0);
    s.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn corrupt_and_unsupported_images_are_refused() {
    let s = start(&[], Duration::ZERO).await;
    let mut truncated = png(8, 8, 1);
    truncated.truncate(30);
    let res = s.upscale(truncated, "").await;
    assert_eq!(res.status(), 400);
    assert_eq!(error_type(res).await, "invalid_image");

    let mut garbage_pixels = png(8, 8, 1);
    let n = garbage_pixels.len();
    garbage_pixels[n - 30..n - 12].fill(0xAB);
    let res = s.upscale(garbage_pixels, "").await;
    assert_eq!(res.status(), 400, "corrupt pixel data");

    let res = s.upscale(b"GIF89a not really".to_vec(), "").await;
    assert_eq!(res.status(), 415);
    let res = s.upscale(b"plain text".to_vec(), "").await;
    assert_eq!(res.status(), 415);
    assert_eq!(error_type(res).await, "unsupported_media_type");

    let res = s.upscale(png(4, 4, 1), "scale=7").await;
    assert_eq!(res.status(), 422);
    let res = s.upscale(png(4, 4, 1), "scale=banana").await;
    assert_eq!(res.status(), 400);
    assert_eq!(error_type(res).await, "bad_request");
    s.stop().await;
}

#[tokio::test]
async fn refusals_for_readiness_are_not_charged_to_the_rate_limit() {
    let backend = std::sync::Arc::new(FakeBackend::new(Duration::ZERO));
    backend.hold_warm_up(true);
    let s = start_unready(&["--rate-limit-per-hour", "1"], backend.clone()).await;
    eventually("warm-up started", || async { backend.warm_ups() == 1 }).await;
    for i in 0..3 {
        let res = s.upscale(png(2, 2, i), "").await;
        assert_eq!(res.status(), 503, "warming up");
    }
    backend.hold_warm_up(false);
    s.wait_ready().await;
    assert_eq!(
        s.upscale(png(2, 2, 9), "").await.status(),
        200,
        "the one request of the hour is still there"
    );
    assert_eq!(s.upscale(png(2, 2, 10), "").await.status(), 429);
    s.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let s = start(&["--rate-limit-per-hour", "2"], Duration::ZERO).await;
    assert_eq!(s.upscale(png(2, 2, 1), "").await.status(), 200);
    assert_eq!(s.upscale(png(2, 2, 2), "").await.status(), 200);
    let res = s.upscale(png(2, 2, 3), "").await;
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 60,
        "one request per 30 minutes: Retry-After {retry}"
    );
    assert_eq!(error_type(res).await, "rate_limited");
    // Probes are not rate limited.
    assert_eq!(
        s.client
            .get(s.url(paths::READYZ_PATH))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.stop().await;
}

async fn post_from(s: &common::TestServer, xff: &str) -> u16 {
    s.client
        .post(s.url(paths::UPSCALE_PATH))
        .header("x-forwarded-for", xff)
        .body(png(2, 2, 1))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn forwarded_for_counts_only_behind_trusted_proxies() {
    let trusted = start(
        &[
            "--rate-limit-per-hour",
            "1",
            "--trusted-proxies",
            "127.0.0.0/8",
        ],
        Duration::ZERO,
    )
    .await;
    assert_eq!(post_from(&trusted, "203.0.113.1").await, 200);
    assert_eq!(
        post_from(&trusted, "203.0.113.2").await,
        200,
        "another client"
    );
    assert_eq!(
        post_from(&trusted, "203.0.113.1").await,
        429,
        "same client again"
    );

    let untrusted = start(
        &[
            "--rate-limit-per-hour",
            "1",
            "--trusted-proxies",
            "10.0.0.0/8",
        ],
        Duration::ZERO,
    )
    .await;
    assert_eq!(post_from(&untrusted, "203.0.113.1").await, 200);
    assert_eq!(
        post_from(&untrusted, "203.0.113.2").await,
        429,
        "spoofed header ignored"
    );
    trusted.stop().await;
    untrusted.stop().await;
}

#[tokio::test]
async fn out_of_memory_answers_503_and_the_server_stays_ready() {
    let s = start(&[], Duration::ZERO).await;
    s.backend.fail_next(Failure::OutOfMemory);
    let res = s.upscale(png(4, 4, 1), "").await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(error_type(res).await, "out_of_memory");
    assert_eq!(
        s.client
            .get(s.url(paths::READYZ_PATH))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.upscale(png(4, 4, 1), "").await.status(), 200);
    assert!(
        s.metrics()
            .await
            .contains(r#"hndsr_requests_total{outcome="out_of_memory"} 1"#)
    );
    s.stop().await;
}

#[tokio::test]
async fn backend_panic_answers_500_and_the_next_request_succeeds() {
    let s = start(
        &["--max-concurrent", "1", "--max-queue-depth", "1"],
        Duration::ZERO,
    )
    .await;
    s.backend.fail_next(Failure::Panic);
    let res = s.upscale(png(4, 4, 1), "").await;
    assert_eq!(res.status(), 500);
    assert_eq!(error_type(res).await, "backend_panic");
    // The single inference thread survived and the single permit came back.
    assert_eq!(
        s.client
            .get(s.url(paths::HEALTHZ_PATH))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.upscale(png(4, 4, 1), "").await.status(), 200);

    s.backend.fail_next(Failure::Internal);
    let res = s.upscale(png(4, 4, 2), "").await;
    assert_eq!(res.status(), 500);
    assert_eq!(error_type(res).await, "backend_error");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_in_flight_requests_and_turns_unready() {
    let s = start(&["--drain-seconds", "30"], HOLD).await;
    let mut held = Vec::new();
    for i in 0..2_u8 {
        let (c, url, body) = (s.client.clone(), s.url(paths::UPSCALE_PATH), png(4, 4, i));
        held.push(tokio::spawn(async move {
            c.post(url).body(body).send().await.expect("send").status()
        }));
    }
    eventually("both running", || async { s.backend.running() == 2 }).await;
    s.shutdown.cancel();

    let readyz = s.url(paths::READYZ_PATH);
    eventually("readyz reports draining", || async {
        s.client
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let res = s.upscale(png(4, 4, 9), "").await;
    assert_eq!(res.status(), 503, "no new work while draining");
    assert_eq!(
        res.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "keep-alive clients are told to reconnect elsewhere"
    );
    assert_eq!(error_type(res).await, "unavailable");
    assert!(!s.handle.is_finished(), "still draining");

    s.backend.set_delay(Duration::ZERO);
    for h in held {
        assert_eq!(h.await.unwrap(), 200, "in-flight requests complete");
    }
    let result = tokio::time::timeout(common::WAIT, s.handle)
        .await
        .expect("server exits");
    result.unwrap().expect("clean exit");
}

#[tokio::test]
async fn readyz_waits_for_warm_up() {
    let backend = std::sync::Arc::new(FakeBackend::new(Duration::ZERO));
    backend.hold_warm_up(true);
    let s = start_unready(&[], backend.clone()).await;
    let readyz = s.url(paths::READYZ_PATH);
    eventually("warm-up started", || async { backend.warm_ups() == 1 }).await;
    let res = s.client.get(&readyz).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "warming_up");
    assert_eq!(
        s.client
            .get(s.url(paths::HEALTHZ_PATH))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.upscale(png(2, 2, 0), "").await.status(), 503);
    backend.hold_warm_up(false);
    s.wait_ready().await;
    assert_eq!(s.upscale(png(2, 2, 0), "").await.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_failed_warm_up_always_ends_the_server_with_an_error() {
    // The exit status once depended on whether the warm-up task or the
    // HTTP server finished first; repeat to give that race its chances.
    for _ in 0..20 {
        let backend = std::sync::Arc::new(FakeBackend::new(Duration::ZERO));
        backend.fail_warm_up(true);
        let s = start_unready(&[], backend).await;
        let result = tokio::time::timeout(common::WAIT, s.handle)
            .await
            .expect("the server stops by itself");
        let err = result
            .unwrap()
            .expect_err("a failed warm-up is an error exit");
        assert!(err.to_string().contains("the fake warm-up failed"), "{err}");
    }
}

#[tokio::test]
async fn every_inference_thread_is_prepared_before_it_takes_work() {
    let backend = std::sync::Arc::new(FakeBackend::new(Duration::ZERO));
    let s = start_unready(&["--max-concurrent", "3"], backend.clone()).await;
    s.wait_ready().await;
    eventually("three threads prepared", || async {
        backend.thread_inits() == 3
    })
    .await;
    assert_eq!(s.upscale(png(2, 2, 0), "").await.status(), 200);
    assert_eq!(backend.thread_inits(), 3, "once per thread, not per call");
    s.stop().await;
}

#[tokio::test]
async fn metrics_expose_contract_names_and_buckets() {
    let s = start(&[], Duration::ZERO).await;
    assert_eq!(s.upscale(png(4, 4, 1), "").await.status(), 200);
    let text = s.metrics().await;
    for name in [
        names::ACTIVE_REQUESTS,
        names::QUEUE_DEPTH,
        names::REQUEST_DURATION_SECONDS,
        names::QUEUE_WAIT_SECONDS,
        names::INFERENCE_SECONDS,
        names::REQUESTS_TOTAL,
        names::REJECTIONS_TOTAL,
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    for le in names::REQUEST_DURATION_BUCKETS {
        let line = format!("{}_bucket{{le=\"{le}\"}}", names::REQUEST_DURATION_SECONDS);
        assert!(text.contains(&line), "{line} missing");
    }
    assert!(
        text.contains(r#"hndsr_requests_total{outcome="ok"} 1"#),
        "{text}"
    );
    assert!(text.contains(&format!("{}_count 1", names::REQUEST_DURATION_SECONDS)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_concurrent_requests_share_one_backend_call() {
    let s = start(&[], HOLD).await;
    let body = png(6, 5, 42);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (c, url, body) = (
            s.client.clone(),
            s.url("/v1/upscale?scale=2&seed=7"),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let res = c.post(url).body(body).send().await.expect("send");
            let shared = res.headers().contains_key("x-hndsr-coalesced");
            (res.status(), shared, res.bytes().await.expect("body"))
        }));
    }
    eventually("all ten admitted", || async {
        s.state.core.in_flight() == 10
    })
    .await;
    eventually("nine joined the first one's computation", || async {
        s.metrics()
            .await
            .contains("hndsr_coalesced_requests_total 9")
    })
    .await;
    assert_eq!(s.backend.calls(), 1);
    s.backend.set_delay(Duration::ZERO);
    let mut bodies = Vec::new();
    let mut shared = 0;
    for t in tasks {
        let (status, was_shared, bytes) = t.await.unwrap();
        assert_eq!(status, 200);
        shared += usize::from(was_shared);
        bodies.push(bytes);
    }
    assert_eq!(s.backend.calls(), 1);
    assert_eq!(shared, 9);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));

    // A different seed is a different computation.
    assert_eq!(s.upscale(body, "scale=2&seed=8").await.status(), 200);
    assert_eq!(s.backend.calls(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_waiter_leaving_does_not_cancel_the_others() {
    let s = start(&[], HOLD).await;
    let body = png(4, 4, 5);
    let quitter = {
        let (c, url, body) = (s.client.clone(), s.url(paths::UPSCALE_PATH), body.clone());
        tokio::spawn(async move { c.post(url).body(body).send().await })
    };
    let stayer = {
        let (c, url, body) = (s.client.clone(), s.url(paths::UPSCALE_PATH), body.clone());
        tokio::spawn(async move { c.post(url).body(body).send().await.expect("send").status() })
    };
    eventually("both joined one computation", || async {
        s.metrics()
            .await
            .contains("hndsr_coalesced_requests_total 1")
    })
    .await;
    quitter.abort();
    eventually("quitter gone", || async { s.state.core.in_flight() == 1 }).await;
    assert_eq!(s.backend.cancelled(), 0);
    s.backend.set_delay(Duration::ZERO);
    assert_eq!(stayer.await.unwrap(), 200);
    assert_eq!(s.backend.calls(), 1);
    s.stop().await;
}

#[tokio::test]
async fn json_endpoint_round_trips() {
    let s = start(&[], Duration::ZERO).await;
    let input = png(5, 3, 9);
    let res = s
        .client
        .post(s.url("/upscale"))
        .json(&serde_json::json!({ "image": BASE64.encode(&input), "scale": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["format"], "png");
    assert_eq!(
        (
            body["width"].as_u64(),
            body["height"].as_u64(),
            body["scale"].as_u64()
        ),
        (Some(10), Some(6), Some(2))
    );
    let out =
        image::load_from_memory(&BASE64.decode(body["image"].as_str().unwrap()).unwrap()).unwrap();
    let src = image::load_from_memory(&input).unwrap();
    assert_eq!(out.dimensions(), (10, 6));
    assert_eq!(
        out.get_pixel(9, 5),
        src.get_pixel(4, 2),
        "nearest-neighbour fake"
    );

    // Line-wrapped base64, as `base64` writes it (76 columns), is accepted.
    let big = png(40, 30, 3);
    let wrapped: String = BASE64
        .encode(&big)
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
        .collect();
    assert!(wrapped.matches('\n').count() > 1);
    let res = s
        .client
        .post(s.url("/upscale"))
        .json(&serde_json::json!({ "image": wrapped, "scale": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let res = s
        .client
        .post(s.url("/upscale"))
        .json(&serde_json::json!({ "image": "!!" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = s
        .client
        .post(s.url("/upscale"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    s.stop().await;
}

#[tokio::test]
async fn sixteen_bit_rgba_and_tiff_keep_their_layout() {
    let s = start(&[], Duration::ZERO).await;
    let rgba16 = DynamicImage::ImageRgba16(ImageBuffer::from_fn(3, 2, |x, y| {
        image::Rgba([
            u16::try_from(x * 20_000).unwrap(),
            65_535,
            u16::try_from(y * 999).unwrap(),
            30_000,
        ])
    }));
    let res = s
        .upscale(common::encode(&rgba16, ImageFormat::Png), "scale=2")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/png");
    assert!(
        res.headers()["server-timing"]
            .to_str()
            .unwrap()
            .contains("inference;dur=")
    );
    assert!(res.headers().contains_key("x-request-id"));
    let out = image::load_from_memory(&res.bytes().await.unwrap()).unwrap();
    let DynamicImage::ImageRgba16(out) = out else {
        panic!("not RGBA16: {:?}", out.color())
    };
    assert_eq!(out.dimensions(), (6, 4));
    assert_eq!(
        out.get_pixel(5, 3),
        rgba16.as_rgba16().unwrap().get_pixel(2, 1)
    );

    let gray = DynamicImage::ImageLuma8(ImageBuffer::from_fn(2, 2, |x, _| {
        image::Luma([u8::try_from(x * 100).unwrap()])
    }));
    let res = s
        .upscale(common::encode(&gray, ImageFormat::Tiff), "scale=3")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/tiff");
    let out = image::load_from_memory(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(out.color(), image::ColorType::L8);
    assert_eq!(out.dimensions(), (6, 6));
    s.stop().await;
}

#[tokio::test]
async fn info_request_ids_and_unknown_routes() {
    let s = start(
        &["--max-concurrent", "3", "--max-queue-depth", "7"],
        Duration::ZERO,
    )
    .await;
    let res = s
        .client
        .get(s.url(paths::INFO_PATH))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["x-request-id"],
        "abc-123",
        "a given id is propagated"
    );
    let info: Value = res.json().await.unwrap();
    assert_eq!(info["backend"], "fake");
    assert_eq!(info["limits"]["max_concurrent"], 3);
    assert_eq!(info["limits"]["max_queue_depth"], 7);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    let res = s
        .client
        .get(s.url(paths::UPSCALE_PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(error_type(res).await, "method_not_allowed");
    let res = s.client.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(error_type(res).await, "not_found");
    s.stop().await;
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let s = start(&["--cors-origins", "https://ok.example"], Duration::ZERO).await;
    let ask = |origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url(paths::UPSCALE_PATH))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = ask("https://ok.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://ok.example"
    );
    let other = ask("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    s.stop().await;
}

#[tokio::test]
async fn openapi_document_matches_the_committed_file() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("docs/openapi.json exists; run `make generate`");
    let generated = hndsr_server::http::openapi::json();
    assert!(
        committed == generated,
        "docs/openapi.json is stale; run `make generate`"
    );
    let s = start(&[], Duration::ZERO).await;
    let served = s
        .client
        .get(s.url(paths::OPENAPI_PATH))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, generated);
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert!(doc["paths"][paths::UPSCALE_PATH]["post"].is_object());
    assert!(doc["paths"]["/upscale"]["post"].is_object());
    s.stop().await;
}

#[test]
fn invalid_configuration_fails_at_start_up_with_a_clear_message() {
    let bin = env!("CARGO_BIN_EXE_hndsr-server");
    let out = std::process::Command::new(bin)
        .args(["--max-concurrent", "4", "--max-queue-depth", "3"])
        .env_remove("MAX_CONCURRENT")
        .env_remove("MAX_QUEUE_DEPTH")
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MAX_QUEUE_DEPTH (3) must be >= MAX_CONCURRENT (4)"),
        "{stderr}"
    );

    let out = std::process::Command::new(bin)
        .env("MAX_CONCURRENT", "0")
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAX_CONCURRENT must be greater than 0"));

    let out = std::process::Command::new(bin)
        .args(["--cors-origins", "*"])
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(2));

    let out = std::process::Command::new(bin)
        .arg("openapi")
        .output()
        .expect("run the binary");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        hndsr_server::http::openapi::json()
    );
}

#[cfg(not(feature = "torch"))]
#[test]
fn backends_not_compiled_in_are_a_start_up_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hndsr-server"))
        .args(["--backend", "bicubic", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not compiled into this binary"), "{stderr}");
}

#[tokio::test]
async fn clients_choose_a_cheaper_encoding_of_the_same_pixels() {
    let s = start(&[], Duration::ZERO).await;
    let body = png(32, 24, 7);
    let send = |query: &'static str, accept: Option<&'static str>| {
        let mut req = s
            .client
            .post(s.url(&format!("{}?{query}", paths::UPSCALE_PATH)))
            .body(body.clone());
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        req.send()
    };
    let fetch = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 200);
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        let bytes = res.bytes().await.unwrap();
        (
            ct,
            bytes.len(),
            image::load_from_memory(&bytes).unwrap().to_rgb8(),
        )
    };
    let (ct, fast_len, pixels) = fetch(send("scale=4", None).await.unwrap()).await;
    assert_eq!(ct, "image/png");
    let (_, none_len, same) = fetch(send("scale=4&compression=none", None).await.unwrap()).await;
    assert_eq!(same, pixels);
    assert!(none_len > fast_len, "{none_len} vs {fast_len}");
    let (ct, _, same) = fetch(
        send("scale=4", Some("image/tiff, image/png;q=0.5"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ct, "image/tiff");
    assert_eq!(same, pixels);
    let (ct, _, _) = fetch(send("scale=4", Some("*/*")).await.unwrap()).await;
    assert_eq!(ct, "image/png", "no preference: the input's container");
    assert_eq!(send("compression=max", None).await.unwrap().status(), 400);
    s.stop().await;
}

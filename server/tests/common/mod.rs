//! Test harness: a real server on 127.0.0.1:0 with the fake backend.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use hndsr_server::backend::fake::FakeBackend;
use hndsr_server::backend::{Backend, CancellationToken};
use hndsr_server::config::{Args, Config};
use hndsr_server::http::AppState;
use hndsr_server::server::{Server, ServerError};
use image::{DynamicImage, ImageBuffer, ImageFormat};
use tokio::task::JoinHandle;

/// Upper bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// A delay long enough to hold calls until a test releases them.
pub const HOLD: Duration = Duration::from_secs(3600);

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Arc<FakeBackend>,
    pub state: AppState,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), ServerError>>,
    pub client: reqwest::Client,
}

/// Parses `args` as the binary would (rate limiting off unless asked).
pub fn config(args: &[&str]) -> Config {
    let mut argv = vec!["hndsr-server", "--listen", "127.0.0.1:0"];
    if !args.contains(&"--rate-limit-per-hour") {
        argv.extend_from_slice(&["--rate-limit-per-hour", "0"]);
    }
    // Not whatever the test machine's cgroup allows: tests that want a
    // memory budget ask for one.
    if !args.contains(&"--memory-budget-mb") {
        argv.extend_from_slice(&["--memory-budget-mb", "0"]);
    }
    argv.extend_from_slice(args);
    Args::try_parse_from(argv)
        .expect("args parse")
        .into_config()
        .expect("valid config")
}

/// Starts a server with the fake backend; returns once `/readyz` is 200,
/// with the backend's calls taking `delay` from then on (warm-up and the
/// estimator's calibration run at full speed, so admission by estimate
/// stays out of the way of tests about other things).
pub async fn start(args: &[&str], delay: Duration) -> TestServer {
    let backend = Arc::new(FakeBackend::new(Duration::ZERO));
    let ts = start_unready(args, Arc::clone(&backend)).await;
    ts.wait_ready().await;
    backend.set_delay(delay);
    backend.reset_counts();
    ts
}

/// Starts a server on a real backend; `TestServer::backend` is then an idle
/// fake the server does not use.
pub async fn start_with_backend(cfg: Config, backend: Arc<dyn Backend>) -> TestServer {
    let ts = serve(cfg, backend).await;
    ts.wait_ready().await;
    ts
}

/// Starts a server without waiting for readiness.
pub async fn start_unready(args: &[&str], backend: Arc<FakeBackend>) -> TestServer {
    let mut ts = serve(config(args), backend.clone()).await;
    ts.backend = backend;
    ts
}

async fn serve(cfg: Config, backend: Arc<dyn Backend>) -> TestServer {
    let server = Server::new(cfg, backend).expect("server");
    let state = server.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server.run(listener, shutdown.clone()));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    TestServer {
        addr,
        backend: Arc::new(FakeBackend::new(Duration::ZERO)),
        state,
        shutdown,
        handle,
        client,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn wait_ready(&self) {
        let c = &self.client;
        let url = self.url(hndsr_contract::http::READYZ_PATH);
        eventually("server ready", || async {
            c.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// POSTs a raw image to `/v1/upscale` with the query string `query`.
    pub async fn upscale(&self, body: Vec<u8>, query: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("{}?{query}", hndsr_contract::http::UPSCALE_PATH)))
            .header("content-type", "image/png")
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// `GET /v1/info` as JSON.
    pub async fn info(&self) -> serde_json::Value {
        self.client
            .get(self.url(hndsr_contract::http::INFO_PATH))
            .send()
            .await
            .expect("info")
            .json()
            .await
            .expect("info JSON")
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url(hndsr_contract::http::METRICS_PATH))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(self) {
        self.backend.set_delay(Duration::ZERO);
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("server stopped in time");
        result.expect("join").expect("clean exit");
    }
}

/// Polls `check` every 10 ms until it holds; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Encodes `image` as `format`.
pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A small RGB PNG whose pixels depend on `salt` (distinct inputs).
pub fn png(width: u32, height: u32, salt: u8) -> Vec<u8> {
    let buf = ImageBuffer::from_fn(width, height, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(40), (y as u8).wrapping_mul(50), salt])
    });
    encode(&DynamicImage::ImageRgb8(buf), ImageFormat::Png)
}

/// A PNG whose header claims `width` x `height` but carries no real pixels.
pub fn png_bomb_header(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (IEEE), bitwise; enough for a few test chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

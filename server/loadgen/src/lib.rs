//! An HTTP load generator for the HNDSR server, for 127.0.0.1 only.
//!
//! A fixed number of workers (the concurrency) each send one request at a
//! time, until the request count or the duration is reached — whichever
//! comes first — and never longer than a hard time cap, so a run always ends
//! by itself. Latency is measured from sending the request to the last byte
//! of the response body. Optionally each request carries an
//! `X-Forwarded-For` with its own synthetic client address (for the rate
//! limiter's memory under many distinct clients).
//!
//! From the server's answers it also keeps the error `type` of every
//! refusal (so refusals by estimate, `deadline_wait` / `deadline_too_slow`,
//! are told from `overloaded` and from 504 timeouts) and, from the
//! `Server-Timing` header of each 200, measured ÷ estimated service time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Target URL; must be `http://` on a loopback address.
    pub url: Uri,
    /// HTTP method.
    pub method: Method,
    /// Request bodies, used in turn (request `i` sends `bodies[i % len]`);
    /// several distinct bodies keep the server from coalescing identical
    /// concurrent requests into one computation. Empty: no body.
    pub bodies: Vec<Bytes>,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Never run longer than this, whatever else is set.
    pub max_duration: Duration,
    /// Per-request deadline (sending to last body byte).
    pub timeout: Duration,
    /// Send `X-Forwarded-For` with a distinct address per request.
    pub distinct_clients: bool,
    /// After an answer with `Retry-After` (seconds), wait that long before
    /// the next request, as a well-behaved client does. Off: send the next
    /// at once (the overload a misbehaving client makes).
    pub honour_retry_after: bool,
    /// Clients that do not act in step, as real ones do not: each starts at
    /// a random moment within the first second, and (with
    /// `honour_retry_after`) waits a random extra of up to half of each
    /// Retry-After. Without it every client starts at once, and clients
    /// refused together come back together, since Retry-After is in whole
    /// seconds: the run then measures how fast a burst drains.
    pub jitter: bool,
}

/// Latency summary, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Latency {
    /// Summarises `samples` (nearest-rank percentiles); `None` if empty.
    pub fn from_samples(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let n = samples.len();
        let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        let total: Duration = samples.iter().sum();
        Some(Self {
            count: n as u64,
            p50_ms: ms(rank(0.50)),
            p90_ms: ms(rank(0.90)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(samples[n - 1]),
            mean_ms: ms(total) / n as f64,
        })
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests sent (answered or not).
    pub requests: u64,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// Completed requests (any status) per second.
    pub throughput_rps: f64,
    /// Concurrency used.
    pub concurrency: usize,
    /// Responses per status code; `"error"` counts requests without a
    /// response (connection failure or per-request timeout).
    pub status_counts: BTreeMap<String, u64>,
    /// Latency over every request that got a response.
    pub latency: Option<Latency>,
    /// Latency per status code.
    pub latency_by_status: BTreeMap<String, Latency>,
    /// Error answers by their JSON `type` (`overloaded`, `deadline_wait`, ...).
    pub error_types: BTreeMap<String, u64>,
    /// Measured ÷ estimated service time of the 200s whose `Server-Timing`
    /// has an estimate (the server's deadline estimator's error).
    pub estimate_ratio: Option<Ratio>,
    /// First few distinct transport errors, for diagnosis.
    pub error_samples: Vec<String>,
}

/// Distribution of a ratio.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// Number of samples.
    pub count: u64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Ratio {
    /// Summarises `samples` (nearest-rank percentiles); `None` if empty.
    pub fn from_samples(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable_by(f64::total_cmp);
        let n = samples.len();
        let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            count: n as u64,
            p10: rank(0.10),
            p50: rank(0.50),
            p90: rank(0.90),
            max: samples[n - 1],
        })
    }
}

/// Measured ÷ estimated service time from a `Server-Timing` value
/// (`decode`, `inference` and `encode` against `estimate`).
pub fn estimate_ratio(server_timing: &str) -> Option<f64> {
    let (mut service, mut estimate) = (0.0, None);
    for entry in server_timing.split(',') {
        let mut parts = entry.trim().split(';');
        let name = parts.next()?.trim();
        let dur = parts
            .find_map(|p| p.trim().strip_prefix("dur="))
            .and_then(|v| v.parse::<f64>().ok());
        match (name, dur) {
            ("decode" | "inference" | "encode", Some(ms)) => service += ms,
            ("estimate", Some(ms)) if ms > 0.0 => estimate = Some(ms),
            _ => {}
        }
    }
    estimate.map(|e| service / e)
}

impl Report {
    /// Share of responses with `status`, in [0, 1].
    pub fn share(&self, status: &str) -> f64 {
        let n = self.status_counts.get(status).copied().unwrap_or(0);
        if self.requests == 0 {
            0.0
        } else {
            n as f64 / self.requests as f64
        }
    }

    /// A human-readable summary.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} requests in {:.2} s at concurrency {}: {:.1} req/s\n",
            self.requests, self.elapsed_s, self.concurrency, self.throughput_rps
        );
        let line = |label: &str, l: &Latency| {
            format!(
                "  {label:<7} n={:<7} p50 {:>9.2} ms  p90 {:>9.2} ms  p99 {:>9.2} ms  max {:>9.2} ms\n",
                l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            )
        };
        if let Some(l) = &self.latency {
            s += &line("all", l);
        }
        for (status, l) in &self.latency_by_status {
            s += &line(status, l);
        }
        for (status, n) in &self.status_counts {
            s += &format!(
                "  status {status}: {n} ({:.1}%)\n",
                100.0 * self.share(status)
            );
        }
        for (kind, n) in &self.error_types {
            s += &format!("  type {kind}: {n}\n");
        }
        if let Some(r) = &self.estimate_ratio {
            s += &format!(
                "  measured/estimated service: n={} p10 {:.2} p50 {:.2} p90 {:.2} max {:.2}\n",
                r.count, r.p10, r.p50, r.p90, r.max
            );
        }
        for e in &self.error_samples {
            s += &format!("  error: {e}\n");
        }
        s
    }
}

/// Refuses anything but plain HTTP to a loopback address: this tool is for
/// benchmarking a local server, not for loading someone else's.
pub fn check_target(url: &Uri) -> anyhow::Result<()> {
    if url.scheme_str() != Some("http") {
        bail!("only http:// targets are supported, got {url}");
    }
    let host = url.host().context("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing non-loopback target {host:?}: hndsr-loadgen only loads 127.0.0.1");
    }
    Ok(())
}

/// The synthetic client address of request `i`: distinct for the first
/// 2^24 requests, inside 10.0.0.0/8.
pub fn client_addr(i: u64) -> Ipv4Addr {
    let n = (i % (1 << 24)) as u32;
    Ipv4Addr::from(0x0a00_0000 | n)
}

/// One worker's observations.
#[derive(Default)]
struct Tally {
    sent: u64,
    by_status: BTreeMap<String, Vec<Duration>>,
    types: BTreeMap<String, u64>,
    ratios: Vec<f64>,
    errors: Vec<String>,
}

/// What one answer told.
struct Answer {
    status: u16,
    /// Its `Retry-After`, in seconds.
    retry_after: Option<Duration>,
    /// The JSON error `type` of a non-2xx answer.
    kind: Option<String>,
    /// Measured ÷ estimated service time of a 200.
    ratio: Option<f64>,
}

/// A pseudo-random duration in `[0, span)`, a function of `seed`, so runs
/// repeat.
#[must_use]
pub fn jitter(seed: u64, span: Duration) -> Duration {
    span.mul_f64(StdRng::seed_from_u64(seed).random::<f64>())
}

/// Runs `plan` to completion and reports.
///
/// # Errors
/// A target that is not loopback, or a plan with no stopping rule.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    check_target(&plan.url)?;
    if plan.requests.is_none() && plan.duration.is_none() {
        bail!("give a request count, a duration, or both");
    }
    if plan.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.concurrency)
        .build(connector);

    let start = Instant::now();
    // No request starts after `deadline`; requests in flight then may finish
    // (so a timed run does not count its last requests as failures), but
    // nothing runs past `hard_stop`.
    let hard_stop = start + plan.max_duration;
    let deadline = plan
        .duration
        .map_or(hard_stop, |d| (start + d).min(hard_stop));
    let next = Arc::new(AtomicU64::new(0));
    let plan = Arc::new(plan);

    let workers: Vec<_> = (0..plan.concurrency as u64)
        .map(|w| {
            let (client, next, plan) = (client.clone(), Arc::clone(&next), Arc::clone(&plan));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                if plan.jitter {
                    let at = (start + jitter(w, Duration::from_secs(1))).min(deadline);
                    tokio::time::sleep_until(at.into()).await;
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if plan.requests.is_some_and(|n| i >= n) || Instant::now() >= deadline {
                        break;
                    }
                    tally.sent += 1;
                    let began = Instant::now();
                    let remaining = hard_stop.saturating_duration_since(began);
                    let outcome =
                        tokio::time::timeout(plan.timeout.min(remaining), send(&client, &plan, i))
                            .await;
                    let took = began.elapsed();
                    match outcome {
                        Ok(Ok(answer)) => {
                            tally
                                .by_status
                                .entry(answer.status.to_string())
                                .or_default()
                                .push(took);
                            if let Some(kind) = answer.kind {
                                *tally.types.entry(kind).or_default() += 1;
                            }
                            tally.ratios.extend(answer.ratio);
                            if plan.honour_retry_after
                                && let Some(pause) = answer.retry_after
                            {
                                let extra = if plan.jitter {
                                    jitter((w << 32) ^ i, pause / 2)
                                } else {
                                    Duration::ZERO
                                };
                                let until = (Instant::now() + pause + extra).min(deadline);
                                tokio::time::sleep_until(until.into()).await;
                            }
                        }
                        Ok(Err(e)) => record_error(&mut tally, e.to_string(), took),
                        Err(_) => record_error(&mut tally, "timed out".to_owned(), took),
                    }
                }
                tally
            })
        })
        .collect();

    let mut total = Tally::default();
    for w in workers {
        let t = w.await.context("a worker panicked")?;
        total.sent += t.sent;
        for (status, mut v) in t.by_status {
            total.by_status.entry(status).or_default().append(&mut v);
        }
        for (kind, n) in t.types {
            *total.types.entry(kind).or_default() += n;
        }
        total.ratios.extend(t.ratios);
        for e in t.errors {
            if total.errors.len() < 5 && !total.errors.contains(&e) {
                total.errors.push(e);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();

    let mut all: Vec<Duration> = total
        .by_status
        .iter()
        .filter(|(s, _)| s.as_str() != "error")
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    let status_counts = total
        .by_status
        .iter()
        .map(|(s, v)| (s.clone(), v.len() as u64))
        .collect();
    let latency_by_status = total
        .by_status
        .iter_mut()
        .filter_map(|(s, v)| Latency::from_samples(v).map(|l| (s.clone(), l)))
        .collect();
    Ok(Report {
        requests: total.sent,
        elapsed_s: elapsed,
        throughput_rps: if elapsed > 0.0 {
            total.sent as f64 / elapsed
        } else {
            0.0
        },
        concurrency: plan.concurrency,
        status_counts,
        latency: Latency::from_samples(&mut all),
        latency_by_status,
        error_types: total.types,
        estimate_ratio: Ratio::from_samples(&mut total.ratios),
        error_samples: total.errors,
    })
}

fn record_error(tally: &mut Tally, message: String, took: Duration) {
    tally
        .by_status
        .entry("error".to_owned())
        .or_default()
        .push(took);
    if tally.errors.len() < 5 && !tally.errors.contains(&message) {
        tally.errors.push(message);
    }
}

/// Sends request `i` and reads the whole response body.
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    plan: &Plan,
    i: u64,
) -> anyhow::Result<Answer> {
    let mut req = Request::builder()
        .method(plan.method.clone())
        .uri(plan.url.clone());
    for (name, value) in &plan.headers {
        req = req.header(name, value);
    }
    if plan.distinct_clients {
        req = req.header("x-forwarded-for", client_addr(i).to_string());
    }
    let body = match plan.bodies.len() {
        0 => Bytes::new(),
        n => plan.bodies[(i % n as u64) as usize].clone(),
    };
    let req = req.body(Full::new(body))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let ratio = resp
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .and_then(estimate_ratio);
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    let kind = (!(200..300).contains(&status))
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v["type"].as_str().map(str::to_owned));
    Ok(Answer {
        status,
        retry_after,
        kind,
        ratio: if status == 200 { ratio } else { None },
    })
}

/// A deterministic synthetic aerial-like RGB image (fields, roads, a river)
/// encoded as PNG, for benchmark bodies and the committed sample. Each
/// `variant` lays out the crops differently (variant 0 is the sample).
pub fn synthetic_png(width: u32, height: u32, variant: u32) -> anyhow::Result<Vec<u8>> {
    let mut img = image::RgbImage::new(width, height);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32, y as f32);
        // Fields: a patchwork of 16-pixel parcels with per-parcel crop colour.
        let parcel = (x / 16).wrapping_mul(73_856_093)
            ^ (y / 16).wrapping_mul(19_349_663)
            ^ variant.wrapping_mul(83_492_791);
        let crop = [
            [96, 128, 64],
            [150, 140, 90],
            [70, 100, 50],
            [180, 160, 110],
        ][(parcel % 4) as usize];
        // Furrows give each parcel a fine texture.
        let furrow = if (x + y * (parcel % 3)).is_multiple_of(4) {
            12
        } else {
            0
        };
        let mut rgb = crop.map(|c: u8| c.saturating_sub(furrow));
        // A river meandering down the image.
        let river_x = width as f32 * 0.6 + (fy * 0.15).sin() * width as f32 * 0.08;
        if (fx - river_x).abs() < 2.5 {
            rgb = [40, 70, 120];
        }
        // A straight road.
        if (fy - fx * 0.4 - height as f32 * 0.2).abs() < 1.0 {
            rgb = [200, 200, 200];
        }
        *px = image::Rgb(rgb);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("encoding the PNG")?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_decode_inference_encode_over_the_estimate() {
        let t = "queue;dur=3.0, decode;dur=10.0, inference;dur=80.0, encode;dur=10.0, estimate;dur=50.0";
        assert_eq!(estimate_ratio(t), Some(2.0));
        assert_eq!(
            estimate_ratio("decode;dur=1.0, estimate;dur=0.0"),
            None,
            "no estimate yet"
        );
        assert_eq!(estimate_ratio("decode;dur=1.0"), None);
    }

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080/v1/upscale",
            "http://127.0.0.5/",
            "http://[::1]:1/",
            "http://localhost:9/",
        ] {
            check_target(&ok.parse().unwrap()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://10.0.0.1/",
            "http://example.org/",
            "https://127.0.0.1/",
            "http://0.0.0.0:80/",
        ] {
            assert!(check_target(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_addresses_are_distinct_and_private() {
        let a: std::collections::HashSet<_> = (0..100_000).map(client_addr).collect();
        assert_eq!(a.len(), 100_000);
        assert!(a.iter().all(|ip| ip.octets()[0] == 10));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::from_samples(&mut v).unwrap();
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!(Latency::from_samples(&mut []).is_none());
    }

    #[test]
    fn synthetic_png_decodes() {
        let png = synthetic_png(32, 24, 0).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (32, 24));
        assert_ne!(png, synthetic_png(32, 24, 1).unwrap());
    }

    /// A minimal HTTP/1.1 server on loopback answering every request with
    /// `resp` (an empty body).
    async fn answering(resp: &'static [u8]) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 || sock.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn plan(addr: std::net::SocketAddr) -> Plan {
        Plan {
            url: format!("http://{addr}/").parse().unwrap(),
            method: Method::GET,
            bodies: Vec::new(),
            headers: Vec::new(),
            concurrency: 4,
            requests: Some(40),
            duration: None,
            max_duration: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            distinct_clients: true,
            honour_retry_after: false,
            jitter: false,
        }
    }

    const REFUSAL: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n";

    #[tokio::test]
    async fn counts_statuses_against_a_local_server() {
        let report = run(plan(answering(REFUSAL).await)).await.unwrap();
        assert_eq!(report.requests, 40);
        assert_eq!(report.status_counts.get("503"), Some(&40), "{report:?}");
        assert_eq!(report.latency.unwrap().count, 40);
    }

    #[tokio::test]
    async fn a_well_behaved_client_waits_as_retry_after_says() {
        let addr = answering(REFUSAL).await;
        let polite = Plan {
            concurrency: 1,
            requests: None,
            duration: Some(Duration::from_millis(1500)),
            honour_retry_after: true,
            ..plan(addr)
        };
        let report = run(polite).await.unwrap();
        // At 0 s and at 1 s; then the run is over.
        assert_eq!(report.requests, 2, "{report:?}");
        let eager = Plan {
            concurrency: 1,
            requests: None,
            duration: Some(Duration::from_millis(300)),
            ..plan(addr)
        };
        assert!(run(eager).await.unwrap().requests > 10);
    }

    #[test]
    fn jitter_spreads_over_its_span_and_repeats() {
        let span = Duration::from_secs(1);
        let v: Vec<Duration> = (0..1000).map(|s| jitter(s, span)).collect();
        assert!(v.iter().all(|d| *d < span));
        assert!(v.iter().any(|d| *d < span / 20) && v.iter().any(|d| *d > span * 19 / 20));
        let mean = v.iter().sum::<Duration>() / 1000;
        assert!((span * 2 / 5..span * 3 / 5).contains(&mean), "{mean:?}");
        assert_eq!(jitter(7, span), jitter(7, span));
        assert_eq!(jitter(7, Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn jittered_clients_do_not_start_together() {
        let addr = answering(REFUSAL).await;
        let spread = Plan {
            concurrency: 16,
            requests: None,
            duration: Some(Duration::from_millis(500)),
            honour_retry_after: true,
            jitter: true,
            ..plan(addr)
        };
        // Each client sends once, at its start, if that falls in the run.
        let late = (0..16)
            .filter(|&w| jitter(w, Duration::from_secs(1)) >= Duration::from_millis(500))
            .count();
        assert!((1..16).contains(&late), "the seeds make a test: {late}");
        let report = run(spread.clone()).await.unwrap();
        assert_eq!(report.requests, 16 - late as u64, "{report:?}");
        let together = Plan {
            jitter: false,
            ..spread
        };
        assert_eq!(run(together).await.unwrap().requests, 16);
    }

    #[tokio::test]
    async fn stops_by_itself_on_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and never answers: only the clock can stop the run.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let plan = Plan {
            url: format!("http://{addr}/").parse().unwrap(),
            method: Method::GET,
            bodies: Vec::new(),
            headers: Vec::new(),
            concurrency: 2,
            requests: None,
            duration: Some(Duration::from_millis(300)),
            max_duration: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            distinct_clients: false,
            honour_retry_after: false,
            jitter: false,
        };
        let began = Instant::now();
        let report = run(plan).await.unwrap();
        assert!(began.elapsed() < Duration::from_secs(3));
        assert_eq!(report.status_counts.get("error"), Some(&2));
    }
}

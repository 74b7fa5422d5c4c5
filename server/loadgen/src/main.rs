//! `hndsr-loadgen`: load a local HNDSR server and report throughput,
//! latency percentiles and status codes. See the library docs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hndsr_loadgen::{Plan, run, synthetic_png};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Uri};

/// HTTP load generator for the HNDSR server (127.0.0.1 only).
#[derive(Debug, Parser)]
#[command(name = "hndsr-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send requests at a fixed concurrency and report.
    Run(Box<RunArgs>),
    /// Write the synthetic aerial-like PNG used as a request body.
    Png {
        /// Width and height in pixels.
        #[arg(long, default_value_t = 256)]
        size: u32,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Target URL, e.g. `http://127.0.0.1:8080/v1/upscale?scale=4`.
    #[arg(long)]
    url: Uri,
    /// HTTP method; default POST when a body is given, else GET.
    #[arg(long)]
    method: Option<Method>,
    /// Request body from a file.
    #[arg(long, conflicts_with = "png")]
    body: Option<PathBuf>,
    /// Request body: a synthetic PNG of this edge length (pixels).
    #[arg(long)]
    png: Option<u32>,
    /// With --png: this many distinct images, sent in turn (defeats the
    /// server's coalescing of identical concurrent requests).
    #[arg(long, default_value_t = 1, requires = "png")]
    png_variants: u32,
    /// Content-Type of the body (default image/png for --png).
    #[arg(long)]
    content_type: Option<String>,
    /// Extra header `Name: value`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Stop after this many requests.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, short = 'd')]
    duration: Option<f64>,
    /// Hard cap on the run's length in seconds, whatever else is set.
    #[arg(long, default_value_t = 600.0)]
    max_duration: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Send `X-Forwarded-For` with a distinct synthetic address per request.
    #[arg(long)]
    distinct_clients: bool,
    /// After an answer with Retry-After, wait that long before the next
    /// request (a well-behaved client); by default the next goes at once.
    #[arg(long)]
    honour_retry_after: bool,
    /// Clients out of step, as real ones are: each starts within the first
    /// second and, with --honour-retry-after, waits up to half a
    /// Retry-After longer at random; by default all start at once and come
    /// back together.
    #[arg(long)]
    jitter: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{name} must be a positive number of seconds"))
}

fn plan(args: &RunArgs) -> anyhow::Result<Plan> {
    let (bodies, default_type) = match (&args.body, args.png) {
        (Some(path), _) => {
            let body =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            (vec![Bytes::from(body)], None)
        }
        (None, Some(size)) => {
            let bodies = (0..args.png_variants.max(1))
                .map(|v| synthetic_png(size, size, v).map(Bytes::from))
                .collect::<anyhow::Result<_>>()?;
            (bodies, Some("image/png"))
        }
        (None, None) => (Vec::new(), None),
    };
    let mut headers = Vec::new();
    if let Some(ct) = args.content_type.as_deref().or(default_type) {
        headers.push((hyper::header::CONTENT_TYPE, HeaderValue::from_str(ct)?));
    }
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("header {h:?} is not `Name: value`")
        };
        headers.push((
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        ));
    }
    let method = args.method.clone().unwrap_or(if bodies.is_empty() {
        Method::GET
    } else {
        Method::POST
    });
    Ok(Plan {
        url: args.url.clone(),
        method,
        bodies,
        headers,
        concurrency: args.concurrency,
        requests: args.requests,
        duration: args.duration.map(|d| seconds("duration", d)).transpose()?,
        max_duration: seconds("max-duration", args.max_duration)?,
        timeout: seconds("timeout", args.timeout)?,
        distinct_clients: args.distinct_clients,
        honour_retry_after: args.honour_retry_after,
        jitter: args.jitter,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Png { size, out } => std::fs::write(&out, synthetic_png(size, size, 0)?)
            .with_context(|| format!("writing {}", out.display())),
        Command::Run(args) => {
            let report = run(plan(&args)?).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
    }
}

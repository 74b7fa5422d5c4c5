//! Command line and environment configuration.
//!
//! One clap [`Args`] struct (every flag also readable from the environment
//! variable the operator writes, see [`hndsr_contract::env`]) is turned by
//! [`Args::into_config`] into typed, validated config structs. Invalid
//! combinations fail at start-up with a message naming the variable.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hndsr_contract::{defaults, env, limits, projection, tile};
use ipnet::IpNet;

use crate::profile::Profile;

/// Largest upscaling factor the server accepts from any backend; it bounds
/// the output pixel budget (see [`Limits::max_output_pixels`]).
pub const MAX_SCALE: u32 = 8;

/// How many times the input pixel budget the output may have: a full-size
/// input at ×4 fits, a full-size input at ×8 does not.
pub const OUTPUT_PIXELS_FACTOR: u64 = 16;

/// Largest nice value (lowest priority) Linux has.
pub const MAX_NICE: u8 = limits::MAX_INFERENCE_NICE;

/// Largest accepted `--sampling-steps` and per-request `steps`.
pub const MAX_SAMPLING_STEPS: u32 = 1000;

/// The HNDSR inference server.
#[derive(Debug, Clone, Parser)]
#[command(name = "hndsr-server", version, about)]
pub struct Args {
    /// What to run; without a subcommand, serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Maximum number of requests running on the backend at once.
    #[arg(long, env = env::MAX_CONCURRENT, default_value_t = defaults::MAX_CONCURRENT)]
    pub max_concurrent: u32,

    /// Maximum number of requests in flight (running + waiting); beyond it, 503.
    #[arg(long, env = env::MAX_QUEUE_DEPTH, default_value_t = defaults::MAX_QUEUE_DEPTH)]
    pub max_queue_depth: u32,

    /// Requests allowed per client per hour; 0 disables the limiter.
    #[arg(long, env = env::RATE_LIMIT_PER_HOUR, default_value_t = defaults::RATE_LIMIT_PER_HOUR)]
    pub rate_limit_per_hour: u32,

    /// Whole-request deadline in seconds; past it, 504 and the work is cancelled.
    #[arg(long, env = env::REQUEST_TIMEOUT_S, default_value_t = defaults::REQUEST_TIMEOUT_SECONDS)]
    pub request_timeout_s: u32,

    /// Largest accepted input image in pixels (width × height).
    #[arg(long, env = env::MAX_IMAGE_PIXELS, default_value_t = defaults::MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,

    /// Largest accepted request body in MiB.
    #[arg(long, env = env::MAX_PAYLOAD_MB, default_value_t = defaults::MAX_PAYLOAD_MB)]
    pub max_payload_mb: u32,

    /// Seconds to drain in-flight requests after SIGTERM.
    #[arg(long, env = env::DRAIN_SECONDS, default_value_t = defaults::DRAIN_SECONDS)]
    pub drain_seconds: u32,

    /// Address to listen on (`host:port`).
    #[arg(long, env = env::LISTEN_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], hndsr_contract::http::PORT)))]
    pub listen: SocketAddr,

    /// Model backend.
    #[arg(long, env = env::BACKEND, value_enum, default_value_t = BackendKind::Bicubic)]
    pub backend: BackendKind,

    /// Default upscaling factor.
    #[arg(long, env = env::SCALE, default_value_t = defaults::SCALE)]
    pub scale: u32,

    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = env::DEVICE, default_value = "cpu")]
    pub device: String,

    /// Path of the model weights (safetensors); required by `hndsr`.
    #[arg(long, env = env::WEIGHTS_PATH)]
    pub weights_path: Option<PathBuf>,

    /// Expected sha256 of the weights file (64 hex digits).
    #[arg(long, env = env::WEIGHTS_SHA256)]
    pub weights_sha256: Option<String>,

    /// Serving profile of the `hndsr` backend: `fast` (256² tiles, one
    /// pass, no diffusion, no projection), `quality` (the weights
    /// manifest's recommendations) or `realistic` (`fast` on weights
    /// trained for real-sensor inputs; never projected). Unset:
    /// `realistic` for such weights, else `fast` on the CPU and `quality`
    /// on CUDA. The four knobs below, when set, win over the profile.
    #[arg(long, env = env::PROFILE, value_enum)]
    pub profile: Option<Profile>,

    /// DDIM sampling steps of the `hndsr` backend (0 = neural operator
    /// only); unset: the profile's (`fast`: 0; `quality`: the weights
    /// manifest's `default_steps`, else 20).
    #[arg(long, env = env::SAMPLING_STEPS)]
    pub sampling_steps: Option<u32>,

    /// Numeric precision: `fp32`, `fp16` or `bf16`; unset: `fp16` for the
    /// `hndsr` backend on CUDA (it scores as fp32), `fp32` otherwise.
    #[arg(long, env = env::PRECISION)]
    pub precision: Option<String>,

    /// `true`: the `hndsr` backend averages μ over the 8 flips / 90°
    /// rotations of each tile (8× the regression work); unset: the
    /// profile's (`fast`: false; `quality`: the weights manifest's
    /// `self_ensemble`, else false).
    #[arg(long, env = env::SELF_ENSEMBLE, value_parser = clap::builder::BoolishValueParser::new())]
    pub self_ensemble: Option<bool>,

    /// LR tile edge, in pixels, the `hndsr` backend cuts images into (with
    /// overlapping, cross-faded borders); unset: the profile's (`fast`:
    /// 256; `quality`: the weights manifest's `tile`, the training crops'
    /// LR size where the model scores best, else 256).
    #[arg(long, env = env::TILE, value_parser = clap::value_parser!(u32).range(i64::from(tile::MIN)..=i64::from(tile::MAX)))]
    pub tile: Option<u32>,

    /// Conjugate-gradient steps of the `hndsr` backend's projection of each
    /// output onto the images that downsample exactly to the input (0:
    /// off); unset: the profile's (`fast`: 0; `quality`: the weights
    /// manifest's `projection_steps`, else 0).
    #[arg(long, env = env::PROJECTION_STEPS, value_parser = clap::value_parser!(u32).range(0..=i64::from(projection::MAX_STEPS)))]
    pub projection_steps: Option<u32>,

    /// Most tiles per forward pass of the `hndsr` backend when the tiles
    /// of concurrent requests (same tile shape and steps) are run
    /// together; 0 or 1: each request alone. Unset: 16 on CUDA, off on the
    /// CPU (where merged passes were measured no faster,
    /// docs/benchmarks.md).
    #[arg(long, env = env::BATCH_TILES)]
    pub batch_tiles: Option<usize>,

    /// Longest a forward pass waits for other requests' tiles, ms (when
    /// batching is on; a full pass does not wait).
    #[arg(long, env = env::BATCH_WAIT_MS, default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub batch_wait_ms: u64,

    /// CPU cores this server may use; unset: the cores the process may run
    /// on (cgroup quota and affinity included).
    #[arg(long, env = env::CPUS)]
    pub cpus: Option<NonZeroUsize>,

    /// libtorch intra-op threads per inference thread; unset: `--cpus`
    /// (libtorch alone would take every core of the node, whatever the
    /// pod's CPU allotment).
    #[arg(long, env = env::TORCH_THREADS)]
    pub torch_threads: Option<NonZeroUsize>,

    /// How many nice values (0–19) below the HTTP threads the inference
    /// threads and the libtorch workers they start run. Higher: on a CPU
    /// busy with inference, probes, uploads and refusals are scheduled
    /// first, and clients that retry without waiting take CPU from
    /// inference (measured both ways in docs/benchmarks.md).
    #[arg(long, env = env::INFERENCE_NICE, default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_NICE)))]
    pub inference_nice: u8,

    /// Host memory (MiB) the server may commit to the image buffers of
    /// running and waiting requests at once (decoded input, blended output,
    /// encoder). A request waits for its share; one that needs more than
    /// the whole budget is refused with 413. 0: no budget. Unset: 60% of
    /// the container's memory limit (cgroup), no budget without a limit.
    #[arg(long, env = env::MEMORY_BUDGET_MB)]
    pub memory_budget_mb: Option<u64>,

    /// Seconds a connection may take to send a request's line and headers
    /// (also how long an idle keep-alive connection waits for its next
    /// request); past it the connection is closed. Guards against clients
    /// that open connections and never finish a request (slowloris).
    #[arg(long, env = env::HEADER_READ_TIMEOUT_S, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_s: u64,

    /// Slowest accepted request upload, KiB per second, after the first 2
    /// seconds; a client that falls behind gets 408 and loses its slot
    /// (0: no minimum).
    #[arg(long, env = env::MIN_UPLOAD_KIB_S, default_value_t = 64)]
    pub min_upload_kib_s: u64,

    /// Most open client connections; further connections wait in the
    /// listen queue until one closes.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Comma-separated CIDRs whose X-Forwarded-For header is trusted.
    #[arg(long, env = env::TRUSTED_PROXIES, value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Comma-separated origins allowed by CORS (`*` is refused); empty: no CORS.
    #[arg(long, env = env::CORS_ORIGINS, value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Emit JSON logs.
    #[arg(long, env = env::LOG_JSON, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print the OpenAPI document (JSON) and exit.
    Openapi,
}

/// Which model backend to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// libtorch bicubic interpolation.
    Bicubic,
    /// The HNDSR model (neural operator + diffusion refinement).
    Hndsr,
}

impl BackendKind {
    /// The name used on the command line and in `/v1/info`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Bicubic => "bicubic",
            Self::Hndsr => "hndsr",
        }
    }
}

/// Everything a backend needs to be built (the libtorch adapter reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// Which backend.
    pub backend: BackendKind,
    /// Default upscaling factor.
    pub scale: u32,
    /// Device string as given (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// Weights file (safetensors).
    pub weights_path: Option<PathBuf>,
    /// Expected sha256 of the weights, lower-case hex.
    pub weights_sha256: Option<String>,
    /// Serving profile, when configured (the backend falls back to the
    /// device's, [`Profile::default_for`]).
    pub profile: Option<Profile>,
    /// Default DDIM sampling steps, when configured (the backend falls back
    /// to the profile's).
    pub sampling_steps: Option<u32>,
    /// `fp32`, `fp16` or `bf16`, when configured (the backend picks by
    /// device otherwise).
    pub precision: Option<String>,
    /// Geometric self-ensemble of μ, when configured (the backend falls
    /// back to the weights' recommendation).
    pub self_ensemble: Option<bool>,
    /// LR tile edge, when configured (the backend falls back to the
    /// weights' recommendation).
    pub tile: Option<u32>,
    /// Projection steps, when configured (the backend falls back to the
    /// weights' recommendation).
    pub projection_steps: Option<u32>,
    /// libtorch intra-op threads each inference thread uses.
    pub torch_threads: NonZeroUsize,
    /// Most tiles per merged forward pass, when configured (the backend
    /// falls back to the device's default).
    pub batch_tiles: Option<usize>,
    /// Longest a forward pass waits for other requests' tiles.
    pub batch_wait: Duration,
    /// Model replicas to load before serving: one per inference thread
    /// (`MAX_CONCURRENT`), so no request waits for a load.
    pub replicas: NonZeroUsize,
}

/// Admission, size and time limits of the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Backend calls allowed at once (GPU permits).
    pub max_concurrent: NonZeroUsize,
    /// Requests allowed in flight (running + waiting); `>= max_concurrent`.
    pub max_queue_depth: NonZeroUsize,
    /// Whole-request deadline.
    pub request_timeout: Duration,
    /// Largest input, in pixels.
    pub max_image_pixels: u64,
    /// Largest output, in pixels: `max_image_pixels * OUTPUT_PIXELS_FACTOR`.
    pub max_output_pixels: u64,
    /// Largest raw request body, in bytes.
    pub max_payload_bytes: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain: Duration,
    /// Host memory (MiB) for the image buffers of all requests at once;
    /// `None`: no budget.
    pub memory_budget_mib: Option<u64>,
    /// Nice steps the inference threads run below the HTTP threads.
    pub inference_nice: u8,
}

impl Limits {
    /// Largest JSON request body: base64 of the largest raw body plus room
    /// for the other fields.
    #[must_use]
    pub const fn max_json_bytes(&self) -> usize {
        self.max_payload_bytes.div_ceil(3) * 4 + 64 * 1024
    }
}

/// HTTP-edge policy: rate limiting, client identification, CORS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Requests per client per hour; `None` disables the limiter.
    pub rate_limit_per_hour: Option<NonZeroU32>,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Origins allowed by CORS; empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Longest wait for a request's line and headers.
    pub header_read_timeout: Duration,
    /// Slowest accepted upload after the grace period; 0: no minimum.
    pub min_upload_bytes_per_s: u64,
    /// Most open connections.
    pub max_connections: usize,
}

/// The validated configuration of a serving process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Request-path limits.
    pub limits: Limits,
    /// HTTP-edge policy.
    pub http: HttpConfig,
    /// Model selection.
    pub model: ModelConfig,
    /// JSON logs.
    pub log_json: bool,
}

/// Why the configuration was refused. Messages name the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

const MIB: u64 = 1024 * 1024;

impl Args {
    /// Validates the arguments and builds the typed configuration.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first offending variable.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::new(format!("{name} must be greater than 0")))
            } else {
                Ok(v)
            }
        };
        let max_concurrent = positive(env::MAX_CONCURRENT, self.max_concurrent.into())?;
        let max_queue_depth = positive(env::MAX_QUEUE_DEPTH, self.max_queue_depth.into())?;
        if max_queue_depth < max_concurrent {
            return Err(ConfigError::new(format!(
                "{} ({max_queue_depth}) must be >= {} ({max_concurrent})",
                env::MAX_QUEUE_DEPTH,
                env::MAX_CONCURRENT
            )));
        }
        let timeout = positive(env::REQUEST_TIMEOUT_S, self.request_timeout_s.into())?;
        let max_image_pixels = positive(env::MAX_IMAGE_PIXELS, self.max_image_pixels)?;
        let max_output_pixels = max_image_pixels
            .checked_mul(OUTPUT_PIXELS_FACTOR)
            .ok_or_else(|| {
                ConfigError::new(format!(
                    "{} ({max_image_pixels}) is too large",
                    env::MAX_IMAGE_PIXELS
                ))
            })?;
        let payload_mb = positive(env::MAX_PAYLOAD_MB, self.max_payload_mb.into())?;
        if payload_mb > u64::from(limits::MAX_PAYLOAD_MB) {
            return Err(ConfigError::new(format!(
                "{} ({payload_mb}) must be <= {}",
                env::MAX_PAYLOAD_MB,
                limits::MAX_PAYLOAD_MB
            )));
        }
        if !(1..=MAX_SCALE).contains(&self.scale) {
            return Err(ConfigError::new(format!(
                "{} ({}) must be between 1 and {MAX_SCALE}",
                env::SCALE,
                self.scale
            )));
        }
        if let Some(steps) = self.sampling_steps.filter(|&s| s > MAX_SAMPLING_STEPS) {
            return Err(ConfigError::new(format!(
                "{} ({steps}) must be <= {MAX_SAMPLING_STEPS}",
                env::SAMPLING_STEPS,
            )));
        }
        let precision = match self.precision.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => {
                let p = p.to_ascii_lowercase();
                if !["fp32", "fp16", "bf16"].contains(&p.as_str()) {
                    return Err(ConfigError::new(format!(
                        "{} ({:?}) must be one of fp32, fp16, bf16",
                        env::PRECISION,
                        self.precision.as_deref().unwrap_or_default()
                    )));
                }
                Some(p)
            }
        };
        let device = self.device.trim().to_ascii_lowercase();
        let device_ok = device == "cpu"
            || device == "cuda"
            || device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u32>().is_ok());
        if !device_ok {
            return Err(ConfigError::new(format!(
                "{} ({:?}) must be cpu, cuda or cuda:N",
                env::DEVICE,
                self.device
            )));
        }
        let weights_sha256 = match self.weights_sha256.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(s.to_ascii_lowercase())
            }
            Some(s) => {
                return Err(ConfigError::new(format!(
                    "{} ({s:?}) must be 64 hexadecimal digits",
                    env::WEIGHTS_SHA256
                )));
            }
        };
        if self.backend == BackendKind::Hndsr {
            for (name, missing) in [
                (env::WEIGHTS_PATH, self.weights_path.is_none()),
                (env::WEIGHTS_SHA256, weights_sha256.is_none()),
            ] {
                if missing {
                    return Err(ConfigError::new(format!(
                        "{name} is required with {}=hndsr",
                        env::BACKEND
                    )));
                }
            }
        }
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(parse_cidr)
            .collect::<Result<Vec<_>, _>>()?;
        let cors_origins = self
            .cors_origins
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(parse_origin)
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Config {
            listen: self.listen,
            limits: Limits {
                max_concurrent: to_nonzero(max_concurrent),
                max_queue_depth: to_nonzero(max_queue_depth),
                request_timeout: Duration::from_secs(timeout),
                max_image_pixels,
                max_output_pixels,
                max_payload_bytes: usize::try_from(payload_mb * MIB).unwrap_or(usize::MAX),
                drain: Duration::from_secs(self.drain_seconds.into()),
                memory_budget_mib: memory_budget_mib(self.memory_budget_mb, cgroup_memory_limit()),
                inference_nice: self.inference_nice,
            },
            http: HttpConfig {
                rate_limit_per_hour: NonZeroU32::new(self.rate_limit_per_hour),
                trusted_proxies,
                cors_origins,
                header_read_timeout: Duration::from_secs(self.header_read_timeout_s),
                min_upload_bytes_per_s: self.min_upload_kib_s.saturating_mul(1024),
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            },
            model: ModelConfig {
                backend: self.backend,
                scale: self.scale,
                device,
                profile: self.profile,
                weights_path: self.weights_path,
                weights_sha256,
                sampling_steps: self.sampling_steps,
                precision,
                self_ensemble: self.self_ensemble,
                tile: self.tile,
                projection_steps: self.projection_steps,
                torch_threads: torch_threads(self.torch_threads, self.cpus),
                batch_tiles: self.batch_tiles,
                batch_wait: Duration::from_millis(self.batch_wait_ms),
                replicas: to_nonzero(max_concurrent),
            },
            log_json: self.log_json,
        })
    }
}

/// The memory budget in MiB: `explicit` (0 = none), else 60% of the
/// container's memory limit in bytes (`cgroup_limit`), else none.
#[must_use]
pub fn memory_budget_mib(explicit: Option<u64>, cgroup_limit: Option<u64>) -> Option<u64> {
    match explicit {
        Some(0) => None,
        Some(mib) => Some(mib),
        None => cgroup_limit
            .map(|bytes| bytes / 10 * 6 / MIB)
            .filter(|&mib| mib > 0),
    }
}

/// The memory limit of this process's cgroup in bytes (v2 `memory.max`,
/// else v1 `memory.limit_in_bytes`); `None` without one ("max", or v1's
/// page-rounded "unlimited").
#[must_use]
pub fn cgroup_memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let bytes: u64 = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?
        .trim()
        .parse()
        .ok()?;
    // v1 reports "unlimited" as the largest page-aligned i64.
    (bytes < 1 << 62).then_some(bytes)
}

/// libtorch threads per inference thread: `explicit`, else the cores
/// this server may use (`cpus`, else what the process may run on: cgroup
/// quota and affinity included). Measured on 2 cores with 4 inference
/// threads (docs/benchmarks.md): at full load one thread each was no faster
/// than all cores each, and a lone request took 1.3–1.5× as long, so the
/// default does not divide the cores among the inference threads.
#[must_use]
pub fn torch_threads(explicit: Option<NonZeroUsize>, cpus: Option<NonZeroUsize>) -> NonZeroUsize {
    explicit.unwrap_or_else(|| {
        cpus.or_else(|| std::thread::available_parallelism().ok())
            .unwrap_or(NonZeroUsize::MIN)
    })
}

fn to_nonzero(v: u64) -> NonZeroUsize {
    NonZeroUsize::new(usize::try_from(v).unwrap_or(usize::MAX)).unwrap_or(NonZeroUsize::MIN)
}

/// Parses a CIDR; a bare address means a single host.
fn parse_cidr(s: &str) -> Result<IpNet, ConfigError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::new(format!(
                "{} entry {s:?} is not a CIDR (e.g. 10.0.0.0/8)",
                env::TRUSTED_PROXIES
            ))
        })
}

/// Accepts `scheme://host[:port]` origins only; a wildcard would let any
/// page call the API with the user's credentials.
fn parse_origin(s: &str) -> Result<String, ConfigError> {
    if s == "*" {
        return Err(ConfigError::new(format!(
            "{} must list explicit origins; \"*\" is refused",
            env::CORS_ORIGINS
        )));
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    let valid = rest.is_some_and(|host| {
        !host.is_empty()
            && !host.contains('/')
            && !host.contains('*')
            && http::HeaderValue::from_str(s).is_ok()
    });
    if valid {
        Ok(s.to_owned())
    } else {
        Err(ConfigError::new(format!(
            "{} entry {s:?} is not an origin like https://example.org",
            env::CORS_ORIGINS
        )))
    }
}

/// Where a refused value came from, for a clap error: clap names the flag
/// (`--cpus`) even when the value was read from its environment variable,
/// and a pod has no flags, only the env vars the operator set. `None` when
/// the error names no argument, or the argument's variable is not set.
#[must_use]
pub fn env_source(err: &clap::Error, lookup: impl Fn(&str) -> bool) -> Option<String> {
    let clap::error::ContextValue::String(arg) = err.get(clap::error::ContextKind::InvalidArg)?
    else {
        return None;
    };
    let long = arg.split_whitespace().next()?.trim_start_matches('-');
    let command = <Args as clap::CommandFactory>::command();
    let env = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_str()?
        .to_owned();
    lookup(&env).then(|| format!("the value came from the environment variable {env}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_from_the_environment_names_its_variable() {
        let err = Args::try_parse_from(["hndsr-server", "--cpus", "0"]).unwrap_err();
        assert_eq!(
            env_source(&err, |name| name == env::CPUS).as_deref(),
            Some("the value came from the environment variable HNDSR_CPUS")
        );
        assert_eq!(env_source(&err, |_| false), None, "given as a flag");
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["hndsr-server"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .expect("clap parse")
            .into_config()
    }

    #[test]
    fn defaults_are_the_contract_defaults() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.limits.max_concurrent.get(), 4);
        assert_eq!(c.limits.max_queue_depth.get(), 20);
        assert_eq!(c.limits.max_payload_bytes, 20 * 1024 * 1024);
        assert_eq!(c.listen.port(), hndsr_contract::http::PORT);
        assert_eq!(c.model.backend, BackendKind::Bicubic);
        assert_eq!(c.model.sampling_steps, None, "unset: the weights decide");
        assert_eq!(c.model.self_ensemble, None, "unset: the weights decide");
        assert_eq!(c.model.tile, None, "unset: the weights decide");
        assert_eq!(
            c.model.profile, None,
            "unset: the weights, then the device decide"
        );
    }

    #[test]
    fn the_profile_is_read_by_name() {
        assert_eq!(
            parse(&["--profile", "quality"]).unwrap().model.profile,
            Some(Profile::Quality)
        );
        assert_eq!(
            parse(&["--profile", "fast"]).unwrap().model.profile,
            Some(Profile::Fast)
        );
        assert_eq!(
            parse(&["--profile", "realistic"]).unwrap().model.profile,
            Some(Profile::Realistic)
        );
        let e = Args::try_parse_from(["hndsr-server", "--profile", "best"]).unwrap_err();
        assert!(e.to_string().contains("--profile"), "{e}");
    }

    #[test]
    fn the_memory_budget_defaults_to_most_of_the_container_limit() {
        let gib = 1024 * MIB;
        assert_eq!(memory_budget_mib(None, Some(4 * gib)), Some(2457));
        assert_eq!(memory_budget_mib(None, None), None, "no limit, no budget");
        assert_eq!(memory_budget_mib(Some(512), Some(4 * gib)), Some(512));
        assert_eq!(
            memory_budget_mib(Some(0), Some(4 * gib)),
            None,
            "0 turns it off"
        );
    }

    #[test]
    fn log_json_reads_the_usual_spellings_of_a_boolean() {
        for (value, want) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("off", false),
            ("0", false),
        ] {
            let c = parse(&[&format!("--log-json={value}")]).unwrap();
            assert_eq!(c.log_json, want, "{value}");
        }
        assert!(parse(&["--log-json"]).unwrap().log_json, "bare flag");
    }

    #[test]
    fn tiles_outside_the_contract_range_are_refused() {
        assert_eq!(parse(&["--tile", "24"]).unwrap().model.tile, Some(24));
        assert_eq!(parse(&["--tile", "1024"]).unwrap().model.tile, Some(1024));
        for bad in ["15", "1025", "0", "-1", "big"] {
            let arg = format!("--tile={bad}");
            let e = Args::try_parse_from(["hndsr-server", &arg]).unwrap_err();
            assert!(e.to_string().contains("--tile"), "{bad}: {e}");
        }
    }

    #[test]
    fn projection_steps_outside_the_contract_range_are_refused() {
        assert_eq!(parse(&[]).unwrap().model.projection_steps, None);
        let steps = |v: &str| {
            parse(&["--projection-steps", v])
                .unwrap()
                .model
                .projection_steps
        };
        assert_eq!(steps("0"), Some(0));
        assert_eq!(steps("100"), Some(100));
        for bad in ["101", "-1", "many"] {
            let arg = format!("--projection-steps={bad}");
            let e = Args::try_parse_from(["hndsr-server", &arg]).unwrap_err();
            assert!(e.to_string().contains("--projection-steps"), "{bad}: {e}");
        }
    }

    #[test]
    fn inference_nice_is_a_nice_value_and_off_by_default() {
        assert_eq!(parse(&[]).unwrap().limits.inference_nice, 0);
        let c = parse(&["--inference-nice", "19"]).unwrap();
        assert_eq!(c.limits.inference_nice, 19);
        for bad in ["20", "-1", "low"] {
            let arg = format!("--inference-nice={bad}");
            let e = Args::try_parse_from(["hndsr-server", &arg]).unwrap_err();
            assert!(e.to_string().contains("--inference-nice"), "{bad}: {e}");
        }
    }

    #[test]
    fn torch_threads_default_to_the_cores_the_server_may_use() {
        let n = |v: usize| NonZeroUsize::new(v).unwrap();
        assert_eq!(torch_threads(None, Some(n(8))), n(8));
        assert_eq!(torch_threads(Some(n(3)), Some(n(8))), n(3), "explicit wins");
        let here = std::thread::available_parallelism().unwrap();
        assert_eq!(torch_threads(None, None), here);

        let c = parse(&["--cpus", "16", "--max-concurrent", "2"]).unwrap();
        assert_eq!(c.model.torch_threads, n(16));
        let c = parse(&["--cpus", "16", "--torch-threads", "3"]).unwrap();
        assert_eq!(c.model.torch_threads, n(3));
        for bad in [["--cpus", "0"], ["--torch-threads", "0"], ["--cpus", "two"]] {
            assert!(
                Args::try_parse_from(["hndsr-server", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sampling_steps_beyond_the_maximum_are_refused() {
        assert_eq!(
            parse(&["--sampling-steps", "0"])
                .unwrap()
                .model
                .sampling_steps,
            Some(0)
        );
        for (value, expected) in [
            ("true", true),
            ("false", false),
            ("1", true),
            ("off", false),
        ] {
            let c = parse(&["--self-ensemble", value]).unwrap();
            assert_eq!(c.model.self_ensemble, Some(expected), "{value}");
        }
        let mut argv = vec!["hndsr-server", "--self-ensemble", "maybe"];
        assert!(Args::try_parse_from(argv.drain(..)).is_err());
        let e = parse(&["--sampling-steps", "1001"]).unwrap_err();
        assert!(e.to_string().contains("(1001) must be <= 1000"), "{e}");
    }

    #[test]
    fn queue_depth_below_concurrency_is_refused() {
        let e = parse(&["--max-concurrent", "4", "--max-queue-depth", "3"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("MAX_QUEUE_DEPTH (3) must be >= MAX_CONCURRENT (4)"),
            "{e}"
        );
    }

    #[test]
    fn zero_concurrency_is_refused() {
        let e = parse(&["--max-concurrent", "0"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("MAX_CONCURRENT must be greater than 0"),
            "{e}"
        );
    }

    #[test]
    fn wildcard_cors_and_bad_cidr_are_refused() {
        assert!(
            parse(&["--cors-origins", "*"])
                .unwrap_err()
                .to_string()
                .contains("refused")
        );
        assert!(parse(&["--trusted-proxies", "10.0.0.0/33"]).is_err());
        let c = parse(&[
            "--trusted-proxies",
            "10.0.0.0/8,127.0.0.1",
            "--cors-origins",
            "https://a.example",
        ])
        .expect("valid");
        assert_eq!(c.http.trusted_proxies.len(), 2);
        assert_eq!(c.http.cors_origins, vec!["https://a.example".to_owned()]);
    }

    #[test]
    fn hndsr_needs_weights() {
        let e = parse(&["--backend", "hndsr"]).unwrap_err();
        assert!(
            e.to_string().contains("HNDSR_WEIGHTS_PATH is required"),
            "{e}"
        );
    }
}

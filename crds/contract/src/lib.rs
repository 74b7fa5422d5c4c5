//! The contract between the operator and the inference server.
//!
//! The operator writes these env vars, ports and probe paths into every pod
//! it manages, and builds its HorizontalPodAutoscaler on these metric names;
//! the server reads the same names. Both depend on this crate (which has no
//! dependencies, so the server stays free of kube), so the two sides cannot
//! drift apart.

/// Environment variables the server reads its configuration from. The names
/// are the original service's; each also has a matching CLI flag.
pub mod env {
    /// Maximum number of requests running on the backend at once (GPU permits).
    pub const MAX_CONCURRENT: &str = "MAX_CONCURRENT";
    /// Maximum number of requests in flight (running + waiting); beyond it, 503.
    pub const MAX_QUEUE_DEPTH: &str = "MAX_QUEUE_DEPTH";
    /// Requests allowed per client per hour; 0 disables the limiter.
    pub const RATE_LIMIT_PER_HOUR: &str = "RATE_LIMIT_PER_HOUR";
    /// Whole-request deadline in seconds; past it, 504 and the work is cancelled.
    pub const REQUEST_TIMEOUT_S: &str = "REQUEST_TIMEOUT_S";
    /// Largest accepted input image, in pixels (width × height).
    pub const MAX_IMAGE_PIXELS: &str = "MAX_IMAGE_PIXELS";
    /// Largest accepted request body, in MiB.
    pub const MAX_PAYLOAD_MB: &str = "MAX_PAYLOAD_MB";
    /// Seconds to drain in-flight requests after SIGTERM.
    pub const DRAIN_SECONDS: &str = "DRAIN_SECONDS";
    /// Address the HTTP server binds (`host:port`).
    pub const LISTEN_ADDR: &str = "HNDSR_LISTEN_ADDR";
    /// Model backend: `bicubic` or `hndsr`.
    pub const BACKEND: &str = "HNDSR_BACKEND";
    /// Default upscaling factor.
    pub const SCALE: &str = "HNDSR_SCALE";
    /// Device: `cpu`, `cuda` or `cuda:N`.
    pub const DEVICE: &str = "HNDSR_DEVICE";
    /// Path of the model weights (safetensors).
    pub const WEIGHTS_PATH: &str = "HNDSR_WEIGHTS_PATH";
    /// Expected sha256 of the weights file (hex).
    pub const WEIGHTS_SHA256: &str = "HNDSR_WEIGHTS_SHA256";
    /// DDIM sampling steps for the `hndsr` backend.
    pub const SAMPLING_STEPS: &str = "HNDSR_SAMPLING_STEPS";
    /// Numeric precision: `fp32`, `fp16` or `bf16`.
    pub const PRECISION: &str = "HNDSR_PRECISION";
    /// `true` / `false`: μ as the mean over the 8 flips / 90° rotations.
    pub const SELF_ENSEMBLE: &str = "HNDSR_SELF_ENSEMBLE";
    /// LR tile edge, in pixels, the `hndsr` backend cuts images into.
    pub const TILE: &str = "HNDSR_TILE";
    /// Conjugate-gradient steps of the `hndsr` backend's projection of each
    /// output onto the images that downsample exactly to the input (0: off).
    pub const PROJECTION_STEPS: &str = "HNDSR_PROJECTION_STEPS";
    /// Serving profile of the `hndsr` backend: `fast` or `quality` (see
    /// [`super::profile`]); unset: `fast` on the CPU, `quality` on CUDA.
    pub const PROFILE: &str = "HNDSR_PROFILE";
    /// Most tiles per forward pass of the `hndsr` backend when concurrent
    /// requests' tiles are batched together (0 or 1: no batching across
    /// requests); unset: 16 on CUDA, off on the CPU.
    pub const BATCH_TILES: &str = "HNDSR_BATCH_TILES";
    /// Longest a forward pass waits for other requests' tiles, in ms.
    pub const BATCH_WAIT_MS: &str = "HNDSR_BATCH_WAIT_MS";
    /// CPU cores the server may use (the operator fills it from the pod's
    /// CPU request); unset: what the process is allowed to run on.
    pub const CPUS: &str = "HNDSR_CPUS";
    /// libtorch intra-op threads per inference thread; unset: `HNDSR_CPUS`.
    pub const TORCH_THREADS: &str = "HNDSR_TORCH_THREADS";
    /// How many nice values (0–19) below the HTTP threads the inference
    /// threads run; default 0.
    pub const INFERENCE_NICE: &str = "HNDSR_INFERENCE_NICE";
    /// Host memory (MiB) the server commits to the image buffers of its
    /// requests at once; 0: no budget; unset: 60% of the container's
    /// memory limit.
    pub const MEMORY_BUDGET_MB: &str = "HNDSR_MEMORY_BUDGET_MB";
    /// Seconds a connection may take to send a request's line and headers.
    pub const HEADER_READ_TIMEOUT_S: &str = "HNDSR_HEADER_READ_TIMEOUT_S";
    /// Slowest accepted request upload in KiB/s after a 2 s grace (0: none).
    pub const MIN_UPLOAD_KIB_S: &str = "HNDSR_MIN_UPLOAD_KIB_S";
    /// Most open client connections of one server.
    pub const MAX_CONNECTIONS: &str = "HNDSR_MAX_CONNECTIONS";
    /// Comma-separated CIDRs whose X-Forwarded-For is trusted.
    pub const TRUSTED_PROXIES: &str = "HNDSR_TRUSTED_PROXIES";
    /// Comma-separated origins allowed by CORS (explicit; `*` is refused).
    pub const CORS_ORIGINS: &str = "HNDSR_CORS_ORIGINS";
    /// Emit JSON logs when `true`.
    pub const LOG_JSON: &str = "HNDSR_LOG_JSON";
}

/// Network endpoints of the server.
pub mod http {
    /// The one port the server listens on (API, probes and metrics).
    pub const PORT: u16 = 8080;
    /// Name of the container port (used by the Service's targetPort).
    pub const PORT_NAME: &str = "http";
    /// Liveness probe: the process is alive and its inference thread answers.
    pub const HEALTHZ_PATH: &str = "/healthz";
    /// Readiness probe: the model is loaded and warmed up, and not draining.
    pub const READYZ_PATH: &str = "/readyz";
    /// Prometheus text exposition.
    pub const METRICS_PATH: &str = "/metrics";
    /// Model, backend, device, limits and version.
    pub const INFO_PATH: &str = "/v1/info";
    /// The upscaling endpoint (raw image body).
    pub const UPSCALE_PATH: &str = "/v1/upscale";
    /// The OpenAPI document.
    pub const OPENAPI_PATH: &str = "/openapi.json";
}

/// Prometheus metric names the server exports and the autoscaler consumes.
pub mod metrics {
    /// Gauge: requests currently running on the backend. Autoscaling signal.
    pub const ACTIVE_REQUESTS: &str = "hndsr_active_requests";
    /// Gauge: admitted requests waiting for a backend permit. Autoscaling signal.
    pub const QUEUE_DEPTH: &str = "hndsr_queue_depth";
    /// Gauge: requests holding an admission slot (still uploading, waiting
    /// or running); `MAX_QUEUE_DEPTH` bounds it.
    pub const ADMITTED_REQUESTS: &str = "hndsr_admitted_requests";
    /// Histogram: whole request duration in seconds.
    pub const REQUEST_DURATION_SECONDS: &str = "hndsr_request_duration_seconds";
    /// Buckets of [`REQUEST_DURATION_SECONDS`].
    pub const REQUEST_DURATION_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    /// Histogram: time spent waiting for a backend permit.
    pub const QUEUE_WAIT_SECONDS: &str = "hndsr_queue_wait_seconds";
    /// Histogram: time spent in the backend.
    pub const INFERENCE_SECONDS: &str = "hndsr_inference_seconds";
    /// Counter: finished requests by `outcome`.
    pub const REQUESTS_TOTAL: &str = "hndsr_requests_total";
    /// Counter: rejected requests by `reason`.
    pub const REJECTIONS_TOTAL: &str = "hndsr_rejections_total";
}

/// Defaults shared by the CRD (reported as effective values in status) and
/// the server (used when an env var is absent). The seed system's numbers.
pub mod defaults {
    /// Default [`super::env::MAX_CONCURRENT`].
    pub const MAX_CONCURRENT: u32 = 4;
    /// Default [`super::env::MAX_QUEUE_DEPTH`].
    pub const MAX_QUEUE_DEPTH: u32 = 20;
    /// Default [`super::env::RATE_LIMIT_PER_HOUR`].
    pub const RATE_LIMIT_PER_HOUR: u32 = 100;
    /// Default [`super::env::REQUEST_TIMEOUT_S`].
    pub const REQUEST_TIMEOUT_SECONDS: u32 = 30;
    /// Default [`super::env::MAX_IMAGE_PIXELS`].
    pub const MAX_IMAGE_PIXELS: u64 = 16_000_000;
    /// Default [`super::env::MAX_PAYLOAD_MB`].
    pub const MAX_PAYLOAD_MB: u32 = 20;
    /// Default [`super::env::DRAIN_SECONDS`].
    pub const DRAIN_SECONDS: u32 = 30;
    /// Default upscaling factor.
    pub const SCALE: u32 = 4;
}

/// Upper bounds the server enforces at start-up (the CRD's schema uses the
/// same, so a spec the API server admits never crash-loops its pods).
pub mod limits {
    /// Largest [`super::env::MAX_PAYLOAD_MB`].
    pub const MAX_PAYLOAD_MB: u32 = 1024;
    /// Largest [`super::env::INFERENCE_NICE`]: the lowest priority a Linux
    /// nice value gives.
    pub const MAX_INFERENCE_NICE: u8 = 19;
}

/// LR tile edges, in pixels, the `hndsr` backend accepts for
/// [`env::TILE`] (the same bounds as the model crate's and the CRD's).
pub mod tile {
    /// Smallest tile edge: below it the tile overlaps would be most of
    /// every tile.
    pub const MIN: u32 = 16;
    /// Largest tile edge (4096² output pixels at ×4).
    pub const MAX: u32 = 1024;
}

/// Conjugate-gradient steps the `hndsr` backend accepts for
/// [`env::PROJECTION_STEPS`] (the same bound as the model crate's and the
/// CRD's).
pub mod projection {
    /// Most steps (20 reach the input to within 10⁻³ on real images).
    pub const MAX_STEPS: u32 = 100;
}

/// Serving profiles of the `hndsr` backend ([`env::PROFILE`]): named
/// settings of its latency/quality knobs.
pub mod profile {
    /// One network pass per 256² LR tile: no self-ensemble, no diffusion,
    /// no projection.
    pub const FAST: &str = "fast";
    /// What the weights' manifest recommends.
    pub const QUALITY: &str = "quality";
    /// `fast` on the weights trained for real-sensor inputs (blur, noise,
    /// JPEG), never with the LR-consistency projection.
    pub const REALISTIC: &str = "realistic";
    /// Every profile name.
    pub const ALL: &[&str] = &[FAST, QUALITY, REALISTIC];
}

/// The weights the project's `hndsr-server` image ships (`bundled: true`
/// in an `HndsrService`), each with its JSON manifest beside it.
pub mod bundled {
    /// The directory holding them.
    pub const DIR: &str = "/opt/hndsr/models";
    /// Weights for the matched degradation: the profiles `fast` and
    /// `quality`, and the image's default `HNDSR_WEIGHTS_PATH`.
    pub const WEIGHTS_FILE: &str = "hndsr.safetensors";
    /// Weights for realistic inputs: the profile `realistic`.
    pub const REALISTIC_WEIGHTS_FILE: &str = "hndsr-realistic.safetensors";
}

#[cfg(test)]
mod tests {
    use super::bundled;

    fn repo_file(path: &str) -> String {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        std::fs::read_to_string(format!("{root}/{path}")).expect(path)
    }

    /// The operator points `realistic` pods at a path of the server image:
    /// the image must put both weights there.
    #[test]
    fn the_server_image_ships_the_bundled_weights_where_the_contract_says() {
        let containerfile = repo_file("server/Containerfile");
        assert!(
            containerfile.contains(&format!("COPY models/ {}/", bundled::DIR)),
            "{containerfile}"
        );
        assert!(
            containerfile.contains(&format!(
                "HNDSR_WEIGHTS_PATH={}/{}",
                bundled::DIR,
                bundled::WEIGHTS_FILE
            )),
            "{containerfile}"
        );
        let build = repo_file("images/build.sh");
        for file in [bundled::WEIGHTS_FILE, bundled::REALISTIC_WEIGHTS_FILE] {
            assert!(
                build.contains(&format!("server/models/{file}")),
                "images/build.sh stages {file}"
            );
        }
    }
}

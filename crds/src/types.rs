//! The `HndsrService` spec and status types.
//!
//! Every field carries a `///` doc: it becomes the schema description that
//! `kubectl explain` shows and that `docs/crd-reference.md` is generated from.
//! Optional fields stay `Option` with no schema default; the operator applies
//! the defaults (see `hndsr_contract::defaults`) and reports effective values.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HPAScalingRules;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use hndsr_contract::defaults;

/// Desired state of an HNDSR super-resolution service: the model to serve,
/// the server's admission limits, GPU resources and scheduling, autoscaling,
/// prewarmed standby capacity and disruption budget.
// Printer columns repeat `type_ = ...`, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hndsr.io",
    version = "v1alpha1",
    kind = "HndsrService",
    plural = "hndsrservices",
    singular = "hndsrservice",
    namespaced,
    shortname = "hsvc",
    category = "hndsr",
    status = "HndsrServiceStatus",
    derive = "PartialEq",
    doc = "HndsrService runs the HNDSR satellite super-resolution server on Kubernetes: a GPU Deployment, a Service, an autoscaler on the server's own load metrics and a PodDisruptionBudget.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the service answers requests"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready serving replicas"
    ),
    printcolumn(
        name = "Standby",
        type_ = "integer",
        json_path = ".status.standbyReplicas",
        description = "Warm standby replicas"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.backend",
        description = "Model backend"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.autoscaling) || !has(self.autoscaling.minReplicas) || self.autoscaling.minReplicas > 0 \
     || !has(self.prewarm) \
     || ((!has(self.prewarm.standbyReplicas) || self.prewarm.standbyReplicas == 0) \
     && (!has(self.prewarm.standbyPercent) || self.prewarm.standbyPercent == 0))"
).message("standby prewarm and scale to zero (autoscaling.minReplicas 0) are exclusive"))]
#[serde(rename_all = "camelCase")]
pub struct HndsrServiceSpec {
    /// The inference server image and the model it serves.
    pub model: ModelSpec,
    /// Admission limits of the server (concurrency, queue, timeouts, payload
    /// size, drain). Every field is optional; the effective values are
    /// reported in `status.serving`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
    /// GPU and CPU/memory resources of each pod and where pods may be
    /// scheduled. Without it each pod gets one `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// Horizontal autoscaling on the server's `hndsr_active_requests` /
    /// `hndsr_queue_depth` metrics. Absent or `enabled: false`: `replicas` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Number of serving pods when autoscaling is off (default 1). Ignored
    /// while an autoscaler owns the replica count. Target of the scale
    /// subresource (`kubectl scale hsvc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Prewarmed capacity: warm standby pods promoted into the serving set
    /// the moment it gains a replica, and capacity placeholders that real
    /// pods preempt (docs/operator.md, "Prewarm").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<PrewarmSpec>,
    /// The PodDisruptionBudget of the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<DisruptionSpec>,
}

/// The inference server image and the model it serves.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.backend != 'hndsr' || has(self.weights)")
        .message("backend hndsr needs model.weights"),
    validation = Rule::new("!has(self.profile) || self.profile != 'realistic' || !has(self.projectionSteps) || self.projectionSteps == 0")
        .message("model.projectionSteps must be 0 with profile realistic: the projection inverts the matched degradation only")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Container image of the HNDSR inference server.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the server container (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Names of Secrets in the namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<String>>,
    /// Model backend: `hndsr` (neural operator + diffusion refinement, needs
    /// `weights`) or `bicubic` (no weights; a baseline and for tests).
    pub backend: Backend,
    /// Where the model weights (safetensors) come from and their sha256.
    /// Required for backend `hndsr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsSpec>,
    /// Upscaling factor served by default (2 to 8; default 4). Must match the
    /// scale the weights were trained for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 8))]
    pub scale: Option<i32>,
    /// Serving profile: `fast` (one network pass per 256² tile, no
    /// self-ensemble, no diffusion, no projection: about a second for a
    /// 256² image on two CPU cores), `quality` (what the weights' manifest
    /// recommends: tens of times the work for about +0.1 dB) or `realistic`
    /// (`fast` on weights trained for real-sensor inputs with blur, noise
    /// and JPEG, never with the projection; with `weights.bundled` the
    /// image's `hndsr-realistic.safetensors` is served). Unset: `realistic`
    /// for weights whose manifest says `inputs: realistic`, else `fast` on
    /// CPU pods (`resources.gpu` 0) and `quality` on GPU pods.
    /// `samplingSteps`, `selfEnsemble`, `tile` and `projectionSteps`, when
    /// set, win over the profile. Backend `hndsr` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ServingProfile>,
    /// DDIM sampling steps of the diffusion refinement (0 returns the neural
    /// operator estimate). Unset: the profile's (`fast`: 0; `quality`: what
    /// the weights' manifest recommends, `default_steps`, else 20). Backend
    /// `hndsr` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub sampling_steps: Option<i32>,
    /// Compute the neural operator estimate as the mean over the 8 flips /
    /// 90° rotations of each tile ("geometric self-ensemble"): better PSNR
    /// for 8× that part's work. Unset: the profile's (`fast`: off;
    /// `quality`: what the weights' manifest recommends, `self_ensemble`,
    /// else off). Backend `hndsr` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_ensemble: Option<bool>,
    /// Edge, in low-resolution pixels, of the tiles the server cuts each
    /// image into (16 to 1024; overlapping, cross-faded). A quality setting:
    /// the model scores best on tiles the size of its training crops. Unset:
    /// the profile's (`fast`: 256; `quality`: what the weights' manifest
    /// recommends, `tile`, else 256). Backend `hndsr` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = hndsr_contract::tile::MIN, max = hndsr_contract::tile::MAX))]
    pub tile: Option<i32>,
    /// Conjugate-gradient steps (0 to 100; 0 is off) of a last step that
    /// projects each output onto the images that downsample exactly to the
    /// input: the output then agrees with the input in the band the input
    /// carries (better PSNR and SSIM, for a few milliseconds per megapixel).
    /// Unset: the profile's (`fast`: off; `quality`: what the weights'
    /// manifest recommends, `projection_steps`, else off). Backend `hndsr`
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = hndsr_contract::projection::MAX_STEPS))]
    pub projection_steps: Option<i32>,
    /// Numeric precision: `fp32` (the only choice on CPU), `fp16` or `bf16`
    /// (GPU only). Unset: `fp16` for backend `hndsr` on GPU pods (it scores
    /// as fp32 there, at a fraction of the memory traffic), else `fp32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

/// Model backend: `hndsr` (the HNDSR model, needs weights) or `bicubic`
/// (bicubic interpolation, no weights).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Hndsr,
    Bicubic,
}

impl Backend {
    /// The value the server's `HNDSR_BACKEND` env var takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Hndsr => "hndsr",
            Backend::Bicubic => "bicubic",
        }
    }
}

/// Serving profile of the `hndsr` backend: `fast`, `quality` or
/// `realistic`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServingProfile {
    Fast,
    Quality,
    Realistic,
}

impl ServingProfile {
    /// The value the server's `HNDSR_PROFILE` env var takes.
    pub fn as_str(self) -> &'static str {
        match self {
            ServingProfile::Fast => hndsr_contract::profile::FAST,
            ServingProfile::Quality => hndsr_contract::profile::QUALITY,
            ServingProfile::Realistic => hndsr_contract::profile::REALISTIC,
        }
    }
}

/// Numeric precision of the model: `fp32`, `fp16` or `bf16`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// The value the server's `HNDSR_PRECISION` env var takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Image pull policy: `Always`, `IfNotPresent` or `Never`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Where the model weights come from: exactly one of `pvc`, `image`, `uri`
/// or `bundled`, plus the expected sha256 (the server refuses weights whose
/// digest differs).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("[has(self.pvc), has(self.image), has(self.uri), has(self.bundled) && self.bundled].exists_one(x, x)")
        .message("set exactly one of weights.pvc, weights.image, weights.uri or weights.bundled"),
    validation = Rule::new("!has(self.file) || !has(self.bundled) || !self.bundled")
        .message("weights.file does not apply to bundled weights"),
    validation = Rule::new("!has(self.uri) || self.uri.startsWith('https://') || self.uri.startsWith('http://')")
        .message("weights.uri must be an http(s) URL"),
    validation = Rule::new("!has(self.file) || (!self.file.startsWith('/') && !self.file.contains('..'))")
        .message("weights.file must be a relative path without '..'"),
    validation = Rule::new("!has(self.manifestUri) || has(self.uri)")
        .message("weights.manifestUri goes with weights.uri"),
    validation = Rule::new("!has(self.manifestUri) || self.manifestUri.startsWith('https://') || self.manifestUri.startsWith('http://')")
        .message("weights.manifestUri must be an http(s) URL"),
    validation = Rule::new("!has(self.uri) || has(self.manifestUri) || self.uri.matches('^[^?#]*[.]safetensors$')")
        .message("weights.uri does not end in .safetensors, or has a query (a signed URL): set weights.manifestUri to its JSON manifest")
)]
#[serde(rename_all = "camelCase")]
pub struct WeightsSpec {
    /// A PersistentVolumeClaim holding the weights, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcWeights>,
    /// An OCI image (or artifact) holding the weights, mounted read-only as an
    /// image volume (needs Kubernetes with the ImageVolume feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageWeights>,
    /// An http(s) URL the weights are downloaded from by an init container
    /// into a pod-local emptyDir before the server starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// With `uri`: the http(s) URL of the weights' JSON manifest, which the
    /// server reads beside the weights. Unset: `uri` with its `.safetensors`
    /// ending replaced by `.json`; required when `uri` has a query (a
    /// pre-signed URL signs its own path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub manifest_uri: Option<String>,
    /// `true`: the weights the server image ships, as the project's
    /// `hndsr-server` image does; no volume, no download. The image's own
    /// `HNDSR_WEIGHTS_PATH` (with the manifest beside it), or with profile
    /// `realistic` its `hndsr-realistic.safetensors` in the same directory
    /// (`/opt/hndsr/models`). `sha256` still pins them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundled: Option<bool>,
    /// Path of the safetensors file inside the `pvc` or `image` volume
    /// (default `model.safetensors`); its JSON manifest must sit beside it
    /// (`model.json`). Ignored for `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub file: Option<String>,
    /// Expected sha256 of the weights file, 64 lowercase hex characters.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

/// Weights on a PersistentVolumeClaim.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcWeights {
    /// Name of the PersistentVolumeClaim in the service's namespace.
    #[schemars(length(min = 1))]
    pub claim_name: String,
}

/// Weights in an OCI image mounted as an image volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageWeights {
    /// Image reference holding the weights.
    #[schemars(length(min = 1))]
    pub reference: String,
    /// Pull policy of the weights image (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// Admission limits of the inference server. Unset fields take the server
/// defaults, which `status.serving` reports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new(format!(
        "(has(self.maxQueueDepth) ? self.maxQueueDepth : {}) >= (has(self.maxConcurrent) ? self.maxConcurrent : {})",
        defaults::MAX_QUEUE_DEPTH,
        defaults::MAX_CONCURRENT
    )).message("maxQueueDepth (running + waiting) must be at least maxConcurrent"),
    validation = Rule::new("!has(self.corsOrigins) || self.corsOrigins.all(o, o.matches('^https?://[^/*,]+$'))")
        .message("serving.corsOrigins must be explicit origins such as https://app.example (no '*', path or comma)"),
    validation = Rule::new("!has(self.trustedProxies) || self.trustedProxies.all(p, p.matches('^[0-9a-fA-F.:]+(/[0-9]{1,3})?$'))")
        .message("serving.trustedProxies must be IP addresses or CIDRs such as 10.0.0.0/8")
)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Requests running on the model at once per pod (GPU permits; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_concurrent: Option<i32>,
    /// Requests admitted per pod, running plus waiting (default 20); beyond
    /// it the server answers 503 with Retry-After. At least `maxConcurrent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queue_depth: Option<i32>,
    /// Whole-request deadline in seconds (default 30); past it the server
    /// answers 504 and cancels the work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub request_timeout_seconds: Option<i32>,
    /// Requests allowed per client per hour (default 100); 0 disables the limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub rate_limit_per_hour: Option<i32>,
    /// Largest accepted input image in pixels, width × height (default 16000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_image_pixels: Option<i64>,
    /// Largest accepted request body in MiB (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "maxPayloadMB")]
    #[schemars(range(min = 1, max = hndsr_contract::limits::MAX_PAYLOAD_MB))]
    pub max_payload_mb: Option<i32>,
    /// How many nice values (0–19) below the HTTP threads the pods' inference
    /// threads run (default 0). On a CPU pod at full load, raising it
    /// answers probes and refusals sooner but serves fewer requests when
    /// clients retry without waiting; keep 0 on GPU pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = hndsr_contract::limits::MAX_INFERENCE_NICE))]
    pub inference_nice: Option<i32>,
    /// Seconds a pod drains in-flight requests after SIGTERM (default 30);
    /// the pod's termination grace period covers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: Option<i32>,
    /// Addresses or CIDRs of the proxies in front of the pods (ingress
    /// controllers, gateways, load balancers) whose `X-Forwarded-For` header
    /// names the client for the rate limit. Unset: none is trusted, and
    /// every client behind a proxy shares the proxy's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub trusted_proxies: Option<Vec<String>>,
    /// Origins (`scheme://host[:port]`) allowed to call the API from a
    /// browser (CORS). Unset: none. `*` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub cors_origins: Option<Vec<String>>,
}

/// Per-pod resources and scheduling.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// GPUs per pod, as requests and limits of `gpuResourceName` (default 1).
    /// 0 serves on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub gpu: Option<i32>,
    /// Extended resource name of the GPU (default `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub gpu_resource_name: Option<String>,
    /// CPU request and limit of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<ResourceAmount>,
    /// Memory request and limit of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ResourceAmount>,
    /// Node labels a pod's node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the pods (for example of a GPU node taint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity and anti-affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// A request and a limit of one compute resource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmount {
    /// Amount the scheduler reserves (a Kubernetes quantity, e.g. `2` or `8Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Quantity>,
    /// Upper bound enforced at run time (a Kubernetes quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Quantity>,
}

/// Horizontal autoscaling of the serving pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas")
        .message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    validation = Rule::new("!has(self.minReplicas) || self.minReplicas > 0 || (has(self.provider) && self.provider == 'keda')")
        .message("autoscaling.minReplicas 0 (scale to zero) needs provider keda"),
    validation = Rule::new("!has(self.keda) || (has(self.provider) && self.provider == 'keda')")
        .message("autoscaling.keda needs provider keda")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Whether the autoscaler owns the replica count (default true when this
    /// block is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Fewest serving pods (default 1). 0 (scale to zero) needs provider `keda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// Most serving pods: the GPU budget.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Load signal: `activeRequests` (requests on the model per pod, the
    /// default), `queueDepth` (requests waiting per pod) or `both`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<AutoscalingMetric>,
    /// Average per-pod value of each metric the autoscaler aims for. Defaults
    /// derive from `serving.maxConcurrent`: 3/4 of it for active requests,
    /// 1/2 of it (at least 1) for queue depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_per_pod: Option<TargetPerPod>,
    /// Scale-up and scale-down behaviour. Defaults: fast up (no stabilization,
    /// up to double or +4 pods every 15s), slow down (5 minute window, one pod
    /// a minute). Fields set here replace the default field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<ScalingBehavior>,
    /// Who scales: `hpa` (a HorizontalPodAutoscaler, the default) or `keda`
    /// (a KEDA ScaledObject `<name>` on the same metrics through Prometheus;
    /// allows `minReplicas: 0`, and needs KEDA in the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<AutoscalingProvider>,
    /// KEDA settings (provider `keda` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keda: Option<KedaSpec>,
}

/// KEDA settings of provider `keda`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KedaSpec {
    /// Seconds between KEDA's checks of the triggers while at zero replicas
    /// (how soon demand wakes the service; default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub polling_interval_seconds: Option<i32>,
    /// Seconds with no load (and no active schedule) before KEDA scales the
    /// last pod away, when `minReplicas` is 0 (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub idle_seconds_before_zero: Option<i32>,
    /// Windows that keep at least `replicas` serving pods (KEDA cron
    /// triggers): business hours warm, scale to zero off-hours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub schedules: Vec<ScaleSchedule>,
}

/// A window, in cron syntax, during which at least `replicas` serving pods run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleSchedule {
    /// IANA time zone the cron expressions are read in (e.g. `Europe/Berlin`).
    #[schemars(length(min = 1, max = 64))]
    pub timezone: String,
    /// Cron expression (5 fields) of the window's start, e.g. `0 8 * * 1-5`.
    #[schemars(length(min = 9, max = 100))]
    pub start: String,
    /// Cron expression (5 fields) of the window's end, e.g. `0 18 * * 1-5`.
    #[schemars(length(min = 9, max = 100))]
    pub end: String,
    /// Serving pods kept during the window (at most `maxReplicas`).
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
}

/// Autoscaling signal: `activeRequests`, `queueDepth` or `both`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMetric {
    ActiveRequests,
    QueueDepth,
    Both,
}

/// Autoscaling provider: `hpa` or `keda`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingProvider {
    Hpa,
    Keda,
}

impl AutoscalingProvider {
    /// The spelling used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoscalingProvider::Hpa => "hpa",
            AutoscalingProvider::Keda => "keda",
        }
    }
}

impl AutoscalingMetric {
    /// The spelling used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoscalingMetric::ActiveRequests => "activeRequests",
            AutoscalingMetric::QueueDepth => "queueDepth",
            AutoscalingMetric::Both => "both",
        }
    }
}

/// Per-pod targets of the autoscaling metrics.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetPerPod {
    /// Target average of `hndsr_active_requests` per pod (a quantity, e.g. `3`
    /// or `2500m`). Keep it below `maxConcurrent`, or the pods never look busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_requests: Option<Quantity>,
    /// Target average of `hndsr_queue_depth` per pod (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<Quantity>,
}

/// Scale-up and scale-down rules, as in a HorizontalPodAutoscaler.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    /// Rules for adding pods (stabilization window, Pods/Percent policies,
    /// selectPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<HPAScalingRules>,
    /// Rules for removing pods (stabilization window, Pods/Percent policies,
    /// selectPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<HPAScalingRules>,
}

/// Prewarmed capacity: a standby pool (`<name>-standby`) and capacity
/// placeholders (`<name>-placeholder`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.standbyReplicas) && has(self.standbyPercent))")
    .message("set prewarm.standbyReplicas or prewarm.standbyPercent, not both"))]
#[serde(rename_all = "camelCase")]
pub struct PrewarmSpec {
    /// Warm standby pods (model loaded, not in the Service) kept ready for
    /// promotion into the serving set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub standby_replicas: Option<i32>,
    /// Standby pods as a percentage of the desired serving replicas, rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub standby_percent: Option<i32>,
    /// Low-priority placeholder pods that hold GPU nodes and the pulled image;
    /// real pods preempt them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholders: Option<PlaceholderSpec>,
}

/// Capacity placeholders.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlaceholderSpec {
    /// Number of placeholder pods, each requesting the resources of one
    /// serving pod on the same nodes (Deployment `<name>-placeholder`; 0 or
    /// unset: none). They run the serving image with `sleep infinity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// PriorityClass of the placeholders; must have a negative value so real
    /// pods preempt them. Default: the operator's
    /// `--placeholder-priority-class` (the chart's `hndsr-placeholder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// PodDisruptionBudget settings of the serving pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.maxUnavailable) && has(self.minAvailable))")
    .message("set disruption.maxUnavailable or disruption.minAvailable, not both"))]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// Whether to create the PodDisruptionBudget (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Serving pods that may be voluntarily evicted at once, a number or a
    /// percentage (default 1 when `minAvailable` is unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Serving pods that must stay available during voluntary evictions, a
    /// number or a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
}

/// Observed state of an HndsrService, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HndsrServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, with machine-readable reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Serving pods that exist (the Deployment's replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Serving pods that are ready (model loaded and warmed up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Serving pods running the current pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// Warm standby pods that are ready (prewarm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_replicas: Option<i32>,
    /// Serving pods wanted now: by the autoscaler, or `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// In-cluster URL of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Label selector of the serving pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Effective admission limits of the server, after defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<EffectiveServing>,
    /// Effective autoscaling settings, after defaults; absent when autoscaling is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<EffectiveAutoscaling>,
}

/// Admission limits the server pods run with, defaults applied.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveServing {
    /// Requests running on the model at once per pod.
    pub max_concurrent: i32,
    /// Requests admitted per pod, running plus waiting.
    pub max_queue_depth: i32,
    /// Whole-request deadline in seconds.
    pub request_timeout_seconds: i32,
    /// Requests allowed per client per hour (0: unlimited).
    pub rate_limit_per_hour: i32,
    /// Largest accepted input image in pixels.
    pub max_image_pixels: i64,
    /// Largest accepted request body in MiB.
    #[serde(rename = "maxPayloadMB")]
    pub max_payload_mb: i32,
    /// Seconds a pod drains after SIGTERM.
    pub drain_seconds: i32,
}

/// Autoscaling settings in force, defaults applied.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveAutoscaling {
    /// `hpa` or `keda`.
    pub provider: AutoscalingProvider,
    /// Fewest serving pods.
    pub min_replicas: i32,
    /// Most serving pods.
    pub max_replicas: i32,
    /// Target average of `hndsr_active_requests` per pod, when that metric is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_active_requests: Option<Quantity>,
    /// Target average of `hndsr_queue_depth` per pod, when that metric is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_queue_depth: Option<Quantity>,
}

impl HndsrService {
    /// The serving spec, or an empty one.
    pub fn serving(&self) -> ServingSpec {
        self.spec.serving.clone().unwrap_or_default()
    }

    /// Whether an autoscaler owns the replica count.
    pub fn autoscaling_enabled(&self) -> bool {
        self.spec
            .autoscaling
            .as_ref()
            .is_some_and(|a| a.enabled.unwrap_or(true))
    }
}

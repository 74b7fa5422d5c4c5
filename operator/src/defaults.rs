//! Effective values: the spec with the operator's defaults applied.
//!
//! Defaults live here and in `hndsr_contract::defaults`, never in the CRD
//! schema (schema defaults make GitOps tools report drift). The builders and
//! the status computation read the spec only through these functions, so a
//! default is decided in exactly one place.

use hndsr_contract::defaults as contract;
use hndsr_crds::{
    AutoscalingMetric, AutoscalingProvider, Backend, EffectiveAutoscaling, EffectiveServing,
    HndsrServiceSpec, Precision, PullPolicy, WeightsSpec,
};
use k8s_openapi::api::autoscaling::v2::{
    HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscalerBehavior,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Serving replicas when autoscaling is off and `spec.replicas` is unset.
pub const REPLICAS: i32 = 1;
/// GPUs per pod when `resources.gpu` is unset.
pub const GPU: i32 = 1;
/// Extended resource name of the GPU when `resources.gpuResourceName` is unset.
pub const GPU_RESOURCE_NAME: &str = "nvidia.com/gpu";
/// `autoscaling.minReplicas` when unset.
pub const MIN_REPLICAS: i32 = 1;
/// Name of the weights file inside a `pvc` or `image` volume when `weights.file` is unset.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Seconds the preStop hook sleeps so endpoints drop the pod before it drains.
pub const PRE_STOP_SLEEP_SECONDS: i32 = 5;
/// Extra seconds of termination grace beyond preStop + drain (process exit, flush).
pub const TERMINATION_MARGIN_SECONDS: i32 = 10;
/// PDB `maxUnavailable` when neither it nor `minAvailable` is set.
pub const PDB_MAX_UNAVAILABLE: i32 = 1;
/// Per-pod active-request target as a fraction of `maxConcurrent`, in thousandths.
pub const ACTIVE_TARGET_PER_MILLE: i64 = 750;
/// Per-pod queue-depth target as a fraction of `maxConcurrent`, in thousandths.
pub const QUEUE_TARGET_PER_MILLE: i64 = 500;
/// Smallest derived queue-depth target (one waiting request), in milli-units.
pub const QUEUE_TARGET_MIN_MILLI: i64 = 1000;

/// CPU and memory of a GPU pod when `resources.cpu` / `resources.memory` are unset.
pub const GPU_POD_CPU_REQUEST: &str = "2";
/// Memory request of a GPU pod.
pub const GPU_POD_MEMORY_REQUEST: &str = "8Gi";
/// Memory limit of a GPU pod.
pub const GPU_POD_MEMORY_LIMIT: &str = "16Gi";
/// CPU request of a CPU-serving pod.
pub const CPU_POD_CPU_REQUEST: &str = "1";
/// Memory request of a CPU-serving pod.
pub const CPU_POD_MEMORY_REQUEST: &str = "2Gi";
/// Memory limit of a CPU-serving pod.
pub const CPU_POD_MEMORY_LIMIT: &str = "4Gi";

fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Admission limits with defaults from the contract.
pub fn serving(spec: &HndsrServiceSpec) -> EffectiveServing {
    let s = spec.serving.clone().unwrap_or_default();
    EffectiveServing {
        max_concurrent: s.max_concurrent.unwrap_or(to_i32(contract::MAX_CONCURRENT)),
        max_queue_depth: s
            .max_queue_depth
            .unwrap_or(to_i32(contract::MAX_QUEUE_DEPTH)),
        request_timeout_seconds: s
            .request_timeout_seconds
            .unwrap_or(to_i32(contract::REQUEST_TIMEOUT_SECONDS)),
        rate_limit_per_hour: s
            .rate_limit_per_hour
            .unwrap_or(to_i32(contract::RATE_LIMIT_PER_HOUR)),
        max_image_pixels: s
            .max_image_pixels
            .unwrap_or(i64::try_from(contract::MAX_IMAGE_PIXELS).unwrap_or(i64::MAX)),
        max_payload_mb: s.max_payload_mb.unwrap_or(to_i32(contract::MAX_PAYLOAD_MB)),
        drain_seconds: s.drain_seconds.unwrap_or(to_i32(contract::DRAIN_SECONDS)),
    }
}

/// GPUs per pod (0: CPU serving).
pub fn gpu(spec: &HndsrServiceSpec) -> i32 {
    spec.resources.as_ref().and_then(|r| r.gpu).unwrap_or(GPU)
}

/// Extended resource name of the GPU.
pub fn gpu_resource_name(spec: &HndsrServiceSpec) -> &str {
    spec.resources
        .as_ref()
        .and_then(|r| r.gpu_resource_name.as_deref())
        .unwrap_or(GPU_RESOURCE_NAME)
}

/// Upscaling factor.
pub fn scale(spec: &HndsrServiceSpec) -> i32 {
    spec.model.scale.unwrap_or(to_i32(contract::SCALE))
}

/// Numeric precision in force: the spec's, else what the server picks
/// itself (fp16 for `hndsr` on a GPU, where it scores as fp32; fp32
/// otherwise).
pub fn precision(spec: &HndsrServiceSpec) -> Precision {
    spec.model
        .precision
        .unwrap_or(if gpu(spec) > 0 && backend(spec) == Backend::Hndsr {
            Precision::Fp16
        } else {
            Precision::Fp32
        })
}

/// Device string for the server: `cuda` with a GPU, else `cpu`.
pub fn device(spec: &HndsrServiceSpec) -> &'static str {
    if gpu(spec) > 0 { "cuda" } else { "cpu" }
}

/// The backend.
pub fn backend(spec: &HndsrServiceSpec) -> Backend {
    spec.model.backend
}

/// Image pull policy, if the spec sets one.
pub fn image_pull_policy(spec: &HndsrServiceSpec) -> Option<PullPolicy> {
    spec.model.image_pull_policy
}

/// Path of the weights file inside a `pvc` or `image` volume.
pub fn weights_file(spec: &HndsrServiceSpec) -> &str {
    spec.model
        .weights
        .as_ref()
        .and_then(|w| w.file.as_deref())
        .unwrap_or(WEIGHTS_FILE)
}

/// Name of the weights' JSON manifest beside [`WEIGHTS_FILE`] (the server
/// reads `<weights path>` with the extension `json`).
pub const MANIFEST_FILE: &str = "model.json";

/// Where the init container downloads the weights' manifest from for
/// `weights.uri`: `weights.manifestUri`, else `uri` with its `.safetensors`
/// ending replaced by `.json`. Not derived for a `uri` with a query or
/// fragment: a pre-signed URL's signature covers its path, so the derived
/// URL would be refused. `None` then (validation refuses that spec).
pub fn manifest_uri(w: &WeightsSpec) -> Option<String> {
    if let Some(m) = &w.manifest_uri {
        return Some(m.clone());
    }
    let uri = w.uri.as_deref()?;
    if uri.contains(['?', '#']) {
        return None;
    }
    let stem = uri.strip_suffix(".safetensors")?;
    Some(format!("{stem}.json"))
}

/// Whether an autoscaler (of either provider) owns the replica count.
pub fn autoscaling_enabled(spec: &HndsrServiceSpec) -> bool {
    spec.autoscaling
        .as_ref()
        .is_some_and(|a| a.enabled.unwrap_or(true))
}

/// The autoscaling provider, when autoscaling is on.
pub fn provider(spec: &HndsrServiceSpec) -> Option<AutoscalingProvider> {
    if !autoscaling_enabled(spec) {
        return None;
    }
    Some(
        spec.autoscaling
            .as_ref()?
            .provider
            .unwrap_or(AutoscalingProvider::Hpa),
    )
}

/// The autoscaling metric(s).
pub fn metric(spec: &HndsrServiceSpec) -> AutoscalingMetric {
    spec.autoscaling
        .as_ref()
        .and_then(|a| a.metric)
        .unwrap_or(AutoscalingMetric::ActiveRequests)
}

/// Replicas the Deployment gets when no autoscaler owns it.
pub fn static_replicas(spec: &HndsrServiceSpec) -> i32 {
    spec.replicas.unwrap_or(REPLICAS)
}

/// Formats milli-units as a Kubernetes quantity (`3`, `2500m`).
pub fn milli_quantity(milli: i64) -> Quantity {
    if milli % 1000 == 0 {
        Quantity((milli / 1000).to_string())
    } else {
        Quantity(format!("{milli}m"))
    }
}

/// Default per-pod target of `hndsr_active_requests`: 3/4 of `maxConcurrent`.
pub fn default_active_target(serving: &EffectiveServing) -> Quantity {
    milli_quantity(i64::from(serving.max_concurrent) * ACTIVE_TARGET_PER_MILLE)
}

/// Default per-pod target of `hndsr_queue_depth`: 1/2 of `maxConcurrent`, at least 1.
pub fn default_queue_target(serving: &EffectiveServing) -> Quantity {
    milli_quantity(
        (i64::from(serving.max_concurrent) * QUEUE_TARGET_PER_MILLE).max(QUEUE_TARGET_MIN_MILLI),
    )
}

/// Effective autoscaling settings; `None` when autoscaling is off.
pub fn autoscaling(spec: &HndsrServiceSpec) -> Option<EffectiveAutoscaling> {
    let provider = provider(spec)?;
    let a = spec.autoscaling.as_ref()?;
    let serving = serving(spec);
    let targets = a.target_per_pod.clone().unwrap_or_default();
    let m = metric(spec);
    let uses_active = matches!(
        m,
        AutoscalingMetric::ActiveRequests | AutoscalingMetric::Both
    );
    let uses_queue = matches!(m, AutoscalingMetric::QueueDepth | AutoscalingMetric::Both);
    Some(EffectiveAutoscaling {
        provider,
        min_replicas: a.min_replicas.unwrap_or(MIN_REPLICAS),
        max_replicas: a.max_replicas,
        target_active_requests: uses_active.then(|| {
            targets
                .active_requests
                .unwrap_or_else(|| default_active_target(&serving))
        }),
        target_queue_depth: uses_queue.then(|| {
            targets
                .queue_depth
                .unwrap_or_else(|| default_queue_target(&serving))
        }),
    })
}

/// Default scale-up rules: react at once, double or add 4 pods every 15s,
/// whichever is more.
pub fn default_scale_up() -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(0),
        select_policy: Some("Max".to_owned()),
        policies: Some(vec![
            HPAScalingPolicy {
                type_: "Percent".to_owned(),
                value: 100,
                period_seconds: 15,
            },
            HPAScalingPolicy {
                type_: "Pods".to_owned(),
                value: 4,
                period_seconds: 15,
            },
        ]),
        tolerance: None,
    }
}

/// Default scale-down rules: a 5 minute window, then one pod a minute (a GPU
/// pod is expensive to bring back).
pub fn default_scale_down() -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(300),
        select_policy: Some("Max".to_owned()),
        policies: Some(vec![HPAScalingPolicy {
            type_: "Pods".to_owned(),
            value: 1,
            period_seconds: 60,
        }]),
        tolerance: None,
    }
}

/// Field-by-field overlay of `user` on `default`.
fn overlay(default: HPAScalingRules, user: Option<&HPAScalingRules>) -> HPAScalingRules {
    let Some(user) = user else { return default };
    HPAScalingRules {
        stabilization_window_seconds: user
            .stabilization_window_seconds
            .or(default.stabilization_window_seconds),
        select_policy: user.select_policy.clone().or(default.select_policy),
        policies: user.policies.clone().or(default.policies),
        tolerance: user.tolerance.clone().or(default.tolerance),
    }
}

/// Effective HPA behaviour: the defaults overlaid with the spec's fields.
pub fn behavior(spec: &HndsrServiceSpec) -> HorizontalPodAutoscalerBehavior {
    let b = spec.autoscaling.as_ref().and_then(|a| a.behavior.as_ref());
    HorizontalPodAutoscalerBehavior {
        scale_up: Some(overlay(
            default_scale_up(),
            b.and_then(|b| b.scale_up.as_ref()),
        )),
        scale_down: Some(overlay(
            default_scale_down(),
            b.and_then(|b| b.scale_down.as_ref()),
        )),
    }
}

/// Whether a PodDisruptionBudget is built.
pub fn pdb_enabled(spec: &HndsrServiceSpec) -> bool {
    spec.disruption
        .as_ref()
        .and_then(|d| d.enabled)
        .unwrap_or(true)
}

/// PDB `(minAvailable, maxUnavailable)`: exactly one is `Some`.
pub fn pdb_bounds(spec: &HndsrServiceSpec) -> (Option<IntOrString>, Option<IntOrString>) {
    let d = spec.disruption.clone().unwrap_or_default();
    match (d.min_available, d.max_unavailable) {
        (Some(min), _) => (Some(min), None),
        (None, Some(max)) => (None, Some(max)),
        (None, None) => (None, Some(IntOrString::Int(PDB_MAX_UNAVAILABLE))),
    }
}

/// Seconds the pod gets between SIGTERM-path start and SIGKILL: preStop
/// sleep, then the drain, then a margin.
pub fn termination_grace_seconds(serving: &EffectiveServing) -> i64 {
    i64::from(PRE_STOP_SLEEP_SECONDS + serving.drain_seconds + TERMINATION_MARGIN_SECONDS)
}

/// Standby replicas requested by `prewarm` for `desired` serving replicas
/// (reported only; standby pods are reconciled in a later release).
pub fn standby_replicas(spec: &HndsrServiceSpec, desired: i32) -> i32 {
    let Some(p) = spec.prewarm.as_ref() else {
        return 0;
    };
    if let Some(n) = p.standby_replicas {
        return n;
    }
    p.standby_percent
        .map_or(0, |pct| (desired.max(0) * pct + 99) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(y: &str) -> HndsrServiceSpec {
        serde_yaml::from_str(&format!("model:\n  image: x\n  backend: bicubic\n{y}")).unwrap()
    }

    #[test]
    fn manifest_uri_defaults_to_the_weights_uri_with_a_json_ending() {
        let w = |y: &str| -> WeightsSpec { serde_yaml::from_str(y).unwrap() };
        let sha = format!("sha256: {}\n", "a".repeat(64));
        let m = |y: &str| manifest_uri(&w(&format!("{y}\n{sha}")));
        assert_eq!(
            m("uri: https://h/v1/model.safetensors").as_deref(),
            Some("https://h/v1/model.json")
        );
        assert_eq!(
            m("uri: https://h/m.safetensors?X-Amz-Signature=abc"),
            None,
            "a signed URL's signature would not cover the derived path"
        );
        assert_eq!(m("uri: https://h/blob/123"), None);
        assert_eq!(
            m("uri: https://h/blob/123\nmanifestUri: https://h/blob/124").as_deref(),
            Some("https://h/blob/124"),
            "an explicit manifest URL wins"
        );
        assert_eq!(m("pvc:\n  claimName: c"), None);
    }

    #[test]
    fn targets_derive_from_max_concurrent() {
        let q = |s: &str| Some(Quantity(s.to_owned()));
        let a = autoscaling(&spec("autoscaling:\n  maxReplicas: 3\n  metric: both\n")).unwrap();
        assert_eq!(
            (a.target_active_requests, a.target_queue_depth),
            (q("3"), q("2"))
        );
        let a = autoscaling(&spec(
            "serving:\n  maxConcurrent: 1\nautoscaling:\n  maxReplicas: 3\n  metric: both\n",
        ))
        .unwrap();
        assert_eq!(
            (a.target_active_requests, a.target_queue_depth),
            (q("750m"), q("1"))
        );
        assert!(autoscaling(&spec("autoscaling:\n  enabled: false\n  maxReplicas: 3\n")).is_none());
        assert!(autoscaling(&spec("")).is_none());
    }

    #[test]
    fn behaviour_overlays_field_by_field() {
        let b = behavior(&spec(
            "autoscaling:\n  maxReplicas: 3\n  behavior:\n    scaleDown:\n      stabilizationWindowSeconds: 60\n",
        ));
        let down = b.scale_down.unwrap();
        assert_eq!(down.stabilization_window_seconds, Some(60));
        assert_eq!(down.policies, default_scale_down().policies);
        assert_eq!(b.scale_up, Some(default_scale_up()));
    }

    #[test]
    fn standby_count_or_percent() {
        assert_eq!(standby_replicas(&spec(""), 5), 0);
        assert_eq!(
            standby_replicas(&spec("prewarm:\n  standbyReplicas: 2\n"), 5),
            2
        );
        assert_eq!(
            standby_replicas(&spec("prewarm:\n  standbyPercent: 25\n"), 5),
            2
        );
        assert_eq!(
            standby_replicas(&spec("prewarm:\n  standbyPercent: 25\n"), 0),
            0
        );
    }

    #[test]
    fn grace_covers_pre_stop_and_drain() {
        let s = serving(&spec("serving:\n  drainSeconds: 30\n"));
        assert_eq!(termination_grace_seconds(&s), 45);
    }
}

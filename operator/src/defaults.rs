//! The operator's defaults: their values and derivation rules.
//!
//! Defaults live here and in `hndsr_contract::defaults`, never in the CRD
//! schema (schema defaults make GitOps tools report drift). They are
//! applied in one place, [`crate::effective::EffectiveSpec::of`]; the
//! builders, the status and validation read the effective spec it makes.

use hndsr_crds::{EffectiveServing, ScalingBehavior, WeightsSpec};
use k8s_openapi::api::autoscaling::v2::{
    HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscalerBehavior,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Serving replicas when autoscaling is off and `spec.replicas` is unset.
pub const REPLICAS: i32 = 1;
/// GPUs per pod when `resources.gpu` is unset.
pub const GPU: i32 = 1;
/// Extended resource name of the GPU when `resources.gpuResourceName` is unset.
pub const GPU_RESOURCE_NAME: &str = "nvidia.com/gpu";
/// `autoscaling.minReplicas` when unset.
pub const MIN_REPLICAS: i32 = 1;
/// `autoscaling.keda.pollingIntervalSeconds` when unset: KEDA's own default
/// is 30 s, a long wait for the first request at zero.
pub const KEDA_POLLING_INTERVAL_SECONDS: i32 = 10;
/// `autoscaling.keda.idleSecondsBeforeZero` when unset (KEDA's default).
pub const KEDA_IDLE_SECONDS_BEFORE_ZERO: i32 = 300;
/// Name of the weights file inside a `pvc` or `image` volume when `weights.file` is unset.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Where the weights volume is mounted in the server container.
pub const WEIGHTS_DIR: &str = "/weights";
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

/// A contract default as an `i32` field value.
pub(crate) fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
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
pub fn behavior(user: Option<&ScalingBehavior>) -> HorizontalPodAutoscalerBehavior {
    HorizontalPodAutoscalerBehavior {
        scale_up: Some(overlay(
            default_scale_up(),
            user.and_then(|b| b.scale_up.as_ref()),
        )),
        scale_down: Some(overlay(
            default_scale_down(),
            user.and_then(|b| b.scale_down.as_ref()),
        )),
    }
}

/// Seconds the pod gets between SIGTERM-path start and SIGKILL: preStop
/// sleep, then the drain, then a margin.
pub fn termination_grace_seconds(serving: &EffectiveServing) -> i64 {
    i64::from(PRE_STOP_SLEEP_SECONDS + serving.drain_seconds + TERMINATION_MARGIN_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

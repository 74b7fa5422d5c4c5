//! The effective spec: an `HndsrService`'s spec with every default applied,
//! resolved and validated once per reconcile.
//!
//! [`resolve`] is the one place defaults are applied ([`crate::defaults`]
//! holds their values and derivation rules); validation, the builders and
//! the status all read the [`EffectiveSpec`] it returns, so a default can
//! never differ between what is checked, what is built and what is
//! reported (`status.serving` and `status.autoscaling` are its parts).

use hndsr_crds::{
    AutoscalingMetric, AutoscalingProvider, Backend, EffectiveAutoscaling, EffectiveServing,
    HndsrService, HndsrServiceSpec, Precision, PullPolicy, ScaleSchedule, ServingProfile,
    WeightsSpec,
};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::defaults::{self, to_i32};
use crate::validate::{self, InvalidSpec};

/// Where the server finds its weights, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveWeights {
    /// Path of the weights file inside the server container; `None` for
    /// bundled weights served as the image ships them (its own
    /// `HNDSR_WEIGHTS_PATH` holds), the image's realistic weights for
    /// bundled weights with profile `realistic`.
    pub path: Option<String>,
    /// For `weights.uri`: where the init container downloads the manifest
    /// from; `None` when it cannot be derived (validation refuses that).
    pub manifest_uri: Option<String>,
}

/// The PodDisruptionBudget's bound: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PdbBound {
    /// `minAvailable`.
    MinAvailable(IntOrString),
    /// `maxUnavailable`.
    MaxUnavailable(IntOrString),
}

/// The standby pool `prewarm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Standby {
    /// No standby pods.
    #[default]
    None,
    /// A fixed number.
    Replicas(i32),
    /// A percentage of the desired serving replicas, rounded up.
    Percent(i32),
}

/// Capacity placeholders `prewarm.placeholders` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePlaceholders {
    /// Placeholder pods, at least 1.
    pub replicas: i32,
    /// Their PriorityClass; `None`: the operator's
    /// `--placeholder-priority-class`.
    pub priority_class_name: Option<String>,
}

/// KEDA settings in force (provider `keda`).
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveKeda {
    /// ScaledObject `pollingInterval`.
    pub polling_interval_seconds: i32,
    /// ScaledObject `cooldownPeriod`.
    pub idle_seconds_before_zero: i32,
    /// Cron windows with a floor of serving pods.
    pub schedules: Vec<ScaleSchedule>,
}

/// The spec with defaults applied. Built by [`resolve`] (validated) or
/// [`EffectiveSpec::of`] (not validated: for reporting an invalid spec).
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveSpec {
    /// The backend the server runs.
    pub backend: Backend,
    /// Upscaling factor.
    pub scale: i32,
    /// Numeric precision in force: the spec's, else what the server picks
    /// itself (fp16 for `hndsr` on a GPU, where it scores as fp32; fp32
    /// otherwise).
    pub precision: Precision,
    /// Whether the spec sets the precision (else the server decides by the
    /// same rule, and the pod carries no variable for it).
    pub precision_set: bool,
    /// GPUs per pod (0: CPU serving).
    pub gpu: i32,
    /// Extended resource name of the GPU.
    pub gpu_resource_name: String,
    /// Device string for the server: `cuda` with a GPU, else `cpu`.
    pub device: &'static str,
    /// Image pull policy, if the spec sets one.
    pub image_pull_policy: Option<PullPolicy>,
    /// Where the weights come from; `None` without weights.
    pub weights: Option<EffectiveWeights>,
    /// Admission limits (`status.serving`).
    pub serving: EffectiveServing,
    /// Autoscaling in force; `None` when off (`status.autoscaling`).
    pub autoscaling: Option<EffectiveAutoscaling>,
    /// KEDA settings; `None` unless autoscaling is on with provider `keda`.
    pub keda: Option<EffectiveKeda>,
    /// The HPA behaviour: the defaults overlaid with the spec's fields.
    pub behavior: HorizontalPodAutoscalerBehavior,
    /// Replicas the Deployment gets when no autoscaler owns it.
    pub static_replicas: i32,
    /// The PodDisruptionBudget's bound; `None` when it is disabled.
    pub pdb: Option<PdbBound>,
    /// Seconds between the start of termination and SIGKILL: preStop sleep,
    /// drain, margin.
    pub termination_grace_seconds: i64,
    /// The standby pool.
    pub standby: Standby,
    /// Capacity placeholders; `None` without any.
    pub placeholders: Option<EffectivePlaceholders>,
}

/// Resolves and validates `svc`'s spec.
///
/// # Errors
/// Every problem of the spec, at once.
pub fn resolve(svc: &HndsrService) -> Result<EffectiveSpec, InvalidSpec> {
    let eff = EffectiveSpec::of(&svc.spec);
    validate::validate(svc, &eff)?;
    Ok(eff)
}

impl EffectiveSpec {
    /// Applies the defaults to `spec`. Total: an invalid spec still gets
    /// values (validation then says what is wrong).
    #[must_use]
    pub fn of(spec: &HndsrServiceSpec) -> Self {
        let gpu = spec
            .resources
            .as_ref()
            .and_then(|r| r.gpu)
            .unwrap_or(defaults::GPU);
        let backend = spec.model.backend;
        let serving = serving(spec);
        let termination_grace_seconds = defaults::termination_grace_seconds(&serving);
        Self {
            backend,
            scale: spec
                .model
                .scale
                .unwrap_or(to_i32(hndsr_contract::defaults::SCALE)),
            precision: spec
                .model
                .precision
                .unwrap_or(if gpu > 0 && backend == Backend::Hndsr {
                    Precision::Fp16
                } else {
                    Precision::Fp32
                }),
            precision_set: spec.model.precision.is_some(),
            gpu,
            gpu_resource_name: spec
                .resources
                .as_ref()
                .and_then(|r| r.gpu_resource_name.clone())
                .unwrap_or_else(|| defaults::GPU_RESOURCE_NAME.to_owned()),
            device: if gpu > 0 { "cuda" } else { "cpu" },
            image_pull_policy: spec.model.image_pull_policy,
            weights: spec
                .model
                .weights
                .as_ref()
                .map(|w| weights(w, spec.model.profile)),
            autoscaling: autoscaling(spec, &serving),
            keda: keda(spec),
            serving,
            behavior: defaults::behavior(
                spec.autoscaling.as_ref().and_then(|a| a.behavior.as_ref()),
            ),
            static_replicas: spec.replicas.unwrap_or(defaults::REPLICAS),
            pdb: pdb(spec),
            termination_grace_seconds,
            standby: standby(spec),
            placeholders: placeholders(spec),
        }
    }

    /// Whether an autoscaler (of either provider) owns the replica count.
    #[must_use]
    pub fn autoscaling_enabled(&self) -> bool {
        self.autoscaling.is_some()
    }

    /// The autoscaling provider, when autoscaling is on.
    #[must_use]
    pub fn provider(&self) -> Option<AutoscalingProvider> {
        self.autoscaling.as_ref().map(|a| a.provider)
    }

    /// Whether KEDA may scale the service to zero serving pods.
    #[must_use]
    pub fn scales_to_zero(&self) -> bool {
        self.keda.is_some()
            && self
                .autoscaling
                .as_ref()
                .is_some_and(|a| a.min_replicas == 0)
    }

    /// Standby replicas for `desired` serving replicas.
    #[must_use]
    pub fn standby_replicas(&self, desired: i32) -> i32 {
        match self.standby {
            Standby::None => 0,
            Standby::Replicas(n) => n,
            Standby::Percent(pct) => (desired.max(0) * pct + 99) / 100,
        }
    }
}

/// Admission limits with defaults from the contract.
fn serving(spec: &HndsrServiceSpec) -> EffectiveServing {
    use hndsr_contract::defaults as contract;
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

fn weights(w: &WeightsSpec, profile: Option<ServingProfile>) -> EffectiveWeights {
    use hndsr_contract::bundled;
    let path = if w.bundled == Some(true) {
        // The image ships one set of weights per kind of input; the
        // `realistic` profile serves the other one.
        (profile == Some(ServingProfile::Realistic))
            .then(|| format!("{}/{}", bundled::DIR, bundled::REALISTIC_WEIGHTS_FILE))
    } else {
        // A download is always saved under the default name.
        let file = match (&w.uri, &w.file) {
            (None, Some(file)) => file.as_str(),
            _ => defaults::WEIGHTS_FILE,
        };
        Some(format!("{}/{file}", defaults::WEIGHTS_DIR))
    };
    EffectiveWeights {
        path,
        manifest_uri: w.uri.is_some().then(|| defaults::manifest_uri(w)).flatten(),
    }
}

fn keda(spec: &HndsrServiceSpec) -> Option<EffectiveKeda> {
    let a = spec.autoscaling.as_ref()?;
    if !a.enabled.unwrap_or(true) || a.provider != Some(AutoscalingProvider::Keda) {
        return None;
    }
    let k = a.keda.clone().unwrap_or_default();
    Some(EffectiveKeda {
        polling_interval_seconds: k
            .polling_interval_seconds
            .unwrap_or(defaults::KEDA_POLLING_INTERVAL_SECONDS),
        idle_seconds_before_zero: k
            .idle_seconds_before_zero
            .unwrap_or(defaults::KEDA_IDLE_SECONDS_BEFORE_ZERO),
        schedules: k.schedules,
    })
}

fn autoscaling(
    spec: &HndsrServiceSpec,
    serving: &EffectiveServing,
) -> Option<EffectiveAutoscaling> {
    let a = spec.autoscaling.as_ref()?;
    if !a.enabled.unwrap_or(true) {
        return None;
    }
    let targets = a.target_per_pod.clone().unwrap_or_default();
    let metric = a.metric.unwrap_or(AutoscalingMetric::ActiveRequests);
    let uses_active = matches!(
        metric,
        AutoscalingMetric::ActiveRequests | AutoscalingMetric::Both
    );
    let uses_queue = matches!(
        metric,
        AutoscalingMetric::QueueDepth | AutoscalingMetric::Both
    );
    Some(EffectiveAutoscaling {
        provider: a.provider.unwrap_or(AutoscalingProvider::Hpa),
        min_replicas: a.min_replicas.unwrap_or(defaults::MIN_REPLICAS),
        max_replicas: a.max_replicas,
        target_active_requests: uses_active.then(|| {
            targets
                .active_requests
                .unwrap_or_else(|| defaults::default_active_target(serving))
        }),
        target_queue_depth: uses_queue.then(|| {
            targets
                .queue_depth
                .unwrap_or_else(|| defaults::default_queue_target(serving))
        }),
    })
}

fn pdb(spec: &HndsrServiceSpec) -> Option<PdbBound> {
    let d = spec.disruption.clone().unwrap_or_default();
    if !d.enabled.unwrap_or(true) {
        return None;
    }
    Some(match (d.min_available, d.max_unavailable) {
        (Some(min), _) => PdbBound::MinAvailable(min),
        (None, Some(max)) => PdbBound::MaxUnavailable(max),
        (None, None) => PdbBound::MaxUnavailable(IntOrString::Int(defaults::PDB_MAX_UNAVAILABLE)),
    })
}

fn placeholders(spec: &HndsrServiceSpec) -> Option<EffectivePlaceholders> {
    let p = spec.prewarm.as_ref()?.placeholders.as_ref()?;
    let replicas = p.replicas.unwrap_or(0);
    (replicas > 0).then(|| EffectivePlaceholders {
        replicas,
        priority_class_name: p.priority_class_name.clone(),
    })
}

fn standby(spec: &HndsrServiceSpec) -> Standby {
    let Some(p) = spec.prewarm.as_ref() else {
        return Standby::None;
    };
    match (p.standby_replicas, p.standby_percent) {
        (Some(n), _) => Standby::Replicas(n),
        (None, Some(pct)) => Standby::Percent(pct),
        (None, None) => Standby::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn eff(y: &str) -> EffectiveSpec {
        let spec: HndsrServiceSpec =
            serde_yaml::from_str(&format!("model:\n  image: x\n  backend: bicubic\n{y}")).unwrap();
        EffectiveSpec::of(&spec)
    }

    #[test]
    fn targets_derive_from_max_concurrent() {
        let q = |s: &str| Some(Quantity(s.to_owned()));
        let a = eff("autoscaling:\n  maxReplicas: 3\n  metric: both\n")
            .autoscaling
            .unwrap();
        assert_eq!(
            (a.target_active_requests, a.target_queue_depth),
            (q("3"), q("2"))
        );
        let a =
            eff("serving:\n  maxConcurrent: 1\nautoscaling:\n  maxReplicas: 3\n  metric: both\n")
                .autoscaling
                .unwrap();
        assert_eq!(
            (a.target_active_requests, a.target_queue_depth),
            (q("750m"), q("1"))
        );
        assert!(
            eff("autoscaling:\n  enabled: false\n  maxReplicas: 3\n")
                .autoscaling
                .is_none()
        );
        assert!(eff("").autoscaling.is_none());
    }

    #[test]
    fn behaviour_overlays_field_by_field() {
        let b = eff(
            "autoscaling:\n  maxReplicas: 3\n  behavior:\n    scaleDown:\n      stabilizationWindowSeconds: 60\n",
        )
        .behavior;
        let down = b.scale_down.unwrap();
        assert_eq!(down.stabilization_window_seconds, Some(60));
        assert_eq!(down.policies, defaults::default_scale_down().policies);
        assert_eq!(b.scale_up, Some(defaults::default_scale_up()));
    }

    #[test]
    fn standby_count_or_percent() {
        assert_eq!(eff("").standby_replicas(5), 0);
        assert_eq!(
            eff("prewarm:\n  standbyReplicas: 2\n").standby_replicas(5),
            2
        );
        assert_eq!(
            eff("prewarm:\n  standbyPercent: 25\n").standby_replicas(5),
            2
        );
        assert_eq!(
            eff("prewarm:\n  standbyPercent: 25\n").standby_replicas(0),
            0
        );
    }

    #[test]
    fn grace_covers_pre_stop_and_drain() {
        assert_eq!(
            eff("serving:\n  drainSeconds: 30\n").termination_grace_seconds,
            45
        );
    }

    #[test]
    fn weights_paths_and_the_derived_manifest() {
        let sha = "a".repeat(64);
        let w = |y: &str| eff(&format!("{y}    sha256: {sha}\n")).weights.unwrap();
        let pvc = w("  weights:\n    pvc:\n      claimName: c\n    file: m/w.safetensors\n");
        assert_eq!(pvc.path.as_deref(), Some("/weights/m/w.safetensors"));
        assert_eq!(pvc.manifest_uri, None);
        let uri = w("  weights:\n    uri: https://h/v1/w.safetensors\n");
        assert_eq!(uri.path.as_deref(), Some("/weights/model.safetensors"));
        assert_eq!(uri.manifest_uri.as_deref(), Some("https://h/v1/w.json"));
        let bundled = w("  weights:\n    bundled: true\n");
        assert_eq!(bundled.path, None);
        let quality = w("  profile: quality\n  weights:\n    bundled: true\n");
        assert_eq!(quality.path, None);
        let realistic = w("  profile: realistic\n  weights:\n    bundled: true\n");
        assert_eq!(
            realistic.path.as_deref(),
            Some("/opt/hndsr/models/hndsr-realistic.safetensors")
        );
        // Weights of the user's own are served as given, whatever the profile.
        let own = w("  profile: realistic\n  weights:\n    pvc:\n      claimName: c\n");
        assert_eq!(own.path.as_deref(), Some("/weights/model.safetensors"));
    }

    #[test]
    fn precision_follows_device_and_backend() {
        assert_eq!(eff("").precision, Precision::Fp32, "bicubic");
        let hndsr = |y: &str| {
            let spec: HndsrServiceSpec =
                serde_yaml::from_str(&format!("model:\n  image: x\n  backend: hndsr\n{y}"))
                    .unwrap();
            EffectiveSpec::of(&spec)
        };
        assert_eq!(hndsr("").precision, Precision::Fp16);
        assert!(!hndsr("").precision_set);
        assert_eq!(hndsr("resources:\n  gpu: 0\n").precision, Precision::Fp32);
    }
}

//! KEDA ScaledObject `<name>` (provider `keda`): the same per-pod metrics
//! the HPA path uses, read from Prometheus by KEDA's `prometheus` scaler,
//! plus a wake trigger for scale from zero and optional cron floors.
//!
//! KEDA makes and owns the HPA (`keda-hpa-<name>`) that scales between 1
//! and `maxReplicas`, and scales the Deployment between 0 and 1 itself from
//! the triggers' activity. At zero no pod reports a metric, so a request
//! could not wake the service by load alone: the operator's zero responder
//! answers it (503 + Retry-After) and sets `hndsr_operator_wake_requested`
//! for the service, which the wake trigger reads ([`crate::zero`]).

use std::collections::BTreeMap;

use hndsr_contract::metrics;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Ctx, common_labels};
use crate::effective::EffectiveKeda;
use crate::quantity;

/// Gauge the zero responder sets while a service at zero has been asked
/// for (labels [`WAKE_NAMESPACE_LABEL`], [`WAKE_SERVICE_LABEL`]).
pub const WAKE_METRIC: &str = "hndsr_operator_wake_requested";
/// Label of [`WAKE_METRIC`] naming the HndsrService's namespace. Not
/// `namespace`: Prometheus sets that from the operator pod's own.
pub const WAKE_NAMESPACE_LABEL: &str = "hndsr_namespace";
/// Label of [`WAKE_METRIC`] naming the HndsrService.
pub const WAKE_SERVICE_LABEL: &str = "hndsr_service";

/// `keda.sh/v1alpha1` ScaledObject: the fields the operator sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "keda.sh",
    version = "v1alpha1",
    kind = "ScaledObject",
    namespaced,
    status = "ScaledObjectStatus",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectSpec {
    /// What KEDA scales.
    pub scale_target_ref: ScaleTargetRef,
    /// Seconds between checks of the triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_interval: Option<i32>,
    /// Seconds without activity before scaling to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_period: Option<i32>,
    /// Fewest replicas (0 allows scale to zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replica_count: Option<i32>,
    /// Most replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replica_count: Option<i32>,
    /// The HPA KEDA makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced: Option<Advanced>,
    /// The scalers.
    pub triggers: Vec<Trigger>,
}

/// `spec.scaleTargetRef`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// The serving Deployment.
    pub name: String,
}

/// `spec.advanced`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Advanced {
    /// `spec.advanced.horizontalPodAutoscalerConfig`.
    pub horizontal_pod_autoscaler_config: HpaConfig,
}

/// `spec.advanced.horizontalPodAutoscalerConfig`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HpaConfig {
    /// Scale-up and scale-down behaviour of KEDA's HPA.
    pub behavior: HorizontalPodAutoscalerBehavior,
}

/// One entry of `spec.triggers`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// Scaler type: `prometheus` or `cron`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Trigger name (unique within the ScaledObject).
    pub name: String,
    /// `AverageValue` for the per-pod metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_type: Option<String>,
    /// The scaler's settings.
    pub metadata: BTreeMap<String, String>,
}

/// What KEDA reports: the conditions the operator reads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectStatus {
    /// `Ready`, `Active`, `Fallback`, `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ScaledObjectCondition>,
}

/// A KEDA condition (its `status` is a string).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// KEDA's scalers take plain numbers: a quantity like `2500m` becomes `2.5`.
fn plain_number(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> String {
    quantity::value(q).map_or_else(|| q.0.clone(), |v| format!("{v}"))
}

fn prometheus_trigger(name: &str, server: &str, query: String, threshold: String) -> Trigger {
    Trigger {
        type_: "prometheus".to_owned(),
        name: name.to_owned(),
        metric_type: Some("AverageValue".to_owned()),
        metadata: BTreeMap::from([
            ("serverAddress".to_owned(), server.to_owned()),
            ("query".to_owned(), query),
            ("threshold".to_owned(), threshold),
            // Active (and so woken from zero) as soon as any pod reports load.
            ("activationThreshold".to_owned(), "0".to_owned()),
        ]),
    }
}

/// The sum over the service's serving pods of a per-pod gauge; KEDA divides
/// it by the pod count (`AverageValue`), as the HPA path's Pods metric does.
fn sum_query(metric: &str, namespace: &str, name: &str) -> String {
    format!("sum({metric}{{namespace=\"{namespace}\",hndsr_io_service=\"{name}\"}})")
}

/// Only called when autoscaling is on with provider `keda`; `prometheus`
/// is the operator's `--keda-prometheus-url`.
pub(super) fn build(ctx: &Ctx<'_>, keda: &EffectiveKeda, prometheus: &str) -> ScaledObject {
    let (ns, name) = (ctx.namespace.as_str(), ctx.name.as_str());
    let mut triggers = Vec::new();
    let (min, max) = ctx
        .eff
        .autoscaling
        .as_ref()
        .map_or((0, 1), |a| (a.min_replicas, a.max_replicas));
    if let Some(a) = &ctx.eff.autoscaling {
        if let Some(t) = &a.target_active_requests {
            triggers.push(prometheus_trigger(
                "active-requests",
                prometheus,
                sum_query(metrics::ACTIVE_REQUESTS, ns, name),
                plain_number(t),
            ));
        }
        if let Some(t) = &a.target_queue_depth {
            triggers.push(prometheus_trigger(
                "queue-depth",
                prometheus,
                sum_query(metrics::QUEUE_DEPTH, ns, name),
                plain_number(t),
            ));
        }
    }
    if min == 0 {
        // 1 while a request waits at zero: threshold 1 asks for one pod, and
        // the load triggers take over once it serves.
        triggers.push(prometheus_trigger(
            "wake",
            prometheus,
            format!(
                "max({WAKE_METRIC}{{{WAKE_NAMESPACE_LABEL}=\"{ns}\",{WAKE_SERVICE_LABEL}=\"{name}\"}})"
            ),
            "1".to_owned(),
        ));
    }
    for (i, s) in keda.schedules.iter().enumerate() {
        triggers.push(Trigger {
            type_: "cron".to_owned(),
            name: format!("schedule-{i}"),
            metric_type: None,
            metadata: BTreeMap::from([
                ("timezone".to_owned(), s.timezone.clone()),
                ("start".to_owned(), s.start.clone()),
                ("end".to_owned(), s.end.clone()),
                ("desiredReplicas".to_owned(), s.replicas.to_string()),
            ]),
        });
    }
    let mut so = ScaledObject::new(
        name,
        ScaledObjectSpec {
            scale_target_ref: ScaleTargetRef {
                api_version: "apps/v1".to_owned(),
                kind: "Deployment".to_owned(),
                name: name.to_owned(),
            },
            polling_interval: Some(keda.polling_interval_seconds),
            cooldown_period: Some(keda.idle_seconds_before_zero),
            min_replica_count: Some(min),
            max_replica_count: Some(max),
            advanced: Some(Advanced {
                horizontal_pod_autoscaler_config: HpaConfig {
                    behavior: ctx.eff.behavior.clone(),
                },
            }),
            triggers,
        },
    );
    so.metadata = ctx.meta(common_labels(name));
    so
}

/// KEDA's `Ready` condition when it is `False`: its message.
#[must_use]
pub fn not_ready_message(so: &ScaledObject) -> Option<String> {
    let c = so
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (c.status == "False").then(|| {
        let reason = c.reason.as_deref().unwrap_or("");
        let message = c.message.as_deref().unwrap_or("");
        format!(
            "KEDA reports ScaledObject {} not ready: {reason}: {message}",
            so.metadata.name.as_deref().unwrap_or("")
        )
    })
}

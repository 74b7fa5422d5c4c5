//! HorizontalPodAutoscaler `<name>` (autoscaling/v2) on the server's own
//! per-pod metrics, served to the HPA by a custom-metrics adapter.

use hndsr_contract::metrics;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{Ctx, common_labels};
use crate::defaults;

fn pods_metric(name: &str, target: Quantity) -> MetricSpec {
    MetricSpec {
        type_: "Pods".to_owned(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.to_owned(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".to_owned(),
                average_value: Some(target),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }
}

/// Only called when autoscaling is on with provider `hpa`.
pub(super) fn build(ctx: &Ctx<'_>) -> HorizontalPodAutoscaler {
    let (min, max, active, queue) = match ctx.eff.autoscaling.clone() {
        Some(e) => (
            e.min_replicas,
            e.max_replicas,
            e.target_active_requests,
            e.target_queue_depth,
        ),
        None => (defaults::MIN_REPLICAS, defaults::MIN_REPLICAS, None, None),
    };
    let mut metric_specs = Vec::new();
    if let Some(t) = active {
        metric_specs.push(pods_metric(metrics::ACTIVE_REQUESTS, t));
    }
    if let Some(t) = queue {
        metric_specs.push(pods_metric(metrics::QUEUE_DEPTH, t));
    }
    HorizontalPodAutoscaler {
        metadata: ctx.meta(common_labels(&ctx.name)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: ctx.name.clone(),
            },
            min_replicas: Some(min),
            max_replicas: max,
            metrics: Some(metric_specs),
            behavior: Some(ctx.eff.behavior.clone()),
        },
        status: None,
    }
}

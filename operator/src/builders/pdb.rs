//! PodDisruptionBudget `<name>` over the serving pods.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Ctx, common_labels, serving_selector};
use crate::effective::PdbBound;

pub(super) fn build(ctx: &Ctx<'_>, bound: &PdbBound) -> PodDisruptionBudget {
    let (min_available, max_unavailable) = match bound {
        PdbBound::MinAvailable(min) => (Some(min.clone()), None),
        PdbBound::MaxUnavailable(max) => (None, Some(max.clone())),
    };
    PodDisruptionBudget {
        metadata: ctx.meta(common_labels(&ctx.name)),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(serving_selector(&ctx.name)),
                ..LabelSelector::default()
            }),
            min_available,
            max_unavailable,
            // A pod stuck loading or crash-looping must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
        }),
        status: None,
    }
}

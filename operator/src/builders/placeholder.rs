//! Deployment `<name>-placeholder`: capacity placeholders (prewarm).
//!
//! Pods that request exactly what a serving pod requests (its GPUs, CPU and
//! memory, on the same nodes) at a negative priority, doing nothing but
//! holding that room: a new serving pod preempts one and binds at once
//! instead of waiting for a node, and the evicted placeholder goes Pending,
//! which is the signal a cluster autoscaler adds a node for. They run the
//! serving image, so a node that held a placeholder has the image pulled.

use hndsr_crds::labels;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::deployment::{placed_pod_spec, resources, restricted_security_context};
use super::{BuildConfig, Ctx, placeholder_name, role_labels, role_selector};
use crate::effective::EffectivePlaceholders;

/// Name of the placeholder container.
pub const PLACEHOLDER_CONTAINER: &str = "placeholder";
/// What a placeholder runs: nothing, until it is preempted. `sleep` is in
/// every Debian-based image (the server image is one).
const IDLE_COMMAND: [&str; 2] = ["sleep", "infinity"];
/// A preempted placeholder should free its node at once.
const TERMINATION_GRACE_SECONDS: i64 = 1;

pub(super) fn build(ctx: &Ctx<'_>, cfg: &BuildConfig, p: &EffectivePlaceholders) -> Deployment {
    let spec = &ctx.svc.spec;
    let mut meta = ctx.meta(role_labels(&ctx.name, labels::ROLE_PLACEHOLDER));
    meta.name = Some(placeholder_name(&ctx.name));
    let selector = role_selector(&ctx.name, labels::ROLE_PLACEHOLDER);
    let pod = PodSpec {
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        priority_class_name: Some(
            p.priority_class_name
                .clone()
                .unwrap_or_else(|| cfg.placeholder_priority_class.clone()),
        ),
        containers: vec![Container {
            name: PLACEHOLDER_CONTAINER.to_owned(),
            image: Some(spec.model.image.clone()),
            image_pull_policy: ctx.eff.image_pull_policy.map(|p| p.as_str().to_owned()),
            command: Some(IDLE_COMMAND.iter().map(|&s| s.to_owned()).collect()),
            resources: Some(resources(ctx)),
            security_context: Some(restricted_security_context()),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        }],
        ..placed_pod_spec(ctx)
    };
    Deployment {
        metadata: meta,
        spec: DeploymentSpec {
            replicas: Some(p.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // A surge pod would only wait for the room its predecessor holds.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_owned()),
                rolling_update: None,
            }),
            revision_history_limit: Some(1),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(role_labels(&ctx.name, labels::ROLE_PLACEHOLDER)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

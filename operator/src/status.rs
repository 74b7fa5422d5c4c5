//! Pure status computation: from the spec, the build result and the
//! observed children to `HndsrServiceStatus` with `Ready`, `Progressing`
//! and `Degraded` conditions.
//!
//! [`compute`] is deterministic, and a condition keeps its
//! `lastTransitionTime` while its status does not change, so for an
//! unchanged world it returns exactly the previous status and the
//! controller can skip the write (zero API writes in steady state).

use hndsr_crds::conditions::{self, reasons};
use hndsr_crds::{AutoscalingProvider, HndsrService, HndsrServiceStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::builders::{
    Children, InvalidSpec, ScaledObject, not_ready_message, serving_selector_string,
};
use crate::effective::EffectiveSpec;
use crate::standby;

/// The children as read from the API server (or a cache).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Deployment `<name>`, if it exists.
    pub deployment: Option<Deployment>,
    /// HorizontalPodAutoscaler `<name>`, if it exists.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// The serving pods (selected by the serving selector).
    pub pods: Vec<Pod>,
    /// The standby pods (prewarm).
    pub standby_pods: Vec<Pod>,
    /// The prewarm Deployments that exist (standby, placeholders).
    pub prewarm_deployments: Vec<Deployment>,
    /// Provider `keda`: the ScaledObject `<name>`, if it exists.
    pub scaled_object: Option<ScaledObject>,
    /// Provider `keda`: the API server has no `keda.sh` ScaledObject API.
    pub keda_missing: bool,
}

/// Container waiting reasons that mean "this will not fix itself soon".
const FAILING_WAIT_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// What the pods say, counted once.
#[derive(Debug, Default)]
struct PodSummary {
    /// Unschedulable for lack of the GPU resource.
    gpu_pending: usize,
    /// Unschedulable for another reason; first scheduler message.
    unschedulable: usize,
    unschedulable_msg: Option<String>,
    /// Crash-looping or failing to pull; first `pod: reason` seen.
    failing: usize,
    failing_msg: Option<String>,
    /// Scheduled, not failing, not ready: loading or warming up the model.
    loading: usize,
}

fn summarize(pods: &[Pod], gpu_resource: &str) -> PodSummary {
    let mut s = PodSummary::default();
    let needle = format!("Insufficient {gpu_resource}");
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = pod.metadata.name.as_deref().unwrap_or("");
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        let conds = status.conditions.as_deref().unwrap_or_default();
        let unsched = conds.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(c) = unsched {
            let msg = c.message.as_deref().unwrap_or("");
            if msg.contains(&needle) {
                s.gpu_pending += 1;
            } else {
                s.unschedulable += 1;
                s.unschedulable_msg.get_or_insert_with(|| msg.to_owned());
            }
            continue;
        }
        let waiting = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .filter_map(|cs| cs.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
            .find(|r| FAILING_WAIT_REASONS.contains(r));
        if let Some(reason) = waiting {
            s.failing += 1;
            s.failing_msg
                .get_or_insert_with(|| format!("pod {name}: {reason}"));
            continue;
        }
        let ready = conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let scheduled = conds
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True");
        if scheduled && !ready {
            s.loading += 1;
        }
    }
    s
}

/// A condition before timestamps are settled.
struct Cond {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn cond(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> Cond {
    Cond {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

/// Whether the HPA says it wants more than `maxReplicas`.
fn scaling_limited(hpa: &HorizontalPodAutoscaler) -> bool {
    let Some(status) = hpa.status.as_ref() else {
        return false;
    };
    let max = hpa.spec.max_replicas;
    let by_condition = status.conditions.iter().flatten().any(|c| {
        c.type_ == "ScalingLimited"
            && c.status == "True"
            && c.reason.as_deref() == Some("TooManyReplicas")
    });
    by_condition || status.desired_replicas > max
}

/// Computes the status of `svc`.
///
/// `resolved` is the effective spec ([`crate::effective::resolve`]) and
/// the children [`crate::builders::desired`] built from it, or why the spec
/// is invalid; `now` stamps conditions whose status changed since
/// `svc.status`.
pub fn compute(
    svc: &HndsrService,
    resolved: Result<(&EffectiveSpec, &Children), &InvalidSpec>,
    observed: &Observed,
    now: jiff::Timestamp,
) -> HndsrServiceStatus {
    let prev = svc.status.clone().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let dep_status = observed
        .deployment
        .as_ref()
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let replicas = dep_status.replicas.unwrap_or(0);
    let ready = dep_status.ready_replicas.unwrap_or(0);
    let updated = dep_status.updated_replicas.unwrap_or(0);

    let mut status = HndsrServiceStatus {
        observed_generation: svc.metadata.generation,
        conditions: Vec::new(),
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        standby_replicas: Some(standby::ready_count(&observed.standby_pods)),
        desired_replicas: prev.desired_replicas,
        endpoint: prev.endpoint.clone(),
        selector: Some(serving_selector_string(name)),
        serving: prev.serving.clone(),
        autoscaling: prev.autoscaling.clone(),
    };

    let conds = match resolved {
        Err(invalid) => {
            let msg = format!("invalid spec, nothing changed until it is fixed: {invalid}");
            vec![
                cond(conditions::READY, false, reasons::INVALID_SPEC, msg.clone()),
                cond(
                    conditions::PROGRESSING,
                    false,
                    reasons::INVALID_SPEC,
                    msg.clone(),
                ),
                cond(conditions::DEGRADED, true, reasons::INVALID_SPEC, msg),
            ]
        }
        Ok((eff, children)) => {
            status.endpoint = Some(children.endpoint.clone());
            status.serving = Some(eff.serving.clone());
            status.autoscaling = eff.autoscaling.clone();
            let want = want_replicas(eff, observed);
            status.desired_replicas = Some(want);
            let facts = Facts::new(eff, children, observed, want, &dep_status);
            vec![
                ready_condition(&facts),
                progressing_condition(&facts),
                degraded_condition(&facts),
            ]
        }
    };

    status.conditions = conds
        .into_iter()
        .map(|c| {
            let status_str = if c.status { "True" } else { "False" };
            let last = prev
                .conditions
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status_str)
                .map_or_else(|| Time(now), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status_str.to_owned(),
                reason: c.reason.to_owned(),
                message: c.message,
                observed_generation: svc.metadata.generation,
                last_transition_time: last,
            }
        })
        .collect();
    status
}

/// Serving replicas wanted now: the HPA's decision, else the Deployment's
/// spec, else the static count.
#[must_use]
pub fn want_replicas(eff: &EffectiveSpec, observed: &Observed) -> i32 {
    let Some(autoscaling) = &eff.autoscaling else {
        return eff.static_replicas;
    };
    let min = autoscaling.min_replicas;
    // A new HPA reports desiredReplicas 0 until its first evaluation;
    // that is "not decided yet", not "scale to zero".
    let hpa_desired = observed
        .hpa
        .as_ref()
        .and_then(|h| h.status.as_ref())
        .map(|s| s.desired_replicas)
        .filter(|d| *d > 0 || min == 0);
    if let Some(d) = hpa_desired {
        return d;
    }
    if let Some(r) = observed.deployment.as_ref().and_then(|d| d.spec.replicas) {
        return r;
    }
    min
}

/// What the conditions are decided from, gathered once.
struct Facts<'a> {
    want: i32,
    ready: i32,
    replicas: i32,
    updated: i32,
    pods: PodSummary,
    gpu_name: &'a str,
    /// The Deployment exists.
    deployment: bool,
    /// A new template or replica count is still rolling out.
    rolling: bool,
    /// Observed state matches the spec.
    converged: bool,
    /// The Deployment reports `ProgressDeadlineExceeded`.
    deadline_exceeded: bool,
    /// The ReplicaSet controller could not create serving pods: what to
    /// tell the user.
    creation_failure: Option<String>,
    /// The same for the standby or placeholder Deployment.
    prewarm_failure: Option<String>,
    /// The HPA wants more than `maxReplicas`.
    limited: bool,
    /// Provider `keda` cannot scale (or wake) the service: reason, message.
    autoscaler_problem: Option<(&'static str, String)>,
    /// KEDA may scale to zero and a responder answers there.
    zero_responder: bool,
    /// Standby pods wanted, ready, and pending for lack of GPUs.
    standby_wanted: i32,
    standby_ready: i32,
    standby_gpu_pending: usize,
}

impl<'a> Facts<'a> {
    fn new(
        eff: &'a EffectiveSpec,
        children: &Children,
        observed: &Observed,
        want: i32,
        dep_status: &k8s_openapi::api::apps::v1::DeploymentStatus,
    ) -> Self {
        let replicas = dep_status.replicas.unwrap_or(0);
        let ready = dep_status.ready_replicas.unwrap_or(0);
        let updated = dep_status.updated_replicas.unwrap_or(0);
        let dep = observed.deployment.as_ref();
        let dep_lagging = dep.is_some_and(|d| {
            let generation = d.metadata.generation.unwrap_or(0);
            let seen = d
                .status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .unwrap_or(0);
            seen < generation
        });
        let dep_conditions = dep
            .and_then(|d| d.status.as_ref()?.conditions.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let deadline_exceeded = dep_conditions.iter().any(|c| {
            c.type_.as_deref() == Some("Progressing")
                && c.status.as_deref() == Some("False")
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        // Nothing else will show (there are no pods to look at), so the
        // condition quotes its message.
        let creation_failure = dep_conditions
            .iter()
            .find(|c| {
                c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True")
            })
            .map(|c| c.message.clone().unwrap_or_default())
            .map(|m| format!("pods cannot be created: {m}"));
        let rolling = dep_lagging || updated < want || replicas > updated;
        Self {
            want,
            ready,
            replicas,
            updated,
            pods: summarize(&observed.pods, &eff.gpu_resource_name),
            gpu_name: &eff.gpu_resource_name,
            deployment: dep.is_some(),
            rolling,
            converged: dep.is_some() && !rolling && ready >= want && replicas == want,
            deadline_exceeded,
            creation_failure,
            prewarm_failure: prewarm_creation_failure(&observed.prewarm_deployments),
            limited: observed.hpa.as_ref().is_some_and(scaling_limited),
            autoscaler_problem: autoscaler_problem(eff, children, observed),
            zero_responder: children.zero_slice.is_some(),
            standby_wanted: eff.standby_replicas(want),
            standby_ready: standby::ready_count(&observed.standby_pods),
            standby_gpu_pending: summarize(&observed.standby_pods, &eff.gpu_resource_name)
                .gpu_pending,
        }
    }

    fn gpu_msg(&self) -> String {
        format!(
            "{} pod(s) pending: no node has a free {}; add GPU nodes or lower resources.gpu",
            self.pods.gpu_pending, self.gpu_name
        )
    }

    fn unschedulable_msg(&self) -> String {
        format!(
            "{} pod(s) cannot be scheduled: {}",
            self.pods.unschedulable,
            self.pods.unschedulable_msg.as_deref().unwrap_or("")
        )
    }

    fn failing_msg(&self) -> String {
        format!(
            "{} pod(s) failing ({}); see the pod's events and logs",
            self.pods.failing,
            self.pods.failing_msg.as_deref().unwrap_or("")
        )
    }

    fn loading_msg(&self) -> String {
        format!(
            "{} pod(s) loading and warming up the model",
            self.pods.loading
        )
    }
}

/// Why provider `keda` cannot scale the service, if it cannot.
fn autoscaler_problem(
    eff: &EffectiveSpec,
    children: &Children,
    observed: &Observed,
) -> Option<(&'static str, String)> {
    if eff.provider() != Some(AutoscalingProvider::Keda) {
        return None;
    }
    if children.scaled_object.is_none() {
        return Some((
            reasons::KEDA_NOT_CONFIGURED,
            "provider keda needs the operator's --keda-prometheus-url (chart value \
             keda.prometheusUrl); no ScaledObject was created and nothing scales this service"
                .to_owned(),
        ));
    }
    if eff.scales_to_zero() && children.zero_slice.is_none() {
        return Some((
            reasons::KEDA_NOT_CONFIGURED,
            "minReplicas 0 needs the operator's zero responder address (--zero-responder-ip, \
             or POD_IP in the chart); without it a client at zero gets a refused connection"
                .to_owned(),
        ));
    }
    if observed.keda_missing {
        return Some((
            reasons::KEDA_NOT_INSTALLED,
            "the cluster has no KEDA (no keda.sh/v1alpha1 ScaledObject API): install KEDA \
             v2.21 or use provider hpa"
                .to_owned(),
        ));
    }
    observed
        .scaled_object
        .as_ref()
        .and_then(not_ready_message)
        .map(|m| (reasons::AUTOSCALER_NOT_READY, m))
}

/// A standby or placeholder Deployment that cannot create its pods (a
/// missing PriorityClass, a quota): its name and the ReplicaSet's message.
fn prewarm_creation_failure(deployments: &[Deployment]) -> Option<String> {
    deployments.iter().find_map(|d| {
        let c = d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
            c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True")
        })?;
        Some(format!(
            "Deployment {} cannot create pods: {}",
            d.metadata.name.as_deref().unwrap_or(""),
            c.message.as_deref().unwrap_or("")
        ))
    })
}

/// Ready: does the Service have somewhere to send requests?
fn ready_condition(f: &Facts<'_>) -> Cond {
    let (want, ready) = (f.want, f.ready);
    let (status, reason, message) = if want == 0 && ready == 0 {
        let message = if f.zero_responder {
            "scaled to zero serving pods; a request gets 503 + Retry-After and wakes the service"
        } else {
            "scaled to zero serving pods"
        };
        (false, reasons::SCALED_TO_ZERO, message.to_owned())
    } else if ready >= want.max(1) {
        (
            true,
            reasons::AVAILABLE,
            format!("{ready}/{want} serving pods ready"),
        )
    } else if ready > 0 {
        (
            true,
            reasons::PARTIALLY_AVAILABLE,
            format!("{ready}/{want} serving pods ready"),
        )
    } else if !f.deployment {
        (
            false,
            reasons::CREATING,
            "creating the Deployment".to_owned(),
        )
    } else if f.pods.gpu_pending > 0 {
        (false, reasons::WAITING_FOR_GPU_CAPACITY, f.gpu_msg())
    } else if f.pods.unschedulable > 0 {
        (false, reasons::UNSCHEDULABLE, f.unschedulable_msg())
    } else if f.pods.failing > 0 {
        (false, reasons::POD_FAILING, f.failing_msg())
    } else if f.pods.loading > 0 {
        (false, reasons::LOADING_MODEL, f.loading_msg())
    } else {
        (
            false,
            reasons::UNAVAILABLE,
            format!("0/{want} serving pods ready"),
        )
    };
    cond(conditions::READY, status, reason, message)
}

/// Progressing: is capacity or a new template on its way?
fn progressing_condition(f: &Facts<'_>) -> Cond {
    let standby_short = f.standby_ready < f.standby_wanted;
    let (status, reason, message) = if f.converged && standby_short && f.standby_gpu_pending > 0 {
        (
            true,
            reasons::STANDBY_WAITING_FOR_GPU_CAPACITY,
            format!(
                "{}/{} standby pods ready; {} pending: no node has a free {}",
                f.standby_ready, f.standby_wanted, f.standby_gpu_pending, f.gpu_name
            ),
        )
    } else if f.converged && standby_short {
        (
            true,
            reasons::FILLING_STANDBY,
            format!(
                "{}/{} standby pods ready",
                f.standby_ready, f.standby_wanted
            ),
        )
    } else if f.converged {
        (
            false,
            reasons::RECONCILED,
            "observed state matches the spec".to_owned(),
        )
    } else if !f.deployment {
        (
            true,
            reasons::CREATING,
            "creating the Deployment".to_owned(),
        )
    } else if f.pods.gpu_pending > 0 {
        (true, reasons::WAITING_FOR_GPU_CAPACITY, f.gpu_msg())
    } else if f.rolling {
        (
            true,
            reasons::ROLLING_OUT,
            format!(
                "{}/{} pods updated, {} running",
                f.updated, f.want, f.replicas
            ),
        )
    } else if f.pods.loading > 0 {
        (true, reasons::LOADING_MODEL, f.loading_msg())
    } else {
        (
            true,
            reasons::ROLLING_OUT,
            format!("scaling to {} serving pods, {} ready", f.want, f.ready),
        )
    };
    cond(conditions::PROGRESSING, status, reason, message)
}

/// Degraded: does a human need to act?
fn degraded_condition(f: &Facts<'_>) -> Cond {
    let down = f.want > 0 && f.ready == 0;
    let (status, reason, message) = if f.pods.failing > 0 {
        (true, reasons::POD_FAILING, f.failing_msg())
    } else if let Some(message) = &f.creation_failure {
        (true, reasons::POD_CREATION_FAILED, message.clone())
    } else if down && f.pods.gpu_pending > 0 {
        (true, reasons::WAITING_FOR_GPU_CAPACITY, f.gpu_msg())
    } else if down && f.pods.unschedulable > 0 {
        (true, reasons::UNSCHEDULABLE, f.unschedulable_msg())
    } else if f.deadline_exceeded {
        (
            true,
            reasons::ROLLING_OUT,
            "the rollout exceeded its progress deadline; check the new pods".to_owned(),
        )
    } else if f.limited {
        (
            true,
            reasons::SCALING_LIMITED,
            "load needs more than autoscaling.maxReplicas pods; raise maxReplicas or expect 503s"
                .to_owned(),
        )
    } else if let Some(message) = &f.prewarm_failure {
        (true, reasons::POD_CREATION_FAILED, message.clone())
    } else if let Some((reason, message)) = &f.autoscaler_problem {
        (true, *reason, message.clone())
    } else {
        (false, reasons::HEALTHY, "no problem detected".to_owned())
    };
    cond(conditions::DEGRADED, status, reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::{BuildConfig, resolve_and_build};
    use hndsr_crds::conditions::{DEGRADED, PROGRESSING, READY};
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::autoscaling::v2::{
        HorizontalPodAutoscalerCondition, HorizontalPodAutoscalerSpec,
        HorizontalPodAutoscalerStatus,
    };
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(extra: &str) -> HndsrService {
        let y = format!(
            "apiVersion: hndsr.io/v1alpha1\nkind: HndsrService\nmetadata:\n  name: sr\n  namespace: ml\n  uid: u1\n  generation: 3\nspec:\n  model:\n    image: img\n    backend: bicubic\n{extra}"
        );
        serde_yaml::from_str(&y).unwrap()
    }

    fn t(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    fn deployment(want: i32, replicas: i32, updated: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: DeploymentSpec {
                replicas: Some(want),
                ..DeploymentSpec::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn pod(name: &str, conds: &[(&str, &str, Option<&str>, Option<&str>)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                conditions: Some(
                    conds
                        .iter()
                        .map(|(ty, st, reason, msg)| PodCondition {
                            type_: (*ty).to_owned(),
                            status: (*st).to_owned(),
                            reason: reason.map(str::to_owned),
                            message: msg.map(str::to_owned),
                            ..PodCondition::default()
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }

    fn gpu_pending(name: &str) -> Pod {
        pod(
            name,
            &[(
                "PodScheduled",
                "False",
                Some("Unschedulable"),
                Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            )],
        )
    }

    fn loading(name: &str) -> Pod {
        pod(
            name,
            &[
                ("PodScheduled", "True", None, None),
                ("Ready", "False", None, None),
            ],
        )
    }

    fn run(s: &HndsrService, observed: &Observed, now: i64) -> HndsrServiceStatus {
        let d = resolve_and_build(s, &BuildConfig::default());
        compute(s, d.as_ref().map(|(e, c)| (e, c)), observed, t(now))
    }

    fn get<'a>(st: &'a HndsrServiceStatus, ty: &str) -> &'a Condition {
        st.conditions.iter().find(|c| c.type_ == ty).unwrap()
    }

    fn summary(st: &HndsrServiceStatus) -> Vec<(String, String, String)> {
        st.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn s3(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.to_owned(), b.to_owned(), c.to_owned())
    }

    #[test]
    fn no_deployment_yet_is_creating() {
        let s = svc("");
        let st = run(&s, &Observed::default(), 10);
        assert_eq!(
            summary(&st),
            [
                s3(READY, "False", reasons::CREATING),
                s3(PROGRESSING, "True", reasons::CREATING),
                s3(DEGRADED, "False", reasons::HEALTHY),
            ]
        );
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(
            st.endpoint.as_deref(),
            Some("http://sr.ml.svc.cluster.local")
        );
        assert_eq!(
            st.selector.as_deref(),
            Some("hndsr.io/role=serving,hndsr.io/service=sr")
        );
        assert_eq!(st.serving.as_ref().unwrap().max_concurrent, 4);
        assert!(
            st.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn gpu_shortage_is_reported() {
        let s = svc("");
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 0)),
            pods: vec![gpu_pending("sr-a")],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(
            summary(&st),
            [
                s3(READY, "False", reasons::WAITING_FOR_GPU_CAPACITY),
                s3(PROGRESSING, "True", reasons::WAITING_FOR_GPU_CAPACITY),
                s3(DEGRADED, "True", reasons::WAITING_FOR_GPU_CAPACITY),
            ]
        );
        assert!(get(&st, READY).message.contains("nvidia.com/gpu"));
    }

    #[test]
    fn other_unschedulable_is_not_gpu() {
        let s = svc("");
        let p = pod(
            "sr-a",
            &[(
                "PodScheduled",
                "False",
                Some("Unschedulable"),
                Some("node(s) didn't match node selector"),
            )],
        );
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 0)),
            pods: vec![p],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(get(&st, READY).reason, reasons::UNSCHEDULABLE);
        assert_eq!(get(&st, DEGRADED).reason, reasons::UNSCHEDULABLE);
    }

    #[test]
    fn loading_then_ready_keeps_transition_times_stable() {
        let mut s = svc("");
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 0)),
            pods: vec![loading("sr-a")],
            ..Observed::default()
        };
        let st1 = run(&s, &obs, 10);
        assert_eq!(get(&st1, READY).reason, reasons::LOADING_MODEL);
        assert_eq!(get(&st1, PROGRESSING).reason, reasons::LOADING_MODEL);
        s.status = Some(st1.clone());

        // Same world later: identical status, so no write.
        let again = run(&s, &obs, 20);
        assert_eq!(again, st1);

        // Pod becomes ready: Ready flips and gets a new time; Degraded keeps its own.
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 1)),
            ..Observed::default()
        };
        let st2 = run(&s, &obs, 30);
        assert_eq!(
            summary(&st2),
            [
                s3(READY, "True", reasons::AVAILABLE),
                s3(PROGRESSING, "False", reasons::RECONCILED),
                s3(DEGRADED, "False", reasons::HEALTHY),
            ]
        );
        assert_eq!(get(&st2, READY).last_transition_time, Time(t(30)));
        assert_eq!(get(&st2, DEGRADED).last_transition_time, Time(t(10)));
        s.status = Some(st2.clone());
        assert_eq!(run(&s, &obs, 40), st2);
    }

    #[test]
    fn rollout_in_progress() {
        let s = svc("  replicas: 2\n");
        let mut dep = deployment(2, 3, 1, 2);
        dep.metadata.generation = Some(3);
        let obs = Observed {
            deployment: Some(dep),
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(
            summary(&st),
            [
                s3(READY, "True", reasons::AVAILABLE),
                s3(PROGRESSING, "True", reasons::ROLLING_OUT),
                s3(DEGRADED, "False", reasons::HEALTHY),
            ]
        );
    }

    /// The condition a ReplicaSet that cannot create pods puts on its
    /// Deployment.
    fn replica_failure(message: &str) -> k8s_openapi::api::apps::v1::DeploymentCondition {
        k8s_openapi::api::apps::v1::DeploymentCondition {
            type_: Some("ReplicaFailure".into()),
            status: Some("True".into()),
            reason: Some("FailedCreate".into()),
            message: Some(message.into()),
            ..Default::default()
        }
    }

    #[test]
    fn pods_that_cannot_be_created_are_degraded() {
        let s = svc("  replicas: 2\n");
        let mut dep = deployment(2, 0, 0, 0);
        dep.status.as_mut().unwrap().conditions = Some(vec![replica_failure(
            "pods \"sr-abc\" is forbidden: exceeded quota: gpus",
        )]);
        let obs = Observed {
            deployment: Some(dep),
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        let degraded = get(&st, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", reasons::POD_CREATION_FAILED)
        );
        assert!(
            degraded.message.contains("exceeded quota: gpus"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn a_placeholder_deployment_that_cannot_create_pods_is_degraded() {
        let s = svc("  prewarm:\n    placeholders:\n      replicas: 1\n");
        let mut placeholders = deployment(1, 0, 0, 0);
        placeholders.metadata.name = Some("sr-placeholder".into());
        placeholders.status.as_mut().unwrap().conditions = Some(vec![replica_failure(
            "no PriorityClass with name hndsr-placeholder was found",
        )]);
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 1)),
            prewarm_deployments: vec![placeholders],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(get(&st, READY).status, "True", "serving is not affected");
        let degraded = get(&st, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", reasons::POD_CREATION_FAILED)
        );
        assert!(
            degraded.message.contains("sr-placeholder")
                && degraded.message.contains("no PriorityClass"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn partially_available_while_scaling() {
        let s = svc("  replicas: 3\n");
        let obs = Observed {
            deployment: Some(deployment(3, 3, 3, 1)),
            pods: vec![loading("b"), loading("c")],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(get(&st, READY).reason, reasons::PARTIALLY_AVAILABLE);
        assert_eq!(get(&st, READY).status, "True");
        assert_eq!(get(&st, PROGRESSING).reason, reasons::LOADING_MODEL);
    }

    #[test]
    fn crash_loop_is_degraded() {
        use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};
        let s = svc("");
        let mut p = loading("sr-a");
        p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: "server".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: None,
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 0)),
            pods: vec![p],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(get(&st, READY).reason, reasons::POD_FAILING);
        assert_eq!(get(&st, DEGRADED).reason, reasons::POD_FAILING);
        assert!(get(&st, DEGRADED).message.contains("CrashLoopBackOff"));
    }

    #[test]
    fn scaling_limited_from_hpa() {
        let s = svc("  autoscaling:\n    maxReplicas: 3\n");
        let hpa = HorizontalPodAutoscaler {
            spec: HorizontalPodAutoscalerSpec {
                max_replicas: 3,
                ..Default::default()
            },
            status: Some(HorizontalPodAutoscalerStatus {
                current_replicas: Some(3),
                desired_replicas: 3,
                conditions: Some(vec![HorizontalPodAutoscalerCondition {
                    type_: "ScalingLimited".into(),
                    status: "True".into(),
                    reason: Some("TooManyReplicas".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let obs = Observed {
            deployment: Some(deployment(3, 3, 3, 3)),
            hpa: Some(hpa.clone()),
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(st.desired_replicas, Some(3));
        assert_eq!(get(&st, READY).reason, reasons::AVAILABLE);
        assert_eq!(get(&st, DEGRADED).reason, reasons::SCALING_LIMITED);

        // TooFewReplicas (idle at minReplicas) is normal, not degraded.
        let mut idle = hpa;
        idle.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].reason =
            Some("TooFewReplicas".into());
        let obs = Observed {
            hpa: Some(idle),
            ..obs
        };
        assert_eq!(get(&run(&s, &obs, 10), DEGRADED).reason, reasons::HEALTHY);
    }

    #[test]
    fn fresh_hpa_is_not_scale_to_zero() {
        let s = svc("  autoscaling:\n    minReplicas: 2\n    maxReplicas: 3\n");
        let hpa = HorizontalPodAutoscaler {
            spec: HorizontalPodAutoscalerSpec {
                max_replicas: 3,
                ..Default::default()
            },
            status: Some(HorizontalPodAutoscalerStatus::default()),
            ..Default::default()
        };
        let obs = Observed {
            deployment: Some(deployment(2, 2, 2, 2)),
            hpa: Some(hpa),
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(st.desired_replicas, Some(2));
        assert_eq!(get(&st, READY).reason, reasons::AVAILABLE);
    }

    #[test]
    fn invalid_spec_keeps_previous_values() {
        let mut s = svc("  autoscaling:\n    minReplicas: 5\n    maxReplicas: 3\n");
        s.status = Some(HndsrServiceStatus {
            endpoint: Some("http://old".into()),
            ..HndsrServiceStatus::default()
        });
        let st = run(&s, &Observed::default(), 10);
        assert_eq!(
            summary(&st),
            [
                s3(READY, "False", reasons::INVALID_SPEC),
                s3(PROGRESSING, "False", reasons::INVALID_SPEC),
                s3(DEGRADED, "True", reasons::INVALID_SPEC),
            ]
        );
        assert!(get(&st, DEGRADED).message.contains("minReplicas"));
        assert_eq!(st.endpoint.as_deref(), Some("http://old"));
    }

    fn run_with(
        s: &HndsrService,
        cfg: &BuildConfig,
        observed: &Observed,
        now: i64,
    ) -> HndsrServiceStatus {
        let d = resolve_and_build(s, cfg);
        compute(s, d.as_ref().map(|(e, c)| (e, c)), observed, t(now))
    }

    fn keda_config() -> BuildConfig {
        BuildConfig {
            keda_prometheus_url: Some("http://prometheus:9090".into()),
            zero_responder: Some("10.0.0.9:8082".parse().unwrap()),
            ..BuildConfig::default()
        }
    }

    const KEDA_ZERO: &str =
        "  autoscaling:\n    minReplicas: 0\n    maxReplicas: 3\n    provider: keda\n";

    #[test]
    fn keda_at_zero_is_scaled_to_zero_and_healthy() {
        let s = svc(KEDA_ZERO);
        let obs = Observed {
            deployment: Some(deployment(0, 0, 0, 0)),
            ..Observed::default()
        };
        let st = run_with(&s, &keda_config(), &obs, 10);
        assert_eq!(st.desired_replicas, Some(0));
        assert_eq!(get(&st, READY).reason, reasons::SCALED_TO_ZERO);
        assert!(
            get(&st, READY).message.contains("503"),
            "{}",
            get(&st, READY).message
        );
        assert_eq!(get(&st, PROGRESSING).reason, reasons::RECONCILED);
        assert_eq!(get(&st, DEGRADED).reason, reasons::HEALTHY);
    }

    #[test]
    fn keda_without_what_it_needs_is_degraded_and_says_what() {
        let s = svc(KEDA_ZERO);
        let obs = Observed {
            deployment: Some(deployment(0, 0, 0, 0)),
            ..Observed::default()
        };
        // No --keda-prometheus-url.
        let st = run(&s, &obs, 10);
        assert_eq!(get(&st, DEGRADED).reason, reasons::KEDA_NOT_CONFIGURED);
        assert!(get(&st, DEGRADED).message.contains("--keda-prometheus-url"));
        // No responder address for scale to zero.
        let no_responder = BuildConfig {
            zero_responder: None,
            ..keda_config()
        };
        let st = run_with(&s, &no_responder, &obs, 10);
        assert_eq!(get(&st, DEGRADED).reason, reasons::KEDA_NOT_CONFIGURED);
        assert!(get(&st, DEGRADED).message.contains("refused connection"));
        // No KEDA in the cluster.
        let missing = Observed {
            keda_missing: true,
            ..obs.clone()
        };
        let st = run_with(&s, &keda_config(), &missing, 10);
        assert_eq!(get(&st, DEGRADED).reason, reasons::KEDA_NOT_INSTALLED);
        // KEDA cannot evaluate a trigger.
        let so: ScaledObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": "sr", "namespace": "ml"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sr"}, "triggers": []},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed",
                                       "message": "prometheus: connection refused"}]}
        }))
        .unwrap();
        let failing = Observed {
            scaled_object: Some(so),
            ..obs
        };
        let st = run_with(&s, &keda_config(), &failing, 10);
        assert_eq!(get(&st, DEGRADED).reason, reasons::AUTOSCALER_NOT_READY);
        assert!(get(&st, DEGRADED).message.contains("connection refused"));
    }

    #[test]
    fn a_short_standby_pool_is_progressing_and_counted() {
        let s = svc("  prewarm:\n    standbyReplicas: 2\n");
        let ready_standby = pod("sr-standby-a", &[("Ready", "True", None, None)]);
        let obs = Observed {
            deployment: Some(deployment(1, 1, 1, 1)),
            standby_pods: vec![ready_standby.clone(), loading("sr-standby-b")],
            ..Observed::default()
        };
        let st = run(&s, &obs, 10);
        assert_eq!(st.standby_replicas, Some(1));
        assert_eq!(
            summary(&st),
            [
                s3(READY, "True", reasons::AVAILABLE),
                s3(PROGRESSING, "True", reasons::FILLING_STANDBY),
                s3(DEGRADED, "False", reasons::HEALTHY),
            ]
        );
        let obs = Observed {
            standby_pods: vec![ready_standby.clone(), gpu_pending("sr-standby-b")],
            ..obs
        };
        assert_eq!(
            get(&run(&s, &obs, 10), PROGRESSING).reason,
            reasons::STANDBY_WAITING_FOR_GPU_CAPACITY
        );
        let obs = Observed {
            standby_pods: vec![ready_standby.clone(), ready_standby],
            ..obs
        };
        let st = run(&s, &obs, 10);
        assert_eq!(st.standby_replicas, Some(2));
        assert_eq!(get(&st, PROGRESSING).reason, reasons::RECONCILED);
    }
}

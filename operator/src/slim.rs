//! What the watch caches keep of each object: the fields a reconcile reads,
//! nothing else.
//!
//! The operator caches every `HndsrService`, child and serving pod it
//! manages, so what one object costs is multiplied by the fleet. Most of a
//! live object is never read: other managers' `managedFields`, a pod's spec
//! and image digests, a Deployment's pod template (the spec hash annotation
//! says whether it changed), `kubectl`'s last-applied annotation. Each
//! function here trims one kind in place, before the object reaches the
//! cache (`WatchStreamExt::modify`). Services and PodDisruptionBudgets are
//! watched as metadata only ([`from_meta`]), the API server sends no more.
//!
//! Kept, and why:
//! - **our own server-side-apply entry** of `managedFields` (its field set
//!   packed as text) and the spec hash annotation: [`crate::ssa::plan`]
//!   decides "unchanged / drift" from exactly these;
//! - owner references and labels: who controls a child, which pods serve;
//! - a Deployment's `spec.replicas` and status, an HPA's status: replicas
//!   and conditions in the `HndsrService` status;
//! - a pod's conditions and container *states*: scheduling, crash loops,
//!   model loading; its pod-spec digest: which standby pod may fill which
//!   serving slot ([`crate::standby`]).

use hndsr_crds::HndsrService;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ContainerStatus, Pod, PodStatus, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Resource, core::PartialObjectMeta};

use crate::ssa;

/// Keeps only the operator's own apply entry of `managedFields`, its field
/// set [packed](ssa::pack_fields), and only the spec hash of the
/// annotations.
pub fn child_meta(meta: &mut ObjectMeta) {
    if let Some(entries) = &mut meta.managed_fields {
        entries.retain(ssa::is_ours);
        for fields in entries.iter_mut().filter_map(|e| e.fields_v1.as_mut()) {
            ssa::pack_fields(fields);
        }
    }
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k == ssa::SPEC_HASH);
    }
}

/// An `HndsrService`: the whole spec and status; no `managedFields` and no
/// `kubectl` last-applied copy of the spec.
pub fn hndsr_service(svc: &mut HndsrService) {
    svc.metadata.managed_fields = None;
    if let Some(annotations) = &mut svc.metadata.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A Deployment without its pod template (the spec hash stands for it).
pub fn deployment(d: &mut Deployment) {
    child_meta(&mut d.metadata);
    d.spec.template = PodTemplateSpec::default();
}

/// An HPA: metadata as for every child; spec and status are small.
pub fn hpa(h: &mut HorizontalPodAutoscaler) {
    child_meta(&mut h.metadata);
}

/// A Service or PodDisruptionBudget watched as metadata only.
pub fn partial<K>(m: &mut PartialObjectMeta<K>) {
    child_meta(&mut m.metadata);
}

/// A pod: name, labels, the pod-spec digest of prewarm, deletion mark,
/// conditions and container states.
pub fn pod(p: &mut Pod) {
    let meta = &mut p.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k == hndsr_crds::annotations::POD_SPEC_HASH);
    }
    meta.owner_references = None;
    p.spec = None;
    if let Some(status) = &mut p.status {
        let containers = |list: &mut Option<Vec<ContainerStatus>>| {
            list.take().map(|list| {
                list.into_iter()
                    .map(|c| ContainerStatus {
                        name: c.name,
                        ready: c.ready,
                        restart_count: c.restart_count,
                        state: c.state,
                        ..ContainerStatus::default()
                    })
                    .collect()
            })
        };
        *status = PodStatus {
            conditions: status.conditions.take(),
            container_statuses: containers(&mut status.container_statuses),
            init_container_statuses: containers(&mut status.init_container_statuses),
            phase: status.phase.take(),
            ..PodStatus::default()
        };
    }
}

/// The object a metadata-only cache entry stands for, with an empty body:
/// what [`crate::ssa::plan`] and the ownership checks read is all there.
#[must_use]
pub fn from_meta<K: Resource + Default>(m: PartialObjectMeta<K>) -> K {
    let mut k = K::default();
    *k.meta_mut() = m.metadata;
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{ContainerState, ContainerStateWaiting, PodCondition},
        apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry},
    };
    use serde_json::json;

    fn entry(manager: &str, operation: &str) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn children_keep_our_apply_entry_and_the_spec_hash() {
        let mut meta = ObjectMeta {
            managed_fields: Some(vec![
                entry(hndsr_crds::FIELD_MANAGER, "Apply"),
                entry("kube-controller-manager", "Update"),
                entry("kubectl-edit", "Update"),
            ]),
            annotations: Some(
                [
                    (ssa::SPEC_HASH.to_owned(), "abc".to_owned()),
                    (
                        "deployment.kubernetes.io/revision".to_owned(),
                        "3".to_owned(),
                    ),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        };
        child_meta(&mut meta);
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|e| e.manager.as_deref())
            .collect();
        assert_eq!(managers, [hndsr_crds::FIELD_MANAGER]);
        let entries = meta.managed_fields.as_deref().unwrap();
        assert!(
            entries[0].fields_v1.as_ref().unwrap().0.is_string(),
            "packed"
        );
        // The packed set answers as the tree did.
        assert!(ssa::owns_replicas(entries));
        assert!(ssa::owns_all_fields(
            entries,
            &json!({"spec": {"replicas": 2}})
        ));
        assert!(!ssa::owns_all_fields(
            entries,
            &json!({"spec": {"replicas": 2, "paused": true}})
        ));
        assert_eq!(
            meta.annotations,
            Some([(ssa::SPEC_HASH.to_owned(), "abc".to_owned())].into())
        );
    }

    #[test]
    fn pods_keep_conditions_and_container_states() {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".into()),
                message: None,
            }),
            ..ContainerState::default()
        };
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "ns", "labels": {"a": "b"},
                "annotations": {"x": "y", "hndsr.io/pod-spec-hash": "abc"},
                "deletionTimestamp": "2026-12-06T00:00:00Z",
            },
            "spec": {"containers": [{"name": "server", "image": "i"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "server", "image": "i", "imageID": "sha256:x",
                    "ready": false, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1}},
                }],
            },
        }))
        .unwrap();
        pod(&mut p);
        assert!(p.spec.is_none());
        assert_eq!(
            p.metadata.annotations,
            Some([("hndsr.io/pod-spec-hash".into(), "abc".into())].into())
        );
        assert!(p.metadata.deletion_timestamp.is_some());
        assert_eq!(p.metadata.labels, Some([("a".into(), "b".into())].into()));
        let st = p.status.unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert!(st.pod_ip.is_none());
        assert_eq!(
            st.conditions,
            Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "False".into(),
                ..PodCondition::default()
            }])
        );
        let cs = &st.container_statuses.unwrap()[0];
        assert_eq!(
            (cs.name.as_str(), cs.restart_count, cs.state.as_ref()),
            ("server", 4, Some(&waiting))
        );
        assert!(cs.last_state.is_none() && cs.image.is_empty());
    }
}

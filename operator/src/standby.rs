//! Promotion of warm standby pods into the serving set (prewarm).
//!
//! The serving Deployment's ReplicaSet makes a new, cold pod for every
//! serving replica the autoscaler adds. Each such pod that is not ready yet
//! is a slot a warm standby pod can fill at once: the operator relabels a
//! ready standby pod of the same pod spec (`hndsr.io/role: serving` and the
//! cold pod's `pod-template-hash`). From then on Kubernetes does the rest:
//! the Service's endpoints take the pod in; the standby ReplicaSet no longer
//! matches it, releases it and makes a replacement (the pool refills); the
//! serving ReplicaSet adopts it, finds one pod too many and deletes the
//! least ready, the cold one. [`promotions`] is the decision, pure; the
//! controller applies it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hndsr_crds::annotations;
use k8s_openapi::api::core::v1::Pod;

/// The label the ReplicaSet controller selects its own pods by.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// One standby pod to relabel into a serving slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The ready standby pod.
    pub pod: String,
    /// The cold serving pod whose slot it takes (the ReplicaSet deletes it).
    pub replaces: String,
    /// The serving ReplicaSet's `pod-template-hash`, taken from that pod.
    pub template_hash: String,
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
}

fn spec_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(annotations::POD_SPEC_HASH)
        .map(String::as_str)
}

fn template_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(POD_TEMPLATE_HASH)
        .map(String::as_str)
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("")
}

/// Which standby pods to promote now: one per serving pod that is not ready
/// yet, from the ready standby pods with the same pod spec, oldest serving
/// slot and oldest standby pod first. Pods in `busy` (promoted or replaced
/// moments ago, not yet shown so by the cache) are neither.
#[must_use]
pub fn promotions(serving: &[Pod], standby: &[Pod], busy: &HashSet<String>) -> Vec<Promotion> {
    let free = |p: &&Pod| live(p) && !busy.contains(name(p));
    let mut slots: Vec<&Pod> = serving.iter().filter(free).filter(|p| !ready(p)).collect();
    slots.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    let mut warm: Vec<&Pod> = standby.iter().filter(free).filter(|p| ready(p)).collect();
    warm.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    let mut out = Vec::new();
    for slot in slots {
        let (Some(spec), Some(hash)) = (spec_hash(slot), template_hash(slot)) else {
            continue;
        };
        if let Some(i) = warm.iter().position(|w| spec_hash(w) == Some(spec)) {
            let pod = warm.remove(i);
            out.push(Promotion {
                pod: name(pod).to_owned(),
                replaces: name(slot).to_owned(),
                template_hash: hash.to_owned(),
            });
        }
    }
    out
}

/// Ready standby pods (`status.standbyReplicas`).
#[must_use]
pub fn ready_count(standby: &[Pod]) -> i32 {
    i32::try_from(standby.iter().filter(|p| live(p) && ready(p)).count()).unwrap_or(i32::MAX)
}

/// Pods promoted or replaced moments ago, per namespace: the pod cache shows
/// a relabel a little later, and a pass in between must not use them twice.
#[derive(Debug, Default)]
pub struct InFlight {
    pods: std::sync::Mutex<HashMap<(String, String), Instant>>,
}

/// How long a promotion counts as in flight at most.
const IN_FLIGHT_FOR: Duration = Duration::from_secs(30);

impl InFlight {
    /// Pods of `ns` in flight now.
    pub fn busy(&self, ns: &str) -> HashSet<String> {
        let mut pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pods.retain(|_, at| at.elapsed() < IN_FLIGHT_FOR);
        pods.keys()
            .filter(|(n, _)| n == ns)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Marks both pods of `p` in flight.
    pub fn record(&self, ns: &str, p: &Promotion) {
        let mut pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        for pod in [&p.pod, &p.replaces] {
            pods.insert((ns.to_owned(), pod.clone()), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, created: &str, ready: bool, spec: &str, hash: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "creationTimestamp": created,
                "labels": { POD_TEMPLATE_HASH: hash },
                "annotations": { annotations::POD_SPEC_HASH: spec },
            },
            "status": { "conditions": [
                { "type": "Ready", "status": if ready { "True" } else { "False" } }
            ]},
        }))
        .unwrap()
    }

    const T1: &str = "2026-12-06T10:00:00Z";
    const T2: &str = "2026-12-06T10:00:01Z";
    const T3: &str = "2026-12-06T10:00:02Z";

    #[test]
    fn each_cold_slot_takes_a_ready_standby_pod_of_its_spec() {
        let serving = [
            pod("s-ready", T1, true, "A", "h1"),
            pod("s-cold-1", T2, false, "A", "h1"),
            pod("s-cold-2", T3, false, "A", "h1"),
        ];
        let standby = [
            pod("w-young", T3, true, "A", "x"),
            pod("w-old", T1, true, "A", "x"),
            pod("w-loading", T1, false, "A", "x"),
        ];
        let p = promotions(&serving, &standby, &HashSet::new());
        assert_eq!(
            p,
            [
                Promotion {
                    pod: "w-old".into(),
                    replaces: "s-cold-1".into(),
                    template_hash: "h1".into()
                },
                Promotion {
                    pod: "w-young".into(),
                    replaces: "s-cold-2".into(),
                    template_hash: "h1".into()
                },
            ],
            "oldest first; a loading standby pod is not promoted"
        );
    }

    #[test]
    fn nothing_to_do_without_a_cold_slot_or_a_matching_warm_pod() {
        let warm = [pod("w", T1, true, "A", "x")];
        assert!(promotions(&[pod("s", T1, true, "A", "h")], &warm, &HashSet::new()).is_empty());
        assert!(
            promotions(&[pod("s", T1, false, "B", "h")], &warm, &HashSet::new()).is_empty(),
            "a standby pod of another spec (mid-rollout) never fills the slot"
        );
        let mut gone = pod("s", T1, false, "A", "h");
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-06T10:00:05Z".parse().unwrap(),
            ));
        assert!(promotions(&[gone], &warm, &HashSet::new()).is_empty());
    }

    #[test]
    fn pods_in_flight_are_not_used_twice() {
        let serving = [pod("s-cold", T2, false, "A", "h")];
        let standby = [pod("w1", T1, true, "A", "x"), pod("w2", T2, true, "A", "x")];
        let busy: HashSet<String> = ["s-cold".to_owned()].into();
        assert!(promotions(&serving, &standby, &busy).is_empty());
        let busy: HashSet<String> = ["w1".to_owned()].into();
        assert_eq!(promotions(&serving, &standby, &busy)[0].pod, "w2");
        let flight = InFlight::default();
        flight.record(
            "ns",
            &Promotion {
                pod: "w1".into(),
                replaces: "s-cold".into(),
                template_hash: "h".into(),
            },
        );
        assert_eq!(flight.busy("ns").len(), 2);
        assert!(flight.busy("other").is_empty());
    }

    #[test]
    fn ready_standby_pods_are_counted() {
        let standby = [pod("a", T1, true, "A", "x"), pod("b", T1, false, "A", "x")];
        assert_eq!(ready_count(&standby), 1);
    }
}

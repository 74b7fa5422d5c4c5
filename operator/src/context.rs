//! What every reconcile shares: the client, the event recorder, metrics,
//! the watch caches of the children and pods, builder settings and the
//! per-object backoff.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use hndsr_crds::{HndsrService, HndsrServiceStatus};
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{Pod, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Client,
    api::DynamicObject,
    core::PartialObjectMeta,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};

use crate::{builders::BuildConfig, metrics::Metrics};

/// Read-only views of the watch caches. Reconcile reads the observed
/// children from here, never from the API server, so a steady-state pass
/// makes no API calls at all.
#[derive(Clone)]
pub struct Stores {
    /// Deployments labelled `app.kubernetes.io/managed-by=hndsr-operator`.
    pub deployments: Store<Deployment>,
    /// Services with the same label, metadata only ([`crate::slim`]).
    pub services: Store<PartialObjectMeta<Service>>,
    /// HorizontalPodAutoscalers with the same label.
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// PodDisruptionBudgets with the same label, metadata only.
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// Pods with the same label (GPU-capacity and model-loading detection).
    pub pods: Store<Pod>,
    /// Becomes true once every cache above has completed its initial list
    /// (see [`crate::watches::watches`]).
    pub synced: tokio::sync::watch::Receiver<bool>,
}

impl Stores {
    /// Whether every cache has completed its initial list. Before that an
    /// empty cache means "not listed yet", not "absent": a pass reading it
    /// would recreate children that exist and report pods that run as
    /// missing (a status patch and an event per object on every restart).
    #[must_use]
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once [`Self::synced`] (at once if it is). Any number of
    /// tasks may wait.
    pub async fn wait_synced(&self) {
        // Err: the sender went away, which only happens at shutdown.
        let _ = self.synced.clone().wait_for(|s| *s).await;
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("deployments", &self.deployments.len())
            .field("services", &self.services.len())
            .field("hpas", &self.hpas.len())
            .field("pdbs", &self.pdbs.len())
            .field("pods", &self.pods.len())
            .finish()
    }
}

/// Per-object exponential backoff for transient errors: 1 s doubling up to
/// 5 minutes, minus up to 10% jitter (so it still grows strictly), reset
/// after the next successful reconcile.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: Mutex<HashMap<ObjectRef<HndsrService>, u32>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    /// A backoff from `base` doubling to `max`.
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: Mutex::default(),
        }
    }

    /// Pure delay for the `attempt`-th consecutive failure (0-based) and a
    /// jitter draw in `[0, 1)`.
    #[must_use]
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(31)));
        exp.min(self.max)
            .mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
    }

    /// Records a failure of `key` and returns how long to wait.
    pub fn next(&self, key: &ObjectRef<HndsrService>) -> Duration {
        let attempt = {
            let mut map = self
                .attempts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = map.entry(key.clone()).or_insert(0);
            let attempt = *n;
            *n = n.saturating_add(1);
            attempt
        };
        self.delay(attempt, rand::random::<f64>())
    }

    /// Forgets the failures of `key` (after a success or deletion).
    pub fn reset(&self, key: &ObjectRef<HndsrService>) {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Forgets an object the controller found gone when its retry came due
    /// (deleted while failing: no reconcile will ever reset it).
    pub fn forget_deleted(&self, gone: &ObjectRef<DynamicObject>) {
        self.reset(&typed(gone));
    }

    /// Objects with failures on record.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// The status each object was last patched to, with the status that patch
/// replaced, until the watch cache shows the write. A reconcile that runs
/// on a cached object from before the write (a pod event right after it)
/// would otherwise compute the same transition again: a second identical
/// status patch, new `lastTransitionTime`s and the same event twice.
#[derive(Debug, Default)]
pub struct WrittenStatuses {
    map: Mutex<WrittenMap>,
}

type WrittenMap =
    HashMap<ObjectRef<HndsrService>, (Option<HndsrServiceStatus>, HndsrServiceStatus)>;

impl WrittenStatuses {
    fn map(&self) -> std::sync::MutexGuard<'_, WrittenMap> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status to reconcile from: what was last written when the cache
    /// still shows the status that write replaced; else `seen` (and the
    /// record goes: the cache has caught up or moved on).
    #[must_use]
    pub fn current(
        &self,
        key: &ObjectRef<HndsrService>,
        seen: Option<&HndsrServiceStatus>,
    ) -> Option<HndsrServiceStatus> {
        let mut map = self.map();
        match map.get(key) {
            Some((before, written)) if before.as_ref() == seen => Some(written.clone()),
            Some(_) => {
                map.remove(key);
                seen.cloned()
            }
            None => seen.cloned(),
        }
    }

    /// Records a status patch of `key` from `before` to `written`.
    pub fn record(
        &self,
        key: ObjectRef<HndsrService>,
        before: Option<HndsrServiceStatus>,
        written: HndsrServiceStatus,
    ) {
        self.map().insert(key, (before, written));
    }

    /// Forgets `key` (deleted).
    pub fn forget(&self, key: &ObjectRef<HndsrService>) {
        self.map().remove(key);
    }

    /// Objects with a write the cache has not shown yet.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.map().len()
    }
}

/// The `HndsrService` key of an object reference the controller reports.
#[must_use]
pub fn typed(gone: &ObjectRef<DynamicObject>) -> ObjectRef<HndsrService> {
    let key = ObjectRef::<HndsrService>::new(&gone.name);
    match &gone.namespace {
        Some(ns) => key.within(ns),
        None => key,
    }
}

/// Shared state of the controller.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes events (events.k8s.io).
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// Watch caches of children and pods.
    pub stores: Stores,
    /// Builder settings.
    pub build: BuildConfig,
    /// Per-object error backoff.
    pub backoff: Backoff,
    /// Status writes the watch cache has not shown yet.
    pub written: WrittenStatuses,
    /// Standby promotions the pod cache has not shown yet.
    pub in_flight: crate::standby::InFlight,
    /// The services at zero the zero responder answers for.
    pub zero: crate::zero::ZeroResponder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("stores", &self.stores)
            .field("build", &self.build)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Name of the reporting controller in events.
pub const REPORTER: &str = "hndsr-operator";

impl Context {
    /// A context; `identity` is the reporting instance of events.
    #[must_use]
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Metrics,
        stores: Stores,
        build: BuildConfig,
        zero: crate::zero::ZeroResponder,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: REPORTER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            stores,
            build,
            backoff: Backoff::default(),
            written: WrittenStatuses::default(),
            in_flight: crate::standby::InFlight::default(),
            zero,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(3, 0.0), Duration::from_secs(8));
        assert_eq!(b.delay(20, 0.0), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(300));
        let key = ObjectRef::<HndsrService>::new("x").within("ns");
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            let d = b.next(&key);
            assert!(d > last, "{d:?} after {last:?}");
            last = d;
        }
        assert!(last <= Duration::from_secs(300));
        b.reset(&key);
        assert!(b.next(&key) <= Duration::from_secs(1));
    }

    #[test]
    fn an_object_found_gone_at_its_retry_is_forgotten() {
        let b = Backoff::default();
        let key = ObjectRef::<HndsrService>::new("x").within("ns");
        let other = ObjectRef::<HndsrService>::new("x").within("other");
        b.next(&key);
        b.next(&other);
        assert_eq!(b.tracked(), 2);
        b.forget_deleted(&key.clone().erase());
        assert_eq!(b.tracked(), 1, "only that object");
        b.forget_deleted(&other.erase());
        assert_eq!(b.tracked(), 0);
    }
}

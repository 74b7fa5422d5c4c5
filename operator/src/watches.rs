//! Watch caches of the children and pods, and the triggers they feed.
//!
//! The reflectors run in **every** replica, leader or not: their caches are
//! warm when a follower takes over, and `/readyz` can report "caches synced"
//! independently of leadership (see `http.rs`). Each touched child is mapped
//! to its owning `HndsrService` (controller owner reference; pods by the
//! `hndsr.io/service` label, since their owner is a ReplicaSet) and sent to
//! the controller as a reconcile trigger — only while this replica leads, as
//! the controller's initial list reconciles everything on takeover anyway.

use std::{
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{FutureExt, Stream, StreamExt, channel::mpsc::UnboundedSender, future::BoxFuture};
use hndsr_crds::{FIELD_MANAGER, HndsrService, labels};
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{Pod, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use serde::de::DeserializeOwned;

use crate::{context::Stores, slim};

/// Label selector of everything the operator creates.
#[must_use]
pub fn managed_selector() -> String {
    format!("{}={}", labels::MANAGED_BY, FIELD_MANAGER)
}

/// `Api::namespaced` when a watch namespace is set, else `Api::all`.
#[must_use]
pub fn scoped_api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// The `HndsrService` that controls `obj`, from its controller owner reference.
#[must_use]
pub fn controlling_owner<K: Resource>(obj: &K) -> Option<ObjectRef<HndsrService>> {
    let ns = obj.meta().namespace.as_deref()?;
    obj.owner_references()
        .iter()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == HndsrService::kind(&())
                && o.api_version == HndsrService::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name).within(ns))
}

/// The `HndsrService` a pod belongs to, from its `hndsr.io/service` label.
#[must_use]
pub fn pod_owner(pod: &Pod) -> Option<ObjectRef<HndsrService>> {
    let ns = pod.metadata.namespace.as_deref()?;
    pod.labels()
        .get(labels::SERVICE)
        .map(|name| ObjectRef::new(name).within(ns))
}

/// Where triggers go: the controller's channel while this replica leads.
#[derive(Clone, Debug)]
pub struct Triggers {
    /// Set while leading.
    pub leading: Arc<AtomicBool>,
    /// The controller's `reconcile_on` input.
    pub tx: UnboundedSender<ObjectRef<HndsrService>>,
}

impl Triggers {
    fn send(&self, target: Option<ObjectRef<HndsrService>>) {
        if let Some(target) = target
            && self.leading.load(Ordering::Acquire)
        {
            // The receiver only goes away at shutdown.
            let _ = self.tx.unbounded_send(target);
        }
    }
}

/// The caches plus the futures that drive them (spawn each).
pub struct Watches {
    /// Read handles, for the reconciler.
    pub stores: Stores,
    /// One future per reflector and one that marks the caches synced; they
    /// run until the process ends.
    pub drivers: Vec<BoxFuture<'static, ()>>,
}

impl Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches")
            .field("stores", &self.stores)
            .finish_non_exhaustive()
    }
}

fn reflect<K>(
    api: Api<K>,
    triggers: Triggers,
    owner: fn(&K) -> Option<ObjectRef<HndsrService>>,
    slim: fn(&mut K),
) -> (reflector::Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, managed_config())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects();
    let driver = drive(stream, move |obj: K| triggers.send(owner(&obj)));
    (reader, driver)
}

/// Objects per page of a cache's initial list. A whole page is decoded at
/// once, before [`crate::slim`] trims it, and what the allocator grew for
/// that peak stays resident: at 1000 HndsrServices a restarted operator
/// settled about 12 MiB lower with pages of 25 than of 100, for 40 list
/// calls per kind instead of 10. (Streaming lists would bound the peak
/// better, but not every API server this operator supports, from 1.30,
/// serves them.)
pub const LIST_PAGE_SIZE: u32 = 25;

/// Watch configuration of the operator's caches: its own objects, listed in
/// pages.
#[must_use]
pub fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

fn managed_config() -> watcher::Config {
    list_config().labels(&managed_selector())
}

fn drive<K, S>(stream: S, mut on_obj: impl FnMut(K) + Send + 'static) -> BoxFuture<'static, ()>
where
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    K: Resource + Send + 'static,
    K::DynamicType: Default,
{
    async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => on_obj(obj),
                // The backoff above retries; just make the failure visible.
                Err(error) => {
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), %error, "watch failed");
                }
            }
        }
    }
    .boxed()
}

/// Sets up a cache per child kind and one for pods, scoped to
/// `namespace` (or the whole cluster) and to objects the operator manages,
/// plus the task that marks them synced.
#[must_use]
pub fn watches(client: &Client, namespace: Option<&str>, triggers: &Triggers) -> Watches {
    let (deployments, d1) = reflect::<Deployment>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
        slim::deployment,
    );
    // `Api<PartialObjectMeta<_>>` watches metadata only.
    let (services, d2) = reflect::<PartialObjectMeta<Service>>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
        slim::partial,
    );
    let (hpas, d3) = reflect::<HorizontalPodAutoscaler>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
        slim::hpa,
    );
    let (pdbs, d4) = reflect::<PartialObjectMeta<PodDisruptionBudget>>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
        slim::partial,
    );
    let (pods, d5) = reflect::<Pod>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        pod_owner,
        slim::pod,
    );
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let d6 = mark_synced(
        deployments.clone(),
        services.clone(),
        hpas.clone(),
        pdbs.clone(),
        pods.clone(),
        synced_tx,
    )
    .boxed();
    Watches {
        stores: Stores {
            deployments,
            services,
            hpas,
            pdbs,
            pods,
            synced,
        },
        drivers: vec![d1, d2, d3, d4, d5, d6],
    }
}

/// Resolves once every cache has completed its initial list, then marks
/// the stores synced. This is the stores' only `wait_until_ready` caller:
/// that future wakes a single waiter (kube's `DelayedInit` keeps one waker),
/// so everyone else waits on [`Stores::wait_synced`].
async fn mark_synced(
    deployments: reflector::Store<Deployment>,
    services: reflector::Store<PartialObjectMeta<Service>>,
    hpas: reflector::Store<HorizontalPodAutoscaler>,
    pdbs: reflector::Store<PartialObjectMeta<PodDisruptionBudget>>,
    pods: reflector::Store<Pod>,
    synced: tokio::sync::watch::Sender<bool>,
) {
    let lists = futures::join!(
        deployments.wait_until_ready(),
        services.wait_until_ready(),
        hpas.wait_until_ready(),
        pdbs.wait_until_ready(),
        pods.wait_until_ready(),
    );
    // A dropped writer (shutdown) never completed its list.
    if lists.0.is_ok() && lists.1.is_ok() && lists.2.is_ok() && lists.3.is_ok() && lists.4.is_ok() {
        synced.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    #[test]
    fn children_map_to_their_controller() {
        let mut d = Deployment {
            metadata: ObjectMeta {
                name: Some("x".into()),
                namespace: Some("ns".into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "hndsr.io/v1alpha1".into(),
                    kind: "HndsrService".into(),
                    name: "x".into(),
                    uid: "u".into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            ..Deployment::default()
        };
        assert_eq!(
            controlling_owner(&d),
            Some(ObjectRef::new("x").within("ns"))
        );
        d.metadata.owner_references.as_mut().unwrap()[0].controller = None;
        assert_eq!(controlling_owner(&d), None);
    }

    #[test]
    fn pods_map_by_label() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                labels: Some([(labels::SERVICE.to_owned(), "x".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        assert_eq!(pod_owner(&pod), Some(ObjectRef::new("x").within("ns")));
        assert_eq!(pod_owner(&Pod::default()), None);
    }
}

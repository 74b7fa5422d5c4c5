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
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use serde::de::DeserializeOwned;

use crate::context::Stores;

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
    /// One future per reflector; they run until the process ends.
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
) -> (reflector::Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default()
        .labels(&managed_selector())
        .any_semantic();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let driver = drive(stream, move |obj: K| triggers.send(owner(&obj)));
    (reader, driver)
}

fn drive<K, S>(stream: S, mut on_obj: impl FnMut(K) + Send + 'static) -> BoxFuture<'static, ()>
where
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    K: Resource<DynamicType = ()> + Send + 'static,
{
    async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => on_obj(obj),
                // The backoff above retries; just make the failure visible.
                Err(error) => tracing::warn!(kind = %K::kind(&()), %error, "watch failed"),
            }
        }
    }
    .boxed()
}

/// Sets up a cache per child kind and one for pods, scoped to
/// `namespace` (or the whole cluster) and to objects the operator manages.
#[must_use]
pub fn watches(client: &Client, namespace: Option<&str>, triggers: &Triggers) -> Watches {
    let (deployments, d1) = reflect::<Deployment>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
    );
    let (services, d2) = reflect::<Service>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
    );
    let (hpas, d3) = reflect::<HorizontalPodAutoscaler>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
    );
    let (pdbs, d4) = reflect::<PodDisruptionBudget>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        controlling_owner,
    );
    let (pods, d5) = reflect::<Pod>(
        scoped_api(client.clone(), namespace),
        triggers.clone(),
        pod_owner,
    );
    Watches {
        stores: Stores {
            deployments,
            services,
            hpas,
            pdbs,
            pods,
        },
        drivers: vec![d1, d2, d3, d4, d5],
    }
}

/// Resolves once every cache has completed its initial list.
pub async fn wait_synced(stores: &Stores) {
    let _ = futures::join!(
        stores.deployments.wait_until_ready(),
        stores.services.wait_until_ready(),
        stores.hpas.wait_until_ready(),
        stores.pdbs.wait_until_ready(),
        stores.pods.wait_until_ready(),
    );
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

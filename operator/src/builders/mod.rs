//! Pure builders: an `HndsrService` in, the desired child objects out.
//!
//! Nothing here touches the network; the controller applies what
//! [`desired`] returns with server-side apply under
//! [`hndsr_crds::FIELD_MANAGER`]. Every child carries the same labels, a
//! controller owner reference to the `HndsrService`, and is named after it.
//! The golden tests in `operator/tests/builders.rs` pin the output.

mod deployment;
mod hpa;
mod pdb;
mod placeholder;
mod scaled_object;
mod service;
mod zero;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hndsr_crds::{AutoscalingProvider, HndsrService, labels};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource as _;

pub use deployment::standby_name;
pub use scaled_object::{
    ScaledObject, WAKE_METRIC, WAKE_NAMESPACE_LABEL, WAKE_SERVICE_LABEL, not_ready_message,
};
pub use zero::zero_slice_name;

use crate::effective::{EffectiveSpec, Standby};
pub use crate::validate::{InvalidSpec, Problem};

/// Default of [`BuildConfig::fetcher_image`] (`--fetcher-image`).
pub const DEFAULT_FETCHER_IMAGE: &str = "busybox:1.37";
/// Default of [`BuildConfig::cluster_domain`] (`--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Default of [`BuildConfig::placeholder_priority_class`]
/// (`--placeholder-priority-class`): the chart's PriorityClass.
pub const DEFAULT_PLACEHOLDER_PRIORITY_CLASS: &str = "hndsr-placeholder";

/// Operator-wide settings the builders need (not part of any spec).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// Image of the init container that downloads `weights.uri` (needs `sh`,
    /// `wget` and `sha256sum`, e.g. a busybox image).
    pub fetcher_image: String,
    /// Cluster DNS domain used in `status.endpoint`.
    pub cluster_domain: String,
    /// Whether the server logs JSON.
    pub log_json: bool,
    /// PriorityClass of capacity placeholders whose spec names none.
    pub placeholder_priority_class: String,
    /// Prometheus KEDA's scalers query (`--keda-prometheus-url`); `None`:
    /// provider `keda` cannot be served (status says so).
    pub keda_prometheus_url: Option<String>,
    /// Address the Service of a service at zero sends requests to: the
    /// operator's zero responder as the cluster reaches it; `None`: no
    /// responder (connections at zero are refused; status says so).
    pub zero_responder: Option<SocketAddr>,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            fetcher_image: DEFAULT_FETCHER_IMAGE.to_owned(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            log_json: true,
            placeholder_priority_class: DEFAULT_PLACEHOLDER_PRIORITY_CLASS.to_owned(),
            keda_prometheus_url: None,
            zero_responder: None,
        }
    }
}

/// The objects one `HndsrService` wants to exist.
///
/// `#[non_exhaustive]`: children can be added without breaking callers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Children {
    /// Deployment `<name>`: the serving pods.
    pub deployment: Deployment,
    /// Service `<name>`: selects serving pods only.
    pub service: Service,
    /// HorizontalPodAutoscaler `<name>`; `None` when autoscaling is off or
    /// the provider is `keda`.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// KEDA ScaledObject `<name>`; `None` unless the provider is `keda` and
    /// the operator knows its Prometheus (`--keda-prometheus-url`).
    pub scaled_object: Option<ScaledObject>,
    /// EndpointSlice `<name>-zero` to the zero responder; built for provider
    /// `keda` with `minReplicas: 0` and a responder, applied only while the
    /// service is at zero ([`crate::zero::at_zero`]).
    pub zero_slice: Option<EndpointSlice>,
    /// PodDisruptionBudget `<name>`; `None` when `disruption.enabled` is false.
    pub pdb: Option<PodDisruptionBudget>,
    /// Deployment `<name>-placeholder`: capacity placeholders; `None`
    /// without `prewarm.placeholders`.
    pub placeholders: Option<Deployment>,
    /// Deployment `<name>-standby`: warm standby pods; `None` without a
    /// standby pool.
    pub standby: Option<Deployment>,
    /// In-cluster URL of the Service (`status.endpoint`).
    pub endpoint: String,
}

/// Builds the desired children of `svc` from its resolved spec
/// ([`crate::effective::resolve`]), or says why it cannot.
///
/// `serving_replicas` is the serving pods wanted now (the autoscaler's
/// decision; [`crate::status::want_replicas`]): a `standbyPercent` pool is
/// sized from it.
pub fn desired(
    svc: &HndsrService,
    eff: &EffectiveSpec,
    cfg: &BuildConfig,
    serving_replicas: i32,
) -> Result<Children, InvalidSpec> {
    let ctx = Ctx::new(svc, eff)?;
    let deployment = deployment::build(&ctx, cfg, deployment::Role::Serving);
    let standby = (eff.standby != Standby::None).then(|| {
        deployment::build(
            &ctx,
            cfg,
            deployment::Role::Standby(eff.standby_replicas(serving_replicas)),
        )
    });
    let service = service::build(&ctx);
    let hpa = match eff.provider() {
        Some(AutoscalingProvider::Hpa) => Some(hpa::build(&ctx)),
        Some(AutoscalingProvider::Keda) | None => None,
    };
    let scaled_object = eff
        .keda
        .as_ref()
        .zip(cfg.keda_prometheus_url.as_deref())
        .map(|(keda, prometheus)| scaled_object::build(&ctx, keda, prometheus));
    let zero_slice = eff
        .scales_to_zero()
        .then_some(cfg.zero_responder)
        .flatten()
        .map(|responder| zero::build(&ctx, responder));
    let pdb = eff.pdb.as_ref().map(|bound| pdb::build(&ctx, bound));
    let placeholders = eff
        .placeholders
        .as_ref()
        .map(|p| placeholder::build(&ctx, cfg, p));
    let endpoint = endpoint(&ctx.name, &ctx.namespace, cfg);
    Ok(Children {
        deployment,
        service,
        hpa,
        scaled_object,
        zero_slice,
        pdb,
        placeholders,
        standby,
        endpoint,
    })
}

/// Name of the placeholder Deployment of `name`.
#[must_use]
pub fn placeholder_name(name: &str) -> String {
    format!("{name}-placeholder")
}

/// Resolves `svc`'s spec ([`crate::effective::resolve`]) and builds its
/// children from it, for a service with nothing observed yet (the serving
/// count is the static or minimum one).
pub fn resolve_and_build(
    svc: &HndsrService,
    cfg: &BuildConfig,
) -> Result<(EffectiveSpec, Children), InvalidSpec> {
    let eff = crate::effective::resolve(svc)?;
    let serving = crate::status::want_replicas(&eff, &crate::status::Observed::default());
    let children = desired(svc, &eff, cfg, serving)?;
    Ok((eff, children))
}

/// Labels every child carries.
pub fn common_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::APP_NAME.to_owned()),
        (labels::INSTANCE.to_owned(), name.to_owned()),
        (
            labels::COMPONENT.to_owned(),
            labels::COMPONENT_SERVER.to_owned(),
        ),
        (
            labels::MANAGED_BY.to_owned(),
            hndsr_crds::FIELD_MANAGER.to_owned(),
        ),
        (labels::PART_OF.to_owned(), labels::APP_NAME.to_owned()),
        (labels::SERVICE.to_owned(), name.to_owned()),
    ])
}

/// The common labels plus `hndsr.io/role`: a pod template's and its
/// Deployment's.
pub fn role_labels(name: &str, role: &str) -> BTreeMap<String, String> {
    let mut l = common_labels(name);
    l.insert(labels::ROLE.to_owned(), role.to_owned());
    l
}

/// Selector of the pods of `name` in `role` (`hndsr.io/role`).
pub fn role_selector(name: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::SERVICE.to_owned(), name.to_owned()),
        (labels::ROLE.to_owned(), role.to_owned()),
    ])
}

/// Selector of the serving pods of `name` (Deployment, Service, PDB).
pub fn serving_selector(name: &str) -> BTreeMap<String, String> {
    role_selector(name, labels::ROLE_SERVING)
}

/// The serving selector as a label-selector string (`status.selector`).
pub fn serving_selector_string(name: &str) -> String {
    serving_selector(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// In-cluster URL of the service.
pub fn endpoint(name: &str, namespace: &str, cfg: &BuildConfig) -> String {
    format!("http://{name}.{namespace}.svc.{}", cfg.cluster_domain)
}

/// What every builder needs, resolved once.
struct Ctx<'a> {
    svc: &'a HndsrService,
    eff: &'a EffectiveSpec,
    name: String,
    namespace: String,
    owner: OwnerReference,
}

impl<'a> Ctx<'a> {
    fn new(svc: &'a HndsrService, eff: &'a EffectiveSpec) -> Result<Self, InvalidSpec> {
        let name = svc
            .metadata
            .name
            .clone()
            .ok_or_else(|| InvalidSpec::one("metadata.name", "is missing"))?;
        let namespace = svc
            .metadata
            .namespace
            .clone()
            .ok_or_else(|| InvalidSpec::one("metadata.namespace", "is missing"))?;
        let uid = svc.metadata.uid.clone().ok_or_else(|| {
            InvalidSpec::one(
                "metadata.uid",
                "is missing (the object was not read from the API server)",
            )
        })?;
        let owner = OwnerReference {
            api_version: HndsrService::api_version(&()).into_owned(),
            kind: HndsrService::kind(&()).into_owned(),
            name: name.clone(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Self {
            svc,
            eff,
            name,
            namespace,
            owner,
        })
    }

    /// Metadata of a child named after the service.
    fn meta(&self, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

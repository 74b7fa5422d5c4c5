//! The `HndsrService` custom resource (group `hndsr.io`, version `v1alpha1`)
//! and the names shared by everything that touches it.
//!
//! This crate is the single source of truth for the CRD: the committed YAML,
//! the chart's copy and `docs/crd-reference.md` are generated from these
//! types by the `crdgen` binary. It holds no controller logic; the operator,
//! the generator and the e2e tests all import it.
//!
//! Defaults are deliberately *not* part of the schema (schema defaults make
//! Argo CD show OutOfSync); the controller applies them and reports the
//! effective values in `status`.

pub mod reference;
mod types;

pub use hndsr_contract as contract;
pub use types::*;

/// API group of every resource this project defines.
pub const GROUP: &str = "hndsr.io";
/// API version of [`HndsrService`].
pub const VERSION: &str = "v1alpha1";
/// Kind of the custom resource.
pub const KIND: &str = "HndsrService";
/// The one field manager the operator uses for server-side apply and status.
pub const FIELD_MANAGER: &str = "hndsr-operator";

/// Label keys and values written on every child object and pod.
pub mod labels {
    /// `app.kubernetes.io/name`: always [`APP_NAME`].
    pub const NAME: &str = "app.kubernetes.io/name";
    /// `app.kubernetes.io/instance`: the `HndsrService`'s name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `app.kubernetes.io/component`: always [`COMPONENT_SERVER`].
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// `app.kubernetes.io/managed-by`: always [`super::FIELD_MANAGER`].
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// `app.kubernetes.io/part-of`: always [`APP_NAME`].
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
    /// The owning `HndsrService`'s name; part of every selector.
    pub const SERVICE: &str = "hndsr.io/service";
    /// Which set a pod belongs to: [`ROLE_SERVING`], [`ROLE_STANDBY`] or
    /// [`ROLE_PLACEHOLDER`].
    pub const ROLE: &str = "hndsr.io/role";
    /// Pods selected by the Service and counted by the autoscaler.
    pub const ROLE_SERVING: &str = "serving";
    /// Warm pods kept out of the Service until promoted (prewarm).
    pub const ROLE_STANDBY: &str = "standby";
    /// Capacity placeholders (prewarm): low-priority pods real pods preempt.
    pub const ROLE_PLACEHOLDER: &str = "placeholder";
    /// Value of [`NAME`] and [`PART_OF`].
    pub const APP_NAME: &str = "hndsr";
    /// Value of [`COMPONENT`].
    pub const COMPONENT_SERVER: &str = "inference-server";
}

/// Annotation keys written by the operator.
pub mod annotations {
    /// Tells Prometheus (annotation-based discovery) to scrape the pod.
    pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
    /// Port Prometheus scrapes.
    pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
    /// Path Prometheus scrapes.
    pub const PROMETHEUS_PATH: &str = "prometheus.io/path";
    /// Digest of a serving or standby pod's spec (prewarm): a standby pod
    /// is promoted only into a slot of the same spec.
    pub const POD_SPEC_HASH: &str = "hndsr.io/pod-spec-hash";
}

/// Condition types and reasons reported in `status.conditions`.
pub mod conditions {
    /// The service answers requests: at least `minAvailable` serving pods
    /// are ready and the spec is valid.
    pub const READY: &str = "Ready";
    /// A change is being rolled out or capacity is being added.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs a human: invalid spec, no GPU capacity, crash loops.
    pub const DEGRADED: &str = "Degraded";

    /// Condition reasons (CamelCase, machine-readable).
    pub mod reasons {
        /// All desired serving pods are ready and up to date.
        pub const AVAILABLE: &str = "Available";
        /// Some but not all desired serving pods are ready.
        pub const PARTIALLY_AVAILABLE: &str = "PartiallyAvailable";
        /// No serving pod is ready.
        pub const UNAVAILABLE: &str = "Unavailable";
        /// The spec failed validation; nothing was changed.
        pub const INVALID_SPEC: &str = "InvalidSpec";
        /// The Deployment is rolling out a new template or has not caught up.
        pub const ROLLING_OUT: &str = "RollingOut";
        /// The Deployment does not exist yet (first reconcile).
        pub const CREATING: &str = "Creating";
        /// Pods are pending because no node has free GPUs of the requested resource.
        pub const WAITING_FOR_GPU_CAPACITY: &str = "WaitingForGPUCapacity";
        /// Pods are pending because they cannot be scheduled (not GPU-related).
        pub const UNSCHEDULABLE: &str = "Unschedulable";
        /// Pods are running but not ready yet: the model is loading or warming up.
        pub const LOADING_MODEL: &str = "LoadingModel";
        /// A container is crash-looping or cannot pull its image.
        pub const POD_FAILING: &str = "PodFailing";
        /// The Deployment cannot create pods (`ReplicaFailure`: a quota,
        /// a missing PriorityClass, Pod Security admission, ...).
        pub const POD_CREATION_FAILED: &str = "PodCreationFailed";
        /// The autoscaler wants more replicas than `maxReplicas` allows.
        pub const SCALING_LIMITED: &str = "ScalingLimited";
        /// Provider `keda`: the cluster has no KEDA (no `keda.sh`
        /// ScaledObject API), so nothing scales the service.
        pub const KEDA_NOT_INSTALLED: &str = "KedaNotInstalled";
        /// Provider `keda`: the operator was started without
        /// `--keda-prometheus-url`, so it cannot write the triggers.
        pub const KEDA_NOT_CONFIGURED: &str = "KedaNotConfigured";
        /// Provider `keda`: KEDA reports the ScaledObject not ready (a
        /// trigger it cannot evaluate, e.g. Prometheus unreachable).
        pub const AUTOSCALER_NOT_READY: &str = "AutoscalerNotReady";
        /// The service is scaled to zero replicas on purpose.
        pub const SCALED_TO_ZERO: &str = "ScaledToZero";
        /// Serving is settled; warm standby pods (prewarm) are still
        /// starting or loading the model.
        pub const FILLING_STANDBY: &str = "FillingStandby";
        /// Serving is settled; standby pods are pending because no node
        /// has free GPUs for them (the pool stays short until one does).
        pub const STANDBY_WAITING_FOR_GPU_CAPACITY: &str = "StandbyWaitingForGPUCapacity";
        /// Nothing to do: the observed state matches the spec.
        pub const RECONCILED: &str = "Reconciled";
        /// No problem detected.
        pub const HEALTHY: &str = "Healthy";
    }
}

/// The CRD as YAML, with a header saying it is generated. Deterministic.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let body = serde_yaml::to_string(&HndsrService::crd())?;
    Ok(format!(
        "# Generated by `crdgen` from crds/src (hndsr-crds); do not edit. Run `make generate`.\n{body}"
    ))
}

//! Deployment `<name>`: the serving pods.

use std::collections::BTreeMap;

use hndsr_contract::{env, http};
use hndsr_crds::{EffectiveServing, annotations, labels};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ImageVolumeSource, Lifecycle, LifecycleHandler, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceFieldSelector, ResourceRequirements, SeccompProfile, SecurityContext, SleepAction,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildConfig, Ctx, role_labels, role_selector};
use crate::{defaults, effective::Standby, quantity};

/// Name of the server container.
pub const SERVER_CONTAINER: &str = "server";
/// Name of the init container that downloads `weights.uri`.
pub const FETCH_CONTAINER: &str = "fetch-weights";
/// Volume name of the weights.
const WEIGHTS_VOLUME: &str = "weights";
/// Volume name of the writable /tmp (the root filesystem is read-only).
const TMP_VOLUME: &str = "tmp";
/// Size limit of /tmp: decoded images and tiles spill here at most briefly.
const TMP_SIZE_LIMIT: &str = "1Gi";
/// UID/GID the server runs as when the image does not say (non-root).
const RUN_AS_ID: i64 = 65532;
/// Seconds a pod may take to load and warm the model before it is restarted
/// (startup probe: period × failure threshold: 10 minutes). Probed every
/// second: the pod turns Ready within a second of its warm-up, which is the
/// whole of a scale-up's wait once the image is on the node; a probe is one
/// cheap local GET.
const STARTUP_PERIOD_SECONDS: i32 = 1;
const STARTUP_FAILURE_THRESHOLD: i32 = 600;
/// Rollout deadline: node provisioning, image pull and model load can take minutes.
const PROGRESS_DEADLINE_SECONDS: i32 = 1200;
const REVISION_HISTORY_LIMIT: i32 = 3;

/// Which set of pods a Deployment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Deployment `<name>`, selected by the Service and the autoscaler.
    Serving,
    /// Deployment `<name>-standby`: the same pods, warm and out of the
    /// Service, this many.
    Standby(i32),
}

pub(super) fn build(ctx: &Ctx<'_>, cfg: &BuildConfig, role: Role) -> Deployment {
    let spec = &ctx.svc.spec;
    let serving = &ctx.eff.serving;
    let (role_label, name) = match role {
        Role::Serving => (labels::ROLE_SERVING, ctx.name.clone()),
        Role::Standby(_) => (labels::ROLE_STANDBY, standby_name(&ctx.name)),
    };
    let pod_labels = role_labels(&ctx.name, role_label);
    let mut meta = ctx.meta(pod_labels.clone());
    meta.name = Some(name);
    let selector = role_selector(&ctx.name, role_label);

    let (volumes, init_containers) = weights_volumes(ctx, cfg);
    let pod = PodSpec {
        termination_grace_period_seconds: Some(ctx.eff.termination_grace_seconds),
        priority_class_name: spec
            .resources
            .as_ref()
            .and_then(|r| r.priority_class_name.clone()),
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers: vec![server_container(ctx, cfg, serving)],
        volumes: Some(volumes),
        ..placed_pod_spec(ctx)
    };
    let mut pod_annotations = BTreeMap::from([
        (annotations::PROMETHEUS_SCRAPE.to_owned(), "true".to_owned()),
        (
            annotations::PROMETHEUS_PORT.to_owned(),
            http::PORT.to_string(),
        ),
        (
            annotations::PROMETHEUS_PATH.to_owned(),
            http::METRICS_PATH.to_owned(),
        ),
    ]);
    // A standby pod may only take a serving pod's place when both come
    // from the same pod spec: the annotation says which (only with a
    // standby pool, so that other services' pods never roll for it).
    if ctx.eff.standby != Standby::None {
        pod_annotations.insert(annotations::POD_SPEC_HASH.to_owned(), pod_spec_hash(&pod));
    }

    Deployment {
        metadata: meta,
        spec: DeploymentSpec {
            replicas: match role {
                // Left out whenever an autoscaler owns the count, so neither
                // the operator nor a GitOps tool fights it.
                Role::Serving => {
                    (!ctx.eff.autoscaling_enabled()).then_some(ctx.eff.static_replicas)
                }
                Role::Standby(n) => Some(n),
            },
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // Surge, never drop below the current capacity; a surge pod that
            // finds no free GPU shows up as WaitingForGPUCapacity.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            progress_deadline_seconds: Some(PROGRESS_DEADLINE_SECONDS),
            revision_history_limit: Some(REVISION_HISTORY_LIMIT),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// Name of the standby Deployment of `name`.
#[must_use]
pub fn standby_name(name: &str) -> String {
    format!("{name}-standby")
}

/// A short digest of a pod spec (the serving and standby templates share
/// theirs).
fn pod_spec_hash(pod: &PodSpec) -> String {
    crate::ssa::spec_hash(pod).unwrap_or_default()
}

/// What every pod of the service shares, serving, standby or placeholder:
/// no API token or service links, non-root, the spec's nodes and tolerations
/// and pull secrets.
pub(super) fn placed_pod_spec(ctx: &Ctx<'_>) -> PodSpec {
    let spec = &ctx.svc.spec;
    let res = spec.resources.clone().unwrap_or_default();
    PodSpec {
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(pod_security_context()),
        node_selector: res.node_selector,
        tolerations: res.tolerations,
        affinity: res.affinity,
        image_pull_secrets: spec.model.image_pull_secrets.as_ref().map(|names| {
            names
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        ..PodSpec::default()
    }
}

/// Non-root with the runtime's seccomp profile.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_ID),
        run_as_group: Some(RUN_AS_ID),
        seccomp_profile: Some(runtime_default()),
        ..PodSecurityContext::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

pub(super) fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The server's CPU request in whole cores (rounded up), through the
/// downward API, so the server sizes libtorch's thread pools by the cores
/// it was given, not by the node's.
fn cpus_from_request() -> EnvVar {
    EnvVar {
        name: env::CPUS.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                container_name: Some(SERVER_CONTAINER.to_owned()),
                resource: "requests.cpu".to_owned(),
                divisor: Some(Quantity("1".to_owned())),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn http_probe(path: &str, period: i32, failures: i32, timeout: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(http::PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(timeout),
        ..Probe::default()
    }
}

fn server_container(ctx: &Ctx<'_>, cfg: &BuildConfig, serving: &EffectiveServing) -> Container {
    let spec = &ctx.svc.spec;
    let mut envs = vec![
        env_var(env::LISTEN_ADDR, format!("0.0.0.0:{}", http::PORT)),
        env_var(env::BACKEND, ctx.eff.backend.as_str()),
        env_var(env::SCALE, ctx.eff.scale.to_string()),
        env_var(env::DEVICE, ctx.eff.device),
    ];
    // Unset, the server picks by device and backend (the effective
    // precision is the same rule), so the default lives in one place. Pods
    // of specs without a precision roll out once when this operator version
    // first applies them (the variable disappears).
    if ctx.eff.precision_set {
        envs.push(env_var(env::PRECISION, ctx.eff.precision.as_str()));
    }
    if let Some(profile) = spec.model.profile {
        envs.push(env_var(env::PROFILE, profile.as_str()));
    }
    if let Some(steps) = spec.model.sampling_steps {
        envs.push(env_var(env::SAMPLING_STEPS, steps.to_string()));
    }
    if let Some(on) = spec.model.self_ensemble {
        envs.push(env_var(env::SELF_ENSEMBLE, on.to_string()));
    }
    if let Some(tile) = spec.model.tile {
        envs.push(env_var(env::TILE, tile.to_string()));
    }
    if let Some(steps) = spec.model.projection_steps {
        envs.push(env_var(env::PROJECTION_STEPS, steps.to_string()));
    }
    if let Some(w) = spec.model.weights.as_ref() {
        if let Some(path) = ctx.eff.weights.as_ref().and_then(|w| w.path.clone()) {
            envs.push(env_var(env::WEIGHTS_PATH, path));
        }
        envs.push(env_var(env::WEIGHTS_SHA256, w.sha256.clone()));
    }
    envs.extend([
        env_var(env::MAX_CONCURRENT, serving.max_concurrent.to_string()),
        env_var(env::MAX_QUEUE_DEPTH, serving.max_queue_depth.to_string()),
        env_var(
            env::REQUEST_TIMEOUT_S,
            serving.request_timeout_seconds.to_string(),
        ),
        env_var(
            env::RATE_LIMIT_PER_HOUR,
            serving.rate_limit_per_hour.to_string(),
        ),
        env_var(env::MAX_IMAGE_PIXELS, serving.max_image_pixels.to_string()),
        env_var(env::MAX_PAYLOAD_MB, serving.max_payload_mb.to_string()),
        env_var(env::DRAIN_SECONDS, serving.drain_seconds.to_string()),
        env_var(env::LOG_JSON, cfg.log_json.to_string()),
        cpus_from_request(),
    ]);
    // Only when set: the server's default leaves priorities alone.
    if let Some(nice) = spec.serving.as_ref().and_then(|s| s.inference_nice) {
        envs.push(env_var(env::INFERENCE_NICE, nice.to_string()));
    }
    // Lists only when set: the server's defaults are empty lists.
    let listed = spec.serving.as_ref();
    for (name, list) in [
        (
            env::TRUSTED_PROXIES,
            listed.and_then(|s| s.trusted_proxies.as_ref()),
        ),
        (
            env::CORS_ORIGINS,
            listed.and_then(|s| s.cors_origins.as_ref()),
        ),
    ] {
        if let Some(list) = list.filter(|l| !l.is_empty()) {
            envs.push(env_var(name, list.join(",")));
        }
    }

    let mut mounts = vec![VolumeMount {
        name: TMP_VOLUME.to_owned(),
        mount_path: "/tmp".to_owned(),
        ..VolumeMount::default()
    }];
    if spec
        .model
        .weights
        .as_ref()
        .is_some_and(|w| w.bundled != Some(true))
    {
        mounts.push(VolumeMount {
            name: WEIGHTS_VOLUME.to_owned(),
            mount_path: defaults::WEIGHTS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    Container {
        name: SERVER_CONTAINER.to_owned(),
        image: Some(spec.model.image.clone()),
        image_pull_policy: ctx.eff.image_pull_policy.map(|p| p.as_str().to_owned()),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some(http::PORT_NAME.to_owned()),
            container_port: i32::from(http::PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(ctx)),
        // Ready only once the model is loaded and warmed up; the startup
        // probe gives loading its time before liveness counts.
        startup_probe: Some(http_probe(
            http::READYZ_PATH,
            STARTUP_PERIOD_SECONDS,
            STARTUP_FAILURE_THRESHOLD,
            2,
        )),
        readiness_probe: Some(http_probe(http::READYZ_PATH, 5, 2, 2)),
        liveness_probe: Some(http_probe(http::HEALTHZ_PATH, 10, 3, 5)),
        // Keep serving while endpoints controllers and proxies drop the pod;
        // the server then drains on SIGTERM for drainSeconds.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(defaults::PRE_STOP_SLEEP_SECONDS),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// Requests and limits: GPUs as both, CPU/memory from the spec or the
/// defaults for GPU or CPU serving. No CPU limit unless asked (throttling
/// hurts latency more than it protects neighbours).
pub(super) fn resources(ctx: &Ctx<'_>) -> ResourceRequirements {
    let gpu = ctx.eff.gpu;
    let res = ctx.svc.spec.resources.clone().unwrap_or_default();
    let (cpu_req, mem_req, mem_lim) = if gpu > 0 {
        (
            defaults::GPU_POD_CPU_REQUEST,
            defaults::GPU_POD_MEMORY_REQUEST,
            defaults::GPU_POD_MEMORY_LIMIT,
        )
    } else {
        (
            defaults::CPU_POD_CPU_REQUEST,
            defaults::CPU_POD_MEMORY_REQUEST,
            defaults::CPU_POD_MEMORY_LIMIT,
        )
    };
    let cpu = res.cpu.unwrap_or_default();
    let mem = res.memory.unwrap_or_default();
    let q = |s: &str| Quantity(s.to_owned());

    // A default never contradicts what the spec sets: a default request
    // stays at or below a given limit, a default limit at or above a given
    // request (the API server refuses a request above its limit).
    let request_or_default = |given: Option<Quantity>, default: &str, limit: Option<&Quantity>| {
        given.unwrap_or_else(|| match limit {
            Some(l) if quantity::exceeds(&q(default), l) => l.clone(),
            _ => q(default),
        })
    };
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    requests.insert(
        "cpu".to_owned(),
        request_or_default(cpu.request, cpu_req, cpu.limit.as_ref()),
    );
    if let Some(l) = cpu.limit {
        limits.insert("cpu".to_owned(), l);
    }
    let mem_limit = mem.limit.clone().unwrap_or_else(|| match &mem.request {
        Some(r) if quantity::exceeds(r, &q(mem_lim)) => r.clone(),
        _ => q(mem_lim),
    });
    requests.insert(
        "memory".to_owned(),
        request_or_default(mem.request, mem_req, mem.limit.as_ref()),
    );
    limits.insert("memory".to_owned(), mem_limit);
    if gpu > 0 {
        let name = ctx.eff.gpu_resource_name.clone();
        requests.insert(name.clone(), Quantity(gpu.to_string()));
        limits.insert(name, Quantity(gpu.to_string()));
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..ResourceRequirements::default()
    }
}

/// The /tmp and weights volumes, and the init container for `weights.uri`.
fn weights_volumes(ctx: &Ctx<'_>, cfg: &BuildConfig) -> (Vec<Volume>, Vec<Container>) {
    let mut volumes = vec![Volume {
        name: TMP_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(TMP_SIZE_LIMIT.to_owned())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut init = Vec::new();
    let Some(w) = ctx.svc.spec.model.weights.as_ref() else {
        return (volumes, init);
    };
    if w.bundled == Some(true) {
        return (volumes, init);
    }
    let mut vol = Volume {
        name: WEIGHTS_VOLUME.to_owned(),
        ..Volume::default()
    };
    if let Some(pvc) = &w.pvc {
        vol.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.claim_name.clone(),
            read_only: Some(true),
        });
    } else if let Some(image) = &w.image {
        vol.image = Some(ImageVolumeSource {
            reference: Some(image.reference.clone()),
            pull_policy: image.pull_policy.map(|p| p.as_str().to_owned()),
        });
    } else if let Some(uri) = &w.uri {
        vol.empty_dir = Some(EmptyDirVolumeSource::default());
        let target = format!("{}/{}", defaults::WEIGHTS_DIR, defaults::WEIGHTS_FILE);
        let manifest_target = format!("{}/{}", defaults::WEIGHTS_DIR, defaults::MANIFEST_FILE);
        // Validation refuses a `uri` without a manifest URL before any build.
        let manifest_uri = ctx
            .eff
            .weights
            .as_ref()
            .and_then(|w| w.manifest_uri.clone())
            .unwrap_or_default();
        // Download to temporary names and verify before the final renames, so
        // a restarted init container never leaves a half-written file. The
        // server checks that the manifest names the same sha256.
        let script = "set -eu; \
             wget -q -O \"$MANIFEST.part\" \"$MANIFEST_URI\"; \
             wget -q -O \"$TARGET.part\" \"$WEIGHTS_URI\"; \
             echo \"$WEIGHTS_SHA256  $TARGET.part\" | sha256sum -c -; \
             mv \"$MANIFEST.part\" \"$MANIFEST\"; \
             mv \"$TARGET.part\" \"$TARGET\"";
        init.push(Container {
            name: FETCH_CONTAINER.to_owned(),
            image: Some(cfg.fetcher_image.clone()),
            command: Some(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]),
            env: Some(vec![
                env_var("WEIGHTS_URI", uri.clone()),
                env_var("WEIGHTS_SHA256", w.sha256.clone()),
                env_var("TARGET", target),
                env_var("MANIFEST_URI", manifest_uri),
                env_var("MANIFEST", manifest_target),
            ]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("100m".to_owned())),
                    ("memory".to_owned(), Quantity("64Mi".to_owned())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("256Mi".to_owned()),
                )])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(vec![VolumeMount {
                name: WEIGHTS_VOLUME.to_owned(),
                mount_path: defaults::WEIGHTS_DIR.to_owned(),
                ..VolumeMount::default()
            }]),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        });
    }
    volumes.push(vol);
    (volumes, init)
}

//! The reconciler: `HndsrService` → Deployment, Service, HPA, PDB, the
//! prewarm Deployments and status.
//!
//! Phases of one pass ([`reconcile`]):
//! 1. **read** the observed children and pods from the watch caches;
//! 2. **resolve** the spec (defaults, validation: [`crate::effective`]) and
//!    **build** the desired children (pure, [`crate::builders`]);
//! 3. **apply** each child with server-side apply, skipped when the live
//!    child already matches ([`crate::ssa`]); delete optional children the
//!    spec no longer asks for; with a standby pool, **promote** warm
//!    standby pods into cold serving slots ([`crate::standby`]);
//! 4. **status**: compute it (pure, [`crate::status`]) and patch `/status`
//!    only when it changed;
//! 5. **events** for every write and every condition transition.
//!
//! An invalid spec sets `Ready=False/InvalidSpec` plus a Warning event and
//! waits for a change (no requeue loop); transient errors go to
//! [`error_policy`], which requeues with per-object exponential backoff.

use std::{sync::Arc, time::Duration};

use hndsr_crds::{AutoscalingProvider, HndsrService, HndsrServiceStatus, conditions, labels};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ObjectReference, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
    jiff::Timestamp,
};
use kube::{
    Resource, ResourceExt,
    api::{Api, DeleteParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    builders::{self, Children, ScaledObject},
    context::Context,
    effective::{self, EffectiveSpec, Standby},
    error::{Error, Result},
    slim,
    ssa::{self, EnsureError, Outcome},
    standby,
    status::{self, Observed},
    zero,
};

/// Periodic resync of a healthy object: cheap, because a pass that finds
/// nothing to do makes no API calls.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Retry of a pass that found the watch caches still listing.
pub const UNSYNCED_RETRY: Duration = Duration::from_secs(1);

/// Reconciles one `HndsrService`. See the module docs for the phases.
///
/// # Errors
/// Transient API failures; [`error_policy`] decides the retry.
pub async fn reconcile(svc: Arc<HndsrService>, ctx: Arc<Context>) -> Result<Action> {
    // `main` starts the controller only once the caches are synced; this
    // keeps any other caller (a test, a future refactor) from acting on a
    // half-listed cache.
    if !ctx.stores.synced() {
        tracing::debug!(name = %svc.name_any(), "watch caches not synced yet; retrying");
        return Ok(Action::requeue(UNSYNCED_RETRY));
    }
    let started = std::time::Instant::now();
    let result = reconcile_inner(&svc, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::reason));
    match &result {
        Ok(_) => ctx.backoff.reset(&ObjectRef::from_obj(&*svc)),
        Err(err) => {
            tracing::warn!(name = %svc.name_any(), namespace = ?svc.namespace(), error = %err, "reconcile failed");
            let note = truncate(&err.to_string(), 1000);
            publish(
                &ctx,
                &svc,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                note,
            )
            .await;
        }
    }
    result
}

/// Requeue after a failed pass: per-object exponential backoff (1 s doubling
/// to 5 minutes, with jitter), reset by the next success.
pub fn error_policy(svc: Arc<HndsrService>, _err: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff.next(&ObjectRef::from_obj(&*svc)))
}

async fn reconcile_inner(svc: &HndsrService, ctx: &Context) -> Result<Action> {
    // The status to reconcile from: our own last write when the cache does
    // not show it yet (see `WrittenStatuses`).
    let key = ObjectRef::from_obj(svc);
    let current = ctx.written.current(&key, svc.status.as_ref());
    let refreshed;
    let svc = if current == svc.status {
        svc
    } else {
        let mut copy = svc.clone();
        copy.status = current;
        refreshed = copy;
        &refreshed
    };
    let name = svc.name_any();
    let ns = svc
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;

    // 1. read
    let observed = observe(&ctx.stores, &ns, &name);

    // 2. resolve (defaults, validation) + build (pure)
    let desired = effective::resolve(svc).and_then(|eff| {
        let serving = status::want_replicas(&eff, &observed);
        let children = builders::desired(svc, &eff, &ctx.build, serving)?;
        Ok((eff, children))
    });
    let now = Timestamp::now();
    let (eff, children) = match desired {
        Ok(resolved) => resolved,
        Err(invalid) => {
            let new = status::compute(svc, Err(&invalid), &observed, now);
            patch_status_if_changed(svc, ctx, &ns, &new).await?;
            // Also when the spec is invalid in a new way (same reason, new message).
            let old_message = svc
                .status
                .as_ref()
                .and_then(|s| find(s, conditions::READY))
                .map(|c| c.message.as_str());
            let new_message = find(&new, conditions::READY).map(|c| c.message.as_str());
            if condition_changed(svc.status.as_ref(), &new, conditions::READY)
                || old_message != new_message
            {
                let note = truncate(&format!("the spec is invalid: {invalid}"), 1000);
                publish(
                    ctx,
                    svc,
                    EventType::Warning,
                    conditions::reasons::INVALID_SPEC,
                    "Validate",
                    note,
                )
                .await;
            }
            // Nothing will fix itself: wait for the next spec change.
            return Ok(Action::await_change());
        }
    };

    // 3. apply
    let mut observed = observed;
    // An applied Deployment is newer than the cache's: when its spec changed,
    // its generation is ahead of its status, which is a rollout the cache
    // cannot show yet.
    if let Some(applied) = apply_children(svc, ctx, &ns, children.clone()).await? {
        observed.deployment = Some(applied);
    }

    // 3b. fill cold serving slots with warm standby pods
    if eff.standby != Standby::None {
        promote(svc, ctx, &ns, &observed).await?;
    }

    // 3c. provider keda: the ScaledObject, and at zero the zero responder
    reconcile_keda(svc, ctx, &ns, &eff, &children, &mut observed).await?;

    // 4. status
    let new = status::compute(svc, Ok((&eff, &children)), &observed, now);
    patch_status_if_changed(svc, ctx, &ns, &new).await?;

    // 5. events on condition transitions
    for ty in [conditions::READY, conditions::DEGRADED] {
        if condition_changed(svc.status.as_ref(), &new, ty)
            && let Some(c) = find(&new, ty)
        {
            // Degraded=True is what needs a human; Ready=False on its own is
            // usually progress (creating, loading the model, rolling out).
            let warning = ty == conditions::DEGRADED && c.status == "True";
            if ty == conditions::DEGRADED && !warning && svc.status.is_none() {
                continue; // "not degraded" on creation is no news
            }
            let degraded_says_it = find(&new, conditions::DEGRADED)
                .is_some_and(|d| d.status == "True" && d.reason == c.reason)
                && condition_changed(svc.status.as_ref(), &new, conditions::DEGRADED);
            if ty == conditions::READY && degraded_says_it {
                continue; // one Warning below says it
            }
            let kind = if warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let note = truncate(&format!("{ty}={}: {}", c.status, c.message), 1000);
            publish(ctx, svc, kind, &c.reason, "Status", note).await;
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// The observed children and serving pods of `ns/name`, from the caches.
#[must_use]
pub fn observe(stores: &crate::context::Stores, ns: &str, name: &str) -> Observed {
    let deployment = get_cached(&stores.deployments, ns, name);
    let hpa = get_cached(&stores.hpas, ns, name);
    let (mut pods, mut standby_pods) = (Vec::new(), Vec::new());
    for p in stores.pods.state() {
        if p.metadata.namespace.as_deref() != Some(ns)
            || p.labels().get(labels::SERVICE).map(String::as_str) != Some(name)
        {
            continue;
        }
        match p.labels().get(labels::ROLE).map(String::as_str) {
            Some(labels::ROLE_SERVING) => pods.push((*p).clone()),
            Some(labels::ROLE_STANDBY) => standby_pods.push((*p).clone()),
            _ => {}
        }
    }
    let prewarm_deployments = [
        builders::standby_name(name),
        builders::placeholder_name(name),
    ]
    .iter()
    .filter_map(|n| get_cached(&stores.deployments, ns, n))
    .collect();
    Observed {
        deployment,
        hpa,
        pods,
        standby_pods,
        prewarm_deployments,
        scaled_object: None,
        keda_missing: false,
    }
}

/// What the last status says the service was: provider `keda`, and allowed
/// to scale to zero. A spec that leaves either must clean up after it.
fn was_keda(svc: &HndsrService) -> (bool, bool) {
    let a = svc.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let keda = a.is_some_and(|a| a.provider == AutoscalingProvider::Keda);
    (keda, keda && a.is_some_and(|a| a.min_replicas == 0))
}

/// Provider `keda`: applies the ScaledObject (there is no watch on it, so
/// it is read here: an API without KEDA would keep a watch from syncing)
/// and, while the service has no ready serving pod, routes its Service to
/// the zero responder ([`crate::zero`]). Cleans both up when the spec
/// leaves KEDA or scale to zero.
async fn reconcile_keda(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    eff: &EffectiveSpec,
    children: &Children,
    observed: &mut Observed,
) -> Result<()> {
    let name = svc.name_any();
    let (was_keda, was_zero) = was_keda(svc);
    let objects: Api<ScaledObject> = Api::namespaced(ctx.client.clone(), ns);
    let read = |kind: &'static str, name: String| {
        move |source| Error::Read {
            kind,
            namespace: ns.to_owned(),
            name,
            source,
        }
    };
    if let Some(so) = &children.scaled_object {
        let live = objects
            .get_opt(&name)
            .await
            .map_err(read("ScaledObject", name.clone()))?;
        match apply_read(svc, ctx, ns, so.clone(), live.clone()).await {
            Ok(applied) => observed.scaled_object = applied.or(live),
            // The API server has no keda.sh API: KEDA is not installed.
            Err(Error::Apply {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 => observed.keda_missing = true,
            Err(e) => return Err(e),
        }
    } else if was_keda {
        let live = objects
            .get_opt(&name)
            .await
            .map_err(read("ScaledObject", name.clone()))?;
        delete_if_owned(svc, ctx, ns, live).await?;
    }

    let routes_to_zero = children.zero_slice.is_some();
    if !(routes_to_zero || was_zero) {
        ctx.zero.remove(ns, &name);
        return Ok(());
    }
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
    let slice_name = builders::zero_slice_name(&name);
    let live = slices
        .get_opt(&slice_name)
        .await
        .map_err(read("EndpointSlice", slice_name.clone()))?;
    match &children.zero_slice {
        Some(slice) if zero::at_zero(eff, &observed.pods) => {
            if !ctx.zero.contains(ns, &name) {
                ctx.zero
                    .insert(ns, &name, cluster_ip(ctx, ns, &name).await?);
            }
            apply_read(svc, ctx, ns, slice.clone(), live).await?;
        }
        _ => {
            ctx.zero.remove(ns, &name);
            delete_if_owned(svc, ctx, ns, live).await?;
        }
    }
    Ok(())
}

/// The Service's cluster IP (the zero responder matches a `Host` that is
/// an IP by it); one read when a service reaches zero.
async fn cluster_ip(ctx: &Context, ns: &str, name: &str) -> Result<Option<std::net::IpAddr>> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let svc = services.get_opt(name).await.map_err(|source| Error::Read {
        kind: "Service",
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    })?;
    Ok(svc
        .and_then(|s| s.spec?.cluster_ip)
        .and_then(|ip| ip.parse().ok()))
}

/// Relabels ready standby pods into the serving slots the ReplicaSet has
/// just made ([`standby::promotions`]); one event per pass that promoted.
async fn promote(svc: &HndsrService, ctx: &Context, ns: &str, observed: &Observed) -> Result<()> {
    let moves = standby::promotions(
        &observed.pods,
        &observed.standby_pods,
        &ctx.in_flight.busy(ns),
    );
    if moves.is_empty() {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut promoted = Vec::new();
    for m in &moves {
        let patch = serde_json::json!({
            "metadata": { "labels": {
                labels::ROLE: labels::ROLE_SERVING,
                standby::POD_TEMPLATE_HASH: m.template_hash,
            }}
        });
        match api
            .patch(&m.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Gone since the cache saw it (scaled down, evicted): the slot
            // waits for the next warm pod or its own cold start.
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(source) => {
                return Err(Error::Apply {
                    kind: "Pod",
                    namespace: ns.to_owned(),
                    name: m.pod.clone(),
                    source,
                });
            }
        }
        ctx.in_flight.record(ns, m);
        promoted.push(m.pod.as_str());
        ctx.metrics.promotions.inc();
        tracing::info!(pod = %m.pod, replaces = %m.replaces, namespace = %ns, "promoted a standby pod");
    }
    if promoted.is_empty() {
        return Ok(());
    }
    let note = truncate(
        &format!(
            "promoted {} warm standby pod(s) into the serving set: {}",
            promoted.len(),
            promoted.join(", ")
        ),
        1000,
    );
    publish(ctx, svc, EventType::Normal, "Promoted", "Promote", note).await;
    Ok(())
}

fn get_cached<K>(store: &Store<K>, ns: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .map(|k| (*k).clone())
}

/// Applies every child; returns the Deployment as the API server answered
/// its apply, if it was applied.
async fn apply_children(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    children: Children,
) -> Result<Option<Deployment>> {
    let Children {
        deployment,
        service,
        hpa,
        pdb,
        placeholders,
        standby,
        ..
    } = children;
    let name = svc.name_any();
    let stores = &ctx.stores;
    let live_deployment = get_cached(&stores.deployments, ns, &name);
    if deployment.spec.replicas.is_none()
        && let Some(live) = &live_deployment
        && controlled_by(live, svc)
    {
        hand_over_replicas(ctx, ns, live).await?;
    }
    // Leaving KEDA while it holds the Deployment at zero: an HPA does
    // nothing for a target at zero replicas (it reads that as autoscaling
    // switched off), so the service would stay at zero for good. Start it
    // at the HPA's minimum, once, on the pass that switches.
    if let (Some(hpa), Some(live)) = (&hpa, &live_deployment)
        && was_keda(svc).0
        && live.spec.replicas == Some(0)
        && controlled_by(live, svc)
    {
        let min = hpa.spec.min_replicas.unwrap_or(1);
        apply_replicas(ctx, ns, &name, min).await?;
        tracing::info!(%name, namespace = %ns, replicas = min, "left KEDA at zero: started at the HPA's minimum");
    }
    let applied_deployment = apply_one(svc, ctx, ns, deployment, live_deployment).await?;
    let live_service = get_cached(&stores.services, ns, &name).map(slim::from_meta);
    apply_one(svc, ctx, ns, service, live_service).await?;
    match hpa {
        Some(hpa) => {
            apply_one(svc, ctx, ns, hpa, get_cached(&stores.hpas, ns, &name)).await?;
        }
        None => delete_if_owned(svc, ctx, ns, get_cached(&stores.hpas, ns, &name)).await?,
    }
    let live_pdb = get_cached(&stores.pdbs, ns, &name).map(slim::from_meta);
    match pdb {
        Some(pdb) => {
            apply_one(svc, ctx, ns, pdb, live_pdb).await?;
        }
        None => delete_if_owned(svc, ctx, ns, live_pdb).await?,
    }
    let live_standby = get_cached(&stores.deployments, ns, &builders::standby_name(&name));
    match standby {
        Some(standby) => {
            apply_one(svc, ctx, ns, standby, live_standby).await?;
        }
        None => delete_if_owned(svc, ctx, ns, live_standby).await?,
    }
    let placeholder_name = builders::placeholder_name(&name);
    let live_placeholders = get_cached(&stores.deployments, ns, &placeholder_name);
    match placeholders {
        Some(placeholders) => {
            apply_one(svc, ctx, ns, placeholders, live_placeholders).await?;
        }
        None => delete_if_owned(svc, ctx, ns, live_placeholders).await?,
    }
    Ok(applied_deployment)
}

/// A child object the operator applies or deletes: namespaced, typed,
/// (de)serialisable.
trait Child:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
{
}

async fn apply_one<K>(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    desired: K,
    live: Option<K>,
) -> Result<Option<K>>
where
    K: Child,
{
    // Never take over an object someone else made: the cache only holds
    // objects with our label, so on a miss ask the API server (a read on the
    // rare create path only) before applying over whatever has that name.
    let live = match live {
        Some(live) => Some(live),
        None => {
            let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
            let name = desired.name_any();
            api.get_opt(&name).await.map_err(|source| Error::Read {
                kind: static_kind::<K>(),
                namespace: ns.to_owned(),
                name,
                source,
            })?
        }
    };
    // Boxed: inlined, the two state machines overflow a debug-build stack.
    Box::pin(apply_read(svc, ctx, ns, desired, live)).await
}

/// [`apply_one`] over `live` as just read from the API server (no cache
/// behind it, so `None` means absent, not "not cached").
async fn apply_read<K>(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    desired: K,
    live: Option<K>,
) -> Result<Option<K>>
where
    K: Child,
{
    let kind = static_kind::<K>();
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(existing) = &live
        && !controlled_by(existing, svc)
    {
        return Err(Error::Conflict {
            kind,
            namespace: ns.to_owned(),
            name,
        });
    }
    let (outcome, applied) =
        ssa::ensure(&api, desired, live.as_ref())
            .await
            .map_err(|e| match e {
                EnsureError::Serialize(source) => Error::Serialize { kind, source },
                EnsureError::Api(source) => Error::Apply {
                    kind,
                    namespace: ns.to_owned(),
                    name: name.clone(),
                    source,
                },
            })?;
    if outcome.wrote() {
        ctx.metrics.applies.with_label_values(&[kind]).inc();
        let (reason, note) = match outcome {
            Outcome::Created => ("Created", format!("created {kind} {name}")),
            Outcome::Updated => ("Updated", format!("applied the new spec to {kind} {name}")),
            _ => (
                "DriftReverted",
                format!("{kind} {name} was changed by someone else; restored it"),
            ),
        };
        tracing::info!(%kind, %name, namespace = %ns, reason, "applied child");
        publish(ctx, svc, EventType::Normal, reason, "Apply", note).await;
    }
    Ok(applied)
}

/// Before the first apply without `spec.replicas` (an autoscaler takes the
/// count over), applies the live count under the handover field manager,
/// so dropping our claim does not reset the Deployment to 1 replica while
/// warm pods serve ([`ssa::owns_replicas`]).
async fn hand_over_replicas(ctx: &Context, ns: &str, live: &Deployment) -> Result<()> {
    if !ssa::owns_replicas(live.meta().managed_fields.as_deref().unwrap_or_default()) {
        return Ok(());
    }
    let Some(replicas) = live.spec.replicas else {
        return Ok(());
    };
    apply_replicas(ctx, ns, &live.name_any(), replicas).await?;
    tracing::info!(name = %live.name_any(), namespace = %ns, replicas, "handed spec.replicas over to the autoscaler");
    Ok(())
}

/// `spec.replicas` of Deployment `name` set to `replicas` under the
/// handover field manager (the autoscaler's next scale takes it over).
async fn apply_replicas(ctx: &Context, ns: &str, name: &str, replicas: i32) -> Result<()> {
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "replicas": replicas },
    });
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let params = PatchParams::apply(ssa::REPLICAS_HANDOVER_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Apply {
            kind: "Deployment",
            namespace: ns.to_owned(),
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

/// Whether `obj` has a controller owner reference to `svc` (by uid).
fn controlled_by<K: Resource>(obj: &K, svc: &HndsrService) -> bool {
    obj.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == svc.metadata.uid.as_ref())
}

async fn delete_if_owned<K>(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    live: Option<K>,
) -> Result<()>
where
    K: Child,
{
    let Some(live) = live else { return Ok(()) };
    if !controlled_by(&live, svc) {
        return Ok(());
    }
    let kind = static_kind::<K>();
    let name = live.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(source) => {
            return Err(Error::Delete {
                kind,
                namespace: ns.to_owned(),
                name,
                source,
            });
        }
    }
    let note = format!("deleted {kind} {name}: the spec no longer asks for it");
    publish(ctx, svc, EventType::Normal, "Deleted", "Delete", note).await;
    Ok(())
}

/// A `'static` kind name for metric labels and errors.
fn static_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "HorizontalPodAutoscaler" => "HorizontalPodAutoscaler",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "ScaledObject" => "ScaledObject",
        "EndpointSlice" => "EndpointSlice",
        _ => "Other",
    }
}

/// Merge-patches `/status` when `new` differs from what the object has.
/// Top-level fields that disappeared are sent as `null` so the merge patch
/// removes them.
async fn patch_status_if_changed(
    svc: &HndsrService,
    ctx: &Context,
    ns: &str,
    new: &HndsrServiceStatus,
) -> Result<()> {
    if svc.status.as_ref() == Some(new) {
        return Ok(());
    }
    let patch =
        status_merge_patch(svc.status.as_ref(), new).map_err(|source| Error::Serialize {
            kind: "HndsrServiceStatus",
            source,
        })?;
    let api: Api<HndsrService> = Api::namespaced(ctx.client.clone(), ns);
    let patched = api
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|source| Error::PatchStatus {
            namespace: ns.to_owned(),
            name: svc.name_any(),
            source,
        })?;
    ctx.metrics.status_patches.inc();
    // The server's form of what was written (timestamps in whole seconds),
    // which is what the watch cache will show.
    ctx.written.record(
        ObjectRef::from_obj(svc),
        svc.status.clone(),
        patched.status.unwrap_or_else(|| new.clone()),
    );
    Ok(())
}

/// `{"status": new}` with explicit nulls for fields only `old` has.
///
/// # Errors
/// Serialisation failed.
pub fn status_merge_patch(
    old: Option<&HndsrServiceStatus>,
    new: &HndsrServiceStatus,
) -> serde_json::Result<Value> {
    let mut new_json = serde_json::to_value(new)?;
    if let (Some(old), Some(obj)) = (old, new_json.as_object_mut())
        && let Value::Object(old_json) = serde_json::to_value(old)?
    {
        for key in old_json.keys() {
            obj.entry(key.clone()).or_insert(Value::Null);
        }
    }
    Ok(serde_json::json!({ "status": new_json }))
}

fn find<'a>(status: &'a HndsrServiceStatus, ty: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == ty)
}

/// Whether condition `ty` changed status or reason between `old` and `new`.
#[must_use]
pub fn condition_changed(
    old: Option<&HndsrServiceStatus>,
    new: &HndsrServiceStatus,
    ty: &str,
) -> bool {
    let before = old.and_then(|o| find(o, ty));
    let after = find(new, ty);
    match (before, after) {
        (Some(b), Some(a)) => b.status != a.status || b.reason != a.reason,
        (None, None) => false,
        _ => true,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Publishes an event about `svc`; failures are logged, never fatal (an
/// event is information, not state).
async fn publish(
    ctx: &Context,
    svc: &HndsrService,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let reference: ObjectReference = svc.object_ref(&());
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(%error, reason, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn cond(ty: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: ty.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn removed_status_fields_are_nulled() {
        let old = HndsrServiceStatus {
            endpoint: Some("http://x".into()),
            replicas: Some(1),
            ..HndsrServiceStatus::default()
        };
        let new = HndsrServiceStatus {
            replicas: Some(2),
            ..HndsrServiceStatus::default()
        };
        let patch = status_merge_patch(Some(&old), &new).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"status": {"replicas": 2, "endpoint": null}})
        );
    }

    #[test]
    fn condition_transitions() {
        let a = HndsrServiceStatus {
            conditions: vec![cond("Ready", "False", "LoadingModel")],
            ..HndsrServiceStatus::default()
        };
        let b = HndsrServiceStatus {
            conditions: vec![cond("Ready", "True", "Available")],
            ..HndsrServiceStatus::default()
        };
        assert!(condition_changed(Some(&a), &b, "Ready"));
        assert!(!condition_changed(Some(&b), &b, "Ready"));
        assert!(condition_changed(None, &b, "Ready"));
        assert!(!condition_changed(Some(&b), &b, "Degraded"));
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}

//! The reconciler against a mocked API server (tower-test): exact call
//! sequences for create, update, steady state, drift, a deleted child, an
//! invalid spec and a transient error.
//!
//! The observed children come from in-memory watch caches the test fills,
//! so the mocked API server only sees what the reconciler *writes*.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hndsr_crds::{FIELD_MANAGER, HndsrService};
use hndsr_operator::{
    builders::{self, BuildConfig, Children},
    context::{Context, Stores},
    controller::{error_policy, reconcile},
    effective::EffectiveSpec,
    error::Error,
    metrics::Metrics,
    slim,
    ssa::{self, SPEC_HASH},
    status::{self, Observed},
    zero::ZeroResponder,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentStatus},
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{Pod, Service},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry},
    jiff::Timestamp,
};
use kube::{
    Client, Resource, ResourceExt,
    client::Body,
    core::{PartialObjectMeta, PartialObjectMetaExt},
    runtime::{
        controller::Action,
        reflector::{self, store::Writer},
        watcher,
    },
};
use serde::Serialize;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);
type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request the reconciler made.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn is_event(&self) -> bool {
        self.path.starts_with("/apis/events.k8s.io/")
    }
    /// `PATCH deployments` etc.: method and resource plural (and subresource).
    fn short(&self) -> String {
        let parts: Vec<&str> = self.path.split('/').collect();
        // /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>[/<sub>]
        // /api/<version>/namespaces/<ns>/<plural>/<name>
        let ns_at = parts.iter().position(|p| *p == "namespaces").unwrap_or(0);
        let plural = parts.get(ns_at + 2).copied().unwrap_or("");
        let sub = parts
            .get(ns_at + 4)
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        format!("{} {plural}{sub}", self.method)
    }
}

/// How the mocked API server answers, per test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Every write succeeds and echoes its body.
    Accept,
    /// Applies of Deployments fail with 500; everything else succeeds.
    DeploymentApplyFails,
    /// A Service with the child's name exists, made by someone else.
    ForeignService,
    /// The API server has no keda.sh API.
    KedaMissing,
    /// The zero EndpointSlice exists (ours).
    ZeroSliceExists,
}

impl Scenario {
    /// `live_deployment`: the live Deployment, which an apply updates.
    fn respond(
        self,
        call: &Call,
        svc_json: &Value,
        live_deployment: Option<&Value>,
    ) -> (StatusCode, Value) {
        if self == Self::DeploymentApplyFails
            && call.method == Method::PATCH
            && call.path.contains("/deployments/")
        {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500}),
            );
        }
        if self == Self::KedaMissing && call.path.contains("/scaledobjects/") {
            return (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "the server could not find the requested resource",
                       "reason": "NotFound", "code": 404}),
            );
        }
        if call.method == Method::GET
            && self == Self::ZeroSliceExists
            && call.path.contains("/endpointslices/")
        {
            let name = call.path.rsplit('/').next().unwrap();
            return (
                StatusCode::OK,
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": name, "namespace": "team-a",
                                    "ownerReferences": [{"apiVersion": "hndsr.io/v1alpha1", "kind": "HndsrService",
                                                         "name": "sr", "uid": "uid-sr", "controller": true}]},
                       "addressType": "IPv4", "endpoints": []}),
            );
        }
        if call.method == Method::GET {
            if self == Self::ForeignService && call.path.contains("/services/") {
                let name = call.path.rsplit('/').next().unwrap();
                return (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": name, "namespace": "team-a", "uid": "someone-else"},
                           "spec": {"ports": [{"port": 80}]}}),
                );
            }
            // Children missing from the cache are missing on the server too.
            return (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "not found", "reason": "NotFound", "code": 404}),
            );
        }
        if call.path.ends_with("/status") {
            // The reconciler ignores the body; answer with the object.
            return (StatusCode::OK, svc_json.clone());
        }
        if call.path.contains("/deployments/") {
            return (StatusCode::OK, applied(&call.body, live_deployment));
        }
        (StatusCode::OK, call.body.clone())
    }
}

/// What the API server answers an apply of Deployment `body` with: the
/// body, with the live object's status, and its generation moved on only if
/// the spec changed.
fn applied(body: &Value, live: Option<&Value>) -> Value {
    let mut out = body.clone();
    let generation = match live {
        None => 1,
        Some(live) => {
            let old = live["metadata"]["generation"].as_i64().unwrap_or(1);
            old + i64::from(live["spec"] != body["spec"])
        }
    };
    out["metadata"]["generation"] = json!(generation);
    if let Some(status) = live.map(|l| &l["status"]).filter(|s| !s.is_null()) {
        out["status"] = status.clone();
    }
    out
}

/// Serves requests, recording each call, until `stop` fires; hands the
/// mock back for the next reconcile.
async fn api_server(
    mut handle: Handle,
    scenario: Scenario,
    svc_json: Value,
    live_deployment: Option<Value>,
    calls: Arc<Mutex<Vec<Call>>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Handle {
    loop {
        let next = tokio::select! {
            _ = &mut stop => return handle,
            next = handle.next_request() => next,
        };
        let Some((req, send)) = next else {
            return handle;
        };
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let call = Call {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        let (code, body) = scenario.respond(&call, &svc_json, live_deployment.as_ref());
        calls.lock().unwrap().push(call);
        send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
}

/// The writer halves of the caches, to fill them like a watch would
/// (through the same [`slim`] trimming, so every test also proves the
/// trimmed caches hold what a reconcile reads).
struct Caches {
    deployments: Writer<Deployment>,
    services: Writer<PartialObjectMeta<Service>>,
    hpas: Writer<HorizontalPodAutoscaler>,
    pdbs: Writer<PartialObjectMeta<PodDisruptionBudget>>,
    pods: Writer<Pod>,
    synced: tokio::sync::watch::Sender<bool>,
}

fn put<K>(w: &mut Writer<K>, obj: K)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    w.apply_watcher_event(&watcher::Event::Apply(obj));
}

/// A child as its metadata-only watch caches it.
fn put_meta<K>(w: &mut Writer<PartialObjectMeta<K>>, obj: K)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut m = obj.meta().clone().into_request_partial::<K>();
    slim::partial(&mut m);
    put(w, m);
}

struct Harness {
    ctx: Arc<Context>,
    caches: Caches,
    /// The whole live Deployment (the cache holds it trimmed).
    live_deployment: Option<Deployment>,
    handle: Option<Handle>,
}

fn harness() -> Harness {
    harness_with(BuildConfig::default())
}

/// A harness whose operator has `cfg` (e.g. KEDA settings).
fn harness_with(cfg: BuildConfig) -> Harness {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (deployments, dw) = reflector::store();
    let (services, sw) = reflector::store();
    let (hpas, hw) = reflector::store();
    let (pdbs, pw) = reflector::store();
    let (pods, podw) = reflector::store();
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let stores = Stores {
        deployments,
        services,
        hpas,
        pdbs,
        pods,
        synced,
    };
    let metrics = Metrics::new();
    let zero = ZeroResponder::new(&metrics, "cluster.local", 10);
    let ctx = Context::new(client, "test-0", metrics, stores, cfg, zero);
    let mut h = Harness {
        ctx,
        caches: Caches {
            deployments: dw,
            services: sw,
            hpas: hw,
            pdbs: pw,
            pods: podw,
            synced: synced_tx,
        },
        live_deployment: None,
        handle: Some(handle),
    };
    h.caches.list_done();
    h
}

impl Harness {
    /// The live Deployment is `d`; its watch caches it trimmed.
    fn put_deployment(&mut self, d: Deployment) {
        self.live_deployment = Some(d.clone());
        let mut cached = d;
        slim::deployment(&mut cached);
        put(&mut self.caches.deployments, cached);
    }

    /// Swaps in an empty Deployment cache that has not finished its
    /// initial list (the moments after an operator start); returns what
    /// the old cache held.
    fn restart_listing_deployments(&mut self) -> Vec<Deployment> {
        let held = self
            .ctx
            .stores
            .deployments
            .state()
            .iter()
            .map(|d| (**d).clone())
            .collect();
        let (deployments, dw) = reflector::store();
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let mut stores = self.ctx.stores.clone();
        stores.deployments = deployments;
        stores.synced = synced;
        self.caches.synced = synced_tx;
        self.ctx = Context::new(
            self.ctx.client.clone(),
            "test-0",
            Metrics::new(),
            stores,
            BuildConfig::default(),
            self.ctx.zero.clone(),
        );
        self.caches.deployments = dw;
        held
    }
}

impl Caches {
    /// Ends every (still empty) cache's initial list, as the watches do
    /// once listed.
    fn list_done(&mut self) {
        fn done<K>(w: &mut Writer<K>)
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            w.apply_watcher_event(&watcher::Event::InitDone);
        }
        done(&mut self.deployments);
        done(&mut self.services);
        done(&mut self.hpas);
        done(&mut self.pdbs);
        done(&mut self.pods);
        self.synced.send_replace(true);
    }
}

impl Harness {
    /// Runs one reconcile against the mocked API server; returns its result
    /// and every call it made.
    async fn reconcile(
        &mut self,
        svc: &HndsrService,
        scenario: Scenario,
    ) -> (Result<Action, Error>, Vec<Call>) {
        let svc_json = serde_json::to_value(svc).unwrap();
        let live_deployment = self
            .live_deployment
            .as_ref()
            .map(|d| serde_json::to_value(d).unwrap());
        let handle = self
            .handle
            .take()
            .expect("the mock is back from the last reconcile");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(api_server(
            handle,
            scenario,
            svc_json,
            live_deployment,
            calls.clone(),
            stopped,
        ));
        let result =
            tokio::time::timeout(TIMEOUT, reconcile(Arc::new(svc.clone()), self.ctx.clone()))
                .await
                .expect("reconcile against the mock timed out");
        // Every request has been answered once reconcile returned.
        let _ = stop.send(());
        let handle = tokio::time::timeout(TIMEOUT, server)
            .await
            .expect("mock API server did not stop")
            .expect("mock API server panicked");
        self.handle = Some(handle);
        let calls = calls.lock().unwrap().clone();
        (result, calls)
    }
}

fn service(image: &str, generation: i64) -> HndsrService {
    serde_json::from_value(json!({
        "apiVersion": "hndsr.io/v1alpha1",
        "kind": "HndsrService",
        "metadata": {"name": "sr", "namespace": "team-a", "uid": "uid-sr", "generation": generation},
        "spec": {
            "model": {"image": image, "backend": "bicubic"},
            "resources": {"gpu": 0},
            "autoscaling": {"maxReplicas": 3}
        }
    }))
    .unwrap()
}

fn invalid_service() -> HndsrService {
    let mut svc = service("img:1", 2);
    svc.spec.autoscaling.as_mut().unwrap().min_replicas = Some(5); // > maxReplicas 3
    svc
}

/// A managedFields tree in which `FIELD_MANAGER` owns every field of `v`
/// (list items keyed by `name`, else by index), as the API server records
/// after our apply.
fn owned_fields(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (format!("f:{k}"), owned_fields(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Object(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let key = match item.get("name") {
                        Some(n) => format!("k:{}", json!({"name": n})),
                        None => format!("i:{i}"),
                    };
                    (key, owned_fields(item))
                })
                .collect(),
        ),
        _ => json!({}),
    }
}

/// What the API server holds after our apply of `desired`.
fn live<K>(mut desired: K) -> K
where
    K: Resource<DynamicType = ()> + Serialize + Clone,
{
    let hash = ssa::spec_hash(&desired).unwrap();
    desired.annotations_mut().insert(SPEC_HASH.to_owned(), hash);
    let mut fields = owned_fields(&serde_json::to_value(&desired).unwrap());
    // Identity fields are not recorded as owned.
    let top = fields.as_object_mut().unwrap();
    top.remove("f:apiVersion");
    top.remove("f:kind");
    let meta = top["f:metadata"].as_object_mut().unwrap();
    meta.remove("f:name");
    meta.remove("f:namespace");
    desired.meta_mut().managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some(FIELD_MANAGER.to_owned()),
        operation: Some("Apply".to_owned()),
        fields_type: Some("FieldsV1".to_owned()),
        fields_v1: Some(FieldsV1(fields)),
        api_version: Some(K::api_version(&()).into_owned()),
        ..ManagedFieldsEntry::default()
    }]);
    desired.meta_mut().resource_version = Some("7".to_owned());
    desired
}

fn children(svc: &HndsrService) -> Children {
    resolved(svc).1
}

fn resolved(svc: &HndsrService) -> (EffectiveSpec, Children) {
    builders::resolve_and_build(svc, &BuildConfig::default()).expect("valid fixture")
}

/// Fills the caches with the live children of `svc` (a ready Deployment)
/// and sets `svc.status` to what the reconciler computes for them.
fn converge(h: &mut Harness, svc: &mut HndsrService) {
    let c = children(svc);
    let mut dep = live(c.deployment.clone());
    dep.metadata.generation = Some(1);
    dep.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(1),
        ready_replicas: Some(1),
        available_replicas: Some(1),
        updated_replicas: Some(1),
        ..DeploymentStatus::default()
    });
    h.put_deployment(dep.clone());
    put_meta(&mut h.caches.services, live(c.service.clone()));
    if let Some(mut hpa) = c.hpa.clone().map(live) {
        slim::hpa(&mut hpa);
        put(&mut h.caches.hpas, hpa);
    }
    put_meta(
        &mut h.caches.pdbs,
        live(c.pdb.clone().expect("PDB is on by default")),
    );
    let observed = Observed {
        deployment: Some(dep),
        ..Observed::default()
    };
    let eff = resolved(svc).0;
    svc.status = Some(status::compute(
        svc,
        Ok((&eff, &c)),
        &observed,
        Timestamp::now(),
    ));
}

/// The status the reconcile wrote (the body of its status patch).
fn written_status(calls: &[Call]) -> &Value {
    &calls
        .iter()
        .find(|c| c.path.ends_with("/status"))
        .expect("a status patch")
        .body["status"]
}

/// Status and reason of the Progressing condition the reconcile wrote.
fn progressing(calls: &[Call]) -> [String; 2] {
    let c = written_status(calls)["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .expect("a Progressing condition");
    [&c["status"], &c["reason"]].map(|v| v.as_str().unwrap().to_owned())
}

/// Every non-event request, as `METHOD plural[/sub]`.
fn api_calls(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| !c.is_event())
        .map(Call::short)
        .collect()
}

fn event_reasons(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.is_event())
        .map(|c| c.body["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn create_applies_every_child_then_status() {
    let mut h = harness();
    let svc = service("img:1", 1);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.expect("reconcile succeeds");
    assert_eq!(
        api_calls(&calls),
        [
            "GET deployments",
            "PATCH deployments",
            "GET services",
            "PATCH services",
            "GET horizontalpodautoscalers",
            "PATCH horizontalpodautoscalers",
            "GET poddisruptionbudgets",
            "PATCH poddisruptionbudgets",
            "PATCH hndsrservices/status",
        ]
    );
    let applies = calls
        .iter()
        .filter(|c| !c.is_event() && c.method == Method::PATCH);
    for call in applies.take(4) {
        assert_eq!(
            call.content_type, "application/apply-patch+yaml",
            "{}",
            call.path
        );
        assert!(
            call.query.contains("fieldManager=hndsr-operator"),
            "{}",
            call.query
        );
        assert!(call.query.contains("force=true"), "{}", call.query);
        assert!(call.body["metadata"]["annotations"][SPEC_HASH].is_string());
        assert_eq!(call.body["metadata"]["ownerReferences"][0]["uid"], "uid-sr");
    }
    let status_patch = calls.iter().find(|c| c.path.ends_with("/status")).unwrap();
    assert_eq!(status_patch.content_type, "application/merge-patch+json");
    assert_eq!(status_patch.body["status"]["observedGeneration"], 1);
    let reasons = event_reasons(&calls);
    assert_eq!(
        reasons.iter().filter(|r| *r == "Created").count(),
        4,
        "{reasons:?}"
    );
}

/// A pass that made no API call and asks to come back after `after`.
fn assert_quiet(result: Result<Action, Error>, calls: &[Call], after: Duration, what: &str) {
    assert_eq!(result.unwrap(), Action::requeue(after), "{what}");
    assert!(calls.is_empty(), "{what}: {:?}", api_calls(calls));
}

#[tokio::test]
async fn steady_state_makes_no_api_calls() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    assert_quiet(
        result,
        &calls,
        hndsr_operator::controller::RESYNC,
        "steady state must not call the API",
    );
}

#[tokio::test]
async fn no_pass_runs_before_the_caches_are_listed() {
    // A converged object, then a restart whose Deployment cache is still
    // listing: a pass would take the Deployment for missing, ask for it and
    // apply it again (and patch the status from a missing Deployment).
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let held = h.restart_listing_deployments();
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    assert_quiet(
        result,
        &calls,
        hndsr_operator::controller::UNSYNCED_RETRY,
        "a pass over unsynced caches must not call the API",
    );
    // Once listed, the same object is steady: still no calls.
    let w = &mut h.caches.deployments;
    w.apply_watcher_event(&watcher::Event::Init);
    for d in held {
        w.apply_watcher_event(&watcher::Event::InitApply(d));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
    h.caches.synced.send_replace(true);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    assert_quiet(
        result,
        &calls,
        hndsr_operator::controller::RESYNC,
        "once listed, the converged object is steady",
    );
}

#[tokio::test]
async fn spec_change_applies_only_the_changed_children() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let mut changed = service("img:2", 2);
    changed.status = svc.status.clone();
    let (result, calls) = h.reconcile(&changed, Scenario::Accept).await;
    result.unwrap();
    assert_eq!(
        api_calls(&calls),
        ["PATCH deployments", "PATCH hndsrservices/status"]
    );
    let apply = &calls
        .iter()
        .find(|c| c.path.contains("/deployments/"))
        .unwrap()
        .body;
    assert_eq!(
        apply["spec"]["template"]["spec"]["containers"][0]["image"],
        "img:2"
    );
    assert!(event_reasons(&calls).contains(&"Updated".to_owned()));
    // The cached Deployment predates that apply: the new generation's
    // status must not claim the rollout is already done.
    assert_eq!(written_status(&calls)["observedGeneration"], 2);
    assert_eq!(progressing(&calls), ["True", "RollingOut"]);
}

#[tokio::test]
async fn an_apply_that_leaves_the_spec_alone_is_no_rollout() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    // The live Deployment was applied by another operator version, whose
    // hash differs although it wrote the same spec (only metadata moves).
    let mut dep = h.live_deployment.clone().unwrap();
    dep.annotations_mut()
        .insert(SPEC_HASH.to_owned(), "from-an-older-operator".into());
    h.put_deployment(dep);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    // The API server kept the generation, so the Deployment's status still
    // describes it: nothing rolls out, and the status stays as it was.
    assert_eq!(api_calls(&calls), ["PATCH deployments"]);
    assert_eq!(event_reasons(&calls), ["Updated"]);
}

#[tokio::test]
async fn manual_edit_of_the_deployment_is_reverted() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    // `kubectl edit` changed the image: the API server moved ownership of
    // that field from us to kubectl-edit. The hash annotation is unchanged.
    let mut dep = h.live_deployment.clone().unwrap();
    dep.spec.template.spec.as_mut().unwrap().containers[0].image = Some("evil:latest".into());
    let managed = dep.metadata.managed_fields.as_mut().unwrap();
    let ours = managed[0].fields_v1.as_mut().unwrap();
    let container = ours.0["f:spec"]["f:template"]["f:spec"]["f:containers"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    assert!(
        container
            .as_object_mut()
            .unwrap()
            .remove("f:image")
            .is_some()
    );
    managed.push(ManagedFieldsEntry {
        manager: Some("kubectl-edit".into()),
        operation: Some("Update".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {
            "k:{\"name\":\"server\"}": {"f:image": {}}}}}}}),
        )),
        ..ManagedFieldsEntry::default()
    });
    // The edit made a new generation, which the Deployment rolled out.
    dep.metadata.generation = Some(2);
    dep.status.as_mut().unwrap().observed_generation = Some(2);
    h.put_deployment(dep);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    assert_eq!(
        api_calls(&calls),
        ["PATCH deployments", "PATCH hndsrservices/status"]
    );
    assert_eq!(event_reasons(&calls), ["DriftReverted"]);
    // Restoring the image is a rollout too.
    assert_eq!(progressing(&calls), ["True", "RollingOut"]);
}

#[tokio::test]
async fn deleted_child_is_recreated() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let gone = (*h.ctx.stores.services.state()[0]).clone();
    h.caches
        .services
        .apply_watcher_event(&watcher::Event::Delete(gone));
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    assert_eq!(api_calls(&calls), ["GET services", "PATCH services"]);
    assert_eq!(event_reasons(&calls), ["Created"]);
}

#[tokio::test]
async fn invalid_spec_sets_a_condition_and_waits_for_a_change() {
    let mut h = harness();
    let svc = invalid_service();
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(
        api_calls(&calls),
        ["PATCH hndsrservices/status"],
        "no child is applied"
    );
    let status = written_status(&calls);
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"].as_str().unwrap().contains("minReplicas"),
        "{ready}"
    );
    let events: Vec<&Call> = calls.iter().filter(|c| c.is_event()).collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["type"], "Warning");
    assert_eq!(events[0].body["reason"], "InvalidSpec");
}

#[tokio::test]
async fn invalid_spec_already_reported_makes_no_calls() {
    let mut h = harness();
    let mut svc = invalid_service();
    let invalid = builders::resolve_and_build(&svc, &BuildConfig::default()).unwrap_err();
    svc.status = Some(status::compute(
        &svc,
        Err(&invalid),
        &Observed::default(),
        Timestamp::now(),
    ));
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(calls.is_empty(), "{:?}", api_calls(&calls));
}

/// The requeue delay of an `Action`, read from its Debug form (kube keeps
/// the field private).
fn requeue_after(a: &Action) -> Duration {
    let s = format!("{a:?}");
    let inner = s
        .split("Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect(&s);
    let (num, unit) = inner.split_at(inner.find(|c: char| c.is_alphabetic() || c == 'µ').unwrap());
    let n: f64 = num.parse().unwrap();
    match unit {
        "s" => Duration::from_secs_f64(n),
        "ms" => Duration::from_secs_f64(n / 1e3),
        "µs" => Duration::from_secs_f64(n / 1e6),
        "ns" => Duration::from_secs_f64(n / 1e9),
        other => panic!("unit {other}"),
    }
}

#[tokio::test]
async fn transient_error_is_returned_and_backs_off_exponentially() {
    let mut h = harness();
    let svc = service("img:1", 1);
    let (result, calls) = h.reconcile(&svc, Scenario::DeploymentApplyFails).await;
    let err = result.expect_err("a 500 is an error");
    assert!(
        matches!(
            err,
            Error::Apply {
                kind: "Deployment",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason(), "apply");
    assert_eq!(
        api_calls(&calls),
        ["GET deployments", "PATCH deployments"],
        "nothing after the failure"
    );
    assert_eq!(event_reasons(&calls), ["ReconcileFailed"]);

    let obj = Arc::new(svc.clone());
    let delays: Vec<Duration> = (0..5)
        .map(|_| requeue_after(&error_policy(obj.clone(), &err, h.ctx.clone())))
        .collect();
    assert!(delays[0] <= Duration::from_secs(1), "{delays:?}");
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "growing: {delays:?}"
    );
    assert!(delays[4] >= Duration::from_secs(14), "{delays:?}");

    // Another object has its own backoff.
    let mut other = service("img:1", 1);
    other.metadata.name = Some("other".into());
    let first_other = requeue_after(&error_policy(Arc::new(other), &err, h.ctx.clone()));
    assert!(first_other <= Duration::from_secs(1));
}

#[tokio::test]
async fn turning_autoscaling_off_deletes_the_hpa() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let mut off = svc.clone();
    off.spec.autoscaling = None;
    off.spec.replicas = Some(2);
    off.metadata.generation = Some(2);
    let (result, calls) = h.reconcile(&off, Scenario::Accept).await;
    result.unwrap();
    assert_eq!(
        api_calls(&calls),
        [
            "PATCH deployments",
            "DELETE horizontalpodautoscalers",
            "PATCH hndsrservices/status"
        ]
    );
    let apply = &calls
        .iter()
        .find(|c| c.path.contains("/deployments/"))
        .unwrap()
        .body;
    assert_eq!(
        apply["spec"]["replicas"], 2,
        "the operator owns replicas again"
    );
    assert!(event_reasons(&calls).contains(&"Deleted".to_owned()));
}

#[tokio::test]
async fn turning_autoscaling_on_hands_the_live_replica_count_over() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    svc.spec.autoscaling = None;
    svc.spec.replicas = Some(6);
    converge(&mut h, &mut svc);
    let mut on = svc.clone();
    on.spec.autoscaling = service("img:1", 1).spec.autoscaling;
    on.metadata.generation = Some(2);
    let (result, calls) = h.reconcile(&on, Scenario::Accept).await;
    result.unwrap();
    let deployment_patches: Vec<&Call> = calls
        .iter()
        .filter(|c| c.short() == "PATCH deployments")
        .collect();
    assert_eq!(deployment_patches.len(), 2, "{:?}", api_calls(&calls));
    let (handover, apply) = (deployment_patches[0], deployment_patches[1]);
    assert!(
        handover
            .query
            .contains(&format!("fieldManager={}", ssa::REPLICAS_HANDOVER_MANAGER)),
        "{}",
        handover.query
    );
    assert_eq!(
        handover.body["spec"],
        json!({"replicas": 6}),
        "the handover applies the live count and nothing else"
    );
    assert!(
        apply
            .query
            .contains(&format!("fieldManager={FIELD_MANAGER}"))
    );
    assert!(
        apply.body["spec"].get("replicas").is_none(),
        "the autoscaler owns the count now"
    );
    assert!(api_calls(&calls).contains(&"PATCH horizontalpodautoscalers".to_owned()));
}

#[tokio::test]
async fn autoscaled_deployments_need_no_handover() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    let mut bumped = svc.clone();
    bumped.spec.model.image = "img:2".to_owned();
    bumped.metadata.generation = Some(2);
    let (result, calls) = h.reconcile(&bumped, Scenario::Accept).await;
    result.unwrap();
    assert!(
        calls
            .iter()
            .all(|c| !c.query.contains(ssa::REPLICAS_HANDOVER_MANAGER)),
        "we never owned the count, so nothing to hand over: {:?}",
        api_calls(&calls)
    );
}

#[tokio::test]
async fn a_stale_cache_does_not_repeat_a_status_write_or_its_events() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    converge(&mut h, &mut svc);
    // The object as cached before the operator's first status write.
    let mut stale = svc.clone();
    stale.status = None;
    let (result, first) = h.reconcile(&stale, Scenario::Accept).await;
    result.unwrap();
    assert!(api_calls(&first).contains(&"PATCH hndsrservices/status".to_owned()));
    assert!(
        !event_reasons(&first).is_empty(),
        "the transitions are announced"
    );

    // A pod event reconciles the same cached object before the watch has
    // delivered the write: nothing to write, nothing to announce again.
    let (result, second) = h.reconcile(&stale, Scenario::Accept).await;
    result.unwrap();
    assert!(second.is_empty(), "{:?}", api_calls(&second));

    // Once the cache shows the write, the record goes.
    let written = written_status(&first);
    let mut fresh = svc.clone();
    fresh.status = Some(serde_json::from_value(written.clone()).unwrap());
    assert_eq!(h.ctx.written.tracked(), 1);
    let (result, third) = h.reconcile(&fresh, Scenario::Accept).await;
    result.unwrap();
    assert!(third.is_empty(), "{:?}", api_calls(&third));
    assert_eq!(h.ctx.written.tracked(), 0);
}

#[tokio::test]
async fn a_foreign_object_with_a_child_name_is_not_taken_over() {
    let mut h = harness();
    let svc = service("img:1", 1);
    let (result, calls) = h.reconcile(&svc, Scenario::ForeignService).await;
    let err = result.expect_err("conflict");
    assert!(
        matches!(
            err,
            Error::Conflict {
                kind: "Service",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason(), "conflict");
    assert_eq!(
        api_calls(&calls),
        ["GET deployments", "PATCH deployments", "GET services"],
        "the foreign Service is never written"
    );
    assert!(event_reasons(&calls).contains(&"ReconcileFailed".to_owned()));
}

fn pod(name: &str, role: &str, ready: bool, spec_hash: &str, template_hash: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "team-a",
            "creationTimestamp": "2026-12-06T10:00:00Z",
            "labels": {
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
                "hndsr.io/service": "sr", "hndsr.io/role": role,
                "pod-template-hash": template_hash,
            },
            "annotations": { "hndsr.io/pod-spec-hash": spec_hash },
        },
        "status": { "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": if ready { "True" } else { "False" }},
        ]},
    }))
    .unwrap()
}

/// A converged service with a standby pool of one, its standby Deployment
/// live; returns the pods' spec digest.
fn converge_with_standby(h: &mut Harness, svc: &mut HndsrService) -> String {
    svc.spec.prewarm = Some(serde_json::from_value(json!({"standbyReplicas": 1})).unwrap());
    converge(h, svc);
    let c = children(svc);
    let mut standby = live(c.standby.expect("a standby Deployment"));
    slim::deployment(&mut standby);
    put(&mut h.caches.deployments, standby);
    c.deployment
        .spec
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()["hndsr.io/pod-spec-hash"]
        .clone()
}

#[tokio::test]
async fn a_cold_serving_slot_is_filled_by_a_warm_standby_pod() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    let spec = converge_with_standby(&mut h, &mut svc);
    // The autoscaler added a replica: the ReplicaSet made a cold pod.
    put(
        &mut h.caches.pods,
        pod("sr-h1-ready", "serving", true, &spec, "h1"),
    );
    put(
        &mut h.caches.pods,
        pod("sr-h1-cold", "serving", false, &spec, "h1"),
    );
    put(
        &mut h.caches.pods,
        pod("sr-standby-s1-warm", "standby", true, &spec, "s1"),
    );
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    let patches: Vec<&Call> = calls.iter().filter(|c| c.short() == "PATCH pods").collect();
    assert_eq!(patches.len(), 1, "{:?}", api_calls(&calls));
    assert!(patches[0].path.ends_with("/pods/sr-standby-s1-warm"));
    assert_eq!(
        patches[0].body["metadata"]["labels"],
        json!({"hndsr.io/role": "serving", "pod-template-hash": "h1"}),
        "the warm pod joins the serving ReplicaSet's slot"
    );
    assert!(event_reasons(&calls).contains(&"Promoted".to_owned()));

    // The cache has not shown the relabel yet: the next pass must not
    // promote again (the slot is taken).
    put(
        &mut h.caches.pods,
        pod("sr-standby-s2-warm", "standby", true, &spec, "s1"),
    );
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    assert!(
        !calls.iter().any(|c| c.short() == "PATCH pods"),
        "{:?}",
        api_calls(&calls)
    );
}

#[tokio::test]
async fn no_promotion_across_pod_specs_or_without_a_warm_pod() {
    let mut h = harness();
    let mut svc = service("img:1", 1);
    let spec = converge_with_standby(&mut h, &mut svc);
    put(
        &mut h.caches.pods,
        pod("sr-h2-cold", "serving", false, "another-spec", "h2"),
    );
    put(
        &mut h.caches.pods,
        pod("sr-standby-s1-loading", "standby", false, &spec, "s1"),
    );
    put(
        &mut h.caches.pods,
        pod("sr-standby-s1-old", "standby", true, "another-spec-2", "s0"),
    );
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    assert!(
        !calls.iter().any(|c| c.short() == "PATCH pods"),
        "{:?}",
        api_calls(&calls)
    );
}

fn keda_config() -> BuildConfig {
    BuildConfig {
        keda_prometheus_url: Some("http://prometheus:9090".to_owned()),
        zero_responder: Some("10.88.0.1:8082".parse().unwrap()),
        ..BuildConfig::default()
    }
}

/// `sr` with provider keda and `minReplicas: 0`, its Deployment scaled to
/// zero by KEDA (in the cache), its status converged from that.
fn keda_at_zero(h: &mut Harness) -> HndsrService {
    let mut svc = service("img:1", 1);
    let a = svc.spec.autoscaling.as_mut().unwrap();
    a.min_replicas = Some(0);
    a.provider = Some(hndsr_crds::AutoscalingProvider::Keda);
    let (eff, c) = builders::resolve_and_build(&svc, &keda_config()).unwrap();
    let mut dep = live(c.deployment.clone());
    dep.metadata.generation = Some(1);
    dep.spec.replicas = Some(0);
    dep.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        ..DeploymentStatus::default()
    });
    h.put_deployment(dep.clone());
    put_meta(&mut h.caches.services, live(c.service.clone()));
    put_meta(&mut h.caches.pdbs, live(c.pdb.clone().unwrap()));
    let observed = Observed {
        deployment: Some(dep),
        ..Observed::default()
    };
    svc.status = Some(status::compute(
        &svc,
        Ok((&eff, &c)),
        &observed,
        Timestamp::now(),
    ));
    svc
}

#[tokio::test]
async fn a_keda_service_at_zero_routes_its_service_to_the_zero_responder() {
    let mut h = harness_with(keda_config());
    let svc = keda_at_zero(&mut h);
    let (result, calls) = h.reconcile(&svc, Scenario::Accept).await;
    result.unwrap();
    assert_eq!(
        api_calls(&calls),
        [
            "GET scaledobjects",
            "PATCH scaledobjects",
            "GET endpointslices",
            "GET services",
            "PATCH endpointslices",
        ]
    );
    let slice = &calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.contains("/endpointslices/"))
        .unwrap()
        .body;
    assert_eq!(slice["metadata"]["name"], "sr-zero");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "sr"
    );
    assert_eq!(slice["endpoints"][0]["addresses"][0], "10.88.0.1");
    assert_eq!(slice["ports"][0]["port"], 8082);
    assert!(
        h.ctx.zero.contains("team-a", "sr"),
        "the responder answers for sr"
    );
}

#[tokio::test]
async fn a_ready_pod_after_zero_takes_the_service_back_from_the_responder() {
    let mut h = harness_with(keda_config());
    let svc = keda_at_zero(&mut h);
    h.ctx.zero.insert("team-a", "sr", None);
    put(&mut h.caches.pods, pod("sr-abc", "serving", true, "h", "t"));
    let (result, calls) = h.reconcile(&svc, Scenario::ZeroSliceExists).await;
    result.unwrap();
    let calls = api_calls(&calls);
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.contains("endpointslices"))
            .collect::<Vec<_>>(),
        ["GET endpointslices", "DELETE endpointslices"],
        "{calls:?}"
    );
    assert!(
        !h.ctx.zero.contains("team-a", "sr"),
        "the wake request is cleared"
    );
}

#[tokio::test]
async fn keda_missing_from_the_cluster_is_reported_not_retried() {
    let mut h = harness_with(keda_config());
    let svc = keda_at_zero(&mut h);
    let (result, calls) = h.reconcile(&svc, Scenario::KedaMissing).await;
    result.expect("a missing KEDA is a status, not an error to retry");
    let degraded = written_status(&calls)["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["reason"], "KedaNotInstalled", "{degraded}");
}

#[tokio::test]
async fn leaving_keda_at_zero_starts_the_hpa_path_at_its_minimum() {
    let mut h = harness_with(keda_config());
    let at_zero = keda_at_zero(&mut h);
    let mut hpa = at_zero.clone();
    let a = hpa.spec.autoscaling.as_mut().unwrap();
    a.min_replicas = Some(1);
    a.provider = None;
    hpa.metadata.generation = Some(2);
    let (result, calls) = h.reconcile(&hpa, Scenario::Accept).await;
    result.unwrap();
    let first = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.contains("/deployments/"))
        .expect("a Deployment patch");
    assert!(
        first
            .query
            .contains("fieldManager=hndsr-operator-replicas-handover"),
        "{}",
        first.query
    );
    assert_eq!(
        first.body["spec"]["replicas"], 1,
        "an HPA cannot start from zero"
    );
    // Once the status says hpa, a Deployment at zero is someone's choice.
    let mut settled = hpa.clone();
    settled
        .status
        .as_mut()
        .unwrap()
        .autoscaling
        .as_mut()
        .unwrap()
        .provider = hndsr_crds::AutoscalingProvider::Hpa;
    let (_, calls) = h.reconcile(&settled, Scenario::Accept).await;
    assert!(
        !calls.iter().any(|c| c
            .query
            .contains("fieldManager=hndsr-operator-replicas-handover")),
        "{:?}",
        api_calls(&calls)
    );
}

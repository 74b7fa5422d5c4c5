//! GitOps with a real Argo CD: an Application syncs HndsrServices from a git
//! repository on this machine, with the sync options docs/gitops.md
//! recommends (automated sync with prune and self-heal, ServerSideApply,
//! ServerSideDiff), and the chart's health check in argocd-cm.
//!
//! Each test runs its own Argo CD (redis, repo server, application
//! controller; [`hndsr_e2e::argocd`]) and its own operator, both scoped to its
//! namespace, on the shared control plane with fake GPU nodes. Its own test
//! binary: the custom-metrics APIService the HPA reads belongs to it alone.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};

use hndsr_crds::HndsrService;
use hndsr_e2e::argocd::{ArgoCd, ArgoCdOptions, GitRepo, IN_CLUSTER, application_resource};
use hndsr_e2e::metrics_server::MetricsServer;
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::shared::{self, TestNamespace};
use hndsr_e2e::{fixtures, wait};

const TIMEOUT: Duration = Duration::from_secs(120);
const APP: &str = "imagery";
const MANIFEST: &str = "services/sr.yaml";
/// A second service in the same directory: pruning `sr` must leave it (and
/// Argo CD refuses to auto-sync a directory down to nothing unless the
/// Application says `allowEmpty`).
const NEIGHBOUR: &str = "services/keep.yaml";
const NEIGHBOUR_MANIFEST: &str = r#"apiVersion: hndsr.io/v1alpha1
kind: HndsrService
metadata:
  name: keep
spec:
  model:
    image: hndsr/server:e2e
    backend: bicubic
  resources:
    gpu: 1
"#;
const METRIC: &str = hndsr_crds::contract::metrics::ACTIVE_REQUESTS;
/// How long the Application must stay Synced while the HPA and the operator
/// write.
const DRIFT_WINDOW: Duration = Duration::from_secs(150);

/// What a test reads from an Application's status.
#[derive(Debug, Clone, Default, PartialEq)]
struct AppState {
    sync: String,
    revision: String,
    health: String,
    /// The HndsrService's health as Argo CD assessed it: (status, message).
    resource_health: Option<(String, String)>,
    operation_phase: String,
    operation_started: String,
    /// Messages of the resources the last sync attempt failed to apply.
    failed_resources: Vec<String>,
    /// The operation's, its resources' and the conditions' messages.
    messages: Vec<String>,
}

impl AppState {
    fn of(app: &DynamicObject) -> Self {
        let status = &app.data["status"];
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let op = &status["operationState"];
        let mut messages = vec![text(&op["message"])];
        let mut failed_resources = Vec::new();
        for r in op["syncResult"]["resources"]
            .as_array()
            .into_iter()
            .flatten()
        {
            messages.push(text(&r["message"]));
            if r["status"] == "SyncFailed" {
                failed_resources.push(text(&r["message"]));
            }
        }
        for c in status["conditions"].as_array().into_iter().flatten() {
            messages.push(format!("{}: {}", text(&c["type"]), text(&c["message"])));
        }
        messages.retain(|m| !m.is_empty());
        let resource_health = status["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == hndsr_crds::KIND && r["name"] == "sr")
            .map(|r| (text(&r["health"]["status"]), text(&r["health"]["message"])));
        Self {
            sync: text(&status["sync"]["status"]),
            revision: text(&status["sync"]["revision"]),
            health: text(&status["health"]["status"]),
            resource_health,
            operation_phase: text(&op["phase"]),
            operation_started: text(&op["startedAt"]),
            failed_resources,
            messages,
        }
    }
}

struct Env {
    ns: TestNamespace,
    argocd: ArgoCd,
    repo: GitRepo,
    apps: Api<DynamicObject>,
}

impl Env {
    /// Argo CD in a fresh namespace, a git repository holding `manifest` as
    /// `services/sr.yaml`, and an Application that syncs `services/` into
    /// the same namespace.
    async fn start(prefix: &str, manifest: &str) -> anyhow::Result<Self> {
        let ns = shared::namespace(prefix).await?;
        fixtures::install_crd(&ns.client).await?;
        let argocd = ArgoCd::start(
            &ns.shared.binaries,
            &ns.shared.kubeconfig,
            &ns.shared.dir.join("logs"),
            &ns.client,
            &ArgoCdOptions::for_namespace(&ns.name),
        )
        .await?;
        let repo = GitRepo::init(&ns.shared.dir.join(format!("git-{}", ns.name)))?;
        repo.write(MANIFEST, manifest)?;
        repo.commit("initial")?;
        let apps = Api::namespaced_with(ns.client.clone(), &ns.name, &application_resource());
        let env = Self {
            ns,
            argocd,
            repo,
            apps,
        };
        env.create_application().await?;
        Ok(env)
    }

    /// The Application docs/gitops.md shows, pointing at the test's repository.
    async fn create_application(&self) -> anyhow::Result<()> {
        let app: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {
                "name": APP,
                "namespace": self.ns.name,
                "annotations": {
                    "argocd.argoproj.io/compare-options": "ServerSideDiff=true",
                },
            },
            "spec": {
                "project": "default",
                "source": {
                    "repoURL": self.repo.url(),
                    "targetRevision": "HEAD",
                    "path": "services",
                },
                "destination": { "server": IN_CLUSTER, "namespace": self.ns.name },
                "syncPolicy": {
                    "automated": { "prune": true, "selfHeal": true },
                    "syncOptions": ["ServerSideApply=true"],
                },
            },
        }))?;
        self.apps
            .patch(
                APP,
                &PatchParams::apply(fixtures::FIELD_MANAGER),
                &Patch::Apply(&app),
            )
            .await?;
        Ok(())
    }

    /// Commits the work tree and asks Argo CD to re-read git now, as a git
    /// webhook would (`argocd.argoproj.io/refresh`).
    async fn commit(&self, message: &str) -> anyhow::Result<String> {
        let sha = self.repo.commit(message)?;
        self.apps
            .patch(
                APP,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": { "annotations": { "argocd.argoproj.io/refresh": "normal" } },
                })),
            )
            .await?;
        Ok(sha)
    }

    async fn state(&self) -> anyhow::Result<AppState> {
        Ok(AppState::of(&self.apps.get(APP).await?))
    }

    /// Polls the Application until `want` holds; fails with its last state
    /// and the end of Argo CD's logs.
    async fn wait_app(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&AppState) -> bool,
    ) -> anyhow::Result<AppState> {
        let start = Instant::now();
        let mut last = None;
        loop {
            self.argocd.check_running()?;
            if let Ok(app) = self.apps.get(APP).await {
                let state = AppState::of(&app);
                if want(&state) {
                    return Ok(state);
                }
                last = Some(state);
            }
            if start.elapsed() > timeout {
                bail!(
                    "Application {APP}: timed out after {timeout:?} waiting for {what}; last state: \
                     {last:#?}\n{}",
                    self.argocd.log_tails()
                );
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    fn services(&self) -> Api<HndsrService> {
        Api::namespaced(self.ns.client.clone(), &self.ns.name)
    }

    async fn start_operator(&self) -> anyhow::Result<Operator> {
        Ok(Operator::start(
            &self.ns.shared.kubeconfig,
            &self.ns.shared.dir.join("logs"),
            &OperatorOptions::for_namespace(&self.ns.name),
        )
        .await?)
    }
}

/// An HndsrService as a platform engineer commits it: no namespace, no
/// defaulted fields spelled out.
fn service_manifest(max_replicas: u32, gpus: u32) -> String {
    format!(
        r#"apiVersion: hndsr.io/v1alpha1
kind: HndsrService
metadata:
  name: sr
spec:
  model:
    image: hndsr/server:e2e
    backend: bicubic
  resources:
    gpu: {gpus}
  autoscaling:
    minReplicas: 1
    maxReplicas: {max_replicas}
    metric: activeRequests
    targetPerPod:
      activeRequests: "2"
    behavior:
      scaleUp: &fast
        stabilizationWindowSeconds: 0
        selectPolicy: Max
        policies: [{{ type: Pods, value: 4, periodSeconds: 1 }}]
      scaleDown: *fast
"#
    )
}

fn synced_healthy_at(revision: &str) -> impl Fn(&AppState) -> bool + '_ {
    move |s| s.sync == "Synced" && s.revision == revision && s.health == "Healthy"
}

/// Sync, health for the current generation only, no drift from autoscaling
/// or the operator's writes over minutes, and pruning.
#[tokio::test]
async fn argo_cd_syncs_a_service_healthy_for_its_generation_without_drift_and_prunes_it()
-> anyhow::Result<()> {
    let mut env = Env::start("e2e-gitops", &service_manifest(3, 1)).await?;
    env.repo.write(NEIGHBOUR, NEIGHBOUR_MANIFEST)?;
    let metrics = MetricsServer::start(
        env.ns.client.clone(),
        &env.ns.name,
        &[METRIC, hndsr_crds::contract::metrics::QUEUE_DEPTH],
    )
    .await?;
    metrics.set(&env.ns.name, METRIC, "1");
    let mut operator = env.start_operator().await?;
    let first = env.commit("sr: first revision").await?;

    // Synced, and Healthy once the operator reports Ready for generation 1.
    env.wait_app("Synced and Healthy", TIMEOUT, synced_healthy_at(&first))
        .await?;
    let live = env.services().get("sr").await?;
    let generation = live.metadata.generation.context("no generation")?;
    let status = live.status.clone().context("no status")?;
    assert_eq!(status.observed_generation, Some(generation));

    // A spec change while the operator is down: Argo CD applies it, and the
    // Application must not turn Healthy on the status of the old generation.
    operator.stop();
    env.repo.write(MANIFEST, &service_manifest(4, 1))?;
    let second = env.commit("sr: maxReplicas 4").await?;
    let stale = env
        .wait_app("Synced to the second revision", TIMEOUT, |s| {
            s.sync == "Synced" && s.revision == second
        })
        .await?;
    let live = env.services().get("sr").await?;
    let new_generation = live.metadata.generation.context("no generation")?;
    assert!(
        new_generation > generation,
        "the change made no new generation"
    );
    assert_eq!(
        live.status.as_ref().and_then(|s| s.observed_generation),
        Some(generation),
        "the operator is down: nothing observed the new generation"
    );
    let until = Instant::now() + Duration::from_secs(15);
    let mut seen = stale;
    while Instant::now() < until {
        assert_eq!(
            seen.health, "Progressing",
            "the Application must stay Progressing while generation {new_generation} is \
             unobserved: {seen:#?}"
        );
        let (_, message) = seen.resource_health.clone().unwrap_or_default();
        assert!(
            message.contains(&format!("observe generation {new_generation}")),
            "{seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen = env.state().await?;
    }
    let mut operator = env.start_operator().await?;
    env.wait_app("Healthy again", TIMEOUT, synced_healthy_at(&second))
        .await?;
    let live = env.services().get("sr").await?;
    assert_eq!(
        live.status.as_ref().and_then(|s| s.observed_generation),
        live.metadata.generation
    );

    // Minutes of autoscaling and operator writes: the Application stays
    // Synced, and Argo CD never syncs again (self-heal would, on drift).
    let before = env.state().await?;
    let watch_apps = env.apps.clone();
    let field = format!("metadata.name={APP}");
    let recorder = tokio::spawn(async move {
        let mut seen = Vec::new();
        let stream = watcher(watch_apps, watcher::Config::default().fields(&field))
            .applied_objects()
            .take_until(tokio::time::sleep(DRIFT_WINDOW));
        futures::pin_mut!(stream);
        while let Some(app) = stream.next().await {
            if let Ok(app) = app {
                seen.push(AppState::of(&app));
            }
        }
        seen
    });
    let window = Instant::now();
    let serving = format!(
        "{}=sr,{}={}",
        hndsr_crds::labels::SERVICE,
        hndsr_crds::labels::ROLE,
        hndsr_crds::labels::ROLE_SERVING
    );
    metrics.set(&env.ns.name, METRIC, "6");
    fixtures::wait_deployment_ready(&env.ns.client, &env.ns.name, "sr", 3, TIMEOUT).await?;
    fixtures::wait_pods_ready(&env.ns.client, &env.ns.name, &serving, 3, TIMEOUT).await?;
    metrics.set(&env.ns.name, METRIC, "0");
    fixtures::wait_deployment_ready(&env.ns.client, &env.ns.name, "sr", 1, TIMEOUT).await?;
    assert!(
        window.elapsed() < DRIFT_WINDOW,
        "scaling up and down took longer than the window"
    );
    let seen = recorder.await?;
    operator.check_running()?;
    let drift: Vec<_> = seen.iter().filter(|s| s.sync != "Synced").collect();
    assert!(
        drift.is_empty(),
        "the Application left Synced during autoscaling: {drift:#?}"
    );
    assert!(
        seen.len() > 1,
        "Argo CD wrote the Application's status only {} times in {DRIFT_WINDOW:?}",
        seen.len()
    );
    let after = env.state().await?;
    assert_eq!(after.sync, "Synced");
    assert_eq!(after.revision, second);
    assert_eq!(after.operation_phase, "Succeeded", "{after:#?}");
    assert_eq!(
        after.operation_started, before.operation_started,
        "Argo CD synced again during the window (drift healed): {after:#?}"
    );

    // Removed from git with pruning on: the service and its children go,
    // its neighbour stays.
    env.repo.remove(MANIFEST)?;
    let third = env.commit("sr: removed").await?;
    env.wait_app("Synced without the service", TIMEOUT, |s| {
        s.sync == "Synced" && s.revision == third
    })
    .await?;
    wait::until("HndsrService sr pruned", TIMEOUT, || async {
        env.services()
            .get_opt("sr")
            .await
            .map(|s| s.is_none().then_some(()))
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let services: Api<Service> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    wait::until("the children garbage-collected", TIMEOUT, || async {
        let gone = deployments.get_opt("sr").await?.is_none()
            && services.get_opt("sr").await?.is_none()
            && hpas.get_opt("sr").await?.is_none();
        Ok::<_, kube::Error>(gone.then_some(()))
    })
    .await?;
    assert!(
        env.services().get_opt("keep").await?.is_some(),
        "pruning sr took its neighbour too"
    );
    assert!(deployments.get_opt("keep").await?.is_some());

    env.argocd.check_running()?;
    metrics.shutdown().await?;
    Ok(())
}

/// A service the CRD's CEL rules reject fails the sync, with the rule's
/// message in the Application, and never reaches the cluster.
#[tokio::test]
async fn an_invalid_service_fails_the_sync_with_the_cel_message() -> anyhow::Result<()> {
    let invalid = service_manifest(3, 1).replace("minReplicas: 1", "minReplicas: 0");
    let mut env = Env::start("e2e-gitops-invalid", &invalid).await?;
    let sha = env.commit("sr: scale to zero without KEDA").await?;
    let cel = "autoscaling.minReplicas 0 (scale to zero) needs provider keda";
    // Automated sync retries a failed sync with backoff: the operation's
    // phase moves between Running and Failed; each try's result names the
    // resource and the API server's answer.
    let failed = env
        .wait_app("the sync to fail with the CEL message", TIMEOUT, |s| {
            s.revision == sha
                && s.failed_resources.iter().any(|m| m.contains(cel))
                && s.messages
                    .iter()
                    .any(|m| m.contains("failed to apply") && m.contains(cel))
        })
        .await?;
    assert_eq!(failed.sync, "OutOfSync", "{failed:#?}");
    assert!(
        env.services().get_opt("sr").await?.is_none(),
        "the invalid service reached the cluster"
    );
    Ok(())
}

/// A service whose pods cannot get GPUs: Argo CD shows the operator's
/// reason, as Progressing (docs/gitops.md says why not Degraded).
#[tokio::test]
async fn a_service_without_gpus_shows_the_operators_reason() -> anyhow::Result<()> {
    // 16 (the CRD's maximum) per pod; the fake nodes have 4 each.
    let mut env = Env::start("e2e-gitops-nogpu", &service_manifest(3, 16)).await?;
    let mut operator = env.start_operator().await?;
    let sha = env.commit("sr: 16 GPUs per pod").await?;
    let reason = hndsr_crds::conditions::reasons::WAITING_FOR_GPU_CAPACITY;
    let waiting = |s: &AppState| {
        s.sync == "Synced"
            && s.revision == sha
            && s.health == "Progressing"
            && s.resource_health.as_ref().is_some_and(|(status, message)| {
                status == "Progressing" && message.contains(reason)
            })
    };
    env.wait_app("Progressing with the operator's reason", TIMEOUT, waiting)
        .await?;
    // It stays there: no Degraded, no Healthy, while no GPU is free.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let state = env.state().await?;
        assert!(waiting(&state), "{state:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    operator.check_running()?;
    Ok(())
}

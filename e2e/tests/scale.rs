//! Operator and control-plane measurements. The measurements are
//! `#[ignore]`d; a small instance of the fleet test
//! (`steady_state_and_restart_write_nothing`, 100 HndsrServices) runs in
//! every `make test`. The tests share one control plane and run one after
//! the other (a lock), so none disturbs another's figures.
//!
//! - `apply_to_deployment_and_ready_latency`: one HndsrService applied
//!   (server-side apply, as `kubectl apply` does), `HNDSR_E2E_LATENCY_RUNS`
//!   times (default 5): time to its Deployment existing and to the
//!   HndsrService being Ready for its generation (kwok makes pods Ready at
//!   once). Polled every 20 ms.
//! - `operator_converges_on_many_hndsrservices`: N HndsrServices (default
//!   1000, `HNDSR_E2E_SCALE_N`) with one pod each, every tenth with a
//!   standby pod (prewarm), created at once; time until
//!   every one is Ready for its generation; the operator's RSS; the steady
//!   state over `HNDSR_E2E_SCALE_STEADY_S` seconds (default 60): operator
//!   writes (applies, status patches) from its metrics and resourceVersion
//!   changes of every HndsrService, Deployment, Service and operator Event;
//!   then the operator is SIGKILLed and a new one started: time until its
//!   reconcile counter reaches N (at most 60 s), and the writes the restart
//!   made (none expected: nothing changed).
//!
//! Run: `cargo test -p hndsr-e2e --test scale -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use hndsr_crds::{HndsrService, conditions};
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::{fixtures, shared, wait};

/// The measurements run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Who the operator's Events name as their reporting controller.
const OPERATOR_REPORTER: &str = "hndsr-operator";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// `VmRSS` and `VmHWM` of a process, in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn service(name: &str) -> anyhow::Result<HndsrService> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{}/{}", hndsr_crds::GROUP, hndsr_crds::VERSION),
        "kind": hndsr_crds::KIND,
        "metadata": { "name": name },
        "spec": {
            "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
            "replicas": 1,
            "resources": { "gpu": 0 },
        },
    }))?)
}

/// Every [`PREWARM_EVERY`]-th HndsrService of the fleet has a standby pod.
const PREWARM_EVERY: usize = 10;

fn fleet_service(i: usize) -> anyhow::Result<HndsrService> {
    let mut svc = service(&format!("sr-{i:04}"))?;
    if i.is_multiple_of(PREWARM_EVERY) {
        svc.spec.prewarm = Some(serde_json::from_value(
            serde_json::json!({ "standbyReplicas": 1 }),
        )?);
    }
    Ok(svc)
}

fn ready_for_generation(s: &HndsrService) -> bool {
    let st = s.status.as_ref();
    st.and_then(|st| st.observed_generation) == s.metadata.generation
        && st.is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == conditions::READY && c.status == "True")
        })
}

type Versions = BTreeMap<String, String>;

async fn versions<K>(api: &Api<K>) -> anyhow::Result<Versions>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|o| {
            let m = o.meta();
            (
                m.name.clone().unwrap_or_default(),
                m.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect())
}

/// Names → resourceVersions of everything the operator writes in `ns`.
#[derive(Debug)]
struct Snapshot {
    services: Versions,
    deployments: Versions,
    k8s_services: Versions,
    events: Versions,
}

impl Snapshot {
    async fn take(client: &kube::Client, ns: &str) -> anyhow::Result<Self> {
        let events: Api<Event> = Api::namespaced(client.clone(), ns);
        let events = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.reporting_controller.as_deref() == Some(OPERATOR_REPORTER))
            .map(|e| {
                (
                    e.metadata.name.unwrap_or_default(),
                    e.metadata.resource_version.unwrap_or_default(),
                )
            })
            .collect();
        Ok(Self {
            services: versions(&Api::<HndsrService>::namespaced(client.clone(), ns)).await?,
            deployments: versions(&Api::<Deployment>::namespaced(client.clone(), ns)).await?,
            k8s_services: versions(&Api::<Service>::namespaced(client.clone(), ns)).await?,
            events,
        })
    }

    /// Objects changed, added or removed since `before`, per kind.
    fn changes_since(&self, before: &Self) -> [(&'static str, usize); 4] {
        fn diff(a: &Versions, b: &Versions) -> usize {
            let changed_or_removed = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count();
            let added = b.keys().filter(|k| !a.contains_key(*k)).count();
            changed_or_removed + added
        }
        [
            ("HndsrService", diff(&before.services, &self.services)),
            ("Deployment", diff(&before.deployments, &self.deployments)),
            ("Service", diff(&before.k8s_services, &self.k8s_services)),
            ("Event", diff(&before.events, &self.events)),
        ]
    }

    fn counts(&self) -> String {
        format!(
            "{} HndsrServices, {} Deployments, {} Services, {} operator Events",
            self.services.len(),
            self.deployments.len(),
            self.k8s_services.len(),
            self.events.len()
        )
    }
}

/// Operator write counters: (applies, status patches, reconcile passes).
async fn counters(operator: &Operator) -> (f64, f64, f64) {
    let text = operator.metrics().await.unwrap_or_default();
    (
        metric(&text, "hndsr_operator_applies_total"),
        metric(&text, "hndsr_operator_status_patches_total"),
        metric(&text, "hndsr_operator_reconciles_total"),
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median_and_max(samples: &[Duration]) -> (Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2
    };
    (median, sorted.last().copied().unwrap_or_default())
}

#[tokio::test]
#[ignore = "a measurement; run with --ignored"]
async fn apply_to_deployment_and_ready_latency() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let runs: usize = env_or("HNDSR_E2E_LATENCY_RUNS", 5);
    let ns = shared::namespace("e2e-latency").await?;
    fixtures::install_crd(&ns.client).await?;
    let mut operator = Operator::start(
        &ns.shared.kubeconfig,
        &ns.shared.dir.join("logs"),
        &OperatorOptions::for_namespace(&ns.name),
    )
    .await?;
    let api: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let poll = Duration::from_millis(20);
    let timeout = Duration::from_secs(120);
    let (mut to_deployment, mut to_ready) = (Vec::new(), Vec::new());
    println!("latency: load average at start {}", load_average());
    for i in 0..runs {
        let name = format!("lat-{i}");
        let start = Instant::now();
        api.patch(
            &name,
            &PatchParams::apply("e2e-latency").force(),
            &Patch::Apply(&service(&name)?),
        )
        .await?;
        let applied = start.elapsed();
        let deployment = loop {
            if deployments.get_opt(&name).await?.is_some() {
                break start.elapsed();
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "no Deployment {name} after {timeout:?}"
            );
            tokio::time::sleep(poll).await;
        };
        let ready = loop {
            if ready_for_generation(&api.get(&name).await?) {
                break start.elapsed();
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "{name} not Ready after {timeout:?}"
            );
            tokio::time::sleep(poll).await;
        };
        operator.check_running()?;
        println!(
            "latency: run {}: apply returned {applied:.1?}, Deployment {deployment:.1?}, Ready {ready:.1?}",
            i + 1
        );
        to_deployment.push(deployment);
        to_ready.push(ready);
    }
    let (dm, dx) = median_and_max(&to_deployment);
    let (rm, rx) = median_and_max(&to_ready);
    println!(
        "latency: {runs} runs: apply → Deployment median {dm:.1?} max {dx:.1?}; apply → Ready median {rm:.1?} max {rx:.1?}; load average at end {}",
        load_average()
    );
    Ok(())
}

/// The convergence, steady-state and restart measurement on `n`
/// HndsrServices in a namespace of its own; fails on any write in steady
/// state or after the restart, and on a restart pass slower than
/// [`RESTART_PASS_LIMIT`].
async fn converge_steady_restart(prefix: &str, n: usize, steady: Duration) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let ns = shared::namespace(prefix).await?;
    fixtures::install_crd(&ns.client).await?;
    for i in 0..(n + n.div_ceil(PREWARM_EVERY)).div_ceil(250) {
        fixtures::create_node(&ns.client, &format!("scale-node-{i}"), 0, 260).await?;
    }
    let logs = ns.shared.dir.join("logs");
    let mut operator = Operator::start(
        &ns.shared.kubeconfig,
        &logs,
        &OperatorOptions::for_namespace(&ns.name),
    )
    .await?;
    let api: Api<HndsrService> = Api::namespaced(ns.client.clone(), &ns.name);
    println!("scale: load average at start {}", load_average());

    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &fleet_service(i)?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let created = start.elapsed();

    let ready = wait::until(
        format!("{n} HndsrServices Ready"),
        Duration::from_secs(900),
        || async {
            let list = api.list(&ListParams::default()).await?.items;
            let ready = list.iter().filter(|s| ready_for_generation(s)).count();
            Ok::<_, kube::Error>((ready == n).then_some(()))
        },
    )
    .await;
    let converged = start.elapsed();
    operator.check_running()?;
    ready?;
    println!(
        "scale: {n} HndsrServices created in {created:.1?}, all Ready after {converged:.1?}; load average {}",
        load_average()
    );

    // Steady state: nothing changes, no writes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, hwm) = rss_kb(operator.pid());
    println!(
        "scale: operator (pid {}) after convergence: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        operator.pid(),
        mib(rss),
        mib(hwm)
    );
    let before = Snapshot::take(&ns.client, &ns.name).await?;
    let (a0, s0, r0) = counters(&operator).await;
    tokio::time::sleep(steady).await;
    let after = Snapshot::take(&ns.client, &ns.name).await?;
    let (a1, s1, r1) = counters(&operator).await;
    let (applies, status_patches) = (a1 - a0, s1 - s0);
    let per_minute = (applies + status_patches) * 60.0 / steady.as_secs_f64();
    let changes = after.changes_since(&before);
    let (rss, hwm) = rss_kb(operator.pid());
    println!(
        "scale: steady state over {steady:?} ({}): {applies} applies, {status_patches} status patches ({per_minute} writes/min), {} reconcile passes; objects changed: {changes:?}; VmRSS {:.1} MiB, VmHWM {:.1} MiB; load average {}",
        after.counts(),
        r1 - r0,
        mib(rss),
        mib(hwm),
        load_average()
    );
    assert!(
        changes.iter().all(|(_, c)| *c == 0),
        "objects changed in steady state: {changes:?}"
    );
    assert_eq!(
        applies + status_patches,
        0.0,
        "operator writes in steady state"
    );

    // Restart: SIGKILL, a new operator, every object reconciled again.
    let before = Snapshot::take(&ns.client, &ns.name).await?;
    operator.kill();
    drop(operator);
    let start = Instant::now();
    let mut operator = Operator::start(
        &ns.shared.kubeconfig,
        &logs,
        &OperatorOptions {
            identity: format!("e2e-{}-restarted", ns.name),
            ..OperatorOptions::for_namespace(&ns.name)
        },
    )
    .await?;
    let serving = start.elapsed();
    let n_f = n as f64;
    let full_pass = loop {
        let (_, _, reconciles) = counters(&operator).await;
        if reconciles >= n_f {
            break start.elapsed();
        }
        operator.check_running()?;
        anyhow::ensure!(
            start.elapsed() < RESTART_PASS_LIMIT,
            "restarted operator made {reconciles} of {n} reconcile passes in {RESTART_PASS_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (rss_pass, _) = rss_kb(operator.pid());
    // Let anything the pass triggered land, then count the restart's writes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (applies, status_patches, reconciles) = counters(&operator).await;
    let after = Snapshot::take(&ns.client, &ns.name).await?;
    let changes = after.changes_since(&before);
    let (rss, hwm) = rss_kb(operator.pid());
    println!(
        "scale: restart (SIGKILL, new operator): /readyz after {serving:.1?}, {n} reconcile passes after {full_pass:.1?} (VmRSS then {:.1} MiB); 10 s later: {reconciles} passes, {applies} applies, {status_patches} status patches; objects changed: {changes:?}; VmRSS {:.1} MiB, VmHWM {:.1} MiB; load average {}",
        mib(rss_pass),
        mib(rss),
        mib(hwm),
        load_average()
    );
    assert!(
        changes.iter().all(|(_, c)| *c == 0),
        "a restart with nothing changed wrote: {changes:?}"
    );
    assert_eq!(applies + status_patches, 0.0, "writes after a restart");
    Ok(())
}

/// Every object is reconciled again within this long of an operator
/// restart (its caches listed, its pass made).
const RESTART_PASS_LIMIT: Duration = Duration::from_secs(60);

/// The small fleet that runs in every `make test`: a regression that makes
/// the operator write in steady state or on a restart fails CI here.
#[tokio::test]
async fn steady_state_and_restart_write_nothing() -> anyhow::Result<()> {
    converge_steady_restart(
        "e2e-scale-small",
        env_or("HNDSR_E2E_SCALE_SMALL_N", 100),
        Duration::from_secs(env_or("HNDSR_E2E_SCALE_SMALL_STEADY_S", 10)),
    )
    .await
}

#[tokio::test]
#[ignore = "a measurement: minutes of CPU; run with --ignored"]
async fn operator_converges_on_many_hndsrservices() -> anyhow::Result<()> {
    converge_steady_restart(
        "e2e-scale",
        env_or("HNDSR_E2E_SCALE_N", 1000),
        Duration::from_secs(env_or("HNDSR_E2E_SCALE_STEADY_S", 60)),
    )
    .await
}

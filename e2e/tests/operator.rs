//! The operator against the real control plane: HndsrService → Deployment →
//! pods Ready on fake GPU nodes → status Ready; drift reverted; deleted
//! children recreated; deletion cascades.
//!
//! Each test runs its own operator process scoped to its namespace. Needs the
//! control-plane binaries (`bash e2e/scripts/build-binaries.sh`) and the
//! operator (`cargo build -p hndsr-operator`); fails, never skips, without them.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};

use hndsr_crds::{HndsrService, conditions, labels};
use hndsr_e2e::operator::{Operator, OperatorOptions};
use hndsr_e2e::shared::{self, TestNamespace};
use hndsr_e2e::{fixtures, wait};

const TIMEOUT: Duration = Duration::from_secs(90);

struct Env {
    ns: TestNamespace,
    operator: Operator,
}

impl Env {
    async fn start(prefix: &str) -> anyhow::Result<Self> {
        let ns = shared::namespace(prefix).await?;
        fixtures::install_crd(&ns.client).await?;
        let operator = Operator::start(
            &ns.shared.kubeconfig,
            &ns.shared.dir.join("logs"),
            &OperatorOptions::for_namespace(&ns.name),
        )
        .await?;
        Ok(Self { ns, operator })
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    fn services(&self) -> Api<HndsrService> {
        Api::namespaced(self.client(), &self.ns.name)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client(), &self.ns.name)
    }

    fn k8s_services(&self) -> Api<Service> {
        Api::namespaced(self.client(), &self.ns.name)
    }

    /// Merge-patches `spec` of HndsrService `name`.
    async fn patch_spec(&self, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
        self.services()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    async fn create(&self, name: &str, spec: serde_json::Value) -> anyhow::Result<HndsrService> {
        let svc: HndsrService = serde_json::from_value(serde_json::json!({
            "apiVersion": format!("{}/{}", hndsr_crds::GROUP, hndsr_crds::VERSION),
            "kind": hndsr_crds::KIND,
            "metadata": { "name": name },
            "spec": spec,
        }))?;
        Ok(self.services().create(&PostParams::default(), &svc).await?)
    }

    /// Waits until `status.observedGeneration` is the object's generation and
    /// `check` holds; returns the object.
    async fn wait_status(
        &mut self,
        name: &str,
        what: &str,
        check: impl Fn(&HndsrService) -> bool,
    ) -> anyhow::Result<HndsrService> {
        let api = self.services();
        let result = wait::until(format!("HndsrService {name}: {what}"), TIMEOUT, || async {
            let svc = api.get(name).await?;
            let status = svc.status.as_ref();
            let current = status.and_then(|s| s.observed_generation) == svc.metadata.generation;
            Ok::<_, kube::Error>((current && check(&svc)).then_some(svc))
        })
        .await;
        match result {
            Ok(svc) => Ok(svc),
            Err(e) => {
                self.operator.check_running()?;
                let last = api.get(name).await.ok().and_then(|s| s.status);
                Err(anyhow::Error::from(e)).with_context(|| {
                    format!(
                        "last status: {last:?}; operator log: {}",
                        self.operator.log().display()
                    )
                })
            }
        }
    }
}

fn condition<'a>(svc: &'a HndsrService, type_: &str) -> Option<&'a Condition> {
    svc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn is_ready(svc: &HndsrService) -> bool {
    condition(svc, conditions::READY).is_some_and(|c| c.status == "True")
}

fn bicubic(replicas: i32, gpus: i32) -> serde_json::Value {
    serde_json::json!({
        "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
        "replicas": replicas,
        "resources": { "gpu": gpus },
    })
}

fn serving_selector(name: &str) -> String {
    format!(
        "{}={name},{}={}",
        labels::SERVICE,
        labels::ROLE,
        labels::ROLE_SERVING
    )
}

async fn wait_deployment(env: &Env, name: &str) -> anyhow::Result<Deployment> {
    let api = env.deployments();
    Ok(
        wait::until(format!("Deployment {name}"), TIMEOUT, || async {
            api.get_opt(name).await
        })
        .await?,
    )
}

#[tokio::test]
async fn hndsrservice_becomes_ready_with_its_deployment_and_pods() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-ready").await?;
    let created = env.create("sr", bicubic(2, 1)).await?;

    // The Deployment is owned (controller reference) by the HndsrService.
    let deployment = wait_deployment(&env, "sr").await?;
    let owner = deployment
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .context("controller owner reference")?;
    assert_eq!(owner.kind, hndsr_crds::KIND);
    assert_eq!(Some(&owner.uid), created.meta().uid.as_ref());

    // Pods land on the fake GPU nodes with one GPU each and become Ready.
    let pods = fixtures::wait_pods_ready(
        &env.client(),
        &env.ns.name,
        &serving_selector("sr"),
        2,
        TIMEOUT,
    )
    .await?;
    for pod in &pods {
        let spec = pod.spec.as_ref().context("pod spec")?;
        assert!(
            spec.node_name
                .as_deref()
                .is_some_and(|n| n.starts_with("gpu-node-"))
        );
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref());
        let gpus = limits
            .and_then(|l| l.get(hndsr_e2e::GPU_RESOURCE))
            .map(|q| q.0.as_str());
        assert_eq!(gpus, Some("1"));
    }

    // Status: Ready for the current generation, with the replica counts.
    let svc = env
        .wait_status("sr", "Ready with 2 ready replicas", |s| {
            is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(2)
        })
        .await?;
    assert_eq!(
        svc.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );
    // The scale subresource's selector: the serving pods, in any order.
    let selector = svc
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let mut terms: Vec<&str> = selector.split(',').collect();
    terms.sort_unstable();
    let expected = serving_selector("sr");
    let mut expected_terms: Vec<&str> = expected.split(',').collect();
    expected_terms.sort_unstable();
    assert_eq!(terms, expected_terms);
    assert!(
        env.k8s_services().get_opt("sr").await?.is_some(),
        "Service sr"
    );

    // A spec change bumps the generation; status follows it.
    env.services()
        .patch(
            "sr",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 1 } })),
        )
        .await?;
    let svc = env
        .wait_status("sr", "Ready with 1 ready replica", |s| {
            is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(1)
        })
        .await?;
    assert_eq!(
        svc.status.as_ref().and_then(|s| s.observed_generation),
        Some(2)
    );
    fixtures::wait_pods_ready(
        &env.client(),
        &env.ns.name,
        &serving_selector("sr"),
        1,
        TIMEOUT,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn turning_autoscaling_on_keeps_the_running_replicas() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-handover").await?;
    env.create("sr", bicubic(3, 0)).await?;
    env.wait_status("sr", "Ready with 3 ready replicas", |s| {
        is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(3)
    })
    .await?;

    // Autoscaling on: the operator stops applying spec.replicas. Dropping a
    // field its only applier no longer sends would reset it to 1.
    env.services()
        .patch(
            "sr",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": { "replicas": null, "autoscaling": { "minReplicas": 2, "maxReplicas": 5 } },
            })),
        )
        .await?;
    let api = env.deployments();
    let deployment = wait::until(
        "the operator's apply without spec.replicas",
        TIMEOUT,
        || async {
            let d = api.get("sr").await?;
            let ours_has_replicas = d.managed_fields().iter().any(|e| {
                e.manager.as_deref() == Some(hndsr_crds::FIELD_MANAGER)
                    && e.operation.as_deref() == Some("Apply")
                    && e.fields_v1
                        .as_ref()
                        .and_then(|f| f.0.get("f:spec"))
                        .and_then(|s| s.get("f:replicas"))
                        .is_some()
            });
            Ok::<_, kube::Error>((!ours_has_replicas).then_some(d))
        },
    )
    .await?;
    assert_eq!(
        deployment.spec.replicas,
        Some(3),
        "the running count survives the handover to the HPA"
    );
    env.operator.check_running()?;
    Ok(())
}

#[tokio::test]
async fn manual_edits_of_the_deployment_are_reverted() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-drift").await?;
    env.create("sr", bicubic(1, 1)).await?;
    env.wait_status("sr", "Ready", is_ready).await?;

    let deployment = wait_deployment(&env, "sr").await?;
    let template = deployment
        .spec
        .template
        .spec
        .as_ref()
        .context("pod template")?;
    let container = template.containers[0].name.clone();
    let image = template.containers[0].image.clone();

    // Someone edits the Deployment by hand: another image, more replicas.
    env.deployments()
        .patch(
            "sr",
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({
                "spec": {
                    "replicas": 3,
                    "template": { "spec": { "containers": [{ "name": container, "image": "evil/image:1" }] } },
                },
            })),
        )
        .await?;

    let api = env.deployments();
    wait::until("Deployment sr reverted", TIMEOUT, || async {
        let d = api.get("sr").await?;
        let current_image = d
            .spec
            .template
            .spec
            .as_ref()
            .map(|p| p.containers[0].image.clone());
        let replicas = d.spec.replicas;
        Ok::<_, kube::Error>(
            (current_image == Some(image.clone()) && replicas == Some(1)).then_some(()),
        )
    })
    .await?;
    env.operator.check_running()?;
    Ok(())
}

#[tokio::test]
async fn deleted_children_are_recreated() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-recreate").await?;
    env.create("sr", bicubic(1, 1)).await?;
    env.wait_status("sr", "Ready", is_ready).await?;

    let old_deployment = wait_deployment(&env, "sr").await?.metadata.uid;
    let services = env.k8s_services();
    let old_service = services.get("sr").await?.metadata.uid;

    env.deployments()
        .delete("sr", &DeleteParams::default())
        .await?;
    services.delete("sr", &DeleteParams::default()).await?;

    let deployments = env.deployments();
    wait::until("Deployment sr recreated", TIMEOUT, || async {
        let d = deployments.get_opt("sr").await?;
        Ok::<_, kube::Error>(d.filter(|d| {
            d.metadata.uid != old_deployment && d.metadata.deletion_timestamp.is_none()
        }))
    })
    .await?;
    wait::until("Service sr recreated", TIMEOUT, || async {
        let s = services.get_opt("sr").await?;
        Ok::<_, kube::Error>(
            s.filter(|s| s.metadata.uid != old_service && s.metadata.deletion_timestamp.is_none()),
        )
    })
    .await?;
    fixtures::wait_pods_ready(
        &env.client(),
        &env.ns.name,
        &serving_selector("sr"),
        1,
        TIMEOUT,
    )
    .await?;
    env.wait_status("sr", "Ready again", is_ready).await?;
    Ok(())
}

#[tokio::test]
async fn deleting_the_hndsrservice_garbage_collects_its_children() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-gc").await?;
    env.create("sr", bicubic(1, 1)).await?;
    env.wait_status("sr", "Ready", is_ready).await?;
    wait_deployment(&env, "sr").await?;

    env.services()
        .delete("sr", &DeleteParams::default())
        .await?;

    let deployments = env.deployments();
    let services = env.k8s_services();
    let pods: Api<Pod> = Api::namespaced(env.client(), &env.ns.name);
    let lp = ListParams::default().labels(&format!("{}=sr", labels::SERVICE));
    wait::until("children of sr garbage-collected", TIMEOUT, || async {
        let gone = deployments.get_opt("sr").await?.is_none()
            && services.get_opt("sr").await?.is_none()
            && pods.list(&lp).await?.items.is_empty();
        Ok::<_, kube::Error>(gone.then_some(()))
    })
    .await?;
    assert!(env.services().get_opt("sr").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn more_gpus_than_a_node_has_is_reported_as_waiting_for_gpu_capacity() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-nogpu").await?;
    env.create("big", bicubic(1, 5)).await?;
    let svc = env
        .wait_status("big", "a WaitingForGPUCapacity condition", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.reason == conditions::reasons::WAITING_FOR_GPU_CAPACITY)
            })
        })
        .await?;
    assert!(
        !is_ready(&svc),
        "not Ready without capacity: {:?}",
        svc.status
    );
    Ok(())
}

/// Name of the operator's leader-election Lease (its `--lease-name` default).
const LEASE_NAME: &str = "hndsr-operator-leader";

async fn wait_lease_holder(
    client: &Client,
    ns: &str,
    holder: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), ns);
    wait::until(
        format!("Lease {ns}/{LEASE_NAME} held by {holder}"),
        timeout,
        || async {
            let lease = leases.get_opt(LEASE_NAME).await?;
            let current = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity);
            Ok::<_, kube::Error>((current.as_deref() == Some(holder)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-op-leader").await?;
    fixtures::install_crd(&ns.client).await?;
    let logs = ns.shared.dir.join("logs");
    let replica = |identity: &str| OperatorOptions {
        lease_namespace: Some(ns.name.clone()),
        identity: format!("{}-{identity}", ns.name),
        wait_ready: false,
        ..OperatorOptions::for_namespace(&ns.name)
    };
    let a = replica("a");
    let b = replica("b");

    let leader = Operator::start(&ns.shared.kubeconfig, &logs, &a).await?;
    wait_lease_holder(&ns.client, &ns.name, &a.identity, TIMEOUT).await?;
    let mut standby = Operator::start(&ns.shared.kubeconfig, &logs, &b).await?;

    let mut env = Env {
        ns: ns.clone(),
        operator: leader,
    };
    env.create("sr", bicubic(1, 1)).await?;
    env.wait_status("sr", "Ready under the first leader", is_ready)
        .await?;
    standby.check_running()?;

    // The leader crashes (no lease release): the standby takes over once the
    // lease expires (15 s by default) and reconciles a change.
    env.operator.kill();
    wait_lease_holder(&ns.client, &ns.name, &b.identity, Duration::from_secs(60)).await?;
    let crashed = std::mem::replace(&mut env.operator, standby);
    drop(crashed);
    env.services()
        .patch(
            "sr",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 2 } })),
        )
        .await?;
    let svc = env
        .wait_status("sr", "2 ready replicas under the new leader", |s| {
            is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(2)
        })
        .await?;
    assert_eq!(
        svc.status.as_ref().and_then(|s| s.observed_generation),
        Some(2)
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_operator_reverts_drift_made_while_it_was_down() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-restart").await?;
    env.create("sr", bicubic(1, 1)).await?;
    env.wait_status("sr", "Ready", is_ready).await?;

    // Graceful stop, then a change nobody is there to revert.
    env.operator.stop();
    env.deployments()
        .patch(
            "sr",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 2 } })),
        )
        .await?;

    env.operator = Operator::start(
        &env.ns.shared.kubeconfig,
        &env.ns.shared.dir.join("logs"),
        &OperatorOptions {
            identity: format!("e2e-{}-restarted", env.ns.name),
            ..OperatorOptions::for_namespace(&env.ns.name)
        },
    )
    .await?;
    let api = env.deployments();
    wait::until("Deployment sr back to 1 replica", TIMEOUT, || async {
        let d = api.get("sr").await?;
        Ok::<_, kube::Error>((d.spec.replicas == Some(1)).then_some(()))
    })
    .await?;
    env.wait_status("sr", "Ready after the restart", |s| {
        is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(1)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_operator_killed_mid_reconcile_converges_without_duplicates() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

    let mut env = Env::start("e2e-op-crash").await?;
    let names = ["c1", "c2", "c3", "c4"];
    let autoscaled = serde_json::json!({
        "model": { "image": "hndsr/server:e2e", "backend": "bicubic" },
        "resources": { "gpu": 0 },
        "autoscaling": { "minReplicas": 1, "maxReplicas": 2 },
    });
    for name in names {
        env.create(name, autoscaled.clone()).await?;
    }
    // SIGKILL as soon as the first child exists: the others are mid-flight.
    wait_deployment(&env, names[0]).await?;
    env.operator.kill();

    env.operator = Operator::start(
        &env.ns.shared.kubeconfig,
        &env.ns.shared.dir.join("logs"),
        &OperatorOptions {
            identity: format!("e2e-{}-after-crash", env.ns.name),
            ..OperatorOptions::for_namespace(&env.ns.name)
        },
    )
    .await?;
    for name in names {
        env.wait_status(name, "Ready after the crash", is_ready)
            .await?;
    }

    let managed = ListParams::default().labels(labels::SERVICE);
    let ns = &env.ns.name;
    let client = env.client();
    let deployments = env.deployments().list(&managed).await?.items;
    let services = env.k8s_services().list(&managed).await?.items;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
        .list(&managed)
        .await?
        .items;
    let replica_sets = Api::<ReplicaSet>::namespaced(client, ns)
        .list(&managed)
        .await?
        .items;
    for (kind, count) in [
        ("Deployments", deployments.len()),
        ("Services", services.len()),
        ("HPAs", hpas.len()),
        ("ReplicaSets (no spurious rollout)", replica_sets.len()),
    ] {
        assert_eq!(count, names.len(), "one {kind} per HndsrService");
    }
    for d in &deployments {
        let controllers = d
            .owner_references()
            .iter()
            .filter(|o| o.controller == Some(true))
            .count();
        assert_eq!(
            controllers,
            1,
            "Deployment {} has one controller",
            d.name_any()
        );
    }
    Ok(())
}

/// Capacity placeholders with the real scheduler on a fake GPU node: the
/// node's two GPUs are held by one serving pod and one placeholder; a
/// scale-up binds its new pod within seconds by preempting the placeholder,
/// which goes Pending (what a cluster autoscaler acts on) and comes back when
/// the serving pod goes.
#[tokio::test]
async fn a_scale_up_preempts_a_placeholder_and_the_placeholder_returns() -> anyhow::Result<()> {
    let mut env = Env::start("e2e-op-placeholder").await?;
    let owner = env.ns.name.clone();
    let node = format!("{owner}-node");
    fixtures::create_dedicated_node(&env.client(), &node, &owner, 2).await?;
    let class = format!("{owner}-placeholder");
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(env.client());
    classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": { "name": class },
                "value": -10,
                "preemptionPolicy": "Never",
            }))?,
        )
        .await?;
    let mut spec = bicubic(1, 1);
    spec["resources"]["nodeSelector"] = serde_json::json!({ fixtures::DEDICATED_KEY: owner });
    spec["resources"]["tolerations"] = serde_json::json!([{
        "key": fixtures::DEDICATED_KEY, "operator": "Equal", "value": owner, "effect": "NoSchedule"
    }]);
    spec["prewarm"] = serde_json::json!({
        "placeholders": { "replicas": 1, "priorityClassName": class }
    });
    env.create("warm", spec).await?;
    env.wait_status("warm", "Ready", is_ready).await?;

    let pods: Api<Pod> = Api::namespaced(env.client(), &env.ns.name);
    let placeholder_sel = format!(
        "{}=warm,{}={}",
        labels::SERVICE,
        labels::ROLE,
        labels::ROLE_PLACEHOLDER
    );
    let bound = |p: &Pod| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            && p.metadata.deletion_timestamp.is_none()
    };
    let count = |sel: String, pred: fn(&Pod, &str) -> bool| {
        let pods = pods.clone();
        let node = node.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(&sel)).await?;
            Ok::<_, kube::Error>(list.items.iter().filter(|p| pred(p, &node)).count())
        }
    };
    let on_node: fn(&Pod, &str) -> bool = |p, node| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.metadata.deletion_timestamp.is_none()
    };
    let pending: fn(&Pod, &str) -> bool = |p, _| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_none()
            && fixtures::unschedulable(p)
    };
    wait::until("the placeholder bound on the node", TIMEOUT, || async {
        Ok::<_, kube::Error>((count(placeholder_sel.clone(), on_node).await? == 1).then_some(()))
    })
    .await?;
    let placeholder = pods
        .list(&ListParams::default().labels(&placeholder_sel))
        .await?
        .items
        .into_iter()
        .find(|p| bound(p))
        .context("the bound placeholder")?;
    assert_eq!(
        placeholder.spec.as_ref().and_then(|s| s.priority),
        Some(-10),
        "placeholders run at their class's negative priority"
    );

    // Every GPU is held: the new serving pod binds only by preemption.
    let start = std::time::Instant::now();
    env.patch_spec("warm", serde_json::json!({ "replicas": 2 }))
        .await?;
    wait::until("2 serving pods bound", TIMEOUT, || async {
        Ok::<_, kube::Error>((count(serving_selector("warm"), on_node).await? == 2).then_some(()))
    })
    .await?;
    let bind = start.elapsed();
    println!("placeholder: scale-up bound its pod by preemption in {bind:.1?}");
    assert!(
        bind < Duration::from_secs(15),
        "binding by preemption took {bind:?}"
    );
    wait::until("the evicted placeholder Pending", TIMEOUT, || async {
        let pending = count(placeholder_sel.clone(), pending).await?;
        let bound = count(placeholder_sel.clone(), on_node).await?;
        Ok::<_, kube::Error>((pending == 1 && bound == 0).then_some(()))
    })
    .await?;
    env.wait_status("warm", "Ready with 2 pods", |s| {
        is_ready(s) && s.status.as_ref().and_then(|st| st.ready_replicas) == Some(2)
    })
    .await?;

    // Capacity frees: the placeholder holds it again.
    env.patch_spec("warm", serde_json::json!({ "replicas": 1 }))
        .await?;
    wait::until("the placeholder back on the node", TIMEOUT, || async {
        Ok::<_, kube::Error>((count(placeholder_sel.clone(), on_node).await? == 1).then_some(()))
    })
    .await?;

    // Removing the field removes the placeholders.
    env.patch_spec("warm", serde_json::json!({ "prewarm": null }))
        .await?;
    let deployments = env.deployments();
    wait::until("the placeholder Deployment deleted", TIMEOUT, || async {
        Ok::<_, kube::Error>(
            deployments
                .get_opt("warm-placeholder")
                .await?
                .is_none()
                .then_some(()),
        )
    })
    .await?;
    classes.delete(&class, &DeleteParams::default()).await?;
    Ok(())
}

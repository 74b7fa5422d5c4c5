//! The Helm chart against the real control plane: `helm lint`, `helm template`
//! applied with `kubectl apply --dry-run=server`, then a real `helm install`
//! whose CRD becomes Established and whose operator Deployment becomes
//! available (its pods run on kwok, so nothing executes in them).
//!
//! Its own test binary: the chart installs the cluster-scoped CRD and RBAC.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;

use hndsr_e2e::{bins, fixtures, shared, wait};

fn chart() -> std::path::PathBuf {
    bins::repo_root().join("charts/hndsr-operator")
}

/// Runs a command, feeding it `stdin`; fails with its output unless it succeeds.
fn run(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn helm(shared: &shared::Shared, home: &Path) -> Command {
    let mut cmd = Command::new(&shared.binaries.helm);
    cmd.env("KUBECONFIG", &shared.kubeconfig)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

#[tokio::test]
async fn chart_lints_dry_runs_and_installs() -> anyhow::Result<()> {
    let ns = shared::namespace("e2e-helm").await?;
    let home = tempfile::tempdir()?;
    let chart = chart();

    // Every optional template renders and lints.
    run(
        helm(ns.shared, home.path()).arg("lint").arg(&chart).args([
            "--strict",
            "--set",
            "prometheusAdapterRules.enabled=true,grafanaDashboard.enabled=true,argocdHealthCheck.enabled=true,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
        ]),
        None,
    )?;
    run(
        helm(ns.shared, home.path())
            .arg("lint")
            .arg(&chart)
            .arg("--strict"),
        None,
    )?;

    // The default rendering is accepted by the apiserver (server-side dry run).
    let manifest = run(
        helm(ns.shared, home.path())
            .args([
                "template",
                "hndsr",
                "--include-crds",
                "--namespace",
                &ns.name,
            ])
            .arg(&chart),
        None,
    )?;
    run(
        Command::new(&ns.shared.binaries.kubectl)
            .env("KUBECONFIG", &ns.shared.kubeconfig)
            .args([
                "apply",
                "--dry-run=server",
                "--namespace",
                &ns.name,
                "-f",
                "-",
            ]),
        Some(&manifest),
    )?;

    // A real install: CRD Established, operator Deployment available.
    run(
        helm(ns.shared, home.path())
            .args([
                "install",
                "hndsr",
                "--namespace",
                &ns.name,
                "--wait",
                "--timeout",
                "120s",
            ])
            .arg(&chart),
        None,
    )?;
    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    let crd_name = format!("hndsrservices.{}", hndsr_crds::GROUP);
    wait::until(
        "the chart's CRD Established",
        Duration::from_secs(60),
        || async {
            let crd = crds.get_opt(&crd_name).await?;
            let established = crd
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            Ok::<_, kube::Error>(established.then_some(()))
        },
    )
    .await?;
    let deployments = run(
        Command::new(&ns.shared.binaries.kubectl)
            .env("KUBECONFIG", &ns.shared.kubeconfig)
            .args(["get", "deployments", "--namespace", &ns.name, "-o", "name"]),
        None,
    )?;
    ensure!(
        deployments.contains("deployment.apps/"),
        "no operator Deployment: {deployments}"
    );

    // The chart's CRD is the committed one: applying the repository's copy
    // over it changes nothing the apiserver would reject.
    fixtures::install_crd(&ns.client).await?;

    run(
        helm(ns.shared, home.path()).args([
            "uninstall",
            "hndsr",
            "--namespace",
            &ns.name,
            "--wait",
        ]),
        None,
    )?;
    Ok(())
}

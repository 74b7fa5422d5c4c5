//! `hndsr-e2e up` / `down`, and the promise that no process outlives the
//! harness: `down` stops everything, and a harness killed with SIGKILL takes
//! its components with it (parent-death signal) and, with a real node, its
//! host changes too (the node's janitor).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use hndsr_e2e::process::pid_alive;

const EXE: &str = env!("CARGO_BIN_EXE_hndsr-e2e");

/// `  <component>  pid <n>` lines printed by `up`.
fn parse_pids(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter_map(|l| {
            l.split_once(" pid ")
                .and_then(|(_, p)| p.trim().parse().ok())
        })
        .collect()
}

/// Starts `up ARGS --dir DIR` in the foreground, SIGKILL-able.
fn spawn_up(args: &[&str], dir: &Path) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(EXE)
        .arg("up")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?)
}

/// What a foreground `up` printed up to its `export KUBECONFIG=` line.
fn read_until_ready(up: &mut std::process::Child) -> anyhow::Result<String> {
    let stdout = up.stdout.take().context("stdout")?;
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("export KUBECONFIG=") {
            break;
        }
    }
    Ok(printed)
}

fn wait_all_gone(pids: &[u32], timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if pids.iter().all(|p| !pid_alive(*p)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    bail!("processes still alive after {timeout:?}: {alive:?}")
}

async fn fake_nodes(kubeconfig: &Path) -> anyhow::Result<usize> {
    let client = hndsr_e2e::client_from_kubeconfig(kubeconfig).await?;
    Ok(Api::<Node>::all(client)
        .list(&ListParams::default())
        .await?
        .items
        .len())
}

/// The tests here start their own control planes: one at a time.
static ONE_PLANE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// One test, two phases, so that two control planes never start at once.
#[tokio::test]
async fn up_down_and_no_process_outlives_the_harness() -> anyhow::Result<()> {
    let _one = ONE_PLANE.lock().await;
    hndsr_e2e::bins::Binaries::locate()?;
    let tmp = tempfile::tempdir()?;

    // Phase 1: up --detach, use it, down.
    let dir = tmp.path().join("detached");
    let out = Command::new(EXE)
        .args(["up", "--detach", "--nodes", "3", "--dir"])
        .arg(&dir)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "up --detach failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.contains("export KUBECONFIG="), "{stdout}");
    assert_eq!(fake_nodes(&dir.join("kubeconfig")).await?, 3);
    let up_log = std::fs::read_to_string(dir.join("up.log"))?;
    let mut pids = parse_pids(&up_log);
    ensure!(pids.len() == 5, "five components in {up_log}");
    let up_pid: u32 = std::fs::read_to_string(dir.join("hndsr-e2e.pid"))?
        .trim()
        .parse()?;
    pids.push(up_pid);

    let out = Command::new(EXE)
        .args(["down", "--dir"])
        .arg(&dir)
        .output()?;
    ensure!(
        out.status.success(),
        "down failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_all_gone(&pids, Duration::from_secs(5)).context("after down")?;
    ensure!(!dir.join("hndsr-e2e.pid").exists());

    // Phase 2: a foreground `up` killed with SIGKILL: its children die too.
    let dir = tmp.path().join("killed");
    let mut up = spawn_up(&[], &dir)?;
    let printed = read_until_ready(&mut up)?;
    let pids = parse_pids(&printed);
    ensure!(pids.len() == 5, "five components in {printed}");
    ensure!(pids.iter().all(|p| pid_alive(*p)), "components running");
    up.kill()?;
    up.wait()?;
    wait_all_gone(&pids, Duration::from_secs(5)).context("after SIGKILL of the harness")?;
    Ok(())
}

/// What the real node changes on the host, as one comparable snapshot.
fn host_state() -> anyhow::Result<String> {
    let sh = |script: &str| -> anyhow::Result<String> {
        let out = Command::new("sh").arg("-c").arg(script).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    Ok([
        sh("iptables-save | grep -E '^(:|-A)' | grep -E 'KUBE|CNI' || true")?,
        sh("ip6tables-save | grep -E '^(:|-A)' | grep -E 'KUBE|CNI' || true")?,
        sh("ip -o link show | grep -E 'hndsr0|veth' || true")?,
        sh("grep -E 'hndsr-node|/run/netns/cni-' /proc/mounts || true")?,
        sh("ls -d /sys/fs/cgroup/*/kubepods* /run/hndsr-node /var/lib/hndsr-node 2>/dev/null || true")?,
        // The brackets keep the pattern from matching this shell itself.
        sh("pgrep -a -f '[c]ontainerd|[k]ubelet|[k]ube-proxy|/[p]ause' || true")?,
        sh("sysctl kernel.panic kernel.panic_on_oops vm.overcommit_memory net.ipv4.ip_forward")?,
    ]
    .join("---\n"))
}

/// A harness with a real node, killed with SIGKILL while a pod runs: its
/// janitor undoes every host change (chains, bridge, veths, mounts, network
/// namespaces, cgroups, containerd's shims and the containers, sysctls).
#[tokio::test]
async fn a_killed_harness_leaves_no_trace_of_its_real_node() -> anyhow::Result<()> {
    let _one = ONE_PLANE.lock().await;
    hndsr_e2e::bins::Binaries::locate()?;
    let before = host_state()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("real");
    let mut up = spawn_up(&["--real-node", "--nodes", "1"], &dir)?;
    let printed = read_until_ready(&mut up)?;
    let registry = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("registry"))
        .map(str::trim)
        .with_context(|| format!("no registry in {printed}"))?;

    // A running pod: a sandbox, a container, a veth, CNI chains, mounts.
    let client = hndsr_e2e::client_from_kubeconfig(&dir.join("kubeconfig")).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, "default");
    let pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "sleeper" },
        "spec": {
            "nodeSelector": { hndsr_e2e::node::POOL_LABEL: hndsr_e2e::node::POOL_REAL },
            "containers": [{ "name": "c", "image": format!("{registry}/hndsr/pause:1") }],
        },
    }))?;
    pods.create(&kube::api::PostParams::default(), &pod).await?;
    hndsr_e2e::wait::until("the pod Running", Duration::from_secs(120), || async {
        let pod = pods.get("sleeper").await?;
        let running = pod.status.and_then(|s| s.phase).as_deref() == Some("Running");
        Ok::<_, kube::Error>(running.then_some(()))
    })
    .await?;
    ensure!(
        host_state()? != before,
        "the node changed nothing on the host?"
    );

    up.kill()?;
    up.wait()?;
    let start = Instant::now();
    loop {
        let now = host_state()?;
        if now == before {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(90) {
            bail!(
                "after SIGKILL of the harness the host still differs:\nbefore:\n{before}\nnow:\n{now}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

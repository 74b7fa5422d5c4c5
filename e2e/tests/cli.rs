//! `hndsr-e2e up` / `down`, and the promise that no process outlives the
//! harness: `down` stops everything, and a harness killed with SIGKILL takes
//! its components with it (parent-death signal).

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

// One test, two phases, so that two control planes never start at once.
#[tokio::test]
async fn up_down_and_no_process_outlives_the_harness() -> anyhow::Result<()> {
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
    let mut up = Command::new(EXE)
        .args(["up", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
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
    let pids = parse_pids(&printed);
    ensure!(pids.len() == 5, "five components in {printed}");
    ensure!(pids.iter().all(|p| pid_alive(*p)), "components running");
    up.kill()?;
    up.wait()?;
    wait_all_gone(&pids, Duration::from_secs(5)).context("after SIGKILL of the harness")?;
    Ok(())
}

//! `hndsr-e2e up` / `hndsr-e2e down`: the e2e control plane, standalone.
//!
//! `up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! kwok and the fake GPU nodes under `<dir>/cluster`, writes
//! `<dir>/kubeconfig`, `<dir>/hndsr-e2e.pid` and stays in the foreground until
//! SIGINT/SIGTERM (or a component dies), then stops everything. `up --detach`
//! runs the same in a new session, waits until it is ready and returns.
//! `down` stops a running `up` by its pid file.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hndsr_e2e::process::pid_alive;
use hndsr_e2e::{ControlPlane, ControlPlaneOptions, FakeNodes};

#[derive(Debug, Parser)]
#[command(
    name = "hndsr-e2e",
    about = "A Kubernetes control plane on 127.0.0.1 for HNDSR's e2e tests"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the control plane.
    Up {
        /// State directory (git-ignored).
        #[arg(long, env = "HNDSR_E2E_DIR", default_value = ".e2e")]
        dir: PathBuf,
        /// Run in the background; return once it is ready.
        #[arg(long)]
        detach: bool,
        /// Number of fake GPU nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// `nvidia.com/gpu` capacity of each fake node.
        #[arg(long, default_value_t = 4)]
        gpus_per_node: u32,
        /// Also a real node (kubelet + containerd + kube-proxy) and the image
        /// registry with `make images` pushed to it (root only).
        #[arg(long)]
        real_node: bool,
    },
    /// Stop the control plane started by `up`.
    Down {
        /// State directory.
        #[arg(long, env = "HNDSR_E2E_DIR", default_value = ".e2e")]
        dir: PathBuf,
    },
}

const PID_FILE: &str = "hndsr-e2e.pid";
const READY_FILE: &str = "ready";

fn main() -> ExitCode {
    hndsr_e2e::shared::init_tracing();
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Up {
            dir,
            detach,
            nodes,
            gpus_per_node,
            real_node,
        } => absolute(&dir).and_then(|dir| {
            let shape = Shape {
                nodes,
                gpus_per_node,
                real_node,
            };
            if detach {
                up_detached(&dir, &shape)
            } else {
                up(&dir, &shape)
            }
        }),
        Cmd::Down { dir } => absolute(&dir).and_then(|dir| down(&dir)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hndsr-e2e: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(std::env::current_dir()
        .context("reading the current directory")?
        .join(dir))
}

fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new("/proc")
        .join(pid.to_string())
        .exists()
        .then_some(pid)
}

/// What `up` starts besides the control plane.
struct Shape {
    nodes: usize,
    gpus_per_node: u32,
    real_node: bool,
}

fn up(dir: &Path, shape: &Shape) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(dir) {
        bail!("already running (pid {pid}); stop it with `hndsr-e2e down`");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join(READY_FILE));
    let mut opts = ControlPlaneOptions::new(dir.join("cluster"));
    opts.nodes = FakeNodes {
        count: shape.nodes,
        gpus_per_node: shape.gpus_per_node,
        ..FakeNodes::default()
    };
    opts.real_node = shape.real_node;
    // A current-thread runtime: everything, the child spawns included, runs on
    // the main thread, which the children's parent-death signal is tied to.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async {
        let started = Instant::now();
        let mut plane = ControlPlane::start(opts).await?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::copy(plane.kubeconfig(), &kubeconfig).context("copying the kubeconfig")?;
        std::fs::write(dir.join(PID_FILE), std::process::id().to_string())
            .context("writing the pid file")?;
        println!(
            "control plane ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        println!("  apiserver  {}", plane.server());
        for (name, pid) in plane.pids() {
            println!("  {name:<24} pid {pid}");
        }
        println!("  logs       {}", plane.dir().join("logs").display());
        if let (Some(registry), Some(images)) = (plane.registry(), plane.images()) {
            println!("  registry   {registry}");
            if let Some(prometheus) = plane.prometheus() {
                println!("  prometheus {prometheus}");
            }
            println!("  images     {} {}", images.server, images.operator);
        }
        println!("export KUBECONFIG={}", kubeconfig.display());
        std::fs::write(dir.join(READY_FILE), kubeconfig.display().to_string())
            .context("writing the ready file")?;

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let outcome = loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break Ok(()),
                _ = term.recv() => break Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if let Err(e) = plane.check_running() {
                        break Err(anyhow::Error::from(e));
                    }
                }
            }
        };
        println!("stopping the control plane");
        plane.stop();
        let _ = std::fs::remove_file(dir.join(READY_FILE));
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        outcome
    })
}

fn up_detached(dir: &Path, shape: &Shape) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(dir) {
        bail!("already running (pid {pid}); stop it with `hndsr-e2e down`");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join(READY_FILE));
    let log = dir.join("up.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("locating this program")?;
    let mut cmd = Command::new("setsid");
    cmd.arg(exe)
        .arg("up")
        .arg("--dir")
        .arg(dir)
        .arg("--nodes")
        .arg(shape.nodes.to_string())
        .arg("--gpus-per-node")
        .arg(shape.gpus_per_node.to_string());
    if shape.real_node {
        cmd.arg("--real-node");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting `setsid hndsr-e2e up`")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(kubeconfig) = std::fs::read_to_string(dir.join(READY_FILE)) {
            let pid = running_pid(dir).map_or_else(|| "?".to_owned(), |p| p.to_string());
            println!(
                "control plane running in the background (pid {pid}, log {})",
                log.display()
            );
            println!("export KUBECONFIG={kubeconfig}");
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "`hndsr-e2e up` exited ({status}) before it was ready; {}:\n{}",
                log.display(),
                hndsr_e2e::process::log_tail(&log, 40)
            );
        }
        if Instant::now() > deadline {
            bail!("not ready after 300s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(dir) else {
        println!(
            "not running (no live pid in {})",
            dir.join(PID_FILE).display()
        );
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        return Ok(());
    };
    let signal = |sig: &str| {
        Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status()
    };
    signal("-TERM").context("running kill")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if pid_alive(pid) {
        eprintln!("pid {pid} did not stop within 60s; sending SIGKILL (its children die with it)");
        signal("-KILL").context("running kill")?;
    }
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    let _ = std::fs::remove_file(dir.join(READY_FILE));
    println!("stopped (pid {pid})");
    Ok(())
}

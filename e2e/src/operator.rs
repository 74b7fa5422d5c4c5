//! The operator binary, run as a child process against the control plane.
//!
//! It is the `hndsr-operator` that cargo built next to the test binary
//! (`target/<profile>/hndsr-operator`, or `$HNDSR_OPERATOR_BIN`), started with
//! `KUBECONFIG` pointing at the control plane. Each test usually runs its own,
//! scoped to the test's namespace with `--watch-namespace`, so tests running
//! in parallel do not see each other's objects.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, http_get};
use crate::{Error, Result};

/// Environment variable naming the operator binary explicitly.
pub const OPERATOR_BIN_ENV: &str = "HNDSR_OPERATOR_BIN";

/// The command that builds the operator.
pub const OPERATOR_BUILD_COMMAND: &str = "cargo build -p hndsr-operator";

/// Where the operator binary is: `$HNDSR_OPERATOR_BIN`, else next to the
/// running test binary's profile directory (`target/debug/deps/x` →
/// `target/debug/hndsr-operator`).
pub fn binary() -> Result<PathBuf> {
    let path = match std::env::var_os(OPERATOR_BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().map_err(Error::io("locating", "the test binary"))?;
            let profile_dir = exe
                .ancestors()
                .find(|d| d.file_name().is_some_and(|n| n == "deps"))
                .and_then(Path::parent)
                .or_else(|| exe.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default();
            profile_dir.join("hndsr-operator")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingOperator { path })
    }
}

/// A running operator.
#[derive(Debug)]
pub struct Operator {
    proc: Proc,
    metrics_addr: String,
}

/// How to run one operator.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// `--watch-namespace`; `None` watches every namespace.
    pub watch_namespace: Option<String>,
    /// Leader election on a Lease in this namespace; `None` disables it.
    pub lease_namespace: Option<String>,
    /// `--identity` (shows up as the Lease holder).
    pub identity: String,
    /// Further flags.
    pub extra_args: Vec<String>,
    /// Wait for `/readyz` to answer 200 before returning.
    pub wait_ready: bool,
}

impl OperatorOptions {
    /// One operator for `namespace`, no leader election.
    pub fn for_namespace(namespace: &str) -> Self {
        Self {
            watch_namespace: Some(namespace.to_owned()),
            lease_namespace: None,
            identity: format!("e2e-{namespace}"),
            extra_args: Vec::new(),
            wait_ready: true,
        }
    }
}

impl Operator {
    /// Starts the operator with `KUBECONFIG=kubeconfig`, logging to
    /// `<log_dir>/operator-<identity>.log`, and waits for `/readyz`.
    ///
    /// It dies with the thread that calls this (see [`crate::process`]): in a
    /// `#[tokio::test]` that is the test's own thread.
    pub async fn start(kubeconfig: &Path, log_dir: &Path, opts: &OperatorOptions) -> Result<Self> {
        let bin = binary()?;
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        // Every operator here shares the host: its own zero-responder port,
        // on every interface (kube-proxy forwards to the host's address).
        let mut args = vec![
            format!("--metrics-addr={metrics_addr}"),
            format!("--zero-responder-addr=0.0.0.0:{}", free_port()?),
            format!("--identity={}", opts.identity),
        ];
        if let Some(ns) = &opts.watch_namespace {
            args.push(format!("--watch-namespace={ns}"));
        }
        match &opts.lease_namespace {
            Some(ns) => {
                args.push("--leader-election=true".into());
                args.push(format!("--lease-namespace={ns}"));
            }
            None => args.push("--leader-election=false".into()),
        }
        args.extend(opts.extra_args.iter().cloned());
        std::fs::create_dir_all(log_dir).map_err(Error::io("creating", log_dir))?;
        let kubeconfig = kubeconfig.display().to_string();
        let rust_log =
            std::env::var("HNDSR_E2E_OPERATOR_LOG").unwrap_or_else(|_| "info".to_owned());
        let proc = Proc::spawn(
            &format!("operator-{}", opts.identity),
            &bin,
            &args,
            log_dir,
            &[
                ("KUBECONFIG", kubeconfig.as_str()),
                ("RUST_LOG", rust_log.as_str()),
            ],
        )?;
        let mut operator = Self { proc, metrics_addr };
        if opts.wait_ready {
            operator.wait_ready(Duration::from_secs(60)).await?;
        }
        Ok(operator)
    }

    /// Waits until `/readyz` answers 200, failing early if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.proc.check_running()?;
            if let Some((200, _)) = http_get(&self.metrics_addr, "/readyz").await {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("operator /readyz on {}", self.metrics_addr),
                    waited: timeout,
                    detail: format!(
                        "; last lines of {}:\n{}",
                        self.proc.log().display(),
                        crate::process::log_tail(self.proc.log(), 30)
                    ),
                });
            }
            tokio::time::sleep(crate::wait::POLL).await;
        }
    }

    /// The body of `/metrics`.
    pub async fn metrics(&self) -> Option<String> {
        match http_get(&self.metrics_addr, "/metrics").await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    /// Address of its `/metrics`, `/healthz`, `/readyz` server.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    /// Its process id (the operator itself: `setpriv` execs it in place), for
    /// reading `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        self.proc.log()
    }

    /// Fails with the end of its log when it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(10));
    }

    /// SIGKILL at once (a crash: no lease release, no cleanup).
    pub fn kill(&mut self) {
        self.proc.stop(Duration::ZERO);
    }
}

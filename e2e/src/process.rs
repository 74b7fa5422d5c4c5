//! Child processes that never outlive the harness.
//!
//! Every program is started through `setpriv --pdeathsig KILL` (util-linux),
//! so the kernel kills it as soon as its parent goes away, even when the
//! harness itself is killed with SIGKILL. The workspace forbids `unsafe`,
//! which rules out calling `prctl(PR_SET_PDEATHSIG)` in a `pre_exec` hook
//! ourselves; `setpriv` makes the same call and then execs the program.
//!
//! The death signal fires when the *thread* that spawned the child exits, not
//! the process: spawn from a thread that lives as long as the control plane
//! (the main thread of `hndsr-e2e up`, a dedicated thread in
//! [`crate::shared`]), never from a short-lived runtime worker.
//!
//! Each child gets its own process group, so a Ctrl-C in a terminal reaches
//! only the harness, which then stops the children in order. [`Proc::stop`]
//! (also run on drop) sends SIGTERM, waits, then SIGKILLs.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::{Error, Result};

/// A running child process whose output goes to `<log_dir>/<name>.log`.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// Starts `program args...` under `setpriv --pdeathsig KILL`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_inner(name, program, args, log_dir, env, "KILL")
    }

    /// Like [`Proc::spawn`] with `signal` as the parent-death signal: a
    /// program that must act when the harness dies (a janitor) handles it.
    pub fn spawn_with_death_signal(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        signal: &str,
    ) -> Result<Self> {
        Self::spawn_inner(name, program, args, log_dir, &[], signal)
    }

    fn spawn_inner(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        env: &[(&str, &str)],
        death_signal: &str,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).map_err(Error::io("creating", &log))?;
        let err = out.try_clone().map_err(Error::io("duplicating", &log))?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg(death_signal)
            .arg("--")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            name: format!("{name} (via setpriv from util-linux)"),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            stopped: false,
        })
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails with the end of its log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log, 30),
            }),
            Err(source) => Err(Error::Io {
                op: "waiting for",
                path: PathBuf::from(&self.name),
                source,
            }),
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the process.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on 127.0.0.1 for a child process to listen on.
///
/// Picked at random *below* the kernel's ephemeral range and checked by
/// binding it. A port from `bind(0)` would come from the ephemeral range,
/// which the kernel also hands out as the local port of every outgoing
/// connection: between our check and the child's `listen`, any process on
/// the machine could take it for a connection (seen in CI: etcd failing
/// with "address already in use"). Below that range only listeners compete,
/// and the check catches those that are already there.
pub fn free_port() -> Result<u16> {
    let range = listen_range();
    if !range.is_empty() {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let port = rng.random_range(range.clone());
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // No room below the range, or every probed port is taken: let the
    // kernel pick one (the race above applies again).
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("binding", "127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("reading address of", "127.0.0.1:0"))?
        .port();
    Ok(port)
}

/// How many ports below the ephemeral range [`free_port`] picks from
/// (20000..32768 with Linux's default range).
const BELOW_EPHEMERAL: u16 = 12_768;

/// The ports [`free_port`] picks from: up to [`BELOW_EPHEMERAL`] ports
/// (none privileged) right below the kernel's ephemeral range.
fn listen_range() -> std::ops::Range<u16> {
    let (ephemeral_low, _) = ephemeral_range();
    ephemeral_low.saturating_sub(BELOW_EPHEMERAL).max(1024)..ephemeral_low
}

/// The kernel's ephemeral port range (Linux default when unreadable).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or((32_768, 60_999))
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next()?, parts.next()?) {
        (Ok(low), Ok(high)) if 1024 < low && low <= high => Some((low, high)),
        _ => None,
    }
}

/// `GET path` over plain HTTP/1.0 to `addr` (`host:port`): the status code and
/// body, or `None` when the connection or the exchange fails (5 s limit).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
}

/// Polls `GET path` on `addr` until it answers 200. Fails early when
/// `check_running` does (a component exited), and after `timeout` with the
/// tail of `log`, naming `what`.
pub async fn wait_http_ok(
    addr: &str,
    path: &str,
    what: &str,
    log: &Path,
    timeout: Duration,
    check_running: impl FnMut() -> Result<()>,
) -> Result<()> {
    poll_ready(what, log, timeout, check_running, || async {
        matches!(http_get(addr, path).await, Some((200, _)))
    })
    .await
}

/// Like [`wait_http_ok`], until `addr` accepts TCP connections (a server
/// that speaks no HTTP, such as redis).
pub async fn wait_tcp_open(
    addr: &str,
    what: &str,
    log: &Path,
    timeout: Duration,
    check_running: impl FnMut() -> Result<()>,
) -> Result<()> {
    poll_ready(what, log, timeout, check_running, || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
}

/// Calls `ready` every [`crate::wait::POLL`] until it says yes; fails early
/// when `check_running` does, and after `timeout` with the tail of `log`.
async fn poll_ready<F, Fut>(
    what: &str,
    log: &Path,
    timeout: Duration,
    mut check_running: impl FnMut() -> Result<()>,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        check_running()?;
        if ready().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: timeout,
                detail: format!(": {}", log_tail(log, 20)),
            });
        }
        tokio::time::sleep(crate::wait::POLL).await;
    }
}

/// Runs `cmd` to completion and returns its standard output; `program`
/// names it when it cannot start, `what` when it exits non-zero (with its
/// standard error).
pub fn run_output(cmd: &mut Command, program: &str, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        name: program.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out.stdout)
}

/// Whether process `pid` exists and is not a zombie (a killed process whose
/// parent has not reaped it yet counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces or parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ephemeral_range_is_read_and_odd_contents_are_refused() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("40000 40000"), Some((40000, 40000)));
        for odd in ["", "32768", "60999 32768", "80 60999", "a b", "32768 70000"] {
            assert_eq!(parse_port_range(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn free_ports_lie_below_the_ephemeral_range_and_can_be_bound() {
        let range = listen_range();
        assert_eq!(range.end, ephemeral_range().0);
        for _ in 0..20 {
            let port = free_port().unwrap();
            assert!(range.contains(&port), "{port} is outside {range:?}");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}

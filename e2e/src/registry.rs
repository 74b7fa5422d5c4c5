//! The image registry on 127.0.0.1 (`distribution`, built from its Go
//! module): `make images` output is pushed here and the real node's
//! containerd pulls from it, as a kubelet pulls in a real cluster.
//!
//! Its storage lives in the cache (`~/.cache/hndsr/registry`), so a warm run
//! pushes only the layers that changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bins::{self, Binaries};
use crate::process::{Proc, free_port, http_get, log_tail};
use crate::{Error, Result, wait};

/// The command that builds the images (from the repository root).
pub const IMAGES_COMMAND: &str = "make images";

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    addr: String,
    proc: Proc,
}

impl Registry {
    /// Starts the registry on a free loopback port and waits until it answers.
    pub async fn start(bins: &Binaries, dir: &Path, timeout: Duration) -> Result<Self> {
        let storage = storage_dir();
        std::fs::create_dir_all(&storage).map_err(Error::io("creating", &storage))?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yaml");
        let text = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        std::fs::write(&config, text).map_err(Error::io("writing", &config))?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(Error::io("creating", &logs))?;
        let proc = Proc::spawn(
            "registry",
            &bins.registry,
            &["serve".into(), config.display().to_string()],
            &logs,
            &[
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_SDK_DISABLED", "true"),
            ],
        )?;
        let mut registry = Self { addr, proc };
        let start = Instant::now();
        loop {
            registry.proc.check_running()?;
            if let Some((200, _)) = http_get(&registry.addr, "/v2/").await {
                return Ok(registry);
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("the registry on {}", registry.addr),
                    waited: timeout,
                    detail: format!(": {}", log_tail(registry.proc.log(), 20)),
                });
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Pushes the images `make images` built (`images/build.sh push`), and
    /// returns their references in this registry.
    pub fn push_images(&self) -> Result<Images> {
        let script = bins::repo_root().join("images/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(["push", &self.addr])
            .current_dir(bins::repo_root())
            .output()
            .map_err(|source| Error::Spawn {
                name: format!("bash {}", script.display()),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "pushing the images failed (build them with `{IMAGES_COMMAND}`): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let names = Command::new("bash")
            .arg(&script)
            .arg("names")
            .output()
            .map_err(|source| Error::Spawn {
                name: format!("bash {} names", script.display()),
                source,
            })?;
        let names: Vec<String> = String::from_utf8_lossy(&names.stdout)
            .lines()
            .map(|n| format!("{}/{n}", self.addr))
            .collect();
        match names.as_slice() {
            [server, operator, pause, fetch] => Ok(Images {
                server: server.clone(),
                operator: operator.clone(),
                pause: pause.clone(),
                fetch: fetch.clone(),
            }),
            _ => Err(Error::Setup(format!(
                "images/build.sh names printed {names:?}, not four images"
            ))),
        }
    }

    /// Stops the registry.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

/// Image references in the local registry.
#[derive(Debug, Clone)]
pub struct Images {
    /// hndsr-server
    pub server: String,
    /// hndsr-operator
    pub operator: String,
    /// The pod sandbox.
    pub pause: String,
    /// The init container that downloads `weights.uri` (`--fetcher-image`).
    pub fetch: String,
}

fn storage_dir() -> PathBuf {
    bins::cache_dir()
        .parent()
        .map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
        .join("registry")
}

//! The harness's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program of the control plane has not been built.
    #[error(
        "e2e binary {path} is missing: build the control-plane binaries first with \
         `{command}` (needs Go >= 1.26 and the Go module proxy)",
        command = crate::bins::BUILD_COMMAND
    )]
    MissingBinary {
        /// Where the binary was expected.
        path: PathBuf,
    },
    /// The operator binary has not been built.
    #[error(
        "operator binary {path} is missing: build it first with `{command}` \
         (or point ${env} at it)",
        command = crate::operator::OPERATOR_BUILD_COMMAND,
        env = crate::operator::OPERATOR_BIN_ENV
    )]
    MissingOperator {
        /// Where it was expected.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("starting {name}: {source}")]
    Spawn {
        /// The component.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A child process exited while it should be running.
    #[error("{name} exited ({status}); last lines of {log}:\n{tail}")]
    Exited {
        /// The component.
        name: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Something did not become ready in time.
    #[error("timed out after {waited:?} waiting for {what}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last observation, or the end of a log.
        detail: String,
    },
    /// Generating certificates failed.
    #[error("generating {what}: {source}")]
    Cert {
        /// Which certificate or key.
        what: &'static str,
        /// The cause.
        source: rcgen::Error,
    },
    /// A Kubernetes API call failed.
    #[error("{op}: {source}")]
    Kube {
        /// What was being done.
        op: String,
        /// The cause.
        source: kube::Error,
    },
    /// The kubeconfig the harness wrote could not be loaded.
    #[error("loading kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// The shared control plane failed to start earlier in this process.
    /// The host cannot run what was asked (the message says what to do).
    #[error("{0}")]
    Setup(String),
    #[error("the shared e2e control plane failed to start: {0}")]
    Shared(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn kube(op: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let op = op.into();
        move |source| Self::Kube { op, source }
    }
}

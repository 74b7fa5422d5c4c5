//! One control plane per test binary, shared by all its tests; a fresh
//! namespace per test.
//!
//! Each `#[tokio::test]` has its own runtime, which ends with the test, so the
//! control plane cannot belong to any of them: it is started on a dedicated
//! thread that lives until the process exits. That thread is the parent of
//! every component, so they are killed by their parent-death signal when the
//! test binary exits, however it exits (see [`crate::process`]). Tests make
//! their own clients from the kubeconfig.
//!
//! The working directory is `$TMPDIR/hndsr-e2e-<pid>` (logs in `logs/`); those
//! of test processes that are gone are removed when the next one starts.

use std::path::PathBuf;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use rand::Rng;

use crate::bins::Binaries;
use crate::cluster::client_from_kubeconfig;
use crate::registry::Images;
use crate::{ControlPlane, ControlPlaneOptions, Error, Result, wait};

/// What tests need to know about the shared control plane.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The working directory (logs in `logs/`).
    pub dir: PathBuf,
    /// The programs, kubectl and helm included.
    pub binaries: Binaries,
    /// The images in the local registry (a real-node plane only).
    pub images: Option<Images>,
    /// `127.0.0.1:PORT` of Prometheus (a real-node plane only).
    pub prometheus: Option<String>,
}

static SHARED: OnceLock<std::result::Result<Shared, String>> = OnceLock::new();
static SHARED_REAL_NODE: OnceLock<std::result::Result<Shared, String>> = OnceLock::new();

const DIR_PREFIX: &str = "hndsr-e2e-";

/// The shared control plane, started on first use. Blocks while it starts
/// (about 10-20 s); call it through [`tokio::task::spawn_blocking`] or use
/// [`namespace`].
pub fn control_plane() -> Result<&'static Shared> {
    SHARED
        .get_or_init(|| start_on_own_thread(false))
        .as_ref()
        .map_err(|e| Error::Shared(e.clone()))
}

/// Like [`control_plane`], with the image registry and a real node
/// ([`crate::node`]; root only). Its host changes are undone by the node's
/// janitor when the test process exits.
pub fn control_plane_with_real_node() -> Result<&'static Shared> {
    SHARED_REAL_NODE
        .get_or_init(|| start_on_own_thread(true))
        .as_ref()
        .map_err(|e| Error::Shared(e.clone()))
}

fn start_on_own_thread(real_node: bool) -> std::result::Result<Shared, String> {
    init_tracing();
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("hndsr-e2e-control-plane".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("building a runtime: {e}")));
                    return;
                }
            };
            let mut opts = ControlPlaneOptions::new(&dir);
            opts.real_node = real_node;
            // Pulling the server image and starting the node add to the start.
            if real_node {
                opts.start_timeout = std::time::Duration::from_secs(300);
            }
            match runtime.block_on(ControlPlane::start(opts)) {
                Ok(plane) => {
                    let shared = Shared {
                        kubeconfig: plane.kubeconfig().to_owned(),
                        dir: plane.dir().to_owned(),
                        binaries: plane.binaries().clone(),
                        images: plane.images().cloned(),
                        prometheus: plane.prometheus().map(str::to_owned),
                    };
                    eprintln!(
                        "hndsr-e2e: control plane up, KUBECONFIG={}",
                        shared.kubeconfig.display()
                    );
                    let _ = tx.send(Ok(shared));
                    // Keep the plane, and this thread (its children's parent),
                    // until the process exits.
                    let _plane = plane;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .map_err(|e| format!("spawning the control-plane thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the control-plane thread ended without an answer".to_owned())?
}

/// Removes the working directories of earlier test processes that are gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid
            .parse::<u32>()
            .is_ok_and(|pid| !crate::process::pid_alive(pid))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Logs to stderr (shown for failing tests), filtered by `RUST_LOG`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
            }),
        )
        .with_test_writer()
        .try_init();
}

/// A namespace of its own for one test, on the shared control plane.
#[derive(Clone)]
pub struct TestNamespace {
    /// An admin client made on the calling test's runtime.
    pub client: Client,
    /// The namespace name.
    pub name: String,
    /// The shared control plane.
    pub shared: &'static Shared,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestNamespace {
    /// Deletes the namespace (not awaited to completion).
    pub async fn delete(&self) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::default())
            .await
            .map_err(Error::kube(format!("deleting namespace {}", self.name)))?;
        Ok(())
    }
}

/// Starts the shared control plane if needed, creates namespace
/// `<prefix>-<random>` and waits for its default ServiceAccount (pods cannot
/// be created before it exists).
pub async fn namespace(prefix: &str) -> Result<TestNamespace> {
    namespace_on(prefix, control_plane).await
}

/// [`namespace`] on the control plane with a real node.
pub async fn namespace_with_real_node(prefix: &str) -> Result<TestNamespace> {
    namespace_on(prefix, control_plane_with_real_node).await
}

async fn namespace_on(
    prefix: &str,
    plane: fn() -> Result<&'static Shared>,
) -> Result<TestNamespace> {
    let shared = tokio::task::spawn_blocking(plane)
        .await
        .map_err(|e| Error::Shared(format!("the start-up task failed: {e}")))??;
    let client = client_from_kubeconfig(&shared.kubeconfig).await?;
    let suffix: u32 = rand::rng().random_range(0..0x100_0000);
    let name = format!("{prefix}-{suffix:06x}");
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name },
    }))
    .expect("the namespace literal is a valid Namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(Error::kube(format!("creating namespace {name}")))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait::until(
        format!("ServiceAccount {name}/default"),
        std::time::Duration::from_secs(60),
        || async { sas.get_opt("default").await.map(|sa| sa.map(|_| ())) },
    )
    .await?;
    Ok(TestNamespace {
        client,
        name,
        shared,
    })
}

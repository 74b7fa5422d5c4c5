//! Argo CD for the GitOps tests: its application controller and repo server
//! (one binary, the role chosen by `ARGOCD_BINARY_NAME`) and the redis both
//! need, run as local processes the way Argo CD's own development setup runs
//! them (`ARGOCD_FAKE_IN_CLUSTER=true`: the in-cluster destination
//! `https://kubernetes.default.svc` is the cluster of `KUBECONFIG`).
//!
//! Each instance lives in a namespace of its own: its settings (argocd-cm
//! with the health check exactly as the chart renders it, argocd-secret, the
//! `default` AppProject) and its Applications are there, so tests running
//! side by side never share a controller. Argo CD's API server, UI, Dex and
//! ApplicationSet controller are not run: nothing here needs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use rand::Rng;

use crate::bins::{Binaries, repo_root};
use crate::fixtures::{FIELD_MANAGER, apply_crd_file};
use crate::process::{Proc, free_port, log_tail, run_output, wait_http_ok, wait_tcp_open};
use crate::{Error, Result};

/// Where redis-server is (Debian's package; `make host-packages` installs it).
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// The argocd-cm key of the HndsrService health check.
pub const HEALTH_KEY: &str = "resource.customizations.health.hndsr.io_HndsrService";

/// The in-cluster destination of an Application.
pub const IN_CLUSTER: &str = "https://kubernetes.default.svc";

/// `argoproj.io/v1alpha1` Application.
pub fn application_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "Application",
    ))
}

/// `argoproj.io/v1alpha1` AppProject.
pub fn app_project_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "AppProject",
    ))
}

/// What to run Argo CD with.
#[derive(Debug, Clone)]
pub struct ArgoCdOptions {
    /// The namespace of its settings and Applications.
    pub namespace: String,
    /// How often the controller re-reads git without being asked
    /// (`--app-resync`; Argo CD's default is 120 s).
    pub resync: Duration,
    /// How long to wait for each component to come up.
    pub timeout: Duration,
}

impl ArgoCdOptions {
    /// Argo CD in `namespace`, re-reading git every 10 s.
    pub fn for_namespace(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            resync: Duration::from_secs(10),
            timeout: Duration::from_secs(90),
        }
    }
}

/// Redis, the repo server and the application controller, running; dropped,
/// they stop in that order reversed (fields drop in declaration order).
#[derive(Debug)]
pub struct ArgoCd {
    controller: Proc,
    repo_server: Proc,
    redis: Proc,
}

impl ArgoCd {
    /// Installs Argo CD's CRDs (idempotent), writes its settings into
    /// `opts.namespace` (which must exist) and starts the three processes,
    /// logging into `log_dir`.
    pub async fn start(
        bins: &Binaries,
        kubeconfig: &Path,
        log_dir: &Path,
        client: &Client,
        opts: &ArgoCdOptions,
    ) -> Result<Self> {
        if !Path::new(REDIS_SERVER).is_file() {
            return Err(Error::Setup(format!(
                "{REDIS_SERVER} is missing: Argo CD needs redis; install it with \
                 `make host-packages` (apt-get install redis-server)"
            )));
        }
        install_crds(client, &bins.argocd_crds).await?;
        let ns = opts.namespace.as_str();
        write_settings(client, ns, chart_health_check(bins)?).await?;

        let state = log_dir.join(format!("argocd-{ns}"));
        for sub in ["tls", "ssh", "gpg", "tmp"] {
            std::fs::create_dir_all(state.join(sub)).map_err(Error::io("creating", &state))?;
        }
        let redis_port = free_port()?;
        let mut redis = Proc::spawn(
            &format!("argocd-redis-{ns}"),
            Path::new(REDIS_SERVER),
            &[
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                redis_port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ],
            log_dir,
            &[],
        )?;
        let redis_addr = format!("127.0.0.1:{redis_port}");
        let log = redis.log().to_owned();
        wait_tcp_open(&redis_addr, "redis", &log, opts.timeout, || {
            redis.check_running()
        })
        .await?;

        let kubeconfig = kubeconfig.display().to_string();
        let path = |sub: &str| state.join(sub).display().to_string();
        let (tls, ssh, gpg, tmp) = (path("tls"), path("ssh"), path("gpg"), path("tmp"));
        // The scripts the repo server runs, first on PATH as in Argo CD's image.
        let search_path = format!(
            "{}:{}",
            bins.argocd_scripts.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let env = |role: &'static str| {
            vec![
                ("ARGOCD_BINARY_NAME", role),
                ("PATH", search_path.as_str()),
                ("ARGOCD_FAKE_IN_CLUSTER", "true"),
                ("KUBECONFIG", kubeconfig.as_str()),
                ("ARGOCD_TLS_DATA_PATH", tls.as_str()),
                ("ARGOCD_SSH_DATA_PATH", ssh.as_str()),
                ("ARGOCD_GNUPGHOME", gpg.as_str()),
                ("ARGOCD_GPG_ENABLED", "false"),
                // The repo server's clones.
                ("TMPDIR", tmp.as_str()),
            ]
        };

        let repo_port = free_port()?;
        let repo_metrics_port = free_port()?;
        let mut repo_server = Proc::spawn(
            &format!("argocd-repo-server-{ns}"),
            &bins.argocd,
            &[
                "--address=127.0.0.1".into(),
                format!("--port={repo_port}"),
                "--metrics-address=127.0.0.1".into(),
                format!("--metrics-port={repo_metrics_port}"),
                format!("--redis={redis_addr}"),
                // gRPC over TLS as installed (a self-signed certificate the
                // repo server makes; the controller does not pin it).
                "--logformat=text".into(),
            ],
            log_dir,
            &env("argocd-repo-server"),
        )?;
        let log = repo_server.log().to_owned();
        wait_http_ok(
            &format!("127.0.0.1:{repo_metrics_port}"),
            "/healthz?full=true",
            "Argo CD repo server /healthz",
            &log,
            opts.timeout,
            || {
                redis.check_running()?;
                repo_server.check_running()
            },
        )
        .await?;

        let controller_metrics = free_port()?;
        let controller = Proc::spawn(
            &format!("argocd-application-controller-{ns}"),
            &bins.argocd,
            &[
                format!("--namespace={ns}"),
                format!("--redis={redis_addr}"),
                format!("--repo-server=127.0.0.1:{repo_port}"),
                format!("--metrics-port={controller_metrics}"),
                format!("--app-resync={}", opts.resync.as_secs().max(1)),
                // Resource health is kept in redis by default (for the API
                // server, not run here); persisted, the tests read it from
                // the Application.
                "--persist-resource-health".into(),
                "--logformat=text".into(),
            ],
            log_dir,
            &env("argocd-application-controller"),
        )?;
        let mut argocd = Self {
            controller,
            repo_server,
            redis,
        };
        let log = argocd.controller.log().to_owned();
        wait_http_ok(
            &format!("127.0.0.1:{controller_metrics}"),
            "/healthz",
            "Argo CD application controller /healthz",
            &log,
            opts.timeout,
            || argocd.check_running(),
        )
        .await?;
        Ok(argocd)
    }

    /// The end of the controller's and the repo server's logs, for failures.
    pub fn log_tails(&self) -> String {
        format!(
            "application controller:\n{}\nrepo server:\n{}",
            log_tail(self.controller.log(), 30),
            log_tail(self.repo_server.log(), 15)
        )
    }

    /// Fails when any of the three has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.redis.check_running()?;
        self.repo_server.check_running()?;
        self.controller.check_running()
    }
}

/// The chart's argocd-cm data for HndsrService: `helm template` with
/// `argocdHealthCheck.enabled=true`, its ConfigMap's `data`.
pub fn chart_health_check(bins: &Binaries) -> Result<BTreeMap<String, String>> {
    let chart = repo_root().join("charts/hndsr-operator");
    let rendered = run_output(
        Command::new(&bins.helm)
            .args(["template", "hndsr"])
            .arg(&chart)
            .args([
                "--set",
                "argocdHealthCheck.enabled=true",
                "--show-only",
                "templates/argocd-health.yaml",
            ]),
        "helm template",
        "helm template of the Argo CD health check",
    )?;
    let cm: ConfigMap = serde_yaml::from_slice(&rendered).map_err(|e| {
        Error::Setup(format!(
            "the chart's Argo CD health check is not a ConfigMap: {e}"
        ))
    })?;
    let data = cm.data.unwrap_or_default();
    if !data.contains_key(HEALTH_KEY) {
        return Err(Error::Setup(format!(
            "the chart's Argo CD health ConfigMap has no {HEALTH_KEY} key"
        )));
    }
    Ok(data)
}

/// argocd-cm (the chart's health check), argocd-secret and the `default`
/// AppProject in `ns`, as an Argo CD installation would have them.
async fn write_settings(
    client: &Client,
    ns: &str,
    mut data: BTreeMap<String, String>,
) -> Result<()> {
    // Several instances share the cluster: without an installation ID each
    // would take the others' resources (same Application name) for its own,
    // and prune them.
    data.insert("installationID".into(), format!("hndsr-e2e-{ns}"));
    let labels = serde_json::json!({ "app.kubernetes.io/part-of": "argocd" });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "argocd-cm", "namespace": ns, "labels": labels },
        "data": data,
    }))
    .expect("the argocd-cm literal is a valid ConfigMap");
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch("argocd-cm", &params, &Patch::Apply(&cm))
        .await
        .map_err(Error::kube(format!("writing {ns}/argocd-cm")))?;

    let key: [u8; 32] = rand::rng().random();
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "argocd-secret", "namespace": ns, "labels": labels },
        "stringData": { "server.secretkey": key },
    }))
    .expect("the argocd-secret literal is a valid Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch("argocd-secret", &params, &Patch::Apply(&secret))
        .await
        .map_err(Error::kube(format!("writing {ns}/argocd-secret")))?;

    // What argocd-server creates on its first start.
    let ar = app_project_resource();
    let project: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
        "metadata": { "name": "default", "namespace": ns },
        "spec": {
            "sourceRepos": ["*"],
            "destinations": [{ "server": "*", "namespace": "*" }],
            "clusterResourceWhitelist": [{ "group": "*", "kind": "*" }],
        },
    }))
    .expect("the AppProject literal is valid");
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar)
        .patch("default", &params, &Patch::Apply(&project))
        .await
        .map_err(Error::kube(format!("writing AppProject {ns}/default")))?;
    Ok(())
}

/// Applies Argo CD's CRDs (Application, AppProject, ApplicationSet).
async fn install_crds(client: &Client, dir: &Path) -> Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io("reading", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        apply_crd_file(client, &path, "reading an Argo CD CRD").await?;
    }
    Ok(())
}

/// A local git repository an Application reads through a `file://` URL (as
/// Argo CD's own end-to-end tests do), committed to by the test.
#[derive(Debug)]
pub struct GitRepo {
    dir: PathBuf,
}

impl GitRepo {
    /// `git init` in `dir` (created), on branch `main`.
    pub fn init(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        let repo = Self {
            dir: dir.to_owned(),
        };
        repo.git(&["init", "--quiet", "--initial-branch=main"])?;
        Ok(repo)
    }

    /// The URL an Application's `source.repoURL` takes.
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Writes `contents` to `path` (relative to the work tree).
    pub fn write(&self, path: &str, contents: &str) -> Result<()> {
        let file = self.dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("creating", parent))?;
        }
        std::fs::write(&file, contents).map_err(Error::io("writing", &file))
    }

    /// Removes `path` from the work tree.
    pub fn remove(&self, path: &str) -> Result<()> {
        self.git(&["rm", "--quiet", path]).map(drop)
    }

    /// Commits everything; returns the new commit's hash.
    pub fn commit(&self, message: &str) -> Result<String> {
        self.git(&["add", "--all"])?;
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message])?;
        Ok(self.git(&["rev-parse", "HEAD"])?.trim().to_owned())
    }

    fn git(&self, args: &[&str]) -> Result<String> {
        let stdout = run_output(
            Command::new("git")
                .arg("-C")
                .arg(&self.dir)
                .args([
                    "-c",
                    "user.name=hndsr e2e",
                    "-c",
                    "user.email=e2e@hndsr.invalid",
                    "-c",
                    "commit.gpgsign=false",
                ])
                .args(args),
            "git (install it with `make host-packages`)",
            &format!("git {} in {}", args.join(" "), self.dir.display()),
        )?;
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }
}

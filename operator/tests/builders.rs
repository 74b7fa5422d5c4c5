//! Golden tests of the pure builders.
//!
//! Each `tests/fixtures/<case>/input.yaml` is an `HndsrService`. A valid case
//! has one expected YAML per child (`deployment.yaml`, `service.yaml`,
//! `hpa.yaml`, `pdb.yaml`; a missing file means the child must be absent);
//! an invalid case has `error.txt` with the exact `InvalidSpec` message.
//!
//! Re-bless after an intended change: `BLESS=1 cargo test -p hndsr-operator --test builders`,
//! then review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use hndsr_crds::HndsrService;
use hndsr_operator::builders::{BuildConfig, Children, InvalidSpec, resolve_and_build};
use pretty_assertions::assert_eq;

/// The children of `svc`, resolved and built as a reconcile does.
fn desired(svc: &HndsrService, cfg: &BuildConfig) -> Result<Children, InvalidSpec> {
    resolve_and_build(svc, cfg).map(|(_, children)| children)
}

const CHILD_FILES: [&str; 8] = [
    "deployment.yaml",
    "service.yaml",
    "hpa.yaml",
    "pdb.yaml",
    "placeholder.yaml",
    "standby.yaml",
    "scaledobject.yaml",
    "zero-endpointslice.yaml",
];

/// The operator settings the goldens are built with: KEDA's Prometheus and
/// a zero responder configured (they only show in provider `keda` cases).
fn golden_config() -> BuildConfig {
    BuildConfig {
        keda_prometheus_url: Some("http://prometheus.monitoring.svc:9090".to_owned()),
        zero_responder: Some("10.244.0.5:8082".parse().unwrap()),
        ..BuildConfig::default()
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn bless() -> bool {
    std::env::var_os("BLESS").is_some_and(|v| v != "0")
}

fn to_yaml<T: serde::Serialize>(v: &T) -> String {
    serde_yaml::to_string(v).expect("serializable")
}

/// What a case produces: file name → contents.
fn outputs(svc: &HndsrService) -> Vec<(&'static str, String)> {
    match desired(svc, &golden_config()) {
        Err(e) => vec![("error.txt", format!("{e}\n"))],
        Ok(c) => {
            let mut out = vec![
                ("deployment.yaml", to_yaml(&c.deployment)),
                ("service.yaml", to_yaml(&c.service)),
            ];
            if let Some(h) = &c.hpa {
                out.push(("hpa.yaml", to_yaml(h)));
            }
            if let Some(p) = &c.pdb {
                out.push(("pdb.yaml", to_yaml(p)));
            }
            if let Some(p) = &c.placeholders {
                out.push(("placeholder.yaml", to_yaml(p)));
            }
            if let Some(s) = &c.standby {
                out.push(("standby.yaml", to_yaml(s)));
            }
            if let Some(s) = &c.scaled_object {
                out.push(("scaledobject.yaml", to_yaml(s)));
            }
            if let Some(s) = &c.zero_slice {
                out.push(("zero-endpointslice.yaml", to_yaml(s)));
            }
            out
        }
    }
}

fn check_case(dir: &Path) -> Vec<String> {
    let input = fs::read_to_string(dir.join("input.yaml")).expect("input.yaml");
    let svc: HndsrService = serde_yaml::from_str(&input).expect("input.yaml is an HndsrService");
    let produced = outputs(&svc);
    let mut failures = Vec::new();
    for file in CHILD_FILES.iter().copied().chain(["error.txt"]) {
        let path = dir.join(file);
        let want = fs::read_to_string(&path).ok();
        let got = produced
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, s)| s.clone());
        if bless() {
            match &got {
                Some(g) => fs::write(&path, g).expect("write golden"),
                None if want.is_some() => fs::remove_file(&path).expect("remove stale golden"),
                None => {}
            }
            continue;
        }
        if want != got {
            let case = dir.file_name().unwrap().to_string_lossy();
            eprintln!(
                "--- {case}/{file}: expected\n{}\n--- got\n{}",
                want.as_deref().unwrap_or("<absent>"),
                got.as_deref().unwrap_or("<absent>")
            );
            failures.push(format!("{case}/{file}"));
        }
    }
    failures
}

#[test]
fn golden_fixtures() {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures())
        .expect("fixtures dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "fixtures missing: {dirs:?}");
    let failures: Vec<String> = dirs.iter().flat_map(|d| check_case(d)).collect();
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "golden mismatch; BLESS=1 to update after review"
    );
}

fn load(case: &str) -> HndsrService {
    let s = fs::read_to_string(fixtures().join(case).join("input.yaml")).unwrap();
    serde_yaml::from_str(&s).unwrap()
}

#[test]
fn replicas_left_out_when_an_autoscaler_owns_them() {
    let c = desired(&load("gpu"), &BuildConfig::default()).unwrap();
    assert!(c.hpa.is_some());
    assert_eq!(c.deployment.spec.replicas, None);
    let off = desired(&load("autoscaling-off"), &BuildConfig::default()).unwrap();
    assert!(off.hpa.is_none());
    assert_eq!(off.deployment.spec.replicas, Some(2));
}

#[test]
fn keda_builds_no_hpa_and_leaves_replicas_to_it() {
    let c = desired(&load("keda"), &golden_config()).unwrap();
    assert!(c.hpa.is_none());
    assert_eq!(c.deployment.spec.replicas, None);
    let so = c.scaled_object.expect("a ScaledObject");
    assert_eq!(so.spec.min_replica_count, Some(0));
    assert!(
        so.spec.triggers.iter().any(|t| t.name == "wake"),
        "scale to zero needs the wake trigger"
    );
    assert!(c.zero_slice.is_some());
    // Without the operator's settings there is nothing to build.
    let bare = desired(&load("keda"), &BuildConfig::default()).unwrap();
    assert!(bare.scaled_object.is_none() && bare.zero_slice.is_none());
    // A floor of one pod never goes to zero: no wake trigger, no responder.
    let floor = desired(&load("keda-floor"), &golden_config()).unwrap();
    let so = floor.scaled_object.expect("a ScaledObject");
    assert!(so.spec.triggers.iter().all(|t| t.name != "wake"));
    assert!(floor.zero_slice.is_none());
}

#[test]
fn children_are_owned_by_the_service() {
    let svc = load("gpu");
    let c = desired(&svc, &BuildConfig::default()).unwrap();
    let metas = [
        &c.deployment.metadata,
        &c.service.metadata,
        &c.hpa.as_ref().unwrap().metadata,
        &c.pdb.as_ref().unwrap().metadata,
    ];
    for m in metas {
        let owners = m.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, svc.metadata.uid.clone().unwrap());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        assert_eq!(m.name, svc.metadata.name);
    }
}

#[test]
fn grace_period_covers_the_drain() {
    let svc = load("gpu");
    let c = desired(&svc, &BuildConfig::default()).unwrap();
    let pod = c.deployment.spec.template.spec.unwrap();
    let drain = svc.spec.serving.unwrap().drain_seconds.unwrap();
    assert!(pod.termination_grace_period_seconds.unwrap() > i64::from(drain));
}

/// `serving.inferenceNice` reaches the server as `HNDSR_INFERENCE_NICE`
/// when set; unset, the server's own default (0) holds.
#[test]
fn inference_nice_reaches_the_pods_only_when_set() {
    let nice = |case: &str| {
        let c = desired(&load(case), &BuildConfig::default()).unwrap();
        let pod = c.deployment.spec.template.spec.unwrap();
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == hndsr_contract::env::INFERENCE_NICE)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(nice("cpu").as_deref(), Some("5"));
    assert_eq!(nice("gpu"), None);
}

#[test]
fn service_selects_serving_pods_only() {
    let c = desired(&load("cpu"), &BuildConfig::default()).unwrap();
    let sel = c.service.spec.unwrap().selector.unwrap();
    assert_eq!(
        sel.get(hndsr_crds::labels::ROLE).map(String::as_str),
        Some(hndsr_crds::labels::ROLE_SERVING)
    );
}

#[test]
fn documented_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut n = 0;
    for entry in fs::read_dir(&dir).expect("docs/examples") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let mut svc: HndsrService = serde_yaml::from_str(&fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        svc.metadata.uid = Some("example".to_owned());
        desired(&svc, &BuildConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(w) = svc
            .spec
            .model
            .weights
            .as_ref()
            .filter(|w| w.bundled == Some(true))
        {
            assert_eq!(
                w.sha256,
                bundled_sha256(svc.spec.model.profile),
                "{}: bundled weights must pin the committed ones, or the server refuses them",
                path.display()
            );
        }
        n += 1;
    }
    assert!(n >= 5);
}

/// The sha256 of the committed weights the server image bundles for
/// `profile` (their manifest's).
fn bundled_sha256(profile: Option<hndsr_crds::ServingProfile>) -> String {
    let file = match profile {
        Some(hndsr_crds::ServingProfile::Realistic) => {
            hndsr_contract::bundled::REALISTIC_WEIGHTS_FILE
        }
        _ => hndsr_contract::bundled::WEIGHTS_FILE,
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../server/models")
        .join(file)
        .with_extension("json");
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&manifest).expect("committed manifest"))
            .expect("manifest JSON");
    manifest["sha256"].as_str().expect("sha256").to_owned()
}

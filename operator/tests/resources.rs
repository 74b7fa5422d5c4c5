//! The server container's requests and limits: defaults fill what the spec
//! leaves out without ever contradicting what it sets (the API server
//! refuses a pod whose request exceeds its limit), and a spec that
//! contradicts itself is refused with the field named.

use hndsr_crds::HndsrService;
use hndsr_operator::builders::{BuildConfig, Children, InvalidSpec, resolve_and_build};

/// The children of `svc`, resolved and built as a reconcile does.
fn desired(svc: &HndsrService, cfg: &BuildConfig) -> Result<Children, InvalidSpec> {
    resolve_and_build(svc, cfg).map(|(_, children)| children)
}

fn service(resources: &str) -> HndsrService {
    serde_yaml::from_str(&format!(
        "apiVersion: hndsr.io/v1alpha1
kind: HndsrService
metadata: {{name: sr, namespace: ml, uid: u-1, generation: 1}}
spec:
  model: {{image: img, backend: bicubic}}
  resources:
{resources}"
    ))
    .unwrap()
}

/// `(requests, limits)` of the server container as `resource=value` lists.
fn amounts(resources: &str) -> (Vec<String>, Vec<String>) {
    let c = desired(&service(resources), &BuildConfig::default()).expect("valid spec");
    let pod = c.deployment.spec.template.spec.unwrap();
    let r = pod.containers[0].resources.clone().unwrap();
    let list = |m: Option<std::collections::BTreeMap<String, _>>| {
        m.unwrap_or_default()
            .into_iter()
            .map(
                |(k, v): (
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                )| { format!("{k}={}", v.0) },
            )
            .collect::<Vec<_>>()
    };
    (list(r.requests), list(r.limits))
}

#[test]
fn defaults_fill_in_around_what_the_spec_sets() {
    // GPU pod, memory request above the default 16Gi limit, CPU limit below
    // the default request of 2.
    let (requests, limits) =
        amounts("    gpu: 1\n    memory: {request: 32Gi}\n    cpu: {limit: 1500m}\n");
    assert_eq!(requests, ["cpu=1500m", "memory=32Gi", "nvidia.com/gpu=1"]);
    assert_eq!(limits, ["cpu=1500m", "memory=32Gi", "nvidia.com/gpu=1"]);

    // Memory limit below the default request (8Gi on a GPU pod).
    let (requests, limits) = amounts("    gpu: 1\n    memory: {limit: 6Gi}\n");
    assert_eq!(requests, ["cpu=2", "memory=6Gi", "nvidia.com/gpu=1"]);
    assert_eq!(limits, ["memory=6Gi", "nvidia.com/gpu=1"]);

    // Nothing in the way: the defaults as documented.
    let (requests, limits) = amounts("    gpu: 0\n    cpu: {limit: \"4\"}\n");
    assert_eq!(requests, ["cpu=1", "memory=2Gi"]);
    assert_eq!(limits, ["cpu=4", "memory=4Gi"]);
}

#[test]
fn a_request_above_its_limit_or_a_bad_quantity_is_refused() {
    let err = desired(
        &service(
            "    gpu: 0\n    cpu: {request: \"4\", limit: \"2\"}\n    memory: {limit: lots}\n",
        ),
        &BuildConfig::default(),
    )
    .expect_err("invalid resources")
    .to_string();
    assert!(
        err.contains("spec.resources.cpu.request: 4 must not exceed the limit (2)"),
        "{err}"
    );
    assert!(
        err.contains(
            "spec.resources.memory.limit: \"lots\" is not a non-negative Kubernetes quantity"
        ),
        "{err}"
    );
}

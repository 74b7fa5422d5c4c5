//! The generated CRD: CEL rules present, no schema defaults, every field
//! documented, committed YAML up to date; serde round trips of the types.

use hndsr_crds::{HndsrService, HndsrServiceSpec};
use kube::CustomResourceExt as _;
use pretty_assertions::assert_eq;
use serde_json::Value;

fn schema() -> Value {
    let crd = serde_json::to_value(HndsrService::crd()).unwrap();
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
        .unwrap()
        .clone()
}

fn rules(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(rs)) = m.get("x-kubernetes-validations") {
                for r in rs {
                    out.push(r["rule"].as_str().unwrap().to_owned());
                }
            }
            m.values().for_each(|v| rules(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn crd_names_and_subresources() {
    let crd = HndsrService::crd();
    assert_eq!(crd.spec.group, hndsr_crds::GROUP);
    assert_eq!(crd.spec.names.kind, hndsr_crds::KIND);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["hsvc".to_owned()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, hndsr_crds::VERSION);
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    assert_eq!(
        sub.scale.as_ref().unwrap().label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["Ready", "Replicas", "Standby", "Model", "Age"]);
}

#[test]
fn schema_has_the_cel_rules() {
    let mut all = Vec::new();
    rules(&schema(), &mut all);
    let expect = [
        "self.minReplicas <= self.maxReplicas",
        "self.provider == 'keda'",
        "!has(self.keda) || (has(self.provider) && self.provider == 'keda')",
        "self.prewarm.standbyReplicas == 0",
        "(has(self.maxQueueDepth) ? self.maxQueueDepth : 20) >= (has(self.maxConcurrent) ? self.maxConcurrent : 4)",
        "[has(self.pvc), has(self.image), has(self.uri), has(self.bundled) && self.bundled].exists_one(x, x)",
        "!has(self.file) || !has(self.bundled) || !self.bundled",
        "self.backend != 'hndsr' || has(self.weights)",
        "!has(self.profile) || self.profile != 'realistic' || !has(self.projectionSteps) || self.projectionSteps == 0",
        "!(has(self.maxUnavailable) && has(self.minAvailable))",
        "!(has(self.standbyReplicas) && has(self.standbyPercent))",
    ];
    for e in expect {
        assert!(
            all.iter().any(|r| r.contains(e)),
            "missing rule {e:?} in {all:#?}"
        );
    }
    // The rules sit where they belong.
    let s = schema();
    assert!(
        s.pointer("/properties/spec/properties/autoscaling/x-kubernetes-validations")
            .is_some()
    );
    assert!(
        s.pointer("/properties/spec/properties/serving/x-kubernetes-validations")
            .is_some()
    );
    assert!(
        s.pointer("/properties/spec/x-kubernetes-validations")
            .is_some()
    );
}

fn find_key(v: &Value, key: &str, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == key {
                    out.push(path.to_owned());
                }
                find_key(v, key, &format!("{path}/{k}"), out);
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| find_key(v, key, &format!("{path}/{i}"), out)),
        _ => {}
    }
}

#[test]
fn schema_has_no_defaults() {
    let mut found = Vec::new();
    find_key(&schema(), "default", "", &mut found);
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn schema_is_structural() {
    // No unions left for the API server to reject.
    for key in ["anyOf", "oneOf", "$ref"] {
        let mut found = Vec::new();
        find_key(&schema(), key, "", &mut found);
        // int-or-string quantities are allowed their anyOf of integer/string
        found.retain(|p| !p.is_empty());
        let mut bad = Vec::new();
        for p in &found {
            let parent = schema().pointer(p).cloned().unwrap_or_default();
            if parent.get("x-kubernetes-int-or-string") != Some(&Value::Bool(true)) {
                bad.push(p.clone());
            }
        }
        assert_eq!(bad, Vec::<String>::new(), "{key} in the schema");
    }
}

fn undocumented(v: &Value, path: &str, out: &mut Vec<String>) {
    let Some(props) = v.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, p) in props {
        let here = format!("{path}.{k}");
        if p.get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            out.push(here.clone());
        }
        undocumented(p, &here, out);
        if let Some(items) = p.get("items") {
            undocumented(items, &here, out);
        }
    }
}

#[test]
fn every_field_is_documented() {
    let s = schema();
    let mut missing = Vec::new();
    for top in ["spec", "status"] {
        undocumented(&s["properties"][top], top, &mut missing);
    }
    assert_eq!(missing, Vec::<String>::new());
}

#[test]
fn committed_yaml_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/hndsrservice.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == hndsr_crds::crd_yaml().unwrap(),
        "crds/hndsrservice.yaml is stale; run `make generate`"
    );
}

const FULL: &str = r#"
apiVersion: hndsr.io/v1alpha1
kind: HndsrService
metadata:
  name: sr
  namespace: ml
spec:
  model:
    image: example/hndsr-server:0.1.0
    imagePullPolicy: IfNotPresent
    backend: hndsr
    weights:
      pvc:
        claimName: hndsr-weights
      file: v1/model.safetensors
      sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    scale: 4
    profile: quality
    samplingSteps: 20
    tile: 24
    projectionSteps: 20
    precision: bf16
  serving:
    maxConcurrent: 4
    maxQueueDepth: 20
    requestTimeoutSeconds: 30
    rateLimitPerHour: 100
    maxImagePixels: 16000000
    maxPayloadMB: 20
    drainSeconds: 30
  resources:
    gpu: 1
    gpuResourceName: nvidia.com/gpu
    cpu:
      request: "4"
    memory:
      request: 16Gi
      limit: 16Gi
    nodeSelector:
      gpu: h100
    tolerations:
      - key: nvidia.com/gpu
        operator: Exists
        effect: NoSchedule
    priorityClassName: hndsr-serving
  autoscaling:
    enabled: true
    minReplicas: 1
    maxReplicas: 8
    metric: both
    targetPerPod:
      activeRequests: "3"
      queueDepth: 2500m
    behavior:
      scaleDown:
        stabilizationWindowSeconds: 600
    provider: hpa
  prewarm:
    standbyReplicas: 1
  disruption:
    maxUnavailable: 1
"#;

/// The schema's `(minimum, maximum)` of `spec.<section>.<field>`.
fn bounds(section: &str, field: &str) -> (Option<f64>, Option<f64>) {
    let f = &schema()["properties"]["spec"]["properties"][section]["properties"][field];
    (f["minimum"].as_f64(), f["maximum"].as_f64())
}

#[test]
fn max_payload_is_bounded_by_what_the_server_accepts() {
    assert_eq!(
        bounds("serving", "maxPayloadMB").1,
        Some(f64::from(hndsr_contract::limits::MAX_PAYLOAD_MB))
    );
}

#[test]
fn inference_nice_is_a_nice_value() {
    assert_eq!(
        bounds("serving", "inferenceNice"),
        (
            Some(0.0),
            Some(f64::from(hndsr_contract::limits::MAX_INFERENCE_NICE))
        )
    );
}

#[test]
fn tile_is_bounded_by_the_contract() {
    assert_eq!(
        bounds("model", "tile"),
        (
            Some(f64::from(hndsr_contract::tile::MIN)),
            Some(f64::from(hndsr_contract::tile::MAX))
        )
    );
}

#[test]
fn projection_steps_are_bounded_by_the_contract() {
    assert_eq!(
        bounds("model", "projectionSteps"),
        (
            Some(0.0),
            Some(f64::from(hndsr_contract::projection::MAX_STEPS))
        )
    );
}

#[test]
fn profiles_are_the_contracts() {
    let profile = &schema()["properties"]["spec"]["properties"]["model"]["properties"]["profile"];
    let names: Vec<&str> = profile["enum"]
        .as_array()
        .expect("an enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(names, hndsr_contract::profile::ALL);
}

#[test]
fn serde_round_trip() {
    let svc: HndsrService = serde_yaml::from_str(FULL).unwrap();
    assert_eq!(svc.spec.serving.as_ref().unwrap().max_payload_mb, Some(20));
    let json = serde_json::to_value(&svc).unwrap();
    assert_eq!(json["spec"]["serving"]["maxPayloadMB"], 20);
    let back: HndsrService = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, svc);
    let original: Value = serde_yaml::from_str(FULL).unwrap();
    assert_eq!(json, original, "no field lost or added");
}

#[test]
fn minimal_spec_round_trips_without_defaults() {
    let spec: HndsrServiceSpec =
        serde_json::from_str(r#"{"model":{"image":"x","backend":"bicubic"}}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&spec).unwrap(),
        r#"{"model":{"image":"x","backend":"bicubic"}}"#
    );
}

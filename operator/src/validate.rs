//! Pure checks of an `HndsrService` beyond what the schema can say.
//!
//! The CEL rules in the CRD reject most invalid specs at admission; this
//! module re-checks those invariants (objects can predate a rule, or come
//! from an API server without CEL) and adds the ones CEL cannot express
//! well: name lengths, quantity parsing, targets that could never trigger a
//! scale-up, precision on CPU. It never touches the network.

use std::fmt;

use hndsr_crds::{
    AutoscalingProvider, AutoscalingSpec, EffectiveServing, HndsrService, HndsrServiceSpec,
    KedaSpec, Precision, TargetPerPod, WeightsSpec,
};
use k8s_openapi::api::autoscaling::v2::HPAScalingRules;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::{defaults, effective::EffectiveSpec, quantity};

/// One problem with a spec: the field and what is wrong, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the offending field, e.g. `spec.autoscaling.minReplicas`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The spec cannot be reconciled; every problem found, in a stable order.
///
/// The controller reports it as `Ready=False, reason InvalidSpec` with
/// [`InvalidSpec::to_string`] as the message, and waits for a spec change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    /// The problems, at least one.
    pub problems: Vec<Problem>,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.problems.iter().map(Problem::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl InvalidSpec {
    /// A single-problem error.
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                field: field.into(),
                message: message.into(),
            }],
        }
    }
}

/// Longest name: the Service (a DNS-1035 label) and label values share it.
const MAX_NAME_LEN: usize = 63;

/// Parses a plain decimal quantity (`3`, `0.5`, `2500m`) into milli-units.
/// Binary/decimal suffixes other than `m` are not accepted for per-pod targets.
pub fn parse_milli(q: &Quantity) -> Option<i64> {
    let s = q.0.trim();
    let (num, scale) = match s.strip_suffix('m') {
        Some(n) => (n, 1),
        None => (s, 1000),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut milli = int.checked_mul(scale)?;
    if !frac.is_empty() {
        if scale == 1 {
            return None;
        }
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        if frac.len() > 3 && frac[3..].chars().any(|c| c != '0') {
            return None;
        }
        milli = milli.checked_add(digits.parse::<i64>().ok()?)?;
    }
    Some(milli)
}

/// `10.0.0.0/8`, `fd00::/8`, `192.168.1.7`: an address, with an optional
/// prefix no longer than the address.
fn is_address_or_cidr(s: &str) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|n| n <= bits))
}

/// Problems found so far, in the order the checks run.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// Checks `svc`; `Ok(())` or every problem found.
pub fn validate(svc: &HndsrService, eff: &EffectiveSpec) -> Result<(), InvalidSpec> {
    let spec = &svc.spec;
    let mut p = Problems::default();
    check_name(svc.metadata.name.as_deref().unwrap_or(""), &mut p);
    check_image(spec, &mut p);
    if let Some(w) = &spec.model.weights {
        check_weights(w, &mut p);
    } else if spec.model.backend == hndsr_crds::Backend::Hndsr {
        p.add(
            "spec.model.weights",
            "backend hndsr needs weights (pvc, image, uri or bundled)",
        );
    }
    if spec.model.profile == Some(hndsr_crds::ServingProfile::Realistic)
        && spec.model.projection_steps.is_some_and(|n| n > 0)
    {
        p.add(
            "spec.model.projectionSteps",
            "must be 0 with profile realistic: the projection inverts the matched degradation only",
        );
    }
    check_gpu(eff, &mut p);
    check_cpu_and_memory(spec, &mut p);
    check_trusted_proxies(spec, &mut p);
    check_inference_nice(spec, &mut p);
    check_serving(&eff.serving, &mut p);
    if spec.replicas.is_some_and(|r| r < 0) {
        p.add("spec.replicas", "must not be negative");
    }
    if let Some(a) = &spec.autoscaling {
        check_autoscaling(a, &eff.serving, &mut p);
    }
    check_prewarm(spec, &mut p);
    if let Some(d) = &spec.disruption
        && d.max_unavailable.is_some()
        && d.min_available.is_some()
    {
        p.add(
            "spec.disruption",
            "set maxUnavailable or minAvailable, not both",
        );
    }
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec { problems: p.0 })
    }
}

/// The name becomes the Service's: a DNS-1035 label.
fn check_name(name: &str, p: &mut Problems) {
    if name.len() > MAX_NAME_LEN {
        p.add(
            "metadata.name",
            format!("must be at most {MAX_NAME_LEN} characters (it names the Service)"),
        );
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
        p.add(
            "metadata.name",
            "must start with a lowercase letter (it names the Service)",
        );
    }
    // The rest of a DNS-1035 label: a resource name may hold dots, a
    // Service name may not.
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || name.ends_with('-')
    {
        p.add(
            "metadata.name",
            "must be lowercase letters, digits and '-', ending in a letter or digit (it names the Service)",
        );
    }
}

fn check_image(spec: &HndsrServiceSpec, p: &mut Problems) {
    if spec.model.image.trim().is_empty() {
        p.add("spec.model.image", "must name the server image");
    }
}

/// Exactly one source, a pinned digest, URLs the init container can fetch.
fn check_weights(w: &WeightsSpec, p: &mut Problems) {
    let sources = usize::from(w.pvc.is_some())
        + usize::from(w.image.is_some())
        + usize::from(w.uri.is_some())
        + usize::from(w.bundled == Some(true));
    if sources != 1 {
        p.add(
            "spec.model.weights",
            "set exactly one of pvc, image, uri or bundled",
        );
    }
    if w.bundled == Some(true) && w.file.is_some() {
        p.add(
            "spec.model.weights.file",
            "does not apply to bundled weights",
        );
    }
    if w.sha256.len() != 64
        || !w
            .sha256
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        p.add(
            "spec.model.weights.sha256",
            "must be 64 lowercase hex characters",
        );
    }
    if let Some(uri) = &w.uri
        && !(uri.starts_with("https://") || uri.starts_with("http://"))
    {
        p.add("spec.model.weights.uri", "must be an http(s) URL");
    }
    if let Some(m) = &w.manifest_uri {
        if w.uri.is_none() {
            p.add("spec.model.weights.manifestUri", "goes with weights.uri");
        }
        if !(m.starts_with("https://") || m.starts_with("http://")) {
            p.add("spec.model.weights.manifestUri", "must be an http(s) URL");
        }
    } else if w.uri.is_some() && defaults::manifest_uri(w).is_none() {
        p.add(
            "spec.model.weights.uri",
            "does not end in .safetensors, or has a query (a signed URL): set weights.manifestUri to its JSON manifest",
        );
    }
    if let Some(file) = &w.file
        && (file.starts_with('/') || file.contains("..") || file.is_empty())
    {
        p.add(
            "spec.model.weights.file",
            "must be a relative path without '..'",
        );
    }
}

fn check_gpu(eff: &EffectiveSpec, p: &mut Problems) {
    if eff.gpu < 0 {
        p.add("spec.resources.gpu", "must not be negative");
    }
    if eff.gpu == 0 && eff.precision != Precision::Fp32 {
        p.add(
            "spec.model.precision",
            format!(
                "{} needs a GPU; use fp32 with resources.gpu 0",
                eff.precision.as_str()
            ),
        );
    }
    if eff.gpu > 0 && !eff.gpu_resource_name.contains('/') {
        p.add(
            "spec.resources.gpuResourceName",
            "must be a domain-qualified extended resource, e.g. nvidia.com/gpu",
        );
    }
}

/// Quantities the API server accepts, requests within limits.
fn check_cpu_and_memory(spec: &HndsrServiceSpec, p: &mut Problems) {
    let resources = spec.resources.as_ref();
    for (field, amount) in [
        ("spec.resources.cpu", resources.and_then(|r| r.cpu.as_ref())),
        (
            "spec.resources.memory",
            resources.and_then(|r| r.memory.as_ref()),
        ),
    ] {
        let Some(amount) = amount else { continue };
        for (part, q) in [("request", &amount.request), ("limit", &amount.limit)] {
            if let Some(q) = q
                && quantity::value(q).is_none_or(|v| v < 0.0)
            {
                p.add(
                    &format!("{field}.{part}"),
                    format!(
                        "{:?} is not a non-negative Kubernetes quantity such as 2, 500m or 8Gi",
                        q.0
                    ),
                );
            }
        }
        if let (Some(request), Some(limit)) = (&amount.request, &amount.limit)
            && quantity::exceeds(request, limit)
        {
            p.add(
                &format!("{field}.request"),
                format!("{} must not exceed the limit ({})", request.0, limit.0),
            );
        }
    }
}

/// The server refuses to start outside 0–19 (the schema's bounds; checked
/// again here so a spec that got past them is refused, not crash-looped).
fn check_inference_nice(spec: &HndsrServiceSpec, p: &mut Problems) {
    let max = i32::from(hndsr_contract::limits::MAX_INFERENCE_NICE);
    if let Some(nice) = spec.serving.as_ref().and_then(|s| s.inference_nice)
        && !(0..=max).contains(&nice)
    {
        p.add(
            "spec.serving.inferenceNice",
            format!("{nice} is not a nice value between 0 and {max}"),
        );
    }
}

/// What the server parses at start-up (the schema's pattern only keeps out
/// what is plainly not an address): a bad entry would crash-loop it.
fn check_trusted_proxies(spec: &HndsrServiceSpec, p: &mut Problems) {
    for proxy in spec
        .serving
        .as_ref()
        .and_then(|s| s.trusted_proxies.as_deref())
        .unwrap_or_default()
    {
        if !is_address_or_cidr(proxy) {
            p.add(
                "spec.serving.trustedProxies",
                format!("{proxy:?} is not an IP address or CIDR such as 10.0.0.0/8"),
            );
        }
    }
}

fn check_serving(serving: &EffectiveServing, p: &mut Problems) {
    if serving.max_concurrent < 1 {
        p.add("spec.serving.maxConcurrent", "must be at least 1");
    }
    if serving.max_queue_depth < serving.max_concurrent {
        p.add(
            "spec.serving.maxQueueDepth",
            format!(
                "must be at least maxConcurrent ({}); it counts running plus waiting requests",
                serving.max_concurrent
            ),
        );
    }
    for (field, v) in [
        (
            "spec.serving.requestTimeoutSeconds",
            i64::from(serving.request_timeout_seconds),
        ),
        ("spec.serving.maxImagePixels", serving.max_image_pixels),
        (
            "spec.serving.maxPayloadMB",
            i64::from(serving.max_payload_mb),
        ),
    ] {
        if v < 1 {
            p.add(field, "must be at least 1");
        }
    }
    if serving.rate_limit_per_hour < 0 {
        p.add(
            "spec.serving.rateLimitPerHour",
            "must not be negative (0 disables)",
        );
    }
    if serving.drain_seconds < 0 {
        p.add("spec.serving.drainSeconds", "must not be negative");
    }
}

/// Bounds, scale to zero only with KEDA, targets and behaviour.
fn check_autoscaling(a: &AutoscalingSpec, serving: &EffectiveServing, p: &mut Problems) {
    let min = a.min_replicas.unwrap_or(defaults::MIN_REPLICAS);
    if a.max_replicas < 1 {
        p.add("spec.autoscaling.maxReplicas", "must be at least 1");
    }
    if min < 0 {
        p.add("spec.autoscaling.minReplicas", "must not be negative");
    }
    if min > a.max_replicas {
        p.add(
            "spec.autoscaling.minReplicas",
            format!("must not exceed maxReplicas ({})", a.max_replicas),
        );
    }
    if min == 0 && a.provider != Some(AutoscalingProvider::Keda) {
        p.add(
            "spec.autoscaling.minReplicas",
            "0 (scale to zero) needs provider keda; a HorizontalPodAutoscaler cannot scale to zero",
        );
    }
    if let Some(t) = &a.target_per_pod {
        check_targets(t, serving, p);
    }
    if let Some(k) = &a.keda {
        check_keda(a, k, p);
    }
    if let Some(b) = &a.behavior {
        for (field, rules) in [
            ("spec.autoscaling.behavior.scaleUp", &b.scale_up),
            ("spec.autoscaling.behavior.scaleDown", &b.scale_down),
        ] {
            if let Some(rules) = rules {
                check_scaling_rules(field, rules, p);
            }
        }
    }
}

/// KEDA settings: only with provider keda; schedules KEDA's cron scaler
/// can read, with floors inside the bounds.
fn check_keda(a: &AutoscalingSpec, k: &KedaSpec, p: &mut Problems) {
    if a.provider != Some(AutoscalingProvider::Keda) {
        p.add("spec.autoscaling.keda", "needs provider keda");
    }
    if k.polling_interval_seconds.is_some_and(|s| s < 1) {
        p.add(
            "spec.autoscaling.keda.pollingIntervalSeconds",
            "must be at least 1",
        );
    }
    if k.idle_seconds_before_zero.is_some_and(|s| s < 0) {
        p.add(
            "spec.autoscaling.keda.idleSecondsBeforeZero",
            "must not be negative",
        );
    }
    for (i, s) in k.schedules.iter().enumerate() {
        let field = format!("spec.autoscaling.keda.schedules[{i}]");
        if s.timezone.trim().is_empty() {
            p.add(
                &format!("{field}.timezone"),
                "must name an IANA time zone, e.g. Europe/Berlin",
            );
        }
        for (name, expr) in [("start", &s.start), ("end", &s.end)] {
            let fields = expr.split_whitespace().count();
            if fields != 5 {
                p.add(
                    &format!("{field}.{name}"),
                    format!(
                        "{expr:?} is not a 5-field cron expression (minute hour day month weekday)"
                    ),
                );
            }
        }
        if s.start.split_whitespace().eq(s.end.split_whitespace()) {
            p.add(
                &format!("{field}.end"),
                "must differ from start (the window would be empty)",
            );
        }
        if s.replicas < 1 || s.replicas > a.max_replicas {
            p.add(
                &format!("{field}.replicas"),
                format!("must be between 1 and maxReplicas ({})", a.max_replicas),
            );
        }
    }
}

/// Per-pod targets: plain positive numbers, an active-request target a pod
/// can exceed.
fn check_targets(t: &TargetPerPod, serving: &EffectiveServing, p: &mut Problems) {
    if let Some(q) = &t.active_requests {
        match parse_milli(q) {
            None => p.add(
                "spec.autoscaling.targetPerPod.activeRequests",
                format!("{:?} is not a plain number such as 3, 0.5 or 2500m", q.0),
            ),
            Some(m) if m <= 0 => p.add(
                "spec.autoscaling.targetPerPod.activeRequests",
                "must be greater than 0",
            ),
            Some(m) if m >= i64::from(serving.max_concurrent) * 1000 => p.add(
                "spec.autoscaling.targetPerPod.activeRequests",
                format!(
                    "must be below serving.maxConcurrent ({}): a pod never runs more, so the target would never be exceeded",
                    serving.max_concurrent
                ),
            ),
            Some(_) => {}
        }
    }
    if let Some(q) = &t.queue_depth {
        match parse_milli(q) {
            None => p.add(
                "spec.autoscaling.targetPerPod.queueDepth",
                format!("{:?} is not a plain number such as 2, 0.5 or 500m", q.0),
            ),
            Some(m) if m <= 0 => p.add(
                "spec.autoscaling.targetPerPod.queueDepth",
                "must be greater than 0",
            ),
            Some(_) => {}
        }
    }
}

/// What the HPA controller accepts in `behavior.scaleUp` / `scaleDown`.
fn check_scaling_rules(field: &str, rules: &HPAScalingRules, p: &mut Problems) {
    if let Some(sp) = &rules.select_policy
        && !matches!(sp.as_str(), "Max" | "Min" | "Disabled")
    {
        p.add(
            field,
            format!("selectPolicy {sp:?} is not one of Max, Min, Disabled"),
        );
    }
    for pol in rules.policies.iter().flatten() {
        if !matches!(pol.type_.as_str(), "Pods" | "Percent") {
            p.add(
                field,
                format!("policy type {:?} is not Pods or Percent", pol.type_),
            );
        }
        if pol.value < 1 || !(1..=1800).contains(&pol.period_seconds) {
            p.add(
                field,
                "policy value must be positive and periodSeconds within 1..=1800",
            );
        }
    }
    if rules
        .stabilization_window_seconds
        .is_some_and(|w| !(0..=3600).contains(&w))
    {
        p.add(field, "stabilizationWindowSeconds must be within 0..=3600");
    }
}

/// One way to size the pool; standby pods and scale to zero exclude each
/// other.
fn check_prewarm(spec: &HndsrServiceSpec, p: &mut Problems) {
    let Some(pw) = &spec.prewarm else { return };
    if let Some(class) = pw
        .placeholders
        .as_ref()
        .and_then(|ph| ph.priority_class_name.as_deref())
        && class.trim().is_empty()
    {
        p.add(
            "spec.prewarm.placeholders.priorityClassName",
            "must name a PriorityClass with a negative value (or be left out for the operator's default)",
        );
    }
    if pw.standby_replicas.is_some() && pw.standby_percent.is_some() {
        p.add(
            "spec.prewarm",
            "set standbyReplicas or standbyPercent, not both",
        );
    }
    let scale_to_zero = spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.enabled.unwrap_or(true) && a.min_replicas == Some(0));
    let standby = pw.standby_replicas.unwrap_or(0) > 0 || pw.standby_percent.unwrap_or(0) > 0;
    if standby && scale_to_zero {
        p.add(
            "spec.prewarm",
            "standby prewarm and scale to zero (autoscaling.minReplicas 0) are exclusive",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_cidrs_are_what_the_server_accepts() {
        for good in [
            "10.0.0.0/8",
            "192.168.1.7",
            "fd00::1",
            "fd00::/8",
            "0.0.0.0/0",
        ] {
            assert!(is_address_or_cidr(good), "{good}");
        }
        for bad in [
            "10.0.0.0/99",
            "300.1.1.1",
            "1.2.3",
            "fd00::/129",
            "10.0.0.0/",
            "x",
        ] {
            assert!(!is_address_or_cidr(bad), "{bad}");
        }
    }

    #[test]
    fn parses_plain_quantities() {
        let q = |s: &str| parse_milli(&Quantity(s.to_owned()));
        assert_eq!(q("3"), Some(3000));
        assert_eq!(q("0.5"), Some(500));
        assert_eq!(q("2500m"), Some(2500));
        assert_eq!(q("1.25"), Some(1250));
        assert_eq!(q("1Gi"), None);
        assert_eq!(q("-1"), None);
        assert_eq!(q("1.5m"), None);
        assert_eq!(q(""), None);
    }
}

//! The chart's PromQL names only metrics that exist.
//!
//! Every `hndsr_*` metric in the Grafana dashboard's queries, the alerting
//! rules' `expr`s and the prometheus-adapter rules' queries must be a series
//! a running server exposes on `/metrics` (so histograms are named with
//! their `_bucket` / `_sum` / `_count` suffix, as PromQL names them). The
//! dashboard's `hndsr_operator_*` panels are checked against the operator's
//! metric names instead, read from its source: the operator (kube,
//! k8s-openapi) is no dependency of this crate. `kube_*` series come from
//! kube-state-metrics and are not checked here.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{png, start};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the server crate sits in the workspace")
        .to_path_buf()
}

fn chart_file(name: &str) -> (String, String) {
    let path = repo().join("charts/hndsr-operator/files").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (format!("charts/hndsr-operator/files/{name}"), text)
}

/// The `hndsr_*` metric names of a PromQL expression: identifiers outside
/// label matchers (`{...}`, which also skips Helm's `{{ ... }}` and the
/// adapter's `<<.LabelMatchers>>`), string literals and the label lists of
/// `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Index just past the bracket that closes the one at `open`.
    let skip_balanced = |open: usize, (l, r): (char, char)| {
        let mut depth = 0_usize;
        let mut j = open;
        while j < chars.len() {
            if chars[j] == l {
                depth += 1;
            } else if chars[j] == r {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_balanced(i, ('{', '}'));
        } else if matches!(c, '"' | '\'' | '`') {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if LABEL_LISTS.contains(&word.as_str()) {
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if chars.get(j) == Some(&'(') {
                    i = skip_balanced(j, ('(', ')'));
                }
            } else if word.starts_with("hndsr_") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The queries of a Grafana dashboard: every `expr` and templating `query`.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(q)) => out.push(q.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The values of `keys` in a YAML file: plain or quoted scalars on the key's
/// line, or the more indented lines of a block scalar (`|`, `>`). Enough for
/// the chart's rule files; no YAML parser is a dependency of this crate.
fn yaml_values(text: &str, keys: &[&str]) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let body = line.trim_start().trim_start_matches("- ");
        let Some((key, rest)) = body.split_once(':') else {
            continue;
        };
        if !keys.contains(&key.trim()) {
            continue;
        }
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            // Where the key starts (after a list item's `- `): the block's
            // lines are indented further.
            let indent = line.len() - body.len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else if let Some(q) = rest.strip_prefix('\'') {
            out.push(q.trim_end_matches('\'').replace("''", "'"));
        } else if let Some(q) = rest.strip_prefix('"') {
            out.push(q.trim_end_matches('"').to_owned());
        } else {
            out.push(rest.to_owned());
        }
    }
    out
}

/// The sample names a Prometheus text exposition carries.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("a sample line starts with its name")
                .to_owned()
        })
        .collect()
}

/// The operator's sample names: each metric is a `"hndsr_operator_..."`
/// literal in its metrics module; one given to `HistogramOpts::new` is a
/// histogram, exposed as `_bucket`, `_sum` and `_count`.
fn operator_exposed() -> BTreeSet<String> {
    let path = repo().join("operator/src/metrics.rs");
    let src = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = BTreeSet::new();
    for (at, _) in src.match_indices("\"hndsr_operator_") {
        let name: String = src[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if src[..at].trim_end().ends_with("HistogramOpts::new(") {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        } else {
            out.insert(name);
        }
    }
    assert!(
        out.len() >= 5,
        "found only {out:?} in {}: did the operator's metrics move?",
        path.display()
    );
    out
}

/// Every query of the chart, by file.
fn chart_queries() -> Vec<(String, Vec<String>)> {
    let (dashboard, json) = chart_file("grafana-dashboard.json");
    let mut queries = Vec::new();
    dashboard_queries(
        &serde_json::from_str(&json).expect("the dashboard is JSON"),
        &mut queries,
    );
    let (rules, rules_text) = chart_file("prometheus-rules.yaml");
    let (adapter, adapter_text) = chart_file("prometheus-adapter-rules.yaml");
    vec![
        (dashboard, queries),
        (rules, yaml_values(&rules_text, &["expr"])),
        (
            adapter,
            yaml_values(&adapter_text, &["seriesQuery", "metricsQuery"]),
        ),
    ]
}

#[tokio::test]
async fn the_charts_queries_name_only_metrics_that_exist() {
    let s = start(&["--max-queue-depth", "12"], Duration::ZERO).await;
    assert_eq!(s.upscale(png(4, 4, 1), "").await.status(), 200);
    let text = s.metrics().await;
    s.stop().await;
    let server = exposed(&text);
    assert!(
        text.contains("\nhndsr_max_queue_depth 12\n"),
        "the admission cap is exported:\n{text}"
    );
    let operator = operator_exposed();

    let mut missing = Vec::new();
    for (file, queries) in chart_queries() {
        let names: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
        assert!(
            names.iter().any(|n| !n.starts_with("hndsr_operator_")),
            "no server metric found in the queries of {file}: {queries:#?}"
        );
        for name in names {
            let known = if name.starts_with("hndsr_operator_") {
                &operator
            } else {
                &server
            };
            if !known.contains(&name) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queries name metrics nobody exports:\n  {}\nthe server exposes: {server:?}\nthe operator: {operator:?}",
        missing.join("\n  ")
    );
}

#[test]
fn metric_names_skip_labels_strings_and_templates() {
    let expr = r#"histogram_quantile(0.95, sum by (namespace, hndsr_io_service, le)
        (rate(hndsr_request_duration_seconds_bucket{hndsr_x="y"}[{{ .Values.w }}])))
        > 2 * on (hndsr_pod) group_left (hndsr_label) hndsr_queue_depth
        and label_replace(hndsr_active_requests, "hndsr_dst", "$1", "pod", "(.*)")
        unless kube_pod_labels{label_hndsr_io_service="a"} or hndsr_operator_leader"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(
            [
                "hndsr_active_requests",
                "hndsr_operator_leader",
                "hndsr_queue_depth",
                "hndsr_request_duration_seconds_bucket",
            ]
            .map(str::to_owned)
        )
    );
}

#[test]
fn yaml_values_read_plain_quoted_and_block_scalars() {
    let yaml = "rules:\n  - seriesQuery: 'a{x!=\"\"}'\n    metricsQuery: \"b\"\n  - expr: |\n      c\n        > d\n\n    for: 5m\n  - expr: e\n";
    assert_eq!(
        yaml_values(yaml, &["seriesQuery", "metricsQuery", "expr"]),
        ["a{x!=\"\"}", "b", "      c\n        > d\n", "e"]
    );
}

#[test]
fn exposed_names_are_sample_names() {
    let text = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\ng 3\n";
    assert_eq!(
        exposed(text),
        BTreeSet::from(["g", "h_bucket", "h_count", "h_sum"].map(str::to_owned))
    );
}

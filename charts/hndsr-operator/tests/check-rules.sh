#!/usr/bin/env bash
# Checks the chart's alerting rules as the chart renders them (`make rules`):
#
#   1. `helm template --set prometheusRules.enabled=true` renders the
#      PrometheusRule; its `spec` is the rule file Prometheus would load;
#   2. `promtool check rules` on that file (syntax, PromQL, templates);
#   3. `promtool test rules` with tests/rules-test.yaml (fixture series,
#      every alert firing and not firing) against that file;
#   4. the chart lints with the rules on, and renders no PrometheusRule
#      with the default values.
#
# helm and promtool come from the e2e binary cache (common.sh).
set -euo pipefail

script=check-rules
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

helm="$(pinned_binary HELM_VERSION helm helm)"
promtool="$(pinned_binary PROMETHEUS_VERSION prometheus promtool)"

# The PrometheusRule's `spec` (the template's last key, indented by two)
# is the rule file: take what follows `spec:` and drop the indentation.
"$helm" template hndsr "$chart" --set prometheusRules.enabled=true \
    --show-only templates/prometheusrule.yaml >"$work/prometheusrule.yaml"
awk 'found { sub(/^  /, ""); print } /^spec:$/ { found = 1 }' \
    "$work/prometheusrule.yaml" >"$work/hndsr-rules.yaml"
grep -q '^groups:' "$work/hndsr-rules.yaml" ||
    die "no rule groups under the PrometheusRule's spec:"$'\n'"$(cat "$work/prometheusrule.yaml")"

# The test file names its rule file `hndsr-rules.yaml`, next to it.
cp "$here/rules-test.yaml" "$work/rules-test.yaml"

"$promtool" check rules "$work/hndsr-rules.yaml" ||
    die "promtool check rules failed on the rendered rules ($chart/files/prometheus-rules.yaml)"
"$promtool" test rules "$work/rules-test.yaml" ||
    die "promtool test rules failed ($here/rules-test.yaml)"

"$helm" lint --strict "$chart" --set prometheusRules.enabled=true >/dev/null ||
    die "helm lint --strict failed with prometheusRules.enabled=true"
if "$helm" template hndsr "$chart" | grep -q '^kind: PrometheusRule$'; then
    die "a PrometheusRule is rendered with the default values (prometheusRules.enabled is false)"
fi

echo "check-rules: the chart's alerting rules pass promtool check and test"

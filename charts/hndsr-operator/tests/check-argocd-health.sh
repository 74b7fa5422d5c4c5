#!/usr/bin/env bash
# Runs the chart's Argo CD health check for HndsrService through Argo CD's
# own Lua engine, offline (`make argocd-health`):
#
#   1. `helm template --set argocdHealthCheck.enabled=true` renders the
#      ConfigMap that carries the check under its argocd-cm key;
#   2. `argocd admin settings resource-overrides health FIXTURE
#      --argocd-cm-path RENDERED` assesses each fixture in tests/argocd-health/
#      exactly as the application controller would;
#   3. each fixture's `# expect-status:` must equal the STATUS and its
#      `# expect-message:` must appear in the MESSAGE.
#
# helm and argocd come from the e2e binary cache (common.sh).
set -euo pipefail

script=check-argocd-health
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

helm="$(pinned_binary HELM_VERSION helm helm)"
argocd="$(pinned_binary ARGOCD_VERSION argo-cd argocd)"

# The rendered ConfigMap, named argocd-cm as `--argocd-cm-path` expects:
# its data is what a user merges into Argo CD's argocd-cm.
"$helm" template hndsr "$chart" --set argocdHealthCheck.enabled=true \
    --show-only templates/argocd-health.yaml |
    sed 's/^  name: .*-argocd-health$/  name: argocd-cm/' >"$work/argocd-cm.yaml"
grep -q '^  name: argocd-cm$' "$work/argocd-cm.yaml" ||
    die "the rendered health ConfigMap is not named <release>-hndsr-operator-argocd-health"
grep -q 'resource.customizations.health.hndsr.io_HndsrService:' "$work/argocd-cm.yaml" ||
    die "the rendered ConfigMap has no resource.customizations.health.hndsr.io_HndsrService key"

failed=0
count=0
for fixture in "$here"/argocd-health/*.yaml; do
    name="$(basename "$fixture" .yaml)"
    want_status="$(sed -n 's/^# expect-status: //p' "$fixture")"
    want_message="$(sed -n 's/^# expect-message: //p' "$fixture")"
    [ -n "$want_status" ] && [ -n "$want_message" ] ||
        die "$fixture needs '# expect-status:' and '# expect-message:' lines"
    out="$(ARGOCD_BINARY_NAME=argocd "$argocd" admin settings resource-overrides health \
        "$fixture" --argocd-cm-path "$work/argocd-cm.yaml" 2>&1)" ||
        die "argocd failed on $fixture:"$'\n'"$out"
    status="$(sed -n 's/^STATUS: //p' <<<"$out")"
    message="$(sed -n 's/^MESSAGE: //p' <<<"$out")"
    count=$((count + 1))
    if [ "$status" != "$want_status" ] || [[ "$message" != *"$want_message"* ]]; then
        echo "check-argocd-health: $name: got $status ($message), want $want_status ($want_message)" >&2
        failed=$((failed + 1))
    fi
done
[ "$count" -gt 0 ] || die "no fixtures in $here/argocd-health"
[ "$failed" -eq 0 ] || die "$failed of $count fixtures assessed wrongly"

if "$helm" template hndsr "$chart" | grep -q 'resource.customizations.health'; then
    die "the health check ConfigMap is rendered with the default values (argocdHealthCheck.enabled is false)"
fi

echo "check-argocd-health: Argo CD assesses all $count fixtures as expected"

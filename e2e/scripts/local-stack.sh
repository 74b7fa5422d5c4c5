#!/usr/bin/env bash
# `make run`: the whole thing on one machine, on 127.0.0.1.
#   1. a Kubernetes control plane (hndsr-e2e up: etcd, apiserver, controllers,
#      scheduler, kwok with fake GPU nodes),
#   2. the HndsrService CRD and the operator, with docs/examples/quickstart.yaml
#      reconciled to Ready (kwok plays the pods: nothing runs in them),
#   3. the inference server itself in the foreground on 127.0.0.1:8080, serving
#      the committed HNDSR weights (HNDSR_BACKEND=bicubic for plain bicubic).
# Ctrl-C stops the server, the operator and the control plane.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

profile_dir=target/release
state=.e2e
kubectl_bin="$(bash e2e/scripts/build-binaries.sh | awk '/kubectl/ {print $1}' | sed 's|/{.*||')/kubectl"
[[ -x "$kubectl_bin" ]] || { echo "local-stack: kubectl not found at $kubectl_bin" >&2; exit 1; }
kubectl() { "$kubectl_bin" --kubeconfig "$state/kubeconfig" "$@"; }

operator_pid=""
cleanup() {
  [[ -n "$operator_pid" ]] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  "$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

echo "==> control plane"
"$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
"$profile_dir/hndsr-e2e" up --detach --dir "$state"

echo "==> CRD and operator"
kubectl apply --server-side -f crds/hndsrservice.yaml >/dev/null
kubectl wait --for=condition=Established crd/hndsrservices.hndsr.io --timeout=60s >/dev/null
KUBECONFIG="$state/kubeconfig" "$profile_dir/hndsr-operator" --leader-election=false \
  --metrics-addr 127.0.0.1:8081 >"$state/operator.log" 2>&1 &
operator_pid=$!

echo "==> sample HndsrService (docs/examples/quickstart.yaml)"
kubectl apply -f docs/examples/quickstart.yaml
kubectl wait --for=condition=Ready hsvc/quickstart --timeout=180s
kubectl get hsvc,deployment,service,hpa,pdb,pods -o wide
echo
echo "    operator log: $state/operator.log; operator metrics: http://127.0.0.1:8081/metrics"
echo "    KUBECONFIG=$PWD/$state/kubeconfig $kubectl_bin get hsvc"
echo

# The committed HNDSR weights, at the device's default serving profile (fast
# on the CPU; HNDSR_PROFILE=quality serves the manifest's settings,
# docs/server.md#serving-profiles); HNDSR_BACKEND=bicubic serves plain bicubic.
backend="${HNDSR_BACKEND:-hndsr}"
server_args=(--listen 127.0.0.1:8080 --backend "$backend")
if [[ "$backend" == hndsr ]]; then
  weights=server/models/hndsr-medium.safetensors
  digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "${weights%.safetensors}.json")"
  server_args+=(--weights-path "$weights" --weights-sha256 "$digest")
fi
echo "==> inference server on http://127.0.0.1:8080 ($backend); in another shell:"
echo "    curl -s --data-binary @docs/samples/nile-256.png -H 'content-type: image/png' \\"
echo "      'http://127.0.0.1:8080/v1/upscale?scale=4' -o /tmp/up.png"
echo "    curl -s http://127.0.0.1:8080/v1/info"
"$profile_dir/hndsr-server" "${server_args[@]}"

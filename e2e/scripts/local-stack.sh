#!/usr/bin/env bash
# `make run`: the whole thing on one machine, as on a cluster.
#   1. a Kubernetes control plane on 127.0.0.1 (hndsr-e2e up: etcd, apiserver,
#      controllers, scheduler, kwok with fake GPU nodes), the image registry on
#      127.0.0.1 with `make images` pushed to it, and a real node (kubelet +
#      containerd + kube-proxy) that pulls from it,
#   2. the HndsrService CRD and the operator, and docs/examples/quickstart.yaml
#      (the hndsr-server image with the committed weights, fast profile) on
#      the real node, until Ready,
#   3. `kubectl port-forward svc/quickstart 8080:80` in the foreground: the
#      README's requests on 127.0.0.1:8080 reach the pod through its Service.
# Ctrl-C stops the port-forward, the operator, the node and the control plane
# (the node's janitor undoes every host change).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

profile_dir=target/release
state=.e2e
port="${HNDSR_PORT:-8080}"
kubectl_bin="$(bash e2e/scripts/build-binaries.sh | awk '/kubectl/ {print $1}' | sed 's|/{.*||')/kubectl"
[[ -x "$kubectl_bin" ]] || { echo "local-stack: kubectl not found at $kubectl_bin" >&2; exit 1; }
kubectl() { "$kubectl_bin" --kubeconfig "$state/kubeconfig" "$@"; }

operator_pid=""
cleanup() {
  [[ -n "$operator_pid" ]] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  "$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

echo "==> control plane, registry and real node"
"$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
"$profile_dir/hndsr-e2e" up --detach --real-node --dir "$state"
registry="$(awk '$1 == "registry" {print $2}' "$state/up.log")"
[[ -n "$registry" ]] || { echo "local-stack: no registry in $state/up.log" >&2; exit 1; }

echo "==> CRD and operator"
kubectl apply --server-side -f crds/hndsrservice.yaml >/dev/null
kubectl wait --for=condition=Established crd/hndsrservices.hndsr.io --timeout=60s >/dev/null
KUBECONFIG="$state/kubeconfig" "$profile_dir/hndsr-operator" --leader-election=false \
  --metrics-addr 127.0.0.1:8081 >"$state/operator.log" 2>&1 &
operator_pid=$!

echo "==> sample HndsrService (docs/examples/quickstart.yaml), image from $registry, on the real node"
# The example names the image without a registry and no node: point it at the
# local registry and at the real node (the kwok nodes only pretend to run pods).
kubectl apply -f docs/examples/quickstart.yaml --dry-run=client -o json |
  python3 -c '
import json, sys
svc = json.load(sys.stdin)
svc["spec"]["model"]["image"] = sys.argv[1] + "/" + svc["spec"]["model"]["image"]
svc["spec"]["resources"]["nodeSelector"] = {"hndsr.io/pool": "cpu"}
json.dump(svc, sys.stdout)' "$registry" |
  kubectl apply -f -
kubectl wait --for=condition=Ready hsvc/quickstart --timeout=300s
kubectl get hsvc,deployment,service,pdb,pods -o wide
echo
echo "    operator log: $state/operator.log; operator metrics: http://127.0.0.1:8081/metrics"
echo "    KUBECONFIG=$PWD/$state/kubeconfig $kubectl_bin get hsvc"
echo
echo "==> svc/quickstart on http://127.0.0.1:$port (kubectl port-forward); in another shell:"
echo "    curl -s --data-binary @docs/samples/nile-256.png -H 'content-type: image/png' \\"
echo "      'http://127.0.0.1:$port/v1/upscale?scale=4' -o /tmp/up.png"
echo "    curl -s http://127.0.0.1:$port/v1/info"
kubectl port-forward svc/quickstart "$port:80"

#!/usr/bin/env bash
# `make run`: the whole thing on one machine, as on a cluster.
#   1. a Kubernetes control plane on 127.0.0.1 (hndsr-e2e up: etcd, apiserver,
#      controllers, scheduler, kwok with fake GPU nodes), the image registry on
#      127.0.0.1 with `make images` pushed to it, and a real node (kubelet +
#      containerd + kube-proxy) that pulls from it,
#   2. the operator installed in-cluster by its Helm chart (CRD, RBAC,
#      ServiceAccount; its image from the local registry, on the real node),
#      then docs/examples/quickstart.yaml (the hndsr-server image with the
#      committed weights, fast profile, autoscaled 1..3 on in-flight requests
#      through Prometheus and prometheus-adapter) until Ready,
#   3. `kubectl port-forward svc/quickstart 8080:80` in the foreground: the
#      README's requests on 127.0.0.1:8080 reach the pod through its Service.
# Ctrl-C stops the port-forward, the node and the control plane (the node's
# janitor undoes every host change).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

profile_dir=target/release
state=.e2e
port="${HNDSR_PORT:-8080}"
bins="$(bash e2e/scripts/build-binaries.sh | awk '/kubectl/ {print $1}' | sed 's|/kubernetes-v.*||')"
kubectl_bin="$(ls "$bins"/kubernetes-v*/kubectl)"
helm_bin="$(ls "$bins"/helm-v*/helm)"
[[ -x "$kubectl_bin" && -x "$helm_bin" ]] || { echo "local-stack: kubectl or helm not found under $bins" >&2; exit 1; }
kubectl() { "$kubectl_bin" --kubeconfig "$state/kubeconfig" "$@"; }
helm() { KUBECONFIG="$state/kubeconfig" HELM_CACHE_HOME="$state/helm/cache" HELM_CONFIG_HOME="$state/helm/config" \
  HELM_DATA_HOME="$state/helm/data" "$helm_bin" "$@"; }

cleanup() {
  "$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

echo "==> control plane, registry and real node"
"$profile_dir/hndsr-e2e" down --dir "$state" >/dev/null 2>&1 || true
"$profile_dir/hndsr-e2e" up --detach --real-node --dir "$state"
registry="$(awk '$1 == "registry" {print $2}' "$state/up.log")"
[[ -n "$registry" ]] || { echo "local-stack: no registry in $state/up.log" >&2; exit 1; }
# KEDA runs on the host beside Prometheus: the ScaledObjects of provider-keda
# services name this address, which KEDA (not the operator) dials.
prometheus="$(awk '$1 == "prometheus" {print $2}' "$state/up.log")"
[[ -n "$prometheus" ]] || { echo "local-stack: no prometheus in $state/up.log" >&2; exit 1; }

echo "==> the operator, in-cluster (helm install charts/hndsr-operator)"
helm install hndsr-operator charts/hndsr-operator --namespace hndsr-system --create-namespace \
  --set "image.registry=$registry,image.tag=$(awk -F'"' '/^version = / {print $2; exit}' Cargo.toml)" \
  --set "fetcherImage=$registry/hndsr/fetch:1,replicaCount=1,logJson=false" \
  --set "keda.prometheusUrl=http://$prometheus" \
  --set 'nodeSelector.hndsr\.io/pool=cpu' --wait --timeout 180s >/dev/null

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
kubectl get hsvc,deployment,service,hpa,pdb,pods -o wide
kubectl get pods -n hndsr-system -o wide
echo
echo "    operator log: KUBECONFIG=$PWD/$state/kubeconfig $kubectl_bin logs -n hndsr-system deploy/hndsr-operator"
echo "    KUBECONFIG=$PWD/$state/kubeconfig $kubectl_bin get hsvc,hpa"
echo "    Prometheus: http://$prometheus (KEDA runs too: try docs/examples/autoscaling-keda.yaml)"
echo
echo "==> svc/quickstart on http://127.0.0.1:$port (kubectl port-forward); in another shell:"
echo "    curl -s --data-binary @docs/samples/nile-256.png -H 'content-type: image/png' \\"
echo "      'http://127.0.0.1:$port/v1/upscale?scale=4' -o /tmp/up.png"
echo "    curl -s http://127.0.0.1:$port/v1/info"
kubectl port-forward svc/quickstart "$port:80"

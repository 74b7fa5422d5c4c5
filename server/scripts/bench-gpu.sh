#!/usr/bin/env bash
# The GPU checks of the serving path, as one script for a machine with a
# CUDA GPU and PyTorch 2.11.0 installed (its libtorch is used; nothing is
# downloaded). About 5 minutes on one H100. Prints a markdown report.
#
#   1. CUDA correctness: the hndsr-torch CUDA tests (fp32/fp16/bf16 against
#      the CPU; the whole path on the device: tiles, self-ensemble,
#      projection, alpha);
#   2. model latency per tile: fp32/fp16/bf16, steps 0 and 20, batch 1 and
#      8, for each profile's tiling (fast: 256² tiles; quality: 24² tiles
#      with the ×8 self-ensemble);
#   3. the server under load: the README's 256² sample at concurrency 1, 4
#      and 16, for each profile, with batching across requests on (the CUDA
#      default) and off;
#   4. refusals at 10x overload (200 clients, MAX_QUEUE_DEPTH=20), eager and
#      polite (Retry-After, jittered): the 503s' p50/p99 on a machine whose
#      CPUs are quiet, inference being on the GPU (the goal: p99 < 5 ms).
#
# Usage, from the repository root:
#   make gpu-kit                     # here: builds target/gpu-kit (stripped binaries)
#   bash server/scripts/bench-gpu.sh # there: runs the checks on target/gpu-kit
# Knobs: GPU_KIT (default target/gpu-kit), BENCH_SECONDS (per load level, 10),
# TORCH_LIB (libtorch's directory; default: the installed torch package's).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIT="${GPU_KIT:-$REPO_ROOT/target/gpu-kit}"
SECONDS_PER_LEVEL="${BENCH_SECONDS:-10}"
WEIGHTS="$REPO_ROOT/server/models/hndsr.safetensors"
SAMPLE="$REPO_ROOT/docs/samples/nile-256.png"

for bin in hndsr-server hndsr-loadgen hndsr-train hndsr_cuda cuda; do
  [[ -x "$KIT/$bin" ]] || { echo "bench-gpu: $KIT/$bin missing; run 'make gpu-kit' on the build machine" >&2; exit 1; }
done
if [[ -z "${TORCH_LIB:-}" ]]; then
  TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" \
    || { echo "bench-gpu: no torch package to take libtorch from; set TORCH_LIB" >&2; exit 1; }
fi
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SHA="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "${WEIGHTS%.safetensors}.json")"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "# GPU checks ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo '```'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 || true
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo '```'

echo
echo "## 1. CUDA correctness"
echo
echo '```'
(cd "$REPO_ROOT/server/torch" && "$KIT/cuda" --test-threads 1 && "$KIT/hndsr_cuda" --test-threads 1) 2>&1 | grep -E '^test |test result' \
  || echo "CUDA TESTS FAILED"
echo '```'

echo
echo "## 2. Model latency per tile (hndsr-train bench, median of up to 5 calls)"
for profile in "fast:256:false" "quality:24:true"; do
  IFS=: read -r name tile ensemble <<<"$profile"
  echo
  echo "### $name: ${tile}² LR tiles, self-ensemble $ensemble"
  echo
  timeout 150 "$KIT/hndsr-train" --device cuda bench --weights "$WEIGHTS" --tile "$tile" \
    --steps 0,20 --batch 1,8 --precision fp32,fp16,bf16 --self-ensemble "$ensemble" \
    --repeats 5 --max-seconds 10 2>&1 | grep -E '^\|' || echo "BENCH FAILED ($name)"
done

start_server() {
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$KIT/hndsr-server" --listen "127.0.0.1:$PORT" --backend hndsr --device cuda \
    --weights-path "$WEIGHTS" --weights-sha256 "$SHA" --rate-limit-per-hour 0 --request-timeout-s 60 \
    "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$WORK/server.log"; return 1; }
    sleep 0.1
  done
  return 1
}
stop_server() { kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""; }

echo
echo "## 3. The server under load: $(basename "$SAMPLE") (256² RGB) ×4, MAX_CONCURRENT=4"
echo
echo "GPU MiB: device memory in use after the level (nvidia-smi; the caching allocator keeps"
echo "what each inference thread's stream has used)."
echo
echo "| profile, batching | concurrency | 200/s | p50 ms | p90 ms | p99 ms | other | batch tiles (mean) | est. ratio p50 / p90 | GPU MiB |"
echo "|---|---:|---:|---:|---:|---:|---|---:|---|---:|"
for profile in fast quality; do
  for batch in 16 0; do
    if ! start_server --profile "$profile" --batch-tiles "$batch"; then
      echo "| $profile, batch $batch | server did not start | | | | | | | | |"; continue
    fi
    URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
    "$KIT/hndsr-loadgen" run --url "$URL" --png 256 --png-variants 64 -c 4 -n 16 --timeout 60 >/dev/null 2>&1
    for c in 1 4 16; do
      "$KIT/hndsr-loadgen" run --url "$URL" --png 256 --png-variants 64 -c "$c" -d "$SECONDS_PER_LEVEL" \
        --timeout 60 --json >"$WORK/r.json" 2>/dev/null
      curl -fsS "http://127.0.0.1:$PORT/metrics" >"$WORK/m.txt"
      gpu_mib="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)"
      python3 - "$profile, batch $batch" "$c" "$WORK/r.json" "$WORK/m.txt" "${gpu_mib:--}" <<'PY'
import json, sys
label, c, r, m = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), open(sys.argv[4]).read()
gpu_mib = sys.argv[5].strip()
ok = r["status_counts"].get("200", 0)
l = r["latency_by_status"].get("200", {})
other = ", ".join(f"{k}: {v}" for k, v in r["status_counts"].items() if k != "200") or "-"
val = lambda n: next((float(x.split()[-1]) for x in m.splitlines() if x.startswith(n + " ")), 0.0)
mean = val("hndsr_batch_tiles_sum") / max(val("hndsr_batch_tiles_count"), 1)
e = r.get("estimate_ratio") or {}
f = lambda d, k: f'{d[k]:.1f}' if k in d else "-"
print(f'| {label} | {c} | {ok / r["elapsed_s"]:.1f} | {f(l, "p50_ms")} | {f(l, "p90_ms")} | {f(l, "p99_ms")} | {other} | '
      f'{mean:.1f} | {e.get("p50", 0):.2f} / {e.get("p90", 0):.2f} | {gpu_mib} |')
PY
    done
    stop_server
  done
done

echo
echo "## 4. Refusals at 10x overload: fast profile, MAX_CONCURRENT=4, MAX_QUEUE_DEPTH=20, 200 clients"
echo
echo "Eager clients send again as soon as they are answered (their 503 latency is bounded"
echo "by Little's law of the closed loop); polite ones honour Retry-After, out of step."
echo
echo "| clients | requests | share of 503 | 503 p50 / p99 ms | 200/s | 200 p50 / p99 ms | other |"
echo "|---|---:|---:|---|---:|---|---|"
if start_server --profile fast --max-concurrent 4 --max-queue-depth 20; then
  URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
  "$KIT/hndsr-loadgen" run --url "$URL" --png 256 --png-variants 64 -c 4 -n 16 --timeout 60 >/dev/null 2>&1
  for mode in eager polite; do
    extra=()
    [[ "$mode" == polite ]] && extra=(--honour-retry-after --jitter)
    "$KIT/hndsr-loadgen" run --url "$URL" --png 256 --png-variants 64 -c 200 -d "$SECONDS_PER_LEVEL" \
      --timeout 60 "${extra[@]}" --json >"$WORK/o.json" 2>/dev/null
    python3 - "$mode" "$WORK/o.json" <<'PY'
import json, sys
mode, r = sys.argv[1], json.load(open(sys.argv[2]))
c, by, n = r["status_counts"], r["latency_by_status"], r["requests"] or 1
p = lambda k: f'{by[k]["p50_ms"]:.1f} / {by[k]["p99_ms"]:.1f}' if k in by else "-"
other = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()) if k not in ("200", "503")) or "-"
print(f'| {mode} | {r["requests"]} | {100.0 * c.get("503", 0) / n:.1f} % | {p("503")} | '
      f'{c.get("200", 0) / r["elapsed_s"]:.1f} | {p("200")} | {other} |')
PY
  done
  stop_server
else
  echo "| server did not start | | | | | | |"
fi

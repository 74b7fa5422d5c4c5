#!/usr/bin/env bash
# Load-tests the release server on 127.0.0.1 with the bicubic backend and
# prints a markdown report (called by `make bench`; figures go to
# docs/benchmarks.md). Builds the release hndsr-server and hndsr-loadgen
# itself (incremental; BENCH_NO_BUILD=1 skips it); needs python3 and curl.
#
#   1. EDGE x EDGE PNG (256), scale 4, concurrency 1, 4, 16, 64 (rate limit
#      off), bicubic and, with BENCH_WEIGHTS, the hndsr fast profile;
#   2. overload: concurrency 10 x MAX_QUEUE_DEPTH, from clients that send
#      again at once and from clients that honour Retry-After out of step:
#      share of 503s, p99 of the 503s and of the admitted requests, refusals
#      by type;
#   3. 100k requests from 100k distinct client addresses via a trusted
#      X-Forwarded-For, rate limit on: server RSS before and after;
#   4. libtorch threads per inference thread: HNDSR_TORCH_THREADS = the
#      server's default (all cores) vs the cores divided among the
#      MAX_CONCURRENT inference threads, at concurrency 1 and MAX_CONCURRENT;
#      with BENCH_WEIGHTS=path/to/w.safetensors also for the hndsr backend
#      (steps 0, no self-ensemble);
#   5. with BENCH_WEIGHTS: the hndsr backend as its manifest serves it
#      (steps 0, self-ensemble and tile from the manifest) against other
#      LR tile edges (BENCH_TILES, default "manifest 256"), at concurrency 1
#      and MAX_CONCURRENT;
#   6. "profiles", with BENCH_WEIGHTS: the hndsr backend at each profile of
#      BENCH_PROFILES (default "fast"), the README's 256² sample at
#      concurrency 1: p50/p99 and /v1/info's settings;
#   7. "cpu": the bicubic server's CPU time per request (process utime +
#      stime over sequential requests on one libtorch thread, 64 distinct
#      bodies), the machine's limit (cores / CPU per request) and what the
#      default server at concurrency 16 reaches of it, per answer encoding
#      (PNG fast, PNG none, TIFF);
#   8. "deadline": steady load (concurrency MAX_CONCURRENT, mixed 128²-512²
#      inputs; once with clients that retry at once, once with clients that
#      wait as Retry-After says) then 10x overload on the hndsr fast profile (bicubic without
#      BENCH_WEIGHTS): the estimator's measured/estimated ratio, refusals by
#      type, 504s;
#   9. "soak": BENCH_SOAK_SECONDS (600) at 10x overload, the server's RSS,
#      open file descriptors and rate-limiter table sampled each minute.
#  10. "priority": eager and polite clients at 10x overload on the hndsr
#      fast profile (bicubic without BENCH_WEIGHTS) with HNDSR_INFERENCE_NICE
#      0 (the default), 5 and 10: the 503s' p50/p90/p99 and the admitted rate.
#
# Knobs (env): BENCH_SECONDS (per level, default 15), BENCH_CLIENTS (default
# 100000), MAX_CONCURRENT (4), MAX_QUEUE_DEPTH (20), BENCH_WEIGHTS (unset),
# BENCH_TILES, BENCH_EDGE (the input PNGs' edge, default 256), BENCH_SECTIONS
# (default "load clients threads tiles": 1+2, 3, 4, 5; also "profiles cpu
# deadline soak priority"), BENCH_PROFILES, BENCH_SOAK_SECONDS, CARGO_TARGET_DIR,
# BENCH_KEEP=1 (keep the servers' logs and the load generators' results).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
SERVER="$TARGET_DIR/release/hndsr-server"
LOADGEN="$TARGET_DIR/release/hndsr-loadgen"
SECONDS_PER_LEVEL="${BENCH_SECONDS:-15}"
CLIENTS="${BENCH_CLIENTS:-100000}"
MAX_CONCURRENT="${MAX_CONCURRENT:-4}"
MAX_QUEUE_DEPTH="${MAX_QUEUE_DEPTH:-20}"
EDGE="${BENCH_EDGE:-256}"
LEVELS=(1 4 16 64)
SECTIONS=" ${BENCH_SECTIONS:-load clients threads tiles} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  (cd "$REPO_ROOT" && cargo build --release --locked -q \
    -p hndsr-server --bin hndsr-server -p hndsr-loadgen --bin hndsr-loadgen) >&2
fi
for bin in "$SERVER" "$LOADGEN"; do
  [[ -x "$bin" ]] || { echo "bench: $bin not found; run 'make bench'" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }
command -v curl >/dev/null || { echo "bench: curl is required" >&2; exit 1; }

WORK="$(mktemp -d)"
SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    # The server drains on SIGTERM; do not wait for the full drain period.
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  if [[ "${BENCH_KEEP:-0}" == 1 ]]; then echo "bench: logs and results kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_server LOG ARGS... : starts the server on a free port, waits for /readyz.
start_server() {
  local log="$1"; shift
  PORT="$(free_port)"
  MAX_CONCURRENT="$MAX_CONCURRENT" MAX_QUEUE_DEPTH="$MAX_QUEUE_DEPTH" \
    "$SERVER" --listen "127.0.0.1:$PORT" --device cpu --scale 4 "${BACKEND_ARGS[@]}" "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "bench: server exited:" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "bench: server not ready after 30 s:" >&2; tail -20 "$log" >&2; exit 1
}

BACKEND_ARGS=(--backend bicubic)
# With BENCH_WEIGHTS: their sha256 (from the manifest beside them) and the
# server arguments of the hndsr fast profile on them.
if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
  SHA="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "${BENCH_WEIGHTS%.safetensors}.json")"
  HNDSR_FAST=(--backend hndsr --weights-path "$BENCH_WEIGHTS" --weights-sha256 "$SHA" --profile fast)
fi

# info KEY: one field of the running server's /v1/info.
info() {
  curl -fsS "http://127.0.0.1:$PORT/v1/info" |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]))' "$1"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }

# Formats one loadgen JSON report as a markdown table row.
row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
counts = r["status_counts"]
n = r["requests"] or 1
ok = counts.get("200", 0)
lat = r.get("latency") or {}
ok_lat = r["latency_by_status"].get("200") or {}
others = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "200") or "-"
def ms(d, k): return f'{d[k]:.1f}' if k in d else "-"
print(f'| {label} | {r["requests"]} | {r["elapsed_s"]:.1f} | {ok / r["elapsed_s"]:.1f} | '
      f'{ms(ok_lat, "p50_ms")} | {ms(ok_lat, "p90_ms")} | {ms(ok_lat, "p99_ms")} | {100.0 * ok / n:.1f} | {others} |')
PY
}

# 256 distinct EDGE x EDGE images sent in turn: identical concurrent requests
# would be coalesced into one computation and flatter the figures.
BODY=(--png "$EDGE" --png-variants 256)

# --- 1 and 2: throughput and latency, then overload -------------------------
# overload PREFIX: 10 x MAX_QUEUE_DEPTH clients against $URL, into
# PREFIX-eager.json (clients that send again at once, SECONDS_PER_LEVEL)
# and PREFIX-polite.json (clients that honour Retry-After and are out of
# step: start within the first second, up to half a Retry-After of extra
# wait, so the 503s' latency is the server's, not a burst's; twice as long,
# for as many 503s to rank).
overload() {
  "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$((10 * MAX_QUEUE_DEPTH))" -d "$SECONDS_PER_LEVEL" \
    --json >"$1-eager.json"
  "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$((10 * MAX_QUEUE_DEPTH))" -d "$((2 * SECONDS_PER_LEVEL))" \
    --honour-retry-after --jitter --json >"$1-polite.json"
}

# load_section LABEL: against a server started with BACKEND_ARGS.
load_section() {
local label="$1"
start_server "$WORK/server-a.log" --rate-limit-per-hour 0 --request-timeout-s 30
URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
# Warm the process (allocator, PNG paths) outside the measurements.
"$LOADGEN" run --url "$URL" "${BODY[@]}" -c 2 -n 10 >/dev/null

echo "## Throughput and latency: ${EDGE}x${EDGE} PNG, scale 4, $label, CPU"
echo
echo "MAX_CONCURRENT=$MAX_CONCURRENT, MAX_QUEUE_DEPTH=$MAX_QUEUE_DEPTH, rate limit off, ${SECONDS_PER_LEVEL} s per level."
echo "\"error\": no HTTP response (the server answered 503 before reading the body and closed"
echo "the connection while the client was still sending it)."
echo
echo "| concurrency | requests | seconds | 200/s | p50 ms (200) | p90 ms (200) | p99 ms (200) | % 200 | other statuses |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
for c in "${LEVELS[@]}"; do
  "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$c" -d "$SECONDS_PER_LEVEL" --json >"$WORK/c$c.json"
  row "$c" "$WORK/c$c.json"
done

OVER=$((10 * MAX_QUEUE_DEPTH))
overload "$WORK/over"
echo
echo "## Overload: concurrency $OVER (10 x MAX_QUEUE_DEPTH), $label"
echo
echo "Eager clients send again as soon as they are answered; polite ones honour"
echo "Retry-After and are out of step (\`hndsr-loadgen --honour-retry-after --jitter\`,"
echo "run twice as long, for as many 503s to rank)."
echo
python3 - "$WORK/over-eager.json" "$WORK/over-polite.json" <<'PY'
import json, sys
runs = [json.load(open(p)) for p in sys.argv[1:]]
def cell(r, f):
    c, n, by = r["status_counts"], r["requests"] or 1, r["latency_by_status"]
    def p(k, q): return f'{by[k][q]:.1f} ms' if k in by else "-"
    return {
        "requests": f'{r["requests"]} in {r["elapsed_s"]:.1f} s',
        "share of 503": f'{100.0 * c.get("503", 0) / n:.1f} %',
        "p50 / p99 of 503": f'{p("503", "p50_ms")} / {p("503", "p99_ms")}',
        "admitted (200) per second": f'{c.get("200", 0) / r["elapsed_s"]:.1f}',
        "p50 / p99 of admitted (200)": f'{p("200", "p50_ms")} / {p("200", "p99_ms")}',
        "status counts": ", ".join(f"{k}: {v}" for k, v in sorted(c.items())),
        "refusals by type": ", ".join(f"{k}: {v}" for k, v in sorted(r["error_types"].items())) or "-",
    }[f]
print("| metric | eager clients | polite clients |")
print("|---|---:|---:|")
for f in ["requests", "share of 503", "p50 / p99 of 503", "admitted (200) per second",
          "p50 / p99 of admitted (200)", "status counts", "refusals by type"]:
    print(f"| {f} | {cell(runs[0], f)} | {cell(runs[1], f)} |")
for r in runs:
    for e in r["error_samples"][:2]:
        print(f'| transport error seen | `{e}` | |')
PY
stop_server
echo
}
if want load; then
  load_section bicubic
  if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
    BACKEND_ARGS=("${HNDSR_FAST[@]}")
    load_section "hndsr fast profile"
    BACKEND_ARGS=(--backend bicubic)
  fi
fi

# --- 3: rate-limiter memory under many distinct clients ---------------------
if want clients; then
# A tiny body that is not an image: the limiter records the client before the
# image is looked at, so each request adds limiter state without model work.
printf 'not an image' >"$WORK/garbage.bin"
start_server "$WORK/server-b.log" --rate-limit-per-hour 100 --trusted-proxies 127.0.0.1/32
URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
"$LOADGEN" run --url "$URL" --body "$WORK/garbage.bin" --content-type image/png -c 4 -n 100 >/dev/null
sleep 1
RSS_BEFORE="$(rss_kib)"
"$LOADGEN" run --url "$URL" --body "$WORK/garbage.bin" --content-type image/png \
  -c 32 -n "$CLIENTS" --distinct-clients --max-duration 600 --json >"$WORK/clients.json"
sleep 1
RSS_AFTER="$(rss_kib)"
echo
echo "## Rate limiter: $CLIENTS distinct clients via trusted X-Forwarded-For"
echo
python3 - "$WORK/clients.json" "$RSS_BEFORE" "$RSS_AFTER" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
before, after = int(sys.argv[2]), int(sys.argv[3])
print("| metric | value |")
print("|---|---:|")
print(f'| requests in {r["elapsed_s"]:.1f} s | {r["requests"]} ({r["throughput_rps"]:.0f}/s) |')
print(f'| status counts | {", ".join(f"{k}: {v}" for k, v in sorted(r["status_counts"].items()))} |')
print(f'| server VmRSS before | {before / 1024:.1f} MiB |')
print(f'| server VmRSS after | {after / 1024:.1f} MiB |')
print(f'| growth | {(after - before) / 1024:.1f} MiB ({(after - before) * 1024 / max(r["requests"], 1):.0f} bytes per client) |')
PY
stop_server
fi

# --- 4: libtorch threads per inference thread --------------------------------
CORES="$(nproc)"
SHARE=$((CORES / MAX_CONCURRENT)); ((SHARE >= 1)) || SHARE=1
# levels_rows LABEL KEY: against the running server, a warm-up burst, then a
# table row "LABEL, c" for concurrency 1 and MAX_CONCURRENT (reports kept
# as $WORK/KEY-c<c>.json).
levels_rows() {
  local label="$1" key="$2" c
  URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
  "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$MAX_CONCURRENT" -n "$((2 * MAX_CONCURRENT))" --timeout 120 >/dev/null
  for c in 1 "$MAX_CONCURRENT"; do
    "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$c" -d "$SECONDS_PER_LEVEL" --timeout 120 --json >"$WORK/$key-c$c.json"
    row "$label, $c" "$WORK/$key-c$c.json"
  done
}
threads_section() {
  local label="$1"
  echo
  echo "## libtorch threads per inference thread: $label, ${EDGE}x${EDGE} PNG, scale 4, CPU"
  echo
  echo "$CORES cores, MAX_CONCURRENT=$MAX_CONCURRENT, ${SECONDS_PER_LEVEL} s per row. $CORES threads is the"
  echo "server's default here (all cores); $SHARE is the cores divided among the inference threads."
  echo
  echo "| torch threads, concurrency | requests | seconds | 200/s | p50 ms (200) | p90 ms (200) | p99 ms (200) | % 200 | other statuses |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  local t counts=("$CORES")
  [[ "$SHARE" == "$CORES" ]] || counts+=("$SHARE")
  for t in "${counts[@]}"; do
    start_server "$WORK/server-t$t.log" --rate-limit-per-hour 0 --request-timeout-s 120 --torch-threads "$t"
    levels_rows "$t" "t$t"
    stop_server
  done
}
if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
  HNDSR_ARGS=(--backend hndsr --weights-path "$BENCH_WEIGHTS" --weights-sha256 "$SHA" --sampling-steps 0)
fi
if want threads; then
  threads_section bicubic
  if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
    BACKEND_ARGS=("${HNDSR_ARGS[@]}" --self-ensemble false)
    threads_section "hndsr $(basename "$BENCH_WEIGHTS"), steps 0"
  fi
fi

# --- 5: hndsr tile size, served as the manifest says -------------------------
if want tiles && [[ -n "${BENCH_WEIGHTS:-}" ]]; then
  BACKEND_ARGS=("${HNDSR_ARGS[@]}")
  echo
  echo "## hndsr tile size: $(basename "$BENCH_WEIGHTS"), steps 0, ${EDGE}x${EDGE} PNG, scale 4, CPU"
  echo
  echo "Self-ensemble as the manifest says; \"manifest\" is the manifest's tile (/v1/info tile)."
  echo "MAX_CONCURRENT=$MAX_CONCURRENT, ${SECONDS_PER_LEVEL} s per row, default threads."
  echo
  echo "| LR tile, concurrency | requests | seconds | 200/s | p50 ms (200) | p90 ms (200) | p99 ms (200) | % 200 | other statuses |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  for tile in ${BENCH_TILES:-manifest 256}; do
    args=(--rate-limit-per-hour 0 --request-timeout-s 120)
    [[ "$tile" == manifest ]] || args+=(--tile "$tile")
    start_server "$WORK/server-tile-$tile.log" "${args[@]}"
    shown="$(info tile)², self-ensemble $(info self_ensemble)"
    [[ "$tile" == manifest ]] && shown="manifest: $shown"
    levels_rows "$shown" "tile$tile"
    stop_server
  done
fi

# --- 6: hndsr serving profiles, the README's 256² sample ---------------------
SAMPLE="$REPO_ROOT/docs/samples/nile-256.png"
if want profiles && [[ -n "${BENCH_WEIGHTS:-}" ]]; then
  BACKEND_ARGS=(--backend hndsr --weights-path "$BENCH_WEIGHTS" --weights-sha256 "$SHA")
  echo
  echo "## hndsr profiles: $(basename "$BENCH_WEIGHTS"), $(basename "$SAMPLE") (256x256 RGB), scale 4, concurrency 1, CPU"
  echo
  echo "| profile (settings from /v1/info) | requests | seconds | 200/s | p50 ms (200) | p90 ms (200) | p99 ms (200) | % 200 | other statuses |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  for profile in ${BENCH_PROFILES:-fast}; do
    start_server "$WORK/server-profile-$profile.log" --rate-limit-per-hour 0 --request-timeout-s 120 --profile "$profile"
    shown="$(info profile): tile $(info tile), self-ensemble $(info self_ensemble), projection $(info projection_steps)"
    URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
    "$LOADGEN" run --url "$URL" --body "$SAMPLE" --content-type image/png -c 1 -n 2 --timeout 120 >/dev/null
    "$LOADGEN" run --url "$URL" --body "$SAMPLE" --content-type image/png -c 1 -d "$SECONDS_PER_LEVEL" -n 20 \
      --timeout 120 --json >"$WORK/profile-$profile.json"
    row "$shown" "$WORK/profile-$profile.json"
    stop_server
  done
fi

# proc_cpu_s: the server's user + system CPU seconds so far.
proc_cpu_s() {
  python3 - "$SERVER_PID" <<'PY'
import os, sys
f = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
PY
}

# --- 7: CPU per request and the machine's limit (bicubic) --------------------
# The CPU a request costs is measured on a server with one libtorch thread:
# with more, libtorch's idle workers spin between kernels and bill the
# process for time no request needed (at concurrency 1 that overstates the
# cost by ~15 %). The concurrency-16 run uses the default server.
if want cpu; then
  BACKEND_ARGS=(--backend bicubic)
  CPU_BODY=(--png "$EDGE" --png-variants 64)
  echo
  echo "## CPU per request and the machine's limit: bicubic, ${EDGE}x${EDGE} PNG (64 distinct), scale 4"
  echo
  echo "CPU = the server process's utime + stime over 100 sequential requests (--torch-threads 1);"
  echo "limit = $CORES cores / CPU per request; then the default server at concurrency 16 for ${SECONDS_PER_LEVEL} s."
  echo
  echo "| answer | CPU ms / request | limit req/s | c=16 200/s | share of limit | c=16 p50 / p99 ms | sample answer KiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for enc in png-fast png-none tiff; do
    q="scale=4"; hdr=()
    case "$enc" in
      png-none) q="scale=4&compression=none" ;;
      tiff) hdr=(-H "accept: image/tiff") ;;
    esac
    start_server "$WORK/server-cpu1-$enc.log" --rate-limit-per-hour 0 --request-timeout-s 30 --torch-threads 1
    URL="http://127.0.0.1:$PORT/v1/upscale?$q"
    "$LOADGEN" run --url "$URL" "${CPU_BODY[@]}" "${hdr[@]}" -c 2 -n 20 >/dev/null
    size="$(curl -s -o "$WORK/one.out" -w '%{size_download}' "${hdr[@]}" --data-binary @"$SAMPLE" -H 'content-type: image/png' "$URL")"
    before="$(proc_cpu_s)"
    curl -fsS "http://127.0.0.1:$PORT/metrics" >"$WORK/stages-before.txt"
    "$LOADGEN" run --url "$URL" "${CPU_BODY[@]}" "${hdr[@]}" -c 1 -n 100 --json >"$WORK/cpu-$enc-c1.json"
    curl -fsS "http://127.0.0.1:$PORT/metrics" >"$WORK/stages-after.txt"
    after="$(proc_cpu_s)"
    python3 - "$enc" "$WORK/stages-before.txt" "$WORK/stages-after.txt" >>"$WORK/stages.md" <<'PY'
import re, sys
enc, a, b = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read()
def sums(t):
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'hndsr_stage_cpu_seconds_sum\{stage="(\w+)"\} (\S+)', t)}
x, y = sums(a), sums(b)
stages = ["decode", "to_tensor", "model", "from_tensor", "encode"]
ms = [1000 * (y[s] - x[s]) / 100 for s in stages]
print(f'| {enc} | ' + " | ".join(f"{v:.1f}" for v in ms) + f' | {sum(ms):.1f} |')
PY
    stop_server
    start_server "$WORK/server-cpu-$enc.log" --rate-limit-per-hour 0 --request-timeout-s 30
    URL="http://127.0.0.1:$PORT/v1/upscale?$q"
    "$LOADGEN" run --url "$URL" "${CPU_BODY[@]}" "${hdr[@]}" -c 4 -n 20 >/dev/null
    "$LOADGEN" run --url "$URL" "${CPU_BODY[@]}" "${hdr[@]}" -c 16 -d "$SECONDS_PER_LEVEL" --json >"$WORK/cpu-$enc-c16.json"
    python3 - "$enc" "$before" "$after" "$CORES" "$WORK/cpu-$enc-c16.json" "$size" <<'PY'
import json, sys
enc, before, after, cores, path, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
cpu = (after - before) / 100
limit = cores / cpu if cpu > 0 else float("inf")
r = json.load(open(path))
ok = r["status_counts"].get("200", 0) / r["elapsed_s"]
l = r["latency_by_status"].get("200", {})
print(f'| {enc} | {1000 * cpu:.1f} | {limit:.1f} | {ok:.1f} | {100 * ok / limit:.0f} % | '
      f'{l.get("p50_ms", 0):.0f} / {l.get("p99_ms", 0):.0f} | {size / 1024:.0f} |')
PY
    stop_server
  done
  echo
  echo "In-process CPU per request by stage (hndsr_stage_cpu_seconds, the same 100 sequential requests, ms):"
  echo
  echo "| answer | decode | to tensor | model | from tensor | encode | sum |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  cat "$WORK/stages.md"
fi

# --- 8: deadline-aware admission ----------------------------------------------
if want deadline; then
  if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
    BACKEND_ARGS=("${HNDSR_FAST[@]}")
    label="hndsr fast"
  else
    BACKEND_ARGS=(--backend bicubic); label=bicubic
  fi
  for e in 128 256 384 512; do
    "$LOADGEN" png --size "$e" --out "$WORK/mix-$e.png"
  done
  start_server "$WORK/server-deadline.log" --rate-limit-per-hour 0 --request-timeout-s 10
  URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
  echo
  echo "## Deadline-aware admission: $label, inputs 128²-512² in turn, scale 4, REQUEST_TIMEOUT_S=10"
  echo
  echo "| load | requests | 200 | refused by estimate (503 deadline_wait / 422 deadline_too_slow) | 503 overloaded | 504 | measured/estimated service p10 / p50 / p90 (n) |"
  echo "|---|---:|---:|---:|---:|---:|---|"
  # steady: each refused client sends its next request at once; polite:
  # the same clients wait as Retry-After says; overload: 10x the queue.
  for load in "steady:$MAX_CONCURRENT:" "polite:$MAX_CONCURRENT:--honour-retry-after" \
              "overload:$((10 * MAX_QUEUE_DEPTH)):"; do
    name="${load%%:*}"; rest="${load#*:}"; c="${rest%%:*}"; flags="${rest#*:}"
    pids=()
    for e in 128 256 384 512; do
      # shellcheck disable=SC2086 # $flags is empty or one flag
      "$LOADGEN" run --url "$URL" --body "$WORK/mix-$e.png" --content-type image/png $flags \
        -c "$(( (c + 3) / 4 ))" -d "$((2 * SECONDS_PER_LEVEL))" --timeout 60 --json >"$WORK/dl-$name-$e.json" &
      pids+=($!)
    done
    wait "${pids[@]}"
    python3 - "$name, concurrency $c" "$WORK"/dl-"$name"-*.json <<'PY'
import json, sys
label, paths = sys.argv[1], sys.argv[2:]
req = ok = t504 = 0; types = {}; n_ratio = 0; p = []
for path in paths:
    r = json.load(open(path))
    req += r["requests"]; ok += r["status_counts"].get("200", 0); t504 += r["status_counts"].get("504", 0)
    for k, v in r["error_types"].items(): types[k] = types.get(k, 0) + v
    if r.get("estimate_ratio"): p.append(r["estimate_ratio"])
ratios = " / ".join("{:.2f}".format(sum(x[k] * x["count"] for x in p) / max(1, sum(x["count"] for x in p))) for k in ("p10", "p50", "p90")) if p else "-"
n = sum(x["count"] for x in p)
print(f'| {label} | {req} | {ok} | {types.get("deadline_wait", 0)} / {types.get("deadline_too_slow", 0)} | '
      f'{types.get("overloaded", 0)} | {t504} | {ratios} ({n}; count-weighted means of the four sizes) |')
PY
  done
  stop_server
fi

# --- 9: soak at 10x overload ------------------------------------------------------
if want soak; then
  BACKEND_ARGS=(--backend bicubic)
  SOAK="${BENCH_SOAK_SECONDS:-600}"
  start_server "$WORK/server-soak.log" --rate-limit-per-hour 1000000 --trusted-proxies 127.0.0.1/32
  URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
  "$LOADGEN" run --url "$URL" "${BODY[@]}" -c "$((10 * MAX_QUEUE_DEPTH))" -d "$SOAK" --max-duration "$((SOAK + 60))" \
    --distinct-clients --json >"$WORK/soak.json" &
  soak_pid=$!
  echo
  echo "## Soak: ${SOAK} s at concurrency $((10 * MAX_QUEUE_DEPTH)) (10x MAX_QUEUE_DEPTH), bicubic, distinct clients"
  echo
  echo "| minute | VmRSS MiB | open fds | rate-limiter clients |"
  echo "|---:|---:|---:|---:|"
  for ((m = 0; m * 60 <= SOAK; m++)); do
    clients="$(curl -fsS "http://127.0.0.1:$PORT/metrics" | awk '/^hndsr_rate_limiter_clients / {print $2}')"
    echo "| $m | $(( $(rss_kib) / 1024 )) | $(ls "/proc/$SERVER_PID/fd" | wc -l) | ${clients:-?} |"
    ((m * 60 + 60 <= SOAK)) && sleep 60
  done
  wait "$soak_pid"
  echo
  python3 - "$WORK/soak.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f'{r["requests"]} requests; statuses: {", ".join(f"{k}: {v}" for k, v in sorted(r["status_counts"].items()))}; '
      f'types: {", ".join(f"{k}: {v}" for k, v in sorted(r["error_types"].items())) or "-"}')
PY
  stop_server
fi

# --- 10: the inference threads' priority under overload ----------------------
# 10x MAX_QUEUE_DEPTH on the hndsr fast profile (bicubic without
# BENCH_WEIGHTS) at HNDSR_INFERENCE_NICE 0 (the default), 5 and 10, from
# eager clients (send again at once) and from polite ones (Retry-After
# honoured, out of step): how long a refusal takes while inference holds
# every core, and what serving refusals first costs the admitted requests.
if want priority; then
  if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
    BACKEND_ARGS=("${HNDSR_FAST[@]}")
    what="hndsr fast profile"
  else
    BACKEND_ARGS=(--backend bicubic)
    what="bicubic"
  fi
  echo
  echo "## Inference thread priority: concurrency $((10 * MAX_QUEUE_DEPTH)), $what, CPU"
  echo
  echo "Eager: ${SECONDS_PER_LEVEL} s; polite (\`--honour-retry-after --jitter\`): $((2 * SECONDS_PER_LEVEL)) s."
  echo
  echo "| HNDSR_INFERENCE_NICE | clients | requests | 503 | p50 / p90 / p99 ms (503) | 200/s | p50 ms (200) | other statuses |"
  echo "|---:|---|---:|---:|---:|---:|---:|---|"
  for nice in 0 5 10; do
    start_server "$WORK/server-nice$nice.log" --rate-limit-per-hour 0 --request-timeout-s 30 --inference-nice "$nice"
    URL="http://127.0.0.1:$PORT/v1/upscale?scale=4"
    "$LOADGEN" run --url "$URL" "${BODY[@]}" -c 2 -n 10 >/dev/null
    overload "$WORK/nice$nice"
    stop_server
    for clients in eager polite; do
      python3 - "$nice" "$clients" "$WORK/nice$nice-$clients.json" <<'PY'
import json, sys
nice, clients, r = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
c, by = r["status_counts"], r["latency_by_status"]
r5 = by.get("503") or {}
r2 = by.get("200") or {}
def ms(d, k): return f'{d[k]:.1f}' if k in d else "-"
others = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()) if k not in ("200", "503")) or "-"
print(f'| {nice} | {clients} | {r["requests"]} | {c.get("503", 0)} | {ms(r5, "p50_ms")} / {ms(r5, "p90_ms")} / {ms(r5, "p99_ms")} | '
      f'{c.get("200", 0) / r["elapsed_s"]:.2f} | {ms(r2, "p50_ms")} | {others} |')
PY
    done
  done
  BACKEND_ARGS=(--backend bicubic)
fi

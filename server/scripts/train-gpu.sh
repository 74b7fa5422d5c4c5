#!/usr/bin/env bash
# The shipped weights' training recipes on a lent CUDA machine (the `device`
# tool's H100 / H200): train.sh (`make train`: the matched weights, from
# scratch), then train-realistic.sh (`make train-realistic`: the weights for
# realistic inputs, from those), run as they are with the same step counts,
# batch and seeds as on the CPU, on the carried kit's binary and images. Writes both weights with their manifests and the training logs
# under $OUT, which comes back to the machine that sent the run. Evaluate
# them there (`hndsr-train report`, as train.sh and train-realistic.sh do).
#
# Prepare here, then carry `target/gpu-kit` (stripped binaries and the
# training images, about 60 MB):
#   make gpu-kit GPU_KIT_DATA=1
#   run: bash server/scripts/train-gpu.sh        (carry: target/gpu-kit)
#
# Knobs (environment):
#   WHAT=both             matched, realistic (from server/models/hndsr.safetensors)
#                         or both (realistic from the matched weights just trained)
#   REGRESS_STEPS=8000 DENOISE_STEPS=6000              the matched recipe (train.sh)
#   REALISTIC_STEPS=5000 REALISTIC_DENOISE_STEPS=3000  the realistic one
#   BATCH=8               crops per step (96² HR); larger batches fill the GPU
#                         better but are not the shipped recipe
#   SEED=9 REALISTIC_SEED=71
#   DEVICE=cuda
#   KIT=target/gpu-kit    the carried kit (hndsr-train, data/)
#   OUT                   where the results go ($OUT on the device machine;
#                         target/train-gpu elsewhere)
# The log prints seconds per step: on the first run, check that the whole
# fits the machine's time (at most 10 minutes a command) and adjust.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

what="${WHAT:-both}"
regress_steps="${REGRESS_STEPS:-8000}"
denoise_steps="${DENOISE_STEPS:-6000}"
realistic_steps="${REALISTIC_STEPS:-5000}"
realistic_denoise="${REALISTIC_DENOISE_STEPS:-3000}"
batch="${BATCH:-8}"
seed="${SEED:-9}"
realistic_seed="${REALISTIC_SEED:-71}"
device="${DEVICE:-cuda}"
kit="${KIT:-target/gpu-kit}"
out="${OUT:-target/train-gpu}"
case "$what" in matched | realistic | both) ;; *) echo "train-gpu: WHAT must be matched, realistic or both, got '$what'" >&2; exit 2 ;; esac
source server/scripts/recipe.sh
whole_numbers train-gpu "$regress_steps" "$denoise_steps" "$realistic_steps" "$realistic_denoise" "$batch" "$seed" "$realistic_seed"

bin="$kit/hndsr-train"
[[ -x "$bin" ]] || { echo "train-gpu: $bin missing: run 'make gpu-kit GPU_KIT_DATA=1' and carry $kit" >&2; exit 1; }
[[ -d "$kit/data" ]] || { echo "train-gpu: $kit/data missing: run 'make gpu-kit GPU_KIT_DATA=1'" >&2; exit 1; }
# On a GPU machine: the preinstalled PyTorch's libtorch, as bench-gpu.sh
# finds it (TORCH_LIB overrides).
if [[ "$device" == cuda* && -z "${TORCH_LIB:-}" ]]; then
  TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" \
    || { echo "train-gpu: no torch package to take libtorch from; set TORCH_LIB" >&2; exit 1; }
fi
export LD_LIBRARY_PATH="${TORCH_LIB:+$TORCH_LIB${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"

mkdir -p "$out"
started=$(date +%s)
# The two recipes themselves, on the kit's binary and images, no reports
# (they run where the weights come back).
export HNDSR_TRAIN_BIN="$bin" HNDSR_DATA="$kit/data" DEVICE="$device" THREADS=8 BATCH="$batch" REPORT=0
init=server/models/hndsr.safetensors
if [[ "$what" != realistic ]]; then
  REGRESS_STEPS="$regress_steps" DENOISE_STEPS="$denoise_steps" SEED="$seed" OUT="$out" \
    VERSION="gpu-$(date +%Y%m%d)" bash server/scripts/train.sh 2>&1 | tee "$out/train-matched.log"
  init="$out/hndsr-$(basename "${CONFIG:-wide}" .json).safetensors"  # train.sh's name for them
  rm -rf "$out/ckpt"
fi
if [[ "$what" != matched ]]; then
  INIT="$init" REGRESS_STEPS="$realistic_steps" DENOISE_STEPS="$realistic_denoise" \
    SEED="$realistic_seed" OUT="$out" VERSION="gpu-$(date +%Y%m%d)-realistic" \
    bash server/scripts/train-realistic.sh 2>&1 | tee "$out/train-realistic.log"
  rm -rf "$out/ckpt"
fi
echo "trained ($what) in $(( $(date +%s) - started )) s; weights in $out"

#!/usr/bin/env bash
# A short GPU training run for a lent CUDA machine (the `device` tool's
# H100 / H200): fine-tunes the shipped weights for a fixed number of steps
# and writes the weights, their manifest and the training log under $OUT,
# which comes back to the machine that sent the run. Evaluate them there:
# `hndsr-train report --weights <them> --split validation`.
#
# Prepare here, then carry `target/gpu-kit` (stripped binaries and the
# training images, about 60 MB):
#   make gpu-kit GPU_KIT_DATA=1
#   run: bash server/scripts/train-gpu.sh        (carry: target/gpu-kit)
#
# Knobs (environment):
#   STEPS=20000           optimizer steps (cosine over them); at batch 32 on an
#                         H100 this is meant to fit about 8 minutes: measure
#                         it on the first run and adjust (the log prints
#                         seconds per step)
#   BATCH=32              crops per step (96² HR)
#   LR=4e-4               peak learning rate
#   REALISTIC_FRACTION=0.5  share of crops with the realistic degradation
#   SEED=71
#   DEVICE=cuda
#   KIT=target/gpu-kit    the carried kit (hndsr-train, data/)
#   OUT                   where the results go ($OUT on the device machine;
#                         target/train-gpu elsewhere)
# The mix is the shipped weights' last stage (docs/model-log.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

steps="${STEPS:-20000}"
batch="${BATCH:-32}"
lr="${LR:-4e-4}"
realistic="${REALISTIC_FRACTION:-0.5}"
seed="${SEED:-71}"
device="${DEVICE:-cuda}"
kit="${KIT:-target/gpu-kit}"
out="${OUT:-target/train-gpu}"
mix="aero=0.3,oblique1=0.1,oblique3=0.1,yell_road=0.14,landsat=0.18,bluemarble=0.1,rgbn=0.08"

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
"$bin" --data "$kit/data" --device "$device" --threads 8 train \
  --init server/models/hndsr.safetensors --out "$out/ckpt" --steps "$steps" \
  --batch "$batch" --crop 96 --lr "$lr" --denoiser-weight 0 --mix "$mix" --gray-fraction 0.3 \
  --zoom-max 2 --zoom-fraction 0.5 --realistic-fraction "$realistic" --seed "$seed" \
  --save-every 2000 | tee "$out/train.log"
"$bin" export --checkpoint "$out/ckpt" --out "$out/hndsr-gpu.safetensors" \
  --version "gpu-$(date +%Y%m%d)-realistic$realistic" --default-steps 0 --self-ensemble true \
  --tile 24 --projection-steps 0
rm -rf "$out/ckpt"
echo "trained $steps steps in $(( $(date +%s) - started )) s; weights: $out/hndsr-gpu.safetensors"

#!/usr/bin/env bash
# Train the weights for realistic inputs (the `realistic` serving profile)
# from the shipped matched weights, export them with their manifest and
# evaluate them: `make train-realistic` (see docs/model.md).
#
# Two stages, each a fixed number of optimizer steps, like train.sh:
#   1. the regression path (μ) fine-tuned on realistic inputs only (every
#      crop's LR input blurred, noised and JPEG-compressed; the degradation
#      is drawn per crop from the run's seed);
#   2. the diffusion refiner against that final μ, from the matched weights'
#      refiner, on the same inputs (so its conditioning is never stale).
# The defaults are the recipe of the shipped realistic weights.
#
# Knobs (environment):
#   INIT=server/models/hndsr.safetensors   the matched weights to start from
#   DEVICE=cpu            cpu, cuda, cuda:N
#   THREADS=2             libtorch intra-op threads
#   REGRESS_STEPS=5000    stage 1
#   DENOISE_STEPS=3000    stage 2 (0 skips it: do not then serve steps > 0)
#   LR=5e-4               stage 1's peak learning rate
#   SEED=71               stage 1's seed (stage 2 uses SEED + 1)
#   OUT=target/train-realistic   checkpoints, exported weights, report tables
#   VERSION=0.7.0-realistic      manifest version label
#   BATCH=8               crops per step (the shipped recipe's 8)
#   REPORT=1              0 skips the report tables
#   HNDSR_TRAIN_BIN       an hndsr-train to run instead of building one (with
#                         HNDSR_DATA: a carried kit; server/scripts/train-gpu.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

source server/scripts/recipe.sh
init="${INIT:-server/models/hndsr.safetensors}"
device="${DEVICE:-cpu}"
threads="${THREADS:-2}"
regress_steps="${REGRESS_STEPS:-5000}"
denoise_steps="${DENOISE_STEPS:-3000}"
lr="${LR:-5e-4}"
seed="${SEED:-71}"
batch="${BATCH:-8}"
out="${OUT:-target/train-realistic}"
version="${VERSION:-0.7.0-realistic}"
whole_numbers train-realistic.sh "$regress_steps" "$denoise_steps" "$seed" "$batch"
[[ "$regress_steps" -gt 0 ]] || { echo "train-realistic.sh: REGRESS_STEPS must be at least 1" >&2; exit 2; }
[[ -f "$init" ]] || { echo "train-realistic.sh: INIT $init not found" >&2; exit 2; }

bin=$(recipe_bin)
rm -rf "$out/ckpt"
mkdir -p "$out"
train() { run "$bin" --threads "$threads" --device "$device" train "$@"; }
# The matched recipe's crops (recipe.sh), every LR input realistic.
crops=(--batch "$batch" "${RECIPE_CROPS[@]}" --realistic-fraction 1)
train --init "$init" --out "$out/ckpt" --steps "$regress_steps" --lr "$lr" --denoiser-weight 0 \
  "${crops[@]}" --seed "$seed" --save-every 500
if [[ "$denoise_steps" != 0 ]]; then
  train --out "$out/ckpt" --resume --freeze-regressor --restart-schedule \
    --steps "$((regress_steps + denoise_steps))" --lr 1e-3 --denoiser-weight 1 \
    "${crops[@]}" --seed "$((seed + 1))" --save-every 1000
fi
# Weights + manifest: labelled for realistic inputs, so servers pick the
# `realistic` profile and never run the projection; `quality` on them adds
# the ×8 self-ensemble on 256² tiles; the refiner at the matched weights'
# strength.
weights="$out/hndsr-realistic.safetensors"
run "$bin" export --checkpoint "$out/ckpt" --out "$weights" --version "$version" \
  --inputs realistic --default-steps 0 --self-ensemble true --tile 256 --projection-steps 0 \
  --refiner-strength 0.5
[[ "${REPORT:-1}" == 0 ]] && { echo "weights: $weights (manifest: ${weights%.safetensors}.json)"; exit 0; }
for split in validation test; do
  run "$bin" --threads "$threads" --device "$device" report --weights "$weights" --split "$split" \
    --profiles realistic --table "$out/report-$split.md"
done
echo "weights: $weights (manifest: ${weights%.safetensors}.json); tables: $out/report-*.md"

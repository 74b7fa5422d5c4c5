#!/usr/bin/env bash
# Train HNDSR from scratch, export the weights with their manifest and
# evaluate them (`hndsr-train report`): `make train` (see docs/model.md).
#
# Two stages, each a fixed number of optimizer steps (the cosine learning
# rate decays over them), so a rerun does the same work on any machine;
# only the time differs:
#   1. the regression path (μ) alone, on every training source;
#   2. the diffusion refiner alone, against that final μ, which stays
#      exactly as it is (its conditioning is never stale).
# The defaults are the recipe of the shipped weights (docs/model.md). The
# recipe of the earlier, Fourier-block weights (0.6.2: eight stages,
# ≈98,500 steps) is this script at commit fb4852a.
#
# Knobs (environment):
#   CONFIG=wide           preset (tiny, small, medium, base, wide, ...) or a
#                         JSON config file
#   DEVICE=cpu            cpu, cuda, cuda:N
#   THREADS=2             libtorch intra-op threads
#   REGRESS_STEPS=8000    stage 1
#   DENOISE_STEPS=6000    stage 2 (0 skips it: the refiner stays untrained,
#                         so do not serve steps > 0)
#   REALISTIC_FRACTION=0  share of stage 1's crops whose LR input is the
#                         realistic degradation (blur, noise, JPEG;
#                         docs/model.md); the shipped weights used none
#   SEED=9                stage 1's seed (stage 2 uses SEED + 1)
#   BATCH=8               crops per step (the shipped recipe's 8)
#   REPORT=1              0 skips the report tables
#   HNDSR_TRAIN_BIN       an hndsr-train to run instead of building one (with
#                         HNDSR_DATA: a carried kit; server/scripts/train-gpu.sh)
#   OUT=target/train      checkpoints, exported weights, report tables
#   VERSION=0.7.0         manifest version label
#   DEFAULT_STEPS=0       DDIM steps the manifest recommends to servers
#   REFINER_STRENGTH=0.5  share of the refiner's residual servers add to μ
#                         (refiner_strength; chosen on validation)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

source server/scripts/recipe.sh
config="${CONFIG:-wide}"
device="${DEVICE:-cpu}"
threads="${THREADS:-2}"
regress_steps="${REGRESS_STEPS:-8000}"
denoise_steps="${DENOISE_STEPS:-6000}"
realistic="${REALISTIC_FRACTION:-0}"
seed="${SEED:-9}"
batch="${BATCH:-8}"
out="${OUT:-target/train}"
version="${VERSION:-0.7.0}"
default_steps="${DEFAULT_STEPS:-0}"
strength="${REFINER_STRENGTH:-0.5}"
whole_numbers train.sh "$regress_steps" "$denoise_steps" "$seed" "$batch"
[[ "$regress_steps" -gt 0 ]] || { echo "train.sh: REGRESS_STEPS must be at least 1" >&2; exit 2; }

bin=$(recipe_bin)
rm -rf "$out/ckpt"
mkdir -p "$out"
train() { run "$bin" --threads "$threads" --device "$device" train "$@"; }
# 1. μ, on the recipe's crops (recipe.sh).
train --config "$config" --out "$out/ckpt" --steps "$regress_steps" --batch "$batch" --lr 1e-3 \
  --denoiser-weight 0 "${RECIPE_CROPS[@]}" --realistic-fraction "$realistic" --seed "$seed" \
  --save-every 500
# 2. The refiner against that μ, in the config's residual units and
#    schedule (the `wide` preset: per-sample units, sampling from t = 0.8).
if [[ "$denoise_steps" != 0 ]]; then
  train --out "$out/ckpt" --resume --freeze-regressor --restart-schedule \
    --steps "$((regress_steps + denoise_steps))" --batch "$batch" --lr 1e-3 --denoiser-weight 1 \
    "${RECIPE_CROPS[@]}" --seed "$((seed + 1))" --save-every 1000
fi
# 3. Weights + manifest (servers: DDIM steps $DEFAULT_STEPS, self-ensemble on,
#    24² LR tiles: the LR size of the 96² training crops, 5 steps of the
#    LR-consistency projection, the refiner strength), then the tables.
weights="$out/hndsr-$(basename "$config" .json).safetensors"
run "$bin" export --checkpoint "$out/ckpt" --out "$weights" --version "$version" \
  --default-steps "$default_steps" --self-ensemble true --tile 24 --projection-steps 5 \
  --refiner-strength "$strength"
[[ "${REPORT:-1}" == 0 ]] && { echo "weights: $weights (manifest: ${weights%.safetensors}.json)"; exit 0; }
for split in validation test; do
  run "$bin" --threads "$threads" --device "$device" report --weights "$weights" --split "$split" \
    --profiles fast --table "$out/report-$split.md"
done
if [[ "$denoise_steps" != 0 ]]; then
  run "$bin" --threads "$threads" --device "$device" report --weights "$weights" \
    --split validation --profiles fast --max-images 4 --degradations matched \
    --refiner-steps 4 --detail --table "$out/report-refiner.md"
fi
echo "weights: $weights (manifest: ${weights%.safetensors}.json); tables: $out/report-*.md"

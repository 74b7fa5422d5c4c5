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
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

init="${INIT:-server/models/hndsr.safetensors}"
device="${DEVICE:-cpu}"
threads="${THREADS:-2}"
regress_steps="${REGRESS_STEPS:-5000}"
denoise_steps="${DENOISE_STEPS:-3000}"
lr="${LR:-5e-4}"
seed="${SEED:-71}"
out="${OUT:-target/train-realistic}"
version="${VERSION:-0.7.0-realistic}"
# The matched weights' sources and augmentations (train.sh).
mix="aero=0.3,oblique1=0.1,oblique3=0.1,yell_road=0.14,landsat=0.18,bluemarble=0.1,rgbn=0.08"
for n in "$regress_steps" "$denoise_steps" "$seed"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "train-realistic.sh: step counts and SEED must be whole numbers, got '$n'" >&2; exit 2; }
done
[[ "$regress_steps" -gt 0 ]] || { echo "train-realistic.sh: REGRESS_STEPS must be at least 1" >&2; exit 2; }
[[ -f "$init" ]] || { echo "train-realistic.sh: INIT $init not found" >&2; exit 2; }

bash server/scripts/fetch-data.sh >/dev/null
cargo build --release --locked -p hndsr-train
bin=target/release/hndsr-train
run() { echo "+ $*" >&2; "$@"; }

rm -rf "$out/ckpt"
mkdir -p "$out"
train() { run "$bin" --threads "$threads" --device "$device" train "$@"; }
common=(--batch 8 --crop 96 --mix "$mix" --gray-fraction 0.3 --zoom-max 2 --zoom-fraction 0.5
  --negate-fraction 0.5 --realistic-fraction 1)
train --init "$init" --out "$out/ckpt" --steps "$regress_steps" --lr "$lr" --denoiser-weight 0 \
  "${common[@]}" --seed "$seed" --save-every 500
if [[ "$denoise_steps" != 0 ]]; then
  train --out "$out/ckpt" --resume --freeze-regressor --restart-schedule \
    --steps "$((regress_steps + denoise_steps))" --lr 1e-3 --denoiser-weight 1 \
    "${common[@]}" --seed "$((seed + 1))" --save-every 1000
fi
# Weights + manifest: labelled for realistic inputs, so servers pick the
# `realistic` profile and never run the projection; `quality` on them adds
# the ×8 self-ensemble on 256² tiles; the refiner at the matched weights'
# strength.
weights="$out/hndsr-realistic.safetensors"
run "$bin" export --checkpoint "$out/ckpt" --out "$weights" --version "$version" \
  --inputs realistic --default-steps 0 --self-ensemble true --tile 256 --projection-steps 0 \
  --refiner-strength 0.5
for split in validation test; do
  run "$bin" --threads "$threads" --device "$device" report --weights "$weights" --split "$split" \
    --profiles realistic --table "$out/report-$split.md"
done
echo "weights: $weights (manifest: ${weights%.safetensors}.json); tables: $out/report-*.md"

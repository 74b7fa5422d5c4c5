#!/usr/bin/env bash
# `make images`: builds hndsr-server, hndsr-operator, the real
# node's pause image and the weights fetcher from their Containerfiles, cached by content.
#
#   images/build.sh                  build both (skips an image whose context is unchanged)
#   images/build.sh push REGISTRY    push the built images to REGISTRY (host:port; e.g. 127.0.0.1:5000), no rebuild
#   images/build.sh names            print the local image names (server, operator, pause, fetch)
#
# The binaries must be built first (`make images` does it). Each context is
# staged under target/images/<name>: the stripped binary, for the server also
# the libtorch libraries it loads and the committed weights. The sha256 of the
# staged context, the Containerfile and the build arguments is the image's
# `io.hndsr.content-hash` label: when it matches, nothing is built.
#
# Knobs: CONTAINER_ENGINE (podman|docker), IMAGE_PREFIX (default hndsr),
# IMAGE_TAG (default the workspace version), VARIANT=cuda with
# LIBTORCH_CUDA=DIR (a CUDA libtorch's lib/) and BASE_IMAGE (a CUDA runtime
# base) for the GPU server image: not built or run on a GPU host yet.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
# shellcheck source=engine.sh
source "$here/engine.sh"

die() { echo "images: error: $*" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
[[ -n "$version" ]] || die "no workspace version in Cargo.toml"
prefix="${IMAGE_PREFIX:-hndsr}"
tag="${IMAGE_TAG:-$version}"
variant="${VARIANT:-cpu}"
base="${BASE_IMAGE:-debian:bookworm-slim}"
server_image="$prefix/hndsr-server:$tag"
[[ "$variant" == cpu ]] || server_image="$prefix/hndsr-server:$tag-$variant"
operator_image="$prefix/hndsr-operator:$tag"
# The real node's pod sandbox and the weights fetcher; versioned by their
# sources, not the workspace.
pause_image="$prefix/pause:1"
fetch_image="$prefix/fetch:1"

if [[ "${1:-}" == names ]]; then
    echo "$server_image"
    echo "$operator_image"
    echo "$pause_image"
    echo "$fetch_image"
    exit 0
fi

# push REGISTRY: the images as built, no rebuild (`make images` builds them).
push() {
    local registry="$1" image remote tls=()
    [[ "$CONTAINER_ENGINE" == podman && "$registry" == 127.0.0.1:* ]] && tls=(--tls-verify=false)
    for image in "$server_image" "$operator_image" "$pause_image" "$fetch_image"; do
        engine image inspect "$image" >/dev/null 2>&1 || die "$image not built: run 'make images'"
        remote="$registry/$image"
        engine tag "$image" "$remote"
        engine push -q ${tls[@]+"${tls[@]}"} "$remote" >/dev/null || die "pushing $remote failed"
        # Only the tag goes: the local name keeps the image.
        engine untag "$remote" "$remote" >/dev/null 2>&1 || true
        echo "pushed $remote"
    done
}

if [[ "${1:-}" == push ]]; then
    push "${2:?usage: images/build.sh push REGISTRY}"
    exit 0
fi

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || revision="$revision-dirty"
# The image ships both committed weights (hndsr_contract::bundled): the
# default ones (matched inputs) and those for realistic inputs.
weights=server/models/hndsr.safetensors
manifest="${weights%.safetensors}.json"
realistic=server/models/hndsr-realistic.safetensors
for f in "$weights" "$manifest" "$realistic" "${realistic%.safetensors}.json"; do
    [[ -f "$f" ]] || die "$f missing (committed weights; see docs/model.md)"
done
weights_sha256="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$manifest")"

for bin in hndsr-server hndsr-operator; do
    [[ -x "target/release/$bin" ]] || die "target/release/$bin missing: run 'make images' (it builds the release binaries first)"
done

stage_server() {
    local ctx=target/images/server lib
    rm -rf "$ctx" && mkdir -p "$ctx/libtorch" "$ctx/models"
    strip -o "$ctx/hndsr-server" target/release/hndsr-server
    if [[ "$variant" == cpu ]]; then
        # Every library the binary loads from outside the base system: libtorch,
        # its OpenMP and the CUDA runtime stubs the CPU wheel links.
        while read -r lib; do
            cp -L "$lib" "$ctx/libtorch/"
        done < <(ldd target/release/hndsr-server | awk '/=> \// {print $3}' | grep -v -e '^/lib/' -e '^/usr/lib/')
        [[ -f "$ctx/libtorch/libtorch_cpu.so" ]] || die "ldd found no libtorch_cpu.so for target/release/hndsr-server (run 'make libtorch')"
    else
        [[ -d "${LIBTORCH_CUDA:-}" ]] || die "VARIANT=$variant needs LIBTORCH_CUDA=<a CUDA libtorch's lib directory>"
        cp -L "$LIBTORCH_CUDA"/*.so* "$ctx/libtorch/"
    fi
    cp "$weights" "$manifest" "$realistic" "${realistic%.safetensors}.json" "$ctx/models/"
    cp server/Containerfile "$ctx/Containerfile"
}

stage_operator() {
    local ctx=target/images/operator
    rm -rf "$ctx" && mkdir -p "$ctx"
    strip -o "$ctx/hndsr-operator" target/release/hndsr-operator
    cp operator/Containerfile "$ctx/Containerfile"
}

stage_pause() {
    local ctx=target/images/pause
    rm -rf "$ctx" && mkdir -p "$ctx"
    command -v gcc >/dev/null || die "gcc not found (the pause image's binary is compiled here): apt-get install -y gcc libc6-dev"
    gcc -static -O2 -s -o "$ctx/pause" images/pause/pause.c || die "compiling images/pause/pause.c failed (static glibc: apt-get install -y libc6-dev)"
    cp images/pause/Containerfile "$ctx/Containerfile"
}

stage_fetch() {
    local ctx=target/images/fetch
    rm -rf "$ctx" && mkdir -p "$ctx"
    [[ -x /bin/busybox ]] || die "/bin/busybox not found (the fetch image's wget): apt-get install -y busybox-static"
    cp /bin/busybox "$ctx/busybox"
    cp images/fetch/Containerfile "$ctx/Containerfile"
}

# content_hash CTX ARGS...: the files' names, modes and bytes, and the build args.
content_hash() {
    local ctx="$1"
    shift
    {
        (cd "$ctx" && find . -type f -printf '%p %m\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 cat)
        printf '%s\n' "$@"
    } | sha256sum | cut -c1-64
}

# build IMAGE CTX BUILD-ARGS...
build() {
    local image="$1" ctx="$2" hash have
    shift 2
    local args=(--build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" --build-arg "SOURCE=https://github.com/hndsr/hndsr" "$@")
    hash="$(content_hash "$ctx" "${args[@]}")"
    have="$(engine image inspect --format '{{ index .Config.Labels "io.hndsr.content-hash" }}' "$image" 2>/dev/null || true)"
    if [[ "$have" == "$hash" ]]; then
        echo "up to date: $image"
        return
    fi
    echo "building $image ..."
    # The revision and date stay out of the hash: a new commit that changes
    # nothing in the image does not rebuild it.
    # --network=none: no RUN step needs one, and podman would set up (and
    # leave) its netavark firewall chains on the host.
    engine build --pull=never --layers=false --network=none ${ENGINE_RUN_ARGS[@]+"${ENGINE_RUN_ARGS[@]}"} \
        "${args[@]}" --build-arg "REVISION=$revision" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --label "io.hndsr.content-hash=$hash" -t "$image" -f "$ctx/Containerfile" "$ctx" >"$ctx.build.log" 2>&1 ||
        { tail -30 "$ctx.build.log" >&2; die "building $image failed (log: $ctx.build.log)"; }
    # The image this one replaced, now untagged, would pile up in the cache.
    engine image prune -f >/dev/null 2>&1 || true
    echo "built $image"
}

if [[ "$base" == debian:bookworm-slim ]]; then
    # Never pulled here (`podman pull debian:bookworm-slim` first where the
    # machine can): when absent, it is made from Debian packages.
    engine image inspect "$base" >/dev/null 2>&1 ||
        bash "$here/base-image.sh" "$CONTAINER_ENGINE" ${ENGINE_ARGS[@]+"${ENGINE_ARGS[@]}"}
fi

stage_server
build "$server_image" target/images/server --build-arg "VARIANT=$variant" --build-arg "WEIGHTS_SHA256=$weights_sha256"
stage_operator
build "$operator_image" target/images/operator
stage_pause
build "$pause_image" target/images/pause
stage_fetch
build "$fetch_image" target/images/fetch

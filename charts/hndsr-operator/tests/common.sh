# Sourced by the chart's check scripts: where things are, failing loudly,
# and the pinned programs from the e2e binary cache (`make e2e-binaries`;
# $HNDSR_E2E_BIN_DIR, default ~/.cache/hndsr/e2e-bin), at the versions
# e2e/scripts/build-binaries.sh pins. The sourcing script sets `script`.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
chart="$(dirname "$here")"
repo="$(cd "$chart/../.." && pwd)"
bin_root="${HNDSR_E2E_BIN_DIR:-$HOME/.cache/hndsr/e2e-bin}"

die() {
    echo "$script: error: $*" >&2
    exit 1
}

# pinned_binary VERSION_VARIABLE DIRECTORY_PREFIX BINARY: the binary's path,
# failing with the build command when it has not been built.
pinned_binary() {
    local version path
    version="$(sed -n "s/^$1=\([^ ]*\).*/\1/p" "$repo/e2e/scripts/build-binaries.sh")"
    [ -n "$version" ] || die "no $1 in e2e/scripts/build-binaries.sh"
    path="$bin_root/$2-$version/$3"
    [ -x "$path" ] || die "$path not found; run 'make e2e-binaries' (builds it into $bin_root)"
    echo "$path"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

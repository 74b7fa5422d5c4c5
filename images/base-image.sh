#!/usr/bin/env bash
# Makes the base image the Containerfiles name (`debian:bookworm-slim`) from
# Debian packages, for machines that cannot pull it: debootstrap's minbase
# variant, trimmed the way the official slim image is, imported under that
# tag. A machine that can pull never needs this script.
#
# The package mirror is read from this machine's apt configuration at run
# time, never written into the repository. The root filesystem is cached as a
# tarball under $HNDSR_CACHE/images (keyed by suite and this script's hash), so
# a warm run only imports it.
#
# Usage: images/base-image.sh ENGINE-COMMAND...   (e.g. `podman --root ...`)
set -euo pipefail

SUITE=bookworm
TAG="debian:${SUITE}-slim"

die() { echo "base-image: error: $*" >&2; exit 1; }
[[ $# -ge 1 ]] || die "usage: base-image.sh ENGINE-COMMAND..."
engine=("$@")

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${HNDSR_CACHE:-$HOME/.cache/hndsr}/images"
key="$(sha256sum "$here/base-image.sh" | cut -c1-12)"
tarball="$cache/debian-${SUITE}-minbase-${key}.tar"

if "${engine[@]}" image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi

# The first deb URI of the machine's apt sources (deb822 or one-line format).
apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        uri="$(awk '/^URIs:/ {print $2; exit}' "$f")"
        [[ -n "$uri" && "$uri" != *security* ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
        [[ -n "$uri" ]] && { echo "$uri"; return; }
    done
}

if [[ ! -f "$tarball" ]]; then
    command -v debootstrap >/dev/null ||
        die "debootstrap not found; install it with: apt-get install -y debootstrap (or pull $TAG where you can)"
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
    mirror="$(apt_mirror)"
    [[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"
    mkdir -p "$cache"
    rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs" "$tarball.partial"' EXIT
    echo "base-image: debootstrap --variant=minbase $SUITE (once, about a minute)" >&2
    debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
        { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    # What the slim image leaves out, and what a build machine leaves behind.
    rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/run/*
    # Not this machine's mirror: an image built from this base installs
    # nothing at run time, and a user's own sources belong in their image.
    rm -f "$rootfs/etc/apt/sources.list" "$rootfs"/etc/apt/sources.list.d/*
    : >"$rootfs/etc/hostname"
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
fi

"${engine[@]}" import --change 'CMD ["bash"]' "$tarball" "$TAG" >/dev/null 2>&1 ||
    die "importing $tarball as $TAG failed"
echo "base-image: $TAG imported from $tarball" >&2

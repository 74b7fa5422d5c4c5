#!/usr/bin/env bash
# The Debian packages the images and the real node need: podman + runc build
# and run images without a daemon, debootstrap makes their base, containerd +
# runc + the CNI plugins + iptables + conntrack run the node's pods, static
# busybox is the weights fetcher image's wget, redis-server and git serve
# Argo CD's repo server and application controller. Installs
# what is missing (as root, from the machine's apt sources); without root it
# fails with the command to run.
set -euo pipefail

declare -A probe=(
    [podman]=podman [runc]=runc [debootstrap]=debootstrap [containerd]=containerd
    [containernetworking-plugins]=/usr/lib/cni/bridge [iptables]=iptables [conntrack]=conntrack
    [iproute2]=ip [util-linux]=setpriv [gcc]=gcc [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
    [busybox-static]=/bin/busybox [redis-server]=/usr/bin/redis-server [git]=git
)
missing=()
for pkg in "${!probe[@]}"; do
    p="${probe[$pkg]}"
    if [[ "$p" == /* ]]; then [[ -e "$p" ]] || missing+=("$pkg"); else command -v "$p" >/dev/null || missing+=("$pkg"); fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
IFS=$'\n' missing=($(sort <<<"${missing[*]}")); unset IFS
if [[ "$(id -u)" != 0 ]]; then
    echo "host-packages: error: missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "host-packages: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
    { echo "host-packages: error: apt-get install ${missing[*]} failed" >&2; exit 1; }

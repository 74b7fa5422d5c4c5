#!/usr/bin/env bash
# Installs a cargo tool at a pinned version into a version-keyed cache and
# prints the binary's path: `install-tool.sh cargo-deny 0.18.3`.
set -euo pipefail
name="$1" version="$2"
root="${HNDSR_CACHE:-$HOME/.cache/hndsr}/tools/${name}-${version}"
if [[ ! -x "$root/bin/$name" ]]; then
  echo "install-tool: building $name $version into $root (once)" >&2
  cargo install --quiet --locked --root "$root.partial" "$name@$version" >&2
  rm -rf "$root"; mv "$root.partial" "$root"
fi
echo "$root/bin/$name"

# Sourced by the image scripts: `engine` runs the container engine.
#
# CONTAINER_ENGINE=docker uses Docker as it is configured. With podman (the
# default) the storage lives under $HNDSR_CACHE/containers, not in the
# machine's /var/lib/containers, and the runtime is runc: crun refuses hosts
# whose cgroups are in hybrid (v1) mode, and this works on v2 too. The
# explicit ulimits stay under what a VM's hard limits allow.
HNDSR_CACHE="${HNDSR_CACHE:-$HOME/.cache/hndsr}"
CONTAINER_ENGINE="${CONTAINER_ENGINE:-podman}"

engine_die() { echo "images: error: $*" >&2; exit 1; }

case "$CONTAINER_ENGINE" in
podman)
    command -v podman >/dev/null ||
        engine_die "podman not found; install it with: apt-get install -y podman runc"
    command -v runc >/dev/null ||
        engine_die "runc not found; install it with: apt-get install -y runc"
    ENGINE_ARGS=(
        --root "$HNDSR_CACHE/containers/storage"
        --runroot "${HNDSR_PODMAN_RUNROOT:-/run/hndsr-podman}"
        --storage-driver "${HNDSR_STORAGE_DRIVER:-overlay}"
        --runtime runc
        --cgroup-manager cgroupfs
        --events-backend file
    )
    ENGINE_RUN_ARGS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
    ;;
docker)
    command -v docker >/dev/null || engine_die "docker not found"
    ENGINE_ARGS=()
    ENGINE_RUN_ARGS=()
    ;;
*) engine_die "CONTAINER_ENGINE must be podman or docker, not '$CONTAINER_ENGINE'" ;;
esac

engine() { "$CONTAINER_ENGINE" "${ENGINE_ARGS[@]}" "$@"; }

# Run directly (`bash images/engine.sh run ...`): the engine with these settings.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    engine "$@"
fi

#!/usr/bin/env bash
# The host side of the e2e harness's real node (kubelet + containerd + runc +
# CNI bridge + kube-proxy): what it checks before, and everything it undoes
# after. The harness (e2e/src/node.rs) runs:
#
#   node-host.sh janitor     take the node lock (waiting while an earlier
#                            janitor still sweeps), `prepare`, print "ready";
#                            then wait, and on SIGTERM (the harness's stop, or
#                            its parent-death signal when it is killed) `sweep`
#                            and exit, releasing the lock
#   node-host.sh sweep       by hand, when no janitor runs: undo everything
#
# prepare: check the prerequisites, sweep leftovers of a killed run, save the
# sysctls the node changes. sweep: processes (containerd's shims and the
# containers outlive containerd), mounts, network namespaces, the bridge,
# iptables chains (v4, v6), cgroups, state directories, sysctls.
#
# One real node per machine: its paths are fixed so that a sweep finds what a
# killed run left, and the lock keeps a sweep from racing the next node.
set -uo pipefail

NODE_ROOT=/var/lib/hndsr-node
NODE_RUN=/run/hndsr-node
BRIDGE=hndsr0
SYSCTL_SAVE=/run/hndsr-node.sysctl
LOCK=/run/hndsr-node.lock
# What kubelet, kube-proxy and the CNI bridge plugin set on the host.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory net.ipv4.ip_forward
    net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)

die() { echo "node-host: error: $*" >&2; exit 1; }

prepare() {
    [[ "$(id -u)" == 0 ]] || die "the real node needs root (kubelet, containerd, iptables)"
    local missing=()
    for c in containerd containerd-shim-runc-v2 runc iptables ip6tables iptables-restore ip conntrack setpriv flock; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback && -x /usr/lib/cni/portmap ]] ||
        missing+=("/usr/lib/cni/{bridge,host-local,loopback,portmap}")
    if [[ ${#missing[@]} -gt 0 ]]; then
        die "missing ${missing[*]}; install with: apt-get install -y containerd runc iptables iproute2 conntrack containernetworking-plugins"
    fi
    sweep
    local s v
    : >"$SYSCTL_SAVE.partial"
    for s in "${SYSCTLS[@]}"; do
        v="$(sysctl -n "$s" 2>/dev/null)" && echo "$s=$v" >>"$SYSCTL_SAVE.partial"
    done
    [[ -d /var/lib/kubelet ]] && echo "#kubelet-dir-existed" >>"$SYSCTL_SAVE.partial"
    mv "$SYSCTL_SAVE.partial" "$SYSCTL_SAVE"
    mkdir -p "$NODE_ROOT" "$NODE_RUN"
}

kill_node_processes() {
    local pid cmd
    # containerd's shims daemonize (they outlive containerd by design); the
    # node's own programs normally die with the harness already.
    for pid in $(pgrep -f "$NODE_RUN|$NODE_ROOT" 2>/dev/null); do
        [[ "$pid" == "$$" || "$pid" == "$PPID" ]] && continue
        cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
        [[ "$cmd" == *node-host.sh* ]] && continue
        kill -KILL "$pid" 2>/dev/null
    done
}

# Every process in the kubepods cgroups (the containers), then the cgroups.
sweep_cgroups() {
    local d pid
    for d in /sys/fs/cgroup/*/kubepods* /sys/fs/cgroup/kubepods*; do
        [[ -d "$d" ]] || continue
        for pid in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null
        done
    done
    sleep 0.2
    for d in /sys/fs/cgroup/*/kubepods* /sys/fs/cgroup/kubepods*; do
        [[ -d "$d" ]] || continue
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
}

sweep_mounts() {
    local m
    # Deepest first; lazily, a mount held by a dying process goes when it does.
    awk '{print $2}' /proc/mounts | grep -E "^($NODE_ROOT|$NODE_RUN|/run/netns/cni-|/var/run/netns/cni-)" |
        sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -f /run/netns/cni-* 2>/dev/null
    # containerd bind-mounts /run/netns onto itself; undo that once no netns is left.
    if grep -q ' /run/netns ' /proc/mounts && [[ -z "$(ls -A /run/netns 2>/dev/null)" ]]; then
        umount /run/netns 2>/dev/null
    fi
}

# Rules that jump to KUBE-*/CNI-* chains, then those chains, in every table.
# Through iptables-restore --noflush: it parses the quoted comments that
# `iptables -S` prints, and applies each table at once.
sweep_iptables() {
    local ipt table rules
    for ipt in iptables ip6tables; do
        command -v "$ipt" >/dev/null || continue
        for table in filter nat mangle; do
            rules="$("$ipt" -t "$table" -S 2>/dev/null)" || continue
            {
                echo "*$table"
                grep -E -- '-j (KUBE|CNI)-' <<<"$rules" | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ' | sed 's/^-A /-D /'
                awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print "-F " $2}' <<<"$rules"
                awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print "-X " $2}' <<<"$rules"
                echo COMMIT
            } | "${ipt}-restore" --noflush 2>/dev/null ||
                echo "node-host: warning: could not remove every KUBE-/CNI- rule of $ipt -t $table" >&2
        done
    done
}

restore_sysctls() {
    [[ -f "$SYSCTL_SAVE" ]] || return 0
    local line
    while read -r line; do
        [[ "$line" == "#"* ]] && continue
        sysctl -q -w "$line" >/dev/null 2>&1
    done <"$SYSCTL_SAVE"
    grep -q '^#kubelet-dir-existed' "$SYSCTL_SAVE" || rm -rf /var/lib/kubelet
    rm -f "$SYSCTL_SAVE"
}

sweep() {
    kill_node_processes
    sweep_cgroups
    sweep_mounts
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    sweep_iptables
    rm -rf "$NODE_RUN" "$NODE_ROOT" /var/lib/cni/networks/hndsr 2>/dev/null
    restore_sysctls
    return 0
}

lock() {
    exec 9>"$LOCK"
    flock -w "$1" 9 || die "another real node runs on this machine (lock $LOCK held by pid(s) $(fuser "$LOCK" 2>/dev/null))"
}

janitor() {
    trap 'sweep; exit 0' TERM INT HUP
    lock 120
    prepare
    echo "node-host: janitor ready"
    while :; do sleep 1; done
}

case "${1:-}" in
sweep) lock 0 && sweep ;;
janitor) janitor ;;
*) die "usage: node-host.sh janitor|sweep" ;;
esac

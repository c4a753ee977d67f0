#!/usr/bin/env bash
# Install the system packages that virtq's tests and benchmarks run against:
#
#   qemu-storage-daemon   (qemu-system-common)  vhost-user-blk backend
#   dpdk-testpmd          (dpdk-dev)            vhost-user-net backend and the
#                                               C virtio-user frontend baseline
#   net_vhost / net_virtio_user PMDs, ring mempool driver
#                         (librte-net-vhost23, librte-net-virtio23,
#                          librte-mempool-ring23: Recommends only, so named here)
#   qemu-system-x86_64    (qemu-system-x86)     VFIO guest harness
#   busybox (static)      (busybox-static)      VFIO guest initramfs
#   qemu-img              (qemu-utils)          disk images
#   cc                    (gcc)                 the memory-barrier litmus test
#   aarch64-linux-gnu-gcc (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: a
#                          Recommends only, so named here) and
#   qemu-aarch64-static   (qemu-user-static)    run virtq's aarch64 barrier
#                                               stubs under user emulation
#   vhost-blk example     (dpdk-doc: its source; libdpdk-dev, pkg-config,
#                          make, gcc: its build)  DPDK's packed-ring-only
#                                               vhost-user-blk back-end, built
#                                               by scripts/build-dpdk-vhost-blk.sh
#                                               into .cache/ when missing
#
# Idempotent and non-interactive: when everything is present it does nothing
# but a few `command -v` / file checks.  As root it also makes sure a few
# 2 MiB hugepages are reserved and hugetlbfs is mounted (best effort: only
# a warning when the kernel or sandbox refuses).
#
# Exit status: 0 when everything is present afterwards; 1 when something is
# missing and we are not root (or the install failed).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

HUGEPAGES_WANT=${VIRTQ_HUGEPAGES:-16}

log() { echo "install-system-deps: $*" >&2; }

is_root() { [ "${EUID:-$(id -u)}" -eq 0 ]; }

# ---------------------------------------------------------------- checks
# Each entry: "package|check" where check is `cmd:NAME`, `file:PATH`, `static:NAME`
# (a command that must be statically linked) or `glob:PATTERN` (a file).
REQS=(
    "qemu-system-common|cmd:qemu-storage-daemon"
    "qemu-system-x86|cmd:qemu-system-x86_64"
    "qemu-utils|cmd:qemu-img"
    "busybox-static|static:busybox"
    "dpdk-dev|cmd:dpdk-testpmd"
    "librte-net-vhost23|glob:/usr/lib/*/dpdk/pmds-*/librte_net_vhost.so*"
    "librte-net-virtio23|glob:/usr/lib/*/dpdk/pmds-*/librte_net_virtio.so*"
    "librte-mempool-ring23|glob:/usr/lib/*/dpdk/pmds-*/librte_mempool_ring.so*"
    "python3|file:/usr/bin/python3"
    "gcc|cmd:cc"
    "gcc-aarch64-linux-gnu|cmd:aarch64-linux-gnu-gcc"
    "libc6-dev-arm64-cross|file:/usr/aarch64-linux-gnu/lib/libc.a"
    "qemu-user-static|cmd:qemu-aarch64-static"
    "dpdk-doc|file:/usr/share/dpdk/examples/vhost_blk/Makefile"
    "libdpdk-dev|glob:/usr/lib/*/pkgconfig/libdpdk.pc"
    "pkg-config|cmd:pkg-config"
    "make|cmd:make"
)

present() {
    local check=$1 kind=${1%%:*} what=${1#*:} p
    case $kind in
        cmd) command -v "$what" >/dev/null 2>&1 ;;
        static)
            p=$(command -v "$what" 2>/dev/null) || return 1
            # ldd fails ("not a dynamic executable") on a static binary
            ! ldd "$p" >/dev/null 2>&1 ;;
        file) [ -e "$what" ] ;;
        glob)
            # shellcheck disable=SC2206
            local m=($what)
            [ -e "${m[0]}" ] ;;
        *) log "bad check $check"; return 1 ;;
    esac
}

missing_pkgs() {
    local r
    for r in "${REQS[@]}"; do
        present "${r#*|}" || echo "${r%%|*}"
    done
}

# ---------------------------------------------------------------- install
mapfile -t MISSING < <(missing_pkgs)
if [ "${#MISSING[@]}" -gt 0 ]; then
    if ! is_root; then
        log "missing: ${MISSING[*]}"
        log "run as root (or: sudo apt-get install -y --no-install-recommends ${MISSING[*]})"
        exit 1
    fi
    log "installing: ${MISSING[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${MISSING[@]}" >/dev/null
    mapfile -t STILL < <(missing_pkgs)
    if [ "${#STILL[@]}" -gt 0 ]; then
        log "still missing after install: ${STILL[*]}"
        exit 1
    fi
    log "installed"
fi

# ---------------------------------------------------------------- DPDK vhost_blk
# Built from source (Debian ships it only as an example); needs no root.
"$(dirname "$0")/build-dpdk-vhost-blk.sh"

# ---------------------------------------------------------------- hugepages
# Optional: the vhost-user backends and DPDK --no-huge work without them, but
# hugepage-backed tests/benchmarks need a few.  Never fatal.
if is_root && [ -r /proc/sys/vm/nr_hugepages ]; then
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
    total=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
    if [ "${free:-0}" -lt "$HUGEPAGES_WANT" ]; then
        want=$((total + HUGEPAGES_WANT - ${free:-0}))
        if ! { echo "$want" > /proc/sys/vm/nr_hugepages; } 2>/dev/null; then
            log "warning: could not set vm.nr_hugepages=$want (continuing without hugepages)"
        else
            free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
            [ "${free:-0}" -ge "$HUGEPAGES_WANT" ] ||
                log "warning: asked for $want hugepages, only ${free:-0} free"
        fi
    fi
    if ! awk '$3 == "hugetlbfs" {found=1} END {exit !found}' /proc/mounts 2>/dev/null; then
        mkdir -p /dev/hugepages 2>/dev/null || true
        mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages 2>/dev/null ||
            log "warning: could not mount hugetlbfs at /dev/hugepages"
    fi
fi
exit 0

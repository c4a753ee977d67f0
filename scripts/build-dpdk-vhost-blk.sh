#!/usr/bin/env bash
# Build DPDK's vhost_blk example (Debian's dpdk-doc ships its source under
# /usr/share/dpdk/examples/vhost_blk) into .cache/dpdk-vhost-blk/vhost-blk.
#
# It is the one packed-ring-only vhost-user back-end on this platform (see
# virtq.testing.runners.DpdkVhostBlk).  Idempotent: it rebuilds only when the
# binary is missing or was built from another dpdk-doc version (the stamp file
# beside it), so a second run costs one dpkg-query.  Needs no root; needs
# dpdk-doc, libdpdk-dev, pkg-config, make and a C compiler
# (scripts/install-system-deps.sh installs them, then calls this).
#
# VIRTQ_CACHE_DIR overrides the cache directory (default: <repo>/.cache).
set -euo pipefail

SRC=/usr/share/dpdk/examples/vhost_blk
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${VIRTQ_CACHE_DIR:-$ROOT/.cache}/dpdk-vhost-blk
BIN=$OUT/vhost-blk
STAMP=$OUT/dpdk-doc.version

log() { echo "build-dpdk-vhost-blk: $*" >&2; }

if [ ! -f "$SRC/Makefile" ]; then
    log "missing $SRC (install the Debian package dpdk-doc)"
    exit 1
fi
version=$(dpkg-query -W -f='${Version}' dpdk-doc 2>/dev/null || echo unknown)
if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$version" ]; then
    exit 0
fi

log "building $SRC (dpdk-doc $version)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The source directory belongs to the package (root-owned, read-only for us):
# build a copy.  The example's Makefile uses pkg-config libdpdk and writes
# build/vhost-blk-shared.
cp -r "$SRC" "$work/src"
make -s -C "$work/src" shared >"$work/make.log" 2>&1 || {
    cat "$work/make.log" >&2
    log "make failed"
    exit 1
}
mkdir -p "$OUT"
install -m 0755 "$work/src/build/vhost-blk-shared" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
echo "$version" >"$STAMP"
log "built $BIN"

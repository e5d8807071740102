#!/bin/sh
# Post-copy live migration of a real, unmodified QEMU 7.2 guest with this engine,
# source and destination on this machine (see README.md, "Run it").
#
#   examples/qemu/run.sh [--hugetlbfs] [--mem MiB] [--json-out FILE]
#
# 1. builds the tiny guest (build-guest.sh) into $GUEST_DIR unless it is up to date
# 2. boots the source under TCG on a share=on RAM file (/dev/shm, or hugetlbfs
#    with --hugetlbfs: reserves 2 MiB pages and mounts as needed, undone after)
# 3. waits for FILLED, makes a CA and the agents' certificates in its work
#    directory, starts `migrate dest` (mutual TLS), then the destination QEMU
#    with the shim, then `migrate source --qmp` (mutual TLS); triggers the
#    verify on the destination's serial console as soon as the destination
#    guest runs
# Exit 0 only when the destination guest printed VERIFY OK; the last line repeats it.
# Needs root (userfaultfd on another process's memory, huge pages, mount), and
# qemu-system-x86, linux-image-amd64, busybox-static, cpio, gcc.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
GUEST_DIR=${GUEST_DIR:-${TMPDIR:-/tmp}/migrate-qemu-guest}

command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 2; }
"$PY" -m migrate shim-path >/dev/null || { echo "run.sh: the shim is not built: pip install -e . in $ROOT" >&2; exit 2; }

if [ ! -f "$GUEST_DIR/initramfs.cpio.gz" ] || [ ! -f "$GUEST_DIR/vmlinuz" ] \
   || [ "$HERE/guest/memfill.c" -nt "$GUEST_DIR/initramfs.cpio.gz" ] \
   || [ "$HERE/build-guest.sh" -nt "$GUEST_DIR/initramfs.cpio.gz" ]; then
    "$HERE/build-guest.sh" "$GUEST_DIR"
fi

exec "$PY" "$HERE/migrate_qemu.py" --guest "$GUEST_DIR" "$@"

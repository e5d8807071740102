#!/bin/sh
# Baseline benchmark: QEMU 7.2's own post-copy between two local QEMUs (TCG,
# private RAM), see postcopy_baseline.py for the steps and options.
#
#   examples/qemu/qemu-postcopy-baseline.sh [GUESTDIR] [postcopy_baseline.py options]
#
# GUESTDIR (default /tmp/migrate-qemu-guest) is built with build-guest.sh if missing.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
GUEST=${1:-/tmp/migrate-qemu-guest}
[ $# -gt 0 ] && shift
if [ ! -f "$GUEST/initramfs.cpio.gz" ] || [ ! -f "$GUEST/vmlinuz" ]; then
    "$HERE/build-guest.sh" "$GUEST"
fi
exec "$PY" "$HERE/postcopy_baseline.py" --guest "$GUEST" "$@"

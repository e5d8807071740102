#!/bin/sh
# Build the example guest for the QEMU migration examples.
#
#   examples/qemu/build-guest.sh OUTDIR
#
# Produces
#   OUTDIR/memfill            static guest workload (guest/memfill.c)
#   OUTDIR/initramfs.cpio.gz  busybox-static + /init that runs memfill
#   OUTDIR/vmlinuz            copy of the Debian kernel (/boot/vmlinuz-*)
#
# Needs: gcc (static libc), busybox-static, cpio, gzip, linux-image-amd64.
# Guest kernel command line knobs read by /init:
#   memfill_mb=N       size of the buffer memfill fills (default MemAvailable-48MiB)
#   memfill_reserve=N  MiB left to the guest when memfill_mb is not given
#   memfill_write=N    memfill's writer: N pages written every tick (default 0: none)
#   memfill_tick=MS    the writer's tick (default 100 ms)
set -eu

OUT=${1:?usage: build-guest.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || { echo "build-guest: busybox not found (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build-guest: $BUSYBOX is dynamically linked; install busybox-static" >&2; exit 1
fi

KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$KERNEL" ] || { echo "build-guest: no /boot/vmlinuz-* (apt-get install linux-image-amd64)" >&2; exit 1; }

gcc -static -O2 -Wall -o "$OUT/memfill" "$HERE/guest/memfill.c"

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/bin" "$ROOT/sbin" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/tmp" "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
cp "$OUT/memfill" "$ROOT/bin/memfill"
# console node so the kernel can open it before devtmpfs is mounted
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true

cat > "$ROOT/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
args=""
for kv in $(cat /proc/cmdline); do
    case "$kv" in
        memfill_mb=*) args="$args -m ${kv#memfill_mb=}" ;;
        memfill_reserve=*) args="$args -r ${kv#memfill_reserve=}" ;;
        memfill_write=*) args="$args -w ${kv#memfill_write=}" ;;
        memfill_tick=*) args="$args -t ${kv#memfill_tick=}" ;;
    esac
done
echo "INIT READY"
/bin/memfill $args </dev/ttyS0 >/dev/ttyS0 2>&1
echo "memfill exited with $?" >/dev/ttyS0
while :; do sleep 3600; done
INIT
chmod 755 "$ROOT/init"

(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initramfs.cpio.gz"
cp "$KERNEL" "$OUT/vmlinuz"
echo "build-guest: $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB), kernel $KERNEL -> $OUT/vmlinuz"

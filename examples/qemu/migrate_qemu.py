#!/usr/bin/env python3
"""Post-copy migration of a real QEMU guest with this engine, on one machine.

    examples/qemu/migrate_qemu.py --guest GUESTDIR [--mem 512] [--hugetlbfs] [--json-out FILE]

(run.sh builds the guest and calls this.) The steps, each logged with its
command line, are migrate.qemu.localrun.run's: boot the source QEMU on a
share=on RAM file, start `migrate dest --qmp`, the destination QEMU under the
shim, `migrate source --qmp`, and have the destination guest check every page.

Exit status 0 only when the destination guest printed VERIFY OK; the last line
of output repeats the guest's VERIFY line. --json-out writes every measurement.
"""
import argparse
import json
import sys

from migrate.qemu.localrun import run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True, help="directory made by build-guest.sh")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    ap.add_argument("--hugetlbfs", action="store_true", help="RAM on a hugetlbfs mount (2 MiB pages)")
    ap.add_argument("--json-out", help="write the measurements here")
    a = ap.parse_args()
    try:
        res = run(a.guest, a.mem, a.hugetlbfs)
    except Exception as e:  # noqa: BLE001 - the last line says what failed
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        return 1
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)
    keys = ["backing", "mem_mb", "pages", "downtime_ms", "total_ms", "guest_verify_ms", "guest_verify_wall_ms",
            "src_status_at_dst_running", "src_resumed", "src_status_after", "dst_status_after"]
    print(json.dumps({k: res.get(k) for k in keys}), flush=True)
    for e in res.get("errors", []):
        print(f"error: {e}", flush=True)
    ok = (res["verify"] or "").startswith("VERIFY OK") and not res.get("errors")
    print(res["verify"] or "VERIFY missing: the destination guest printed no VERIFY line", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

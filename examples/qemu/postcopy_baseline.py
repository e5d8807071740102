#!/usr/bin/env python3
"""Baseline: QEMU's own post-copy between two local QEMUs (private RAM).

    examples/qemu/postcopy_baseline.py --guest GUESTDIR [--mem 512] [--precopy-s 0]
                                       [--verify-when postcopy|after] [--preempt]

1. boot the source (plain private RAM, -m), wait for memfill's "FILLED <pages>"
2. start the destination with -incoming defer; capabilities postcopy-ram on both,
   postcopy-blocktime on the destination (optionally postcopy-preempt on both)
3. destination: migrate-incoming tcp:127.0.0.1:PORT;
   source: migrate tcp:127.0.0.1:PORT, then migrate-start-postcopy
   (right away, or after --precopy-s seconds of pre-copy)
4. as soon as the destination runs (postcopy-active), trigger memfill's verify
   through the destination serial console (--verify-when postcopy), so the guest
   reads every page while QEMU is still pulling pages; or after completion (after)
5. print total migration time, downtime, postcopy-blocktime and the VERIFY line;
   the last line is a JSON summary.
"""
import argparse
import json
import socket
import sys
import time

from migrate.qemu.lab import Lab


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True, help="directory made by build-guest.sh")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--precopy-s", type=float, default=0.0,
                    help="seconds of pre-copy before migrate-start-postcopy (default 0: pure post-copy)")
    ap.add_argument("--verify-when", default="postcopy", choices=["postcopy", "after"])
    ap.add_argument("--preempt", action="store_true", help="also enable postcopy-preempt")
    ap.add_argument("--max-bandwidth", type=int, default=1 << 40, help="bytes/s (QEMU default is 128 MiB/s)")
    a = ap.parse_args()

    res = {"mem_mb": a.mem, "precopy_s": a.precopy_s, "verify_when": a.verify_when, "preempt": a.preempt}
    T = time.monotonic
    with Lab(a.guest) as lab:
        t = T()
        src, qs, ss = lab.start("src", mem_mb=a.mem, backend="ram")
        m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=600)
        res["boot_to_filled_s"] = round(T() - t, 2)
        res["pages"] = int(m.group(1))
        lab.log(f"src: {m.group(0).strip()}")

        dst, qd, sd = lab.start("dst", mem_mb=a.mem, backend="ram", incoming="defer")
        caps = {"postcopy_ram": True}
        if a.preempt:
            caps["postcopy_preempt"] = True
        qs.set_caps(**caps)
        qd.set_caps(postcopy_blocktime=True, **caps)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": a.max_bandwidth})
        port = free_port()
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")

        t_mig = T()
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if a.precopy_s:
            time.sleep(a.precopy_s)
        qs.cmd("migrate-start-postcopy")
        t_pc = T()
        lab.log("src: migrate-start-postcopy")
        # wait until the destination runs
        while True:
            st = qd.cmd("query-status")["status"]
            if st == "running":
                break
            info = qs.cmd("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"source migration: {info}")
            time.sleep(0.002)
        res["start_postcopy_to_dst_running_ms"] = round((T() - t_pc) * 1e3, 1)
        lab.log(f"dst: running (source status {qs.cmd('query-migrate').get('status')})")

        t_v = None
        if a.verify_when == "postcopy":
            t_v = T()
            sd.send("\n")
        info = qs.migration_end(600, poll=0.01)
        res["migration_wall_s"] = round(T() - t_mig, 3)
        if info["status"] != "completed":
            raise RuntimeError(f"source migration: {info}")
        if t_v is None:
            t_v = T()
            sd.send("\n")
        m = sd.wait_for(r"VERIFY (OK|BAD)[^\n]*\n", timeout=600)
        res["verify"] = m.group(0).strip()
        res["verify_wall_s"] = round(T() - t_v, 3)
        dinfo = qd.migration_end(600, poll=0.01)
        ram = info.get("ram", {})
        res.update({
            "total_time_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"),
            "ram_transferred": ram.get("transferred"),
            "postcopy_requests": ram.get("postcopy-requests"),
            "postcopy_bytes": ram.get("postcopy-bytes"),
            "precopy_bytes": ram.get("precopy-bytes"),
            "dst_status": dinfo.get("status"),
            "postcopy_blocktime_ms": dinfo.get("postcopy-blocktime"),
            "postcopy_vcpu_blocktime_ms": dinfo.get("postcopy-vcpu-blocktime"),
        })
        print(f"total migration time: {res['total_time_ms']} ms (wall {res['migration_wall_s']} s)")
        print(f"downtime: {res['downtime_ms']} ms")
        print(f"postcopy-blocktime: {res['postcopy_blocktime_ms']} ms "
              f"(per vCPU {res['postcopy_vcpu_blocktime_ms']}), postcopy-requests {res['postcopy_requests']}")
        print(f"guest: {res['verify']} (wall {res['verify_wall_s']} s)")
    print(json.dumps(res))
    return 0 if res["verify"].startswith("VERIFY OK") else 1


if __name__ == "__main__":
    sys.exit(main())

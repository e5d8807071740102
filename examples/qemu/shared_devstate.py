#!/usr/bin/env python3
"""Experiment: migrate a QEMU guest whose RAM is a shared file WITHOUT sending RAM.

Source and destination QEMU map the SAME RAM file (/dev/shm, hugetlbfs, or the
source's memfd via /proc/PID/fd/N), so with capability x-ignore-shared QEMU's
migration stream carries only device state (plus the small non-shared RAM blocks:
pc.bios, pc.rom, ...).  This is the device-state path the migrate agent carries
over gRPC.

    examples/qemu/shared_devstate.py --guest GUESTDIR [--backend file|hugetlbfs|memfd]
                                     [--transport exec|fd] [--mem 512]

Steps (each timed):
  1. boot the source, wait for "FILLED <pages>" from memfill
  2. start the destination (-incoming defer -S) on the same RAM file
  3. source: x-ignore-shared on, stop, migrate to exec:cat > FILE (or an fd: pipe)
  4. source: quit;  destination: x-ignore-shared on, migrate-incoming, cont
  5. trigger memfill through the destination's serial console -> "VERIFY OK"
Prints a JSON summary on the last line.
"""
import argparse
import json
import os
import sys
import threading
import time

from migrate.qemu.lab import Lab


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True, help="directory made by build-guest.sh")
    ap.add_argument("--backend", default="file", choices=["file", "hugetlbfs", "memfd"])
    ap.add_argument("--transport", default="exec", choices=["exec", "fd"])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    a = ap.parse_args()

    res = {"backend": a.backend, "transport": a.transport, "mem_mb": a.mem}
    with Lab(a.guest) as lab:
        T = time.monotonic
        if a.backend == "file":
            path = lab.shm_path("qemu-lab-ram")
            src_kw = dict(backend="file", mem_path=path)
        elif a.backend == "hugetlbfs":
            d = lab.hugetlbfs_dir(a.mem)
            path = os.path.join(d, f"qemu-lab-ram-{os.getpid()}")
            lab.files.append(path)
            src_kw = dict(backend="hugetlbfs", mem_path=path)
        else:
            src_kw = dict(backend="memfd")
        t = T()
        src, qs, ss = lab.start("src", mem_mb=a.mem, **src_kw)
        m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=600)
        res["boot_to_filled_s"] = round(T() - t, 2)
        res["pages"] = int(m.group(1))
        lab.log(f"src: {m.group(0).strip()}")

        if a.backend == "memfd":
            # the destination opens the source's memfd through /proc
            for fd in os.listdir(f"/proc/{src.pid}/fd"):
                if os.readlink(f"/proc/{src.pid}/fd/{fd}").startswith("/memfd:"):
                    path = f"/proc/{src.pid}/fd/{fd}"
                    break
            else:
                raise RuntimeError("source memfd not found")
        dst_kw = dict(backend="hugetlbfs" if a.backend == "hugetlbfs" else "file", mem_path=path)

        t = T()
        dst, qd, sd = lab.start("dst", mem_mb=a.mem, incoming="defer", **dst_kw)
        res["dst_start_to_qmp_s"] = round(T() - t, 3)
        # No -S needed: the source is stopped before `migrate`, the stream records
        # that, and the destination stays "paused" after loading it until our `cont`.
        st = qd.cmd("query-status")
        res["dst_status_before"] = st["status"]

        for q in (qs, qd):
            q.set_caps(x_ignore_shared=True)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})

        state = os.path.join(lab.workdir, "devstate.bin")
        blob = {}
        t_stop = T()
        qs.cmd("stop")
        res["src_stop_ms"] = round((T() - t_stop) * 1e3, 2)
        t = T()
        if a.transport == "exec":
            qs.cmd("migrate", uri=f"exec:cat > {state}")
        else:
            r, w = os.pipe()
            qs.cmd("getfd", fdname="mig", fds=(w,))
            os.close(w)
            def reader():
                chunks = []
                while True:
                    b = os.read(r, 1 << 20)
                    if not b:
                        break
                    chunks.append(b)
                os.close(r)
                blob["data"] = b"".join(chunks)
            th = threading.Thread(target=reader)
            th.start()
            qs.cmd("migrate", uri="fd:mig")
        info = qs.migration_end(600, poll=0.005)
        if a.transport == "fd":
            th.join()
            with open(state, "wb") as f:
                f.write(blob["data"])
        res["src_migrate_ms"] = round((T() - t) * 1e3, 2)
        if info["status"] != "completed":
            raise RuntimeError(f"source migration: {info}")
        res["src_query_migrate"] = {k: info.get(k) for k in ("total-time", "downtime", "setup-time")}
        res["src_ram_transferred"] = info.get("ram", {}).get("transferred")
        res["devstate_bytes"] = os.path.getsize(state)
        lab.log(f"src: migration completed, stream {res['devstate_bytes']} bytes, {info}")

        t = T()
        qs.cmd("quit")
        src.wait(10)
        res["src_quit_ms"] = round((T() - t) * 1e3, 2)

        t = T()
        if a.transport == "exec":
            qd.cmd("migrate-incoming", uri=f"exec:cat {state}")
        else:
            r, w = os.pipe()
            qd.cmd("getfd", fdname="mig", fds=(r,))
            os.close(r)
            def writer():
                with open(state, "rb") as f:
                    data = f.read()
                os.write(w, data) if len(data) < 65536 else _writeall(w, data)
                os.close(w)
            th = threading.Thread(target=writer)
            th.start()
            qd.cmd("migrate-incoming", uri="fd:mig")
        info = qd.migration_end(600, poll=0.005)
        if a.transport == "fd":
            th.join()
        res["dst_incoming_ms"] = round((T() - t) * 1e3, 2)
        if info["status"] != "completed":
            raise RuntimeError(f"destination migration: {info}")
        res["dst_status_after_incoming"] = qd.cmd("query-status")["status"]
        t = T()
        if res["dst_status_after_incoming"] != "running":
            qd.cmd("cont")
        res["dst_cont_ms"] = round((T() - t) * 1e3, 2)
        res["downtime_stop_to_cont_ms"] = round((T() - t_stop) * 1e3, 1)
        lab.log(f"dst: running, downtime (stop..cont incl. source quit) {res['downtime_stop_to_cont_ms']} ms")

        t = T()
        sd.send("\n")
        m = sd.wait_for(r"VERIFY (OK|BAD)[^\n]*\n", timeout=600)
        res["verify"] = m.group(0).strip()
        res["verify_s"] = round(T() - t, 3)
        lab.log(f"dst: {res['verify']}")
    print(json.dumps(res))
    return 0 if res["verify"].startswith("VERIFY OK") else 1


def _writeall(fd, data):
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


if __name__ == "__main__":
    sys.exit(main())

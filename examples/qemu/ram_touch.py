#!/usr/bin/env python3
"""Which guest RAM pages does a destination QEMU touch, and when?

Runs QEMU under native/shim.c (LD_PRELOAD) with uffd_logger.FaultLogger as the
attach agent, on a RAM file that a source QEMU already filled (shared-RAM
x-ignore-shared migration, as in shared_devstate.py).  Every guest-RAM access by
the destination faults once; the logger records it with the phase it happened in:

  startup           exec .. QMP up (+1 s): machine init, ROM loading, reset
  migrate-incoming  loading the device-state stream (device post_load hooks)
  paused            1 s after the load, VM still paused
  running-idle      after `cont`, before the guest is asked to do anything (1 s)
  verify            memfill reads every page (VERIFY OK proves the shim works)

    examples/qemu/ram_touch.py --guest GUESTDIR [--shim SHIM.so] [--backend file|hugetlbfs]
"""
import argparse
import json
import os
import sys
import time
from collections import Counter, OrderedDict

from migrate.qemu.lab import Lab
from migrate.qemu.shim import shim_path

# uffd_logger sits beside this script, whose directory is on sys.path when it runs
from uffd_logger import (
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WRITE,
    FaultLogger,
)


def ranges(offs, ps):
    out = []
    for o in sorted(set(offs)):
        if out and out[-1][1] == o:
            out[-1][1] = o + ps
        else:
            out.append([o, o + ps])
    return [f"{a:#x}-{b:#x}" for a, b in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--shim", help="an LD_PRELOAD shim built from native/shim.c (default: the package's, "
                    "`migrate shim-path`)")
    ap.add_argument("--backend", default="file", choices=["file", "hugetlbfs"])
    ap.add_argument("--mem", type=int, default=512)
    a = ap.parse_args()
    res = OrderedDict(backend=a.backend)
    with Lab(a.guest) as lab:
        if a.backend == "file":
            path = lab.shm_path("qemu-touch-ram")
        else:
            path = os.path.join(lab.hugetlbfs_dir(a.mem), f"qemu-touch-ram-{os.getpid()}")
            lab.files.append(path)
        src, qs, ss = lab.start("src", mem_mb=a.mem, backend=a.backend, mem_path=path)
        ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=600)
        qs.set_caps(x_ignore_shared=True)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        qs.cmd("stop")
        state = os.path.join(lab.workdir, "devstate.bin")
        qs.cmd("migrate", uri=f"exec:cat > {state}")
        assert qs.migration_end(600)["status"] == "completed"
        qs.cmd("quit")
        src.wait(10)
        lab.log(f"source done, device state {os.path.getsize(state)} bytes")

        sock = os.path.join(lab.workdir, "attach.sock")
        agent = FaultLogger(sock)
        agent.start()
        t = time.monotonic()
        dst, qd, sd = lab.start("dst", mem_mb=a.mem, backend=a.backend, mem_path=path, incoming="defer",
                                env={"LD_PRELOAD": os.path.abspath(a.shim) if a.shim else shim_path(), "MIGRATE_ATTACH": sock,
                                     "MIGRATE_SHIM_DEBUG": "1"})
        if not agent.attached.wait(10) or agent.error:
            raise RuntimeError(f"shim did not attach: {agent.error}")
        res["qemu_start_to_qmp_s"] = round(time.monotonic() - t, 3)
        res["hello"] = agent.hello
        time.sleep(1)
        agent.phase = "migrate-incoming"
        qd.set_caps(x_ignore_shared=True)
        t = time.monotonic()
        qd.cmd("migrate-incoming", uri=f"exec:cat {state}")
        info = qd.migration_end(600, poll=0.005)
        res["migrate_incoming_ms"] = round((time.monotonic() - t) * 1e3, 1)
        if info["status"] != "completed":
            raise RuntimeError(f"migrate-incoming: {info}; stderr: {open(os.path.join(lab.workdir, 'dst.stderr')).read()}")
        agent.phase = "paused"
        time.sleep(1)
        agent.phase = "running-idle"
        qd.cmd("cont")
        time.sleep(1)
        agent.phase = "verify"
        t = time.monotonic()
        sd.send("\n")
        m = sd.wait_for(r"VERIFY (OK|BAD)[^\n]*\n", timeout=600)
        res["verify"] = m.group(0).strip()
        res["verify_wall_s"] = round(time.monotonic() - t, 2)
        agent.phase = "after"
        ps = agent.hello["page_size"]
        byphase = OrderedDict()
        for ph in ("startup", "migrate-incoming", "paused", "running-idle", "verify"):
            fl = [f for f in agent.faults if f[1] == ph]
            c = Counter(("minor" if f[3] & UFFD_PAGEFAULT_FLAG_MINOR else "missing") +
                        ("-write" if f[3] & UFFD_PAGEFAULT_FLAG_WRITE else "-read") for f in fl)
            byphase[ph] = {"faults": len(fl), "kinds": dict(c), "threads": len({f[4] for f in fl})}
            if ph in ("startup", "migrate-incoming", "paused"):
                byphase[ph]["ranges"] = ranges([f[2] for f in fl], ps)
        res["phases"] = byphase
        res["dst_stderr"] = open(os.path.join(lab.workdir, "dst.stderr")).read().strip().splitlines()[-3:]
        agent.close()
    print(json.dumps(res, indent=1))
    return 0 if res["verify"].startswith("VERIFY OK") else 1


if __name__ == "__main__":
    sys.exit(main())

"""The "QEMU guest" scenario: this engine against QEMU's own post-copy, same guest,
same size, both QEMUs local, measured in one run.

    from benchmarks.qemu_guest import measure
    r = measure(mem_mb=512)            # builds the guest if needed; needs root + QEMU
    r["engine"], r["qemu_postcopy"], r["ratio"]

Each side reports
  total_ms          engine: source QEMU STOP event -> the destination agent's last page
                    QEMU:   query-migrate total-time on the source (migrate -> completed)
  downtime_ms       source QEMU's STOP event -> destination QEMU's RESUME event (both
                    QEMU's own timestamps, same clock), so the two sides are measured alike;
                    QEMU's own "downtime" figure is kept as qemu_reported_downtime_ms
  guest_verify_ms   the guest's own time to read all of its memory (memfill), started
                    the moment the destination runs, while pages are still arriving
  postcopy_blocktime_ms   QEMU's postcopy-blocktime (destination); None for the engine,
                    which reports its demand-fault service latency instead
`ratio` is engine / QEMU for each (below 1: the engine is faster).

Uses examples/qemu/ (qemu_lab.py, migrate_qemu.py). Every QEMU is stopped by pid and
every file, mount and huge page given back, also on errors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "qemu")


def _examples():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)


def build_guest(out: str | None = None) -> str:
    out = out or os.path.join(tempfile.gettempdir(), "migrate-qemu-guest")
    if not os.path.exists(os.path.join(out, "initramfs.cpio.gz")):
        subprocess.run([os.path.join(EXAMPLES, "build-guest.sh"), out], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return out


def _ts(e: dict) -> float:
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def _first_event(q, name: str) -> float | None:
    q.cmd("query-status")  # pumps pending events
    for e in q.events:
        if e["event"] == name:
            return _ts(e)
    return None


def run_engine(guest: str, mem_mb: int = 512, hugetlbfs: bool = False, log=lambda m: None) -> dict:
    _examples()
    import migrate_qemu
    r = migrate_qemu.run(guest, mem_mb, hugetlbfs=hugetlbfs, log=log)
    if not (r.get("verify") or "").startswith("VERIFY OK") or r.get("errors"):
        raise RuntimeError(f"engine run failed: {r.get('verify')} {r.get('errors')}")
    d = r.get("dest", {})
    return {"pages": r["pages"], "total_ms": r.get("total_ms"), "downtime_ms": r.get("downtime_ms"),
            "guest_verify_ms": r.get("guest_verify_ms"), "postcopy_blocktime_ms": None,
            "demand_faults": d.get("faults"), "fault_p50_us": d.get("fault_p50_us"),
            "fault_p99_us": d.get("fault_p99_us"), "pages_demand": d.get("pages_demand"),
            "device_state_bytes": d.get("device_state_bytes"), "verify": r["verify"],
            "src_status_at_dst_running": r.get("src_status_at_dst_running")}


def run_qemu_postcopy(guest: str, mem_mb: int = 512, log=lambda m: None) -> dict:
    """QEMU's own pure post-copy (postcopy-ram, migrate-start-postcopy right after
    migrate), private RAM, over loopback TCP; verify triggered as soon as the
    destination runs (as examples/qemu/postcopy_baseline.py --verify-when postcopy)."""
    _examples()
    from qemu_lab import Lab

    with Lab(guest, verbose=False) as lab:
        lab.log = lambda msg: log(f"[{time.monotonic() - lab.t0:7.3f}] {msg}")
        src, qs, ss = lab.start("src", mem_mb=mem_mb, backend="ram")
        m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=300)
        pages = int(m.group(1))
        dst, qd, sd = lab.start("dst", mem_mb=mem_mb, backend="ram", incoming="defer")
        qs.set_caps(postcopy_ram=True)
        qd.set_caps(postcopy_ram=True, postcopy_blocktime=True)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        qs.cmd("migrate-start-postcopy")
        deadline = time.monotonic() + 120
        while qd.cmd("query-status")["status"] != "running":
            if qs.cmd("query-migrate").get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU post-copy did not start: {qs.cmd('query-migrate')}")
            time.sleep(0.001)
        sd.send("\n")
        info = qs.wait_migration(timeout=300, poll=0.01)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU post-copy: {info}")
        v = sd.wait_for(r"VERIFY (OK \d+ (\d+) ms|BAD [^\n]*)\n", timeout=300)
        dinfo = qd.wait_migration(timeout=60, poll=0.01)
        stop, resume = _first_event(qs, "STOP"), _first_event(qd, "RESUME")
        ram = info.get("ram", {})
        return {"pages": pages, "total_ms": info.get("total-time"),
                "downtime_ms": round((resume - stop) * 1e3, 1) if stop and resume else None,
                "qemu_reported_downtime_ms": info.get("downtime"),
                "guest_verify_ms": int(v.group(2)) if v.group(2) else None,
                "postcopy_blocktime_ms": dinfo.get("postcopy-blocktime"),
                "postcopy_requests": ram.get("postcopy-requests"), "ram_transferred": ram.get("transferred"),
                "verify": v.group(0).strip()}


def measure(guest: str | None = None, mem_mb: int = 512, hugetlbfs: bool = False, log=lambda m: None) -> dict:
    """Both runs, one after the other, same guest and size. Returns
    {"mem_mb", "engine": {...}, "qemu_postcopy": {...}, "ratio": {metric: engine/qemu}}."""
    guest = build_guest(guest)
    eng = run_engine(guest, mem_mb, hugetlbfs, log)
    base = run_qemu_postcopy(guest, mem_mb, log)
    ratio = {}
    for k in ("total_ms", "downtime_ms", "guest_verify_ms"):
        if eng.get(k) and base.get(k):
            ratio[k] = round(eng[k] / base[k], 3)
    return {"mem_mb": mem_mb, "backing": "hugetlbfs" if hugetlbfs else "tmpfs-file",
            "engine": eng, "qemu_postcopy": base, "ratio": ratio}


if __name__ == "__main__":
    import json
    print(json.dumps(measure(mem_mb=int(sys.argv[1]) if len(sys.argv) > 1 else 512,
                             hugetlbfs="--hugetlbfs" in sys.argv), indent=2))

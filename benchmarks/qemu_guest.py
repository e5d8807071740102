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
  postcopy_blocktime_ms   QEMU's postcopy-blocktime (destination: the time every vCPU was
                    blocked at once); the engine's is its one vCPU's blocked time (the
                    summary's `vcpus`, from the faults' thread ids), None with more vCPUs
  vcpu_blocktime_ms QEMU's postcopy-vcpu-blocktime; the engine's blocked time per vCPU
  pause_split       downtime_ms in its parts: stop, save, transfer, load, cont and a
                    remainder (migrate.qemu.switchover); for QEMU only what QMP exposes
`ratio` is engine / QEMU for each (below 1: the engine is faster).

Uses migrate.qemu.lab and migrate.qemu.localrun (the flow examples/qemu/run.sh runs) and
the guest examples/qemu/build-guest.sh builds. Every QEMU is stopped by pid and
every file, mount and huge page given back, also on errors.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from migrate.qemu import localrun, switchover
from migrate.qemu.lab import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "qemu")


def build_guest(out: str | None = None) -> str:
    """The guest in `out` (default /tmp/migrate-qemu-guest), built when it is
    missing or older than its sources (as examples/qemu/run.sh does). A
    rebuild is made aside and each file renamed into place, so that a QEMU
    another run starts from `out` meanwhile reads a whole kernel and initramfs."""
    out = out or os.path.join(tempfile.gettempdir(), "migrate-qemu-guest")
    initrd = os.path.join(out, "initramfs.cpio.gz")
    sources = [os.path.join(EXAMPLES, "build-guest.sh"), os.path.join(EXAMPLES, "guest", "memfill.c")]
    if os.path.exists(initrd) and all(os.path.getmtime(f) <= os.path.getmtime(initrd) for f in sources):
        return out
    os.makedirs(out, exist_ok=True)
    aside = tempfile.mkdtemp(prefix=".build-", dir=out)
    try:
        subprocess.run([sources[0], aside], check=True, timeout=300, stdout=subprocess.DEVNULL)
        for f in ("memfill", "vmlinuz", "initramfs.cpio.gz"):   # the initramfs last: it marks the build done
            os.replace(os.path.join(aside, f), os.path.join(out, f))
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def _first_event(q, name: str) -> float | None:
    """When QEMU sent its first event `name` (its own clock), or None."""
    seen = q.seen(name)
    return seen[0]["time"] if seen else None


def run_engine(guest: str, mem_mb: int = 512, hugetlbfs: bool = False, log=lambda m: None, link=None,
               tls: bool = True) -> dict:
    """link: a benchmarks.link.ShapedLink between the two agents (then always
    mutual TLS); tls=False: plaintext on loopback, like QEMU's own stream."""
    load = os.getloadavg()[0]
    r = localrun.run(guest, mem_mb, hugetlbfs=hugetlbfs, log=log, link=link, tls=tls or link is not None)
    if not (r.get("verify") or "").startswith("VERIFY OK") or r.get("errors"):
        raise RuntimeError(f"engine run failed: {r.get('verify')} {r.get('errors')}")
    d, s = r.get("dest", {}), r.get("source", {})
    tl = {ev: t for t, who, ev in reversed(r.get("timeline", [])) if who == "source"}
    blocked = [round(v["blocked_s"] * 1e3, 1) for v in d.get("vcpus", ()) if v["vcpu"] is not None]
    return {"pages": r["pages"], "total_ms": r.get("total_ms"), "downtime_ms": r.get("downtime_ms"),
            "guest_verify_ms": r.get("guest_verify_ms"), "guest_verify_local_ms": r.get("guest_verify_local_ms"),
            "postcopy_blocktime_ms": blocked[0] if len(blocked) == 1 else None,
            "vcpu_blocktime_ms": blocked,
            "demand_faults": d.get("faults"), "fault_p50_us": d.get("fault_p50_us"),
            "fault_p99_us": d.get("fault_p99_us"), "pages_demand": d.get("pages_demand"),
            "pages_pushed": d.get("pages_pushed"), "pages_zero": d.get("pages_zero"),
            "wire_bytes": s.get("wire_bytes"), "push_seconds": s.get("seconds"),
            "ram_gbps": round(mem_mb * (1 << 20) / s["seconds"] / 1e9, 3) if s.get("seconds") else None,
            "device_state_bytes": d.get("device_state_bytes"), "capture_ms": s.get("capture_ms"),
            "connected_ms": tl.get("connected"), "load_ms": d.get("device_state_load_ms"),
            "cpu_s": {"dest": round(d.get("cpu_user_s", 0) + d.get("cpu_sys_s", 0), 3),
                      "source": round(s.get("cpu_user_s", 0) + s.get("cpu_sys_s", 0), 3)},
            "attach_ack_ms": r.get("attach_ack_ms"),
            "verify": r["verify"], "src_status_at_dst_running": r.get("src_status_at_dst_running"),
            "pause_split": _engine_pause_split(r),
            "switchover_stamps": {"stop": r.get("src_stop_time"), "resume": r.get("dst_resume_time"),
                                  "source": s.get("switchover"), "dest": d.get("switchover")},
            "timeline": r.get("timeline"), "loadavg": round(load, 2)}


def _engine_pause_split(r: dict) -> dict | None:
    """The pause (STOP -> RESUME) in its parts, from the agents' switchover stamps."""
    d, s = r.get("dest", {}), r.get("source", {})
    if not (r.get("src_stop_time") and r.get("dst_resume_time") and d.get("switchover") and s.get("switchover")):
        return None
    return switchover.engine_split(r["src_stop_time"], r["dst_resume_time"], s["switchover"], d["switchover"])


def run_qemu_postcopy(guest: str, mem_mb: int = 512, log=lambda m: None, precopy: str = "none",
                      backend: str = "ram", link=None, preempt: bool = False, writer: int = 0,
                      ram_extra_kb: int | None = None) -> dict:
    """QEMU's own post-copy (postcopy-ram), private RAM, over loopback TCP; the
    guest's verify is triggered as soon as the destination runs.

    precopy="none":       migrate-start-postcopy right after migrate (pure post-copy, as
                          this engine: no pass over RAM before the switch)
    precopy="first-pass": switch once the first precopy pass is done (dirty-sync-count
                          reaches 2), as libvirt's --postcopy-after-precopy does

    total_ms is measured from the same kind of events as the engine's: the start of
    the migration (source MIGRATION "setup"; the engine has no phase before its STOP)
    to the destination's MIGRATION "completed", QEMU's own timestamps.

    link: a benchmarks.link.ShapedLink: the source QEMU in its source
    namespace, the destination QEMU in its destination namespace, migrating
    across it. preempt: QEMU's postcopy-preempt channel (page requests'
    replies on a connection of their own, as this engine's demand channel).

    writer: the guest writes that many pages every 100 ms from boot to the
    verify (memfill -w), which checks each page's last generation; the
    result's "writer" has its loop time before and during the pre-copy
    (writer_slowdown). ram_extra_kb: RAM above mem_mb (lab.qemu_argv); by
    default 8 KiB with precopy="first-pass", without which QEMU 7.2's
    pre-copy under TCG loses guest writes. A run whose guest does not print
    VERIFY OK raises."""
    if ram_extra_kb is None:
        ram_extra_kb = 8 if precopy != "none" else 0
    load = os.getloadavg()[0]
    with Lab(guest, verbose=False) as lab:
        lab.log = lambda msg: log(f"[{time.monotonic() - lab.t0:7.3f}] {msg}")
        kw = {}
        if backend == "file":   # the engine's backing: a share=on file on /dev/shm, each side its own
            kw = {"mem_path": lab.shm_path("qemu-postcopy-src")}
        kw["ram_extra_kb"] = ram_extra_kb
        if writer:
            kw["append_extra"] = f"memfill_write={writer}"
        src, qs, ss = lab.start("src", mem_mb=mem_mb, backend=backend, prefix=link.src_prefix if link else (), **kw)
        m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=300)
        pages = int(m.group(1))
        if writer:
            ss.wait_for(r"WRITER \d+ pages", timeout=30)
            ss.follow()
        if backend == "file":
            kw["mem_path"] = lab.shm_path("qemu-postcopy-dst")
        dst, qd, sd = lab.start("dst", mem_mb=mem_mb, backend=backend, incoming="defer",
                                prefix=link.dst_prefix if link else (), **kw)
        more = {"postcopy_preempt": True} if preempt else {}
        qs.set_caps(postcopy_ram=True, events=True, **more)
        qd.set_caps(postcopy_ram=True, postcopy_blocktime=True, events=True, **more)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        if precopy == "first-pass":
            # no convergence of QEMU's own: with the default 300 ms a writing
            # guest's pre-copy ends by itself in a stop-and-copy after the
            # first pass, before migrate-start-postcopy, and never post-copies
            qs.cmd("migrate-set-parameters", **{"downtime-limit": 1})
        if link is not None:
            host, port = link.dst_addr, 7000   # (a namespace of this run's own: every port is free)
        else:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            host, port = "127.0.0.1", s.getsockname()[1]
            s.close()
        qd.cmd("migrate-incoming", uri=f"tcp:{host}:{port}")
        if writer:   # the writer's loop time with no migration (the destination QEMU up), just before it starts
            time.sleep(WRITER_SETTLE_S + WRITER_BASELINE_S)
        t_migrate = time.time()
        qs.cmd("migrate", uri=f"tcp:{host}:{port}")
        deadline = time.monotonic() + 120
        if precopy == "first-pass":
            # the first pass ends with QEMU's second dirty-bitmap sync, which
            # it announces (MIGRATION_PASS 2) the moment it happens; a pass
            # over what the guest wrote meanwhile may still converge before
            # migrate-start-postcopy arrives (QEMU then completes by itself:
            # went_postcopy False), as it may under libvirt
            qs.wait_event(lambda e: (e["event"] == "MIGRATION_PASS" and e.get("data", {}).get("pass", 0) >= 2)
                          or (e["event"] == "MIGRATION" and e.get("data", {}).get("status") in
                              ("completed", "failed", "cancelled")), 120, "QEMU's first pre-copy pass")
        elif precopy != "none":
            raise ValueError(precopy)
        try:
            qs.cmd("migrate-start-postcopy")
        except Exception as e:  # noqa: BLE001 - an idle guest's precopy may have converged already
            if precopy == "none" or qs.cmd("query-migrate").get("status") != "completed":
                raise RuntimeError(f"migrate-start-postcopy: {e}") from None
        while qd.cmd("query-status")["status"] != "running":
            st = qs.cmd("query-migrate").get("status")
            if st in ("failed", "cancelled") or (st == "completed" and precopy == "none") \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU post-copy did not start: {qs.cmd('query-migrate')}")
            time.sleep(0.001)
        sd.send("\n")
        info = qs.migration_end(300, poll=0.01)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU post-copy: {info}")
        v = sd.wait_for(r"VERIFY (OK \d+ (\d+) ms|BAD [^\n]*)\n", timeout=300)
        if not v.group(1).startswith("OK"):
            raise RuntimeError(f"QEMU post-copy (precopy={precopy}, RAM +{ram_extra_kb} KiB): the destination "
                               f"guest printed {v.group(0).strip()}")
        dinfo = qd.migration_end(60, poll=0.01)
        sd.send("\n")
        v2 = sd.wait_for(r"VERIFY (OK \d+ (\d+) ms|BAD [^\n]*)\n", timeout=300)
        stop, resume = _first_event(qs, "STOP"), _first_event(qd, "RESUME")
        wr = writer_load(ss.writer_ticks(), t_migrate, stop) if writer and stop else None
        setup = qs.seen("MIGRATION", status="setup")
        done = qd.seen("MIGRATION", status="completed")
        ram = info.get("ram", {})
        t_start = setup[0]["time"] if setup else stop
        # post-copy happened when the switch came before QEMU's own convergence (an idle
        # guest's precopy can finish in one pass plus a stop-and-copy of the rest)
        went_postcopy = bool(qs.seen("MIGRATION", status="postcopy-active"))
        return {"precopy": precopy, "backend": backend, "preempt": preempt, "pages": pages,
                "went_postcopy": went_postcopy, "ram_extra_kb": ram_extra_kb, "writer": wr,
                "downtime_bytes": ram.get("downtime-bytes"), "postcopy_bytes": ram.get("postcopy-bytes"),
                "total_ms": round((done[0]["time"] - t_start) * 1e3, 1) if done and t_start else info.get("total-time"),
                "qemu_total_time_ms": info.get("total-time"),
                "precopy_ms": round((stop - t_start) * 1e3, 1) if stop and t_start else None,
                "postcopy_ms": round((done[0]["time"] - stop) * 1e3, 1) if done and stop else None,
                "downtime_ms": round((resume - stop) * 1e3, 1) if stop and resume else None,
                "qemu_reported_downtime_ms": info.get("downtime"),
                "pause_split": switchover.qemu_split(stop, resume, info.get("downtime")) if stop and resume else None,
                "guest_verify_ms": int(v.group(2)) if v.group(2) else None,
                "guest_verify_local_ms": int(v2.group(2)) if v2.group(2) else None,
                "postcopy_blocktime_ms": dinfo.get("postcopy-blocktime"),
                "vcpu_blocktime_ms": dinfo.get("postcopy-vcpu-blocktime"),
                "postcopy_requests": ram.get("postcopy-requests"), "ram_transferred": ram.get("transferred"),
                "verify": v.group(0).strip(), "loadavg": round(load, 2)}


METRICS = ("total_ms", "downtime_ms", "guest_verify_ms")

WRITER_PAGES = 256        # the writing guest: pages per 100 ms tick (issue 20's workload)
WRITER_SETTLE_S = 0.5     # after the writer starts, before its baseline is taken
WRITER_BASELINE_S = 2.0   # its loop time with no migration: this long just before the migration


def writer_load(ticks: list[tuple[float, int]], t_start: float, t_stop: float) -> dict:
    """The writing guest's loop time (microseconds its tick's writes took,
    memfill's TICK lines, by when each arrived) in the WRITER_BASELINE_S before
    the migration started (t_start) and while its source ran the pre-copy
    (t_start to the source's STOP, t_stop); slowdown = mean during / mean
    before (None when no tick fell in a window)."""
    def mean(lo, hi):
        us = [u for t, u in ticks if lo < t <= hi]
        return (round(sum(us) / len(us), 1) if us else None), len(us)
    base, nb = mean(t_start - WRITER_BASELINE_S, t_start)
    during, nd = mean(t_start, t_stop)
    return {"baseline_tick_us": base, "baseline_ticks": nb, "precopy_tick_us": during, "precopy_ticks": nd,
            "slowdown": round(during / base, 3) if base and during else None}


def _ratios(eng: dict, base: dict) -> dict:
    return {k: round(eng[k] / base[k], 3) for k in METRICS if eng.get(k) and base.get(k)}


def measure(guest: str | None = None, mem_mb: int = 512, hugetlbfs: bool = False, log=lambda m: None,
            precopy: bool = False) -> dict:
    """Both runs, one after the other, same guest and size. Returns
    {"mem_mb", "engine": {...}, "qemu_postcopy": {...}, "ratio": {metric: engine/qemu}}
    (+ "qemu_precopy_postcopy" and "ratio_precopy" with precopy=True)."""
    guest = build_guest(guest)
    eng = run_engine(guest, mem_mb, hugetlbfs, log)
    base = run_qemu_postcopy(guest, mem_mb, log)
    out = {"mem_mb": mem_mb, "backing": "hugetlbfs" if hugetlbfs else "tmpfs-file",
           "engine": eng, "qemu_postcopy": base, "ratio": _ratios(eng, base)}
    if precopy:
        pre = run_qemu_postcopy(guest, mem_mb, log, precopy="first-pass")
        out["qemu_precopy_postcopy"] = pre
        out["ratio_precopy"] = _ratios(eng, pre)
    return out


def unavailable() -> str | None:
    """Why the QEMU scenario cannot run here (None: it can)."""
    import glob
    if os.geteuid() != 0:
        return "needs root (userfaultfd on the QEMU's RAM, /dev/shm files)"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if not os.path.exists(os.path.join(tempfile.gettempdir(), "migrate-qemu-guest", "initramfs.cpio.gz")):
        if not glob.glob("/boot/vmlinuz-*"):
            return "no Debian kernel /boot/vmlinuz-* (apt-get install linux-image-amd64)"
        for tool, pkg in (("busybox", "busybox-static"), ("cpio", "cpio"), ("gcc", "gcc")):
            if not shutil.which(tool):
                return f"{tool} not found to build the guest (apt-get install {pkg})"
    try:
        from migrate.qemu.shim import shim_path
        shim_path()
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return f"the LD_PRELOAD shim is not built: {e}"
    return None


def _best(runs: list[dict]) -> dict:
    """Per metric, the lowest over the repetitions."""
    out = {}
    for k in METRICS + ("guest_verify_local_ms", "postcopy_blocktime_ms"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = min(vals) if vals else None
    return out


def _alternate(out: dict, reps: int, sides, log, label: str, first_timeline: bool) -> None:
    """reps x each (side, run) of sides, alternating: each result goes to
    out["runs"][side], each failure to out["errors"] (one failed run does not
    stop the others). first_timeline: the first repetition keeps its
    timeline (the others drop theirs)."""
    for i in range(reps):
        for side, fn in sides:
            try:
                r = fn()
            except Exception as e:  # noqa: BLE001 - one failed run does not stop the others
                out.setdefault("errors", []).append(f"{side} rep {i + 1}: {type(e).__name__}: {e}")
                log(f"{label} rep {i + 1}/{reps} {side} failed: {e}")
                continue
            if i or not first_timeline:
                r.pop("timeline", None)
            out["runs"][side].append(r)
            log(f"{label} rep {i + 1}/{reps} {side}: total {r['total_ms']} ms, downtime "
                f"{r['downtime_ms']} ms, guest verify {r['guest_verify_ms']} ms "
                f"(local {r.get('guest_verify_local_ms')} ms), load {r['loadavg']}")


ATTACH_MEM_MB = 1024   # the guest of the one run whose attach ack counts at the target's size


def bench(reps: int = 2, mem_mb: int = 512, precopy: bool = True, same_backing: bool = True,
          log=lambda m: None) -> dict:
    """`migrate bench`'s QEMU guest scenario: reps x (engine, QEMU pure post-copy on
    private RAM (QEMU's usual setup, the baseline of the ratios), QEMU post-copy after
    one precopy pass, QEMU pure post-copy on a share=on /dev/shm file like the
    engine's), alternating, best of each and all. The engine's channels are
    plaintext, as QEMU's migration stream is here, so that the ratios compare
    like with like; "engine_tls" runs it with mutual TLS (its default off
    loopback), for qemu_total_ratio_tls and qemu_guest_ratio_tls.
    Never raises: a failure is recorded under "error"."""
    out: dict = {"mem_mb": mem_mb, "backing": "tmpfs-file", "reps": reps,
                 "runs": {"engine": [], "engine_tls": [], "qemu_postcopy": []}}
    if precopy:
        out["runs"]["qemu_precopy_postcopy"] = []
    if same_backing:
        out["runs"]["qemu_postcopy_shm"] = []
    t0 = time.monotonic()
    try:
        guest = build_guest()
        sides = (("engine", lambda: run_engine(guest, mem_mb, tls=False)),
                 ("engine_tls", lambda: run_engine(guest, mem_mb, tls=True)),
                 ("qemu_postcopy", lambda: run_qemu_postcopy(guest, mem_mb)),
                 ("qemu_precopy_postcopy", lambda: run_qemu_postcopy(guest, mem_mb, precopy="first-pass")),
                 ("qemu_postcopy_shm", lambda: run_qemu_postcopy(guest, mem_mb, backend="file")))
        _alternate(out, reps, [(side, fn) for side, fn in sides if side in out["runs"]], log, "qemu guest",
                   first_timeline=True)
        # the attach ack's target is at 1 GiB and above: one engine run of that
        # size (tried twice: a failed try is recorded, and its ack is not had)
        for attempt in (1, 2):
            try:
                big = run_engine(guest, ATTACH_MEM_MB, tls=False)
            except Exception as e:  # noqa: BLE001 - one failed run does not stop the others
                out.setdefault("errors", []).append(f"engine {ATTACH_MEM_MB} MiB try {attempt}: "
                                                    f"{type(e).__name__}: {e}")
                continue
            out["attach_big"] = {"mem_mb": ATTACH_MEM_MB, **{k: big.get(k) for k in (
                "attach_ack_ms", "downtime_ms", "total_ms", "guest_verify_ms", "pause_split")}}
            log(f"qemu guest {ATTACH_MEM_MB} MiB engine: attach acked in {big.get('attach_ack_ms')} ms, downtime "
                f"{big.get('downtime_ms')} ms")
            break
    except Exception as e:  # noqa: BLE001 - the report says what failed
        out["error"] = f"{type(e).__name__}: {e}"
    for side in ("engine", "qemu_postcopy"):
        if not out["runs"][side] and "error" not in out:
            out["error"] = f"no successful {side} run: " + "; ".join(out.get("errors", []))
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["best"] = {side: _best(runs) for side, runs in out["runs"].items() if runs}
    b = out["best"]
    acks = [x["attach_ack_ms"] for x in [*out["runs"]["engine"], *out["runs"]["engine_tls"], out.get("attach_big", {})]
            if x.get("attach_ack_ms") is not None]
    out["attach_ack_ms"] = max(acks) if acks else None   # the longest: the destination QEMU waited that in mmap
    if "engine" in b and "qemu_postcopy" in b:
        out["ratio"] = _ratios(b["engine"], b["qemu_postcopy"])
        out["qemu_total_ratio"] = out["ratio"].get("total_ms")
        out["qemu_guest_ratio"] = out["ratio"].get("guest_verify_ms")
        if "engine_tls" in b:
            tls_ratio = _ratios(b["engine_tls"], b["qemu_postcopy"])
            out["qemu_total_ratio_tls"] = tls_ratio.get("total_ms")
            out["qemu_guest_ratio_tls"] = tls_ratio.get("guest_verify_ms")
        e, q = b["engine"], b["qemu_postcopy"]
        if all(x.get("guest_verify_ms") and x.get("guest_verify_local_ms") for x in (e, q)):
            # what the migration adds to the guest's own time, above its all-local floor
            de = e["guest_verify_ms"] - e["guest_verify_local_ms"]
            dq = q["guest_verify_ms"] - q["guest_verify_local_ms"]
            out["qemu_guest_delay_ratio"] = round(de / dq, 3) if dq > 0 else None
    if "engine" in b and "qemu_precopy_postcopy" in b:
        out["ratio_precopy"] = _ratios(b["engine"], b["qemu_precopy_postcopy"])
    if "engine" in b and "qemu_postcopy_shm" in b:
        out["ratio_shm"] = _ratios(b["engine"], b["qemu_postcopy_shm"])
    _pause(out)
    return out


def bench_link(rate: str, reps: int = 2, mem_mb: int = 512, log=lambda m: None) -> dict:
    """`migrate bench --qemu --link RATE`: reps x (this engine, QEMU post-copy
    with its preempt channel), alternating, the same guest, over one shaped
    link (benchmarks.link) made for the run. Best of each; never raises."""
    from benchmarks.link import ShapedLink, unavailable
    out: dict = {"mem_mb": mem_mb, "link": rate, "reps": reps, "runs": {"engine": [], "qemu_postcopy_preempt": []}}
    why = unavailable()
    if why:
        out["error"] = why
        return out
    t0 = time.monotonic()
    try:
        guest = build_guest()
        with ShapedLink(rate) as link:
            out["link_floor"] = link.floors(log)
            _alternate(out, reps, (("engine", lambda: run_engine(guest, mem_mb, link=link)),
                                   ("qemu_postcopy_preempt",
                                    lambda: run_qemu_postcopy(guest, mem_mb, link=link, preempt=True))),
                       log, f"qemu guest over {rate}", first_timeline=False)
    except Exception as e:  # noqa: BLE001 - the report says what failed
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["best"] = {side: _best(runs) for side, runs in out["runs"].items() if runs}
    b = out["best"]
    if "engine" in b and "qemu_postcopy_preempt" in b:
        out["ratio"] = _ratios(b["engine"], b["qemu_postcopy_preempt"])
        out["qemu_link_total_ratio"] = out["ratio"].get("total_ms")
        out["qemu_link_guest_ratio"] = out["ratio"].get("guest_verify_ms")
    elif "error" not in out:
        out["error"] = "no successful run of each side: " + "; ".join(out.get("errors", []))
    return out


def run_engine_precopy(guest: str, mem_mb: int = 512, writer: int = WRITER_PAGES, log=lambda m: None,
                       tls: bool = False) -> dict:
    """This engine's pre-copy of the writing guest (localrun.run_precopy:
    `migrate source --precopy --attach --qmp`, the source QEMU under the
    shim), measured as run_qemu_postcopy measures QEMU's: total_ms from the
    source agent's start to the destination's last page (QEMU's: from its
    migrate), downtime_ms from the source's STOP to the destination's
    RESUME (QEMU's events), the writer's loop time before and during the
    pre-copy (writer_load), and demand faults after the switch over the
    guest's pages. A run whose guest does not print VERIFY OK raises."""
    load = os.getloadavg()[0]
    r = localrun.run_precopy(guest, mem_mb, writer=writer, log=log, tls=tls, baseline_s=WRITER_BASELINE_S)
    if not (r.get("verify") or "").startswith("VERIFY OK") or r.get("errors"):
        raise RuntimeError(f"engine pre-copy run failed: {r.get('verify')} {r.get('errors')}")
    d, s = r.get("dest", {}), r.get("source", {})
    pages = mem_mb * (1 << 20) // 4096
    total, attached = r.get("total_ms"), r.get("attached_ms")
    return {"pages": r["pages"], "total_ms": total, "downtime_ms": r.get("downtime_ms"),
            # the same from when the agent held the guest (its own start-up left out)
            "total_from_attach_ms": round(total - attached, 1) if total and attached else None,
            "precopy_ms": r.get("precopy_ms"), "guest_verify_ms": r.get("guest_verify_ms"),
            "guest_verify_local_ms": r.get("guest_verify_local_ms"),
            "demand_faults": d.get("faults"), "fault_fraction": round(d["faults"] / pages, 5)
            if d.get("faults") is not None else None,
            "writer": writer_load(r["ticks"], r["t_start"], r["src_stop_time"]),
            "rounds": r.get("rounds"), "switch": r.get("switch"), "attached_ms": r.get("attached_ms"),
            "pause_split": _engine_pause_split(r), "verify": r["verify"], "tls": tls, "loadavg": round(load, 2)}


def bench_precopy(reps: int = 2, mem_mb: int = 512, writer: int = WRITER_PAGES, log=lambda m: None) -> dict:
    """`migrate bench --qemu --precopy`: reps x (this engine's pre-copy, QEMU's
    own pre-copy-then-post-copy: one pass, then migrate-start-postcopy, RAM +
    8 KiB), alternating, the same guest writing `writer` pages every 100 ms
    throughout; medians of each. The engine's channels are plaintext, as
    QEMU's stream. Never raises: a failure is recorded under "error"."""
    out: dict = {"mem_mb": mem_mb, "writer_pages": writer, "reps": reps, "precopy": True,
                 "runs": {"engine_precopy": [], "qemu_precopy_postcopy": []}}
    t0 = time.monotonic()
    try:
        guest = build_guest()
        _alternate(out, reps, (("engine_precopy", lambda: run_engine_precopy(guest, mem_mb, writer, log)),
                               ("qemu_precopy_postcopy", lambda: run_qemu_postcopy(
                                   guest, mem_mb, log, precopy="first-pass", writer=writer))),
                   log, "qemu guest pre-copy", first_timeline=False)
    except Exception as e:  # noqa: BLE001 - the report says what failed
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    runs = out["runs"]
    med = {side: {k: _median([x.get(k) for x in rs]) for k in ("total_ms", "downtime_ms", "precopy_ms",
                                                                "total_from_attach_ms")}
           for side, rs in runs.items()}
    for side, rs in runs.items():
        med[side]["slowdown"] = _median([x["writer"]["slowdown"] for x in rs if x.get("writer")])
    out["median"] = med
    e, q = med["engine_precopy"], med["qemu_precopy_postcopy"]
    if not (runs["engine_precopy"] and runs["qemu_precopy_postcopy"]):
        out.setdefault("error", "no successful run of each side: " + "; ".join(out.get("errors", [])))
        return out
    keys = {"qemu_precopy_fault_fraction": _median([x["fault_fraction"] for x in runs["engine_precopy"]]),
            "qemu_precopy_total_ratio": round(e["total_ms"] / q["total_ms"], 3) if e["total_ms"] and q["total_ms"]
            else None,
            "qemu_precopy_pause_ratio": round(e["downtime_ms"] / q["downtime_ms"], 3)
            if e["downtime_ms"] and q["downtime_ms"] else None,
            "qemu_precopy_guest_slowdown": e["slowdown"], "qemu_dirty_log_guest_slowdown": q["slowdown"]}
    keys["qemu_precopy_slowdown_ratio"] = round(e["slowdown"] / q["slowdown"], 3) \
        if e["slowdown"] and q["slowdown"] else None
    out.update(keys)
    # (informational) the engine's total without its agent's start-up: QEMU's migrate starts in a running QEMU
    out["qemu_precopy_total_ratio_from_attach"] = round(e["total_from_attach_ms"] / q["total_ms"], 3) \
        if e["total_from_attach_ms"] and q["total_ms"] else None
    out["keys"] = keys
    return out


def _median(vals: list) -> float | None:
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def _pause(out: dict) -> None:
    """The pause (source STOP -> destination RESUME) per side: "pause_split",
    the parts of the repetition whose pause is the median (the lower one of an
    even count), so that they add up to it (migrate.qemu.switchover; a part
    QMP does not expose for QEMU is None), and qemu_pause_ratio, the engine's
    median pause over QEMU post-copy's (private RAM)."""
    out["pause_split"] = {}
    for side, runs in out["runs"].items():
        splits = sorted((r["pause_split"] for r in runs if r.get("pause_split")), key=lambda sp: sp["pause_ms"])
        if splits:
            out["pause_split"][side] = {**splits[(len(splits) - 1) // 2], "reps": len(splits)}
    out["pause_split_notes"] = {
        "engine": "critical path: each part counts only the time after the part before it ended; stop = "
                  "STOP event to the stop command's reply at the source agent; save = migrate to the end of "
                  "the device-state pipe; transfer = until the last byte reached the destination QEMU's pipe; "
                  "load = until the destination QEMU's migration completed; cont = cont to RESUME; remainder = "
                  "time in none of these (QMP replies, thread hand-offs, poll intervals)",
        "qemu": "QMP exposes only STOP, the source's query-migrate downtime (whole ms, from just before the "
                "stop to the device state written to the socket) and RESUME: save = that downtime (it "
                "includes the stop and the send); load = the rest (the destination's load and its own start: "
                "QEMU needs no cont); stop, transfer and cont are not separable (None)"}
    med = {side: _median([r.get("downtime_ms") for r in runs]) for side, runs in out["runs"].items()}
    out["pause_ms_median"] = med
    if med.get("engine") and med.get("qemu_postcopy"):
        out["qemu_pause_ratio"] = round(med["engine"] / med["qemu_postcopy"], 3)


if __name__ == "__main__":
    import json
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--bench" in sys.argv:
        print(json.dumps(bench(reps=int(args[1]) if len(args) > 1 else 2, mem_mb=int(args[0]) if args else 512,
                               log=lambda m: print(m, file=sys.stderr, flush=True)), indent=2))
    else:
        print(json.dumps(measure(mem_mb=int(args[0]) if args else 512, hugetlbfs="--hugetlbfs" in sys.argv,
                                 precopy="--precopy" in sys.argv), indent=2))

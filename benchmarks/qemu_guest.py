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
    out = out or os.path.join(tempfile.gettempdir(), "migrate-qemu-guest")
    if not os.path.exists(os.path.join(out, "initramfs.cpio.gz")):
        subprocess.run([os.path.join(EXAMPLES, "build-guest.sh"), out], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
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
                      backend: str = "ram", link=None, preempt: bool = False) -> dict:
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
    replies on a connection of their own, as this engine's demand channel)."""
    load = os.getloadavg()[0]
    with Lab(guest, verbose=False) as lab:
        lab.log = lambda msg: log(f"[{time.monotonic() - lab.t0:7.3f}] {msg}")
        kw = {}
        if backend == "file":   # the engine's backing: a share=on file on /dev/shm, each side its own
            kw = {"mem_path": lab.shm_path("qemu-postcopy-src")}
        src, qs, ss = lab.start("src", mem_mb=mem_mb, backend=backend, prefix=link.src_prefix if link else (), **kw)
        m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=300)
        pages = int(m.group(1))
        if backend == "file":
            kw = {"mem_path": lab.shm_path("qemu-postcopy-dst")}
        dst, qd, sd = lab.start("dst", mem_mb=mem_mb, backend=backend, incoming="defer",
                                prefix=link.dst_prefix if link else (), **kw)
        more = {"postcopy_preempt": True} if preempt else {}
        qs.set_caps(postcopy_ram=True, events=True, **more)
        qd.set_caps(postcopy_ram=True, postcopy_blocktime=True, events=True, **more)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        if link is not None:
            host, port = link.dst_addr, 7000   # (a namespace of this run's own: every port is free)
        else:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            host, port = "127.0.0.1", s.getsockname()[1]
            s.close()
        qd.cmd("migrate-incoming", uri=f"tcp:{host}:{port}")
        qs.cmd("migrate", uri=f"tcp:{host}:{port}")
        deadline = time.monotonic() + 120
        if precopy == "first-pass":
            while (qs.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 2
                   and time.monotonic() < deadline):
                time.sleep(0.002)
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
        dinfo = qd.migration_end(60, poll=0.01)
        sd.send("\n")
        v2 = sd.wait_for(r"VERIFY (OK \d+ (\d+) ms|BAD [^\n]*)\n", timeout=300)
        stop, resume = _first_event(qs, "STOP"), _first_event(qd, "RESUME")
        setup = qs.seen("MIGRATION", status="setup")
        done = qd.seen("MIGRATION", status="completed")
        ram = info.get("ram", {})
        t_start = setup[0]["time"] if setup else stop
        # post-copy happened when the switch came before QEMU's own convergence (an idle
        # guest's precopy can finish in one pass plus a stop-and-copy of the rest)
        went_postcopy = bool(qs.seen("MIGRATION", status="postcopy-active"))
        return {"precopy": precopy, "backend": backend, "preempt": preempt, "pages": pages,
                "went_postcopy": went_postcopy,
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
    import shutil
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

"""`migrate bench`: floors, then scenarios, then ratios, files and plots.

Called by migrate.cli (which finds this package beside the `migrate` package).
With --json the last stdout line is one JSON object: the ratio keys of issue 4
plus where the files went. Progress goes to stderr.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import shutil
import sys
import time

from benchmarks import floors, report, scenarios

QEMU_SCENARIO = "qemu-guest-512M"

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _profile_summary(path: str, top: int = 12) -> list[tuple[str, float]]:
    """py-spy raw (collapsed) stacks -> the frames with the most self samples."""
    self_n: collections.Counter = collections.Counter()
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                n = int(n)
                frames = stack.split(";")
                # "thread (TID): NAME", names like faults-<session>: drop the session
                thread = frames[0].split(": ", 1)[-1].split("-")[0]
                self_n[f"{frames[-1]}  [{thread}]"] += n
                total += n
    except (OSError, ValueError):
        return []
    return [(k, 100.0 * v / total) for k, v in self_n.most_common(top)] if total else []


def _perf_summary(path: str, top: int = 15) -> list[tuple[str, float]]:
    """perf.data -> the symbols with the most self samples, with their thread."""
    import subprocess
    try:
        out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "comm,sym", "--stdio",
                              "-g", "none", "--percent-limit", "0.5"], capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and not line.startswith("#"):
            rows.append((f"{' '.join(parts[3:])}  [{parts[1]}]", float(parts[0].rstrip("%"))))
    return rows[:top]


def _git_head() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _qemu_plan(args, quick: bool, filters: list[str]) -> tuple[bool, str]:
    """(run the QEMU guest scenario?, why not). --qemu (or MIGRATE_BENCH_QEMU=1)
    forces it on; a full or --matrix run includes it when its filters let it
    through; --quick never does on its own (it must stay under 3 minutes)."""
    import fnmatch
    forced = bool(getattr(args, "qemu", False)) or os.environ.get("MIGRATE_BENCH_QEMU") == "1"
    if not forced:
        if quick:
            return False, "not part of --quick (pass --qemu)"
        if filters and not any(fnmatch.fnmatch(QEMU_SCENARIO, f if any(c in f for c in "*?[") else f"*{f}*")
                               for f in filters):
            return False, "filtered out by --scenario"
    from benchmarks import qemu_guest
    why = qemu_guest.unavailable()
    return (why is None), (why or "")


def _hints() -> dict:
    """Working-set prefetch: the record pass, then with hints
    (scenarios.measure_hints), over a 1 Gbit shaped link when this host can
    make one (root, veth, tbf), else on loopback with the push at --max-rate
    HINTS_RATE."""
    from benchmarks.link import ShapedLink, unavailable
    why = unavailable()
    where = f"push at --max-rate {scenarios.HINTS_RATE} on loopback ({why})" if why else "over a 1gbit shaped link"
    _log(f"hints: {scenarios.HINTS_PATTERN} 1 GiB, {where}: record, then without hints, then with them")
    images = scenarios.Images()
    try:
        if why:
            return scenarios.measure_hints(images, log=_log)
        with ShapedLink("1gbit", leftovers=f"/dev/shm/migrate-bench-{os.getpid()}-*") as link:
            floor = link.floors(_log)
            out = {**scenarios.measure_hints(images, log=_log, link=link), "link_floor": floor}
            try:
                out["locality"] = scenarios.measure_locality(images, link, log=_log)
            except Exception as e:  # noqa: BLE001 - reported beside the hints, which stand
                _log(f"locality: ERROR {type(e).__name__}: {e}")
                out["locality"] = {"error": f"{type(e).__name__}: {e}"}
            return out
    except Exception as e:  # noqa: BLE001 - a broken measurement must not end the run
        _log(f"hints: ERROR {type(e).__name__}: {e}")
        return {"scenario": "hints", "error": f"{type(e).__name__}: {e}"}
    finally:
        images.close()


def run(args) -> int:
    t0 = time.monotonic()
    load0 = list(os.getloadavg())
    code0 = scenarios.code_version()
    quick = bool(args.quick)
    name = args.name or ("quick" if quick else "full")
    outdir = os.path.abspath(args.out or DEFAULT_OUT)
    filters = list(args.scenario or [])
    links = list(getattr(args, "link", None) or [])
    from benchmarks.link import parse_rate
    try:
        for rate in links:
            parse_rate(rate)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if links:
        # only the scenarios over these links (each brings its own floors)
        chosen = [s for rate in links for s in scenarios.link_set(rate, quick)]
    elif args.matrix:
        chosen = scenarios.matrix_set()
    else:
        chosen = scenarios.quick_set() if quick else scenarios.full_set()
        if quick:
            chosen += [s for rate in scenarios.QUICK_LINKS for s in scenarios.link_set(rate)]
    chosen = [s for s in chosen if s.matches(filters)]
    run_qemu, qemu_why = _qemu_plan(args, quick, filters)
    qemu_link = None
    if links and not (getattr(args, "qemu", False) or os.environ.get("MIGRATE_BENCH_QEMU") == "1"):
        run_qemu, qemu_why = False, "not part of a --link run (pass --qemu)"
    if run_qemu and links:
        # over the first link instead of loopback: this engine against QEMU's
        # post-copy with its preempt channel
        qemu_link, run_qemu = links[0], False
    if not run_qemu and not qemu_link:
        _log(f"QEMU guest scenario skipped: {qemu_why}")
    need_huge = any(s.backing == "hugetlbfs" for s in chosen) or not args.no_floors

    from migrate.host import features
    hf = features()
    fl: dict = {}
    if not args.no_floors and not links:
        fl = floors.run_all(quick, need_huge and hf.why_not("minor_hugetlbfs") is None, _log)
    profile = set()
    if args.profile:
        profile = {s.name for s in chosen if s.matches(args.profile)}
        if scenarios.PROFILER != "perf" and not (shutil.which("py-spy") or os.environ.get("PY_SPY")):
            _log("--profile: py-spy not found on PATH (pip install py-spy, or set PY_SPY): not profiling")
            profile = set()
    prof_root = os.path.join(outdir, f"{name}-profiles")
    results = scenarios.run_all(chosen, _log, profile, prof_root)
    for x in results:
        if x.get("link_floor"):
            fl.setdefault(f"link_{x['link']}", x["link_floor"])
    qemu: dict = {"scenario": QEMU_SCENARIO, "skipped": qemu_why}
    if run_qemu:
        from benchmarks import qemu_guest
        reps = int(getattr(args, "qemu_reps", None) or os.environ.get("MIGRATE_BENCH_QEMU_REPS") or 2)
        if getattr(args, "precopy", False):
            name_p = f"{QEMU_SCENARIO}-precopy"
            _log(f"{name_p}: this engine's pre-copy vs QEMU's one pass then post-copy, a writing guest, "
                 f"{reps} repetitions")
            qemu = {"scenario": name_p, **qemu_guest.bench_precopy(reps=reps, mem_mb=512, log=_log)}
        else:
            _log(f"{QEMU_SCENARIO}: this engine vs QEMU's own post-copy, {reps} repetitions")
            qemu = {"scenario": QEMU_SCENARIO, **qemu_guest.bench(reps=reps, mem_mb=512, log=_log)}
        if qemu.get("error"):
            _log(f"{QEMU_SCENARIO} failed: {qemu['error']}")
    if qemu_link:
        from benchmarks import qemu_guest
        reps = int(getattr(args, "qemu_reps", None) or os.environ.get("MIGRATE_BENCH_QEMU_REPS") or 2)
        name_q = f"{QEMU_SCENARIO}-link{qemu_link}"
        _log(f"{name_q}: this engine vs QEMU post-copy-preempt over the {qemu_link} link, {reps} repetitions")
        qemu = {"scenario": name_q, **qemu_guest.bench_link(qemu_link, reps=reps, mem_mb=512, log=_log)}
        if qemu.get("error"):
            _log(f"{name_q} failed: {qemu['error']}")
    hints: dict = {"skipped": "not chosen by --scenario"}
    if not args.matrix and (not filters or any("hints" in f for f in filters)):
        hints = _hints()
    pre: dict = {"skipped": "not asked for (bench --precopy)"}
    if getattr(args, "precopy", False):
        from benchmarks import precopy
        _log("precopy: the simulated guest writing 256 pages every 100 ms, pre-copy then post-copy, 512 MiB")
        pre = precopy.bench(_log)
    r, prov = report.ratios(fl, results, qemu, hints)
    if pre.get("precopy_fault_fraction") is not None and pre.get("ok"):
        r["precopy_sim_fault_fraction"] = pre["precopy_fault_fraction"]
        r["precopy_sim_guest_slowdown"] = pre["precopy_guest_slowdown"]
        prov["precopy_sim_fault_fraction"] = "precopy (guestsim, 512 MiB tmpfs) dest demand_requests / pages_total"
        prov["precopy_sim_guest_slowdown"] = "precopy source guest write loop ms during pre-copy / before it attached"
    # The pre-copy keys the issue names: the QEMU guest's when it ran (bench
    # --qemu --precopy, where QEMU's dirty logging is measured the same way),
    # else the simulated guest's
    if r.get("qemu_precopy_fault_fraction") is not None:
        r["precopy_fault_fraction"] = r["qemu_precopy_fault_fraction"]
        r["precopy_guest_slowdown"] = r.get("qemu_precopy_guest_slowdown")
        prov["precopy_fault_fraction"] = "= qemu_precopy_fault_fraction (the QEMU guest)"
        prov["precopy_guest_slowdown"] = "= qemu_precopy_guest_slowdown (the QEMU guest; QEMU's own: " \
                                         "qemu_dirty_log_guest_slowdown)"
    elif r.get("precopy_sim_fault_fraction") is not None:
        r["precopy_fault_fraction"] = r["precopy_sim_fault_fraction"]
        r["precopy_guest_slowdown"] = r["precopy_sim_guest_slowdown"]
        prov["precopy_fault_fraction"] = prov["precopy_sim_fault_fraction"]
        prov["precopy_guest_slowdown"] = prov["precopy_sim_guest_slowdown"]
    doc = {
        "name": name,
        "git_head": _git_head(),
        "code_start": code0,
        "code_end": scenarios.code_version(),
        "quick": quick,
        "seconds": round(time.monotonic() - t0, 1),
        "host": {"when": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                 "kernel": platform.release(), "python": platform.python_version(),
                 "loadavg_start": load0, "loadavg_end": list(os.getloadavg())},
        "ratios": r,
        "targets": report.verdicts(r),
        "provenance": prov,
        "floors": fl,
        "scenarios": results,
        "qemu": qemu,
        "hints": hints,
        "precopy": pre,
    }
    if profile:
        doc["profiles"] = {}
        for sc in sorted(profile):
            d = {who: (_perf_summary if scenarios.PROFILER == "perf" else _profile_summary)(
                     os.path.join(prof_root, sc, f"{who}.perf.data" if scenarios.PROFILER == "perf" else f"{who}.txt"))
                 for who in ("dest", "source")}
            doc["profiles"][sc] = d
    os.makedirs(outdir, exist_ok=True)
    pngs = []
    if not args.no_plots:
        try:
            pngs = report.plots(outdir, name, fl, results, hints=hints)
        except ImportError as e:
            _log(f"no plots: {e} (pip install matplotlib, or the [bench] extra)")
    doc["seconds"] = round(time.monotonic() - t0, 1)
    jpath, mpath = report.write(outdir, name, doc)
    _log(f"wrote {jpath}, {mpath}" + "".join(f", {p}" for p in pngs))
    failed = [x["scenario"] for x in results if not x.get("ok") and not x.get("skipped")]
    if qemu.get("error"):
        failed.append(qemu["scenario"])
    if hints.get("error"):
        failed.append("hints")
    if pre.get("error") or pre.get("ok") is False:
        failed.append("precopy")
    line = {**r, "targets_met": sum(1 for v in doc["targets"].values() if v["met"]),
            "targets_missed": [k for k, v in doc["targets"].items() if v["met"] is False],
            "scenarios_failed": failed, "seconds": doc["seconds"], "json": jpath, "markdown": mpath}
    if args.json:
        print(json.dumps(line))
    else:
        print(report.markdown(report.public(doc)))
    return 1 if failed else 0

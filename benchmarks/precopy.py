"""Pre-copy, then post-copy, with the simulated guest (`migrate bench
--precopy`): the source guest (guestsim --role source) writes 256 pages every
100 ms throughout, as issue 20's QEMU guest does; the destination guest
reads all of its memory after the switch.

Reported: precopy_fault_fraction (demand faults after the switch / the
guest's pages: the guest runs only after the switch, so every demand fault
is after it), the rounds and their pages, the write tracking's costs
(protect-all, scan per round), the switch's parts, and the source guest's
slowdown (its own write loop time during pre-copy / with no migration, same
process, timed before it attached).
"""

from __future__ import annotations

import statistics
import tempfile

SIZE = 512 << 20
WRITE_PAGES = 256
WRITE_EVERY_MS = 100.0


def measure(size: int = SIZE, backing: str = "tmpfs", log=print) -> dict:
    from migrate.sim.localrun import PrecopyMigration

    with tempfile.TemporaryDirectory(prefix="migrate-bench-precopy-") as d, \
            PrecopyMigration(d, size, backing=backing, seed=20, write_pages=WRITE_PAGES,
                             write_every_ms=WRITE_EVERY_MS) as lm:
        out = lm.run(600)
        if "failed" in out:
            return {"error": out["failed"]}
        g, s, dst, sg = out["guest"], out["source"], out["dest"], out["source_guest"]
        ok = bool(g["verified"] and g["ram_sha256"] == sg["ram_sha256"])
        rounds = s["rounds"]
        sw = next(e for e in lm.source.lines if e.get("event") == "switch")
        mapped = next((e for e in lm.dest.lines if e.get("event") == "precopy_mapped"), {})
    npages = dst["pages_total"]
    res = {
        "ok": ok, "size": size, "backing": backing, "pages_total": npages,
        "write_pages": WRITE_PAGES, "write_every_ms": WRITE_EVERY_MS,
        "precopy_fault_fraction": round(dst["demand_requests"] / npages, 6),
        "demand_faults_after_switch": dst["demand_requests"],
        "rounds": len(rounds), "pages_per_round": [r["pages_sent"] for r in rounds],
        "written_per_round": [r["pages_written"] for r in rounds],
        "round1_gbps": rounds[0]["gbps"],
        "protect_all_ms": s["precopy_protect_ms"],
        "scan_ms_median": statistics.median(r["scan_ms"] for r in rounds),
        "scan_ms_max": max(r["scan_ms"] for r in rounds),
        "final_written": s["precopy_final_written"], "switch_reason": sw["reason"],
        "pause_ms": sw["pause_ms"], "final_scan_ms": sw["final_scan_ms"], "switch_ms": sw["switch_ms"],
        "dest_map_ms": mapped.get("map_ms"),
        "source_seconds": s["seconds"],
        "precopy_guest_slowdown": round(sg["precopy_loop_ms"] / sg["baseline_loop_ms"], 3)
        if sg.get("precopy_loop_ms") and sg.get("baseline_loop_ms") else None,
        "guest_loop_ms": sg.get("precopy_loop_ms"), "guest_baseline_loop_ms": sg.get("baseline_loop_ms"),
    }
    log(f"precopy: {backing} {size >> 20} MiB, {res['rounds']} rounds {res['pages_per_round']}, "
        f"{res['final_written']} written at the switch ({res['switch_reason']}), "
        f"{res['demand_faults_after_switch']} demand faults after it (fraction {res['precopy_fault_fraction']}), "
        f"switch {res['switch_ms']} ms, guest slowdown {res['precopy_guest_slowdown']}, "
        f"{'verified' if ok else 'NOT VERIFIED'}")
    return res


def bench(log=print) -> dict:
    try:
        return measure(log=log)
    except Exception as e:  # noqa: BLE001 - a broken measurement must not end the run
        log(f"precopy: ERROR {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    import json
    print(json.dumps(measure()))

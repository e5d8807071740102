"""The benchmark's guest: `migrate guestsim` plus what a benchmark needs to see.

Same attach, same C vCPU threads and byte-for-byte verification as
migrate.sim.guestsim, and the same summary keys, and in addition:
- the raw per-page first-access latencies (--lat-out, uint32 ns), so the report
  can draw CDFs and take percentiles over the pages that really faulted;
- a timeline of guest RAM over time (--timeline-out): pages present in the
  guest's page tables (/proc/self/pagemap: mapped), sampled every 100 ms (the
  page cache is not sampled: the agent allocates all of it before the start);
- pattern "idle": the guest touches nothing until the agent says the migration
  is complete, then verifies every page. That isolates background push.

Run as a script (`python benchmarks/guest.py ...`) by benchmarks.scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no spinning BLAS threads beside the vCPUs
import numpy as np  # noqa: E402

from migrate._binding import ffi, lib
from migrate.memory import Backing, GuestMemory
from migrate.report import Reporter, percentile
from migrate.sim.guestsim import PATTERNS
from migrate.sim.ramimage import ImageSpec
from migrate.uffd import Userfaultfd
from migrate.wire.attach import GuestLink, Region

SAMPLE_S = 0.1


class Residency:
    """Samples how much of guest RAM is mapped in this process."""

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size
        self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self):
        mapped = -1
        try:
            raw = os.pread(self.pagemap.fileno(), (self.size // 4096) * 8, (self.addr // 4096) * 8)
            mapped = int(((np.frombuffer(raw, np.uint64) >> np.uint64(63)) & np.uint64(1)).sum())
        except OSError:
            pass
        self.samples.append((time.monotonic(), mapped * 4096))

    def _loop(self):
        while not self.stop.wait(SAMPLE_S):
            self.sample()

    def start(self):
        self.sample()
        self.thread.start()

    def finish(self) -> list[tuple[float, int]]:
        self.stop.set()
        self.thread.join(2)
        self.sample()
        self.pagemap.close()
        return self.samples


def run(args, rep: Reporter) -> dict:
    spec = ImageSpec(args.seed, args.zero_fraction, args.random_fraction)
    mem = GuestMemory.create(Backing(args.backing), args.size, name="bench-guest", map_alias=False)
    try:
        uffd = Userfaultfd.create()
        link = GuestLink(args.attach, uffd.fd, mem.fd, page_size=mem.page_size, ram_size=args.size,
                         regions=[Region(mem.guest_addr, args.size, 0)], backing=args.backing,
                         name="bench-guest")
        t_attach = time.monotonic()
        rep.event("attached", "", size=args.size, page_size=mem.page_size, backing=args.backing, t=t_attach)
        # as guestsim does: the vCPUs start when a source is serving (switchover)
        if not link.wait_switchover(600):
            raise RuntimeError("the agent closed the attach socket before any source connected")
        res_sampler = Residency(mem.guest_addr, args.size) if args.timeline_out else None
        if res_sampler:
            res_sampler.start()
        npages = args.size // mem.page_size
        complete = None
        if args.pattern == "idle":
            complete = link.wait_complete(args.wait_complete)
        lat = ffi.new("uint32_t[]", npages)
        res = ffi.new("struct mg_guestsim_result *")
        t0 = time.monotonic()
        rc = lib.mg_guestsim_run(ffi.cast("uint8_t *", mem.guest_addr), args.size, mem.page_size, spec.seed,
                                 spec.zero_ppm, spec.random_ppm, PATTERNS.get(args.pattern, 0), args.vcpus,
                                 lat, res)
        seconds = time.monotonic() - t0
        if rc < 0:
            raise OSError(-rc, "guestsim could not start its vCPU threads")
        raw = np.frombuffer(ffi.buffer(lat, npages * 4), np.uint32).copy()
        if args.lat_out:
            raw.tofile(args.lat_out)
        lat_us = np.sort(raw) / 1000.0
        if complete is None:
            complete = link.wait_complete(args.wait_complete)
        t_done = time.monotonic()
        if res_sampler:
            samples = res_sampler.finish()
            with open(args.timeline_out, "w") as f:
                json.dump({"t_attach": t_attach, "t_complete_seen": t_done, "samples": samples}, f)
        link.close()
        uffd.close()
        return {
            "verified": res.mismatches == 0,
            "mismatches": res.mismatches,
            "first_bad_unit": res.first_bad_unit if res.mismatches else None,
            "pages_total": npages,
            "page_size": mem.page_size,
            "pattern": args.pattern,
            "vcpus": args.vcpus,
            "access_p50_us": round(percentile(lat_us, 50), 2),
            "access_p99_us": round(percentile(lat_us, 99), 2),
            "access_p999_us": round(percentile(lat_us, 99.9), 2),
            "access_max_us": round(float(lat_us[-1]), 2) if len(lat_us) else 0,
            "seconds": round(seconds, 3),
            "t_attach": t_attach,
            "migration_complete": complete,
        }
    finally:
        mem.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/guest.py")
    p.add_argument("--attach", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--backing", default="tmpfs")
    p.add_argument("--pattern", choices=[*PATTERNS, "idle"], default="seq")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--zero-fraction", type=float, default=0.3)
    p.add_argument("--random-fraction", type=float, default=0.3)
    p.add_argument("--lat-out")
    p.add_argument("--timeline-out")
    p.add_argument("--wait-complete", type=float, default=300.0)
    args = p.parse_args(argv)
    rep = Reporter(True, "bench-guest")
    try:
        s = run(args, rep)
    except Exception as e:  # noqa: BLE001 - reported to the harness, which shows it
        rep.event("error", f"{type(e).__name__}: {e}")
        return 2
    rep.summary(s, "")
    return 0 if s["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())

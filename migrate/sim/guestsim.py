"""The simulated VM: a separate process that creates guest RAM and a
userfaultfd, attaches to the destination agent, then touches memory from N vCPU
threads (in C, without the GIL), verifying every byte against the image the
source holds and timing each page's first access."""

from __future__ import annotations

import bisect
import time

from migrate._binding import ffi, lib
from migrate.memory import Backing, GuestMemory
from migrate.report import Reporter, percentile
from migrate.sim.ramimage import ImageSpec
from migrate.sim.writer import ram_digest
from migrate.sim.writer import verify as verify_written
from migrate.uffd import Userfaultfd
from migrate.wire.attach import AttachError, GuestLink, Region

PATTERNS = {"seq": 0, "random": 1, "hotset": 2}
#: A first access slower than this waited on a fault: a mapped page takes well
#: under 1 us, the kernel's own fault round trip alone is about 6 us here.
FAULTED_US = 3.0


def run(attach: str, size: int, backing: str, spec: ImageSpec, pattern: str, vcpus: int,
        reporter: Reporter, name: str = "guestsim", wait_complete: float = 60.0,
        start_on: str = "switchover", writes: bool = False) -> dict:
    """writes: the source guest wrote while pre-copy ran (guestsim --role
    source, migrate.sim.writer): verify against its generation table rather
    than the image alone, and report the RAM's digest."""
    if pattern not in PATTERNS:
        raise ValueError(f"--pattern {pattern!r}: use one of {', '.join(PATTERNS)}")
    if vcpus < 1 or vcpus > 256:
        raise ValueError(f"--vcpus {vcpus}: use 1 to 256")
    mem = GuestMemory.create(Backing(backing), size, name=name, map_alias=False)
    try:
        # The guest keeps this uffd for its whole life: if the agent dies, our
        # faulting threads stay blocked instead of reading zeros.
        uffd = Userfaultfd.create()
        link = GuestLink(attach, uffd.fd, mem.fd, page_size=mem.page_size, ram_size=size,
                         regions=[Region(mem.guest_addr, size, 0)], backing=backing, name=name,
                         reporter=reporter)
        reporter.event("attached", f"{size} bytes of {backing} at {mem.guest_addr:#x} attached to {attach}",
                       size=size, page_size=mem.page_size, backing=backing)
        if start_on == "switchover":
            # like a VM resumed on the destination: run once a source serves pages
            if not link.wait_switchover(600):
                raise AttachError("no source started serving within 600 s")
            reporter.event("running", "switchover: the vCPUs start")
        npages = size // mem.page_size
        lat = ffi.new("uint32_t[]", npages)
        res = ffi.new("struct mg_guestsim_result *")
        t0 = time.monotonic()
        rc = lib.mg_guestsim_run(ffi.cast("uint8_t *", mem.guest_addr), size, mem.page_size, spec.seed,
                                 spec.zero_ppm, spec.random_ppm, PATTERNS[pattern], vcpus, lat, res)
        seconds = time.monotonic() - t0
        if rc < 0:
            raise OSError(-rc, "guestsim could not start its vCPU threads")
        lat_us = sorted(x / 1000.0 for x in ffi.unpack(lat, npages))
        waited = lat_us[bisect.bisect_right(lat_us, FAULTED_US):]
        summary = {
            "verified": res.mismatches == 0,
            "mismatches": res.mismatches,
            "first_bad_unit": res.first_bad_unit if res.mismatches else None,
            "pages_total": npages,
            "page_size": mem.page_size,
            "pattern": pattern,
            "vcpus": vcpus,
            "access_p50_us": round(percentile(lat_us, 50), 2),
            "access_p99_us": round(percentile(lat_us, 99), 2),
            "access_p999_us": round(percentile(lat_us, 99.9), 2),
            "access_max_us": round(lat_us[-1], 2) if lat_us else 0,
            # pages whose first access waited on a fault, as the guest saw them
            "faults_observed": len(waited),
            "fault_p50_us": round(percentile(waited, 50), 2),
            "fault_p99_us": round(percentile(waited, 99), 2),
            "seconds": round(seconds, 3),
        }
        if writes:
            # every page was touched (and so received): check what the source's writer left
            v = verify_written(mem.guest_addr, size, mem.page_size, spec)
            summary.update(verified=v["mismatches"] == 0, mismatches=v["mismatches"],
                           first_bad_unit=None, first_bad_page=v["first_bad_page"],
                           pages_written=v["pages_written"], ram_sha256=ram_digest(mem.guest_addr, size))
        # The agent says "complete" once every page is received and mapped.
        summary["migration_complete"] = link.wait_complete(wait_complete)
        for key in ("pages_demand", "pages_pushed", "pages_zero", "pages_prior"):
            summary[key] = link.final.get(key)   # how the agent says the pages arrived
        summary["agent_reattaches"] = link.reattaches
        link.close()
        uffd.close()
        return summary
    finally:
        mem.close()

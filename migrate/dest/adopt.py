"""A guest re-attaching after its agent died: what the dead agent left behind
is adopted, never redone. Its userfaultfd was set up already, and the pages
mapped in the guest were placed by it and may hold the guest's own writes
since (DESIGN.md invariant 2), so they are read from /proc/PID/pagemap and
recorded as placed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from migrate.dest.faultspace import FaultSpace, SpaceRegion
from migrate.errors import UffdError
from migrate.uffd import Userfaultfd


def api_once(uffd: Userfaultfd, reattach: bool) -> None:
    """UFFDIO_API on the guest's userfaultfd."""
    try:
        uffd.api()
    except UffdError as e:
        # UFFDIO_API works once per userfaultfd: a guest re-attaching after
        # its agent died brings one that the first agent already set up.
        if not (reattach and e.errno == errno.EINVAL):
            raise


def mapped_runs(pid: int, addr: int, npages: int, page_size: int) -> Iterator[tuple[int, int]]:
    """Yields (first, count) runs of pages of [addr, addr + npages * page_size)
    that are mapped in process pid, read from /proc/PID/pagemap (bit 63: present;
    one 8-byte entry per 4 KiB, the first of a huge page stands for it)."""
    step = page_size // 4096
    run_start = None
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        chunk = 65536
        for base in range(0, npages, chunk):
            n = min(chunk, npages - base)
            f.seek((addr // 4096 + base * step) * 8)
            raw = f.read(n * step * 8)
            entries = memoryview(raw).cast("Q")
            for i in range(n):
                present = entries[i * step] >> 63
                if present and run_start is None:
                    run_start = base + i
                elif not present and run_start is not None:
                    yield run_start, base + i - run_start
                    run_start = None
    if run_start is not None:
        yield run_start, npages - run_start


def adopt_prior_pages(pid: int, space: FaultSpace, uffd: Userfaultfd, regions: list[SpaceRegion]) -> int:
    """Every page mapped in the guest's address space is recorded as placed
    and never written again. Pages in the page cache but not mapped are not
    trusted (a write may have been cut short): they are fetched again. Then
    every waiter is woken, since the dead agent may have read faults it never
    answered; a vCPU whose page is still missing simply faults again. Returns
    how many pages were adopted."""
    prior = 0
    for r in regions:
        for first, count in mapped_runs(pid, r.guest_addr, r.npages, space.page_size):
            prior += space.mark_prior(r.first_page + first, count)
    for r in regions:
        uffd.wake(r.guest_addr, r.npages * space.page_size)
    return prior

"""Pre-copy, then post-copy (issue 20): the source guest's writes tracked with
async write-protect and PAGEMAP_SCAN, rounds of pages while it runs, the
switch with the final written list, and the failures of each side."""

from __future__ import annotations

import os
import random

import pytest

from migrate.memory import GuestMemory
from migrate.pagestate import PageBitmap
from migrate.source.wp import WriteTracker
from migrate.uffd import Userfaultfd
from migrate.wire.attach import Region

pytestmark = pytest.mark.timeout(120)

BACKINGS = ["tmpfs", pytest.param("hugetlbfs", marks=pytest.mark.huge)]


def need_wp(host, backing, huge_free, pages=16):
    why = host.why_not("wp_async")
    if why:
        pytest.skip(why)
    if backing.startswith("hugetlbfs") and huge_free < pages:
        pytest.skip(f"{pages} free 2 MiB huge pages needed, {huge_free} could be reserved")


@pytest.mark.parametrize("backing", BACKINGS)
def test_scan_returns_the_pages_written_since_the_last_scan(host, huge_pages, backing):
    need_wp(host, backing, huge_pages)
    size = 32 << 20
    mem = GuestMemory.create(backing, size, map_alias=False)
    uffd = Userfaultfd.create()
    tracker = WriteTracker(uffd, os.getpid(), [Region(mem.guest_addr, size, 0)], mem.page_size)
    try:
        tracker.protect_all()
        view = mem.guest_view(0, size)
        npages = size // mem.page_size
        # a page written before protect_all and not since is not reported
        first = random.Random(1).sample(range(npages), npages // 3)
        for p in first:
            view[p * mem.page_size + 17] = b"\x01"
        r = tracker.scan()
        assert r.pages == len(first)
        assert sorted(p for p, n in r.written.runs() for p in range(p, p + n)) == sorted(first)
        # nothing written since: nothing reported, and the pages are protected again
        assert tracker.scan().pages == 0
        view[5 * mem.page_size + mem.page_size - 1] = b"\x02"
        r = tracker.scan()
        assert list(r.written.runs()) == [(5, 1)]
        # into: the scan adds to a bitmap it is given
        acc = PageBitmap(npages)
        acc.set(0)
        view[7 * mem.page_size] = b"\x03"
        assert tracker.scan(acc).pages == 1
        assert list(acc.runs()) == [(0, 1), (7, 1)]
    finally:
        tracker.close()
        # unprotected: the guest writes on, and nothing is tracked or blocked
        mem.guest_view(0, size)[0] = b"\x04"
        uffd.close()
        mem.close()

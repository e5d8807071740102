"""The destination during pre-copy (`Hello.precopy`): the source guest still
runs, so what arrives is a draft. Pages are written into the RAM file's page
cache through the alias and never mapped; a page sent again overwrites its
bytes. At the switch the source's final written list names the pages whose
draft is stale: every other staged page becomes received and is mapped in one
pass, and the listed ones stay unreceived, to be fetched again on demand or by
the push. From then on the migration is an ordinary post-copy one
(docs/precopy.md).

A source lost before the switch leaves nothing behind that matters: no page
was mapped or recorded as received, and the RAM file's bytes of an unreceived
page are never shown to the guest (the next source's copy overwrites them
before it is mapped).
"""

from __future__ import annotations

import threading
import time

from migrate import host
from migrate.dest.faultspace import FaultSpace
from migrate.errors import ProtocolError
from migrate.pagestate import PageBitmap
from migrate.wire.protocol import DecodedBatch


class Precopy:
    """One pre-copy source's staged pages. Thread-safe: Precopy streams write
    while Switch may come; the switch happens once."""

    def __init__(self, space: FaultSpace):
        self.space = space
        self.npages = space.npages
        self.staged = PageBitmap(self.npages)
        self.lock = threading.Lock()
        self.switched = False
        self.switched_event = threading.Event()   # set with switched (migrate.qemu.dest waits on it)
        self.pages_in = 0           # pages written, repeats included
        self.t_start = time.monotonic()
        self.commit_s: float | None = None   # how long the switch's commit took
        self.map_s: float | None = None      # and the mapping after it
        self.map_tid: int | None = None      # the mapping's thread while it maps
        self.hurried = False                 # hurry() came

    def write(self, dec: DecodedBatch) -> int:
        """A checked pre-copy batch (BatchDecoder): into the page cache only."""
        with self.lock:
            if self.switched:
                raise ProtocolError("pre-copy pages after the switch: a source sends Precopy batches only "
                                    "before its Switch")
            n = self.space.precopy_write(self.staged, dec.pages, dec.zero, dec.data)
            self.pages_in += n
            return n

    def written_list(self, written) -> PageBitmap:
        """The final written list, checked: at most the guest's page count,
        ascending, each page once and inside the layout."""
        n = len(written)
        if n > self.npages:
            raise ProtocolError(f"Switch lists {n} written pages, more than the guest's {self.npages}")
        bits = PageBitmap(self.npages)
        prev = -1
        for i, p in enumerate(written):
            if p >= self.npages:
                raise ProtocolError(f"Switch lists written page {p} (entry {i}), outside the layout of "
                                    f"{self.npages} pages")
            if p <= prev:
                raise ProtocolError(f"Switch lists written page {p} after page {prev} (entry {i}): the list "
                                    "must be strictly ascending")
            prev = p
        for first, count in _runs(written):
            bits.set(first, count)
        return bits

    def switch(self, written) -> tuple[int, int]:
        """The switch: commits every staged page not in written (checked
        first, before anything changes): they are received, and map() maps
        them. Returns (pages received, pages to fetch again). A second switch
        is refused."""
        bits = self.written_list(written)
        with self.lock:
            if self.switched:
                raise ProtocolError("a second Switch: a session switches from pre-copy once")
            self.switched = True
            t0 = time.monotonic()
            n = self.space.precopy_commit(self.staged, bits)
            self.commit_s = time.monotonic() - t0
        self.switched_event.set()
        return n, len(written)

    def map(self) -> int:
        """Maps what the switch made received, in one pass (UFFDIO_CONTINUE
        over each run). Not on the switch's path: the guest may run
        meanwhile, and a fault on a received page is mapped at once by the
        fault loop (EEXIST between the two is the usual race). The caller
        runs it at background priority until hurry()."""
        t0 = time.monotonic()
        with self.lock:
            self.map_tid = threading.get_native_id()
            hurried = self.hurried
        if hurried:
            host.normal_priority()
        try:
            n = self.space.map(0, self.npages)
        finally:
            with self.lock:
                self.map_tid = None
        self.map_s = time.monotonic() - t0
        return n

    def hurry(self) -> None:
        """The destination guest runs (its QEMU loaded the device state): what
        the mapping yielded the CPU to is over, and the migration completes
        only once it is done, so it runs at normal priority from here."""
        with self.lock:
            self.hurried = True
            tid = self.map_tid
        if tid is not None:
            host.normal_priority(tid)


def _runs(pages):
    """(first, count) of consecutive pages in an ascending list."""
    first = prev = None
    for p in pages:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if first is not None:
            yield first, prev - first + 1
        first = prev = p
    if first is not None:
        yield first, prev - first + 1

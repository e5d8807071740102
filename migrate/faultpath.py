"""The destination's fault path: page state, placement and the fault loop.

The hot parts run in C with the GIL released (native/fault.c); this module owns
the memory they use and turns their errnos into exceptions. Placement follows
the invariants of DESIGN.md: a page is claimed before it is written (so a
duplicate is dropped and a placed page is never written again), recorded as
received only after all of its bytes are in the page cache, and only then mapped.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import UffdError
from migrate.pagestate import PageBitmap
from migrate.uffd import Userfaultfd

MODE_CONTINUE = "continue"
MODE_COPY = "copy"


@dataclass(frozen=True)
class SpaceRegion:
    guest_addr: int    # in the guest's address space
    first_page: int    # file offset // page_size
    npages: int


class FaultSpace:
    """Owns the bitmaps and the struct the C fault path reads. The uffd and the
    alias mapping are borrowed: they must outlive this object."""

    def __init__(self, uffd: Userfaultfd, page_size: int, npages: int, regions: list[SpaceRegion],
                 alias_addr: int, mode: str = MODE_CONTINUE):
        if len(regions) > lib.MG_MAX_REGIONS:
            raise ValueError(f"{len(regions)} regions: at most {lib.MG_MAX_REGIONS} are supported")
        if mode not in (MODE_CONTINUE, MODE_COPY):
            raise ValueError(f"placement mode {mode!r}: use 'continue' or 'copy'")
        self.uffd = uffd
        self.page_size = page_size
        self.npages = npages
        self.mode = mode
        self.regions = list(regions)
        self.received = PageBitmap(npages)
        self.mapped = PageBitmap(npages)
        self.claimed = PageBitmap(npages)
        s = ffi.new("struct mg_space *")
        s.uffd = uffd.fd
        s.mode = lib.MG_PLACE_COPY if mode == MODE_COPY else lib.MG_PLACE_CONTINUE
        s.page_size = page_size
        s.npages = npages
        s.alias_base = alias_addr
        s.received = self.received.words
        s.mapped = self.mapped.words
        s.claimed = self.claimed.words
        s.nregions = len(regions)
        for i, r in enumerate(regions):
            s.regions[i].guest_addr = r.guest_addr
            s.regions[i].first_page = r.first_page
            s.regions[i].npages = r.npages
        self._s = s
        self._bad = ffi.new("uint64_t *")

    # -- addresses --------------------------------------------------------
    def page_of(self, guest_addr: int) -> int | None:
        p = lib.mg_space_page_of(self._s, guest_addr)
        return None if p < 0 else p

    def addr_of(self, page: int) -> int:
        return lib.mg_space_addr_of(self._s, page)

    # -- placement --------------------------------------------------------
    def place(self, pages, data: bytes | memoryview, offsets, zero) -> list[int]:
        """Places pages[i] from data[offsets[i]:] (or zeros where zero[i]).
        Returns a flag per page: 1 if this call placed it, 0 for a duplicate
        (dropped: the first copy won and may already be the guest's)."""
        n = len(pages)
        if n == 0:
            return []
        c_pages = ffi.new("uint64_t[]", pages)
        c_offs = ffi.new("uint64_t[]", offsets)
        c_zero = ffi.new("uint8_t[]", zero)
        placed = ffi.new("uint8_t[]", n)
        buf = ffi.from_buffer(data) if len(data) else ffi.NULL
        rc = lib.mg_place_pages(self._s, c_pages, n, buf, c_offs, c_zero, placed, self._bad)
        if rc < 0:
            self._raise("place" if self.mode == MODE_CONTINUE else "copy", rc, self._bad[0])
        return list(ffi.unpack(placed, n))

    def claim_run(self, first: int, count: int) -> bool:
        """Claims [first, first+count) for a caller that writes the alias itself."""
        return bool(lib.mg_claim_run(self._s, first, count))

    def mark_received(self, first: int, count: int) -> None:
        """After the caller wrote a claimed run through the alias."""
        self.received.set(first, count)

    def map(self, first: int = 0, count: int | None = None) -> int:
        """Maps received, unmapped pages of the range. Returns pages newly mapped."""
        count = self.npages - first if count is None else count
        rc = lib.mg_map_pages(self._s, first, count, self._bad)
        if rc < 0:
            self._raise("continue", rc, self._bad[0])
        return rc

    # -- faults -----------------------------------------------------------
    def serve(self, stop_fd: int, max_pages: int = 64, timeout_ms: int = 1000) -> list[int] | None:
        """Blocks (GIL released) until faults need the source. Returns their pages,
        [] on timeout, None when stop_fd fired."""
        need = ffi.new("uint64_t[]", max_pages)
        rc = lib.mg_fault_serve(self._s, stop_fd, need, max_pages, timeout_ms)
        if rc == -errno.ESHUTDOWN:
            return None
        if rc < 0:
            raise UffdError("serve faults", -rc, detail="reading the userfaultfd failed")
        return [need[i] for i in range(rc)]

    @property
    def stats(self) -> dict:
        st = self._s.stats
        return {k: getattr(st, k) for k in ("faults", "minor", "fast", "requested", "outside",
                                            "eexist", "mapped_pages", "map_calls")}

    def complete(self) -> bool:
        return self.received.full() and self.mapped.full()

    def _raise(self, op: str, rc: int, page: int):
        addr = self.addr_of(page)
        raise UffdError(op, -rc, addr, self.page_size, f"page {page}")


def make_stop_fd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

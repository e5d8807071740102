"""The source's demand channel: the C server that answers the destination's
faults (struct mg_demand_src, GIL released), and what it is given ahead of
them: the RAM file's holes, sent as zero pages without being read, and the
zero blocks of large pages, found before a fault asks for one. The session
(migrate.source.session) opens the channel, runs serve() and the walks here
on threads of its own and decides what their ends mean."""

from __future__ import annotations

import os
import socket
import threading
import time

from migrate._binding import ffi, lib
from migrate.errors import SourceError
from migrate.host import fault_path_priority
from migrate.pagestate import PageBitmap
from migrate.report import Reporter
from migrate.source.ramfile import RamImage
from migrate.source.scheduler import READAHEAD_BYTES, Scheduler


def _holes_found(n: int, npages: int) -> str:
    return (f"{n} of {npages} pages are holes in the RAM file (never written): sent as zero pages without "
            "reading them")


class DemandServer:
    """One session's demand server. `d`, its struct, is also read by the push
    streams (the busy flag) and by the session's result (its counters); `r`,
    the RAM as the C senders read it (holes, zero-block scan), is shared with
    the raw push. Both live as long as this object."""

    def __init__(self, sock: socket.socket, ram: RamImage, sched: Scheduler, reporter: Reporter):
        self.ram = ram
        self.reporter = reporter
        # the RAM as the C senders (this server and the raw push) read it
        r = self.r = ffi.new("struct mg_src_ram *")
        r.base = ram.addr              # the RAM image's mapping, which outlives the session
        r.page_size = ram.page_size
        r.npages = ram.npages
        d = self.d = ffi.new("struct mg_demand_src *")
        d.fd = sock.fileno()           # the session's socket: closed by it once serve() has returned
        d.ram = r                      # r lives as long as this object
        d.sent = sched.sent.words      # the scheduler's bitmap: it lives as long as the session
        d.max_window = max(2, READAHEAD_BYTES // ram.page_size)
        # what interrupt() writes to stop serve(); closed by close()
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # r.holes, r.block_bits and r.scanned point into these, kept here
        self.holes: PageBitmap | None = None    # pages sent unread as zero
        self._block_bits = None
        self._scanned: PageBitmap | None = None

    def serve(self) -> int:
        """Answers demand requests until the destination closes the channel (0),
        interrupt() (-ESHUTDOWN), a request outside the layout (-EPROTO, the
        page in d.bad_page) or a failure (-errno)."""
        fault_path_priority()
        return lib.mg_demand_serve(self.d, self.stop_fd)

    def interrupt(self) -> None:
        os.eventfd_write(self.stop_fd, 1)

    def close(self) -> None:
        os.close(self.stop_fd)

    # -- holes --------------------------------------------------------------
    def take_holes(self, gated: bool) -> bool:
        """Pages in holes of the RAM file go as zero pages without being read
        (reading them would allocate them), once the RAM no longer changes:
        ungated, that was so when the file was opened; gated, find_holes walks
        the file once the gate opens, and pages past its walk are read
        meanwhile (a walk before the push took 10 ms per GiB of data). Returns
        whether find_holes is to run."""
        if gated:
            self.holes = PageBitmap(self.ram.npages)
            self.r.holes = self.holes.words
            return True
        if self.ram.open_holes is not None:
            self.holes = self.ram.open_holes
            self.r.holes, self.r.holes_end = self.holes.words, self.ram.npages
            n = self.holes.count()
            self.reporter.event("holes", _holes_found(n, self.ram.npages), pages=n)
        return False

    def find_holes(self) -> None:
        """Walks the RAM file's holes into the bitmap, advancing r.holes_end as
        it goes (C, GIL released). A failure only means pages are read."""
        t = time.monotonic()
        try:
            found = self.ram.holes(self.holes, ffi.addressof(self.r, "holes_end"))
        except SourceError as e:
            self.reporter.event("holes", f"{e}: every page is read", pages=0)
            return
        finally:
            self.r.holes_end = self.ram.npages
        n = found.count() if found else 0
        if n:
            self.reporter.event("holes", f"{_holes_found(n, self.ram.npages)} (found in "
                                f"{(time.monotonic() - t) * 1e3:.1f} ms)", pages=n)

    # -- zero blocks of large pages -----------------------------------------
    def go_sparse(self) -> bool:
        """Sends large pages without their zero blocks (the destination agreed
        to blocks of MG_BLOCK); finding those means reading them, so
        scan_blocks does it ahead of the faults. False for pages no larger than
        a block: they stay dense."""
        ram = self.ram
        if ram.page_size <= lib.MG_BLOCK:
            return False
        self.r.block_size = lib.MG_BLOCK
        self._block_bits = ffi.new("uint8_t[]", ram.npages * (ram.page_size // lib.MG_BLOCK // 8))
        self._scanned = PageBitmap(ram.npages)
        self.r.block_bits = self._block_bits
        self.r.scanned = self._scanned.words
        return True

    def scan_blocks(self, stop: threading.Event, chunk: int = 16) -> None:
        """Finds the zero blocks of every large page ahead of its demand, in C
        (GIL released). Only for RAM that no longer changes."""
        for first in range(0, self.ram.npages, chunk):
            if stop.is_set():
                return
            lib.mg_scan_blocks(self.r, first, chunk)

"""The destination's fault path: page state, placement and the fault loop.

The hot parts run in C with the GIL released (native/dest_*.c); this module owns
the memory they use and turns their errnos into exceptions. Placement follows
the invariants of DESIGN.md: a page is claimed before it is written (so a
duplicate is dropped and a placed page is never written again), recorded as
received only after all of its bytes are in the page cache, and only then mapped.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import MemoryBackendError, ProtocolError, UffdError, fmt_size
from migrate.pagestate import PageBitmap
from migrate.uffd import Userfaultfd
from migrate.wire.tcp import ChannelEnd, channel_end

MODE_CONTINUE = "continue"
ZSTD_ERROR_WINDOW_TOO_LARGE = 16   # zstd's ZSTD_error_frameParameter_windowTooLarge (a stable code)
MODE_COPY = "copy"


@dataclass(frozen=True)
class SpaceRegion:
    guest_addr: int    # in the guest's address space
    first_page: int    # file offset // page_size
    npages: int


def _anon_array(ctype: str, n: int):
    """n zeroed `ctype`s in an anonymous mapping (pages allocated as they are
    first written): the mapping object, which owns the memory (unmapped when
    it goes), and a `ctype *` into it."""
    m = mmap.mmap(-1, n * ffi.sizeof(ctype))
    return m, ffi.cast(f"{ctype} *", ffi.from_buffer(m))


class FaultSpace:
    """Owns the bitmaps and the struct the C fault path reads. The uffd and the
    alias mapping are borrowed: they must outlive this object."""

    def __init__(self, uffd: Userfaultfd, page_size: int, npages: int, regions: list[SpaceRegion],
                 alias_addr: int, mode: str = MODE_CONTINUE, ram_fd: int = -1, zero_fresh: bool = False):
        """zero_fresh: the RAM file held no page when the guest's range was
        registered (a first attach): a page nobody wrote reads as zero once
        allocated, so a zero page needs no write (CONTINUE mode only)."""
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
        self.requested = PageBitmap(npages)
        self.allocated = PageBitmap(npages)
        # The two large arrays are mappings of their own, not malloc's: the
        # heap keeps what it is given back (glibc raises its mmap threshold
        # to a freed block's size), and a --serve-forever agent grew by
        # 8 MiB over its first migrations; a mapping goes back whole.
        self._inflight_map, self._inflight = _anon_array("struct mg_inflight", lib.MG_INFLIGHT)
        ffi.memmove(self._inflight, b"\xff" * len(self._inflight_map), len(self._inflight_map))
        self._lat_map, self._lat = _anon_array("uint32_t", lib.MG_LAT_RING)
        s = ffi.new("struct mg_space *")
        s.uffd = uffd.fd
        s.mode = lib.MG_PLACE_COPY if mode == MODE_COPY else lib.MG_PLACE_CONTINUE
        s.page_size = page_size
        s.npages = npages
        s.alias_base = alias_addr
        s.received = self.received.words
        s.mapped = self.mapped.words
        s.claimed = self.claimed.words
        s.requested = self.requested.words
        s.demand_fd = -1
        s.inflight = self._inflight
        s.lat_us = self._lat
        self._threads = ffi.new("struct mg_thread_block[]", lib.MG_MAX_THREADS)
        s.threads = self._threads
        self._zero_page = ffi.new("uint8_t[]", page_size)
        s.zero_page = self._zero_page
        s.ram_fd = ram_fd   # borrowed, like the alias: the owner keeps it open
        s.allocated = self.allocated.words
        if zero_fresh and mode != MODE_CONTINUE:
            raise ValueError("zero_fresh is for CONTINUE placement: COPY writes every page")
        s.zero_fresh = 1 if zero_fresh else 0
        # large pages may come sparse (zero blocks left out), on both channels
        s.block_size = self.block_size = lib.MG_BLOCK if page_size > lib.MG_BLOCK else 0
        # push runs may come as zstd frames (set when a Welcome offers them)
        s.zstd_runs = 0
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
    def place_batch(self, pages, zero_bits: bytes, data: bytes, *, demand: bool = False) -> int:
        """Places pages (zero where the bit in zero_bits is set, else the next
        page_size bytes of data). Returns how many were placed; duplicates are
        dropped (the first copy won and may already be the guest's)."""
        n = len(pages)
        if n == 0:
            return 0
        c_pages = ffi.new("uint64_t[]", pages)
        buf = ffi.from_buffer(data) if len(data) else ffi.NULL
        rc = lib.mg_place_batch(self._s, c_pages, n, zero_bits, buf, len(data),
                                lib.MG_VIA_DEMAND if demand else lib.MG_VIA_PUSH, self._bad)
        if rc < 0:
            self._raise("place" if self.mode == MODE_CONTINUE else "copy", rc, self._bad[0], placing=True)
        return rc

    def precopy_write(self, staged: PageBitmap, pages, zero_bits: bytes, data: bytes) -> int:
        """Pre-copy (migrate.dest.precopy): writes the pages into the page
        cache through the alias, maps nothing, and sets them in staged. A
        page placed already is refused (ProtocolError). Returns pages written."""
        n = len(pages)
        if n == 0:
            return 0
        c_pages = ffi.new("uint64_t[]", pages)
        buf = ffi.from_buffer(data) if len(data) else ffi.NULL
        rc = lib.mg_precopy_write(self._s, staged.words, c_pages, n, zero_bits, buf, len(data), self._bad)
        if rc == -errno.EPROTO:
            raise ProtocolError(f"pre-copy page {self._bad[0]} is placed already: pre-copy pages come "
                                "before the switch only")
        if rc < 0:
            self._raise("pre-copy write", rc, self._bad[0], placing=True)
        return rc

    def precopy_receive(self, staged: PageBitmap, fd: int, stop_fd: int, pages_in) -> int:
        """Reads a raw pre-copy channel (GIL released) into the page cache
        only (mg_precopy_receive) until the source ends it (0), stop
        (-ESHUTDOWN) or the source lost (-errno, see _channel_end). pages_in:
        a uint64_t* the pages are added to. Bad runs raise."""
        rc = lib.mg_precopy_receive(self._s, staged.words, fd, stop_fd, pages_in)
        if rc == -errno.EPROTO:
            first, value = self._s.error_page, self._s.error_value
            if self._s.error_kind == lib.MG_BAD_FLAGS:
                raise ProtocolError(f"pre-copy run at page {first} has flags {value:#x}: pre-copy runs are dense "
                                    "(flags 0)")
            if value == 2 ** 64 - 1:
                raise ProtocolError(f"pre-copy run names page {first}, which is placed already: pre-copy pages "
                                    "come before the switch only")
            raise ProtocolError(f"pre-copy run of {value} pages at page {first} does not fit the layout of "
                                f"{self.npages} pages (at most {lib.MG_PUSH_MAX_RUN} pages a run)")
        return self._channel_end(rc)

    def precopy_commit(self, staged: PageBitmap, written: PageBitmap) -> int:
        """The switch: pages in staged and not in written become received
        (not mapped yet: map() does that). Returns how many."""
        return lib.mg_precopy_commit(self._s, staged.words, written.words)

    def mark_prior(self, first: int, count: int) -> int:
        """Pages an earlier agent placed and the guest has mapped: never rewrite."""
        return lib.mg_mark_prior(self._s, first, count)

    def map(self, first: int = 0, count: int | None = None) -> int:
        """Maps received, unmapped pages of the range. Returns pages newly mapped."""
        count = self.npages - first if count is None else count
        rc = lib.mg_map_pages(self._s, first, count, self._bad)
        if rc < 0:
            self._raise("continue", rc, self._bad[0])
        return rc

    def map_placed(self, first: int, count: int) -> int:
        """map() of pages just placed, but while record_touches() logs, only
        those the guest already faulted on (mg_map_placed): the others fault
        at their first touch, which is logged."""
        rc = lib.mg_map_placed(self._s, first, count, self._bad)
        if rc < 0:
            self._raise("continue", rc, self._bad[0])
        return rc

    def finish(self) -> None:
        """Every page is mapped; the caller unregisters next. A placement thread
        whose CONTINUE then finds the range gone (ENOENT) knows why."""
        self._s.finished = 1

    @property
    def received_count(self) -> int:
        return self._s.stats.received

    # -- faults -----------------------------------------------------------
    def serve(self, stop_fd: int, max_pages: int = 0, timeout_ms: int = 1000) -> list[int] | None:
        """Blocks (GIL released) serving faults: the fast path maps received pages,
        the rest are requested over the demand channel. Returns the pages that
        needed the source (only when max_pages > 0), [] on timeout, None when
        stop_fd fired."""
        need = ffi.new("uint64_t[]", max(1, max_pages))
        rc = lib.mg_fault_serve(self._s, stop_fd, need, max_pages, timeout_ms)
        if rc == -errno.ESHUTDOWN:
            return None
        if rc < 0:
            raise UffdError("serve faults", -rc, detail="reading or answering the userfaultfd failed")
        return [need[i] for i in range(rc)]

    # -- demand channel ---------------------------------------------------
    def set_demand_fd(self, fd: int) -> int:
        """Points demand requests at a connected source (-1: none). Returns how
        many outstanding requests were sent again."""
        self._s.demand_fd = fd
        if fd < 0:
            return 0
        return lib.mg_demand_resend(self._s)

    def oldest_request_ns(self) -> int:
        """time.monotonic_ns() of the oldest demand request still unanswered (0: none)."""
        return lib.mg_oldest_request_ns(self._s)

    def demand_receive(self, fd: int, stop_fd: int) -> int:
        """Reads demand replies (GIL released) until EOF (0), every page received
        (lib.MG_DEMAND_COMPLETE), stop (-ESHUTDOWN) or the source lost (-errno,
        see _channel_end). Bad replies raise."""
        # each receiver has its own scratch page: COPY mode copies out of it
        rc = lib.mg_demand_receive(self._s, fd, stop_fd, ffi.new("uint8_t[]", self.page_size))
        if rc == -errno.EPROTO:
            raise ProtocolError(self._bad_reply())
        return self._channel_end(rc)

    def _bad_reply(self) -> str:
        s = self._s
        p, value = s.error_page, s.error_value
        if s.error_kind == lib.MG_BAD_PAGE:
            return f"demand reply names page {p}, outside the layout of {self.npages} pages of {self.page_size} bytes"
        if s.error_kind == lib.MG_BAD_FLAGS:
            if value & lib.MG_REPLY_SPARSE and not self.block_size:
                return self._never_sparse(f"demand reply for page {p}")
            return f"demand reply for page {p} has flags {value:#x}: unknown, or both zero and sparse"
        if self.block_size:
            nb = self.page_size // self.block_size
            return (f"demand reply for page {p} carries {value} bytes, expected {self.page_size}, 0 for a "
                    f"zero page, or (sparse) a {nb // 8}-byte block bitmap and {self.block_size} bytes for "
                    f"each block it does not mark zero")
        return f"demand reply for page {p} carries {value} bytes, expected {self.page_size} (or 0 for a zero page)"

    def push_receive(self, fd: int, stop_fd: int) -> int:
        """Reads raw push runs (GIL released) until EOF (0), every page received
        (lib.MG_DEMAND_COMPLETE), stop (-ESHUTDOWN) or the source lost (-errno,
        see _channel_end). Bad runs raise."""
        rc = lib.mg_push_receive(self._s, fd, stop_fd, ffi.new("uint8_t[]", self.page_size))
        if rc == -errno.EPROTO:
            first, value = self._s.error_page, self._s.error_value
            if self._s.error_kind == lib.MG_BAD_FLAGS:
                if value & lib.MG_RUN_SPARSE and not self.block_size:
                    raise ProtocolError(self._never_sparse(f"push run at page {first}"))
                raise ProtocolError(f"push run at page {first} has flags {value:#x}: unknown")
            if self._s.error_kind == lib.MG_BAD_FRAME:
                raise ProtocolError(self._bad_frame(first, value, self._s.error_detail))
            raise ProtocolError(f"push run of {value} pages at page {first} does not fit the layout of "
                                f"{self.npages} pages (at most {lib.MG_PUSH_MAX_RUN} pages a run)")
        return self._channel_end(rc)

    def accept_zstd_runs(self) -> None:
        """Push runs may come as zstd frames from now on (the Welcome offered
        them; libzstd is loaded)."""
        self._s.zstd_runs = 1

    @staticmethod
    def _bad_frame(first: int, why: int, detail: int) -> str:
        """What was wrong with a push run's zstd frame (MG_FRAME_*, C's
        error_detail); none of the run's pages was received or mapped."""
        what = f"push run at page {first}: its zstd frame "
        if why == lib.MG_FRAME_LENGTH:
            return what + f"is {detail} bytes long, not between 1 and its non-zero pages' bytes"
        if why == lib.MG_FRAME_SIZE:
            stated = "no size" if detail >= (1 << 64) - 2 else f"{detail} bytes"
            return what + f"states {stated}, not its non-zero pages' bytes"
        if why == lib.MG_FRAME_SHORT:
            return what + f"decompressed to {detail} bytes, fewer than its non-zero pages' bytes"
        if why == lib.MG_FRAME_LONG:
            return what + "decompressed to more than its non-zero pages' bytes, or bytes follow its end"
        bound = f" (frames here may use a window of at most {1 << lib.MG_ZSTD_WINDOW_LOG >> 10} KiB)"
        return what + f"is refused by zstd: {ffi.string(lib.mg_zstd_error_name(detail)).decode()}" + (
            bound if detail == ZSTD_ERROR_WINDOW_TOO_LARGE else "")

    def _never_sparse(self, what: str) -> str:
        return f"{what} is sparse, but pages of {self.page_size} bytes are never sent sparse"

    def _channel_end(self, rc: int) -> int:
        """How a channel receiver ended, for both channels: rc as the C loop
        returned it, unless migrate.wire.tcp.channel_end (the one classifier)
        finds a failure: a kernel failure placing a page raises here. What is
        left is an end for the receiver to read with channel_end (the peer
        closed or reset, or our stop: CLOSED; the kernel gave up on the peer:
        PEER_LOST, -errno one of PEER_LOST_ERRNOS), or lib.MG_DEMAND_COMPLETE."""
        if channel_end(rc) is ChannelEnd.FAILED:
            self._raise("continue", rc, self._s.error_page, placing=True)
        return rc

    def record_touches(self) -> None:
        """Logs the guest's first touch of each page from now on (every fault
        the loop reads, demand or fast path): dest --record-hints. In
        CONTINUE mode pushed pages stay unmapped until the guest touches them
        (mg_map_placed), so those touches are logged too; in COPY mode a page
        is mapped as it is placed, and only the faults before it are."""
        self._touched = PageBitmap(self.npages)
        self._touch_log = ffi.new("uint64_t[]", max(1, self.npages))
        self._s.touch_log = self._touch_log
        self._s.touched = self._touched.words

    def touches(self) -> list[int]:
        """The pages logged by record_touches(), in the order first touched."""
        if self._s.touched == ffi.NULL:
            return []
        return list(ffi.unpack(self._touch_log, self._s.touch_count))

    def latencies_us(self, recent: int = 0) -> list[int]:
        """Demand fault latencies (the ring's); recent > 0: the last that many."""
        count = self._s.stats.lat_count
        n = min(count, lib.MG_LAT_RING)
        if 0 < recent < n:
            end = count % lib.MG_LAT_RING
            if end >= recent:
                return list(ffi.unpack(self._lat + (end - recent), recent))
            return list(ffi.unpack(self._lat + (lib.MG_LAT_RING - (recent - end)), recent - end)) + \
                list(ffi.unpack(self._lat, end))
        return list(ffi.unpack(self._lat, n))

    def latencies_since(self, seen: int) -> tuple[list[int], int]:
        """The demand latencies recorded since the count was seen (at most the
        ring's last MG_LAT_RING), and the count now."""
        count = self._s.stats.lat_count
        new = count - seen
        return (self.latencies_us(min(new, lib.MG_LAT_RING)) if new > 0 else []), count

    def thread_blocks(self) -> list[dict]:
        """Per guest thread that faulted on a page the source had to send
        (the fault's thread id): its demand faults and the seconds it spent
        blocked on them, a wait still open counted up to now."""
        now = lib.mg_now_ns()
        out = []
        for i in range(min(self._s.nthreads, lib.MG_MAX_THREADS)):
            t = self._threads[i]
            ns = t.blocked_ns
            since, page = t.wait_since_ns, t.wait_page
            if page != 2**64 - 1 and now > since:
                ns += now - since
            out.append({"tid": int(t.tid), "faults": int(t.faults), "blocked_s": round(ns / 1e9, 6)})
        return out

    @property
    def threads_untracked(self) -> int:
        return int(self._s.threads_untracked)

    @property
    def stats(self) -> dict:
        st = self._s.stats
        return {k: getattr(st, k) for k in (
            "faults", "minor", "fast", "requested", "requests_sent", "outside", "eexist", "mapped_pages",
            "map_calls", "received", "placed_demand", "placed_push", "placed_zero", "placed_prior", "duplicates")}

    def complete(self) -> bool:
        return self.received.full() and self.mapped.full()

    def _raise(self, op: str, rc: int, page: int, placing: bool = False):
        """placing: rc came from placing pages, which may have failed to
        allocate them (error_kind says so)."""
        if placing and self._s.error_kind == lib.MG_ALLOC_FAILED:
            raise self._alloc_failed(-rc)
        addr = self.addr_of(page)
        raise UffdError(op, -rc, addr, self.page_size, f"page {page}")


    def _alloc_failed(self, err: int) -> MemoryBackendError:
        s = self._s
        first, count = s.error_page, s.error_value
        what = f"page {first}" if count == 1 else f"pages {first}-{first + count - 1}"
        why = (BACKING_FULL if err in (errno.ENOSPC, errno.ENOMEM, errno.EFAULT)
               else f"{errno.errorcode.get(err, err)}: {os.strerror(err)}")
        return MemoryBackendError(f"allocate {what} of the RAM file ({fmt_size(count * self.page_size)}) for "
                                  f"bytes that arrived: {why}; nothing unwritten was mapped into the guest")


#: What a backing that cannot hold the guest is, for a person.
BACKING_FULL = ("the backing is full (its tmpfs size, or the free huge pages, is smaller than the guest): "
                "give the guest's RAM file more room")


def make_stop_fd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

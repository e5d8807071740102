"""The guest's RAM allocated in the background, after its attach is acked.

Allocating every page of the RAM file before the migration (what QEMU's
prealloc=on does) makes each page that arrives later one copy into memory
that is already there. It takes about as long as the migration itself, so it
must never hold the guest: the agent acks the attach at once and threads
allocate here meanwhile, in chunks, in C without the GIL (native/dest_alloc.c).
A source may start before they end: pages that arrive in memory not
allocated yet are allocated by their receiver first (ensure_allocated), and
the allocation skips the pages a receiver claimed. It never writes a byte:
write-populating a page maps it, and allocates a zero page only where there
was none. Once a source connects, the threads drop to the lowest priority so
they take only CPU time the migration leaves idle.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.dest.faultspace import BACKING_FULL, FaultSpace
from migrate.errors import fmt_size

# Bytes a thread allocates before it looks at stop and at waiting vCPUs again
# (a large page at least): as the push's 256 KiB a syscall, so that a waking
# demand thread gets a CPU soon on a kernel that does not preempt.
ALLOC_CHUNK = 256 << 10
ALLOC_THREADS = 16      # at most this many threads (one per CPU the agent may use)
NICE_ALONE = 0          # the threads' nice value while no source is connected
NICE_MIGRATING = 19     # and once one is


@dataclass(frozen=True)
class AllocResult:
    """How an allocation ended: it allocated every page no receiver had
    claimed (done), it was stopped (the migration ended first, or the agent
    is closing), or it failed (error says why)."""
    done: bool
    seconds: float
    pages: int              # pages populated by the allocation (receivers allocate the rest)
    error: str | None = None


class BackgroundAllocation:
    """Allocates a FaultSpace's RAM file in threads. The space, with its alias
    mapping and RAM file, is borrowed and must outlive this object: stop()
    ends the threads, and the owner calls it before it unmaps the alias.
    on_end(result) is called once, from the last thread to finish."""

    def __init__(self, space: FaultSpace, on_end: Callable[[AllocResult], None] | None = None,
                 threads: int | None = None):
        self.space = space
        self.on_end = on_end
        n = threads or len(os.sched_getaffinity(0))
        self.nthreads = max(1, min(n, ALLOC_THREADS, space.npages))
        self._a = ffi.new("struct mg_alloc *")
        self._a.chunk_pages = max(1, ALLOC_CHUNK // space.page_size)
        self._lock = threading.Lock()
        self._running = 0
        self._tids: list[int] = []
        self._threads: list[threading.Thread] = []
        self._low = False
        self._stopped = False
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.result: AllocResult | None = None

    def start(self) -> None:
        self.t_start = time.monotonic()
        self._running = self.nthreads
        self._threads = [threading.Thread(target=self._run, name="alloc", daemon=True)
                         for _ in range(self.nthreads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        tid = threading.get_native_id()
        with self._lock:
            self._tids.append(tid)
            low = self._low
        # (not the priority of the thread that started it: the agent's attach
        # thread runs on the guest's path, above bulk work)
        _nice(tid, NICE_MIGRATING if low else NICE_ALONE)
        rc = lib.mg_alloc_run(self.space._s, self._a)   # (GIL released for the whole allocation)
        with self._lock:
            self._running -= 1
            last = self._running == 0
            self._stopped |= rc == -errno.ESHUTDOWN
        if last:   # (the first failure is in self._a)
            self._end()

    def _end(self) -> None:
        self.t_end = time.monotonic()
        a = self._a
        pages = a.pages
        error = None
        if a.error:
            err = -a.error
            why = BACKING_FULL if err in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC) else os.strerror(err)
            error = (f"allocate {fmt_size(self.space.npages * self.space.page_size)} of guest RAM: {why}; "
                     f"stopped at page {a.error_page}, {fmt_size(pages * self.space.page_size)} allocated")
        done = not a.error and not self._stopped
        self.result = AllocResult(done, self.t_end - self.t_start, pages, error)
        if self.on_end is not None:
            self.on_end(self.result)

    def lower_priority(self) -> None:
        """A source connected: from now on the threads take only idle CPU."""
        with self._lock:
            self._low = True
            tids = list(self._tids)
        for tid in tids:
            _nice(tid, NICE_MIGRATING)

    def stop(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Ends the threads, each after its chunk; wait: until they have."""
        self._a.stop = 1
        for t in self._threads if wait else ():
            if t is not threading.current_thread():
                t.join(timeout)

    @property
    def seconds(self) -> float | None:
        """How long it ran (so far, while it runs); None before start()."""
        if self.t_start is None:
            return None
        return (self.t_end if self.t_end is not None else time.monotonic()) - self.t_start

    def seconds_between(self, t0: float | None, t1: float | None) -> float:
        """How long the allocation ran inside [t0, t1] (time.monotonic();
        None for t1: now)."""
        if self.t_start is None or t0 is None:
            return 0.0
        end = self.t_end if self.t_end is not None else time.monotonic()
        t1 = time.monotonic() if t1 is None else t1
        return max(0.0, min(end, t1) - max(self.t_start, t0))


def _nice(tid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass   # the thread ended meanwhile

"""What the source pushes next: demand first, then the pages after the most
recent demand (locality, a window that adapts; none after a demand on a
hinted page), then the working-set hints (source --hints: the pages a
recorded run of the guest touched, in that order), then a linear scan that
skips what was sent."""

from __future__ import annotations

import threading

from migrate.pagestate import PageBitmap

LOCALITY_PAGES = 256     # how far past a demand the next pushes go first (the adaptive window's start)
LOCALITY_MIN = 4         # the adaptive window never shrinks below this many pages
LOCALITY_MAX_BYTES = 16 << 20   # nor grows beyond this much RAM


LOCALITY_RECENT = 8      # faults the adaptive window compares a new one with


class LocalityWindow:
    """How many pages after a demand fault the push sends next. Adaptive (the
    idea of CRIU's lazy-pages): a fault that lands within the window of a
    recent one means the guest walks through memory, and the window doubles;
    a fault that jumps away from all of them means it does not, and the
    window halves, so a random working set does not spend the link on
    neighbours it never reads. Recent: the last LOCALITY_RECENT faults, not
    only the last one, because vCPUs walking their own parts of RAM make
    faults that alternate between streams (each near its own previous one;
    compared with the last alone, every switch looked like a jump, and with
    four sequential vCPUs the window sat at its minimum). Near is within the
    window but never less than its start (256 pages), so a stream is still
    seen after the window shrank. For a random guest the chance that a fault
    lands near one of 8 others is 16 x max(window, 256) / RAM pages: under
    one half (where the window would grow) until the window is a 32nd of
    RAM, far above its start for RAM over 32 MiB.
    fixed: always this many pages (the policy before this one)."""

    def __init__(self, page_size: int, fixed: int | None = None):
        self.fixed = fixed
        self.min = LOCALITY_MIN
        self.max = max(self.min, LOCALITY_MAX_BYTES // page_size)
        self.pages = fixed if fixed is not None else min(LOCALITY_PAGES, self.max)
        self.recent: list[int] = []    # the last faults, oldest first

    def after(self, page: int) -> int:
        """A demand fault on page: how many pages after it to push next."""
        if self.fixed is None and self.recent:
            # near: within the window, and never less than its start (a window
            # halved by the switches between streams still sees each stream)
            reach = max(self.pages, LOCALITY_PAGES)
            near = [i for i, r in enumerate(self.recent) if abs(page - r) <= reach]
            if near:
                self.pages = min(self.max, self.pages * 2)
                del self.recent[near[-1]]    # the stream moved on: its newest point replaces it
            else:
                self.pages = max(self.min, self.pages // 2)
        self.recent = (self.recent + [page])[-LOCALITY_RECENT:]
        return self.pages


READAHEAD_BYTES = 1 << 20  # the most a sequential run of faults reads ahead on the demand channel


def _coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """runs sorted, adjacent ones joined: hinted pages come one run a page,
    and a recorded sweep (consecutive pages) would otherwise cost a run
    header, and a placement and a CONTINUE at the destination, per page."""
    out: list[tuple[int, int]] = []
    for first, count in sorted(runs):
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
    return out


class Scheduler:
    """What to push next. Thread-safe: every push stream takes its batches
    here, and the first to see a new demand (the C demand server's last page)
    notes it for the others."""

    def __init__(self, npages: int, pages_per_batch: int, already: PageBitmap | None = None, *,
                 window: LocalityWindow | None = None, hints: list[int] | None = None):
        """hints: pages to push first (after locality), in order; each a
        page of the layout (migrate.hints validated them)."""
        self.npages = npages
        self.window = window or LocalityWindow(4096, LOCALITY_PAGES)
        self.hints = hints or []
        self.hint_at = 0          # the next hint to look at
        self.hinted = PageBitmap(npages) if self.hints else None
        for p in self.hints:
            self.hinted.set(p)
        self.per_batch = max(1, pages_per_batch)
        self.sent = already or PageBitmap(npages)
        self.lock = threading.Lock()
        self.cursor = 0
        self.near: tuple[int, int] | None = None  # (next page, end) after the last demand
        self.demand = None      # the C demand server's struct: its last page, read for locality
        self.demand_seq = 0

    def note_demand(self, pages: list[int]) -> None:
        with self.lock:
            for p in pages:
                if p < self.npages:
                    self.sent.set(p)
            last = max(pages)
            after = self.window.after(last)
            # A fault on a hinted page means the push is behind the recorded
            # order, not that the guest reads its neighbours: the hints that
            # follow are the better guess, so no window (a window of a page
            # each such fault put 1 MiB ahead of them).
            if self.hinted is not None and last < self.npages and self.hinted.test(last):
                return
            self.near = (last + 1, min(self.npages, last + 1 + after))

    def next_runs(self) -> list[tuple[int, int]]:
        """The next batch as ascending (first page, count) runs, marked sent:
        pages just after the last demand fault first, then the sweep."""
        d = self.demand
        if d is not None and d.seq != self.demand_seq:
            self.demand_seq = d.seq
            self.note_demand([d.last_page])
        with self.lock:
            runs: list[tuple[int, int]] = []
            left = self.per_batch
            if self.near:
                start, end = self.near
                left = self._take(start, end, runs, left)
                last = runs[-1][0] + runs[-1][1] if runs else end
                self.near = (last, end) if last < end else None
            if left and self.hint_at < len(self.hints):
                left = self._take_hints(runs, left)
            if left:
                before = len(runs)
                self._take(self.cursor, self.npages, runs, left)
                if len(runs) > before:
                    self.cursor = runs[-1][0] + runs[-1][1]
            return _coalesce(runs)

    def next_batch(self) -> list[int]:
        """next_runs() as a list of page indexes."""
        return [p for first, count in self.next_runs() for p in range(first, first + count)]

    def _take(self, start: int, end: int, runs: list[tuple[int, int]], left: int) -> int:
        """Appends up to left unsent pages of [start, end) to runs, marking them
        sent; returns how many more the batch can take."""
        p = start
        while left and p < end:
            p = self.sent.next_clear(p, end)
            if p >= end:
                break
            q = min(self.sent.next_set(p, end), p + left)
            self.sent.set(p, q - p)
            runs.append((p, q - p))
            left -= q - p
            p = q
        return left

    def _take_hints(self, runs: list[tuple[int, int]], left: int) -> int:
        """Appends the next unsent hinted pages (up to left) to runs, marking
        them sent; returns how many more the batch can take."""
        hints, i = self.hints, self.hint_at
        while left and i < len(hints):
            p = hints[i]
            i += 1
            if not self.sent.test(p):
                self.sent.set(p)
                runs.append((p, 1))
                left -= 1
        self.hint_at = i
        return left

    def remaining(self) -> int:
        with self.lock:
            return self.npages - self.sent.count()

"""What the source pushes next: demand first, then the pages after the most
recent demand (locality), then a linear scan that skips what was sent."""

from __future__ import annotations

import threading

from migrate.pagestate import PageBitmap

LOCALITY_PAGES = 256     # how far past a demand the next pushes go first
READAHEAD_BYTES = 1 << 20  # the most a sequential run of faults reads ahead on the demand channel


class Scheduler:
    """What to push next. Thread-safe: every push stream takes its batches
    here, and the first to see a new demand (the C demand server's last page)
    notes it for the others."""

    def __init__(self, npages: int, pages_per_batch: int, already: PageBitmap | None = None):
        self.npages = npages
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
            self.near = (last + 1, min(self.npages, last + 1 + LOCALITY_PAGES))

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
            if left:
                before = len(runs)
                self._take(self.cursor, self.npages, runs, left)
                if len(runs) > before:
                    self.cursor = runs[-1][0] + runs[-1][1]
            return sorted(runs)

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

    def remaining(self) -> int:
        with self.lock:
            return self.npages - self.sent.count()

"""Per-page state as compact bitmaps with range operations.

One bit a page, in C-owned memory so the fault loop (running without the GIL)
reads the same words placement writes. A 1 TiB guest of 4 KiB pages needs 32 MiB
per bitmap.
"""

from __future__ import annotations

from migrate._binding import ffi, lib


class PageBitmap:
    def __init__(self, npages: int):
        self.npages = npages
        self.words = ffi.new("uint64_t[]", max(1, (npages + 63) // 64))

    def _check(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise IndexError(f"pages [{first}, {first + count}) outside a bitmap of {self.npages} pages")

    def set(self, first: int, count: int = 1) -> None:
        self._check(first, count)
        lib.mg_bitmap_set_range(self.words, first, count)

    def clear(self, first: int, count: int = 1) -> None:
        self._check(first, count)
        lib.mg_bitmap_clear_range(self.words, first, count)

    def __contains__(self, page: int) -> bool:
        return 0 <= page < self.npages and bool(lib.mg_bitmap_test(self.words, page))

    def test(self, page: int) -> bool:
        return page in self

    def count(self, first: int = 0, count: int | None = None) -> int:
        count = self.npages - first if count is None else count
        self._check(first, count)
        return lib.mg_bitmap_count(self.words, first, count)

    def next_clear(self, start: int, end: int | None = None) -> int:
        end = self.npages if end is None else end
        return lib.mg_bitmap_next_clear(self.words, start, end) if start < end else end

    def next_set(self, start: int, end: int | None = None) -> int:
        end = self.npages if end is None else end
        return lib.mg_bitmap_next_set(self.words, start, end) if start < end else end

    def runs(self, first: int = 0, end: int | None = None, *, set_bits: bool = True):
        """Yields (start, count) of maximal runs of set (or clear) bits in [first, end)."""
        end = self.npages if end is None else end
        find, stop = (self.next_set, self.next_clear) if set_bits else (self.next_clear, self.next_set)
        p = first
        while p < end:
            p = find(p, end)
            if p >= end:
                return
            q = stop(p, end)
            yield p, q - p
            p = q

    def full(self) -> bool:
        return self.count() == self.npages

    def to_bytes(self) -> bytes:
        return bytes(ffi.buffer(self.words))[: (self.npages + 7) // 8]

    def load_bytes(self, data: bytes) -> None:
        if len(data) != (self.npages + 7) // 8:
            raise ValueError(f"bitmap of {len(data)} bytes does not fit {self.npages} pages")
        ffi.buffer(self.words)[: len(data)] = data
        tail = self.npages % 64
        if tail:  # never trust bits past the end
            self.words[self.npages // 64] &= (1 << tail) - 1

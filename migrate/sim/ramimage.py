"""The deterministic guest RAM image: what `migrate mkram` writes and what
guestsim verifies. Every 4 KiB unit is a zero page, a compressible page or a
random page, chosen and filled from the seed alone (native/pattern.c)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import MemoryBackendError, fmt_size
from migrate.memory import fs_page_size, mmap_shared, munmap

UNIT = 4096
DEFAULT_ZERO_FRACTION = 0.3
DEFAULT_RANDOM_FRACTION = 0.3
_CHUNK_UNITS = 4096  # 16 MiB at a time


@dataclass(frozen=True)
class ImageSpec:
    seed: int
    zero_fraction: float = DEFAULT_ZERO_FRACTION
    random_fraction: float = DEFAULT_RANDOM_FRACTION

    def __post_init__(self):
        for name, f in (("zero", self.zero_fraction), ("random", self.random_fraction)):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"--{name}-fraction {f} must lie between 0 and 1")
        if self.zero_fraction + self.random_fraction > 1.0:
            raise ValueError(f"--zero-fraction {self.zero_fraction} + --random-fraction {self.random_fraction} "
                             "exceed 1")

    @property
    def zero_ppm(self) -> int:
        return int(round(self.zero_fraction * 1_000_000))

    @property
    def random_ppm(self) -> int:
        return int(round(self.random_fraction * 1_000_000))

    def fill(self, addr: int, first_unit: int, nunits: int) -> None:
        lib.mg_pattern_fill(self.seed, first_unit, nunits, self.zero_ppm, self.random_ppm,
                            ffi.cast("uint8_t *", addr))

    def check(self, addr: int, first_unit: int, nunits: int) -> int | None:
        """None if the bytes at addr match, else the first bad unit."""
        bad = lib.mg_pattern_check(self.seed, first_unit, nunits, self.zero_ppm, self.random_ppm,
                                   ffi.cast("uint8_t *", addr))
        return None if bad < 0 else bad


def write_image(path: str, size: int, spec: ImageSpec) -> None:
    """Writes the image with mmap, so tmpfs, hugetlbfs and plain files all work."""
    if size <= 0 or size % UNIT:
        raise MemoryBackendError(f"image size {fmt_size(size)} is not a positive multiple of 4 KiB")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        ps = fs_page_size(fd)
        if size % ps:
            raise MemoryBackendError(f"image size {fmt_size(size)} is not a multiple of this file system's "
                                     f"page size {fmt_size(ps)}")
        os.ftruncate(fd, size)
        chunk = max(ps, _CHUNK_UNITS * UNIT)
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            addr = mmap_shared(fd, n, off)
            try:
                spec.fill(addr, off // UNIT, n // UNIT)
            finally:
                munmap(addr, n)
    finally:
        os.close(fd)

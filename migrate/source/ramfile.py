"""The RAM the source serves: a paused VM's RAM file, mapped read-only and
never copied whole, and where its holes are (SEEK_HOLE on tmpfs; a probing
userfaultfd mapping on hugetlbfs, which reports none), so that a page the
guest never wrote travels as a zero page unread.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from migrate._binding import ffi, lib
from migrate.errors import MigrateError, SourceError, fmt_size
from migrate.memory import fs_page_size
from migrate.pagestate import PageBitmap


class RamImage:
    """A RAM file mapped read-only. Owns the fd and the mapping."""

    def __init__(self, path: str, page_size: int | None = None, size: int | None = None,
                 populate_behind: bool = False):
        self._closing = False
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"open RAM file {path}: {e.strerror}") from None
        try:
            self._map(path, page_size, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        # The file's data is populated here, before any session, so the push
        # reads pages without taking a page fault every 16 of them. Its holes
        # are not: reading a hole of a tmpfs file allocates a page, and a VM's
        # RAM file is mostly holes where its guest never wrote.
        try:
            self.open_holes = self.holes()   # as the file was when opened
        except SourceError:
            self.open_holes = None           # populate it all, as if it had no holes
        # The mapping's page tables are filled ahead of the reads (a hint:
        # errors ignored): 40-60 ms for 512 MiB. populate_behind: on a thread
        # of its own (the GIL released in C), while the agent connects (a
        # pre-copy source, whose guest runs meanwhile); else now, before the
        # push, which would share the CPUs with it
        self._populating = threading.Thread(target=self._populate, name="ram-populate", daemon=True)
        self._populating.start()
        if not populate_behind:
            self._populating.join()

    def _populate(self) -> None:
        ps = self.page_size
        for first, count in self.open_holes.runs(set_bits=False) if self.open_holes else [(0, self.npages)]:
            if self._closing:
                return
            lib.mg_madvise(self.addr + first * ps, count * ps, lib.MG_MADV_POPULATE_READ)

    def _map(self, path: str, page_size: int | None, size: int | None) -> None:
        """Checks the size against the file and the page size, and maps it."""
        actual = os.fstat(self.fd).st_size
        self.size = actual if size is None else size
        if size is not None and actual < size:
            raise SourceError(f"RAM file {path} is {fmt_size(actual)}, shorter than the declared {fmt_size(size)}")
        fs_ps = fs_page_size(self.fd)
        self.page_size = page_size or fs_ps
        self.on_hugetlbfs = fs_ps > 4096   # reports no holes: they are probed (see holes)
        if self.size == 0 or self.size % self.page_size:
            raise SourceError(f"RAM file {path} is {fmt_size(self.size)}: not a positive multiple of the page "
                              f"size {fmt_size(self.page_size)} (pass --page-size or --size)")
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view = memoryview(self.map)
        self.addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.view)))

    def fully_allocated(self) -> bool:
        """Every block of the file allocated: no holes to look for."""
        return os.fstat(self.fd).st_blocks * 512 >= self.size

    def holes(self, into: PageBitmap | None = None, done=ffi.NULL) -> PageBitmap | None:
        """Pages wholly in holes of the file, which read as zero (None: no
        holes, or a file system that does not report them, like hugetlbfs),
        as the file is now. into: a clear bitmap to fill, with done (a
        uint64_t *) advanced past the pages whose bits are final as it goes."""
        if self.fully_allocated():
            return None
        holes = into or PageBitmap(self.npages)
        if self.on_hugetlbfs:
            n = self._probe_holes(holes, done)
        else:
            n = lib.mg_find_holes(self.fd, self.size, self.page_size, holes.words, done)
        if n < 0:
            raise SourceError(f"find the holes in RAM file {self.path}: {os.strerror(-n)}")
        return holes if n else None

    def _probe_holes(self, holes: PageBitmap, done) -> int:
        """hugetlbfs reports no holes, and reading one allocates a huge page
        (from a pool that may have none to spare: then the read is SIGBUS).
        A second, probing mapping of the file, registered with a userfaultfd
        that fails a missing page instead of allocating it, tells them apart
        (mg_probe_holes). Registering needs the file open for writing (a
        read-only file's mappings cannot be registered); nothing is written
        through it. Returns -errno when the host cannot probe (0 holes)."""
        from migrate.uffd import Feature, Mode, Userfaultfd
        rw = addr = uffd = None
        try:
            rw = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
            at = ffi.new("uint64_t *", 0)
            # no reservation: the probe allocates nothing
            rc = lib.mg_mmap(0, self.size, lib.MG_PROT_READ, lib.MG_MAP_SHARED | lib.MG_MAP_NORESERVE, rw, 0, at)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
            addr = at[0]
            uffd = Userfaultfd.create()
            uffd.api(Feature.SIGBUS)
            uffd.register(addr, self.size, Mode.MISSING, self.page_size)
            return lib.mg_probe_holes(addr, self.size, self.page_size, holes.words, done)
        except (OSError, MigrateError) as e:
            if done != ffi.NULL:
                done[0] = self.npages    # none found: every page is read
            return -(getattr(e, "errno", None) or errno.EOPNOTSUPP)
        finally:
            if uffd is not None:
                uffd.close()
            if addr is not None:
                lib.mg_munmap(addr, self.size)
            if rw is not None:
                os.close(rw)

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def close(self):
        self._closing = True
        self._populating.join()   # (it must not outlive the mapping)
        self.view.release()
        self.map.close()
        os.close(self.fd)

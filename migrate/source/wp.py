"""Which pages of the source guest's RAM were written while it ran (pre-copy).

The guest hands the source agent its userfaultfd and RAM file over the attach
socket (migrate.source.precopy). `WriteTracker` registers the guest's regions
for write-protect on that userfaultfd in async mode: a write to a protected
page is let through by the kernel itself, which only marks the page written,
so the guest never blocks on the agent. `scan()` reads the written pages from
the guest's /proc/PID/pagemap with PAGEMAP_SCAN and protects them again in
the same call (native/src_wp.c). The ioctls act on the mm of the process that
created the userfaultfd, whoever issues them.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import MigrateError, SourceError, SourceGuestGone, UffdError, UnsupportedError
from migrate.pagestate import PageBitmap
from migrate.uffd import Mode, Userfaultfd
from migrate.wire.attach import Region

#: What async write tracking needs of UFFDIO_API (Linux 6.7 and later).
WP_FEATURES = (lib.MG_UFFD_FEATURE_WP_ASYNC | lib.MG_UFFD_FEATURE_WP_HUGETLBFS_SHMEM
               | lib.MG_UFFD_FEATURE_WP_UNPOPULATED)


@dataclass
class ScanResult:
    written: PageBitmap     # pages written since the last scan (protected again)
    pages: int
    seconds: float
    calls: int              # PAGEMAP_SCAN ioctls


class WriteTracker:
    """Async write-protect on a running guest's RAM. Borrows uffd (the guest's,
    received at attach; its creator's mm is the guest's) until close(), which
    removes the protection and the registration, so a guest the agent leaves
    is not left write-protected. Owns its /proc/PID/pagemap fd."""

    def __init__(self, uffd: Userfaultfd, pid: int, regions: list[Region], page_size: int):
        self.uffd = uffd
        self.pid = pid
        self.regions = list(regions)
        self.page_size = page_size
        self.npages = sum(r.length for r in regions) // page_size
        self.protect_seconds = 0.0
        self._registering: threading.Thread | None = None   # start_register()'s, until register() joins it
        self._register_error: BaseException | None = None
        self._registered: list[Region] = []
        try:
            granted = uffd.api(WP_FEATURES)
        except UffdError as e:
            raise UnsupportedError(f"write tracking needs userfaultfd async write-protect (Linux 6.7): {e}") from None
        if granted & WP_FEATURES != WP_FEATURES:
            raise UnsupportedError(f"write tracking needs userfaultfd features {WP_FEATURES:#x} (async "
                                   f"write-protect on shmem and hugetlbfs, Linux 6.7); the kernel grants "
                                   f"{granted:#x}")
        try:
            self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"open /proc/{pid}/pagemap of the source guest: {e.strerror}: the agent reads "
                              "which pages the guest wrote there (run it as root or as the guest's uid)") from None

    def start_register(self) -> None:
        """register() on a thread of its own (its ioctls release the GIL),
        while the agent connects; register() then waits for it."""
        def run():
            try:
                self._register()
            except BaseException as e:  # noqa: BLE001 - raised by register()
                self._register_error = e
        self._registering = threading.Thread(target=run, name="wp-register", daemon=True)
        self._registering.start()

    def _join_register(self) -> None:
        t, self._registering = self._registering, None
        if t is not None:
            t.join()
            if self._register_error is not None:
                raise self._register_error

    def register(self) -> None:
        """Registers every region for write-protect (nothing is protected
        yet: writes cost the guest nothing until protect_pages)."""
        self._join_register()
        if not self._registered:
            self._register()

    def _register(self) -> None:
        t0 = time.monotonic()
        for r in self.regions:
            self.uffd.register(r.guest_addr, r.length, Mode.WP, self.page_size)
            self._registered.append(r)
        self.protect_seconds += time.monotonic() - t0

    def protect_pages(self, first: int, count: int) -> None:
        """Write-protects pages [first, first + count) of the layout
        (registered first): from here on every write to one of them is seen
        by the next scan. A pre-copy's first round protects each chunk right
        before it reads it, so that a page written before its first copy
        costs the guest nothing."""
        self.register()
        t0 = time.monotonic()
        ps = self.page_size
        end = first + count
        for r in self.regions:
            rfirst = r.offset // ps
            lo, hi = max(first, rfirst), min(end, rfirst + r.length // ps)
            if lo >= hi:
                continue
            addr = r.guest_addr + (lo - rfirst) * ps
            rc = lib.mg_wp_protect(self.uffd.fd, addr, (hi - lo) * ps, 1)
            if rc < 0:
                raise UffdError("write-protect", -rc, addr, (hi - lo) * ps)
        self.protect_seconds += time.monotonic() - t0

    def protect_all(self) -> float:
        """Registers every region and write-protects all of it: from here on
        every write is seen by the next scan. Returns the seconds it took."""
        self.register()
        self.protect_pages(0, self.npages)
        return self.protect_seconds

    def scan(self, into: PageBitmap | None = None) -> ScanResult:
        """The pages written since the last scan (or protect_all), set in into
        (a new bitmap if None); they are protected again."""
        written = into if into is not None else PageBitmap(self.npages)
        res = ffi.new("struct mg_wp_scan_result *")
        t0 = time.monotonic()
        pages = calls = 0
        for r in self.regions:
            rc = lib.mg_wp_scan(self.pagemap, r.guest_addr, r.length // self.page_size, self.page_size,
                                written.words, r.offset // self.page_size, res)
            pages += res.pages
            calls += res.calls
            if rc == -errno.ESRCH:
                raise SourceGuestGone(f"the source guest (pid {self.pid}) went away during pre-copy: nothing is left "
                                      "to migrate")
            if rc < 0:
                raise UffdError(f"scan /proc/{self.pid}/pagemap for written pages", -rc, r.guest_addr, r.length)
        return ScanResult(written, pages, time.monotonic() - t0, calls)

    def close(self) -> None:
        """Unprotects and unregisters what was registered. A guest gone
        already (ESRCH, ENOMEM: its mm is gone) needs nothing; other errors
        are raised after trying every region."""
        try:
            self._join_register()
        except MigrateError:
            pass   # (what it registered is undone below)
        first: UffdError | None = None
        for r in self._registered:
            for op, rc in (("write-unprotect", lambda: lib.mg_wp_protect(self.uffd.fd, r.guest_addr, r.length, 0)),
                           ("unregister", lambda: lib.mg_uffd_unregister(self.uffd.fd, r.guest_addr, r.length))):
                err = rc()
                if err < 0 and -err not in (errno.ESRCH, errno.ENOMEM) and first is None:
                    first = UffdError(op, -err, r.guest_addr, r.length)
        self._registered = []
        if self.pagemap >= 0:
            os.close(self.pagemap)
            self.pagemap = -1
        if first is not None:
            raise first

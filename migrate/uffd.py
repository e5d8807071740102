"""userfaultfd as a Python object over the native layer.

Two jobs: check arguments before any ioctl (alignment, lengths, the range lies in
a registered mapping), and turn errnos into outcomes in exactly one place:
EEXIST from CONTINUE/COPY means "already mapped" (the waiters are woken and the
call reports it), EAGAIN means "retry" (done here). Every other failure raises
UffdError naming the operation, the range and the errno.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import AlignmentError, UffdError, UnsupportedError, fmt_range

_EAGAIN_RETRIES = 1000


class Mode(enum.IntFlag):
    MISSING = lib.MG_UFFD_REGISTER_MISSING
    WP = lib.MG_UFFD_REGISTER_WP
    MINOR = lib.MG_UFFD_REGISTER_MINOR


class Feature(enum.IntFlag):
    SIGBUS = lib.MG_UFFD_FEATURE_SIGBUS
    MISSING_HUGETLBFS = lib.MG_UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.MG_UFFD_FEATURE_MISSING_SHMEM
    THREAD_ID = lib.MG_UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.MG_UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.MG_UFFD_FEATURE_MINOR_SHMEM


#: What the agent asks for: fault thread ids, and MINOR on both file kinds.
DEFAULT_FEATURES = Feature.THREAD_ID | Feature.MINOR_SHMEM | Feature.MINOR_HUGETLBFS


class Resolution(enum.Enum):
    """How a placement ioctl ended, when it did not fail."""
    MAPPED = "mapped"                  # every page of the range was mapped by this call
    ALREADY_MAPPED = "already mapped"  # EEXIST: someone else mapped a page; woken instead


@dataclass(frozen=True)
class PlaceResult:
    resolution: Resolution
    bytes_done: int        # bytes this call mapped before stopping


@dataclass(frozen=True)
class FaultEvent:
    address: int
    flags: int
    thread_id: int

    @property
    def minor(self) -> bool:
        return bool(self.flags & lib.MG_UFFD_PAGEFAULT_FLAG_MINOR)

    @property
    def write(self) -> bool:
        return bool(self.flags & lib.MG_UFFD_PAGEFAULT_FLAG_WRITE)


@dataclass(frozen=True)
class Registration:
    start: int
    length: int
    page_size: int
    mode: Mode


def _mode_name(mode: Mode) -> str:
    return "|".join(m.name for m in Mode if m in mode)


class Userfaultfd:
    """One userfaultfd. It may have been created by another process (attach): the
    ioctls act on the mm of the creator, whoever issues them."""

    def __init__(self, fd: int, *, owned: bool = True):
        self.fd = fd
        self.owned = owned
        self.features = 0
        self.registrations: list[Registration] = []

    # -- creation ---------------------------------------------------------
    @classmethod
    def create(cls, how: str = "auto", *, nonblock: bool = True) -> "Userfaultfd":
        """how: "syscall", "dev" (/dev/userfaultfd) or "auto" (syscall, then dev)."""
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
        tried = []
        for name, fn in (("syscall", lib.mg_uffd_create_syscall), ("dev", lib.mg_uffd_create_dev)):
            if how not in ("auto", name):
                continue
            fd = fn(flags)
            if fd >= 0:
                return cls(fd)
            tried.append(f"{name}: {errno.errorcode.get(-fd, -fd)}")
            if -fd not in (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOENT):
                raise UffdError(f"create userfaultfd ({name})", -fd)
        raise UnsupportedError("create userfaultfd: not available on this host (" + ", ".join(tried) + ")")

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0 and self.owned:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- setup ------------------------------------------------------------
    def api(self, features: int = DEFAULT_FEATURES) -> int:
        """UFFDIO_API. Returns the features the kernel granted."""
        feats = ffi.new("uint64_t *", int(features))
        ioctls = ffi.new("uint64_t *", 0)
        rc = lib.mg_uffd_api(self.fd, feats, ioctls)
        if rc < 0:
            raise UffdError(f"api features={int(features):#x}", -rc)
        self.features = feats[0]
        return self.features

    def register(self, start: int, length: int, mode: Mode, page_size: int = 4096) -> int:
        """UFFDIO_REGISTER. Returns the ioctl mask the range supports."""
        op = f"register {_mode_name(mode)}"
        self._check_aligned(op, start, length, page_size)
        ioctls = ffi.new("uint64_t *", 0)
        rc = lib.mg_uffd_register(self.fd, start, length, int(mode), ioctls)
        if rc < 0:
            raise UffdError(op, -rc, start, length)
        self.registrations.append(Registration(start, length, page_size, mode))
        return ioctls[0]

    def unregister(self, start: int, length: int) -> None:
        reg = self._registration("unregister", start, length)
        rc = lib.mg_uffd_unregister(self.fd, start, length)
        if rc < 0:
            raise UffdError("unregister", -rc, start, length)
        if reg.start == start and reg.length == length:
            self.registrations.remove(reg)

    # -- placement --------------------------------------------------------
    def continue_(self, start: int, length: int, *, wake: bool = True) -> PlaceResult:
        """UFFDIO_CONTINUE: map pages already in the page cache."""
        self._registration("continue", start, length)
        return self._place("continue", lambda done: lib.mg_uffd_continue(self.fd, start, length, 0 if wake else 1, done),
                           start, length)

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> PlaceResult:
        """UFFDIO_COPY: allocate, copy from src (our address space), map."""
        self._registration("copy", dst, length)
        return self._place("copy", lambda done: lib.mg_uffd_copy(self.fd, dst, src, length, 0 if wake else 1, done),
                           dst, length)

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> PlaceResult:
        self._registration("zeropage", start, length)
        return self._place("zeropage", lambda done: lib.mg_uffd_zeropage(self.fd, start, length, 0 if wake else 1, done),
                           start, length)

    def wake(self, start: int, length: int) -> None:
        rc = lib.mg_uffd_wake(self.fd, start, length)
        if rc < 0:
            raise UffdError("wake", -rc, start, length)

    def _place(self, op, call, start, length) -> PlaceResult:
        done = ffi.new("int64_t *", 0)
        for _ in range(_EAGAIN_RETRIES):
            rc = call(done)
            if rc == -errno.EAGAIN:
                continue  # the mm is changing (e.g. a pending REMOVE): retry
            break
        if rc == 0:
            return PlaceResult(Resolution.MAPPED, done[0])
        if rc == -errno.EEXIST:
            # Already mapped by someone else; its waiters may still be asleep.
            self.wake(start, length)
            return PlaceResult(Resolution.ALREADY_MAPPED, max(done[0], 0))
        detail = ""
        if rc == -errno.EFAULT and op == "continue":
            detail = "page is not in the page cache: write it through the alias first"
        raise UffdError(op, -rc, start, length, detail)

    # -- events -----------------------------------------------------------
    def read_events(self, max_events: int = 64) -> list[FaultEvent]:
        """Reads pending page-fault events (non-blocking fd: [] when none)."""
        buf = ffi.new("struct mg_uffd_event[]", max_events)
        n = lib.mg_uffd_read(self.fd, buf, max_events)
        if n == -errno.EAGAIN:
            return []
        if n < 0:
            raise UffdError("read events", -n)
        return [FaultEvent(buf[i].address, buf[i].flags, buf[i].arg)
                for i in range(n) if buf[i].event == lib.MG_UFFD_EVENT_PAGEFAULT]

    def wait(self, timeout_ms: int) -> bool:
        """True if events are ready to read."""
        fds = ffi.new("int[1]", [self.fd])
        rc = lib.mg_poll_in(fds, 1, timeout_ms)
        if rc < 0 and rc != -errno.EINTR:
            raise UffdError("poll", -rc)
        return rc > 0

    # -- checks -----------------------------------------------------------
    @staticmethod
    def _check_aligned(op, start, length, page_size):
        if length <= 0:
            raise AlignmentError(op, start, length, "length must be positive")
        if start % page_size:
            raise AlignmentError(op, start, length, f"address is not aligned to the page size {page_size:#x}")
        if length % page_size:
            raise AlignmentError(op, start, length, f"length is not a multiple of the page size {page_size:#x}")

    def _registration(self, op, start, length) -> Registration:
        for reg in self.registrations:
            if reg.start <= start and start + length <= reg.start + reg.length:
                self._check_aligned(op, start, length, reg.page_size)
                return reg
        raise AlignmentError(op, start, length, "range is outside every registered mapping")

    def __repr__(self):
        regs = ", ".join(fmt_range(r.start, r.length) for r in self.registrations)
        return f"<Userfaultfd fd={self.fd} [{regs}]>"

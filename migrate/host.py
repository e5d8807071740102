"""What this host can do, probed once into a frozen HostFeatures.

Runtime refusals and test skips both read it. ENOSYS and EPERM mean "not
supported here"; any other failure while probing is a bug and raises.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
from dataclasses import dataclass, field

from migrate import hugepages
from migrate._binding import lib

_UNSUPPORTED = (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOENT, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class HostFeatures:
    uffd_syscall: bool
    uffd_dev: bool
    features: int                 # UFFDIO_API features the kernel offers
    minor_shmem: bool
    minor_hugetlbfs: bool
    huge_free: dict = field(default_factory=dict)    # page size -> free pages
    huge_total: dict = field(default_factory=dict)   # page size -> reserved pages
    qemu: str | None = None

    @property
    def uffd(self) -> bool:
        return self.uffd_syscall or self.uffd_dev

    @property
    def wp_async(self) -> bool:
        """Async write-protect on shmem and hugetlbfs (pre-copy's write
        tracking, Linux 6.7): read from the offered features."""
        want = (lib.MG_UFFD_FEATURE_WP_ASYNC | lib.MG_UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                | lib.MG_UFFD_FEATURE_WP_UNPOPULATED)
        return self.features & want == want

    def free_huge_pages(self, page_size: int) -> int:
        return self.huge_free.get(page_size, 0)

    def why_not(self, need: str) -> str | None:
        """None if `need` is available, else the reason (used by skips and refusals)."""
        if not self.uffd:
            return "userfaultfd is not available (neither the syscall nor /dev/userfaultfd)"
        if need == "minor_shmem" and not self.minor_shmem:
            return "kernel lacks UFFD_FEATURE_MINOR_SHMEM"
        if need == "minor_hugetlbfs" and not self.minor_hugetlbfs:
            return "kernel lacks UFFD_FEATURE_MINOR_HUGETLBFS"
        if need == "wp_async" and not self.wp_async:
            return "kernel lacks UFFD_FEATURE_WP_ASYNC with WP_HUGETLBFS_SHMEM and WP_UNPOPULATED (Linux 6.7)"
        return None


def _try_create(create) -> int | None:
    fd = create(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        return fd
    if -fd in _UNSUPPORTED:
        return None
    raise OSError(-fd, f"probing userfaultfd: {os.strerror(-fd)}")


def probe() -> HostFeatures:
    """Probe the host now (uncached). Prefer `features()`."""
    from migrate._binding import ffi

    fds = {}
    for name, create in (("syscall", lib.mg_uffd_create_syscall), ("dev", lib.mg_uffd_create_dev)):
        fds[name] = _try_create(create)
    offered = 0
    probe_fd = fds["syscall"] if fds["syscall"] is not None else fds["dev"]
    if probe_fd is not None:
        feats = ffi.new("uint64_t *", 0)
        ioctls = ffi.new("uint64_t *", 0)
        rc = lib.mg_uffd_api(probe_fd, feats, ioctls)
        if rc < 0:
            raise OSError(-rc, f"probing UFFDIO_API: {os.strerror(-rc)}")
        offered = feats[0]
    for fd in fds.values():
        if fd is not None:
            os.close(fd)
    free, total = hugepages.pools()
    return HostFeatures(
        uffd_syscall=fds["syscall"] is not None,
        uffd_dev=fds["dev"] is not None,
        features=offered,
        minor_shmem=bool(offered & lib.MG_UFFD_FEATURE_MINOR_SHMEM),
        minor_hugetlbfs=bool(offered & lib.MG_UFFD_FEATURE_MINOR_HUGETLBFS),
        huge_free=free,
        huge_total=total,
        qemu=shutil.which("qemu-system-x86_64"),
    )


@functools.lru_cache(maxsize=1)
def features() -> HostFeatures:
    """The host's features, probed once per process."""
    return probe()


def refresh_huge_pages(hf: HostFeatures) -> HostFeatures:
    """Huge page counts change at run time (tests reserve them): re-read only those."""
    free, total = hugepages.pools()
    return HostFeatures(hf.uffd_syscall, hf.uffd_dev, hf.features, hf.minor_shmem,
                        hf.minor_hugetlbfs, free, total, hf.qemu)


FAULT_PATH_NICE = -10


BACKGROUND_NICE = 10


def background_priority() -> None:
    """Bulk work that nobody waits for right now (mapping a pre-copy's pages
    after its switch: a fault on one is answered by the fault loop anyway)
    yields the CPU to what the guest's pause waits for."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError:
        pass


def normal_priority(tid: int | None = None) -> None:
    """A thread (this one, or tid) back at the default priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid or threading.get_native_id(), 0)
    except OSError:
        pass


def fault_path_priority() -> None:
    """Threads on a vCPU's fault path (fault loop, demand receiver, demand
    server) run ahead of bulk copying: they sleep until a fault comes, so a
    higher priority costs the push nothing but lets a waiting vCPU's page jump
    the CPU queue on a loaded host. Needs root (CAP_SYS_NICE); else unchanged."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FAULT_PATH_NICE)
    except OSError:
        pass

"""Guest memory: one shared file, mapped twice.

The guest mapping is the one the VM runs on (registered with userfaultfd); the
alias mapping is where the agent writes pages. Backings: a memfd on shmem, a file
on a tmpfs mount, hugetlbfs 2 MiB (memfd MFD_HUGETLB or a file on a hugetlbfs
mount) and hugetlbfs 1 GiB where the host has those pages.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import NewType

from migrate._binding import ffi, lib
from migrate.errors import MemoryBackendError, fmt_size
from migrate.hugepages import HUGE_1G, HUGE_2M

#: A host virtual address in the process that runs the guest (its guest mapping).
GuestAddr = NewType("GuestAddr", int)
#: A host virtual address in the agent's own address space (the alias mapping).
AliasAddr = NewType("AliasAddr", int)
#: A byte offset into the RAM file.
FileOffset = NewType("FileOffset", int)

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6

PROT_RW = lib.MG_PROT_READ | lib.MG_PROT_WRITE


class Backing(str, enum.Enum):
    TMPFS = "tmpfs"                # memfd on shmem
    TMPFS_FILE = "tmpfs-file"      # /dev/shm/NAME
    HUGETLBFS = "hugetlbfs"        # memfd MFD_HUGETLB, 2 MiB
    HUGETLBFS_FILE = "hugetlbfs-file"  # a file on a hugetlbfs mount, 2 MiB
    HUGETLBFS_1G = "hugetlbfs-1g"  # memfd MFD_HUGETLB, 1 GiB

    @property
    def page_size(self) -> int:
        return {Backing.HUGETLBFS: HUGE_2M, Backing.HUGETLBFS_FILE: HUGE_2M,
                Backing.HUGETLBFS_1G: HUGE_1G}.get(self, 4096)

    @property
    def huge(self) -> bool:
        return self.page_size > 4096


def parse_size(text: str | int) -> int:
    """'1G', '256M', '4096', '2MiB' -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        n = int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 256M, 1G or a byte count") from None
    if n < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return n


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise MemoryBackendError(f"{what}: {errno.errorcode.get(-rc, -rc)}: {os.strerror(-rc)}")
    return rc


def mmap_shared(fd: int, length: int, offset: int = 0, prot: int = PROT_RW) -> int:
    addr = ffi.new("uint64_t *", 0)
    _check(lib.mg_mmap(0, length, prot, lib.MG_MAP_SHARED, fd, offset, addr),
           f"mmap {fmt_size(length)} of fd {fd} at offset {offset:#x}")
    return addr[0]


def munmap(addr: int, length: int) -> None:
    _check(lib.mg_munmap(addr, length), f"munmap {addr:#x}+{fmt_size(length)}")


def hugetlbfs_mount() -> str | None:
    """A mounted hugetlbfs with the default (2 MiB) page size, if any."""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, path, fstype, opts = line.split()[:4]
                if fstype == "hugetlbfs" and "pagesize=1G" not in opts and os.access(path, os.W_OK):
                    return path
    except OSError:
        pass
    return None


def fs_page_size(fd: int) -> int:
    """The page size of the file system holding fd: 4096 unless hugetlbfs."""
    t = ffi.new("uint64_t *", 0)
    b = ffi.new("uint64_t *", 0)
    _check(lib.mg_fstatfs(fd, t, b), f"fstatfs fd {fd}")
    return b[0] if t[0] == HUGETLBFS_MAGIC else 4096


PREPARE_THREADS = 16   # GuestMemory.prepare: at most this many threads allocate guest RAM


@dataclass
class GuestMemory:
    """A RAM file with its guest mapping and alias mapping.

    Owns the fd and both mappings until close(). `guest_addr` is 0 when this
    process maps only the alias (the agent: the guest mapping lives in the
    guest's process)."""

    fd: int
    size: int
    page_size: int
    backing: Backing | None
    alias_addr: AliasAddr
    guest_addr: GuestAddr = GuestAddr(0)
    path: str | None = None

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    @classmethod
    def create(cls, backing: Backing | str, size: int, *, name: str = "guest", map_guest: bool = True,
               map_alias: bool = True, path: str | None = None) -> "GuestMemory":
        backing = Backing(backing)
        ps = backing.page_size
        if size <= 0 or size % ps:
            raise MemoryBackendError(
                f"guest size {fmt_size(size)} is not a positive multiple of the {backing.value} page size {fmt_size(ps)}")
        fd, path = cls._open(backing, name, path)
        try:
            _check(lib.mg_ftruncate(fd, size), f"ftruncate {backing.value} file to {fmt_size(size)}")
            alias = mmap_shared(fd, size) if map_alias else 0
            guest = mmap_shared(fd, size) if map_guest else 0
        except BaseException:
            os.close(fd)
            if path:
                os.unlink(path)
            raise
        return cls(fd, size, ps, backing, AliasAddr(alias), GuestAddr(guest), path)

    @classmethod
    def from_fd(cls, fd: int, size: int, page_size: int | None = None) -> "GuestMemory":
        """Adopt a RAM file received from the guest: map only the alias. Takes fd."""
        real_ps = fs_page_size(fd)
        if page_size is not None and page_size != real_ps:
            raise MemoryBackendError(
                f"RAM file declares page size {fmt_size(page_size)} but its file system uses {fmt_size(real_ps)}")
        st = os.fstat(fd)
        if st.st_size < size:
            raise MemoryBackendError(f"RAM file is {fmt_size(st.st_size)}, shorter than the declared {fmt_size(size)}")
        alias = mmap_shared(fd, size)
        return cls(fd, size, real_ps, None, AliasAddr(alias))

    @staticmethod
    def _open(backing: Backing, name: str, path: str | None) -> tuple[int, str | None]:
        if backing is Backing.TMPFS:
            return _check(lib.mg_memfd_create(name.encode(), lib.MG_MFD_CLOEXEC), "memfd_create"), None
        if backing in (Backing.HUGETLBFS, Backing.HUGETLBFS_1G):
            size_flag = lib.MG_MFD_HUGE_1GB if backing is Backing.HUGETLBFS_1G else lib.MG_MFD_HUGE_2MB
            fd = lib.mg_memfd_create(name.encode(), lib.MG_MFD_CLOEXEC | lib.MG_MFD_HUGETLB | size_flag)
            return _check(fd, f"memfd_create MFD_HUGETLB {fmt_size(backing.page_size)}"), None
        if backing is Backing.TMPFS_FILE:
            path = path or f"/dev/shm/migrate-{name}-{uuid.uuid4().hex[:8]}"
        else:
            mount = hugetlbfs_mount()
            if not mount and not path:
                raise MemoryBackendError("no writable hugetlbfs mount: mount one (mount -t hugetlbfs none /dev/hugepages) "
                                         "or use --backing hugetlbfs (memfd)")
            path = path or f"{mount}/migrate-{name}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MemoryBackendError(f"create RAM file {path}: {e.strerror}") from e
        return fd, path

    def prepare(self, threads: int | None = None) -> dict:
        """Allocates every page of the RAM file and maps the whole alias, before
        the migration starts (what QEMU's prealloc=on does for a VM's RAM), so a
        page that arrives later is one copy into memory that is already there:
        no allocation, no zeroing and no page fault on the way. Pages in the page
        cache fault as MINOR in the guest, so nothing unreceived becomes visible.

        Write-populating the alias allocates and zeroes the pages as it maps
        them, in threads over slices of the file (one per CPU this process may
        use, at most PREPARE_THREADS); fallocate would take the file's lock
        and allocate alone (1 GiB of tmpfs: ~0.49 s with it, ~0.32 s in two
        threads here).

        Returns {"seconds", "was_empty", "threads"}: was_empty means the file
        held no page before (every page reads as zero until this agent writes
        it). Raises MemoryBackendError when the backing cannot hold the whole
        guest; pages allocated before the failure stay (they read as zero)."""
        t0 = time.monotonic()
        was_empty = os.fstat(self.fd).st_blocks == 0
        n = max(1, min(threads or len(os.sched_getaffinity(0)), PREPARE_THREADS, self.npages))
        per = -(-self.npages // n) * self.page_size
        failed: list[tuple[int, int]] = []

        def populate(off: int) -> None:
            rc = lib.mg_madvise(self.alias_addr + off, min(per, self.size - off), lib.MG_MADV_POPULATE_WRITE)
            if rc < 0:
                failed.append((off, rc))

        workers = [threading.Thread(target=populate, args=(off,), name="prepare", daemon=True)
                   for off in range(0, self.size, per)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if failed:
            rc = min(failed)[1]
            have = os.fstat(self.fd).st_blocks * 512
            why = ("the backing is full (its tmpfs size, or the free huge pages, is smaller than the guest)"
                   if rc in (-errno.EFAULT, -errno.ENOMEM, -errno.ENOSPC) else os.strerror(-rc))
            raise MemoryBackendError(f"allocate {fmt_size(self.size)} of guest RAM: {why}; "
                                     f"{fmt_size(have)} allocated")
        return {"seconds": time.monotonic() - t0, "was_empty": was_empty, "threads": len(workers)}

    def alias_view(self, offset: int, length: int):
        """A writable buffer over part of the alias mapping (no copy)."""
        return ffi.buffer(ffi.cast("char *", self.alias_addr + offset), length)

    def guest_view(self, offset: int, length: int):
        """A buffer over the guest mapping: touching it faults like the guest would."""
        if not self.guest_addr:
            raise MemoryBackendError("this process has no guest mapping of the RAM file")
        return ffi.buffer(ffi.cast("char *", self.guest_addr + offset), length)

    def close(self) -> None:
        if self.alias_addr:
            munmap(self.alias_addr, self.size)
            self.alias_addr = AliasAddr(0)
        if self.guest_addr:
            munmap(self.guest_addr, self.size)
            self.guest_addr = GuestAddr(0)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

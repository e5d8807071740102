"""The native userfaultfd layer against the real kernel, table-driven over memory
types (in the spirit of the kernel's uffd-unit-tests): exact fault counts, EEXIST
on a repeated CONTINUE, EFAULT when the page is not in the page cache."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import Callable, NamedTuple

import pytest
from conftest import MEMORY_TYPES, minor_feature, need_feature, need_huge_pages

from migrate._binding import ffi, lib
from migrate.dest.attach import AttachListener
from migrate.errors import AlignmentError, MemoryBackendError, UffdError
from migrate.memory import GuestMemory
from migrate.uffd import Mode, Resolution, Userfaultfd

HERE = os.path.dirname(os.path.abspath(__file__))
NPAGES = 8


def page_bytes(page: int, ps: int) -> bytes:
    return hashlib.sha256(f"page {page}".encode()).digest() * (ps // 32)


@contextlib.contextmanager
def guest_memory(backing: str):
    size = NPAGES * (2 << 20 if backing.startswith("hugetlbfs") else 4096)
    m = GuestMemory.create(backing, size, name="t")
    try:
        yield m
    finally:
        m.close()


@contextlib.contextmanager
def registered(mem: GuestMemory):
    """A userfaultfd with the whole guest mapping registered MISSING|MINOR."""
    u = Userfaultfd.create()
    try:
        u.api()
        u.register(mem.guest_addr, mem.size, Mode.MISSING | Mode.MINOR, mem.page_size)
        yield u
    finally:
        u.close()


def read_in_thread(addr: int, length: int) -> tuple[threading.Thread, bytearray]:
    """A reader that faults like a vCPU: the read runs in C with the GIL released."""
    out = bytearray(length)

    def run():
        buf = ffi.new("char[]", length)
        lib.mg_read_bytes(addr, buf, length)
        out[:] = ffi.buffer(buf)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def serve_faults(u: Userfaultfd, mem: GuestMemory, expect: int, base: int | None = None) -> list:
    """Answers `expect` faults: write the page through the alias if missing, then CONTINUE."""
    base = mem.guest_addr if base is None else base
    seen = []
    while len(seen) < expect:
        assert u.wait(10_000), f"only {len(seen)} of {expect} faults arrived"
        for ev in u.read_events():
            seen.append(ev)
            page = (ev.address - base) // mem.page_size
            if not ev.minor:
                mem.alias_view(page * mem.page_size, mem.page_size)[:] = page_bytes(page, mem.page_size)
            r = u.continue_(base + page * mem.page_size, mem.page_size)
            assert r.resolution is Resolution.MAPPED
    return seen


# -- kernel scenarios: one table of (scenario, memory type, required feature) ---
#
# Each scenario runs on every memory type it lists, and skips where the host
# lacks the MINOR support that type needs (HostFeatures.why_not).

def exact_fault_counts(mem, uffd):
    """A reader thread touches every page once: one fault a page, MINOR
    exactly where the page was already in the page cache."""
    ps = mem.page_size
    for p in range(0, NPAGES, 2):   # even pages already in the page cache: MINOR faults
        mem.alias_view(p * ps, ps)[:] = page_bytes(p, ps)
    t, out = read_in_thread(mem.guest_addr, mem.size)
    events = serve_faults(uffd, mem, NPAGES)
    t.join(10)
    assert not t.is_alive()
    assert not uffd.wait(50), "no fault beyond one per page"
    minor = [e for e in events if e.minor]
    assert len(events) == NPAGES and len(minor) == NPAGES // 2
    assert sorted((e.address - mem.guest_addr) // ps for e in minor) == list(range(0, NPAGES, 2))
    assert all(e.thread_id > 0 for e in events)
    assert bytes(out) == b"".join(page_bytes(p, ps) for p in range(NPAGES))


def reader_in_another_process(mem, uffd):
    """The child creates the uffd and its own guest mapping; we register and
    serve it (`mem` only gives the backing and size; `uffd` is None)."""
    backing = mem.backing.value
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "a.sock")
        listener = AttachListener(sock)
        pages = list(range(NPAGES))
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "child_guest.py"), sock, backing,
                                  str(mem.size), json.dumps(pages)], stdout=subprocess.PIPE, text=True)
        try:
            g = listener.accept(timeout=30)
            u = Userfaultfd(g.uffd_fd, owned=False)
            u.api()
            alias = GuestMemory.from_fd(os.dup(g.ram_fd), g.ram_size, g.page_size)
            ps = alias.page_size
            assert ps == mem.page_size
            r = g.regions[0]
            u.register(r.guest_addr, r.length, Mode.MISSING | Mode.MINOR, ps)
            for p in range(1, NPAGES, 2):   # odd pages: MINOR
                alias.alias_view(p * ps, ps)[:] = page_bytes(p, ps)
            g.ack()
            events = serve_faults(u, alias, NPAGES, base=r.guest_addr)
            out, _ = child.communicate(timeout=30)
            assert child.returncode == 0
            assert sum(e.minor for e in events) == NPAGES // 2
            digests = json.loads(out)["digests"]
            for p in pages:
                assert digests[str(p)] == hashlib.sha256(page_bytes(p, ps)).hexdigest(), f"page {p}"
            alias.close()
            g.close()
        finally:
            child.kill()
            child.wait()
            listener.close()


def prepared_memory_faults_minor(mem, uffd):
    """After GuestMemory.prepare() (every page allocated, the alias mapped) a
    guest read of a page the agent has not written is a MINOR fault and blocks:
    the zeros the allocation put there are never shown to it."""
    ps = mem.page_size
    r = mem.prepare()
    assert r["was_empty"] is True and r["seconds"] >= 0
    assert os.fstat(mem.fd).st_blocks * 512 >= mem.size, "every page allocated"
    t, out = read_in_thread(mem.guest_addr, ps)
    assert uffd.wait(10_000), "the read of an allocated, unwritten page must fault"
    events = uffd.read_events()
    assert [e.minor for e in events] == [True]
    assert t.is_alive(), "the reader must stay blocked until the page is placed"
    mem.alias_view(0, ps)[:] = page_bytes(0, ps)      # the page arrives
    assert uffd.continue_(mem.guest_addr, ps).resolution is Resolution.MAPPED
    t.join(10)
    assert not t.is_alive() and bytes(out) == page_bytes(0, ps)
    assert mem.prepare()["was_empty"] is False    # pages are there now


def repeated_continue_is_already_mapped(mem, uffd):
    """Writes through the alias do not fault; a second CONTINUE of a mapped
    page is the kernel's EEXIST, reported as ALREADY_MAPPED."""
    ps = mem.page_size
    mem.alias_view(0, mem.size)[:] = b"\x5a" * mem.size
    assert bytes(mem.alias_view(0, 16)) == b"\x5a" * 16
    assert not uffd.wait(50), "writing through the alias must not fault"
    assert uffd.continue_(mem.guest_addr, ps).resolution is Resolution.MAPPED
    again = uffd.continue_(mem.guest_addr, ps)
    assert again.resolution is Resolution.ALREADY_MAPPED and again.bytes_done == 0


def continue_without_page_in_cache_is_efault(mem, uffd):
    with pytest.raises(UffdError) as ei:
        uffd.continue_(mem.guest_addr + mem.page_size, mem.page_size)
    assert type(ei.value) is UffdError   # the kernel's answer, not one of our checks
    assert ei.value.errno == errno.EFAULT
    size = "4 KiB" if mem.page_size == 4096 else "2 MiB"
    assert str(ei.value) == (f"continue {mem.guest_addr + mem.page_size:#x}+{size}: EFAULT: Bad address "
                             "(page is not in the page cache: write it through the alias first)")


def one_continue_maps_a_large_range(mem, uffd):
    ps = mem.page_size
    mem.alias_view(0, mem.size)[:] = b"".join(page_bytes(p, ps) for p in range(NPAGES))
    r = uffd.continue_(mem.guest_addr, mem.size)
    assert r.resolution is Resolution.MAPPED and r.bytes_done == mem.size
    t, out = read_in_thread(mem.guest_addr, mem.size)
    t.join(10)
    assert not t.is_alive(), "reader blocked: the range was not all mapped"
    assert not uffd.wait(50)
    assert bytes(out) == bytes(mem.alias_view(0, mem.size))


def unregister_leaves_no_faults_and_data_intact(mem, uffd):
    ps = mem.page_size
    half = NPAGES // 2
    mem.alias_view(0, half * ps)[:] = b"".join(page_bytes(p, ps) for p in range(half))
    uffd.continue_(mem.guest_addr, half * ps)
    uffd.unregister(mem.guest_addr, mem.size)
    t, out = read_in_thread(mem.guest_addr, mem.size)
    t.join(10)
    assert not t.is_alive()
    assert not uffd.wait(50)
    assert bytes(out[: half * ps]) == b"".join(page_bytes(p, ps) for p in range(half))
    assert bytes(out[half * ps:]) == bytes(mem.size - half * ps)   # holes read as zeros once unregistered


class Scenario(NamedTuple):
    name: str
    run: Callable[[GuestMemory, Userfaultfd | None], None]
    registered: bool = True     # run gets a userfaultfd with the whole mapping registered MISSING|MINOR
    memory: tuple[str, ...] = tuple(MEMORY_TYPES)


SCENARIOS = [
    Scenario("exact-fault-counts", exact_fault_counts),
    Scenario("reader-in-another-process", reader_in_another_process, registered=False),
    Scenario("prepared-memory-faults-minor", prepared_memory_faults_minor),
    Scenario("repeated-continue-is-eexist", repeated_continue_is_already_mapped),
    Scenario("continue-not-in-page-cache-is-efault", continue_without_page_in_cache_is_efault),
    Scenario("one-continue-maps-a-large-range", one_continue_maps_a_large_range),
    Scenario("unregister-leaves-data-intact", unregister_leaves_no_faults_and_data_intact),
]


@pytest.mark.parametrize("scenario,memory,feature", [
    pytest.param(s, m, minor_feature(m), id=f"{s.name}-on-{m}") for s in SCENARIOS for m in s.memory])
def test_kernel_scenario(scenario, memory, feature, host, request):
    need_feature(host, feature)
    if memory.startswith("hugetlbfs"):
        need_huge_pages(request.getfixturevalue("huge_pages"), NPAGES)
    with guest_memory(memory) as mem:
        if scenario.registered:
            with registered(mem) as u:
                scenario.run(mem, u)
        else:
            scenario.run(mem, None)


# -- bad arguments: typed exceptions whose messages name op, range and errno ----
#
# One row a refusal: the memory it is made on, the host feature it needs, how
# the memory is registered first, the call, and the exact exception type (an
# AlignmentError is refused by our checks before any ioctl, a UffdError is the
# kernel's answer), errno and whole message.

class Area(NamedTuple):
    addr: int
    size: int
    page_size: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@contextlib.contextmanager
def area(memory: str):
    """tmpfs: 16 pages of a memfd; hugetlbfs: one 2 MiB page; anonymous: 16
    private anonymous pages; unmapped: a page where nothing is mapped."""
    if memory in ("tmpfs", "hugetlbfs"):
        m = GuestMemory.create(memory, 16 * 4096 if memory == "tmpfs" else 2 << 20)
        try:
            yield Area(m.guest_addr, m.size, m.page_size)
        finally:
            m.close()
        return
    addr = ffi.new("uint64_t *")
    prot = 3 if memory == "anonymous" else 0
    assert lib.mg_mmap(0, 16 * 4096, prot, lib.MG_MAP_PRIVATE | lib.MG_MAP_ANONYMOUS, -1, 0, addr) == 0
    if memory == "unmapped":
        lib.mg_munmap(addr[0], 16 * 4096)
    try:
        yield Area(addr[0], 16 * 4096, 4096)
    finally:
        if memory == "anonymous":
            lib.mg_munmap(addr[0], 16 * 4096)


class BadArg(NamedTuple):
    id: str
    memory: str                     # see area()
    feature: str                    # HostFeatures.why_not name the row needs
    registered: Mode | None         # the whole area is registered so before the call
    call: Callable[[Userfaultfd, Area], object]
    raises: type[UffdError]         # exactly this type, not a subclass
    errno: int
    message: Callable[[Area], str]


MM = Mode.MISSING | Mode.MINOR
EINVAL = "EINVAL: Invalid argument"

BAD_ARGS = [
    BadArg("register-unaligned-address", "tmpfs", "uffd", None,
           lambda u, a: u.register(a.addr + 100, 4096, MM),
           AlignmentError, errno.EINVAL,
           lambda a: f"register MISSING|MINOR {a.addr + 100:#x}+4 KiB: {EINVAL} "
                     "(address is not aligned to the page size 0x1000)"),
    BadArg("register-length-not-a-page-multiple", "tmpfs", "uffd", None,
           lambda u, a: u.register(a.addr, 5000, Mode.MISSING),
           AlignmentError, errno.EINVAL,
           lambda a: f"register MISSING {a.addr:#x}+5000 B: {EINVAL} "
                     "(length is not a multiple of the page size 0x1000)"),
    BadArg("register-zero-length", "tmpfs", "uffd", None,
           lambda u, a: u.register(a.addr, 0, Mode.MISSING),
           AlignmentError, errno.EINVAL,
           lambda a: f"register MISSING {a.addr:#x}+0 B: {EINVAL} (length must be positive)"),
    BadArg("continue-past-the-registered-range", "tmpfs", "minor_shmem", MM,
           lambda u, a: u.continue_(a.end - 4096, 2 * 4096),
           AlignmentError, errno.EINVAL,
           lambda a: f"continue {a.end - 4096:#x}+8 KiB: {EINVAL} (range is outside every registered mapping)"),
    BadArg("continue-unaligned-address", "tmpfs", "minor_shmem", MM,
           lambda u, a: u.continue_(a.addr + 100, 4096),
           AlignmentError, errno.EINVAL,
           lambda a: f"continue {a.addr + 100:#x}+4 KiB: {EINVAL} "
                     "(address is not aligned to the page size 0x1000)"),
    BadArg("unregister-what-was-never-registered", "tmpfs", "uffd", None,
           lambda u, a: u.unregister(a.addr, a.size),
           AlignmentError, errno.EINVAL,
           lambda a: f"unregister {a.addr:#x}+64 KiB: {EINVAL} (range is outside every registered mapping)"),
    BadArg("register-where-nothing-is-mapped", "unmapped", "uffd", None,
           lambda u, a: u.register(a.addr, 4096, Mode.MISSING),
           UffdError, errno.EINVAL,
           lambda a: f"register MISSING {a.addr:#x}+4 KiB: {EINVAL}"),
    BadArg("minor-on-anonymous-memory", "anonymous", "uffd", None,
           lambda u, a: u.register(a.addr, a.size, Mode.MINOR),
           UffdError, errno.EINVAL,
           lambda a: f"register MINOR {a.addr:#x}+64 KiB: {EINVAL}"),
    # the kernel refuses a 4 KiB range of a 2 MiB mapping ...
    BadArg("register-4k-of-a-2m-page-refused-by-the-kernel", "hugetlbfs", "minor_hugetlbfs", None,
           lambda u, a: u.register(a.addr, 4096, MM, page_size=4096),
           UffdError, errno.EINVAL,
           lambda a: f"register MISSING|MINOR {a.addr:#x}+4 KiB: {EINVAL}"),
    # ... and we refuse it before the ioctl given the page size
    BadArg("register-4k-of-a-2m-page-refused-before-the-ioctl", "hugetlbfs", "minor_hugetlbfs", None,
           lambda u, a: u.register(a.addr, 4096, MM, page_size=2 << 20),
           AlignmentError, errno.EINVAL,
           lambda a: f"register MISSING|MINOR {a.addr:#x}+4 KiB: {EINVAL} "
                     "(length is not a multiple of the page size 0x200000)"),
    BadArg("continue-4k-of-a-2m-page", "hugetlbfs", "minor_hugetlbfs", MM,
           lambda u, a: u.continue_(a.addr, 4096),
           AlignmentError, errno.EINVAL,
           lambda a: f"continue {a.addr:#x}+4 KiB: {EINVAL} (length is not a multiple of the page size 0x200000)"),
]


@pytest.mark.parametrize("case", BAD_ARGS, ids=lambda c: c.id)
def test_bad_argument(case, host, request):
    need_feature(host, case.feature)
    if case.memory == "hugetlbfs":
        need_huge_pages(request.getfixturevalue("huge_pages"), 2)
    with area(case.memory) as a, Userfaultfd.create() as u:
        u.api()
        if case.registered is not None:
            u.register(a.addr, a.size, case.registered, a.page_size)
        with pytest.raises(UffdError) as ei:
            case.call(u, a)
    assert type(ei.value) is case.raises
    assert ei.value.errno == case.errno
    assert str(ei.value) == case.message(a)


@pytest.mark.parametrize("how", ["syscall", "dev"])
def test_uffd_from_dev_and_syscall(host, how):
    if not {"syscall": host.uffd_syscall, "dev": host.uffd_dev}[how]:
        pytest.skip(f"userfaultfd via {'the syscall' if how == 'syscall' else '/dev/userfaultfd'} is not "
                    "available here")
    with Userfaultfd.create(how) as u:
        feats = u.api()
        assert feats & lib.MG_UFFD_FEATURE_THREAD_ID


def test_host_probe_is_frozen(host):
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.minor_shmem = False
    assert host.minor_shmem == bool(host.features & lib.MG_UFFD_FEATURE_MINOR_SHMEM)
    assert host.minor_hugetlbfs == bool(host.features & lib.MG_UFFD_FEATURE_MINOR_HUGETLBFS)


@pytest.mark.timeout(120)
def test_one_gib_huge_pages_where_the_host_has_them(host):
    """Backing (d): a 1 GiB huge page, reserved for the test and given back."""
    from migrate import hugepages
    from migrate.hugepages import HUGE_1G
    need_feature(host, "minor_hugetlbfs")
    with hugepages.reserved(1, HUGE_1G) as free:
        if free < 1:
            pytest.skip("no 1 GiB huge page could be reserved on this host")
        m = GuestMemory.create("hugetlbfs-1g", HUGE_1G, name="g1")
        try:
            assert m.page_size == HUGE_1G
            u = Userfaultfd.create()
            u.api()
            u.register(m.guest_addr, m.size, Mode.MISSING | Mode.MINOR, m.page_size)
            t, out = read_in_thread(m.guest_addr + 12345 * 4096, 4096)
            assert u.wait(10_000)
            (ev,) = u.read_events()
            assert ev.address & ~(HUGE_1G - 1) == m.guest_addr and not ev.minor
            m.alias_view(12345 * 4096, 4096)[:] = page_bytes(1, 4096)
            assert u.continue_(m.guest_addr, HUGE_1G).resolution is Resolution.MAPPED
            t.join(10)
            assert bytes(out) == page_bytes(1, 4096)
            u.close()
        finally:
            m.close()


def test_prepare_on_a_backing_too_small_says_so(tmp_path):
    """The agent allocates the guest's RAM in threads; a tmpfs smaller than
    the guest stops it with a message that says so, not a bare EFAULT."""
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "none", str(small)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        m = GuestMemory.create("tmpfs-file", 64 << 20, name="t", map_guest=False, path=str(small / "ram"))
        try:
            with pytest.raises(MemoryBackendError) as ei:
                m.prepare(threads=4)
            assert str(ei.value) == ("allocate 64 MiB of guest RAM: the backing is full (its tmpfs size, or the "
                                     "free huge pages, is smaller than the guest); 16 MiB allocated")
        finally:
            m.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)

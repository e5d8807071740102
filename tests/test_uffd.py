"""The native userfaultfd layer against the real kernel, table-driven over memory
types (in the spirit of the kernel's uffd-unit-tests): exact fault counts, EEXIST
on a repeated CONTINUE, EFAULT when the page is not in the page cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import MEMORY_TYPES, need_backing

from migrate._binding import ffi, lib
from migrate.dest.attach import AttachListener
from migrate.errors import AlignmentError, MemoryBackendError, UffdError
from migrate.memory import GuestMemory
from migrate.uffd import Mode, Resolution, Userfaultfd

HERE = os.path.dirname(os.path.abspath(__file__))
NPAGES = 8


def page_bytes(page: int, ps: int) -> bytes:
    return hashlib.sha256(f"page {page}".encode()).digest() * (ps // 32)


@pytest.fixture(params=MEMORY_TYPES)
def mem(request, host, huge_pages):
    need_backing(request.param, host, huge_pages)
    size = NPAGES * (2 << 20 if request.param.startswith("hugetlbfs") else 4096)
    m = GuestMemory.create(request.param, size, name="t")
    yield m
    m.close()


@pytest.fixture
def uffd(mem):
    u = Userfaultfd.create()
    u.api()
    u.register(mem.guest_addr, mem.size, Mode.MISSING | Mode.MINOR, mem.page_size)
    yield u
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


def test_reader_thread_exact_fault_counts(mem, uffd):
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


def test_reader_in_another_process(mem, tmp_path):
    """The child creates the uffd and its own guest mapping; we register and serve it."""
    backing = mem.backing.value
    sock = str(tmp_path / "a.sock")
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


def test_prepared_memory_faults_minor_and_shows_nothing_unwritten(mem, uffd):
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


def test_alias_writes_do_not_fault_and_repeat_continue_is_already_mapped(mem, uffd):
    ps = mem.page_size
    mem.alias_view(0, mem.size)[:] = b"\x5a" * mem.size
    assert bytes(mem.alias_view(0, 16)) == b"\x5a" * 16
    assert not uffd.wait(50), "writing through the alias must not fault"
    assert uffd.continue_(mem.guest_addr, ps).resolution is Resolution.MAPPED
    again = uffd.continue_(mem.guest_addr, ps)
    assert again.resolution is Resolution.ALREADY_MAPPED and again.bytes_done == 0


def test_continue_without_page_in_cache_is_a_clear_error(mem, uffd):
    with pytest.raises(UffdError) as ei:
        uffd.continue_(mem.guest_addr + mem.page_size, mem.page_size)
    assert ei.value.errno == 14
    size = "4 KiB" if mem.page_size == 4096 else "2 MiB"
    assert str(ei.value) == (f"continue {mem.guest_addr + mem.page_size:#x}+{size}: EFAULT: Bad address "
                             "(page is not in the page cache: write it through the alias first)")


def test_one_continue_maps_a_large_range(mem, uffd):
    ps = mem.page_size
    mem.alias_view(0, mem.size)[:] = b"".join(page_bytes(p, ps) for p in range(NPAGES))
    r = uffd.continue_(mem.guest_addr, mem.size)
    assert r.resolution is Resolution.MAPPED and r.bytes_done == mem.size
    t, out = read_in_thread(mem.guest_addr, mem.size)
    t.join(10)
    assert not t.is_alive(), "reader blocked: the range was not all mapped"
    assert not uffd.wait(50)
    assert bytes(out) == bytes(mem.alias_view(0, mem.size))


def test_after_unregister_no_faults_and_data_intact(mem, uffd):
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


# -- bad arguments: typed exceptions whose messages name op, range and errno ----

def test_unaligned_address(host):
    m = GuestMemory.create("tmpfs", 16 * 4096)
    try:
        with Userfaultfd.create() as u:
            u.api()
            with pytest.raises(AlignmentError) as ei:
                u.register(m.guest_addr + 100, 4096, Mode.MISSING | Mode.MINOR)
            assert str(ei.value) == (f"register MISSING|MINOR {m.guest_addr + 100:#x}+4 KiB: EINVAL: "
                                     "Invalid argument (address is not aligned to the page size 0x1000)")
    finally:
        m.close()


def test_length_not_a_page_multiple(host):
    m = GuestMemory.create("tmpfs", 16 * 4096)
    try:
        with Userfaultfd.create() as u:
            u.api()
            with pytest.raises(AlignmentError) as ei:
                u.register(m.guest_addr, 5000, Mode.MISSING)
            assert str(ei.value) == (f"register MISSING {m.guest_addr:#x}+5000 B: EINVAL: Invalid argument "
                                     "(length is not a multiple of the page size 0x1000)")
    finally:
        m.close()


def test_range_outside_the_mapping(host):
    m = GuestMemory.create("tmpfs", 16 * 4096)
    try:
        with Userfaultfd.create() as u:
            u.api()
            u.register(m.guest_addr, m.size, Mode.MISSING | Mode.MINOR)
            end = m.guest_addr + m.size
            with pytest.raises(AlignmentError) as ei:
                u.continue_(end - 4096, 2 * 4096)
            assert str(ei.value) == (f"continue {end - 4096:#x}+8 KiB: EINVAL: Invalid argument "
                                     "(range is outside every registered mapping)")
            # and the kernel's own answer for a register where nothing is mapped
            hole = ffi.new("uint64_t *")
            assert lib.mg_mmap(0, 4096, 0, lib.MG_MAP_PRIVATE | lib.MG_MAP_ANONYMOUS, -1, 0, hole) == 0
            lib.mg_munmap(hole[0], 4096)
            with pytest.raises(UffdError) as ei:
                u.register(hole[0], 4096, Mode.MISSING)
            assert str(ei.value) == f"register MISSING {hole[0]:#x}+4 KiB: EINVAL: Invalid argument"
    finally:
        m.close()


def test_wrong_page_size_for_hugetlbfs(host, huge_pages):
    need_backing("hugetlbfs", host, huge_pages, 2)
    m = GuestMemory.create("hugetlbfs", 2 << 20)
    try:
        with Userfaultfd.create() as u:
            u.api()
            with pytest.raises(UffdError) as ei:   # the kernel refuses a 4 KiB range of a 2 MiB mapping
                u.register(m.guest_addr, 4096, Mode.MISSING | Mode.MINOR, page_size=4096)
            assert str(ei.value) == f"register MISSING|MINOR {m.guest_addr:#x}+4 KiB: EINVAL: Invalid argument"
            with pytest.raises(AlignmentError) as ei:  # and we refuse it before the ioctl given the page size
                u.register(m.guest_addr, 4096, Mode.MISSING | Mode.MINOR, page_size=2 << 20)
            assert "length is not a multiple of the page size 0x200000" in str(ei.value)
    finally:
        m.close()


def test_minor_on_anonymous_memory(host):
    addr = ffi.new("uint64_t *")
    assert lib.mg_mmap(0, 16 * 4096, 3, lib.MG_MAP_PRIVATE | lib.MG_MAP_ANONYMOUS, -1, 0, addr) == 0
    try:
        with Userfaultfd.create() as u:
            u.api()
            with pytest.raises(UffdError) as ei:
                u.register(addr[0], 16 * 4096, Mode.MINOR)
            assert str(ei.value) == f"register MINOR {addr[0]:#x}+64 KiB: EINVAL: Invalid argument"
    finally:
        lib.mg_munmap(addr[0], 16 * 4096)


def test_uffd_from_dev_and_syscall(host):
    for how, ok in (("syscall", host.uffd_syscall), ("dev", host.uffd_dev)):
        if not ok:
            continue
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
    if host.why_not("minor_hugetlbfs"):
        pytest.skip(host.why_not("minor_hugetlbfs"))
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

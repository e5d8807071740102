"""The wire contract: generated code matches proto/, batches round-trip, and the
page bitmaps and scheduler behave at their edges."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from migrate.pagestate import PageBitmap
from migrate.source.scheduler import Scheduler
from migrate.wire.protocol import BatchDecoder, BatchEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(60)
def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", os.path.join(ROOT, "proto", "generate.sh"), str(tmp_path)], check=True, env=env)
    for name in ("migration_pb2.py", "migration_pb2_grpc.py"):
        with open(tmp_path / name) as a, open(os.path.join(ROOT, "migrate", "proto", name)) as b:
            assert a.read() == b.read(), f"{name} is stale: run proto/generate.sh and commit"


@pytest.mark.timeout(30)
def test_batch_round_trip_with_zero_pages_and_compression():
    from migrate._binding import ffi
    ps = 4096
    ram = bytearray(16 * ps)
    for p in (1, 2, 5, 9):
        ram[p * ps:(p + 1) * ps] = bytes([p]) * ps
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(ram)))
    b = BatchEncoder(addr, ps, 8).encode([0, 1, 2, 5, 7, 9])
    assert b.raw_length == 4 * ps and len(b.data) < b.raw_length
    d = BatchDecoder(16, ps).decode(b)
    assert d.zero == bytes([0b010001]) and d.nonzero == 4
    assert d.data == b"".join(bytes(ram[p * ps:(p + 1) * ps]) for p in (1, 2, 5, 9))


@pytest.mark.timeout(30)
def test_bitmap_ranges_for_a_1tib_guest():
    n = (1 << 40) // 4096
    bm = PageBitmap(n)
    assert len(bytes(bm.to_bytes())) == n // 8 == 32 << 20
    bm.set(5, 100)
    bm.set(n - 3, 3)
    assert bm.count() == 103
    assert list(bm.runs()) == [(5, 100), (n - 3, 3)]
    assert bm.next_clear(5) == 105 and bm.next_set(105) == n - 3
    bm.clear(50, 10)
    assert bm.count() == 93 and 49 in bm and 50 not in bm
    with pytest.raises(IndexError) as ei:
        bm.set(n - 1, 2)
    assert str(ei.value) == f"pages [{n - 1}, {n + 1}) outside a bitmap of {n} pages"


def test_bitmap_bytes_round_trip_ignores_bits_past_the_end():
    a = PageBitmap(70)
    a.set(0, 70)
    b = PageBitmap(70)
    b.load_bytes(a.to_bytes()[:-1] + b"\xff")
    assert b.count() == 70 and b.full()


def test_scheduler_demand_then_locality_then_scan():
    s = Scheduler(1000, 10)
    assert s.next_batch() == list(range(0, 10))
    s.note_demand([500])
    assert s.next_batch() == list(range(501, 511))       # pages after the demand first
    assert s.next_batch() == list(range(511, 521))
    s.note_demand([10])
    assert s.next_batch() == list(range(11, 21))
    seen = set()
    while True:
        b = s.next_batch()
        if not b:
            break
        assert not seen & set(b)
        seen |= set(b)
    assert s.remaining() == 0


@pytest.mark.timeout(30)
def test_push_send_buffer_follows_the_round_trip_or_what_was_asked():
    """--push-buffer: auto keeps about 10 GB/s x RTT in flight (at least 256
    KiB: loopback's RTT is microseconds), a size is taken as asked, kernel
    leaves autotuning alone (the buffer stays what the kernel chose)."""
    import socket

    from migrate.source.push import (
        PUSH_BUFFER_MAX,
        PUSH_BUFFER_MIN,
        PUSH_BUFFER_RATE,
        push_send_buffer,
    )
    from migrate.wire.tcp import tcp_rtt_us

    ls = socket.create_server(("127.0.0.1", 0))
    try:
        def connected():
            c = socket.create_connection(ls.getsockname())
            peer, _ = ls.accept()
            peer.close()
            return c

        c = connected()
        rtt = tcp_rtt_us(c)
        assert rtt is not None and 0 < rtt < 25_000, "loopback round trip from tcp_info"
        got = push_send_buffer(c, None)
        want = int(PUSH_BUFFER_RATE * rtt * 1e-6)
        if want > PUSH_BUFFER_MAX:      # a long link (here: a very loaded host): autotuning
            assert got is None
        else:                           # loopback: 256 KiB, or a few hundred at tens of microseconds
            assert got == max(PUSH_BUFFER_MIN, want)
            assert c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == got // 2 * 2   # the kernel doubles half
        c.close()
        c = connected()
        assert push_send_buffer(c, 1 << 20) == 1 << 20
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 1 << 20
        c.close()
        c = connected()
        before = c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert push_send_buffer(c, 0) is None
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
        c.close()
    finally:
        ls.close()
    from migrate.cli import _buffer
    assert (_buffer("auto"), _buffer("kernel"), _buffer("512K")) == (None, 0, 512 << 10)


@pytest.mark.timeout(30)
def test_zero_blocks_of_large_pages_are_found_ahead():
    """mg_scan_blocks: one bit per 4 KiB block, LSB first, set exactly where the
    block is all zero (a zero byte at either end of a block is not enough)."""
    from migrate._binding import ffi, lib
    from migrate.sim.ramimage import ImageSpec
    ps, npages, bs = 2 << 20, 3, lib.MG_BLOCK
    nb = ps // bs
    ram = ffi.new("uint8_t[]", ps * npages)
    ImageSpec(5).fill(int(ffi.cast("uintptr_t", ram)), 0, ps * npages // 4096)
    buf = ffi.buffer(ram)
    buf[ps + 7 * bs: ps + 8 * bs] = bytes(bs)            # page 1 block 7: zero
    buf[ps + 9 * bs: ps + 10 * bs] = bytes(bs - 1) + b"x"  # page 1 block 9: zero but its last byte
    buf[2 * ps: 3 * ps] = bytes(ps)                      # page 2: every block zero
    d = ffi.new("struct mg_src_ram *")
    d.base = int(ffi.cast("uintptr_t", ram))
    d.page_size, d.npages, d.block_size = ps, npages, bs
    bits = ffi.new("uint8_t[]", npages * nb // 8)
    scanned = PageBitmap(npages)
    d.block_bits, d.scanned = bits, scanned.words
    lib.mg_scan_blocks(d, 1, 5)   # past the end is ignored
    assert [scanned.test(p) for p in range(npages)] == [False, True, True]
    got = bytes(ffi.buffer(bits))
    for p in (1, 2):
        want = bytearray(nb // 8)
        for b in range(nb):
            if buf[p * ps + b * bs: p * ps + (b + 1) * bs] == bytes(bs):
                want[b >> 3] |= 1 << (b & 7)
        assert got[p * nb // 8:(p + 1) * nb // 8] == bytes(want), p
    assert got[nb // 8 + 0] >> 7 & 1 and not got[nb // 8 + 1] >> 1 & 1   # blocks 7 and 9 of page 1
    assert got[:nb // 8] == bytes(nb // 8)                               # page 0: not scanned


@pytest.mark.timeout(60)
def test_zero_check_sees_one_byte_anywhere():
    """mg_is_zero (vectorized, 256 bytes a step after the first 64): one
    non-zero byte at any offset of a 4 KiB page, or in the tail of a length
    that is no multiple of the step, at an address that is not aligned."""
    from migrate._binding import ffi, lib
    raw = ffi.new("uint8_t[]", 4096 + 64)
    for shift in (0, 1, 8, 13):
        base = raw + shift
        for length in (0, 1, 7, 8, 63, 64, 65, 255, 300, 4095, 4096):
            assert lib.mg_is_zero(base, length) == 1, (shift, length)
            for at in range(length):
                base[at] = 0x80
                assert lib.mg_is_zero(base, length) == 0, (shift, length, at)
                base[at] = 0

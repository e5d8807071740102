"""The wire contract: generated code matches proto/, batches round-trip, and the
page bitmaps and scheduler behave at their edges."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from migrate.pagestate import PageBitmap
from migrate.protocol import BatchDecoder, BatchEncoder
from migrate.source import Scheduler

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
    with pytest.raises(IndexError):
        bm.set(n - 1, 2)


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

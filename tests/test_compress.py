"""zstd on the raw push (issue 19 item 3): migrations over loopback with
`source --compress on|off|auto`, typical and incompressible content, tmpfs
and hugetlbfs, every byte verified by the guest; hostile frames on a raw
push channel, each refused with its whole message, nothing received or
mapped, and a good source finishing after it; the per-batch choice between
raw and zstd, fed the rates a stream would measure."""

from __future__ import annotations

import socket
import struct

import pytest
import zstandard
from conftest import need_backing
from test_attacks_input import PeakRss
from test_bad_input import NPAGES, SIZE, finish_with_good_source, liar_demand_channel

from migrate._binding import lib
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration
from migrate.source.compress import CompressPolicy
from migrate.wire.protocol import PUSH_MAGIC, channel, raw_zstd_unavailable

M = 1 << 20
PS = 4096


@pytest.fixture(autouse=True)
def _zstd():
    why = raw_zstd_unavailable()
    if why is not None:
        pytest.skip(why)


# -- end to end ---------------------------------------------------------------

CASES = [
    # backing, mode, content (typical: 30% zero, 30% random, 40% compressible)
    ("tmpfs", "on", "typical"),
    ("tmpfs", "on", "random"),
    ("tmpfs", "off", "typical"),
    ("tmpfs", "auto", "typical"),
    ("tmpfs-copy", "on", "typical"),      # dest --placement copy: frames decompress into scratch, then COPY
    ("tmpfs-noprealloc", "on", "typical"),  # pages not allocated yet: staged, then written
    ("hugetlbfs", "on", "typical"),
    ("hugetlbfs", "auto", "random"),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backing,mode,content", CASES, ids=[f"{b}-{m}-{c}" for b, m, c in CASES])
def test_compressed_push_end_to_end(tmp_path, host, huge_pages, backing, mode, content):
    backing, _, variant = backing.partition("-")
    size = (256 if backing == "hugetlbfs" else 64) * M
    need_backing(backing, host, huge_pages, size // (2 * M))
    placing = dict(placement="copy") if variant == "copy" else \
        dict(dest_args=("--no-prealloc",)) if variant == "noprealloc" else {}
    fractions = dict(zero_fraction=0.0, random_fraction=1.0) if content == "random" else {}
    # a slow guest (hotset, 1 vCPU) leaves most pages to the push
    with LocalMigration(str(tmp_path), size, backing=backing, seed=11, pattern="hotset", vcpus=1,
                        source_args=("--compress", mode), **fractions, **placing) as lm:
        lm.make_image()
        out = lm.run(timeout=120)
    assert "failed" not in out, out.get("failed")
    assert (out["source_rc"], out["guest_rc"], out["dest_rc"]) == (0, 0, 0)
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0 and g["migration_complete"] is True
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == size // lm.page_size
    c = s["compress"]
    # auto: a destination on loopback has no link to save (--compress on forces it)
    assert c["mode"] == ("off" if mode == "auto" else mode) and len(c["streams"]) == 2
    runs = sum(x["runs"] for x in c["streams"])
    zstd_runs = sum(x["runs_zstd"] for x in c["streams"])
    incompressible = sum(x["runs_incompressible"] for x in c["streams"])
    if backing == "hugetlbfs" and c["page_bytes"] == 0:
        # (2 MiB pages: now and then demand and its readahead take them all)
        assert runs == 0
        return
    assert c["page_bytes"] > 0
    if mode == "off":
        assert zstd_runs == incompressible == 0 and c["batches_compressed_fraction"] == 0.0
        assert c["wire_bytes"] == c["page_bytes"]
    if mode == "on":
        assert c["batches_compressed_fraction"] == 1.0, c
    if mode == "auto":
        assert c["batches_compressed_fraction"] == 0.0, c
    if mode == "on" and content == "typical":
        assert zstd_runs > 0 and c["wire_bytes"] < 0.8 * c["page_bytes"], c
    if content == "random":
        # incompressible runs go raw whatever the mode
        assert zstd_runs == 0 and c["wire_bytes"] == c["page_bytes"], c
        assert incompressible > 0 if mode == "on" else True, c   # (auto: its probes)
    assert 0 < runs


@pytest.mark.timeout(60)
def test_compress_must_be_auto_on_or_off(tmp_path):
    with LocalMigration(str(tmp_path), 16 * M, seed=1) as lm:
        lm.make_image()
        src = lm._spawn("source", ["source", "--ram", lm.image, "--to", "127.0.0.1:1", "--compress", "fast"])
        assert src.wait(30) == 2
        assert "argument --compress: invalid choice: 'fast' (choose from 'auto', 'on', 'off')" in \
            "\n".join(src.stderr_lines)


# -- hostile frames ------------------------------------------------------------

def _frame(data: bytes, *, content_size: bool = True, window_log: int | None = None) -> bytes:
    if window_log is not None:
        params = zstandard.ZstdCompressionParameters(window_log=window_log, compression_level=1,
                                                     write_content_size=1)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


def _restate(frame: bytes, size: int) -> bytes:
    """frame with its header's content size changed to size (a 2-byte field:
    single segment, 256 <= sizes < 65792)."""
    fhd = frame[4]
    assert fhd >> 6 == 1 and (fhd >> 5) & 1 and fhd & 3 == 0, f"{fhd:#x}"
    return frame[:5] + struct.pack("<H", size - 256) + frame[7:]


def _pages(n: int, seed: int = 1) -> bytes:
    """n compressible, non-zero pages."""
    return b"".join(bytes([(seed + i) % 251 + 1]) * 2048 + bytes(range(256)) * 8 for i in range(n))


FIRST = NPAGES - 16     # the hostile runs' first page
COUNT = 8
WANT = COUNT * PS
WHAT = f"bad push run: push run at page {FIRST}: its zstd frame "
GOOD = _frame(_pages(COUNT))
BLOCK = 5 + 2           # where the first block header starts in a single-segment frame with a 2-byte size


def _run(frame: bytes, *, length: int | None = None, flags: int = lib.MG_RUN_ZSTD, first: int = FIRST,
         count: int = COUNT) -> bytes:
    header = struct.pack("<QII", first, count, flags) + bytes((count + 7) // 8)   # no page zero
    return header + struct.pack("<Q", len(frame) if length is None else length) + frame


HOSTILE = [
    ("length-zero", _run(b"", length=0), WHAT + "is 0 bytes long, not between 1 and its non-zero pages' bytes"),
    ("length-over-pages", _run(GOOD, length=WANT + 1),
     WHAT + f"is {WANT + 1} bytes long, not between 1 and its non-zero pages' bytes"),
    ("states-less", _run(_frame(_pages(COUNT - 1))),
     WHAT + f"states {WANT - PS} bytes, not its non-zero pages' bytes"),
    ("states-more", _run(_frame(_pages(COUNT + 1))),
     WHAT + f"states {WANT + PS} bytes, not its non-zero pages' bytes"),
    ("states-none", _run(_frame(_pages(COUNT), content_size=False)),
     WHAT + "states no size, not its non-zero pages' bytes"),
    ("not-zstd", _run(b"\x00" * 64), WHAT + "states no size, not its non-zero pages' bytes"),
    # (a single-segment frame: zstd itself finds the size it states wrong)
    ("larger-than-stated", _run(_restate(_frame(_pages(COUNT + 1)), WANT)),
     WHAT + "is refused by zstd: Destination buffer is too small"),
    ("smaller-than-stated", _run(_restate(_frame(_pages(COUNT - 1)), WANT)),
     WHAT + "is refused by zstd: Data corruption detected"),
    ("bytes-after-its-end", _run(GOOD + b"\x01\x02\x03\x04"),
     WHAT + "decompressed to more than its non-zero pages' bytes, or bytes follow its end"),
    # (its one block never completes: nothing comes out of it)
    ("cut-short", _run(GOOD[:-3]), WHAT + "decompressed to 0 bytes, fewer than its non-zero pages' bytes"),
    ("corrupt-block", _run(GOOD[:BLOCK] + bytes([GOOD[BLOCK] | 0x6]) + GOOD[BLOCK + 1:]),
     WHAT + "is refused by zstd: Data corruption detected"),
    ("window-over-bound", _run(_frame(bytes([7]) * (1024 * PS), window_log=lib.MG_ZSTD_WINDOW_LOG + 1),
                               first=0, count=1024),
     f"bad push run: push run at page 0: its zstd frame is refused by zstd: Frame requires too much memory for "
     f"decoding (frames here may use a window of at most {1 << lib.MG_ZSTD_WINDOW_LOG >> 10} KiB)"),
    ("zstd-and-sparse", _run(GOOD, flags=lib.MG_RUN_ZSTD | lib.MG_RUN_SPARSE),
     f"bad push run: push run at page {FIRST} is sparse, but pages of 4096 bytes are never sent sparse"),
]


@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=17, pattern="random", vcpus=2)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run,message", [(r, m) for _, r, m in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_hostile_frame_is_refused_and_nothing_mapped(waiting, run, message):
    """A source that lies in a compressed push run is dropped with the reason,
    before any page of the run is received (the Finish count stays 0: nothing
    was mapped), the agent's memory does not grow by what the frame claims,
    and a good source then finishes with every byte verified."""
    ch, demand, _, welcome = liar_demand_channel(waiting)
    assert welcome.push_compression == pb.COMPRESSION_ZSTD
    peak = PeakRss(waiting)
    host = waiting.address.rpartition(":")[0]
    raw = socket.create_connection((host, welcome.demand_port), timeout=10)
    raw.sendall(PUSH_MAGIC + welcome.demand_token + run)
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == message
    waiting.dest.wait_event("disconnected", 30)
    assert peak.grown() < 4 * M
    ch2 = channel(waiting.address, "test-finish")
    fin = pbg.MigrationStub(ch2).Finish(pb.FinishRequest(session_id=welcome.session_id, token=welcome.demand_token,
                                                         timeout_seconds=1), timeout=30)
    ch2.close()
    assert fin.error.startswith(f"migration is disconnected with 0 of {NPAGES} pages received"), fin.error
    raw.close()
    demand.close()
    ch.close()
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_good_frame_is_placed_before_a_bad_run(waiting):
    """The control for the table above: an honest frame of the same run is
    received (its pages count) before the bad run after it drops the source,
    so the refusals are the frames' doing."""
    with open(waiting.image, "rb") as f:
        f.seek(FIRST * PS)
        pages = [f.read(PS) for _ in range(COUNT)]
    zero = [p == bytes(PS) for p in pages]
    bits = sum(1 << i for i, z in enumerate(zero) if z).to_bytes((COUNT + 7) // 8, "little")
    frame = _frame(b"".join(p for p, z in zip(pages, zero) if not z))
    good = struct.pack("<QII", FIRST, COUNT, lib.MG_RUN_ZSTD) + bits + struct.pack("<Q", len(frame)) + frame
    ch, demand, _, welcome = liar_demand_channel(waiting)
    host = waiting.address.rpartition(":")[0]
    raw = socket.create_connection((host, welcome.demand_port), timeout=10)
    raw.sendall(PUSH_MAGIC + welcome.demand_token + good + _run(GOOD, length=0))
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == WHAT + "is 0 bytes long, not between 1 and its non-zero pages' bytes"
    waiting.dest.wait_event("disconnected", 30)
    ch2 = channel(waiting.address, "test-finish")
    fin = pbg.MigrationStub(ch2).Finish(pb.FinishRequest(session_id=welcome.session_id, token=welcome.demand_token,
                                                         timeout_seconds=1), timeout=30)
    ch2.close()
    assert fin.error.startswith(f"migration is disconnected with {COUNT} of {NPAGES} pages received"), fin.error
    raw.close()
    demand.close()
    ch.close()
    finish_with_good_source(waiting)


# -- the choice, batch by batch ------------------------------------------------

MB = 1e6


def _feed(pol: CompressPolicy, t: float, *, link: float, cpu_raw: float, zstd: float, ratio: float,
          seconds: float = 3.0, batch: int = 1 << 20) -> float:
    """Runs a stream for seconds of simulated time against a link of link
    bytes/s (wire), a raw path that the CPU holds to cpu_raw page bytes/s, and
    zstd at zstd page bytes/s to ratio; returns the time reached."""
    end = t + seconds
    while t < end:
        comp = pol.next(now=t)
        if comp:
            z = batch / zstd
            wall = max(z, batch * ratio / link)
            pol.done(True, batch, wall, batch, int(batch * ratio), z)
        else:
            wall = batch / min(link, cpu_raw)
            pol.done(False, batch, wall, 0, 0, 0.0)
        t += wall
    return t


def test_policy_compresses_on_a_slow_link_and_not_on_loopback():
    slow = CompressPolicy("auto", now=0.0)          # 1 Gbit, two streams
    _feed(slow, 0.0, link=62 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5)
    assert slow.compressing
    fast = CompressPolicy("auto", now=0.0)          # loopback: the CPU is the limit
    _feed(fast, 0.0, link=3000 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5)
    assert not fast.compressing and fast.switches == 0


def test_policy_leaves_incompressible_pages_raw():
    pol = CompressPolicy("auto", now=0.0)
    _feed(pol, 0.0, link=62 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.97)
    assert not pol.compressing


def test_policy_follows_the_link_both_ways():
    """A link that gets faster than zstd ends the compression within probes;
    slower again, it starts again."""
    pol = CompressPolicy("auto", now=0.0)
    t = _feed(pol, 0.0, link=62 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5)
    assert pol.compressing
    t = _feed(pol, t, link=3000 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5)
    assert not pol.compressing
    _feed(pol, t, link=62 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5)
    assert pol.compressing


def test_policy_on_and_off_never_change():
    for mode, want in (("on", True), ("off", False)):
        pol = CompressPolicy(mode, now=0.0)
        _feed(pol, 0.0, link=62 * MB if not want else 3000 * MB, cpu_raw=1500 * MB, zstd=500 * MB, ratio=0.5,
              seconds=2)
        assert pol.next(now=10.0) is want and pol.switches == 0
    with pytest.raises(ValueError, match="--compress 'fast': use auto, on or off"):
        CompressPolicy("fast")

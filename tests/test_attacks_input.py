"""Bounded input (issue 16, item 4), each attack as an attacker tried it
against a live agent: the refusal comes with its whole message, before the
agent allocates what the input claims (its memory high-water mark barely
moves), and a good source then finishes a migration the guest verifies.

The liar sources and helpers are test_bad_input's; the oversized device
state needs a real QEMU (test_qemu's guest) and skips without one."""

from __future__ import annotations

import functools
import io
import os
import re
import socket
import struct
import time

import grpc
import pytest
import zstandard
from test_bad_input import NPAGES, PAGE, SIZE, finish_with_good_source, liar_demand_channel, open_session, push

from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration
from migrate.wire.attach import _MAX_HELLO
from migrate.wire.protocol import MAX_MESSAGE, MAX_REQUEST, PUSH_MAGIC, channel

M = 1 << 20
BOMB_BYTES = 2 << 30          # what the bomb's frame header states
RSS_SLACK = 4 * M             # how much the agent's peak RSS may grow while refusing


@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=17, pattern="random", vcpus=2)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


@functools.lru_cache(maxsize=None)
def zstd_bomb(state_size: bool) -> bytes:
    """2 GiB of zeros as one zstd frame of about 65 KB; its header states the
    size when state_size (what the attacker sent), or leaves it out."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=-3, write_content_size=state_size)
    zero = bytes(4 * M)
    with cctx.stream_writer(out, size=BOMB_BYTES if state_size else -1, closefd=False) as w:
        for _ in range(BOMB_BYTES // len(zero)):
            w.write(zero)
    return out.getvalue()


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakRss:
    """How much the agent's peak resident set grows from here on: the peak
    (VmHWM) is reset to the current RSS (clear_refs 5), after the agent has
    allocated its guest's RAM (16 MiB of shared memory, touched as it attaches)."""

    def __init__(self, lm: LocalMigration):
        self.pid = lm.dest.p.pid
        deadline = time.monotonic() + 30
        while _status(self.pid, "RssShmem") < lm.size and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        self.start = _status(self.pid, "VmRSS")

    def grown(self) -> int:
        return _status(self.pid, "VmHWM") - self.start


def refused_batch(lm: LocalMigration, batch: pb.PageBatch, rss_slack: int = RSS_SLACK) -> str:
    """Pushes one batch on a fresh session; returns the refusal's details after
    checking it is INVALID_ARGUMENT, that the source was dropped with that
    reason, and that the agent's peak RSS grew by less than rss_slack."""
    ch, stub, welcome = open_session(lm)
    peak = PeakRss(lm)
    with pytest.raises(grpc.RpcError) as ei:
        push(stub, welcome, batch)
    grown = peak.grown()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert grown < rss_slack, f"the agent's peak RSS grew by {grown / M:.1f} MiB refusing the batch"
    ch.close()
    lm.dest.wait_event("disconnected", 30)
    ch2 = channel(lm.address, "test-finish")
    fin = pbg.MigrationStub(ch2).Finish(pb.FinishRequest(session_id=welcome.session_id, token=welcome.demand_token,
                                                         timeout_seconds=1), timeout=30)
    ch2.close()
    assert not fin.complete
    assert fin.error == (f"migration is disconnected with 0 of {NPAGES} pages received (the source was "
                         f"dropped: {ei.value.details()})")
    return ei.value.details()


@pytest.mark.timeout(120)
def test_zstd_bomb_is_refused_before_decompressing(waiting):
    """65 KB naming one page whose frame states 2 GiB: zstandard would allocate
    the 2 GiB (max_output_size does not cap a stated size)."""
    bomb = zstd_bomb(True)
    assert len(bomb) < 100_000 and zstandard.frame_content_size(bomb) == BOMB_BYTES
    batch = pb.PageBatch(pages=[7], zero=b"\x00", compression=pb.COMPRESSION_ZSTD, data=bomb, raw_length=4096)
    assert refused_batch(waiting, batch) == (
        f"batch of 1 pages: zstd frame states {BOMB_BYTES} bytes, but the batch's non-zero pages are 4096 "
        "bytes: refused before decompressing")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_zstd_bomb_without_a_stated_size_stops_at_the_batch_size(waiting):
    """The same 2 GiB with no size in the header: decompression stops one byte
    past what the batch's pages may hold."""
    bomb = zstd_bomb(False)
    assert zstandard.frame_content_size(bomb) == -1
    batch = pb.PageBatch(pages=[7], zero=b"\x00", compression=pb.COMPRESSION_ZSTD, data=bomb, raw_length=4096)
    assert refused_batch(waiting, batch) == (
        "batch of 1 pages: zstd data decompresses to more than the 4096 bytes of its non-zero pages: refused "
        "at the first byte beyond")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_half_a_million_duplicate_page_indexes(waiting):
    """524,288 times page 3, each claiming 4 KiB: 2 GiB of pages in a 600 KB
    message, refused by its count before the pages are even read."""
    n = 524_288
    batch = pb.PageBatch(pages=[3] * n, zero=bytes(n // 8), raw_length=n * 4096, data=PAGE)
    max_pages = MAX_MESSAGE // 4096
    # gRPC and protobuf hold the message and its parsed page list (8 bytes a
    # page: 4 MiB) before any handler runs; nothing more is allocated for it
    assert refused_batch(waiting, batch, rss_slack=16 * M) == (
        f"batch of {n} pages is larger than the {max_pages} pages of 4096 bytes a batch may carry: send "
        "smaller batches (--batch-bytes)")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pages,message", [
    ([3, 3], "batch names page 3 twice (entry 1): a batch's pages must be strictly ascending"),
    ([9, 10, 4], "batch names page 4 after page 10 (entry 2): a batch's pages must be strictly ascending"),
    ([1, 2, 3] * 1000, "batch names page 1 after page 3 (entry 3): a batch's pages must be strictly ascending"),
], ids=["duplicate", "descending", "repeated-run"])
def test_batch_pages_must_be_strictly_ascending(waiting, pages, message):
    n = len(pages)
    batch = pb.PageBatch(pages=pages, zero=bytes((n + 7) // 8), raw_length=n * 4096, data=PAGE)
    assert refused_batch(waiting, batch) == message
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_message_larger_than_the_server_takes(waiting):
    """gRPC holds a whole message before a handler sees it: the destination's
    server takes at most MAX_REQUEST bytes in one."""
    ch, stub, welcome = open_session(waiting)
    peak = PeakRss(waiting)
    n = MAX_REQUEST // 4096 + 1
    batch = pb.PageBatch(pages=range(n), zero=bytes((n + 7) // 8), raw_length=n * 4096, data=os.urandom(n * 4096))
    size = batch.ByteSize()
    with pytest.raises(grpc.RpcError) as ei:
        push(stub, welcome, batch)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.details() == f"SERVER: Received message larger than max ({size} vs. {MAX_REQUEST})"
    # (what gRPC held of it, and nothing more)
    assert peak.grown() < size + RSS_SLACK
    ch.close()
    waiting.dest.wait_event("disconnected", 30)
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_raw_push_run_claiming_four_billion_pages(waiting):
    """A raw push run header's count is checked against the run cap and the
    layout before its bitmap is read or a page claimed."""
    ch, demand, _, welcome = liar_demand_channel(waiting)
    host = waiting.address.rpartition(":")[0]
    raw = socket.create_connection((host, welcome.demand_port), timeout=10)
    raw.sendall(PUSH_MAGIC + welcome.demand_token + struct.pack("<QII", 0, 0xFFFFFFFF, 0) + b"\xff" * 64)
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == (f"bad push run: push run of 4294967295 pages at page 0 does not fit the layout of "
                             f"{NPAGES} pages (at most 1024 pages a run)")
    waiting.dest.wait_event("disconnected", 30)
    raw.close()
    demand.close()
    ch.close()
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_attach_hello_claiming_four_gigabytes(waiting):
    """An attach hello whose length prefix claims 4 GiB: refused on the prefix,
    and the agent goes on taking attaches (a second guest is told it serves
    one migration) and serving its guest."""
    peak = PeakRss(waiting)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(waiting.sock)
    s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"{" * 1000)
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == (f"attach refused: attach message of 4294967295 bytes is larger than the limit "
                             f"{_MAX_HELLO}")
    assert s.recv(1) == b""       # closed, nothing said
    s.close()
    assert peak.grown() < RSS_SLACK
    finish_with_good_source(waiting)


# -- device state: needs a real QEMU ----------------------------------------------
@pytest.mark.timeout(300)
def test_device_state_larger_than_the_limit(tmp_path):
    """A destination started with --max-device-state 200K takes what comes of a real
    QEMU's device state up to 200 KiB and refuses the rest: the source hears the
    limit, and its QEMU runs again with its guest intact."""
    from test_qemu import EXAMPLES, _why_not_qemu

    from migrate.qemu.lab import Lab
    from migrate.qemu.shim import shim_path
    from migrate.sim.localrun import Proc

    why = _why_not_qemu()
    if why:
        pytest.skip(why)
    guest = str(tmp_path / "guest")
    import subprocess
    r = subprocess.run([os.path.join(EXAMPLES, "build-guest.sh"), guest], capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        pytest.skip(f"cannot build the guest: {r.stderr.strip()[-500:]}")
    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        src_ram, dst_ram = lab.shm_path("migrate-src-big"), lab.shm_path("migrate-dst-big")
        src_qmp, dst_qmp = str(tmp_path / "src.agent.qmp"), str(tmp_path / "dst.agent.qmp")
        src, qs, ss = lab.start("src", mem_mb=256, backend="file", mem_path=src_ram,
                                extra_args=["-qmp", f"unix:{src_qmp},server=on,wait=off"])
        ss.wait_for(r"FILLED \d+", timeout=90)
        procs = []
        try:
            attach = str(tmp_path / "a.sock")
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", dst_qmp,
                                 "--max-device-state", "200K", "--json"])
            procs.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            lab.start("dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}, mem_mb=256,
                      backend="file", mem_path=dst_ram, incoming="defer",
                      extra_args=["-qmp", f"unix:{dst_qmp},server=on,wait=off"])
            dest.wait_event("attached", 30)
            source = Proc("source", ["source", "--qmp", src_qmp, "--ram", src_ram, "--to", addr, "--json"])
            procs.append(source)
            assert source.wait(90) == 1
            # (the stream comes in whatever pieces QEMU wrote: the count is what came before the one
            # that would have passed the limit)
            said = [e["message"] for e in dest.lines if e["event"] == "error"]
            m = [re.fullmatch(r"device state: (the device state is larger than --max-device-state 200 KiB: "
                              r"refused after (\d+) bytes \(the destination QEMU does not load it\)\. Start "
                              r"`migrate dest` with a larger --max-device-state)", x) for x in said]
            m = [x for x in m if x]
            assert m and int(m[0].group(2)) <= 200 << 10, said
            limit = m[0].group(1)
            errors = " ".join(source.errors())
            assert f"the destination did not resume the guest: {limit}" in errors, errors
            assert "source QEMU was resumed" in errors, errors
            assert qs.cmd("query-status")["status"] == "running"
            ss.send("\n")
            assert ss.wait_for(r"VERIFY (OK|BAD)[^\n]*", timeout=60).group(0).startswith("VERIFY OK")
        finally:
            for p in procs:
                p.kill()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value,message", [
    ("0", "argument --max-device-state: 0: must be more than 0"),
    ("-1G", "argument --max-device-state: '-1G': a size cannot be negative"),
    ("lots", "argument --max-device-state: cannot read 'lots' as a size: use e.g. 256M, 1G or a byte count"),
], ids=["zero", "negative", "not-a-size"])
def test_max_device_state_must_be_a_size(value, message, capsys):
    from migrate.cli import build_parser
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["dest", "--listen", "127.0.0.1:0", "--attach", "x",
                                   f"--max-device-state={value}"])
    assert ei.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"migrate dest: error: {message}"
    assert build_parser().parse_args(["dest", "--listen", "127.0.0.1:0", "--attach", "x"]).max_device_state == 1 << 30

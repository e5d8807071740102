"""Each bad input gets a clear error and loses nothing: after it, a good source
still completes the migration and the guest verifies every byte (so nothing the
bad peer sent was ever mapped). The broken peers here are deliberate
(Firecracker's malicious_handler in spirit): a source that lies or sends garbage,
and one destination that stops answering part way through opening a session."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import need_backing

from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.report import Reporter
from migrate.sim.localrun import LocalMigration
from migrate.source.ramfile import RamImage
from migrate.source.session import Source, SourceError
from migrate.wire.protocol import DEMAND_MAGIC, PROTOCOL_VERSION, PUSH_MAGIC, channel

M = 1 << 20
SIZE = 16 * M
NPAGES = SIZE // 4096


@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=11, pattern="random", vcpus=2)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


def finish_with_good_source(lm: LocalMigration, npages: int = NPAGES) -> dict:
    """A good source completes the migration, every byte verified by the
    guest; returns the source's summary."""
    src = lm.start_source()
    assert src.wait(60) == 0, src.errors() or src.stderr_lines[-5:]
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    assert lm.dest.wait(30) == 0
    d = lm.dest.summary()
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == npages
    return src.summary()


def open_session(lm, **hello_fields) -> tuple[grpc.Channel, pbg.MigrationStub, pb.Welcome]:
    ch = channel(lm.address, "test")
    stub = pbg.MigrationStub(ch)
    fields = dict(version=PROTOCOL_VERSION, ram_size=SIZE, page_size=4096, source_name="liar",
                  compression=[pb.COMPRESSION_ZSTD, pb.COMPRESSION_NONE])
    fields.update(hello_fields)
    return ch, stub, stub.Open(pb.Hello(**fields), timeout=30)


def push(stub, welcome, *batches):
    """A Push stream of the session welcome opened: its id and token, then batches."""
    first = pb.PageBatch(session_id=welcome.session_id, token=welcome.demand_token)
    return stub.Push(iter([first, *batches]), timeout=30)


def source_error(lm, *extra) -> str:
    src = lm.start_source(extra)
    rc = src.wait(60)
    assert rc != 0
    return " ".join(src.errors())


@pytest.mark.timeout(120)
def test_guest_size_differs_from_source(tmp_path, host):
    with LocalMigration(str(tmp_path), SIZE, seed=1) as lm:
        lm.make_image()
        lm.size = SIZE // 2            # the destination guest gets half the RAM
        lm.start_dest()
        lm.start_guest()
        err = source_error(lm)
    assert err == ("open session: destination said FAILED_PRECONDITION: source RAM is 16 MiB in pages of 4 KiB, "
                   "but the guest attached here has 8 MiB in pages of 4 KiB: start the destination guest "
                   "with the source's RAM size and backing")


@pytest.mark.timeout(120)
def test_page_size_differs_from_source(waiting):
    err = source_error(waiting, "--page-size", "2M")
    assert err == ("open session: destination said FAILED_PRECONDITION: source RAM is 16 MiB in pages of 2 MiB, "
                   "but the guest attached here has 16 MiB in pages of 4 KiB: start the destination guest "
                   "with the source's RAM size and backing")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_protocol_version_mismatch(waiting):
    with pytest.raises(grpc.RpcError) as ei:
        open_session(waiting, version=PROTOCOL_VERSION + 98)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == (f"source speaks protocol version {PROTOCOL_VERSION + 98}, this destination "
                                  f"speaks {PROTOCOL_VERSION}: run the same migrate release on both hosts")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_second_source_is_refused_while_busy_then_a_new_one_resumes(waiting):
    ch, stub, welcome = open_session(waiting)      # a source that connects, then stalls
    host = waiting.address.rpartition(":")[0]
    demand = socket.create_connection((host, welcome.demand_port), timeout=10)
    demand.sendall(DEMAND_MAGIC + welcome.demand_token)
    waiting.dest.wait_event("demand", 30)
    assert len(demand.recv(8)) == 8, "the guest's first fault arrives as a demand request"
    err = source_error(waiting)
    assert err == (f"open session: destination said RESOURCE_EXHAUSTED: destination is busy: migration "
                   f"{welcome.session_id} already has a source")
    demand.close()
    ch.close()          # the stalled source goes away; the next one resumes the session
    waiting.dest.wait_event("disconnected", 30)
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_a_second_agent_cannot_take_a_live_agents_port_or_attach_socket(waiting, tmp_path):
    """gRPC binds with SO_REUSEPORT by default: a second agent on the same port
    would share the first one's connections, and a source could migrate into
    the wrong guest. Both the port and the attach socket of a live agent are
    refused, saying so; the live agent is undisturbed and completes."""
    from migrate.sim.localrun import Proc
    other = str(tmp_path / "other.sock")
    same_port = Proc("dest2", ["dest", "--listen", waiting.address, "--attach", other, "--json"])
    waiting.procs.append(same_port)      # stopped with the fixture's, should it not exit
    assert same_port.wait(30) == 2
    assert same_port.errors() == [f"cannot listen on {waiting.address}: the port is in use (another agent?) or "
                                  "the address is not this host's"]
    assert not os.path.exists(other)
    same_sock = Proc("dest3", ["dest", "--listen", "127.0.0.1:0", "--attach", waiting.sock, "--json"])
    waiting.procs.append(same_sock)
    assert same_sock.wait(30) == 2
    assert same_sock.errors() == [f"cannot start the destination: another agent is listening on {waiting.sock}: "
                                  "stop it, or choose another --attach path"]
    assert os.path.exists(waiting.sock)
    finish_with_good_source(waiting)
    assert waiting.dest.errors() == []     # its socket's probe was not taken for an attach


@pytest.mark.timeout(60)
def test_a_destination_host_that_does_not_resolve_fails_at_once(tmp_path):
    image = str(tmp_path / "ram")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    from migrate.sim.localrun import Proc
    # (--insecure: plaintext is refused where --to is not loopback, and a name that does not resolve is not)
    src = Proc("source", ["source", "--ram", image, "--to", "no-such-host.invalid:5000", "--insecure", "--json"])
    try:
        assert src.wait(20) == 1
    finally:
        src.kill()
    # the resolver's own words (e.g. "Name or service not known") vary with the host's resolver
    (err,) = src.errors()
    assert re.fullmatch(r"cannot resolve the destination host 'no-such-host\.invalid': [A-Z][^:]+", err), err


PAGE = bytes(range(256)) * 16

# A source whose gRPC Push batch breaks the contract: the destination refuses
# the batch with INVALID_ARGUMENT and the whole reason, places none of it,
# drops the source (Finish says so, with the same reason), and a good source
# then completes the migration. One row a lie: (id, the batch, the message).
BAD_BATCHES = [
    pytest.param(pb.PageBatch(pages=[3, NPAGES + 5], zero=b"\x00", data=PAGE * 2, raw_length=8192),
                 f"batch names page {NPAGES + 5}, outside the layout of {NPAGES} pages of 4096 bytes",
                 id="page-outside-the-layout"),
    pytest.param(pb.PageBatch(pages=[3, 4], zero=b"\x00", data=PAGE + PAGE[:100], raw_length=8192),
                 "batch of 2 non-zero pages carries 4196 bytes after decompression, expected 8192: "
                 "truncated or corrupt",
                 id="truncated"),
    pytest.param(pb.PageBatch(pages=[3, 4], zero=b"\x00", data=PAGE * 2, raw_length=4096),
                 "batch declares 4096 bytes for 2 non-zero pages of 4096 bytes (expected 8192): "
                 "truncated or corrupt",
                 id="declared-length-lies"),
    pytest.param(pb.PageBatch(pages=[3], zero=b"\x00", compression=pb.COMPRESSION_ZSTD,
                              data=b"not zstd at all", raw_length=4096),
                 "batch of 1 pages: zstd data does not decompress: error determining content size from "
                 "frame header",
                 id="garbage-zstd"),
    pytest.param(pb.PageBatch(pages=[1, 2, 3], zero=b"", data=PAGE * 3, raw_length=3 * 4096),
                 "batch of 3 pages carries a zero bitmap of 0 bytes, expected 1",
                 id="zero-bitmap-of-wrong-length"),
    pytest.param(pb.PageBatch(pages=[3], zero=b"\x00", compression=7, data=PAGE, raw_length=4096),
                 "batch uses unknown compression 7",
                 id="unknown-compression"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch,message", BAD_BATCHES)
def test_bad_batch(waiting, batch, message):
    ch, stub, welcome = open_session(waiting)
    with pytest.raises(grpc.RpcError) as ei:
        push(stub, welcome, batch)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == message
    ch.close()
    waiting.dest.wait_event("disconnected", 30)   # no demand channel came: the source is gone
    # asking for the end of a migration that lost its source says where it stands
    ch2 = channel(waiting.address, "test-finish")
    fin = pbg.MigrationStub(ch2).Finish(pb.FinishRequest(session_id=welcome.session_id,
                                                         token=welcome.demand_token, timeout_seconds=1), timeout=30)
    ch2.close()
    assert not fin.complete
    assert fin.error == (f"migration is disconnected with 0 of {NPAGES} pages received (the source was "
                         f"dropped: {message})")
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_garbage_bytes_on_the_wire(waiting):
    """Not even a protobuf: the server can't parse it; nothing is placed."""
    ch = channel(waiting.address, "garbage")
    raw = ch.stream_unary("/migrate.v1.Migration/Push", request_serializer=lambda b: b,
                          response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as ei:
        raw(iter([b"\xff\xff\xff\xff\x0f garbage", os.urandom(64)]), timeout=30)
    assert ei.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    ch.close()
    finish_with_good_source(waiting)


@pytest.mark.timeout(60)
def test_ram_file_shorter_than_declared(tmp_path, host):
    img = f"/dev/shm/migrate-short-{os.getpid()}"
    with open(img, "wb") as f:
        f.truncate(SIZE // 2)
    try:
        r = subprocess.run([sys.executable, "-m", "migrate", "source", "--ram", img, "--size", "16M",
                            "--to", "127.0.0.1:1", "--json"], capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(img)
    assert r.returncode == 2
    errors = [ev["message"] for ev in map(json.loads, r.stdout.splitlines()) if ev.get("event") == "error"]
    assert errors == [f"RAM file {img} is 8 MiB, shorter than the declared 16 MiB"]


@pytest.mark.timeout(60)
def test_guest_ram_file_shorter_than_its_hello(tmp_path, host):
    """The agent refuses an attach whose RAM file is shorter than the declared size."""
    from migrate.memory import GuestMemory
    from migrate.uffd import Userfaultfd
    from migrate.wire.attach import AttachError, Region, attach_guest

    lm = LocalMigration(str(tmp_path), SIZE)
    try:
        lm.start_dest()
        mem = GuestMemory.create("tmpfs", SIZE // 2, map_alias=False)
        uffd = Userfaultfd.create()
        with pytest.raises(AttachError) as ei:
            attach_guest(lm.sock, uffd.fd, mem.fd, page_size=4096, ram_size=SIZE,
                         regions=[Region(mem.guest_addr, SIZE // 2, 0)], timeout=30)
        assert str(ei.value) == ("the agent refused the attach: RAM file is 8 MiB, shorter than the "
                                 "declared 16 MiB")
        uffd.close()
        mem.close()
    finally:
        lm.close()


def liar_demand_channel(lm, **hello_fields):
    """A source's session and demand channel; returns (grpc channel, socket,
    the page the guest's first fault asked for, Welcome)."""
    ch, stub, welcome = open_session(lm, **hello_fields)
    host = lm.address.rpartition(":")[0]
    demand = socket.create_connection((host, welcome.demand_port), timeout=10)
    demand.sendall(DEMAND_MAGIC + welcome.demand_token)
    (page,) = struct.unpack("<Q", demand.recv(8, socket.MSG_WAITALL))
    return ch, demand, page, welcome


# A source that answers a vCPU's request with a malformed demand reply (4 KiB
# pages): refused, nothing mapped, and a good source finishes the job. One
# row a lie: (id, the reply's header given the page asked for, the message).
@pytest.mark.timeout(120)
@pytest.mark.parametrize("header,message", [
    (lambda page: struct.pack("<QII", NPAGES + 7, 0, 4096),
     f"bad demand reply: demand reply names page {NPAGES + 7}, outside the layout of {NPAGES} pages of 4096 bytes"),
    (lambda page: struct.pack("<QII", page, 0, 100),
     "bad demand reply: demand reply for page {page} carries 100 bytes, expected 4096 (or 0 for a zero page)"),
    (lambda page: struct.pack("<QII", page, 2, 4096),
     "bad demand reply: demand reply for page {page} is sparse, but pages of 4096 bytes are never sent sparse"),
], ids=["page-outside-layout", "short-page", "sparse-small-pages"])
def test_lying_demand_reply(waiting, header, message):
    ch, demand, page, _ = liar_demand_channel(waiting)
    demand.sendall(header(page) + PAGE)
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == message.format(page=page)
    waiting.dest.wait_event("disconnected", 30)
    demand.close()
    ch.close()
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_source_gone_part_way_through_a_page_leaves_nothing_behind(waiting):
    """A source that starts a page and goes away: the bytes it did send never
    reach the guest. The page is all zero in the image, and on a freshly
    allocated RAM file a zero page is not written again, so the agent must wipe
    what arrived when it gives the page back."""
    from migrate._binding import lib
    from migrate.sim.ramimage import (
        DEFAULT_RANDOM_FRACTION,
        DEFAULT_ZERO_FRACTION,
        ImageSpec,
    )
    spec = ImageSpec(waiting.seed, DEFAULT_ZERO_FRACTION, DEFAULT_RANDOM_FRACTION)
    ch, demand, asked, _ = liar_demand_channel(waiting)
    zero_page = next(p for p in range(NPAGES) if p != asked and
                     lib.mg_pattern_kind(spec.seed, p, spec.zero_ppm, spec.random_ppm) == lib.MG_KIND_ZERO)
    demand.sendall(struct.pack("<QII", zero_page, 0, 4096) + b"\xee" * 2048)   # half a page, then gone
    demand.close()
    waiting.dest.wait_event("disconnected", 30)
    ch.close()
    finish_with_good_source(waiting)   # the guest reads every byte of every page


HUGE = 2 * M
HUGE_SIZE = 32 * M


@pytest.fixture
def waiting_huge(tmp_path, host, huge_pages):
    """dest + an attached guest on 2 MiB pages, no source yet."""
    need_backing("hugetlbfs", host, huge_pages, 2 * HUGE_SIZE // HUGE)
    lm = LocalMigration(str(tmp_path), HUGE_SIZE, backing="hugetlbfs", seed=13, pattern="random", vcpus=1)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


SPARSE_BITMAP = b"\x01" + bytes(63)    # block 0 zero, the other 511 not


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags,length,message", [
    (2, 64 + 4096,
     "carries 4160 bytes, expected 2097152, 0 for a zero page, or (sparse) a 64-byte block bitmap and 4096 "
     "bytes for each block it does not mark zero"),
    (2, 10,
     "carries 10 bytes, expected 2097152, 0 for a zero page, or (sparse) a 64-byte block bitmap and 4096 "
     "bytes for each block it does not mark zero"),
    (3, 64 + 511 * 4096, "has flags 0x3: unknown, or both zero and sparse"),
    (8, 2 * M, "has flags 0x8: unknown, or both zero and sparse"),
], ids=["bitmap-disagrees", "shorter-than-bitmap", "zero-and-sparse", "unknown-flag"])
def test_lying_sparse_reply(waiting_huge, flags, length, message):
    """Sparse replies (2 MiB pages) that do not add up: refused before a byte
    of the page is written, and a good source finishes the migration."""
    lm = waiting_huge
    ch, demand, page, _ = liar_demand_channel(lm, ram_size=HUGE_SIZE, page_size=HUGE)
    demand.sendall(struct.pack("<QII", page, flags, length) + SPARSE_BITMAP + PAGE * 4)
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"] == f"bad demand reply: demand reply for page {page} {message}"
    lm.dest.wait_event("disconnected", 30)
    demand.close()
    ch.close()
    s = finish_with_good_source(lm, HUGE_SIZE // HUGE)
    assert s["demand_zero_blocks"] > 0   # the good source's replies were sparse


@pytest.mark.timeout(120)
@pytest.mark.parametrize("header,message", [
    (struct.pack("<QII", 0, 4, 1),
     "push run at page 0 is sparse, but pages of 4096 bytes are never sent sparse"),
    (struct.pack("<QII", 8, 4, 4), "push run at page 8 has flags 0x4: unknown"),
    (struct.pack("<QII", NPAGES - 2, 4, 0),
     f"push run of 4 pages at page {NPAGES - 2} does not fit the layout of {NPAGES} pages (at most 1024 pages a run)"),
], ids=["sparse-small-pages", "unknown-flag", "past-the-end"])
def test_lying_push_run(waiting, header, message):
    """A raw push run the destination cannot take: refused before any page of
    it is claimed, the source is dropped, and a good source finishes."""
    ch, demand, _, welcome = liar_demand_channel(waiting)
    host = waiting.address.rpartition(":")[0]
    push = socket.create_connection((host, welcome.demand_port), timeout=10)
    push.sendall(PUSH_MAGIC + welcome.demand_token + header + b"\x00" + PAGE * 4)
    ev = waiting.dest.wait_event("error", 30)
    assert ev["message"] == f"bad push run: {message}"
    waiting.dest.wait_event("disconnected", 30)
    push.close()
    demand.close()
    ch.close()
    finish_with_good_source(waiting)


@pytest.mark.timeout(60)
def test_push_channel_refused_after_the_demand_channel(tmp_path):
    """A destination that takes the demand channel and then lets the push
    channel's connect go unanswered (its listen backlog is full): the source
    says which channel failed, and the demand server it already started is
    stopped and its socket closed (the destination reads end of file)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)   # one connection waits to be accepted; the next SYN is dropped
    welcome_port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept_demand():
        conn, _ = listener.accept()
        accepted.append(conn)

    class Destination(pbg.MigrationServicer):
        def Open(self, request, context):
            return pb.Welcome(version=PROTOCOL_VERSION, session_id="refusing", push_streams=2,
                              demand_port=welcome_port, demand_token=b"t" * 16)

    server = grpc.server(ThreadPoolExecutor(2))
    pbg.add_MigrationServicer_to_server(Destination(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    acceptor = threading.Thread(target=accept_demand, daemon=True)
    acceptor.start()
    path = tmp_path / "ram"
    path.write_bytes(bytes(64 * 4096))
    ram = RamImage(str(path))
    try:
        src = Source(ram, f"127.0.0.1:{port}", Reporter(quiet=True), connect_timeout=1.0)
        # the error is kept (as a caller would log it), and with it the source's
        # frames: closing the channel has to be the source's own doing
        with pytest.raises(SourceError) as failed:
            src.run()
        # the push channel's SYN waits in vain on the full backlog: connect_timeout
        assert str(failed.value) == f"cannot open the push channel to 127.0.0.1:{welcome_port}: timed out"
        assert not [t for t in threading.enumerate() if t.name == "demand" and t.is_alive()]
        acceptor.join(10)
        assert accepted, "the source never opened the demand channel"
        demand = accepted[0]
        demand.settimeout(10)
        got = b""
        while True:
            try:
                chunk = demand.recv(4096)
            except TimeoutError:
                pytest.fail("the source left its demand channel open after failing")
            if not chunk:
                break
            got += chunk
        assert got == DEMAND_MAGIC + b"t" * 16   # its hello, then end of file
        assert failed.value is not None
        demand.close()
    finally:
        ram.close()
        listener.close()
        server.stop(None)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,message", [
    (["source", "--push-streams", "0"], "argument --push-streams: 0: must be 1 or more"),
    (["source", "--max-rate", "-5"], "argument --max-rate: '-5': a size cannot be negative"),
    (["source", "--dest-timeout", "-1"], "argument --dest-timeout: -1 seconds: must be 0 or more"),
    (["dest", "--source-timeout", "nan"], "argument --source-timeout: nan seconds: must be 0 or more"),
    (["dest", "--progress-every", "0"], "argument --progress-every: 0 seconds: a period must be more than 0"),
    (["guestsim", "--vcpus", "0"], "argument --vcpus: 0: must be 1 or more"),
], ids=["no-push-stream", "negative-max-rate", "negative-dest-timeout", "nan-source-timeout",
        "zero-progress-period", "no-vcpu"])
def test_nonsense_numbers_on_the_command_line_are_refused(argv, message, capsys):
    """Each was taken before: a negative timeout, rate or no stream at all."""
    from migrate.cli import build_parser
    need = {"source": ["--ram", "x", "--to", "h:1"], "dest": ["--listen", "127.0.0.1:0", "--attach", "x"],
            "guestsim": ["--attach", "x", "--size", "1M", "--backing", "tmpfs", "--seed", "1"]}[argv[0]]
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args([argv[0], *need, *argv[1:]])
    assert ei.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"migrate {argv[0]}: error: {message}"


@pytest.mark.timeout(30)
def test_a_listen_address_not_of_this_host_says_so(tmp_path):
    from migrate.sim.localrun import Proc
    sock = str(tmp_path / "a.sock")
    # TEST-NET-1; --insecure: without TLS, plaintext off loopback is refused before the address is tried
    p = Proc("dest", ["dest", "--listen", "192.0.2.1:0", "--attach", sock, "--insecure", "--json"])
    try:
        assert p.wait(20) == 2
    finally:
        p.kill()
    assert p.errors() == ["cannot start the destination: cannot listen on 192.0.2.1: Cannot assign requested "
                          "address (--listen takes an address of this host, or 0.0.0.0)"]
    assert not os.path.exists(sock)      # nothing left behind

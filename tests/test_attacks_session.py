"""One session, one peer (issue 16, item 3): each attack on a live agent's
session as an attacker tried it, refused with the whole message, and then a
good source finishes a migration the guest verifies, undisturbed.

The attacker here knows the destination's port and what every event prints
(the session id), but not the token the real source's Open got: Push,
DeviceState, Finish and the raw channels need that token, from the peer
(identity) that opened the session. A dropped source's token is revoked; a
resume gets a new one."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import pytest
from conftest import Events

from migrate.wire.tcp import Address
from migrate.dest import service
from migrate.dest.session import NoGuestError
from migrate.dest.state import TOKENS_KEPT, NotAuthorised, Peer, State, StateMachine
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.report import Reporter
from migrate.sim.localrun import LocalMigration
from migrate.wire import devstate
from migrate.wire.protocol import (DEMAND_MAGIC, DEMAND_TOKEN_BYTES, DEVSTATE_MAGIC, PROTOCOL_VERSION, PUSH_MAGIC,
                                   channel)

M = 1 << 20
SIZE = 16 * M
NPAGES = SIZE // 4096
PAGE = bytes(range(256)) * 16

# (the call's name)
REFUSED = ("{} refused: not authorised for this session (a call on a session carries the token its source's "
           "Open got in the Welcome, and comes from the peer that opened it)")

@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=31, pattern="random", vcpus=2)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


@pytest.fixture
def serving(waiting):
    """waiting, plus a good source that has opened the session and its demand
    channel (the guest runs), then is stopped (SIGSTOP) so that the attacks
    happen while it is the session's source: verified() lets it go on.
    Yields (the migration, the source, its session id)."""
    src = waiting.start_source()
    sid = waiting.dest.wait_event("connected", 30)["session"]
    waiting.dest.wait_event("demand", 30)
    os.kill(src.p.pid, signal.SIGSTOP)
    try:
        yield waiting, src, sid
    finally:
        if src.p.poll() is None:
            os.kill(src.p.pid, signal.SIGCONT)


def verified(lm: LocalMigration, src) -> dict:
    """The good source (let go on, if it was stopped) completes, the guest
    verifies every byte; returns the destination's summary."""
    os.kill(src.p.pid, signal.SIGCONT)
    assert src.wait(90) == 0, src.errors() or src.stderr_lines[-5:]
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    assert lm.dest.wait(30) == 0
    d = lm.dest.summary()
    assert d["state"] == "complete"
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == NPAGES
    return d


def finish_with_good_source(lm: LocalMigration) -> dict:
    return verified(lm, lm.start_source())


def never_dropped(lm: LocalMigration) -> None:
    assert not [ev for ev in lm.dest.lines if ev.get("event") == "disconnected"], "the real source was dropped"


def hello(**fields) -> pb.Hello:
    f = dict(version=PROTOCOL_VERSION, ram_size=SIZE, page_size=4096, source_name="attacker",
             compression=[pb.COMPRESSION_ZSTD, pb.COMPRESSION_NONE])
    f.update(fields)
    return pb.Hello(**f)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value


def raw_channel(lm: LocalMigration, port: int, magic: bytes, token: bytes) -> socket.socket:
    host = lm.address.rpartition(":")[0]
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(magic + token)
    return s


def refused_channel(lm: LocalMigration, port: int, magic: bytes, token: bytes) -> None:
    """A raw channel with this token is closed by the destination, which says so."""
    # the agent reports each kind of refused connection at most once a second
    # (a flood must not flood its output): one refusal a second is each told
    time.sleep(1.1)
    s = raw_channel(lm, port, magic, token)
    try:
        host, port = s.getsockname()[:2]
        peer = Address(host, port)
        assert s.recv(8) == b"", "the destination kept a channel with a token it did not issue"
    finally:
        s.close()
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"] == f"channel from {peer} with an unknown magic or token: closed"


# -- injection knowing only the port ------------------------------------------------

@pytest.mark.timeout(120)
def test_injection_knowing_only_the_port(serving):
    """While a source serves the guest, another peer's Open (a new session, a
    resume of the live one, a wrong size) is refused with the whole reason and
    the real migration goes on undisturbed; a raw channel with a guessed token
    is closed."""
    lm, src, sid = serving
    ch = channel(lm.address, "attacker")
    stub = pbg.MigrationStub(ch)
    try:
        e = refusal(lambda: stub.Open(hello(), timeout=30))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == f"destination is busy: migration {sid} already has a source"
        e = refusal(lambda: stub.Open(hello(resume_session=sid), timeout=30))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == (f"migration {sid} already has a source connected: one source per guest (start "
                               "another guest to run a second migration)")
        # (on loopback the peer is authenticated: today's helpful message;
        # test_unauthenticated_peers_hear_nothing_of_the_guest for the rest)
        e = refusal(lambda: stub.Open(hello(resume_session=sid, ram_size=SIZE // 2), timeout=30))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.details() == ("source RAM is 8 MiB in pages of 4 KiB, but the guest attached here has 16 MiB "
                               "in pages of 4 KiB: start the destination guest with the source's RAM size and "
                               "backing")
    finally:
        ch.close()
    raw_port = listening_port_besides(lm.dest.p.pid, int(lm.address.rpartition(":")[2]))
    for magic in (DEMAND_MAGIC, PUSH_MAGIC, DEVSTATE_MAGIC):
        refused_channel(lm, raw_port, magic, os.urandom(DEMAND_TOKEN_BYTES))
    refused_channel(lm, raw_port, DEMAND_MAGIC, bytes(DEMAND_TOKEN_BYTES))
    d = verified(lm, src)
    never_dropped(lm)
    assert len([ev for ev in lm.dest.lines if ev.get("event") == "connected"]) == 1
    assert d["pages_demand"] > 0


def listening_port_besides(pid: int, grpc_port: int) -> int:
    """The raw channels' port: a refused Open names none, but an attacker
    finds it by scanning; here, the other TCP port process pid listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()   # sl local rem st queues timer retransmits uid timeout inode
                port = int(cols[1].rpartition(":")[2], 16)
                if cols[3] == "0A" and cols[9] in inodes and port != grpc_port:
                    return port
    raise AssertionError(f"process {pid} listens on no raw-channel port")


# -- takeover knowing only the session id -------------------------------------------

TAKEOVERS = [
    pytest.param("Push", None, id="push-without-token"),
    pytest.param("Push", b"\x00" * DEMAND_TOKEN_BYTES, id="push-with-wrong-token"),
    pytest.param("DeviceState", None, id="device-state-without-token"),
    pytest.param("DeviceState", os.urandom(DEMAND_TOKEN_BYTES), id="device-state-with-wrong-token"),
    pytest.param("Finish", None, id="finish-without-token"),
    pytest.param("Finish", os.urandom(DEMAND_TOKEN_BYTES), id="finish-with-wrong-token"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call,token", TAKEOVERS)
def test_takeover_knowing_only_the_session_id(serving, call, token):
    """A Push (then a malformed batch: it used to drop the real source),
    DeviceState or Finish naming the live session but without its token is
    refused with PERMISSION_DENIED, reading nothing further; the real source
    is not dropped, and a second Open still finds the session busy."""
    lm, src, sid = serving
    ch = channel(lm.address, "attacker")
    stub = pbg.MigrationStub(ch)
    tok = {} if token is None else {"token": token}
    try:
        if call == "Push":
            garbage = pb.PageBatch(pages=[7, 3], zero=b"", data=PAGE, raw_length=4096)
            e = refusal(lambda: stub.Push(iter([pb.PageBatch(session_id=sid, **tok), garbage]), timeout=30))
        elif call == "DeviceState":
            e = refusal(lambda: stub.DeviceState(iter([pb.DeviceStateChunk(session_id=sid, data=b"QEVM", **tok)]),
                                                 timeout=30))
        else:
            e = refusal(lambda: stub.Finish(pb.FinishRequest(session_id=sid, timeout_seconds=1, **tok), timeout=30))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.details() == REFUSED.format(call)
        e = refusal(lambda: stub.Open(hello(resume_session=sid), timeout=30))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        ch.close()
    verified(lm, src)
    never_dropped(lm)


# -- a dropped source's token; a resume's new one -----------------------------------

def zero_pages(lm: LocalMigration) -> list[int]:
    """Pages that are all zero in the migration's image."""
    from migrate._binding import lib
    from migrate.sim.ramimage import DEFAULT_RANDOM_FRACTION, DEFAULT_ZERO_FRACTION, ImageSpec
    spec = ImageSpec(lm.seed, DEFAULT_ZERO_FRACTION, DEFAULT_RANDOM_FRACTION)
    return [p for p in range(NPAGES)
            if lib.mg_pattern_kind(spec.seed, p, spec.zero_ppm, spec.random_ppm) == lib.MG_KIND_ZERO]


def open_liar(lm: LocalMigration, **fields) -> tuple[grpc.Channel, pbg.MigrationStub, pb.Welcome]:
    ch = channel(lm.address, "liar")
    stub = pbg.MigrationStub(ch)
    return ch, stub, stub.Open(hello(**fields), timeout=30)


@pytest.mark.timeout(120)
def test_a_dropped_sources_token_opens_no_raw_channel(waiting):
    """A source that opens the session and its demand channel, then goes away,
    is dropped: its token opens no raw channel and places no page any more, but
    its Finish is still answered with why it was dropped. A good source then
    finishes."""
    lm = waiting
    ch, stub, welcome = open_liar(lm)
    sid, token = welcome.session_id, welcome.demand_token
    demand = raw_channel(lm, welcome.demand_port, DEMAND_MAGIC, token)
    lm.dest.wait_event("demand", 30)
    assert len(demand.recv(8, socket.MSG_WAITALL)) == 8, "the guest's first fault arrives as a demand request"
    # the session's own token, but no QEMU here: the device-state channel is
    # refused with why (its peer holds the token), and closed
    time.sleep(1.1)   # (refusals are reported at most once a second)
    ds = raw_channel(lm, welcome.demand_port, DEVSTATE_MAGIC, token)
    try:
        why = "this destination was started without --qmp: it takes no device state"
        assert devstate.hear(ds, time.monotonic() + 10) == {"refused": why}
        assert ds.recv(8) == b""
        peer = Address(*ds.getsockname()[:2])
    finally:
        ds.close()
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"] == f"device-state channel from {peer} refused: {why}"
    demand.close()
    ev = lm.dest.wait_event("disconnected", 30)
    assert ev["message"] == "source left before the end (demand channel closed); waiting for another"
    for magic in (DEMAND_MAGIC, PUSH_MAGIC, DEVSTATE_MAGIC):
        refused_channel(lm, welcome.demand_port, magic, token)
    e = refusal(lambda: stub.Push(iter([pb.PageBatch(session_id=sid, token=token),
                                        pb.PageBatch(pages=[0], zero=b"\x00", data=PAGE, raw_length=4096)]),
                                  timeout=30))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == REFUSED.format("Push")
    fin = stub.Finish(pb.FinishRequest(session_id=sid, token=token, timeout_seconds=0.5), timeout=30)
    assert not fin.complete and not fin.failed
    assert fin.error == (f"migration is disconnected with 0 of {NPAGES} pages received (the source was dropped: "
                         "demand channel closed)")
    ch.close()
    finish_with_good_source(lm)


@pytest.mark.timeout(120)
def test_a_push_stream_of_a_dropped_source_places_nothing_more(waiting):
    """A gRPC Push stream opened with the token stays open when its source is
    dropped; its next batch is not placed, and the stream ends saying why."""
    import queue
    lm = waiting
    zero = zero_pages(lm)
    ch, stub, welcome = open_liar(lm)
    sid, token = welcome.session_id, welcome.demand_token
    demand = raw_channel(lm, welcome.demand_port, DEMAND_MAGIC, token)
    lm.dest.wait_event("demand", 30)
    batches: queue.Queue = queue.Queue()
    # a page that is zero in the image: placed while the source serves
    batches.put(pb.PageBatch(session_id=sid, token=token))
    batches.put(pb.PageBatch(pages=[zero[0]], zero=b"\x01", raw_length=0))

    def requests():
        while (b := batches.get()) is not None:
            yield b

    call = stub.Push.future(requests(), timeout=60)
    while lm.dest.wait_event("progress", 30)["received"] < 1:
        pass
    demand.close()
    ev = lm.dest.wait_event("disconnected", 30)
    assert ev["message"] == "source left before the end (demand channel closed); waiting for another"
    batches.put(pb.PageBatch(pages=[zero[1]], zero=b"\x01", raw_length=0))
    batches.put(None)
    e = refusal(call.result)
    assert e.code() == grpc.StatusCode.ABORTED
    assert e.details() == "the destination dropped this source: demand channel closed"
    fin = stub.Finish(pb.FinishRequest(session_id=sid, token=token, timeout_seconds=0.1), timeout=30)
    assert fin.error == (f"migration is disconnected with 1 of {NPAGES} pages received (the source was dropped: "
                         "demand channel closed)")
    ch.close()
    finish_with_good_source(lm)


@pytest.mark.timeout(120)
def test_a_resume_gets_a_new_token(waiting):
    """Open with resume_session after the source was dropped: a new token,
    which opens the channels; the old one opens nothing. The resumed source
    leaves too, and a good source finishes."""
    lm = waiting
    ch, stub, first = open_liar(lm)
    sid = first.session_id
    demand = raw_channel(lm, first.demand_port, DEMAND_MAGIC, first.demand_token)
    lm.dest.wait_event("demand", 30)
    demand.close()
    lm.dest.wait_event("disconnected", 30)
    again = stub.Open(hello(resume_session=sid), timeout=30)
    assert again.session_id == sid
    assert len(again.demand_token) == DEMAND_TOKEN_BYTES and again.demand_token != first.demand_token
    refused_channel(lm, again.demand_port, DEMAND_MAGIC, first.demand_token)
    demand = raw_channel(lm, again.demand_port, DEMAND_MAGIC, again.demand_token)
    ev = lm.dest.wait_event("demand", 30)
    assert ev["session"] == sid
    assert len(demand.recv(8, socket.MSG_WAITALL)) == 8, "the resumed source gets the guest's faults"
    # the first source's token still hears how the session goes; the new one is the session's
    for token in (first.demand_token, again.demand_token):
        fin = stub.Finish(pb.FinishRequest(session_id=sid, token=token, timeout_seconds=0.1), timeout=30)
        assert fin.error == f"migration is connected with 0 of {NPAGES} pages received"
    demand.close()
    lm.dest.wait_event("disconnected", 30)
    ch.close()
    finish_with_good_source(lm)


# -- identity: a session is its opener's ------------------------------------------


@pytest.fixture
def in_process(tmp_path, host, monkeypatch):
    """A destination agent in this process, whose gRPC calls may say who they
    come from in metadata (x-peer-identity; x-peer-unauthenticated): what a
    verified certificate's name, or a plaintext peer off loopback, tells the
    real service. Without them a call is what it is (plaintext on loopback).
    A guestsim process attaches to it. Yields (the migration's processes,
    the agent)."""
    from migrate.dest.agent import Destination
    real = service._peer

    def peer(context):
        md = dict(context.invocation_metadata())
        if "x-peer-identity" in md or "x-peer-unauthenticated" in md:
            return Peer(md.get("x-peer-identity"), "x-peer-unauthenticated" not in md)
        return real(context)

    monkeypatch.setattr(service, "_peer", peer)
    lm = LocalMigration(str(tmp_path), SIZE, seed=37, pattern="random", vcpus=2)
    lm.make_image()
    agent = Destination(lm.sock, Events())
    server, lm.address = service.serve(agent, "127.0.0.1:0")
    agent.start()
    try:
        lm.start_guest()
        yield lm, agent
    finally:
        server.stop(None)
        agent.close()
        lm.close()


def as_peer(identity: str | None = None, authenticated: bool = True) -> list[tuple[str, str]]:
    md = [("x-peer-identity", identity)] if identity is not None else []
    return md + ([] if authenticated else [("x-peer-unauthenticated", "1")])


class AsPeer(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Every call of a channel says it comes from identity (in_process)."""

    def __init__(self, identity: str):
        self.identity = identity

    def _tagged(self, details):
        return details._replace(metadata=[*(details.metadata or ()), *as_peer(self.identity)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._tagged(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._tagged(details), request_iterator)


@pytest.mark.timeout(120)
def test_a_session_answers_only_the_identity_that_opened_it(in_process, monkeypatch):
    """A peer of another identity holding the real token (it leaked) can do
    nothing with it: no Push, DeviceState or Finish, no raw channel, no resume
    nor fresh Open once the source was dropped. The identity that opened the
    session resumes it with a new token, and its source finishes: the guest
    verifies."""
    from migrate.dest import agent as agent_module
    lm, agent = in_process
    ch = channel(lm.address, "alice")
    stub = pbg.MigrationStub(ch)
    alice, mallory = as_peer("alice"), as_peer("mallory")
    try:
        w = stub.Open(hello(source_name="alice"), metadata=alice, timeout=30)
        sid, token = w.session_id, w.demand_token
        e = refusal(lambda: stub.Push(iter([pb.PageBatch(session_id=sid, token=token)]), metadata=mallory,
                                      timeout=30))
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED.format("Push"))
        e = refusal(lambda: stub.DeviceState(iter([pb.DeviceStateChunk(session_id=sid, token=token)]),
                                             metadata=mallory, timeout=30))
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED.format("DeviceState"))
        e = refusal(lambda: stub.Finish(pb.FinishRequest(session_id=sid, token=token, timeout_seconds=0.1),
                                        metadata=mallory, timeout=30))
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED.format("Finish"))
        # a raw channel whose peer certificate names mallory
        monkeypatch.setattr(agent_module, "channel_identity", lambda conn, owner: "mallory")
        s = raw_channel(lm, w.demand_port, DEMAND_MAGIC, token)
        assert s.recv(8) == b"", "a channel of another identity was taken"
        s.close()
        m = agent.migration(sid)
        assert m.channels.demand is None and m.state is State.CONNECTED
        m.source_lost(m.machine.source_gen, "dropped by the test")
        for h in (hello(resume_session=sid), hello()):
            e = refusal(lambda: stub.Open(h, metadata=mallory, timeout=30))
            assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, REFUSED.format("Open"))
        assert m.state is State.DISCONNECTED
        again = stub.Open(hello(resume_session=sid), metadata=alice, timeout=30)
        assert again.demand_token != token
        fin = stub.Finish(pb.FinishRequest(session_id=sid, token=again.demand_token, timeout_seconds=0.1),
                          metadata=alice, timeout=30)
        assert fin.error == f"migration is connected with 0 of {NPAGES} pages received"
        m.source_lost(m.machine.source_gen, "dropped by the test")
    finally:
        ch.close()
    # alice's source, every call and channel of it presenting alice, finishes
    from migrate.source import session as source_session
    from migrate.source.ramfile import RamImage
    from migrate.source.session import Source
    monkeypatch.setattr(agent_module, "channel_identity", lambda conn, owner: "alice")
    monkeypatch.setattr(source_session, "channel",
                        lambda target, purpose, tls=None: grpc.intercept_channel(channel(target, purpose, tls),
                                                                                 AsPeer("alice")))
    ram = RamImage(lm.image)
    try:
        res = Source(ram, lm.address, Reporter(quiet=True), transport="grpc").run()
    finally:
        ram.close()
    assert res.finish.complete and res.finish.pages_total == NPAGES
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0


@pytest.mark.timeout(120)
def test_unauthenticated_peers_hear_nothing_of_the_guest(in_process):
    """A peer that is not authenticated (plaintext from off this host, under
    --insecure) is told what was wrong but nothing of the guest: no size, no
    session id, no attach path. A good source then finishes."""
    lm, agent = in_process
    ch = channel(lm.address, "stranger")
    stub = pbg.MigrationStub(ch)
    stranger = as_peer(authenticated=False)
    try:
        e = refusal(lambda: stub.Open(hello(ram_size=SIZE // 2), metadata=stranger, timeout=30))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.details() == ("source RAM is 8 MiB in pages of 4 KiB, which does not match the guest attached "
                               "here: start the destination guest with the source's RAM size and backing")
        w = stub.Open(hello(), timeout=30)          # a source on loopback joins
        e = refusal(lambda: stub.Open(hello(), metadata=stranger, timeout=30))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == "destination is busy: its guest already has a source"
        e = refusal(lambda: stub.Open(hello(resume_session=w.session_id), metadata=stranger, timeout=30))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == ("the migration here already has a source connected: one source per guest (start "
                               "another guest to run a second migration)")
        m = agent.migration(w.session_id)
        m.source_lost(m.machine.source_gen, "dropped by the test")
    finally:
        ch.close()
    # (called directly: through gRPC it would wait the whole 30 s for the guest)
    with pytest.raises(NoGuestError) as ei:
        agent.open(hello(guest="no-such-guest"), Peer(None, authenticated=False), wait=1)
    assert str(ei.value) == ("no guest named 'no-such-guest' attached here within 1 s: start the guest (migrate "
                             "guestsim or QEMU with the shim) first")
    src = lm.start_source()
    assert src.wait(60) == 0, src.errors()
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0


@pytest.mark.timeout(60)
def test_a_source_on_ipv6_loopback_hears_the_helpful_message(tmp_path, host):
    """Through real gRPC (no stand-in for who calls): a plaintext peer on ::1
    is on loopback, so it is told the guest's size."""
    with LocalMigration(str(tmp_path), SIZE, seed=39, dest_listen="[::1]:0") as lm:
        lm.start_dest()
        lm.start_guest()
        ch = channel(lm.address, "ipv6")
        try:
            e = refusal(lambda: pbg.MigrationStub(ch).Open(hello(ram_size=SIZE // 2), timeout=30))
        finally:
            ch.close()
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.details() == ("source RAM is 8 MiB in pages of 4 KiB, but the guest attached here has 16 MiB in pages "
                           "of 4 KiB: start the destination guest with the source's RAM size and backing")


@pytest.mark.parametrize("peer,loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.3.0.9:5000", True), ("ipv6:%5B::1%5D:5000", True),
    ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", True), ("ipv4:192.0.2.7:5000", False), ("ipv6:[2001:db8::1]:5000", False),
    ("ipv6:[::ffff:192.0.2.7]:5000", False), ("unix:/tmp/x.sock", False), ("garbage", False),
])
def test_which_plaintext_peers_are_on_loopback(peer, loopback):
    """(grpc gives an IPv6 peer as ipv6:%5B::1%5D:port)"""
    assert service._on_loopback(peer) is loopback


# -- the rules themselves, on the state machine -------------------------------------

def test_tokens_are_revoked_with_their_source_and_bound_to_the_opener():
    m = StateMachine()
    gen, token = m.join("alice")
    assert m.admit(token, "alice") == gen == 1
    assert m.admit(token, "mallory") is None and m.admit(token, None) is None
    assert m.admit(b"", "alice") is None and m.admit(token[:-1] + bytes([token[-1] ^ 1]), "alice") is None
    assert m.answers_to(token, "alice") is True and m.answers_to(token, "mallory") is None
    assert m.serves(gen)
    with pytest.raises(NotAuthorised) as ei:
        m.join("mallory")
    assert str(ei.value) == REFUSED.format("Open")
    assert m.lose_source(gen, "demand channel closed")
    assert not m.serves(gen)
    assert m.admit(token, "alice") is None                      # revoked
    assert m.answers_to(token, "alice") is True                 # still hears how it went (the latest source)
    assert not m.may_join("mallory") and m.may_join("alice")
    gen2, token2 = m.join("alice")
    assert gen2 == 2 and token2 != token
    assert m.admit(token2, "alice") == 2 and m.admit(token, "alice") is None
    assert m.answers_to(token, "alice") is False and m.answers_to(token2, "alice") is True
    for _ in range(TOKENS_KEPT + 2):                           # a peer looping open-drop keeps the list short
        assert m.lose_source(m.source_gen, "gone")
        m.join("alice")
    assert len(m.issued) == TOKENS_KEPT and m.answers_to(token, "alice") is None


def test_an_unopened_session_admits_nothing():
    m = StateMachine()
    assert m.admit(b"", None) is None and m.admit(bytes(DEMAND_TOKEN_BYTES), None) is None
    assert m.answers_to(b"", None) is None
    assert m.may_join("anyone") and m.may_join(None)

"""Fuzzing every input a peer controls (issue 16), with hypothesis, sized to
CI time (derandomized: the same examples on every run, no database).

In process, many examples: PageBatch decoding, the attach framing and hello
(the device state's limit: test_tls_raw). Against one live agent, fewer: Open,
Push batches, raw push runs and demand replies, DeviceState streams and
attach hellos. Every input gets a clear error (one of the messages the code
has for it, matched whole), the agent keeps serving, and at the end a good
source finishes the migration and the guest verifies every byte: nothing a
fuzzed input carried was placed.

Live inputs are bad by construction (a good base with one thing broken), so
that a fuzzed batch can never be a valid one of wrong bytes; a check that
let one through shows up as the guest's verification failing."""

from __future__ import annotations

import json
import os
from collections import Counter
import queue
import re
import socket
import struct

import grpc
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import NPAGES, SIZE, finish_with_good_source, open_session, push

from migrate.errors import AttachError, ProtocolError
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration
from migrate.wire.attach import _MAX_HELLO, recv_msg
from migrate.wire.protocol import DEMAND_MAGIC, MAX_MESSAGE, PROTOCOL_VERSION, PUSH_MAGIC, BatchDecoder, channel

PS = 4096
MAX_PAGES = MAX_MESSAGE // PS
FAST = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                suppress_health_check=list(HealthCheck))
JSONY = settings(FAST, max_examples=80)   # (generating nested JSON is what takes the time)
LIVE = settings(FAST, max_examples=40)

# Every refusal BatchDecoder has, whole.
BATCH_REFUSALS = [re.compile(p) for p in (
    rf"batch of \d+ pages is larger than the {MAX_PAGES} pages of {PS} bytes a batch may carry: send smaller "
    r"batches \(--batch-bytes\)",
    r"batch of (\d+) pages carries a zero bitmap of \d+ bytes, expected \d+",
    r"batch names page \d+ (twice|after page \d+) \(entry \d+\): a batch's pages must be strictly ascending",
    rf"batch names page \d+, outside the layout of {NPAGES} pages of {PS} bytes",
    rf"batch declares \d+ bytes for \d+ non-zero pages of {PS} bytes \(expected \d+\): truncated or corrupt",
    r"batch of \d+ pages: zstd data does not decompress: .+",
    r"batch of \d+ pages: zstd frame states \d+ bytes, but the batch's non-zero pages are \d+ bytes: refused "
    r"before decompressing",
    r"batch of \d+ pages: zstd data decompresses to more than the \d+ bytes of its non-zero pages: refused at the "
    r"first byte beyond",
    r"batch uses unknown compression \d+",
    r"batch of \d+ non-zero pages carries \d+ bytes after decompression, expected \d+: truncated or corrupt",
)]


def assert_batch_refusal(message: str) -> None:
    assert any(p.fullmatch(message) for p in BATCH_REFUSALS), f"not a known batch refusal: {message!r}"


# -- in process ---------------------------------------------------------------------
u64 = st.integers(0, 2**64 - 1)
page_index = st.one_of(st.integers(0, NPAGES + 2), u64)


@st.composite
def any_batch(draw) -> pb.PageBatch:
    pages = draw(st.lists(page_index, max_size=40))
    n = len(pages)
    zero = draw(st.one_of(st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8), st.binary(max_size=8)))
    nonzero = n - bin(int.from_bytes(zero, "little") & ((1 << n) - 1)).count("1")
    raw = draw(st.binary(min_size=nonzero * PS, max_size=nonzero * PS)) if nonzero < 4 else bytes(nonzero * PS)
    compression = draw(st.one_of(st.sampled_from([pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD]),
                                 st.integers(0, 2**31 - 1)))
    data = draw(st.one_of(
        st.just(raw),
        st.just(zstandard.ZstdCompressor(level=-3).compress(raw)),
        st.builds(lambda extra: zstandard.ZstdCompressor(level=-3, write_content_size=False).compress(raw + extra),
                  st.binary(max_size=8)),
        st.binary(max_size=256)))
    raw_length = draw(st.one_of(st.just(nonzero * PS), u64))
    return pb.PageBatch(pages=pages, zero=zero, compression=compression, data=data, raw_length=raw_length)


@FAST
@given(any_batch())
def test_batch_decoder_takes_or_refuses_every_batch(batch):
    dec = BatchDecoder(NPAGES, PS)
    try:
        out = dec.decode(batch)
    except ProtocolError as e:
        assert_batch_refusal(str(e))
        return
    assert out.pages == sorted(set(out.pages)) and all(p < NPAGES for p in out.pages)
    assert len(out.data) == out.nonzero * PS == batch.raw_length
    assert len(out.pages) <= MAX_PAGES


ATTACH_REFUSALS = [re.compile(p, re.S) for p in (
    rf"attach message of \d+ bytes is larger than the limit {_MAX_HELLO}",
    r"attach message of \d+ bytes is followed by \d+ more before its answer: one message at a time",
    r"attach message is not JSON: .+",
    r"attach message is JSON \w+, not an object",
    r"attach socket closed after \d+ of \d+ bytes",
    r"attach socket closed before the hello",
)]


@st.composite
def attach_frame(draw) -> bytes:
    """A length prefix and a body: JSON of any shape, or bytes; the prefix
    true, or any."""
    body = draw(st.one_of(
        st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=6).map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200)))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 2**32 - 1)))
    return struct.pack(">I", length) + body


@JSONY
@given(attach_frame(), st.booleans())
def test_attach_framing_takes_or_refuses_every_frame(frame, with_fds):
    a, b = socket.socketpair()
    try:
        a.settimeout(5)
        b.settimeout(5)
        b.sendall(frame)
        b.shutdown(socket.SHUT_WR)
        try:
            msg, fds = recv_msg(a, want_fds=2 if with_fds else 0)
        except AttachError as e:
            assert any(p.fullmatch(str(e)) for p in ATTACH_REFUSALS), f"not a known attach refusal: {e}"
            return
        assert isinstance(msg, dict) and fds == []
    finally:
        a.close()
        b.close()


HELLO_REFUSALS = [re.compile(p, re.S) for p in (
    r"attach hello carried \d+ descriptors, expected 2 \(userfaultfd, RAM file\)",
    r"attach protocol version .+, this agent speaks 1",
    r"attach hello is missing or has a bad field: .+",
    r"attach hello page_size -?\d+ is not a power of two from 4096 to 1 GiB",
    r"attach hello ram_size -?\d+ is not a size",
    r"attach hello lists no regions",
    r"region Region\(.+\) has a negative address or offset",
    r"region Region\(.+\) is not aligned to the page size \d+",
    r"region Region\(.+\) ends past the RAM size \d+",
)]

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                          lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                    max_size=3), max_leaves=5)
number = st.one_of(st.integers(-2**64, 2**64), st.sampled_from([0, 4096, 1 << 21, 1 << 30, SIZE]), json_value)


@st.composite
def attach_hello(draw) -> dict:
    region = st.fixed_dictionaries({"guest_addr": number, "length": number, "offset": number})
    hello = {"version": draw(st.one_of(st.just(1), json_value)), "pid": draw(number),
             "page_size": draw(number), "ram_size": draw(number),
             "regions": draw(st.one_of(st.lists(region, max_size=3), json_value))}
    for key in draw(st.sets(st.sampled_from(sorted(hello)), max_size=2)):
        del hello[key]
    return hello


@JSONY
@given(attach_hello(), st.integers(0, 3))
def test_attach_hello_is_taken_or_refused(hello, nfds):
    from migrate.dest.attach import _parse_hello
    try:
        h = _parse_hello(hello, list(range(100, 100 + nfds)))
    except AttachError as e:
        assert any(p.fullmatch(str(e)) for p in HELLO_REFUSALS), f"not a known hello refusal: {e}"
        return
    assert 4096 <= h["page_size"] <= 1 << 30 and h["ram_size"] > 0 and h["regions"]


# -- one live agent -----------------------------------------------------------------
@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=23, pattern="random", vcpus=2)
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    yield lm
    lm.close()


RAN: Counter = Counter()   # live examples run, by kind


def drain(lm: LocalMigration) -> None:
    """Forgets the agent's events so far (each example then waits for its own)."""
    while True:
        try:
            ev = lm.dest.events.get_nowait()
        except queue.Empty:
            return
        if ev is None:
            lm.dest.events.put(None)
            return


OPEN_REFUSALS = [re.compile(p, re.S) for p in (
    rf"source speaks protocol version \d+, this destination speaks {PROTOCOL_VERSION}: run the same migrate "
    r"release on both hosts",
    r"source RAM is .+ in pages of .+, but the guest attached here has 16 MiB in pages of 4 KiB: start the "
    r"destination guest with the source's RAM size and backing",
    r"the source sends QEMU device state but this destination was started without --qmp: start `migrate dest` "
    r"with --qmp SOCKET of the destination QEMU",
    r"no session .* here to resume",
)]


def fuzz_open(lm: LocalMigration) -> None:
    """Hellos that do not match the guest (a matching one would be a source)."""
    ch = channel(lm.address, "fuzz-open")
    stub = pbg.MigrationStub(ch)

    @LIVE
    @given(st.integers(0, 2**32 - 1), st.one_of(st.just(SIZE), u64), st.one_of(st.just(PS), u64),
           st.lists(st.integers(0, 2**31 - 1), max_size=4), st.text(max_size=40), st.text(max_size=40),
           st.booleans())
    def one(version, ram_size, page_size, compression, name, resume, device_state):
        RAN["open"] += 1
        if version == PROTOCOL_VERSION and ram_size == SIZE and page_size == PS and not resume \
                and not device_state:
            ram_size += PS
        with pytest.raises(grpc.RpcError) as ei:
            stub.Open(pb.Hello(version=version, ram_size=ram_size, page_size=page_size, compression=compression,
                               source_name=name, resume_session=resume, has_device_state=device_state),
                      timeout=30)
        assert any(p.fullmatch(ei.value.details()) for p in OPEN_REFUSALS), ei.value.details()

    try:
        one()
    finally:
        ch.close()


@st.composite
def bad_batch(draw) -> pb.PageBatch:
    """A good batch of 1-8 pages with random bytes, then one thing broken."""
    pages = sorted(draw(st.sets(st.integers(0, NPAGES - 1), min_size=1, max_size=8)))
    n = len(pages)
    zero = draw(st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8))
    nonzero = n - bin(int.from_bytes(zero, "little") & ((1 << n) - 1)).count("1")
    want = nonzero * PS
    data = os.urandom(want)
    comp = pb.COMPRESSION_NONE
    how = draw(st.sampled_from(["layout", "order", "bitmap", "raw_length", "length", "zstd-garbage",
                                "zstd-size", "compression"]))
    if how == "layout":
        pages[-1] = draw(st.integers(NPAGES, 2**64 - 1))
    elif how == "order":
        i = draw(st.integers(0, n - 1))
        pages.insert(i + 1, draw(st.integers(0, pages[i])))
        zero = draw(st.binary(min_size=(n + 8) // 8, max_size=(n + 8) // 8))
        want = (n + 1 - bin(int.from_bytes(zero, "little") & ((1 << (n + 1)) - 1)).count("1")) * PS
        data = os.urandom(want)
    elif how == "bitmap":
        zero = draw(st.binary(max_size=4).filter(lambda z: len(z) != (n + 7) // 8))
    elif how == "length":
        data = draw(st.binary(max_size=want + PS).filter(lambda d: len(d) != want))
    elif how == "zstd-garbage":
        comp, data = pb.COMPRESSION_ZSTD, draw(st.binary(max_size=200))
    elif how == "zstd-size":
        comp = pb.COMPRESSION_ZSTD
        extra = draw(st.integers(1, 3 * PS))
        data = zstandard.ZstdCompressor(write_content_size=draw(st.booleans())).compress(os.urandom(want + extra))
    elif how == "compression":
        comp = draw(st.integers(2, 2**31 - 1))
    raw_length = want
    if how == "raw_length":
        raw_length = draw(u64.filter(lambda v: v != want))
    return pb.PageBatch(pages=pages, zero=zero, compression=comp, data=data, raw_length=raw_length)


def fuzz_push(lm: LocalMigration) -> None:
    @LIVE
    @given(bad_batch())
    def one(batch):
        RAN["push"] += 1
        ch, stub, welcome = open_session(lm)
        try:
            with pytest.raises(grpc.RpcError) as ei:
                push(stub, welcome, batch)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert_batch_refusal(ei.value.details())
        finally:
            ch.close()
        lm.dest.wait_event("disconnected", 30)

    one()


RAW_REFUSALS = [re.compile(p) for p in (
    rf"bad push run: push run of \d+ pages at page \d+ does not fit the layout of {NPAGES} pages \(at most 1024 "
    r"pages a run\)",
    r"bad push run: push run at page \d+ is sparse, but pages of 4096 bytes are never sent sparse",
    r"bad push run: push run at page \d+ has flags 0x[0-9a-f]+: unknown",
    r"bad push run: push run at page \d+: its zstd frame (is \d+ bytes long, not between 1 and its non-zero "
    r"pages' bytes|states (no size|\d+ bytes), not its non-zero pages' bytes|decompressed to \d+ bytes, fewer than "
    r"its non-zero pages' bytes|decompressed to more than its non-zero pages' bytes, or bytes follow its end|is "
    r"refused by zstd: .+)",
    rf"bad demand reply: demand reply names page \d+, outside the layout of {NPAGES} pages of {PS} bytes",
    r"bad demand reply: demand reply for page \d+ carries \d+ bytes, expected 4096 \(or 0 for a zero page\)",
    r"bad demand reply: demand reply for page \d+ is sparse, but pages of 4096 bytes are never sent sparse",
    r"bad demand reply: demand reply for page \d+ has flags 0x[0-9a-f]+: unknown, or both zero and sparse",
)]


@st.composite
def bad_run(draw) -> bytes:
    """A push run header that cannot be taken, and whatever follows it."""
    first, count, flags = draw(st.integers(0, NPAGES - 1)), draw(st.integers(1, 1024)), 0
    how = draw(st.sampled_from(["count-zero", "count-cap", "first", "past-end", "flags", "sparse", "zstd"]))
    if how == "count-zero":
        count = 0
    elif how == "count-cap":
        count = draw(st.integers(1025, 2**32 - 1))
    elif how == "first":
        first = draw(st.integers(NPAGES, 2**64 - 1))
    elif how == "past-end":
        first = draw(st.integers(max(0, NPAGES - 1023), NPAGES - 1))
        count = draw(st.integers(NPAGES - first + 1, 1024))
    elif how == "flags":
        flags = draw(st.integers(3, 2**32 - 1))   # (2 alone is a zstd run: below)
    elif how == "zstd":
        # a whole zero bitmap, then a frame of garbage whose length is its
        # own (so the agent reads all of it) or out of bounds (refused unread)
        count = min(count, NPAGES - first)
        bits = draw(st.binary(min_size=(count + 7) // 8, max_size=(count + 7) // 8))
        zero = sum((bits[i >> 3] >> (i & 7)) & 1 for i in range(count))
        frame = draw(st.binary(max_size=300))
        length = draw(st.sampled_from([len(frame), 0, (count - zero) * PS + 1, 2**64 - 1]))
        if 0 < length <= (count - zero) * PS:
            length = len(frame)
        return struct.pack("<QII", first, count, 2) + bits + struct.pack("<Q", length) + frame
    else:
        flags = 1
    return struct.pack("<QII", first, count, flags) + draw(st.binary(max_size=300))


@st.composite
def bad_reply(draw) -> bytes:
    """A demand reply header that cannot be taken, and whatever follows it."""
    page, flags, length = draw(st.integers(0, NPAGES - 1)), 0, PS
    how = draw(st.sampled_from(["page", "length", "zero-length", "flags", "sparse"]))
    if how == "page":
        page = draw(st.integers(NPAGES, 2**64 - 1))
    elif how == "length":
        length = draw(st.integers(0, 2**32 - 1).filter(lambda v: v not in (0, PS)))
    elif how == "zero-length":
        flags, length = 1, draw(st.integers(1, 2**32 - 1))
    elif how == "flags":
        flags = draw(st.integers(3, 2**32 - 1))
    else:
        flags = 2
    return struct.pack("<QII", page, flags, length) + draw(st.binary(max_size=300))


def fuzz_raw(lm: LocalMigration) -> None:
    host = lm.address.rpartition(":")[0]

    @LIVE
    @given(st.one_of(bad_run().map(lambda b: ("push", b)), bad_reply().map(lambda b: ("demand", b))))
    def one(frame):
        RAN["raw"] += 1
        kind, data = frame
        drain(lm)
        ch, stub, welcome = open_session(lm)
        demand = socket.create_connection((host, welcome.demand_port), timeout=10)
        raw = None
        try:
            demand.sendall(DEMAND_MAGIC + welcome.demand_token)
            if kind == "push":
                # the demand channel first, as a source opens it: a push
                # channel taken before it would drop the source on its bad
                # run, and the demand hello would then be refused as a
                # revoked token, an error event racing the one asserted here
                lm.dest.wait_event("demand", 30)
                raw = socket.create_connection((host, welcome.demand_port), timeout=10)
                raw.sendall(PUSH_MAGIC + welcome.demand_token + data)
            else:
                demand.sendall(data)
            msg = lm.dest.wait_event("error", 30)["message"]
            assert any(p.fullmatch(msg) for p in RAW_REFUSALS), msg
            lm.dest.wait_event("disconnected", 30)
        finally:
            for s in (raw, demand):
                if s is not None:
                    s.close()
            ch.close()

    one()


def fuzz_device_state(lm: LocalMigration) -> None:
    """Every stream is refused before anything else is said, whatever it
    carries: it names no session it holds the token of."""
    ch = channel(lm.address, "fuzz-devstate")
    stub = pbg.MigrationStub(ch)

    @LIVE
    @given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=1000)), max_size=4))
    def one(chunks):
        RAN["device_state"] += 1
        with pytest.raises(grpc.RpcError) as ei:
            stub.DeviceState(iter([pb.DeviceStateChunk(session_id=s, data=d) for s, d in chunks]), timeout=30)
        # no stream gets as far as the missing --qmp: a stream must first name
        # a session and carry its token (migrate.dest.state), and none of
        # these knows one
        first = next((s for s, _ in chunks), "")
        expected = ("first DeviceState chunk must name the session" if not first
                    else f"unknown session {first!r}: call Open first")
        assert ei.value.details() == expected

    try:
        one()
    finally:
        ch.close()


def fuzz_attach(lm: LocalMigration) -> None:
    """Frames and hellos on the attach socket, with two descriptors or none:
    each is refused (or, a good hello, told the agent serves one migration)."""
    from migrate._binding import ffi, lib

    @LIVE
    @given(st.one_of(attach_frame(), attach_hello().map(lambda h: (lambda b: struct.pack(">I", len(b)) + b)(
        json.dumps(h).encode()))), st.booleans())
    def one(frame, with_fds):
        RAN["attach"] += 1
        drain(lm)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [os.memfd_create("fuzz-uffd"), os.memfd_create("fuzz-ram")] if with_fds else []
        try:
            s.settimeout(30)
            s.connect(lm.sock)
            try:   # the agent may refuse and close before the frame is all sent
                n = 0
                if fds:
                    n = lib.mg_send_fds(s.fileno(), frame, len(frame), ffi.new("int[]", fds), 2)
                    assert n >= 0, os.strerror(-n)
                if n < len(frame):
                    s.sendall(frame[n:])
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        finally:
            s.close()
            for fd in fds:
                os.close(fd)
        if answer:
            (length,) = struct.unpack(">I", answer[:4])
            reply = json.loads(answer[4:4 + length])
            assert reply["ok"] is False
            if reply["error"] == "this destination serves one migration (start it with --serve-forever for more)":
                return
            assert any(p.fullmatch(reply["error"]) for p in HELLO_REFUSALS), reply
        msg = lm.dest.wait_event("error", 30)["message"]
        assert msg.startswith("attach refused: ")
        assert any(p.fullmatch(msg.removeprefix("attach refused: ")) for p in ATTACH_REFUSALS + HELLO_REFUSALS), msg

    one()


@pytest.mark.timeout(180)
def test_a_live_agent_refuses_every_fuzzed_input_and_still_migrates(waiting):
    fuzz_open(waiting)
    fuzz_device_state(waiting)
    fuzz_attach(waiting)
    fuzz_push(waiting)
    fuzz_raw(waiting)
    assert RAN == Counter(dict.fromkeys(("open", "device_state", "attach", "push", "raw"), LIVE.max_examples))
    finish_with_good_source(waiting)

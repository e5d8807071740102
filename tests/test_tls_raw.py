"""Mutual TLS 1.3 on the raw demand and push channels (native/tls.c,
migrate.wire.rawtls): whole migrations over TLS that the guest verifies, and
each refusal with its whole message: a wrong CA, an expired certificate, a
source name not allowed, plaintext to a TLS channel, TLS to a plaintext one.

Whole migrations run the agents with their --tls-* flags (gRPC is TLS too);
the refusals are checked against a Destination in this process, on its raw
channel port."""

from __future__ import annotations

import datetime
import errno
import os
import socket
import threading

import pytest
from conftest import Events, need_backing
from test_e2e import SLOW_SOURCE, finish_with_a_new_source, wait_until_received

from migrate.dest.agent import Destination
from migrate.sim.localrun import LocalMigration, Proc
from migrate.wire.certs import write_certs
from migrate.wire.protocol import DEMAND_MAGIC
from migrate.wire.rawtls import RawTls, TlsError
from migrate.wire.tls import TlsConfig

M = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a destination and two sources; another CA's source; an
    expired source of the first CA."""
    d = tmp_path_factory.mktemp("pki")
    good = write_certs(str(d / "good"), ["dest.test", "src.test", "other.test"])
    rogue = write_certs(str(d / "rogue"), ["src.test"])
    # expired, and chaining to the good CA (write_certs' not_before would move its CA too)
    expired = _expired_by(good, str(d / "expired"))
    return {"good": good, "rogue": rogue, "expired": expired}


def _expired_by(ca_files: dict, directory: str) -> dict:
    """src.test's certificate signed by ca_files' CA, valid 3 days ago to 2 days ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory, exist_ok=True)
    with open(ca_files["ca"], "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(ca_files["ca.key"], "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "src.test")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("src.test")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = {"src.test": os.path.join(directory, "src.pem"), "src.test.key": os.path.join(directory, "src.key")}
    with open(out["src.test"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(out["src.test.key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return out


def dest_tls(pki, allow=("src.test",)) -> TlsConfig:
    g = pki["good"]
    return TlsConfig(g["dest.test"], g["dest.test.key"], g["ca"], allow=tuple(allow))


def source_tls(pki, which="good", name="src.test", ca=None, peer_name="dest.test") -> TlsConfig:
    files = pki[which]
    return TlsConfig(files[name], files[name + ".key"], ca or pki["good"]["ca"], peer_name=peer_name)


class TlsLocalMigration(LocalMigration):
    """LocalMigration whose dest and source run with a TlsConfig each."""

    def __init__(self, *args, dest_cfg: TlsConfig, source_cfg: TlsConfig, **kw):
        super().__init__(*args, **kw)
        self.cfg = {"dest": dest_cfg, "source": source_cfg}

    def _spawn(self, name, args, prefix: tuple = ()) -> Proc:
        cfg = self.cfg.get(name)
        if cfg is not None:
            args = [*args, *cfg.flags(name)]
        return super()._spawn(name, args, prefix)


CASES = [
    # backing, size, pattern, vcpus: 4 KiB pages, and 2 MiB pages whose zero
    # blocks stay off the wire (sparse) on both channels
    ("tmpfs", 64 * M, "random", 4),
    ("hugetlbfs", 64 * M, "random", 2),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backing,size,pattern,vcpus", CASES, ids=[f"{b}-{s // M}M" for b, s, _, _ in CASES])
def test_a_migration_over_tls_raw_channels_verifies(tmp_path, host, huge_pages, pki, backing, size, pattern, vcpus):
    need_backing(backing, host, huge_pages, size // (2 * M))
    with TlsLocalMigration(str(tmp_path), size, backing=backing, seed=11, pattern=pattern, vcpus=vcpus,
                           source_args=("--transport", "raw"),
                           dest_cfg=dest_tls(pki), source_cfg=source_tls(pki)) as lm:
        lm.make_image()
        out = lm.run(timeout=150)
    assert "failed" not in out, out.get("failed")
    assert (out["source_rc"], out["guest_rc"], out["dest_rc"]) == (0, 0, 0)
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0
    total = size // lm.page_size
    assert d["state"] == "complete" and d["pages_total"] == total
    # both raw channels carried pages: the guest's faults, and the push
    assert d["pages_demand"] > 0 and d["pages_pushed"] > 0
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == total
    if backing == "hugetlbfs":
        assert s["demand_zero_blocks"] + s["push_zero_blocks"] > 0, s
    # every raw channel (the demand channel and the push streams) was TLS
    tls = [e for e in lm.dest.lines if e["event"] == "tls"]
    push = next(e for e in lm.source.lines if e["event"] == "push")
    streams = push["streams"]
    assert len(tls) == 1 + streams, tls
    # the push's send buffer sized from the TCP handshake's round trip (tens
    # of us on loopback: 256 KiB, as in plaintext), not from the RTT after the
    # TLS handshake, which counts the peer's signing (it gave 2 MB or autotuning)
    assert push["send_buffer"] is not None and push["send_buffer"] < 1 << 20, push
    assert {e["source"] for e in tls} == {"/CN=src.test"}


@pytest.mark.timeout(180)
def test_a_source_killed_mid_migration_over_tls_then_a_new_one_resumes(tmp_path, host, pki):
    """A TLS channel cut mid-stream ends as a plaintext one does: the
    destination waits, and a new source, with TLS channels of its own,
    finishes; the guest verifies every byte."""
    with TlsLocalMigration(str(tmp_path), 256 * M, seed=5, pattern="random", vcpus=2,
                           source_args=(*SLOW_SOURCE, "--transport", "raw"),
                           dest_cfg=dest_tls(pki), source_cfg=source_tls(pki)) as lm:
        lm.make_image()
        lm.start_dest()
        first = lm.start_source()
        lm.start_guest()
        wait_until_received(lm, 20)
        first.p.kill()
        first.p.wait(10)
        ev = lm.dest.wait_event("disconnected", 30)
        assert 0 < ev["received"] < ev["total"]
        finish_with_a_new_source(lm)
        # two sources, each with a demand channel and one push stream, all TLS
        assert [e["source"] for e in lm.dest.lines if e["event"] == "tls"] == ["/CN=src.test"] * 4


# -- refusals, against a Destination's raw channel port ------------------------

def _agent(tmp_path, tls: TlsConfig | None):
    """A Destination in this process (no guest: only its raw channel port)."""
    events = Events()
    d = Destination(str(tmp_path / "attach.sock"), events, tls=tls)
    d.start()
    return d, events


@pytest.fixture
def agent(tmp_path, host, pki):
    d, events = _agent(tmp_path, dest_tls(pki))
    yield d, events
    d.close()


@pytest.fixture
def plain_agent(tmp_path, host):
    d, events = _agent(tmp_path, None)
    yield d, events
    d.close()


def _connect(d: Destination) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.demand_port), timeout=5)


def _source_handshake(d: Destination, cfg: TlsConfig) -> str:
    """A source's handshake on d's raw port: what it was told when refused."""
    sock = _connect(d)
    try:
        RawTls(cfg, server=False).handshake(sock, 5).close()
    except TlsError as e:
        sock.close()
        return str(e)
    raise AssertionError("the handshake was not refused")


@pytest.mark.timeout(60)
def test_a_source_whose_certificate_another_ca_signed_is_refused(agent, pki):
    d, events = agent
    cfg = source_tls(pki, "rogue")
    said = _source_handshake(d, cfg)
    assert said == ("TLS handshake: the destination refused it with the alert \"unknown ca\" (does it trust the "
                    f"CA that signed --tls-cert {cfg.cert}, and is that certificate valid now?)")
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    # (each CA write_certs makes has a name of its own: OpenSSL finds no issuer)
    assert msg == (f"channel from {peer}: TLS handshake: the source's certificate was refused: unable to get "
                   f"local issuer certificate (checked against --tls-ca {pki['good']['ca']})")


@pytest.mark.timeout(60)
def test_a_destination_whose_certificate_another_ca_signed_is_refused(agent, pki):
    """The source checks the destination's certificate against its own CA."""
    d, events = agent
    said = _source_handshake(d, source_tls(pki, "rogue", ca=pki["rogue"]["ca"]))
    assert said == (f"TLS handshake: the destination's certificate was refused: self-signed certificate in "
                    f"certificate chain (checked against --tls-ca {pki['rogue']['ca']})")
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    assert msg == (f"channel from {peer}: TLS handshake: the source refused it with the alert \"unknown ca\" "
                   f"(does it trust the CA that signed --tls-cert {pki['good']['dest.test']}, and is that "
                   "certificate valid now?)")


@pytest.mark.timeout(60)
def test_an_expired_source_certificate_is_refused(agent, pki):
    d, events = agent
    cfg = source_tls(pki, "expired")
    said = _source_handshake(d, cfg)
    assert said == ("TLS handshake: the destination refused it with the alert \"certificate expired\" (does it "
                    f"trust the CA that signed --tls-cert {cfg.cert}, and is that certificate valid now?)")
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    assert msg == (f"channel from {peer}: TLS handshake: the source's certificate was refused: certificate has "
                   f"expired (checked against --tls-ca {pki['good']['ca']})")


@pytest.mark.timeout(60)
def test_a_source_name_not_allowed_is_refused(agent, pki):
    d, events = agent
    cfg = source_tls(pki, name="other.test")
    said = _source_handshake(d, cfg)
    assert said == ("TLS handshake: the destination closed the connection without accepting this source (is the "
                    f"name in --tls-cert {cfg.cert} one of its --allow-source?)")
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    assert msg == (f"channel from {peer}: TLS handshake: the source's certificate (/CN=other.test) names none of "
                   "--allow-source src.test")


@pytest.mark.timeout(60)
def test_a_destination_with_another_name_is_refused(agent, pki):
    d, _ = agent
    said = _source_handshake(d, source_tls(pki, peer_name="elsewhere.test"))
    assert said == (f"TLS handshake: the destination's certificate was refused: hostname mismatch (checked "
                    f"against --tls-ca {pki['good']['ca']})")


@pytest.mark.timeout(60)
def test_plaintext_to_a_tls_channel_is_refused(agent):
    d, events = agent
    sock = _connect(d)
    sock.sendall(DEMAND_MAGIC + bytes(16))
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    assert msg == (f"channel from {peer}: TLS handshake with the source failed: wrong version number (does it "
                   "serve TLS, with a certificate of --tls-ca?)")
    sock.close()


@pytest.mark.timeout(60)
def test_tls_to_a_plaintext_channel_is_refused(plain_agent, pki):
    d, events = plain_agent
    said = _source_handshake(d, source_tls(pki))
    assert said == "TLS handshake: the destination closed the connection (does it serve TLS, with a certificate " \
                   "of --tls-ca?)"
    msg = events.wait("error")
    assert msg.endswith(" with an unknown magic or token: closed")


@pytest.mark.timeout(60)
def test_credentials_that_cannot_be_loaded_are_named(tmp_path, pki):
    g = pki["good"]
    with pytest.raises(TlsError) as e:
        RawTls(TlsConfig(str(tmp_path / "none.pem"), g["dest.test.key"], g["ca"]), server=True)
    assert str(e.value) == f"--tls-cert {tmp_path / 'none.pem'}: No such file or directory"
    with pytest.raises(TlsError) as e:
        RawTls(TlsConfig(g["dest.test"], g["src.test.key"], g["ca"]), server=True)
    assert str(e.value) == (f"--tls-key {g['src.test.key']}: key values mismatch (it must be the key of "
                            f"--tls-cert {g['dest.test']})")


@pytest.mark.timeout(60)
def test_a_peer_that_never_starts_the_handshake_is_dropped_at_the_deadline(agent, monkeypatch):
    from migrate.dest import agent as agent_module
    monkeypatch.setattr(agent_module, "RAW_HANDSHAKE_TIMEOUT", 0.5)
    d, events = agent
    sock = _connect(d)
    msg = events.wait("error")
    peer = msg[len("channel from "):msg.index(": ")]
    assert msg == f"channel from {peer}: TLS handshake: no answer from the source within 0.5 s"
    assert sock.recv(1) == b""   # and the connection was closed
    sock.close()


@pytest.mark.timeout(60)
def test_a_closed_tls_socket_leaves_its_fd_number_plain(pki):
    """The session is bound to the fd until close: a later socket given the
    same number is plaintext to the C channel loops."""
    from migrate._binding import ffi, lib
    a, b = socket.socketpair()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", RawTls(dest_tls(pki, allow=()), server=True)
                                                        .handshake(a, 5)))
    t.start()
    c = RawTls(source_tls(pki), server=False).handshake(b, 5)
    t.join()
    s = out["s"]
    subject = ffi.new("char[]", 256)
    fd = c.fileno()
    assert lib.mg_tls_peer_subject(fd, subject, 256) == 0 and ffi.string(subject) == b"/CN=dest.test"
    assert s.peer_subject() == "/CN=src.test"
    c.sendall(b"hello")
    assert s.recv(5) == b"hello"
    c.close()
    plain = []
    try:
        while not plain or plain[-1].fileno() != fd:   # the lowest free number comes first
            assert len(plain) < 64
            plain.append(socket.socket())
        assert lib.mg_tls_peer_subject(fd, subject, 256) == -errno.EBADF
    finally:
        for sock in (*plain, s):
            sock.close()


# -- the device-state channel's relay (native/devstate.c) ----------------------

def _tls_pair(pki) -> tuple[socket.socket, socket.socket]:
    """(source end, destination end) of a TLS session over a socketpair."""
    a, b = socket.socketpair()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("d", RawTls(dest_tls(pki, allow=()), server=True)
                                                        .handshake(a, 5)))
    t.start()
    s = RawTls(source_tls(pki), server=False).handshake(b, 5)
    t.join()
    return s, out["d"]


def _relay(lib, ffi, **fields):
    return ffi.new("struct mg_devstate_relay *", {"stop_fd": -1, **fields})


def _recv_into_pipe(lib, ffi, d: socket.socket, max_bytes: int) -> tuple[int, bytes, object]:
    """Runs mg_devstate_recv from d into a pipe a reader drains: (rc, what
    the pipe got, the relay)."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    got = bytearray()

    def qemu():
        os.set_blocking(r, True)
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=qemu)
    t.start()
    relay = _relay(lib, ffi, **{"in": d.fileno(), "out": w, "max_bytes": max_bytes})
    try:
        rc = lib.mg_devstate_recv(relay)
    finally:
        os.close(w)
        t.join(10)
        os.close(r)
    return rc, bytes(got), relay


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [None, 700_000, 1 << 20], ids=["whole", "over", "exact"])
def test_the_device_state_relay_carries_the_stream_whole_up_to_its_bound(pki, limit):
    """QEMU's pipe -> TLS -> the destination QEMU's pipe, in C: every byte in
    order up to the end frame; over --max-device-state the frame that would
    pass it is refused before a byte of it reaches QEMU."""
    from migrate._binding import ffi, lib
    stream = os.urandom(1 << 20)
    s, d = _tls_pair(pki)
    qr, qw = os.pipe2(os.O_CLOEXEC)   # the source QEMU's pipe

    def source_qemu():
        try:
            for i in range(0, len(stream), 100_000):   # written in pieces, as QEMU does
                os.write(qw, stream[i:i + 100_000])
        except BrokenPipeError:
            pass   # (refused: the relay stopped reading, as a cancelled QEMU sees it)
        finally:
            os.close(qw)

    sender = _relay(lib, ffi, **{"in": qr, "out": s.fileno()})
    out = {}
    ts = [threading.Thread(target=source_qemu),
          threading.Thread(target=lambda: out.setdefault("rc", lib.mg_devstate_send(sender)))]
    for t in ts:
        t.start()
    try:
        rc, got, relay = _recv_into_pipe(lib, ffi, d, limit or (1 << 30))
    finally:
        d.close()   # (a refused stream: the sender sees the end)
        for t in ts:
            t.join(10)
        s.close()
        os.close(qr)
    if limit is None or limit == len(stream):
        assert rc == 0 and got == stream and relay.bytes == len(stream)
        assert out["rc"] == 0 and sender.bytes == len(stream)
        assert 0 < relay.first_ns <= relay.last_ns
    else:
        assert rc == -errno.EFBIG
        assert len(got) <= limit and got == stream[:len(got)] and relay.bytes == len(got)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames, rc, qemu_got", [
    ([b"\x00\x04\x00\x01"], -errno.EPROTO, b""),                      # a frame over MG_DEVSTATE_FRAME
    ([b"\x00\x00\x00\x05QEVM"], -errno.ENODATA, b""),                 # cut inside a frame: none of it
    ([b"\x00\x00\x00\x04QEVM"], -errno.ENODATA, b"QEVM"),             # whole frames, but no end frame
    ([b"\x00\x00\x00\x04QEVM", b"\x00\x00\x00\x00"], 0, b"QEVM"),    # the end frame: whole
], ids=["frame-too-long", "cut-in-a-frame", "no-end-frame", "whole"])
def test_the_device_state_relay_refuses_what_a_hostile_source_frames(pki, frames, rc, qemu_got):
    """A TLS peer holding the session's token still cannot make the relay
    pass QEMU more than whole frames, nor take a cut stream for a whole one."""
    from migrate._binding import ffi, lib
    s, d = _tls_pair(pki)
    try:
        for f in frames:
            s.sendall(f)
        lib.mg_tls_close_notify(s.fileno(), 1000)
        got_rc, got, relay = _recv_into_pipe(lib, ffi, d, 1 << 30)
    finally:
        s.close()
        d.close()
    assert got_rc == rc and got == qemu_got


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [None, 700_000, 1 << 20], ids=["whole", "over", "exact"])
def test_a_plaintext_device_state_channel_is_spliced_whole_up_to_its_bound(limit):
    """A plaintext channel (the source QEMU writes into it itself) spliced
    into the destination QEMU's pipe: every byte in order up to the source's
    end; past --max-device-state not a byte more reaches QEMU."""
    from migrate._binding import ffi, lib
    stream = os.urandom(1 << 20)
    ls = socket.create_server(("127.0.0.1", 0))
    src = socket.create_connection(ls.getsockname(), timeout=10)
    d, _ = ls.accept()
    ls.close()

    def source_qemu():
        try:
            for i in range(0, len(stream), 100_000):
                src.sendall(stream[i:i + 100_000])
            src.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # (refused: the destination closed it)

    t = threading.Thread(target=source_qemu)
    t.start()
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    got = bytearray()

    def qemu():
        os.set_blocking(r, True)
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    q = threading.Thread(target=qemu)
    q.start()
    relay = ffi.new("struct mg_devstate_relay *", {"in": d.fileno(), "out": w, "stop_fd": -1,
                                                     "max_bytes": limit or (1 << 30)})
    try:
        rc = lib.mg_devstate_splice(relay)
    finally:
        os.close(w)
        q.join(10)
        os.close(r)
        d.close()
        t.join(10)
        src.close()
    if limit is None or limit == len(stream):
        assert rc == 0 and bytes(got) == stream and relay.bytes == len(stream)
    else:
        assert rc == -errno.EFBIG and bytes(got) == stream[:limit] and relay.bytes == limit

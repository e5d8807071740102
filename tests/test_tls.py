"""Mutual TLS on the gRPC channel and the command line's rules around it: every
refusal says in words what is wrong (a CA not trusted, a certificate expired,
a name not allowed, TLS on one end only, plaintext off loopback), the
destination keeps serving through them, and a good source then finishes a
migration over TLS that the guest verifies."""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import Events

from migrate.dest.service import PeerInterceptor, cert_names, check_peer, peer_identity
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.report import Reporter
from migrate.sim.localrun import LocalMigration, Proc, TlsFiles
from migrate.source.ramfile import RamImage
from migrate.source.session import Source
from migrate.wire.certs import write_certs
from migrate.wire.protocol import channel
from migrate.wire.tls import CERTS_HINT, TLS_FLAGS, TlsConfig, TlsError, from_args, is_loopback, \
    plaintext_refusal

M = 1 << 20
SIZE = 16 * M
NPAGES = SIZE // 4096
LONG_AGO = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture
def ca(tmp_path) -> dict:
    """The run's CA with dest and source (as a local run makes them), plus an
    `intruder` it also signed, and `old-dest`/`old-source` it signed for 30
    days in 2020 (expired)."""
    d = str(tmp_path / "ca")
    out = write_certs(d, ["dest", "source", "intruder"])
    out.update(write_certs(d, ["old-dest", "old-source"], days=30, not_before=LONG_AGO))
    return out


@pytest.fixture
def other_ca(tmp_path) -> dict:
    """Another CA, with its own dest and source."""
    return write_certs(str(tmp_path / "other"), ["dest", "source"])


def flags(certs: dict, host: str, ca: dict | None = None) -> list[str]:
    return ["--tls-cert", certs[host], "--tls-key", certs[host + ".key"], "--tls-ca", (ca or certs)["ca"]]


def config(certs: dict, host: str, ca: dict | None = None, **kw) -> TlsConfig:
    return TlsConfig(cert=certs[host], key=certs[host + ".key"], ca=(ca or certs)["ca"], **kw)


@pytest.fixture
def waiting(tmp_path, host, ca):
    """A TLS dest (certificate `dest`, --allow-source source) with an attached
    guest, no source yet."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=12, pattern="random", vcpus=2, tls=False,
                        dest_args=(*flags(ca, "dest"), "--allow-source", "source"))
    lm.make_image()
    lm.start_dest()
    lm.start_guest()
    lm.dest.wait_event("attached", 60)
    yield lm
    lm.close()


def source_error(lm: LocalMigration, args: list[str], rc: int = 1) -> str:
    src = lm._spawn("source", ["source", "--ram", lm.image, "--to", lm.address, "--json", *args])
    assert src.wait(60) == rc, src.stderr_lines[-5:]
    return " | ".join(src.errors())


def finish(lm: LocalMigration, args: list[str]) -> None:
    """A good source completes the migration; the guest verifies every byte."""
    src = lm._spawn("source", ["source", "--ram", lm.image, "--to", lm.address, "--json", *args])
    assert src.wait(60) == 0, src.errors() or src.stderr_lines[-5:]
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    assert lm.dest.wait(30) == 0
    d = lm.dest.summary()
    assert d["state"] == "complete"
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == NPAGES


# -- a whole migration ------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_a_whole_migration_over_tls_verifies(tmp_path, host, transport):
    """As `migrate demo` runs it: certificates made in the work directory, the
    source naming the destination with --dest-name, the destination taking
    only the source's certificate. The gRPC port takes nothing but TLS."""
    with LocalMigration(str(tmp_path), 64 * M, seed=5, pattern="random", vcpus=2, tls=True,
                        source_args=("--transport", transport)) as lm:
        lm.make_image()
        lm.start_dest()
        assert lm.dest.lines[-1]["tls"] is True
        with pytest.raises(TlsError) as plain:   # a plaintext client is turned away at the door
            from migrate.wire.tls import check_destination
            check_destination(lm.address, None, 5)
        assert str(plain.value).startswith(f"the destination at {lm.address} takes TLS only")
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        lm.start_source()
        for p in (lm.source, lm.guest, lm.dest):
            assert p.wait(120) == 0, p.errors() or p.stderr_lines[-5:]
        g, d = lm.guest.summary(), lm.dest.summary()
        assert g["verified"] is True and g["mismatches"] == 0
        assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == 64 * M // 4096
        assert not [e for e in lm.dest.lines if e.get("event") == "refused"]


@pytest.mark.timeout(180)
def test_migrate_demo_runs_over_tls(host):
    r = subprocess.run([sys.executable, "-m", "migrate", "demo", "--size", "256M", "--json"], capture_output=True,
                       text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["tls"] is True and summary["verified"] is True
    assert summary["pages_total"] == 256 * M // 4096


# -- refusals, then a good source -------------------------------------------------------
@pytest.mark.timeout(180)
def test_tls_refusals_say_why_and_the_destination_keeps_serving(waiting, ca, other_ca, tmp_path):
    lm, addr = waiting, waiting.address
    # a source that trusts another CA: the destination's certificate is not signed by it
    assert source_error(lm, [*flags(ca, "source", other_ca), "--dest-name", "dest"]) == (
        f"the destination at {addr} has a certificate this source does not trust (unable to get local issuer "
        f"certificate): it must be signed by a CA in --tls-ca {other_ca['ca']}")
    # a source whose certificate another CA signed: the destination closes after the handshake
    assert source_error(lm, [*flags(other_ca, "source", ca), "--dest-name", "dest"]) == (
        f"the destination at {addr} refused this source's certificate (--tls-cert {other_ca['source']}): it must "
        "be signed by a CA in the destination's --tls-ca and be valid now")
    # a certificate of the right CA but a name --allow-source does not take
    assert source_error(lm, [*flags(ca, "intruder"), "--dest-name", "dest"]) == (
        "open session: destination said PERMISSION_DENIED: a source whose certificate names intruder is not "
        "allowed here (the destination names the sources it takes with --allow-source)")
    refused = lm.dest.wait_event("refused", 10)
    assert refused["code"] == "PERMISSION_DENIED"
    assert refused["message"].endswith(": a source whose certificate names intruder is not allowed here (the "
                                       "destination names the sources it takes with --allow-source)")
    # the destination's certificate names `dest`, not the address in --to
    assert source_error(lm, flags(ca, "source")) == (
        f"the destination at {addr} has a certificate that does not name '127.0.0.1': pass --dest-name NAME with "
        "the name it carries")
    assert source_error(lm, [*flags(ca, "source"), "--dest-name", "elsewhere"]) == (
        f"the destination at {addr} has a certificate that does not name 'elsewhere': pass --dest-name NAME with "
        "the name it carries")
    # an expired source certificate: the source itself refuses to start with it
    assert source_error(lm, [*flags(ca, "old-source"), "--dest-name", "dest"], rc=2) == (
        f"--tls-cert {ca['old-source']} has expired: make a new one ({CERTS_HINT})")
    # plaintext to the TLS port
    assert source_error(lm, []) == (
        f"the destination at {addr} takes TLS only and this source was started without it: pass {TLS_FLAGS} "
        f"({CERTS_HINT})")
    assert lm.dest.p.poll() is None and lm.guest.p.poll() is None
    finish(lm, [*flags(ca, "source"), "--dest-name", "dest"])


def _ram(tmp_path) -> RamImage:
    path = tmp_path / "ram"
    path.write_bytes(bytes(64 * 4096))
    return RamImage(str(path))


@pytest.mark.timeout(60)
def test_an_expired_source_certificate_is_refused_by_the_destination(waiting, ca, tmp_path):
    """A source that got past its own start check (here: built in process)
    with an expired certificate: the destination will not take it."""
    ram = _ram(tmp_path)
    try:
        src = Source(ram, waiting.address, Reporter(quiet=True), connect_timeout=10,
                     tls=config(ca, "old-source", peer_name="dest"))
        with pytest.raises(TlsError) as e:
            src.run()
    finally:
        ram.close()
    assert str(e.value) == (
        f"the destination at {waiting.address} refused this source's certificate (--tls-cert {ca['old-source']}): "
        "it must be signed by a CA in the destination's --tls-ca and be valid now")
    finish(waiting, [*flags(ca, "source"), "--dest-name", "dest"])


@pytest.fixture
def tls_server(ca):
    """A bare gRPC server with TLS credentials (the checks under test happen
    before any call) on loopback; yields (start(TlsConfig) -> address)."""
    servers = []

    def start(tls: TlsConfig, servicer=None) -> str:
        server = grpc.server(ThreadPoolExecutor(4), interceptors=[PeerInterceptor(tls, Reporter(quiet=True))])
        pbg.add_MigrationServicer_to_server(servicer or pbg.MigrationServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"
    yield start
    for s in servers:
        s.stop(0)


@pytest.mark.timeout(60)
def test_an_expired_destination_certificate_is_refused_by_the_source(tls_server, ca, tmp_path):
    addr = tls_server(config(ca, "old-dest"))
    ram = _ram(tmp_path)
    try:
        with pytest.raises(TlsError) as e:
            Source(ram, addr, Reporter(quiet=True), connect_timeout=10,
                   tls=config(ca, "source", peer_name="old-dest")).run()
    finally:
        ram.close()
    assert str(e.value) == f"the destination at {addr} has an expired certificate: it needs a new one"


@pytest.mark.timeout(60)
def test_an_agent_with_an_expired_certificate_does_not_start(tmp_path, ca):
    sock = str(tmp_path / "a.sock")
    p = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", sock, "--json", *flags(ca, "old-dest")])
    try:
        assert p.wait(20) == 2
    finally:
        p.kill()
    assert p.errors() == [f"--tls-cert {ca['old-dest']} has expired: make a new one ({CERTS_HINT})"]
    assert not os.path.exists(sock)


@pytest.mark.timeout(120)
def test_tls_to_a_plaintext_port_says_so(tmp_path, host, ca):
    lm = LocalMigration(str(tmp_path), SIZE, seed=13, pattern="random", vcpus=2, tls=False)
    try:
        lm.make_image()
        lm.start_dest()
        assert lm.dest.lines[-1]["tls"] is False
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        assert source_error(lm, [*flags(ca, "source"), "--dest-name", "dest"]) == (
            f"the destination at {lm.address} does not speak TLS (it was started without --tls-cert): start both "
            "agents with TLS")
        finish(lm, [])
    finally:
        lm.close()


@pytest.mark.timeout(30)
def test_the_source_checks_the_destination_name_in_to_by_default(tls_server, ca):
    """Without --dest-name the host of --to is the name the destination's
    certificate must carry: a certificate made for 127.0.0.1 passes, over
    gRPC too (its IP SAN), and the call reaches the servicer as `source`."""
    d = os.path.dirname(ca["ca"])
    ip = write_certs(d, ["127.0.0.1"])
    seen = []

    class Servicer(pbg.MigrationServicer):
        def Finish(self, request, context):
            seen.append(peer_identity(context))
            return pb.FinishReply()

    addr = tls_server(config(ip, "127.0.0.1", ca=ca, allow=("source",)), Servicer())
    args = type("Args", (), dict(tls_cert=ca["source"], tls_key=ca["source.key"], tls_ca=ca["ca"],
                                 dest_name=None, insecure=False))
    tls = from_args(args, "source", "127.0.0.1")
    assert tls.peer_name == "127.0.0.1" and tls.channel_options(addr) == []
    from migrate.wire.tls import check_destination
    check_destination(addr, tls, 5)
    ch = channel(addr, "test", tls)
    try:
        pbg.MigrationStub(ch).Finish(pb.FinishRequest(session_id="x"), timeout=10)
    finally:
        ch.close()
    assert seen == ["source"]


@pytest.mark.timeout(30)
def test_a_name_not_allowed_is_refused_on_every_call(tls_server, ca):
    addr = tls_server(config(ca, "dest", allow=("source",)))
    for name, code in (("intruder", grpc.StatusCode.PERMISSION_DENIED), ("source", grpc.StatusCode.UNIMPLEMENTED)):
        ch = channel(addr, "test", config(ca, name, peer_name="dest"))
        try:
            stub = pbg.MigrationStub(ch)
            for call in (lambda: stub.Finish(pb.FinishRequest(session_id="x"), timeout=10),
                         lambda: stub.Push(iter([pb.PageBatch(session_id="x")]), timeout=10),
                         lambda: stub.Open(pb.Hello(), timeout=10)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == code
                if name == "intruder":
                    assert e.value.details() == (
                        "a source whose certificate names intruder is not allowed here (the destination names the "
                        "sources it takes with --allow-source)")
        finally:
            ch.close()


def _h2_call(sock, path: str, authority: str) -> None:
    """An HTTP/2 gRPC request by hand (an empty message), for a client gRPC
    will not make: HPACK literals without indexing, one stream."""
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def literal(name: str, value: str) -> bytes:
        return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    headers = b"".join(literal(n, v) for n, v in ((":method", "POST"), (":scheme", "https"), (":path", path),
                                                  (":authority", authority), ("content-type", "application/grpc"),
                                                  ("te", "trailers")))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(4, 1, 0, b"")
                 + frame(1, 4, 1, headers) + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))


@pytest.mark.timeout(30)
def test_a_call_over_tls12_is_refused(ca):
    """gRPC's server completes a TLS 1.2 handshake (its Python API cannot
    forbid it); the call made over it is refused before its handler runs."""
    events, called = Events(), []

    class Servicer(pbg.MigrationServicer):
        def Finish(self, request, context):
            called.append(peer_identity(context))
            return pb.FinishReply()

    server = grpc.server(ThreadPoolExecutor(2), interceptors=[PeerInterceptor(config(ca, "dest"), events)])
    pbg.add_MigrationServicer_to_server(Servicer(), server)
    port = server.add_secure_port("127.0.0.1:0", config(ca, "dest").server_credentials())
    server.start()
    try:
        for top, want in ((ssl.TLSVersion.TLSv1_2, []), (ssl.TLSVersion.TLSv1_3, ["source"])):
            ctx = config(ca, "source").client_context()
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = top
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                 server_hostname="dest") as conn:
                assert conn.version() == top.name.replace("v1_", "v1.")
                _h2_call(conn, "/migrate.v1.Migration/Finish", "dest")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not (called if want else events.lines):
                    time.sleep(0.05)
            assert called == want
        (refused,) = events.lines
        assert (refused["event"], refused["code"]) == ("refused", "UNAUTHENTICATED")
        assert refused["message"].endswith(": this destination takes TLS 1.3 only, not TLSv1.2")
    finally:
        server.stop(0)


# -- the peer's certificate, as the auth context gives it ------------------------------------
def test_check_peer_takes_tls13_and_allowed_names_only():
    tls = TlsConfig("c", "k", "a", allow=("src.example",))
    good = {"transport_security_type": [b"ssl"], "x509_pem_cert": [b"PEM"], "ssl_tls_version": [b"TLSv1.3"],
            "x509_subject_alternative_name": [b"src.example", b"10.0.0.1"], "peer_dns": [b"src.example"],
            "x509_common_name": [b"other"]}
    assert check_peer(good, tls) is None
    assert check_peer({**good, "ssl_tls_version": [b"TLSv1.2"]}, tls) == (
        grpc.StatusCode.UNAUTHENTICATED, "this destination takes TLS 1.3 only, not TLSv1.2")
    assert check_peer({"transport_security_type": [b"insecure"]}, tls) == (
        grpc.StatusCode.UNAUTHENTICATED, "this destination takes only TLS with a client certificate")
    # the CN counts only on a certificate without SANs
    cn_only = {**good, "x509_common_name": [b"src.example"], "peer_dns": [],
               "x509_subject_alternative_name": [b"10.0.0.1"]}
    assert cert_names(cn_only) == []
    assert check_peer(cn_only, tls) == (
        grpc.StatusCode.PERMISSION_DENIED, "a source whose certificate names no DNS name or CN is not allowed here "
        "(the destination names the sources it takes with --allow-source)")
    no_sans = {k: v for k, v in cn_only.items() if k not in ("peer_dns", "x509_subject_alternative_name")}
    assert cert_names(no_sans) == ["src.example"]
    assert check_peer(no_sans, tls) is None
    assert check_peer(good, TlsConfig("c", "k", "a")) is None   # no --allow-source: any certificate the CA signed

    class Context:
        def __init__(self, auth):
            self.auth = auth

        def auth_context(self):
            return self.auth
    assert peer_identity(Context(good)) == "src.example"
    assert peer_identity(Context(no_sans)) == "src.example"
    assert peer_identity(Context({"transport_security_type": [b"insecure"]})) is None
    assert peer_identity(Context({})) is None


# -- safe by default -----------------------------------------------------------------------------
def _args(**kw):
    base = dict(tls_cert=None, tls_key=None, tls_ca=None, insecure=False, allow_source=None, dest_name=None)
    base.update(kw)
    return type("Args", (), base)


def test_plaintext_only_on_loopback_or_with_insecure():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.9.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("no-such-host.invalid")
    assert plaintext_refusal("dest", "127.0.0.1") is None
    assert plaintext_refusal("source", "localhost") is None
    for side, host in (("dest", "127.0.0.1"), ("source", "::1")):
        assert from_args(_args(), side, host) is None
    for side in ("dest", "source"):
        assert from_args(_args(insecure=True), side, "192.0.2.1") is None   # said so: plaintext
        with pytest.raises(TlsError) as e:
            from_args(_args(), side, "192.0.2.1")
        assert str(e.value) == plaintext_refusal(side, "192.0.2.1")
    assert plaintext_refusal("dest", "192.0.2.1") == (
        "refusing to listen on 192.0.2.1 without TLS: whoever reaches the port could write the guest's memory. "
        f"Pass {TLS_FLAGS} (and --allow-source NAME), or --insecure on both agents for a network only they share "
        f"({CERTS_HINT})")
    assert plaintext_refusal("source", "192.0.2.1") == (
        f"refusing to send guest memory to 192.0.2.1 without TLS: pass {TLS_FLAGS} (and --dest-name NAME if the "
        "destination's certificate names another host), or --insecure on both agents for a network only they "
        f"share ({CERTS_HINT})")


def _this_hosts_other_address() -> str | None:
    """A non-loopback address of this host, if it has one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))     # nothing is sent: this only picks the route's source address
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if is_loopback(addr) else addr


@pytest.mark.timeout(60)
def test_agents_refuse_plaintext_off_loopback_naming_the_flags(tmp_path):
    sock = str(tmp_path / "a.sock")
    listens = ["0.0.0.0"] + [a for a in [_this_hosts_other_address()] if a]
    for host in listens:
        p = Proc("dest", ["dest", "--listen", f"{host}:0", "--attach", sock, "--json"])
        try:
            assert p.wait(20) == 2
        finally:
            p.kill()
        assert p.errors() == [plaintext_refusal("dest", host)]
        assert not os.path.exists(sock)
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4096))
    p = Proc("source", ["source", "--ram", str(ram), "--to", "192.0.2.1:7000", "--json"])   # TEST-NET-1
    try:
        assert p.wait(20) == 2
    finally:
        p.kill()
    assert p.errors() == [plaintext_refusal("source", "192.0.2.1")]


@pytest.mark.parametrize("argv,message", [
    (["--tls-cert", "c.pem"], "--tls-cert, --tls-key and --tls-ca go together: --tls-key and --tls-ca are missing"),
    (["--tls-cert", "c.pem", "--tls-key", "k"], "--tls-cert, --tls-key and --tls-ca go together: --tls-ca is missing"),
    (["--allow-source", "x"], f"--allow-source names a peer's certificate: it needs {TLS_FLAGS}"),
    (["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--insecure"],
     "--insecure turns TLS off: give it or the --tls-* flags, not both"),
], ids=["cert-alone", "no-ca", "allow-without-tls", "insecure-and-tls"])
@pytest.mark.timeout(30)
def test_tls_flags_that_do_not_go_together(tmp_path, argv, message):
    p = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", str(tmp_path / "a.sock"), "--json", *argv])
    try:
        assert p.wait(20) == 2
    finally:
        p.kill()
    assert p.errors() == [message]


def test_unusable_tls_files_are_named(ca, tmp_path):
    def refusal(**kw) -> str:
        with pytest.raises(TlsError) as e:
            from_args(_args(**{**dict(tls_cert=ca["dest"], tls_key=ca["dest.key"], tls_ca=ca["ca"]), **kw}),
                      "dest", "127.0.0.1")
        return str(e.value)
    missing = str(tmp_path / "missing.pem")
    assert refusal(tls_ca=missing) == f"--tls-ca {missing}: cannot read it (No such file or directory)"
    assert refusal(tls_key=ca["dest"]) == f"--tls-key {ca['dest']}: not a PEM private key"
    assert refusal(tls_cert=ca["dest.key"]) == f"--tls-cert {ca['dest.key']}: not a PEM certificate"
    assert refusal(tls_key=ca["source.key"]) == (
        f"--tls-key {ca['source.key']} does not go with --tls-cert {ca['dest']} (key values mismatch)")
    shared = str(tmp_path / "shared.key")
    with open(ca["dest.key"], "rb") as f, open(shared, "wb") as g:
        g.write(f.read())
    os.chmod(shared, 0o644)
    assert refusal(tls_key=shared) == (
        f"--tls-key {shared} can be read or written by every user (mode 0644): chmod 600 {shared}")
    os.chmod(shared, 0o640)    # a group the owner chose may read it
    assert from_args(_args(tls_cert=ca["dest"], tls_key=shared, tls_ca=ca["ca"]), "dest", "127.0.0.1").key == shared
    from cryptography.hazmat.primitives import serialization
    with open(ca["dest.key"], "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    locked = str(tmp_path / "locked.key")
    with open(locked, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret")))
    os.chmod(locked, 0o600)
    assert refusal(tls_key=locked) == (
        f"--tls-key {locked} is encrypted: the agents take an unencrypted key in a file only they can read "
        "(openssl pkey -in KEY -out PLAIN)")
    ok = from_args(_args(tls_cert=ca["dest"], tls_key=ca["dest.key"], tls_ca=ca["ca"], allow_source=["source"]),
                   "dest", "0.0.0.0")
    assert ok == TlsConfig(ca["dest"], ca["dest.key"], ca["ca"], allow=("source",))
    src = from_args(_args(tls_cert=ca["source"], tls_key=ca["source.key"], tls_ca=ca["ca"], dest_name="dest"),
                    "source", "192.0.2.1")
    assert src.peer_name == "dest" and src.channel_options("192.0.2.1:7000") == [
        ("grpc.ssl_target_name_override", "dest")]


# -- migrate certs ---------------------------------------------------------------------------------
def _handshake(server_cert: str, server_key: str, ca_file: str, name: str) -> str:
    """Verifies server_cert as a TLS client trusting ca_file and expecting
    name would (in memory); returns the TLS version."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(ca_file)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1], server_hostname=name)
    s = server.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(6):
        for end in (c, s):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    return c.version()


@pytest.mark.timeout(60)
def test_migrate_certs_writes_a_ca_and_host_certificates_that_verify(tmp_path):
    d = str(tmp_path / "certs")
    run = lambda *a: subprocess.run([sys.executable, "-m", "migrate", "certs", d, *a], capture_output=True,
                                    text=True, timeout=30)
    r = run("--hosts", "src.example,dst.example,10.0.0.2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"CA:   {d}/ca.pem (certificate), {d}/ca.key (its key: keep it off the agents' hosts)",
        f"src.example: {d}/src.example.pem (certificate), {d}/src.example.key (key, 0600)",
        f"dst.example: {d}/dst.example.pem (certificate), {d}/dst.example.key (key, 0600)",
        f"10.0.0.2: {d}/10.0.0.2.pem (certificate), {d}/10.0.0.2.key (key, 0600)",
        "valid 365 days. On each host: --tls-cert HOST.pem --tls-key HOST.key --tls-ca ca.pem; `migrate dest "
        "--allow-source SOURCE`, `migrate source --to DEST:PORT` (or --dest-name DEST)"]
    modes = {f: os.stat(os.path.join(d, f)).st_mode & 0o777 for f in os.listdir(d)}
    assert modes == {"ca.pem": 0o644, "ca.key": 0o600, "src.example.pem": 0o644, "src.example.key": 0o600,
                     "dst.example.pem": 0o644, "dst.example.key": 0o600, "10.0.0.2.pem": 0o644,
                     "10.0.0.2.key": 0o600}
    ca = f"{d}/ca.pem"
    assert _handshake(f"{d}/dst.example.pem", f"{d}/dst.example.key", ca, "dst.example") == "TLSv1.3"
    assert _handshake(f"{d}/10.0.0.2.pem", f"{d}/10.0.0.2.key", ca, "10.0.0.2") == "TLSv1.3"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(f"{d}/src.example.pem", f"{d}/src.example.key", ca, "dst.example")
    # a host added later is signed by the CA already there
    r = run("--hosts", "third")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"CA:   the one already in {d}"
    assert _handshake(f"{d}/third.pem", f"{d}/third.key", ca, "third") == "TLSv1.3"
    # nothing is overwritten, and nothing is written when one host's files exist
    before = sorted(os.listdir(d))
    r = run("--hosts", "fourth,src.example")
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", f"certs: {d}/src.example.pem exists: nothing was written (remove it, or name another host)\n")
    assert sorted(os.listdir(d)) == before
    for hosts, message in (("ca", "--hosts: 'ca' is the CA's own file name (ca.pem): name the host otherwise"),
                           ("a/b", "--hosts: 'a/b' is not a host name (letters, digits, '.' and '-') or an IP "
                                   "address"),
                           ("x,x", "--hosts: x named twice"),
                           (",", "--hosts: name at least one host, e.g. --hosts src.example,dst.example")):
        r = run("--hosts", hosts)
        assert (r.returncode, r.stderr) == (2, f"certs: {message}\n")


def test_local_runs_use_tls_off_loopback(tmp_path):
    """LocalMigration's default: plaintext on loopback, TLS where the agents
    would refuse plaintext; the flags it gives name each other."""
    assert LocalMigration(str(tmp_path), SIZE).tls is None
    lm = LocalMigration(str(tmp_path), SIZE, dest_listen="192.0.2.1:0")
    assert isinstance(lm.tls, TlsFiles)
    try:
        dest, source = lm.tls.dest_args(), lm.tls.source_args()
        assert dest[-2:] == ["--allow-source", "source"] and source[-2:] == ["--dest-name", "dest"]
        assert all(os.path.exists(p) for p in dest[1:6:2] + source[1:6:2])
    finally:
        lm.close()
    assert not os.path.exists(lm.tls.dir)

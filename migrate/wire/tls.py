"""TLS credentials as both agents take them from the command line.

One `TlsConfig` per agent: its own certificate and key, the CA that signs its
peers, and who it accepts (the destination: `--allow-source` names; the
source: the destination's name, from `--to` or `--dest-name`). The gRPC
channel and the plain TCP demand and push channels all use it. `None` in its
place means plaintext, which only loopback or `--insecure` allows.

Decided here, once:
  - from_args: the flags together, the files readable and matching, and the
    plaintext rule (both ends on loopback, or --insecure) with the message
    that names the flags;
  - the gRPC credentials of both ends, and which names a peer's certificate
    carries (its DNS SANs, else its CN) and whether the allow list takes it;
  - check_destination: before gRPC connects, one connection from the source
    that says in words why the two ends cannot talk (a CA not trusted, a
    certificate expired, TLS on one end only), where gRPC would retry for the
    whole connect timeout and then only say that it could not connect.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from migrate.errors import MigrateError

TLS_FLAGS = "--tls-cert FILE --tls-key FILE --tls-ca FILE"
CERTS_HINT = "`migrate certs DIR --hosts SOURCE,DEST` writes a CA and a certificate per host"

# HTTP/2's client preface and an empty SETTINGS frame: what a gRPC client
# sends first. A plaintext gRPC server answers with its SETTINGS frame (type 4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 4
_TLS_ALERT = 0x15     # the first byte of a TLS alert record
# OpenSSL's verify results (X509_V_ERR_*) that say more than "not trusted"
_NOT_YET_VALID, _EXPIRED = 9, 10
_NAME_MISMATCH = (62, 64)   # host name, IP address


class TlsError(MigrateError):
    """TLS set up wrong on this end, or the two ends cannot agree: in words,
    with the flag to change."""


@dataclass(frozen=True)
class TlsConfig:
    cert: str                   # PEM file: this agent's certificate (chain)
    key: str                    # PEM file: its private key
    ca: str                     # PEM file: the CA(s) a peer's certificate must chain to
    # destination: a source's certificate must carry one of these as a DNS SAN
    # (or, without SANs, as its CN); empty: any certificate the CA signed
    allow: tuple[str, ...] = field(default=())
    # source: the name the destination's certificate must carry (`--dest-name`,
    # else the host of `--to`); unused by the destination
    peer_name: str = ""

    def flags(self, side: str) -> list[str]:
        """The command-line flags that give a `migrate dest` (side "dest") or
        `migrate source` this config: what harnesses that start agents pass."""
        out = ["--tls-cert", self.cert, "--tls-key", self.key, "--tls-ca", self.ca]
        if side == "dest":
            for name in self.allow:
                out += ["--allow-source", name]
        elif self.peer_name:
            out += ["--dest-name", self.peer_name]
        return out

    # -- checking what the command line named ---------------------------------
    def check(self) -> None:
        """Raises TlsError unless the three files are readable PEM, the key is
        unencrypted, not readable by every user and the certificate's, and the
        certificate is valid now (when it chains to --tls-ca, which is when
        that can be told)."""
        for flag, path, marker in (("--tls-cert", self.cert, b"-----BEGIN CERTIFICATE-----"),
                                   ("--tls-key", self.key, b"PRIVATE KEY-----"),
                                   ("--tls-ca", self.ca, b"-----BEGIN CERTIFICATE-----")):
            if marker not in _read(flag, path):
                raise TlsError(f"{flag} {path}: not a PEM {'private key' if flag == '--tls-key' else 'certificate'}")
        if b"ENCRYPTED" in _read("--tls-key", self.key):
            raise TlsError(f"--tls-key {self.key} is encrypted: the agents take an unencrypted key in a file only "
                           "they can read (openssl pkey -in KEY -out PLAIN)")
        mode = os.stat(self.key).st_mode
        if mode & 0o006:
            raise TlsError(f"--tls-key {self.key} can be read or written by every user (mode {mode & 0o777:04o}): "
                           f"chmod 600 {self.key}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # (the password callback keeps OpenSSL from asking on the terminal)
            ctx.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except ssl.SSLError as e:
            raise TlsError(f"--tls-key {self.key} does not go with --tls-cert {self.cert} ({_reason(e)})") from None
        try:
            ctx.load_verify_locations(self.ca)
        except ssl.SSLError as e:
            raise TlsError(f"--tls-ca {self.ca}: cannot load it ({_reason(e)})") from None
        self._check_validity(ctx)

    def _check_validity(self, server_ctx: ssl.SSLContext) -> None:
        """This agent's own certificate, verified as a peer would (a handshake
        in memory against --tls-ca): expired or not yet valid is said here, at
        start, rather than as a peer's refusal later. A certificate from
        another CA than --tls-ca passes (its peers may trust that one)."""
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.load_verify_locations(self.ca)
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(c_in, c_out)
        s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(8):   # TLS 1.3: three flights
            for end in (c, s):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as e:
                    if e.verify_code == _EXPIRED:
                        raise TlsError(f"--tls-cert {self.cert} has expired: make a new one "
                                       f"({CERTS_HINT})") from None
                    if e.verify_code == _NOT_YET_VALID:
                        raise TlsError(f"--tls-cert {self.cert} is not valid yet: check this host's clock") from None
                    return
                except ssl.SSLError:
                    return
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if c.version() is not None and s.version() is not None:
                return

    # -- gRPC ------------------------------------------------------------------
    def server_credentials(self):
        """The destination's: its certificate, and every source must show one
        the CA signed (require_client_auth). gRPC's Python API does not choose
        the TLS version: the service checks it per call (check_peer)."""
        import grpc
        return grpc.ssl_server_credentials([(_read("--tls-key", self.key), _read("--tls-cert", self.cert))],
                                           root_certificates=_read("--tls-ca", self.ca), require_client_auth=True)

    def channel_credentials(self):
        """The source's: the CA the destination's certificate must chain to, and
        its own certificate to show."""
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=_read("--tls-ca", self.ca),
                                            private_key=_read("--tls-key", self.key),
                                            certificate_chain=_read("--tls-cert", self.cert))

    def channel_options(self, target: str) -> list[tuple[str, str]]:
        """gRPC checks the destination's certificate against the host of the
        target; --dest-name names another."""
        host = target.rpartition(":")[0].strip("[]")
        if self.peer_name and self.peer_name != host:
            return [("grpc.ssl_target_name_override", self.peer_name)]
        return []

    # -- the peer's certificate --------------------------------------------------
    def allows(self, names: list[str]) -> bool:
        """Whether a source whose certificate carries these names is allowed."""
        return not self.allow or any(n in self.allow for n in names)

    # -- the source's first connection ------------------------------------------
    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.set_alpn_protocols(["h2"])
        return ctx


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsError(f"{flag} {path}: cannot read it ({e.strerror})") from None


def _reason(e: ssl.SSLError) -> str:
    return (e.reason or str(e)).replace("_", " ").lower()


# -- the command line -------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when host is, or resolves only to, loopback addresses. A name
    that does not resolve now is not: plaintext is not left to whatever it
    resolves to later."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def plaintext_refusal(side: str, host: str) -> str | None:
    """Why `side` ("dest" listening on host, "source" connecting to it) may not
    run without TLS and without --insecure; None when it may (loopback)."""
    if is_loopback(host):
        return None
    if side == "dest":
        return (f"refusing to listen on {host} without TLS: whoever reaches the port could write the guest's "
                f"memory. Pass {TLS_FLAGS} (and --allow-source NAME), or --insecure on both agents for a network "
                f"only they share ({CERTS_HINT})")
    return (f"refusing to send guest memory to {host} without TLS: pass {TLS_FLAGS} (and --dest-name NAME if "
            f"the destination's certificate names another host), or --insecure on both agents for a network "
            f"only they share ({CERTS_HINT})")


def from_args(args, side: str, host: str) -> TlsConfig | None:
    """The TlsConfig the flags of `migrate dest` or `migrate source` ask for
    (None: plaintext), checked; host is the --listen or --to host. Raises
    TlsError naming the flags when they do not go together, a file is
    unusable, or plaintext is asked for where it is not allowed."""
    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    allow = tuple(getattr(args, "allow_source", None) or ())
    dest_name = getattr(args, "dest_name", None) or ""
    if not any(given.values()):
        for flag, value in (("--allow-source", allow), ("--dest-name", dest_name)):
            if value:
                raise TlsError(f"{flag} names a peer's certificate: it needs {TLS_FLAGS}")
        if args.insecure:
            return None
        why = plaintext_refusal(side, host)
        if why:
            raise TlsError(why)
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise TlsError(f"--tls-cert, --tls-key and --tls-ca go together: {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} missing")
    if args.insecure:
        raise TlsError("--insecure turns TLS off: give it or the --tls-* flags, not both")
    cfg = TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, allow=allow,
                    peer_name=(dest_name or host) if side == "source" else "")
    cfg.check()
    return cfg


# -- the source's first connection --------------------------------------------------
def check_destination(target: str, tls: TlsConfig | None, timeout: float) -> None:
    """One connection to the destination's gRPC port before gRPC's own: raises
    TlsError saying why the two ends cannot talk (its certificate not trusted,
    expired, or naming another host; this source's certificate refused; TLS
    on one end only). Returns when they can, when nothing answers within
    timeout (gRPC's wait then says so), or when what answers is not plainly
    one of those cases (gRPC then has its say)."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            break
        except OSError:
            # the destination agent may still be starting: as gRPC would, try again
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)
    with sock:
        sock.settimeout(5.0)
        if tls is None:
            _check_plaintext(sock, target)
        else:
            _check_tls(sock, target, tls)


def _check_plaintext(sock: socket.socket, target: str) -> None:
    try:
        sock.sendall(_H2_PREFACE)
        head = sock.recv(9)
    except TimeoutError:
        return
    except OSError as e:
        if e.errno not in (errno.ECONNRESET, errno.EPIPE):
            return
        head = b""
    if len(head) >= 4 and head[3] == _H2_SETTINGS:
        return
    if not head or head[0] == _TLS_ALERT:
        raise TlsError(f"the destination at {target} takes TLS only and this source was started without it: "
                       f"pass {TLS_FLAGS} ({CERTS_HINT})")


def _check_tls(sock: socket.socket, target: str, tls: TlsConfig) -> None:
    name = tls.peer_name or target.rpartition(":")[0].strip("[]")
    try:
        conn = tls.client_context().wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as e:
        code = e.verify_code
        if code in _NAME_MISMATCH:
            raise TlsError(f"the destination at {target} has a certificate that does not name {name!r}: pass "
                           "--dest-name NAME with the name it carries") from None
        if code == _EXPIRED:
            raise TlsError(f"the destination at {target} has an expired certificate: it needs a new one") from None
        if code == _NOT_YET_VALID:
            raise TlsError(f"the destination at {target} has a certificate that is not valid yet: check the two "
                           "hosts' clocks") from None
        raise TlsError(f"the destination at {target} has a certificate this source does not trust "
                       f"({e.verify_message}): it must be signed by a CA in --tls-ca {tls.ca}") from None
    except ssl.SSLError as e:
        if e.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                        "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING") or isinstance(e, ssl.SSLEOFError):
            raise TlsError(f"the destination at {target} does not speak TLS (it was started without "
                           "--tls-cert): start both agents with TLS") from None
        if e.reason == "TLSV1_ALERT_PROTOCOL_VERSION":
            raise TlsError(f"the destination at {target} does not take TLS 1.3: run the same migrate release "
                           "on both hosts") from None
        raise TlsError(f"TLS with the destination at {target} failed: {_reason(e)}") from None
    except (TimeoutError, ConnectionError):
        return
    with conn:
        # TLS 1.3: the destination checks this source's certificate after the
        # handshake is over on this side, and closes without a word when it
        # does not take it; when it does, its HTTP/2 SETTINGS come first
        try:
            head = conn.recv(9)
        except TimeoutError:
            return
        except ssl.SSLError as e:
            raise TlsError(f"the destination at {target} refused this source's certificate ({_reason(e)}): it "
                           "must be signed by a CA in the destination's --tls-ca and be valid now") from None
        except ConnectionError:
            head = b""
        if not head:
            raise TlsError(f"the destination at {target} refused this source's certificate (--tls-cert "
                           f"{tls.cert}): it must be signed by a CA in the destination's --tls-ca and be valid "
                           "now") from None

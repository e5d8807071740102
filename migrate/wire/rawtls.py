"""Mutual TLS 1.3 on the plain TCP demand and push channels.

The C side (native/tls.c) does TLS with the system's OpenSSL, resolved at run
time, and binds each channel's session to its socket's fd: the C loops that
serve the channels (GIL released) read and write through it by fd. Here: the
context an agent builds once from its TlsConfig, the handshake that turns a
connected socket into a `TlsSocket`, and that socket, whose recv/sendall (the
magic+token hello, done in Python) go through the session and whose close
drops it before the fd is closed.

Who is who: the destination accepts the channels (the TLS server) and takes a
source whose certificate names one of its `allow` (any the CA signed when
empty); the source (the client) checks the destination's certificate against
the name it dialled (`peer_name`, else the host of its target).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl  # noqa: F401  loads libssl.so.3 and libcrypto.so.3 into the process: the C resolves from them

from migrate._binding import ffi, lib
from migrate.errors import MigrateError
from migrate.wire.tls import TlsConfig


class TlsError(MigrateError):
    """TLS credentials that cannot be loaded, or a handshake refused."""


def _load() -> None:
    why = ffi.new("char[]", lib.MG_TLS_REASON)
    if lib.mg_tls_load(why, lib.MG_TLS_REASON) < 0:
        raise TlsError(f"TLS on the raw channels needs OpenSSL 3 (libssl.so.3): {ffi.string(why).decode()}")


class RawTls:
    """One agent's TLS context for its raw channels: server=True for the
    destination (it accepts them), False for the source. Lives as long as the
    agent; close() frees it."""

    def __init__(self, cfg: TlsConfig, *, server: bool):
        _load()
        self.cfg = cfg
        self.server = server
        why = ffi.new("char[]", lib.MG_TLS_REASON)
        ctx = lib.mg_tls_ctx_new(int(server), cfg.cert.encode(), cfg.key.encode(), cfg.ca.encode(), why,
                                 lib.MG_TLS_REASON)
        if ctx == ffi.NULL:
            raise TlsError(ffi.string(why).decode())
        self._ctx = ffi.gc(ctx, lib.mg_tls_ctx_free)

    def handshake(self, sock: socket.socket, timeout: float, peer_name: str = "") -> TlsSocket:
        """The TLS handshake on connected sock (GIL released), within timeout
        seconds. Returns the TlsSocket that replaces sock (sock itself is
        detached from its fd). Raises TlsError saying what was refused; sock
        is then still the caller's to close."""
        name = peer_name or self.cfg.peer_name
        stage = ffi.new("int *")
        why = ffi.new("char[]", lib.MG_TLS_REASON)
        rc = lib.mg_tls_handshake(self._ctx, sock.fileno(), name.encode(), "\n".join(self.cfg.allow).encode(),
                                  int(timeout * 1000), stage, why, lib.MG_TLS_REASON)
        if rc < 0:
            raise TlsError(self._refused(-rc, stage[0], ffi.string(why).decode(), timeout, name))
        return TlsSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def _refused(self, err: int, stage: int, why: str, timeout: float, name: str) -> str:
        """The one place a failed handshake becomes a message."""
        peer = "the source" if self.server else "the destination"
        if err == errno.ETIMEDOUT:
            return f"TLS handshake: no answer from {peer} within {timeout:g} s"
        if err == errno.EPROTO and stage == lib.MG_TLS_STAGE_VERIFY:
            return f"TLS handshake: {peer}'s certificate was refused: {why} (checked against --tls-ca {self.cfg.ca})"
        if err == errno.EPROTO and stage == lib.MG_TLS_STAGE_NAME:
            return (f"TLS handshake: {peer}'s certificate ({why}) names none of --allow-source "
                    f"{', '.join(self.cfg.allow)}")
        if " alert " in why:
            # the peer refused us: OpenSSL names the alert it sent ("sslv3 alert certificate expired")
            alert = why.split(" alert ", 1)[1]
            return (f"TLS handshake: {peer} refused it with the alert \"{alert}\" (does it trust the CA that "
                    f"signed --tls-cert {self.cfg.cert}, and is that certificate valid now?)")
        if stage == lib.MG_TLS_STAGE_ACCEPT and err in (errno.ECONNRESET, errno.EPIPE):
            return (f"TLS handshake: {peer} closed the connection without accepting this source (is the name "
                    f"in --tls-cert {self.cfg.cert} one of its --allow-source?)")
        if err == errno.EPROTO:
            return f"TLS handshake with {peer} failed: {why} (does it serve TLS, with a certificate of --tls-ca?)"
        if err in (errno.ECONNRESET, errno.EPIPE):
            return f"TLS handshake: {peer} closed the connection (does it serve TLS, with a certificate of --tls-ca?)"
        if err == errno.EINVAL:
            return f"TLS handshake: {why}"
        return f"TLS handshake: {os.strerror(err)}"

    def close(self) -> None:
        ffi.release(self._ctx)


class TlsSocket(socket.socket):
    """A channel's socket once its TLS session is up: the C channel loops
    find the session by fileno(); recv, sendall and send go through it; a
    shutdown of the write side sends close_notify first; close drops the
    session before the fd goes (a later socket given the same fd number is
    plain). Every other socket call (options, tcp_info, shutdown) is the
    socket's own."""

    def _timeout_ms(self) -> int:
        t = self.gettimeout()
        return -1 if t is None else int(t * 1000)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags:
            raise ValueError("TlsSocket.recv takes no flags")
        buf = ffi.new("uint8_t[]", max(1, bufsize))
        n = lib.mg_tls_recv_some(self.fileno(), buf, bufsize, self._timeout_ms())
        if n < 0:
            if n == -errno.ETIMEDOUT:
                raise TimeoutError("timed out")
            raise OSError(-n, os.strerror(-n))
        return bytes(ffi.buffer(buf, n))

    def sendall(self, data, flags: int = 0) -> None:
        if flags:
            raise ValueError("TlsSocket.sendall takes no flags")
        data = bytes(data)
        rc = lib.mg_tls_send_all(self.fileno(), data, len(data), self._timeout_ms())
        if rc < 0:
            if rc == -errno.ETIMEDOUT:
                raise TimeoutError("timed out")
            raise OSError(-rc, os.strerror(-rc))

    def send(self, data, flags: int = 0) -> int:
        self.sendall(data, flags)
        return len(data)

    def shutdown(self, how: int) -> None:
        # Only the side that writes ends its stream this way (the source's
        # push, once its pages are sent): SHUT_RDWR stops a channel from
        # another thread, which must not wait on a writer inside the session.
        if how == socket.SHUT_WR and self.fileno() >= 0:
            lib.mg_tls_close_notify(self.fileno(), 1000)
        super().shutdown(how)

    def peer_subject(self) -> str:
        """The peer certificate's subject ("/CN=host"), for events."""
        out = ffi.new("char[]", 256)
        lib.mg_tls_peer_subject(self.fileno(), out, 256)
        return ffi.string(out).decode(errors="replace")

    def peer_is(self, name: str) -> bool:
        """Whether the peer certificate carries name (a DNS SAN, else its CN),
        as --allow-source and gRPC's peer identity read it."""
        return lib.mg_tls_peer_is(self.fileno(), name.encode()) == 1

    def _real_close(self, *args):
        fd = self.fileno()
        if fd >= 0:
            lib.mg_tls_unbind(fd)
        super()._real_close(*args)

    def __del__(self) -> None:
        # a TlsSocket dropped unclosed still unbinds before its fd goes
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

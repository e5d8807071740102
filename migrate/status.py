"""What a running agent says about itself: the status snapshot that
`migrate status` prints (human text or JSON), the live progress line drawn on
a terminal, the local control socket a source agent answers status on, and
the clients `migrate status` asks with (a UNIX socket, or gRPC).

The snapshot of one migration is a flat dict, the same keys on both sides:

| key | meaning |
| --- | --- |
| `state` | attached, connected, running, paused, completed or failed |
| `session`, `peer` | the session id (never its token) and who is on the other end |
| `pages_total`, `pages_received`, `pages_demand`, `pages_pushed`, `pages_zero` | page counts (a source counts pages sent as received) |
| `gbps`, `eta_s` | guest RAM moved per second since the source connected, and the time left at that rate |
| `faults`, `faults_fast`, `faults_demand`, `fault_p50_us`, `fault_p99_us` | the guest's faults, those answered at once, those that waited for the source, and that wait |
| `vcpus` | per guest thread that waited for the source: `tid`, `vcpu` (an index where known), `faults`, `blocked_s` |
| `precopy_rounds` | `source --precopy` only: its last three `round` events (docs/precopy.md) |

The control socket speaks the attach framing (`[u32 BE length][JSON]`): the
request `{"request": "status"}`, the answer `{"ok": true, "status": {...}}`
(a `source --precopy` also takes `{"request": "switch"}`: switch after the
current round).
It lives in a private directory (0700) as a 0600 socket, and both ends ask the
kernel who is on the other (SO_PEERCRED): root or the same uid only.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import threading

from migrate.errors import MigrateError

# the states `migrate status` reports (the words), in order
STATES = ("attached", "connected", "running", "paused", "completed", "failed")
MAX_REQUEST = 4 << 10        # a status request is a few bytes
MAX_REPLY = 4 << 20          # a status answer: many migrations of up to 64 threads each
CONTROL_TIMEOUT = 2.0        # s a control connection may take to say its request
_UCRED = struct.Struct("3i")


class StatusError(MigrateError):
    """A status query that got no answer."""


def rate_and_eta(received: int, total: int, page_size: int, seconds: float) -> tuple[float, float | None]:
    """GB/s of guest RAM since the source connected, and the seconds left at
    that rate (None when nothing moved yet)."""
    if seconds <= 0 or received <= 0:
        return 0.0, None
    gbps = received * page_size / seconds / 1e9
    per_page = seconds / received
    return round(gbps, 3), round(max(0, total - received) * per_page, 1)


def peer_uid(sock: socket.socket) -> int:
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _send(sock: socket.socket, obj: dict) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv(sock: socket.socket, limit: int, what: str) -> dict:
    head = _recv_exact(sock, 4, what)
    (n,) = struct.unpack(">I", head)
    if n > limit:
        raise StatusError(f"{what} of {n} bytes: at most {limit} are taken")
    try:
        obj = json.loads(_recv_exact(sock, n, what))
    except (UnicodeDecodeError, ValueError) as e:
        raise StatusError(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise StatusError(f"{what} is not a JSON object")
    return obj


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise StatusError(f"{what}: connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def query(path: str, request: dict, timeout: float = 5.0) -> dict:
    """Asks the agent listening on the UNIX socket at path (a destination's
    attach socket or a source's control socket) and returns its status. The
    listener must run as root or as our uid (SO_PEERCRED), as the guest ends
    require of an agent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise StatusError(f"cannot reach an agent on {path}: {e.strerror} (is the agent running, and is this "
                              "the socket it announced?)") from None
        uid = peer_uid(sock)
        if not _trusted(uid):
            raise StatusError(f"{path} is served by uid {uid}, neither root nor ours: not asking it")
        try:
            _send(sock, request)
            reply = _recv(sock, MAX_REPLY, f"answer from {path}")
        except OSError as e:
            raise StatusError(f"status from {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise StatusError(f"{path}: {reply.get('error') or 'refused the status request'}")
    status = reply.get("status")
    if not isinstance(status, dict):
        raise StatusError(f"{path} answered without a status")
    return status


def query_grpc(target: str, tls, timeout: float = 10.0) -> dict:
    """A destination's status over its gRPC port (the Status call), with the
    TLS of a source (tls: a migrate.wire.tls.TlsConfig, None: plaintext)."""
    import grpc

    from migrate.proto import migration_pb2 as pb
    from migrate.proto import migration_pb2_grpc as pbg
    from migrate.wire.protocol import channel

    ch = channel(target, "status", tls)
    try:
        reply = pbg.MigrationStub(ch).Status(pb.StatusRequest(), timeout=timeout)
    except grpc.RpcError as e:
        raise StatusError(f"{target}: {e.code().name}: {e.details()}") from None
    finally:
        ch.close()
    try:
        status = json.loads(reply.json)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        raise StatusError(f"{target} answered Status with something that is not a JSON object")
    return status


def default_control_path() -> str:
    """Where a source's control socket goes unless `source --control` says:
    a private directory of this user under $XDG_RUNTIME_DIR, else /run for
    root (nobody else may create there), else /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 and os.path.isdir("/run") else "/tmp")
    return os.path.join(base, f"migrate-{os.geteuid()}", f"source-{os.getpid()}.sock")


def _private_dir(d: str) -> None:
    """d exists as a directory of ours that nobody else may enter (created
    0700 when missing): whoever can write it could take the socket's path."""
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise StatusError(f"{d}, the control socket's directory, must be a directory of uid {os.geteuid()} with mode "
                          "0700 (it is not): give --control a path in a private directory (a missing one is created)")


class ControlSocket:
    """A source's control socket: answers status requests from root or its own
    uid, one at a time, each within CONTROL_TIMEOUT. Owns the socket file and
    removes it on close(). snapshot() gives the status to answer."""

    def __init__(self, path: str, snapshot, actions: dict | None = None):
        self.path = path
        self.snapshot = snapshot
        # requests beyond status, name -> fn() returning the answer's fields
        # (source --precopy: "switch")
        self.actions = actions or {}
        _private_dir(os.path.dirname(os.path.abspath(path)))
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StatusError(f"{path} exists and is not a socket: give --control another path")
            os.unlink(path)   # (a dead source's: our own directory)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)
            self.sock.listen(8)
        except OSError as e:
            self.sock.close()
            raise StatusError(f"control socket {path}: {e.strerror}") from None
        self.closing = False
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> "ControlSocket":
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return   # closed
            with conn:
                try:
                    self._answer(conn)
                except StatusError as e:   # a request too long, or not JSON: say so
                    try:
                        _send(conn, {"ok": False, "error": str(e)})
                    except OSError:
                        pass
                except OSError:
                    pass   # the asker's problem (silent past CONTROL_TIMEOUT, or gone): it sees the end

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(CONTROL_TIMEOUT)
        if not _trusted(peer_uid(conn)):
            # its request is read (and dropped) first, so that it reads the
            # refusal rather than a reset (a socket closed with bytes unread)
            try:
                _recv(conn, MAX_REQUEST, "control request")
            except StatusError:
                pass
            _send(conn, {"ok": False, "error": "not authorised: this socket answers root and its own uid only"})
            return
        req = _recv(conn, MAX_REQUEST, "control request")
        action = self.actions.get(req.get("request"))
        if action is not None:
            _send(conn, {"ok": True, "status": action()})
            return
        if req.get("request") != "status":
            _send(conn, {"ok": False, "error": f"unknown request {str(req.get('request'))[:40]!r}: "
                         "this socket answers {\"request\": \"status\"}"})
            return
        _send(conn, {"ok": True, "status": self.snapshot()})

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# -- text -----------------------------------------------------------------
def _eta(s) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(m: dict) -> str:
    """The live line: percent received, GB/s, ETA, demand faults, fault p99."""
    total = m.get("pages_total") or 1
    pct = 100.0 * m.get("pages_received", 0) / total
    line = (f"{m.get('state', '?')} {pct:5.1f}%  {m.get('gbps', 0):.2f} GB/s  ETA {_eta(m.get('eta_s'))}  "
            f"demand faults {m.get('faults_demand', 0)}")
    if "fault_p99_us" in m:   # (a source does not see how long a fault waited)
        line += f"  p99 {m['fault_p99_us']:.0f} us"
    return line


def render(status: dict) -> str:
    """`migrate status` as text: the agent, then a block per migration."""
    head = f"{status.get('role', 'agent')} agent pid {status.get('pid', '?')}"
    if status.get("listen"):
        head += f", listening on {status['listen']}"
    lines = [head]
    migrations = status.get("migrations") or []
    moved = "sent" if status.get("role") == "source" else "received"
    if not migrations:
        lines.append("  no migration")
    for m in migrations:
        lines += [f"session {m.get('session') or '-'}: {m.get('state')}, peer {m.get('peer') or '-'}",
                  f"  pages: {m.get('pages_received', 0)} of {m.get('pages_total', 0)} {moved} "
                  f"({m.get('pages_demand', 0)} demand, {m.get('pages_pushed', 0)} pushed" +
                  (f", {m['pages_zero']} zero)" if "pages_zero" in m else ")"),
                  f"  {m.get('gbps', 0)} GB/s, ETA {_eta(m.get('eta_s'))}, {m.get('seconds', 0)} s since the source "
                  "connected",
                  f"  faults: {m.get('faults', 0)} ({m.get('faults_fast', 0)} fast, {m.get('faults_demand', 0)} "
                  f"waited for the source: p50 {m.get('fault_p50_us', 0)} us, p99 {m.get('fault_p99_us', 0)} us)"
                  if "faults" in m else   # (a source sees the requests, not the faults)
                  f"  demand requests served: {m.get('faults_demand', 0)}"]
        for v in m.get("vcpus") or []:
            who = f"vCPU {v['vcpu']}" if v.get("vcpu") is not None else "thread"
            lines.append(f"  {who} (tid {v.get('tid')}): blocked {v.get('blocked_s', 0)} s over "
                         f"{v.get('faults', 0)} faults")
    return "\n".join(lines)


class ProgressTicker:
    """Draws progress_line(snapshot()) on stderr every `every` s while it is a
    terminal (Reporter.status_line); nothing otherwise."""

    def __init__(self, reporter, snapshot, every: float = 0.5):
        self.reporter = reporter
        self.snapshot = snapshot
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress-line", daemon=True)

    @staticmethod
    def wanted() -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def start(self) -> "ProgressTicker":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                m = self.snapshot()
            except Exception:   # a snapshot racing the end of a migration: skip a beat
                continue
            if m is not None:
                self.reporter.status_line(progress_line(m))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.reporter.status_line("")


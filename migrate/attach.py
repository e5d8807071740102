"""Attach: the guest side hands its userfaultfd, RAM file and regions to the
destination agent over a UNIX socket (docs/attach-protocol.md).

Guest side: `attach_guest()`. Agent side: `AttachListener.accept()` returns an
`AttachedGuest` holding the received descriptors; the agent registers the
ranges, then `ack()`s (or `nack()`s with a reason the guest prints).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from migrate._binding import ffi, lib
from migrate.errors import AttachError

ATTACH_VERSION = 1
_MAX_HELLO = 1 << 20


@dataclass(frozen=True)
class Region:
    guest_addr: int   # host virtual address in the guest process
    length: int
    offset: int       # offset in the RAM file


def _send_msg(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    body = json.dumps(obj).encode()
    data = struct.pack(">I", len(body)) + body
    if fds:
        c_fds = ffi.new("int[]", list(fds))
        while True:
            select.select([], [sock], [], sock.gettimeout())
            n = lib.mg_send_fds(sock.fileno(), data, len(data), c_fds, len(fds))
            if n != -errno.EAGAIN:
                break
        if n < 0:
            raise AttachError(f"send attach message with {len(fds)} descriptors: {os.strerror(-n)}")
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AttachError(f"attach socket closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _recv_msg(sock: socket.socket, want_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    head = b""
    if want_fds:
        buf = ffi.new("char[]", 65536)
        c_fds = ffi.new("int[]", 8)
        nfds = ffi.new("int *")
        while True:
            # A socket with a Python timeout is non-blocking underneath: wait here.
            ready, _, _ = select.select([sock], [], [], sock.gettimeout())
            if not ready:
                raise AttachError(f"no attach message within {sock.gettimeout()} s")
            n = lib.mg_recv_fds(sock.fileno(), buf, 65536, c_fds, 8, nfds)
            if n != -errno.EAGAIN:
                break
        if n < 0:
            raise AttachError(f"receive attach message: {os.strerror(-n)}")
        if n == 0:
            raise AttachProbe("attach socket closed before the hello")
        fds = [c_fds[i] for i in range(nfds[0])]
        head = ffi.buffer(buf, n)[:]
    try:
        if len(head) < 4:
            head += _recv_exact(sock, 4 - len(head))
        (length,) = struct.unpack(">I", head[:4])
        if length > _MAX_HELLO:
            raise AttachError(f"attach message of {length} bytes is larger than the limit {_MAX_HELLO}")
        body = head[4:]
        if len(body) < length:
            body += _recv_exact(sock, length - len(body))
        try:
            return json.loads(body[:length]), fds
        except ValueError as e:
            raise AttachError(f"attach message is not JSON: {e}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def attach_guest(path: str, uffd_fd: int, ram_fd: int, *, page_size: int, ram_size: int,
                 regions: list[Region], backing: str = "", name: str = "",
                 timeout: float | None = None, reattach: bool = False) -> socket.socket:
    """Guest side. Returns the connected socket after a good ack; keep it open for
    the guest's life. The caller keeps its own uffd_fd and ram_fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise AttachError(f"connect to the agent's attach socket {path}: {e.strerror}; "
                          "is `migrate dest --attach` running?") from None
    hello = {"version": ATTACH_VERSION, "pid": os.getpid(), "page_size": page_size, "ram_size": ram_size,
             "regions": [r.__dict__ for r in regions], "backing": backing, "name": name, "reattach": reattach}
    try:
        _send_msg(sock, hello, [uffd_fd, ram_fd])
        ack, _ = _recv_msg(sock)
    except OSError as e:
        sock.close()
        raise AttachError(f"attach to {path}: the agent closed the connection ({e.strerror or e})") from None
    except BaseException:
        sock.close()
        raise
    if not ack.get("ok"):
        sock.close()
        raise AttachError(f"the agent refused the attach: {ack.get('error', 'no reason given')}")
    sock.settimeout(None)
    return sock


class GuestLink:
    """The guest side of an attach that outlives its agent.

    Keeps the socket, watches the agent's messages in a thread, and if the
    agent dies before saying "complete" attaches the same userfaultfd and RAM
    file to whichever agent listens on the path next (reattach). Meanwhile the
    vCPUs that fault simply stay blocked in the kernel."""

    def __init__(self, path: str, uffd_fd: int, ram_fd: int, *, page_size: int, ram_size: int,
                 regions: list[Region], backing: str = "", name: str = "", reporter=None,
                 reattach_timeout: float = 300.0):
        self.args = dict(page_size=page_size, ram_size=ram_size, regions=regions, backing=backing, name=name)
        self.path, self.uffd_fd, self.ram_fd = path, uffd_fd, ram_fd
        self.reporter = reporter
        self.reattach_timeout = reattach_timeout
        self.switchover = threading.Event()
        self.complete = threading.Event()
        self.gone = threading.Event()      # the agent died and none came back in time
        self.reattaches = 0
        self.final: dict = {}              # the agent's "complete" message: how pages arrived
        self.sock = attach_guest(path, uffd_fd, ram_fd, timeout=60, **self.args)
        self._thread = threading.Thread(target=self._watch, name="attach-watch", daemon=True)
        self._thread.start()

    def _event(self, name: str, message: str) -> None:
        if self.reporter is not None:
            self.reporter.event(name, message)

    def _watch(self) -> None:
        while True:
            try:
                while True:
                    msg, _ = _recv_msg(self.sock)
                    if msg.get("event") == "switchover":
                        self.switchover.set()
                    elif msg.get("event") == "complete":
                        self.final = msg
                        self.complete.set()
            except (AttachError, OSError):
                pass  # end of file
            if self.complete.is_set():
                return
            self._event("agent_lost", "the agent went away before the end; vCPUs that fault wait for another")
            self.sock.close()
            deadline = time.monotonic() + self.reattach_timeout
            while True:
                try:
                    self.sock = attach_guest(self.path, self.uffd_fd, self.ram_fd, timeout=10, reattach=True,
                                             **self.args)
                    break
                except AttachError:
                    if time.monotonic() > deadline:
                        self.gone.set()
                        return
                    time.sleep(0.2)
            self.reattaches += 1
            self._event("reattached", f"attached again to the agent at {self.path}")

    def wait_switchover(self, timeout: float) -> bool:
        return self.switchover.wait(timeout)

    def wait_complete(self, timeout: float) -> bool:
        return self.complete.wait(timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass
class AttachedGuest:
    """What the agent received. Owns uffd_fd, ram_fd and the socket until close()."""
    sock: socket.socket
    uffd_fd: int
    ram_fd: int
    pid: int
    page_size: int
    ram_size: int
    regions: list[Region]
    backing: str = ""
    name: str = ""
    reattach: bool = False
    acked: bool = field(default=False)

    def ack(self) -> None:
        _send_msg(self.sock, {"ok": True})
        self.acked = True

    def notify(self, event: str, **fields) -> None:
        """After the ack the agent may tell the guest side more, in the same
        framing: {"event": "switchover"} once a source is serving pages,
        {"event": "complete", ...counts} at the end."""
        try:
            _send_msg(self.sock, {"event": event, **fields})
        except OSError:
            pass  # the guest went away; the monitor thread reports it

    def nack(self, error: str) -> None:
        try:
            _send_msg(self.sock, {"ok": False, "error": error})
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.uffd_fd, self.ram_fd):
            if fd >= 0:
                os.close(fd)
        self.uffd_fd = self.ram_fd = -1
        self.sock.close()


def _parse_hello(hello: dict, fds: list[int]) -> dict:
    if len(fds) != 2:
        raise AttachError(f"attach hello carried {len(fds)} descriptors, expected 2 (userfaultfd, RAM file)")
    if hello.get("version") != ATTACH_VERSION:
        raise AttachError(f"attach protocol version {hello.get('version')!r}, this agent speaks {ATTACH_VERSION}")
    try:
        ps = int(hello["page_size"])
        size = int(hello["ram_size"])
        regions = [Region(int(r["guest_addr"]), int(r["length"]), int(r["offset"])) for r in hello["regions"]]
    except (KeyError, TypeError, ValueError) as e:
        raise AttachError(f"attach hello is missing or has a bad field: {e}") from None
    if ps <= 0 or ps & (ps - 1):
        raise AttachError(f"attach hello page_size {ps} is not a power of two")
    if not regions:
        raise AttachError("attach hello lists no regions")
    for r in regions:
        if r.guest_addr % ps or r.length % ps or r.offset % ps or r.length <= 0:
            raise AttachError(f"region {r} is not aligned to the page size {ps}")
        if r.offset + r.length > size:
            raise AttachError(f"region {r} ends past the RAM size {size}")
    return {"pid": int(hello.get("pid", 0)), "page_size": ps, "ram_size": size, "regions": regions,
            "backing": str(hello.get("backing", "")), "name": str(hello.get("name", "")),
            "reattach": bool(hello.get("reattach", False))}


def _answers(path: str) -> bool:
    """Someone accepts connections on the UNIX socket at path (a probe: it
    connects and closes without a word, which an agent takes silently)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False    # nobody listens (its agent died), or it is gone already
    except TimeoutError:
        return True     # its backlog is full: an agent that takes no attaches, but is there
    except OSError as e:
        raise AttachError(f"cannot tell whether an agent listens on {path}: {e.strerror}") from None
    finally:
        probe.close()


class AttachProbe(AttachError):
    """A connection closed before sending anything (another agent checking
    whether this socket is live): not an attach, nothing to report."""


class AttachListener:
    """The agent's UNIX socket. Owns the socket file and removes it on close()."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):
            # a stale socket from a dead agent: only replace a socket, never a
            # file, and never the socket of an agent that still answers on it
            # (its guest re-attaches there if that agent dies)
            import stat
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AttachError(f"{path} exists and is not a socket: choose another --attach path")
            if _answers(path):
                raise AttachError(f"another agent is listening on {path}: stop it, or choose another --attach path")
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            self.sock.listen(16)
        except OSError as e:
            self.sock.close()
            raise AttachError(f"attach socket {path}: {e.strerror}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> AttachedGuest:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        try:
            hello, fds = _recv_msg(conn, want_fds=2)
        except BaseException:
            conn.close()
            raise
        try:
            h = _parse_hello(hello, fds)
        except AttachError as e:
            for fd in fds:
                os.close(fd)
            try:
                _send_msg(conn, {"ok": False, "error": str(e)})
            finally:
                conn.close()
            raise
        conn.settimeout(None)
        return AttachedGuest(conn, fds[0], fds[1], **h)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

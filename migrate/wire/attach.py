"""The attach protocol (docs/attach-protocol.md) as both of its ends speak it:
length-prefixed JSON messages over a UNIX socket, file descriptors passed
with SCM_RIGHTS, and the guest's end (`attach_guest`, `GuestLink`) that
guestsim and the tests use. The agent's end is migrate.dest.attach; the
shim (native/shim.c) is the other guest end, in C.

Who is on the other end is asked of the kernel (SO_PEERCRED), never of the
peer: `peer_cred` here, and `trusted_listener`, the rule by which a guest
end (and the QMP client) decides whether the process listening on a
socket may have what it is about to send.
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
from dataclasses import dataclass

from migrate._binding import ffi, lib
from migrate.errors import AttachError

ATTACH_VERSION = 1
# The largest attach message either end takes: a hello lists a handful of
# regions, an event a few counts. Checked on the length prefix, before the
# body is read.
_MAX_HELLO = 64 << 10


@dataclass(frozen=True)
class Region:
    guest_addr: int   # host virtual address in the guest process
    length: int
    offset: int       # offset in the RAM file


@dataclass(frozen=True)
class PeerCred:
    """The process on the other end of a UNIX socket, as the kernel recorded it
    when that end called connect() or listen() (SO_PEERCRED): its pid in our pid
    namespace and its effective uid and gid."""
    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_cred(sock: socket.socket) -> PeerCred:
    return PeerCred(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def trusted_listener(cred: PeerCred) -> bool:
    """The one rule of the guest ends (guestsim, the shim in C, the QMP client):
    what this process hands over or says goes only to a process running as
    root or as our own uid. Anyone else could only be on the path because a
    directory let them bind there (a dead agent's path taken over)."""
    return cred.uid in (0, os.geteuid())


class UntrustedAgent(AttachError):
    """The attach socket is served by a process of another uid (not root): the
    guest's userfaultfd and RAM are not handed to it."""


class AttachProbe(AttachError):
    """A connection closed before sending anything (another agent checking
    whether this socket is live): not an attach, nothing to report."""


def send_msg(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
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


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AttachError(f"attach socket closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_msg(sock: socket.socket, want_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    head = b""
    if want_fds:
        buf = ffi.new("char[]", _MAX_HELLO)
        c_fds = ffi.new("int[]", 8)
        nfds = ffi.new("int *")
        while True:
            # A socket with a Python timeout is non-blocking underneath: wait here.
            ready, _, _ = select.select([sock], [], [], sock.gettimeout())
            if not ready:
                raise AttachError(f"no attach message within {sock.gettimeout()} s")
            n = lib.mg_recv_fds(sock.fileno(), buf, _MAX_HELLO, c_fds, 8, nfds)
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
            head += recv_exact(sock, 4 - len(head))
        (length,) = struct.unpack(">I", head[:4])
        if length > _MAX_HELLO:
            raise AttachError(f"attach message of {length} bytes is larger than the limit {_MAX_HELLO}")
        body = head[4:]
        if len(body) < length:
            body += recv_exact(sock, length - len(body))
        if len(body) > length:
            raise AttachError(f"attach message of {length} bytes is followed by {len(body) - length} more before "
                              "its answer: one message at a time")
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise AttachError(f"attach message is not JSON: {e}") from None
        if not isinstance(msg, dict):
            raise AttachError(f"attach message is JSON {type(msg).__name__}, not an object")
        return msg, fds
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
    # Before a byte (and above all the descriptors) goes out: whoever listens
    # on the path now gets the guest's userfaultfd and all of its RAM.
    agent = peer_cred(sock)
    if not trusted_listener(agent):
        sock.close()
        me = os.geteuid()
        raise UntrustedAgent(f"the attach socket {path} is served by pid {agent.pid} of uid {agent.uid}, which is "
                             f"neither root nor this guest's uid {me}: not handing it the guest's userfaultfd and "
                             f"RAM (another user took the path over?); run `migrate dest` as root or as uid {me}, "
                             "in a directory only it can enter")
    hello = {"version": ATTACH_VERSION, "pid": os.getpid(), "page_size": page_size, "ram_size": ram_size,
             "regions": [r.__dict__ for r in regions], "backing": backing, "name": name, "reattach": reattach}
    try:
        send_msg(sock, hello, [uffd_fd, ram_fd])
        ack, _ = recv_msg(sock)
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
        self.refused: list[str] = []       # untrusted agents met while re-attaching, each said once
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
                    msg, _ = recv_msg(self.sock)
                    if msg.get("event") == "switchover":
                        self.switchover.set()
                    elif msg.get("event") == "complete":
                        self.final = msg
                        self.complete.set()
                        # every page is here: a guest still waiting to be
                        # released runs now (an agent may have completed
                        # before it could send switchover)
                        self.switchover.set()
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
                except AttachError as e:
                    # An untrusted listener is said once, and the guest goes on
                    # trying: once it is gone, a real agent may listen there.
                    if isinstance(e, UntrustedAgent) and str(e) not in self.refused:
                        self.refused.append(str(e))
                        self._event("attach_refused", str(e))
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

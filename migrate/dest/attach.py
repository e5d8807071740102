"""The agent's end of the attach protocol: the listening UNIX socket, a
liveness probe so that a second agent never takes over a live one's socket,
and `AttachedGuest`, the descriptors and regions one guest handed over.

Who may attach (docs/attach-protocol.md, "Who checks what"): the socket
lives in a directory only the agent's user can enter (`private_dir`), it is
0600, and each guest's uid is read from the kernel (SO_PEERCRED) and must be
the agent's own or one given with `dest --attach-uid`."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

from migrate.errors import AttachError
from migrate.wire.attach import _MAX_HELLO, ATTACH_VERSION, Region, peer_cred, recv_exact, recv_msg, send_msg


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
    accepted_at: float = 0.0    # time.monotonic() when its connection was taken (0: unknown)
    acked: bool = field(default=False)

    def ack(self) -> None:
        send_msg(self.sock, {"ok": True})
        self.acked = True

    def notify(self, event: str, **fields) -> None:
        """After the ack the agent may tell the guest side more, in the same
        framing: {"event": "switchover"} once a source is serving pages,
        {"event": "complete", ...counts} at the end."""
        try:
            send_msg(self.sock, {"event": event, **fields})
        except OSError:
            pass  # the guest went away; the monitor thread reports it

    def nack(self, error: str) -> None:
        try:
            send_msg(self.sock, {"ok": False, "error": error})
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.uffd_fd, self.ram_fd):
            if fd >= 0:
                os.close(fd)
        self.uffd_fd = self.ram_fd = -1
        self.sock.close()


GUEST_INSTANCE_CHARS = 32   # hex digits of a guest_instance()


def guest_instance(pid: int, ram_fd: int) -> str:
    """Which guest this is, the same on every agent it attaches to and on no
    other guest: this boot, the guest process (its pid and its start time,
    so that a reused pid is another guest) and its RAM file (device and
    inode), hashed. A source recovering a lost session names it
    (Hello.resume_guest) so that its RAM goes into that guest only, never into
    another guest of the same size."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 22, starttime; the name (field 2) may hold spaces and ')'
            start = f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        start = "?"   # (then the boot, pid and RAM file still tell guests apart)
    st = os.fstat(ram_fd)
    return hashlib.sha256(f"{boot}/{pid}/{start}/{st.st_dev}/{st.st_ino}".encode()).hexdigest()[:GUEST_INSTANCE_CHARS]


@dataclass
class StatusRequest:
    """`migrate status --attach SOCKET`: a process of root or the agent's own
    uid asking what the agent does (docs/attach-protocol.md, "Status"). The
    agent answers once and closes; owns the socket until then."""
    sock: socket.socket
    pid: int

    def answer(self, status: dict) -> None:
        try:
            send_msg(self.sock, {"ok": True, "status": status})
        except OSError:
            pass   # the asker went away
        finally:
            self.sock.close()


def _status_request(conn: socket.socket, asker, hello: dict, fds: list[int]) -> StatusRequest:
    """A hello asking for the status: it carries no descriptors and comes from
    root or the agent's own uid (an --attach-uid may attach its guests, not
    read about every guest here). Else AttachError, after a refusal."""
    for fd in fds:
        os.close(fd)
    why = None
    if hello["request"] != "status":
        why = (f"unknown request {str(hello['request'])[:40]!r}: the attach socket takes a guest's hello or "
               '{"request": "status"}')
    elif fds:
        why = f"a status request carried {len(fds)} descriptors: it carries none"
    elif asker.uid not in (0, os.geteuid()):
        why = (f"status refused to pid {asker.pid} of uid {asker.uid}: this agent tells root and its own uid "
               f"{os.geteuid()} only")
    if why is None:
        return StatusRequest(conn, asker.pid)
    try:
        send_msg(conn, {"ok": False, "error": why})
    except OSError:
        pass
    conn.close()
    raise AttachError(why)


def _parse_hello(hello: dict, fds: list[int]) -> dict:
    if len(fds) != 2:
        raise AttachError(f"attach hello carried {len(fds)} descriptors, expected 2 (userfaultfd, RAM file)")
    if hello.get("version") != ATTACH_VERSION:
        raise AttachError(f"attach protocol version {hello.get('version')!r}, this agent speaks {ATTACH_VERSION}")
    try:
        ps = int(hello["page_size"])
        size = int(hello["ram_size"])
        pid = int(hello.get("pid", 0))
        regions = [Region(int(r["guest_addr"]), int(r["length"]), int(r["offset"])) for r in hello["regions"]]
    except (KeyError, TypeError, ValueError, OverflowError) as e:   # (int(Infinity): OverflowError)
        raise AttachError(f"attach hello is missing or has a bad field: {e}") from None
    if ps < 4096 or ps > 1 << 30 or ps & (ps - 1):
        raise AttachError(f"attach hello page_size {ps} is not a power of two from 4096 to 1 GiB")
    if size <= 0:
        raise AttachError(f"attach hello ram_size {size} is not a size")
    if not regions:
        raise AttachError("attach hello lists no regions")
    for r in regions:
        if r.guest_addr < 0 or r.offset < 0:
            raise AttachError(f"region {r} has a negative address or offset")
        if r.guest_addr % ps or r.length % ps or r.offset % ps or r.length <= 0:
            raise AttachError(f"region {r} is not aligned to the page size {ps}")
        if r.offset + r.length > size:
            raise AttachError(f"region {r} ends past the RAM size {size}")
    return {"pid": pid, "page_size": ps, "ram_size": size, "regions": regions,
            "backing": str(hello.get("backing", "")), "name": str(hello.get("name", "")),
            "reattach": bool(hello.get("reattach", False))}


def private_dir(path: str, owners: set[int]) -> int:
    """The directory of the socket at path, created 0700 if it is missing, else
    checked: a real directory (not a symbolic link), owned by one of owners
    (the agent's uid, or an --attach-uid whose guests must reach the socket),
    that no group or other user may enter. Returns its owner. Whoever can
    write a socket's directory can bind the path once the agent is gone, and
    a guest that re-attaches there would hand its RAM to them."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise AttachError(f"cannot create {d}, the attach socket's directory: {e.strerror}") from None
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode):
        raise AttachError(f"{d}, the attach socket's directory, is a symbolic link: give --attach a path in the "
                          "directory it points to")
    if not stat.S_ISDIR(st.st_mode):
        raise AttachError(f"{d}, the attach socket's directory, is not a directory")
    me = os.geteuid()
    if st.st_uid not in owners:
        whose = f"this agent's uid {me}" + (" or an --attach-uid" if owners - {me} else "")
        raise AttachError(f"the attach socket's directory {d} belongs to uid {st.st_uid}, not to {whose}: its owner "
                          "could take the socket's path over; give --attach a path in a directory of the agent's "
                          "user (a missing one is created 0700)")
    if st.st_mode & 0o077:
        raise AttachError(f"the attach socket's directory {d} has mode {stat.S_IMODE(st.st_mode):04o}, which lets "
                          f"other users in: make it private (chmod 0700 {d}), or give --attach a path in a new "
                          "directory (the agent creates it 0700)")
    return st.st_uid


def _refuse(conn: socket.socket, error: str) -> None:
    """Answers a process that may not attach, and closes. Its hello is read
    and dropped with plain recv(), which takes no descriptors (the kernel
    closes those it carried), so that it reads the refusal rather than a
    reset. At most 2 s: the accept loop waits meanwhile."""
    try:
        conn.settimeout(2)
        (left,) = struct.unpack(">I", recv_exact(conn, 4))
        left = min(left, _MAX_HELLO)
        while left > 0:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        send_msg(conn, {"ok": False, "error": error})
    except (OSError, AttachError):
        pass
    finally:
        conn.close()


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


class AttachListener:
    """The agent's UNIX socket. Owns the socket file and removes it on close().
    Takes guests of its own uid and of guest_uids (dest --attach-uid)."""

    def __init__(self, path: str, guest_uids: tuple[int, ...] = ()):
        self.path = path
        self.guest_uids = {os.geteuid(), *guest_uids}
        owner = private_dir(path, self.guest_uids)
        if os.path.lexists(path):
            # a stale socket from a dead agent: only replace a socket, never a
            # file, and never the socket of an agent that still answers on it
            # (its guest re-attaches there if that agent dies)
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AttachError(f"{path} exists and is not a socket: choose another --attach path")
            if _answers(path):
                raise AttachError(f"another agent is listening on {path}: stop it, or choose another --attach path")
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
        except OSError as e:
            self.sock.close()
            raise AttachError(f"attach socket {path}: {e.strerror}") from None
        try:
            # Before listen(), so nobody connects in between. The socket
            # belongs to the directory's owner: an --attach-uid that owns it
            # must be able to connect (only root can give it away).
            os.chmod(path, 0o600)
            if owner != os.geteuid():
                os.chown(path, owner, -1)
            self.sock.listen(16)
        except OSError as e:
            self.close()
            raise AttachError(f"attach socket {path}: {e.strerror}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> AttachedGuest | StatusRequest:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        accepted_at = time.monotonic()
        # Who this is comes from the kernel, before a byte or a descriptor
        # of theirs is taken.
        guest = peer_cred(conn)
        if guest.uid not in self.guest_uids:
            uids = ", ".join(str(u) for u in sorted(self.guest_uids))
            error = (f"guest pid {guest.pid} runs as uid {guest.uid}, and this agent takes guests of uid {uids} "
                     f"only: start the guest as one of them, or the agent with --attach-uid {guest.uid}")
            _refuse(conn, error)
            raise AttachError(error)
        conn.settimeout(30)
        try:
            hello, fds = recv_msg(conn, want_fds=2)
        except BaseException:
            conn.close()
            raise
        if "request" in hello:
            return _status_request(conn, guest, hello, fds)
        try:
            h = _parse_hello(hello, fds)
        except AttachError as e:
            for fd in fds:
                os.close(fd)
            try:
                send_msg(conn, {"ok": False, "error": str(e)})
            finally:
                conn.close()
            raise
        conn.settimeout(None)
        # the pid the kernel gives (in our pid namespace) is the one whose
        # /proc/PID/pagemap a re-attach reads, not the one the hello claims
        h["pid"] = guest.pid
        return AttachedGuest(conn, fds[0], fds[1], **h, accepted_at=accepted_at)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

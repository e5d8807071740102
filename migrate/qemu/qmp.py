"""The QMP client both agents (and the QEMU lab in migrate.qemu.lab) use: one
command at a time over QEMU's monitor socket, events kept for whoever waits
on them, file descriptors passed with SCM_RIGHTS for `getfd`.

A QMP socket is QEMU's: QEMU (or whatever starts it) chose its path and
made it, so the client does not judge the path. It asks the kernel who
listens there (SO_PEERCRED) and talks only to a process running as root or
as our own uid, the rule the guest ends of the attach socket follow
(migrate.wire.attach.trusted_listener): a process of another user on that
path would be handed the device state, or could feed a false one."""

from __future__ import annotations

import json
import os
import socket
import time

from migrate.errors import MigrateError
from migrate.wire.attach import peer_cred, trusted_listener

DEVSTATE_FD_NAME = "migrate-devstate"


class QemuError(MigrateError):
    """QEMU refused a command, went away, or did not reach the expected state."""


class QMPTimeout(QemuError):
    """QEMU said nothing within the time given."""


class QMPCommandError(QemuError):
    def __init__(self, path: str, command: str, error: dict):
        self.command = command
        self.error_class = error.get("class", "?")
        super().__init__(f"QMP {command} on {path}: {self.error_class}: {error.get('desc', error)}")


def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connects to a UNIX socket that a starting QEMU may not have made yet:
    retries while it is missing or refuses, raises that OSError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- QMP ----------------------------------------------------------------------
class QMP:
    """One QMP connection: commands (optionally with SCM_RIGHTS descriptors) and
    the events seen meanwhile, each stamped with QEMU's own wall-clock time.
    Owns the socket. Not thread-safe: one thread talks to one QEMU."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.buf = b""
        self.events: list[dict] = []
        self._id = 0
        try:
            self.sock = connect_unix(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise QemuError(f"cannot connect to QMP at {path} within {timeout:.0f} s: {e.strerror}; "
                            "is QEMU running with -qmp unix:PATH,server=on,wait=off?") from None
        qemu = peer_cred(self.sock)
        if not trusted_listener(qemu):
            self.sock.close()
            raise QemuError(f"the QMP socket {path} is served by pid {qemu.pid} of uid {qemu.uid}, which is neither "
                            f"root nor our uid {os.geteuid()}: not talking to it (another user's process there "
                            f"would read or forge the guest's device state); run QEMU as uid {os.geteuid()} or as root")
        try:
            greeting = self._read(timeout)
            if "QMP" not in greeting:
                raise QemuError(f"{path} is not a QMP socket: it greeted with {greeting!r}")
            self.version = greeting["QMP"]["version"]["qemu"]
            self.cmd("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise QMPTimeout(f"QMP {self.path}: no answer within {timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout(f"QMP {self.path}: no answer within {timeout:.0f} s") from None
            except OSError as e:
                raise QemuError(f"QMP {self.path}: {e.strerror}: did QEMU exit?") from None
            if not data:
                raise QemuError(f"QMP {self.path}: connection closed: did QEMU exit?")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" in msg:
            ts = msg.get("timestamp", {})
            msg["time"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            self.events.append(msg)
        return msg

    def cmd(self, name: str, timeout: float = 60.0, fds: tuple[int, ...] = (), **arguments):
        """Runs one command and returns its "return" value. `fds` travel with
        SCM_RIGHTS; QEMU takes its own copies, the caller still owns them."""
        self._id += 1
        msg = {"execute": name, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QemuError(f"QMP {name} on {self.path}: {e.strerror}: did QEMU exit?") from None
        while True:
            r = self._read(timeout)
            if "event" in r or r.get("id") != self._id:
                continue
            if "error" in r:
                raise QMPCommandError(self.path, name, r["error"])
            return r.get("return")

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def event(self, name: str) -> dict | None:
        """The first event `name` seen so far, or None."""
        for e in self.events:
            if e["event"] == name:
                return e
        return None

    def seen(self, name: str, **data) -> list[dict]:
        """Every event `name` QEMU has sent so far whose data has these values
        (`seen("MIGRATION", status="setup")`). One query-status round trip
        first takes in the events already on their way."""
        self.cmd("query-status")
        return [e for e in self.events if e["event"] == name
                and all(e.get("data", {}).get(k) == v for k, v in data.items())]

    def wait_event(self, match, timeout: float, what: str, since: int = 0, give_up=None) -> dict | None:
        """The first event from index `since` of self.events on for which
        match(event) is true, reading QEMU's socket (blocking: an event is
        taken the moment it comes) until one does; QemuError after `timeout` s
        or when QEMU goes away. give_up: looked at every 0.1 s while QEMU is
        quiet; once it is true and QEMU has said nothing more for 0.2 s, None
        is returned."""
        deadline = time.monotonic() + timeout
        i = since
        gave_up = False
        while True:
            while i < len(self.events):
                if match(self.events[i]):
                    return self.events[i]
                i += 1
            if give_up is not None and give_up():
                # what QEMU said before that may still be on its way
                give_up, gave_up = None, True
                deadline = min(deadline, time.monotonic() + 0.2)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                if gave_up:
                    return None
                raise QMPTimeout(f"QMP {self.path}: {what}: nothing within {timeout:.0f} s")
            try:
                self._read(min(left, 0.1) if give_up is not None else left)
            except QMPTimeout:
                continue

    def migration_end(self, timeout: float, what: str = "migration", poll: float = 0.002) -> dict:
        """Polls query-migrate until the migration is completed, failed or
        cancelled, and returns that answer."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate", timeout=max(1.0, deadline - time.monotonic()))
            st = info.get("status")
            if st in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise QemuError(f"{what} still {st} after {timeout:.0f} s")
            time.sleep(poll)

    def wait_migration(self, timeout: float, what: str) -> dict:
        """Polls query-migrate until completed; raises on failed/cancelled."""
        info = self.migration_end(timeout, what)
        if info["status"] != "completed":
            raise QemuError(f"{what} {info['status']}: {info.get('error-desc', 'QEMU gave no reason')}")
        return info

    def set_caps(self, **caps: bool) -> None:
        """migrate-set-capabilities; `set_caps(postcopy_ram=True)` names the
        capability postcopy-ram."""
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k.replace("_", "-"), "state": bool(v)} for k, v in caps.items()])

    def ignore_shared(self) -> None:
        self.set_caps(x_ignore_shared=True)

#!/usr/bin/env python3
"""Minimal QMP client and serial-console helper (standard library only).

Library use:

    from qmp import QMP, Serial
    q = QMP("/tmp/src.qmp")            # connects (retrying), negotiates capabilities
    q.cmd("migrate-set-capabilities",
          capabilities=[{"capability": "x-ignore-shared", "state": True}])
    q.cmd("query-migrate")              # -> the "return" value; raises QMPError on "error"
    q.wait_event("STOP", timeout=10)    # -> the event dict

    s = Serial("/tmp/src.serial")       # QEMU: -chardev socket,id=ser0,path=...,server=on,wait=off
    s.wait_for(r"FILLED (\\d+)", timeout=300)   # -> re.Match
    s.send("\\n")

Command line:

    qmp.py SOCKET COMMAND ['{"json": "arguments"}']
"""
import json
import re
import socket
import sys
import time


class QMPError(Exception):
    def __init__(self, command, error):
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.command = command
        self.error = error


def _connect_unix(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot connect to {path} within {timeout}s")
            time.sleep(0.05)


class QMP:
    def __init__(self, path, timeout=30.0):
        self.path = path
        self.sock = _connect_unix(path, timeout)
        self.buf = b""
        self.events = []
        self._id = 0
        greeting = self._read_msg(timeout)
        if "QMP" not in greeting:
            raise RuntimeError(f"unexpected QMP greeting: {greeting}")
        self.version = greeting["QMP"]["version"]["qemu"]
        self.cmd("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _read_msg(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {self.path}: no message within {timeout}s")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"QMP {self.path}: no message within {timeout}s")
            if not data:
                raise EOFError(f"QMP {self.path}: connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, timeout=60.0, fds=(), **arguments):
        """Run one command; fds are passed with SCM_RIGHTS (for getfd / add-fd)."""
        self._id += 1
        msg = {"execute": name, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        while True:
            r = self._read_msg(timeout)
            if "event" in r:
                self.events.append(r)
                continue
            if r.get("id") != self._id:
                continue
            if "error" in r:
                raise QMPError(name, r["error"])
            return r.get("return")

    def wait_event(self, name, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QMP {self.path}: no {name} event within {timeout}s")
            r = self._read_msg(left)
            if "event" in r:
                self.events.append(r)

    def getfd(self, name, fd):
        """Hand fd to QEMU under name (usable as migrate uri "fd:NAME")."""
        self.cmd("getfd", fdname=name, fds=[fd])

    def set_caps(self, **caps):
        """set_caps(x_ignore_shared=True) -> migrate-set-capabilities (underscores become dashes)."""
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k.replace("_", "-"), "state": bool(v)}
                               for k, v in caps.items()])

    def wait_migration(self, timeout=600.0, poll=0.02, states=("completed", "failed", "cancelled")):
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration still {info.get('status')} after {timeout}s")
            time.sleep(poll)

    def wait_status(self, status, timeout=60.0, poll=0.02):
        deadline = time.monotonic() + timeout
        while True:
            st = self.cmd("query-status")
            if st.get("status") == status:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"VM status {st.get('status')}, wanted {status}")
            time.sleep(poll)


class Serial:
    """Line-oriented access to a QEMU serial port exported as a UNIX socket chardev."""

    def __init__(self, path, timeout=30.0, echo=None):
        self.path = path
        self.sock = _connect_unix(path, timeout)
        self.text = ""          # everything received so far
        self.pos = 0            # wait_for() searches from here
        self.echo = echo        # file object to copy console output to, or None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _pump(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        if not data:
            raise EOFError(f"serial {self.path}: closed")
        s = data.decode("utf-8", "replace").replace("\r", "")
        self.text += s
        if self.echo:
            self.echo.write(s)
            self.echo.flush()

    def wait_for(self, pattern, timeout=120.0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self.text[-2000:]
                raise TimeoutError(f"serial {self.path}: no /{pattern}/ within {timeout}s; tail:\n{tail}")
            self._pump(min(left, 0.5))

    def send(self, s):
        self.sock.sendall(s.encode())


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    q = QMP(argv[1])
    args = json.loads(argv[3]) if len(argv) > 3 else {}
    print(json.dumps(q.cmd(argv[2], **args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

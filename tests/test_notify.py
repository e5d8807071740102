"""sd_notify: READY=1 and STATUS= lines on a NOTIFY_SOCKET the test makes,
and the example systemd units' command lines."""

from __future__ import annotations

import configparser
import os
import shlex
import socket
import time
from pathlib import Path

import pytest

from migrate.cli import build_parser
from migrate.notify import notify
from migrate.sim.localrun import LocalMigration, Proc

M = 1 << 20
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "systemd"


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[str] = []

    def read(self, until=None, timeout: float = 0.5) -> list[str]:
        """Messages so far; with until, waits up to timeout for one it holds for."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
                if until is not None and until(self.messages[-1]):
                    return self.messages
                continue
            except TimeoutError:
                pass
            if until is None or time.monotonic() >= deadline:
                return self.messages

    def close(self):
        self.sock.close()
        os.unlink(self.path)


def _spawn(lm: LocalMigration, name: str, args: list[str], notify_path: str) -> Proc:
    p = Proc(name, args, env={**os.environ, "NOTIFY_SOCKET": notify_path})
    lm.procs.append(p)
    return p


@pytest.mark.timeout(120)
def test_ready_once_listening_with_a_guest_and_status_as_the_migration_moves(tmp_path, host):
    dest_n = NotifySocket(str(tmp_path / "dest-notify"))
    src_n = NotifySocket(str(tmp_path / "source-notify"))
    try:
        with LocalMigration(str(tmp_path), 64 * M, seed=5, pattern="random", vcpus=2) as lm:
            lm.make_image()
            lm.dest = _spawn(lm, "dest", ["dest", "--listen", "127.0.0.1:0", "--attach", lm.sock, "--json"],
                             dest_n.path)
            lm.address = lm.dest.wait_event("listening", 30)["address"]
            early = dest_n.read(until=lambda m: "listening" in m, timeout=5)
            assert any(m.startswith("STATUS=listening: gRPC on ") for m in early), early
            assert not any("READY=1" in m for m in early)   # listening, but no guest yet
            lm.start_guest()
            lm.dest.wait_event("attached", 60)
            msgs = dest_n.read(until=lambda m: "READY=1" in m, timeout=10)
            ready = [m for m in msgs if "READY=1" in m]
            assert len(ready) == 1 and ready[0].startswith("READY=1\nSTATUS=attached: guest pid "), msgs
            lm.source = _spawn(lm, "source", ["source", "--ram", lm.image, "--to", lm.address, "--json"],
                               src_n.path)
            assert lm.source.wait(90) == 0, lm.source.errors()
            assert lm.dest.wait(60) == 0
            msgs = dest_n.read()
            assert any(m.startswith("STATUS=connected: source ") for m in msgs), msgs
            assert any(m.startswith("STATUS=completed: session ") for m in msgs), msgs
            assert sum("READY=1" in m for m in msgs) == 1
            smsgs = src_n.read()
            assert smsgs[0].startswith("STATUS=control: control socket "), smsgs
            sready = [m for m in smsgs if "READY=1" in m]
            assert len(sready) == 1 and sready[0].startswith("READY=1\nSTATUS=connected: session "), smsgs
            assert smsgs[-1].startswith("STATUS=finished: served 16384 pages in "), smsgs
            assert msgs[-1].startswith("STATUS=finished: session "), msgs
            assert all(m.startswith(("READY=1\nSTATUS=", "STATUS=")) for m in msgs + smsgs)
    finally:
        dest_n.close()
        src_n.close()


@pytest.mark.timeout(10)
def test_notify_reaches_an_abstract_socket_and_shrugs_off_a_missing_one(tmp_path):
    name = f"migrate-test-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        assert notify("STATUS=hello", {"NOTIFY_SOCKET": "@" + name})
        s.settimeout(2)
        assert s.recv(100) == b"STATUS=hello"
    finally:
        s.close()
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})
    assert not notify("READY=1", {})


def _unit(path: Path) -> configparser.ConfigParser:
    """A unit file as systemd reads it: a line ending in a backslash goes on."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str
    cp.read_string(path.read_text().replace("\\\n", " "))
    return cp


@pytest.mark.parametrize("unit", ["migrate-dest.service", "migrate-source@.service"])
def test_example_units_are_command_lines_migrate_takes(unit):
    """The examples' ExecStart= parse as `migrate` command lines; the
    destination's restarts on failure and both tell systemd when ready."""
    svc = _unit(EXAMPLES / unit)["Service"]
    assert svc["Type"] == "notify"
    argv = shlex.split(svc["ExecStart"])
    assert os.path.basename(argv[0]) == "migrate"
    args = build_parser().parse_args([a.replace("%i", "vm1") for a in argv[1:]])
    assert args.command in ("dest", "source")
    if args.command == "dest":
        assert svc["Restart"] == "on-failure"
        assert args.metrics_listen

"""Local sockets (issue 16, item 6): who may be on either end of the attach
socket and of a QMP socket (docs/attach-protocol.md, "Who checks what").

Each attacker here is a real process of another uid (nobody, 65534) that the
test, running as root, starts with setuid in the forked child (subprocess's
user=): it binds a dead agent's attach path, serves a QMP path, or attaches
as a guest. Each case asserts the refusal with its whole message, that the
other uid received nothing (no descriptor, no byte), and, where a guest is
involved, that a good migration then still completes and verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from migrate.sim.localrun import LocalMigration, Proc

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534
M = 1 << 20
SIZE = 16 * M

# A process of another uid listening on a UNIX socket path: it takes every
# connection and counts what it is given (connections, bytes, descriptors)
# until its stdin closes, then prints the counts as JSON. With a greeting it
# says that first, as QEMU greets on its QMP socket.
LISTENER = r"""
import json, os, select, socket, sys
path, greeting = sys.argv[1], sys.argv[2].encode() if len(sys.argv) > 2 else b""
if os.path.lexists(path):
    os.unlink(path)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
print("listening", flush=True)
seen = {"connections": 0, "bytes": 0, "fds": 0}
while True:
    ready = select.select([srv, sys.stdin], [], [])[0]
    if srv not in ready:
        break   # stdin closed, and nobody is waiting to be accepted
    conn, _ = srv.accept()
    seen["connections"] += 1
    conn.settimeout(5)
    try:
        if greeting:
            conn.sendall(greeting)
        while True:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 8)
            seen["fds"] += len(fds)
            for fd in fds:
                os.close(fd)
            if not data:
                break
            seen["bytes"] += len(data)
    except OSError:
        pass
    conn.close()
srv.close()
os.unlink(path)
print(json.dumps(seen), flush=True)
"""

# A guest of another uid: sends an attach hello with two descriptors (memfds
# of its own) and prints the agent's answer.
GUEST_HELLO = r"""
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
fds = [os.memfd_create("uffd-stand-in"), os.memfd_create("ram")]
os.ftruncate(fds[1], 1 << 20)
body = json.dumps({"version": 1, "pid": os.getpid(), "page_size": 4096, "ram_size": 1 << 20,
                   "regions": [{"guest_addr": 0x7f0000000000, "length": 1 << 20, "offset": 0}]}).encode()
socket.send_fds(s, [struct.pack(">I", len(body)) + body], fds)
head = b""
while len(head) < 4:
    head += s.recv(4 - len(head))
(n,) = struct.unpack(">I", head)
answer = b""
while len(answer) < n:
    answer += s.recv(n - len(answer))
print(answer.decode(), flush=True)
"""


@pytest.fixture(scope="module")
def other_python():
    """An interpreter another uid may run (this venv's lives under /root), or a
    skip with the reason."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the attackers run as another uid (nobody)")
    for py in ("/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            r = subprocess.run([py, "-c", "import socket; socket.recv_fds"], user=NOBODY, group=NOBODY,
                               extra_groups=[], cwd="/", capture_output=True, timeout=30)
        except OSError:
            continue
        if r.returncode == 0:
            return py
    pytest.skip("no Python 3.9+ that uid 65534 may run (/usr/bin/python3)")


@pytest.fixture
def reachable():
    """A directory another uid can pass through (0711, in /tmp: pytest's own
    tmp_path sits under a 0700 directory), removed after the test."""
    base = tempfile.mkdtemp(prefix="migrate-attacks-", dir="/tmp")
    os.chmod(base, 0o711)
    yield Path(base)
    shutil.rmtree(base, ignore_errors=True)


def as_nobody(python: str, script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([python, "-c", script, *args], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class OtherUidListener:
    """LISTENER as nobody on path: `.pid` is what SO_PEERCRED names; stop()
    ends it and returns what it was given."""

    def __init__(self, python: str, path: str, greeting: str = ""):
        self.p = as_nobody(python, LISTENER, path, *([greeting] if greeting else []))
        self.pid = self.p.pid
        line = self.p.stdout.readline()
        if line != "listening\n":
            self.p.kill()
            raise AssertionError(f"the other-uid listener did not start: {line!r} {self.p.stderr.read()}")

    def stop(self) -> dict:
        out, err = self.p.communicate("", timeout=30)
        assert self.p.returncode == 0, err
        return json.loads(out)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def refused_by_guest(path: str, pid: int, who: str = "this guest's uid 0") -> str:
    return (f"the attach socket {path} is served by pid {pid} of uid {NOBODY}, which is neither root nor {who}: "
            "not handing it the guest's userfaultfd and RAM (another user took the path over?); run `migrate dest` "
            "as root or as uid 0, in a directory only it can enter")


def finish(lm: LocalMigration) -> None:
    """A good source completes the migration; the guest verifies every byte."""
    src = lm.start_source()
    assert src.wait(60) == 0, src.errors() or src.stderr_lines[-5:]
    assert lm.guest.wait(60) == 0, lm.guest.errors() or lm.guest.stderr_lines[-5:]
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    assert lm.dest.wait(30) == 0
    assert lm.dest.summary()["state"] == "complete"


@pytest.mark.timeout(120)
def test_a_dead_agents_path_taken_over_by_another_uid_gets_nothing(reachable, host, other_python):
    """The attach hijack: the agent dies, another uid binds its path (here the
    directory was opened up, as a path in /tmp would be), and the guest that
    re-attaches there asks the kernel who listens before it sends a byte: it
    refuses, says so once, and keeps its userfaultfd and RAM. Once the path
    is private again, a real agent takes the guest and a source finishes."""
    run = reachable / "run"   # missing: the agent creates it 0700
    with LocalMigration(str(run), SIZE, seed=21, pattern="random", vcpus=2) as lm:
        lm.make_image()
        lm.start_dest()
        st = os.stat(run)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
        st = os.lstat(lm.sock)
        assert stat.S_ISSOCK(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        lm.dest.kill()
        lm.guest.wait_event("agent_lost", 30)

        os.chmod(run, 0o777)
        attacker = OtherUidListener(other_python, lm.sock)
        try:
            ev = lm.guest.wait_event("attach_refused", 30)
            assert ev["message"] == refused_by_guest(lm.sock, attacker.pid)
            time.sleep(1.5)          # several more tries, each refused
        finally:
            got = attacker.stop()
            os.chmod(run, 0o700)
        assert got["connections"] >= 3 and got["fds"] == 0 and got["bytes"] == 0, got
        assert [e["message"] for e in lm.guest.lines if e["event"] == "attach_refused"] == [ev["message"]]

        lm.start_dest()
        lm.guest.wait_event("reattached", 60)
        finish(lm)


@pytest.mark.timeout(60)
def test_guestsim_does_not_attach_to_another_uids_socket(reachable, host, other_python):
    """Its first attach too: guestsim exits with the reason, having sent nothing."""
    opened = reachable / "open"
    opened.mkdir(mode=0o777)
    os.chmod(opened, 0o777)
    path = str(opened / "attach.sock")
    attacker = OtherUidListener(other_python, path)
    try:
        guest = Proc("guestsim", ["guestsim", "--attach", path, "--size", "4M", "--backing", "tmpfs", "--seed", "1",
                                  "--json"])
        try:
            assert guest.wait(30) == 2
        finally:
            guest.kill()
    finally:
        got = attacker.stop()
    assert guest.errors() == [refused_by_guest(path, attacker.pid)]
    assert got == {"connections": 1, "bytes": 0, "fds": 0}


@pytest.mark.timeout(120)
def test_the_agent_refuses_a_guest_of_another_uid(reachable, host, other_python):
    """The agent reads each guest's uid from the kernel and takes only its own
    (without --attach-uid). The directory and socket are opened up here after
    the agent made them, so that the other uid reaches the socket at all: the
    agent's check holds without them. Its descriptors are never taken; a good
    guest then attaches and migrates."""
    run = reachable / "run"
    with LocalMigration(str(run), SIZE, seed=22, pattern="random", vcpus=2) as lm:
        lm.make_image()
        lm.start_dest()
        os.chmod(run, 0o711)
        os.chmod(lm.sock, 0o666)
        intruder = as_nobody(other_python, GUEST_HELLO, lm.sock)
        out, err = intruder.communicate(timeout=30)
        assert intruder.returncode == 0, err
        message = (f"guest pid {intruder.pid} runs as uid {NOBODY}, and this agent takes guests of uid 0 only: "
                   f"start the guest as one of them, or the agent with --attach-uid {NOBODY}")
        assert json.loads(out) == {"ok": False, "error": message}
        assert lm.dest.wait_event("error", 10)["message"] == f"attach refused: {message}"

        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        finish(lm)
        assert lm.dest.errors() == [f"attach refused: {message}"]


@pytest.mark.timeout(120)
def test_attach_uid_lets_a_guest_of_that_uid_in(reachable, host, other_python):
    """dest --attach-uid 65534: the socket's directory may belong to 65534 (so
    that its guests reach the socket), the socket is 0600 and 65534's too, and
    a guestsim running as 65534 attaches and migrates (the agent, root, is a
    listener it trusts)."""
    guests = reachable / "guests"
    guests.mkdir(mode=0o700)
    os.chown(guests, NOBODY, NOBODY)
    with LocalMigration(str(guests), SIZE, seed=23, pattern="random", vcpus=2,
                        dest_args=("--attach-uid", str(NOBODY))) as lm:
        lm.make_image()
        lm.start_dest()
        st = os.lstat(lm.sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, NOBODY)
        lm.guest = Proc("guestsim", ["guestsim", "--attach", lm.sock, "--size", str(SIZE), "--backing", "tmpfs",
                                     "--seed", "23", "--pattern", "random", "--vcpus", "2", "--json"],
                        prefix=(sys.executable, os.path.join(HERE, "helpers", "guest_as_uid.py"), str(NOBODY)))
        lm.procs.append(lm.guest)
        lm.guest.wait_event("attached", 60)
        assert lm.dest.wait_event("attached", 60)["pid"] == lm.guest.p.pid
        status = dict(line.split(":", 1) for line in open(f"/proc/{lm.guest.p.pid}/status").read().splitlines())
        assert status["Uid"].split() == [str(NOBODY)] * 4
        finish(lm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["group", "world", "sticky-world", "other-owner", "symlink", "not-a-directory"])
def test_an_attach_directory_others_can_enter_is_refused(tmp_path, case):
    """The agent starts only on a directory that is its user's alone: it says
    which rule failed and what to do, exits 2, and leaves nothing behind."""
    d = tmp_path / "d"
    if case == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        d.symlink_to(tmp_path / "real")
    elif case == "not-a-directory":
        d.write_text("")
    else:
        d.mkdir()
        os.chmod(d, {"group": 0o750, "world": 0o755, "sticky-world": 0o1777, "other-owner": 0o700}[case])
        if case == "other-owner":
            os.chown(d, NOBODY, NOBODY)
    expected = {
        "group": f"the attach socket's directory {d} has mode 0750, which lets other users in: make it private "
                 f"(chmod 0700 {d}), or give --attach a path in a new directory (the agent creates it 0700)",
        "world": f"the attach socket's directory {d} has mode 0755, which lets other users in: make it private "
                 f"(chmod 0700 {d}), or give --attach a path in a new directory (the agent creates it 0700)",
        "sticky-world": f"the attach socket's directory {d} has mode 1777, which lets other users in: make it "
                        f"private (chmod 0700 {d}), or give --attach a path in a new directory (the agent creates "
                        "it 0700)",
        "other-owner": f"the attach socket's directory {d} belongs to uid {NOBODY}, not to this agent's uid 0: its "
                       "owner could take the socket's path over; give --attach a path in a directory of the agent's "
                       "user (a missing one is created 0700)",
        "symlink": f"{d}, the attach socket's directory, is a symbolic link: give --attach a path in the directory "
                   "it points to",
        "not-a-directory": f"{d}, the attach socket's directory, is not a directory",
    }[case]
    if os.geteuid() != 0 and case == "other-owner":
        pytest.skip("needs root to give the directory to another uid")
    p = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", str(d / "a.sock"), "--json"])
    try:
        assert p.wait(30) == 2
    finally:
        p.kill()
    assert p.errors() == [f"cannot start the destination: {expected}"]
    assert not os.path.lexists(d / "a.sock")
    if case == "symlink":
        assert os.listdir(tmp_path / "real") == []


@pytest.mark.timeout(60)
def test_the_shim_does_not_attach_to_another_uids_socket(reachable, other_python):
    """QEMU under the shim (here the small _MAPS_RAM process of the shim
    harness) finds a listener of another uid, not root, on MIGRATE_ATTACH: it
    sends it neither the hello nor its descriptors, waits (MIGRATE_ATTACH_WAIT,
    here 1 s) for a trusted agent in its place, and exits 1 with the reason."""
    from conftest import need_feature
    from migrate.host import features
    from test_qemu import _start_under_shim_env
    need_feature(features(), "uffd")
    opened = reachable / "open"
    opened.mkdir()
    os.chmod(opened, 0o777)
    path = str(opened / "attach.sock")
    attacker = OtherUidListener(other_python, path)
    try:
        child = _start_under_shim_env(path, MIGRATE_ATTACH_WAIT="1")
        try:
            out, err = child.communicate("", timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        got = attacker.stop()
    assert child.returncode == 1 and out == "", (out, err)
    fatal = [line for line in err.splitlines() if ": fatal: " in line]
    why = (f"the attach socket MIGRATE_ATTACH={path} is served by pid {attacker.pid} of uid {NOBODY}, which is "
           "neither root nor this process's uid 0: not handing it the guest's userfaultfd and RAM (/memfd:guest-ram "
           "(deleted); another user took the path over?); run `migrate dest` as root or as uid 0, in a directory "
           "only it can enter")
    assert fatal == [f"migrate-shim[{child.pid}]: fatal: no migrate agent took /memfd:guest-ram (deleted) within "
                     f"MIGRATE_ATTACH_WAIT=1 s: {why}; start `migrate dest --attach {path}` (before this process, or "
                     "within that time), or set MIGRATE_ATTACH_WAIT higher"], err
    # it looked again every 100 ms, and never sent a byte or a descriptor
    assert got["connections"] >= 2 and got["bytes"] == 0 and got["fds"] == 0, got


@pytest.mark.timeout(60)
def test_qmp_is_not_spoken_to_another_uids_socket(reachable, other_python):
    """A QMP socket served by another uid (here greeting as QEMU does): the
    client refuses before it sends a byte, so no device state goes there."""
    from migrate.qemu.qmp import QMP, QemuError
    opened = reachable / "open"
    opened.mkdir()
    os.chmod(opened, 0o777)
    path = str(opened / "dst.qmp")
    greeting = json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}})
    fake = OtherUidListener(other_python, path, greeting + "\r\n")
    try:
        with pytest.raises(QemuError) as ei:
            QMP(path, timeout=5)
    finally:
        got = fake.stop()
    assert str(ei.value) == (f"the QMP socket {path} is served by pid {fake.pid} of uid {NOBODY}, which is neither "
                             "root nor our uid 0: not talking to it (another user's process there would read or "
                             "forge the guest's device state); run QEMU as uid 0 or as root")
    assert got == {"connections": 1, "bytes": 0, "fds": 0}


@pytest.mark.timeout(90)
def test_the_shim_re_attaching_after_a_dead_agent_skips_another_uids_socket(reachable, other_python):
    """The attach hijack against QEMU: its agent dies (EOF without "complete"),
    another uid binds the path, and the shim's re-attach thread refuses it
    (once on stderr, nothing sent) and goes on trying, until an agent of ours
    listens there again and takes the guest back."""
    import socket

    from conftest import need_feature
    from migrate.host import features
    from migrate.wire.attach import recv_msg, send_msg
    from test_qemu import start_under_shim
    need_feature(features(), "uffd")
    opened = reachable / "open"
    opened.mkdir()
    os.chmod(opened, 0o777)
    path = str(opened / "attach.sock")

    def agent_of_ours() -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(2)
        listener.settimeout(20)
        return listener

    def take_guest(listener) -> tuple[socket.socket, dict]:
        conn, _ = listener.accept()
        conn.settimeout(20)
        hello, fds = recv_msg(conn, want_fds=2)
        for fd in fds:
            os.close(fd)
        send_msg(conn, {"ok": True})
        return conn, hello

    listener = agent_of_ours()
    child = start_under_shim(path)
    attacker = None
    try:
        conn, hello = take_guest(listener)
        assert child.stdout.readline() == "mapped\n"
        listener.close()
        os.unlink(path)
        attacker = OtherUidListener(other_python, path)
        attacker_pid = attacker.pid
        conn.close()                     # the agent "dies"
        time.sleep(1.5)                  # the shim tries about every 100 ms
        got = attacker.stop()
        attacker = None
        listener = agent_of_ours()
        conn, again = take_guest(listener)
        assert again["reattach"] is True and again["ram_size"] == hello["ram_size"]
        send_msg(conn, {"event": "complete"})
        conn.close()
        _, err = child.communicate("", timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if attacker is not None:
            attacker.kill()
        listener.close()
    assert child.returncode == 0, err
    assert got["connections"] >= 3 and got["fds"] == 0 and got["bytes"] == 0, got
    refused = [line for line in err.splitlines() if "is served by pid" in line]
    assert refused == [f"migrate-shim[{child.pid}]: the attach socket MIGRATE_ATTACH={path} is served by pid "
                       f"{attacker_pid} of uid {NOBODY}, which is neither root nor this process's uid 0: not handing "
                       "it the guest's userfaultfd and RAM (/memfd:guest-ram (deleted); another user took the path "
                       "over?); run `migrate dest` as root or as uid 0, in a directory only it can enter"]
    assert f"migrate-shim[{child.pid}]: attached /memfd:guest-ram (deleted) again" in err.splitlines(), err


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value, message", [
    ("qemu", "argument --attach-uid: 'qemu' is not a numeric uid"),
    ("-1", "argument --attach-uid: -1: not a uid"),
    ("4294967295", "argument --attach-uid: 4294967295: not a uid"),   # (uid_t)-1: "no change" to chown
])
def test_attach_uid_takes_a_numeric_uid(value, message, capsys):
    from migrate.cli import build_parser
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["dest", "--listen", "127.0.0.1:0", "--attach", "x", "--attach-uid", value])
    assert ei.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"migrate dest: error: {message}"
    args = build_parser().parse_args(["dest", "--listen", "127.0.0.1:0", "--attach", "x", "--attach-uid", "107",
                                      "--attach-uid", "0"])
    assert args.attach_uid == [107, 0]

"""`migrate status` against live agents, the source's control socket, the
attach socket's status request with hostile input, and the progress line on
a terminal (a pty) and its absence on a pipe."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_e2e import wait_until_received

from migrate.sim.localrun import LocalMigration
from migrate.status import ControlSocket, StatusError, query

M = 1 << 20
NOBODY = 65534


def migrate_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrate", *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def paused_mid_migration(tmp_path, *, source_args: tuple = (), dest_args: tuple = (), **kw):
    """A 256 MiB guest faulting at random from 2 vCPUs, stopped (SIGSTOP) once
    a tenth of its pages are in, while a slow source (1 stream, 20 MB/s)
    keeps pushing: the migration stays running for about 10 s more. Yields
    the LocalMigration and the source's control socket; the guest goes on
    when the block ends."""
    ctl = str(tmp_path / "ctl" / "source.sock")
    with LocalMigration(str(tmp_path), 256 * M, seed=7, pattern="random", vcpus=2,
                        source_args=("--push-streams", "1", "--max-rate", "20M", "--control", ctl, *source_args),
                        dest_args=dest_args, **kw) as lm:
        lm.make_image()
        lm.start_dest()
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        lm.start_source()
        assert lm.source.wait_event("control", 30)["control"] == ctl
        wait_until_received(lm, 10)
        os.kill(lm.guest.p.pid, signal.SIGSTOP)
        try:
            yield lm, ctl
        finally:
            os.kill(lm.guest.p.pid, signal.SIGCONT)


@pytest.mark.timeout(120)
def test_status_of_a_live_migration_from_both_agents(tmp_path, host):
    """Mid-migration, `migrate status` tells the destination's and the source's
    state, pages, rate, ETA, faults with p50/p99, blocked time per vCPU, peer
    and session, as JSON and as text; never a token. After the end the
    destination's summary carries the same per-vCPU figures."""
    with paused_mid_migration(tmp_path) as (lm, ctl):
        time.sleep(0.3)
        r = migrate_cmd("status", "--attach", lm.sock, "--json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["role"] == "dest" and d["pid"] == lm.dest.p.pid and d["listen"] == lm.address
        [m] = d["migrations"]
        session = m["session"]
        assert m["state"] == "running"
        assert 0 < m["pages_received"] < m["pages_total"] == 256 * M // 4096
        assert m["pages_demand"] > 0 and m["pages_pushed"] > 0
        assert m["pages_demand"] + m["pages_pushed"] + m["pages_zero"] == m["pages_received"]
        assert m["gbps"] > 0 and m["eta_s"] > 0
        assert m["faults_demand"] > 0 and m["faults"] >= m["faults_demand"]
        assert 0 < m["fault_p50_us"] <= m["fault_p99_us"]
        assert m["peer"].startswith("(source) at 127.0.0.1:")   # (plaintext: no certificate name)
        assert sorted(v["vcpu"] for v in m["vcpus"]) == [0, 1]
        assert all(v["blocked_s"] > 0 and v["faults"] > 0 for v in m["vcpus"])
        assert sum(v["faults"] for v in m["vcpus"]) == m["faults_demand"]
        assert "token" not in r.stdout

        r = migrate_cmd("status", "--source", ctl, "--json")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["role"] == "source" and s["pid"] == lm.source.p.pid
        [sm] = s["migrations"]
        assert sm["state"] == "running" and sm["session"] == session and sm["peer"] == lm.address
        assert 0 < sm["pages_received"] < sm["pages_total"] == m["pages_total"]
        assert sm["pages_demand"] > 0 and sm["gbps"] > 0 and sm["eta_s"] > 0
        assert "token" not in r.stdout

        text = migrate_cmd("status", "--attach", lm.sock).stdout
        assert f"session {session}: running" in text
        assert "vCPU 0 (tid " in text and "vCPU 1 (tid " in text and "p99" in text
        text = migrate_cmd("status", "--source", ctl).stdout
        assert text.startswith(f"source agent pid {lm.source.p.pid}") and f"session {session}: running" in text
        assert lm.source.wait(120) == 0, (lm.source.errors(), lm.dest.errors(), lm.dest.stderr_lines[-20:])
        assert lm.dest.wait(60) == 0
    summary = lm.dest.summary()
    assert sorted(v["vcpu"] for v in summary["vcpus"]) == [0, 1]
    assert summary["blocked_s"] == pytest.approx(sum(v["blocked_s"] for v in summary["vcpus"]), abs=1e-5)
    # every wait ended: blocked time is at most the time the migration took, per vCPU
    assert all(0 < v["blocked_s"] < summary["seconds"] + 1 for v in summary["vcpus"])
    assert sum(v["faults"] for v in summary["vcpus"]) == summary["faults"] - summary["faults_fast"]
    assert not os.path.exists(ctl)   # the source removed its control socket


@pytest.mark.timeout(60)
def test_status_of_an_agent_waiting_for_its_guest_and_of_one_not_there(tmp_path):
    sock = str(tmp_path / "a" / "attach.sock")
    with LocalMigration(str(tmp_path), 16 * M) as lm:
        lm.sock = sock
        lm.start_dest()
        d = json.loads(migrate_cmd("status", "--attach", sock, "--json").stdout)
        assert d["migrations"] == [] and d["role"] == "dest"
        assert "no migration" in migrate_cmd("status", "--attach", sock).stdout
    r = migrate_cmd("status", "--attach", sock)
    assert r.returncode == 1
    assert r.stderr.startswith(f"status: cannot reach an agent on {sock}: No such file or directory")


# -- hostile input ----------------------------------------------------------
@pytest.fixture
def reachable():
    """A directory another uid can pass through (0711, in /tmp: pytest's
    tmp_path sits under a 0700 directory), removed after the test."""
    base = tempfile.mkdtemp(prefix="migrate-status-", dir="/tmp")
    os.chmod(base, 0o711)
    yield Path(base)
    shutil.rmtree(base, ignore_errors=True)


def _ask_raw(path: str, data: bytes, fds: list[int] = (), timeout: float = 5) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        if fds:
            socket.send_fds(s, [data], list(fds))
        else:
            s.sendall(data)
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return {}
        (n,) = struct.unpack(">I", head)
        return json.loads(s.recv(n, socket.MSG_WAITALL))
    finally:
        s.close()


def _frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _as_uid(uid: int, fn) -> dict:
    """fn() run in a child process of uid; its result (JSON) or its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover (child)
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = {"result": fn()}
            except Exception as e:
                out = {"error": str(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    return out


@pytest.mark.timeout(60)
def test_the_attach_socket_answers_status_to_its_own_uid_only_and_shrugs_off_garbage(reachable):
    """A status request with descriptors, an unknown request, a body too long
    and bytes that are not JSON each get their refusal; a uid the agent takes
    guests of (--attach-uid) may not read the status of every guest; the
    agent goes on answering."""
    if os.geteuid() != 0:
        pytest.skip("needs root to ask as another uid")
    guests = reachable / "guests"
    guests.mkdir(mode=0o700)
    os.chown(guests, NOBODY, NOBODY)   # (so that nobody reaches the socket, as its guests would)
    with LocalMigration(str(guests), 16 * M, dest_args=("--attach-uid", str(NOBODY))) as lm:
        lm.start_dest()
        path = lm.sock
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            out = _ask_raw(path, _frame({"version": 1, "request": "status"}), [fd, fd])
        finally:
            os.close(fd)
        assert out == {"ok": False, "error": "a status request carried 2 descriptors: it carries none"}
        out = _ask_raw(path, _frame({"version": 1, "request": "dump-memory"}))
        assert out["ok"] is False and out["error"].startswith("unknown request 'dump-memory': the attach socket "
                                                               "takes a guest's hello or")
        out = _ask_raw(path, struct.pack(">I", 1 << 30) + b"{")
        assert out in ({}, {"ok": False, "error": f"attach message of {1 << 30} bytes is larger than the limit "
                                                  "65536"})
        out = _ask_raw(path, struct.pack(">I", 5) + b"\xff\xfe{[x")
        assert out.get("ok") is False or out == {}
        nobody = _as_uid(NOBODY, lambda: _ask_raw(path, _frame({"version": 1, "request": "status"})))
        err = nobody["result"]["error"]
        assert err.startswith("status refused to pid ") and f"of uid {NOBODY}: this agent tells root and its own " \
            f"uid {os.geteuid()} only" in err
        r = migrate_cmd("status", "--attach", path, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["role"] == "dest"
        errors = lm.dest.errors()
        assert any("carried 2 descriptors" in e for e in errors)
        assert lm.dest.p.poll() is None


@pytest.mark.timeout(60)
def test_the_control_socket_is_private_and_bounded(reachable):
    """0700 directory, 0600 socket; another uid is refused; a request too long,
    an unknown one and a silent client are each dropped, and the next asker
    is answered; the client will not ask a socket of another uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to ask as another uid")
    tmp_path = reachable
    path = str(tmp_path / "ctl" / "s.sock")
    ctl = ControlSocket(path, lambda: {"role": "source", "pid": os.getpid(), "migrations": []}).start()
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert query(path, {"request": "status"})["role"] == "source"
        assert _ask_raw(path, _frame({"request": "reboot"}))["error"].startswith("unknown request 'reboot'")
        try:
            out = _ask_raw(path, struct.pack(">I", 1 << 20) + b"x" * 100)
        except ConnectionResetError:
            out = {}   # (its unread bytes may reset the connection before the answer is read)
        assert out in ({}, {"ok": False, "error": f"control request of {1 << 20} bytes: at most 4096 are taken"})
        out = _ask_raw(path, struct.pack(">I", 3) + b"{x]")
        assert out["ok"] is False and out["error"].startswith("control request is not JSON")
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(path)
        t0 = time.monotonic()
        assert query(path, {"request": "status"}, timeout=10)["role"] == "source"
        assert time.monotonic() - t0 < 5   # the silent one was given 2 s
        assert silent.recv(10) == b""      # and then closed
        silent.close()
        # opened up here, as a mistake would: the uid check is what refuses then
        os.chmod(os.path.dirname(path), 0o711)
        os.chmod(path, 0o666)
        out = _as_uid(NOBODY, lambda: _ask_raw(path, _frame({"request": "status"})))
        assert out["result"] == {"ok": False, "error": "not authorised: this socket answers root and its own uid "
                                 "only"}
    finally:
        ctl.close()
    assert not os.path.exists(path)
    with pytest.raises(StatusError, match="must be a directory of uid .* with mode 0700"):
        ControlSocket(path, dict)   # its directory is 0711 now

    # a listener of another uid is not asked
    other = str(tmp_path / "other")
    os.mkdir(other)
    os.chmod(other, 0o777)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover (child)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(os.path.join(other, "s.sock"))
            s.listen(1)
            os.write(w, b"x")
            s.settimeout(10)
            try:
                s.accept()
                time.sleep(1)
            except OSError:
                pass
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(StatusError, match=f"is served by uid {NOBODY}, neither root nor ours: not asking it"):
            query(os.path.join(other, "s.sock"), {"request": "status"})
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- the progress line ------------------------------------------------------
def _read_all(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:   # the slave side closed (EIO)
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("terminal", [True, False], ids=["pty", "pipe"])
def test_progress_line_only_on_a_terminal(tmp_path, host, terminal):
    """Both agents draw percent, GB/s, ETA, demand faults and p99 on a stderr
    that is a terminal, redrawn in place; on a pipe, nothing of the kind; with
    --json stdout stays JSON lines either way."""
    with LocalMigration(str(tmp_path), 256 * M, seed=3, pattern="random", vcpus=2) as lm:
        lm.make_image()
        procs = {}
        fds = {}
        for name in ("dest", "source"):
            if terminal:
                master, slave = os.openpty()
            else:
                master, slave = os.pipe()
            fds[name] = (master, slave)
        try:
            dest = subprocess.Popen([sys.executable, "-m", "migrate", "dest", "--listen", "127.0.0.1:0",
                                     "--attach", lm.sock, "--json"], stdout=subprocess.PIPE,
                                    stderr=fds["dest"][1], text=True)
            procs["dest"] = dest
            listening = json.loads(dest.stdout.readline())
            assert listening["event"] == "listening"
            lm.address = listening["address"]
            lm.start_guest()
            source = subprocess.Popen([sys.executable, "-m", "migrate", "source", "--ram", lm.image, "--to",
                                       lm.address, "--json", "--push-streams", "1", "--max-rate", "60M"],
                                      stdout=subprocess.PIPE, stderr=fds["source"][1], text=True)
            procs["source"] = source
            for _, slave in fds.values():
                os.close(slave)
            # hold the guest for a while so that the line is drawn a few times
            time.sleep(1.5)
            os.kill(lm.guest.p.pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(lm.guest.p.pid, signal.SIGCONT)
            err = {name: _read_all(fds[name][0], procs[name], 90).decode(errors="replace") for name in procs}
            outs = {name: p.communicate(timeout=60)[0] for name, p in procs.items()}
            assert procs["source"].returncode == 0 and procs["dest"].returncode == 0, err
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            for master, _ in fds.values():
                os.close(master)
        for name in ("dest", "source"):
            assert all(json.loads(line)["event"] for line in outs[name].splitlines() if line.strip())
            if terminal:
                assert "GB/s  ETA " in err[name] and "demand faults " in err[name], err[name]
                assert ("  p99 " in err[name]) == (name == "dest")   # (only the destination times faults)
                assert "\r" in err[name] and "\x1b[K" in err[name]
                assert "%" in err[name]
            else:
                assert "GB/s" not in err[name] and "\x1b[K" not in err[name] and "\r" not in err[name], err[name]


# -- over the network -------------------------------------------------------
@pytest.mark.timeout(120)
def test_status_over_grpc_tells_a_peer_only_its_own_migrations(tmp_path, host):
    """`migrate status --to` under mutual TLS: an allowed peer sees the guests
    nobody has opened yet and the migrations it opened, not another peer's;
    a certificate not allowed is refused with nothing of the guest; no
    token in any answer."""
    pytest.importorskip("cryptography", reason="needs cryptography for the certificates")
    from migrate.wire.certs import write_certs

    with LocalMigration(str(tmp_path), 256 * M, seed=9, pattern="random", vcpus=2, tls=True,
                        dest_args=("--allow-source", "operator"),
                        source_args=("--push-streams", "1", "--max-rate", "20M")) as lm:
        lm.make_image()
        files = lm.tls._files()
        extra = write_certs(lm.tls.dir, ["operator", "stranger"])
        lm.start_dest()

        def status(name: str, files_of=None) -> subprocess.CompletedProcess:
            f = files_of or extra
            return migrate_cmd("status", "--to", lm.address, "--json", "--tls-cert", f[name], "--tls-key",
                               f[name + ".key"], "--tls-ca", files["ca"], "--dest-name", "dest")

        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        r = status("operator")
        assert r.returncode == 0, r.stderr
        [m] = json.loads(r.stdout)["migrations"]
        assert m["state"] == "attached" and "attach" not in json.loads(r.stdout)

        r = status("stranger")
        assert r.returncode == 1
        assert r.stderr.startswith(f"status: {lm.address}: PERMISSION_DENIED: ") and "session" not in r.stderr

        lm.start_source()
        wait_until_received(lm, 10)
        os.kill(lm.guest.p.pid, signal.SIGSTOP)
        try:
            r = status("operator")
            assert r.returncode == 0 and json.loads(r.stdout)["migrations"] == []   # the source's, not ours
            r = status("source", files)
            assert r.returncode == 0, r.stderr
            [m] = json.loads(r.stdout)["migrations"]
            assert m["state"] == "running" and 0 < m["pages_received"] < m["pages_total"]
            assert m["peer"].startswith("source") and "token" not in r.stdout
        finally:
            os.kill(lm.guest.p.pid, signal.SIGCONT)
        assert lm.source.wait(120) == 0, lm.source.errors()


@pytest.mark.timeout(60)
def test_status_over_plaintext_grpc_from_loopback(tmp_path):
    with LocalMigration(str(tmp_path), 16 * M) as lm:
        lm.start_dest()
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        r = migrate_cmd("status", "--to", lm.address, "--json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["attach"] == lm.sock and [m["state"] for m in d["migrations"]] == ["attached"]
        r = migrate_cmd("status", "--to", "127.0.0.1:1", "--timeout", "2")
        assert r.returncode == 1 and r.stderr.startswith("status: 127.0.0.1:1: ")


@pytest.mark.timeout(60)
def test_a_source_whose_default_control_directory_is_taken_goes_on_without_one(tmp_path, host):
    """Another user made the default control directory first: the source says
    it has no control socket and migrates; one given --control there fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another uid")
    run = tmp_path / "run"
    taken = run / f"migrate-{os.geteuid()}"
    taken.mkdir(parents=True)
    os.chown(taken, NOBODY, NOBODY)
    with LocalMigration(str(tmp_path), 16 * M) as lm:
        lm.make_image()
        lm.start_dest()
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(run)}
        from migrate.sim.localrun import Proc
        src = Proc("source", ["source", "--ram", lm.image, "--to", lm.address, "--json"], env=env)
        lm.procs.append(src)
        ev = src.wait_event("control", 30)
        assert ev["control"] is None and ev["message"].startswith(f"no control socket ({taken}, the control "
                                                                  "socket's directory, must be a directory of uid")
        assert src.wait(60) == 0
        bad = Proc("source", ["source", "--ram", lm.image, "--to", lm.address, "--json", "--control",
                              str(taken / "s.sock")])
        lm.procs.append(bad)
        assert bad.wait(30) == 2
        assert bad.errors()[0].startswith("control socket: ")


@pytest.mark.timeout(60)
def test_status_over_plaintext_from_another_host_is_refused(tmp_path, split_network):
    """A destination on a second host (a network namespace) in plaintext
    (--insecure on both ends): a Status call from here is not authenticated
    and is refused, naming nothing of the guest; without --insecure the
    client will not even ask."""
    net = split_network
    with LocalMigration(str(tmp_path), 16 * M, dest_listen=f"{net.there}:0", dest_prefix=net.exec,
                        tls=False, dest_args=("--insecure",)) as lm:
        lm.start_dest()
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        r = migrate_cmd("status", "--to", lm.address, "--insecure", "--json")
        assert r.returncode == 1
        assert r.stderr == (f"status: {lm.address}: PERMISSION_DENIED: Status refused: it is told over mutual "
                            "TLS, or in plaintext to this host's loopback only (or ask `migrate status --attach` "
                            "on the host)\n")
        r = migrate_cmd("status", "--to", lm.address)
        assert r.returncode == 1 and r.stderr.startswith("status: ") and "--insecure" in r.stderr


@pytest.mark.timeout(120)
def test_status_says_paused_while_the_guest_waits_for_a_new_source(tmp_path, host):
    with LocalMigration(str(tmp_path), 256 * M, seed=13, pattern="random", vcpus=2,
                        source_args=("--push-streams", "1", "--max-rate", "40M")) as lm:
        lm.make_image()
        lm.start_dest()
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        first = lm.start_source()
        wait_until_received(lm, 10)
        first.p.kill()
        first.p.wait(10)
        lm.dest.wait_event("disconnected", 30)
        [m] = json.loads(migrate_cmd("status", "--attach", lm.sock, "--json").stdout)["migrations"]
        assert m["state"] == "paused" and 0 < m["pages_received"] < m["pages_total"]
        second = lm.start_source()
        assert second.wait(120) == 0, second.errors()
        assert lm.guest.wait(60) == 0 and lm.guest.summary()["verified"] is True


def test_a_new_control_socket_removes_those_of_sources_that_died(tmp_path):
    """A source killed with SIGKILL leaves its source-PID.sock behind; the next
    source to open its control socket in that directory removes it, and
    leaves a live source's socket and any other name alone."""
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stale = []
    for pid in (dead.pid,):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / f"source-{pid}.sock"))
        s.close()
        stale.append(d / f"source-{pid}.sock")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / f"source-{live.pid}.sock"))
        s.close()
        (d / "notes.sock").write_text("not ours")
        ctl = ControlSocket(str(d / f"source-{os.getpid()}.sock"), lambda: {}).start()
        try:
            assert not any(p.exists() for p in stale)
            assert (d / f"source-{live.pid}.sock").exists()
            assert (d / "notes.sock").read_text() == "not ours"
        finally:
            ctl.close()
    finally:
        live.kill()
        live.wait(timeout=30)

"""Issue 19: shaped links and demand ahead of push. The link is real (network
namespaces, a veth pair, tbf and htb on this kernel); the marks and the
pacing are read back from the kernel with getsockopt, on the sockets the
source agent really uses (pidfd_getfd) and on the link's queues."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_bench import _session_pids

from migrate.source.push import LinkPacer
from migrate.wire import tcp

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    ls.close()
    return c, s


def test_mark_urgent_sets_priority_and_dscp_ef():
    c, s = _pair()
    try:
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 0
        tcp.mark_urgent(c)
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == tcp.URGENT_PRIORITY == 6
        assert c.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) >> 2 == tcp.DSCP_EF == 46
    finally:
        c.close()
        s.close()


class _Flows:
    """Two loopback TCP connections, each drained by a reader thread, with
    bulk writers that run while `bulk` is set."""

    def __init__(self):
        self.pairs = [_pair() for _ in range(2)]
        self.socks = [c for c, _ in self.pairs]
        self.bulk = threading.Event()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._drain, args=(s,), daemon=True) for _, s in self.pairs]
        self.threads += [threading.Thread(target=self._write, args=(c,), daemon=True) for c in self.socks]
        for t in self.threads:
            t.start()

    def _drain(self, sock):
        while not self.done.is_set() and sock.recv(1 << 20):
            pass

    def _write(self, sock):
        chunk = b"x" * (1 << 20)
        while not self.done.is_set():
            if self.bulk.wait(0.05):
                try:
                    sock.sendall(chunk)
                except OSError:
                    return

    def close(self):
        self.done.set()
        for c, s in self.pairs:
            c.shutdown(socket.SHUT_RDWR)
            s.close()
            c.close()


def test_link_pacer_caps_at_its_share_of_the_highest_recent_rate():
    """Driven with its clock given, over real connections: unpaced while it
    measures, each stream capped at its share of 0.95 x what the peer
    acknowledged, the cap lifted to probe; a lower probe keeps the cap until
    it is the highest of the last HISTORY."""
    flows = _Flows()
    told = []
    pacer = LinkPacer(on_rate=lambda rate, cap: told.append((rate, cap)))
    socks = flows.socks
    try:
        for c in socks:
            pacer.add(c)
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == LinkPacer.NOTSENT_LOWAT
            assert tcp.max_pacing_rate(c) is None
        flows.bulk.set()
        pacer.tick(100.0)                      # the first tick starts the measurement
        time.sleep(0.2)
        pacer.tick(100.0 + LinkPacer.MEASURE_S / 2)
        assert pacer.phase == "measure" and pacer.cap is None, "moved on before MEASURE_S"
        time.sleep(0.2)
        pacer.tick(101.0)
        assert pacer.phase == "cruise" and pacer.rate > 0
        first = pacer.rate
        want = int(0.95 * first / 2)
        assert [tcp.max_pacing_rate(c) for c in socks] == [want, want]
        assert told == [(first, want)]

        def probe(at: float, lasting: float) -> None:
            pacer.tick(at)                     # cruise over: probe, unpaced
            assert pacer.phase == "probe"
            assert [tcp.max_pacing_rate(c) for c in socks] == [None, None]
            for _ in range(3):
                time.sleep(0.1)
                pacer.tick(at + LinkPacer.PROBE_S / 2)   # (samples the app-limited mark)
            pacer.tick(at + lasting)
            assert pacer.phase == "cruise"

        # probes that (by the clock given) took 1e6 s measure a far slower link
        t = 101.0 + LinkPacer.CRUISE_S
        for i in range(LinkPacer.HISTORY - 1):
            probe(t, 1e6)
            t += 1e6 + LinkPacer.CRUISE_S
            assert pacer.rate == first and [tcp.max_pacing_rate(c) for c in socks] == [want, want], i
        probe(t, 1e6)
        t += 1e6 + LinkPacer.CRUISE_S
        assert pacer.rate < first / 100, "the fast measurement aged out"
        slow = pacer.cap
        assert [tcp.max_pacing_rate(c) for c in socks] == [slow, slow] and 0 < slow < want

    finally:
        flows.close()


def test_link_pacer_does_not_pace_a_push_this_host_limits():
    """Streams that never fill the path (the kernel's app-limited mark) say
    nothing about the link: no cap (a host whose CPU limits the push would
    otherwise pace it to its own slowest moment)."""
    flows = _Flows()
    told = []
    pacer = LinkPacer(on_rate=lambda rate, cap: told.append((rate, cap)))
    try:
        for c in flows.socks:
            pacer.add(c)
        pacer.tick(0.0)
        for c in flows.socks:
            c.sendall(b"y" * 1000)
        time.sleep(0.1)
        assert all(tcp.tcp_app_limited(c) for c in flows.socks)
        pacer.tick(0.2)
        pacer.tick(1.0)
        assert pacer.phase == "cruise"
        assert [tcp.max_pacing_rate(c) for c in flows.socks] == [None, None]
        assert told and told[0][1] is None and told[0][0] > 0
    finally:
        flows.close()


# -- the shaped link --------------------------------------------------------------
@pytest.fixture(scope="module")
def link_ok():
    from benchmarks.link import unavailable
    why = unavailable()
    if why:
        pytest.skip(why)


def _mine(tag: str) -> list[str]:
    from benchmarks.link import netns_list
    return [n for n in netns_list() if n.startswith(tag)]


def test_shaped_link_is_made_and_fully_removed(link_ok):
    from benchmarks.link import ShapedLink, netns_pids
    with ShapedLink("1gbit") as link:
        tag = link.src_ns.rsplit("-", 1)[0]
        assert sorted(_mine(tag)) == sorted([link.src_ns, link.dst_ns])
        for ns, dev in ((link.src_ns, link.src_dev), (link.dst_ns, link.dst_dev)):
            q = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
            assert "qdisc tbf 1: root" in q and "rate 1Gbit" in q and "qdisc htb 10: parent 1:1" in q, q
            f = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", dev, "parent", "10:"],
                               capture_output=True, text=True).stdout
            assert "flowid 10:10" in f and "00b80000/00fc0000" in f, f   # DSCP EF -> the urgent band
        # a process left running in a namespace is killed with it
        sleeper = subprocess.Popen([*link.dst_prefix, "sleep", "300"])
        deadline = time.monotonic() + 10
        while sleeper.pid not in netns_pids(link.dst_ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        guard = link.guard.pid
    assert _mine(tag) == []
    assert sleeper.wait(10) == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{guard}") or open(f"/proc/{guard}/stat").read().split()[2] == "Z"


def test_shaped_link_removed_when_its_owner_is_killed(link_ok, tmp_path):
    """SIGKILL leaves no chance to clean up: the link's guard does it (the
    namespaces, what runs in them, the leftover files it was given)."""
    leftover = f"/dev/shm/migrate-link-test-{os.getpid()}"
    code = (f"import subprocess, sys, time\nfrom benchmarks.link import ShapedLink\n"
            f"link = ShapedLink('100mbit', leftovers={leftover + '*'!r}).open()\n"
            f"open({leftover!r}, 'w').close()\n"
            "p = subprocess.Popen([*link.dst_prefix, 'sleep', '300'])\n"
            "print(link.src_ns, link.dst_ns, p.pid, flush=True)\ntime.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        src, dst, sleeper = owner.stdout.readline().split()
        time.sleep(0.3)
        assert sorted(_mine(src.rsplit("-", 1)[0])) == sorted([src, dst])
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 30
        while (_mine(src.rsplit("-", 1)[0]) or os.path.exists(f"/proc/{sleeper}")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _mine(src.rsplit("-", 1)[0]) == [], "namespaces left behind"
        assert not os.path.exists(f"/proc/{sleeper}"), "a process in the namespace left running"
        assert not os.path.exists(leftover), "the leftover file stayed"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        from benchmarks.link import remove_namespaces
        remove_namespaces(_mine(f"mgl-{owner.pid}-"))
        if os.path.exists(leftover):
            os.unlink(leftover)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_bench_over_a_link_stopped_leaves_nothing(link_ok, host, tmp_path, how):
    """`migrate bench --link` stopped mid-run (SIGTERM unwinds; SIGKILL leaves
    it to the guard): no namespace, agent or RAM image stays."""
    if host.why_not("minor_shmem"):
        pytest.skip(host.why_not("minor_shmem"))
    p = subprocess.Popen([sys.executable, "-m", "migrate", "bench", "--link", "1gbit", "--no-plots",
                          "--scenario", "idle", "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    tag = f"mgl-{p.pid}-"
    seen = []
    try:
        for line in p.stderr:   # wait until the migration over the link runs
            seen.append(line)
            if "scenario 1/" in line:
                break
        time.sleep(3)           # its agents are up and the push is on the link
        assert _mine(tag), f"no link made: {''.join(seen[-5:])}"
        images = [f for f in os.listdir("/dev/shm") if f.startswith(f"migrate-bench-{p.pid}-")]
        assert images, "no RAM image while the scenario runs"
        p.send_signal(how)
        p.wait(60)
        deadline = time.monotonic() + 30
        while (_mine(tag) or _session_pids(p.pid, zombies=False)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _mine(tag) == [], "namespaces left behind"
        assert _session_pids(p.pid, zombies=False) == [], "processes the bench started are still running"
        assert [f for f in os.listdir("/dev/shm") if f.startswith(f"migrate-bench-{p.pid}-")] == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        for pid in _session_pids(p.pid, zombies=False):
            os.kill(pid, signal.SIGKILL)
        from benchmarks.link import remove_namespaces
        remove_namespaces(_mine(tag))
        for f in os.listdir("/dev/shm"):
            if f.startswith(f"migrate-bench-{p.pid}-"):
                os.unlink(os.path.join("/dev/shm", f))


# -- the agents over the link -----------------------------------------------------
_SYS_PIDFD_GETFD = 438   # x86_64, and the same number on every architecture since 5.6


def _their_sockets(pid: int) -> list[socket.socket]:
    """Copies of the TCP sockets another process holds (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            mine = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if mine < 0:
                continue
            s = socket.socket(fileno=mine)
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                out.append(s)
            else:
                s.detach()
                os.close(mine)
    finally:
        os.close(pidfd)
    return out


@pytest.mark.timeout(180)
def test_over_a_link_demand_is_marked_and_goes_first_and_the_push_is_paced(link_ok, host, tmp_path):
    """A real migration across a 200 Mbit link: on the source agent's own
    sockets, exactly one (the demand channel) carries SO_PRIORITY 6 and DSCP
    EF, and each push channel has a pacing cap under the link's rate; the
    demand replies went through the link's urgent band."""
    if host.why_not("minor_shmem"):
        pytest.skip(host.why_not("minor_shmem"))
    from benchmarks.link import ShapedLink
    from migrate.sim.localrun import LocalMigration
    with ShapedLink("200mbit") as link:
        lm = LocalMigration(str(tmp_path), 96 << 20, pattern="random", seed=3, dest_listen=f"{link.dst_addr}:0",
                            dest_prefix=link.dst_prefix, source_prefix=link.src_prefix)
        with lm:
            lm.make_image()
            lm.start_dest()
            lm.start_guest()
            lm.dest.wait_event("attached", 60)
            assert lm.tls is not None, "off loopback the agents talk TLS"
            lm.start_source()
            pace = lm.source.wait_event("pace", 60)
            socks = _their_sockets(lm.source.p.pid)
            try:
                urgent = [s for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 6]
                assert len(urgent) == 1, "one demand channel, marked"
                assert urgent[0].getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xb8
                assert urgent[0].getpeername()[0] == link.dst_addr
                paced = [s for s in socks if tcp.max_pacing_rate(s) is not None]
                assert len(paced) == 2, "the two push streams are paced"
                link_rate = 200e6 / 8
                for s in paced:
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == LinkPacer.NOTSENT_LOWAT
                    assert 0 < tcp.max_pacing_rate(s) < link_rate
                    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 0
                assert 0.5 * link_rate < pace["link_bytes_per_s"] < 1.1 * link_rate, pace
            finally:
                for s in socks:
                    s.close()
            for p in (lm.source, lm.guest, lm.dest):
                assert p.wait(120) == 0, p.stderr_lines[-5:]
            assert lm.guest.summary()["verified"]
        bands = link.qdisc_stats("src")
        assert bands["10:10"]["bytes"] > lm.dest.summary()["pages_demand"] * 4096 * 0.9, bands
        assert bands["10:20"]["bytes"] > 0.5 * (96 << 20) * 0.5, bands


def test_link_rate_is_read_as_tc_writes_it():
    from benchmarks.link import parse_rate
    assert parse_rate("10gbit") == 10_000_000_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("500mbit") == 500_000_000
    for bad in ("10G", "fast", "0gbit", ""):
        with pytest.raises(ValueError) as e:
            parse_rate(bad)
        assert str(e.value) == f"--link {bad!r}: give a rate as tc writes it, e.g. 10gbit, 1gbit or 500mbit"


def test_bench_link_refuses_a_rate_it_cannot_read():
    r = subprocess.run([sys.executable, "-m", "migrate", "bench", "--link", "10G", "--no-plots"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--link '10G': give a rate as tc writes it" in r.stderr

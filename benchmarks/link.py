"""A shaped link for the benchmark: two network namespaces joined by a veth
pair, each end shaped with tbf at the link's rate, with a prio qdisc inside
the tbf, an htb whose two priority bands let urgent packets (DSCP EF: the
demand channel) leave ahead of bulk ones (the push). The source agent runs in one
namespace, the destination agent and the guest in the other.

  with ShapedLink("10gbit") as link:
      link.src_prefix, link.dst_prefix   # `ip netns exec NS`, to start a process there
      link.dst_addr                      # the destination's address on the link
      link.floors()                      # the link's bulk rate and idle round trip

Cleanup: `close()` (also from `with`, atexit and SIGTERM/SIGINT) kills every
process left in the namespaces and deletes them (which deletes the veth pair
and its qdiscs). A guard process, started with the link, does the same when
the process that made the link dies without cleaning up (SIGKILL): it waits
for EOF on a pipe only its parent holds.

Also the peer of the link floors, run inside a namespace:
  python -m benchmarks.link sink ADDR          print the port, read to EOF, print {"bytes","seconds"}
  python -m benchmarks.link send ADDR PORT N   write N bytes
  python -m benchmarks.link pong ADDR          answer 16-byte requests with 4 KiB
  python -m benchmarks.link ping ADDR PORT N   N round trips, print the latencies (ns)
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

PREFIX = "mgl"
SRC_ADDR, DST_ADDR = "10.199.0.1", "10.199.0.2"
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}


def parse_rate(text: str) -> int:
    """tc's spelling of a rate (`10gbit`, `1gbit`, `500mbit`) -> bits a second,
    or ValueError saying how to write one."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gbit|mbit|kbit|bit)", text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--link {text!r}: give a rate as tc writes it, e.g. 10gbit, 1gbit or 500mbit")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def unavailable() -> str | None:
    """Why a shaped link cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "a shaped link needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"a shaped link needs `{tool}` (iproute2)"
    return None


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")


def netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def netns_list(prefix: str = PREFIX) -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(prefix + "-")]


def remove_namespaces(names: list[str]) -> None:
    """Kills what runs in each namespace (it would keep the namespace, its
    veth end and its qdisc alive) and deletes it. Quiet about what is gone."""
    for ns in names:
        for _ in range(50):
            pids = [p for p in netns_pids(ns) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class ShapedLink:
    """Two namespaces and a veth pair shaped at `rate` (tc's spelling) both ways."""

    def __init__(self, rate: str, leftovers: str = "", bands: bool = True):
        """leftovers: a glob of files (e.g. the bench's RAM images in /dev/shm)
        the guard also removes if the process that made the link is killed.
        bands=False: tbf alone, one FIFO (what the marks are up against on a
        link whose queue does not read them)."""
        self.rate = rate
        self.bands = bands
        self.leftovers = leftovers
        self.bps = parse_rate(rate)
        tag = f"{PREFIX}-{os.getpid()}-{id(self) & 0xfff:x}"
        self.src_ns, self.dst_ns = f"{tag}-src", f"{tag}-dst"
        self.src_dev, self.dst_dev = "mgl-s", "mgl-d"
        self.src_addr, self.dst_addr = SRC_ADDR, DST_ADDR
        self.guard: subprocess.Popen | None = None
        self._guard_w: int | None = None
        self._prev_handlers: dict = {}
        self.made = False

    @property
    def src_prefix(self) -> tuple:
        return ("ip", "netns", "exec", self.src_ns)

    @property
    def dst_prefix(self) -> tuple:
        return ("ip", "netns", "exec", self.dst_ns)

    # -- making and unmaking ------------------------------------------------------
    def open(self) -> ShapedLink:
        self._start_guard()
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            # a handler already there (the CLI's: SIGTERM unwinds like ^C) is
            # kept: unwinding reaches close() through `with`. (Off the main
            # thread no handler can be set: the guard still cleans up.)
            if signal.getsignal(sig) in (signal.SIG_DFL, None) and threading.current_thread() is threading.main_thread():
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            _run("ip", "netns", "add", self.src_ns)
            _run("ip", "netns", "add", self.dst_ns)
            self.made = True
            _run("ip", "link", "add", self.src_dev, "netns", self.src_ns, "type", "veth",
                 "peer", "name", self.dst_dev, "netns", self.dst_ns)
            for ns, dev, addr in ((self.src_ns, self.src_dev, self.src_addr), (self.dst_ns, self.dst_dev, self.dst_addr)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                self._shape(ns, dev)
        except BaseException:
            self.close()
            raise
        return self

    def _shape(self, ns: str, dev: str) -> None:
        """tbf at the rate, and inside it an htb used only for its priority
        bands: class 10:10 (prio 0) takes DSCP EF (a u32 filter: the demand
        channel's mark, which also comes from other hosts), class 10:20
        (prio 1) everything else. Both classes may send the whole rate, so
        htb always serves 10:10 first; tbf takes its next packet from the
        htb, so an urgent packet waits for the one packet being sent, never
        for the bulk queued behind it. The bucket holds about 1 ms at the
        rate (at least 64 KiB: tbf would split larger GSO packets). This
        kernel has no prio or mqprio qdisc (docs/links.md: real NICs)."""
        burst = max(64 << 10, self.bps // 8 // 1000)
        tc = ("tc", "-n", ns)
        _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", self.rate,
             "burst", str(burst), "latency", "50ms")
        if not self.bands:
            return
        _run(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "htb", "default", "20")
        # (htb's own buckets are made deep enough never to hold a packet back:
        # the tbf shapes, the htb only orders)
        both, deep = str(2 * self.bps) + "bit", str(8 * burst)
        _run(*tc, "class", "add", "dev", dev, "parent", "10:", "classid", "10:1", "htb", "rate", both,
             "ceil", both, "burst", deep, "cburst", deep, "quantum", "60000")
        for cls, prio in (("10:10", "0"), ("10:20", "1")):
            _run(*tc, "class", "add", "dev", dev, "parent", "10:1", "classid", cls, "htb", "rate", self.rate,
                 "ceil", both, "burst", deep, "cburst", deep, "prio", prio, "quantum", "60000")
        _run(*tc, "filter", "add", "dev", dev, "parent", "10:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "dsfield", "0xb8", "0xfc", "flowid", "10:10")

    def _start_guard(self) -> None:
        """A process in its own session that outlives a SIGKILL of this one and
        then removes the namespaces: it reads a pipe whose write end only this
        process holds, so EOF means this process is gone."""
        r, w = os.pipe()
        os.set_inheritable(r, True)
        code = ("import glob,os,sys\nfrom benchmarks.link import remove_namespaces\n"
                f"fd={r}\nwhile os.read(fd,64): pass\nremove_namespaces(sys.argv[2:])\n"
                "for f in glob.glob(sys.argv[1]) if sys.argv[1] else ():\n    os.unlink(f)\n")
        self.guard = subprocess.Popen([sys.executable, "-c", code, self.leftovers, self.src_ns, self.dst_ns],
                                      pass_fds=(r,),
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r)
        self._guard_w = w

    def _on_signal(self, signum, _frame) -> None:
        self.close()
        sys.exit(128 + signum)

    def close(self) -> None:
        if self.made:
            remove_namespaces([self.src_ns, self.dst_ns])
            self.made = False
        if self.guard is not None:
            # its work is done here; ended before the pipe closes, so that it
            # leaves the leftovers to their owner, who is alive and may use them
            if self.guard.poll() is None:
                self.guard.kill()
            self.guard.wait(30)
            self.guard = None
        if self._guard_w is not None:
            os.close(self._guard_w)
            self._guard_w = None
        for sig, h in self._prev_handlers.items():
            signal.signal(sig, h)
        self._prev_handlers.clear()
        atexit.unregister(self.close)

    def __enter__(self) -> ShapedLink:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the link does ------------------------------------------------------
    def qdisc_stats(self, side: str = "src") -> dict:
        """Bytes and packets sent by each band (htb class) of one end: 10:10
        urgent, 10:20 bulk."""
        ns, dev = (self.src_ns, self.src_dev) if side == "src" else (self.dst_ns, self.dst_dev)
        out = subprocess.run(["tc", "-n", ns, "-s", "class", "show", "dev", dev], capture_output=True,
                             text=True, timeout=30).stdout
        return {m.group(1): {"bytes": int(m.group(2)), "packets": int(m.group(3))}
                for m in re.finditer(r"class htb (10:[12]0) [^\n]*\n Sent (\d+) bytes (\d+) pkt", out)}

    def floors(self, log=print) -> dict:
        """The link's bulk rate (one TCP stream from the source's namespace to
        the destination's, plaintext, about 1.5 s of data, best of 2) and its
        idle round trip (16-byte request, 4 KiB reply, 2000 rounds)."""
        nbytes = max(64 << 20, int(self.bps / 8 * 1.5))
        runs = [self._bulk(nbytes) for _ in range(2)]
        gbps = max(runs)
        lat = np.sort(self._pingpong(2000)) / 1000.0

        def q(p):
            return round(float(lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))]), 2)

        out = {"rate": self.rate, "rate_gbps": self.bps / 8e9, "bulk_gbps": round(gbps, 4),
               "bulk_gbps_reps": [round(x, 4) for x in runs], "rtt_p50_us": q(50), "rtt_p99_us": q(99),
               "rtt_n": int(len(lat))}
        log(f"  link {self.rate}: bulk {gbps:.3f} GB/s ({gbps * 8:.2f} Gbit/s), idle 4 KiB round trip p50 "
            f"{out['rtt_p50_us']} us p99 {out['rtt_p99_us']} us")
        return out

    def _peer(self, prefix: tuple, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*prefix, sys.executable, "-m", "benchmarks.link", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def _bulk(self, nbytes: int) -> float:
        sink = self._peer(self.dst_prefix, "sink", self.dst_addr)
        try:
            port = sink.stdout.readline().strip()
            send = self._peer(self.src_prefix, "send", self.dst_addr, port, str(nbytes))
            send.communicate(timeout=120)
            res = json.loads(sink.communicate(timeout=60)[0])
            return res["bytes"] / res["seconds"] / 1e9
        finally:
            for p in (sink,):
                if p.poll() is None:
                    p.kill()
                    p.wait(10)

    def _pingpong(self, n: int) -> np.ndarray:
        pong = self._peer(self.dst_prefix, "pong", self.dst_addr)
        try:
            port = pong.stdout.readline().strip()
            ping = self._peer(self.src_prefix, "ping", self.dst_addr, port, str(n))
            out, err = ping.communicate(timeout=120)
            if ping.returncode:
                raise RuntimeError(f"link ping-pong failed: {err.strip()}")
            return np.asarray(json.loads(out), dtype=np.float64)
        finally:
            if pong.poll() is None:
                pong.kill()
                pong.wait(10)


# -- the floors' peer, run inside a namespace ------------------------------------
def _listen(addr: str) -> socket.socket:
    ls = socket.socket()
    ls.bind((addr, 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    return ls


def _recv_exact(c: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        k = c.recv_into(view[got:])
        if not k:
            return False
        got += k
    return True


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "sink":
        c, _ = _listen(argv[1]).accept()
        buf = memoryview(bytearray(4 << 20))
        n = c.recv_into(buf)
        t0, total = time.perf_counter(), n
        while n:
            n = c.recv_into(buf)
            total += n
        print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t0}), flush=True)
    elif mode == "send":
        c = socket.create_connection((argv[1], int(argv[2])))
        left, chunk = int(argv[3]), b"\1" * (4 << 20)
        while left > 0:
            left -= c.send(chunk[:left])
        c.close()
    elif mode == "pong":
        c, _ = _listen(argv[1]).accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, reply = memoryview(bytearray(16)), b"p" * 4096
        while _recv_exact(c, req):
            c.sendall(reply)
    elif mode == "ping":
        c = socket.create_connection((argv[1], int(argv[2])))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply, lat = memoryview(bytearray(4096)), []
        for i in range(int(argv[3]) + 100):
            t0 = time.perf_counter_ns()
            c.sendall(b"q" * 16)
            _recv_exact(c, reply)
            if i >= 100:   # the first hundred warm up
                lat.append(time.perf_counter_ns() - t0)
        print(json.dumps(lat), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

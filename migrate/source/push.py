"""The source's background push: the streams that send every page the demand
channel did not, in the scheduler's order (migrate.source.scheduler), either
as runs written by C on raw TCP channels or as zstd PageBatch messages over
gRPC; how they share --max-rate; and how much a raw push channel may keep in
flight (sized from the connection's round trip). The session
(migrate.source.session) opens the channels, runs each stream on a thread of
its own and decides what a failure means."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc

from migrate._binding import ffi
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.source.compress import PushStream
from migrate.source.ramfile import RamImage
from migrate.source.scheduler import Scheduler
from migrate.wire.protocol import BatchEncoder
from migrate.wire.tcp import set_max_pacing_rate, set_notsent_lowat, tcp_app_limited, tcp_bytes_acked, tcp_rtt_us

#: --push-buffer auto: bytes in flight a push stream may keep, sized for this
#: rate over the connection's round trip (between 256 KiB and the kernel's own
#: autotuning, which takes over on longer links).
PUSH_BUFFER_RATE = 10e9
PUSH_BUFFER_MIN = 256 << 10
PUSH_BUFFER_MAX = 4 << 20


def push_send_buffer(sock: socket.socket, want: int | None) -> int | None:
    """Sets the send buffer of a push stream. A multi-megabyte buffer (what
    autotuning grows to) on a short, fast link only queues push data ahead of
    demand replies (on loopback they share one per-CPU backlog) and lets it go
    cold in memory before it is read; a buffer of about rate x RTT keeps the
    link full. want: bytes, 0 for the kernel's autotuning, None for auto (RTT
    based; autotuning when the RTT is unknown or long). Returns what was set
    (None: autotuning)."""
    if want is None:
        rtt = tcp_rtt_us(sock)
        if rtt is None:
            return None
        want = int(PUSH_BUFFER_RATE * rtt * 1e-6)
        if want > PUSH_BUFFER_MAX:
            return None
        want = max(PUSH_BUFFER_MIN, want)
    if want <= 0:
        return None
    # the kernel doubles what it is given (bookkeeping overhead): ask for half
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1, want // 2))
    return want


class Push:
    """One session's background push, all its streams: they take their pages
    from one scheduler, share --max-rate (bytes of guest RAM a second, 0: no
    limit) and add what they sent to one tally. Each stream method runs on its
    own thread until the pages run out or `stop` is set."""

    def __init__(self, ram: RamImage, sched: Scheduler, demand, stop: threading.Event, *, streams: int,
                 max_rate: int, link: LinkPacer | None = None, compress: str = "off", zstd: bool = False):
        self.ram = ram
        self.sched = sched
        # the session's DemandServer (migrate.source.demand), which outlives the
        # streams: its struct's busy flag, and the RAM struct it shares with
        # the raw push (holes, zero-block scan)
        self.demand = demand
        self.stop = stop
        self.streams = streams
        self.max_rate = max_rate
        self.link = link        # keeps the raw streams just under the link's rate (None: not paced)
        self.lock = threading.Lock()
        self.pages = 0          # pages pushed, every stream
        self.wire_bytes = 0     # bytes they took on the wire
        # raw streams: source --compress, and whether both ends can (zstd)
        self.compress, self.zstd = compress, zstd
        self.raw_streams: list[PushStream] = []

    def raw(self, sock: socket.socket) -> int:
        """Pushes over a raw channel: C writes runs straight from the RAM
        mapping (GIL released). At the end of the pages the write side is shut
        down (the destination sees EOF) and 0 returned; a failed write returns
        its -errno, for migrate.wire.tcp.channel_end."""
        pace = Pacer(self.max_rate, self.streams, self.stop)
        # the demand server's busy flag: with large pages the push holds back
        # while it writes a reply (C decides by page size)
        hold = ffi.addressof(self.demand.d, "busy")
        stream = PushStream(self.compress, self.zstd)
        with self.lock:
            self.raw_streams.append(stream)
        while not self.stop.is_set():
            pace.wait()
            if self.link is not None:
                self.link.tick()
            runs = self.sched.next_runs()
            if not runs:
                break
            pages = sum(count for _, count in runs)
            pace.pushed(pages * self.ram.page_size)
            # large pages go sparse (zero blocks left out) as on the demand
            # channel when the destination agreed (src_ram.block_size), unless
            # the batch is compressed
            wire0 = int(stream.st.wire_bytes)
            rc = stream.send(sock.fileno(), self.demand.r,
                             ffi.new("uint64_t[]", [x for run in runs for x in run]), len(runs), hold)
            if rc < 0:
                return rc
            self._count(pages, int(stream.st.wire_bytes) - wire0)
        sock.shutdown(socket.SHUT_WR)   # end of stream: the destination sees EOF
        return 0

    def grpc(self, ch: grpc.Channel, session: str, token: bytes, compress: bool) -> None:
        """Pushes PageBatch messages over a gRPC channel (zstd when compress);
        a failed call raises its grpc.RpcError. token: the session's, from
        its Welcome."""
        r = self.demand.r
        enc = BatchEncoder(self.ram.addr, self.ram.page_size, self.sched.per_batch, compress,
                           r.holes, ffi.addressof(r, "holes_end"), ffi.addressof(r, "hole_pages"))
        pbg.MigrationStub(ch).Push(self.batches(session, token, enc))

    def batches(self, session: str, token: bytes, enc: BatchEncoder) -> Iterator[pb.PageBatch]:
        """The Push call's request stream: the session's id and token, then a
        batch at a time until the pages run out."""
        yield pb.PageBatch(session_id=session, token=token)
        pace = Pacer(self.max_rate, self.streams, self.stop)
        while not self.stop.is_set():
            pace.wait()
            pages = self.sched.next_batch()
            if not pages:
                return
            pace.pushed(len(pages) * self.ram.page_size)
            b = enc.encode(pages)
            self._count(len(pages), len(b.data))
            yield b

    def compression(self) -> dict:
        """What the raw streams' compression did, all streams and each
        (summary and events): page bytes and wire bytes of their non-zero
        pages, the fraction of batches compressed."""
        with self.lock:
            streams = [s.stats.as_dict() for s in self.raw_streams]
        page = sum(s["page_bytes"] for s in streams)
        wire = sum(s["wire_bytes"] for s in streams)
        batches = sum(s["batches"] for s in streams)
        return {"mode": self.compress if self.zstd else "off", "page_bytes": page, "wire_bytes": wire,
                "ratio": round(wire / page, 3) if page else None,
                "batches_compressed_fraction":
                    round(sum(s["batches_compressed"] for s in streams) / batches, 3) if batches else 0.0,
                "streams": streams}

    def _count(self, pages: int, wire_bytes: int) -> None:
        with self.lock:
            self.pages += pages
            self.wire_bytes += wire_bytes


class Pacer:
    """Holds one push stream, started when this is built, to its share of
    --max-rate (demand replies are never held back)."""

    def __init__(self, max_rate: int, streams: int, stop: threading.Event):
        self.max_rate, self.streams = max_rate, streams   # 0: no limit
        self.stop = stop
        self.t0 = time.monotonic()
        self.done = 0       # bytes of guest RAM this stream pushed

    def wait(self) -> None:
        """Sleeps until what the stream pushed is within its share."""
        if not self.max_rate:
            return
        delay = self.t0 + self.done * self.streams / self.max_rate - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)

    def pushed(self, nbytes: int) -> None:
        self.done += nbytes


class LinkPacer:
    """Keeps a session's raw push streams just under the rate of the link they
    cross, so that the bottleneck queue stays short (a demand reply behind it
    waits less, even where nothing sorts it ahead) without leaving the link
    idle. It measures the link by what the destination acknowledges on all
    the streams together, unpaced for MEASURE_S at the start, then caps each
    stream (SO_MAX_PACING_RATE) at its share of SHARE x that rate. Every
    CRUISE_S it lifts the caps for PROBE_S and measures again. The link's rate
    is the highest of the last HISTORY measurements (BBR's windowed maximum):
    a link that got faster is followed at once, one that got slower (another
    flow on it) within HISTORY probes, and a dip of this host's own (a busy
    CPU) does not hold the push down after it. TCP_NOTSENT_LOWAT keeps what
    waits unsent in each socket short.

    A measurement the kernel marked application-limited most of the time
    (tcpi_delivery_rate_app_limited: the streams did not keep the path full,
    this host's CPU is the limit, not the link) is not the link's rate: it is
    not kept, and until one is the streams stay unpaced.

    The streams call tick() between writes; whichever finds a phase over
    moves to the next one, for every stream."""

    MEASURE_S = 0.3
    CRUISE_S = 2.0
    PROBE_S = 0.3
    SHARE = 0.95
    HISTORY = 3
    NOTSENT_LOWAT = 128 << 10

    def __init__(self, on_rate=None):
        """on_rate(rate, cap_per_stream): told each time the link is measured
        (bytes a second; cap None: not paced), for the session's events."""
        self.on_rate = on_rate
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.phase = "measure"
        self.t_phase: float | None = None     # when the phase began (first tick)
        self.acked0 = 0
        self.rate: float | None = None        # the link: the highest recent measurement, bytes a second
        self.measured: list[float] = []       # the last HISTORY measurements that were not app-limited
        self.cap: int | None = None           # each stream's cap now (None: unpaced)
        self.samples = self.app_limited = 0   # this phase: ticks, and those the kernel said app-limited

    def add(self, sock: socket.socket) -> None:
        """A stream's socket, before its first write."""
        set_notsent_lowat(sock, self.NOTSENT_LOWAT)
        self.socks.append(sock)

    def _acked(self) -> int:
        return sum(tcp_bytes_acked(s) or 0 for s in self.socks)

    def tick(self, now: float | None = None) -> None:
        if not self.lock.acquire(blocking=False):
            return   # another stream is moving the phase on
        try:
            now = time.monotonic() if now is None else now
            if self.t_phase is None:
                self.t_phase, self.acked0 = now, self._acked()
                return
            if self.phase != "cruise":
                flags = [tcp_app_limited(s) for s in self.socks]
                self.samples += 1
                self.app_limited += sum(1 for f in flags if f) * 2 > len(flags)
            dt = now - self.t_phase
            if dt < {"measure": self.MEASURE_S, "probe": self.PROBE_S}.get(self.phase, self.CRUISE_S):
                return
            acked = self._acked()
            measured = (acked - self.acked0) / dt
            if self.phase == "cruise":
                self._set(None)   # probe: unpaced, to see what the link takes now
                self.phase = "probe"
            else:
                if measured > 0 and self.app_limited * 2 <= self.samples:
                    self.measured = [*self.measured, measured][-self.HISTORY:]
                if self.measured:
                    self.rate = max(self.measured)
                    self._set(int(self.SHARE * self.rate / max(1, len(self.socks))))
                else:
                    self.rate = measured   # (what the streams did: app-limited, not the link)
                self.phase = "cruise"
                if self.on_rate is not None:
                    self.on_rate(self.rate, self.cap)
            self.t_phase, self.acked0 = now, acked
            self.samples = self.app_limited = 0
        finally:
            self.lock.release()

    def _set(self, cap: int | None) -> None:
        self.cap = cap
        for s in self.socks:
            try:
                set_max_pacing_rate(s, cap)
            except OSError:
                pass   # a stream whose socket is closing: its loop ends on its own

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

from migrate._binding import ffi, lib
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.source.ramfile import RamImage
from migrate.source.scheduler import Scheduler
from migrate.wire.protocol import BatchEncoder
from migrate.wire.tcp import tcp_rtt_us

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
                 max_rate: int):
        self.ram = ram
        self.sched = sched
        # the session's DemandServer (migrate.source.demand), which outlives the
        # streams: its struct's busy flag, and the RAM struct it shares with
        # the raw push (holes, zero-block scan)
        self.demand = demand
        self.stop = stop
        self.streams = streams
        self.max_rate = max_rate
        self.lock = threading.Lock()
        self.pages = 0          # pages pushed, every stream
        self.wire_bytes = 0     # bytes they took on the wire

    def raw(self, sock: socket.socket) -> int:
        """Pushes over a raw channel: C writes runs straight from the RAM
        mapping (GIL released). At the end of the pages the write side is shut
        down (the destination sees EOF) and 0 returned; a failed write returns
        its -errno, for migrate.wire.tcp.channel_end."""
        pace = Pacer(self.max_rate, self.streams, self.stop)
        # the demand server's busy flag: with large pages the push holds back
        # while it writes a reply (C decides by page size)
        hold = ffi.addressof(self.demand.d, "busy")
        while not self.stop.is_set():
            pace.wait()
            runs = self.sched.next_runs()
            if not runs:
                break
            pages = sum(count for _, count in runs)
            pace.pushed(pages * self.ram.page_size)
            # large pages go sparse (zero blocks left out) as on the demand
            # channel when the destination agreed (src_ram.block_size)
            rc = lib.mg_push_runs(sock.fileno(), self.demand.r,
                                  ffi.new("uint64_t[]", [x for run in runs for x in run]), len(runs), hold)
            if rc < 0:
                return rc
            self._count(pages, rc)
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

"""The source agent's session with one destination: `Source` opens it over
gRPC, serves demand on its own channel, runs the push streams, and finishes
or resumes it. Demand requests come first, then the pages after the most
recent demand (locality), then a linear scan that skips what was sent
(migrate.source.scheduler).
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import threading
import time
from dataclasses import dataclass

import grpc

from migrate._binding import ffi, lib
from migrate.errors import PEER_LOST_ERRNOS, ProtocolError, fmt_size
from migrate.report import Reporter
from migrate.host import fault_path_priority
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.wire.protocol import DEFAULT_BATCH_BYTES, DEMAND_MAGIC, PROTOCOL_VERSION, PUSH_MAGIC, BatchEncoder, channel
from migrate.wire.tcp import host_of, parse_address, set_peer_timeout
from migrate.source.ramfile import RamImage
from migrate.source.scheduler import READAHEAD_BYTES, Scheduler
from migrate.source.push import push_send_buffer
from migrate.errors import DestinationFailed, SourceError


DEST_TIMEOUT = 10.0       # seconds of silence from the destination's host before it is taken as gone


def rpc_error(e: grpc.RpcError, what: str) -> SourceError:
    code = e.code().name if hasattr(e, "code") else "?"
    details = e.details() if hasattr(e, "details") else str(e)
    return SourceError(f"{what}: destination said {code}: {details}")


def _check_resolves(target: str) -> None:
    """A destination whose name does not resolve fails now, saying so (gRPC
    would retry it for the whole connect timeout and then only say it could
    not connect). One that resolves but does not answer yet is waited for:
    the destination agent may still be starting."""
    try:
        addr = parse_address(target, "--to", "as `migrate dest --listen` printed it")
    except ValueError as e:
        raise SourceError(str(e)) from None
    try:
        socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SourceError(f"cannot resolve the destination host {target.rpartition(':')[0]!r}: {e.strerror}") from None


@dataclass
class SourceResult:
    session: str
    pages_total: int
    pages_sent_push: int
    pages_sent_demand: int
    demand_requests: int
    wire_bytes: int
    seconds: float
    finish: pb.FinishReply
    zero_blocks: int = 0        # zero blocks of large pages left out of demand replies
    prescanned: int = 0         # sparse replies whose zero blocks were found ahead of the demand
    push_zero_blocks: int = 0   # zero blocks of large pages left out of push runs
    hole_pages: int = 0         # pages sent as zero unread: holes of the RAM file


class Source:
    def __init__(self, ram: RamImage, target: str, reporter: Reporter, *, push_streams: int = 2,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, compress: bool = True, name: str = "source",
                 resume_session: str = "", connect_timeout: float = 30.0, device_state: bool = False,
                 on_session=None, transport: str = "raw", guest: str = "",
                 push_gate: threading.Event | None = None, max_rate: int = 0, push_buffer: int | None = None,
                 sparse: bool = True, dest_timeout: float = DEST_TIMEOUT):
        self.ram = ram
        self.target = target
        self.reporter = reporter
        self.push_streams = max(1, push_streams)
        self.batch_bytes = batch_bytes
        self.max_rate = max(0, max_rate)   # background bytes of guest RAM per second, all streams; 0: no limit
        self.push_buffer = push_buffer     # push stream send buffer: None auto, 0 kernel autotuning, else bytes
        self.push_buffer_set: int | None = None
        self.sparse = sparse               # large pages' zero blocks stay off the wire when the destination agrees
        self.compress = compress
        self.name = name
        self.resume_session = resume_session
        self.connect_timeout = connect_timeout
        # a destination whose host acknowledges nothing this long on a channel
        # is gone (see protocol.set_peer_timeout); 0: TCP's own many minutes
        self.dest_timeout = dest_timeout
        self.dest_lost: SourceError | None = None
        self.session = ""
        if transport not in ("raw", "grpc"):
            raise ValueError(f"push transport {transport!r}: use raw or grpc")
        self.transport = transport
        self.guest = guest
        # Background push waits for this (QEMU: until the destination guest runs,
        # so the push does not take the CPU from the device-state load); demand
        # requests are served from the start regardless.
        self.push_gate = push_gate
        # QEMU (migrate.qemu): Hello says a device-state stream follows, and
        # on_session(stub, session_id) sends it once the demand stream is served.
        self.device_state = device_state
        self.on_session = on_session
        self.errors: list[BaseException] = []
        self.wire_bytes = 0
        self.sent_push = 0
        self.count_lock = threading.Lock()
        self.stop = threading.Event()
        self.holes: PageBitmap | None = None   # pages sent unread as zero, see run() and _find_holes
        self.src_ram = None     # struct mg_src_ram: the RAM as the C senders read it (run())

    def run(self) -> SourceResult:
        t0 = time.monotonic()
        ram = self.ram
        _check_resolves(self.target)
        ctl = channel(self.target, "control")
        try:
            grpc.channel_ready_future(ctl).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise SourceError(f"cannot reach the destination at {self.target} within "
                              f"{self.connect_timeout:.0f} s: is `migrate dest --listen` running there?") from None
        stub = pbg.MigrationStub(ctl)
        hello = pb.Hello(version=PROTOCOL_VERSION, ram_size=ram.size, page_size=ram.page_size,
                         compression=[pb.COMPRESSION_ZSTD, pb.COMPRESSION_NONE] if self.compress
                         else [pb.COMPRESSION_NONE],
                         resume_session=self.resume_session, source_name=self.name, guest=self.guest,
                         has_device_state=self.device_state)
        try:
            welcome = stub.Open(hello, timeout=60)
        except grpc.RpcError as e:
            raise rpc_error(e, "open session") from None
        if welcome.version != PROTOCOL_VERSION:
            raise ProtocolError(f"destination speaks protocol version {welcome.version}, this source "
                                f"{PROTOCOL_VERSION}: run the same migrate release on both hosts")
        sid = self.session = welcome.session_id
        already = PageBitmap(ram.npages)
        if welcome.received_bitmap:
            already.load_bytes(welcome.received_bitmap)
        compress = self.compress and welcome.compression == pb.COMPRESSION_ZSTD
        per_batch = max(1, self.batch_bytes // ram.page_size)
        self.sched = Scheduler(ram.npages, per_batch, already)
        self.reporter.event("connected", f"session {sid} at {self.target}: {fmt_size(ram.size)} in "
                            f"{ram.npages} pages, {already.count()} already there", session=sid,
                            target=self.target)
        channels = [ctl]
        # everything allocated so far lives until the end: keep the collector
        # from walking it again and again while the push allocates its batches.
        # Done before any channel opens: once the demand channel is open the
        # guest runs and its faults wait on this source, and the destination
        # times the push from its first push channel.
        gc.collect()
        gc.freeze()
        sock = self._open_channel(welcome, DEMAND_MAGIC)
        r = self.src_ram = ffi.new("struct mg_src_ram *")
        r.base, r.page_size, r.npages = ram.addr, ram.page_size, ram.npages
        d = ffi.new("struct mg_demand_src *")
        d.fd = sock.fileno()
        d.ram = r
        d.sent = self.sched.sent.words
        d.max_window = max(2, READAHEAD_BYTES // ram.page_size)
        self.sched.demand = d
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        threads = [threading.Thread(target=self._demand, args=(sock, d), name="demand", daemon=True)]
        # Pages in holes of the RAM file go as zero pages without being read
        # (reading them would allocate them), once the RAM no longer changes:
        # without a gate that was so when the file was opened; with one, a
        # thread walks the file once the gate opens, and pages past its walk
        # are read meanwhile (a walk before the push took 10 ms per GiB of data).
        if self.push_gate is None and ram.open_holes is not None:
            self.holes = ram.open_holes
            r.holes, r.holes_end = self.holes.words, ram.npages
            self.reporter.event("holes", f"{self.holes.count()} of {ram.npages} pages are holes in the RAM "
                                "file (never written): sent as zero pages without reading them",
                                pages=self.holes.count())
        elif self.push_gate is not None:
            self.holes = PageBitmap(ram.npages)
            r.holes = self.holes.words
            threads.append(threading.Thread(target=self._find_holes, args=(r,), name="holes", daemon=True))
        if self.sparse and welcome.sparse_block_size == lib.MG_BLOCK and ram.page_size > lib.MG_BLOCK:
            # large pages go without their zero blocks; finding those means
            # reading them, so a thread does it ahead of the faults
            r.block_size = lib.MG_BLOCK
            self._block_bits = ffi.new("uint8_t[]", ram.npages * (ram.page_size // lib.MG_BLOCK // 8))
            self._scanned = PageBitmap(ram.npages)
            r.block_bits = self._block_bits
            r.scanned = self._scanned.words
            threads.append(threading.Thread(target=self._scan_blocks, args=(r,), name="scan", daemon=True))
        n_push = self.n_push = min(self.push_streams, max(1, welcome.push_streams or 1))
        push_socks = []
        try:
            # the demand server (and the scan) start at once: the guest faults
            # from the moment the demand channel opens; the push streams start
            # together once their channels are open
            for t in threads:
                t.start()
            pushers = []
            for i in range(n_push):
                if self.transport == "raw":
                    ps = self._open_channel(welcome, PUSH_MAGIC)
                    push_socks.append(ps)
                    pushers.append(threading.Thread(target=self._push_raw, args=(ps,), name=f"push-{i}",
                                                    daemon=True))
                else:
                    ch = channel(self.target, f"push-{i}")
                    channels.append(ch)
                    pushers.append(threading.Thread(target=self._push, args=(ch, sid, compress),
                                                    name=f"push-{i}", daemon=True))
            for t in pushers:
                threads.append(t)
                t.start()
            if self.transport == "raw":
                buf = self.push_buffer_set
                self.reporter.event("push", f"{n_push} raw push streams, send buffer "
                                    f"{fmt_size(buf) if buf else 'autotuned by the kernel'}",
                                    streams=n_push, send_buffer=buf)
            if self.on_session is not None:
                self.on_session(stub, sid)
            for t in threads[1:]:
                # the push streams (and the block scan, done long before); a
                # destination found gone meanwhile ends the wait: a gRPC push
                # would not notice for minutes (closing its channel below ends it)
                while t.is_alive():
                    t.join(0.1)
                    if self.dest_lost is not None:
                        raise self.dest_lost
            # A push channel the destination closed because every page had
            # arrived is not a failure: Finish says which it was.
            fin = self._finish(stub, sid)
            if not fin.complete:
                if fin.failed:   # the destination's reason, not what it did to our channels
                    raise DestinationFailed(f"destination ended session {sid}: {fin.error}")
                if self.errors:
                    raise self.errors[0]
                raise SourceError(f"destination did not complete session {sid}: no reason given")
        finally:
            self.stop.set()
            os.eventfd_write(self.stop_fd, 1)
            threads[0].join(5)
            sock.close()
            for ps in push_socks:
                ps.close()
            os.close(self.stop_fd)
            for ch in channels:
                ch.close()
        return SourceResult(sid, ram.npages, self.sent_push + d.readahead, d.seq, d.seq,
                            self.wire_bytes + d.bytes, time.monotonic() - t0, fin, d.zero_blocks,
                            d.prescanned, r.push_zero_blocks, r.hole_pages)

    def wait_rpc(self, fut):
        """The result of a gRPC call's future (its RpcError raised as it is); a
        destination found gone meanwhile (dest_lost, --dest-timeout on the raw
        channels) ends the wait, which the gRPC connection would not notice for
        minutes, and the call is cancelled."""
        try:
            while True:
                try:
                    return fut.result(timeout=0.1)
                except grpc.FutureTimeoutError:
                    if self.dest_lost is not None:
                        raise self.dest_lost from None
        finally:
            fut.cancel()   # nothing once it is done

    def _finish(self, stub, sid: str) -> pb.FinishReply:
        """Asks the destination how the session ended (waiting for it to end,
        after an error only briefly, and not past a destination found gone)."""
        try:
            return self.wait_rpc(stub.Finish.future(
                pb.FinishRequest(session_id=sid, timeout_seconds=5 if self.errors else 120), timeout=150))
        except grpc.RpcError as e:
            raise (self.errors[0] if self.errors else rpc_error(e, "finish")) from None

    def _channel_error(self, what: str, err: int) -> SourceError:
        """A raw channel that failed with errno err; a destination the kernel
        gave up on is recorded in dest_lost."""
        if err not in PEER_LOST_ERRNOS:
            return SourceError(f"{what} channel: {os.strerror(err)}")
        e = SourceError(f"the destination is gone: for --dest-timeout {self.dest_timeout:g} s nothing sent on the "
                        f"{what} channel was acknowledged or taken in ({os.strerror(err)}): its host is down, the "
                        "network split, or the agent hangs. Its guest keeps the pages it has and waits: once the "
                        f"destination can be reached, `migrate source --resume {self.session}` serves the rest")
        if self.dest_lost is None:
            self.dest_lost = e
        return e

    # -- streams ----------------------------------------------------------
    def _pace(self, t0: float, done: int, streams: int) -> None:
        """Sleeps until a stream that started at t0 and has pushed done bytes of
        guest RAM is within its share of --max-rate (demand replies are never
        held back)."""
        if not self.max_rate:
            return
        due = t0 + done * streams / self.max_rate
        delay = due - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)

    def _gate_open(self) -> bool:
        while self.push_gate is not None and not self.push_gate.wait(0.05):
            if self.stop.is_set():
                return False
        return True

    def _find_holes(self, d) -> None:
        """Once the gate opens (the source VM is paused): walks the RAM file's
        holes into the senders' hole map (src_ram), advancing d.holes_end as it goes
        (C, GIL released). A failure only means pages are read."""
        if not self._gate_open():
            return
        t = time.monotonic()
        try:
            found = self.ram.holes(self.holes, ffi.addressof(d, "holes_end"))
        except SourceError as e:
            self.reporter.event("holes", f"{e}: every page is read", pages=0)
            return
        finally:
            d.holes_end = self.ram.npages
        n = found.count() if found else 0
        if n:
            self.reporter.event("holes", f"{n} of {self.ram.npages} pages are holes in the RAM file (never "
                                f"written): sent as zero pages without reading them (found in "
                                f"{(time.monotonic() - t) * 1e3:.1f} ms)", pages=n)

    def _push(self, ch: grpc.Channel, sid: str, compress: bool):
        if not self._gate_open():
            return
        d = self.src_ram
        enc = BatchEncoder(self.ram.addr, self.ram.page_size, self.sched.per_batch, compress,
                           d.holes, ffi.addressof(d, "holes_end"), ffi.addressof(d, "hole_pages"))
        streams = self.n_push

        def batches():
            yield pb.PageBatch(session_id=sid)
            t0, done = time.monotonic(), 0
            while not self.stop.is_set():
                self._pace(t0, done, streams)
                pages = self.sched.next_batch()
                if not pages:
                    return
                done += len(pages) * self.ram.page_size
                b = enc.encode(pages)
                with self.count_lock:
                    self.sent_push += len(pages)
                    self.wire_bytes += len(b.data)
                yield b

        try:
            pbg.MigrationStub(ch).Push(batches())
        except grpc.RpcError as e:
            self.errors.append(rpc_error(e, "push"))
            self.stop.set()

    def _open_channel(self, welcome: pb.Welcome, magic: bytes) -> socket.socket:
        """A plain TCP channel beside gRPC (demand or raw push), opened with the
        session's token."""
        host = host_of(self.target)
        what = "demand" if magic == DEMAND_MAGIC else "push"
        try:
            sock = socket.create_connection((host, welcome.demand_port), timeout=self.connect_timeout)
        except OSError as e:
            raise SourceError(f"cannot open the {what} channel to {host}:{welcome.demand_port}: {e}") from None
        set_peer_timeout(sock, self.dest_timeout)
        if magic == DEMAND_MAGIC:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.push_buffer_set = push_send_buffer(sock, self.push_buffer)
        sock.sendall(magic + welcome.demand_token)
        sock.settimeout(None)
        return sock

    def _push_raw(self, sock: socket.socket):
        """Background pages over a raw channel: C writes runs straight from the
        RAM mapping (GIL released); the scheduler is shared with the others."""
        if not self._gate_open():
            return
        t0, done = time.monotonic(), 0
        # the demand server's busy flag: with large pages the push holds back
        # while it writes a reply (C decides by page size)
        hold = ffi.addressof(self.sched.demand, "busy") if self.sched.demand is not None else ffi.NULL
        try:
            while not self.stop.is_set():
                self._pace(t0, done, self.n_push)
                runs = self.sched.next_runs()
                if not runs:
                    break
                pages = sum(count for _, count in runs)
                done += pages * self.ram.page_size
                # large pages go sparse (zero blocks left out) as on the demand
                # channel when the destination agreed (src_ram.block_size)
                rc = lib.mg_push_runs(sock.fileno(), self.src_ram,
                                      ffi.new("uint64_t[]", [x for run in runs for x in run]), len(runs), hold)
                if rc < 0:
                    raise self._channel_error("push", -rc)
                with self.count_lock:
                    self.sent_push += pages
                    self.wire_bytes += rc
            sock.shutdown(socket.SHUT_WR)   # end of stream: the destination sees EOF
        except (SourceError, OSError) as e:
            if self.stop.is_set():
                return
            self.errors.append(e if isinstance(e, SourceError) else SourceError(f"push channel: {e}"))
            self.stop.set()

    def _scan_blocks(self, d, chunk: int = 16) -> None:
        """Finds the zero blocks of every large page ahead of its demand, in C
        (GIL released). Only once the push gate is open: with QEMU, the source
        VM is paused by then and its RAM no longer changes."""
        if not self._gate_open():
            return
        for first in range(0, self.ram.npages, chunk):
            if self.stop.is_set():
                return
            lib.mg_scan_blocks(d, first, chunk)

    def _demand(self, sock: socket.socket, d) -> None:
        """Answers demand requests in C (GIL released) until the destination
        closes the channel at the end of the migration."""
        fault_path_priority()
        rc = lib.mg_demand_serve(d, self.stop_fd)
        if rc == -errno.EPROTO:
            self.errors.append(ProtocolError(f"destination asked for page {d.bad_page}, outside the "
                                             f"{self.ram.npages} pages of this RAM image"))
            self.stop.set()
        elif rc < 0 and rc not in (-errno.ESHUTDOWN, -errno.ECONNRESET, -errno.EPIPE):
            self.errors.append(self._channel_error("demand", -rc))
            self.stop.set()

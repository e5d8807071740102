"""The source agent's session with one destination: `Source` opens it over
gRPC, serves demand on its own channel (migrate.source.demand), runs the push
streams (migrate.source.push), and finishes or resumes it. Demand requests
come first, then the pages after the most recent demand (locality), then a
linear scan that skips what was sent (migrate.source.scheduler).
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

from migrate._binding import lib
from migrate.errors import (DestinationFailed, DestinationGone, DestinationLost, GuestLost, MigrateError,
                            PrecopyAbandoned, ProtocolError, SourceError, SourceGuestGone, Stopped,
                            fmt_size)
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.report import Reporter
from migrate.status import rate_and_eta
from migrate.source.demand import DemandServer
from migrate.source.push import LinkPacer, Push, push_send_buffer
from migrate.source.ramfile import RamImage
from migrate.source.scheduler import LocalityWindow, Scheduler
from migrate.wire.protocol import (DEFAULT_BATCH_BYTES, DEMAND_MAGIC, DEVSTATE_MAGIC, PRECOPY_MAGIC, PROTOCOL_VERSION,
                                   PUSH_MAGIC, channel, raw_zstd_unavailable)
from migrate.wire.rawtls import RawTls, TlsError
from migrate.wire.tls import TlsConfig, check_destination, is_loopback
from migrate.wire.tcp import ChannelEnd, channel_end, host_of, mark_urgent, parse_address, set_peer_timeout

DEST_TIMEOUT = 10.0       # seconds of silence from the destination's host before it is taken as gone


# gRPC statuses that say the destination cannot take the call now but may
# later (its agent is gone or restarting, its guest not re-attached yet, the
# source it dropped not let go yet): a source recovering its session tries again
_TRANSIENT = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED))


def rpc_error(e: grpc.RpcError, what: str) -> SourceError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    kind = DestinationLost if code in _TRANSIENT else SourceError
    return kind(f"{what}: destination said {code.name if code else '?'}: {details}")


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
        raise DestinationLost(f"cannot resolve the destination host {target.rpartition(':')[0]!r}: "
                              f"{e.strerror}") from None


@dataclass(frozen=True, kw_only=True)
class SourceResult:
    session: str
    pages_total: int
    pages_sent_push: int        # by the push streams, and read ahead on the demand channel
    pages_sent_demand: int
    wire_bytes: int
    seconds: float
    finish: pb.FinishReply
    zero_blocks: int = 0        # zero blocks of large pages left out of demand replies
    prescanned: int = 0         # sparse replies whose zero blocks were found ahead of the demand
    push_zero_blocks: int = 0   # zero blocks of large pages left out of push runs
    hole_pages: int = 0         # pages sent as zero unread: holes of the RAM file
    compression: dict | None = None   # the raw push's zstd (Push.compression); None: gRPC push

    @property
    def demand_requests(self) -> int:
        return self.pages_sent_demand   # a demand request asks for one page


class Source:
    """The session with one destination. Built idle; run() opens it, serves
    it to the end and returns its SourceResult, once."""

    def __init__(self, ram: RamImage, target: str, reporter: Reporter, *, push_streams: int = 2,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, compress: bool = True, name: str = "source",
                 resume_session: str = "", connect_timeout: float = 30.0, device_state: bool = False,
                 on_session=None, transport: str = "raw", guest: str = "",
                 push_gate: threading.Event | None = None, max_rate: int = 0, push_buffer: int | None = None,
                 sparse: bool = True, dest_timeout: float = DEST_TIMEOUT, tls: TlsConfig | None = None,
                 resume_guest: str = "", open_timeout: float = 60.0, on_created=None,
                 pace: str = "auto", demand_gate: threading.Event | None = None,
                 hints: list[int] | None = None, locality_window: int | None = None, precopy=None,
                 compress_runs: str = "auto"):
        """on_created(source): told of this Source once built (the CLI's
        status and metrics read its snapshot())."""
        self.ram = ram
        # migrate.source.precopy.Precopy: rounds while the guest runs, then the
        # switch, between Open and the demand channel; None: post-copy only
        self.precopy = precopy
        self.hints = hints or []                 # source --hints: pages to push first, validated (migrate.hints)
        self.locality_window = locality_window   # pages after a demand fault; None: adaptive
        self.tls = tls   # None: plaintext channels (loopback or --insecure)
        # the raw channels' TLS context (the credentials are loaded here)
        self.raw_tls = RawTls(tls, server=False) if tls is not None else None
        self.target = target
        self.reporter = reporter
        self.push_streams = max(1, push_streams)
        self.batch_bytes = batch_bytes
        self.max_rate = max(0, max_rate)   # background bytes of guest RAM per second, all streams; 0: no limit
        self.push_buffer = push_buffer     # push stream send buffer: None auto, 0 kernel autotuning, else bytes
        self.push_buffer_set: int | None = None
        self.sparse = sparse               # large pages' zero blocks stay off the wire when the destination agrees
        self.compress = compress
        if compress_runs not in ("auto", "on", "off"):
            raise ValueError(f"--compress {compress_runs!r}: use auto, on or off")
        self.compress_runs = compress_runs   # the raw push's zstd (migrate.source.compress)
        self.zstd = False                    # ... and whether both ends can (set at Open)
        self.name = name
        self.resume_session = resume_session
        # recovering a lost session (migrate.source.recovery): only the guest
        # the first Welcome named (Welcome.guest_instance) may take this RAM
        self.resume_guest = resume_guest
        self.guest_instance = ""
        self.connect_timeout = connect_timeout
        self.open_timeout = open_timeout   # Open waits this long (the destination waits 30 s for a guest)
        # a destination whose host acknowledges nothing this long on a channel
        # is gone (see wire.tcp.set_peer_timeout); 0: TCP's own many minutes
        self.dest_timeout = dest_timeout
        self.dest_lost: SourceError | None = None
        self.session = ""
        # the session's secret token (Welcome.demand_token): it opens the raw
        # channels and goes with Push, DeviceState and Finish. Never logged.
        self.token = b""
        if transport not in ("raw", "grpc"):
            raise ValueError(f"push transport {transport!r}: use raw or grpc")
        self.transport = transport
        if pace not in ("auto", "on", "off"):
            raise ValueError(f"push pacing {pace!r}: use auto, on or off")
        # the raw push kept just under the link's measured rate (LinkPacer);
        # auto: unless the destination is on loopback, where no link is shared
        self.pace = pace == "on" or (pace == "auto" and not is_loopback(host_of(target)))
        self.guest = guest
        # Background push waits for this (QEMU: until the destination guest runs,
        # so the push does not take the CPU from the device-state load); demand
        # requests are served from the start regardless.
        self.push_gate = push_gate
        # Demand requests wait for this (QEMU: the source VM's STOP, after which
        # its RAM no longer changes); the channel is open and they queue on it
        # meanwhile. None: served from the start.
        self.demand_gate = demand_gate
        # QEMU (migrate.qemu): Hello says a device-state stream follows, and
        # on_session(stub, session_id, token) sends it once the demand stream is served.
        self.device_state = device_state
        self.on_session = on_session
        self.errors: list[BaseException] = []
        # a raw push channel the destination closed or reset: the normal end
        # when every page had arrived meanwhile (the agent stops its receivers
        # at completion, and a stream still writing pages that came another
        # way is reset), else the destination is gone. Finish tells which.
        self.push_closed: DestinationLost | None = None
        self.stop = threading.Event()
        # for `migrate status` (migrate.status): connecting, connected, running, completed, failed;
        # paused while migrate.source.recovery tries again
        self.state = "connecting"
        self.sent_all = False
        self.t_open: float | None = None
        if on_created is not None:
            on_created(self)
        # what run() opens and starts, for _close to stop and close
        self.sched: Scheduler | None = None
        self.welcome: pb.Welcome | None = None
        self.demand: DemandServer | None = None
        self.push: Push | None = None
        self._demand_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []    # the others: holes walk, block scan, push streams
        self._started: list[tuple[threading.Event, threading.Event]] = []   # every thread's (began, done): _close waits
        self._socks: list[socket.socket] = []         # demand channel first, then raw push (and device-state)
        # pre-copy: channels opened before the switch, taken by _start_demand and _start_push
        self._early: dict[bytes, list[socket.socket]] = {}
        self._channels: list[grpc.Channel] = []       # control, then gRPC push channels

    def run(self) -> SourceResult:
        """The session from Open to Finish. Raises a MigrateError when it does
        not complete (DestinationFailed when the destination ended it for
        good); everything it opened is closed either way."""
        t0 = time.monotonic()
        _check_resolves(self.target)
        try:
            stub, welcome = self._open_session()
            # (before the guest may run: --compress on that cannot be is refused first)
            self.zstd = self.transport == "raw" and self.compress_runs != "off" and self._raw_zstd(welcome)
            self.state, self.t_open = "connected", time.monotonic()
            self._freeze_heap()
            if self.precopy is not None:
                # the channels open while the guest runs, not in its pause:
                # the destination holds them until the switch
                self._open_early(welcome)
                self._precopy(stub)   # ("connected" throughout: the snapshot adds its rounds)
            self._start_demand(welcome)
            self.state = "running"
            self._start_push(welcome)
            if self.on_session is not None:
                self.on_session(stub, self.session, self.token)
            if self.precopy is not None:
                self.precopy.release()   # (after the pause: only a source guest that runs again needs it)
            self._wait_push()
            self.sent_all = not self.errors and self.push_closed is None   # every page the destination lacked went out (Finish may still be lost)
            fin = self._finish(stub)
            self.state = "completed"
        except BaseException:
            self.state = "failed"
            if self.precopy is not None and not self.precopy.switched:
                self.precopy.abandon()   # the guest runs on, unprotected
            raise
        finally:
            self._close()
        return self._result(fin, time.monotonic() - t0)

    def _precopy(self, stub: pbg.MigrationStub) -> None:
        """Pre-copy rounds and the switch (migrate.source.precopy); then the
        scheduler skips what the destination holds, and the holes are found
        in the RAM as the paused guest left it."""
        try:
            reply = self.precopy.run(self, stub)
        except MigrateError as e:
            if self.precopy.switched or isinstance(e, (Stopped, SourceGuestGone)):
                raise
            # nothing is mapped at the destination: the guest is the source's,
            # which runs on (run() unprotects and resumes it); no retry
            raise PrecopyAbandoned(f"pre-copy failed before the switch: {e}. The source guest runs on, "
                                   "untouched; run the migration again") from None
        already = PageBitmap(self.ram.npages)
        already.load_bytes(reply.received_bitmap)
        self.sched = Scheduler(self.ram.npages, max(1, self.batch_bytes // self.ram.page_size), already,
                               window=LocalityWindow(self.ram.page_size, self.locality_window), hints=self.hints)
        try:
            self.ram.open_holes = self.ram.holes()
        except SourceError:
            self.ram.open_holes = None

    def snapshot(self) -> dict:
        """What `migrate status` shows of this session (migrate.status): a
        source counts the pages it sent (on demand, read ahead, pushed) as
        the received ones; the guest's faults are the destination's to tell."""
        ram = self.ram
        d = self.demand.d if self.demand is not None else None
        demand = int(d.seq) if d is not None else 0
        ahead = int(d.readahead) if d is not None else 0
        pushed = self.push.pages if self.push is not None else 0
        sent = min(ram.npages, demand + ahead + pushed)
        seconds = time.monotonic() - self.t_open if self.t_open is not None else 0.0
        gbps, eta = rate_and_eta(sent, ram.npages, ram.page_size, seconds)
        wire = (self.push.wire_bytes if self.push is not None else 0) + (int(d.bytes) if d is not None else 0)
        return {"session": self.session, "state": self.state, "peer": self.target, "pages_total": ram.npages,
                "pages_received": sent, "pages_demand": demand, "pages_pushed": pushed + ahead,
                "page_size": ram.page_size, "gbps": gbps, "eta_s": 0.0 if self.state == "completed" else eta,
                "seconds": round(seconds, 3), "wire_bytes": wire, "faults_demand": demand,
                "error": str(self.errors[0]) if self.errors else None,
                **({"precopy_rounds": self.precopy.rounds[-3:]} if self.precopy is not None else {})}

    def check_interrupted(self) -> None:
        """Raises what ends any wait of this source: a signal's Stopped that a
        finalizer swallowed (Stopped.check), or the destination found gone
        (dest_lost)."""
        Stopped.check()
        if self.dest_lost is not None:
            raise self.dest_lost

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
                    pass
                self.check_interrupted()
        finally:
            fut.cancel()   # nothing once it is done

    def ended_complete(self, session: str, token: bytes, timeout: float = 5.0) -> pb.FinishReply | None:
        """The destination's FinishReply when it says session completed, asked
        with the token of a source that served it (the agent keeps a completed
        session's answer for a late Finish: with --serve-forever, or for 5 s
        after its end); None when it cannot say so now (unreachable, the
        session unknown or not over)."""
        ctl = channel(self.target, "control", self.tls)
        try:
            fin = pbg.MigrationStub(ctl).Finish(pb.FinishRequest(session_id=session, token=token,
                                                                 timeout_seconds=0.1), timeout=timeout)
        except grpc.RpcError:
            return None
        finally:
            ctl.close()
        return fin if fin.complete else None

    # -- the steps of run() ---------------------------------------------------
    def _open_session(self) -> tuple[pbg.MigrationStub, pb.Welcome]:
        """Connects the control channel and opens the session: the destination's
        Welcome, its version checked, and the scheduler, which skips what the
        destination already has (a resume)."""
        ram = self.ram
        deadline = time.monotonic() + self.connect_timeout
        check_destination(self.target, self.tls, self.connect_timeout)   # TLS refusals, in words
        ctl = channel(self.target, "control", self.tls)
        self._channels.append(ctl)
        try:
            grpc.channel_ready_future(ctl).result(timeout=max(0.1, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            raise DestinationLost(f"cannot reach the destination at {self.target} within "
                                  f"{self.connect_timeout:.0f} s: is `migrate dest --listen` running there?") from None
        stub = pbg.MigrationStub(ctl)
        try:
            welcome = stub.Open(self._hello(), timeout=self.open_timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, "open session") from None
        if welcome.version != PROTOCOL_VERSION:
            raise ProtocolError(f"destination speaks protocol version {welcome.version}, this source "
                                f"{PROTOCOL_VERSION}: run the same migrate release on both hosts")
        if self.resume_guest and welcome.guest_instance != self.resume_guest:
            # (the destination picks by Hello.resume_guest; one that did not
            # never gets a page of this RAM)
            raise ProtocolError(f"the destination at {self.target} offered another guest than the one this source "
                                "recovers: run the same migrate release on both hosts")
        sid = self.session = welcome.session_id
        self.welcome = welcome
        self.token = welcome.demand_token
        self.guest_instance = welcome.guest_instance
        already = PageBitmap(ram.npages)
        if welcome.received_bitmap:
            already.load_bytes(welcome.received_bitmap)
        self.sched = Scheduler(ram.npages, max(1, self.batch_bytes // ram.page_size), already,
                               window=LocalityWindow(ram.page_size, self.locality_window), hints=self.hints)
        recovering = {"recovered": self.resume_session} if self.resume_guest else {}
        self.reporter.event("connected", f"session {sid} at {self.target}: {fmt_size(ram.size)} in "
                            f"{ram.npages} pages, {already.count()} already there"
                            + (f" (recovering session {self.resume_session})" if recovering else ""),
                            session=sid, target=self.target, **recovering)
        return stub, welcome

    def _hello(self) -> pb.Hello:
        return pb.Hello(version=PROTOCOL_VERSION, ram_size=self.ram.size, page_size=self.ram.page_size,
                        compression=[pb.COMPRESSION_ZSTD, pb.COMPRESSION_NONE] if self.compress
                        else [pb.COMPRESSION_NONE],
                        resume_session=self.resume_session, source_name=self.name, guest=self.guest,
                        has_device_state=self.device_state, resume_guest=self.resume_guest,
                        precopy=self.precopy is not None)

    def _push_stream_count(self, welcome: pb.Welcome) -> int:
        return min(self.push_streams, max(1, welcome.push_streams or 1))

    def _open_early(self, welcome: pb.Welcome) -> None:
        """Pre-copy: opens the demand and raw push channels before the
        rounds. The destination holds them, reading and sending nothing,
        until this source's Switch; DemandServer and Push take them after."""
        self._early[DEMAND_MAGIC] = [self._open_channel(welcome, DEMAND_MAGIC)]
        if self.transport == "raw":
            self._early[PUSH_MAGIC] = [self._open_channel(welcome, PUSH_MAGIC)
                                       for _ in range(self._push_stream_count(welcome))]
            # the rounds' own channel (migrate.source.precopy)
            self._early[PRECOPY_MAGIC] = [self._open_channel(welcome, PRECOPY_MAGIC)]

    def precopy_channel(self) -> socket.socket | None:
        """The raw pre-copy channel opened early (None: gRPC transport)."""
        early = self._early.get(PRECOPY_MAGIC)
        return early.pop(0) if early else None

    def _take_channel(self, welcome: pb.Welcome, magic: bytes) -> socket.socket:
        """A channel opened early (pre-copy), else a new one."""
        early = self._early.get(magic)
        return early.pop(0) if early else self._open_channel(welcome, magic)

    @staticmethod
    def _freeze_heap() -> None:
        # everything allocated so far lives until the end: keep the collector
        # from walking it again and again while the push allocates its batches.
        # Done before any channel opens: once the demand channel is open the
        # guest runs and its faults wait on this source, and the destination
        # times the push from its first push channel. (Pre-copy: before its
        # rounds, so that no collection falls in the guest's pause.)
        gc.collect()
        gc.freeze()

    def _start_demand(self, welcome: pb.Welcome) -> None:
        """Opens the demand channel and starts its server at once (the guest
        faults from the moment the channel opens), with the holes walk and the
        zero-block scan that run once the push gate opens."""
        sock = self._take_channel(welcome, DEMAND_MAGIC)
        demand = self.demand = DemandServer(sock, self.ram, self.sched, self.reporter)
        self.sched.demand = demand.d
        ahead = []
        if demand.take_holes(gated=self.push_gate is not None):
            ahead.append(("holes", demand.find_holes))
        if self.sparse and welcome.sparse_block_size == lib.MG_BLOCK and demand.go_sparse():
            ahead.append(("scan", lambda: demand.scan_blocks(self.stop)))
        self._demand_thread = self._start_thread("demand", self._serve_demand)
        for name, work in ahead:
            self._threads.append(self._start_thread(name, self._after_gate, work))

    def _start_push(self, welcome: pb.Welcome) -> None:
        """Opens the push channels (as many streams as both sides allow) and
        starts the streams together once they are all open."""
        n = self._push_stream_count(welcome)
        link = LinkPacer(self._paced) if self.pace and self.transport == "raw" else None
        self.push = Push(self.ram, self.sched, self.demand, self.stop, streams=n, max_rate=self.max_rate, link=link,
                         compress=self.compress_runs, zstd=self.zstd)
        if self.transport == "raw":
            socks = [self._take_channel(welcome, PUSH_MAGIC) for _ in range(n)]
            for sock in socks if link is not None else ():
                link.add(sock)
            for i, sock in enumerate(socks):
                self._threads.append(self._start_thread(f"push-{i}", self._push_raw, sock))
            buf = self.push_buffer_set
            self.reporter.event("push", f"{n} raw push streams, send buffer "
                                f"{fmt_size(buf) if buf else 'autotuned by the kernel'}",
                                streams=n, send_buffer=buf)
        else:
            compress = self.compress and welcome.compression == pb.COMPRESSION_ZSTD
            chans = [channel(self.target, f"push-{i}", self.tls) for i in range(n)]
            self._channels += chans
            for i, ch in enumerate(chans):
                self._threads.append(self._start_thread(f"push-{i}", self._push_grpc, ch, compress))

    def _raw_zstd(self, welcome: pb.Welcome) -> bool:
        """Whether the raw push may send zstd runs: the destination offered
        them and libzstd loads here. --compress on without that is an error
        that says what to do; auto goes raw."""
        why = None
        if self.compress_runs == "auto" and is_loopback(host_of(self.target)):
            # no link to save: the CPU is always the limit (and a demand-heavy
            # guest's faults, holding the push back, would read as a slow link)
            self.reporter.event("compress", "push not compressed: the destination is on loopback (--compress on "
                                "forces it)", mode="auto", available=True)
            return False
        if welcome.push_compression != pb.COMPRESSION_ZSTD:
            why = ("the destination does not take zstd push runs (an older migrate release, or no libzstd.so.1 "
                   "on its host)")
        elif (local := raw_zstd_unavailable()) is not None:
            why = f"this host cannot compress them: {local}"
        if why is None:
            return True
        if self.compress_runs == "on":
            raise SourceError(f"--compress on: {why}; run the same release with libzstd1 installed on both hosts, "
                              "or use --compress auto (raw when zstd is not there) or off")
        self.reporter.event("compress", f"push not compressed: {why}", mode=self.compress_runs, available=False)
        return False

    def _paced(self, rate: float | None, cap: int | None) -> None:
        """LinkPacer measured the link: say so."""
        if rate and cap:
            self.reporter.event("pace", f"link measured at {rate * 8 / 1e9:.2f} Gbit/s: each push stream paced "
                                f"at {cap * 8 / 1e9:.2f} Gbit/s", link_bytes_per_s=int(rate), cap_bytes_per_s=cap)
        elif rate:
            self.reporter.event("pace", f"push at {rate * 8 / 1e9:.2f} Gbit/s did not fill the link (this host is "
                                "the limit): not paced", link_bytes_per_s=int(rate), cap_bytes_per_s=None)

    def _wait_push(self) -> None:
        """Waits for the push streams (and the holes walk and block scan, done
        long before). A destination found gone meanwhile ends the wait: a gRPC
        push would not notice for minutes (closing its channel ends it)."""
        for t in self._threads:
            while t.is_alive():
                t.join(0.1)
                self.check_interrupted()
        if self.transport == "raw" and self.push is not None:
            c = self.push.compression()
            ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
            self.reporter.event("compress", f"push compression {c['mode']}: {c['wire_bytes']} wire bytes for "
                                f"{c['page_bytes']} bytes of non-zero pages ({ratio}), "
                                f"{c['batches_compressed_fraction']:.0%} of batches compressed", **c)

    def _finish(self, stub: pbg.MigrationStub) -> pb.FinishReply:
        """Asks the destination how the session ended (waiting for it to end,
        after an error only briefly, and not past a destination found gone);
        raises unless it completed. A push channel the destination closed
        because every page had arrived is not a failure: Finish says which it
        was."""
        sid = self.session
        try:
            fin = self.wait_rpc(stub.Finish.future(
                pb.FinishRequest(session_id=sid, token=self.token,
                                 timeout_seconds=5 if self.errors or self.push_closed else 120),
                timeout=150))
        except grpc.RpcError as e:
            raise (self.errors[0] if self.errors else self.push_closed or rpc_error(e, "finish")) from None
        if fin.complete:
            return fin
        if fin.failed:   # the destination's reason, not what it did to our channels
            raise (GuestLost if fin.guest_lost else DestinationFailed)(f"destination ended session {sid}: {fin.error}")
        if self.errors:
            raise self.errors[0]
        if self.push_closed is not None:
            raise self.push_closed
        raise SourceError(f"destination did not complete session {sid}: no reason given")

    def _close(self) -> None:
        """Stops the demand server and the streams and closes every channel,
        however far run() got."""
        self.stop.set()
        if self.precopy is not None and self.precopy.switched:
            self.precopy.release()   # (a second time is nothing)
        if self.demand is not None:
            self.demand.interrupt()
        if self._demand_thread is not None:
            self._demand_thread.join(5)
        # The push streams and the holes walk read the RAM mapping in C, which
        # the caller unmaps next (RamImage.close): they are stopped (a
        # shutdown ends a send or recv under way in another thread; a close
        # would not) and waited for first. A source stopped by SIGTERM
        # mid-push was seen to die of SIGSEGV without this.
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for ch in self._channels:
            ch.close()
        # (their own events, not Thread.join: in Python 3.11 a join that a
        # signal's exception interrupts marks the thread stopped while it
        # still runs, and later joins return at once)
        deadline = time.monotonic() + 10
        for began, done in self._started:
            if began.is_set():
                done.wait(max(0.0, deadline - time.monotonic()))
        for sock in self._socks:
            sock.close()
        if self.demand is not None:
            self.demand.close()

    def _result(self, fin: pb.FinishReply, seconds: float) -> SourceResult:
        d, r = self.demand.d, self.demand.r
        return SourceResult(session=self.session, pages_total=self.ram.npages,
                            pages_sent_push=self.push.pages + d.readahead, pages_sent_demand=d.seq,
                            wire_bytes=self.push.wire_bytes + d.bytes, seconds=seconds, finish=fin,
                            zero_blocks=d.zero_blocks, prescanned=d.prescanned,
                            push_zero_blocks=r.push_zero_blocks, hole_pages=r.hole_pages,
                            compression=self.push.compression() if self.transport == "raw" else None)

    # -- channels -------------------------------------------------------------
    def _open_channel(self, welcome: pb.Welcome, magic: bytes) -> socket.socket:
        """A plain TCP channel beside gRPC (demand or raw push), opened with the
        session's token; _close closes it."""
        host = host_of(self.target)
        what = {DEMAND_MAGIC: "demand", PUSH_MAGIC: "push", DEVSTATE_MAGIC: "device-state", PRECOPY_MAGIC: "pre-copy"}[magic]
        try:
            sock = socket.create_connection((host, welcome.demand_port), timeout=self.connect_timeout)
        except OSError as e:
            raise DestinationLost(f"cannot open the {what} channel to {host}:{welcome.demand_port}: {e}") from None
        if magic == PUSH_MAGIC:
            # Sized from the TCP handshake's round trip, before TLS's: the
            # kernel's RTT after a TLS handshake counts the peer's signing and
            # verifying (milliseconds under load), which sized a loopback TLS
            # push's buffer for a long link (autotuned, or 2 MB) where the
            # plaintext push had 256 KiB.
            self.push_buffer_set = push_send_buffer(sock, self.push_buffer)
        if self.raw_tls is not None:
            sock = self._raw_handshake(sock, what, host, welcome.demand_port)
        self._socks.append(sock)
        set_peer_timeout(sock, self.dest_timeout)
        if magic != PUSH_MAGIC:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if magic == DEMAND_MAGIC:
            mark_urgent(sock)   # replies go ahead of push data in any queue that sorts by it
        sock.sendall(magic + self.token)
        sock.settimeout(None)
        return sock

    def open_device_state_channel(self) -> socket.socket:
        """The session's device-state channel (migrate.wire.devstate), opened
        with its token like the others; _close closes it."""
        return self._open_channel(self.welcome, DEVSTATE_MAGIC)

    def _raw_handshake(self, sock: socket.socket, what: str, host: str, port: int) -> socket.socket:
        """TLS first on a raw channel: the destination's certificate must name
        the host dialled (or --dest-name); the hello then goes inside it."""
        try:
            return self.raw_tls.handshake(sock, self.connect_timeout, self.tls.peer_name or host)
        except TlsError as e:
            sock.close()
            raise SourceError(f"{what} channel to {host}:{port}: {e}") from None

    def _channel_error(self, what: str, rc: int) -> SourceError:
        """A raw channel that ended with rc (-errno) before its work was done; a
        destination the kernel gave up on is recorded in dest_lost."""
        if channel_end(rc) is not ChannelEnd.PEER_LOST:
            # the destination's kernel ended it (the agent died or was
            # stopped: a reset, a closed socket) or this host's did
            return DestinationLost(f"{what} channel: {os.strerror(-rc)}")
        e = DestinationGone(f"the destination is gone: for --dest-timeout {self.dest_timeout:g} s nothing sent on "
                            f"the {what} channel was acknowledged or taken in ({os.strerror(-rc)}): its host is down, "
                            "the network split, or the agent hangs. Its guest keeps the pages it has and waits: once "
                            f"the destination can be reached, `migrate source --resume {self.session}` serves the rest")
        if self.dest_lost is None:
            self.dest_lost = e
        return e

    # -- threads --------------------------------------------------------------
    def _start_thread(self, name: str, target, *args) -> threading.Thread:
        """A daemon thread running target(*args), known to _close before it
        runs: a stop (SIGTERM raises in this thread) between its start and
        the caller keeping it must not leave a thread reading the RAM
        mapping that nobody waits for. One that begins after the stop does
        nothing."""
        began, done = threading.Event(), threading.Event()

        def run():
            began.set()
            try:
                if not self.stop.is_set():
                    target(*args)
            finally:
                done.set()
        self._started.append((began, done))
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    def _fail(self, e: BaseException) -> None:
        """A thread's failure: kept for run() to raise, and every stream stops."""
        self.errors.append(e)
        self.stop.set()

    def _gate_open(self) -> bool:
        """Waits for the push gate; False when the session stops first."""
        while self.push_gate is not None and not self.push_gate.wait(0.05):
            if self.stop.is_set():
                return False
        return True

    def _after_gate(self, work) -> None:
        """Runs work (the holes walk, the block scan) once the push gate opens:
        with QEMU, the source VM is paused by then and its RAM no longer
        changes."""
        if self._gate_open():
            work()

    def _serve_demand(self) -> None:
        """Answers demand requests (C, GIL released) until the destination
        closes the channel at the end of the migration."""
        while self.demand_gate is not None and not self.demand_gate.wait(0.05):
            if self.stop.is_set():
                return
        rc = self.demand.serve()
        if rc == -errno.EPROTO:
            self._fail(ProtocolError(f"destination asked for page {self.demand.d.bad_page}, outside the "
                                     f"{self.ram.npages} pages of this RAM image"))
        elif channel_end(rc) is not ChannelEnd.CLOSED:
            self._fail(self._channel_error("demand", rc))

    def _push_raw(self, sock: socket.socket) -> None:
        if not self._gate_open():
            return
        try:
            rc = self.push.raw(sock)
            if rc < 0 and channel_end(rc) is ChannelEnd.CLOSED:
                self._push_ended(DestinationLost(f"push channel: {os.strerror(-rc)}"))
            elif rc < 0:
                raise self._channel_error("push", rc)
        except OSError as e:
            # (the shutdown at the end of the pages, on a channel the
            # destination closed meanwhile)
            self._push_ended(DestinationLost(f"push channel: {e.strerror or e}"))
        except SourceError as e:
            if not self.stop.is_set():
                self._fail(e)

    def _push_ended(self, e: DestinationLost) -> None:
        """The destination closed or reset a push channel: the streams stop
        (it takes nothing more, or is gone) and Finish says whether that was
        the end of the migration; not an error unless it was not."""
        if self.push_closed is None:
            self.push_closed = e
        self.stop.set()

    def _push_grpc(self, ch: grpc.Channel, compress: bool) -> None:
        if not self._gate_open():
            return
        try:
            self.push.grpc(ch, self.session, self.token, compress)
        except grpc.RpcError as e:
            self._fail(rpc_error(e, "push"))

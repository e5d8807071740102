"""One guest being filled on the destination: `Migration`, its state machine
(`State`, `TRANSITIONS`, and the thread that may move each transition), the
source it is bound to and its demand and push channels, and the end of the
migration when every page is received and mapped.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
import socket
import threading
import time
import uuid

from migrate._binding import lib
from migrate.dest import faultspace
from migrate.dest.attach import AttachedGuest
from migrate.dest.faultspace import FaultSpace, SpaceRegion
from migrate.errors import (
    PEER_LOST_ERRNOS,
    AttachError,
    LayoutMismatch,
    MigrateError,
    ProtocolError,
    UffdError,
    fmt_size,
)
from migrate.host import fault_path_priority
from migrate.memory import GuestMemory
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter, percentile, process_usage
from migrate.uffd import Mode, Userfaultfd
from migrate.wire.protocol import (
    DEFAULT_BATCH_BYTES,
    DEMAND_TOKEN_BYTES,
    PROTOCOL_VERSION,
    BatchDecoder,
)


class BusyError(MigrateError):
    """A source tried to join a migration that already has one."""


class NoGuestError(MigrateError):
    """A source connected but no guest is attached to take its RAM."""


DEMAND_CONNECT_TIMEOUT = 15.0


class State(enum.Enum):
    ATTACHED = "attached"          # guest registered, waiting for a source
    CONNECTED = "connected"        # a source is serving pages
    DISCONNECTED = "disconnected"  # the source went away; waiting for another
    COMPLETE = "complete"          # every page received and mapped; unregistered
    FAILED = "failed"              # the guest went away or a kernel call failed


# Who moves the state: the attach thread creates ATTACHED; gRPC Open moves to
# CONNECTED; a stream ending early moves to DISCONNECTED; placement (any stream
# thread) moves to COMPLETE; the guest monitor or a kernel failure to FAILED.
TRANSITIONS = {
    State.ATTACHED: {State.CONNECTED, State.FAILED},
    State.CONNECTED: {State.DISCONNECTED, State.COMPLETE, State.FAILED},
    State.DISCONNECTED: {State.CONNECTED, State.FAILED},
    State.COMPLETE: set(),
    State.FAILED: set(),
}


def mapped_runs(pid: int, addr: int, npages: int, page_size: int):
    """Yields (first, count) runs of pages of [addr, addr + npages * page_size)
    that are mapped in process pid, read from /proc/PID/pagemap (bit 63: present;
    one 8-byte entry per 4 KiB, the first of a huge page stands for it)."""
    step = page_size // 4096
    run_start = None
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        chunk = 65536
        for base in range(0, npages, chunk):
            n = min(chunk, npages - base)
            f.seek((addr // 4096 + base * step) * 8)
            raw = f.read(n * step * 8)
            entries = memoryview(raw).cast("Q")
            for i in range(n):
                present = entries[i * step] >> 63
                if present and run_start is None:
                    run_start = base + i
                elif not present and run_start is not None:
                    yield run_start, base + i - run_start
                    run_start = None
    if run_start is not None:
        yield run_start, npages - run_start


class Migration:
    """One guest being filled. Owns the guest's descriptors, the alias mapping,
    the fault space and the fault thread."""

    def __init__(self, guest: AttachedGuest, reporter: Reporter, mode: str = faultspace.MODE_CONTINUE,
                 prepare: bool = True, source_timeout: float = 0):
        self.id = uuid.uuid4().hex[:12]
        self.guest = guest
        self.reporter = reporter
        self.mode = mode
        self.source_timeout = source_timeout   # see check_source(); 0: never
        self.state = State.ATTACHED
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finish_answered = threading.Event()   # the source's Finish got its reply
        self.error: str | None = None
        self.source_gen = 0              # bumps when a source is replaced
        self.demand_token = b""          # what the current source sends to open its demand channel
        self.demand_sock: socket.socket | None = None
        self.push_socks: list[socket.socket] = []
        self.completing = False
        self.lost_why: str | None = None   # why the last source was dropped
        self.switched_over = False
        self.t_connect: float | None = None
        self.t_demand_ns = 0                 # the current demand channel opened (time.monotonic_ns)
        self.t_push: float | None = None     # the first push channel opened
        self.t_complete: float | None = None
        self.stop_fd = -1
        self.mem = None
        self.uffd = None
        self.prepare_s: float | None = None
        try:
            self._setup()
        except BaseException as e:
            guest.nack(str(e))
            self._teardown()
            raise
        guest.ack()
        if prepare and mode == faultspace.MODE_CONTINUE:
            self._prepare()

    def _prepare(self) -> None:
        """Allocates the guest's RAM and maps the alias before a source is let in
        (the guest is released already: its faults queue for the source). A
        backing that cannot hold the guest is reported and the migration goes on
        unprepared: pages are then allocated as they arrive."""
        try:
            r = self.mem.prepare()
        except MigrateError as e:
            self.reporter.event("prepare", f"guest RAM not allocated ahead ({e}): pages are allocated as they "
                                "arrive", session=self.id, error=str(e))
            return
        # was_empty is only trusted on a first attach: a re-attached guest's file
        # holds pages a dead agent wrote that were never mapped
        self.space.set_prepared(zero_fresh=r["was_empty"] and not self.guest.reattach)
        self.prepare_s = round(r["seconds"], 3)

    # -- setup ------------------------------------------------------------
    def _setup(self):
        g = self.guest
        self.page_size = g.page_size
        self.npages = g.ram_size // g.page_size
        if g.ram_size % g.page_size:
            raise AttachError(f"RAM size {g.ram_size} is not a multiple of the page size {g.page_size}")
        self.uffd = Userfaultfd(g.uffd_fd, owned=False)
        try:
            self.uffd.api()
        except UffdError as e:
            # UFFDIO_API works once per userfaultfd: a guest re-attaching after
            # its agent died brings one that the first agent already set up.
            if not (g.reattach and e.errno == errno.EINVAL):
                raise
        self.mem = GuestMemory.from_fd(os.dup(g.ram_fd), g.ram_size, g.page_size)
        mode = Mode.MISSING if self.mode == faultspace.MODE_COPY else Mode.MISSING | Mode.MINOR
        regions = []
        for r in g.regions:
            self.uffd.register(r.guest_addr, r.length, mode, g.page_size)
            regions.append(SpaceRegion(r.guest_addr, r.offset // g.page_size, r.length // g.page_size))
        self.space = FaultSpace(self.uffd, g.page_size, self.npages, regions,
                                0 if self.mode == faultspace.MODE_COPY else self.mem.alias_addr, self.mode,
                                ram_fd=self.mem.fd)
        # file pages no region maps can never fault: nothing to map for them
        covered = PageBitmap(self.npages)
        for r in regions:
            covered.set(r.first_page, r.npages)
        for first, count in covered.runs(set_bits=False):
            self.space.mapped.set(first, count)
        if g.reattach:
            self._adopt_prior_pages(regions)
        self.decoder = BatchDecoder(self.npages, g.page_size)
        self.stop_fd = faultspace.make_stop_fd()
        self.fault_thread = threading.Thread(target=self._fault_loop, name=f"faults-{self.id}", daemon=True)
        self.fault_thread.start()
        self.monitor = threading.Thread(target=self._watch_guest, name=f"guest-{self.id}", daemon=True)
        self.monitor.start()

    def _adopt_prior_pages(self, regions: list[SpaceRegion]) -> None:
        """A guest re-attaching after its agent died: every page mapped in its
        address space was placed by that agent and may hold the guest's own
        writes since, so it is recorded as placed and never written again.
        Pages in the page cache but not mapped are not trusted (a write may
        have been cut short): they are fetched again. Then every waiter is
        woken, since the dead agent may have read faults it never answered;
        a vCPU whose page is still missing simply faults again."""
        prior = 0
        for r in regions:
            for first, count in mapped_runs(self.guest.pid, r.guest_addr, r.npages, self.page_size):
                prior += self.space.mark_prior(r.first_page + first, count)
        for r in regions:
            self.uffd.wake(r.guest_addr, r.npages * self.page_size)
        self.reporter.event("reattached", f"guest pid {self.guest.pid} re-attached: {prior} pages already "
                            "mapped in it are kept", pid=self.guest.pid, pages_prior=prior)

    def _teardown(self):
        if self.stop_fd >= 0:
            os.eventfd_write(self.stop_fd, 1)
            t = getattr(self, "fault_thread", None)
            if t and t is not threading.current_thread():
                t.join(5)
            os.close(self.stop_fd)
            self.stop_fd = -1
        if self.demand_sock is not None:
            self.demand_sock.close()
            self.demand_sock = None
        for sock in self.push_socks:
            sock.close()
        self.push_socks = []
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.guest.close()

    def close(self):
        self._teardown()

    # -- state ------------------------------------------------------------
    def _move(self, new: State) -> bool:
        """Caller holds self.lock. False if the transition is not allowed."""
        if new not in TRANSITIONS[self.state]:
            return False
        self.state = new
        return True

    def fail(self, why: str, err: BaseException | None = None) -> None:
        """err: what raised, if anything. ESRCH from a userfaultfd ioctl means
        the guest's address space is gone: the guest died, and that is the
        reason to give (whichever thread noticed first)."""
        if getattr(err, "errno", None) == errno.ESRCH:
            why = self._guest_gone()
        with self.lock:
            if not self._move(State.FAILED):
                return
            self.error = why
        self.reporter.event("error", why, session=self.id)
        self.done.set()

    def connect(self, hello: pb.Hello, demand_port: int) -> pb.Welcome:
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(f"source speaks protocol version {hello.version}, this destination speaks "
                                f"{PROTOCOL_VERSION}: run the same migrate release on both hosts")
        if hello.ram_size != self.guest.ram_size or hello.page_size != self.page_size:
            raise LayoutMismatch(
                f"source RAM is {fmt_size(hello.ram_size)} in pages of {fmt_size(hello.page_size)}, but the guest "
                f"attached here has {fmt_size(self.guest.ram_size)} in pages of {fmt_size(self.page_size)}: "
                "start the destination guest with the source's RAM size and backing")
        with self.lock:
            if self.state is State.CONNECTED:
                raise BusyError(f"migration {self.id} already has a source connected: "
                                "one source per guest (start another guest to run a second migration)")
            if not self._move(State.CONNECTED):
                raise BusyError(f"migration {self.id} is {self.state.value}: it takes no source")
            self.source_gen += 1
            gen = self.source_gen
            self.demand_token = secrets.token_bytes(DEMAND_TOKEN_BYTES)
            if self.t_connect is None:
                self.t_connect = time.monotonic()
        received = self.space.received_count
        comp = pb.COMPRESSION_ZSTD if pb.COMPRESSION_ZSTD in hello.compression else pb.COMPRESSION_NONE
        self.reporter.event("connected", f"source {hello.source_name or '?'} joined session {self.id}",
                            session=self.id, source=hello.source_name, resumed=received > 0)
        # a source that never opens its demand channel is not serving this guest
        timer = threading.Timer(DEMAND_CONNECT_TIMEOUT, self._demand_deadline, (gen,))
        timer.daemon = True
        timer.start()
        return pb.Welcome(version=PROTOCOL_VERSION, session_id=self.id, compression=comp,
                          received_bitmap=self.space.received.to_bytes() if received else b"",
                          batch_bytes=max(DEFAULT_BATCH_BYTES, self.page_size), push_streams=4,
                          demand_port=demand_port, demand_token=self.demand_token,
                          sparse_block_size=self.space.block_size)

    def _demand_deadline(self, gen: int) -> None:
        if self.demand_sock is None and gen == self.source_gen:
            self.source_lost(gen, f"no demand channel within {DEMAND_CONNECT_TIMEOUT:.0f} s of Open")

    def attach_demand(self, sock: socket.socket) -> None:
        """The current source's demand channel: requests go out on it from the
        fault loop (C), replies are placed by a C receiver thread."""
        with self.lock:
            gen = self.source_gen
            old, self.demand_sock = self.demand_sock, sock
        if old is not None:
            old.close()
        self.t_demand_ns = time.monotonic_ns()
        resent = self.space.set_demand_fd(sock.fileno())
        self.reporter.event("demand", f"demand channel open ({resent} outstanding requests sent again)",
                            session=self.id, resent=resent)
        if not self.switched_over:
            # the guest may run now: every fault it takes has a source to go to
            self.switched_over = True
            self.guest.notify("switchover")
        threading.Thread(target=self._demand_rx, args=(sock, gen), name=f"demand-rx-{self.id}",
                         daemon=True).start()

    def attach_push(self, sock: socket.socket) -> None:
        """A raw push channel of the current source: runs land in the alias from C."""
        with self.lock:
            gen = self.source_gen
            self.push_socks.append(sock)
            if self.t_push is None:
                self.t_push = time.monotonic()
        threading.Thread(target=self._push_rx, args=(sock, gen), name=f"push-rx-{self.id}", daemon=True).start()

    def _push_rx(self, sock: socket.socket, gen: int) -> None:
        try:
            rc = self.space.push_receive(sock.fileno(), self.stop_fd)
            if rc == lib.MG_DEMAND_COMPLETE:
                self._complete()
            elif -rc in PEER_LOST_ERRNOS:
                self.source_lost(gen, self._silent_why("push", -rc))
        except ProtocolError as e:
            self.reporter.event("error", f"bad push run: {e}", session=self.id)
            self.source_lost(gen, str(e))
        except MigrateError as e:
            self.fail(f"placing pushed pages: {e}", e)
        with self.lock:
            if sock in self.push_socks:
                self.push_socks.remove(sock)
        sock.close()

    def _demand_rx(self, sock: socket.socket, gen: int) -> None:
        fault_path_priority()
        why = "demand channel closed"
        try:
            rc = self.space.demand_receive(sock.fileno(), self.stop_fd)
            if rc == lib.MG_DEMAND_COMPLETE:
                self._complete()
            elif -rc in PEER_LOST_ERRNOS:
                why = self._silent_why("demand", -rc)
        except ProtocolError as e:
            why = str(e)
            self.reporter.event("error", f"bad demand reply: {e}", session=self.id)
        except MigrateError as e:
            self.fail(f"placing a demand reply: {e}", e)
        with self.lock:
            mine = self.demand_sock is sock
            if mine:
                self.demand_sock = None
        if mine:
            self.space.set_demand_fd(-1)
            sock.close()
        if not self.done.is_set():
            self.source_lost(gen, why)

    def source_lost(self, gen: int, why: str) -> None:
        """The source of generation gen is gone: its channels are shut (their
        receivers let go of what they claimed) and the next source resumes."""
        with self.lock:
            # a source whose channels end while the last page is being mapped
            # (the demand and push receivers both finish pages) has served it all
            if self.completing or gen != self.source_gen or not self._move(State.DISCONNECTED):
                return
            self.lost_why = why
            socks = [s for s in (self.demand_sock, *self.push_socks) if s is not None]
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)   # its receivers see the end and let go
            except OSError:
                pass
        self.reporter.event("disconnected", f"source left before the end ({why}); waiting for another",
                            session=self.id, received=self.space.received_count, total=self.npages)

    def _silent_why(self, channel: str, err: int) -> str:
        return (f"the {channel} channel timed out ({os.strerror(err)}): nothing came from the source's host for "
                f"--source-timeout {self.source_timeout:g} s, not even an answer to a probe (it is down, or the "
                "network between split)")

    def check_source(self) -> None:
        """A source that leaves a vCPU's page unanswered for source_timeout
        seconds while nothing at all arrives on its demand channel is taken as
        lost (the process hangs on a live host, whose kernel still acknowledges
        everything; a dead host or a split network the kernel notices itself,
        see protocol.set_peer_timeout) and its channels are shut, so the next
        source can resume. A reply still streaming in (a large page on a slow
        link) is progress. source_timeout <= 0: never."""
        timeout = self.source_timeout
        with self.lock:
            sock, gen = self.demand_sock, self.source_gen
            if timeout <= 0 or sock is None or self.state is not State.CONNECTED:
                return
        oldest = self.space.oldest_request_ns()
        if not oldest:
            return
        waited = (time.monotonic_ns() - max(oldest, self.t_demand_ns)) / 1e9
        silent = tcp_silent_s(sock)
        if waited < timeout or silent is None or silent < timeout:
            return
        self.source_lost(gen, f"a demand request unanswered for {waited:.1f} s and nothing received on the "
                              f"demand channel for {silent:.1f} s (--source-timeout {timeout:g})")

    # -- faults -----------------------------------------------------------
    def _fault_loop(self):
        """Runs in C with the GIL released: the fast path maps received pages, the
        rest go to the source as demand requests straight from C."""
        fault_path_priority()
        try:
            while self.space.serve(self.stop_fd, 0, 1000) is not None:
                pass
        except MigrateError as e:
            self.fail(f"fault loop: {e}", e)

    # -- placement --------------------------------------------------------
    def receive(self, batch: pb.PageBatch) -> int:
        """A background batch: checked in full before any byte is written."""
        if self.done.is_set():
            return 0
        dec = self.decoder.decode(batch)
        if not dec.pages:
            return 0
        n = self.space.place_batch(dec.pages, dec.zero, dec.data)
        self.space.map(min(dec.pages), max(dec.pages) - min(dec.pages) + 1)   # eager: the guest needn't fault
        if n and self.space.received_count == self.npages:
            self._complete()
        return n

    def _complete(self):
        with self.lock:
            if self.completing:
                return
            self.completing = True
        self.space.map(0, self.npages)  # anything a race left unmapped
        if not self.space.complete():
            self.fail(f"all {self.npages} pages received but only {self.space.mapped.count()} mapped")
            return
        self.space.finish()
        for r in self.guest.regions:
            self.uffd.unregister(r.guest_addr, r.length)
        with self.lock:
            if not self._move(State.COMPLETE):
                return
            self.t_complete = time.monotonic()
        os.eventfd_write(self.stop_fd, 1)
        st = self.space.stats
        self.guest.notify("complete", pages_total=self.npages, pages_demand=st["placed_demand"],
                          pages_pushed=st["placed_push"], pages_zero=st["placed_zero"],
                          pages_prior=st["placed_prior"])
        try:  # tells the guest side the migration is over
            self.guest.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.reporter.event("completed", f"session {self.id}: {self.npages} pages received and mapped, unregistered",
                            session=self.id, pages_total=self.npages)
        self.done.set()

    # -- guest ------------------------------------------------------------
    def _watch_guest(self):
        try:
            while self.guest.sock.recv(4096):
                pass
        except OSError:
            pass
        if not self.done.is_set():
            self.fail(self._guest_gone())

    def _guest_gone(self) -> str:
        return f"guest process {self.guest.pid} went away before the migration ended"

    # -- results ----------------------------------------------------------
    def progress(self) -> dict:
        """A cheap snapshot for `progress` events: counters only, no sorting."""
        st = self.space.stats
        return {"session": self.id, "t": round(time.monotonic(), 4), "received": st["received"],
                "mapped": st["mapped_pages"], "pages_total": self.npages, "pages_demand": st["placed_demand"],
                "pages_pushed": st["placed_push"], "pages_zero": st["placed_zero"], "faults": st["faults"],
                "faults_fast": st["fast"]}

    def summary(self) -> dict:
        lat = sorted(self.space.latencies_us())
        st = self.space.stats
        end = self.t_complete or time.monotonic()
        return {
            "session": self.id,
            "state": self.state.value,
            "pages_total": self.npages,
            "pages_demand": st["placed_demand"],
            "pages_pushed": st["placed_push"],
            "pages_zero": st["placed_zero"],
            "pages_prior": st["placed_prior"],
            "pages_duplicate": st["duplicates"],
            "page_size": self.page_size,
            "fault_p50_us": round(percentile(lat, 50), 1),
            "fault_p99_us": round(percentile(lat, 99), 1),
            "fault_p999_us": round(percentile(lat, 99.9), 1),
            "faults": st["faults"],
            "faults_fast": st["fast"],
            "faults_minor": st["minor"],
            "demand_requests": st["requests_sent"],
            "map_calls": st["map_calls"],
            "seconds": round(end - (self.t_connect or end), 3),
            "push_s": round(end - self.t_push, 3) if self.t_push else None,
            "prepare_s": self.prepare_s,
            **process_usage(),
            "error": self.error,
        }

    def finish_reply(self) -> pb.FinishReply:
        s = self.summary()
        error = self.error or ""
        if not error and self.state is not State.COMPLETE:
            error = (f"migration is {self.state.value} with {self.space.received_count} of {self.npages} pages "
                     "received" + (f" (the source was dropped: {self.lost_why})"
                                   if self.state is State.DISCONNECTED and self.lost_why else ""))
        return pb.FinishReply(complete=self.state is State.COMPLETE, pages_total=s["pages_total"],
                              pages_demand=s["pages_demand"], pages_pushed=s["pages_pushed"],
                              pages_zero=s["pages_zero"], error=error, failed=self.state is State.FAILED)
from migrate.wire.tcp import tcp_silent_s

"""One guest being filled on the destination: `Migration` builds the guest's
fault space (its userfaultfd registered, the alias mapped, the fault loop and
guest monitor ready to start), binds the sources that serve it
(migrate.dest.state moves it, migrate.dest.channels carries its pages) and
ends it when every page is received and mapped.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time
import uuid

from migrate import hints
from migrate.dest import faultspace
from migrate.dest.adopt import adopt_prior_pages, api_once
from migrate.dest.alloc import AllocResult, BackgroundAllocation
from migrate.dest.attach import AttachedGuest, guest_instance
from migrate.dest.channels import PUSH_STREAMS, Channels, taking_pages
from migrate.dest.faultspace import FaultSpace, SpaceRegion
from migrate.dest.precopy import Precopy
from migrate.dest.state import SERVED, NotAuthorised, Peer, State, StateMachine
from migrate.errors import AttachError, LayoutMismatch, MigrateError, ProtocolError, fmt_size
from migrate.host import background_priority, fault_path_priority
from migrate.memory import GuestMemory
from migrate.metrics import LatencyHistogram
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter, percentile, process_usage
from migrate.status import rate_and_eta
from migrate.uffd import Mode, Userfaultfd
from migrate.wire.protocol import DEFAULT_BATCH_BYTES, PROTOCOL_VERSION, BatchDecoder, raw_zstd_unavailable


# how `migrate status` names each state (migrate.status.STATES)
_STATUS_STATE = {State.ATTACHED: "attached", State.CONNECTED: "connected", State.SWITCHED_OVER: "running",
                 State.DISCONNECTED: "paused", State.PAUSED: "paused", State.COMPLETING: "running",
                 State.COMPLETE: "completed", State.FAILED: "failed"}
# a vCPU thread's name: guestsim's "vcpu-N", QEMU's "CPU N/TCG" (-name debug-threads=on)
_VCPU_NAME = re.compile(r"^(?:vcpu-(\d+)|CPU (\d+)/\w+)$")


class BusyError(MigrateError):
    """A source tried to join a migration that already has one."""


class NoGuestError(MigrateError):
    """A source connected but no guest is attached to take its RAM."""


class Migration:
    """One guest being filled. Owns the guest's descriptors, the alias mapping,
    the fault space, its channels (migrate.dest.channels) and, once start()ed,
    the fault thread and the guest monitor. Its state is `machine`
    (migrate.dest.state)."""

    def __init__(self, guest: AttachedGuest, reporter: Reporter, mode: str = faultspace.MODE_CONTINUE,
                 prepare: bool = True, source_timeout: float = 0, record_hints: str | None = None):
        """Registers the guest's range and acks the guest (or nacks it and
        raises), in milliseconds whatever its size; with prepare, allocate()
        allocates its RAM in the background. Starts no thread: the agent
        calls start() and allocate()."""
        self.id = uuid.uuid4().hex[:12]
        self.guest = guest
        self.reporter = reporter
        self.mode = mode
        self.source_timeout = source_timeout   # see Channels.check_source(); 0: never
        self.record_hints = record_hints       # dest --record-hints FILE, written at completion
        self.machine = StateMachine()
        self.latency = LatencyHistogram()       # demand latencies for metrics, counted as they come
        self.channels = Channels(self)
        self.t_connect: float | None = None
        self.t_complete: float | None = None
        self.instance = ""        # guest_instance(): which guest this is, across agents
        # the current source's pre-copy (Hello.precopy), until and after its switch; None: none
        self.precopy: Precopy | None = None
        self.guest_lost = False   # the migration failed because the guest went away
        self.peer = ""                          # who serves it: the certificate's name, and the source's own
        self.peer_address = ""                  # where from: its demand channel's address
        # guest thread id -> vCPU index, from QEMU (query-cpus-fast); the agent sets it
        self.vcpu_threads = lambda: {}
        self._vcpu_names: dict[int, int | None] = {}
        self.stop_fd = -1
        self.mem = None
        self.uffd = None
        self.fault_thread: threading.Thread | None = None
        self.monitor: threading.Thread | None = None
        self.alloc: BackgroundAllocation | None = None
        try:
            self._setup()
        except BaseException as e:
            guest.nack(str(e))
            self._teardown()
            raise
        guest.ack()
        self.ack_ms: float | None = None   # (start())
        if prepare and mode == faultspace.MODE_CONTINUE:
            self.alloc = BackgroundAllocation(self.space, on_end=self._allocated)

    def start(self) -> None:
        """Starts the fault loop (faults the guest took meanwhile wait in the
        userfaultfd) and the guest monitor."""
        self.fault_thread = threading.Thread(target=self._fault_loop, name=f"faults-{self.id}", daemon=True)
        self.fault_thread.start()
        self.monitor = threading.Thread(target=self._watch_guest, name=f"guest-{self.id}", daemon=True)
        self.monitor.start()
        # From the guest's connection taken to its ack (what QEMU waits for
        # inside mmap) and its faults served: nothing here waits for its RAM.
        if self.guest.accepted_at:
            self.ack_ms = round((time.monotonic() - self.guest.accepted_at) * 1000, 2)

    def allocate(self) -> None:
        """Starts allocating the guest's RAM in the background (with prepare),
        once the agent reported the attach."""
        if self.alloc is not None:
            self.alloc.start()

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def status_state(self) -> str:
        """The state as `migrate status` names it."""
        return _STATUS_STATE[self.state]

    @property
    def error(self) -> str | None:
        return self.machine.error

    @property
    def demand_token(self) -> bytes:
        """What the current source sends to open its demand and push channels."""
        return self.machine.token

    def _allocated(self, r: AllocResult) -> None:
        """The background allocation ended (on its last thread). A backing that
        cannot hold the guest is reported and the migration goes on: the pages
        left are allocated as they arrive, and one that cannot be fails the
        migration saying so."""
        secs = round(r.seconds, 3)
        overlap = round(self.alloc.seconds_between(self.t_connect, self.t_complete), 3)
        fields = dict(session=self.id, prepare_s=secs, alloc_pages=r.pages, alloc_overlap_s=overlap)
        if r.error:
            self.reporter.event("prepare", f"guest RAM not allocated ahead ({r.error}): pages are allocated as "
                                "they arrive", error=r.error, **fields)
        elif r.done:
            self.reporter.event("prepare", f"guest RAM allocated in {secs} s ({overlap} s of it while a "
                                "source was migrating)", **fields)
        else:
            self.reporter.event("prepare", f"guest RAM allocation stopped after {secs} s: the migration "
                                "ended first", stopped=True, **fields)

    # -- setup ------------------------------------------------------------
    def _setup(self):
        g = self.guest
        self.page_size = g.page_size
        self.npages = g.ram_size // g.page_size
        if g.ram_size % g.page_size:
            raise AttachError(f"RAM size {g.ram_size} is not a multiple of the page size {g.page_size}")
        self.uffd = Userfaultfd(g.uffd_fd, owned=False)
        api_once(self.uffd, g.reattach)
        self.mem = GuestMemory.from_fd(os.dup(g.ram_fd), g.ram_size, g.page_size)
        self.instance = guest_instance(g.pid, g.ram_fd)
        mode = Mode.MISSING if self.mode == faultspace.MODE_COPY else Mode.MISSING | Mode.MINOR
        regions = []
        for r in g.regions:
            self.uffd.register(r.guest_addr, r.length, mode, g.page_size)
            regions.append(SpaceRegion(r.guest_addr, r.offset // g.page_size, r.length // g.page_size))
        # Looked at once the range is registered (the guest's own writes now
        # fault), and trusted on a first attach only: a re-attached guest's
        # file holds pages a dead agent wrote that were never mapped.
        fresh = os.fstat(self.mem.fd).st_blocks == 0 and not g.reattach
        self.space = FaultSpace(self.uffd, g.page_size, self.npages, regions,
                                0 if self.mode == faultspace.MODE_COPY else self.mem.alias_addr, self.mode,
                                ram_fd=self.mem.fd, zero_fresh=fresh and self.mode == faultspace.MODE_CONTINUE)
        if self.record_hints:
            self.space.record_touches()
        # file pages no region maps can never fault: nothing to map for them
        covered = PageBitmap(self.npages)
        for r in regions:
            covered.set(r.first_page, r.npages)
        for first, count in covered.runs(set_bits=False):
            self.space.mapped.set(first, count)
        if g.reattach:
            prior = adopt_prior_pages(g.pid, self.space, self.uffd, regions)
            self.reporter.event("reattached", f"guest pid {g.pid} re-attached: {prior} pages already "
                                "mapped in it are kept", pid=g.pid, pages_prior=prior)
        self.decoder = BatchDecoder(self.npages, g.page_size)
        self.stop_fd = faultspace.make_stop_fd()

    def _teardown(self):
        self.channels.stop_taking()   # (a channel taken late starts no receiver on what goes now)
        if self.alloc is not None:
            self.alloc.stop()   # (its threads write through the alias: before it is unmapped)
        if self.stop_fd >= 0:
            os.eventfd_write(self.stop_fd, 1)
            t = self.fault_thread
            if t and t is not threading.current_thread():
                t.join(5)
            # the channel receivers wait on stop_fd too: they leave C before
            # it and their sockets close
            self.channels.join(5)
            os.close(self.stop_fd)
            self.stop_fd = -1
        self.channels.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.guest.close()

    def close(self):
        self._teardown()

    # -- sources ----------------------------------------------------------
    def fail(self, why: str, err: BaseException | None = None, guest_lost: bool = False) -> None:
        """err: what raised, if anything. ESRCH from a userfaultfd ioctl means
        the guest's address space is gone: the guest died, and that is the
        reason to give (whichever thread noticed first). guest_lost: the
        guest went away (the first failure's cause is the one kept)."""
        if getattr(err, "errno", None) == errno.ESRCH:
            why, guest_lost = self._guest_gone(), True

        def announce():
            self.guest_lost = guest_lost
            self.reporter.event("error", why, session=self.id)
        self.machine.fail(why, announce)

    def connect(self, hello: pb.Hello, demand_port: int, peer: Peer = Peer()) -> pb.Welcome:
        """A source's Open: its Welcome, with a new token. Errors to a peer
        that is not authenticated name nothing of the guest (Peer)."""
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(f"source speaks protocol version {hello.version}, this destination speaks "
                                f"{PROTOCOL_VERSION}: run the same migrate release on both hosts")
        if hello.ram_size != self.guest.ram_size or hello.page_size != self.page_size:
            source = f"source RAM is {fmt_size(hello.ram_size)} in pages of {fmt_size(hello.page_size)}"
            if not peer.authenticated:
                raise LayoutMismatch(f"{source}, which does not match the guest attached here: start the "
                                     "destination guest with the source's RAM size and backing")
            raise LayoutMismatch(
                f"{source}, but the guest "
                f"attached here has {fmt_size(self.guest.ram_size)} in pages of {fmt_size(self.page_size)}: "
                "start the destination guest with the source's RAM size and backing")
        if hello.precopy:
            self._check_precopy(hello)
        joined = self.machine.join(peer.identity)
        if joined is None:
            state = self.machine.state
            which = f"migration {self.id}" if peer.authenticated else "the migration here"
            if state in SERVED:
                raise BusyError(f"{which} already has a source connected: "
                                "one source per guest (start another guest to run a second migration)")
            raise BusyError(f"{which} is {state.reported}: it takes no source")
        gen, token = joined
        self.peer = " ".join(x for x in (peer.identity, hello.source_name and f"({hello.source_name})") if x)
        if self.t_connect is None:
            self.t_connect = time.monotonic()
        if self.alloc is not None:
            self.alloc.lower_priority()
        received = self.space.received_count
        comp = pb.COMPRESSION_ZSTD if pb.COMPRESSION_ZSTD in hello.compression else pb.COMPRESSION_NONE
        # zstd push runs are offered whenever this agent can decompress them
        # in C; the source decides whether they pay (source --compress)
        push_comp = pb.COMPRESSION_NONE if raw_zstd_unavailable() else pb.COMPRESSION_ZSTD
        if push_comp == pb.COMPRESSION_ZSTD:
            self.space.accept_zstd_runs()
        self.reporter.event("connected", f"source {hello.source_name or '?'} joined session {self.id}",
                            session=self.id, source=hello.source_name, resumed=received > 0)
        dropped = self.precopy.staged.count() if self.precopy and not self.precopy.switched else 0
        if dropped:
            self.reporter.event("precopy_dropped", f"{dropped} pages an earlier source pre-copied are dropped "
                                "(none was mapped)", session=self.id, pages=dropped)
        # pre-copy: the demand channel is attached only at the switch, whenever
        # that is; its pre-copy channel (or Precopy stream) is due at once and
        # holds the deadline off
        self.precopy = Precopy(self.space) if hello.precopy else None
        self.channels.watch_demand_deadline(gen)
        return pb.Welcome(version=PROTOCOL_VERSION, session_id=self.id, compression=comp,
                          received_bitmap=self.space.received.to_bytes() if received else b"",
                          batch_bytes=max(DEFAULT_BATCH_BYTES, self.page_size), push_streams=PUSH_STREAMS,
                          demand_port=demand_port, demand_token=token,
                          sparse_block_size=self.space.block_size, guest_instance=self.instance,
                          push_compression=push_comp)

    def _check_precopy(self, hello: pb.Hello) -> None:
        if self.mode != faultspace.MODE_CONTINUE:
            raise ProtocolError("pre-copy needs CONTINUE placement (pages wait in the page cache until the "
                                "switch): start `migrate dest` without --placement copy")
        if hello.resume_session or hello.resume_guest or self.space.received_count:
            raise ProtocolError("pre-copy starts a session, it cannot resume one: this guest holds pages "
                                "already; resume it without --precopy")

    def precopy_streaming(self) -> None:
        """A Precopy stream of the current source is open: while it is, the
        source is there (the stream breaking drops it), and no deadline runs."""
        if self.precopy is None:
            raise ProtocolError("Precopy stream on a session opened without Hello.precopy")
        if self.precopy.switched:
            raise ProtocolError("pre-copy pages after the switch: a source sends Precopy batches only "
                                "before its Switch")
        self.channels.cancel_demand_deadline()

    def precopy_receive(self, batch: pb.PageBatch) -> int:
        """A Precopy batch: checked in full, then written into the page cache only."""
        if self.precopy is None:
            raise ProtocolError("Precopy batch on a session opened without Hello.precopy")
        return self.precopy.write(self.decoder.decode(batch))

    def switch(self, gen: int, written) -> pb.SwitchReply:
        """The end of pre-copy: staged pages not written since become
        received and mapped; the written ones are fetched again. The demand
        channel is due from now on."""
        if self.precopy is None:
            raise ProtocolError("Switch on a session opened without Hello.precopy")
        t0 = time.monotonic()
        self.channels.end_precopy(gen)
        n, again = self.precopy.switch(written)
        self.reporter.event("switch", f"pre-copy ended: {n} pages received ({self.precopy.commit_s * 1000:.2f} ms), "
                            f"{again} written since to fetch again", session=self.id, pages_received=n,
                            pages_written=again, commit_ms=round(self.precopy.commit_s * 1000, 3))
        reply = pb.SwitchReply(pages_received=n, received_bitmap=self.space.received.to_bytes())
        if not self.channels.held_demand(gen):   # (else its timer would start only to be cancelled)
            self.channels.watch_demand_deadline(gen, "Switch")
        # The channels the source opened during pre-copy are attached (the
        # demand one releases the guest), then the pre-copied pages mapped, on
        # a thread of their own: the answer does not wait for their threads to
        # start (each start waits for a CPU: 2-11 ms here, in the guest's
        # pause). Pages the source pushes meanwhile wait in the socket.
        self.channels.start_receiver(threading.Thread(target=self._after_switch, args=(gen, t0),
                                                      name=f"precopy-switch-{self.id}", daemon=True))
        return reply

    def _after_switch(self, gen: int, t0: float) -> None:
        with taking_pages(self, gen, bad="bad switch", placing="attaching the channels held until the switch"):
            self.channels.release_held(gen)
        ms = round((time.monotonic() - t0) * 1000, 3)
        self.reporter.event("switched", f"the held channels attached {ms} ms after the Switch came",
                            session=self.id, handler_ms=ms)
        self._map_precopied(gen)

    def _map_precopied(self, gen: int) -> None:
        """After the switch: maps the pre-copied pages while the guest may
        already run (migrate.dest.precopy.Precopy.map)."""
        # it runs through the guest's pause: the device state's load and the
        # guest's start come first (on 2 CPUs, a 512 MiB map took 20-200 ms)
        background_priority()
        with taking_pages(self, gen, bad="bad switch", placing="mapping pre-copied pages"):
            n = self.precopy.map()
            self.reporter.event("precopy_mapped", f"{n} pre-copied pages mapped in {self.precopy.map_s * 1000:.1f} "
                                "ms", session=self.id, pages=n, map_ms=round(self.precopy.map_s * 1000, 2))

    def admit(self, token: bytes, peer: Peer, call: str) -> int:
        """The generation of the source a Push or DeviceState call comes from;
        NotAuthorised unless it carries the current source's token, from the
        peer that opened the session (migrate.dest.state decides)."""
        gen = self.machine.admit(token, peer.identity)
        if gen is None:
            raise NotAuthorised(call)
        return gen

    def source_lost(self, gen: int, why: str) -> None:
        """The source of generation gen is gone: its channels are shut (their
        receivers let go of what they claimed) and the next source resumes.
        Nothing happens when there is nothing to lose (migrate.dest.state): a
        source whose channels end while the last page is being mapped (the
        demand and push receivers both finish pages) has served it all."""
        if not self.machine.lose_source(gen, why):
            return
        self.channels.shut(gen)
        self.reporter.event("disconnected", f"source left before the end ({why}); waiting for another",
                            session=self.id, received=self.space.received_count, total=self.npages)

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
        if self.machine.ended.is_set():
            return 0
        dec = self.decoder.decode(batch)
        if not dec.pages:
            return 0
        n = self.space.place_batch(dec.pages, dec.zero, dec.data)
        self.space.map_placed(min(dec.pages), max(dec.pages) - min(dec.pages) + 1)   # eager: the guest needn't fault
        if n and self.space.received_count == self.npages:
            self.complete()
        return n

    def complete(self):
        """Every page is received: the last are mapped, the range unregistered."""
        if not self.machine.start_completing():
            return
        self.space.map(0, self.npages)  # anything a race left unmapped
        if not self.space.complete():
            self.fail(f"all {self.npages} pages received but only {self.space.mapped.count()} mapped")
            return
        self.space.finish()
        for r in self.guest.regions:
            self.uffd.unregister(r.guest_addr, r.length)
        if self.record_hints:
            self._write_hints()
        self.machine.complete(self._announce_complete)

    def _write_hints(self) -> None:
        """dest --record-hints: the guest's first touches, for source --hints.
        A file that cannot be written is reported; the migration is done."""
        pages = self.space.touches()
        try:
            size = hints.write(self.record_hints, pages, self.page_size, self.npages)
        except OSError as e:
            self.reporter.event("error", f"session {self.id}: hint file {self.record_hints} not written "
                                f"({e.strerror}): check the directory exists and is writable", session=self.id)
            return
        self.reporter.event("hints", f"session {self.id}: {len(pages)} first touches written to "
                            f"{self.record_hints} ({size} bytes)", session=self.id, hint_pages=len(pages),
                            hint_bytes=size)

    def _announce_complete(self) -> None:
        self.t_complete = time.monotonic()
        os.eventfd_write(self.stop_fd, 1)
        if self.alloc is not None:
            self.alloc.stop(wait=False)   # every page is here: nothing is left to allocate (joined at close)
        st = self.space.stats
        if self.machine.completing_from in (State.CONNECTED, State.DISCONNECTED):
            # Every page arrived before the source's demand channel was taken
            # (its push channels' hellos were served first, on a loaded host):
            # the guest was never released. It may run now, on memory that is
            # all here. (A guest that hears `complete` first runs too.)
            self.guest.notify("switchover")
        self.guest.notify("complete", pages_total=self.npages, pages_demand=st["placed_demand"],
                          pages_pushed=st["placed_push"], pages_zero=st["placed_zero"],
                          pages_prior=st["placed_prior"])
        try:  # tells the guest side the migration is over
            self.guest.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.reporter.event("completed", f"session {self.id}: {self.npages} pages received and mapped, unregistered",
                            session=self.id, pages_total=self.npages)

    # -- guest ------------------------------------------------------------
    def _watch_guest(self):
        try:
            while self.guest.sock.recv(4096):
                pass
        except OSError:
            pass
        self.fail(self._guest_gone(), guest_lost=True)   # (nothing to fail once it ended)

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

    def vcpus(self) -> list[dict]:
        """Blocked time per guest thread that waited for the source, each
        labelled with its vCPU index where known: from QEMU (query-cpus-fast),
        or from the thread's name (guestsim's vcpu-N, QEMU's CPU N/TCG)."""
        out = []
        known = self.vcpu_threads()
        for t in self.space.thread_blocks():
            tid = t["tid"]
            vcpu = known.get(tid)
            if vcpu is None:
                vcpu = self._vcpu_named(tid)
            out.append({"vcpu": vcpu, **t})
        return sorted(out, key=lambda v: (v["vcpu"] is None, v["vcpu"] or 0, v["tid"]))

    def _vcpu_named(self, tid: int) -> int | None:
        if tid not in self._vcpu_names:
            try:
                with open(f"/proc/{self.guest.pid}/task/{tid}/comm") as f:
                    m = _VCPU_NAME.match(f.read().strip())
                self._vcpu_names[tid] = int(m.group(1) or m.group(2)) if m else None
            except (OSError, ValueError):
                return None   # (gone, or not ours to read: asked again next time)
        return self._vcpu_names[tid]

    def snapshot(self, recent: int = 0) -> dict:
        """What `migrate status` shows of this migration (migrate.status); the
        fault percentiles from the last `recent` demand faults only (0: all
        of them, as the summary)."""
        st = self.space.stats
        lat = sorted(self.space.latencies_us(recent))
        seconds = (self.t_complete or time.monotonic()) - self.t_connect if self.t_connect else 0.0
        received = st["received"] - st["placed_prior"]
        gbps, eta = rate_and_eta(received, self.npages - st["placed_prior"], self.page_size, seconds)
        state = self.state
        peer = " ".join(x for x in (self.peer, self.peer_address and f"at {self.peer_address}") if x)
        return {"session": self.id, "state": _STATUS_STATE[state], "peer": peer, "guest_pid": self.guest.pid,
                "guest": self.guest.name, "pages_total": self.npages, "pages_received": st["received"],
                "pages_demand": st["placed_demand"], "pages_pushed": st["placed_push"],
                "pages_zero": st["placed_zero"], "pages_prior": st["placed_prior"], "page_size": self.page_size,
                "gbps": gbps, "eta_s": 0.0 if state is State.COMPLETE else eta, "seconds": round(seconds, 3),
                "wire_bytes": self.channels.wire_bytes(), "faults": st["faults"], "faults_fast": st["fast"],
                "faults_demand": st["requested"], "fault_p50_us": round(percentile(lat, 50), 1),
                "fault_p99_us": round(percentile(lat, 99), 1), "vcpus": self.vcpus(), "error": self.error}

    def summary(self) -> dict:
        lat = sorted(self.space.latencies_us())
        st = self.space.stats
        end = self.t_complete or time.monotonic()
        return {
            "session": self.id,
            "state": self.state.reported,
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
            "push_s": round(end - self.channels.t_push, 3) if self.channels.t_push else None,
            "wire_bytes": self.channels.wire_bytes(),
            "vcpus": self.vcpus(),
            "blocked_s": round(sum(v["blocked_s"] for v in self.vcpus()), 6),
            "ack_ms": self.ack_ms,
            # the background allocation: how long it ran, and how much of that
            # while a source was migrating (0: it ended before the source came)
            "prepare_s": round(self.alloc.seconds, 3) if self.alloc and self.alloc.seconds is not None else None,
            "alloc_overlap_s": (round(self.alloc.seconds_between(self.t_connect, self.t_complete), 3)
                                if self.alloc is not None else None),
            **process_usage(),
            "error": self.error,
        }

    def finish_reply(self) -> pb.FinishReply:
        s = self.summary()
        state, lost_why = self.state, self.machine.lost_why
        error = self.error or ""
        if not error and state is not State.COMPLETE:
            error = (f"migration is {state.reported} with {self.space.received_count} of {self.npages} pages "
                     "received" + (f" (the source was dropped: {lost_why})" if lost_why else ""))
        return pb.FinishReply(complete=state is State.COMPLETE, pages_total=s["pages_total"],
                              pages_demand=s["pages_demand"], pages_pushed=s["pages_pushed"],
                              pages_zero=s["pages_zero"], error=error, failed=state is State.FAILED,
                              guest_lost=state is State.FAILED and self.guest_lost)

"""Pre-copy, then post-copy (`migrate source --precopy`): most of the RAM
moves while the source guest still runs.

The source guest attaches to this agent as a destination guest attaches to
its own (docs/attach-protocol.md; `migrate.dest.attach.AttachListener` is the
one agent end): it hands over its userfaultfd and RAM file. The agent
registers the guest's regions for async write-protect and protects all of it
(`migrate.source.wp`); then, within the session the `Source` opened with
`Hello.precopy`:

1. round 1 sends every page on a `Precopy` stream;
2. each later round scans the pages written meanwhile (one PAGEMAP_SCAN,
   which protects them again) and sends those;
3. after a round, the switch comes when the pages written meanwhile are at
   most `--switch-below`, when that count stopped shrinking for
   STALL_ROUNDS rounds, after `--switch-after` seconds, or when asked
   (SIGUSR1, or `migrate status --source PATH --switch`);
4. the switch pauses the guest (`pause()`: guestsim stops its writer; QEMU is
   stopped over QMP), takes the final scan and sends the final written list
   (`Switch`); the destination maps every other page it has, and the
   session goes on as post-copy, from the pages it lacks.

A failure before the switch leaves the guest as it was: the protection is
removed and the guest is resumed if it was paused. See docs/precopy.md.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
import socket
import threading
import time
from dataclasses import dataclass

import grpc

from migrate import host
from migrate._binding import ffi, lib
from migrate.errors import AttachError, DestinationLost, MigrateError, SourceError, SourceGuestGone
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter
from migrate.source.session import rpc_error
from migrate.source.wp import WriteTracker
from migrate.wire.protocol import BatchEncoder

SWITCH_BELOW_BYTES = 4 << 20   # --switch-below's default, as RAM: 1024 pages of 4 KiB
STALL_ROUNDS = 3          # rounds whose written set did not shrink before the switch comes anyway
# a Switch answered with one of these was refused: the destination did not switch
_REFUSED = frozenset((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS))
IDLE_ROUND = 0.05         # s a round with nothing to send waits before the next scan
PAUSE_TIMEOUT = 10.0      # s the guest may take to say it paused


@dataclass(frozen=True)
class SwitchPolicy:
    # --switch-below PAGES: switch once a round leaves at most this many
    # written; None: SWITCH_BELOW_BYTES of the guest's pages (for_pages)
    below: int | None = None
    after: float = 0.0    # --switch-after SECONDS: switch after this long in pre-copy (0: no limit)
    stall: int = STALL_ROUNDS

    def for_pages(self, page_size: int) -> "SwitchPolicy":
        """The policy with its default below for pages of page_size (1024 of
        4 KiB, 2 of 2 MiB: the same RAM left to fetch after the switch)."""
        if self.below is not None:
            return self
        return dataclasses.replace(self, below=max(1, SWITCH_BELOW_BYTES // page_size))

    def why(self, written: int, history: list[int], elapsed: float, asked: bool) -> str | None:
        """Why to switch now, or None to go on with another round."""
        if asked:
            return "asked to"
        if written <= self.below:
            return f"{written} pages written, at most --switch-below {self.below}"
        if self.after and elapsed >= self.after:
            return f"--switch-after {self.after:g} s"
        recent = history[-(self.stall + 1):]
        if self.stall > 0 and len(recent) > self.stall and all(b >= a for a, b in zip(recent, recent[1:])):
            return f"the written set stopped shrinking ({', '.join(map(str, recent))} pages)"
        return None


class Precopy:
    """The pre-copy of one source guest. Borrows the tracker (and its
    guest's userfaultfd) and the RAM mapping; pause() and resume() act on the
    guest. switch_now is set from another thread (a signal, the control
    socket) to switch after the current round."""

    def __init__(self, tracker: WriteTracker, reporter: Reporter, policy: SwitchPolicy, *, pause, resume):
        self.tracker = tracker
        self.reporter = reporter
        self.policy = policy.for_pages(tracker.page_size)
        self.pause = pause
        self.resume = resume
        # the Switch is about to go (a QEMU's device state may then be loaded
        # at the destination: migrate.qemu.source.QemuPause)
        self.switching = lambda: None
        # after a Switch that got no answer: whether the destination may have
        # all the guest needs to run there. A simulated guest needs nothing
        # more than the switch itself.
        self.whole = lambda: True
        self.switch_now = threading.Event()
        self.rounds: list[dict] = []
        self.protect_ms = 0.0
        self.final_pages = 0
        self.paused = False
        self.switched = False
        self.switch_ms = 0.0      # from asking the guest to pause to the destination's answer to Switch

    def request_switch(self) -> dict:
        """A person asked for the switch (control socket): after the current round."""
        self.switch_now.set()
        return {"switch": "after the current round" if not self.switched else "done already"}

    def run(self, src, stub) -> pb.SwitchReply:
        """The rounds and the switch, on src's open session (migrate.source.session.Source)."""
        ram = src.ram
        npages = ram.npages
        # the stream first: the destination wants it within 15 s of Open,
        # and protecting a large guest takes about 10 ms a GiB. The raw
        # pre-copy channel is open already (Source._open_early)
        raw = src.precopy_channel()
        stream = _RawStream(src, raw) if raw is not None else _Stream(src, stub)
        if raw is not None:
            # round 1 protects each chunk right before it reads it (a page the
            # guest writes before its first copy then costs it nothing)
            self.tracker.register()
            protect = self.tracker.protect_pages
            how = "each chunk protected as round 1 reaches it"
        else:
            self.tracker.protect_all()
            protect = None
            how = f"{self.tracker.protect_seconds * 1000:.1f} ms to protect all"
        self.reporter.event("precopy", f"write tracking on {npages} pages ({how})", pages=npages)
        t0 = time.monotonic()
        pending = PageBitmap(npages)
        pending.set(0, npages)
        history: list[int] = []
        # The rounds yield the CPU to the guest, which runs meanwhile (its vCPU
        # threads sleep mostly and take little from them); the switch is at
        # normal priority again
        host.background_priority()
        try:
            # One Precopy stream for every round: while it is open the destination
            # knows its source is there (a source lost between two streams would
            # leave it waiting); it ends, all written, before the Switch.
            while True:
                sent, secs = self._round(stream, src, pending, protect if not self.rounds else None)
                scan = self.tracker.scan()
                pending = scan.written
                history.append(scan.pages)
                r = {"round": len(self.rounds) + 1, "pages_sent": sent, "pages_written": scan.pages,
                     "seconds": round(secs, 4), "scan_ms": round(scan.seconds * 1000, 3),
                     "gbps": round(sent * ram.page_size / secs / 1e9, 3) if secs else 0.0}
                self.rounds.append(r)
                self.reporter.event("round", f"round {r['round']}: {sent} pages sent in {r['seconds']} s "
                                    f"({r['gbps']} GB/s), {scan.pages} written meanwhile "
                                    f"(scan {r['scan_ms']} ms)", **r)
                why = self.policy.why(scan.pages, history, time.monotonic() - t0, self.switch_now.is_set())
                if why:
                    break
            stream.close()
        finally:
            host.normal_priority()
        self.protect_ms = round(self.tracker.protect_seconds * 1000, 3)
        # the rounds' garbage is collected now, while the guest runs, so
        # that no collection falls in its pause
        gc.collect()
        gc.freeze()
        t_pause = time.monotonic()
        self.pause()
        self.paused = True
        t_paused = time.monotonic()
        final = self.tracker.scan(pending)
        self.final_pages = pending.count()
        written = [p for first, n in pending.runs() for p in range(first, first + n)]
        t_rpc = time.monotonic()
        self.switching()
        try:
            reply = src.wait_rpc(stub.Switch.future(pb.SwitchRequest(session_id=src.session, token=src.token,
                                                                     written=written)))
        except (grpc.RpcError, DestinationLost) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else None
            if code in _REFUSED or not self.whole():
                # refused, so not switched; or the guest's stream was cut
                # short: the destination cannot start the guest either way
                if isinstance(e, grpc.RpcError):
                    raise rpc_error(e, "Switch") from None
                raise
            # No answer: the destination may have switched, and it has all the
            # guest needs to run there. The guest stays paused here, and the
            # session goes on as a post-copy one would after losing its
            # destination (migrate.source.recovery).
            self.switched = True
            why = f"{code.name}: {e.details()}" if code is not None else str(e)
            raise DestinationLost(f"the Switch got no answer ({why}); the destination may have switched") \
                from None
        self.switched = True
        t_end = time.monotonic()
        # The tracker stays until release(): unprotecting and unregistering
        # (67 ms for a 512 MiB QEMU guest) only matters to a guest that runs
        # here again, so it is done after the pause, not in it.
        self.switch_ms = round((t_end - t_pause) * 1000, 2)
        self.reporter.event("switch", f"switched after {len(self.rounds)} rounds ({why}): {self.final_pages} "
                            f"pages written since their copy are fetched again, {reply.pages_received} received at "
                            f"the destination ({self.switch_ms} ms from the pause)", rounds=len(self.rounds),
                            reason=why, pages_written=self.final_pages, pages_received=reply.pages_received,
                            pause_ms=round((t_paused - t_pause) * 1000, 2), final_scan_ms=round(final.seconds * 1000, 3),
                            switch_rpc_ms=round((t_end - t_rpc) * 1000, 2), switch_ms=self.switch_ms)
        return reply

    def _round(self, stream: "_Stream", src, pages: PageBitmap, protect=None) -> tuple[int, float]:
        """Sends pages on the pre-copy stream; returns (pages, seconds) once
        gRPC has taken the last batch. protect(first, count): called on each
        run of pages right before they are read (the raw stream)."""
        ram = src.ram
        t0 = time.monotonic()
        if not pages.count():
            # nothing written since: wait a little before the next scan rather
            # than spin, and keep the stream alive (the destination drops a
            # stream silent for 2 minutes; a raw channel is kept by TCP's
            # keepalive)
            if isinstance(stream, _RawStream):
                time.sleep(IDLE_ROUND)
                return 0, time.monotonic() - t0
            stream.put(pb.PageBatch())
            time.sleep(IDLE_ROUND)
            stream.drain()
            return 0, time.monotonic() - t0
        if isinstance(stream, _RawStream):
            return stream.send(pages, protect)
        per = max(1, src.batch_bytes // ram.page_size)
        enc = BatchEncoder(ram.addr, ram.page_size, per, src.compress)
        sent = 0

        def put(batch: list[int]) -> None:
            nonlocal sent
            stream.put(enc.encode(batch))
            sent += len(batch)
            if src.max_rate:   # --max-rate paces pre-copy as it paces the push
                ahead = sent * ram.page_size / src.max_rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

        # a batch takes pages from several runs: written pages are mostly scattered
        batch: list[int] = []
        for first, n in pages.runs():
            at = first
            while at < first + n:
                take = min(first + n - at, per - len(batch))
                batch.extend(range(at, at + take))
                at += take
                if len(batch) == per:
                    put(batch)
                    batch = []
        if batch:
            put(batch)
        stream.drain()
        return pages.count(), time.monotonic() - t0

    def release(self) -> None:
        """After the switch, once the pause is over (or the session failed):
        the write protection is removed. It is async, so a source guest
        resumed before this does not notice it. A failure here is reported,
        not raised: the migration does not depend on it."""
        try:
            self.tracker.close()
        except MigrateError as e:
            self.reporter.event("error", f"removing the source guest's write protection: {e}")

    def abandon(self) -> None:
        """The session failed before the switch: the guest runs on as it was
        (unprotected, and resumed if it was paused)."""
        try:
            self.tracker.close()
        finally:
            if self.paused and not self.switched:
                self.resume()
                self.paused = False

    def summary(self) -> dict:
        return {"precopy_rounds": len(self.rounds), "precopy_protect_ms": self.protect_ms,
                "precopy_pages_sent": sum(r["pages_sent"] for r in self.rounds),
                "precopy_final_written": self.final_pages, "precopy_switch_ms": self.switch_ms,
                "precopy_scan_ms_max": max((r["scan_ms"] for r in self.rounds), default=0.0),
                "rounds": self.rounds}


class _Stream:
    """The pre-copy stream: batches go through a short queue to gRPC's
    request iterator, so that put() waits as the stream's flow control
    does; a stream that failed raises at the next put()."""

    QUEUED = 4   # batches waiting for gRPC

    def __init__(self, src, stub):
        self.src = src
        self.q: queue.Queue = queue.Queue(maxsize=self.QUEUED)
        self.fut = stub.Precopy.future(self._requests())

    def _requests(self):
        yield pb.PageBatch(session_id=self.src.session, token=self.src.token)
        while True:
            b = self.q.get()
            if b is None:
                return
            yield b
            self.q.task_done()   # (asked for the next: this one is gRPC's)

    def _check(self) -> None:
        if self.fut.done():
            self.result()
            raise SourceError("the pre-copy stream ended before the switch")
        self.src.check_interrupted()

    def put(self, batch) -> None:
        while True:
            self._check()
            try:
                self.q.put(batch, timeout=0.1)
                return
            except queue.Full:
                pass

    def drain(self) -> None:
        while self.q.unfinished_tasks:
            self._check()
            time.sleep(0.0005)

    def result(self) -> pb.PushSummary:
        try:
            return self.src.wait_rpc(self.fut)
        except grpc.RpcError as e:
            raise rpc_error(e, "pre-copy stream") from None

    def close(self) -> pb.PushSummary:
        """Ends the stream once the destination wrote everything in it."""
        self.put(None)
        return self.result()


class _RawStream:
    """The rounds on the raw pre-copy channel: C writes runs straight from
    the RAM mapping (mg_push_runs, GIL released), as the raw push does. One
    channel, one TCP stream: a page's copies arrive in the order they were
    sent. close() ends it and waits for the destination's count of pages
    written, so that Switch comes after the last of them."""

    CHUNK_PAGES = 8192   # pages per C call: between calls the pace and a destination found gone are checked

    def __init__(self, src, sock):
        self.src = src
        self.sock = sock   # src's (its _close closes it)
        ram = src.ram
        # Dense, no holes: the guest writes its RAM meanwhile (the zero pages
        # still go as bits). Lives as long as this object.
        r = self.r = ffi.new("struct mg_src_ram *")
        r.base, r.page_size, r.npages = ram.addr, ram.page_size, ram.npages
        # runs go raw (st.compress 0): the destination's pre-copy receiver takes dense runs only
        self.st = ffi.gc(lib.mg_push_stream_new(0), lib.mg_push_stream_free)
        self.pages = 0
        self.t0 = time.monotonic()

    def send(self, pages: PageBitmap, protect=None) -> tuple[int, float]:
        t0 = time.monotonic()
        runs: list[int] = []
        n = 0
        for first, count in pages.runs():
            while count:
                take = min(count, self.CHUNK_PAGES - n)
                runs += (first, take)
                n += take
                first += take
                count -= take
                if n == self.CHUNK_PAGES:
                    self._send(runs, n, protect)
                    runs, n = [], 0
        if runs:
            self._send(runs, n, protect)
        return pages.count(), time.monotonic() - t0

    def _send(self, runs: list[int], n: int, protect=None) -> None:
        src = self.src
        src.check_interrupted()
        if protect is not None:   # (before the pages are read: a write after it is seen)
            for i in range(0, len(runs), 2):
                protect(runs[i], runs[i + 1])
        rc = lib.mg_push_runs(self.sock.fileno(), self.r, ffi.new("uint64_t[]", runs), len(runs) // 2, ffi.NULL,
                               self.st)
        if rc < 0:
            raise src._channel_error("pre-copy", rc)
        self.pages += n
        if src.max_rate:   # --max-rate paces pre-copy as it paces the push
            ahead = self.pages * src.ram.page_size / src.max_rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        """Ends the channel once the destination wrote everything in it."""
        src = self.src
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(max(30.0, src.dest_timeout))
            got = b""
            while len(got) < 8:
                b = self.sock.recv(8 - len(got))
                if not b:
                    break
                got += b
        except OSError as e:
            raise DestinationLost(f"pre-copy channel: {e.strerror or e}") from None
        if len(got) < 8:
            raise DestinationLost("pre-copy channel: the destination closed it before saying it had written the "
                                  "pages")
        if int.from_bytes(got, "little") != self.pages:
            raise SourceError(f"pre-copy channel: the destination wrote {int.from_bytes(got, 'little')} pages of "
                              f"the {self.pages} sent")


class GuestPause:
    """Pausing a guest that attached over the attach socket (guestsim --role
    source): {"event": "pause"}, answered {"event": "paused"}."""

    def __init__(self, guest):
        self.guest = guest   # migrate.dest.attach.AttachedGuest, borrowed

    def pause(self) -> None:
        from migrate.wire.attach import recv_msg, send_msg
        sock = self.guest.sock
        try:
            send_msg(sock, {"event": "pause"})
            sock.settimeout(PAUSE_TIMEOUT)
            msg, _ = recv_msg(sock)
        except (OSError, AttachError) as e:
            raise SourceGuestGone(f"pausing the source guest (pid {self.guest.pid}): it went away ({e}): nothing "
                                  "is left to migrate") from None
        finally:
            sock.settimeout(None)
        if msg.get("event") != "paused":
            raise SourceError(f"pausing the source guest (pid {self.guest.pid}): it answered {msg!r}")

    def resume(self) -> None:
        self.guest.notify("resume")


class SourceGuest:
    """`source --precopy`: the source guest attached to this agent, its write
    tracking and its Precopy. Owns the attach listener and the guest's
    descriptors until close()."""

    def __init__(self, listener, guest, precopy: Precopy):
        self.listener, self.guest, self.precopy = listener, guest, precopy
        self.completed = False   # the migration completed: the guest runs at the destination

    @classmethod
    def accept(cls, path: str, timeout: float, reporter: Reporter, policy: SwitchPolicy,
               qmp: bool = False) -> "SourceGuest":
        """Listens on path (the attach protocol's agent end, as a destination
        agent listens: migrate.dest.attach) for the source guest, sets up its
        write tracking and acks it. Raises a MigrateError saying why not.
        qmp: the guest is a QEMU under the shim, paused and resumed over QMP
        (migrate.qemu.source.migrate_vm sets the Precopy's pause and resume)."""
        import os
        import socket

        from migrate.dest.attach import AttachListener, StatusRequest
        from migrate.uffd import Userfaultfd

        listener = AttachListener(path)
        reporter.event("listening", f"waiting for the source guest on {path}", attach=path)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise socket.timeout()
                    got = listener.accept(timeout=left)
                except socket.timeout:
                    raise SourceError(f"no source guest attached to {path} within {timeout:g} s") from None
                except AttachError as e:
                    reporter.event("error", f"attach refused: {e}")
                    continue
                if isinstance(got, StatusRequest):
                    got.answer({"role": "source", "pid": os.getpid(), "migrations": []})
                    continue
                break
        except BaseException:
            listener.close()
            raise
        guest = got
        try:
            tracker = WriteTracker(Userfaultfd(guest.uffd_fd, owned=False), guest.pid, guest.regions,
                                   guest.page_size)
        except MigrateError as e:
            guest.nack(str(e))
            guest.close()
            listener.close()
            raise SourceError(f"write tracking for the source guest: {e}") from None
        guest.ack()
        tracker.start_register()   # (while the agent connects: Precopy.run waits for it)
        reporter.event("attached", f"source guest pid {guest.pid}: {guest.ram_size} bytes in pages of "
                       f"{guest.page_size}", pid=guest.pid, size=guest.ram_size, page_size=guest.page_size)
        if qmp:
            return cls(listener, guest, Precopy(tracker, reporter, policy, pause=None, resume=None))
        gp = GuestPause(guest)
        return cls(listener, guest, Precopy(tracker, reporter, policy, pause=gp.pause, resume=gp.resume))

    @property
    def ram_path(self) -> str:
        """Where this agent opens the guest's RAM (the fd it received)."""
        return f"/proc/self/fd/{self.guest.ram_fd}"

    def close(self) -> None:
        """Closing the attach socket before the switch lets the guest write
        on (the agent has resumed it); after the switch the guest stays
        paused whatever happened, and hears "complete" only if it is."""
        if self.completed:
            self.guest.notify("complete")
        self.guest.close()
        self.listener.close()

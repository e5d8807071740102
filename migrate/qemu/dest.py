"""QEMU on the destination (`migrate dest --qmp`): feeds the device state the
source sends, as it arrives, to a QEMU started with `-incoming defer`, which
waits in migrate-incoming on a pipe from the moment it is up, and starts the
guest once loaded.

Loading the device state reads guest RAM (kvmvapic reads the option ROM at
0xc0000), and QEMU's main thread blocks on that fault until the page
arrives: the state only comes through a session whose source is connected
and serves demand faults.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field


from migrate.errors import MigrateError, fmt_size
from migrate.report import Reporter
from migrate.proto import migration_pb2 as pb
from migrate.qemu.qmp import DEVSTATE_FD_NAME, QMP, QemuError


DEFAULT_MAX_DEVICE_STATE = 1 << 30   # `dest --max-device-state`
PIPE_BYTES = 1 << 20                 # QEMU's incoming pipe (the default pipe-max-size)


class DeviceStateTooLarge(QemuError):
    """The source sent more device state than --max-device-state."""


# -- destination --------------------------------------------------------------
@dataclass
class Feed:
    bytes: int = 0
    running: bool = False
    error: str = ""
    received: bool = False     # every chunk arrived (the source closed its stream)
    load_ms: float = 0.0
    resume_time: float = 0.0   # QEMU's RESUME event (epoch seconds)
    times: dict = field(default_factory=dict)   # the switchover's moments (migrate.qemu.switchover)
    recovered: bool = False    # not fed here: a recovering source's guest loaded it under an earlier agent
    done: threading.Event = field(default_factory=threading.Event)


class DeviceStateFeeder:
    """The destination side: gives the device state to the local QEMU
    (`-incoming defer`, started with the shim) as it arrives; that QEMU starts
    the guest itself once it has loaded it (`cont` only if it stays paused)."""

    def __init__(self, qmp_path: str, reporter: Reporter, timeout: float = 120.0, wait_qemu: float = 3600.0,
                 max_bytes: int = DEFAULT_MAX_DEVICE_STATE):
        self.qmp_path = qmp_path
        self.max_bytes = max_bytes
        self.reporter = reporter
        self.timeout = timeout
        self.feeds: dict[str, Feed] = {}
        self.lock = threading.Lock()
        # The QMP connection is made ahead, as soon as QEMU is up (after the
        # shim's attach), and QEMU is put in migrate-incoming on a pipe right
        # away: it waits there for the first byte, so the guest's pause
        # includes neither connecting nor asking it.
        self._qmp: QMP | None = None
        self._pipe_w = -1          # the write end of QEMU's incoming pipe (non-blocking)
        self._qmp_error = ""
        # the QEMU runs a guest it loaded from a device state before this
        # agent started (an agent restarted after the load): a source
        # recovering that guest may serve it without device state
        self.loaded_guest = False
        self.qemu_status = ""
        self.vcpu_threads: dict[int, int] = {}   # QEMU's vCPU thread ids -> cpu-index (query-cpus-fast)
        self._qmp_ready = threading.Event()
        threading.Thread(target=self._connect, args=(wait_qemu,), name="qmp-connect", daemon=True).start()

    def _connect(self, wait: float) -> None:
        try:
            q = QMP(self.qmp_path, timeout=wait)
            try:
                st = self.qemu_status = q.status()
                if st != "inmigrate" and self._loaded(q, st):
                    return
                if st != "inmigrate":
                    raise QemuError(f"destination QEMU is {st!r}: start it with -incoming defer")
                q.set_caps(x_ignore_shared=True, events=True)
                self._vcpu_threads(q)
                self._pipe_w = incoming_pipe(q)
            except BaseException:
                q.close()
                raise
            self._qmp = q
            self.reporter.event("qemu", f"QMP {self.qmp_path}: QEMU {q.version.get('major')}."
                                f"{q.version.get('minor')}.{q.version.get('micro')} waits for its device state "
                                "in migrate-incoming", qmp=self.qmp_path)
        except MigrateError as e:
            self._qmp_error = str(e)
        finally:
            self._qmp_ready.set()

    def _loaded(self, q: QMP, status: str) -> bool:
        """Whether the QEMU (status, not inmigrate) runs a guest it loaded
        from a device state: its incoming migration completed (an agent
        restarted after its QEMU loaded the state, whose source may not have
        heard so). A guest left paused after its load is sent `cont`, as
        RunWatch would have. Closes q when it returns True."""
        if status not in ("running", "paused") or q.cmd("query-migrate").get("status") != "completed":
            return False
        if status == "paused":
            q.cmd("cont")
        self._vcpu_threads(q)
        q.close()
        self.loaded_guest = True
        self._qmp_error = (f"the destination QEMU at {self.qmp_path} runs a guest it loaded already: it takes no "
                           "device state (start a new one with -incoming defer)")
        self.reporter.event("qemu", f"QMP {self.qmp_path}: QEMU runs a guest whose device state it loaded "
                            f"({status} after its incoming migration completed): a source recovering that guest "
                            "serves it the rest", qmp=self.qmp_path, loaded=True)
        return True

    def _vcpu_threads(self, q: QMP) -> None:
        """Which thread runs which vCPU: per-vCPU blocked time comes from the
        faults' thread ids."""
        try:
            self.vcpu_threads = {int(c["thread-id"]): int(c["cpu-index"]) for c in q.cmd("query-cpus-fast")}
        except (QemuError, KeyError, TypeError, ValueError) as e:   # (labels only: the migration goes on)
            self.reporter.event("qemu", f"QMP {self.qmp_path}: no vCPU thread ids ({e}): blocked time "
                                "is reported per thread", qmp=self.qmp_path)

    def ready(self, wait: float = 30.0) -> None:
        """Returns once the destination QEMU waits in migrate-incoming (a source
        opening a session stops its QEMU only after that); else QemuError."""
        if not self._qmp_ready.wait(wait):
            raise QemuError(f"no QMP connection to the destination QEMU at {self.qmp_path} after {wait:.0f} s")
        with self.lock:
            if self._qmp is None:
                raise QemuError(self._qmp_error or f"the destination QEMU at {self.qmp_path} took a device state "
                                "already: start a new one with -incoming defer")

    def _take(self) -> tuple[QMP, int]:
        self.ready()
        with self.lock:
            if self._qmp is None:
                raise QemuError(self._qmp_error or f"no QMP connection to {self.qmp_path}")
            q, w, self._qmp, self._pipe_w = self._qmp, self._pipe_w, None, -1
        return q, w

    def _give_back(self, q: QMP, w: int) -> None:
        """QEMU read nothing of a stream that failed: it still waits, for the next."""
        with self.lock:
            self._qmp, self._pipe_w = q, w

    def why_not_resumable(self, session_id: str) -> str | None:
        """None when a source may resume session_id without device state: its
        state arrived whole and has not failed to load (it may still be
        loading: the load reads guest RAM, which only a source can serve, so a
        source lost during the load is replaced by one that resumes). Else why not."""
        f = self.feeds.get(session_id) if session_id else None
        if f is None:
            return "no device state of that session reached this destination"
        if f.error:
            return f"the device state of that session did not load here ({f.error})"
        if not f.received:
            return "the device state of that session is still arriving"
        return None

    def why_not_recoverable(self, session_id: str, wait: float = 2.0) -> str | None:
        """None when a recovering source (Hello.resume_guest) may serve its
        guest here without device state: the session's state arrived here
        whole and did not fail to load, or (an agent restarted since) the
        QEMU here runs a guest it loaded, or cannot say yet (its monitor may
        wait for a page only a source can serve: verify_loaded decides once
        it answers). Else why not."""
        if session_id in self.feeds:
            return self.why_not_resumable(session_id)
        if not self._qmp_ready.wait(wait) or self.loaded_guest:
            return None
        return self._not_loaded()

    def _not_loaded(self) -> str:
        return (f"the destination QEMU here has not loaded a device state (it is {self.qemu_status or 'not reached'}"
                f"{': ' + self._qmp_error if self._qmp_error and not self.qemu_status else ''}), so the guest never "
                "ran here")

    def verify_loaded(self, m, wait: float = 3600.0) -> None:
        """m is served by a recovering source on the word of an agent
        restarted since: once the QEMU here answers, a QEMU that did not load
        a device state (it never ran the guest) fails the migration, so that
        its source hears the guest does not run here."""
        def check():
            if self._qmp_ready.wait(wait) and not self.loaded_guest and m.id not in self._fed_here():
                m.fail(f"cannot recover session {m.id} without device state: {self._not_loaded()}")
        if not self.loaded_guest:
            threading.Thread(target=check, name="qemu-loaded", daemon=True).start()

    def _fed_here(self) -> set[str]:
        """Sessions whose device state this agent fed (not marked loaded_before)."""
        with self.lock:
            return {sid for sid, f in self.feeds.items() if not f.recovered}

    def loaded_before(self, session_id: str) -> None:
        """session_id is served without device state by a recovering source,
        whose guest runs here already (its state was loaded under the agent
        that took it): the migration is not waited on for a device state that
        will not come."""
        with self.lock:
            if session_id not in self.feeds:
                f = self.feeds[session_id] = Feed(received=True, running=True, recovered=True)
                f.done.set()

    def settled(self, session_id: str) -> bool:
        f = self.feeds.get(session_id)
        return f is not None and f.done.is_set()

    def feed(self, migration, chunks) -> pb.DeviceStateAck:
        """Never raises: the ack says whether the guest runs (the source resumes its
        QEMU on guest_running=False). The chunks go to QEMU as they arrive (only
        what it has not read yet is kept), up to max_bytes in all."""
        f = Feed()
        with self.lock:
            old = self.feeds.get(migration.id)
            if old is not None and (old.running or not old.done.is_set()):
                return pb.DeviceStateAck(bytes=old.bytes, guest_running=old.running,
                                         error="device state for this session was already fed")
            self.feeds[migration.id] = f
        try:
            self._load_and_run(chunks, f, migration)
        except MigrateError as e:
            f.error = str(e)
            migration.reporter.event("error", f"device state: {e}", session=migration.id)
        except Exception as e:  # noqa: BLE001 - the ack must carry every failure
            f.error = f"{type(e).__name__}: {e}"
            migration.reporter.event("error", f"device state: {f.error}", session=migration.id)
        finally:
            f.done.set()
        return pb.DeviceStateAck(bytes=f.bytes, guest_running=f.running, error=f.error)

    def _load_and_run(self, chunks, f: Feed, m) -> None:
        qmp, w = self._take()
        pipe = QemuPipe(w)
        # QEMU's events are read on their own thread from the first byte on:
        # the guest runs the moment QEMU has loaded the state, whether or not
        # the source has closed its stream yet.
        watch = RunWatch(qmp, f, m, self.timeout)
        try:
            receive_state(chunks, pipe, f, m, self.max_bytes, on_first=watch.start)
            pipe.end()
        except BaseException:
            if f.bytes == 0 and not watch.started:
                pipe.release()
                self._give_back(qmp, w)   # QEMU read nothing: it waits on, for another source
                raise
            pipe.abort()   # QEMU reads a cut stream, which it refuses
            if watch.started:
                watch.join(5)
            qmp.close()
            if pipe.error and watch.error is not None:
                raise watch.error from None   # QEMU refused first: that is why it reads nothing
            raise
        try:
            if not watch.started:   # (an empty stream)
                watch.start()
            watch.join(self.timeout)
            if watch.thread.is_alive():
                raise QemuError(f"QMP {self.qmp_path}: the destination QEMU neither loaded the device state nor "
                                f"failed within {self.timeout:.0f} s")
            if watch.error is not None:
                raise watch.error
            if pipe.error:
                raise pipe.error
        finally:
            pipe.abort()   # (nothing left once the load completed)
            pipe.join(5)
            qmp.close()
        if pipe.last_write:
            f.times["last_chunk"] = pipe.last_write


def incoming_pipe(qmp: QMP) -> int:
    """Puts QEMU in migrate-incoming on a new pipe and returns its write end
    (non-blocking, ours). QEMU waits on the pipe for its first byte; its
    monitor answers meanwhile."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            # a typical device state (300 KiB-1 MiB) fits whole: QEMU is never
            # waited for while it comes
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass   # above /proc/sys/fs/pipe-max-size: the default size works, in more steps
        try:
            qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(r,))
        finally:
            os.close(r)   # QEMU has its own copy
        qmp.cmd("migrate-incoming", uri=f"fd:{DEVSTATE_FD_NAME}")
    except BaseException:
        os.close(w)
        raise
    return w


def _run_or_loaded(e: dict) -> bool:
    return e["event"] == "RESUME" or (e["event"] == "MIGRATION" and e.get("data", {}).get("status") in (
        "completed", "failed", "cancelled"))


class RunWatch:
    """Waits on the destination QEMU's events until its guest runs: QEMU
    starts it itself once the state is loaded (the source QEMU ran when its
    migration began); a QEMU that stays paused after the load (started with
    -S, or a source stopped before its migration) is sent `cont`. Owns the QMP
    connection while it runs."""

    def __init__(self, qmp: QMP, f: Feed, m, timeout: float):
        self.qmp, self.f, self.m, self.timeout = qmp, f, m, timeout
        self.since = len(qmp.events)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="devstate-load", daemon=True)
        self.started = False

    def start(self) -> None:
        self.started = True
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        f, qmp = self.f, self.qmp
        t0 = time.monotonic()
        try:
            ev = qmp.wait_event(_run_or_loaded, self.timeout, "device-state load", self.since)
            if ev["event"] == "MIGRATION":
                st = ev["data"]["status"]
                if st != "completed":
                    raise QemuError(f"device-state load {st}: "
                                    f"{qmp.cmd('query-migrate').get('error-desc', 'QEMU gave no reason')}")
                f.times["loaded"] = ev["time"]
                f.times["cont_sent"] = time.time()
                qmp.cmd("cont")
                ev = qmp.wait_event(lambda e: e["event"] == "RESUME", self.timeout, "cont", self.since)
            else:
                f.times["loaded"] = ev["time"]   # QEMU starts the guest in the step that ends its load
            f.load_ms = (time.monotonic() - t0) * 1e3
            f.running = True   # (RESUME: QEMU's vm_start has run)
            f.resume_time = ev["time"]
            self.m.reporter.event("guest-running", f"destination QEMU runs: {f.bytes} bytes of device state "
                                  "loaded", session=self.m.id, bytes=f.bytes, load_ms=round(f.load_ms, 2),
                                  resume_time=f.resume_time)
        except BaseException as e:  # noqa: BLE001 - raised by the feed
            self.error = e


def receive_state(chunks, pipe: QemuPipe, f: Feed, m, max_bytes: int, on_first=lambda: None) -> None:
    """Hands each device state chunk to QEMU's pipe as it arrives, up to
    max_bytes in all (counted in f.bytes), and stops at once when QEMU stopped
    reading. on_first: called before the first byte goes to QEMU."""
    for c in chunks:
        data = c.data
        if not data:
            continue
        if f.bytes == 0:
            f.times["first_chunk"] = time.time()
            on_first()
        if f.bytes + len(data) > max_bytes:
            raise DeviceStateTooLarge(f"the device state is larger than --max-device-state "
                                      f"{fmt_size(max_bytes)}: refused after {f.bytes} bytes "
                                      f"(the destination QEMU does not load it). Start `migrate dest` with "
                                      f"a larger --max-device-state")
        pipe.put(data)
        f.bytes += len(data)
    f.times["received"] = time.time()
    f.received = True
    m.reporter.event("device-state", f"{f.bytes} bytes of device state received: the "
                     "destination QEMU loads them", session=m.id, bytes=f.bytes)


class QemuPipe:
    """Writes the device state into QEMU's pipe, chunk by chunk in the order
    they arrived: straight from the caller's thread while the pipe has room
    (a typical state fits whole), else on its own thread. What QEMU has not
    read yet waits here (QEMU reads as the state arrives, unless its load
    waits for guest RAM or it is stopped): at most what --max-device-state
    lets in, so a source is never held back by QEMU's pace and its state
    arrives whole. Owns w (non-blocking) and closes it at the end (QEMU reads
    end of file), unless released."""

    def __init__(self, w: int):
        self.w = w
        self.chunks: deque[memoryview] = deque()
        self.cond = threading.Condition()
        self.busy = False          # the thread is writing a chunk it took
        self.ended = False
        self.aborted = False
        self.released = False
        self.written = 0
        self.last_write = 0.0      # time.time() of the last byte written
        self.error: QemuError | None = None
        self.thread = threading.Thread(target=self._run, name="devstate-tx", daemon=True)
        self.thread.start()

    def put(self, data: bytes) -> None:
        with self.cond:
            if self.error:
                raise self.error
            view = memoryview(data)
            if not self.chunks and not self.busy:
                view = self._write(view)
            if view:
                self.chunks.append(view)
                self.cond.notify()

    def end(self) -> None:
        """No more chunks: end of file once the last is written."""
        with self.cond:
            self.ended = True
            self.cond.notify()

    def abort(self) -> None:
        """End of file now, whatever is left unwritten."""
        with self.cond:
            self.ended = self.aborted = True
            self.chunks.clear()
            self.cond.notify()

    def release(self) -> None:
        """Stops, leaving w open and not ours (nothing was written)."""
        with self.cond:
            self.released = self.ended = self.aborted = True
            self.chunks.clear()
            self.cond.notify()
        self.thread.join(5)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _write(self, view: memoryview) -> memoryview:
        """Writes what the pipe takes now; returns the rest. OSError: QEMU
        stopped reading (recorded in self.error, raised)."""
        try:
            while view:
                n = os.write(self.w, view[:1 << 20])
                view = view[n:]
                self.written += n
                self.last_write = time.time()
        except BlockingIOError:
            pass
        except OSError as e:
            why = "it failed to load it" if isinstance(e, BrokenPipeError) else e.strerror
            self.error = QemuError(f"the destination QEMU stopped reading the device state after {self.written} "
                                   f"bytes ({why})")
            raise self.error from None
        return view

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    self.busy = False
                    self.cond.wait_for(lambda: self.chunks or self.ended)
                    if not self.chunks:
                        return
                    view = self.chunks.popleft()
                    self.busy = True
                while True:
                    view = self._write(view)
                    if not view:
                        break
                    # QEMU reads nothing for now: look again, unless given up
                    select.select([], [self.w], [], 0.2)
                    if self.aborted:
                        return
        except QemuError:
            pass   # kept in self.error
        finally:
            if not self.released:
                os.close(self.w)

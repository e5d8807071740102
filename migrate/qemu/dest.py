"""QEMU on the destination (`migrate dest --qmp`): feeds the device state the
source sent to a QEMU started with `-incoming defer`, and resumes it.

The guest is attached (shim) and a source is connected and serving demand
faults BEFORE migrate-incoming: loading the device state reads guest RAM
(kvmvapic reads the option ROM at 0xc0000), and QEMU's main thread blocks on
that fault until the page arrives.
"""

from __future__ import annotations

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
    done: threading.Event = field(default_factory=threading.Event)


class DeviceStateFeeder:
    """The destination side: gives the device state to the local QEMU
    (`-incoming defer`, started with the shim) and resumes it."""

    def __init__(self, qmp_path: str, reporter: Reporter, timeout: float = 120.0, wait_qemu: float = 3600.0,
                 max_bytes: int = DEFAULT_MAX_DEVICE_STATE):
        self.qmp_path = qmp_path
        self.max_bytes = max_bytes
        self.reporter = reporter
        self.timeout = timeout
        self.feeds: dict[str, Feed] = {}
        self.lock = threading.Lock()
        # The QMP connection is made ahead, as soon as QEMU is up (after the shim's
        # attach), so the guest's downtime does not include connecting to it.
        self._qmp: QMP | None = None
        self._qmp_error = ""
        self._qmp_ready = threading.Event()
        threading.Thread(target=self._connect, args=(wait_qemu,), name="qmp-connect", daemon=True).start()

    def _connect(self, wait: float) -> None:
        try:
            q = QMP(self.qmp_path, timeout=wait)
            try:
                st = q.status()
                if st != "inmigrate":
                    raise QemuError(f"destination QEMU is {st!r}: start it with -incoming defer")
                q.ignore_shared()
            except BaseException:
                q.close()
                raise
            self._qmp = q
            self.reporter.event("qemu", f"QMP {self.qmp_path}: QEMU {q.version.get('major')}."
                                f"{q.version.get('minor')}.{q.version.get('micro')} waits for its device state",
                                qmp=self.qmp_path)
        except MigrateError as e:
            self._qmp_error = str(e)
        finally:
            self._qmp_ready.set()

    def _take_qmp(self, wait: float = 30.0) -> QMP:
        if not self._qmp_ready.wait(wait):
            raise QemuError(f"no QMP connection to the destination QEMU at {self.qmp_path} after {wait:.0f} s")
        if self._qmp is None:
            raise QemuError(self._qmp_error or f"no QMP connection to {self.qmp_path}")
        q, self._qmp = self._qmp, None
        return q

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
        qmp = self._take_qmp()
        try:
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            pipe = QemuPipe(w)
            # QEMU is asked on its own thread while the state flows in: its
            # main loop, and so QMP, may not answer for a while (loading reads
            # guest RAM, faults served by this agent; or it is stopped), and
            # the state is taken meanwhile all the same.
            asked: list[BaseException | None] = []

            def ask():
                try:
                    try:
                        qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(r,))
                    finally:
                        os.close(r)   # QEMU has its own copy (or, refused, the pipe has no reader)
                    qmp.cmd("migrate-incoming", uri=f"fd:{DEVSTATE_FD_NAME}")
                    asked.append(None)
                except BaseException as e:  # noqa: BLE001 - raised below
                    asked.append(e)

            at = threading.Thread(target=ask, name="devstate-incoming", daemon=True)
            at.start()
            try:
                receive_state(chunks, pipe, f, m, self.max_bytes)
                pipe.end()
                t0 = time.monotonic()   # load_ms: from the last byte in (QEMU loads as it comes)
            except BaseException:
                pipe.abort()   # QEMU reads a cut stream, which it refuses
                if pipe.error and asked and asked[0] is not None:
                    raise asked[0] from None   # QEMU refused first: that is why it reads nothing
                raise
            at.join(self.timeout)
            if not asked:
                pipe.abort()
                raise QemuError(f"QMP {self.qmp_path}: no answer to migrate-incoming within {self.timeout:.0f} s")
            if asked[0] is not None:
                pipe.abort()
                raise asked[0]
            try:
                qmp.wait_migration(self.timeout, "device-state load")
            finally:
                pipe.abort()   # (nothing left once the load completed)
                pipe.join(5)
            if pipe.error:
                raise pipe.error
            f.load_ms = (time.monotonic() - t0) * 1e3
            f.times["loaded"] = time.time()
            f.times["cont_sent"] = time.time()
            qmp.cmd("cont")
            st = qmp.status()
            if st != "running":
                raise QemuError(f"destination QEMU is {st!r} after cont")
            f.running = True
            ev = qmp.event("RESUME")
            f.resume_time = ev["time"] if ev else time.time()
            m.reporter.event("guest-running", f"destination QEMU resumed: {f.bytes} bytes of device state "
                             f"loaded in {f.load_ms:.1f} ms", session=m.id, bytes=f.bytes,
                             load_ms=round(f.load_ms, 2), resume_time=f.resume_time)
        finally:
            qmp.close()


def receive_state(chunks, pipe: QemuPipe, f: Feed, m, max_bytes: int) -> None:
    """Hands each device state chunk to QEMU's pipe as it arrives, up to
    max_bytes in all (counted in f.bytes), and stops at once when QEMU stopped
    reading."""
    for c in chunks:
        data = c.data
        if "first_chunk" not in f.times:
            f.times["first_chunk"] = time.time()
        if f.bytes + len(data) > max_bytes:
            raise DeviceStateTooLarge(f"the device state is larger than --max-device-state "
                                      f"{fmt_size(max_bytes)}: refused after {f.bytes} bytes "
                                      f"(the destination QEMU does not load it). Start `migrate dest` with "
                                      f"a larger --max-device-state")
        pipe.put(data)
        f.bytes += len(data)
    f.times["last_chunk"] = time.time()
    f.received = True
    m.reporter.event("device-state", f"{f.bytes} bytes of device state received: the "
                     "destination QEMU loads them", session=m.id, bytes=f.bytes)


class QemuPipe:
    """Writes the device state into QEMU's pipe on its own thread, chunk by
    chunk in the order they arrived. What QEMU has not read yet waits here
    (QEMU reads as the state arrives, unless its load waits for guest RAM or it
    is stopped): at most what --max-device-state lets in, so a source is never
    held back by QEMU's pace and its state arrives whole. Owns w (non-blocking)
    and closes it at the end: QEMU reads end of file."""

    def __init__(self, w: int):
        self.w = w
        self.chunks: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.ended = False
        self.aborted = False
        self.error: QemuError | None = None
        self.thread = threading.Thread(target=self._run, name="devstate-tx", daemon=True)
        self.thread.start()

    def put(self, data: bytes) -> None:
        with self.cond:
            if self.error:
                raise self.error
            self.chunks.append(data)
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

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        written = 0
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.chunks or self.ended)
                    if not self.chunks:
                        return
                    view = memoryview(self.chunks.popleft())
                while view:
                    try:
                        n = os.write(self.w, view[:1 << 20])
                    except BlockingIOError:
                        # QEMU reads nothing for now: look again, unless given up
                        select.select([], [self.w], [], 0.2)
                        if self.aborted:
                            return
                        continue
                    view = view[n:]
                    written += n
        except OSError as e:
            with self.cond:
                why = "it failed to load it" if isinstance(e, BrokenPipeError) else e.strerror
                self.error = QemuError(f"the destination QEMU stopped reading the device state after {written} "
                                       f"bytes ({why})")
        finally:
            os.close(self.w)

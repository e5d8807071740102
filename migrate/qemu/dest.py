"""QEMU on the destination (`migrate dest --qmp`): takes the session's
device-state channel (migrate.wire.devstate) for a QEMU started with
`-incoming defer`, puts that QEMU in migrate-incoming on a pipe before the
source QEMU stops, relays the channel into it in C (GIL released: splice(2)
for a plaintext channel, TLS frames for a TLS one), and tells the source once
its guest runs. The relay counts every byte: the stream is refused at
--max-device-state before a byte past it reaches QEMU, and the channel's end
(the source's FIN, TLS's end frame) says the stream arrived whole.

Loading the device state reads guest RAM (kvmvapic reads the option ROM at
0xc0000), and QEMU's main thread blocks on that fault until the page
arrives: the state only comes through a session whose source is connected
and serves demand faults.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from migrate._binding import ffi, lib
from migrate.errors import MigrateError, fmt_size
from migrate.host import fault_path_priority
from migrate.report import Reporter
from migrate.qemu.qmp import DEVSTATE_FD_NAME, QMP, QemuError
from migrate.wire import devstate
from migrate.wire.rawtls import TlsSocket


DEFAULT_MAX_DEVICE_STATE = 1 << 30   # `dest --max-device-state`
PIPE_BYTES = 1 << 20                 # QEMU's incoming pipe (the default pipe-max-size)


class DeviceStateTooLarge(QemuError):
    """The source sent more device state than --max-device-state."""


def too_large(max_bytes: int, got: int) -> DeviceStateTooLarge:
    return DeviceStateTooLarge(f"the device state is larger than --max-device-state {fmt_size(max_bytes)}: refused "
                               f"after {got} bytes (the destination QEMU does not load it). Start `migrate dest` "
                               "with a larger --max-device-state")


# -- destination --------------------------------------------------------------
@dataclass
class Feed:
    bytes: int = 0
    running: bool = False
    error: str = ""
    received: bool = False     # the stream arrived whole (its end, or its QEMU loaded it)
    load_ms: float = 0.0
    resume_time: float = 0.0   # QEMU's RESUME event (epoch seconds)
    times: dict = field(default_factory=dict)   # the switchover's moments (migrate.qemu.switchover)
    recovered: bool = False    # not fed here: a recovering source's guest loaded it under an earlier agent
    done: threading.Event = field(default_factory=threading.Event)


class DeviceStateFeeder:
    """The destination side: takes a session's device-state channel for the
    local QEMU (`-incoming defer`, started with the shim); that QEMU starts
    the guest itself once it has loaded the state (`cont` only if it stays
    paused), and the channel's last word tells the source."""

    def __init__(self, qmp_path: str, reporter: Reporter, timeout: float = 120.0, wait_qemu: float = 3600.0,
                 max_bytes: int = DEFAULT_MAX_DEVICE_STATE):
        self.qmp_path = qmp_path
        self.max_bytes = max_bytes
        self.reporter = reporter
        self.timeout = timeout
        self.feeds: dict[str, Feed] = {}
        self.lock = threading.Lock()
        # The QMP connection is made ahead, as soon as QEMU is up (after the
        # shim's attach), so that a source's device-state channel finds it
        # ready: QEMU goes into migrate-incoming on that channel the moment
        # it comes, before the source QEMU stops.
        self._qmp: QMP | None = None
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
        """Returns once the destination QEMU can take a device state (a source
        opening a session opens its device-state channel next); else QemuError."""
        if not self._qmp_ready.wait(wait):
            raise QemuError(f"no QMP connection to the destination QEMU at {self.qmp_path} after {wait:.0f} s")
        with self.lock:
            if self._qmp is None:
                raise QemuError(self._qmp_error or f"the destination QEMU at {self.qmp_path} took a device state "
                                "already: start a new one with -incoming defer")

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

    def take_channel(self, m, sock: socket.socket, gen: int = 0) -> str | None:
        """The device-state channel of migration m's source gen, its hello
        checked (the session's token, from the session's opener). Why not, when it is
        refused (the caller says so on it and closes it); None: taken, this
        feeder owns sock from here and closes it once it said its last word."""
        with self.lock:
            if m.id in self.feeds:
                return "this session had its device-state channel already"
            if not self._qmp_ready.is_set() or self._qmp is None:
                return (self._qmp_error or f"the destination QEMU at {self.qmp_path} is not ready for a device "
                        "state (it took one already, or it is not up yet)")
            f = self.feeds[m.id] = Feed()
            qmp, self._qmp = self._qmp, None
        threading.Thread(target=self._serve, args=(qmp, f, m, sock, gen), name=f"devstate-{m.id}",
                         daemon=True).start()
        return None

    def _serve(self, qmp: QMP, f: Feed, m, sock: socket.socket, gen: int) -> None:
        """Never raises: the last word says whether the guest runs (the source
        resumes its QEMU on guest_running=False)."""
        # the relay sleeps until the stream comes and is then on the pause's
        # path: ahead of bulk work in the CPU queue, as the fault path is
        fault_path_priority()
        try:
            self._load_and_run(qmp, f, m, sock, gen)
        except MigrateError as e:
            f.error = str(e)
        except Exception as e:  # noqa: BLE001 - the word must carry every failure
            f.error = f"{type(e).__name__}: {e}"
        finally:
            qmp.close()
        if f.error:
            m.reporter.event("error", f"device state: {f.error}", session=m.id)
        try:
            sock.settimeout(5)
            devstate.say(sock, ack=True, guest_running=f.running, bytes=f.bytes, error=f.error)
        except OSError as e:
            if not f.running and f.error:
                # Nobody takes this word: the source that sent the state is
                # gone. The guest will not run here, so the migration has
                # failed, and whoever serves it now hears why.
                from migrate.qemu import resume_hint
                m.fail(f"the destination QEMU did not load the device state of session {m.id} ({f.error}): the "
                       "guest does not run here; the paused source QEMU still is the VM: resume it with "
                       f"{resume_hint()}", None)
            else:
                m.reporter.event("device-state", f"the source did not hear that the guest runs ({e})", session=m.id)
        finally:
            f.done.set()
            _close_after_word(sock)

    def _load_and_run(self, qmp: QMP, f: Feed, m, sock: socket.socket, gen: int) -> None:
        tls = isinstance(sock, TlsSocket)
        w = incoming_pipe(qmp)
        relay = ffi.new("struct mg_devstate_relay *", {"in": sock.fileno(), "out": w, "stop_fd": -1,
                                                         "max_bytes": self.max_bytes})
        # QEMU's events are read on their own thread from here on: the guest
        # runs the moment QEMU has loaded the state
        watch = RunWatch(qmp, f, m, self.timeout, count=lambda: int(relay.bytes))
        how = "TLS" if tls else "plaintext"
        m.reporter.event("device-state", f"device-state channel open ({how}): the destination QEMU waits in "
                         "migrate-incoming", session=m.id, bytes=0)
        try:
            watch.start()
            devstate.say(sock, ready=True)
            _await_switch(m, gen, f)
        except BaseException:
            os.close(w)   # QEMU reads an empty stream, which it refuses
            raise
        self._relay(relay, w, f, m, watch, lib.mg_devstate_recv if tls else lib.mg_devstate_splice)
        watch.join(self.timeout)
        if watch.thread.is_alive():
            raise QemuError(f"QMP {self.qmp_path}: the destination QEMU neither loaded the device state nor "
                            f"failed within {self.timeout:.0f} s")
        if f.error:
            raise QemuError(f.error)   # (the relay's)
        if watch.error is not None:
            raise watch.error
        f.received = True   # (loaded: it arrived whole)

    def _relay(self, relay, w: int, f: Feed, m, watch: RunWatch, run) -> None:
        """Relays the channel into QEMU's pipe (C, GIL released: run is
        mg_devstate_recv for TLS frames, mg_devstate_splice for plaintext)
        until the stream's end; closes w (QEMU reads end of file)."""
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        relay.stop_fd = stop_r
        # QEMU failing the load (it stops reading) ends the relay through
        # EPIPE; a load that ends first (never: it needs the end of the
        # stream) or the agent's deadline ends it through the stop pipe
        stopper = threading.Thread(target=lambda: (watch.join(self.timeout), os.write(stop_w, b"x")),
                                   name="devstate-stop", daemon=True)
        stopper.start()
        try:
            rc = run(relay)
        finally:
            os.close(w)
            f.bytes = int(relay.bytes)
            if relay.first_ns:
                f.times["first_chunk"] = relay.first_ns / 1e9
                f.times["last_chunk"] = relay.last_ns / 1e9
            os.write(stop_w, b"x")
            stopper.join(1)
            os.close(stop_r)
            os.close(stop_w)
        if rc == 0:
            _arrived_whole(f, m)
            return
        if rc == -errno.EFBIG:
            f.error = str(too_large(self.max_bytes, f.bytes))
        elif rc == -errno.EPROTO:
            f.error = (f"the source sent a device-state frame over {lib.MG_DEVSTATE_FRAME} bytes: not this "
                       "engine's channel, or a source of another release")
        elif rc == -errno.ENODATA:
            f.error = f"the device-state channel ended after {f.bytes} bytes, before the end of the stream"
        elif rc == -errno.ECONNRESET:
            f.error = f"the source reset the device-state channel after {f.bytes} bytes"
        elif rc == -errno.EPIPE:
            return   # QEMU stopped reading: its own error says why (the watch)
        elif rc != -errno.ECANCELED:
            f.error = f"the device-state channel failed after {f.bytes} bytes: {os.strerror(-rc)}"
        watch.join(self.timeout)


def _await_switch(m, gen: int, f: Feed) -> None:
    """A pre-copy source's device state waits in the channel until that
    source's Switch has committed: its QEMU starts writing it before the
    final written list is here, and the guest must not start on pages that
    list names. QemuError when the source is dropped or replaced first
    (nothing of the stream was fed to QEMU, which then refuses the empty
    stream; the paused source QEMU still is the VM)."""
    p = getattr(m, "precopy", None)
    if p is None or p.switched:
        return
    while not p.switched_event.wait(0.05):
        if getattr(m, "precopy", None) is not p or not m.machine.serves(gen):
            raise QemuError("the source was dropped before its pre-copy's switch: its device state was not "
                            "loaded, the guest does not run here")
    f.times["switched"] = time.time()


def _close_after_word(sock: socket.socket, wait: float = 2.0) -> None:
    """Closes the channel so that the last word reaches the source: the end
    of our side first, then what the source still sends (QEMU's stream that
    a failed load left unread) is read and dropped until its end, for up to
    `wait` s. (A close with unread bytes would reset the connection, and a
    reset may reach the source before the word.)"""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    sock.close()


def _arrived_whole(f: Feed, m) -> None:
    f.received = True
    f.times["received"] = time.time()
    m.reporter.event("device-state", f"{f.bytes} bytes of device state received: the destination QEMU loads them",
                     session=m.id, bytes=f.bytes)


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

    def __init__(self, qmp: QMP, f: Feed, m, timeout: float, count=None):
        self.qmp, self.f, self.m, self.timeout = qmp, f, m, timeout
        self.count = count   # () -> bytes of the stream so far, when f.bytes is not kept up to date
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
            if self.count is not None:
                f.bytes = self.count()
            f.running = True   # (RESUME: QEMU's vm_start has run)
            f.resume_time = ev["time"]
            pre = getattr(self.m, "precopy", None)
            if pre is not None:
                pre.hurry()   # (its mapping yielded to the load until now)
            self.m.reporter.event("guest-running", f"destination QEMU runs: {f.bytes} bytes of device state "
                                  "loaded", session=self.m.id, bytes=f.bytes, load_ms=round(f.load_ms, 2),
                                  resume_time=f.resume_time)
        except BaseException as e:  # noqa: BLE001 - raised by the feed
            self.error = e

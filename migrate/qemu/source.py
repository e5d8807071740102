"""QEMU on the source (`migrate source --qmp`).

With shared-file RAM and QEMU's `x-ignore-shared` capability, QEMU's own
migration stream carries only device state (~300 KiB whatever the RAM size);
the RAM travels through this engine. The stream goes on the session's
device-state channel (migrate.wire.devstate): a plaintext channel is handed to
QEMU itself (getfd), which writes into it as QEMU-to-QEMU does (no thread of
this agent on the path); a TLS channel gets QEMU's stream from an `fd:` pipe,
relayed in C into the TLS session.

The flow: open the session (the destination QEMU can take a device state);
open the device-state channel and wait for the destination's `ready` (its
QEMU waits in migrate-incoming); x-ignore-shared, getfd; migrate fd:
with the VM running, as QEMU migrates: QEMU stops the VM itself and writes the
device state, which reaches the destination QEMU as it is written; keep the
source QEMU paused until the destination says its guest runs; resume it
(`cont`) when the destination says it did not.
Once the migration completed, the source QEMU is quit (--quit-source) or left
paused, and the last event says which and where its RAM still is.

Without --ram, find_ram_backend asks QEMU for its one RAM backend: a file
backend's mem-path (qom-get), or a memfd backend's descriptor among QEMU's
own (/proc/PID/fd/N, QEMU's pid from SO_PEERCRED of the QMP socket).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field

from migrate._binding import ffi, lib
from migrate.errors import DestinationGone, DestinationLost, MigrateError, RecoveryWindowOver, Stopped, fmt_size
from migrate.host import fault_path_priority
from migrate.report import Reporter
from migrate.proto import migration_pb2 as pb
from migrate.qemu import resume_hint
from migrate.qemu.qmp import DEVSTATE_FD_NAME, QMP, QemuError
from migrate.wire import devstate
from migrate.wire.attach import peer_cred
from migrate.wire.protocol import DEMAND_TOKEN_BYTES, DEVSTATE_MAGIC
from migrate.wire.rawtls import TlsSocket
from migrate.wire.tcp import tcp_bytes_acked


HELLO_BYTES = len(DEVSTATE_MAGIC) + DEMAND_TOKEN_BYTES
READY_TIMEOUT = 30.0   # s for the destination's `ready` on the device-state channel (its QEMU into migrate-incoming)


# the whole device-state handoff: sending it, and the destination QEMU loading
# it (reading guest RAM by demand faults) and resuming
DEVICE_STATE_TIMEOUT = 120.0
_NO_BANDWIDTH_LIMIT = 1 << 40   # QEMU's default max-bandwidth is 128 MiB/s
# QEMU stops the VM once what is left of its non-shared RAM (ROMs, ACPI
# tables, a VGA's vram) can go in this long at the rate it measured. Its
# default, 300 ms, left 3.2 of a 4.5 MB stream (a 4 MiB option ROM) for after
# the stop; with 1 ms all of it goes while the VM runs, unless the guest keeps
# rewriting such RAM.
DOWNTIME_LIMIT_MS = 1


# -- source -------------------------------------------------------------------
@dataclass
class Capture:
    """The source QEMU's device-state stream, as QEMU writes it into the
    device-state channel (never held whole here)."""
    bytes: int = 0
    stop_time: float = 0.0     # QEMU's own clock (the STOP event), seconds since the epoch
    seconds: float = 0.0       # migrate to QEMU's completed, measured here
    qemu_total_ms: int = 0     # QEMU's query-migrate total-time
    qemu_downtime_ms: int = 0  # QEMU's query-migrate downtime
    times: dict = field(default_factory=dict)   # the switchover's moments (migrate.qemu.switchover)
    bytes_stopped: int = 0     # what had not reached the destination at QEMU's STOP (inside the pause)


@dataclass
class Flow:
    """QEMU's migration under way into the device-state channel
    (DeviceStateSender.begin)."""
    sock: socket.socket        # the channel (QEMU writes into its own copy when plaintext)
    relay: TlsRelay | None     # what carries QEMU's pipe onto a TLS channel
    since: int                 # the index of its first QMP event
    t0: float                  # `migrate` sent (time.monotonic())

    def arrived(self) -> int:
        """Bytes of QEMU's stream that left for the destination so far."""
        return self.relay.bytes if self.relay is not None else _arrived(self.sock)


def shared_backends(qmp: QMP) -> list[dict]:
    """QEMU's memory backends (query-memdev), every one share=on
    (x-ignore-shared skips only those), else QemuError."""
    devs = qmp.cmd("query-memdev")
    if not devs:
        raise QemuError(f"QEMU at {qmp.path} has no memory backend object: start it with "
                        "-object memory-backend-file,...,share=on -machine memory-backend=ID")
    private = [d.get("id", "?") for d in devs if not d.get("share")]
    if private:
        raise QemuError(f"memory backend {private[0]} is not share=on: its RAM would travel inside QEMU's "
                        "stream; start QEMU with share=on on every memory backend")
    return devs


def check_shared_ram(qmp: QMP, ram_size: int) -> None:
    """Every memory backend must be share=on, and one of them must be the RAM
    file served."""
    devs = shared_backends(qmp)
    if ram_size not in [d["size"] for d in devs]:
        raise QemuError(f"--ram is {ram_size} bytes but QEMU's memory backends are "
                        f"{[d['size'] for d in devs]} bytes: pass the backend's file")


@dataclass(frozen=True)
class RamBackend:
    """The source QEMU's RAM as this agent serves it."""
    id: str
    kind: str              # "file" or "memfd"
    size: int
    path: str              # what the agent opens: the backend's file, or /proc/PID/fd/N of QEMU
    file: str | None       # the file that outlives QEMU (a file backend's mem-path), None for a memfd
    pid: int               # QEMU's

    def describe(self) -> str:
        what = f"file {self.file}" if self.file else f"{self.kind} {self.path}"
        return f"memory backend {self.id} of QEMU pid {self.pid}: {fmt_size(self.size)}, {what}"


def find_ram_backend(qmp_path: str) -> RamBackend:
    """The one RAM backend of the QEMU at qmp_path (`source --qmp` without
    --ram), or QemuError saying why not and what to pass instead."""
    qmp = QMP(qmp_path)
    try:
        devs = shared_backends(qmp)
        if len(devs) > 1:
            each = ", ".join(f"{d.get('id', '?')} ({fmt_size(d['size'])})" for d in devs)
            raise QemuError(f"QEMU at {qmp_path} has {len(devs)} memory backends ({each}) and this engine serves "
                            "one: pass --ram with the file of the backend to serve (its mem-path, or "
                            "/proc/PID/fd/N of a memfd)")
        dev = devs[0]
        bid, size = dev.get("id", ""), dev["size"]
        kinds = {c["name"]: c["type"] for c in qmp.cmd("qom-list", path="/objects")}
        kind = kinds.get(bid, "").removeprefix("child<").removesuffix(">")
        pid = peer_cred(qmp.sock).pid
        if kind == "memory-backend-file":
            mem_path = qmp.cmd("qom-get", path=f"/objects/{bid}", property="mem-path")
            if os.path.isdir(mem_path):
                # QEMU made a file in that directory and unlinked it at once
                fd = _qemu_fd(pid, size, lambda link: link.startswith(mem_path.rstrip("/") + "/"),
                              f"its unlinked file in {mem_path}", bid)
                return RamBackend(bid, "file", size, fd, None, pid)
            return RamBackend(bid, "file", size, mem_path, mem_path, pid)
        if kind == "memory-backend-memfd":
            fd = _qemu_fd(pid, size, lambda link: link.startswith("/memfd:"), "its memfd", bid)
            return RamBackend(bid, "memfd", size, fd, None, pid)
        raise QemuError(f"memory backend {bid} of QEMU at {qmp_path} is a {kind or 'backend of unknown type'}, "
                        "which has no file this agent can open: start QEMU with memory-backend-file (on tmpfs or "
                        "hugetlbfs) or memory-backend-memfd, share=on, or pass --ram")
    finally:
        qmp.close()


def _qemu_fd(pid: int, size: int, match, what: str, bid: str) -> str:
    """/proc/PID/fd/N of the one descriptor of QEMU whose target matches and
    whose file is `size` bytes."""
    where = f"/proc/{pid}/fd"
    try:
        names = os.listdir(where)
    except OSError as e:
        raise QemuError(f"memory backend {bid}: cannot list QEMU's descriptors in {where} ({e.strerror}): run the "
                        "source agent as root or as QEMU's user, or pass --ram") from None
    found = []
    for n in names:
        path = f"{where}/{n}"
        try:
            if match(os.readlink(path)) and os.stat(path).st_size == size:
                found.append(path)
        except OSError:
            continue   # closed meanwhile
    if len(found) != 1:
        how = "none" if not found else f"{len(found)} ({', '.join(found)})"
        raise QemuError(f"memory backend {bid} ({fmt_size(size)}): looked for {what} among QEMU pid {pid}'s "
                        f"descriptors and found {how}: pass --ram with the right one")
    return found[0]


def ram_file_of(path: str) -> str | None:
    """The file a served RAM path names that outlives QEMU: None for one of
    QEMU's own descriptors (/proc/PID/fd/N: a memfd, or a file QEMU unlinked)."""
    return None if path.startswith("/proc/") else path


def after_migration(qmp: QMP, reporter: Reporter, ram_path: str, quit: bool) -> str:
    """Once the migration completed: quits the source QEMU (quit) or leaves
    it paused, and says which and where its RAM still is (the last event
    before the summary). Returns the source status for the summary."""
    ram_file = ram_file_of(ram_path)
    if quit:
        qmp.cmd("quit")
        left = ("its RAM went with it" if ram_file is None else
                f"its RAM file {ram_file} is still there: remove it once nothing needs it")
        reporter.event("source-qemu", f"the source QEMU quit (--quit-source); {left}", state="quit",
                       qmp=qmp.path, ram_file=ram_file)
        return "quit"
    status = qmp.status()
    # (postmigrate: paused after migrating out, QEMU's own word for it)
    state = "paused" if status in ("paused", "postmigrate") else status
    how = f"stays paused (QEMU status {status})" if state == "paused" else f"is {status}"
    quit_cmd = f"`python -m migrate.qemu {qmp.path} quit`"
    if ram_file is None:
        msg = (f"the source QEMU {how}, holding its RAM ({ram_path}, no file of its own) until it quits: once the "
               f"VM need not go back, {quit_cmd} (or give the source --quit-source)")
    else:
        msg = (f"the source QEMU {how} and its RAM file {ram_path} is still there: once the VM need not go back, "
               f"{quit_cmd} and remove the file (or give the source --quit-source)")
    reporter.event("source-qemu", msg, state=state, qmp=qmp.path, ram_file=ram_file)
    return status


def settle_source_qemu(qmp_path: str, reporter: Reporter, ram_path: str, quit: bool) -> str:
    """after_migration over a connection of its own (a resumed session's
    source, which did not pause the QEMU itself); "gone" when QEMU is."""
    try:
        qmp = QMP(qmp_path, timeout=5)
    except QemuError as e:
        reporter.event("source-qemu-gone", f"the source QEMU cannot be reached ({e})", qmp=qmp_path)
        return "gone"
    try:
        return after_migration(qmp, reporter, ram_path, quit)
    except QemuError as e:
        reporter.event("source-qemu-gone", f"the source QEMU went away ({e})", qmp=qmp_path)
        return "gone"
    finally:
        qmp.close()


def prepare_capture(qmp: QMP, paused_ok: bool = False) -> None:
    """Everything that can be done before the source QEMU stops: the
    capabilities and the migration's parameters. paused_ok: the pre-copy's switch paused it
    already (QemuPause)."""
    was = qmp.status()
    if was != "running" and not (paused_ok and was == "paused"):
        raise QemuError(f"source QEMU is {was!r}, not running: nothing to migrate "
                        "(a paused source may belong to a migration already under way)")
    qmp.set_caps(x_ignore_shared=True, events=True)
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": _NO_BANDWIDTH_LIMIT, "downtime-limit": DOWNTIME_LIMIT_MS})


def capture_pipe(qmp: QMP) -> int:
    """The pipe QEMU writes its stream into (a TLS channel's relay reads it),
    handed over with getfd. Returns the read end (ours to close)."""
    # The pipe keeps its default 64 KiB: QEMU's pass over its non-shared RAM,
    # before it stops the VM, can then end only once all but the last 64 KiB
    # of it were read and sent on; what is left for the pause is the device
    # state. (With a 1 MiB pipe QEMU stopped the VM about 5 ms after migrate,
    # with its whole 320 KB stream still to travel.)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(w,))
    except BaseException:
        os.close(r)
        raise
    finally:
        # QEMU holds its own copy of the write end now; ours must go so that the
        # reader sees end of file when QEMU closes it at the end of the migration.
        os.close(w)
    return r


class TlsRelay:
    """A TLS device-state channel's sender: QEMU's pipe into the channel's
    session, in C with the GIL released (native/devstate.c), on a thread of
    its own until QEMU's end of file. Owns r (closed at the end)."""

    def __init__(self, r: int, sock: socket.socket):
        self.r = r
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.relay = ffi.new("struct mg_devstate_relay *", {"in": r, "out": sock.fileno(),
                                                              "stop_fd": self._stop_r})
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, name="devstate-tx", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        fault_path_priority()   # (on the pause's path: see migrate.qemu.dest)
        try:
            self.rc = lib.mg_devstate_send(self.relay)
        finally:
            os.close(self.r)

    @property
    def bytes(self) -> int:
        return int(self.relay.bytes)

    def failed(self) -> bool:
        return self.rc is not None and self.rc != 0

    def why(self) -> str:
        return f"the device-state channel failed after {self.bytes} bytes: {os.strerror(-self.rc)}"

    def stop(self) -> None:
        """After a failure: stops relaying (QEMU, whose migration is
        cancelled, sees its pipe's reader go)."""
        os.write(self._stop_w, b"x")
        self.thread.join(5)

    def close(self) -> None:
        if not self.thread.is_alive():
            os.close(self._stop_r)
            os.close(self._stop_w)


def _arrived(sock: socket.socket) -> int:
    """Bytes of QEMU's stream the destination's kernel acknowledged on a
    plaintext channel (QEMU writes into it itself)."""
    # (the kernel counts the SYN this end sent as one byte acknowledged)
    return max(0, (tcp_bytes_acked(sock) or 0) - 1 - HELLO_BYTES)


def _written(sock: socket.socket) -> int:
    """Bytes of QEMU's stream written into a plaintext channel: those
    acknowledged, and those still in the socket's send queue (before its FIN,
    which counts as acknowledged too)."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        queued = 0
    return _arrived(sock) + queued


def _said(sock: socket.socket) -> dict | None:
    """A word the destination said already (the socket is readable), else
    None: a refusal or an ack that ends the stream early."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    try:
        return devstate.hear(sock, time.monotonic() + 1)
    except (OSError, MigrateError):
        return None


def _ack_of(word: dict | None) -> pb.DeviceStateAck | None:
    if word is None or not word.get("ack"):
        return None
    return pb.DeviceStateAck(bytes=int(word.get("bytes") or 0), guest_running=word.get("guest_running") is True,
                             error=str(word.get("error") or ""))


def _cancel_migration(qmp: QMP) -> None:
    """Cancels QEMU's migration if it is still under way (QEMU then closes the
    pipe and runs the VM again if it had stopped it)."""
    try:
        if qmp.cmd("query-migrate").get("status") not in (None, "completed", "failed", "cancelled"):
            qmp.cmd("migrate_cancel")
    except QemuError:
        pass


def _migration_event(status: str | tuple):
    want = (status,) if isinstance(status, str) else status
    return lambda e: e["event"] == "MIGRATION" and e.get("data", {}).get("status") in want


def resume_source(qmp: QMP, reporter: Reporter, why: str) -> bool:
    """`cont` on the source QEMU; True when it runs again."""
    try:
        qmp.cmd("cont")
        ok = qmp.status() == "running"
    except QemuError as e:
        reporter.event("error", f"{why}; resuming the source QEMU failed too: {e}")
        return False
    reporter.event("resumed", f"{why}; the source QEMU runs again", qmp=qmp.path)
    return ok


class DeviceStateSender:
    """The Source's on_session hook. Opens the device-state channel before the
    source QEMU stops and waits for the destination's `ready` (its QEMU waits
    in migrate-incoming on it), then starts QEMU's own migration into it
    while the VM runs, the way QEMU migrates: QEMU sends its setup and small
    non-shared RAM while running, then stops the VM and writes the device
    state, which reaches the destination QEMU as it is written; that QEMU
    starts itself once it has loaded it. Records what the destination said,
    which decides whether the source QEMU may be resumed after a failure."""

    def __init__(self, qmp: QMP, reporter: Reporter, open_channel, lost=lambda: None,
                 stopped: threading.Event | None = None, timeout: float = 60.0):
        self.qmp = qmp
        self.reporter = reporter
        self.open_channel = open_channel   # () -> the session's device-state channel (Source)
        # () -> the error once the destination was found gone (Source.dest_lost,
        # --dest-timeout on the raw channels), which ends every wait here
        self.lost = lost
        self.stopped = stopped or threading.Event()   # set at the source QEMU's STOP
        self.timeout = timeout
        self.capture: Capture | None = None   # set once QEMU may stop the VM
        self.sent = False            # the destination may have the stream
        self.ack: pb.DeviceStateAck | None = None
        self.running_time: float | None = None   # when the destination said "running" (time.time())
        # a pre-copy's switch stopped the VM before this runs (QemuPause): its
        # STOP's time and stamps; QEMU's migrate then finds it stopped already
        self.paused: QemuPause | None = None
        # the device-state channel taken and QEMU set up to write into it
        # (prepare()): (socket, TLS relay or None), until begin() takes it
        self.prepared: tuple[socket.socket, TlsRelay | None] | None = None
        # QEMU's migration under way (begin()), until __call__ or withdraw() takes it
        self.flow: Flow | None = None

    def _check_lost(self) -> None:
        Stopped.check()
        e = self.lost()
        if e is not None:
            raise e

    def prepare(self) -> None:
        """Everything before QEMU's `migrate`: the device-state channel opened
        and taken by the destination (its QEMU waits in migrate-incoming on
        it), the capabilities, and QEMU given the socket (plaintext) or the
        relay's pipe (TLS). A pre-copy's switch calls it before its STOP, so
        that the pause includes none of it; otherwise __call__ does."""
        self.discard()
        qmp = self.qmp
        sock = self.open_channel()
        try:
            word = devstate.hear(sock, time.monotonic() + READY_TIMEOUT, self._check_lost)
        except TimeoutError:
            raise QemuError(f"the destination did not take the device-state channel within {READY_TIMEOUT:g} s "
                            "(its QEMU did not go into migrate-incoming)") from None
        except OSError as e:
            raise QemuError(f"the destination closed the device-state channel before taking it ({e}): is the "
                            "session still open there?") from None
        if not word.get("ready"):
            raise QemuError(f"the destination refused the device state: {word.get('refused') or word}")
        prepare_capture(qmp, paused_ok=self.paused is not None)
        relay = None
        if isinstance(sock, TlsSocket):
            relay = TlsRelay(capture_pipe(qmp), sock)
            relay.start()
        else:
            # QEMU takes its own copy of the connected, authenticated socket and
            # writes its stream straight into it; ours stays for the words
            qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(sock.fileno(),))
        self.prepared = (sock, relay)

    def discard(self) -> None:
        """What prepare() set up is not going to be used (the pre-copy failed
        before its switch): the relay stops; the channel closes with its
        Source."""
        if self.prepared is not None:
            _, relay = self.prepared
            self.prepared = None
            if relay is not None:
                relay.stop()
                relay.close()

    def begin(self) -> None:
        """QEMU's `migrate` into the prepared channel (prepare() first when it
        was not): QEMU sends its setup and non-shared RAM while the VM runs,
        then stops the VM itself and writes the device state. A pre-copy's
        switch begins it (QemuPause), then sends its final written list
        while QEMU writes; the destination feeds the stream to its QEMU only
        once it has switched (migrate.qemu.dest)."""
        if self.prepared is None:
            self.prepare()
        (sock, relay), self.prepared = self.prepared, None
        cap = Capture()
        since = len(self.qmp.events)
        cap.times["send_start"] = time.time()
        t0 = time.monotonic()
        cap.times["migrate_sent"] = time.time()
        try:
            self.qmp.cmd("migrate", uri=f"fd:{DEVSTATE_FD_NAME}")
        except BaseException:
            if relay is not None:
                relay.stop()
                relay.close()
            raise
        self.flow = Flow(sock, relay, since, t0)
        self.capture = cap

    def withdraw(self) -> bool:
        """A pre-copy's switch failed after begin(): the channel is cut, so
        that no more of QEMU's stream can reach the destination, then QEMU's
        migration is waited for (the cut fails it, unless QEMU had written it
        all). True when QEMU completed, so the destination may hold the whole
        stream (capture stays: the stream may be loaded there); False when
        it was cut short (QEMU then ran the VM again itself; capture is
        dropped). Either way the channel is not used again."""
        flow, self.flow = self.flow, None
        if flow is None:
            return False
        sock, relay, since = flow.sock, flow.relay, flow.since
        if relay is not None:
            relay.stop()
        try:
            sock.shutdown(socket.SHUT_RDWR)   # (QEMU's own copy too: its writes fail from here)
        except OSError:
            pass
        try:
            ev = self.qmp.wait_event(_migration_event(("completed", "failed", "cancelled")), 10.0,
                                     "QEMU's migration after the channel was cut", since)
        except QemuError:
            ev = None
            _cancel_migration(self.qmp)
        if relay is not None:
            relay.close()
        whole = ev is not None and ev["data"]["status"] == "completed"
        if not whole:
            self.capture = None   # (the migration never was: the VM runs here)
        return whole

    def __call__(self, stub=None, session_id: str = "", token: bytes = b"") -> None:
        qmp = self.qmp
        if self.flow is None:
            self.begin()
        flow, self.flow = self.flow, None
        sock, relay, since, t0 = flow.sock, flow.relay, flow.since, flow.t0
        cap = self.capture
        tls = relay is not None
        if self.paused is not None:
            cap.times.update(self.paused.times)

        def give_up() -> bool:
            # the destination speaks early only to refuse or to say the load
            # failed: then nothing reads QEMU's stream any more
            Stopped.check()
            return (select.select([sock], [], [], 0)[0] != []) or (relay is not None and relay.failed()) \
                or self.lost() is not None

        # bytes in before the STOP (a pre-copy's switch saw its STOP already)
        at_stop = self.paused.at_stop if self.paused is not None else 0
        try:
            self.sent = True
            # the destination ends the stream early only when it refused it: then
            # nothing reads QEMU's pipe, and QEMU would wait on it for ever
            if self.paused is not None:
                # (its STOP came before the switch: QemuPause)
                cap.stop_time = self.paused.stop_time
                ev = qmp.wait_event(_migration_event(("completed", "failed", "cancelled")), self.timeout,
                                    "device-state capture", since, give_up=give_up)
            else:
                ev = qmp.wait_event(lambda e: e["event"] == "STOP" or _migration_event(("failed", "cancelled"))(e),
                                    self.timeout, "waiting for QEMU to stop the VM", since, give_up=give_up)
            if self.paused is None and ev is not None and ev["event"] == "STOP":
                cap.stop_time = ev["time"]
                cap.times["stop_seen"] = time.time()
                at_stop = flow.arrived()
                self.stopped.set()   # its RAM no longer changes: demand may be served
                self.reporter.event("paused", f"source QEMU paused ({qmp.path})", qmp=qmp.path,
                                    stop_time=cap.stop_time)
                ev = qmp.wait_event(_migration_event(("completed", "failed", "cancelled")), self.timeout,
                                    "device-state capture", since, give_up=give_up)
            if ev is None:
                self._check_lost()
                ack = _ack_of(_said(sock))
                if ack is not None and ack.guest_running:
                    # (never seen: the ack comes after the stream's end) the guest
                    # runs there, so this QEMU must stay stopped whatever it says
                    self.ack = ack
                    raise QemuError("the destination runs the guest, but QEMU here did not report its migration "
                                    "completed")
                self.sent = False
                if ack is not None:   # it refused the state: its QEMU did not and will not run the guest
                    self.ack = ack
                    raise QemuError(f"the destination did not resume the guest: {ack.error or 'no reason given'}")
                why = relay.why() if relay is not None and relay.failed() else "it said nothing more"
                raise QemuError(f"the destination ended the device-state channel before QEMU had written it all: "
                                f"{why}")
            info = qmp.cmd("query-migrate")
            cap.seconds = time.monotonic() - t0
            if ev["data"]["status"] != "completed":
                # QEMU runs the VM again itself when it had stopped it; the
                # destination QEMU got a cut stream, which it refuses
                self.sent = False
                raise QemuError(f"device-state capture {ev['data']['status']}: "
                                f"{info.get('error-desc', 'QEMU gave no reason')}")
            if relay is not None:
                relay.thread.join(self.timeout)   # (QEMU's end of file: the end frame goes)
                if relay.failed():
                    raise QemuError(relay.why())
                cap.times["save_end"] = relay.relay.last_ns / 1e9
            else:
                # QEMU wrote it all into the socket: its end (a FIN after the
                # stream) tells the destination it arrived whole
                cap.times["save_end"] = ev["time"]
                cap.bytes = _written(sock)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass   # the destination reset it: its last word (still queued here) says why
        except BaseException:
            if self.ack is None or not self.ack.guest_running:
                _cancel_migration(qmp)
                if relay is not None:
                    relay.stop()
                else:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)   # QEMU's writes fail, if it still writes
                    except OSError:
                        pass
            raise
        finally:
            if relay is not None:
                relay.close()
        cap.qemu_total_ms = int(info.get("total-time", 0))
        cap.qemu_downtime_ms = int(info.get("downtime", 0))
        try:
            # the ack comes once the destination QEMU has loaded the state and
            # runs, which may take long (loading reads guest RAM)
            word = devstate.hear(sock, time.monotonic() + DEVICE_STATE_TIMEOUT, self._check_lost)
            sock.close()   # (its last word: the destination's side waits for our end)
        except TimeoutError:
            raise QemuError(f"device state: the destination said nothing within {DEVICE_STATE_TIMEOUT:g} s of the "
                            "end of the stream") from None
        except OSError as e:
            raise DestinationLost(f"device state: the destination closed the device-state channel without saying "
                                  f"whether its guest runs ({e})") from None
        self.ack = _ack_of(word)
        if self.ack is None:
            raise QemuError(f"device state: the destination said {word} instead of its ack")
        if relay is not None:
            cap.bytes = relay.bytes
        cap.bytes_stopped = max(0, cap.bytes - at_stop)
        self.reporter.event("device-state", f"QEMU wrote {cap.bytes} bytes of device state into the device-state "
                            f"channel ({'TLS, relayed' if tls else 'plaintext, by QEMU itself'}); "
                            f"{cap.qemu_downtime_ms} ms stopped by QEMU's count",
                            bytes=cap.bytes, ms=round(cap.seconds * 1e3, 2), stop_time=cap.stop_time)
        if not self.ack.guest_running:
            raise QemuError(f"the destination did not resume the guest: {self.ack.error or 'no reason given'}")
        self.running_time = time.time()
        self.reporter.event("guest-running", f"destination guest runs ({self.ack.bytes} bytes of device state "
                            "loaded); the source QEMU stays paused", session=session_id,
                            running_time=self.running_time)


class QemuPause:
    """The pause and resume of a pre-copy's source QEMU (`source --precopy
    --qmp`; migrate.source.precopy.Precopy calls them). The switch starts
    QEMU's own migration into the device-state channel while the VM runs
    (DeviceStateSender.begin): QEMU sends its non-shared RAM, stops the VM
    itself and writes the device state, while the final scan and Switch run.
    The destination feeds that stream to its QEMU only once it has switched,
    so the guest can never start there on pages the final list names.

    A switch that fails: the channel is cut and QEMU's migration ends
    (DeviceStateSender.withdraw). The VM runs here again unless the
    destination may have switched and QEMU had written its whole stream;
    then it stays paused, as after any post-copy switch."""

    def __init__(self, qmp: QMP, reporter: Reporter, stopped: threading.Event, sender: DeviceStateSender):
        self.qmp = qmp                # borrowed; used from the Source's thread only, as the sender does
        self.reporter = reporter
        self.stopped = stopped        # set at STOP: the source's demand gate
        self.sender = sender
        self.stop_time = 0.0          # QEMU's STOP event (its own clock)
        self.at_stop = 0              # bytes of QEMU's stream the destination had at STOP
        self.times: dict = {}         # the switchover's stamps (migrate.qemu.switchover)

    def pause(self) -> None:
        sender = self.sender
        sender.prepare()   # (before the STOP: outside the pause)
        since = len(self.qmp.events)
        sender.begin()
        ev = self.qmp.wait_event(lambda e: e["event"] == "STOP" or _migration_event(("failed", "cancelled"))(e),
                                 10.0, "waiting for QEMU to stop the VM", since)
        if ev["event"] != "STOP":   # (no event within 10 s: wait_event raised)
            raise QemuError(f"the source QEMU ({self.qmp.path}) ended its migration ({ev['data']['status']}) "
                            "before it stopped the VM")
        self.stop_time = ev["time"]
        self.times["stop_seen"] = time.time()
        self.at_stop = sender.flow.arrived()
        sender.paused = self
        self.stopped.set()   # its RAM no longer changes: demand may be served
        self.reporter.event("paused", f"source QEMU paused for the switch ({self.qmp.path})", qmp=self.qmp.path,
                            stop_time=self.stop_time)

    def switching(self) -> None:
        """The Switch is about to go: from here the destination may switch and
        load the stream (DeviceStateSender.sent decides what a failure does)."""
        self.sender.sent = True

    def whole(self) -> bool:
        """The Switch failed without a refusal (the destination may have
        switched): whether QEMU had written its whole stream; the channel is
        cut either way (withdraw)."""
        whole = self.sender.withdraw()
        if not whole:
            self.sender.sent = False   # cut short: the destination can never load it
        return whole

    def resume(self) -> None:
        """The switch failed and the destination did not switch: the VM runs
        here again (QEMU ran it itself if its migration failed at the cut;
        `cont` when it had completed, or never began)."""
        sender = self.sender
        sender.paused = None
        sender.withdraw()
        sender.sent = False
        sender.discard()
        self.stopped.clear()
        resume_source(self.qmp, self.reporter, "pre-copy failed before the switch")


def _explained(e: MigrateError, message: str) -> MigrateError:
    """e said again with what became of the source QEMU; the same exit code."""
    err = MigrateError(message)
    err.exit_code = e.exit_code
    return err


def migrate_vm(qmp_path: str, ram, target: str, reporter: Reporter, recovery_window: float = 0.0,
               quit_source: bool = False, **source_kw):
    """`migrate source --qmp`: open the session, then pause and capture, send the
    device state, serve RAM; then quit the source QEMU (quit_source) or leave it
    paused. Returns (SourceResult, info dict). A destination
    lost once it may have the device state is recovered for recovery_window
    seconds (migrate.source.recovery), the source QEMU paused throughout. On
    failure: resumes the source QEMU when the destination certainly did not
    resume the guest, else leaves it paused and says what to do (the error
    keeps its exit code)."""
    from migrate.source.recovery import Recovery
    from migrate.source.session import DestinationFailed, Source

    qmp = QMP(qmp_path)
    sender = None
    try:
        check_shared_ram(qmp, ram.size)
        stopped = threading.Event()
        sender = DeviceStateSender(qmp, reporter, open_channel=lambda: src.open_device_state_channel(),
                                   lost=lambda: src.dest_lost, stopped=stopped)
        precopy = source_kw.get("precopy")
        if precopy is not None:   # rounds while the VM runs; the switch stops it (QemuPause)
            qp = QemuPause(qmp, reporter, stopped, sender)
            precopy.pause, precopy.resume = qp.pause, qp.resume
            precopy.switching, precopy.whole = qp.switching, qp.whole

        # The background push waits until the destination guest runs: while the
        # destination QEMU loads the device state, the only RAM it needs comes
        # through demand faults, and a push running at the same time took the
        # CPU from that load (downtime 34-39 ms against 11-14 ms held back,
        # 512 MiB guest on 2 CPUs; total time unchanged).
        guest_running = threading.Event()

        def on_session(stub, session_id, token):
            # The session and its channels are open before the source QEMU stops,
            # so the guest's pause does not include connecting (about 12 ms
            # here). Nothing reads RAM before the pause: demand is served from
            # QEMU's STOP on (demand_gate; the destination QEMU reads guest RAM
            # only as it loads the device state, which QEMU writes after it
            # stopped the VM), and the push waits for guest_running.
            sender(stub, session_id, token)
            guest_running.set()

        src = Source(ram, target, reporter, device_state=True, on_session=on_session, push_gate=guest_running,
                     demand_gate=stopped, **source_kw)

        def again(session: str, guest: str, connect_timeout: float) -> Source:
            # the device state is at the destination (or never will be from
            # here): a try again serves RAM only, the source QEMU stays paused.
            # The guest is named whenever its state was sent, also when the
            # answer that it runs was lost with the agent: the agent that has
            # the session resumes it (loaded or still loading), and a restarted
            # one takes the guest only if its QEMU says it runs a guest it
            # loaded (migrate.qemu.dest, DeviceStateFeeder.loaded_guest).
            return Source(ram, target, reporter, **{**source_kw, "resume_session": session, "precopy": None},
                          resume_guest=guest if sender.sent else "", connect_timeout=connect_timeout,
                          open_timeout=connect_timeout + 5)

        def vm_state(session: str) -> str:
            runs = "runs on the destination" if sender.ack is not None else \
                "may run on the destination (its device state went there; whether it loaded is not known here)"
            return (f"The VM {runs} and waits for the pages it lacks; the source QEMU stays paused, and its RAM "
                    f"file {ram.path} holds those pages: keep both. Once the destination answers again, "
                    f"`migrate source --ram {ram.path} --to {target} --resume {session}` (no --qmp; with this "
                    "source's TLS flags) serves the rest; if its agent was restarted since, the same command without "
                    "--resume. Resume the source QEMU only if the destination guest is known to be lost and never "
                    f"ran: {resume_hint(qmp_path)}")

        t0 = time.monotonic()
        try:
            try:
                res = src.run()
            except DestinationLost as e:
                # recovered only once the destination may have the device
                # state (before, the source QEMU is resumed: it is the VM), and
                # not once it said it did not load it
                if not sender.sent or (sender.ack is not None and not sender.ack.guest_running) \
                        or not src.session or recovery_window <= 0:
                    raise
                src.state = "paused"   # (what `migrate status` shows meanwhile)
                res = Recovery(reporter, recovery_window, again, vm_state).recover(src.session, src.guest_instance, e,
                                                                                     sent_all=src.sent_all,
                                                                                     token=src.token)
                res = dataclasses.replace(res, seconds=time.monotonic() - t0)
        except MigrateError as e:
            if sender.capture is None:
                if precopy is not None and precopy.switched:
                    # paused at the switch, and the device state never left: the
                    # destination QEMU cannot run the guest, this one is the VM
                    resume_source(qmp, reporter, f"migration failed after the pre-copy's switch, before the "
                                  f"device state was sent ({e})")
                    raise _explained(e, f"{e} (the source QEMU was resumed)") from None
                # QEMU's migration never started: the VM was never stopped (or
                # the pre-copy resumed it)
                raise _explained(e, f"{e} (the source QEMU was not paused: it runs on)") from None
            if isinstance(e, RecoveryWindowOver):
                raise   # it says the VM's state and what to do
            if sender.ack is not None and sender.ack.guest_running:
                if isinstance(e, DestinationFailed):
                    raise _explained(e,
                        f"{e} (the guest ran on the destination and is lost there; the source QEMU stays paused: "
                        "resuming it would take the VM back to before the migration, after the destination "
                        "guest's own disk writes and network traffic. Only if that is safe for this VM: "
                        f"{resume_hint(qmp_path)})") from None
                # a DestinationGone says already how to resume the session
                how = "" if isinstance(e, DestinationGone) else \
                    f": serve the rest with `migrate source --resume {src.session}`"
                raise _explained(e, f"{e} (the guest runs on the destination; the source QEMU stays paused{how})") \
                    from None
            if not sender.sent or sender.ack is not None:
                resume_source(qmp, reporter, f"migration failed before the destination resumed the guest ({e})")
                raise _explained(e, f"{e} (the source QEMU was resumed)") from None
            # The destination may have the device state and run the guest, or be
            # loading it: resuming the session there is safe either way, and it
            # refuses when the state did not reach it or did not load.
            how = "" if isinstance(e, DestinationGone) else (
                f"once the destination can be reached, `migrate source --resume {src.session}` serves it the rest; ")
            raise _explained(
                e, f"{e} (the destination may have the device state, and its guest may run or be about to, so the "
                f"source QEMU stays paused: {how}only if the destination refuses that resume, because the state "
                f"did not reach it or did not load, resume this one: {resume_hint(qmp_path)})") \
                from None
        try:
            src_status = after_migration(qmp, reporter, ram.path, quit_source)
        except QemuError as e:
            # The source QEMU died after the destination guest started: nothing
            # is lost, its RAM file (which this agent maps) served the rest.
            src_status = "gone"
            reporter.event("source-qemu-gone", f"the source QEMU went away during the migration ({e}); the "
                           "migration finished from its RAM file, the guest runs on the destination",
                           qmp=qmp_path)
        cap = sender.capture
        info = {"device_state_bytes": cap.bytes, "capture_ms": round(cap.seconds * 1e3, 2),
                "qemu_downtime_ms": cap.qemu_downtime_ms, "device_state_bytes_stopped": cap.bytes_stopped,
                "stop_time": cap.stop_time, "running_time": sender.running_time,
                # (None when the answer that the guest runs was lost with its agent)
                "downtime_ms": (round((sender.running_time - cap.stop_time) * 1e3, 2)
                                if sender.running_time is not None else None),
                "source_status": src_status, "switchover": {k: round(v, 6) for k, v in cap.times.items()}}
        return res, info
    finally:
        if sender is not None:
            sender.discard()   # (prepared for a switch whose device state never went)
        qmp.close()


"""QEMU: the QMP client, the device-state capture on the source and the feed on
the destination, and where the LD_PRELOAD shim lives.

With shared-file RAM and QEMU's `x-ignore-shared` capability, QEMU's own
migration stream carries only device state (~300 KiB whatever the RAM size);
the RAM travels through this engine. The stream goes through an `fd:` pipe
handed to QEMU with `getfd`, and rides inside the gRPC session (DeviceState).

Source (`migrate source --qmp`):  x-ignore-shared, stop, migrate fd:PIPE, read the
stream; open the session; send the stream; keep the source QEMU paused until the
destination says its guest runs; resume it (`cont`) when the destination says
it did not.

Destination (`migrate dest --qmp`):  the guest is attached (shim) and a source is
connected and serving demand faults BEFORE migrate-incoming: loading the device
state reads guest RAM (kvmvapic reads the option ROM at 0xc0000), and QEMU's
main thread blocks on that fault until the page arrives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc

from migrate.errors import MigrateError
from migrate.events import Reporter
from migrate.proto import migration_pb2 as pb

DEVSTATE_FD_NAME = "migrate-devstate"
CHUNK_BYTES = 256 << 10
# the whole device-state handoff: sending it, and the destination QEMU loading
# it (reading guest RAM by demand faults) and resuming
DEVICE_STATE_TIMEOUT = 120.0
_NO_BANDWIDTH_LIMIT = 1 << 40   # QEMU's default max-bandwidth is 128 MiB/s


class QemuError(MigrateError):
    """QEMU refused a command, went away, or did not reach the expected state."""


class QMPCommandError(QemuError):
    def __init__(self, path: str, command: str, error: dict):
        self.command = command
        self.error_class = error.get("class", "?")
        super().__init__(f"QMP {command} on {path}: {self.error_class}: {error.get('desc', error)}")


def shim_path() -> str:
    """Absolute path of the built LD_PRELOAD shim (native/shim.c as migrate._shim).
    Found without importing it: it is a plain shared library, not a Python module."""
    spec = importlib.util.find_spec("migrate._shim")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        raise MigrateError("the QEMU shim (migrate._shim) is not built: reinstall the package "
                           "(pip install -e .) with a C compiler available")
    return os.path.abspath(spec.origin)


# -- QMP ----------------------------------------------------------------------
class QMP:
    """One QMP connection: commands (optionally with SCM_RIGHTS descriptors) and
    the events seen meanwhile, each stamped with QEMU's own wall-clock time.
    Owns the socket. Not thread-safe: one thread talks to one QEMU."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.buf = b""
        self.events: list[dict] = []
        self._id = 0
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"cannot connect to QMP at {path} within {timeout:.0f} s: {e.strerror}; "
                                    "is QEMU running with -qmp unix:PATH,server=on,wait=off?") from None
                time.sleep(0.05)
        try:
            greeting = self._read(timeout)
            if "QMP" not in greeting:
                raise QemuError(f"{path} is not a QMP socket: it greeted with {greeting!r}")
            self.version = greeting["QMP"]["version"]["qemu"]
            self.cmd("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise QemuError(f"QMP {self.path}: no answer within {timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise QemuError(f"QMP {self.path}: no answer within {timeout:.0f} s") from None
            except OSError as e:
                raise QemuError(f"QMP {self.path}: {e.strerror}: did QEMU exit?") from None
            if not data:
                raise QemuError(f"QMP {self.path}: connection closed: did QEMU exit?")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" in msg:
            ts = msg.get("timestamp", {})
            msg["time"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            self.events.append(msg)
        return msg

    def cmd(self, name: str, timeout: float = 60.0, fds: tuple[int, ...] = (), **arguments):
        """Runs one command and returns its "return" value. `fds` travel with
        SCM_RIGHTS; QEMU takes its own copies, the caller still owns them."""
        self._id += 1
        msg = {"execute": name, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QemuError(f"QMP {name} on {self.path}: {e.strerror}: did QEMU exit?") from None
        while True:
            r = self._read(timeout)
            if "event" in r or r.get("id") != self._id:
                continue
            if "error" in r:
                raise QMPCommandError(self.path, name, r["error"])
            return r.get("return")

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def event(self, name: str) -> dict | None:
        """The first event `name` seen so far, or None."""
        for e in self.events:
            if e["event"] == name:
                return e
        return None

    def wait_migration(self, timeout: float, what: str) -> dict:
        """Polls query-migrate until completed; raises on failed/cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate", timeout=max(1.0, deadline - time.monotonic()))
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise QemuError(f"{what} {st}: {info.get('error-desc', 'QEMU gave no reason')}")
            if time.monotonic() > deadline:
                raise QemuError(f"{what} still {st} after {timeout:.0f} s")
            time.sleep(0.002)

    def ignore_shared(self) -> None:
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": "x-ignore-shared", "state": True}])


def _drain(fd: int, out: bytearray, done: threading.Event) -> None:
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            out += b
    finally:
        done.set()


# -- source -------------------------------------------------------------------
@dataclass
class Capture:
    data: bytes
    stop_time: float           # QEMU's own clock (the STOP event), seconds since the epoch
    seconds: float             # stop + migrate, measured here
    qemu_total_ms: int = 0     # QEMU's query-migrate total-time


def check_shared_ram(qmp: QMP, ram_size: int) -> None:
    """Every memory backend must be share=on (x-ignore-shared skips only those),
    and one of them must be the RAM file served."""
    devs = qmp.cmd("query-memdev")
    if not devs:
        raise QemuError(f"QEMU at {qmp.path} has no memory backend object: start it with "
                        "-object memory-backend-file,...,share=on -machine memory-backend=ID")
    private = [d.get("id", "?") for d in devs if not d.get("share")]
    if private:
        raise QemuError(f"memory backend {private[0]} is not share=on: its RAM would travel inside QEMU's "
                        "stream; start QEMU with share=on on every memory backend")
    if ram_size not in [d["size"] for d in devs]:
        raise QemuError(f"--ram is {ram_size} bytes but QEMU's memory backends are "
                        f"{[d['size'] for d in devs]} bytes: pass the backend's file")


def capture_device_state(qmp: QMP, reporter: Reporter, timeout: float = 60.0) -> Capture:
    """Pauses the source QEMU and takes its device-state stream. On failure the
    QEMU is resumed (when this call paused it) and QemuError raised."""
    qmp.ignore_shared()
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": _NO_BANDWIDTH_LIMIT})
    was = qmp.status()
    if was != "running":
        raise QemuError(f"source QEMU is {was!r}, not running: nothing to migrate "
                        "(a paused source may belong to a migration already under way)")
    r, w = os.pipe2(os.O_CLOEXEC)
    data = bytearray()
    eof = threading.Event()
    reader = threading.Thread(target=_drain, args=(r, data, eof), name="devstate-rx", daemon=True)
    t0 = time.monotonic()
    stopped = False
    try:
        qmp.cmd("stop")
        stopped = True
        reporter.event("paused", f"source QEMU paused ({qmp.path})", qmp=qmp.path)
        reader.start()
        qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(w,))
        # QEMU holds its own copy of the write end now; ours must go so that the
        # reader sees EOF when QEMU closes it at the end of the migration.
        os.close(w)
        w = -1
        qmp.cmd("migrate", uri=f"fd:{DEVSTATE_FD_NAME}")
        info = qmp.wait_migration(timeout, "device-state capture")
        if not eof.wait(timeout):
            raise QemuError("QEMU finished the migration but kept the device-state pipe open")
    except BaseException:
        if w >= 0:
            os.close(w)
        if stopped:
            resume_source(qmp, reporter, "device-state capture failed")
        raise
    finally:
        reader.join(5)
        os.close(r)
    seconds = time.monotonic() - t0
    stop = qmp.event("STOP")
    cap = Capture(bytes(data), stop["time"] if stop else time.time() - seconds, seconds,
                  int(info.get("total-time", 0)))
    reporter.event("device-state", f"captured {len(cap.data)} bytes of device state in "
                   f"{seconds * 1e3:.1f} ms", bytes=len(cap.data), ms=round(seconds * 1e3, 2),
                   stop_time=cap.stop_time)
    return cap


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
    """The Source's on_session hook: sends the captured stream once the session is
    open and the demand stream is being served. Records what the destination said,
    which decides whether the source QEMU may be resumed after a failure."""

    def __init__(self, capture: Capture | None, reporter: Reporter, wait=lambda fut: fut.result()):
        self.capture = capture
        self.reporter = reporter
        # waits for the call's future: Source.wait_rpc ends the wait when the
        # destination is found gone (gRPC alone would wait for its deadline)
        self.wait = wait
        self.sent = False            # the destination may have the stream
        self.ack: pb.DeviceStateAck | None = None
        self.running_time: float | None = None   # when the destination said "running" (time.time())

    def __call__(self, stub, session_id: str) -> None:
        data = self.capture.data

        def chunks():
            for off in range(0, max(1, len(data)), CHUNK_BYTES):
                yield pb.DeviceStateChunk(session_id=session_id, data=data[off:off + CHUNK_BYTES])

        self.sent = True
        # The ack comes once the destination QEMU has loaded the state and runs,
        # which may take long (loading reads guest RAM)
        try:
            self.ack = self.wait(stub.DeviceState.future(chunks(), timeout=DEVICE_STATE_TIMEOUT))
        except grpc.RpcError as e:
            raise QemuError(f"device state: destination said {e.code().name}: {e.details()}") from None
        if not self.ack.guest_running:
            raise QemuError(f"the destination did not resume the guest: {self.ack.error or 'no reason given'}")
        self.running_time = time.time()
        self.reporter.event("guest-running", f"destination guest runs ({self.ack.bytes} bytes of device state "
                            "loaded); the source QEMU stays paused", session=session_id,
                            running_time=self.running_time)


def migrate_vm(qmp_path: str, ram, target: str, reporter: Reporter, **source_kw):
    """`migrate source --qmp`: open the session, then pause and capture, send the
    device state, serve RAM. Returns (SourceResult, info dict). On failure: resumes the source
    QEMU when the destination certainly did not resume the guest, else leaves it
    paused and says what to do."""
    from migrate.source import DestinationFailed, Source

    qmp = QMP(qmp_path)
    try:
        check_shared_ram(qmp, ram.size)
        sender = DeviceStateSender(None, reporter, wait=lambda fut: src.wait_rpc(fut))

        # The background push waits until the destination guest runs: while the
        # destination QEMU loads the device state, the only RAM it needs comes
        # through demand faults (served from the start), and a push running at
        # the same time took the CPU from that load (downtime 34-39 ms against
        # 11-14 ms held back, 512 MiB guest on 2 CPUs; total time unchanged).
        guest_running = threading.Event()

        def on_session(stub, session_id):
            # The session and its channels are open before the source QEMU stops,
            # so the guest's downtime does not include connecting (about 12 ms
            # here). Nothing reads RAM before the pause: the push waits for
            # guest_running, and demand requests only come once the destination
            # QEMU loads the device state captured below.
            sender.capture = capture_device_state(qmp, reporter)
            sender(stub, session_id)
            guest_running.set()

        src = Source(ram, target, reporter, device_state=True, on_session=on_session, push_gate=guest_running,
                     **source_kw)
        try:
            res = src.run()
        except MigrateError as e:
            if sender.capture is None:
                # never paused (or capture_device_state resumed what it paused)
                raise MigrateError(f"{e} (the source QEMU was not paused: it runs on)") from None
            if sender.ack is not None and sender.ack.guest_running:
                if isinstance(e, DestinationFailed):
                    raise MigrateError(
                        f"{e} (the guest ran on the destination and is lost there; the source QEMU stays paused: "
                        "resuming it would take the VM back to before the migration, after the destination "
                        "guest's own disk writes and network traffic. Only if that is safe for this VM: "
                        f"`python -m migrate.qemu {qmp_path} cont`)") from None
                how = "" if "--resume" in str(e) else f": serve the rest with `migrate source --resume {src.session}`"
                raise MigrateError(f"{e} (the guest runs on the destination; the source QEMU stays paused{how})") \
                    from None
            if not sender.sent or sender.ack is not None:
                resume_source(qmp, reporter, f"migration failed before the destination resumed the guest ({e})")
                raise MigrateError(f"{e} (the source QEMU was resumed)") from None
            # The destination may have the device state and run the guest, or be
            # loading it: resuming the session there is safe either way, and it
            # refuses when the state did not reach it or did not load.
            how = "" if "--resume" in str(e) else (f"once the destination can be reached, `migrate source "
                                                    f"--resume {src.session}` serves it the rest; ")
            raise MigrateError(
                f"{e} (the destination may have the device state, and its guest may run or be about to, so the "
                f"source QEMU stays paused: {how}only if the destination refuses that resume, because the state "
                f"did not reach it or did not load, resume this one: `python -m migrate.qemu {qmp_path} cont`)") \
                from None
        try:
            src_status = qmp.status()
        except QemuError as e:
            # The source QEMU died after the destination guest started: nothing
            # is lost, its RAM file (which this agent maps) served the rest.
            src_status = "gone"
            reporter.event("source-qemu-gone", f"the source QEMU went away during the migration ({e}); the "
                           "migration finished from its RAM file, the guest runs on the destination",
                           qmp=qmp_path)
        cap = sender.capture
        info = {"device_state_bytes": len(cap.data), "capture_ms": round(cap.seconds * 1e3, 2),
                "stop_time": cap.stop_time, "running_time": sender.running_time,
                "downtime_ms": round((sender.running_time - cap.stop_time) * 1e3, 2),
                "source_status": src_status}
        return res, info
    finally:
        qmp.close()


# -- destination --------------------------------------------------------------
@dataclass
class Feed:
    bytes: int = 0
    running: bool = False
    error: str = ""
    received: bool = False     # every chunk arrived (the source closed its stream)
    load_ms: float = 0.0
    resume_time: float = 0.0   # QEMU's RESUME event (epoch seconds)
    done: threading.Event = field(default_factory=threading.Event)


class DeviceStateFeeder:
    """The destination side: gives the device state to the local QEMU
    (`-incoming defer`, started with the shim) and resumes it."""

    def __init__(self, qmp_path: str, reporter: Reporter, timeout: float = 120.0, wait_qemu: float = 3600.0):
        self.qmp_path = qmp_path
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
        QEMU on guest_running=False)."""
        f = Feed()
        with self.lock:
            old = self.feeds.get(migration.id)
            if old is not None and (old.running or not old.done.is_set()):
                return pb.DeviceStateAck(bytes=old.bytes, guest_running=old.running,
                                         error="device state for this session was already fed")
            self.feeds[migration.id] = f
        try:
            data = bytearray()
            for c in chunks:
                data += c.data
            f.bytes = len(data)
            f.received = True
            migration.reporter.event("device-state", f"{len(data)} bytes of device state received: the "
                                     "destination QEMU loads them", session=migration.id, bytes=len(data))
            self._load_and_run(bytes(data), f, migration)
        except MigrateError as e:
            f.error = str(e)
            migration.reporter.event("error", f"device state: {e}", session=migration.id)
        except Exception as e:  # noqa: BLE001 - the ack must carry every failure
            f.error = f"{type(e).__name__}: {e}"
            migration.reporter.event("error", f"device state: {f.error}", session=migration.id)
        finally:
            f.done.set()
        return pb.DeviceStateAck(bytes=f.bytes, guest_running=f.running, error=f.error)

    def _load_and_run(self, data: bytes, f: Feed, m) -> None:
        qmp = self._take_qmp()
        try:
            t0 = time.monotonic()
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(r,))
            finally:
                os.close(r)   # QEMU has its own copy
            writer_err: list[BaseException] = []

            def write():
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(w, view[:1 << 20])
                        view = view[n:]
                except OSError as e:
                    writer_err.append(e)
                finally:
                    os.close(w)

            wt = threading.Thread(target=write, name="devstate-tx", daemon=True)
            wt.start()
            # Loading reads guest RAM (faults served by this agent): QMP may not
            # answer until those pages arrive.
            qmp.cmd("migrate-incoming", uri=f"fd:{DEVSTATE_FD_NAME}")
            qmp.wait_migration(self.timeout, "device-state load")
            wt.join(5)
            if writer_err:
                raise QemuError(f"writing the device state to QEMU: {writer_err[0]}")
            f.load_ms = (time.monotonic() - t0) * 1e3
            qmp.cmd("cont")
            st = qmp.status()
            if st != "running":
                raise QemuError(f"destination QEMU is {st!r} after cont")
            f.running = True
            ev = qmp.event("RESUME")
            f.resume_time = ev["time"] if ev else time.time()
            m.reporter.event("guest-running", f"destination QEMU resumed: {len(data)} bytes of device state "
                             f"loaded in {f.load_ms:.1f} ms", session=m.id, bytes=len(data),
                             load_ms=round(f.load_ms, 2), resume_time=f.resume_time)
        finally:
            qmp.close()


def main(argv=None) -> int:
    """`python -m migrate.qemu QMP_SOCKET COMMAND ['{json arguments}']`, e.g. to
    resume a source QEMU by hand: `python -m migrate.qemu /run/src.qmp cont`."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    try:
        q = QMP(argv[0])
        print(json.dumps(q.cmd(argv[1], **(json.loads(argv[2]) if len(argv) > 2 else {})), indent=2))
    except MigrateError as e:
        print(f"qmp: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""QEMU on the source (`migrate source --qmp`).

With shared-file RAM and QEMU's `x-ignore-shared` capability, QEMU's own
migration stream carries only device state (~300 KiB whatever the RAM size);
the RAM travels through this engine. The stream goes through an `fd:` pipe
handed to QEMU with `getfd`, and rides inside the gRPC session (DeviceState).

The flow: x-ignore-shared, stop, migrate fd:PIPE, read the stream; open the
session; send the stream; keep the source QEMU paused until the destination
says its guest runs; resume it (`cont`) when the destination says it did not.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from migrate.errors import DestinationGone, MigrateError
from migrate.report import Reporter
from migrate.proto import migration_pb2 as pb
from migrate.qemu import resume_hint
from migrate.qemu.qmp import DEVSTATE_FD_NAME, QMP, QemuError


CHUNK_BYTES = 256 << 10


# the whole device-state handoff: sending it, and the destination QEMU loading
# it (reading guest RAM by demand faults) and resuming
DEVICE_STATE_TIMEOUT = 120.0
_NO_BANDWIDTH_LIMIT = 1 << 40   # QEMU's default max-bandwidth is 128 MiB/s


def _drain(fd: int, out: bytearray, done: threading.Event, times: dict) -> None:
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                times["save_end"] = time.time()
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
    times: dict = field(default_factory=dict)   # the switchover's moments (migrate.qemu.switchover)


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
    times: dict = {}
    reader = threading.Thread(target=_drain, args=(r, data, eof, times), name="devstate-rx", daemon=True)
    t0 = time.monotonic()
    stopped = False
    try:
        times["stop_sent"] = time.time()
        qmp.cmd("stop")
        times["stop_done"] = time.time()
        stopped = True
        reporter.event("paused", f"source QEMU paused ({qmp.path})", qmp=qmp.path)
        reader.start()
        qmp.cmd("getfd", fdname=DEVSTATE_FD_NAME, fds=(w,))
        # QEMU holds its own copy of the write end now; ours must go so that the
        # reader sees EOF when QEMU closes it at the end of the migration.
        os.close(w)
        w = -1
        times["migrate_sent"] = time.time()
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
                  int(info.get("total-time", 0)), times)
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

    def __call__(self, stub, session_id: str, token: bytes) -> None:
        data = self.capture.data

        times = self.capture.times

        def chunks():
            # the first chunk names the session and carries its token
            for off in range(0, max(1, len(data)), CHUNK_BYTES):
                yield pb.DeviceStateChunk(session_id=session_id, token=token if off == 0 else b"",
                                          data=data[off:off + CHUNK_BYTES])
            times["send_end"] = time.time()

        self.sent = True
        times["send_start"] = time.time()
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
    from migrate.source.session import DestinationFailed, Source

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

        def on_session(stub, session_id, token):
            # The session and its channels are open before the source QEMU stops,
            # so the guest's downtime does not include connecting (about 12 ms
            # here). Nothing reads RAM before the pause: the push waits for
            # guest_running, and demand requests only come once the destination
            # QEMU loads the device state captured below.
            sender.capture = capture_device_state(qmp, reporter)
            sender(stub, session_id, token)
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
                        f"{resume_hint(qmp_path)})") from None
                # a DestinationGone says already how to resume the session
                how = "" if isinstance(e, DestinationGone) else \
                    f": serve the rest with `migrate source --resume {src.session}`"
                raise MigrateError(f"{e} (the guest runs on the destination; the source QEMU stays paused{how})") \
                    from None
            if not sender.sent or sender.ack is not None:
                resume_source(qmp, reporter, f"migration failed before the destination resumed the guest ({e})")
                raise MigrateError(f"{e} (the source QEMU was resumed)") from None
            # The destination may have the device state and run the guest, or be
            # loading it: resuming the session there is safe either way, and it
            # refuses when the state did not reach it or did not load.
            how = "" if isinstance(e, DestinationGone) else (
                f"once the destination can be reached, `migrate source --resume {src.session}` serves it the rest; ")
            raise MigrateError(
                f"{e} (the destination may have the device state, and its guest may run or be about to, so the "
                f"source QEMU stays paused: {how}only if the destination refuses that resume, because the state "
                f"did not reach it or did not load, resume this one: {resume_hint(qmp_path)})") \
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
                "source_status": src_status, "switchover": {k: round(v, 6) for k, v in cap.times.items()}}
        return res, info
    finally:
        qmp.close()


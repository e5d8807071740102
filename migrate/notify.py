"""sd_notify without a library: the agents tell systemd (Type=notify units,
examples/systemd/) when they are ready and what they are doing, one datagram
per message on the unix socket named by $NOTIFY_SOCKET (sd_notify(3)).

`Notifier` listens to a Reporter's events: the destination is READY=1 once it
listens and a guest is attached, the source once its session is open, and
both send a STATUS= line as the migration moves (progress at most once a
second). Without NOTIFY_SOCKET it does nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time

PROGRESS_EVERY = 1.0   # s between STATUS= lines of progress


def notify(message: str, env: dict | None = None) -> bool:
    """Sends message ("READY=1\\nSTATUS=...") to $NOTIFY_SOCKET (a path, or
    @name in the abstract namespace). False when there is none or it cannot
    be reached: a service manager that went away is no reason to stop."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message.encode(), addr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Notifier:
    """A Reporter listener (Reporter.listeners) that turns events into
    sd_notify messages."""

    def __init__(self, role: str):
        self.role = role
        self.ready = False
        self.next_progress = 0.0
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.lock = threading.Lock()   # (events come from many threads: READY=1 goes once, in order)

    def __call__(self, event: str, message: str, fields: dict) -> None:
        if not self.enabled:
            return
        with self.lock:
            line = self._status(event, message, fields)
            if line is None:
                return
            ready = ""
            if not self.ready and (event == "attached" or (self.role == "source" and event == "connected")):
                self.ready, ready = True, "READY=1\n"
            notify(f"{ready}STATUS={line}")

    def _status(self, event: str, message: str, f: dict) -> str | None:
        if event == "progress":
            now = time.monotonic()
            if now < self.next_progress or not f.get("pages_total"):
                return None
            self.next_progress = now + PROGRESS_EVERY
            return (f"session {f.get('session')}: {100.0 * f.get('received', 0) / f['pages_total']:.1f}% received, "
                    f"{f.get('faults', 0)} faults")
        if event == "summary":
            return f"finished: {message.splitlines()[0]}"[:400] if message else "finished"
        if event in ("listening", "control", "attached", "reattached", "connected", "disconnected", "completed",
                     "migration", "error", "qemu", "push"):
            return f"{event}: {message}"[:400] if message else event
        return None

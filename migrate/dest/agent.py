"""The destination agent: the process behind `migrate dest --listen`.

It takes guests as they attach (migrate.dest.attach), one `Migration` each
(migrate.dest.session), and hands each source that opens a session to the
guest it names. The gRPC servicer (migrate.dest.service) is thin and
delegates here.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

from migrate.dest import faultspace
from migrate.dest.attach import AttachListener
from migrate.wire.attach import AttachProbe
from migrate.errors import AttachError, MigrateError, fmt_size
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter
from migrate.wire.protocol import DEMAND_MAGIC, DEMAND_TOKEN_BYTES, PUSH_MAGIC
from migrate.wire.tcp import set_peer_timeout
from migrate.dest.session import BusyError, NoGuestError
from migrate.dest.session import Migration
from migrate.dest.state import SERVED, WAITING


ENDED_KEPT = 64          # serve-forever: ended sessions whose Finish is still answered


class Destination:
    """The agent: an attach listener plus the migrations it adopted."""

    def __init__(self, attach_path: str, reporter: Reporter, *, serve_forever: bool = False,
                 mode: str = faultspace.MODE_CONTINUE, demand_host: str = "127.0.0.1", prepare: bool = True,
                 source_timeout: float = 0):
        self.reporter = reporter
        self.prepare = prepare
        self.source_timeout = source_timeout
        self.serve_forever = serve_forever
        self.mode = mode
        self.listener = AttachListener(attach_path)
        self.migrations: dict[str, Migration] = {}
        # what Finish answers for migrations retired (serve-forever) before
        # their source asked: the last ENDED_KEPT of them
        self.ended: dict[str, pb.FinishReply] = {}
        self.answered: set[str] = set()   # sessions whose source got a Finish reply
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.closing = False
        self.accept_thread = threading.Thread(target=self._accept_loop, name="attach", daemon=True)
        # The demand channel: plain TCP, one connection per source, opened with
        # the token its Welcome carried.
        family = socket.AF_INET6 if ":" in demand_host.strip("[]") else socket.AF_INET
        self.demand_listener = socket.socket(family, socket.SOCK_STREAM)
        self.demand_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.demand_listener.bind((demand_host.strip("[]"), 0))
        except OSError as e:
            self.demand_listener.close()
            self.listener.close()
            raise MigrateError(f"cannot listen on {demand_host}: {e.strerror} (--listen takes an address of "
                               "this host, or 0.0.0.0)") from None
        self.demand_listener.listen(16)
        self.demand_port = self.demand_listener.getsockname()[1]
        threading.Thread(target=self._demand_accept_loop, name="demand-accept", daemon=True).start()

    def start(self) -> None:
        """Starts taking attaches (after the caller reported where it listens)."""
        self.accept_thread.start()

    def _demand_accept_loop(self):
        while not self.closing:
            try:
                conn, peer = self.demand_listener.accept()
            except OSError:
                return
            threading.Thread(target=self._demand_hello, args=(conn, peer), daemon=True).start()

    def _demand_hello(self, conn: socket.socket, peer) -> None:
        conn.settimeout(10)
        try:
            hello = b""
            want = len(DEMAND_MAGIC) + DEMAND_TOKEN_BYTES
            while len(hello) < want:
                chunk = conn.recv(want - len(hello))
                if not chunk:
                    raise OSError("closed during the demand hello")
                hello += chunk
        except OSError as e:
            self.reporter.event("error", f"demand channel from {peer}: {e}")
            conn.close()
            return
        magic, token = hello[:len(DEMAND_MAGIC)], hello[len(DEMAND_MAGIC):]
        m = next((m for m in list(self.migrations.values())
                  if m.demand_token and secrets.compare_digest(m.demand_token, token)), None)
        if magic not in (DEMAND_MAGIC, PUSH_MAGIC) or m is None:
            self.reporter.event("error", f"channel from {peer} with an unknown magic or token: closed")
            conn.close()
            return
        conn.settimeout(None)
        set_peer_timeout(conn, self.source_timeout)
        if magic == DEMAND_MAGIC:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            m.channels.attach_demand(conn)
        else:
            m.channels.attach_push(conn)

    def _accept_loop(self):
        while not self.closing:
            try:
                guest = self.listener.accept(timeout=0.5)
            except (TimeoutError, AttachProbe):
                continue
            except AttachError as e:
                self.reporter.event("error", f"attach refused: {e}")
                continue
            except OSError:
                if self.closing:
                    return
                raise
            with self.lock:
                busy = not self.serve_forever and self.migrations
            if busy:
                guest.nack("this destination serves one migration (start it with --serve-forever for more)")
                guest.close()
                continue
            try:
                m = Migration(guest, self.reporter, self.mode, self.prepare, self.source_timeout)
            except MigrateError as e:
                self.reporter.event("error", f"attach of pid {guest.pid} failed: {e}")
                continue
            m.start()
            with self.changed:
                self.migrations[m.id] = m
                self.changed.notify_all()
            self.reporter.event("attached", f"guest pid {guest.pid}: {fmt_size(guest.ram_size)} in "
                                f"{m.npages} pages of {fmt_size(guest.page_size)}, session {m.id}",
                                session=m.id, pid=guest.pid, ram_size=guest.ram_size, page_size=guest.page_size,
                                prepare_s=m.prepare_s)

    # -- called by the gRPC service ---------------------------------------
    def open(self, hello: pb.Hello, wait: float = 30.0) -> pb.Welcome:
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                if hello.resume_session:
                    m = self.migrations.get(hello.resume_session)
                    if m is None:
                        raise NoGuestError(f"no session {hello.resume_session} here to resume")
                    break
                free = [m for m in self.migrations.values() if m.state in WAITING
                        and (not hello.guest or m.guest.name == hello.guest)]
                if free:
                    m = free[0]
                    break
                live = [m for m in self.migrations.values() if m.state in SERVED
                        and (not hello.guest or m.guest.name == hello.guest)]
                if live and not self.serve_forever:
                    raise BusyError(f"destination is busy: migration {live[0].id} already has a source")
                left = deadline - time.monotonic()
                if left <= 0:
                    which = f"named {hello.guest!r} " if hello.guest else ""
                    raise NoGuestError(f"no guest {which}attached to {self.listener.path} within {wait:.0f} s: "
                                       "start the guest (migrate guestsim or QEMU with the shim) first")
                self.changed.wait(left)
        return m.connect(hello, self.demand_port)

    def finish(self, session_id: str, timeout: float | None) -> pb.FinishReply:
        """The source's Finish: waits up to timeout for the migration to end."""
        with self.lock:
            m = self.migrations.get(session_id)
            ended = self.ended.get(session_id)
        if m is None and ended is not None:
            return ended
        m = m or self.migration(session_id)
        m.machine.ended.wait(timeout)
        reply = m.finish_reply()
        with self.changed:
            self.answered.add(m.id)
            self.changed.notify_all()
        return reply

    def wait_answered(self, session_id: str, timeout: float) -> bool:
        """Waits until the source of session_id got a Finish reply."""
        with self.changed:
            return self.changed.wait_for(lambda: session_id in self.answered, timeout)

    def retire(self, m: Migration) -> None:
        """Drops an ended migration (serve-forever), keeping what Finish
        answers for it: its source may ask after this."""
        reply = m.finish_reply()
        with self.lock:
            self.ended[m.id] = reply
            while len(self.ended) > ENDED_KEPT:
                self.ended.pop(next(iter(self.ended)))
            self.migrations.pop(m.id, None)
            self.answered.discard(m.id)
        m.close()

    def migration(self, session_id: str) -> Migration:
        m = self.migrations.get(session_id)
        if m is None:
            raise NoGuestError(f"unknown session {session_id!r}: call Open first")
        return m

    def close(self):
        self.closing = True
        self.listener.close()
        self.demand_listener.close()
        for m in list(self.migrations.values()):
            m.close()


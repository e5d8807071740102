"""The destination agent: the process behind `migrate dest --listen`.

It takes guests as they attach (migrate.dest.attach), one `Migration` each
(migrate.dest.session), and hands each source that opens a session to the
guest it names. The gRPC servicer (migrate.dest.service) is thin and
delegates here. `run` is the agent's main loop: it watches the sources,
reports progress and each migration's end, and stops on a signal.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from migrate.dest import faultspace
from migrate.dest.attach import AttachListener
from migrate.wire.attach import AttachProbe
from migrate.wire.rawtls import RawTls, TlsError, TlsSocket
from migrate.wire.tls import TlsConfig
from migrate.errors import AttachError, MigrateError, fmt_size
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter
from migrate.wire.protocol import DEMAND_MAGIC, DEMAND_TOKEN_BYTES, PUSH_MAGIC
from migrate.wire.tcp import host_of, set_peer_timeout
from migrate.dest.session import BusyError, NoGuestError
from migrate.dest.session import Migration
from migrate.dest.state import SERVED, WAITING, NotAuthorised, Peer, StateMachine


RAW_HANDSHAKE_TIMEOUT = 10.0   # s: a raw channel's TLS handshake, before its hello
ENDED_KEPT = 64          # serve-forever: ended sessions whose Finish is still answered


def channel_identity(conn, owner: str | None) -> str | None:
    """A raw channel's peer as a session owned by owner (the identity that
    opened it over gRPC: migrate.dest.service.peer_identity) sees it: owner
    when the channel's TLS certificate carries that name, else the
    certificate's subject (which is no gRPC identity); None for a plaintext
    channel, as a plaintext gRPC peer is None. A channel joins a session only
    from the identity that opened it."""
    if not isinstance(conn, TlsSocket):
        return None
    if owner is not None and conn.peer_is(owner):
        return owner
    return conn.peer_subject()


class Destination:
    """The agent: an attach listener plus the migrations it adopted."""

    def __init__(self, attach_path: str, reporter: Reporter, *, serve_forever: bool = False,
                 mode: str = faultspace.MODE_CONTINUE, demand_host: str = "127.0.0.1", prepare: bool = True,
                 source_timeout: float = 0, tls: TlsConfig | None = None, attach_uids: tuple[int, ...] = ()):
        self.reporter = reporter
        self.tls = tls   # None: plaintext channels (loopback or --insecure)
        # the raw channels' TLS context (the credentials are loaded here: a
        # bad file fails the agent before it listens)
        self.raw_tls = RawTls(tls, server=True) if tls is not None else None
        self.prepare = prepare
        self.source_timeout = source_timeout
        self.serve_forever = serve_forever
        self.mode = mode
        self.listener = AttachListener(attach_path, attach_uids)
        self.migrations: dict[str, Migration] = {}
        # what Finish answers for migrations retired (serve-forever) before
        # their source asked, and to whom (their state machine holds the
        # tokens): the last ENDED_KEPT of them
        self.ended: dict[str, tuple[pb.FinishReply, StateMachine]] = {}
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
        self.demand_accept_thread = threading.Thread(target=self._demand_accept_loop, name="demand-accept",
                                                     daemon=True)

    def start(self) -> None:
        """Starts taking channels and attaches (after the caller reported where
        it listens)."""
        self.demand_accept_thread.start()
        self.accept_thread.start()

    def _demand_accept_loop(self):
        while not self.closing:
            try:
                conn, peer = self.demand_listener.accept()
            except OSError:
                return
            threading.Thread(target=self._demand_hello, args=(conn, peer), daemon=True).start()

    def _raw_handshake(self, conn: socket.socket, peer) -> socket.socket | None:
        """TLS first on a raw channel, when the agent has credentials: the
        hello then goes inside it. None when refused (reported, closed)."""
        try:
            conn = self.raw_tls.handshake(conn, timeout=RAW_HANDSHAKE_TIMEOUT)
        except TlsError as e:
            self.reporter.event("error", f"channel from {peer}: {e}")
            conn.close()
            return None
        who = conn.peer_subject()
        self.reporter.event("tls", f"channel from {peer}: TLS 1.3, source certificate {who}", source=who)
        return conn

    def _demand_hello(self, conn: socket.socket, peer) -> None:
        if self.raw_tls is not None and (conn := self._raw_handshake(conn, peer)) is None:
            return
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
        m = self._channel_session(token, conn)
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

    def _channel_session(self, token: bytes, conn: socket.socket) -> Migration | None:
        """The migration whose current source a raw channel's hello token
        belongs to (a dropped source's token opens nothing), when the channel
        comes from the identity that opened the session (channel_identity)."""
        for m in list(self.migrations.values()):
            if m.machine.admit(token, channel_identity(conn, m.machine.owner)) is not None:
                return m
        return None

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
    def open(self, hello: pb.Hello, peer: Peer = Peer(), wait: float = 30.0) -> pb.Welcome:
        """A source's Open (peer: who calls; errors to a peer that is not
        authenticated name nothing of the guest): the session it joins."""
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                if hello.resume_session:
                    m = self.migrations.get(hello.resume_session)
                    if m is None:
                        raise NoGuestError(f"no session {hello.resume_session} here to resume")
                    break
                named = [m for m in self.migrations.values() if not hello.guest or m.guest.name == hello.guest]
                # a session waiting for its source to come back is that
                # source's (its identity's): another peer takes a fresh guest
                free = [m for m in named if m.state in WAITING]
                mine = [m for m in free if m.machine.may_join(peer.identity)]
                if mine:
                    m = mine[0]
                    break
                if free and not self.serve_forever:
                    raise NotAuthorised("Open")
                live = [m for m in named if m.state in SERVED]
                if live and not self.serve_forever:
                    which = f"migration {live[0].id}" if peer.authenticated else "its guest"
                    raise BusyError(f"destination is busy: {which} already has a source")
                left = deadline - time.monotonic()
                if left <= 0:
                    which = f"named {hello.guest!r} " if hello.guest else ""
                    where = f"to {self.listener.path}" if peer.authenticated else "here"
                    raise NoGuestError(f"no guest {which}attached {where} within {wait:.0f} s: "
                                       "start the guest (migrate guestsim or QEMU with the shim) first")
                self.changed.wait(left)
        return m.connect(hello, self.demand_port, peer)

    def finish(self, session_id: str, token: bytes, peer: Peer, timeout: float | None) -> pb.FinishReply:
        """The source's Finish: waits up to timeout for the migration to end.
        It answers the session's sources only (their tokens, a dropped one's
        too), and only the latest source's counts as the answer the agent
        waits for before it exits."""
        with self.lock:
            m = self.migrations.get(session_id)
            ended = self.ended.get(session_id)
        if m is None and ended is not None:
            reply, machine = ended
            if machine.answers_to(token, peer.identity) is None:
                raise NotAuthorised("Finish")
            return reply
        m = m or self.migration(session_id)
        latest = m.machine.answers_to(token, peer.identity)
        if latest is None:
            raise NotAuthorised("Finish")
        final = m.machine.ended.wait(timeout)
        reply = m.finish_reply()
        if final and latest:
            # Only a reply given once the migration ended, to its latest
            # source, is the one that source waits for; an earlier Finish, or
            # one from a source that was dropped and asked how it went, must
            # not let the agent exit before the source that finishes it hears so.
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
            self.ended[m.id] = (reply, m.machine)
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


def run(reporter: Reporter, *, listen: str, attach: str, serve_forever: bool, placement: str, prealloc: bool,
        qmp: str | None, source_timeout: float, progress_every: float, attach_uids: tuple[int, ...] = (),
        tls: TlsConfig | None = None, max_device_state: int = 1 << 30) -> int:
    """`migrate dest`: serves until the migration ends (or, serve_forever,
    until SIGTERM or SIGINT). Returns the exit status: 0 when it completed, 1
    when it did not, 2 when the agent could not start."""
    from migrate.dest import service   # (it imports this module)

    rep = reporter
    try:
        agent = Destination(attach, rep, serve_forever=serve_forever, mode=placement,
                            demand_host=host_of(listen) or "127.0.0.1", prepare=prealloc,
                            source_timeout=source_timeout, attach_uids=attach_uids, tls=tls)
    except (OSError, MigrateError) as e:
        rep.event("error", f"cannot start the destination: {e}")
        return 2
    feeder = None
    if qmp:
        from migrate.qemu.dest import DeviceStateFeeder
        feeder = DeviceStateFeeder(qmp, rep, max_bytes=max_device_state)
    try:
        server, addr = service.serve(agent, listen, device_state=feeder, tls=tls)
    except (OSError, ValueError) as e:
        agent.close()
        rep.event("error", str(e))
        return 2
    rep.event("listening", f"gRPC on {addr} ({'mutual TLS' if tls else 'plaintext'}), attach socket {attach}",
              address=addr, attach=attach, tls=tls is not None)
    agent.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reported = set()
    next_progress = 0.0
    settle: dict = {}
    status = 0
    try:
        while not stop.is_set():
            for m in list(agent.migrations.values()):
                if m.machine.ended.is_set() and m.id not in reported:
                    if feeder is not None and not _device_state_settled(feeder, m, settle):
                        continue  # every page is here, but QEMU is still being resumed
                    reported.add(m.id)
                    s = m.summary()
                    if feeder is not None and m.id in feeder.feeds:
                        f = feeder.feeds[m.id]
                        s.update(guest_running=f.running, device_state_bytes=f.bytes,
                                 device_state_load_ms=round(f.load_ms, 2), resume_time=f.resume_time)
                    if serve_forever:
                        rep.event("migration", f"session {m.id} {s['state']}", **s)
                        agent.retire(m)   # its source's Finish is still answered
                        continue
                    # let the source's Finish call be answered before the server goes
                    agent.wait_answered(m.id, 5 if s["state"] == "complete" else 2)
                    rep.summary(s, _summary_text(s))
                    status = 0 if s["state"] == "complete" else 1
                    stop.set()
            for m in list(agent.migrations.values()):
                m.channels.check_source()
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + progress_every
                for m in list(agent.migrations.values()):
                    if m.t_connect is not None and not m.machine.ended.is_set():
                        rep.event("progress", **m.progress())
            stop.wait(min(0.05, progress_every))
    finally:
        server.stop(grace=1).wait(3)
        agent.close()
    return status


def _device_state_settled(feeder, m: Migration, deadlines: dict, wait: float = 60.0) -> bool:
    """With --qmp a migration is reported once its device state was fed too (or
    never came within `wait` s of the last page)."""
    if feeder.settled(m.id):
        return True
    return time.monotonic() > deadlines.setdefault(m.id, time.monotonic() + wait)


def _summary_text(s: dict) -> str:
    return (f"session {s['session']}: {s['state']}\n"
            f"  pages: {s['pages_total']} total = {s['pages_demand']} demand + {s['pages_pushed']} pushed + "
            f"{s['pages_zero']} zero ({s['pages_duplicate']} duplicates dropped)\n"
            f"  demand fault service p50 {s['fault_p50_us']} us, p99 {s['fault_p99_us']} us\n"
            f"  {s['seconds']} s from source connect to the last page" +
            (f"\n  error: {s['error']}" if s.get("error") else ""))

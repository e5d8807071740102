"""The destination agent: the process behind `migrate dest --listen`.

It takes guests as they attach (migrate.dest.attach), one `Migration` each
(migrate.dest.session), and hands each source that opens a session to the
guest it names. The gRPC servicer (migrate.dest.service) is thin and
delegates here. `run` is the agent's main loop: it watches the sources,
reports progress and each migration's end, and stops on a signal. The agent
also owns the channel port, where each source opens its demand and raw push
channels with a hello: every connection there is under a deadline and caps
(ChannelDoor), and the accept loop outlives running out of descriptors.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass

from migrate import exits
from migrate.dest import faultspace
from migrate.dest.attach import GUEST_INSTANCE_CHARS, AttachListener, StatusRequest
from migrate.wire.attach import AttachProbe
from migrate.wire.rawtls import RawTls, TlsError, TlsSocket
from migrate.wire.tls import TlsConfig
from migrate.errors import AttachError, MigrateError, ProtocolError, fmt_size
from migrate.host import fault_path_priority
from migrate.proto import migration_pb2 as pb
from migrate.report import Reporter
from migrate.wire import devstate
from migrate.wire.protocol import DEMAND_MAGIC, DEMAND_TOKEN_BYTES, DEVSTATE_MAGIC, PRECOPY_MAGIC, PUSH_MAGIC
from migrate.wire.tcp import Address, host_of, mark_urgent, set_peer_timeout
from migrate.dest.session import BusyError, NoGuestError
from migrate.dest.session import Migration
from migrate.dest.state import SERVED, WAITING, NotAuthorised, Peer, StateMachine


RAW_HANDSHAKE_TIMEOUT = 10.0   # s: a raw channel's TLS handshake, before its hello
ENDED_KEPT = 64          # serve-forever: ended sessions whose Finish is still answered
RECOVER_WAIT = 5.0       # s an Open naming its guest (Hello.resume_guest) waits for that guest to re-attach

# The channel port (the demand and raw push channels, each opened with a hello:
# a magic and a session's token): what a peer may make the agent hold there
# (STYLE.md, "Trust at the boundary").
HELLO_TIMEOUT = 10.0     # s from accept to the whole hello: a source sends it at once
HOST_CHANNELS = 16       # connections one host may hold, waiting or open: a source opens 6 (demand, 4 push, QEMU)
ALL_CHANNELS = 64        # connections every host together may hold
OUT_OF_FDS_PAUSE = 0.1   # s, out of descriptors: the most the accept loop waits for a connection, or pauses
# accept() failures that say the agent is short of something (file
# descriptors, kernel memory), not that the listener is gone
_SHORT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass(eq=False)
class PortConn:
    """A connection on the channel port: waiting for its hello, then open (a
    migration's channel, closed by its Channels)."""
    sock: socket.socket     # (a TLS handshake after accept may put the wrapped socket here)
    host: str
    port: int
    open: bool = False

    def __str__(self) -> str:
        return str(Address(self.host, self.port))


class ChannelDoor:
    """The connections on the channel port, per host: those waiting for their
    hello (oldest first) and the open channels. A new connection over a cap
    makes the one of that host (or of all) that has waited longest for its
    hello go: a source sends its hello at once, so a connection still waiting
    belongs to an idle or slow peer, and refusing the newcomer instead would
    let such peers keep a source out. Only when open channels alone fill a cap
    is the newcomer refused (only a peer holding a session's token opens
    channels)."""

    def __init__(self, host_cap: int = HOST_CHANNELS, total_cap: int = ALL_CHANNELS):
        self.host_cap, self.total_cap = host_cap, total_cap
        self.lock = threading.Lock()
        self.conns: dict[PortConn, None] = {}   # (insertion order: the oldest first)

    def admit(self, c: PortConn) -> tuple[bool, str | None]:
        """Takes c in, waiting for its hello, unless open channels fill a cap.
        Returns whether it was taken, and what to report (why it was refused,
        or which waiting connection was closed to make room)."""
        with self.lock:
            for old in [old for old in self.conns if old.open and old.sock.fileno() == -1]:
                del self.conns[old]   # a channel its migration closed
            host = [x for x in self.conns if x.host == c.host]
            host_open = sum(x.open for x in host)
            all_open = sum(x.open for x in self.conns)
            if host_open >= self.host_cap:
                return False, (f"channel from {c} refused: {c.host} has {host_open} channels open here, the most "
                               "one host may")
            if all_open >= self.total_cap:
                return False, f"channel from {c} refused: {all_open} channels are open here, the most the agent takes"
            victim = why = None
            if len(host) >= self.host_cap:
                victim = next(x for x in host if not x.open)
                why = f"{c.host} holds {len(host)} connections here, the most one host may"
            elif len(self.conns) >= self.total_cap:
                victim = next(x for x in self.conns if not x.open)
                why = f"{len(self.conns)} connections are held here, the most the agent takes"
            if victim is not None:
                del self.conns[victim]
            self.conns[c] = None
        if victim is None:
            return True, None
        _wake(victim.sock)   # its hello thread sees the end and closes it
        return True, f"channel from {victim} closed before its hello to make room for one from {c}: {why}"

    def evict_oldest(self) -> PortConn | None:
        """Closes the connection that has waited longest for its hello (the
        agent is out of file descriptors); None when none waits."""
        with self.lock:
            victim = next((x for x in self.conns if not x.open), None)
            if victim is not None:
                del self.conns[victim]
        if victim is not None:
            _wake(victim.sock)
        return victim

    def opened(self, c: PortConn) -> bool:
        """c said its hello and becomes a channel; False: it was closed
        meanwhile to make room."""
        with self.lock:
            if c not in self.conns:
                return False
            c.open = True
            return True

    def drop(self, c: PortConn) -> bool:
        """c goes before it opened a channel; False: it was closed to make
        room already (that was reported)."""
        with self.lock:
            if c not in self.conns:
                return False
            del self.conns[c]
            return True


def _wake(sock: socket.socket) -> None:
    # a shutdown, not a close: close() does not wake a thread blocked in
    # recv() on the socket, and that thread closes it
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_hello(c: PortConn, n: int, deadline: float) -> bytes:
    """n bytes of c before deadline (time.monotonic()); TimeoutError after
    it, however slowly they trickle in."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        c.sock.settimeout(left)
        chunk = c.sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed before the end of its hello")
        buf += chunk
    return buf


class Throttled:
    """Reports an event of each kind at most once every `every` s: a flood of
    refused or idle connections must not flood the agent's output (nor hold
    its threads on a slow reader of it). The next one reported says how many
    were left out."""

    def __init__(self, reporter: Reporter, every: float = 1.0):
        self.reporter = reporter
        self.every = every
        self.lock = threading.Lock()
        self.last: dict[str, tuple[float, int]] = {}   # kind -> (reported at, left out since)

    def event(self, kind: str, event: str, message: str, **fields) -> None:
        now = time.monotonic()
        with self.lock:
            at, left_out = self.last.get(kind, (-self.every, 0))
            if now - at < self.every:
                self.last[kind] = (at, left_out + 1)
                return
            self.last[kind] = (now, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {now - at:.0f} s)"
        self.reporter.event(event, message, left_out=left_out, **fields)


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
                 source_timeout: float = 0, tls: TlsConfig | None = None, attach_uids: tuple[int, ...] = (),
                 record_hints: str | None = None):
        self.reporter = reporter
        self.record_hints = record_hints   # dest --record-hints FILE
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
        self.listen = ""                  # where gRPC listens, once it does (for status)
        self.vcpu_threads = lambda: {}    # guest thread id -> vCPU index (QEMU's, with --qmp)
        self.device_state = None          # migrate.qemu.dest.DeviceStateFeeder with --qmp: takes device-state channels
        self.ended_states: dict[str, int] = {}   # migrations retired, by their status state (metrics)
        self.retired: dict[str, dict] = {}       # the last ENDED_KEPT retired migrations' final metrics
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
        self.demand_listener.listen(128)
        self.demand_port = self.demand_listener.getsockname()[1]
        self.door = ChannelDoor()
        self.quiet = Throttled(reporter)
        # kept to give up when accept() finds no file descriptor, so that one
        # waiting connection can still be taken and closed (see _out_of_fds)
        self.spare_fd: int | None = _reserve_fd()
        self.demand_accept_thread = threading.Thread(target=self._demand_accept_loop, name="demand-accept",
                                                     daemon=True)

    def start(self) -> None:
        """Starts taking channels and attaches (after the caller reported where
        it listens)."""
        self.demand_accept_thread.start()
        self.accept_thread.start()

    def _demand_accept_loop(self):
        """Takes connections on the channel port until close(). A connection
        gets a thread of its own for its hello (at most ALL_CHANNELS wait at
        once: ChannelDoor); the loop outlives every failure of accept() but
        the listener's own end."""
        while not self.closing:
            if self.spare_fd is None:
                self.spare_fd = _reserve_fd()
            try:
                conn, peer = self.demand_listener.accept()
            except OSError as e:
                if self.closing or e.errno in (errno.EBADF, errno.EINVAL):
                    return   # the listener was closed
                if e.errno in _SHORT_ERRNOS:
                    self._out_of_fds(e)
                # else a connection that failed before it was taken (accept(2)
                # passes its network errors on): the next one may do
                continue
            self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer) -> bool:
        """Starts the hello of a new connection, unless ChannelDoor refuses it."""
        c = PortConn(conn, _host(peer[0]), peer[1])
        taken, note = self.door.admit(c)
        if note:
            self.quiet.event("refused" if not taken else "made-room", "error", note, peer=str(c))
        if not taken:
            conn.close()
            return False
        threading.Thread(target=self._demand_hello, args=(c,), name="channel-hello", daemon=True).start()
        return True

    def _out_of_fds(self, e: OSError) -> None:
        """accept() found no file descriptor (or memory). accept(2) takes the
        descriptor before it looks at the queue, so this says nothing yet
        about a connection waiting: first wait a little for one. The spare
        descriptor kept for this is given up to take it: it replaces the
        connection that has waited longest for its hello, or, when none
        waits, it is closed unheard (its peer hears so rather than hanging in
        a full queue). The loop takes the spare again as soon as a descriptor
        is free."""
        poll = select.poll()
        poll.register(self.demand_listener, select.POLLIN)
        if not poll.poll(OUT_OF_FDS_PAUSE * 1000):
            return   # nobody waits
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        what = f"channel port: out of file descriptors ({os.strerror(e.errno)}; ulimit -n is {soft})"
        advice = "raise the limit (ulimit -n, or LimitNOFILE= of its systemd unit)"
        conn = None
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            self.demand_listener.setblocking(False)   # (the connection may have gone meanwhile)
            try:
                conn, peer = self.demand_listener.accept()
            except OSError:
                pass   # gone, or another thread of the agent took the descriptor first
            finally:
                self.demand_listener.setblocking(True)
        if conn is None:
            self.quiet.event("out-of-fds", "error", f"{what}: connections wait in the listen queue; {advice}")
            time.sleep(OUT_OF_FDS_PAUSE)
            return
        newcomer = Address(_host(peer[0]), peer[1])
        victim = self.door.evict_oldest()
        if victim is None:
            conn.close()
            self.quiet.event("out-of-fds", "error", f"{what}: a connection from {newcomer} was closed unheard; "
                             f"{advice}", peer=str(newcomer))
            time.sleep(OUT_OF_FDS_PAUSE)
            return
        self.quiet.event("out-of-fds", "error", f"{what}: the connection from {victim} that waited longest for its "
                         f"hello was closed for one from {newcomer}", peer=str(newcomer))
        self._admit(conn, peer)

    def _raw_handshake(self, c: PortConn, deadline: float) -> bool:
        """TLS first on a raw channel, when the agent has credentials (within
        RAW_HANDSHAKE_TIMEOUT and the hello's deadline): c.sock becomes the
        TLS socket and the hello goes inside it. False when refused (reported,
        closed)."""
        try:
            c.sock = self.raw_tls.handshake(c.sock, timeout=max(0.0, min(RAW_HANDSHAKE_TIMEOUT,
                                                                         deadline - time.monotonic())))
        except TlsError as e:
            c.sock.close()
            if self.door.drop(c):
                self.reporter.event("error", f"channel from {c}: {e}", peer=str(c))
            return False
        who = c.sock.peer_subject()
        self.reporter.event("tls", f"channel from {c}: TLS 1.3, source certificate {who}", source=who)
        return True

    def _demand_hello(self, c: PortConn) -> None:
        """What follows accept, on a thread of its own: the hello (magic and
        token) within HELLO_TIMEOUT of the accept, then the connection becomes
        a channel of the migration whose token it named. A TLS handshake goes
        here too, before the hello and under the same deadline."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        # (a connection that goes is closed before it leaves the door: the
        # door's waiting connections are never fewer than the descriptors
        # they hold, which is what _out_of_fds counts on)
        if self.raw_tls is not None and not self._raw_handshake(c, deadline):
            return
        try:
            hello = _read_hello(c, len(DEMAND_MAGIC) + DEMAND_TOKEN_BYTES, deadline)
        except OSError as e:
            c.sock.close()
            if self.door.drop(c):   # (else it was closed to make room, and that was reported)
                if isinstance(e, TimeoutError):
                    self.quiet.event("hello-late", "error", f"channel from {c}: no hello within "
                                     f"{HELLO_TIMEOUT:g} s of connecting: closed", peer=str(c))
                else:
                    self.quiet.event("hello-failed", "error", f"channel from {c}: {e.strerror or e}", peer=str(c))
            return
        magic, token = hello[:len(DEMAND_MAGIC)], hello[len(DEMAND_MAGIC):]
        m, gen = self._channel_session(token, c.sock)
        if magic not in (DEMAND_MAGIC, PUSH_MAGIC, DEVSTATE_MAGIC, PRECOPY_MAGIC) or m is None:
            c.sock.close()
            self.door.drop(c)
            self.quiet.event("bad-hello", "error", f"channel from {c} with an unknown magic or token: closed",
                             peer=str(c))
            return
        if not self.door.opened(c):
            c.sock.close()   # closed to make room meanwhile (reported)
            return
        conn = c.sock
        conn.settimeout(None)
        set_peer_timeout(conn, self.source_timeout)
        if magic == DEMAND_MAGIC:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mark_urgent(conn)   # requests (and the acks of replies) ahead of push acks on the way back
            why = None if m.channels.attach_demand(conn, gen) else (
                "its source holds a demand channel already, waiting for its switch"
                if m.machine.serves(gen) and m.channels.held_demand(gen) else "its source is no longer this session's")
        elif magic == DEVSTATE_MAGIC:
            why = self._device_state_channel(m, gen, conn)
        elif magic == PRECOPY_MAGIC:
            why = m.channels.attach_precopy(conn, gen)
        else:
            why = m.channels.attach_push(conn, gen)
        if why is not None:
            kind = {DEMAND_MAGIC: "demand", PUSH_MAGIC: "push", PRECOPY_MAGIC: "pre-copy",
                    DEVSTATE_MAGIC: "device-state"}[magic]
            self.quiet.event("channel-refused", "error", f"{kind} "
                             f"channel from {c} refused: {why}", session=m.id, peer=str(c))
            conn.close()

    def _device_state_channel(self, m: Migration, gen: int, conn: socket.socket) -> str | None:
        """The session's device-state channel goes to its QEMU's feeder; why
        not, when refused (said on the channel too: its peer holds the
        session's token), the caller closes it."""
        if self.device_state is None:
            why = "this destination was started without --qmp: it takes no device state"
        elif not m.machine.serves(gen):
            why = "its source is no longer this session's"
        else:
            why = self.device_state.take_channel(m, conn, gen)
        if why is not None:
            try:
                conn.settimeout(1)
                devstate.say(conn, refused=why)
            except OSError:
                pass
        return why

    def _channel_session(self, token: bytes, conn: socket.socket) -> tuple[Migration | None, int]:
        """The migration whose current source a raw channel's hello token
        belongs to (a dropped source's token opens nothing), when the channel
        comes from the identity that opened the session (channel_identity),
        and that source's generation; (None, 0) for none."""
        for m in list(self.migrations.values()):
            gen = m.machine.admit(token, channel_identity(conn, m.machine.owner))
            if gen is not None:
                return m, gen
        return None, 0

    def _accept_loop(self):
        # A guest waits for this thread inside mmap (QEMU), and its faults for
        # the threads it starts (they inherit the priority): at the default
        # priority an attach took 85 ms once on a host at load 14, waiting
        # for CPUs.
        fault_path_priority()
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
            if isinstance(guest, StatusRequest):
                guest.answer(self.status())
                continue
            with self.lock:
                busy = not self.serve_forever and self.migrations
            if busy:
                guest.nack("this destination serves one migration (start it with --serve-forever for more)")
                guest.close()
                continue
            try:
                m = Migration(guest, self.reporter, self.mode, self.prepare, self.source_timeout,
                              record_hints=self.record_hints)
            except MigrateError as e:
                self.reporter.event("error", f"attach of pid {guest.pid} failed: {e}")
                continue
            m.vcpu_threads = lambda: self.vcpu_threads()
            m.start()
            with self.changed:
                self.migrations[m.id] = m
                self.changed.notify_all()
            self.reporter.event("attached", f"guest pid {guest.pid}: {fmt_size(guest.ram_size)} in "
                                f"{m.npages} pages of {fmt_size(guest.page_size)}, session {m.id}, acked in "
                                f"{m.ack_ms} ms", session=m.id, pid=guest.pid, ram_size=guest.ram_size,
                                page_size=guest.page_size, ack_ms=m.ack_ms, allocating=m.alloc is not None)
            m.allocate()

    # -- called by the gRPC service ---------------------------------------
    def open(self, hello: pb.Hello, peer: Peer = Peer(), wait: float = 30.0) -> pb.Welcome:
        """A source's Open (peer: who calls; errors to a peer that is not
        authenticated name nothing of the guest): the session it joins."""
        if hello.resume_guest:
            # a recovering source tries again by itself, and hears sooner why not
            wait = min(wait, RECOVER_WAIT)
        deadline = time.monotonic() + wait
        if len(hello.resume_guest) > GUEST_INSTANCE_CHARS:
            raise ProtocolError(f"Hello.resume_guest has {len(hello.resume_guest)} characters: a guest instance "
                                f"(Welcome.guest_instance) has {GUEST_INSTANCE_CHARS}")
        with self.changed:
            while True:
                if hello.resume_guest:
                    m = self._recovered(hello, peer)
                    if m is not None:
                        break
                elif hello.resume_session:
                    m = self.migrations.get(hello.resume_session)
                    if m is None:
                        raise NoGuestError(f"no session {hello.resume_session} here to resume")
                    break
                named = [] if hello.resume_guest else \
                    [m for m in self.migrations.values() if not hello.guest or m.guest.name == hello.guest]
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
                if left <= 0 and hello.resume_guest:
                    # (the restarted agent of a guest that has not re-attached
                    # yet: its source tries again)
                    raise NoGuestError(f"the guest of the session this source recovers is not attached "
                                       f"{'to ' + self.listener.path if peer.authenticated else 'here'} (yet): "
                                       "it re-attaches by itself once its agent runs again")
                if left <= 0:
                    which = f"named {hello.guest!r} " if hello.guest else ""
                    where = f"to {self.listener.path}" if peer.authenticated else "here"
                    raise NoGuestError(f"no guest {which}attached {where} within {wait:.0f} s: "
                                       "start the guest (migrate guestsim or QEMU with the shim) first")
                self.changed.wait(left)
        return m.connect(hello, self.demand_port, peer)

    def _recovered(self, hello: pb.Hello, peer: Peer) -> Migration | None:
        """The migration a recovering source (Hello.resume_guest) serves: the
        session it names, on the agent that opened it, else the one of the
        guest it names, re-attached to this (restarted) agent; None while that
        guest is not attached here. Never another guest: its RAM is not this
        source's. Caller holds self.lock."""
        m = self.migrations.get(hello.resume_session) if hello.resume_session else None
        if m is None:
            m = next((x for x in self.migrations.values() if x.instance == hello.resume_guest), None)
        if m is not None and m.instance != hello.resume_guest:
            which = f"session {m.id}" if peer.authenticated else "that session"
            raise ProtocolError(f"{which} serves another guest than the one this source recovers")
        return m

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
        view = self._metrics_view(m)
        with self.lock:
            self.ended_states[view["state"]] = self.ended_states.get(view["state"], 0) + 1
            self.retired[m.id] = view
            while len(self.retired) > ENDED_KEPT:
                self.retired.pop(next(iter(self.retired)))
            self.ended[m.id] = (reply, m.machine)
            while len(self.ended) > ENDED_KEPT:
                self.ended.pop(next(iter(self.ended)))
            self.migrations.pop(m.id, None)
            self.answered.discard(m.id)
        m.close()

    def status(self, recent: int = 0) -> dict:
        """What `migrate status` shows (migrate.status): the agent, and each
        migration it holds (an ended one until it is retired)."""
        with self.lock:
            ms = list(self.migrations.values())
        return {"role": "dest", "pid": os.getpid(), "listen": self.listen, "attach": self.listener.path,
                "migrations": [m.snapshot(recent) for m in ms], "ended": dict(self.ended_states)}

    def status_for(self, identity: str | None) -> dict:
        """status() as told over gRPC to identity (None: a plaintext peer on
        loopback, which is told everything, as a local user is): the
        migrations it opened and the guests nobody has opened yet, and not
        where the attach socket is."""
        s = self.status()
        if identity is not None:
            with self.lock:
                owners = {m.id: m.machine.owner for m in self.migrations.values()}
            s["migrations"] = [m for m in s["migrations"]
                               if m["session"] in owners and owners[m["session"]] in (identity, None)]
            s.pop("attach")
            s.pop("ended")
        return s

    def _metrics_view(self, m: Migration) -> dict:
        view = m.snapshot(recent=1)
        m.latency.update(m.space)
        view["latency"] = m.latency.buckets()
        return view

    def metrics_views(self) -> tuple[str, list[dict], dict]:
        """What a metrics scrape reads (migrate.metrics): every migration held
        and the last retired ones; retired ones are counted by state in
        ended, except those listed (which count by their own state)."""
        with self.lock:
            ms = list(self.migrations.values())
            retired = list(self.retired.values())
            ended = dict(self.ended_states)
        for v in retired:
            ended[v["state"]] -= 1
        return "dest", [self._metrics_view(m) for m in ms] + retired, ended

    def migration(self, session_id: str) -> Migration:
        m = self.migrations.get(session_id)
        if m is None:
            raise NoGuestError(f"unknown session {session_id!r}: call Open first")
        return m

    def close(self):
        self.closing = True
        self.listener.close()
        self.demand_listener.close()
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        for m in list(self.migrations.values()):
            m.close()


def _reserve_fd() -> int | None:
    """A descriptor held in reserve for accept() to use when none is left."""
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _host(addr: str) -> str:
    """A peer's address as ChannelDoor counts it: an IPv4 peer of a
    dual-stack (IPv6) listener as the IPv4 address it is."""
    return addr.removeprefix("::ffff:") if "." in addr else addr


def run(reporter: Reporter, *, listen: str, attach: str, serve_forever: bool, placement: str, prealloc: bool,
        qmp: str | None, source_timeout: float, progress_every: float, attach_uids: tuple[int, ...] = (),
        tls: TlsConfig | None = None, max_device_state: int = 1 << 30, metrics_listen: str | None = None,
        insecure: bool = False, record_hints: str | None = None) -> int:
    """`migrate dest`: serves until the migration ends (or, serve_forever,
    until SIGTERM or SIGINT). Returns the exit status (migrate.exits):
    COMPLETED when it completed or a signal stopped the agent, GUEST_LOST
    when its guest went away, FAILED when it did not complete otherwise,
    USAGE when the agent could not start."""
    from migrate.dest import service   # (it imports this module)
    from migrate.notify import Notifier

    rep = reporter
    rep.listeners.append(Notifier("dest"))
    try:
        agent = Destination(attach, rep, serve_forever=serve_forever, mode=placement,
                            demand_host=host_of(listen) or "127.0.0.1", prepare=prealloc,
                            source_timeout=source_timeout, attach_uids=attach_uids, tls=tls,
                            record_hints=record_hints)
    except (OSError, MigrateError) as e:
        rep.event("error", f"cannot start the destination: {e}")
        return exits.USAGE
    feeder = None
    if qmp:
        from migrate.qemu.dest import DeviceStateFeeder
        feeder = DeviceStateFeeder(qmp, rep, max_bytes=max_device_state)
    try:
        server, addr = service.serve(agent, listen, device_state=feeder, tls=tls)
    except (OSError, ValueError) as e:
        agent.close()
        rep.event("error", str(e))
        return exits.USAGE
    agent.listen = addr
    if feeder is not None:
        agent.vcpu_threads = lambda: feeder.vcpu_threads
        agent.device_state = feeder
    extras = _observers(agent, rep, metrics_listen, tls, insecure)
    if extras is None:
        server.stop(grace=0)
        agent.close()
        return exits.USAGE
    rep.event("listening", f"gRPC on {addr} ({'mutual TLS' if tls else 'plaintext'}), attach socket {attach}",
              address=addr, attach=attach, tls=tls is not None, channel_port=agent.demand_port,
              **({"metrics": extras[0].address} if extras and extras[0] else {}))
    agent.start()
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, _frame):
        signalled.append(signum)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
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
                                 device_state_load_ms=round(f.load_ms, 2), resume_time=f.resume_time,
                                 switchover={k: round(v, 6) for k, v in f.times.items()})
                    if serve_forever:
                        rep.event("migration", f"session {m.id} {s['state']}", **s)
                        agent.retire(m)   # its source's Finish is still answered
                        # A migration's objects refer to each other (its
                        # channels, its threads' targets), so only the cyclic
                        # collector frees them, with the C buffers they own
                        # (4 MiB of fault latencies each): left to its own
                        # pace, a long-lived agent grew 4 MiB a migration.
                        gc.collect()
                        continue
                    # let the source's Finish call be answered before the server goes
                    agent.wait_answered(m.id, 5 if s["state"] == "complete" else 2)
                    rep.summary(s, _summary_text(s))
                    status = exits.COMPLETED if s["state"] == "complete" else \
                        exits.GUEST_LOST if m.guest_lost else exits.FAILED
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
        if signalled:
            _report_stopped(rep, signalled[0], agent)
    finally:
        for x in extras:
            if x is not None:
                x.close()
        server.stop(grace=1).wait(3)
        agent.close()
    return status


def _report_stopped(rep: Reporter, signum: int, agent: Destination) -> None:
    """A signal stops the agent (a clean end: exit 0, which systemd's
    Restart=on-failure leaves stopped): what becomes of the migrations it
    serves."""
    left = [m for m in agent.migrations.values() if not m.machine.ended.is_set()]
    sessions = ", ".join(m.id for m in left)
    rep.event("stopped", f"stopped by {signal.Signals(signum).name}" + (
        f": session {sessions} not finished; its guest keeps its pages and waits, and re-attaches to the next "
        f"agent started on {agent.listener.path}; its source (within its --recovery-window) resumes there"
        if left else ""), signal=signal.Signals(signum).name, sessions=[m.id for m in left])


def _observers(agent: Destination, rep: Reporter, metrics_listen: str | None, tls, insecure: bool):
    """[the metrics server or None, the terminal's progress line or None],
    started; None when --metrics-listen cannot be served (reported)."""
    from migrate.status import ProgressTicker
    metrics = None
    if metrics_listen:
        from migrate.metrics import MetricsError, MetricsServer
        try:
            metrics = MetricsServer(metrics_listen, agent.metrics_views, tls, insecure).start()
        except MetricsError as e:
            rep.event("error", str(e))
            return None
    ticker = None
    if ProgressTicker.wanted():
        def line():
            live = [m for m in list(agent.migrations.values())
                    if m.t_connect is not None and not m.machine.ended.is_set()]
            return live[0].snapshot(recent=4096) if live else None
        ticker = ProgressTicker(rep, line).start()
    return [metrics, ticker]


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
            f"  demand fault service p50 {s['fault_p50_us']} us, p99 {s['fault_p99_us']} us\n" +
            "".join(f"  {'vCPU ' + str(v['vcpu']) if v['vcpu'] is not None else 'thread ' + str(v['tid'])}: "
                    f"blocked {v['blocked_s']} s over {v['faults']} faults\n" for v in s.get("vcpus") or ()) +
            f"  {s['seconds']} s from source connect to the last page" +
            (f"\n  error: {s['error']}" if s.get("error") else ""))

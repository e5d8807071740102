"""The plain TCP channels of the source serving a migration (proto/README.md):
one demand channel, whose requests go out from the fault loop in C and whose
replies a receiver thread places, and the raw push channels, each with a
receiver thread placing runs. Here is how a channel ends (one classifier,
migrate.wire.tcp.channel_end) and the one rule for what a source sends: bad
input drops that source, a kernel failure fails the migration.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from migrate._binding import ffi, lib
from migrate.dest.state import State
from migrate.errors import MigrateError, ProtocolError
from migrate.host import background_priority, fault_path_priority
from migrate.wire.tcp import Address, ChannelEnd, channel_end, tcp_bytes_received, tcp_silent_s

if TYPE_CHECKING:
    from migrate.dest.session import Migration

DEMAND_CONNECT_TIMEOUT = 15.0
PUSH_STREAMS = 4                    # push streams a Welcome offers a source
PUSH_CHANNELS = 2 * PUSH_STREAMS    # raw push channels a source may hold open
HELD_DEMAND = 1     # demand channels a pre-copy source may hold open before its switch


@contextlib.contextmanager
def taking_pages(m: Migration, gen: int, *, bad: str, placing: str, reraise: bool = False):
    """Around placing what source gen sent: bad input (a ProtocolError: the
    source lied or sent garbage) drops that source, and another may resume;
    any other failure (a kernel call placing a page) fails the migration.
    bad and placing begin the messages of each. reraise: the caller (a gRPC
    handler) still needs the exception."""
    try:
        yield
    except ProtocolError as e:
        m.reporter.event("error", f"{bad}: {e}", session=m.id)
        m.source_lost(gen, str(e))
        if reraise:
            raise
    except MigrateError as e:
        m.fail(f"{placing}: {e}", e)
        if reraise:
            raise


class Channels:
    """The demand and raw push channels of a migration's sources, each tagged
    with the generation of the source that opened it, and their receivers.
    Owns the sockets until close()."""

    def __init__(self, m: Migration):
        self.m = m
        self.lock = threading.Lock()
        self.demand: socket.socket | None = None   # the current source's demand channel
        self.demand_gen = 0
        self.push: dict[socket.socket, int] = {}   # push channel -> its source's generation
        self.t_demand_ns = 0                 # the current demand channel opened (time.monotonic_ns)
        self.t_push: float | None = None     # the first push channel opened
        # the latest source's deadline for its demand channel: cancelled once
        # the channel opens (a timer left to run out held a thread for 15 s
        # after every Open, and a long-lived agent grew by one per migration)
        self.demand_timer: threading.Timer | None = None
        # the receiver threads still running: joined when the migration is
        # torn down, so that it is gone (with its C buffers) once it ended
        self.receivers: list[threading.Thread] = []
        self.taking = True    # False once the migration is torn down: no receiver starts after
        self.bytes_closed = 0                # bytes received on channels closed since (tcp_info)
        # A pre-copy source opens its channels before its switch, so that the
        # guest's pause does not include connecting them: they are held here,
        # nothing read from them and nothing sent on them, until the switch
        # releases them (release_held); then they are attached as if just
        # opened. (socket, gen, is_demand), owned here until then.
        self.held: list[tuple[socket.socket, int, bool]] = []
        self.released_gen = 0                # the pre-copy source whose switch released its channels
        # the raw pre-copy channel of the current pre-copy source (one: a page's
        # copies then arrive in the order they were sent) and its receiver
        self.precopy: tuple[socket.socket, int, threading.Thread] | None = None

    def watch_demand_deadline(self, gen: int, since: str = "Open") -> None:
        """A source that never opens its demand channel is not serving this
        guest. since: what it was due after (Open, or pre-copy's end)."""
        timer = threading.Timer(DEMAND_CONNECT_TIMEOUT, self._demand_deadline, (gen, since))
        timer.daemon = True
        with self.lock:
            old, self.demand_timer = self.demand_timer, timer
        if old is not None:
            old.cancel()
        timer.start()

    def cancel_demand_deadline(self) -> None:
        """(A pre-copy source's stream is open: migrate.dest.precopy.)"""
        self._cancel_demand_deadline()

    def _cancel_demand_deadline(self) -> None:
        with self.lock:
            timer, self.demand_timer = self.demand_timer, None
        if timer is not None:
            timer.cancel()

    def _demand_deadline(self, gen: int, since: str = "Open") -> None:
        if self.demand is None and gen == self.m.machine.source_gen:
            self.m.source_lost(gen, f"no demand channel within {DEMAND_CONNECT_TIMEOUT:.0f} s of {since}")

    def attach_demand(self, sock: socket.socket, gen: int) -> bool:
        """The demand channel of source gen (the one whose token its hello
        carried): requests go out on it from the fault loop (C), replies are
        placed by a C receiver thread. False when that source is no longer
        the session's (dropped or replaced since its hello was checked): the
        caller closes the channel."""
        m = self.m
        with self.lock:
            if not self.taking or not m.machine.serves(gen):
                return False
            if self._held_back(gen):
                if sum(g == gen and d for _, g, d in self.held) >= HELD_DEMAND:
                    return False
                self.held.append((sock, gen, True))
                return True
            old, self.demand, self.demand_gen = self.demand, sock, gen
        if old is not None:
            old.close()
        self.t_demand_ns = time.monotonic_ns()
        self._cancel_demand_deadline()
        try:
            m.peer_address = str(Address(*sock.getpeername()[:2]))   # (for status)
        except OSError:
            pass
        resent = m.space.set_demand_fd(sock.fileno())
        m.reporter.event("demand", f"demand channel open ({resent} outstanding requests sent again)",
                         session=m.id, resent=resent)
        if m.machine.switch_over(gen):
            # the guest may run now: every fault it takes has a source to go to
            m.guest.notify("switchover")
            if m.space.received_count == m.npages:
                m.complete()   # pre-copy brought every page and none was written since
                return True    # (nothing is left to ask for: the channel closes with the migration)
        return self._start(threading.Thread(target=self._demand_rx, args=(sock, gen), name=f"demand-rx-{m.id}",
                                            daemon=True))

    def attach_push(self, sock: socket.socket, gen: int) -> str | None:
        """A raw push channel of source gen: runs land in the alias from C.
        Why not, when it is refused (the caller closes it): the source is no
        longer the session's, or has PUSH_CHANNELS open already (each holds
        a descriptor and a thread)."""
        with self.lock:
            if not self.taking:
                return "its migration has ended"
            if not self.m.machine.serves(gen):
                return "its source is no longer this session's"
            if sum(g == gen for g in self.push.values()) + sum(g == gen and not d for _, g, d in self.held) \
                    >= PUSH_CHANNELS:
                return f"its source has {PUSH_CHANNELS} push channels open already, the most a source may"
            if self._held_back(gen):
                self.held.append((sock, gen, False))
                return None
            self.push[sock] = gen
            if self.t_push is None:
                self.t_push = time.monotonic()
        if not self._start(threading.Thread(target=self._push_rx, args=(sock, gen), name=f"push-rx-{self.m.id}",
                                            daemon=True)):
            with self.lock:
                self.push.pop(sock, None)
            return "its migration has ended"
        return None

    def attach_precopy(self, sock: socket.socket, gen: int) -> str | None:
        """The raw pre-copy channel of source gen: its runs are written into
        the page cache only, from C, until the source ends it (then the
        destination answers with the pages it wrote, 8 bytes little-endian)
        or its Switch. Why not, when refused (the caller closes it)."""
        m = self.m
        with self.lock:
            if not m.machine.serves(gen):
                return "its source is no longer this session's"
            if m.precopy is None or m.precopy.switched or self.released_gen == gen:
                return "its source is not in pre-copy: a pre-copy channel opens between a pre-copy Open and its Switch"
            if self.precopy is not None:
                return "its source has a pre-copy channel open already (one: its pages must arrive in order)"
            t = threading.Thread(target=self._precopy_rx, args=(sock, gen), name=f"precopy-rx-{m.id}", daemon=True)
            self.precopy = (sock, gen, t)
        self._cancel_demand_deadline()   # while it is open the source is there (its end drops it)
        self._start(t)
        return None

    def _precopy_rx(self, sock: socket.socket, gen: int) -> None:
        m = self.m
        p = m.precopy
        # (pre-copy takes the CPU from nothing that waits: the source guest,
        # on the same host in the lab, runs ahead of it)
        background_priority()
        pages = ffi.new("uint64_t *")
        with taking_pages(m, gen, bad="bad pre-copy run", placing="writing pre-copy pages"):
            rc = m.space.precopy_receive(p.staged, sock.fileno(), m.stop_fd, pages)
            p.pages_in += int(pages[0])
            if rc == 0 and m.machine.serves(gen):
                try:   # all of it is in the page cache: the source may switch
                    sock.sendall(int(pages[0]).to_bytes(8, "little"))
                except OSError:
                    pass
                # a source switches right after its channel's end; one that
                # never does is not serving this guest
                self.watch_demand_deadline(gen, "the end of pre-copy")
            elif rc != -errno.ESHUTDOWN:
                why = self._silent_why("pre-copy", -rc) if channel_end(rc) is ChannelEnd.PEER_LOST else \
                    f"the pre-copy channel ended before its source ended it ({os.strerror(-rc) if rc else 'closed'})"
                m.source_lost(gen, why)
        with self.lock:
            if self.precopy is not None and self.precopy[0] is sock:
                self.precopy = None
            self.bytes_closed += tcp_bytes_received(sock)
        sock.close()

    def end_precopy(self, gen: int, timeout: float = 10.0) -> None:
        """Before the switch commits: the pre-copy channel of source gen is
        shut and its receiver waited for, so that no page changes under the
        commit (a source that switches has ended it already)."""
        with self.lock:
            ch = self.precopy
        if ch is None or ch[1] != gen:
            return
        sock, _, t = ch
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        t.join(timeout)
        if t.is_alive():
            raise MigrateError(f"the pre-copy channel's receiver did not stop within {timeout:g} s of the Switch")

    def _held_back(self, gen: int) -> bool:
        """Source gen is in pre-copy and its switch has not released its
        channels yet: they wait (called with the lock held)."""
        return self.m.precopy is not None and self.released_gen != gen

    def held_demand(self, gen: int) -> bool:
        """Source gen holds a demand channel, waiting for its switch."""
        with self.lock:
            return any(g == gen and d for _, g, d in self.held)

    def release_held(self, gen: int) -> None:
        """Source gen switched: the channels it opened before are attached
        (the demand channel releases the guest), and later ones go straight."""
        with self.lock:
            self.released_gen = gen
            mine = [h for h in self.held if h[1] == gen]
            self.held = [h for h in self.held if h[1] != gen]
        # push first: the guest runs once the demand channel is attached, and
        # the pages it lacks are pushed from then on
        for sock, g, demand in sorted(mine, key=lambda h: h[2]):
            ok = self.attach_demand(sock, g) if demand else self.attach_push(sock, g) is None
            if not ok:
                sock.close()

    def start_receiver(self, t: threading.Thread) -> bool:
        """Starts a thread that places or maps pages (joined at teardown)."""
        return self._start(t)

    def _start(self, t: threading.Thread) -> bool:
        """Starts a receiver, unless the migration is being torn down (False):
        started under the lock, so that join() never finds one listed and not
        started (that raised, and a --serve-forever agent retiring a migration
        whose late push channel was just taken exited), and none starts on a
        migration whose memory is going."""
        with self.lock:
            if not self.taking:
                return False
            self.receivers = [r for r in self.receivers if r.is_alive()]
            self.receivers.append(t)
            t.start()
        return True

    def stop_taking(self) -> None:
        """The migration is being torn down: channels opened from now on are
        refused, and no receiver starts."""
        with self.lock:
            self.taking = False

    def join(self, timeout: float) -> None:
        """Waits (up to timeout s in all) for the receivers to end: the
        caller has told them to stop (the migration's stop_fd)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            receivers = list(self.receivers)
        for t in receivers:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _push_rx(self, sock: socket.socket, gen: int) -> None:
        m = self.m
        with taking_pages(m, gen, bad="bad push run", placing="placing pushed pages"):
            rc = m.space.push_receive(sock.fileno(), m.stop_fd)
            if rc == lib.MG_DEMAND_COMPLETE:
                m.complete()
            elif channel_end(rc) is ChannelEnd.PEER_LOST:
                m.source_lost(gen, self._silent_why("push", -rc))
        with self.lock:
            self.push.pop(sock, None)
            self.bytes_closed += tcp_bytes_received(sock)
        sock.close()

    def _demand_rx(self, sock: socket.socket, gen: int) -> None:
        m = self.m
        fault_path_priority()
        why = "demand channel closed"
        with taking_pages(m, gen, bad="bad demand reply", placing="placing a demand reply"):
            rc = m.space.demand_receive(sock.fileno(), m.stop_fd)
            if rc == lib.MG_DEMAND_COMPLETE:
                m.complete()
            elif channel_end(rc) is ChannelEnd.PEER_LOST:
                why = self._silent_why("demand", -rc)
        with self.lock:
            mine = self.demand is sock
            if mine:
                self.demand = None
                self.bytes_closed += tcp_bytes_received(sock)
        if mine:
            m.space.set_demand_fd(-1)
            sock.close()
        m.source_lost(gen, why)   # (nothing to lose once it ended or another source took over)

    def _silent_why(self, channel: str, err: int) -> str:
        return (f"the {channel} channel timed out ({os.strerror(err)}): nothing came from the source's host for "
                f"--source-timeout {self.m.source_timeout:g} s, not even an answer to a probe (it is down, or the "
                "network between split)")

    def shut(self, gen: int) -> None:
        """Shuts the channels of source gen: their receivers see the end and
        let go of what they claimed (they close the sockets)."""
        with self.lock:
            socks = [s for s, g in ((self.demand, self.demand_gen), *self.push.items()) if s is not None and g == gen]
            held = [s for s, g, _ in self.held if g == gen]
            self.held = [h for h in self.held if h[1] != gen]
            if self.precopy is not None and self.precopy[1] == gen:
                socks.append(self.precopy[0])   # (its receiver closes it)
            self.bytes_closed += sum(tcp_bytes_received(s) for s in held)
        for s in held:   # (no receiver reads them: closed here)
            s.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check_source(self) -> None:
        """A source that leaves a vCPU's page unanswered for source_timeout
        seconds while nothing at all arrives on its demand channel is taken as
        lost (the process hangs on a live host, whose kernel still acknowledges
        everything; a dead host or a split network the kernel notices itself,
        see migrate.wire.tcp.set_peer_timeout) and its channels are shut, so
        the next source can resume. A reply still streaming in (a large page
        on a slow link) is progress. source_timeout <= 0: never."""
        m = self.m
        timeout = m.source_timeout
        with self.lock:
            sock, gen = self.demand, self.demand_gen
        if timeout <= 0 or sock is None or m.machine.state not in (State.CONNECTED, State.SWITCHED_OVER):
            return
        oldest = m.space.oldest_request_ns()
        if not oldest:
            return
        waited = (time.monotonic_ns() - max(oldest, self.t_demand_ns)) / 1e9
        silent = tcp_silent_s(sock)
        if waited < timeout or silent is None or silent < timeout:
            return
        m.source_lost(gen, f"a demand request unanswered for {waited:.1f} s and nothing received on the "
                           f"demand channel for {silent:.1f} s (--source-timeout {timeout:g})")

    def wire_bytes(self) -> int:
        """Bytes received from sources on the raw channels (the kernel's
        count, TLS included; gRPC control and push are not counted)."""
        with self.lock:
            return self.bytes_closed + sum(tcp_bytes_received(s) for s in (self.demand, *self.push) if s is not None)

    def close(self) -> None:
        self._cancel_demand_deadline()
        with self.lock:
            socks = [s for s in (self.demand, *self.push, *(h[0] for h in self.held)) if s is not None]
            self.bytes_closed += sum(tcp_bytes_received(s) for s in socks)
            self.demand, self.push, self.held = None, {}, []
        for s in socks:
            s.close()

"""The post-copy state machine of one migration on the destination: the
states, the transitions allowed between them and the thread that may move
each (QEMU's postcopy states, `docs/devel/migration/postcopy.rst`, are the
model), and the source generation a state belongs to.

Every fact that decides what a thread may do next is the state: whether the
guest was released (switched over), whether the last pages are being mapped
(completing), whether the migration ended. The reason for the last
disconnect or failure travels with the state that has one. `ended` is only a
wake-up for threads that wait for the end, set by the move into an end state.

Who may act on the session is decided here too, in one place (`admit`,
`answers_to`): the session is bound to the identity of the peer that first
opened it (its certificate's name; None for plaintext), and each source that
joins gets a fresh secret token, revoked when that source is dropped. A
session id is printed in every event: it is never enough on its own.
"""

from __future__ import annotations

import enum
import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from migrate.errors import MigrateError
from migrate.wire.protocol import DEMAND_TOKEN_BYTES


class State(enum.Enum):
    ATTACHED = "attached"            # guest registered and held: no source yet
    CONNECTED = "connected"          # a source opened the session; the guest is held until its demand channel opens
    SWITCHED_OVER = "switched-over"  # the guest runs here and a source serves its faults
    DISCONNECTED = "disconnected"    # the source left before the guest was released; waiting for another
    PAUSED = "paused"                # the guest runs but its source left: its faults wait for another
    COMPLETING = "completing"        # every page received: the last are mapped and the range unregistered
    COMPLETE = "complete"            # every page received and mapped; unregistered
    FAILED = "failed"                # the guest went away or a kernel call failed

    @property
    def reported(self) -> str:
        """The name summaries, Finish replies and messages print: only whether
        a source serves the guest, not whether the guest was released yet."""
        return _REPORTED.get(self, self.value)


_REPORTED = {State.SWITCHED_OVER: "connected", State.PAUSED: "disconnected", State.COMPLETING: "connected"}

# States with a source bound to the migration, and states waiting for one.
SERVED = frozenset((State.CONNECTED, State.SWITCHED_OVER, State.COMPLETING))
WAITING = frozenset((State.ATTACHED, State.DISCONNECTED, State.PAUSED))
ENDED = frozenset((State.COMPLETE, State.FAILED))

_FAIL = "any thread that finds the guest gone (the guest monitor) or a kernel call failing"
_LOST = ("a channel receiver or gRPC push stream that ends, the demand deadline timer, or the agent loop's "
         "check_source (the source went silent)")
_LAST = "the thread that placed the last page: a demand or push receiver, or a gRPC push stream"

# Every allowed transition, and which thread moves it. Anything not here is
# refused (the mover returns False), which is how racing threads agree: e.g. a
# receiver that sees its channel end while another maps the last page finds
# COMPLETING and leaves the source alone.
TRANSITIONS: dict[State, dict[State, str]] = {
    State.ATTACHED: {
        State.CONNECTED: "gRPC Open (a source joins)",
        State.FAILED: _FAIL,
    },
    State.CONNECTED: {
        State.SWITCHED_OVER: "the demand accept thread, when the source's demand channel opens (the guest is released)",
        State.DISCONNECTED: _LOST,
        State.COMPLETING: _LAST,
        State.FAILED: _FAIL,
    },
    State.SWITCHED_OVER: {
        State.PAUSED: _LOST,
        State.COMPLETING: _LAST,
        State.FAILED: _FAIL,
    },
    State.DISCONNECTED: {
        State.CONNECTED: "gRPC Open (another source joins)",
        State.COMPLETING: _LAST + " of the source that just left",
        State.FAILED: _FAIL,
    },
    State.PAUSED: {
        State.SWITCHED_OVER: "gRPC Open (another source joins; the guest runs already)",
        State.COMPLETING: _LAST + " of the source that just left",
        State.FAILED: _FAIL,
    },
    State.COMPLETING: {
        State.COMPLETE: "the thread that moved to COMPLETING, once the range is unregistered",
        State.FAILED: "the thread that moved to COMPLETING (pages left unmapped), or " + _FAIL,
    },
    State.COMPLETE: {},
    State.FAILED: {},
}


@dataclass(frozen=True)
class Peer:
    """Who makes a call: the name its verified certificate carries (None:
    plaintext), and whether it is authenticated, i.e. whether an error may
    tell it about the guest (sizes, session ids, page counts): a verified
    certificate, or plaintext from loopback (only this host's users). A
    plaintext peer from elsewhere (`--insecure`) is not."""
    identity: str | None = None
    authenticated: bool = True


class NotAuthorised(MigrateError):
    """A call on a session without its current token, or from a peer other
    than the one that opened it. The message names nothing of the guest."""

    def __init__(self, call: str):
        super().__init__(f"{call} refused: not authorised for this session (a call on a session carries the "
                         "token its source's Open got in the Welcome, and comes from the peer that opened it)")


# Tokens of its sources a session answers Finish for (how a dropped source
# hears why): the most recent, so that a peer opening and dropping the session
# again and again cannot grow the list.
TOKENS_KEPT = 16


def token_is(expected: bytes, given: bytes) -> bool:
    """The one comparison of a peer's token with one the destination issued:
    constant time (nothing learnt from how long a wrong guess took), and an
    empty (revoked, or never issued) token matches nothing."""
    return bool(expected) and hmac.compare_digest(expected, given)


class StateMachine:
    """The state of one migration, the source generation bound to it (bumped
    by each source that joins, so a replaced source's channels ending do not
    touch its successor), that source's token, and the peer identity the
    session is bound to. Every move takes `lock`; each mover returns whether it
    moved."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = State.ATTACHED
        self.source_gen = 0
        # what the current source sends to open its demand and push channels
        # and with its gRPC calls; b"" once that source is dropped (revoked)
        self.token = b""
        self.issued: list[bytes] = []   # every source's token, the latest last (Finish takes them all)
        # the identity of the peer that opened the session (its certificate's
        # name; None for plaintext): every later call must come from it
        self.owner: str | None = None
        self.why: str | None = None   # why the last source was dropped, or why the migration failed
        # the state the migration completed from: CONNECTED or DISCONNECTED
        # means the guest was never released (no demand channel had opened)
        self.completing_from: State | None = None
        self.ended = threading.Event()   # set by the move into COMPLETE or FAILED, never cleared

    def _move(self, new: State) -> bool:
        """Caller holds self.lock."""
        if new not in TRANSITIONS[self.state]:
            return False
        self.state = new
        if new in ENDED:
            self.ended.set()
        return True

    @property
    def error(self) -> str | None:
        """Why the migration failed; None unless it did."""
        return self.why if self.state is State.FAILED else None

    @property
    def lost_why(self) -> str | None:
        """Why its source was dropped, while it waits for another."""
        return self.why if self.state in (State.DISCONNECTED, State.PAUSED) else None

    def may_join(self, identity: str | None) -> bool:
        """Whether a peer of this identity may open the session: any peer
        until one did, then only that one."""
        with self.lock:
            return self.source_gen == 0 or self.owner == identity

    def join(self, identity: str | None = None) -> tuple[int, bytes] | None:
        """A source of identity opens the session: its generation and a new
        token, or None when the migration takes no source now (the caller
        reads `state` to say why). The first source binds the session to its
        identity; raises NotAuthorised for a peer of another."""
        with self.lock:
            if self.source_gen and self.owner != identity:
                raise NotAuthorised("Open")
            if not self._move(State.SWITCHED_OVER if self.state is State.PAUSED else State.CONNECTED):
                return None
            self.source_gen += 1
            self.owner = identity
            self.token = secrets.token_bytes(DEMAND_TOKEN_BYTES)
            self.issued = [*self.issued, self.token][-TOKENS_KEPT:]
            return self.source_gen, self.token

    def admit(self, token: bytes, identity: str | None) -> int | None:
        """The generation of the source a channel or a Push or DeviceState
        call comes from: the current source's, when token is its (not
        revoked) token and identity the session's; else None."""
        with self.lock:
            if token_is(self.token, token) and self.owner == identity:
                return self.source_gen
            return None

    def serves(self, gen: int) -> bool:
        """Whether source gen is still the session's source (not dropped nor
        replaced): what a stream it opened checks before it places more."""
        with self.lock:
            return gen == self.source_gen and bool(self.token)

    def answers_to(self, token: bytes, identity: str | None) -> bool | None:
        """Whom a Finish is answered: True for the session's latest source
        (even once dropped: its receivers may have placed the last pages),
        False for an earlier one (it hears how the session it served went),
        None for anyone else."""
        with self.lock:
            if self.owner != identity or not self.issued:
                return None
            # every one compared, matched or not: the time taken says nothing
            match = [token_is(t, token) for t in self.issued]
            if match[-1]:
                return True
            return False if any(match) else None

    def switch_over(self, gen: int) -> bool:
        """The demand channel of source gen opened: True the first time, when
        the guest is to be released (later sources find it running)."""
        with self.lock:
            return gen == self.source_gen and self.state is State.CONNECTED and self._move(State.SWITCHED_OVER)

    def lose_source(self, gen: int, why: str) -> bool:
        """Source gen is gone. False when it is not the current source, or
        there is nothing to lose: it was dropped already, or it has served
        every page (COMPLETING), or the migration ended."""
        with self.lock:
            if gen != self.source_gen:
                return False
            new = State.PAUSED if self.state is State.SWITCHED_OVER else State.DISCONNECTED
            if not self._move(new):
                return False
            self.why = why
            self.token = b""   # revoked: it opens no channel and places no page (Finish still answers it)
            return True

    def start_completing(self) -> bool:
        """Every page is received: True for the one thread that maps the
        last and unregisters."""
        with self.lock:
            was = self.state
            if not self._move(State.COMPLETING):
                return False
            self.completing_from = was
            return True

    def complete(self, announce: Callable[[], None]) -> bool:
        """COMPLETING -> COMPLETE (see _end)."""
        return self._end(State.COMPLETE, announce)

    def fail(self, why: str, announce: Callable[[], None]) -> bool:
        """True for the first thread to fail the migration (its reason stays;
        see _end)."""
        return self._end(State.FAILED, announce, why)

    def _end(self, new: State, announce: Callable[[], None], why: str | None = None) -> bool:
        """Moves into an end state, announce() first: it runs under the lock,
        so that nothing moves the state between the announcement and the end,
        and the threads waiting for the end (`ended`) wake after it: the guest
        and the log have heard by then."""
        with self.lock:
            if new not in TRANSITIONS[self.state]:
                return False
            announce()
            if why is not None:
                self.why = why
            return self._move(new)

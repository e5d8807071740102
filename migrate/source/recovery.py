"""Recovery without a person: a source that loses its destination mid-session
(its agent killed or stopped, its host rebooted, the link cut) does not exit.
It reports `lost` (state `paused`, with the reason), tries again with backoff
for `source --recovery-window` seconds, and resumes the session as soon as a
destination agent for that guest answers:

- the agent that opened the session, once the link is back (Hello.resume_session);
- an agent restarted since, to which the same guest re-attached: it knows
  nothing of the session, so the source names the guest instead
  (Hello.resume_guest, the Welcome.guest_instance of the first agent), and
  no other guest, of whatever size, is ever given this RAM.

Either way the destination's Welcome lists the pages its guest already holds,
and only the rest is sent. A session that completed meanwhile (every page had
arrived, only the answer was lost) is not resumed: each try first asks the
destination how it ended (Finish, with the token of the source that served
it), and an agent that still holds that answer says it completed. Errors that say the migration cannot go on (the
guest died, a refusal, a mismatch) end it at once; so does a signal.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator

from migrate.errors import DestinationLost, RecoveryWindowOver, Stopped
from migrate.report import Reporter
from migrate.source.session import Source, SourceResult

BACKOFF_FIRST = 0.1     # s before the first try again
BACKOFF_MAX = 5.0       # s, the longest wait between two tries
CONNECT_MAX = 30.0      # s one try waits for the destination's port (it polls every 0.1 s meanwhile)


def backoff(first: float = BACKOFF_FIRST, most: float = BACKOFF_MAX, jitter=random.random) -> Iterator[float]:
    """Waits between tries: first, doubling up to most, each between half
    and all of that (jitter: the sources of a restarted destination do not
    all come back in step)."""
    d = first
    while True:
        yield d * (0.5 + 0.5 * jitter())
        d = min(most, d * 2)


class Recovery:
    """Serves one session to its end across losses of its destination.
    again(session, guest_instance, connect_timeout) builds the Source of one
    more try (no device state: the guest has it, or never will from this
    source); vm_state(session) says, when the window ends, what state the VM
    is in and what to do."""

    def __init__(self, reporter: Reporter, window: float, again: Callable[[str, str, float], Source],
                 vm_state: Callable[[str], str]):
        self.reporter = reporter
        self.window = window
        self.again = again
        self.vm_state = vm_state

    def serve(self, first: Source) -> SourceResult:
        """first.run(), and when it loses its destination after the session
        opened, the tries that follow."""
        t0 = time.monotonic()
        try:
            return first.run()
        except DestinationLost as e:
            if not first.session or self.window <= 0:
                raise   # nothing was opened (nothing to recover), or recovery is off: as it says
            first.state = "paused"   # (what `migrate status` shows meanwhile)
            res = self.recover(first.session, first.guest_instance, e, sent_all=first.sent_all, token=first.token)
        return dataclasses.replace(res, seconds=time.monotonic() - t0)

    def recover(self, session: str, guest: str, why: DestinationLost, sent_all: bool = False,
                token: bytes = b"") -> SourceResult:
        """Tries again until a try completes the session, one fails for good
        (raised as it is), or the destination stays lost for the window
        (RecoveryWindowOver). A try that resumed the session and then lost it
        again starts a new window. sent_all: the lost source had sent every
        page the destination lacked (only its Finish was lost), so the
        destination has likely completed and exited: the message says so.
        token: the session's token of the source that lost it (how a try
        asks whether the session completed meanwhile)."""
        lost_at = time.monotonic()
        waits = backoff()
        self._report_lost(session, why)
        tries = 0
        while True:
            left = self.window - (time.monotonic() - lost_at)
            if left <= 0:
                done = ("Every page had been sent before the destination was lost, so it has most likely "
                        "completed (its summary, or `migrate status` on its host, tells); if it did, the VM runs "
                        "there and nothing is left to do. Otherwise: " if sent_all else "")
                raise RecoveryWindowOver(
                    f"the destination of session {session} stayed lost for --recovery-window {self.window:g} s "
                    f"({tries} tries; the last said: {why}). {done}{self.vm_state(session)}")
            time.sleep(min(next(waits), left))
            Stopped.check()
            left = self.window - (time.monotonic() - lost_at)
            src = self.again(session, guest, max(0.1, min(CONNECT_MAX, left)))
            src.state = "paused"   # until it connects (`migrate status`)
            tries += 1
            fin = src.ended_complete(session, token, max(0.1, min(5.0, left))) if token else None
            if fin is not None:
                src.state = "completed"
                self.reporter.event("completed", f"session {session} completed at the destination while this "
                                    f"source was cut off from it ({why}): its agent says so now; the VM runs there",
                                    session=session, recovered=session)
                return SourceResult(session=session, pages_total=fin.pages_total, pages_sent_push=0,
                                    pages_sent_demand=0, wire_bytes=0, seconds=0.0, finish=fin)
            try:
                return src.run()
            except DestinationLost as e:
                why = e
                src.state = "paused"
                if src.session:   # it resumed, then lost the destination again: a new window
                    session, lost_at, waits, sent_all = src.session, time.monotonic(), backoff(), src.sent_all
                    token = src.token
                    self._report_lost(session, why)
                else:
                    self.reporter.event("retry", f"try {tries} to recover session {session}: {e}",
                                        session=session, tries=tries, reason=str(e))

    def _report_lost(self, session: str, why: DestinationLost) -> None:
        self.reporter.event("lost", f"lost the destination of session {session} ({why}); paused, trying again "
                            f"for --recovery-window {self.window:g} s", state="paused", session=session,
                            reason=str(why), window=self.window)

"""The destination's migration state machine, driven directly (no guest: these
are the transitions alone)."""

from __future__ import annotations

import pytest

from migrate.dest.state import ENDED, SERVED, TRANSITIONS, WAITING, State, StateMachine
from migrate.report import Reporter


def connected() -> StateMachine:
    """A migration whose first source (generation 1) opened the session."""
    m = StateMachine()
    gen, token = m.join()
    assert (gen, m.state, m.source_gen, m.token) == (1, State.CONNECTED, 1, token) and token
    return m


def test_a_source_that_leaves_while_the_last_page_is_mapped_is_not_lost():
    """Both receivers can place the last pages at once: one completes the
    migration while the other sees its channel end. That end must not turn a
    migration with every page received into a disconnected one (seen once in
    a benchmark run: the source's Finish then failed with 262144 of 262144
    pages received)."""
    m = connected()
    assert m.start_completing()         # the other receiver is in complete()
    assert not m.lose_source(1, "demand channel closed")
    assert m.state is State.COMPLETING and m.state.reported == "connected" and m.lost_why is None
    assert m.complete(lambda: None)     # what complete() does next
    assert m.state is State.COMPLETE and m.ended.is_set()


def test_a_source_that_leaves_before_the_end_is_lost():
    m = connected()
    assert m.lose_source(1, "demand channel closed")
    assert m.state is State.DISCONNECTED and m.lost_why == "demand channel closed"
    m2 = connected()
    assert not m2.lose_source(0, "an older source")   # a replaced source's channels ending
    assert m2.state is State.CONNECTED


def test_the_guest_is_released_once_and_a_new_source_finds_it_running():
    m = connected()
    assert not m.switch_over(0)                      # an older source's demand channel
    assert m.switch_over(1)                          # the guest is told to run
    assert m.state is State.SWITCHED_OVER and m.state.reported == "connected"
    assert not m.switch_over(1)                      # a second demand channel: not again
    assert m.lose_source(1, "push channel timed out")
    assert m.state is State.PAUSED and m.state.reported == "disconnected"
    assert m.lost_why == "push channel timed out"
    first_token = m.token
    assert m.join() == (2, m.token) and m.token != first_token
    assert m.state is State.SWITCHED_OVER            # no second switchover for the guest
    assert m.lost_why is None and m.error is None


def test_an_end_is_announced_before_its_waiters_wake_and_only_once():
    m = connected()
    heard = []
    assert m.fail("guest process 1 went away", lambda: heard.append(m.ended.is_set()))
    assert heard == [False] and m.ended.is_set()
    assert m.state is State.FAILED and m.error == "guest process 1 went away"
    assert not m.fail("a second reason", lambda: heard.append("again"))
    assert not m.complete(lambda: heard.append("again"))
    assert heard == [False] and m.error == "guest process 1 went away"


# How to reach each state through the movers, and what each mover moves to.
PATHS = {
    State.ATTACHED: [],
    State.CONNECTED: ["join"],
    State.SWITCHED_OVER: ["join", "switch_over"],
    State.DISCONNECTED: ["join", "lose_source"],
    State.PAUSED: ["join", "switch_over", "lose_source"],
    State.COMPLETING: ["join", "start_completing"],
    State.COMPLETE: ["join", "start_completing", "complete"],
    State.FAILED: ["fail"],
}


def move(m: StateMachine, mover: str) -> bool:
    if mover == "join":
        return m.join() is not None
    if mover == "switch_over":
        return m.switch_over(m.source_gen)
    if mover == "lose_source":
        return m.lose_source(m.source_gen, "lost")
    if mover == "start_completing":
        return m.start_completing()
    if mover == "complete":
        return m.complete(lambda: None)
    return m.fail("failed", lambda: None)


def target(state: State, mover: str) -> State:
    return {"join": State.SWITCHED_OVER if state is State.PAUSED else State.CONNECTED,
            "switch_over": State.SWITCHED_OVER,
            "lose_source": State.PAUSED if state is State.SWITCHED_OVER else State.DISCONNECTED,
            "start_completing": State.COMPLETING, "complete": State.COMPLETE, "fail": State.FAILED}[mover]


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_each_mover_moves_exactly_as_the_transitions_table_allows(state):
    for mover in ("join", "switch_over", "lose_source", "start_completing", "complete", "fail"):
        m = StateMachine()
        for step in PATHS[state]:
            assert move(m, step), (state, step)
        assert m.state is state
        want = target(state, mover)
        allowed = want in TRANSITIONS[state] and not (mover == "switch_over" and state is not State.CONNECTED)
        assert move(m, mover) is allowed, (state, mover)
        assert m.state is (want if allowed else state)
        assert m.ended.is_set() is (m.state in ENDED)


def test_the_transitions_table():
    """Every state has its row, every transition is named with the thread that
    moves it and is reachable through a mover; the end states lead nowhere;
    and the names reported stay those of the five states reported before."""
    assert set(TRANSITIONS) == set(State)
    reached = {(s, target(s, mover)) for s in State for mover in ("join", "switch_over", "lose_source",
                                                                   "start_completing", "complete", "fail")}
    for old, row in TRANSITIONS.items():
        for new, who in row.items():
            assert isinstance(who, str) and who, (old, new)
            assert (old, new) in reached, (old, new)
    assert all(not TRANSITIONS[s] for s in ENDED)
    assert SERVED.isdisjoint(WAITING) and SERVED.isdisjoint(ENDED) and WAITING.isdisjoint(ENDED)
    assert SERVED | WAITING | ENDED == set(State)
    assert {s.reported for s in State} == {"attached", "connected", "disconnected", "complete", "failed"}


def test_a_session_resumes_without_device_state_only_while_that_state_is_here():
    """With --qmp, a source without device state may resume a session whose
    state arrived whole: loading (a split during the load: the load reads guest
    RAM, which only a source serves) or loaded. Not one whose state never came,
    is still arriving, or failed to load: the guest will not run here, and the
    paused source QEMU is the VM."""
    from migrate.qemu.dest import DeviceStateFeeder, Feed
    feeder = DeviceStateFeeder("/nonexistent/qmp.sock", Reporter(False, "dest", quiet=True), wait_qemu=0.1)
    feeder.feeds.update(loading=Feed(bytes=10, received=True), running=Feed(bytes=10, received=True, running=True),
                        failed=Feed(bytes=10, received=True, error="QMP getfd: no answer within 60 s"),
                        arriving=Feed(bytes=4))
    assert feeder.why_not_resumable("loading") is None
    assert feeder.why_not_resumable("running") is None
    assert "did not load here (QMP getfd" in feeder.why_not_resumable("failed")
    assert "still arriving" in feeder.why_not_resumable("arriving")
    assert "no device state" in feeder.why_not_resumable("never")

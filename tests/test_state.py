"""The destination's migration state machine, driven directly (no guest: these
are the transitions alone)."""

from __future__ import annotations

import threading

from migrate.dest.session import Migration, State
from migrate.report import Reporter


def bare_migration() -> Migration:
    m = Migration.__new__(Migration)
    m.id, m.npages, m.reporter = "t", 8, Reporter(False, "dest")
    m.lock, m.done = threading.Lock(), threading.Event()
    m.state, m.source_gen, m.completing, m.lost_why = State.CONNECTED, 1, False, None
    m.demand_sock, m.push_socks = None, []

    class Space:
        received_count = 8
    m.space = Space()
    return m


def test_a_source_that_leaves_while_the_last_page_is_mapped_is_not_lost():
    """Both receivers can place the last pages at once: one completes the
    migration while the other sees its channel end. That end must not turn a
    migration with every page received into a disconnected one (seen once in
    a benchmark run: the source's Finish then failed with 262144 of 262144
    pages received)."""
    m = bare_migration()
    m.completing = True                 # the other receiver is in _complete()
    m.source_lost(1, "demand channel closed")
    assert m.state is State.CONNECTED and m.lost_why is None
    assert m._move(State.COMPLETE)      # what _complete() does next


def test_a_source_that_leaves_before_the_end_is_lost():
    m = bare_migration()
    m.source_lost(1, "demand channel closed")
    assert m.state is State.DISCONNECTED and m.lost_why == "demand channel closed"
    m2 = bare_migration()
    m2.source_lost(0, "an older source")   # a replaced source's channels ending
    assert m2.state is State.CONNECTED


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

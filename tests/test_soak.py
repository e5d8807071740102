"""A long-lived destination agent stays the size it started.

One `migrate dest --serve-forever` serves migration after migration, one at
a time and several at once, each guest verifying every byte. After each
round the agent's threads and file descriptors must come back to what they
were after the first round, and its RSS stay within a few MiB of it: an
agent that keeps a thread, a descriptor or a buffer per migration runs out
of one of them on a busy host. What this caught: a demand-deadline timer
left to run out (a thread held 15 s after every Open), gRPC's executor never
giving a thread back, and each migration's 4 MiB latency ring left to the
cyclic collector and to malloc's heap (RSS grew 4 MiB a migration). Sized
for CI: 16 MiB guests, 6 migrations one after another, then 2 rounds of 3 at
once.
"""

from __future__ import annotations

import os
import time

import pytest

from migrate.dest.service import WORKER_IDLE
from migrate.sim.localrun import LocalMigration, Proc
from migrate.sim.ramimage import ImageSpec, write_image

M = 1 << 20
SIZE = 16 * M
SEED = 31
RSS_SLACK_MIB = 4          # "within a few MiB" (measured: +0-1 MiB over 12 migrations)
# a migration's threads end once it is retired, gRPC's idle workers WORKER_IDLE
# s after their last call: give them this long
SETTLE_S = WORKER_IDLE + 10.0


def footprint(pid: int) -> tuple[int, int, int]:
    """(threads, open file descriptors, VmRSS in KiB) of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return threads, fds, rss


def settled(pid: int, want: tuple[int, int] | None) -> tuple[int, int, int]:
    """The footprint once threads and descriptors are back at `want` (or,
    with want None, once they stop changing), or whatever it is after
    SETTLE_S: the caller asserts."""
    deadline = time.monotonic() + SETTLE_S
    last = None
    while True:
        now = footprint(pid)
        if (want is not None and now[:2] == want) or (want is None and last is not None and now[:2] == last[:2]):
            return now
        if time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.5)


def guest_exit(g: Proc, timeout: float) -> int:
    """g's exit code; a guest that does not exit fails the test naming what
    it heard and where each of its threads waits (a guest that waited for a
    switchover that never came showed one thread, in futex_do_wait, and no
    `running` event)."""
    try:
        return g.wait(timeout)
    except TimeoutError:
        threads = []
        for t in sorted(os.listdir(f"/proc/{g.p.pid}/task")):
            try:
                with open(f"/proc/{g.p.pid}/task/{t}/comm") as c, open(f"/proc/{g.p.pid}/task/{t}/wchan") as w:
                    threads.append(f"{t} {c.read().strip()} {w.read()}")
            except OSError:
                pass
        raise AssertionError(f"guest pid {g.p.pid} did not exit within {timeout} s; it said "
                             f"{[e.get('event') for e in g.lines]}; its threads wait in {threads}") from None


class Agent:
    """The --serve-forever agent and the guests and sources of its rounds;
    every guest runs on the same image (one file, read by every source)."""

    def __init__(self, lm: LocalMigration):
        self.lm = lm
        self.n = 0

    def round(self, k: int) -> None:
        """k migrations at once: k guests attach, k sources serve them, each
        guest verifies, the agent reports each one's end."""
        lm = self.lm
        guests = []
        for _ in range(k):
            self.n += 1
            name = f"soak{self.n}"
            g = Proc("guestsim", ["guestsim", "--attach", lm.sock, "--size", str(SIZE), "--seed", str(SEED),
                                  "--pattern", "random", "--vcpus", "2", "--name", name, "--json"])
            lm.procs.append(g)
            g.wait_event("attached", 60)
            guests.append((g, name))
        sources = []
        for _, name in guests:
            s = Proc("source", ["source", "--ram", lm.image, "--to", lm.address, "--guest", name, "--json"])
            lm.procs.append(s)
            sources.append(s)
        for s in sources:
            assert s.wait(120) == 0, s.errors()
        for g, name in guests:
            assert guest_exit(g, 60) == 0, (name, g.errors())
            assert g.summary()["verified"] is True
        ended = [lm.dest.wait_event("migration", 30) for _ in range(k)]
        assert [e["state"] for e in ended] == ["complete"] * k
        # the processes of this round are gone: only the agent's own remain
        lm.procs = [p for p in lm.procs if p is lm.dest]


@pytest.mark.timeout(400)
def test_a_serve_forever_agent_gives_back_what_each_migration_took(tmp_path, host):
    image = f"/dev/shm/migrate-soak-{os.getpid()}"
    write_image(image, SIZE, ImageSpec(SEED))
    lm = LocalMigration(str(tmp_path), SIZE, seed=SEED, image=image)
    try:
        lm.start_dest(("--serve-forever",))
        pid = lm.dest.p.pid
        agent = Agent(lm)
        # the first migration starts what the agent keeps for good (gRPC's
        # own threads): the baseline is after it, once its workers went idle
        agent.round(1)
        time.sleep(WORKER_IDLE + 1)
        base = settled(pid, None)
        seen = [("first", base)]
        for i in range(5):
            agent.round(1)
            seen.append((f"sequential {i + 2}", settled(pid, base[:2])))
        for i in range(2):
            agent.round(3)
            seen.append((f"3 at once, round {i + 1}", settled(pid, base[:2])))
        print("\n".join(f"{what}: {t} threads, {f} fds, {rss / 1024:.1f} MiB RSS" for what, (t, f, rss) in seen))
        for what, (threads, fds, _) in seen:
            assert (threads, fds) == base[:2], (what, seen)
        grown = (seen[-1][1][2] - base[2]) / 1024
        assert grown <= RSS_SLACK_MIB, f"RSS grew {grown:.1f} MiB over {agent.n} migrations: {seen}"
        assert lm.dest.p.poll() is None
    finally:
        lm.close()


@pytest.mark.timeout(30)
def test_grpc_worker_threads_end_when_idle():
    """ShrinkingExecutor (the gRPC server's threads): calls at once get a
    thread each up to max_workers, results and exceptions reach their
    futures, and every thread ends `idle` s after its last call."""
    import threading

    from migrate.dest.service import ShrinkingExecutor

    pool = ShrinkingExecutor(3, idle=0.3, name="test-grpc")
    release = threading.Event()

    def mine():
        return {t.name for t in threading.enumerate() if t.name.startswith("test-grpc")}

    def boom():
        raise ValueError("bad call")

    blocked = [pool.submit(release.wait, 10) for _ in range(4)]   # one more than max_workers: it queues
    time.sleep(0.2)
    assert len(mine()) == 3
    release.set()
    assert [f.result(5) for f in blocked] == [True] * 4
    with pytest.raises(ValueError, match="bad call"):
        pool.submit(boom).result(5)
    deadline = time.monotonic() + 5
    while mine() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mine() == set()
    assert pool.submit(lambda: 42).result(5) == 42   # a new call after that starts a thread again
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 0)
    assert mine() == set()

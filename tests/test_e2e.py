"""End to end over loopback: dest, source and guestsim as separate processes,
every byte verified by the guest, pages by kind adding up to the total."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import time

import pytest
from conftest import need_backing

from migrate import exits
from migrate.sim.localrun import LocalMigration

M = 1 << 20

CASES = [
    # backing, size, pattern, vcpus, placement (continue-noprealloc: the agent
    # does not allocate the RAM file at attach; pages are written as they come;
    # continue-dense: the source sends large pages whole, zero blocks included)
    ("tmpfs", 64 * M, "seq", 1, "continue"),
    ("tmpfs", 128 * M, "random", 4, "continue"),
    ("tmpfs", 64 * M, "hotset", 4, "continue"),
    ("tmpfs", 256 * M, "random", 1, "continue"),
    ("tmpfs", 128 * M, "random", 4, "continue-noprealloc"),
    ("tmpfs-file", 64 * M, "random", 4, "continue"),
    ("tmpfs", 64 * M, "random", 4, "copy"),
    ("hugetlbfs", 128 * M, "seq", 1, "continue"),
    ("hugetlbfs", 128 * M, "random", 4, "continue"),
    ("hugetlbfs", 64 * M, "hotset", 4, "continue"),
    ("hugetlbfs", 64 * M, "random", 4, "continue-noprealloc"),
    ("hugetlbfs", 64 * M, "random", 1, "continue-dense"),
    ("hugetlbfs", 64 * M, "random", 1, "copy"),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backing,size,pattern,vcpus,placement", CASES,
                         ids=[f"{b}-{s // M}M-{p}-{v}vcpu-{pl}" for b, s, p, v, pl in CASES])
def test_migrate_end_to_end(tmp_path, host, huge_pages, backing, size, pattern, vcpus, placement):
    need_backing(backing, host, huge_pages, size // (2 * M))
    placement, _, variant = placement.partition("-")
    noprealloc = variant == "noprealloc"
    with LocalMigration(str(tmp_path), size, backing=backing, seed=7, pattern=pattern, vcpus=vcpus,
                        placement=placement, dest_args=("--no-prealloc",) if noprealloc else (),
                        source_args=("--no-sparse",) if variant == "dense" else ()) as lm:
        lm.make_image()
        out = lm.run(timeout=150)
    assert "failed" not in out, out.get("failed")
    assert (out["source_rc"], out["guest_rc"], out["dest_rc"]) == (0, 0, 0)
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0
    assert g["migration_complete"] is True
    total = size // lm.page_size
    assert d["state"] == "complete" and d["pages_total"] == total
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == total
    assert s["pages_demand"] == d["pages_demand"] and s["pages_zero"] == d["pages_zero"]
    assert (g["pages_demand"], g["pages_pushed"], g["pages_zero"]) == \
        (d["pages_demand"], d["pages_pushed"], d["pages_zero"])     # the agent told the guest too
    for summary in (g, d):
        assert summary["fault_p50_us"] <= summary["fault_p99_us"]
    if backing != "hugetlbfs":   # 30% of 4 KiB units are zero; a 2 MiB page is never all zero
        assert d["pages_zero"] > total // 5
    # 2 MiB pages go sparse on both channels (their zero 4 KiB blocks stay
    # behind) unless the source is told not to; 4 KiB pages never do
    sparse = backing == "hugetlbfs" and variant != "dense"
    assert (s["demand_zero_blocks"] > 0) == (sparse and s["pages_sent_demand"] > 0), s
    assert (s["demand_zero_blocks"] + s["push_zero_blocks"] > 0) == sparse, s
    # the RAM file is allocated at attach for CONTINUE placement unless told not to
    assert (d["prepare_s"] is not None) == (placement == "continue" and not noprealloc)


@pytest.mark.timeout(120)
def test_all_random_content_without_compression(tmp_path, host):
    with LocalMigration(str(tmp_path), 32 * M, seed=3, pattern="random", vcpus=2, zero_fraction=0.0,
                        random_fraction=1.0, source_args=("--no-compress",)) as lm:
        lm.make_image()
        out = lm.run(timeout=100)
    assert out["guest"]["verified"] is True
    assert out["dest"]["pages_zero"] == 0
    s = out["source"]
    assert s["pages_sent_push"] + s["pages_sent_demand"] >= 32 * M // 4096
    assert s["wire_bytes"] == (s["pages_sent_push"] + s["pages_sent_demand"]) * 4096   # raw, no zstd


@pytest.mark.timeout(180)
def test_serve_forever_runs_two_migrations_at_once(tmp_path, host):
    """One agent, two guests, two sources at the same time, each to its own guest."""
    a = LocalMigration(str(tmp_path), 32 * M, seed=21, pattern="random", vcpus=2)
    b = LocalMigration(str(tmp_path), 32 * M, seed=22, pattern="seq", vcpus=1)
    try:
        a.make_image()
        b.make_image()
        a.start_dest(("--serve-forever",))
        b.dest, b.address, b.sock = a.dest, a.address, a.sock
        a.start_guest(("--name", "a"))
        a.dest.wait_event("attached", 30)
        b.start_guest(("--name", "b"))
        a.dest.wait_event("attached", 30)
        sa, sb = a.start_source(("--guest", "a")), b.start_source(("--guest", "b"))
        assert sa.wait(120) == 0, sa.errors()
        assert sb.wait(120) == 0, sb.errors()
        assert a.guest.wait(60) == 0 and b.guest.wait(60) == 0
        assert a.guest.summary()["verified"] and b.guest.summary()["verified"]
        done = [a.dest.wait_event("migration", 30), a.dest.wait_event("migration", 30)]
        assert sorted(d["state"] for d in done) == ["complete", "complete"]
        assert sorted(d["session"] for d in done) == sorted([sa.summary()["session"], sb.summary()["session"]])
        assert a.dest.p.poll() is None, "--serve-forever keeps serving after both"
    finally:
        b.dest = None
        b.close()
        a.close()


@pytest.mark.timeout(120)
def test_serve_forever_answers_finish_after_the_session_is_retired(tmp_path, host):
    """--serve-forever drops a migration once it ends; a source whose Finish
    comes after that still gets the answer (it got "unknown session" when the
    agent retired the session first: seen as a flaky failure of the test above).
    The source runs in this process: a Finish carries the session's token."""
    from migrate.proto import migration_pb2 as pb
    from migrate.proto import migration_pb2_grpc as pbg
    from migrate.report import Reporter
    from migrate.source.ramfile import RamImage
    from migrate.source.session import Source
    from migrate.wire.protocol import channel
    with LocalMigration(str(tmp_path), 32 * M, seed=23, pattern="random", vcpus=2) as lm:
        lm.make_image()
        lm.start_dest(("--serve-forever",))
        lm.start_guest()
        ram = RamImage(lm.image)
        try:
            src = Source(ram, lm.address, Reporter(quiet=True))
            assert src.run().finish.complete
        finally:
            ram.close()
        done = lm.dest.wait_event("migration", 30)      # retired by now
        assert done["state"] == "complete"
        ch = channel(lm.address, "late-finish")
        try:
            fin = pbg.MigrationStub(ch).Finish(pb.FinishRequest(session_id=done["session"], token=src.token,
                                                                timeout_seconds=1), timeout=10)
        finally:
            ch.close()
        assert fin.complete and fin.pages_total == 32 * M // 4096 and not fin.error


def wait_until_received(lm: LocalMigration, fraction: int) -> dict:
    """Until the destination reports more than 1/fraction of the pages in;
    returns that progress event."""
    while True:
        ev = lm.dest.wait_event("progress", 60)
        if ev["received"] > ev["pages_total"] // fraction:
            return ev


SLOW_SOURCE = ("--push-streams", "1", "--batch-bytes", "256K", "--max-rate", "100M")


@contextlib.contextmanager
def mid_migration(tmp_path, seed: int, *, received: int = 20, source_args: tuple = (), **kw):
    """A 256 MiB guest faulting at random from 2 vCPUs, served by a source that
    pushes slowly (one stream at 100 MB/s), from the moment more than
    1/received of its pages are in: yields (the migration, its first source).
    kw goes to LocalMigration (dest_args, where the destination runs)."""
    with LocalMigration(str(tmp_path), 256 * M, seed=seed, pattern="random", vcpus=2,
                        source_args=(*SLOW_SOURCE, *source_args), **kw) as lm:
        lm.make_image()
        lm.start_dest()
        first = lm.start_source()
        lm.start_guest()
        wait_until_received(lm, received)
        yield lm, first


def finish_with_a_new_source(lm: LocalMigration):
    """A new source serves the rest: it exits 0, the guest verifies every byte,
    the destination completes with every page accounted for (pages_prior: kept
    from a dead agent). Returns the new source and the guest's and the
    destination's summaries."""
    second = lm.start_source()
    assert second.wait(120) == 0, second.errors()
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    assert lm.dest.wait(30) == 0
    d = lm.dest.summary()
    assert d["state"] == "complete"
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] + d["pages_prior"] == lm.size // 4096
    return second, g, d


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_source_killed_mid_migration_then_a_new_source_resumes(tmp_path, host, transport):
    """The VM survives its source dying: the guest stays blocked (never reads a
    byte that did not come from the source), the destination waits, and a new
    source finishes the migration from the destination's received bitmap."""
    with mid_migration(tmp_path, 5, source_args=("--transport", transport)) as (lm, first):
        first.p.kill()
        first.p.wait(10)
        ev = lm.dest.wait_event("disconnected", 30)
        assert 0 < ev["received"] < ev["total"]
        second, _, d = finish_with_a_new_source(lm)
        assert d["pages_prior"] == 0
        # (its first event names its control socket, the next its session)
        assert second.lines[0]["event"] == "control"
        assert second.lines[1]["event"] == "connected" and "already there" in second.lines[1]["message"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_the_guest_dying_mid_migration_ends_both_agents_saying_so(tmp_path, host, transport):
    """The destination guest is killed mid-migration: nothing is left to
    migrate into. Whichever destination thread notices first (a CONTINUE into
    the vanished address space fails with ESRCH, or the attach socket closes),
    the destination fails the migration naming the guest, and the source exits
    with the destination's reason rather than with what the destination's
    teardown did to its channels (it said "push channel: Connection reset by
    peer")."""
    with mid_migration(tmp_path, 29, source_args=("--transport", transport)) as (lm, first):
        pid = lm.guest.p.pid
        lm.guest.p.kill()
        lm.guest.p.wait(10)
        assert lm.dest.wait(30) == exits.GUEST_LOST
        why = f"guest process {pid} went away before the migration ended"
        assert lm.dest.errors() == [why]
        assert lm.dest.summary()["state"] == "failed"
        assert first.wait(30) == exits.GUEST_LOST
        assert first.errors() == [f"destination ended session {lm.dest.summary()['session']}: {why}"]


@pytest.mark.timeout(180)
def test_a_source_that_stops_answering_is_dropped_and_a_new_one_resumes(tmp_path, host):
    """The source process freezes mid-migration (SIGSTOP: its kernel still
    takes the requests, so TCP sees nothing wrong, as with a hung host or a
    network split). The destination drops it once a vCPU's request has waited
    --source-timeout with nothing arriving, and the next source finishes."""
    with mid_migration(tmp_path, 17, dest_args=("--source-timeout", "2")) as (lm, first):
        first.p.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        ev = lm.dest.wait_event("disconnected", 30)
        waited = time.monotonic() - t
        assert 2 <= waited < 15, waited
        assert "unanswered" in ev["message"] and "--source-timeout 2" in ev["message"], ev
        assert 0 < ev["received"] < ev["total"]
        first.p.kill()                      # a stopped process still dies
        first.p.wait(10)
        _, _, d = finish_with_a_new_source(lm)
        assert d["pages_prior"] == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_a_network_split_is_noticed_by_both_sides_and_a_new_source_finishes(tmp_path, host, split_network,
                                                                            transport):
    """The destination runs on a second host (a network namespace); mid-migration
    the link between goes dead: no FIN, no RST, nothing. The guest is stopped
    first so that no vCPU waits on the source: only the kernel, asked to give
    up on a silent peer, can notice. The destination drops the source, the
    source exits with an error saying what happened (without this: minutes of
    TCP retries on one side, waiting for ever on the other), and once the link
    is back a new source finishes the migration."""
    net = split_network
    with mid_migration(tmp_path, 23, source_args=("--transport", transport, "--dest-timeout", "2",
                                                  "--recovery-window", "0"),
                       dest_args=("--source-timeout", "2"), dest_listen=f"{net.there}:0",
                       dest_prefix=net.exec) as (lm, first):
        lm.guest.p.send_signal(signal.SIGSTOP)
        time.sleep(0.5)                     # what its vCPUs asked for has come
        net.cut()
        t = time.monotonic()
        ev = lm.dest.wait_event("disconnected", 30)
        dest_s = time.monotonic() - t
        # whichever channel's kernel (or, with grpc, the server's keepalive) gave up first
        assert ("timed out" in ev["message"] or "gRPC push stream broke" in ev["message"]) \
            and "--source-timeout 2" in ev["message"], ev
        assert 0 < ev["received"] < ev["total"]
        assert first.wait(30) != 0
        source_s = time.monotonic() - t
        err = " | ".join(first.errors())
        assert "the destination is gone" in err and "--dest-timeout 2" in err, err
        assert dest_s < 15 and source_s < 20, (dest_s, source_s)
        if transport == "grpc":
            # the gRPC server's keepalive ends the dead source's push stream:
            # its handler gives back the server thread it held (it may have
            # ended before the disconnect, when it was what noticed)
            if not any(e.get("event") == "push_end" for e in lm.dest.lines):
                lm.dest.wait_event("push_end", 15)
        net.restore()
        lm.guest.p.send_signal(signal.SIGCONT)
        _, _, d = finish_with_a_new_source(lm)
        assert d["pages_prior"] == 0


@pytest.mark.timeout(180)
def test_a_network_blip_shorter_than_the_timeouts_is_ridden_out(tmp_path, host, split_network):
    """The same cut, restored after 1 s with both timeouts at 5 s: TCP's
    retransmissions carry the migration over it, nobody is dropped, and the
    first source finishes."""
    net = split_network
    with mid_migration(tmp_path, 31, source_args=("--dest-timeout", "5"), dest_args=("--source-timeout", "5"),
                       dest_listen=f"{net.there}:0", dest_prefix=net.exec) as (lm, first):
        net.cut()
        time.sleep(1)
        assert first.p.poll() is None       # the cut came mid-migration
        net.restore()
        assert first.wait(120) == 0, first.errors()
        assert lm.guest.wait(60) == 0
        assert lm.guest.summary()["verified"] is True
        assert lm.dest.wait(30) == 0
        assert lm.dest.summary()["state"] == "complete"
        assert not [e for e in lm.dest.lines if e.get("event") == "disconnected"]


@pytest.mark.timeout(180)
def test_a_destination_agent_that_hangs_is_given_up_by_its_source(tmp_path, host):
    """The destination agent freezes mid-migration (SIGSTOP: its kernel still
    acknowledges, until the push fills its receive buffer). The source gives
    up once nothing it sends is taken in for --dest-timeout and exits saying
    so, instead of waiting for ever; the agent, when it runs again, finds that
    source gone and a new one finishes."""
    with mid_migration(tmp_path, 29, source_args=("--dest-timeout", "2", "--recovery-window", "0")) as (lm, first):
        lm.dest.p.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        try:
            assert first.wait(30) != 0
            waited = time.monotonic() - t
        finally:
            lm.dest.p.send_signal(signal.SIGCONT)
        err = " | ".join(first.errors())
        assert "the destination is gone" in err and "--dest-timeout 2" in err, err
        assert 2 <= waited < 20, waited
        ev = lm.dest.wait_event("disconnected", 30)
        assert 0 < ev["received"] < ev["total"]
        _, _, d = finish_with_a_new_source(lm)
        assert d["pages_prior"] == 0


@pytest.mark.timeout(180)
def test_agent_killed_mid_migration_then_a_new_agent_takes_over(tmp_path, host):
    """The destination agent itself dies (SIGKILL) mid-migration: the guest keeps
    its userfaultfd, its faulting vCPUs stay blocked, it re-attaches to a new
    agent, which keeps every page already mapped in the guest (never rewritten)
    and fetches the rest from a new source. Every byte verifies."""
    with mid_migration(tmp_path, 9, received=10, source_args=("--recovery-window", "0")) as (lm, first_src):
        old = lm.dest
        old.p.kill()
        old.p.wait(10)
        assert first_src.wait(60) != 0          # its destination is gone
        lm.guest.wait_event("agent_lost", 30)
        lm.start_dest()                          # a new agent on the same attach socket
        ev = lm.dest.wait_event("reattached", 60)
        assert 0 < ev["pages_prior"] < 256 * M // 4096
        lm.guest.wait_event("reattached", 30)
        _, g, d = finish_with_a_new_source(lm)
        assert g["agent_reattaches"] == 1 and d["pages_prior"] == ev["pages_prior"]


@pytest.mark.timeout(240)
def test_1gib_pages_go_sparse_on_both_channels(tmp_path, host):
    """Two 1 GiB pages: the largest block bitmaps (32 KiB a page) and iovec
    lists, on the demand channel and the push, and the guest verifies both."""
    from migrate import hugepages
    from migrate.hugepages import HUGE_1G
    why = host.why_not("minor_hugetlbfs")
    if why:
        pytest.skip(why)
    with hugepages.reserved(2, HUGE_1G) as free:
        if free < 2:
            pytest.skip(f"two free 1 GiB huge pages needed, {free} could be reserved")
        with LocalMigration(str(tmp_path), 2 * HUGE_1G, backing="hugetlbfs-1g", seed=5, pattern="random",
                            vcpus=1) as lm:
            lm.make_image()
            out = lm.run(timeout=200)
    assert "failed" not in out, out.get("failed")
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0
    assert d["state"] == "complete" and d["pages_total"] == 2
    assert s["pages_sent_demand"] >= 1                      # the guest's first touch waits for one
    assert s["demand_zero_blocks"] > 0
    # each 1 GiB page holds 262144 blocks, about 30% of them zero
    assert s["wire_bytes"] < s["pages_sent_demand"] * HUGE_1G + s["pages_sent_push"] * HUGE_1G


def punch_zero_pages(path: str, page_size: int = 4096) -> int:
    """Turns every all-zero page of the file into a hole (the bytes read the
    same): a VM's RAM file, where the guest never wrote, looks like this."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    punched = 0
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, page_size):
            if os.pread(fd, page_size, off) == bytes(page_size):
                if libc.fallocate(fd, 3, off, page_size) != 0:   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                    raise OSError(ctypes.get_errno(), "fallocate punch hole")
                punched += 1
    finally:
        os.close(fd)
    return punched


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_source_leaves_the_holes_of_its_ram_file_unread(tmp_path, host, transport):
    """Pages in holes of the source's RAM file are sent as zero without being
    read, so the source allocates none of the RAM its guest never wrote, and
    the guest still verifies every byte."""
    with LocalMigration(str(tmp_path), 64 * M, seed=13, pattern="random", vcpus=2,
                        source_args=("--transport", transport)) as lm:
        lm.make_image()
        holes = punch_zero_pages(lm.image)
        blocks = os.stat(lm.image).st_blocks
        out = lm.run(timeout=150)
        assert os.stat(lm.image).st_blocks == blocks, "the source allocated holes of its RAM file"
    assert "failed" not in out, out.get("failed")
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0
    assert d["state"] == "complete" and d["pages_zero"] >= holes > 64 * M // 4096 // 5
    assert s["hole_pages"] >= holes            # every one of them went out unread


@pytest.mark.timeout(180)
def test_a_source_on_hugetlbfs_leaves_never_written_huge_pages_unread(tmp_path, host, huge_pages):
    """hugetlbfs reports no holes (SEEK_DATA says every byte is data) and
    reading one allocates a huge page. The source probes for them instead (a
    userfaultfd that refuses a missing page) and sends them as zero pages
    unread: its RAM file gains no huge page, and the guest verifies."""
    need_backing("hugetlbfs", host, huge_pages, 64)   # the guest's 32 and the image's 32
    fd = os.memfd_create("migrate-test-holes", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    try:
        path = f"/proc/{os.getpid()}/fd/{fd}"
        # 4 KiB units 99.9% zero: about 60% of the 2 MiB pages are all zero
        with LocalMigration(str(tmp_path), 64 * M, backing="hugetlbfs", seed=13, pattern="random", vcpus=2,
                            zero_fraction=0.999, random_fraction=0.0005, image=path) as lm:
            lm.make_image()
            holes = punch_zero_pages(path, 2 * M)
            blocks = os.fstat(fd).st_blocks
            out = lm.run(timeout=150)
            assert os.fstat(fd).st_blocks == blocks, "the source allocated holes of its RAM file"
    finally:
        os.close(fd)
    assert "failed" not in out, out.get("failed")
    g, d, s = out["guest"], out["dest"], out["source"]
    assert g["verified"] is True and g["mismatches"] == 0
    assert 8 < holes < 32
    assert d["state"] == "complete" and d["pages_zero"] >= holes
    assert s["hole_pages"] >= holes            # every one of them went out unread


@pytest.mark.timeout(60)
def test_hugetlbfs_holes_are_found_without_allocating_them(huge_pages):
    """The probe behind the test above, on its own: exact holes of a hugetlbfs
    file, found at open and when asked, and not one huge page taken for them."""
    from migrate.hugepages import free_pages as free
    from migrate.source.ramfile import RamImage
    if huge_pages < 8:
        pytest.skip(f"8 free 2 MiB huge pages needed, {huge_pages} could be reserved")
    fd = os.memfd_create("migrate-test-probe", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, 8 * 2 * M)
        mem = mmap.mmap(fd, 8 * 2 * M)          # hugetlbfs has no write(): through a mapping
        mem[3 * 2 * M + 100] = 1
        before = free()
        ram = RamImage(f"/proc/{os.getpid()}/fd/{fd}")
        try:
            assert ram.page_size == 2 * M
            assert [p for p in range(8) if p not in ram.open_holes] == [3]
            mem[6 * 2 * M] = 2
            assert [p for p in range(8) if p not in ram.holes()] == [3, 6]
            assert free() == before - 1          # page 6, written here; the probe took none
        finally:
            ram.close()
            mem.close()
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_holes_are_found_as_the_ram_file_is_when_asked(tmp_path):
    """The source finds holes when its RAM no longer changes (the push gate):
    a page written after the image was opened is data by then."""
    from migrate.source.ramfile import RamImage
    path = f"/dev/shm/migrate-holes-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, 64 * 4096)
        os.pwrite(fd, b"x", 3 * 4096 + 100)
        ram = RamImage(path)
        try:
            assert os.fstat(fd).st_blocks * 512 == 4096          # opening it populated only the data
            os.pwrite(fd, b"y", 40 * 4096)
            holes = ram.holes()
            assert [p for p in range(64) if p not in holes] == [3, 40]
            os.pwrite(fd, bytes(64 * 4096), 0)                  # every block written: no holes at all
            assert ram.holes() is None
        finally:
            ram.close()
    finally:
        os.close(fd)
        os.unlink(path)


def _mapped_kib(path: str) -> int:
    """Rss of this process's mappings of path (/proc/self/smaps)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behind", [False, True])
def test_a_ram_image_populates_its_mapping(tmp_path, behind):
    """The source's RAM mapping has its page tables filled ahead of the reads
    (MADV_POPULATE_READ), at once or on a thread (a pre-copy source, while it
    connects); the file's holes are left alone."""
    import threading
    from migrate.source.ramfile import RamImage

    path = f"/dev/shm/migrate-test-populate-{os.getpid()}"
    errors: list = []
    hook, threading.excepthook = threading.excepthook, lambda a: errors.append(a.exc_value)
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(8 << 20))
            f.seek(16 << 20)            # a hole of 8 MiB, then 8 MiB of data
            f.write(os.urandom(8 << 20))
        ram = RamImage(path, populate_behind=behind)
        try:
            ram._populating.join(10)
            assert not errors, errors
            assert _mapped_kib(path) == 16 << 10   # the data, not the hole
        finally:
            ram.close()
    finally:
        threading.excepthook = hook
        os.unlink(path)

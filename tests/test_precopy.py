"""Pre-copy, then post-copy (issue 20): the source guest's writes tracked with
async write-protect and PAGEMAP_SCAN, rounds of pages while it runs, the
switch with the final written list, and the failures of each side."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import grpc
import pytest

from migrate.memory import GuestMemory
from migrate.pagestate import PageBitmap
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration, PrecopyMigration
from migrate.source.wp import WriteTracker
from migrate.uffd import Userfaultfd
from migrate.wire.attach import Region
from migrate.wire.protocol import DEMAND_MAGIC, PRECOPY_MAGIC, PROTOCOL_VERSION, PUSH_MAGIC, channel

pytestmark = pytest.mark.timeout(120)

BACKINGS = ["tmpfs", pytest.param("hugetlbfs", marks=pytest.mark.huge)]


def need_wp(host, backing, huge_free, pages=16):
    why = host.why_not("wp_async")
    if why:
        pytest.skip(why)
    if backing.startswith("hugetlbfs") and huge_free < pages:
        pytest.skip(f"{pages} free 2 MiB huge pages needed, {huge_free} could be reserved")


@pytest.mark.parametrize("backing", BACKINGS)
def test_scan_returns_the_pages_written_since_the_last_scan(host, huge_pages, backing):
    need_wp(host, backing, huge_pages)
    size = 32 << 20
    mem = GuestMemory.create(backing, size, map_alias=False)
    uffd = Userfaultfd.create()
    tracker = WriteTracker(uffd, os.getpid(), [Region(mem.guest_addr, size, 0)], mem.page_size)
    try:
        tracker.protect_all()
        view = mem.guest_view(0, size)
        npages = size // mem.page_size
        # a page written before protect_all and not since is not reported
        first = random.Random(1).sample(range(npages), npages // 3)
        for p in first:
            view[p * mem.page_size + 17] = b"\x01"
        r = tracker.scan()
        assert r.pages == len(first)
        assert sorted(p for p, n in r.written.runs() for p in range(p, p + n)) == sorted(first)
        # nothing written since: nothing reported, and the pages are protected again
        assert tracker.scan().pages == 0
        view[5 * mem.page_size + mem.page_size - 1] = b"\x02"
        r = tracker.scan()
        assert list(r.written.runs()) == [(5, 1)]
        # into: the scan adds to a bitmap it is given
        acc = PageBitmap(npages)
        acc.set(0)
        view[7 * mem.page_size] = b"\x03"
        assert tracker.scan(acc).pages == 1
        assert list(acc.runs()) == [(0, 1), (7, 1)]
    finally:
        tracker.close()
        # unprotected: the guest writes on, and nothing is tracked or blocked
        mem.guest_view(0, size)[0] = b"\x04"
        uffd.close()
        mem.close()


def test_a_page_written_before_its_chunk_is_protected_is_not_tracked(host, huge_pages):
    """Round 1 protects each chunk right before it reads it (protect_pages):
    a write before then costs the guest no fault and needs no tracking (the
    round reads the new bytes); a write after it is reported by the scan."""
    need_wp(host, "tmpfs", huge_pages)
    size = 8 << 20
    mem = GuestMemory.create("tmpfs", size, map_alias=False)
    uffd = Userfaultfd.create()
    tracker = WriteTracker(uffd, os.getpid(), [Region(mem.guest_addr, size, 0)], mem.page_size)
    try:
        tracker.start_register()
        tracker.register()
        npages, ps = size // mem.page_size, mem.page_size
        view = mem.guest_view(0, size)
        half = npages // 2
        tracker.protect_pages(0, half)
        view[3 * ps] = b"\x01"            # protected chunk: tracked
        view[(half + 9) * ps] = b"\x02"   # not protected yet: not tracked
        tracker.protect_pages(half, npages - half)
        view[(half + 20) * ps] = b"\x03"  # protected since: tracked
        r = tracker.scan()
        assert list(r.written.runs()) == [(3, 1), (half + 20, 1)], list(r.written.runs())
        assert tracker.protect_seconds > 0
    finally:
        tracker.close()
        uffd.close()
        mem.close()


@pytest.mark.timeout(120)
def test_the_c_test_of_write_tracking(host, tmp_path):
    """native/tests/test_wp.c: 1 GiB memfd, protect all, 1000 scattered
    writes found exactly, the next scan only what was written since, and a
    scan of an unregistered range refused."""
    need_wp(host, "tmpfs", 0)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc) to build native/tests/test_wp.c")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "test_wp")
    subprocess.run([cc, "-O2", "-std=gnu11", "-Wall", "-Werror", "-Inative", "native/tests/test_wp.c",
                    "native/src_wp.c", "native/uffd.c", "-o", exe], cwd=root, check=True, timeout=60)
    r = subprocess.run([exe, "1024"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " distinct of 1000 writes found in " in r.stdout


# -- the whole flow, with a writing source guest ----------------------------------

M = 1 << 20


def events(p, name: str) -> list[dict]:
    return [e for e in p.lines if e.get("event") == name]


def check_verified(out: dict) -> None:
    """The destination guest's RAM, after the migration, is the source guest's
    at its pause, byte for byte (digests), and every page holds the stamp
    its generation table names (no stale copy was mapped)."""
    assert "failed" not in out, out.get("failed")
    g, sg = out["guest"], out["source_guest"]
    assert g["verified"] and g["mismatches"] == 0, g
    assert sg["complete"] and sg["pauses"] == 1
    assert g["ram_sha256"] == sg["ram_sha256"]
    assert g["pages_written"] > 0   # the writer's pages came over, not the image alone


@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.timeout(180)
def test_precopy_with_a_writer_switches_and_verifies(tmp_path, host, huge_pages, backing):
    need_wp(host, backing, huge_pages, pages=2 * 32)
    size = 64 * M
    with PrecopyMigration(str(tmp_path), size, backing=backing, seed=5) as lm:
        out = lm.run(150)
        check_verified(out)
        rounds = events(lm.source, "round")
        npages = size // lm.page_size
        assert rounds[0]["pages_sent"] == npages and rounds[0]["round"] == 1
        for r in rounds[1:]:
            assert r["pages_sent"] == rounds[r["round"] - 2]["pages_written"]   # what the scan before found
        s = out["source"]
        assert s["precopy_rounds"] == len(rounds)
        switch = lm.source.wait_event("switch", 1)
        dswitch = lm.dest.wait_event("switch", 1)
        assert dswitch["pages_written"] == switch["pages_written"] == s["precopy_final_written"]
        assert dswitch["pages_received"] == npages - switch["pages_written"]
        d = out["dest"]
        assert d["state"] == "complete" and d["pages_total"] == npages


@pytest.mark.parametrize("how", ["tls", "grpc"])
@pytest.mark.timeout(180)
def test_precopy_over_tls_and_over_the_grpc_stream(tmp_path, host, huge_pages, how):
    """The rounds on the raw pre-copy channel with TLS (its runs, the count
    at its end and the held channels all through the TLS session), and with
    --transport grpc on the Precopy stream: both verify."""
    need_wp(host, "tmpfs", huge_pages)
    size = 32 * M
    kw = {"tls": True} if how == "tls" else {"source_args": ("--transport", "grpc")}
    with PrecopyMigration(str(tmp_path), size, seed=9, **kw) as lm:
        out = lm.run(150)
        check_verified(out)
        assert events(lm.source, "round")[0]["pages_sent"] == size // 4096
        assert out["dest"]["state"] == "complete"
        switched = lm.dest.wait_event("switched", 1)
        assert switched["handler_ms"] > 0
        if how == "tls":
            # the demand and push channels, and the pre-copy one, each made a TLS handshake
            assert len(events(lm.dest, "tls")) >= 3


@pytest.mark.timeout(180)
def test_pages_written_after_the_last_round_are_fetched_again(tmp_path, host, huge_pages):
    """One round only (--switch-below past the guest's size): every page the
    writer touched during it or after it is in the final list, is not mapped
    from its pre-copy draft, and arrives again after the switch (demand or
    push). The generation table shows any stale draft that was mapped."""
    need_wp(host, "tmpfs", huge_pages)
    size = 32 * M
    with PrecopyMigration(str(tmp_path), size, seed=6, write_pages=512, write_every_ms=10,
                          source_args=("--switch-below", str(size))) as lm:
        out = lm.run(150)
        check_verified(out)
        s = out["source"]
        assert s["precopy_rounds"] == 1
        final = s["precopy_final_written"]
        assert final > 0
        # after the switch only the listed pages went out: each again
        assert s["pages_sent_push"] + s["pages_sent_demand"] >= final
        d = out["dest"]
        assert d["pages_demand"] + d["pages_pushed"] == size // 4096
        switch = lm.dest.wait_event("switch", 1)
        assert switch["pages_received"] == size // 4096 - final


def busy(lm_kw: dict) -> dict:
    """A writer that never lets a round come back empty, and only the
    switch under test enabled."""
    return dict(write_pages=256, write_every_ms=1, **lm_kw)


@pytest.mark.timeout(180)
def test_switch_after_seconds(tmp_path, host, huge_pages):
    need_wp(host, "tmpfs", huge_pages)
    with PrecopyMigration(str(tmp_path), 32 * M, **busy(dict(seed=8, source_args=(
            "--switch-below", "-1", "--switch-stall", "0", "--switch-after", "2")))) as lm:
        out = lm.run(150)
        check_verified(out)
        sw = lm.source.wait_event("switch", 1)
        assert sw["reason"] == "--switch-after 2 s"
        assert sw["rounds"] >= 2


@pytest.mark.parametrize("how", ["signal", "command"])
@pytest.mark.timeout(180)
def test_switch_when_asked(tmp_path, host, huge_pages, how):
    need_wp(host, "tmpfs", huge_pages)
    with PrecopyMigration(str(tmp_path), 32 * M, **busy(dict(seed=9, source_args=(
            "--switch-below", "-1", "--switch-stall", "0")))) as lm:
        lm.start()
        lm.source.wait_event("round", 60)
        lm.source.wait_event("round", 60)   # a second round: pre-copy goes on by itself
        if how == "signal":
            os.kill(lm.source.p.pid, signal.SIGUSR1)
        else:
            r = subprocess.run([sys.executable, "-m", "migrate", "status", "--source", lm.control, "--json"],
                               capture_output=True, text=True, timeout=30)
            m = json.loads(r.stdout)["migrations"][0]
            assert m["state"] == "connected" and m["precopy_rounds"][-1]["round"] >= 2
            r = subprocess.run([sys.executable, "-m", "migrate", "status", "--source", lm.control, "--switch"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"switch": "after the current round"}
        sw = lm.source.wait_event("switch", 60)
        assert sw["reason"] == "asked to"
        for p in (lm.source, lm.guest, lm.dest, lm.source_guest):
            assert p.wait(120) == 0, p.stderr_lines[-5:]
        check_verified({"guest": lm.guest.summary(), "source_guest": lm.source_guest.summary()})


@pytest.mark.timeout(180)
def test_destination_killed_mid_precopy_leaves_the_source_guest_running(tmp_path, host, huge_pages):
    """The destination dies during pre-copy: the source agent unprotects the
    guest, says so and exits 5; the source guest writes on."""
    need_wp(host, "tmpfs", huge_pages)
    with PrecopyMigration(str(tmp_path), 32 * M, **busy(dict(seed=10, source_args=(
            "--switch-below", "-1", "--switch-stall", "0")))) as lm:
        lm.start()
        lm.source.wait_event("round", 60)
        assert wp_flags(lm.source_guest.p.pid) == [True]
        lm.dest.kill()
        assert lm.source.wait(60) == 5
        err = lm.source.errors()[-1]
        assert err.startswith("pre-copy failed before the switch: ")
        assert err.endswith("The source guest runs on, untouched; run the migration again")
        lost = lm.source_guest.wait_event("agent_lost", 30)
        later = lm.source_guest.wait_event("writes", 30)
        later = lm.source_guest.wait_event("writes", 30)
        assert later["writes"] > lost["writes"]
        assert lm.source_guest.p.poll() is None
        assert not events(lm.source_guest, "paused")
        # the agent removed its write-protect registration on the way out
        assert wp_flags(lm.source_guest.p.pid) == [False]


def wp_flags(pid: int) -> list[bool]:
    """For each mapping of the source guest's RAM (its memfd): whether it is
    registered for userfaultfd write-protect (smaps VmFlags "uw")."""
    out, ram = [], False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                ram = "memfd:source-guest" in line
            elif line.startswith("VmFlags:") and ram:
                out.append("uw" in line.split())
    return out


@pytest.mark.timeout(180)
def test_source_killed_mid_precopy_the_destination_drops_and_waits(tmp_path, host, huge_pages):
    """The source agent dies during pre-copy: the destination maps nothing of
    what it had, waits, and a new pre-copy (a new source guest, as after a
    restart) completes; its pages, not the first one's, are what the guest
    ends with."""
    need_wp(host, "tmpfs", huge_pages)
    size = 32 * M
    with PrecopyMigration(str(tmp_path), size, seed=11, source_args=(
            "--switch-below", "-1", "--switch-stall", "0")) as lm:
        lm.start()
        lm.source.wait_event("round", 60)
        lm.source.kill()
        ev = lm.dest.wait_event("disconnected", 60)
        assert ev["received"] == 0
        first_guest = lm.source_guest
        first_guest.wait_event("agent_lost", 30)
        first_guest.kill()
        lm.source_args = []
        lm.write_pages = 128
        lm.start_source()
        lm.start_source_guest()
        dropped = lm.dest.wait_event("precopy_dropped", 60)
        assert dropped["pages"] > 0
        for p in (lm.source, lm.guest, lm.dest, lm.source_guest):
            assert p.wait(120) == 0, p.stderr_lines[-5:]
        check_verified({"guest": lm.guest.summary(), "source_guest": lm.source_guest.summary()})


# -- hostile sources ----------------------------------------------------------------

HSIZE = 16 * M
HPAGES = HSIZE // 4096
PAGE = bytes(range(256)) * 16


@pytest.fixture
def waiting(tmp_path, host):
    """dest + an attached destination guest, no source yet."""
    lm = LocalMigration(str(tmp_path), HSIZE, seed=31)
    lm.start_dest()
    lm.start_guest()
    lm.dest.wait_event("attached", 60)
    yield lm
    lm.close()


def open_precopy(lm, **fields):
    f = dict(version=PROTOCOL_VERSION, ram_size=HSIZE, page_size=4096, source_name="liar",
             compression=[pb.COMPRESSION_NONE], precopy=True)
    f.update(fields)
    ch = channel(lm.address, "liar")
    stub = pbg.MigrationStub(ch)
    return ch, stub, stub.Open(pb.Hello(**f), timeout=30)


def precopy_pages(stub, w, pages):
    n = len(pages)
    return stub.Precopy(iter([pb.PageBatch(session_id=w.session_id, token=w.demand_token),
                              pb.PageBatch(pages=pages, zero=bytes((n + 7) // 8), data=PAGE * n,
                                           raw_length=4096 * n)]), timeout=30)


def switch(stub, w, written):
    return stub.Switch(pb.SwitchRequest(session_id=w.session_id, token=w.demand_token, written=written), timeout=30)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value


@pytest.mark.timeout(120)
def test_a_bad_written_list_is_refused_and_drops_its_source(waiting):
    """Out of range, too many, not ascending, twice: each refused with what
    was wrong, before anything changes; the source is dropped and nothing
    was mapped."""
    lm = waiting
    cases = [
        ([5, HPAGES], f"Switch lists written page {HPAGES} (entry 1), outside the layout of {HPAGES} pages"),
        (list(range(HPAGES + 1)), f"Switch lists {HPAGES + 1} written pages, more than the guest's {HPAGES}"),
        ([7, 3], "Switch lists written page 3 after page 7 (entry 1): the list must be strictly ascending"),
        ([4, 4], "Switch lists written page 4 after page 4 (entry 1): the list must be strictly ascending"),
    ]
    for written, why in cases:
        ch, stub, w = open_precopy(lm)
        assert precopy_pages(stub, w, [1, 2, 3]).pages_placed == 3
        e = refusal(lambda: switch(stub, w, written))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == why
        ev = lm.dest.wait_event("disconnected", 30)
        assert ev["received"] == 0
        ch.close()
    assert lm.guest.p.poll() is None and not [e for e in lm.guest.lines if e.get("event") == "running"]


@pytest.mark.timeout(120)
def test_a_second_switch_and_a_precopy_open_after_it_are_refused(waiting):
    lm = waiting
    ch, stub, w = open_precopy(lm)
    precopy_pages(stub, w, [0, 1, 2])
    r = switch(stub, w, [1])
    assert r.pages_received == 2
    e = refusal(lambda: switch(stub, w, []))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "a second Switch: a session switches from pre-copy once"
    lm.dest.wait_event("disconnected", 30)
    e = refusal(lambda: open_precopy(lm))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == ("pre-copy starts a session, it cannot resume one: this guest holds pages already; "
                           "resume it without --precopy")
    ch.close()


@pytest.mark.timeout(120)
def test_precopy_pages_after_the_switch_are_refused(waiting):
    lm = waiting
    ch, stub, w = open_precopy(lm)
    precopy_pages(stub, w, [0, 1])
    switch(stub, w, [])
    e = refusal(lambda: precopy_pages(stub, w, [0]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "pre-copy pages after the switch: a source sends Precopy batches only before its Switch"
    lm.dest.wait_event("disconnected", 30)
    ch.close()


@pytest.mark.timeout(120)
def test_channels_opened_before_the_switch_are_held_until_it(waiting):
    """A pre-copy source opens its demand and push channels before its
    switch (so that the guest's pause does not include connecting them).
    The destination holds them: nothing is read from them or sent on them,
    a push run sent on one before the switch is not placed, the guest does
    not run; a second demand channel and a ninth push channel are refused;
    a channel with a wrong token is refused. The switch releases them."""
    lm = waiting
    ch, stub, w = open_precopy(lm)
    host = lm.address.rpartition(":")[0]

    def open_raw(magic, token=w.demand_token):
        s = socket.create_connection((host, w.demand_port), timeout=10)
        s.sendall(magic + token)
        return s

    demand = open_raw(DEMAND_MAGIC)
    pushes = [open_raw(PUSH_MAGIC) for _ in range(8)]
    # a run for page 5 (not zero, its bytes follow), before the switch
    pushes[0].sendall(struct.pack("<QII", 5, 1, 0) + b"\0" + PAGE)
    assert precopy_pages(stub, w, [1, 2, 3]).pages_placed == 3
    time.sleep(1.1)   # (the agent reports one refusal of a kind a second)
    extra = open_raw(DEMAND_MAGIC)
    assert extra.recv(8) == b""
    extra.close()
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"].startswith("demand channel from ")
    assert ev["message"].endswith(" refused: its source holds a demand channel already, waiting for its switch")
    time.sleep(1.1)
    extra = open_raw(PUSH_MAGIC)
    assert extra.recv(8) == b""
    extra.close()
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"].endswith(" refused: its source has 8 push channels open already, the most a source may")
    time.sleep(1.1)
    extra = open_raw(PUSH_MAGIC, bytes(len(w.demand_token)))
    assert extra.recv(8) == b""
    extra.close()
    assert lm.dest.wait_event("error", 30)["message"].endswith("with an unknown magic or token: closed")
    # held: open, nothing sent on them, the guest does not run, nothing is demanded
    for s in (demand, *pushes):
        s.settimeout(0.2)
        with pytest.raises(socket.timeout):
            s.recv(8)
    assert not [e for e in lm.guest.lines if e.get("event") == "running"]
    assert not [e for e in lm.dest.lines if e.get("event") == "demand"]
    r = switch(stub, w, [2])
    got = PageBitmap(HPAGES)
    got.load_bytes(r.received_bitmap)
    # pages 1 and 3 staged and not written since; page 5's run was never read before the switch
    assert r.pages_received == 2 and got.count() == 2 and got.test(1) and got.test(3) and not got.test(5)
    # the switch released the held demand channel: the guest runs, and faults go out on it
    lm.dest.wait_event("demand", 30)
    demand.settimeout(30)
    assert len(demand.recv(8)) > 0
    for s in (demand, *pushes):
        s.close()
    ch.close()


def raw_run(first, count, flags=0, zero=()):
    bits = bytearray((count + 7) // 8)
    for i in zero:
        bits[i // 8] |= 1 << (i % 8)
    return struct.pack("<QII", first, count, flags) + bytes(bits) + PAGE * (count - len(zero))


def read_ack(s) -> int:
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    got = b""
    while len(got) < 8:
        b = s.recv(8 - len(got))
        assert b, "the destination closed the pre-copy channel without its count"
        got += b
    return int.from_bytes(got, "little")


@pytest.mark.timeout(120)
def test_the_raw_precopy_channel_writes_runs_and_answers_their_count(waiting):
    """Round pages on the raw pre-copy channel: written into the page cache
    only, a page sent again overwrites; the end of the channel is answered
    with the pages written; a second pre-copy channel is refused, and one
    after the switch; the Switch makes them received."""
    lm = waiting
    ch, stub, w = open_precopy(lm)
    host = lm.address.rpartition(":")[0]

    def open_raw(magic):
        s = socket.create_connection((host, w.demand_port), timeout=10)
        s.sendall(magic + w.demand_token)
        return s

    def refused(why: str) -> None:
        # closed without a word, and the destination says why
        s = open_raw(PRECOPY_MAGIC)
        assert s.recv(8) == b""
        s.close()
        assert lm.dest.wait_event("error", 30)["message"].endswith(f" refused: {why}")

    pre = open_raw(PRECOPY_MAGIC)
    pre.sendall(raw_run(0, 4) + raw_run(2, 3, zero=(1,)) + raw_run(10, 1))
    time.sleep(0.5)
    refused("its source has a pre-copy channel open already (one: its pages must arrive in order)")
    assert read_ack(pre) == 8
    pre.close()
    assert not [e for e in lm.guest.lines if e.get("event") == "running"]
    r = switch(stub, w, [10])
    assert r.pages_received == 5   # pages 0-4; page 10 was written since
    time.sleep(1.1)
    refused("its source is not in pre-copy: a pre-copy channel opens between a pre-copy Open and its Switch")
    ch.close()


@pytest.mark.timeout(120)
def test_an_open_precopy_channel_holds_the_deadline_off_and_its_end_starts_it(waiting):
    """A pre-copy source must open its pre-copy channel within 15 s of Open;
    while the channel is open it is not dropped, however long the rounds
    take; once it ended the channel, its Switch is due within 15 s."""
    lm = waiting
    ch, stub, w = open_precopy(lm)
    host = lm.address.rpartition(":")[0]
    s = socket.create_connection((host, w.demand_port), timeout=10)
    s.sendall(PRECOPY_MAGIC + w.demand_token + raw_run(0, 2))
    time.sleep(17)
    assert not [e for e in lm.dest.lines if e.get("event") == "disconnected"]
    t0 = time.monotonic()
    assert read_ack(s) == 2
    ev = lm.dest.wait_event("disconnected", 40)
    assert time.monotonic() - t0 > 13
    assert "no demand channel within 15 s of the end of pre-copy" in ev["message"]
    s.close()
    ch.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run, why", [
    (raw_run(HPAGES - 2, 3), f"pre-copy run of 3 pages at page {HPAGES - 2} does not fit the layout of "
                             f"{HPAGES} pages (at most 1024 pages a run)"),
    (struct.pack("<QII", 0, 2000, 0), f"pre-copy run of 2000 pages at page 0 does not fit the layout of {HPAGES} "
                                      "pages (at most 1024 pages a run)"),
    (raw_run(0, 2, flags=1), "pre-copy run at page 0 has flags 0x1: pre-copy runs are dense (flags 0)"),
])
def test_a_bad_precopy_run_drops_its_source_and_stages_nothing(waiting, run, why):
    lm = waiting
    ch, stub, w = open_precopy(lm)
    host = lm.address.rpartition(":")[0]
    s = socket.create_connection((host, w.demand_port), timeout=10)
    s.sendall(PRECOPY_MAGIC + w.demand_token + raw_run(5, 1) + run)
    ev = lm.dest.wait_event("error", 30)
    assert ev["message"] == f"bad pre-copy run: {why}"
    ev = lm.dest.wait_event("disconnected", 30)
    assert ev["received"] == 0
    s.settimeout(30)
    assert s.recv(8) == b""   # closed, no count
    s.close()
    # the next source's Open drops what this one staged, none of it mapped
    ch2, stub2, w2 = open_precopy(lm)
    assert lm.dest.wait_event("precopy_dropped", 30)["pages"] == 1
    ch.close()
    ch2.close()


@pytest.mark.timeout(180)
def test_bench_precopy_reports_the_fault_fraction(host, huge_pages):
    need_wp(host, "tmpfs", huge_pages)
    from benchmarks import precopy
    r = precopy.measure(size=32 * M, log=lambda _: None)
    assert r["ok"], r
    assert r["pages_total"] == 32 * M // 4096
    assert 0 <= r["precopy_fault_fraction"] == round(r["demand_faults_after_switch"] / r["pages_total"], 6)
    assert r["pages_per_round"][0] == r["pages_total"] and r["rounds"] == len(r["pages_per_round"])
    assert r["protect_all_ms"] > 0 and r["scan_ms_max"] > 0 and r["precopy_guest_slowdown"] > 0


@pytest.mark.timeout(180)
def test_destination_killed_after_the_switch_leaves_the_source_guest_paused(tmp_path, host, huge_pages):
    """After the switch the guest may run at the destination: a source guest
    whose agent gives up then stays paused (never two running copies)."""
    need_wp(host, "tmpfs", huge_pages)
    with PrecopyMigration(str(tmp_path), 16 * M, **busy(dict(seed=12, source_args=(
            "--switch-below", "-1", "--switch-stall", "0", "--max-rate", "4M", "--recovery-window", "0")))) as lm:
        lm.start()
        os.kill(lm.guest.p.pid, signal.SIGSTOP)   # no demand: the push alone, slowly, brings the rest
        r1 = lm.source.wait_event("round", 60)
        assert r1["seconds"] >= 0.9 * 16 / 4   # --max-rate paces pre-copy too
        os.kill(lm.source.p.pid, signal.SIGUSR1)
        sw = lm.source.wait_event("switch", 60)
        assert sw["pages_written"] > 0
        lm.dest.kill()
        os.kill(lm.guest.p.pid, signal.SIGCONT)
        assert lm.source.wait(60) == 1
        ev = lm.source_guest.wait_event("agent_lost", 30)
        assert ev["paused"] is True
        a = lm.source_guest.wait_event("writes", 30)
        b = lm.source_guest.wait_event("writes", 30)
        assert a["writes"] == b["writes"] == ev["writes"]
        assert lm.source_guest.p.poll() is None


@pytest.mark.timeout(120)
def test_source_guest_gone_mid_precopy(tmp_path, host, huge_pages):
    """The source guest's process exits during pre-copy: the source agent
    says so and exits 1; the destination drops it and waits."""
    need_wp(host, "tmpfs", huge_pages)
    with PrecopyMigration(str(tmp_path), 32 * M, **busy(dict(seed=13, source_args=(
            "--switch-below", "-1", "--switch-stall", "0")))) as lm:
        lm.start()
        lm.source.wait_event("round", 60)
        pid = lm.source_guest.p.pid
        lm.source_guest.kill()
        assert lm.source.wait(60) == 1
        # (no switch comes here: the next scan finds it gone)
        assert lm.source.errors()[-1] == (f"the source guest (pid {pid}) went away during pre-copy: nothing is "
                                          "left to migrate")
        ev = lm.dest.wait_event("disconnected", 30)
        assert ev["received"] == 0


@pytest.mark.parametrize("args, error", [
    ([], "--precopy needs --attach SOCKET: the source guest attaches there (guestsim --role source, or QEMU "
         "with the shim)"),
    (["--attach", "/nonexistent-dir/x.sock", "--ram", "/dev/null"],
     "--precopy takes the guest's RAM from its attach: give neither --ram nor --resume"),
])
@pytest.mark.timeout(60)
def test_precopy_usage_errors(args, error):
    r = subprocess.run([sys.executable, "-m", "migrate", "source", "--precopy", "--to", "127.0.0.1:9", "--json",
                        *args], capture_output=True, text=True, timeout=50)
    assert r.returncode == 2
    assert json.loads(r.stdout.splitlines()[-1]) == {"event": "error", "message": error}


@pytest.mark.timeout(60)
def test_no_source_guest_attaches(tmp_path):
    r = subprocess.run([sys.executable, "-m", "migrate", "source", "--precopy", "--to", "127.0.0.1:9", "--json",
                        "--attach", str(tmp_path / "src.sock"), "--attach-timeout", "0.5"],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 2
    assert json.loads(r.stdout.splitlines()[-1])["message"] == (
        f"no source guest attached to {tmp_path / 'src.sock'} within 0.5 s")
    assert not os.path.exists(tmp_path / "src.sock")


@pytest.mark.timeout(120)
def test_an_idle_guest_waits_between_scans(tmp_path, host, huge_pages):
    """Rounds that find nothing written wait IDLE_ROUND before the next scan
    (and keep the stream alive) rather than spin."""
    need_wp(host, "tmpfs", huge_pages)
    from migrate.source.precopy import IDLE_ROUND
    with PrecopyMigration(str(tmp_path), 16 * M, write_pages=1, write_every_ms=600_000, seed=14, source_args=(
            "--switch-below", "-1", "--switch-stall", "0", "--switch-after", "1")) as lm:
        out = lm.run(100)
        check_verified(out)
        rounds = events(lm.source, "round")
        idle = [r for r in rounds if r["pages_sent"] == 0]
        assert idle and all(r["seconds"] >= IDLE_ROUND for r in idle)
        assert len(rounds) <= 2 + 1.0 / IDLE_ROUND


@pytest.mark.timeout(120)
def test_a_precopy_stream_on_a_plain_session_is_refused(waiting):
    lm = waiting
    ch, stub, w = open_precopy(lm, precopy=False)
    e = refusal(lambda: precopy_pages(stub, w, [1]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "Precopy stream on a session opened without Hello.precopy"
    lm.dest.wait_event("disconnected", 30)
    ch.close()

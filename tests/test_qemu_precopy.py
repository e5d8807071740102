"""Pre-copy with a real QEMU (issue 20): the writing guest, and QEMU's own
pre-copy-then-post-copy, the baseline `migrate bench --qemu --precopy`
compares this engine's pre-copy with.

The guest is examples/qemu's memfill with its writer on (memfill_write=N on
the guest's kernel command line): N random pages every 100 ms, each with a
per-page generation kept in guest RAM, and VERIFY checks every page against
its last one, so a write a migration lost shows as VERIFY BAD. The first
test checks that on the host, without QEMU: memfill is an ordinary static
Linux program, and a lost write is made by hand through /proc/PID/mem.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import time

import pytest

from tests.test_qemu import EXAMPLES, guest  # noqa: F401 - the module-scoped guest fixture

MEM_MB = 384
M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _page(p: int, gen: int) -> bytes:
    """Page p at generation gen, as memfill writes it."""
    return struct.pack("<512Q", *(_splitmix64((p * 512 + i) ^ (gen << 40)) for i in range(512)))


def _anon_mapping(pid: int, size: int) -> int:
    """The start of pid's one private anonymous mapping of exactly `size` bytes."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if hi - lo == size and len(parts) == 5:
                found.append(lo)
    assert len(found) == 1, f"mappings of {size} bytes in pid {pid}: {found}"
    return found[0]


def _read_until(proc, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"memfill printed no /{pattern}/ within {timeout} s")


@pytest.mark.timeout(60)
def test_the_writers_verify_catches_a_lost_write(tmp_path):
    """memfill -w on the host: every page verifies against its last
    generation after the writer's ticks; then one written page is put back
    to its fill pattern (a write a migration would have lost, the page sent
    before it was written and never again) and VERIFY names that page."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is missing (apt-get install gcc)")
    if os.geteuid() != 0:
        pytest.skip("needs root: writes another process's memory through /proc/PID/mem")
    exe = tmp_path / "memfill"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), os.path.join(EXAMPLES, "guest", "memfill.c")],
                   check=True, timeout=60)
    pages = 4096   # 16 MiB; its generation table is 16 KiB
    # a tick of 200 ms: the page is put back well inside the pause after a
    # verify, before the writer's next tick
    proc = subprocess.Popen([str(exe), "-m", "16", "-w", "256", "-t", "200"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        _read_until(proc, r"WRITER 256 pages every 200 ms")
        ticks = [int(_read_until(proc, r"TICK (\d+) \d+").group(1)) for _ in range(4)]
        assert ticks == [1, 2, 3, 4]
        proc.stdin.write("\n")
        assert _read_until(proc, r"VERIFY \w+ \d+").group(0) == f"VERIFY OK {pages}"
        proc.send_signal(signal.SIGSTOP)   # no tick while the page is put back
        buf = _anon_mapping(proc.pid, pages * 4096)
        table = _anon_mapping(proc.pid, pages * 4)
        with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(table)
            gens = struct.unpack(f"<{pages}I", mem.read(pages * 4))
            assert sum(gens) == 4 * 256   # four ticks of 256 pages
            lost = next(p for p, g in enumerate(gens) if g >= 2)
            mem.seek(buf + lost * 4096)
            assert mem.read(4096) == _page(lost, gens[lost])   # memfill's pattern, computed here
            mem.seek(buf + lost * 4096)
            mem.write(_page(lost, gens[lost] - 1))   # its write before last: the last one lost
        proc.stdin.write("\n")   # read before the next tick is due
        proc.send_signal(signal.SIGCONT)
        m = _read_until(proc, r"VERIFY (OK|BAD) (\d+)[^\n]*")
        assert m.group(1) == "BAD" and int(m.group(2)) == lost, m.group(0)
        assert m.group(0).endswith(f" gen {gens[lost]}"), m.group(0)
    finally:
        proc.kill()
        proc.wait(10)


def _precopy_ticks(res: dict) -> int:
    """The writer's ticks between the source agent's start and the source QEMU's STOP."""
    return sum(1 for t, _ in res["ticks"] if res["t_start"] < t <= res["src_stop_time"])


@pytest.mark.timeout(300)
def test_qemu_guest_writing_during_precopy_migrates(guest):  # noqa: F811 - the fixture
    """`migrate source --precopy --attach --qmp`: the source QEMU runs under
    the shim, its guest writes 256 pages every 100 ms; rounds go out while it
    writes, the switch stops it over QMP, and the destination guest finds
    every page at its last written generation (VERIFY OK). Never two running
    copies: the source stopped before the destination resumed, and stays so."""
    from migrate.qemu import localrun
    res = localrun.run_precopy(guest, MEM_MB, writer=256, log=lambda m: print(m, flush=True))
    print({k: res.get(k) for k in ("verify", "downtime_ms", "total_ms", "precopy_ms", "switch")})
    assert res["verify"] == f"VERIFY OK {res['pages']} {res['guest_verify_ms']} ms", res
    assert res["verify_local"].startswith(f"VERIFY OK {res['pages']} ")
    assert res["source_rc"] == 0 and res["dest_rc"] == 0, res.get("errors")
    # the guest wrote while the rounds went out, and the tracker saw it
    assert _precopy_ticks(res) > 0
    assert res["rounds"] and res["rounds"][0]["pages_sent"] == MEM_MB * 256
    assert res["rounds"][0]["pages_written"] > 0, res["rounds"]
    sw = res["switch"]
    assert sw["rounds"] == len(res["rounds"]) and sw["pages_received"] + sw["pages_written"] <= MEM_MB * 256, sw
    assert res["source"]["precopy_final_written"] == sw["pages_written"]
    assert res["src_stop_time"] < res["dst_resume_time"]
    assert res["src_status_at_dst_running"] in ("paused", "postmigrate")
    assert not res["src_resumed"] and res["src_status_after"] in ("paused", "postmigrate")
    assert res["dst_status_after"] == "running"
    assert res["dest"]["state"] == "complete"


@pytest.mark.timeout(300)
def test_destination_killed_mid_precopy_leaves_the_source_qemu_running(guest):  # noqa: F811 - the fixture
    """SIGKILL the destination agent during the first pre-copy round: the
    source agent exits saying the guest runs on, the source QEMU was never
    stopped and is running (QMP), and its guest goes on writing."""
    from migrate import exits
    from migrate.qemu import localrun
    # (it never switches by itself: the kill comes during the rounds however fast they go)
    res = localrun.run_precopy(guest, MEM_MB, writer=256, log=lambda m: print(m, flush=True), kill_dest=True,
                               source_args=("--switch-below", "-1", "--switch-stall", "0"))
    print({k: res.get(k) for k in ("source_rc", "source_errors", "src_status_after", "ticks_after_kill")})
    assert res["source_rc"] == exits.PRECOPY_ABANDONED, res
    (err,) = res["source_errors"]
    assert err.startswith("pre-copy failed before the switch: ") and "The source guest runs on, untouched" in err
    assert err.endswith("(the source QEMU was not paused: it runs on)"), err
    assert "switch" not in res["source_events"] and "paused" not in res["source_events"]
    assert res["src_status_after"] == "running" and not res["src_stopped"]
    assert res["ticks_before_kill"] > 0 and res["ticks_after_kill"] >= 5, res


@pytest.mark.timeout(300)
def test_a_destination_killed_at_the_switch_leaves_one_vm(guest):  # noqa: F811 - the fixture
    """The destination agent is killed once the source QEMU stopped for the
    switch: its Switch fails without an answer, and QEMU's device state may
    or may not have been written whole. Either the source QEMU runs again
    (its migration was cut short) and the agent says so, or it stays paused
    (it had written everything: the destination might have switched) and
    the agent says that; the destination QEMU never runs the guest."""
    from migrate import exits
    from migrate.qemu import localrun
    res = localrun.run_precopy(guest, MEM_MB, writer=256, log=lambda m: print(m, flush=True), kill_dest="paused")
    print({k: res.get(k) for k in ("source_rc", "source_errors", "src_status_after", "src_migration",
                                   "dst_resumed", "ticks_after_kill")})
    assert res["src_stopped"] and not res["dst_resumed"], res
    (err,) = res["source_errors"]
    if err.startswith("the Switch got no answer") and res["src_migration"] == "completed":
        # QEMU wrote it all and the Switch may have committed: never resumed
        assert res["src_status_after"] == "postmigrate" and "stays paused" in err, res
    if res["src_status_after"] == "running":
        assert res["source_rc"] in (exits.PRECOPY_ABANDONED, exits.FAILED), res
        assert "(the source QEMU was resumed)" in err or "runs on" in err, err
        assert res["ticks_after_kill"] >= 5, res   # the guest writes again
    else:
        assert res["src_status_after"] == "postmigrate" and res["src_migration"] == "completed", res
        assert "stays paused" in err, err
        assert res["source_rc"] not in (exits.COMPLETED, exits.PRECOPY_ABANDONED), res


@pytest.mark.timeout(300)
def test_qemu_own_precopy_then_postcopy_verifies_a_writing_guest(guest):  # noqa: F811 - the fixture
    """The baseline of `migrate bench --qemu --precopy`: QEMU's one pass, then
    migrate-start-postcopy, with the writing guest, RAM + 8 KiB (QEMU 7.2's
    TCG dirty-bitmap bug). The guest verifies, and its loop time is measured
    before and during the pre-copy. (Whether QEMU post-copied or converged
    by itself in the pass after the first, before the switch arrived, is
    QEMU's race: went_postcopy says which.)"""
    from benchmarks.qemu_guest import run_qemu_postcopy
    r = run_qemu_postcopy(guest, MEM_MB, precopy="first-pass", writer=256, log=lambda m: print(m, flush=True))
    print({k: r.get(k) for k in ("verify", "downtime_ms", "total_ms", "precopy_ms", "writer")})
    assert r["verify"].startswith(f"VERIFY OK {r['pages']} "), r
    assert r["ram_extra_kb"] == 8
    wr = r["writer"]
    assert wr["baseline_ticks"] >= 10 and wr["precopy_ticks"] > 0 and wr["slowdown"] > 0, wr


@pytest.mark.timeout(60)
def test_precopy_takes_a_qemus_ram_from_its_attach_not_from_flags(tmp_path):
    """`source --precopy --qmp` is allowed (the QEMU is paused over QMP), but
    its RAM comes from the shim's attach: --ram (or --resume) is refused,
    saying so, before anything listens."""
    import json
    import sys
    r = subprocess.run([sys.executable, "-m", "migrate", "source", "--precopy", "--attach", str(tmp_path / "a.sock"),
                        "--qmp", str(tmp_path / "q.sock"), "--ram", str(tmp_path / "ram"), "--to", "127.0.0.1:9",
                        "--json"], capture_output=True, text=True, timeout=30)
    errors = [e["message"] for e in map(json.loads, r.stdout.splitlines()) if e.get("event") == "error"]
    assert r.returncode == 2 and errors == [
        "--precopy takes the guest's RAM from its attach: give neither --ram nor --resume"], (r.returncode, r.stdout)
    assert not (tmp_path / "a.sock").exists()

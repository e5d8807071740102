"""Working-set hints: dest --record-hints writes the guest's first touches,
source --hints pushes them first, hostile and mismatched hint files are
refused; the adaptive locality window."""

import json
import os
import random
import struct
import subprocess
import sys

import pytest
import zstandard

from migrate import hints
from migrate.sim.localrun import LocalMigration
from migrate.source.scheduler import LOCALITY_MIN, LocalityWindow, Scheduler

HERE = os.path.dirname(os.path.abspath(__file__))
M = 1 << 20
PAGE = 4096


@pytest.fixture(autouse=True)
def _uffd(host):
    if host.why_not("minor_shmem"):
        pytest.skip(host.why_not("minor_shmem"))


# -- record and replay -------------------------------------------------------------
def _touch_run(tmp_path, order: list[int], pause: float, dest_args=(), source_args=()) -> dict:
    """A 4 MiB migration whose guest reads the pages of order in that order
    (touch_guest.py), pausing after each; the push is held to 512 pages a
    second in batches of 4 pages from page 0 and sends no neighbours after a
    fault. Returns the destination's summary and its events."""
    size = 4 * M
    with LocalMigration(str(tmp_path), size, seed=3, dest_args=dest_args,
                        source_args=("--batch-bytes", "16K", "--max-rate", "2M", "--locality-window", "0",
                                     *source_args)) as lm:
        lm.make_image()
        lm.start_dest()
        guest = subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "touch_guest.py"), lm.sock,
                                  str(size), json.dumps(order), str(pause)], stdout=subprocess.PIPE, text=True)
        try:
            lm.dest.wait_event("attached", 30)
            lm.start_source()
            assert lm.source.wait(60) == 0
            assert lm.dest.wait(30) == 0
            assert guest.wait(30) == 0
        finally:
            guest.kill()
            guest.communicate()
        return {"summary": lm.dest.summary(), "events": lm.dest.lines}


@pytest.mark.timeout(90)
def test_record_matches_the_guests_first_touches(tmp_path):
    """200 pages of the upper half read in a random order at once: the push
    (from page 0, slow) reaches none of them first, so every read faults and
    the file holds exactly that order."""
    order = random.Random(5).sample(range(512, 1024), 200)
    path = str(tmp_path / "hints.bin")
    out = _touch_run(tmp_path, order, 0.0, dest_args=("--record-hints", path))
    ev = [e for e in out["events"] if e.get("event") == "hints"]
    assert ev and ev[0]["hint_pages"] == 200
    assert hints.read(path, PAGE, 1024) == order
    assert os.path.getsize(path) < hints.HEADER_SIZE + 200 * 2   # compact: about a varint an entry


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["raw", "grpc"])
def test_record_holds_pages_the_push_sent_before_the_guest_read_them(tmp_path, transport):
    """The guest reads page 1000 (it waits for the source), then 60 pages of
    the first 64 in a random order, 10 ms apart: the push (from page 0, 512
    pages a second) has sent most of them before they are read. Those reads
    are first touches too, and the file holds every one, in order: a pushed
    page is mapped only when the guest touches it while recording (before,
    the push mapped it at once, the read never faulted, and the file held
    only the pages the push had not reached; replayed, it missed the rest)."""
    order = [1000, *random.Random(7).sample(range(64), 60)]
    path = str(tmp_path / "hints.bin")
    out = _touch_run(tmp_path, order, 0.01, dest_args=("--record-hints", path), source_args=("--transport", transport))
    assert hints.read(path, PAGE, 1024) == order
    assert out["summary"]["pages_pushed"] >= 64


@pytest.mark.timeout(120)
def test_hints_cut_demand_faults_on_a_throttled_push(tmp_path):
    """The guest reads 200 pages of the top quarter, 5 ms apart. Without
    hints the push (512 pages a second from page 0) reaches them after
    about 1.5 s, when the guest is done: nearly every read faults. With the
    recorded hints it pushes those 200 pages first, faster than the guest
    reads them."""
    order = random.Random(6).sample(range(768, 1024), 200)
    path = str(tmp_path / "hints.bin")
    without = _touch_run(tmp_path, order, 0.005, dest_args=("--record-hints", path))["summary"]
    with_hints = _touch_run(tmp_path, order, 0.005, source_args=("--hints", path))["summary"]
    assert without["demand_requests"] >= 150, without
    assert with_hints["demand_requests"] <= without["demand_requests"] // 2, (with_hints, without)
    assert with_hints["pages_pushed"] > without["pages_pushed"]


def _workingset(size: int, seed: int, corrupt: int | None = None) -> tuple[list[int], dict]:
    """guestsim's workingset pattern on plain memory holding the image (no
    migration): the pages it read, and its result."""
    import mmap

    from migrate._binding import ffi, lib
    from migrate.sim.guestsim import PATTERNS
    from migrate.sim.ramimage import ImageSpec
    spec = ImageSpec(seed)
    buf = mmap.mmap(-1, size)
    try:
        addr = ffi.cast("uintptr_t", ffi.from_buffer(buf))
        spec.fill(int(addr), 0, size // 4096)
        if corrupt is not None:
            buf[corrupt * PAGE + 100] ^= 0x5A
        n = size // PAGE
        lat = ffi.new("uint32_t[]", n)
        ffi.memmove(lat, b"\xff" * (4 * n), 4 * n)
        res = ffi.new("struct mg_guestsim_result *")
        rc = lib.mg_guestsim_run(ffi.cast("uint8_t *", addr), size, PAGE, seed, spec.zero_ppm, spec.random_ppm,
                                 PATTERNS["workingset"], 1, lat, res)
        assert rc == 0
        read = [i for i in range(n) if lat[i] != 0xFFFFFFFF]
        return read, {"touched": res.pages_touched, "mismatches": res.mismatches}
    finally:
        del addr
        buf.close()


@pytest.mark.timeout(60)
def test_workingset_guest_reads_the_same_tenth_of_its_ram_every_run():
    """The benchmark's working-set guest: a tenth of its pages, the same
    ones on every run with a seed (what a record and a replay rely on),
    others with another seed; cold pages are never read (a corrupted one goes
    unseen, a corrupted working-set page is found)."""
    size = 8 * M
    read, res = _workingset(size, 5)
    assert len(read) == res["touched"] == size // PAGE // 10 and res["mismatches"] == 0
    assert _workingset(size, 5)[0] == read
    assert _workingset(size, 6)[0] != read
    cold = next(p for p in range(size // PAGE) if p not in set(read))
    assert _workingset(size, 5, corrupt=cold)[1]["mismatches"] == 0
    assert _workingset(size, 5, corrupt=read[len(read) // 2])[1]["mismatches"] == 1


@pytest.mark.timeout(120)
def test_record_holds_the_whole_working_set_pushed_or_demanded(tmp_path):
    """A workingset guest migrated with dest --record-hints while the push
    runs at 8 MB/s from page 0 (1 s for its 8 MiB): some of its pages arrive
    pushed before it reads them, the rest it faults on. The file holds every
    page it read, and only those: its working set, what a replay must push
    (a file of the faults alone missed what the push had brought in time)."""
    size, seed = 8 * M, 7
    path = str(tmp_path / "hints.bin")
    with LocalMigration(str(tmp_path), size, seed=seed, pattern="workingset", dest_args=("--record-hints", path),
                        source_args=("--max-rate", "8M", "--batch-bytes", "64K")) as lm:
        out = lm.run(timeout=60)
    assert "failed" not in out, out["failed"]
    assert out["guest"]["verified"] and out["dest"]["state"] == "complete"
    working_set = _workingset(size, seed)[0]
    # both ways in this run: faults, and pages the push brought first
    assert 0 < out["dest"]["demand_requests"] < len(working_set), (out["dest"], len(working_set))
    recorded = hints.read(path, PAGE, size // PAGE)
    assert sorted(recorded) == working_set


# -- bad hint files ---------------------------------------------------------------
def _file(pages, page=PAGE, npages=1000, **change) -> bytes:
    data = bytearray(hints.encode(pages, page, npages))
    fields = dict(zip(("magic", "version", "reserved", "page", "npages", "layout", "count", "length"),
                      struct.unpack_from("<8sIIQQ16sQQ", data)))
    fields.update(change)
    struct.pack_into("<8sIIQQ16sQQ", data, 0, *fields.values())
    return bytes(data)


def _body(values: list[int]) -> bytes:
    """Raw varints, zstd'd (for entries encode() would never write)."""
    out = bytearray()
    for z in values:
        while z >= 0x80:
            out.append((z & 0x7F) | 0x80)
            z >>= 7
        out.append(z)
    return zstandard.ZstdCompressor().compress(bytes(out))


def _with_body(count: int, body: bytes, npages: int = 1000) -> bytes:
    return struct.pack("<8sIIQQ16sQQ", hints.MAGIC, hints.VERSION, 0, PAGE, npages,
                       hints.layout_fingerprint(PAGE, npages), count, len(body)) + body


AGAIN = ("record it again with `migrate dest --record-hints FILE` on a migration of this guest, or run the "
         "source without --hints")


def test_round_trip():
    pages = [5, 3, 999, 0, 1, 2, 500]
    assert hints.decode(hints.encode(pages, PAGE, 1000), PAGE, 1000) == pages


@pytest.mark.parametrize("data,message", [
    (_file([1, 2, 3])[:20], f"hint file: truncated, 20 bytes, shorter than its {hints.HEADER_SIZE}-byte header; "
                            f"{AGAIN}"),
    (_file([1, 2, 3])[:-1], None),   # (length check: message below)
    (_file([1, 2, 3]) + b"x" * 10, None),
    (_file([1, 2, 3], magic=b"NOTHINTS"), "hint file: not a hint file (magic b'NOTHINTS', expected b'MGHINTS\\n')"),
    (_file([1, 2, 3], version=9), f"hint file: version 9, this build reads version 1; {AGAIN}"),
    (_file([1, 2, 3], count=1001), f"hint file: names 1001 pages, more than the 1000 the RAM has; {AGAIN}"),
    (_file([1, 2, 3], count=2), f"hint file: holds 3 entries, its header says 2; {AGAIN}"),
    (_file([1, 2, 3], layout=b"\0" * 16), None),
    (_with_body(2, _body([2, 2000])), f"hint file: entry 1 names page 1001, outside the RAM's 1000 pages; {AGAIN}"),
    (_with_body(1, _body([1])), f"hint file: entry 0 names page -1, outside the RAM's 1000 pages; {AGAIN}"),
    (_with_body(3, _body([10, 2, 1])), f"hint file: entry 2 names page 5 a second time; {AGAIN}"),
    (_with_body(3, _body([10, 0])), f"hint file: entry 1 names page 5 a second time; {AGAIN}"),
    (_with_body(2, _body([4, 2])[:-1]), f"hint file: holds 1 entries, its header says 2; {AGAIN}"),   # cut zstd
    (_with_body(2, zstandard.ZstdCompressor().compress(b"\x80" * 5000)), None),
    (_with_body(1, b"not zstd at all"), None),
])
def test_hostile_files_are_refused(data, message):
    with pytest.raises(hints.HintsError) as e:
        hints.decode(data, PAGE, 1000)
    text = str(e.value)
    if message:
        assert text == message
    else:   # (what zstd or the length check says varies: the advice does not)
        assert text.startswith("hint file: ") and text.endswith(AGAIN), text


def test_zigzag_deltas_above_and_below():
    # entry 1 (10 -> 5) is a backward step: zigzag 9
    assert hints.decode(_with_body(2, _body([20, 9])), PAGE, 1000) == [10, 5]


def test_another_layout_is_refused_with_what_differs(tmp_path):
    path = tmp_path / "h.bin"
    path.write_bytes(hints.encode([1, 2], PAGE, 1000))
    with pytest.raises(hints.HintsError) as e:
        hints.read(str(path), 2 << 20, 1000)
    assert str(e.value) == (f"hint file {path} was recorded for another RAM layout: 1000 pages of 4096 bytes, "
                            f"this source serves 1000 pages of 2097152 bytes; {AGAIN}")
    with pytest.raises(hints.HintsError) as e:
        hints.read(str(path), PAGE, 2000)
    assert "1000 pages of 4096 bytes, this source serves 2000 pages of 4096 bytes" in str(e.value)


def test_oversized_file_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(hints.encode([1], PAGE, 10))
        f.write(b"\0" * (1 << 20))
    with pytest.raises(hints.HintsError) as e:
        hints.read(str(path), PAGE, 10)
    assert str(e.value).startswith(f"hint file {path}: larger than ")
    assert str(e.value).endswith("more than any hint file for 10 pages can be; it is not one for this RAM")


@pytest.mark.timeout(60)
def test_source_refuses_a_hint_file_of_another_layout(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * (1 * M))
    hf = tmp_path / "h.bin"
    hf.write_bytes(hints.encode([1, 2], PAGE, 100))
    p = subprocess.run([sys.executable, "-m", "migrate", "source", "--ram", str(ram), "--to", "127.0.0.1:1",
                        "--page-size", "4096", "--hints", str(hf)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert (f"hint file {hf} was recorded for another RAM layout: 100 pages of 4096 bytes, this source serves "
            f"256 pages of 4096 bytes") in p.stdout + p.stderr


# -- scheduler --------------------------------------------------------------------
def test_hinted_pages_go_first_in_order_then_the_scan():
    s = Scheduler(100, 4, hints=[50, 7, 93, 8, 60])
    assert s.next_batch() == [7, 8, 50, 93]   # one batch: ascending within it
    assert s.next_batch() == [0, 1, 2, 60]    # the last hint, then the scan
    assert s.next_batch() == [3, 4, 5, 6]
    assert s.next_batch() == [9, 10, 11, 12]  # 7 and 8 were sent


def test_consecutive_hints_go_as_one_run():
    """A recorded sweep is consecutive pages: one run each batch, not one a
    page (a header, a placement and a CONTINUE each at the destination)."""
    s = Scheduler(100, 8, hints=[40, 41, 42, 43, 10, 11, 44, 45])
    assert s.next_runs() == [(10, 2), (40, 6)]
    s = Scheduler(100, 8, hints=[3, 4])
    assert s.next_runs() == [(0, 8)]          # the hints and the scan after them join too


def test_adaptive_window_grows_on_near_faults_and_shrinks_on_jumps():
    w = LocalityWindow(PAGE)
    assert w.after(1000) == 256
    near = [w.after(p) for p in (1100, 1500, 2400, 4000, 5000, 7000)]
    assert near == [512, 1024, 2048, 4096, 4096, 4096]   # within the window: doubles, to 16 MiB of pages
    jumps = [w.after(p) for p in (100_000, 20_000, 50_000, 200_000, 35_000, 150_000, 80_000, 250_000, 65_000,
                                  120_000, 180_000)]
    assert jumps == [2048, 1024, 512, 256, 128, 64, 32, 16, 8, LOCALITY_MIN, LOCALITY_MIN]   # jumps: halves
    assert LocalityWindow(2 << 20).after(0) == 8    # 16 MiB of 2 MiB pages


def test_adaptive_window_grows_for_vcpus_walking_their_own_streams():
    """Four vCPUs each reading its own quarter in order: the faults
    alternate between four places 16k pages apart, each near its own last
    one. Compared with the last fault alone each was a jump, and the window
    fell to its minimum; compared with the recent ones it grows to its
    maximum. A random guest's faults still shrink it to the minimum."""
    w = LocalityWindow(PAGE)
    for step in range(1, 8):
        for base in (0, 16_384, 32_768, 49_152):
            w.after(base + step * 64)
    assert w.pages == w.max == 4096
    w = LocalityWindow(PAGE)
    rnd = random.Random(3)
    for _ in range(300):
        w.after(rnd.randrange(262_144))
    assert w.pages == LOCALITY_MIN


def test_fixed_window_never_changes():
    w = LocalityWindow(PAGE, fixed=256)
    assert [w.after(p) for p in (0, 10, 100_000, 3)] == [256, 256, 256, 256]


def test_scheduler_pushes_the_window_after_a_demand_fault():
    s = Scheduler(10_000, 8, window=LocalityWindow(PAGE))
    s.note_demand([100])                     # first fault: the starting 256 pages after it
    assert s.next_batch() == list(range(101, 109))
    s.note_demand([5000])                    # a jump: 128 pages after it
    assert s.near == (5001, 5001 + 128)


def test_a_demand_on_a_hinted_page_opens_no_window():
    """With hints, a fault on a page they name means the push is behind the
    recorded order: the hints go on, not its neighbours. A fault on a page
    they do not name opens the window as without hints."""
    s = Scheduler(10_000, 4, window=LocalityWindow(PAGE), hints=[9000, 300, 7000, 20, 4000, 5000, 6000])
    s.note_demand([300])
    assert s.near is None
    assert s.next_batch() == [20, 4000, 7000, 9000]   # (300 was demanded: sent)
    s.note_demand([2000])
    assert s.near == (2001, 2001 + 128)     # 1700 pages from the fault before: the window halved
    assert s.next_batch() == [2001, 2002, 2003, 2004]


# -- the benchmark's report of them -------------------------------------------------
def test_bench_report_takes_the_hints_and_locality_keys_and_plots_arrival(tmp_path):
    """report.ratios takes the two hints keys and the locality ones from the
    hints measurement, their verdicts follow the targets, and the arrival
    plot of the passes is drawn."""
    pytest.importorskip("matplotlib")
    from benchmarks import report
    passes = {p: {"demand_faults": f, "guest_s": t} for p, f, t in
              (("record", 900, 9.0), ("without", 1000, 8.0), ("with", 20, 4.0))}
    loc = {"scenario": "locality-1gbit", "fixed_pages": 256,
           "seq": {"time_auto_vs_fixed": 0.9, "faults_auto_vs_fixed": 0.35},
           "random": {"time_auto_vs_fixed": 0.8, "faults_auto_vs_fixed": 1.3}, "locality_auto_vs_fixed": 0.9,
           "locality_auto_vs_fixed_random": 0.8}
    arrival = {p: {"guest_s": passes[p]["guest_s"], "page_size": PAGE,
                   "samples": [(0.0, 0, 0), (1.0, 1000, passes[p]["demand_faults"])]} for p in passes}
    h = {"scenario": "hints-x", "rate": "1gbit", "link_floor": {}, **passes, "hints_fault_reduction": 0.98,
         "hints_time_reduction": 0.5, "locality": loc, "_arrival": arrival}
    r, src = report.ratios({}, [], None, h)
    assert (r["hints_fault_reduction"], r["hints_time_reduction"], r["locality_auto_vs_fixed"]) == (0.98, 0.5, 0.9)
    assert r["locality_auto_vs_fixed_seq_faults"] == 0.35 and "locality-1gbit" in src["locality_auto_vs_fixed"]
    assert r["locality_auto_vs_fixed_random"] == 0.8
    v = report.verdicts(r)
    assert v["hints_fault_reduction"]["met"] and v["hints_time_reduction"]["met"] and v["locality_auto_vs_fixed"]["met"]
    worse = {**h, "hints_time_reduction": 0.2, "locality": {**loc, "locality_auto_vs_fixed": 1.1}}
    v = report.verdicts(report.ratios({}, [], None, worse)[0])
    assert not v["hints_time_reduction"]["met"] and not v["locality_auto_vs_fixed"]["met"]
    files = report.plots(str(tmp_path), "t", {}, [], hints=h)
    assert str(tmp_path / "t-hints-arrival.png") in files and os.path.getsize(tmp_path / "t-hints-arrival.png") > 0

"""The benchmark harness still runs: floors at tiny sizes give every key with a
positive number. No timing is checked here (benchmarks/ measures, tests check)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("numpy")
    from benchmarks import floors, report
    return floors, report


def test_floors_tiny(bench, host):
    floors, report = bench
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the C fault-handler floor is compiled at run time")
    why = host.why_not("minor_shmem")
    if why:
        pytest.skip(why)
    fl = floors.run_all(quick=True, huge_ok=False, log=lambda *_: None, tiny=True)
    for key in ("c_continue_4k", "c_copy_4k", "py_continue_4k", "py_copy_4k", "fast_4k", "tcp_pingpong"):
        assert "error" not in fl[key], f"{key}: {fl[key].get('error')}"
        for stat in ("p50_us", "p99_us", "p999_us"):
            assert fl[key][stat] > 0, (key, stat, fl[key][stat])
        assert fl[key]["n"] > 0
    assert fl["c_continue_4k"]["ioctl_p50_us"] > 0
    assert fl["fast_4k"]["fast"] == fl["fast_4k"]["faults"] > 0, "every fault took the fast path"
    assert fl["tcp_bandwidth"]["gbps"] > 0
    assert fl["tcp_bandwidth_cold"]["gbps"] > 0 and fl["tcp_bandwidth_cold"]["ring"] > fl["tcp_bandwidth"]["chunk"]
    # every page mapped in each repetition (the floor raises otherwise)
    assert "error" not in fl["map_4k"], fl["map_4k"].get("error")
    assert fl["map_4k"]["npages"] == 4096 and len(fl["map_4k"]["reps_ns_per_page"]) == 3
    assert fl["map_4k"]["ns_per_page"] > 0

    if shutil.which("openssl"):
        assert "error" not in fl["aes_gcm"], fl["aes_gcm"].get("error")
        assert fl["aes_gcm"]["gbps"] > 0 and fl["aes_gcm"]["s_per_gib"] > 0

    # the channel path alone, plaintext and TLS (tls_wire.c checks every byte it receives)
    assert "error" not in fl["tls_wire"], fl["tls_wire"].get("error")
    for mode in ("plain", "tls"):
        assert fl["tls_wire"][f"push_{mode}"]["send_cpu_s_per_gib"] > 0
        assert fl["tls_wire"][f"push_{mode}"]["recv_cpu_s_per_gib"] > 0
        assert fl["tls_wire"][f"rr_{mode}"]["n"] == 300 and fl["tls_wire"][f"rr_{mode}"]["p50_us"] > 0

    ratios, _ = report.ratios(fl, [])
    assert ratios["fast_path_p50_ratio"] > 0
    assert ratios["tls_wire_push_cpu_ratio"] > 0 and ratios["tls_wire_rr_p50_ratio"] > 0
    if shutil.which("openssl"):
        assert ratios["tls_cipher_gbps"] == fl["aes_gcm"]["gbps"]
    verdicts = report.verdicts(ratios)
    assert set(report.TARGETS) <= set(verdicts)


def test_bench_command_parses():
    from migrate.cli import build_parser
    args = build_parser().parse_args(["bench", "--quick", "--json", "--out", "/tmp/x", "--scenario", "tmpfs",
                                      "--scenario", "hugetlbfs-*-copy"])
    assert args.quick and args.json and args.scenario == ["tmpfs", "hugetlbfs-*-copy"]


def _session_pids(sid: int, zombies: bool = True) -> list[int]:
    """The processes of session sid (zombies: also those exited and not
    yet reaped)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and (zombies or fields[0] != "Z"):
                pids.append(int(d))
    return pids


@pytest.mark.timeout(180)
def test_a_bench_stopped_with_sigterm_gives_back_huge_pages_and_processes(tmp_path, host):
    """Stopping a benchmark run by its pid (as one should) leaves no huge pages
    reserved and none of its agents running."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the scenario reserves huge pages")
    why = host.why_not("minor_hugetlbfs")
    if why:
        pytest.skip(why)
    nr = "/proc/sys/vm/nr_hugepages"
    before = int(open(nr).read())
    p = subprocess.Popen([sys.executable, "-m", "migrate", "bench", "--quick", "--no-floors", "--no-plots",
                          "--scenario", "hugetlbfs-256M-random-1v-typical-continue", "--out", str(tmp_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while int(open(nr).read()) == before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if p.poll() is not None or int(open(nr).read()) == before:
            pytest.skip("the scenario ended, or reserved no huge pages, before it could be stopped")
        time.sleep(0.2)   # its agents are starting or running
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) != 0
        # what the bench killed may take a moment to exit (a loaded host: it
        # failed after a fixed 0.5 s with both CPUs busy); none may stay
        gone = time.monotonic() + 10
        while _session_pids(p.pid) and time.monotonic() < gone:
            time.sleep(0.1)
        assert _session_pids(p.pid) == [], "processes the bench started are still running"
        assert int(open(nr).read()) == before, "huge pages the bench reserved are still reserved"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        for pid in _session_pids(p.pid):
            os.kill(pid, signal.SIGKILL)
        if int(open(nr).read()) != before:
            with open(nr, "w") as f:
                f.write(str(before))


def test_tls_push_keys_say_where_the_time_goes(bench):
    """The TLS push's non-target keys: each agent's extra CPU a GiB over the
    plaintext run, and the ratio bound the cipher alone sets (2 CPUs, AES at
    4 GB/s, plaintext at 2 GB/s: 1 / (1 + 2 x 2 / (2 x 4)) = 0.667)."""
    _, report = bench
    run = dict(ok=True, backing="tmpfs", vcpus=1, placement="continue", pattern="idle", content="random",
               size=1 << 30, ram_gbps=1.0)
    plain = dict(run, scenario="p", push_gbps=2.0, cpu_s_per_gib={"source": 0.5, "dest": 1.25})
    tls = dict(run, scenario="t", tls=True, push_gbps=0.9, cpu_s_per_gib={"source": 0.85, "dest": 1.75})
    aes = {"gbps": 4.0, "s_per_gib": 0.268, "record": 16384, "cpus": 2}
    r, src = report.ratios({"aes_gcm": aes}, [plain, tls])
    assert r["tls_push_ratio"] == 0.45
    assert (r["tls_push_source_cpu_s_per_gib"], r["tls_push_dest_cpu_s_per_gib"]) == (0.35, 0.5)
    assert r["tls_cipher_gbps"] == 4.0
    assert r["tls_push_ratio_bound"] == 0.667
    assert src["tls_push_ratio_bound"] == "1 / (1 + 2 x plaintext push 2.0 GB/s / (2 CPUs x AES-128-GCM 4.0 GB/s))"
    # without the cipher floor (no openssl command) there is no bound, and no error
    r, _ = report.ratios({}, [plain, tls])
    assert "tls_push_ratio_bound" not in r and r["tls_push_source_cpu_s_per_gib"] == 0.35


def test_a_process_summary_is_read_even_when_the_process_exits_first(bench, tmp_path):
    """wait() returns once every line the process printed was read: its last
    lines can still be in the pipe when it exits (a loaded host, its reader
    thread waiting for a CPU, showed a guest that verified as one with no
    summary, failing the scenario). The reader here starts late on purpose."""
    import time

    from benchmarks.scenarios import ScriptProc

    class LateReader(ScriptProc):
        def _read(self):
            time.sleep(0.5)
            super()._read()

    script = tmp_path / "quick.py"
    script.write_text("import json\nprint(json.dumps({'event': 'summary', 'verified': True}))\n")
    p = LateReader("quick", [str(script)])
    assert p.wait(30) == 0
    assert p.summary() is not None and p.summary()["verified"] is True


def test_hints_keys_are_left_out_when_the_hints_run_was_skipped_or_failed(bench):
    """`migrate bench --qemu --scenario qemu` skips the hints measurement: the
    report then has no hints keys (it raised KeyError once), and a failed run
    gives none either; a run over a link says so in the keys' provenance."""
    _, report = bench
    for hints in ({"skipped": "not chosen by --scenario"}, {"scenario": "hints", "error": "RuntimeError: x"}, {}):
        r, src = report.ratios({}, [], None, hints)
        assert "hints_fault_reduction" not in r and "hints_time_reduction" not in src
    done = {"scenario": "hints-x", "rate": "1gbit", "link_floor": {"bulk_gbps": 0.12},
            "hints_fault_reduction": 0.6, "hints_time_reduction": 0.35}
    r, src = report.ratios({}, [], None, done)
    assert (r["hints_fault_reduction"], r["hints_time_reduction"]) == (0.6, 0.35)
    assert src["hints_fault_reduction"] == ("hints-x over a 1gbit shaped link: a record pass, then without hints, "
                                            "then with them")

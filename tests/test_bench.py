"""The benchmark harness still runs: floors at tiny sizes give every key with a
positive number. No timing is checked here (benchmarks/ measures, tests check)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bench():
    if not os.path.isfile(os.path.join(ROOT, "benchmarks", "run.py")):
        pytest.skip("benchmarks/ is not in this tree")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
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

    ratios, _ = report.ratios(fl, [])
    assert ratios["fast_path_p50_ratio"] > 0
    verdicts = report.verdicts(ratios)
    assert set(report.TARGETS) <= set(verdicts)


def test_bench_command_parses():
    from migrate.cli import build_parser
    args = build_parser().parse_args(["bench", "--quick", "--json", "--out", "/tmp/x", "--scenario", "tmpfs",
                                      "--scenario", "hugetlbfs-*-copy"])
    assert args.quick and args.json and args.scenario == ["tmpfs", "hugetlbfs-*-copy"]

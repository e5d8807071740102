"""Shared fixtures. Skips read migrate.host.features(): a test that needs a
missing kernel feature skips with the reason; nothing fakes the kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from migrate import hugepages
from migrate.host import features
from migrate.hugepages import HUGE_2M
from migrate.report import Reporter

MEMORY_TYPES = ["tmpfs", "tmpfs-file", "hugetlbfs"]
HUGE_PAGES_FOR_TESTS = 160   # 320 MiB: the largest hugetlbfs test guest plus headroom


def pytest_configure(config):
    config.addinivalue_line("markers", "huge: needs 2 MiB huge pages")


@pytest.fixture(scope="session")
def host():
    hf = features()
    why = hf.why_not("uffd")
    if why:
        pytest.skip(why)
    return hf


@pytest.fixture(scope="session")
def huge_pages():
    """Reserves huge pages once for the session and gives them back after."""
    with hugepages.reserved(HUGE_PAGES_FOR_TESTS) as free:
        yield free


def minor_feature(backing: str) -> str:
    """The HostFeatures name of the MINOR fault support a memory type needs."""
    return "minor_hugetlbfs" if backing.startswith("hugetlbfs") else "minor_shmem"


def need_feature(host, feature: str) -> None:
    """Skips unless the host has `feature` ("uffd", "minor_shmem", "minor_hugetlbfs"),
    with the reason HostFeatures.why_not gives."""
    why = host.why_not(feature)
    if why:
        pytest.skip(why)


def need_huge_pages(huge_free: int, pages: int) -> None:
    if huge_free < pages:
        pytest.skip(f"{pages} free 2 MiB huge pages needed, {huge_free} could be reserved "
                    f"({'not root' if os.geteuid() else 'the kernel found no more'})")


def need_backing(backing: str, host, huge_free: int, pages: int = 8):
    need_feature(host, minor_feature(backing))
    if backing.startswith("hugetlbfs"):
        need_huge_pages(huge_free, pages)


@pytest.fixture
def page_size_of():
    return lambda backing: HUGE_2M if backing.startswith("hugetlbfs") else 4096


class SplitNetwork:
    """A second host for the destination: a network namespace joined to this
    one by a veth pair (HERE on this side, THERE on the other), whose link can
    be cut and restored (packets then vanish without a word, as when a switch
    or a host dies)."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.ns, self.here_if, self.there_if = f"mgt{tag}", f"mgh{tag}", f"mgn{tag}"
        net = f"10.231.{tag % 250}"
        self.here, self.there = f"{net}.1", f"{net}.2"
        self.exec = ("ip", "netns", "exec", self.ns)
        self.ip("netns", "add", self.ns)
        try:
            self.ip("link", "add", self.here_if, "type", "veth", "peer", "name", self.there_if, "netns", self.ns)
            self.ip("addr", "add", f"{self.here}/30", "dev", self.here_if)
            self.ip("link", "set", self.here_if, "up")
            self.ip("-n", self.ns, "addr", "add", f"{self.there}/30", "dev", self.there_if)
            self.ip("-n", self.ns, "link", "set", self.there_if, "up")
            self.ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def cut(self) -> None:
        self.ip("-n", self.ns, "link", "set", self.there_if, "down")

    def restore(self) -> None:
        self.ip("-n", self.ns, "link", "set", self.there_if, "up")

    def close(self) -> None:
        # the namespace takes its end of the pair, and the pair, with it
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.here_if], capture_output=True, timeout=30)


@pytest.fixture
def split_network():
    if os.geteuid() != 0:
        pytest.skip("a network namespace for the destination needs root")
    if not shutil.which("ip"):
        pytest.skip("iproute2's `ip` is not installed (Debian package iproute2)")
    try:
        net = SplitNetwork()
    except RuntimeError as e:
        pytest.skip(f"no network namespace with a veth pair here: {e}")
    try:
        yield net
    finally:
        net.close()


class Events(Reporter):
    """A Reporter that keeps what it is told, for an agent run in the test's
    own process: `lines` (one dict an event, as --json prints them), and
    wait() for the first event of a kind."""

    def __init__(self):
        super().__init__(quiet=True)
        self.lines: list[dict] = []
        self.cond = threading.Condition()

    def event(self, event: str, message: str = "", **fields) -> None:
        with self.cond:
            self.lines.append({"event": event, "message": message, **fields})
            self.cond.notify_all()

    def summary(self, fields, human) -> None:
        pass

    def wait(self, event: str, timeout: float = 10) -> str:
        """The message of the first `event` event, waiting up to timeout s."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(e["event"] == event for e in self.lines), timeout), self.lines
            return next(e["message"] for e in self.lines if e["event"] == event)

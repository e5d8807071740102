"""Shared fixtures. Skips read migrate.host.features(): a test that needs a
missing kernel feature skips with the reason; nothing fakes the kernel."""

from __future__ import annotations

import os

import pytest

from migrate import hugepages
from migrate.host import HUGE_2M, features

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


def need_backing(backing: str, host, huge_free: int, pages: int = 8):
    if backing.startswith("hugetlbfs"):
        why = host.why_not("minor_hugetlbfs")
        if why:
            pytest.skip(why)
        if huge_free < pages:
            pytest.skip(f"{pages} free 2 MiB huge pages needed, {huge_free} could be reserved "
                        f"({'not root' if os.geteuid() else 'the kernel found no more'})")
    else:
        why = host.why_not("minor_shmem")
        if why:
            pytest.skip(why)


@pytest.fixture
def page_size_of():
    return lambda backing: HUGE_2M if backing.startswith("hugetlbfs") else 4096

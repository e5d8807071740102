"""Reserving huge pages for a run and giving them back afterwards."""

from __future__ import annotations

import contextlib
import os

HUGE_2M = 2 << 20
HUGE_1G = 1 << 30

_BASE = "/sys/kernel/mm/hugepages"
_SYS = _BASE + "/hugepages-{kb}kB/{what}"


def _path(page_size: int, what: str) -> str:
    return _SYS.format(kb=page_size // 1024, what=what)


def free_pages(page_size: int = HUGE_2M) -> int:
    try:
        with open(_path(page_size, "free_hugepages")) as f:
            return int(f.read())
    except OSError:
        return 0


def pools() -> tuple[dict[int, int], dict[int, int]]:
    """Free and total huge pages of every size the kernel has, by page size."""
    free, total = {}, {}
    if not os.path.isdir(_BASE):
        return free, total
    for name in os.listdir(_BASE):    # hugepages-2048kB
        size = int(name.split("-")[1].rstrip("kB")) * 1024
        free[size] = free_pages(size)
        total[size] = _total(size)
    return free, total


def _total(page_size: int) -> int:
    with open(_path(page_size, "nr_hugepages")) as f:
        return int(f.read())


def _set_total(page_size: int, n: int) -> None:
    with open(_path(page_size, "nr_hugepages"), "w") as f:
        f.write(str(n))


@contextlib.contextmanager
def reserved(pages: int, page_size: int = HUGE_2M):
    """Makes sure `pages` huge pages are free for the block, adding only the
    shortfall, and returns what it added afterwards. Yields the number of free
    pages (which may be fewer than asked when the kernel could not find them,
    or when not root)."""
    added = 0
    try:
        short = pages - free_pages(page_size)
        if short > 0 and os.geteuid() == 0:
            before = _total(page_size)
            _set_total(page_size, before + short)
            added = _total(page_size) - before
        yield free_pages(page_size)
    finally:
        if added:
            _set_total(page_size, max(0, _total(page_size) - added))


def main(argv=None) -> int:
    """`python -m migrate.hugepages --ensure N -- CMD...`: runs CMD with N free 2 MiB
    pages reserved (as root), then gives back what it added."""
    import argparse
    import subprocess

    p = argparse.ArgumentParser(prog="python -m migrate.hugepages")
    p.add_argument("--ensure", type=int, required=True, help="2 MiB pages to have free")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    with reserved(args.ensure) as free:
        print(f"hugepages: {free} free 2 MiB pages for this run (asked {args.ensure})", flush=True)
        return subprocess.call(cmd) if cmd else 0


if __name__ == "__main__":
    raise SystemExit(main())

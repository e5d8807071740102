"""The source guest of a pre-copy (`guestsim --role source`): a running VM's
stand-in on the source host. It fills its RAM with the deterministic image,
attaches to the source agent (same attach protocol as a destination guest:
its userfaultfd and RAM file, which the agent write-protects in async mode),
and keeps writing: `write_pages` pages every `every_ms` ms, until the agent
pauses it.

What it writes is verifiable after the migration (`verify`): each write
stamps the first 4 KiB unit of a page with (magic, page, generation) and
bytes drawn from them, and bumps the page's generation in a table kept in
guest RAM itself (the last pages). At the destination a page whose table
generation is g must hold stamp g; a page never written, the image. A stale
page mapped at the destination shows an older stamp than its table says.

The pause (docs/precopy.md): the agent sends {"event": "pause"} on the
attach socket; the writer stops, and the guest answers {"event": "paused",
"writes": N}. {"event": "resume"} starts it again (the agent gave up before
the switch), {"event": "complete"} ends it. If the agent goes away, the guest
writes on: a source VM outlives its migration's failure.
"""

from __future__ import annotations

import hashlib
import random
import select
import struct
import threading
import time

from migrate._binding import ffi
from migrate.errors import AttachError
from migrate.memory import Backing, GuestMemory
from migrate.report import Reporter
from migrate.sim.ramimage import UNIT, ImageSpec
from migrate.uffd import Userfaultfd
from migrate.wire.attach import Region, attach_guest, recv_msg, send_msg

STAMP_MAGIC = b"MGWRITE1"
BASELINE_LOOPS = 20   # loops timed before the attach: the loop time with no migration
_GEN = struct.Struct("<I")


def table_pages(npages: int, page_size: int) -> int:
    """Pages at the end of RAM holding the generation table (4 bytes a page)."""
    return (npages * _GEN.size + page_size - 1) // page_size


def stamp(page: int, gen: int) -> bytes:
    """The unit a write leaves at the start of page: a function of (page, gen)."""
    head = STAMP_MAGIC + struct.pack("<QQ", page, gen)
    body = hashlib.shake_128(head).digest(UNIT - len(head))
    return head + body


class Writer:
    """Writes stamps into guest RAM from a thread. Owns nothing: mem outlives it."""

    def __init__(self, mem: GuestMemory, write_pages: int, every_ms: float, seed: int = 1):
        self.mem = mem
        self.ps = mem.page_size
        self.npages = mem.size // self.ps
        self.table_at = (self.npages - table_pages(self.npages, self.ps)) * self.ps
        self.writable = self.npages - table_pages(self.npages, self.ps)
        if self.writable <= 0:
            raise ValueError(f"{mem.size} bytes of guest RAM leave no page to write beside the generation table")
        self.view = mem.guest_view(0, mem.size)
        self.write_pages = write_pages
        self.every = every_ms / 1000.0
        self.rng = random.Random(seed)
        self.writes = 0
        self.loops = 0
        self.loop_s = 0.0           # time spent writing (the guest's own loop time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def gen(self, page: int) -> int:
        off = self.table_at + page * _GEN.size
        return _GEN.unpack_from(self.view, off)[0]

    def write_once(self) -> None:
        t0 = time.monotonic()
        for _ in range(self.write_pages):
            p = self.rng.randrange(self.writable)
            g = self.gen(p) + 1
            self.view[p * self.ps:p * self.ps + UNIT] = stamp(p, g)
            _GEN.pack_into(self.view, self.table_at + p * _GEN.size, g)
            self.writes += 1
        self.loops += 1
        self.loop_s += time.monotonic() - t0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.write_once()
            self._stop.wait(self.every)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Returns once no write is under way."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def ram_digest(addr: int, size: int) -> str:
    return hashlib.sha256(ffi.buffer(ffi.cast("uint8_t *", addr), size)).hexdigest()


def verify(addr: int, size: int, page_size: int, spec: ImageSpec) -> dict:
    """Checks guest RAM at addr against the image and the generation table:
    {"mismatches": pages that differ, "first_bad_page": ..., "pages_written": ...}."""
    npages = size // page_size
    tpages = table_pages(npages, page_size)
    base = ffi.cast("uint8_t *", addr)
    table = ffi.buffer(base + (npages - tpages) * page_size, npages * _GEN.size)
    units = page_size // UNIT
    bad, first_bad, written = 0, None, 0
    for p in range(npages - tpages):
        g = _GEN.unpack_from(table, p * _GEN.size)[0]
        rest_first = 0
        if g:
            written += 1
            rest_first = 1
            if ffi.buffer(base + p * page_size, UNIT)[:] != stamp(p, g):
                bad += 1
                first_bad = p if first_bad is None else first_bad
                continue
        if rest_first < units and spec.check(addr + p * page_size + rest_first * UNIT, p * units + rest_first,
                                             units - rest_first) is not None:
            bad += 1
            first_bad = p if first_bad is None else first_bad
    return {"mismatches": bad, "first_bad_page": first_bad, "pages_written": written}


def run(attach: str, size: int, backing: str, spec: ImageSpec, reporter: Reporter, *, name: str = "source-guest",
        write_pages: int = 256, every_ms: float = 100.0, hold: float = 600.0) -> dict:
    """The source guest: writes until paused, then waits for the end. Returns
    its summary (writes, the RAM's digest at the pause)."""
    mem = GuestMemory.create(Backing(backing), size, name=name, map_alias=False)
    try:
        npages = size // mem.page_size
        tp = table_pages(npages, mem.page_size)

        def reset():
            # the image, and a generation table of zeros
            spec.fill(mem.guest_addr, 0, size // UNIT)
            table = mem.guest_addr + (npages - tp) * mem.page_size
            ffi.memmove(ffi.cast("uint8_t *", table), b"\0" * (tp * mem.page_size), tp * mem.page_size)

        reset()
        writer = Writer(mem, write_pages, every_ms)
        # The guest's own loop time with no migration, for the slowdown
        # pre-copy's write tracking costs it (benchmarks/precopy.py): a few
        # loops before the attach, then the RAM is as new again.
        for _ in range(BASELINE_LOOPS):
            writer.write_once()
        baseline_ms = writer.loop_s * 1000 / writer.loops
        reset()
        writer = Writer(mem, write_pages, every_ms)
        uffd = Userfaultfd.create()
        sock = attach_guest(attach, uffd.fd, mem.fd, page_size=mem.page_size, ram_size=size,
                            regions=[Region(mem.guest_addr, size, 0)], backing=backing, name=name, timeout=60)
        reporter.event("attached", f"source guest: {size} bytes of {backing} attached to {attach}, writing "
                       f"{write_pages} pages every {every_ms:g} ms", size=size, page_size=mem.page_size)
        writer.start()
        summary = {"pauses": 0, "agent_lost": False, "complete": False, "ram_sha256": None}
        deadline = time.monotonic() + hold
        t_last = time.monotonic()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 1.0)
            if time.monotonic() - t_last >= 1.0:
                t_last = time.monotonic()
                reporter.event("writes", f"{writer.writes} writes", writes=writer.writes)
            if not ready:
                continue
            try:
                msg, _ = recv_msg(sock)
            except (AttachError, OSError):
                # the agent went away: the VM runs on (its migration failed)
                if not summary["complete"]:
                    summary["agent_lost"] = True
                    if writer.running:
                        reporter.event("agent_lost", "the source agent went away: writing on",
                                       writes=writer.writes, paused=False)
                    else:
                        # paused for a switch: the guest may run at the destination now, and
                        # must never run here again (whoever knows better restarts it)
                        reporter.event("agent_lost", "the source agent went away after pausing this guest: "
                                       "staying paused", writes=writer.writes, paused=True)
                sock.close()
                sock = None
                break
            ev = msg.get("event")
            if ev == "pause":
                writer.stop()
                if not summary["pauses"]:
                    # the loop time while pre-copy tracked the writes
                    summary["precopy_loop_ms"] = round(writer.loop_s * 1000 / max(1, writer.loops), 4)
                summary["pauses"] += 1
                send_msg(sock, {"event": "paused", "writes": writer.writes})
                summary["ram_sha256"] = ram_digest(mem.guest_addr, size)
                reporter.event("paused", f"paused after {writer.writes} writes", writes=writer.writes,
                               ram_sha256=summary["ram_sha256"])
            elif ev == "resume":
                summary["ram_sha256"] = None
                writer.start()
                reporter.event("resumed", "the agent resumed the guest")
            elif ev == "complete":
                summary["complete"] = True
                break
        if sock is None:
            # as it was (writing, or paused) until told to stop (SIGTERM) or hold runs out
            while time.monotonic() < deadline:
                time.sleep(1.0)
                reporter.event("writes", f"{writer.writes} writes", writes=writer.writes)
        writer.stop()
        if sock is not None:
            sock.close()
        uffd.close()
        summary.update(writes=writer.writes, loops=writer.loops, baseline_loop_ms=round(baseline_ms, 4),
                       loop_ms=round(writer.loop_s * 1000 / max(1, writer.loops), 4))
        return summary
    finally:
        mem.close()

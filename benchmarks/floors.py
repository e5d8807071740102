"""The floors every scenario is compared with, measured in the same run:

- the kernel: a C-only fault handler (fault_floor.c, compiled here with cc),
  MINOR + CONTINUE and MISSING + COPY, at 4 KiB shmem and 2 MiB hugetlbfs;
- the same round trip through this project's Python layer (Userfaultfd +
  GuestMemory, a Python handler thread);
- the engine's fast path: a fault on a page that was received but not yet
  mapped, answered by FaultSpace.serve (the destination's C fault loop);
- the network: raw TCP 4 KiB ping-pong between two processes on loopback and
  raw TCP loopback bandwidth (tcp_peer.py);
- eager mapping: the engine's mg_map_pages over pages already received, the
  CPU a push spends on UFFDIO_CONTINUE besides moving bytes;
- the cipher: AES-128-GCM on one CPU (`openssl speed`), what a TLS push costs
  each side per GiB before anything else;
- the raw channels' own path (tls_wire.c over native/wire.c and native/tls.c),
  plaintext and TLS: a push's CPU per GiB on each side and a 4 KiB demand
  round trip, without userfaultfd or Python: what TLS itself costs.

In the last three the faulting thread is guestsim's C vCPU loop
(mg_guestsim_run), which runs with the GIL released and times each first
access in C: a Python thread touching guest memory would hold the GIL while
the Python handler waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HUGE = 2 << 20
SEED = 7


def stats_us(samples_ns) -> dict:
    """Percentiles of a latency sample in microseconds."""
    a = np.sort(np.asarray(samples_ns, dtype=np.float64)) / 1000.0
    if not len(a):
        return {"n": 0}

    def q(p):
        return round(float(a[min(len(a) - 1, int(round(p / 100.0 * (len(a) - 1))))]), 3)

    return {"n": int(len(a)), "p50_us": q(50), "p90_us": q(90), "p99_us": q(99), "p999_us": q(99.9),
            "max_us": round(float(a[-1]), 3), "mean_us": round(float(a.mean()), 3)}


def _best(reps: list[dict], key: str = "p50_us") -> dict:
    """The rep with the lowest p50: a floor is the best the machine can do; the
    others show how noisy it was."""
    best = min(reps, key=lambda r: r[key])
    out = dict(best)
    out["reps_p50_us"] = [r[key] for r in reps]
    if any("cpus" in r for r in reps):
        out["reps_cpus"] = [r.get("cpus") for r in reps]
    if all("ioctl_p50_us" in r for r in reps):
        # the handler's own cost also includes waking the faulting thread,
        # cheaper on the same CPU: the lowest is the placement floor
        out["reps_ioctl_p50_us"] = [r["ioctl_p50_us"] for r in reps]
        out["ioctl_p50_us_min"] = min(out["reps_ioctl_p50_us"])
    return out


# -- C floor ------------------------------------------------------------------
def compile_floor(workdir: str, name: str = "fault_floor") -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) on PATH: the C floors are built at run time")
    exe = os.path.join(workdir, name)
    subprocess.run([cc, "-O2", "-pthread", "-o", exe, os.path.join(HERE, name + ".c")],
                   check=True, capture_output=True, text=True)
    return exe


@contextlib.contextmanager
def placement(pinned: bool):
    """pinned: this thread, and the threads and processes it starts, run on
    one CPU. On these VMs a wake-up across CPUs sometimes costs ~30 us more
    than on the same CPU (an idle vCPU has to be woken), so every floor is
    taken both ways and the best counts: a floor is what the machine can do."""
    if not pinned or not hasattr(os, "sched_setaffinity"):
        yield "any CPU"
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield f"CPU {cpu}"
    finally:
        os.sched_setaffinity(0, before)


def _reps(fn, reps: int) -> dict:
    """reps runs alternating unpinned / pinned; the best p50 wins."""
    out = []
    for i in range(reps):
        with placement(i % 2 == 1) as where:
            r = fn()
        r["cpus"] = where
        out.append(r)
    return _best(out)


def c_floor(exe: str, mode: str, page_size: int, npages: int, reps: int = 4) -> dict:
    """Round trip and handler ioctl time (waking the faulting thread included,
    as a handler does it), then the placement alone (place_p50_us: the ioctl
    with DONTWAKE, the wake-up a separate call), lowest of `reps` each."""
    out = _reps(lambda: _c_floor_once(exe, mode, page_size, npages), reps)
    place = [_c_floor_once(exe, mode, page_size, npages, dontwake=True)["ioctl_p50_us"] for _ in range(reps)]
    out["reps_place_p50_us"] = place
    out["place_p50_us"] = min(place)
    return out


def _c_floor_once(exe: str, mode: str, page_size: int, npages: int, dontwake: bool = False) -> dict:
    out = []
    for _ in range(1):
        r = subprocess.run([exe, mode, "2m" if page_size == HUGE else "4k", str(npages)] +
                           (["dontwake"] if dontwake else []),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"fault_floor {mode} {page_size}: {r.stderr.strip()}")
        d = json.loads(r.stdout)
        samples = d.pop("samples_ns")
        d.update({k: v for k, v in stats_us(samples).items() if k not in ("p50_us", "p99_us", "p999_us")})
        d["_samples_ns"] = samples
        out.append(d)
    return out[0]


# -- through the project's Python layer ------------------------------------------
def _guest_touch(addr: int, size: int, page_size: int, seed: int) -> np.ndarray:
    """guestsim's C vCPU: touch every page once in order, GIL released.
    Returns per-page first-access ns."""
    from migrate._binding import ffi, lib

    npages = size // page_size
    lat = ffi.new("uint32_t[]", npages)
    res = ffi.new("struct mg_guestsim_result *")
    rc = lib.mg_guestsim_run(ffi.cast("uint8_t *", addr), size, page_size, seed, 0, 1_000_000,
                             0, 1, lat, res)
    if rc < 0:
        raise OSError(-rc, "mg_guestsim_run")
    if res.mismatches:
        raise RuntimeError(f"floor guest read {res.mismatches} wrong 4 KiB units")
    return np.frombuffer(ffi.buffer(lat, npages * 4), np.uint32).copy()


def python_layer(mode: str, backing: str, npages: int) -> dict:
    """Round trip with a Python handler: poll + read_events + continue_/copy."""
    from migrate.memory import GuestMemory
    from migrate.sim.ramimage import ImageSpec
    from migrate.uffd import Mode, Userfaultfd

    spec = ImageSpec(SEED, 0.0, 1.0)
    mem = GuestMemory.create(backing, npages * (HUGE if backing == "hugetlbfs" else 4096), name="floor-py")
    src = None
    uffd = Userfaultfd.create()
    try:
        ps, size = mem.page_size, mem.size
        uffd.api()
        if mode == "continue":
            spec.fill(mem.alias_addr, 0, size // 4096)
            uffd.register(mem.guest_addr, size, Mode.MINOR, ps)
        else:
            src = GuestMemory.create("tmpfs", size, name="floor-src", map_guest=False)
            spec.fill(src.alias_addr, 0, size // 4096)
            uffd.register(mem.guest_addr, size, Mode.MISSING, ps)
        stop = threading.Event()
        errors = []

        def handler():
            try:
                done = 0
                while done < npages and not stop.is_set():
                    if not uffd.wait(100):
                        continue
                    for ev in uffd.read_events():
                        a = ev.address & ~(ps - 1)
                        if mode == "continue":
                            uffd.continue_(a, ps)
                        else:
                            uffd.copy(a, src.alias_addr + (a - mem.guest_addr), ps)
                        done += 1
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t = threading.Thread(target=handler, daemon=True)
        t.start()
        lat = _guest_touch(mem.guest_addr, size, ps, SEED)
        stop.set()
        t.join(5)
        if errors:
            raise errors[0]
        return {"mode": mode, "page_size": ps, **stats_us(lat), "_samples_ns": lat.tolist()}
    finally:
        uffd.close()
        mem.close()
        if src:
            src.close()


def _receive_all(space, spec, npages: int, ps: int) -> None:
    """Every page received (written through the alias, recorded), none mapped:
    through whichever placement call this FaultSpace has."""
    from migrate.memory import GuestMemory
    src = GuestMemory.create("tmpfs", npages * ps, name="floor-data", map_guest=False)
    try:
        spec.fill(src.alias_addr, 0, npages * ps // 4096)
        data = src.alias_view(0, npages * ps)
        pages = list(range(npages))
        if hasattr(space, "place_batch"):
            placed = space.place_batch(pages, bytes((npages + 7) // 8), data)
        else:
            placed = sum(space.place(pages, data, [i * ps for i in pages], [0] * npages))
        if placed != npages:
            raise RuntimeError(f"fast path floor: placed {placed} of {npages} pages")
    finally:
        src.close()


def fast_path(backing: str, npages: int) -> dict:
    """The engine's minor-fault fast path: pages received (written through the
    alias and recorded) but not mapped; FaultSpace.serve maps each on its fault."""
    from migrate.dest import faultspace
    from migrate.dest.faultspace import FaultSpace, SpaceRegion
    from migrate.memory import GuestMemory
    from migrate.sim.ramimage import ImageSpec
    from migrate.uffd import Mode, Userfaultfd

    spec = ImageSpec(SEED, 0.0, 1.0)
    mem = GuestMemory.create(backing, npages * (HUGE if backing == "hugetlbfs" else 4096), name="floor-fast")
    uffd = Userfaultfd.create()
    stop_fd = faultspace.make_stop_fd()
    try:
        ps, size = mem.page_size, mem.size
        uffd.api()
        uffd.register(mem.guest_addr, size, Mode.MISSING | Mode.MINOR, ps)
        space = FaultSpace(uffd, ps, npages, [SpaceRegion(mem.guest_addr, 0, npages)], mem.alias_addr)
        _receive_all(space, spec, npages, ps)
        errors, asked = [], []

        def serve():
            try:
                while True:
                    pages = space.serve(stop_fd, 64, 100)
                    if pages is None:
                        return
                    asked.extend(pages)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        lat = _guest_touch(mem.guest_addr, size, ps, SEED)
        os.eventfd_write(stop_fd, 1)
        t.join(5)
        if errors:
            raise errors[0]
        st = space.stats
        return {"mode": "fast", "page_size": ps, **stats_us(lat), "faults": st["faults"], "fast": st["fast"],
                "requested": len(asked), "_samples_ns": lat.tolist()}
    finally:
        os.close(stop_fd)
        uffd.close()
        mem.close()


def map_cost(npages: int, reps: int = 3) -> dict:
    """What eager mapping costs the push: the engine's mg_map_pages (one
    UFFDIO_CONTINUE per run) over npages 4 KiB shmem pages already received
    into a prepared RAM file, in the push's runs of MG_PUSH_MAX_RUN pages, on
    one thread (its CPU time). No network and no guest: between repetitions
    the guest side is zapped (MADV_DONTNEED) so each maps every page again."""
    import mmap

    from migrate._binding import lib
    from migrate.dest.faultspace import FaultSpace, SpaceRegion
    from migrate.memory import GuestMemory
    from migrate.uffd import Mode, Userfaultfd

    mem = GuestMemory.create("tmpfs", npages * 4096, name="floor-map")
    uffd = Userfaultfd.create()
    try:
        uffd.api()
        uffd.register(mem.guest_addr, mem.size, Mode.MISSING | Mode.MINOR, 4096)
        mem.prepare()
        run, per_page = lib.MG_PUSH_MAX_RUN, []
        for _ in range(reps):
            space = FaultSpace(uffd, 4096, npages, [SpaceRegion(mem.guest_addr, 0, npages)], mem.alias_addr)
            space.received.set(0, npages)
            t = time.thread_time()
            mapped = sum(space.map(first, min(run, npages - first)) for first in range(0, npages, run))
            t = time.thread_time() - t
            if mapped != npages:
                raise RuntimeError(f"map floor: mapped {mapped} of {npages} pages")
            per_page.append(t * 1e9 / npages)
            if lib.mg_madvise(mem.guest_addr, mem.size, mmap.MADV_DONTNEED) < 0:
                raise RuntimeError("map floor: MADV_DONTNEED on the guest mapping failed")
        best = min(per_page)
        return {"npages": npages, "run_pages": run, "ns_per_page": round(best, 1),
                "s_per_gib": round(best * ((1 << 30) // 4096) / 1e9, 4), "cpus": len(os.sched_getaffinity(0)),
                "reps_ns_per_page": [round(x, 1) for x in per_page]}
    finally:
        uffd.close()
        mem.close()


# -- network --------------------------------------------------------------------
class _Peer:
    """tcp_peer.py in its own process, listening on loopback."""

    def __init__(self, mode: str, *extra: str):
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "tcp_peer.py"), mode, *extra],
                                  stdout=subprocess.PIPE, text=True)
        self.port = int(self.p.stdout.readline())

    def result(self) -> dict:
        line = self.p.stdout.readline()
        self.p.wait(30)
        return json.loads(line) if line.strip() else {}

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def tcp_pingpong(n: int = 20000, request: int = 16, reply: int = 4096, warmup: int = 200) -> dict:
    """A demand fault's shape: a small request, a page back (4 KiB; 2 MiB for
    the wire time of a huge page's demand fault)."""
    peer = _Peer("pong", str(request), str(reply))
    try:
        s = socket.create_connection(("127.0.0.1", peer.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = b"r" * request
        buf = bytearray(reply)
        view = memoryview(buf)
        lat = np.empty(n, dtype=np.int64)
        clock = time.perf_counter_ns
        for i in range(n + warmup):
            t0 = clock()
            s.sendall(req)
            got = 0
            while got < reply:
                k = s.recv_into(view[got:])
                if not k:
                    raise RuntimeError("tcp ping-pong peer closed")
                got += k
            if i >= warmup:
                lat[i - warmup] = clock() - t0
        s.close()
        return {"request_bytes": request, "reply_bytes": reply, **stats_us(lat), "_samples_ns": lat.tolist()}
    finally:
        peer.kill()


def tcp_rr(exe: str, page_size: int, npages: int, rounds: int, hugetlb: bool) -> dict:
    """A large page's wire time (tcp_rr.c): request, whole page back, between
    two processes, from memory to memory."""
    r = subprocess.run([exe, str(page_size), str(npages), str(rounds), "1" if hugetlb else "0"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"tcp_rr: {r.stderr.strip()}")
    d = json.loads(r.stdout)
    samples = d.pop("samples_ns")
    return {**d, **stats_us(samples), "_samples_ns": samples}


def tcp_bandwidth(total: int = 2 << 30, chunk: int = 4 << 20, reps: int = 3, ring: int = 0) -> dict:
    """One TCP stream on loopback, big sendall / recv_into buffers; GB/s as the
    receiver measured it (first byte to last). ring 0: both ends reuse one
    chunk, which stays in cache (the target's floor). ring N: the sender reads
    and the receiver writes N bytes of memory in turn, so each byte comes from
    and goes to memory, as the push's do (guest RAM on both sides)."""
    runs, where = [], []
    for i in range(reps):
        with placement(i % 2 == 1) as cpus:
            runs.append(_bandwidth_once(total, chunk, ring))
        where.append(cpus)
    return {"gbps": round(max(runs), 3), "reps_gbps": [round(x, 3) for x in runs], "reps_cpus": where,
            "bytes": total, "chunk": chunk, "ring": ring}


def _bandwidth_once(total: int, chunk: int, ring: int = 0) -> float:
    nchunks = max(1, ring // chunk)
    # populated with data (a zero-filled buffer would be the shared zero page)
    data = memoryview(bytearray(os.urandom(chunk)) * nchunks)
    peer = _Peer("sink", str(chunk), str(nchunks * chunk))
    try:
        s = socket.create_connection(("127.0.0.1", peer.port))
        sent = 0
        while sent < total:
            off = (sent // chunk % nchunks) * chunk
            s.sendall(data[off:off + chunk])
            sent += chunk
        s.shutdown(socket.SHUT_WR)
        r = peer.result()
        s.close()
    finally:
        peer.kill()
    return r["bytes"] / r["seconds"] / 1e9


def cipher_speed(seconds: int = 1, reps: int = 3, record: int = 16384) -> dict:
    """AES-128-GCM, the suite the raw channels prefer, on one CPU through the
    system's OpenSSL (`openssl speed -evp`, the library the agents load), at
    the push's record size: what each side of a TLS push pays per GiB (one
    encryption at the source, one decryption at the destination) before any
    record handling, copy or syscall. Best of reps."""
    exe = shutil.which("openssl")
    if not exe:
        raise RuntimeError("no openssl command on PATH (the TLS cipher floor runs `openssl speed`)")
    runs = []
    for _ in range(reps):
        out = subprocess.run([exe, "speed", "-evp", "aes-128-gcm", "-bytes", str(record), "-seconds", str(seconds)],
                             capture_output=True, text=True, timeout=60 + 2 * seconds, check=True).stdout
        # the result line: the name, then thousands of bytes a second per size
        line = next((x for x in out.splitlines() if x.upper().startswith("AES-128-GCM")), None)
        if line is None:
            raise RuntimeError(f"openssl speed printed no AES-128-GCM line: {out[-300:]!r}")
        runs.append(float(line.split()[-1].rstrip("k")) * 1000 / 1e9)
    gbps = max(runs)
    return {"gbps": round(gbps, 3), "reps_gbps": [round(x, 3) for x in runs], "record": record,
            "s_per_gib": round((1 << 30) / (gbps * 1e9), 3), "cpus": os.cpu_count()}


def compile_tls_wire(workdir: str) -> str:
    """tls_wire.c built with the engine's own channel path (native/wire.c,
    native/tls.c): the floor measures that code, not a copy of it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) on PATH: the C floors are built at run time")
    native = os.path.join(os.path.dirname(HERE), "native")
    exe = os.path.join(workdir, "tls_wire")
    subprocess.run([cc, "-O2", "-std=gnu11", "-pthread", "-I", native, "-o", exe, os.path.join(HERE, "tls_wire.c"),
                    *(os.path.join(native, c) for c in ("tls.c", "wire.c", "uffd.c")), "-ldl"],
                   check=True, capture_output=True, text=True)
    return exe


def tls_wire(exe: str, workdir: str, push_mib: int, rounds: int, reps: int = 2) -> dict:
    """The raw channels' path alone (tls_wire.c), plaintext and TLS taken in
    turn so that what else runs on the host weighs on both: a push's CPU a GiB
    on each side (the lowest of the reps) and GB/s (the highest), and the
    demand round trip's latency (the rep with the lowest p50)."""
    from migrate.wire.certs import write_certs
    certs = os.path.join(workdir, "tls-wire-certs")
    os.makedirs(certs, exist_ok=True)
    write_certs(certs, ["a", "b"])
    push: dict = {"plain": [], "tls": []}
    rr: dict = {"plain": [], "tls": []}

    def run(*args) -> dict:
        p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"tls_wire {' '.join(map(str, args[:3]))}: {p.stderr.strip()[-300:]}")
        return json.loads(p.stdout)

    for _ in range(reps):
        for mode, tls in (("plain", 0), ("tls", 1)):
            push[mode].append(run("push", push_mib, tls, certs))
            rr[mode].append(stats_us(run("rr", rounds, tls, certs)["samples_ns"]))
    out: dict = {"push_mib": push_mib, "rounds": rounds}
    for mode in ("plain", "tls"):
        out[f"push_{mode}"] = {"gbps": max(r["gbps"] for r in push[mode]),
                               "send_cpu_s_per_gib": min(r["send_cpu_s_per_gib"] for r in push[mode]),
                               "recv_cpu_s_per_gib": min(r["recv_cpu_s_per_gib"] for r in push[mode]),
                               "reps_gbps": [r["gbps"] for r in push[mode]]}
        out[f"rr_{mode}"] = _best(rr[mode])
    return out


# -- all of them --------------------------------------------------------------
def _guarded(log, what: str, fn, huge_pages: int = 0, tries: int = 2) -> dict:
    """One floor; an error is recorded, not raised. Huge pages are reserved
    around each measurement: other runs on this host may grow and shrink the
    pool meanwhile, so a failed reservation is retried once."""
    from migrate import hugepages
    err = ""
    for _ in range(tries):
        try:
            with hugepages.reserved(huge_pages) as free:
                if huge_pages and free < huge_pages:
                    err = f"{huge_pages} free 2 MiB huge pages needed, {free} available"
                    continue
                return fn()
        except Exception as e:  # noqa: BLE001 - recorded in the results
            err = f"{type(e).__name__}: {e}"
    log(f"floor {what}: {err}")
    return {"error": err}


def run_all(quick: bool, huge_ok: bool, log=print, tiny: bool = False) -> dict:
    """tiny: a few hundred faults and round trips, for the test suite."""
    n4k = 300 if tiny else 5000 if quick else 20000
    n2m = 8 if tiny else 64 if quick else 128  # COPY sources beyond the CPU caches, as on arrival
    n_ping = 300 if tiny else 5000 if quick else 20000
    bw_bytes = (64 << 20) if tiny else (1 << 30) if quick else (4 << 30)
    out: dict = {}
    work = tempfile.mkdtemp(prefix="migrate-bench-")
    try:
        exe = compile_floor(work)
        for mode in ("continue", "copy"):
            log(f"floor: C handler {mode} 4 KiB x{n4k}")
            out[f"c_{mode}_4k"] = _guarded(log, f"c_{mode}_4k", lambda: c_floor(exe, mode, 4096, n4k))
            if huge_ok:
                log(f"floor: C handler {mode} 2 MiB x{n2m}")
                out[f"c_{mode}_2m"] = _guarded(log, f"c_{mode}_2m", lambda: c_floor(exe, mode, HUGE, n2m), n2m + 2)
        rr = compile_floor(work, "tcp_rr")
        n_rr = 40 if tiny else 300
        log(f"floor: raw TCP 2 MiB request/reply x{n_rr}")
        # 32 pages a side: more than the caches hold (hugetlbfs when the host has it)
        out["tcp_rr_2m"] = _guarded(log, "tcp_rr_2m",
                                    lambda: _reps(lambda: tcp_rr(rr, HUGE, 32, n_rr, huge_ok), 4),
                                    66 if huge_ok else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode in ("continue", "copy"):
        log(f"floor: Python layer {mode}")
        out[f"py_{mode}_4k"] = _guarded(log, f"py_{mode}_4k",
                                        lambda: _reps(lambda: python_layer(mode, "tmpfs", n4k // 2), 2))
        if huge_ok:
            out[f"py_{mode}_2m"] = _guarded(log, f"py_{mode}_2m",
                                            lambda: _reps(lambda: python_layer(mode, "hugetlbfs", n2m), 2),
                                            n2m + 2)
    log("floor: engine fast path (received, not mapped)")
    out["fast_4k"] = _guarded(log, "fast_4k", lambda: _reps(lambda: fast_path("tmpfs", n4k), 4))
    if huge_ok:
        out["fast_2m"] = _guarded(log, "fast_2m", lambda: _reps(lambda: fast_path("hugetlbfs", n2m), 4),
                                  n2m + 2)
    n_map = 4096 if tiny else (1 << 30) // 4096
    log(f"floor: mapping {n_map} received 4 KiB pages (CONTINUE, no network)")
    out["map_4k"] = _guarded(log, "map_4k", lambda: map_cost(n_map))
    log("floor: raw TCP 4 KiB ping-pong")
    out["tcp_pingpong"] = _guarded(log, "tcp_pingpong",
                                   lambda: _reps(lambda: tcp_pingpong(n_ping), 4))
    log("floor: raw TCP loopback bandwidth")
    out["tcp_bandwidth"] = _guarded(log, "tcp_bandwidth", lambda: tcp_bandwidth(bw_bytes))
    log("floor: raw TCP loopback bandwidth, memory to memory")
    out["tcp_bandwidth_cold"] = _guarded(log, "tcp_bandwidth_cold", lambda: tcp_bandwidth(bw_bytes, ring=bw_bytes))
    log("floor: AES-128-GCM on one CPU (openssl speed, 16 KiB records)")
    out["aes_gcm"] = _guarded(log, "aes_gcm", lambda: cipher_speed(reps=1 if tiny else 3), tries=1)
    work = tempfile.mkdtemp(prefix="migrate-bench-")
    try:
        log("floor: the raw channels' path alone (native/wire.c), plaintext and TLS: push and 4 KiB round trip")
        out["tls_wire"] = _guarded(log, "tls_wire", lambda: tls_wire(
            compile_tls_wire(work), work, 64 if tiny else 512 if quick else 2048, 300 if tiny else n_ping), tries=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    """`python -m benchmarks.floors`: the fault round trip, MINOR+CONTINUE against
    MISSING+COPY at 4 KiB and 2 MiB, through the project's own layer next to a
    C-only handler, measured in one run and printed as a table."""
    import sys

    from migrate import hugepages
    from migrate.host import features

    with hugepages.reserved(160) as free:
        huge_ok = free >= 130 and features().why_not("minor_hugetlbfs") is None
        out = run_all(quick=True, huge_ok=huge_ok, log=lambda m: print(m, file=sys.stderr))
    print(f"{'floor':<16} {'p50 us':>9} {'p99 us':>9}")
    for key, r in out.items():
        if "p50_us" in r:
            print(f"{key:<16} {r['p50_us']:>9.2f} {r['p99_us']:>9.2f}")
        elif "gbps" in r:
            print(f"{key:<16} {r['gbps']:>9.3f} GB/s")
        else:
            print(f"{key:<16} {r.get('error', '?')}")
    if not huge_ok:
        print("(2 MiB rows skipped: huge pages could not be reserved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

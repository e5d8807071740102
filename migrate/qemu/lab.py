"""QEMU guests on this machine for tests, benchmarks and examples/qemu/.

`Lab` starts QEMUs (TCG) on the tiny guest that examples/qemu/build-guest.sh
builds, each with a QMP monitor (migrate.qemu.qmp) and its serial console
(`Serial`), and gives back everything it made: every QEMU is stopped by pid,
and its /dev/shm files, hugetlbfs mounts and huge pages go back, also on
errors and SIGTERM when it is used as a context manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from migrate import hugepages
from migrate.qemu.qmp import QMP, QemuError, connect_unix


def qemu_argv(name, workdir, kernel, initrd, mem_mb=512, backend="file", mem_path=None,
              incoming=None, append_extra="", smp=1, qemu="qemu-system-x86_64", extra_args=(), ram_extra_kb=0):
    """Command line for one guest; returns (argv, QMP socket, serial socket).

    ram_extra_kb: that much RAM above mem_mb. 8 keeps QEMU 7.2's own pre-copy
    under TCG correct: its fast dirty-bitmap sync, taken for a RAM block that
    is a multiple of 256 KiB, clears dirty bits 64 pages at a time without
    resetting TCG's TLB dirty state, and the guest's later writes to those
    pages are never sent again (fixed in QEMU 9.0, "system/physmem: Fix
    migration dirty bitmap coherency with TCG memory access"); any other size
    takes the per-page sync, which is right.

    backend: "file"      memory-backend-file,share=on on mem_path (e.g. /dev/shm/NAME)
             "hugetlbfs" the same, mem_path on a hugetlbfs mount
             "memfd"     memory-backend-memfd,share=on
             "ram"       plain private anonymous RAM (-m only; QEMU's own migration)
    """
    serial = os.path.join(workdir, f"{name}.serial")
    qmp_sock = os.path.join(workdir, f"{name}.qmp")
    size = f"{mem_mb * 1024 + ram_extra_kb}K" if ram_extra_kb else f"{mem_mb}M"
    argv = [qemu, "-accel", "tcg", "-smp", str(smp), "-m", size, "-nodefaults",
            "-display", "none", "-no-reboot"]
    if backend in ("file", "hugetlbfs"):
        argv += ["-object", f"memory-backend-file,id=ram0,size={size},mem-path={mem_path},share=on",
                 "-machine", "pc,memory-backend=ram0"]
    elif backend == "memfd":
        argv += ["-object", f"memory-backend-memfd,id=ram0,size={mem_mb}M,share=on",
                 "-machine", "pc,memory-backend=ram0"]
    elif backend == "ram":
        argv += ["-machine", "pc"]
    else:
        raise ValueError(backend)
    argv += ["-kernel", kernel, "-initrd", initrd,
             "-append", f"console=ttyS0 quiet panic=-1 {append_extra}".strip(),
             "-chardev", f"socket,id=ser0,path={serial},server=on,wait=off,"
                         f"logfile={os.path.join(workdir, name + '.console.log')}",
             "-serial", "chardev:ser0",
             "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", incoming]
    argv += list(extra_args)
    return argv, qmp_sock, serial


class Serial:
    """A guest's serial console, exported by QEMU as a UNIX socket chardev:
    waits for patterns in what the guest prints, sends it lines. Owns the socket."""

    def __init__(self, path: str, timeout: float = 30.0, echo=None):
        self.path = path
        try:
            self.sock = connect_unix(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise QemuError(f"cannot connect to the serial console at {path} within {timeout:.0f} s: "
                            f"{e.strerror}") from None
        self.text = ""          # everything received so far
        self.stamps = [(0.0, 0)]   # (time.time() it arrived, len(self.text) then), per read
        self.pos = 0            # wait_for() searches from here
        self.echo = echo        # a file to copy the console to, or None
        self.lock = threading.Lock()   # one reader of the socket at a time (follow()'s thread or a wait)
        self.following: threading.Thread | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.following:
            self.following.join(5)
        self.sock.close()

    def follow(self) -> None:
        """Reads the console in a thread of its own from now until close(),
        so that each line's arrival time (arrivals()) is when QEMU wrote it,
        not when someone next waited for a line."""
        def run():
            while not self.closed:
                try:
                    self._pump(0.05)
                except (QemuError, OSError):
                    return
        self.following = threading.Thread(target=run, name=f"serial {self.path}", daemon=True)
        self.following.start()

    def _pump(self, timeout: float) -> None:
        with self.lock:
            self.sock.settimeout(max(timeout, 0.001))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return
            if not data:
                raise QemuError(f"serial console {self.path} closed: did QEMU exit?")
            s = data.decode("utf-8", "replace").replace("\r", "")
            self.text += s
            self.stamps.append((time.time(), len(self.text)))
        if self.echo:
            self.echo.write(s)
            self.echo.flush()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The next match of `pattern` after the previous wait's match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"serial console {self.path}: no /{pattern}/ within {timeout:.0f} s; "
                                f"it printed last:\n{self.text[-2000:]}")
            if self.following and self.following.is_alive():
                time.sleep(min(left, 0.01))
            else:
                self._pump(min(left, 0.5))

    def arrivals(self, pattern: str) -> list[tuple[float, re.Match]]:
        """Every match of `pattern` received so far (pumping what is pending
        first, unless follow()ed), each with the wall-clock time (time.time(), comparable with
        QMP events' timestamps) its last character arrived here."""
        if not (self.following and self.following.is_alive()):
            self._pump(0.001)
        with self.lock:   # the text and its stamps as of one read
            text, stamps = self.text, list(self.stamps)
        out, k = [], 0
        for m in re.finditer(pattern, text):
            while stamps[k][1] < m.end():
                k += 1
            out.append((stamps[k][0], m))
        return out

    def writer_ticks(self) -> list[tuple[float, int]]:
        """memfill's writer ticks so far: (when its line arrived, microseconds
        the tick's writes took)."""
        return [(t, int(m.group(1))) for t, m in self.arrivals(r"TICK \d+ (\d+)\n")]

    def send(self, s: str) -> None:
        self.sock.sendall(s.encode())


class Lab:
    """The QEMUs and the files, mounts and huge pages one run made; cleanup()
    (or leaving the `with` block) gives all of them back. The work directory
    (sockets, consoles' logs, QEMU's stderr) is removed too, unless
    QEMU_LAB_KEEP is set."""

    def __init__(self, guest_dir: str, workdir: str | None = None, verbose: bool = True):
        self.guest_dir = os.path.abspath(guest_dir)
        self.kernel = os.path.join(self.guest_dir, "vmlinuz")
        self.initrd = os.path.join(self.guest_dir, "initramfs.cpio.gz")
        for f in (self.kernel, self.initrd):
            if not os.path.exists(f):
                raise QemuError(f"{f} missing: run examples/qemu/build-guest.sh {guest_dir}")
        self.workdir = workdir or tempfile.mkdtemp(prefix="qemu-lab-")
        self.procs: list[subprocess.Popen] = []
        self.conns: list[QMP | Serial] = []
        self.files: list[str] = []
        self.mounts: list[str] = []
        self.huge = contextlib.ExitStack()   # huge pages reserved for this run
        self.verbose = verbose
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self.t0:8.3f}] {msg}", flush=True)

    def __enter__(self):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- resources ---------------------------------------------------------
    def shm_path(self, name: str) -> str:
        p = f"/dev/shm/{name}-{os.getpid()}"
        self.files.append(p)
        return p

    def hugetlbfs_dir(self, need_mb: int) -> str:
        """Reserves enough free 2 MiB pages and returns a hugetlbfs directory
        (a mount of its own when the host has none)."""
        need = need_mb // 2
        free = self.huge.enter_context(hugepages.reserved(need))
        if free < need:
            raise QemuError(f"could not reserve {need} huge pages of 2 MiB: {free} are free")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if fstype == "hugetlbfs" and "pagesize=1G" not in line:
                    return mnt
        mnt = tempfile.mkdtemp(prefix="qemu-lab-hugetlbfs-")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], check=True)
        self.mounts.append(mnt)
        return mnt

    def start(self, name: str, env: dict | None = None, prefix: tuple = (), **kw) -> tuple[subprocess.Popen, QMP, Serial]:
        """Starts one QEMU (keywords: qemu_argv's); env: extra environment (e.g.
        LD_PRELOAD, MIGRATE_ATTACH); prefix: a command that execs QEMU
        elsewhere (`ip netns exec NS`: the pid stays QEMU's). Returns the
        process, a QMP connection and its serial console."""
        argv, qmp_sock, serial = qemu_argv(name, self.workdir, self.kernel, self.initrd, **kw)
        argv = [*prefix, *argv]
        err_path = os.path.join(self.workdir, f"{name}.stderr")
        with open(err_path, "w") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(os.environ, **(env or {})))
        self.procs.append(p)
        envs = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.log(f"{name}: pid {p.pid}: {envs + ' ' if envs else ''}{' '.join(argv)}")
        try:
            q = QMP(qmp_sock, timeout=30)
        except QemuError:
            self.stop(p)
            with open(err_path) as f:
                raise QemuError(f"{name}: QEMU did not come up: {f.read()}") from None
        self.conns.append(q)
        s = Serial(serial, timeout=30)
        self.conns.append(s)
        return p, q, s

    def stop(self, p: subprocess.Popen, timeout: float = 10) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                os.kill(p.pid, signal.SIGCONT)   # a frozen QEMU (SIGSTOP) takes the SIGTERM now
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def cleanup(self) -> None:
        for p in self.procs:
            try:
                self.stop(p)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                print(f"cleanup: stopping pid {p.pid}: {e}", file=sys.stderr)
        for c in self.conns:
            c.close()
        for f in self.files:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
        for m in self.mounts:
            for f in os.listdir(m):
                try:
                    os.unlink(os.path.join(m, f))
                except OSError:
                    pass
            r = subprocess.run(["umount", m])
            if r.returncode != 0:
                print(f"cleanup: umount {m} failed (still in use?); lazy unmount", file=sys.stderr)
                subprocess.run(["umount", "-l", m])
            try:
                os.rmdir(m)
            except OSError as e:
                print(f"cleanup: rmdir {m}: {e}", file=sys.stderr)
        # the pages go back once the files on them are gone
        self.huge.close()
        if self.workdir and os.path.isdir(self.workdir) and not os.environ.get("QEMU_LAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.procs, self.conns, self.files, self.mounts = [], [], [], []

#!/usr/bin/env python3
"""Start and clean up example QEMU guests (standard library only).

Used by shared_devstate.py and qemu-postcopy-baseline.sh.  Every QEMU, socket,
/dev/shm file, hugetlbfs mount and huge-page reservation made here is undone by
Lab.cleanup() (also on exceptions / SIGTERM when used as a context manager).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMP, Serial  # noqa: E402

HUGETLBFS_MAGIC = 0x958458F6


def qemu_argv(name, workdir, kernel, initrd, mem_mb=512, backend="file", mem_path=None,
              incoming=None, append_extra="", smp=1, qemu="qemu-system-x86_64", extra_args=()):
    """Command line for one example guest.

    backend: "file"   memory-backend-file,share=on on mem_path (e.g. /dev/shm/NAME)
             "hugetlbfs" same, mem_path on a hugetlbfs mount
             "memfd"  memory-backend-memfd,share=on
             "ram"    plain private anonymous RAM (-m only; QEMU's own migration)
    """
    serial = os.path.join(workdir, f"{name}.serial")
    qmp_sock = os.path.join(workdir, f"{name}.qmp")
    argv = [qemu, "-accel", "tcg", "-smp", str(smp), "-m", f"{mem_mb}M", "-nodefaults",
            "-display", "none", "-no-reboot"]
    if backend in ("file", "hugetlbfs"):
        argv += ["-object", f"memory-backend-file,id=ram0,size={mem_mb}M,mem-path={mem_path},share=on",
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


class Lab:
    def __init__(self, guest_dir, workdir=None, verbose=True):
        self.guest_dir = os.path.abspath(guest_dir)
        self.kernel = os.path.join(self.guest_dir, "vmlinuz")
        self.initrd = os.path.join(self.guest_dir, "initramfs.cpio.gz")
        for f in (self.kernel, self.initrd):
            if not os.path.exists(f):
                raise FileNotFoundError(f"{f} missing: run examples/qemu/build-guest.sh {guest_dir}")
        self.workdir = workdir or tempfile.mkdtemp(prefix="qemu-lab-")
        self.procs = []
        self.files = []
        self.mounts = []
        self.saved_nr_hugepages = None
        self.verbose = verbose
        self.t0 = time.monotonic()

    def log(self, msg):
        if self.verbose:
            print(f"[{time.monotonic() - self.t0:8.3f}] {msg}", flush=True)

    def __enter__(self):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- resources ---------------------------------------------------------
    def shm_path(self, name):
        p = f"/dev/shm/{name}-{os.getpid()}"
        self.files.append(p)
        return p

    def hugetlbfs_dir(self, need_mb):
        """Reserve enough 2 MiB pages and return a hugetlbfs directory."""
        need = need_mb // 2
        with open("/proc/sys/vm/nr_hugepages") as f:
            cur = int(f.read())
        free = _meminfo("HugePages_Free")
        if free < need:
            self.saved_nr_hugepages = cur
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(cur + need - free))
            if _meminfo("HugePages_Free") < need:
                raise RuntimeError(f"could not reserve {need} huge pages")
        for line in open("/proc/mounts"):
            dev, mnt, fstype = line.split()[:3]
            if fstype == "hugetlbfs" and "pagesize=1G" not in line:
                return mnt
        mnt = tempfile.mkdtemp(prefix="qemu-lab-hugetlbfs-")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], check=True)
        self.mounts.append(mnt)
        return mnt

    def start(self, name, env=None, **kw):
        """Start one QEMU; env: extra environment (e.g. LD_PRELOAD, MIGRATE_ATTACH)."""
        argv, qmp_sock, serial = qemu_argv(name, self.workdir, self.kernel, self.initrd, **kw)
        out = open(os.path.join(self.workdir, f"{name}.stderr"), "w")
        full_env = dict(os.environ, **(env or {}))
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=full_env)
        self.procs.append(p)
        envs = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.log(f"{name}: pid {p.pid}: {envs + ' ' if envs else ''}{' '.join(argv)}")
        try:
            q = QMP(qmp_sock, timeout=30)
        except Exception:
            out.flush()
            self.stop(p)
            raise RuntimeError(f"{name}: QEMU did not come up: "
                               f"{open(os.path.join(self.workdir, name + '.stderr')).read()}")
        s = Serial(serial, timeout=30)
        return p, q, s

    def stop(self, p, timeout=10):
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

    def cleanup(self):
        for p in self.procs:
            try:
                self.stop(p)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                print(f"cleanup: stopping pid {p.pid}: {e}", file=sys.stderr)
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
        if self.saved_nr_hugepages is not None:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(self.saved_nr_hugepages))
            self.saved_nr_hugepages = None
        if self.workdir and os.path.isdir(self.workdir) and not os.environ.get("QEMU_LAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.procs, self.files, self.mounts = [], [], []


def _meminfo(key):
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0

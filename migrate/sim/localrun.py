"""Running the agents as separate local processes and reading their JSON events.

Used by `migrate demo`, the end-to-end tests and the benchmark: one place that
starts dest, guestsim and source and cleans up after them.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time


class Proc:
    """A `python -m migrate ...` child whose stdout is JSON lines. Owns the child."""

    def __init__(self, name: str, args: list[str], env: dict | None = None, prefix: tuple = ()):
        """prefix: a command that execs the rest (e.g. `ip netns exec NS`), so
        the pid is still the agent's."""
        self.name = name
        self.args = args
        self.events: queue.Queue = queue.Queue()
        self.lines: list[dict] = []
        self.stderr_lines: list[str] = []
        self.p = subprocess.Popen([*prefix, sys.executable, "-m", "migrate", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "text", "message": line}
            ev["_t"] = time.time()   # wall clock when read, to line up with QEMU's own timestamps
            self.lines.append(ev)
            self.events.put(ev)
        self.events.put(None)

    def _read_err(self):
        for line in self.p.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {name!r} event within {timeout} s; stderr: "
                                   + " | ".join(self.stderr_lines[-5:]))
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                self.events.put(None)
                raise RuntimeError(f"{self.name} exited ({self.p.poll()}) before {name!r}; stderr: "
                                   + " | ".join(self.stderr_lines[-8:]))
            if ev.get("event") == name:
                return ev

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} did not exit within {timeout} s") from None
        # the process is gone, but its last lines (the summary) may still be
        # in the pipe: a loaded host showed a guest that verified as having
        # no summary
        self._reader.join(10)
        return rc

    def summary(self) -> dict | None:
        for ev in reversed(self.lines):
            if ev.get("event") == "summary":
                return ev
        return None

    def errors(self) -> list[str]:
        return [ev.get("message", "") for ev in self.lines if ev.get("event") == "error"]

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


class TlsFiles:
    """A CA and the certificates of a local run's two agents (`dest`, `source`),
    written on first use, and the flags that give them to each: the source
    names the destination with --dest-name (its --to is an address), the
    destination takes only the `source` certificate."""

    DEST, SOURCE = "dest", "source"

    def __init__(self, directory: str):
        self.dir = directory
        self.paths: dict[str, str] = {}

    def _files(self) -> dict[str, str]:
        if not self.paths:
            from migrate.wire.certs import write_certs
            self.paths = write_certs(self.dir, [self.DEST, self.SOURCE])
        return self.paths

    def _args(self, host: str) -> list[str]:
        f = self._files()
        return ["--tls-cert", f[host], "--tls-key", f[host + ".key"], "--tls-ca", f["ca"]]

    def dest_args(self) -> list[str]:
        return [*self._args(self.DEST), "--allow-source", self.SOURCE]

    def source_args(self) -> list[str]:
        return [*self._args(self.SOURCE), "--dest-name", self.DEST]

    def remove(self) -> None:
        for path in self.paths.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


class LocalMigration:
    """mkram'd image + dest + guestsim + source, all local. A context manager that
    kills what it started and removes its files."""

    def __init__(self, workdir: str, size: int, *, backing: str = "tmpfs", seed: int = 1,
                 pattern: str = "seq", vcpus: int = 1, zero_fraction: float | None = None,
                 random_fraction: float | None = None, placement: str = "continue",
                 source_args: tuple = (), image: str | None = None, dest_args: tuple = (),
                 dest_listen: str = "127.0.0.1:0", dest_prefix: tuple = (), tls: bool | None = None,
                 source_prefix: tuple = ()):
        """dest_listen and dest_prefix put the destination elsewhere, e.g. in a
        network namespace (`ip netns exec NS`) listening on its address;
        source_prefix does the same for the source.
        tls: both agents with mutual TLS, certificates made in workdir (see
        TlsFiles); None: TLS when dest_listen is not a loopback address (the
        agents refuse plaintext there), plaintext on loopback."""
        self.workdir = workdir
        self.size = size
        self.backing = backing
        self.seed = seed
        self.pattern = pattern
        self.vcpus = vcpus
        self.placement = placement
        self.source_args = list(source_args)
        self.dest_args = list(dest_args)
        self.dest_listen = dest_listen
        self.dest_prefix = tuple(dest_prefix)
        self.source_prefix = tuple(source_prefix)
        self.zero_fraction = zero_fraction
        self.random_fraction = random_fraction
        self.image_args = []
        if zero_fraction is not None:
            self.image_args += ["--zero-fraction", str(zero_fraction)]
        if random_fraction is not None:
            self.image_args += ["--random-fraction", str(random_fraction)]
        tag = f"{os.getpid()}-{id(self) & 0xffff:x}"
        self.image = image or f"/dev/shm/migrate-img-{tag}"
        self.sock = os.path.join(workdir, f"attach-{tag}.sock")
        if tls is None:
            from migrate.wire.tls import is_loopback
            tls = not is_loopback(dest_listen.rpartition(":")[0].strip("[]"))
        self.tls = TlsFiles(os.path.join(workdir, f"certs-{tag}")) if tls else None
        self.procs: list[Proc] = []
        self.dest = self.guest = self.source = None
        self.address = None

    @property
    def page_size(self) -> int:
        from migrate.memory import Backing
        return Backing(self.backing).page_size

    def make_image(self):
        from migrate.sim.ramimage import ImageSpec, write_image
        kw = {}
        if self.zero_fraction is not None:
            kw["zero_fraction"] = self.zero_fraction
        if self.random_fraction is not None:
            kw["random_fraction"] = self.random_fraction
        write_image(self.image, self.size, ImageSpec(self.seed, **kw))

    def start_dest(self, extra: tuple = ()) -> dict:
        tls = self.tls.dest_args() if self.tls else []
        self.dest = self._spawn("dest", ["dest", "--listen", self.dest_listen, "--attach", self.sock,
                                         "--placement", self.placement, "--json", *tls, *self.dest_args, *extra],
                                self.dest_prefix)
        ev = self.dest.wait_event("listening", 30)
        self.address = ev["address"]
        return ev

    def start_guest(self, extra: tuple = ()) -> None:
        self.guest = self._spawn("guestsim", ["guestsim", "--attach", self.sock, "--size", str(self.size),
                                              "--backing", self.backing, "--seed", str(self.seed),
                                              "--pattern", self.pattern, "--vcpus", str(self.vcpus),
                                              *self.image_args, "--json", *extra])
        self.guest.wait_event("attached", 60)

    def start_source(self, extra: tuple = ()) -> Proc:
        tls = self.tls.source_args() if self.tls else []
        args = ["source", "--ram", self.image, "--to", self.address, "--json", *tls, *self.source_args, *extra]
        if self.page_size != 4096 and "--page-size" not in args:
            args += ["--page-size", str(self.page_size)]
        self.source = self._spawn("source", args, self.source_prefix)
        return self.source

    def _spawn(self, name, args, prefix: tuple = ()) -> Proc:
        p = Proc(name, args, prefix=prefix)
        self.procs.append(p)
        return p

    def run(self, timeout: float = 300) -> dict:
        """The whole flow; returns the three summaries."""
        if not os.path.exists(self.image):
            self.make_image()
        self.start_dest()
        # As on a real destination, the guest is there (attached, its vCPUs
        # waiting for the switchover) before the source starts the migration;
        # the agent allocates its RAM meanwhile, in the background.
        self.start_guest()
        self.dest.wait_event("attached", 120)
        self.start_source()
        return self._reap((("source", self.source), ("guest", self.guest), ("dest", self.dest)), timeout)

    @staticmethod
    def _reap(named, timeout: float) -> dict:
        """Waits for each (name, process) in turn: its summary and exit code;
        "failed" names the last that did not exit 0."""
        out = {}
        for name, p in named:
            try:
                rc = p.wait(timeout)
            except TimeoutError:
                rc = None
            out[name] = p.summary()
            out[name + "_rc"] = rc
            if rc != 0:
                # one side failed: the others would wait for it forever
                out["failed"] = f"{name} exited {rc}: " + " | ".join(p.errors() or p.stderr_lines[-5:])
                timeout = 5
        return out

    def close(self):
        for p in self.procs:
            p.kill()
        if self.tls:
            self.tls.remove()
        for path in (self.image, self.sock):
            if path.startswith("/proc/"):
                continue   # a memfd's path: it lives as long as its owner's fd
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PrecopyMigration(LocalMigration):
    """Pre-copy, then post-copy, all local (docs/precopy.md): dest + guestsim
    (--writes) as LocalMigration, then `source --precopy --attach` and the
    source guest (`guestsim --role source`) writing on its own RAM while
    pre-copy runs. No image file: the source guest's RAM is the image."""

    def __init__(self, workdir: str, size: int, *, write_pages: int = 256, write_every_ms: float = 100.0,
                 **kw):
        super().__init__(workdir, size, **kw)
        self.write_pages = write_pages
        self.write_every_ms = write_every_ms
        tag = os.path.basename(self.sock)[len("attach-"):-len(".sock")]
        self.source_sock = os.path.join(workdir, f"source-attach-{tag}.sock")
        self.control = os.path.join(workdir, f"control-{tag}.sock")
        self.source_guest = None

    def start_guest(self, extra: tuple = ()) -> None:
        super().start_guest(("--writes", *extra))

    def start_source(self, extra: tuple = ()) -> Proc:
        tls = self.tls.source_args() if self.tls else []
        self.source = self._spawn("source", ["source", "--precopy", "--attach", self.source_sock,
                                             "--to", self.address, "--control", self.control, "--json", *tls,
                                             *self.source_args, *extra], self.source_prefix)
        self.source.wait_event("listening", 60)
        return self.source

    def start_source_guest(self, extra: tuple = ()) -> Proc:
        self.source_guest = self._spawn("source-guest", [
            "guestsim", "--role", "source", "--attach", self.source_sock, "--size", str(self.size),
            "--backing", self.backing, "--seed", str(self.seed), "--write-pages", str(self.write_pages),
            "--write-every", str(self.write_every_ms), *self.image_args, "--json", *extra])
        self.source_guest.wait_event("attached", 60)
        return self.source_guest

    def start(self) -> None:
        """Everything up to the first pre-copy round under way."""
        self.start_dest()
        self.start_guest()
        self.dest.wait_event("attached", 120)
        self.start_source()
        self.start_source_guest()

    def run(self, timeout: float = 300) -> dict:
        """The whole flow; returns the four summaries (source_guest too)."""
        self.start()
        return self._reap((("source", self.source), ("guest", self.guest), ("dest", self.dest),
                           ("source_guest", self.source_guest)), timeout)

    def close(self):
        super().close()
        for path in (self.source_sock, self.control):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

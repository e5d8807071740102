#!/usr/bin/env python3
"""A minimal attach-protocol agent that logs every userfault (standard library only).

It speaks docs/attach-protocol.md (agent side), registers the guest range
MISSING|MINOR and resolves each fault itself from the RAM file that is already
complete on this host: MINOR -> UFFDIO_CONTINUE; MISSING (a hole in the file) ->
fallocate the page (zeros, as on the source), then UFFDIO_CONTINUE.  Every fault
is recorded with the current phase label, so a driver can see exactly which
guest pages QEMU touches and when.  This is a probe for the shim, not the agent.

    agent = FaultLogger("/tmp/x.attach"); agent.start()
    agent.phase = "startup"; ...; agent.faults  -> [(t, phase, offset, flags, tid)]
"""
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import threading
import time

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_CONTINUE = 0xC020AA07
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_MINOR = 4
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_MINOR = 4


class FaultLogger(threading.Thread):
    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.phase = "startup"
        self.faults = []
        self.hello = None
        self.error = None
        self.attached = threading.Event()
        self.stopping = False

    def close(self):
        """Stop logging and drop every descriptor and mapping (so hugetlbfs can be unmounted)."""
        self.stopping = True
        self.join(1)
        try:
            self.lsock.close()
        except OSError:
            pass
        if getattr(self, "alias", None) is not None:
            self.alias.close()
            self.alias = None
        for fd in getattr(self, "fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = ()
        if getattr(self, "conn", None) is not None:
            self.conn.close()
            self.conn = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def run(self):
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported by the driver
            if not self.stopping:
                self.error = e
                self.attached.set()

    def _run(self):
        conn, _ = self.lsock.accept()
        data, fds, _, _ = socket.recv_fds(conn, 65536, 2)
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            more = conn.recv(65536)
            if not more:
                raise EOFError("attach socket closed during hello")
            data += more
        (n,) = struct.unpack(">I", data[:4])
        hello = json.loads(data[4:4 + n])
        self.hello = hello
        self.fds = fds
        uffd, ramfd = fds
        ps = hello["page_size"]
        api = struct.pack("QQQ", UFFD_API, UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MINOR_SHMEM |
                          UFFD_FEATURE_MINOR_HUGETLBFS, 0)
        fcntl.ioctl(uffd, UFFDIO_API, bytearray(api))
        self.alias = mmap.mmap(ramfd, hello["ram_size"], mmap.MAP_SHARED)
        regions = hello["regions"]
        for r in regions:
            reg = bytearray(struct.pack("QQQQ", r["guest_addr"], r["length"],
                                        UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, 0))
            fcntl.ioctl(uffd, UFFDIO_REGISTER, reg)
        body = json.dumps({"ok": True}).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
        self.conn = conn
        self.attached.set()
        t0 = time.monotonic()
        p = select.poll()
        p.register(uffd, select.POLLIN)
        while not self.stopping:
            if not p.poll(200):
                continue
            try:
                buf = os.read(uffd, 32 * 64)
            except BlockingIOError:
                continue
            for i in range(0, len(buf), 32):
                ev = buf[i]
                if ev != UFFD_EVENT_PAGEFAULT:
                    continue
                flags, addr, tid = struct.unpack_from("QQI", buf, i + 8)
                page = addr & ~(ps - 1)
                for r in regions:
                    if r["guest_addr"] <= page < r["guest_addr"] + r["length"]:
                        off = r["offset"] + page - r["guest_addr"]
                        break
                else:
                    raise RuntimeError(f"fault at {addr:#x} outside the regions")
                self.faults.append((time.monotonic() - t0, self.phase, off, flags, tid))
                if not flags & UFFD_PAGEFAULT_FLAG_MINOR:
                    os.posix_fallocate(ramfd, off, ps)
                cont = bytearray(struct.pack("QQQq", page, ps, 0, 0))
                try:
                    fcntl.ioctl(uffd, UFFDIO_CONTINUE, cont)
                except OSError as e:
                    if e.errno != 17:       # EEXIST: already mapped by a racing fault
                        raise

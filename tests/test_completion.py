"""The end of a migration as the guest hears it.

A guest waits to be released (`switchover`) before its vCPUs run. Under load
(the soak test's rounds of 3 migrations at once, two `yes` loops), a source's
push channels were sometimes taken before its demand channel (each channel's
hello is served on a thread of its own), every page arrived by push, and the
migration completed without ever switching over: the agent said `complete`,
the source exited 0, and guestsim waited 600 s for a `switchover` that never
came. Reproduced 10 times in 48 migrations of 256 KiB, 6 at once, under two
`yes` loops. Now the agent releases the guest before it says `complete`, and
the guest side takes `complete` as a release too.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading

import pytest

from migrate.memory import Backing, GuestMemory
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration
from migrate.uffd import Userfaultfd
from migrate.wire.attach import GuestLink, Region, attach_guest, recv_msg, send_msg
from migrate.wire.protocol import PROTOCOL_VERSION, PUSH_MAGIC, channel

PAGE = 4096
NPAGES = 64
SIZE = NPAGES * PAGE


def _push_everything(lm: LocalMigration, welcome: pb.Welcome) -> None:
    """Every page of the image as raw push runs on one push channel, and no
    demand channel at all: what the agent sees when a source's push channels
    are served before its demand channel and fill the guest first."""
    with open(lm.image, "rb") as f:
        data = f.read()
    host = lm.address.rpartition(":")[0]
    with socket.create_connection((host, welcome.demand_port), timeout=10) as push:
        push.sendall(PUSH_MAGIC + welcome.demand_token)
        # one run: first page, count, flags; the zero bitmap (none zero); the pages
        push.sendall(struct.pack("<QII", 0, NPAGES, 0) + bytes(NPAGES // 8) + data)
        push.shutdown(socket.SHUT_WR)
        push.settimeout(30)
        assert push.recv(1) == b""   # the agent closed it: the migration ended


@pytest.mark.timeout(120)
def test_a_guest_never_released_is_released_before_complete(tmp_path, host):
    """The migration completes with no demand channel ever opened: the agent
    tells the guest `switchover`, then `complete` with the counts, then end of
    file; the guest's memory holds the source's bytes."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=5)
    mem = GuestMemory.create(Backing("tmpfs"), SIZE, name="never-released", map_alias=False)
    uffd = Userfaultfd.create()
    sock = None
    try:
        lm.make_image()
        lm.start_dest()
        sock = attach_guest(lm.sock, uffd.fd, mem.fd, page_size=PAGE, ram_size=SIZE,
                            regions=[Region(mem.guest_addr, SIZE, 0)], name="never-released", timeout=30)
        lm.dest.wait_event("attached", 30)
        ch = channel(lm.address, "test")
        stub = pbg.MigrationStub(ch)
        welcome = stub.Open(pb.Hello(version=PROTOCOL_VERSION, ram_size=SIZE, page_size=PAGE, source_name="pusher",
                                     compression=[pb.COMPRESSION_NONE]), timeout=30)
        _push_everything(lm, welcome)
        reply = stub.Finish(pb.FinishRequest(session_id=welcome.session_id, token=welcome.demand_token,
                                             timeout_seconds=30), timeout=40)
        assert reply.complete and reply.pages_pushed == NPAGES, reply
        ch.close()
        sock.settimeout(30)
        said = [recv_msg(sock)[0] for _ in range(2)]
        assert said[0] == {"event": "switchover"}
        assert said[1]["event"] == "complete" and said[1]["pages_pushed"] == NPAGES, said
        assert sock.recv(1) == b""
        with open(lm.image, "rb") as f:
            want = f.read()
        # (the range is unregistered: reading it faults no more)
        assert ctypes.string_at(mem.guest_addr, SIZE) == want
        assert lm.dest.wait(30) == 0
    finally:
        if sock is not None:
            sock.close()
        uffd.close()
        mem.close()
        lm.close()


@pytest.mark.timeout(30)
def test_the_guest_side_takes_complete_as_its_release(tmp_path):
    """An agent (this test) that says `complete` without a `switchover` first:
    GuestLink releases the guest, whose vCPUs would otherwise wait for ever."""
    d = tmp_path / "agent"
    d.mkdir(mode=0o700)
    path = str(d / "attach.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)

    def agent():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            _, fds = recv_msg(conn, want_fds=2)
            for fd in fds:
                os.close(fd)
            send_msg(conn, {"ok": True})
            send_msg(conn, {"event": "complete", "pages_total": 1})
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)   # until the guest closes

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    mem = GuestMemory.create(Backing("tmpfs"), PAGE, name="released-by-complete", map_alias=False)
    uffd = Userfaultfd.create()
    try:
        link = GuestLink(path, uffd.fd, mem.fd, page_size=PAGE, ram_size=PAGE,
                         regions=[Region(mem.guest_addr, PAGE, 0)])
        assert link.wait_switchover(10)
        assert link.wait_complete(10) and link.final["pages_total"] == 1
        link.close()
        t.join(10)
        assert not t.is_alive()
    finally:
        uffd.close()
        mem.close()
        listener.close()


"""Bounded resources (issue 16, item 5): what a peer can make the destination
hold (gRPC server threads and slots, connections and descriptors on the
channel port) has a cap and a deadline, and hitting one sheds that peer, never
the agent. Each case is an attack as an attacker would try it against a live
agent, then a good source completes a migration that the guest verifies.

Attackers on another host are played from another loopback address: ::1 for
gRPC (the agent listens on both families), 127.0.0.2 and up for the channel
port (a socket bound to it before connecting)."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from migrate.dest.agent import ALL_CHANNELS, HELLO_TIMEOUT, HOST_CHANNELS
from migrate.dest.channels import PUSH_CHANNELS
from migrate.dest.service import Bounds, RpcLimits
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.sim.localrun import LocalMigration
from migrate.wire.protocol import DEMAND_MAGIC, PROTOCOL_VERSION, PUSH_MAGIC, channel

M = 1 << 20
SIZE = 16 * M
NPAGES = SIZE // 4096
LIMITS = RpcLimits()
OPEN = "/migrate.v1.Migration/Open"


def start_waiting(tmp_path, dest_args: tuple = ()) -> LocalMigration:
    """dest (listening on IPv4 and IPv6) + an attached guest, no source yet.
    lm.address is the IPv4 one: the good source comes from 127.0.0.1."""
    # (plaintext: these attacks are on what the server holds, which TLS does
    # not change; listening on every address takes --insecure on both agents)
    lm = LocalMigration(str(tmp_path), SIZE, seed=16, pattern="random", vcpus=2, dest_listen="[::]:0",
                        dest_args=("--insecure", *dest_args), source_args=("--insecure",), tls=False)
    lm.make_image()
    ev = lm.start_dest()
    lm.grpc_port = int(ev["address"].rpartition(":")[2])
    lm.channel_port = ev["channel_port"]
    lm.address = f"127.0.0.1:{lm.grpc_port}"
    lm.start_guest()
    lm.dest.wait_event("attached", 60)
    return lm


@pytest.fixture
def waiting(tmp_path, host):
    with start_waiting(tmp_path) as lm:
        yield lm


def finish_with_good_source(lm: LocalMigration, *extra) -> dict:
    """A good source completes the migration, every byte verified by the
    guest; the dest reports it complete (and exits, unless it serves
    forever)."""
    src = lm.start_source(extra)
    assert src.wait(90) == 0, src.errors() or src.stderr_lines[-5:]
    assert lm.guest.wait(60) == 0
    g = lm.guest.summary()
    assert g["verified"] is True and g["mismatches"] == 0
    if "--serve-forever" in lm.dest_args:
        d = lm.dest.wait_event("migration", 30)
    else:
        assert lm.dest.wait(30) == 0
        d = lm.dest.summary()
    assert d["state"] == "complete"
    assert d["pages_demand"] + d["pages_pushed"] + d["pages_zero"] == NPAGES
    return src.summary()


def dest_errors(lm: LocalMigration, pattern: str) -> list[str]:
    """The dest's error events whose whole message matches pattern."""
    return [m for m in lm.dest.errors() if re.fullmatch(pattern, m)]


def wait_error(lm: LocalMigration, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dest_errors(lm, pattern)
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no dest error matching {pattern!r} within {timeout} s; errors: {lm.dest.errors()[-5:]}")


def idle_calls(target: str, method: str, n: int, serializer) -> tuple[list[grpc.Channel], list[grpc.Future]]:
    """n calls of method that send their headers and then nothing, each on a
    connection of its own. A unary method is called as a stream (the wire is
    the same) so that its request never comes."""
    chans, calls = [], []
    for i in range(n):
        ch = channel(target, f"idle-{i}")
        call = ch.stream_unary(method, request_serializer=serializer, response_deserializer=lambda b: b)
        q: queue.Queue = queue.Queue()
        chans.append(ch)
        calls.append(call.future(iter(q.get, None), timeout=60))
    return chans, calls


def outcome(f: grpc.Future) -> tuple[grpc.StatusCode, str]:
    e = f.exception()
    return e.code(), e.details()


def connect_from(source_ip: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source_ip, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the peer closed s (end of file or reset) within timeout."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
def test_idle_grpc_streams_and_calls_of_one_host_do_not_hold_a_good_source(tmp_path, host):
    """The attack of the issue: Push streams that never send anything (more
    of them than the server used to have threads), and Open calls that never
    send their request. The host's calls beyond its slots are refused at
    once, saying why; a good source on another host is served meanwhile,
    over gRPC streams too; the idle calls are dropped at the first-message
    deadline (the agent serves on after the migration: --serve-forever)."""
    waiting = start_waiting(tmp_path, ("--serve-forever",))
    attacker = f"[::1]:{waiting.grpc_port}"
    t0 = time.monotonic()
    chans, pushes = idle_calls(attacker, "/migrate.v1.Migration/Push", 40, pb.PageBatch.SerializeToString)
    more, opens = idle_calls(attacker, OPEN, 12, pb.Hello.SerializeToString)
    chans += more
    try:
        over = (40 - LIMITS.host_streams) + (12 - LIMITS.host_calls)
        deadline = time.monotonic() + 8
        while sum(f.done() for f in pushes + opens) < over and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        refused = [f for f in pushes + opens if f.done()]
        assert len(refused) == over
        assert {outcome(f) for f in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED,
             f"refused: ::1 has {LIMITS.host_streams} Push and DeviceState streams under way here already, the most "
             "one host may hold (a source needs at most 5 streams and 2 calls): end the idle ones"),
            (grpc.StatusCode.RESOURCE_EXHAUSTED,
             f"refused: ::1 has {LIMITS.host_calls} Open and Finish calls under way here already, the most one host "
             "may hold (a source needs at most 5 streams and 2 calls): end the idle ones")}

        # a good source, pushing over gRPC streams, while ::1 holds its slots
        summary = finish_with_good_source(waiting, "--transport", "grpc")
        assert summary["pages_sent_push"] > 0
        held = [f for f in pushes + opens if f not in refused]
        if time.monotonic() - t0 < LIMITS.first_message - 1:   # (unless this machine is very slow)
            assert not any(f.done() for f in held)

        for f in held:
            f.exception(timeout=LIMITS.first_message + 10)
        ended = time.monotonic() - t0
        assert ended >= LIMITS.first_message
        assert sorted({outcome(f) for f in held}) == sorted({
            (grpc.StatusCode.DEADLINE_EXCEEDED,
             f"no Push request within {LIMITS.first_message:g} s of the call's start: dropped (a source sends it "
             "at once)"),
            (grpc.StatusCode.DEADLINE_EXCEEDED,
             f"no Open request within {LIMITS.first_message:g} s of the call's start: dropped (a source sends it "
             "at once)")})
    finally:
        for ch in chans:
            ch.close()
        waiting.close()


@pytest.mark.timeout(60)
def test_rpc_limits_in_every_host_and_between_messages():
    """Bounds on a server of its own with small limits: the slots of every
    host together, and a stream that goes quiet after its first message."""
    lim = RpcLimits(streams=3, host_streams=2, calls=1, host_calls=1, first_message=5.0, idle=1.0)

    def count(requests, context):
        return str(sum(1 for _ in requests)).encode()

    service = grpc.method_handlers_generic_handler("t.T", {
        "Push": grpc.stream_unary_rpc_method_handler(count),
        "Open": grpc.unary_unary_rpc_method_handler(lambda request, context: request[::-1])})
    server = grpc.server(futures.ThreadPoolExecutor(lim.workers), interceptors=[Bounds(lim)],
                         maximum_concurrent_rpcs=lim.workers, options=lim.options())
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("[::]:0")
    server.start()
    chans = []
    try:
        def stub(host):
            ch = grpc.insecure_channel(f"{host}:{port}")
            chans.append(ch)
            return ch.stream_unary("/t.T/Push"), ch.unary_unary("/t.T/Open")

        (push4, open4), (push6, _) = stub("127.0.0.1"), stub("[::1]")
        assert open4(b"abc", timeout=10) == b"cba"           # a unary call, served as a stream
        assert push4(iter([b"a", b"b", b"c"]), timeout=10) == b"3"
        gates = [queue.Queue() for _ in range(3)]
        held = [push4.future(iter(gates[0].get, None)), push4.future(iter(gates[1].get, None)),
                push6.future(iter(gates[2].get, None))]
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as third:
            push6(iter(queue.Queue().get, None), timeout=10)
        assert (third.value.code(), third.value.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "refused: this destination serves 3 Push and DeviceState streams already, the most it takes at once: "
            "try again when one has ended")
        # quiet after a first message: dropped after `idle`, not `first_message`
        t = time.monotonic()
        gates[0].put(b"x")
        assert outcome(held[0]) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "nothing came on this Push stream for 1 s: dropped")
        assert 0.9 < time.monotonic() - t < 4
        for g in gates[1:]:
            g.put(None)
        assert [f.result(timeout=10) for f in held[1:]] == [b"0", b"0"]
        # every slot was given back
        assert push6(iter([b"y"]), timeout=10) == b"1"
        assert not [t for t in threading.enumerate() if t.name.startswith("grpc-read-")]
    finally:
        for ch in chans:
            ch.close()
        server.stop(None)


@pytest.mark.timeout(180)
def test_1026_idle_channel_connections_under_a_1024_fd_limit(tmp_path, host):
    """The attack of the issue: 1,026 idle connections to the channel port of
    an agent whose descriptor limit is 1,024 (systemd's default). The agent
    keeps HOST_CHANNELS of them at most, the one waiting longest for its hello
    making room for each newcomer; the events about it are throttled. A good
    source from the same host opens its channels meanwhile (its hello comes
    at once: it makes room too) and the guest verifies."""
    lm = LocalMigration(str(tmp_path), SIZE, seed=16, pattern="random", vcpus=2,
                        dest_prefix=("prlimit", "--nofile=1024:1024", "--"))
    with lm:
        lm.make_image()
        port = lm.start_dest()["channel_port"]
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        pid = lm.dest.p.pid
        socks = []
        most = 0
        try:
            for i in range(1026):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                if i % 8 == 7:
                    time.sleep(0.01)   # (at the pace the agent takes them: none waits in its listen queue)
                if i % 64 == 63:
                    most = max(most, fd_count(pid))
            wait_error(lm, r"channel from 127\.0\.0\.1:\d+ closed before its hello to make room for one from "
                           rf"127\.0\.0\.1:\d+: 127\.0\.0\.1 holds {HOST_CHANNELS} connections here, the most one "
                           r"host may( \(\d+ more like it in the last \d+ s\))?", 10)
            most = max(most, fd_count(pid))
            finish_with_good_source(lm)
        finally:
            for s in socks:
                s.close()
        # the agent's descriptors: its own (about 20) and HOST_CHANNELS waiting connections
        assert most < 20 + HOST_CHANNELS + 20
        assert len(lm.dest.errors()) < 40, "refusals are reported at most once a second"


@pytest.mark.timeout(120)
def test_connections_that_never_say_hello_are_dropped_after_the_deadline(waiting):
    """One connection sends nothing, one trickles its hello a byte every 2 s
    (each byte in time for a per-read timeout): both are closed
    HELLO_TIMEOUT after they connected, and the agent says so."""
    port = waiting.channel_port
    silent = connect_from("127.0.0.2", port)
    trickle = connect_from("127.0.0.3", port)
    t0 = time.monotonic()
    closed_at = {}

    def watch(s):
        if closed_by_peer(s, HELLO_TIMEOUT + 10):
            closed_at[s] = time.monotonic() - t0

    watchers = [threading.Thread(target=watch, args=(s,)) for s in (silent, trickle)]
    for w in watchers:
        w.start()
    hello = DEMAND_MAGIC + b"t" * 16
    for i in range(len(hello) - 1):
        if trickle in closed_at:
            break
        trickle.sendall(hello[i:i + 1])
        time.sleep(2)
    for w in watchers:
        w.join()
    assert HELLO_TIMEOUT - 0.5 < closed_at[silent] < HELLO_TIMEOUT + 3
    assert HELLO_TIMEOUT - 0.5 < closed_at[trickle] < HELLO_TIMEOUT + 3
    ports = f"(127\\.0\\.0\\.2:{silent.getsockname()[1]}|127\\.0\\.0\\.3:{trickle.getsockname()[1]})"
    silent.close()
    trickle.close()
    # (the second one a moment after the first: left out of the events, and counted)
    wait_error(waiting, rf"channel from {ports}: no hello within {HELLO_TIMEOUT:g} s of connecting: closed", 5)
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_connections_over_the_caps_of_a_host_of_all_and_of_a_source(waiting):
    """Over HOST_CHANNELS from one host, and over ALL_CHANNELS from several,
    the connection that has waited longest for its hello goes; a source (one
    holding a session's token) opening more than PUSH_CHANNELS push channels
    has the extra one refused. Then a good source completes."""
    port = waiting.channel_port
    first = [connect_from("127.0.0.2", port) for _ in range(HOST_CHANNELS)]
    time.sleep(0.5)
    newcomer = connect_from("127.0.0.2", port)
    assert closed_by_peer(first[0], 5), "the oldest waiting connection of the host makes room"
    assert not closed_by_peer(first[1], 0.5) and not closed_by_peer(newcomer, 0.5)
    wait_error(waiting, rf"channel from 127\.0\.0\.2:{first[0].getsockname()[1]} closed before its hello to make room "
                        rf"for one from 127\.0\.0\.2:{newcomer.getsockname()[1]}: 127\.0\.0\.2 holds {HOST_CHANNELS} "
                        r"connections here, the most one host may", 5)
    socks = first + [newcomer]

    # more hosts: ALL_CHANNELS in all; the next one makes the oldest of all go
    hosts = ALL_CHANNELS // HOST_CHANNELS
    for h in range(1, hosts):
        socks += [connect_from(f"127.0.0.{2 + h}", port) for _ in range(HOST_CHANNELS)]
    time.sleep(0.5)
    oldest = first[1]
    last = connect_from(f"127.0.0.{2 + hosts}", port)
    socks.append(last)
    assert closed_by_peer(oldest, 5)
    time.sleep(1.1)   # (refusal events: at most one a second of each kind)
    extra = connect_from(f"127.0.0.{2 + hosts}", port)
    socks.append(extra)
    wait_error(waiting, rf"channel from 127\.0\.0\.2:{first[2].getsockname()[1]} closed before its hello to make room "
                        rf"for one from 127\.0\.0\.{2 + hosts}:{extra.getsockname()[1]}: {ALL_CHANNELS} connections "
                        r"are held here, the most the agent takes( \(\d+ more like it in the last \d+ s\))?", 5)
    for s in socks:
        s.close()

    # a source with a token: PUSH_CHANNELS push channels, and no more
    ch = channel(waiting.address, "test")
    welcome = pbg.MigrationStub(ch).Open(pb.Hello(version=PROTOCOL_VERSION, ram_size=SIZE, page_size=4096,
                                                  source_name="greedy"), timeout=30)
    demand = socket.create_connection(("127.0.0.1", port), timeout=10)
    demand.sendall(DEMAND_MAGIC + welcome.demand_token)
    waiting.dest.wait_event("demand", 30)
    pushes = []
    for _ in range(PUSH_CHANNELS + 1):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(PUSH_MAGIC + welcome.demand_token)
        pushes.append(s)
    # (each says its hello on a thread of its own: any one of them may come last)
    time.sleep(1)
    refused = [s for s in pushes if closed_by_peer(s, 0.2)]
    assert len(refused) == 1
    wait_error(waiting, rf"push channel from 127\.0\.0\.1:{refused[0].getsockname()[1]} refused: its source has "
                        rf"{PUSH_CHANNELS} push channels open already, the most a source may", 5)
    for s in pushes:
        s.close()
    demand.close()      # the greedy source goes; a good one takes the guest over
    ch.close()
    waiting.dest.wait_event("disconnected", 30)
    finish_with_good_source(waiting)


@pytest.mark.timeout(120)
def test_the_channel_port_outlives_running_out_of_file_descriptors(waiting):
    """The agent's descriptors run out (its limit lowered under it to a few
    more than it holds) while idle connections from several hosts wait for
    their hello: accept() fails with EMFILE, and the loop goes on. The
    spare descriptor takes each waiting connection in place of the one that
    waited longest; once the idle ones reach their deadline a good source
    opens its channels and the guest verifies."""
    pid = waiting.dest.p.pid
    limit = fd_count(pid) + 24
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    port = waiting.channel_port
    socks = [connect_from(f"127.0.0.{2 + i // HOST_CHANNELS}", port) for i in range(40)]
    try:
        wait_error(waiting, rf"channel port: out of file descriptors \(Too many open files; ulimit -n is {limit}\): "
                            r"the connection from 127\.0\.0\.\d+:\d+ that waited longest for its hello was closed "
                            r"for one from 127\.0\.0\.\d+:\d+( \(\d+ more like it in the last \d+ s\))?", 10)
        assert fd_count(pid) >= limit - 2   # (all of them but a spare being taken again)
        finish_with_good_source(waiting)
    finally:
        for s in socks:
            s.close()

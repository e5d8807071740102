"""A real, unmodified QEMU 7.2 guest (TCG) migrated post-copy by this engine.

The flow is migrate.qemu.localrun.run (what examples/qemu/run.sh runs): source QEMU on a
share=on RAM file, `migrate dest --qmp` + destination QEMU under the shim,
`migrate source --qmp`. The guest's own memfill checks every page and prints
VERIFY OK. Each QEMU also has a watching QMP monitor whose STOP/RESUME events
(QEMU's own timestamps) prove the source was paused before the destination ran.
Everything started is stopped by pid; files, sockets, mounts and huge pages are
given back by migrate.qemu.lab.Lab.
"""

from __future__ import annotations

import contextlib
import glob
import os
import json
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from migrate import exits
from migrate.host import features
from migrate.qemu import localrun, resume_hint
from migrate.qemu.lab import Lab
from migrate.qemu.qmp import QemuError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "qemu")

MEM_MB = 384


def _why_not_qemu() -> str | None:
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
    if not glob.glob("/boot/vmlinuz-*"):
        return "no guest kernel in /boot (apt-get install linux-image-amd64)"
    for tool, pkg in (("busybox", "busybox-static"), ("cpio", "cpio"), ("gcc", "gcc")):
        if not shutil.which(tool):
            return f"{tool} is missing (apt-get install {pkg})"
    if os.geteuid() != 0:
        return "needs root: the agent registers another process's memory, and hugetlbfs needs mounts"
    why = features().why_not("minor_shmem")
    if why:
        return why
    return None


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """The guest every QEMU test boots; those tests skip here without QEMU."""
    why = _why_not_qemu()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("qemu-guest")
    r = subprocess.run([os.path.join(EXAMPLES, "build-guest.sh"), str(out)], capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        pytest.skip(f"cannot build the guest: {r.stderr.strip()[-500:]}")
    return str(out)


def _check_migrated(res: dict):
    assert res["verify"] is not None and res["verify"].startswith("VERIFY OK"), res
    assert int(res["verify"].split()[2]) == res["pages"] > 0
    assert res["source_rc"] == 0 and res["dest_rc"] == 0, res.get("errors")
    assert res["dest"]["state"] == "complete" and res["dest"]["guest_running"] is True
    # never two running copies: the source was stopped (QEMU's STOP event) before the
    # destination resumed (its RESUME event), was still paused when the destination
    # reported running, and never resumed afterwards
    assert res["src_stop_time"] is not None and res["dst_resume_time"] is not None
    assert res["src_stop_time"] < res["dst_resume_time"]
    # (finish-migrate: stopped, QEMU still closing its side of the stream,
    # which the destination may have loaded already)
    assert res["src_status_at_dst_running"] in ("paused", "postmigrate", "finish-migrate")
    assert not res["src_resumed"]
    assert res["src_status_after"] in ("paused", "postmigrate")
    assert res["dst_status_after"] == "running"


def _check_attach_did_not_wait(res: dict):
    """The destination QEMU waits inside mmap (the shim) for the agent's ack
    only: its RAM is allocated after the ack, in the background."""
    d = res["dest"]
    assert res["attach_ack_ms"] == d["ack_ms"] and 0 < d["ack_ms"] < 500, d
    assert d["ack_ms"] < d["prepare_s"] * 1000, d


@pytest.mark.timeout(300)
def test_qemu_guest_postcopy_tmpfs(guest):
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True))
    print({k: res.get(k) for k in ("downtime_ms", "total_ms", "guest_verify_ms")})
    _check_migrated(res)
    _check_attach_did_not_wait(res)
    # the guest writes 379 of its 512 MiB: the source's RAM file keeps holes
    # where it never wrote, found once QEMU paused and sent unread as zero pages
    assert res["source"]["hole_pages"] > 0, res["source"]
    # without --quit-source the last word on the source QEMU: paused, and its RAM file named
    ram, qmp = res["src_ram"], res["source_qemu"][0]["qmp"]
    assert res["source_qemu"] == [{
        "event": "source-qemu", "state": "paused", "qmp": qmp, "ram_file": ram,
        "message": f"the source QEMU stays paused (QEMU status postmigrate) and its RAM file {ram} is still there: "
                   "once the VM need not "
                   f"go back, `python -m migrate.qemu {qmp} quit` and remove the file (or give the source "
                   "--quit-source)"}], res["source_qemu"]
    # blocked time per vCPU: the faults' thread ids mapped to vCPU indexes
    # through QEMU's query-cpus-fast (other QEMU threads, e.g. the device-state
    # load's, are listed without one)
    vcpus = [v for v in res["dest"]["vcpus"] if v["vcpu"] is not None]
    assert [v["vcpu"] for v in vcpus] == [0] and vcpus[0]["blocked_s"] > 0 and vcpus[0]["faults"] > 0, \
        res["dest"]["vcpus"]
    assert not glob.glob(f"/dev/shm/migrate-*-{os.getpid()}")


@pytest.mark.timeout(300)
def test_qemu_guest_survives_its_destination_agent_dying(guest):
    """SIGKILL the destination agent right after the guest runs: QEMU's vCPUs
    block on missing pages (never reading zeros), the shim re-attaches the same
    userfaultfd to a new agent, which keeps the pages already mapped, and a new
    source serves the rest. The guest's own check of every page passes."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True), kill_agent=True)
    print({k: res.get(k) for k in ("killed_agent_at_received", "pages_prior", "first_source_rc", "verify")})
    assert res["first_source_rc"] != 0          # its destination went away
    assert res["pages_prior"] is not None and res["pages_prior"] < MEM_MB * 256
    # the second agent has no --qmp: the guest already runs, there is no device state to feed
    res["dest"]["guest_running"] = res["dst_status_after"] == "running"
    _check_migrated(res)
    assert res["dest"]["pages_prior"] == res["pages_prior"]


@pytest.mark.timeout(300)
def test_qemu_guest_recovers_when_its_agent_is_restarted(guest):
    """SIGKILL the destination agent right after the guest runs, then run the
    same `migrate dest --qmp` command again and nothing else: the shim
    re-attaches QEMU to it, the first source (its QEMU paused throughout)
    resumes the session for that guest, and the guest's check prints VERIFY OK."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True), kill_agent=True,
                       recover=True, source_args=("--max-rate", "100M"))
    print({k: res.get(k) for k in ("killed_agent_at_received", "pages_prior", "restart_to_resumed_ms", "verify")})
    assert res["src_status_while_lost"] in ("paused", "postmigrate")
    assert res["pages_prior"] is not None and res["pages_prior"] < MEM_MB * 256
    _check_migrated(res)   # the first source completed (exit 0), the source QEMU never resumed
    assert res["dest"]["pages_prior"] == res["pages_prior"]


@pytest.mark.timeout(300)
def test_qemu_guest_recovers_when_its_agent_dies_as_it_says_the_guest_runs(guest):
    """SIGKILL the destination agent the moment it reports its guest running,
    before (mostly) its answer reaches the source, then run the same `migrate
    dest --qmp` again: the source, unsure the state loaded, names the guest
    because it sent that state; the restarted agent asks its QEMU (status
    running, incoming migration completed) and takes it. VERIFY OK, exit 0.
    (Before, the source named no guest, and ended with exit 4.)"""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True), kill_agent=True,
                       recover=True, kill_unheard=True, source_args=("--max-rate", "100M"))
    print({k: res.get(k) for k in ("source_heard_running", "pages_prior", "restart_to_resumed_ms", "verify")})
    assert res["src_status_while_lost"] in ("paused", "postmigrate")
    _check_migrated(res)   # the first source completed (exit 0), the source QEMU never resumed
    assert res["dest"]["pages_prior"] == res["pages_prior"]


@pytest.mark.timeout(120)
def test_a_recovering_source_is_refused_by_a_qemu_that_loaded_no_device_state(guest, tmp_path):
    """A source recovering its guest (Hello.resume_guest, no device state)
    meets a `dest --qmp` whose QEMU waits in migrate-incoming (it never
    loaded a state): refused, saying the guest never ran there, so that the
    source does not serve a guest that will not run while its own QEMU stays
    paused. (An agent restarted after its QEMU loaded the state takes it:
    test_qemu_guest_recovers_when_its_agent_dies_as_it_says_the_guest_runs.)"""
    import grpc

    from migrate.dest.attach import guest_instance
    from migrate.proto import migration_pb2 as pb
    from migrate.proto import migration_pb2_grpc as pbg
    from migrate.qemu.shim import shim_path
    from migrate.sim.localrun import Proc
    from migrate.wire.protocol import PROTOCOL_VERSION, channel

    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        ram = lab.shm_path("migrate-unloaded")
        attach, agent_qmp = str(tmp_path / "a" / "attach.sock"), str(tmp_path / "dst.agent.qmp")
        dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", agent_qmp, "--json"])
        try:
            addr = dest.wait_event("listening", 30)["address"]
            dst, _, _ = lab.start("dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}, mem_mb=256,
                                  backend="file", mem_path=ram, incoming="defer",
                                  extra_args=["-qmp", f"unix:{agent_qmp},server=on,wait=off"])
            dest.wait_event("attached", 30)
            dest.wait_event("qemu", 30)   # its QEMU waits in migrate-incoming
            fd = os.open(ram, os.O_RDONLY)
            try:
                instance = guest_instance(dst.pid, fd)   # the one its first agent would have named
            finally:
                os.close(fd)
            ch = channel(addr, "test")
            try:
                with pytest.raises(grpc.RpcError) as e:
                    pbg.MigrationStub(ch).Open(pb.Hello(
                        version=PROTOCOL_VERSION, ram_size=256 << 20, page_size=4096, source_name="recovering",
                        compression=[pb.COMPRESSION_NONE], resume_session="0123456789ab",
                        resume_guest=instance), timeout=30)
            finally:
                ch.close()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert e.value.details() == (
                "cannot recover session 0123456789ab without device state: the destination QEMU here has not "
                "loaded a device state (it is inmigrate), so the guest never ran here"), e.value.details()
            assert dest.p.poll() is None
        finally:
            dest.kill()


@pytest.mark.timeout(300)
def test_a_source_stopped_by_sigterm_leaves_its_qemu_paused(guest):
    """SIGTERM the source agent once the destination guest runs: it stops
    pushing and exits 143 saying its QEMU stays paused (the guest runs on
    the destination), which it does; a new source resumes the session, and
    the guest prints VERIFY OK."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                       source_args=("--max-rate", "100M"), stop_source=True)
    assert res["first_source_rc"] == exits.STOPPED_BASE + 15, res["first_source_errors"]
    (err,) = res["first_source_errors"]
    # (the signal may come before the source has read the destination's "the
    # guest runs": then it says the guest may run there; paused either way)
    assert err.startswith("stopped by SIGTERM mid-migration (") and "the source QEMU stays paused" in err, err
    assert "--resume" in err, err
    assert res["src_status_after_first_source"] in ("paused", "postmigrate")
    _check_migrated(res)


@pytest.mark.timeout(300)
def test_qemu_guest_recovers_from_a_network_split_by_itself(guest, split_network):
    """The link to the destination goes dead for longer than both timeouts
    (2 s) while the guest reads its memory. The source reports `lost`, its
    QEMU paused; once the link is back it resumes the same session on the
    same agent by itself (no device state: the guest runs there), VERIFY OK."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                       source_args=("--max-rate", "100M", "--dest-timeout", "2"), split=split_network,
                       recover=True)
    assert res["src_status_while_lost"] in ("paused", "postmigrate")
    assert res["recovered"] == res["lost_session"]
    assert 0 < res["cut_at_received"] < MEM_MB * 256
    _check_migrated(res)


@pytest.mark.timeout(300)
def test_qemu_guest_survives_a_network_split(guest, split_network):
    """The destination agent runs on a second host (a network namespace); the
    link to it goes dead while the destination guest reads its memory. Both
    agents give up on each other after 2 s (the first source exits; the source
    QEMU stays paused: never two running copies); once the link is back a new
    source resumes the session, and the guest's own check of every page passes."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                           source_args=("--max-rate", "100M", "--dest-timeout", "2"), split=split_network)
    print({k: res.get(k) for k in ("cut_at_received", "first_source_rc", "first_source_errors", "verify")})
    assert res["first_source_rc"] != 0
    assert any("the destination is gone" in e and "source QEMU stays paused" in e
               for e in res["first_source_errors"]), res["first_source_errors"]
    assert 0 < res["cut_at_received"] < MEM_MB * 256
    _check_migrated(res)


@pytest.mark.timeout(300)
def test_qemu_guest_survives_a_network_split_while_its_device_state_loads(guest, split_network):
    """The link to the destination goes dead after the destination has the
    device state, while its QEMU loads it (held there by SIGSTOP). The source
    cannot know whether the guest runs there: it gives up after --dest-timeout
    (not the 120 s the device-state call may take), keeps its QEMU paused and
    says to resume the session. Once the link is back and the load goes on, a
    new source without --qmp resumes the session (the destination takes it:
    the state is there, loading); the guest runs there and checks every page."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                           source_args=("--dest-timeout", "2"), split=split_network, split_during_load=True)
    print({k: res.get(k) for k in ("first_source_rc", "first_source_exit_s", "first_source_errors", "verify")})
    assert res["first_source_rc"] == 1
    assert res["first_source_exit_s"] < 30, res["first_source_exit_s"]
    err = " ".join(res["first_source_errors"])
    assert "the destination is gone" in err and "the source QEMU stays paused" in err, err
    assert "--resume" in err and "only if the destination refuses that resume" in err, err
    assert res["src_status_after_first_source"] in ("paused", "postmigrate")
    _check_migrated(res)


@pytest.mark.timeout(300)
def test_qemu_guest_survives_its_source_qemu_dying(guest):
    """SIGKILL the source QEMU as soon as the destination guest runs, with most
    of its RAM still to come. In QEMU's own post-copy the pages die with that
    process; here they are in its share=on RAM file, which the source agent
    maps: the migration finishes, the source agent exits 0 and says the source
    QEMU went away, and the guest's own check of every page passes."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                           source_args=("--max-rate", "100M"), kill_source_qemu=True)
    print({k: res.get(k) for k in ("source_qemu_killed_at_received", "verify", "total_ms")})
    assert res["source_qemu_killed_at_received"] < MEM_MB * 256 // 2
    # the destination completed after the source QEMU was gone
    done = [t for t, who, ev in res["timeline"] if who == "dest" and ev == "completed"]
    assert done and res["src_stop_time"] + done[0] / 1e3 > res["source_qemu_killed_time"], res["timeline"]
    assert res["source"]["source_status"] == "gone", res["source"]
    res["src_status_after"] = "paused"   # it is gone, and it never ran again: the RESUME check below holds
    _check_migrated(res)


@pytest.mark.timeout(300)
def test_a_destination_qemu_dying_leaves_the_source_paused(guest):
    """SIGKILL the destination QEMU once its guest runs. The guest is lost
    there (as in any post-copy); the destination agent fails naming its guest,
    the source agent exits saying the guest is lost and why the source QEMU
    stays paused: resuming it would take the VM back behind the destination
    guest's own I/O, so it is left to a person who knows that is safe."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                           source_args=("--max-rate", "100M"), kill_dest_qemu=True)
    print({k: res.get(k) for k in ("dest_rc", "dest_errors", "source_rc", "source_errors", "src_status_after")})
    assert res["dest_rc"] == exits.GUEST_LOST and len(res["dest_errors"]) == 1
    assert res["dest_errors"][0].startswith(f"guest process {res['dst_pid']} went away"), res["dest_errors"]
    assert res["source_rc"] == exits.GUEST_LOST
    err = " ".join(res["source_errors"])
    assert "went away before the migration ended" in err and "is lost there" in err, err
    assert "the source QEMU stays paused" in err and "migrate.qemu" in err, err
    assert res["src_status_after"] in ("paused", "postmigrate") and not res["src_resumed"]


@pytest.mark.timeout(300)
@pytest.mark.huge
def test_qemu_guest_postcopy_hugetlbfs(guest):
    why = features().why_not("minor_hugetlbfs")
    if why:
        pytest.skip(why)
    before = open("/proc/sys/vm/nr_hugepages").read()
    try:
        res = localrun.run(guest, MEM_MB, hugetlbfs=True, log=lambda m: print(m, flush=True))
    except QemuError as e:
        if "could not reserve" in str(e):
            pytest.skip(f"not enough 2 MiB huge pages for two {MEM_MB} MiB guests: {e}")
        raise
    _check_migrated(res)
    _check_attach_did_not_wait(res)
    assert res["dest"]["page_size"] == 2 << 20
    # hugetlbfs reports no holes: the source probed for the huge pages its
    # guest never wrote and sent them unread (reading one would allocate it)
    assert res["source"]["hole_pages"] > 0, res["source"]
    assert open("/proc/sys/vm/nr_hugepages").read() == before


@pytest.mark.timeout(120)
def test_source_qemu_resumed_when_destination_refuses(guest, tmp_path):
    """A destination that cannot take device state (no --qmp) refuses the session
    before the source QEMU is paused: the source agent exits 1 and the source QEMU
    never stops."""
    from migrate.qemu.qmp import QMP
    from migrate.sim.localrun import Proc

    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        ram = lab.shm_path("migrate-refused")
        agent_qmp = str(tmp_path / "src.agent.qmp")
        src, qs, ss = lab.start("src", mem_mb=256, backend="file", mem_path=ram,
                                extra_args=["-qmp", f"unix:{agent_qmp},server=on,wait=off"])
        procs = []
        try:
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", str(tmp_path / "a.sock"), "--json"])
            procs.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            source = Proc("source", ["source", "--qmp", agent_qmp, "--ram", ram, "--to", addr, "--json"])
            procs.append(source)
            assert source.wait(60) == 1
            errors = " ".join(source.errors())
            # the session is opened before the source QEMU is paused: the refusal
            # comes first, and the source QEMU never stopped
            assert "started without --qmp" in errors and "the source QEMU was not paused" in errors, errors
            assert [e["event"] for e in source.lines if e["event"] in ("paused", "resumed")] == []
            q = QMP(agent_qmp)
            try:
                assert q.status() == "running"
            finally:
                q.close()
            qs.cmd("query-status")
            seen = [e["event"] for e in qs.events if e["event"] in ("STOP", "RESUME")]
            assert seen == []
            # the guest goes on where it was: memfill still finishes its fill
            ss.wait_for(r"FILLED \d+", timeout=90)
        finally:
            for p in procs:
                p.kill()
    assert not os.path.exists(ram)


@pytest.mark.timeout(180)
def test_source_qemu_resumed_when_destination_cannot_load(guest, tmp_path):
    """A destination QEMU of another machine type fails to load the device state:
    the destination answers guest_running=false, the source QEMU runs again and
    its guest is intact."""
    from migrate.qemu.shim import shim_path
    from migrate.sim.localrun import Proc

    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        src_ram, dst_ram = lab.shm_path("migrate-src-bad"), lab.shm_path("migrate-dst-bad")
        src_qmp, dst_qmp = str(tmp_path / "src.agent.qmp"), str(tmp_path / "dst.agent.qmp")
        src, qs, ss = lab.start("src", mem_mb=256, backend="file", mem_path=src_ram,
                                extra_args=["-qmp", f"unix:{src_qmp},server=on,wait=off"])
        ss.wait_for(r"FILLED \d+", timeout=90)
        procs = []
        try:
            attach = str(tmp_path / "a.sock")
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", dst_qmp, "--json"])
            procs.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            lab.start("dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}, mem_mb=256,
                      backend="file", mem_path=dst_ram, incoming="defer",
                      extra_args=["-machine", "q35", "-qmp", f"unix:{dst_qmp},server=on,wait=off"])
            dest.wait_event("attached", 30)
            source = Proc("source", ["source", "--qmp", src_qmp, "--ram", src_ram, "--to", addr, "--json"])
            procs.append(source)
            assert source.wait(90) == 1
            errors = " ".join(source.errors())
            assert "the destination did not resume the guest" in errors and "source QEMU was resumed" in errors, errors
            qs.cmd("query-status")
            assert [e["event"] for e in qs.events if e["event"] in ("STOP", "RESUME")] == ["STOP", "RESUME"]
            assert qs.cmd("query-status")["status"] == "running"
            ss.send("\n")
            assert ss.wait_for(r"VERIFY (OK|BAD)[^\n]*", timeout=60).group(0).startswith("VERIFY OK")
        finally:
            for p in procs:
                p.kill()


def test_resume_hint_is_the_advice_the_agents_print():
    assert resume_hint("/run/src.qmp") == "`python -m migrate.qemu /run/src.qmp cont`"
    assert resume_hint() == "`python -m migrate.qemu SOURCE_QMP_SOCKET cont`"


# A process that maps 64 MiB of a memfd MAP_SHARED (what the shim attaches),
# says so, and lives until its stdin closes.
_MAPS_RAM = """
import mmap, os, sys
fd = os.memfd_create("guest-ram")
os.ftruncate(fd, 64 << 20)
m = mmap.mmap(fd, 64 << 20, mmap.MAP_SHARED)
print("mapped", flush=True)
sys.stdin.read()
"""


def start_under_shim(attach_path: str) -> subprocess.Popen:
    """The _MAPS_RAM process under the shim, attaching to attach_path (stdin,
    stdout and stderr piped, text). The caller ends it."""
    from migrate.qemu.shim import shim_path
    env = dict(os.environ, LD_PRELOAD=shim_path(), MIGRATE_ATTACH=attach_path, MIGRATE_SHIM_DEBUG="1")
    return subprocess.Popen([sys.executable, "-c", _MAPS_RAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":"), (",\n ", " :\t")],
                         ids=["json.dumps-default", "compact", "spaced"])
def test_shim_reads_agent_messages_whatever_their_whitespace(tmp_path, separators):
    """The shim must tell a finished migration from a dead agent by parsing
    the agent's JSON, not by matching the bytes one encoder happens to write
    (docs/attach-protocol.md): with {"event":"complete"} in any spacing it
    ends quietly, and does not attach again as it does after a dead agent."""
    why = features().why_not("uffd")
    if why:
        pytest.skip(why)
    from migrate.wire.attach import recv_msg

    path = str(tmp_path / "attach.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(2)
    listener.settimeout(20)
    child = start_under_shim(path)
    try:
        conn, _ = listener.accept()
        conn.settimeout(20)
        hello, fds = recv_msg(conn, want_fds=2)
        for fd in fds:
            os.close(fd)
        assert hello["ram_size"] == 64 << 20 and not hello.get("reattach"), hello

        def send(obj):
            body = json.dumps(obj, separators=separators).encode()
            conn.sendall(struct.pack(">I", len(body)) + body)

        send({"ok": True})
        assert child.stdout.readline() == "mapped\n"
        send({"event": "switchover"})
        send({"event": "complete", "pages_total": 16384})
        conn.close()
        # after a dead agent (EOF without "complete") the shim attaches again at once
        listener.settimeout(2)
        with pytest.raises(socket.timeout):
            again, _ = listener.accept()
            again.close()
        _, err = child.communicate("", timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        listener.close()
    assert child.returncode == 0, err
    assert "migration complete for" in err and "went away" not in err, err


def _start_under_shim_env(attach_path: str, **env) -> subprocess.Popen:
    from migrate.qemu.shim import shim_path
    full = dict(os.environ, LD_PRELOAD=shim_path(), MIGRATE_ATTACH=attach_path, **env)
    return subprocess.Popen([sys.executable, "-c", _MAPS_RAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full)


@pytest.mark.timeout(60)
def test_shim_waits_for_an_agent_started_after_it(tmp_path):
    """QEMU may start before its agent: the shim tries the attach socket again
    until MIGRATE_ATTACH_WAIT runs out (here the agent comes 1.5 s later; a
    stale socket file nobody listens on counts as no agent)."""
    why = features().why_not("uffd")
    if why:
        pytest.skip(why)
    from migrate.wire.attach import recv_msg

    path = str(tmp_path / "attach.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)        # a dead agent's socket: bound, never listened on
    stale.close()
    child = _start_under_shim_env(path, MIGRATE_ATTACH_WAIT="30")
    listener = None
    try:
        time.sleep(1.5)
        assert child.poll() is None, child.communicate(timeout=5)
        os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(20)
        conn, _ = listener.accept()
        conn.settimeout(20)
        hello, fds = recv_msg(conn, want_fds=2)
        for fd in fds:
            os.close(fd)
        assert hello["ram_size"] == 64 << 20
        body = json.dumps({"ok": True}).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
        assert child.stdout.readline() == "mapped\n"
        for ev in ({"event": "switchover"}, {"event": "complete", "pages_total": 16384}):
            body = json.dumps(ev).encode()
            conn.sendall(struct.pack(">I", len(body)) + body)
        conn.close()
        _, err = child.communicate("", timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if listener is not None:
            listener.close()
    assert child.returncode == 0, err
    assert "waiting up to 30 s (MIGRATE_ATTACH_WAIT)" in err, err
    assert f"the migrate agent at {path} is there" in err, err


@pytest.mark.timeout(60)
def test_shim_gives_up_when_no_agent_comes_within_its_wait(tmp_path):
    why = features().why_not("uffd")
    if why:
        pytest.skip(why)
    path = str(tmp_path / "attach.sock")
    t0 = time.monotonic()
    child = _start_under_shim_env(path, MIGRATE_ATTACH_WAIT="1")
    out, err = child.communicate("", timeout=30)
    took = time.monotonic() - t0
    assert child.returncode == 1 and "mapped" not in out
    assert "within MIGRATE_ATTACH_WAIT=1 s" in err and f"start `migrate dest --attach {path}`" in err, err
    assert 1 <= took < 15, took


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["soon", "-1", "1e9", ""])
def test_shim_refuses_a_bad_attach_wait(tmp_path, value):
    """A MIGRATE_ATTACH_WAIT that is not a number of seconds is said at once
    (an empty one is the default)."""
    why = features().why_not("uffd")
    if why:
        pytest.skip(why)
    child = _start_under_shim_env(str(tmp_path / "attach.sock"), MIGRATE_ATTACH_WAIT=value)
    if value == "":
        time.sleep(1)
        assert child.poll() is None   # waiting its default 60 s
        child.kill()
        child.wait()
        return
    _, err = child.communicate("", timeout=20)
    assert child.returncode == 1
    assert f"MIGRATE_ATTACH_WAIT={value}: not a number of seconds from 0 to 86400" in err, err


# -- finding the source QEMU's RAM (source --qmp without --ram) ---------------
@contextlib.contextmanager
def bare_qemu(tmp_path, *objects: str, machine: str = "pc,memory-backend=ram0", run: bool = False,
              extra: tuple = ()):
    """A QEMU that never boots (-S; run: its firmware runs, finding nothing
    to boot), with these -object arguments and a QMP socket; yields (its
    process, the QMP socket path). Stopped by pid."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("needs root: the source agent reads QEMU's /proc/PID/fd")
    qmp = str(tmp_path / "bare.qmp")
    argv = ["qemu-system-x86_64", "-accel", "tcg", *([] if run else ["-S"]), "-nodefaults", "-display", "none", "-m", "64M",
            "-machine", machine, "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    for o in objects:
        argv += ["-object", o]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield p, qmp
    finally:
        p.kill()
        p.wait(10)


@pytest.mark.timeout(60)
def test_source_finds_a_memfd_backend_among_qemus_descriptors(tmp_path):
    from migrate.qemu.source import find_ram_backend
    with bare_qemu(tmp_path, "memory-backend-memfd,id=ram0,size=64M,share=on") as (p, qmp):
        b = find_ram_backend(qmp)
        assert (b.id, b.kind, b.size, b.pid, b.file) == ("ram0", "memfd", 64 << 20, p.pid, None)
        assert b.path.startswith(f"/proc/{p.pid}/fd/")
        assert os.readlink(b.path).startswith("/memfd:") and os.stat(b.path).st_size == 64 << 20
        assert b.describe() == f"memory backend ram0 of QEMU pid {p.pid}: 64 MiB, memfd {b.path}"


@pytest.mark.timeout(60)
def test_source_finds_a_file_backend_by_its_mem_path(tmp_path):
    from migrate.qemu.source import find_ram_backend
    ram = f"/dev/shm/migrate-bare-{os.getpid()}"
    try:
        with bare_qemu(tmp_path, f"memory-backend-file,id=ram0,size=64M,mem-path={ram},share=on") as (p, qmp):
            b = find_ram_backend(qmp)
            assert (b.kind, b.path, b.file, b.size) == ("file", ram, ram, 64 << 20)
        # a mem-path that is a directory: QEMU's file there is unlinked, and
        # found among its descriptors
        d = tmp_path / "ramdir"
        d.mkdir()
        shm = f"/dev/shm/migrate-bare-dir-{os.getpid()}"
        os.mkdir(shm)
        try:
            with bare_qemu(tmp_path, f"memory-backend-file,id=ram0,size=64M,mem-path={shm},share=on") as (p, qmp):
                b = find_ram_backend(qmp)
                assert b.kind == "file" and b.file is None and b.path.startswith(f"/proc/{p.pid}/fd/")
                assert os.readlink(b.path).startswith(shm + "/")
        finally:
            os.rmdir(shm)
    finally:
        if os.path.exists(ram):
            os.unlink(ram)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("objects,machine,message", [
    ((), "pc", "memory backend pc.ram is not share=on: its RAM would travel inside QEMU's stream; start QEMU with "
     "share=on on every memory backend"),
    (("memory-backend-memfd,id=ram0,size=64M,share=on", "memory-backend-memfd,id=ram1,size=32M,share=on"),
     "pc,memory-backend=ram0", "QEMU at QMP has 2 memory backends (ram1 (32 MiB), ram0 (64 MiB)) and this engine serves one: "
     "pass --ram with the file of the backend to serve (its mem-path, or /proc/PID/fd/N of a memfd)"),
    (("memory-backend-ram,id=ram0,size=64M,share=on",), "pc,memory-backend=ram0",
     "memory backend ram0 of QEMU at QMP is a memory-backend-ram, which has no file this agent can open: start QEMU "
     "with memory-backend-file (on tmpfs or hugetlbfs) or memory-backend-memfd, share=on, or pass --ram"),
], ids=["private-ram", "two-backends", "anonymous-shared"])
def test_source_says_why_it_cannot_find_the_ram(tmp_path, objects, machine, message):
    """source --qmp without --ram, on a QEMU whose RAM it cannot serve: exit 2,
    saying what is wrong and what to pass."""
    from migrate.sim.localrun import Proc
    with bare_qemu(tmp_path, *objects, machine=machine) as (p, qmp):
        src = Proc("source", ["source", "--qmp", qmp, "--to", "127.0.0.1:1", "--json"])
        try:
            assert src.wait(30) == 2
        finally:
            src.kill()
        assert src.errors() == [f"finding the source QEMU's RAM: {message.replace('QMP', qmp)}"]


@pytest.mark.timeout(300)
def test_qemu_without_friction_memfd_no_ram_flag_quit_source(guest, tmp_path):
    """The flow an operator tried by hand, with none of its friction: the
    source QEMU's RAM is a memfd, and `source --qmp` finds it itself (no
    --ram); the destination QEMU starts before its agent, and the shim waits
    for the agent; --quit-source quits the source QEMU once the migration
    completed. The guest's own check of every page passes."""
    import threading
    from migrate.qemu.shim import shim_path
    from migrate.sim.localrun import Proc

    mem_mb = 256
    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        src_qmp, dst_qmp = str(tmp_path / "src.agent.qmp"), str(tmp_path / "dst.agent.qmp")
        src, qs, ss = lab.start("src", mem_mb=mem_mb, backend="memfd",
                                extra_args=["-qmp", f"unix:{src_qmp},server=on,wait=off"])
        pages = int(ss.wait_for(r"FILLED (\d+) ", timeout=120).group(1))
        attach = str(tmp_path / "agent" / "attach.sock")
        started = []
        # the destination QEMU first: its shim waits in QEMU's mmap of the RAM
        t = threading.Thread(target=lambda: started.append(lab.start(
            "dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}, mem_mb=mem_mb, backend="memfd",
            incoming="defer", extra_args=["-qmp", f"unix:{dst_qmp},server=on,wait=off"])), daemon=True)
        t.start()
        procs = []
        try:
            time.sleep(2)
            dst_proc = lab.procs[-1]
            assert dst_proc.poll() is None, "the destination QEMU did not wait for its agent"
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", dst_qmp, "--json"])
            procs.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            dest.wait_event("attached", 60)
            t.join(60)
            assert started, "the destination QEMU did not come up once its agent was there"
            _, qd, sd = started[0]
            source = Proc("source", ["source", "--qmp", src_qmp, "--to", addr, "--quit-source", "--json"])
            procs.append(source)
            ram = source.wait_event("ram", 30)
            assert ram["kind"] == "memfd" and ram["path"].startswith(f"/proc/{src.pid}/fd/"), ram
            assert ram["size"] == mem_mb << 20 and ram["pid"] == src.pid
            dest.wait_event("guest-running", 120)
            sd.send("\n")
            v = sd.wait_for(r"VERIFY (OK (\d+) \d+ ms|BAD [^\n]*)\n", timeout=180)
            assert v.group(0).startswith("VERIFY OK") and int(v.group(2)) == pages, v.group(0)
            assert source.wait(120) == 0, source.errors()
            assert dest.wait(60) == 0, dest.errors()
            end = [e for e in source.lines if e["event"] == "source-qemu"]
            assert len(end) == 1 and end[0]["state"] == "quit" and end[0]["ram_file"] is None, end
            assert end[0]["message"] == "the source QEMU quit (--quit-source); its RAM went with it"
            assert source.summary()["source_status"] == "quit"
            assert src.wait(30) == 0          # QEMU's own exit after quit
            assert qd.cmd("query-status")["status"] == "running"
        finally:
            for p in procs:
                p.kill()


@pytest.mark.timeout(60)
def test_the_last_word_on_a_source_qemu_holding_a_memfd(tmp_path):
    """After a migration, a source QEMU left paused is named with the RAM it
    holds (a memfd has no file that outlives it); --quit-source quits it."""
    from conftest import Events
    from migrate.qemu.qmp import QMP
    from migrate.qemu.source import after_migration, find_ram_backend
    with bare_qemu(tmp_path, "memory-backend-memfd,id=ram0,size=64M,share=on", run=True) as (p, qmp_path):
        b = find_ram_backend(qmp_path)
        events = Events()
        q = QMP(qmp_path)
        try:
            q.cmd("stop")
            assert after_migration(q, events, b.path, quit=False) == "paused"
            assert events.lines == [{
                "event": "source-qemu", "state": "paused", "qmp": qmp_path, "ram_file": None,
                "message": f"the source QEMU stays paused (QEMU status paused), holding its RAM ({b.path}, no file of "
                           f"its own) until it quits: once the VM need not go back, `python -m migrate.qemu "
                           f"{qmp_path} quit` (or give the source --quit-source)"}]
            assert after_migration(q, events, b.path, quit=True) == "quit"
            assert events.lines[-1]["message"] == "the source QEMU quit (--quit-source); its RAM went with it"
        finally:
            q.close()
        assert p.wait(20) == 0


def _parts_add_up(sp: dict) -> None:
    from migrate.qemu.switchover import PHASES
    assert set(sp) >= {"pause_ms", "remainder_ms", *(f"{p}_ms" for p in PHASES)}, sp
    parts = [sp[f"{p}_ms"] for p in PHASES if sp[f"{p}_ms"] is not None]
    assert all(v >= 0 for v in parts), sp
    assert abs(sum(parts) + sp["remainder_ms"] - sp["pause_ms"]) < 0.01, sp


def test_pause_split_counts_each_moment_once():
    """Parts that overlap (the state sent while QEMU still writes it) count
    only what they add after the part before; gaps are the remainder."""
    from migrate.qemu.switchover import split
    sp = split(10.0, 10.020, {"stop": (10.0, 10.001), "save": (9.9, 10.008), "transfer": (9.95, 10.010),
                              "load": (10.011, 10.016), "cont": None})
    assert sp == {"pause_ms": 20.0, "stop_ms": 1.0, "save_ms": 7.0, "switch_ms": None, "transfer_ms": 2.0,
                  "load_ms": 5.0, "cont_ms": None, "remainder_ms": 5.0}
    _parts_add_up(sp)
    # a part that ends after the pause (QEMU's completed event after its RESUME) stops at the RESUME
    assert split(0.0, 0.010, {"load": (0.002, 0.015)})["load_ms"] == 8.0


@pytest.mark.timeout(300)
def test_pause_split_adds_up_for_both_engines(guest):
    """`migrate bench --qemu`'s pause_split, for this engine and for QEMU's own
    post-copy: every part there, none negative, and they add up to the pause
    (STOP -> RESUME, QEMU's own timestamps)."""
    from benchmarks.qemu_guest import run_engine, run_qemu_postcopy
    e = run_engine(guest, 256, log=lambda m: print(m, flush=True))
    q = run_qemu_postcopy(guest, 256, log=lambda m: print(m, flush=True))
    print(e["pause_split"], q["pause_split"])
    for r in (e, q):
        _parts_add_up(r["pause_split"])
        assert abs(r["pause_split"]["pause_ms"] - r["downtime_ms"]) <= 0.1, r["pause_split"]
    # the engine: QEMU stops the VM itself (no stop command), the destination
    # QEMU starts itself (no cont); the save, transfer and load were measured
    sp = e["pause_split"]
    assert sp["stop_ms"] == 0 and sp["cont_ms"] is None, sp
    assert None not in (sp["save_ms"], sp["transfer_ms"], sp["load_ms"]), sp
    # QEMU: what QMP cannot split is None, its downtime figure is the save
    qs = q["pause_split"]
    assert qs["transfer_ms"] is None and qs["cont_ms"] is None, qs
    assert qs["save_ms"] == min(q["qemu_reported_downtime_ms"], qs["pause_ms"]), qs


@pytest.mark.timeout(300)
def test_device_state_of_several_mib_streams_through(guest, tmp_path):
    """A device with a 4 MiB option ROM of random bytes puts over 4 MiB into
    QEMU's stream (more than 60 pipe buffers). It goes through as QEMU writes
    it: the destination QEMU has its first bytes before the source QEMU has
    written its last, and the ROM travels while the source VM still runs, so
    little of the stream is inside the pause."""
    rom = tmp_path / "rom4m.bin"
    rom.write_bytes(os.urandom(4 << 20))
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True),
                       qemu_args=("-device", f"pci-testdev,romfile={rom}"))
    _check_migrated(res)
    s, d = res["source"], res["dest"]
    print({k: s.get(k) for k in ("device_state_bytes", "device_state_bytes_stopped", "switchover")}, d["switchover"])
    assert s["device_state_bytes"] > 4 << 20 and d["device_state_bytes"] == s["device_state_bytes"]
    assert d["switchover"]["first_chunk"] < s["switchover"]["save_end"], (s["switchover"], d["switchover"])
    # what had not reached the destination when the source QEMU stopped
    assert s["device_state_bytes_stopped"] < 1 << 20, s


@pytest.mark.timeout(300)
def test_a_plaintext_device_state_channel_is_written_by_qemu_itself(guest):
    """Plaintext agents hand the device-state channel's socket to the source
    QEMU, which writes its stream into it; the destination splices it into its
    QEMU's pipe as it comes. The guest verifies, both agents count the same
    bytes, and the pause's parts add up to it."""
    res = localrun.run(guest, MEM_MB, hugetlbfs=False, log=lambda m: print(m, flush=True), tls=False)
    _check_migrated(res)
    s, d = res["source"], res["dest"]
    assert 100_000 < s["device_state_bytes"] == d["device_state_bytes"], (s, d)
    sw = d["switchover"]
    # ("received" is stamped only when the relay saw the stream's end before
    # QEMU's load completed and stopped it: on a loaded host either comes first)
    assert sw["first_chunk"] <= sw["last_chunk"] <= sw.get("received", sw["last_chunk"]), sw
    assert sw["last_chunk"] <= sw["loaded"], sw
    from migrate.qemu.switchover import engine_split
    sp = engine_split(res["src_stop_time"], res["dst_resume_time"], s["switchover"], d["switchover"])
    print(sp)
    assert sp["save_ms"] > 0 and sp["load_ms"] > 0, sp
    _parts_add_up(sp)


@pytest.mark.timeout(180)
def test_device_state_over_the_bound_is_refused_and_the_source_qemu_resumed(guest, tmp_path):
    """A destination whose --max-device-state is below the source QEMU's
    stream refuses the TLS frame that would pass it before reading it (the
    plaintext case: test_attacks_input); its QEMU does not run the guest, and
    the source QEMU runs again."""
    from migrate.qemu.shim import shim_path
    from migrate.sim.localrun import Proc, TlsFiles

    with Lab(guest, workdir=str(tmp_path), verbose=False) as lab:
        src_ram, dst_ram = lab.shm_path("migrate-src-big"), lab.shm_path("migrate-dst-big")
        src_qmp, dst_qmp = str(tmp_path / "src.agent.qmp"), str(tmp_path / "dst.agent.qmp")
        src, qs, ss = lab.start("src", mem_mb=256, backend="file", mem_path=src_ram,
                                extra_args=["-qmp", f"unix:{src_qmp},server=on,wait=off"])
        ss.wait_for(r"FILLED \d+", timeout=90)
        certs = TlsFiles(str(tmp_path / "certs"))
        procs = []
        try:
            attach = str(tmp_path / "a.sock")
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", dst_qmp, "--json",
                                 "--max-device-state", "64K", *certs.dest_args()])
            procs.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            lab.start("dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}, mem_mb=256,
                      backend="file", mem_path=dst_ram, incoming="defer",
                      extra_args=["-qmp", f"unix:{dst_qmp},server=on,wait=off"])
            dest.wait_event("attached", 30)
            source = Proc("source", ["source", "--qmp", src_qmp, "--ram", src_ram, "--to", addr, "--json",
                                     *certs.source_args()])
            procs.append(source)
            assert source.wait(90) == 1
            errors = " ".join(source.errors())
            assert "the device state is larger than --max-device-state 64 KiB: refused after " in errors, errors
            assert "source QEMU was resumed" in errors, errors
            assert qs.cmd("query-status")["status"] == "running"
            ss.send("\n")
            assert ss.wait_for(r"VERIFY (OK|BAD)[^\n]*", timeout=60).group(0).startswith("VERIFY OK")
        finally:
            for p in procs:
                p.kill()


@pytest.mark.timeout(60)
def test_a_session_takes_one_device_state_channel(tmp_path):
    """The destination's QEMU goes into migrate-incoming on the first
    device-state channel of a session; a second one, of that session or of
    another, is refused with why. A stream that is not QEMU's fails the load,
    and the channel's last word says the guest does not run."""
    import types
    from conftest import Events
    from migrate.qemu.dest import DeviceStateFeeder
    from migrate.wire import devstate

    def pair():
        ls = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(ls.getsockname(), timeout=10)
        s, _ = ls.accept()
        ls.close()
        return s, c

    with bare_qemu(tmp_path, "memory-backend-memfd,id=ram0,size=64M,share=on",
                   extra=("-incoming", "defer")) as (p, qmp):
        events = Events()
        feeder = DeviceStateFeeder(qmp, events)
        feeder.ready(30)
        m = types.SimpleNamespace(id="s1", reporter=events, fail=lambda *a: None)
        (a, a_src), (b, b_src), (c, c_src) = pair(), pair(), pair()
        try:
            assert feeder.take_channel(m, a) is None
            assert devstate.hear(a_src, time.monotonic() + 10) == {"ready": True}
            assert feeder.take_channel(m, b) == "this session had its device-state channel already"
            assert feeder.take_channel(types.SimpleNamespace(id="s2"), c) == (
                f"the destination QEMU at {qmp} is not ready for a device state (it took one already, or it is "
                "not up yet)")
            a_src.sendall(b"NOT QEMU'S STREAM")
            a_src.shutdown(socket.SHUT_WR)
            word = devstate.hear(a_src, time.monotonic() + 30)
            assert word["ack"] is True and word["guest_running"] is False and word["error"], word
            assert feeder.why_not_resumable("s1").startswith("the device state of that session did not load here")
        finally:
            for x in (a_src, b, b_src, c, c_src):
                x.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["switch", "drop"])
def test_a_precopy_sources_device_state_waits_for_its_switch(tmp_path, then):
    """A pre-copy source's QEMU writes its device state while the source's
    Switch is on its way: the destination feeds none of it to its QEMU until
    that Switch has committed (the guest must not start on pages the final
    list names). A source dropped first gets its stream refused, unloaded."""
    import threading
    import types
    from conftest import Events
    from migrate.qemu.dest import DeviceStateFeeder
    from migrate.wire import devstate

    ls = socket.create_server(("127.0.0.1", 0))
    src = socket.create_connection(ls.getsockname(), timeout=10)
    dst, _ = ls.accept()
    ls.close()
    with bare_qemu(tmp_path, "memory-backend-memfd,id=ram0,size=64M,share=on",
                   extra=("-incoming", "defer")) as (p, qmp):
        events = Events()
        feeder = DeviceStateFeeder(qmp, events)
        feeder.ready(30)
        serving = [True]
        pre = types.SimpleNamespace(switched=False, switched_event=threading.Event())
        m = types.SimpleNamespace(id="s1", reporter=events, fail=lambda *a: None, precopy=pre,
                                  machine=types.SimpleNamespace(serves=lambda gen: serving[0] and gen == 7))
        try:
            assert feeder.take_channel(m, dst, 7) is None
            assert devstate.hear(src, time.monotonic() + 10) == {"ready": True}
            src.sendall(b"NOT QEMU'S STREAM")
            src.shutdown(socket.SHUT_WR)
            # held: QEMU has nothing to load, so nothing to say
            with pytest.raises(TimeoutError):
                devstate.hear(src, time.monotonic() + 1.0)
            if then == "switch":
                pre.switched = True
                pre.switched_event.set()
            else:
                serving[0] = False
            word = devstate.hear(src, time.monotonic() + 30)
            assert word["ack"] is True and word["guest_running"] is False, word
            dropped = "dropped before its pre-copy's switch" in word["error"]
            # switched: QEMU got the bytes and refused them itself; dropped: it never saw them
            assert dropped == (then == "drop"), word
        finally:
            src.close()

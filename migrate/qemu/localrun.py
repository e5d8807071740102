"""The whole post-copy migration of a real QEMU guest with this engine, on
this machine: what examples/qemu/run.sh runs, the QEMU tests check and the
QEMU benchmark measures.

  1. boot the source QEMU under TCG on a share=on RAM file (/dev/shm, or a
     hugetlbfs mount) and wait for memfill's "FILLED <pages>"
  2. start `migrate dest --listen --attach --qmp` (the agent), with mutual TLS:
     a CA and the two agents' certificates are made in the lab's work directory
  3. start the destination QEMU with LD_PRELOAD=$(migrate shim-path),
     MIGRATE_ATTACH=<attach socket>, its own empty RAM file, -incoming defer;
     the shim hands its RAM to the agent before QEMU goes on
  4. run `migrate source --qmp --ram --to`: it pauses the source QEMU, sends the
     device state, the agent feeds it to the destination QEMU and resumes it,
     RAM follows post-copy (demand faults + background push)
  5. as soon as the destination guest runs, write a line on its serial console:
     memfill reads every page and prints "VERIFY OK <pages> <ms>"

Each QEMU has a second QMP monitor (NAME.qmp, the lab's) on which STOP/RESUME
events are read with QEMU's own timestamps: the source must be stopped before
the destination resumes (never two running copies). Optional faults (an agent
killed, a QEMU killed, the network split) are run() keywords.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from migrate.qemu.lab import Lab
from migrate.qemu.shim import shim_path
from migrate.sim.localrun import Proc  # stamps every event with the wall-clock time it was read ("_t")
from migrate.sim.localrun import TlsFiles


def _free_port() -> int:
    """A loopback port nothing listens on now (the agent started again takes it too)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _verify(sd, res: dict, timeout: float, key: str = "verify") -> None:
    """The guest's check of every page (a newline starts it): res[key] is its
    line, res["guest_" + key + "_ms"] the milliseconds it says it took."""
    v = sd.wait_for(r"VERIFY (OK \d+ (\d+) ms|BAD [^\n]*)\n", timeout=timeout)
    res[key] = v.group(0).strip()
    res[f"guest_{key}_ms"] = int(v.group(2)) if v.group(2) else None


def _agents_exit(res: dict, agents, timeout: float) -> None:
    """Each agent's exit code and summary into res; what a failed one said
    into res["errors"]."""
    for p in agents:
        rc = p.wait(timeout)
        res[f"{p.name}_rc"] = rc
        res[p.name] = {k: v for k, v in (p.summary() or {}).items() if k != "_t"}
        if rc != 0:
            res.setdefault("errors", []).append(f"{p.name} exited {rc}: "
                                                + " | ".join(p.errors() or p.stderr_lines[-5:]))


def run(guest, mem_mb=512, hugetlbfs=False, log=print, timeout=240, source_args=(), kill_agent=False,
        split=None, split_during_load=False, kill_source_qemu=False, kill_dest_qemu=False, tls=True, recover=False,
        stop_source=False, link=None, qemu_args=(), kill_unheard=False):
    """The whole flow. Returns a dict of results (res["verify"] is the guest's
    line); cleans up every process, socket, file, mount and huge page it made.
    split: run the destination agent on a second host (an object with exec, a
    command prefix that enters it; there, its address; cut() and restore() of
    the link) and cut the link once the destination guest runs.
    split_during_load: cut it instead while the destination QEMU loads the
    device state (held there by SIGSTOP until the first source has given up),
    then restore it, let QEMU go on, and resume the session with a new source.
    kill_unheard (with kill_agent and recover): SIGKILL the destination agent
    the moment it reports its guest running, not once the source heard so
    (res["source_heard_running"] says whether its answer got out first).
    kill_source_qemu: SIGKILL the source QEMU once the destination guest runs
    and its RAM is still arriving (the source agent serves it from the file).
    kill_dest_qemu: SIGKILL the destination QEMU once its guest runs; returns
    what the agents said and the source QEMU's state (no VERIFY: the guest is
    lost).
    tls: the agents with mutual TLS (default); False: plaintext (loopback only).
    recover: with split, cut the link and restore it, nothing else; with
    kill_agent, start the destination agent again with the same
    command (its port fixed for that) and nothing else: the first source
    recovers the session by itself (`source --recovery-window`). Without it,
    the first source exits when it loses its destination (--recovery-window 0)
    and a new source is started by hand, as before recovery existed.
    stop_source: SIGTERM the source agent once the destination guest runs
    (it stops pushing, its QEMU stays paused), then resume the session with
    a new source.
    link: a benchmarks.link.ShapedLink: the source agent runs in its source
    namespace, the destination agent in its destination namespace (the QEMUs
    reach their agents over Unix sockets, from where they are).
    qemu_args: more QEMU arguments, the same on both sides (devices)."""
    res = {"mem_mb": mem_mb, "backing": "hugetlbfs" if hugetlbfs else "tmpfs-file", "verify": None}
    agents = []
    with Lab(guest, verbose=False) as lab:
        lab.log = lambda msg: log(f"[{time.monotonic() - lab.t0:7.3f}] {msg}")
        w = lab.workdir
        certs = TlsFiles(os.path.join(w, "certs")) if tls else None
        dest_tls = certs.dest_args() if certs else []
        source_tls = certs.source_args() if certs else []
        res["tls"] = bool(tls)
        if hugetlbfs:
            d = lab.hugetlbfs_dir(2 * mem_mb)   # both QEMUs on this machine
            src_ram, dst_ram = (os.path.join(d, f"migrate-{n}-{os.getpid()}") for n in ("src", "dst"))
            lab.files += [src_ram, dst_ram]
            kind = "hugetlbfs"
        else:
            src_ram, dst_ram = lab.shm_path("migrate-src"), lab.shm_path("migrate-dst")
            kind = "file"
        try:
            # 1. source QEMU
            src_agent_qmp = os.path.join(w, "src.agent.qmp")
            t = time.monotonic()
            src, qs, ss = lab.start("src", mem_mb=mem_mb, backend=kind, mem_path=src_ram, extra_args=[
                "-qmp", f"unix:{src_agent_qmp},server=on,wait=off", *qemu_args])
            res["src_pid"] = src.pid
            m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=timeout)
            res["pages"] = int(m.group(1))
            res["boot_to_filled_s"] = round(time.monotonic() - t, 2)
            lab.log(f"src guest: {m.group(0).strip()}")

            # 2. destination agent
            attach = os.path.join(w, "attach.sock")
            dst_agent_qmp = os.path.join(w, "dst.agent.qmp")
            listen = (f"{split.there}:0" if split else f"{link.dst_addr}:0" if link
                      else f"127.0.0.1:{_free_port() if recover else 0}")
            dest_args = ["dest", "--listen", listen, "--attach", attach, "--qmp", dst_agent_qmp, "--json",
                         *dest_tls]
            if split:
                dest_args += ["--source-timeout", "2"]
            lab.log("migrate " + " ".join(dest_args))
            dest = Proc("dest", dest_args, prefix=split.exec if split else link.dst_prefix if link else ())
            agents.append(dest)
            addr = dest.wait_event("listening", 30)["address"]

            # 3. destination QEMU under the shim
            env = {"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach}
            dst, qd, sd = lab.start("dst", env=env, mem_mb=mem_mb, backend=kind, mem_path=dst_ram,
                                    incoming="defer", extra_args=[
                                        "-qmp", f"unix:{dst_agent_qmp},server=on,wait=off", *qemu_args])
            res["dst_pid"] = dst.pid
            att = dest.wait_event("attached", 30)
            lab.log(f"dest agent: {att.get('message')}")
            # how long the destination QEMU waited inside mmap for the agent's ack
            res["attach_ack_ms"] = att.get("ack_ms")

            # 4. source agent
            by_hand = (kill_agent or split) and not recover
            src_args = ["source", "--qmp", src_agent_qmp, "--ram", src_ram, "--to", addr, "--json",
                        *source_tls, *(("--recovery-window", "0") if by_hand else ()), *source_args]
            lab.log("migrate " + " ".join(src_args))
            t_src = time.time()
            source = Proc("source", src_args, prefix=link.src_prefix if link else ())
            agents.append(source)
            if split_during_load:
                # The link goes dead once the destination has the device state,
                # while its QEMU is (held) loading it: the source cannot know
                # whether the guest runs there. It gives up after --dest-timeout
                # and keeps its QEMU paused; once the link is back, a new source
                # resumes the session and the load, which reads guest RAM, ends.
                # Once its QEMU waits in migrate-incoming on the device-state
                # channel (the agent says so before it tells the source), the
                # destination QEMU freezes: the stream waits in its socket (or
                # pipe) and the load until it is let go (the load cannot end
                # sooner: it needs the state the source QEMU writes after it
                # stopped, and demand faults served from that STOP on).
                dest.wait_event("device-state", 60)
                os.kill(dst.pid, signal.SIGSTOP)
                while dest.wait_event("device-state", 60).get("bytes", 0) == 0:
                    pass
                split.cut()
                t_cut = time.monotonic()
                lab.log("link to the destination cut while its QEMU loads the device state")
                res["first_source_rc"] = source.wait(180)
                res["first_source_exit_s"] = round(time.monotonic() - t_cut, 2)
                res["first_source_errors"] = source.errors()
                res["src_status_after_first_source"] = qs.cmd("query-status")["status"]
                lost = dest.wait_event("disconnected", 60)
                split.restore()
                os.kill(dst.pid, signal.SIGCONT)
                lab.log(f"link restored, destination QEMU let go; dest agent: {lost.get('message')}")
                source = Proc("source", ["source", "--ram", src_ram, "--to", addr, "--resume",
                                         lost["session"], "--json", *source_tls])
                agents.append(source)
            run_ev = dest.wait_event("guest-running", 60)
            if kill_agent and recover and kill_unheard:
                # before anything else: the answer that the guest runs may
                # still be on its way to the source (DeviceStateAck)
                dest.p.kill()
            # right now, as the destination reports its guest running: the source must be paused
            res["src_status_at_dst_running"] = qs.cmd("query-status")["status"]
            # 5. the guest touches all of its memory while pages still arrive
            sd.send("\n")
            t_trigger = time.time()
            lab.log(f"dest agent: {run_ev.get('message')}; source QEMU is {res['src_status_at_dst_running']}")
            if kill_agent and recover:
                # The destination agent dies mid-migration (SIGKILL) and the
                # same command starts it again, nothing else: the shim
                # re-attaches QEMU's userfaultfd to it, and the first source,
                # its QEMU paused throughout, resumes the session for that guest.
                # (Killed once the source has heard that the guest runs, or with
                # kill_unheard as the destination said it: then the source may
                # not know the state loaded, names the guest all the same, and
                # the restarted agent asks its QEMU whether it runs a loaded one.)
                if not kill_unheard:
                    source.wait_event("guest-running", 60)
                dest.p.kill()
                dest.p.wait(10)
                res["killed_agent_at_received"] = max((e.get("received", 0) for e in dest.lines
                                                       if e.get("event") == "progress"), default=0)
                lost = source.wait_event("lost", 60)
                res["source_heard_running"] = any(e.get("event") == "guest-running" for e in source.lines)
                res["src_status_while_lost"] = qs.cmd("query-status")["status"]
                t_restart = time.time()
                dest = Proc("dest", dest_args)
                agents.append(dest)
                dest.wait_event("listening", 30)
                re_ev = dest.wait_event("reattached", 60)
                res["pages_prior"] = re_ev.get("pages_prior")
                resumed = dest.wait_event("demand", 60)
                res["restart_to_resumed_ms"] = round((resumed["_t"] - t_restart) * 1e3, 1)
                lab.log(f"source: {lost.get('message')}; restarted agent: {re_ev.get('message')}; resumed "
                        f"{res['restart_to_resumed_ms']} ms after the restart")
            elif kill_agent:
                # The destination agent dies mid-migration (SIGKILL). The guest's
                # vCPUs block on the pages still missing; the shim attaches the
                # same userfaultfd to a new agent, and a new source (no --qmp:
                # QEMU's device state is already on the destination) serves the rest.
                dest.p.kill()
                dest.p.wait(10)
                res["killed_agent_at_received"] = max((e.get("received", 0) for e in dest.lines
                                                       if e.get("event") == "progress"), default=0)
                res["first_source_rc"] = source.wait(60)
                dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--json", *dest_tls])
                agents.append(dest)
                addr = dest.wait_event("listening", 30)["address"]
                re_ev = dest.wait_event("reattached", 60)
                res["pages_prior"] = re_ev.get("pages_prior")
                lab.log(f"new dest agent: {re_ev.get('message')}")
                source = Proc("source", ["source", "--ram", src_ram, "--to", addr, "--json", *source_tls])
                agents.append(source)
            if kill_dest_qemu:
                # The destination QEMU dies after the switchover: its guest is
                # lost, and the source QEMU must stay paused (resuming it would
                # roll the VM back behind the destination guest's own I/O).
                dst.kill()
                dst.wait(10)
                lab.log(f"destination QEMU killed (pid {dst.pid})")
                for p in (dest, source):
                    res[f"{p.name}_rc"] = p.wait(60)
                    res[f"{p.name}_errors"] = p.errors()
                res["src_status_after"] = qs.cmd("query-status")["status"]
                res["src_resumed"] = bool(qs.seen("RESUME"))
                return res
            src_gone = False
            if kill_source_qemu:
                # The source QEMU dies after the switchover (QEMU's own post-copy
                # loses the guest here: its pages live in that process). Its RAM
                # is a share=on file, which outlives it: the source agent maps
                # the file and goes on serving the pages the guest still lacks.
                src_stop, src_resume = qs.seen("STOP"), qs.seen("RESUME")
                src.kill()
                src.wait(10)
                src_gone = True
                res["source_qemu_killed_time"] = time.time()
                res["source_qemu_killed_at_received"] = max(
                    (e.get("received", 0) for e in dest.lines if e.get("event") == "progress"), default=0)
                lab.log(f"source QEMU killed (pid {src.pid})")
            if stop_source:
                source.p.send_signal(signal.SIGTERM)
                res["first_source_rc"] = source.wait(60)
                res["first_source_errors"] = source.errors()
                res["src_status_after_first_source"] = qs.cmd("query-status")["status"]
                lost = dest.wait_event("disconnected", 60)
                lab.log(f"source stopped by SIGTERM; dest agent: {lost.get('message')}")
                source = Proc("source", ["source", "--ram", src_ram, "--to", addr, "--resume", lost["session"],
                                         "--json", *source_tls])
                agents.append(source)
            if split and recover:
                # The same cut, and nothing else: the first source reports
                # `lost` (its QEMU stays paused), and once the link is back it
                # resumes the session on the agent by itself.
                split.cut()
                lab.log("link to the destination cut")
                lost = source.wait_event("lost", 60)
                res["src_status_while_lost"] = qs.cmd("query-status")["status"]
                dropped = dest.wait_event("disconnected", 60)
                res["cut_at_received"] = dropped.get("received")
                time.sleep(1)
                split.restore()
                res["recovered"] = source.wait_event("connected", 60).get("recovered")
                res["lost_session"] = lost["session"]
                lab.log(f"link restored; source: {lost.get('message')}")
            elif split and not split_during_load:
                # The link to the destination goes dead mid-migration (no FIN,
                # no RST). Both agents give up on each other after 2 s; the
                # source QEMU stays paused (its guest runs on the destination),
                # QEMU's vCPUs wait on the pages still missing, and once the
                # link is back a new source (no --qmp: the device state is
                # there already) resumes the session.
                split.cut()
                lab.log("link to the destination cut")
                res["first_source_rc"] = source.wait(60)
                res["first_source_errors"] = source.errors()
                lost = dest.wait_event("disconnected", 60)
                res["cut_at_received"] = lost.get("received")
                split.restore()
                lab.log(f"link restored; dest agent: {lost.get('message')}")
                sid = lost["session"]
                source = Proc("source", ["source", "--ram", src_ram, "--to", addr, "--resume", sid, "--json",
                                         *source_tls])
                agents.append(source)
            _verify(sd, res, timeout)
            res["guest_verify_wall_ms"] = round((time.time() - t_trigger) * 1e3, 1)
            lab.log(f"dst guest: {res['verify']}")

            _agents_exit(res, (source, dest), timeout)
            done = [e for e in dest.lines if e.get("event") == "completed"]
            # what the source said of its QEMU and RAM file at the end
            res["src_ram"] = src_ram
            res["source_qemu"] = [{k: v for k, v in e.items() if k != "_t"} for e in source.lines
                                  if e.get("event") == "source-qemu"]
            # the same read with every page local: the guest's own floor for guest_verify_ms
            sd.send("\n")
            _verify(sd, res, timeout, "verify_local")

            # QEMU's own clocks, from the watching monitors
            if not src_gone:
                src_stop = qs.seen("STOP")
                src_resume = qs.seen("RESUME")
            dst_resume = qd.seen("RESUME")
            res["src_stop_time"] = src_stop[0]["time"] if src_stop else None
            res["src_resumed"] = bool(src_resume)
            res["dst_resume_time"] = dst_resume[0]["time"] if dst_resume else None
            res["src_status_after"] = "gone" if src_gone else qs.cmd("query-status")["status"]
            res["dst_status_after"] = qd.cmd("query-status")["status"]
            if res["src_stop_time"] and res["dst_resume_time"]:
                res["downtime_ms"] = round((res["dst_resume_time"] - res["src_stop_time"]) * 1e3, 1)
            if done and res["src_stop_time"]:
                res["total_ms"] = round((done[0]["_t"] - res["src_stop_time"]) * 1e3, 1)
            res["source_start_to_dst_running_ms"] = round((run_ev["_t"] - t_src) * 1e3, 1)
            # agents' events, ms after the source QEMU's STOP (when each line was read here)
            t0 = res["src_stop_time"] or t_src
            res["timeline"] = sorted(
                [(round((e["_t"] - t0) * 1e3, 1), p.name, e["event"]) for p in (source, dest) for e in p.lines
                 if e.get("event") not in ("summary", "text")] +
                [(0.0, "src-qemu", "STOP")] +
                ([(round((res["dst_resume_time"] - t0) * 1e3, 1), "dst-qemu", "RESUME")]
                 if res["dst_resume_time"] else []))
        except BaseException:
            for p in agents:   # what each agent said last, to see why
                lab.log(f"{p.name} (pid {p.p.pid}, rc {p.p.poll()}) last said: "
                        + " | ".join(str(e.get("message", e)) for e in p.lines[-4:])
                        + " | stderr: " + " | ".join(p.stderr_lines[-4:]))
            raise
        finally:
            for p in agents:
                p.kill()
    return res


def run_precopy(guest, mem_mb=512, writer=256, log=print, timeout=240, source_args=(), tls=True,
                baseline_s=2.0, kill_dest=False):
    """A writing QEMU guest migrated by this engine with pre-copy first
    (`migrate source --precopy --attach --qmp`), then post-copy. Returns a dict
    of results; cleans up everything it made, as run() does.

      1. the destination agent and the destination QEMU under the shim, as run()
      2. the source QEMU under the shim too (MIGRATE_ATTACH=W/src.attach.sock),
         on a share=on RAM file; its guest runs memfill with the writer on
         (memfill_write=writer pages every 100 ms). The shim attaches the RAM
         the moment QEMU maps it, at start-up, long before a migration: a
         standby here (the agent end of the attach protocol, which only acks)
         holds the attach while the guest boots, fills its memory and writes
         for baseline_s (its loop time with no migration)
      3. the standby lets go and `migrate source --precopy --attach --qmp`
         starts: the shim attaches the same userfaultfd and RAM file to it
         (a re-attach), it write-protects the RAM (async), sends rounds while
         the guest writes, stops the VM over QMP at the switch, sends the
         final written list and the device state, and goes on post-copy
      4. once the destination guest runs, a line on its console: memfill
         checks every page against its last written generation

    kill_dest: SIGKILL the destination agent once the first pre-copy round
    is under way (True) or once the source saw its QEMU stop for the switch
    ("paused"), and report what the source agent said, the source QEMU's
    state, whether the destination QEMU ever ran, and the writer's ticks
    before and after (no VERIFY)."""
    from migrate.dest.attach import AttachListener

    res = {"mem_mb": mem_mb, "backing": "tmpfs-file", "verify": None, "writer_pages": writer}
    agents = []
    with Lab(guest, verbose=False) as lab:
        lab.log = lambda msg: log(f"[{time.monotonic() - lab.t0:7.3f}] {msg}")
        w = lab.workdir
        certs = TlsFiles(os.path.join(w, "certs")) if tls else None
        src_ram, dst_ram = lab.shm_path("migrate-src"), lab.shm_path("migrate-dst")
        standby = None
        try:
            # 1. destination agent and QEMU
            attach = os.path.join(w, "attach.sock")
            dst_agent_qmp = os.path.join(w, "dst.agent.qmp")
            dest = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", attach, "--qmp", dst_agent_qmp,
                                 "--json", *(certs.dest_args() if certs else [])])
            agents.append(dest)
            addr = dest.wait_event("listening", 30)["address"]
            dst, qd, sd = lab.start("dst", env={"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": attach},
                                    mem_mb=mem_mb, backend="file", mem_path=dst_ram, incoming="defer",
                                    extra_args=["-qmp", f"unix:{dst_agent_qmp},server=on,wait=off"])
            dest.wait_event("attached", 30)

            # 2. source QEMU under the shim, its attach held by the standby
            src_attach = os.path.join(w, "src.attach.sock")
            src_agent_qmp = os.path.join(w, "src.agent.qmp")
            standby = AttachListener(src_attach)
            took: list = []

            def hold():   # QEMU waits in its mmap of the RAM for this ack, before its QMP socket exists
                try:
                    took.append(standby.accept(timeout=30))
                    took[0].ack()
                except Exception as e:  # noqa: BLE001 - said below
                    took.append(e)

            holder = threading.Thread(target=hold, name="standby", daemon=True)
            holder.start()
            env = {"LD_PRELOAD": shim_path(), "MIGRATE_ATTACH": src_attach}
            src, qs, ss = lab.start("src", env=env, mem_mb=mem_mb, backend="file", mem_path=src_ram,
                                    append_extra=f"memfill_write={writer}", extra_args=[
                                        "-qmp", f"unix:{src_agent_qmp},server=on,wait=off"])
            holder.join(30)
            if not took or isinstance(took[0], Exception):
                raise RuntimeError(f"the standby did not take the source QEMU's attach: {took}")
            held = took[0]
            res["src_pid"] = src.pid
            m = ss.wait_for(r"FILLED (\d+) (\d+) ms\n", timeout=timeout)
            res["pages"] = int(m.group(1))
            ss.wait_for(r"WRITER \d+ pages", timeout=30)
            ss.follow()
            time.sleep(0.5 + baseline_s)
            held.close()       # the shim attaches again to whoever listens next on src_attach
            standby.close()
            standby = None

            # 3. the source agent, pre-copy first
            src_args = ["source", "--precopy", "--attach", src_attach, "--qmp", src_agent_qmp, "--to", addr,
                        "--json", *(certs.source_args() if certs else []), "--recovery-window", "0",
                        *source_args]
            lab.log("migrate " + " ".join(src_args))
            t_start = time.time()
            source = Proc("source", src_args)
            agents.append(source)
            att = source.wait_event("attached", 30)
            res["attached_ms"] = round((att["_t"] - t_start) * 1e3, 1)
            if kill_dest:
                # True: once the rounds are under way; "paused": at the
                # switch, once the source saw its QEMU's STOP (its Switch is
                # then on its way, or about to be)
                source.wait_event("paused" if kill_dest == "paused" else "precopy", 30)
                dest.p.kill()
                dest.p.wait(10)
                t_kill = time.time()
                res["source_rc"] = source.wait(60)
                res["source_errors"] = source.errors()
                res["source_events"] = [e.get("event") for e in source.lines]
                time.sleep(1.5)   # the guest goes on writing
                res["src_status_after"] = qs.cmd("query-status")["status"]
                res["src_stopped"] = bool(qs.seen("STOP"))
                res["src_migration"] = qs.cmd("query-migrate").get("status")
                try:
                    res["dst_resumed"] = bool(qd.seen("RESUME"))
                except Exception:  # noqa: BLE001 - a destination QEMU gone never ran the guest
                    res["dst_resumed"] = False
                ticks = ss.writer_ticks()
                res["ticks_before_kill"] = sum(1 for t, _ in ticks if t <= t_kill)
                res["ticks_after_kill"] = sum(1 for t, _ in ticks if t > t_kill + 0.5)
                return res
            run_ev = dest.wait_event("guest-running", timeout)
            res["src_status_at_dst_running"] = qs.cmd("query-status")["status"]
            # 4. the guest checks every page's last generation while pages still arrive
            sd.send("\n")
            _verify(sd, res, timeout)
            lab.log(f"dst guest: {res['verify']}; dest agent: {run_ev.get('message')}")
            _agents_exit(res, (source, dest), timeout)
            sd.send("\n")
            _verify(sd, res, timeout, "verify_local")
            stop, resume = qs.seen("STOP"), qd.seen("RESUME")
            res["src_stop_time"] = stop[0]["time"] if stop else None
            res["dst_resume_time"] = resume[0]["time"] if resume else None
            res["src_resumed"] = bool(qs.seen("RESUME"))
            res["src_status_after"] = qs.cmd("query-status")["status"]
            res["dst_status_after"] = qd.cmd("query-status")["status"]
            done = [e for e in dest.lines if e.get("event") == "completed"]
            if res["src_stop_time"] and res["dst_resume_time"]:
                res["downtime_ms"] = round((res["dst_resume_time"] - res["src_stop_time"]) * 1e3, 1)
            if done:
                # from the source agent's start (QEMU's own: from its migrate command)
                res["total_ms"] = round((done[0]["_t"] - t_start) * 1e3, 1)
            if res["src_stop_time"]:
                res["precopy_ms"] = round((res["src_stop_time"] - t_start) * 1e3, 1)
                res["ticks"] = ss.writer_ticks()
                res["t_start"] = t_start
            t0 = res["src_stop_time"] or t_start
            # agents' events, ms after the source QEMU's STOP (when each line was read here)
            res["timeline"] = sorted([(round((e["_t"] - t0) * 1e3, 1), p.name, e["event"]) for p in (source, dest)
                                      for e in p.lines if e.get("event") not in ("summary", "text", "round")])
            res["rounds"] = [{k: v for k, v in e.items() if k not in ("_t", "event", "message")}
                             for e in source.lines if e.get("event") == "round"]
            sw = [e for e in source.lines if e.get("event") == "switch"]
            res["switch"] = {k: v for k, v in sw[0].items() if k not in ("_t", "event")} if sw else None
        except BaseException:
            for p in agents:
                lab.log(f"{p.name} (pid {p.p.pid}, rc {p.p.poll()}) last said: "
                        + " | ".join(str(e.get("message", e)) for e in p.lines[-4:])
                        + " | stderr: " + " | ".join(p.stderr_lines[-4:]))
            raise
        finally:
            if standby is not None:
                standby.close()
            for p in agents:
                p.kill()
    return res

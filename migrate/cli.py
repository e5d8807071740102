"""The `migrate` command: dest, source, guestsim, mkram, certs, demo, bench (and
shim-path where those parts are built). Parsing and wiring only: each command
delegates to its module."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from migrate import exits
from migrate.errors import MigrateError, Stopped
from migrate.memory import parse_size
from migrate.report import Reporter, process_usage


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device_state_size(text: str) -> int:
    n = _size(text)
    if n == 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return n


def _buffer(text: str) -> int | None:
    """--push-buffer: auto -> None, kernel -> 0, else a size."""
    if text == "auto":
        return None
    if text == "kernel":
        return 0
    return _size(text)


def _number(text: str, convert, what: str, ok, refused: str):
    """A command-line number: `what` it should be when it does not parse,
    `refused` (formatted with the text) when ok() rejects it."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):   # (NaN fails every comparison, so every check)
        raise argparse.ArgumentTypeError(refused.format(text))
    return value


def _seconds(text: str) -> float:
    """A timeout: 0 or more seconds."""
    return _number(text, float, "a number of seconds", lambda f: f >= 0, "{} seconds: must be 0 or more")


def _period(text: str) -> float:
    return _number(text, float, "a number of seconds", lambda f: f > 0,
                   "{} seconds: a period must be more than 0")


def _count(text: str) -> int:
    """A number of things (streams, vCPUs): 1 or more."""
    return _number(text, int, "a whole number", lambda n: n >= 1, "{}: must be 1 or more")


def _window(text: str) -> str:
    """--locality-window: auto, or a number of pages (0 or more)."""
    if text == "auto":
        return text
    return str(_number(text, int, "a whole number of pages or auto", lambda n: 0 <= n <= 1 << 20,
                       "{}: must be between 0 and 1048576 pages"))


def _uid(text: str) -> int:
    return _number(text, int, "a numeric uid", lambda n: 0 <= n < 0xFFFFFFFF, "{}: not a uid")


def _fraction(text: str) -> float:
    return _number(text, float, "a number between 0 and 1", lambda f: 0.0 <= f <= 1.0, "{} is not between 0 and 1")


def _add_image_args(p):
    from migrate.sim.ramimage import DEFAULT_RANDOM_FRACTION, DEFAULT_ZERO_FRACTION
    p.add_argument("--seed", type=int, required=True, help="the image is reproducible from this alone")
    p.add_argument("--zero-fraction", type=_fraction, default=DEFAULT_ZERO_FRACTION,
                   help=f"share of zero pages (default {DEFAULT_ZERO_FRACTION})")
    p.add_argument("--random-fraction", type=_fraction, default=DEFAULT_RANDOM_FRACTION,
                   help=f"share of incompressible pages (default {DEFAULT_RANDOM_FRACTION})")


def _spec(args):
    from migrate.sim.ramimage import ImageSpec
    return ImageSpec(args.seed, args.zero_fraction, args.random_fraction)


def _add_tls_args(p, side: str):
    """--tls-cert/--tls-key/--tls-ca and --insecure (a source's also
    --dest-name); plaintext without them only on loopback
    (migrate.wire.tls.from_args decides)."""
    peer = "sources" if side == "dest" else "the destination"
    p.add_argument("--tls-cert", metavar="FILE", help="this agent's certificate (PEM): mutual TLS 1.3 on every "
                   "channel (`migrate certs` writes one)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help=f"the CA certificate(s) (PEM) {peer} must be signed by")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext although not on loopback (both agents must say so): only on a network that "
                   "nobody else can reach")
    if side == "source":
        p.add_argument("--dest-name", metavar="NAME", help="the name the destination's certificate must carry "
                       "(default: the host of --to)")


def _tls(args, side: str, host: str, rep: Reporter):
    """(ok, TlsConfig or None): the TLS the flags ask for, or an error event."""
    from migrate.wire.tls import TlsError, from_args
    try:
        return True, from_args(args, side, host)
    except TlsError as e:
        rep.event("error", str(e))
        return False, None


# -- dest ---------------------------------------------------------------------
def cmd_dest(args) -> int:
    from migrate.dest import agent
    from migrate.wire.tcp import parse_address

    rep = Reporter(args.json, "dest")
    try:
        host = parse_address(args.listen, "--listen", "e.g. 127.0.0.1:0").host
    except ValueError as e:
        rep.event("error", str(e))
        return 2
    ok, tls = _tls(args, "dest", host, rep)
    if not ok:
        return 2
    return agent.run(rep, listen=args.listen, attach=args.attach,
                     serve_forever=args.serve_forever, placement=args.placement, prealloc=not args.no_prealloc,
                     qmp=args.qmp, source_timeout=args.source_timeout, progress_every=args.progress_every,
                     attach_uids=tuple(args.attach_uid), tls=tls, max_device_state=args.max_device_state,
                     record_hints=args.record_hints, metrics_listen=args.metrics_listen, insecure=args.insecure)


# -- source -------------------------------------------------------------------
def cmd_source(args) -> int:
    from migrate.source.ramfile import RamImage
    from migrate.source.session import Source

    from migrate.wire.tcp import parse_address

    rep = Reporter(args.json, "source")
    try:
        host = parse_address(args.to, "--to", "as `migrate dest --listen` printed it").host
    except ValueError as e:
        rep.event("error", str(e))
        return exits.FAILED   # (as a --to that does not resolve)
    ok, tls = _tls(args, "source", host, rep)
    if not ok:
        return exits.USAGE
    if args.quit_source and not args.qmp:
        rep.event("error", "--quit-source quits the source QEMU reached with --qmp SOCKET: give --qmp too")
        return exits.USAGE
    ram_path = args.ram
    pre = None
    if args.precopy:
        pre = _precopy_guest(args, rep)
        if pre is None:
            return exits.USAGE
        ram_path = pre.ram_path
    if ram_path is None:
        if not args.qmp:
            rep.event("error", "--ram FILE is needed without --qmp (with --qmp the source QEMU's RAM backend is "
                      "found over QMP)")
            return exits.USAGE
        from migrate.qemu.source import find_ram_backend
        try:
            backend = find_ram_backend(args.qmp)
        except MigrateError as e:
            rep.event("error", f"finding the source QEMU's RAM: {e}")
            return exits.USAGE
        ram_path = backend.path
        rep.event("ram", f"serving {backend.describe()}", path=backend.path, backend=backend.id,
                  kind=backend.kind, size=backend.size, pid=backend.pid)
    try:
        ram = RamImage(ram_path, page_size=pre.guest.page_size if pre else args.page_size,
                       size=pre.guest.ram_size if pre else args.size, populate_behind=pre is not None)
    except MigrateError as e:
        rep.event("error", str(e))
        if pre is not None:
            pre.close()
        return exits.USAGE
    if pre is not None:
        # (a QEMU's: the file its RAM backend names, or its pid's descriptor, as without --precopy)
        named = pre.guest.name
        ram.path = (named if named.startswith("/") and not named.startswith("/memfd:") and os.path.exists(named)
                    else ram_path) if args.qmp else f"the source guest's RAM (pid {pre.guest.pid})"
    kw = dict(push_streams=args.push_streams, batch_bytes=args.batch_bytes, compress=not args.no_compress,
              resume_session=args.resume or "", transport=args.transport, guest=args.guest,
              max_rate=args.max_rate, push_buffer=args.push_buffer, sparse=not args.no_sparse,
              dest_timeout=args.dest_timeout, tls=tls, pace=args.pace,
              locality_window=None if args.locality_window == "auto" else int(args.locality_window),
              compress_runs=args.compress)
    if pre is not None:
        kw["precopy"] = pre.precopy
        signal.signal(signal.SIGUSR1, lambda *_: pre.precopy.switch_now.set())
    if args.hints:
        from migrate.hints import HintsError, read
        try:
            kw["hints"] = read(args.hints, ram.page_size, ram.npages)
        except HintsError as e:
            rep.event("error", str(e))
            ram.close()
            if pre is not None:
                pre.close()
            return exits.USAGE
    observers = _source_observers(args, rep, ram, tls, kw)
    if observers is None:
        ram.close()
        if pre is not None:
            pre.close()
        return exits.USAGE
    vm = {}
    _stop_on_signals()
    try:
        if args.qmp and not args.resume:
            from migrate.qemu.source import migrate_vm
            res, vm = migrate_vm(args.qmp, ram, args.to, rep, recovery_window=args.recovery_window,
                                 quit_source=args.quit_source, **kw)
        else:  # (with --resume the device state was delivered already)
            res = _recovery(rep, ram, args.to, args.recovery_window, kw).serve(Source(ram, args.to, rep, **kw))
            if pre is not None:
                pre.completed = True
            if args.qmp:
                from migrate.qemu.source import settle_source_qemu
                vm = {"source_status": settle_source_qemu(args.qmp, rep, ram.path, args.quit_source)}
    except MigrateError as e:
        rep.event("error", str(e))
        return exits.of(e)
    finally:
        for x in observers:
            x.close()
        ram.close()
        if pre is not None:
            pre.close()
    f = res.finish
    s = {"session": res.session, "pages_total": res.pages_total, "pages_demand": f.pages_demand,
         "pages_pushed": f.pages_pushed, "pages_zero": f.pages_zero, "pages_sent_push": res.pages_sent_push,
         "pages_sent_demand": res.pages_sent_demand, "demand_requests": res.demand_requests,
         "wire_bytes": res.wire_bytes, "demand_zero_blocks": res.zero_blocks,
         "demand_prescanned": res.prescanned,
         "push_zero_blocks": res.push_zero_blocks, "hole_pages": res.hole_pages,
         "seconds": round(res.seconds, 3), "compress": res.compression,
         "throughput_gbps": round(ram.size / res.seconds / 1e9, 3) if res.seconds else 0, **vm, **process_usage(),
         **(pre.precopy.summary() if pre is not None else {})}
    rep.summary(s, f"served {res.pages_total} pages in {s['seconds']} s ({s['throughput_gbps']} GB/s of RAM, "
                   f"{res.wire_bytes} wire bytes); destination placed {f.pages_demand} demand, "
                   f"{f.pages_pushed} pushed, {f.pages_zero} zero")
    return exits.COMPLETED


def _precopy_guest(args, rep: Reporter):
    """source --precopy: the source guest attached on --attach, with its write
    tracking (migrate.source.precopy.SourceGuest); None when it cannot (reported)."""
    from migrate.source.precopy import SourceGuest, SwitchPolicy

    if not args.attach:
        rep.event("error", "--precopy needs --attach SOCKET: the source guest attaches there (guestsim --role "
                  "source, or QEMU with the shim)")
        return None
    if args.ram or args.resume:
        rep.event("error", "--precopy takes the guest's RAM from its attach: give neither --ram nor --resume")
        return None
    policy = SwitchPolicy(below=args.switch_below, after=args.switch_after, stall=args.switch_stall)
    try:
        return SourceGuest.accept(args.attach, args.attach_timeout, rep, policy, qmp=bool(args.qmp))
    except MigrateError as e:
        rep.event("error", str(e))
        return None


def _recovery(rep: Reporter, ram, target: str, window: float, kw: dict):
    """The source's Recovery (migrate.source.recovery): each try again is a
    Source like the first, resuming its session for its guest only."""
    from migrate.source.recovery import Recovery
    from migrate.source.session import Source

    def again(session: str, guest: str, connect_timeout: float) -> Source:
        # (a pre-copy session resumes as post-copy: the switch happened before it could be lost)
        return Source(ram, target, rep, **{**kw, "resume_session": session, "precopy": None}, resume_guest=guest,
                      connect_timeout=connect_timeout, open_timeout=connect_timeout + 5)

    def vm_state(session: str) -> str:
        return (f"The destination guest keeps the pages it has and waits for the rest, which only {ram.path} holds: "
                f"keep it. Once the destination answers again, `migrate source --ram {ram.path} --to {target} "
                f"--resume {session}` (with this source's TLS flags) serves the rest; if its agent was restarted "
                "since, the same command without --resume")
    return Recovery(rep, window, again, vm_state)


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT end the source cleanly: Stopped is raised where the
    main thread is (a wait, mostly), every channel is closed on the way out
    (it stops pushing), and a source QEMU whose guest may run on the
    destination stays paused (migrate.qemu.source decides, as on any error).
    A second signal meanwhile is ignored."""
    def stop(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name} mid-migration")

    def unraisable(u, default=sys.unraisablehook):
        # raised inside a finalizer, which Python would print and forget:
        # kept for the next wait to raise (Stopped.check)
        if isinstance(u.exc_value, Stopped):
            Stopped.swallowed = u.exc_value
        else:
            default(u)
    sys.unraisablehook = unraisable
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def _source_observers(args, rep: Reporter, ram, tls, kw: dict) -> list | None:
    """The source's control socket (announced in its first event), its
    metrics server and the terminal's progress line, started; kw gets the
    hook that shows them the session. None when one cannot start (reported)."""
    from migrate.notify import Notifier
    from migrate.status import ControlSocket, ProgressTicker, StatusError, default_control_path

    held = {}
    kw["on_created"] = lambda src: held.__setitem__("src", src)

    def snapshot():
        src = held.get("src")
        return src.snapshot() if src is not None else {"state": "connecting", "peer": args.to,
                                                        "pages_total": ram.npages}

    out = []
    rep.listeners.append(Notifier("source"))
    path = args.control or default_control_path()
    try:
        pre = kw.get("precopy")
        out.append(ControlSocket(path, lambda: {"role": "source", "pid": os.getpid(),
                                                "migrations": [snapshot()]},
                                 actions={"switch": pre.request_switch} if pre is not None else None).start())
        rep.event("control", f"control socket {path}: `migrate status --source {path}`", control=path,
                  pid=os.getpid())
    except (StatusError, OSError) as e:
        if args.control:
            rep.event("error", f"control socket: {e}")
            return None
        # the default place is not usable (another user made its directory
        # first?): the migration goes on, without a control socket
        rep.event("control", f"no control socket ({e}): `migrate status --source` cannot ask this source; "
                  "give it --control SOCKET in a private directory", control=None, pid=os.getpid(), error=str(e))
    if args.metrics_listen:
        from migrate.metrics import MetricsError, MetricsServer
        try:
            out.append(MetricsServer(args.metrics_listen, lambda: ("source", [snapshot()], {}), tls,
                                     args.insecure).start())
        except MetricsError as e:
            rep.event("error", str(e))
            for x in out:
                x.close()
            return None
        rep.event("metrics", f"Prometheus metrics on {out[-1].address}", metrics=out[-1].address)
    if ProgressTicker.wanted():
        out.append(ProgressTicker(rep, lambda: snapshot() if "src" in held else None).start())
    return out


def cmd_status(args) -> int:
    import json

    from migrate.status import StatusError, query, query_grpc, render

    if args.switch and not args.source:
        print("status: --switch asks a source's control socket: give --source SOCKET", file=sys.stderr)
        return 2
    try:
        if args.attach:
            from migrate.wire.attach import ATTACH_VERSION
            status = query(args.attach, {"version": ATTACH_VERSION, "request": "status"})
        elif args.source and args.switch:
            # source --precopy: switch after the current round
            print(json.dumps(query(args.source, {"request": "switch"})))
            return 0
        elif args.source:
            status = query(args.source, {"request": "status"})
        else:
            from migrate.wire.tcp import parse_address
            from migrate.wire.tls import TlsError, from_args
            try:
                host = parse_address(args.to, "--to", "as `migrate dest --listen` printed it").host
                tls = from_args(args, "source", host)
            except (ValueError, TlsError) as e:
                raise StatusError(str(e)) from None
            status = query_grpc(args.to, tls, args.timeout)
    except StatusError as e:
        print(f"status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
    else:
        print(render(status))
    return 0


def cmd_shim_path(args) -> int:
    from migrate.qemu.shim import shim_path
    try:
        print(shim_path())
    except MigrateError as e:
        print(f"shim-path: {e}", file=sys.stderr)
        return 2
    return 0


# -- guestsim / mkram -----------------------------------------------------------
def cmd_guestsim(args) -> int:
    from migrate.sim import guestsim

    rep = Reporter(args.json, "guestsim")
    if args.role == "source":
        return _guestsim_source(args, rep)
    try:
        s = guestsim.run(args.attach, args.size, args.backing, _spec(args), args.pattern, args.vcpus, rep,
                         name=args.name, start_on=args.start_on, writes=args.writes)
    except (MigrateError, OSError, ValueError) as e:
        rep.event("error", str(e))
        return 2
    rep.summary(s, f"{'verified' if s['verified'] else 'MISMATCH'}: {s['pages_total']} pages, "
                   f"first access p50 {s['access_p50_us']} us p99 {s['access_p99_us']} us, "
                   f"{s['seconds']} s" + ("" if s["verified"] else f", first bad 4 KiB unit {s['first_bad_unit']}"))
    return 0 if s["verified"] else 1


def _guestsim_source(args, rep) -> int:
    """guestsim --role source: the running VM of a pre-copy (migrate.sim.writer)."""
    from migrate.sim import writer

    try:
        s = writer.run(args.attach, args.size, args.backing, _spec(args), rep,
                       name=args.name if args.name != "guestsim" else "source-guest",
                       write_pages=args.write_pages, every_ms=args.write_every, hold=args.hold)
    except (MigrateError, OSError, ValueError) as e:
        rep.event("error", str(e))
        return 2
    rep.summary(s, f"source guest: {s['writes']} writes, "
                   + ("migrated" if s["complete"] else "its agent went away" if s["agent_lost"] else "held"))
    return 0


def cmd_mkram(args) -> int:
    from migrate.sim.ramimage import write_image

    try:
        write_image(args.path, args.size, _spec(args))
    except (MigrateError, OSError, ValueError) as e:
        print(f"mkram: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.path}: {args.size} bytes, seed {args.seed}", file=sys.stderr)
    return 0


def cmd_certs(args) -> int:
    try:
        from migrate.wire.certs import CertsError, write_certs
        import cryptography  # noqa: F401  (write_certs imports it when called)
    except ImportError:
        print("certs: needs the cryptography package: pip install 'migrate[tls]' (make install has it)",
              file=sys.stderr)
        return 2
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        out = write_certs(args.dir, hosts, days=args.days)
    except (CertsError, OSError) as e:
        print(f"certs: {e}", file=sys.stderr)
        return 2
    if "ca" in out:
        print(f"CA:   {out['ca']} (certificate), {out['ca.key']} (its key: keep it off the agents' hosts)")
    else:
        print(f"CA:   the one already in {args.dir}")
    for h in hosts:
        print(f"{h}: {out[h]} (certificate), {out[h + '.key']} (key, 0600)")
    print(f"valid {args.days} days. On each host: --tls-cert HOST.pem --tls-key HOST.key --tls-ca ca.pem; "
          "`migrate dest --allow-source SOURCE`, `migrate source --to DEST:PORT` (or --dest-name DEST)")
    return 0


def cmd_demo(args) -> int:
    from migrate.sim import demo
    return demo.run(args)


def cmd_bench(args) -> int:
    try:
        from benchmarks import run as bench
    except ImportError as e:
        print(f"bench: the benchmark harness cannot be imported ({e}): install the bench extra "
              "(pip install -e '.[bench]')", file=sys.stderr)
        return 2
    # a bench stopped with SIGTERM unwinds like one stopped with ^C: the huge
    # pages it reserved and the processes it started are given back
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migrate", description="VM live-migration post-copy engine "
                                "on userfaultfd MINOR faults")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dest", help="destination agent: adopt a guest, take pages from a source")
    d.add_argument("--listen", required=True, help="HOST:PORT for gRPC (port 0 picks a free one)")
    d.add_argument("--attach", required=True, help="UNIX socket path guests attach on")
    d.add_argument("--attach-uid", type=_uid, action="append", default=[], metavar="UID",
                   help="also take guests running as UID (repeatable; default: only the agent's own uid). The "
                   "socket's directory may then belong to UID, so that its guests can reach the socket")
    d.add_argument("--serve-forever", action="store_true", help="serve one migration after another")
    d.add_argument("--placement", choices=["continue", "copy"], default="continue",
                   help="continue: MINOR faults + UFFDIO_CONTINUE (default); copy: MISSING + UFFDIO_COPY")
    d.add_argument("--progress-every", type=_period, default=0.2, metavar="SECONDS",
                   help="seconds between `progress` events of a running migration (default 0.2)")
    d.add_argument("--no-prealloc", action="store_true",
                   help="do not allocate the guest's RAM after it attaches (continue placement allocates it "
                   "then, in the background, so pages arrive as one copy; this leaves it to the push)")
    d.add_argument("--qmp", metavar="SOCKET", help="QMP socket of the destination QEMU (-incoming defer, "
                   "started with LD_PRELOAD=$(migrate shim-path)): feed it the device state and resume it")
    d.add_argument("--max-device-state", type=_device_state_size, default=1 << 30, metavar="BYTES",
                   help="with --qmp: refuse device state larger than this (default 1G); it goes to QEMU as it "
                   "arrives, and only what QEMU has not read yet waits here")
    d.add_argument("--source-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="drop a source that stops answering for this long, so another can resume: its host or "
                   "the network acknowledges nothing, or a demand request waits with nothing arriving on the "
                   "demand channel (default 10; 0: never, TCP's own minutes)")
    _add_tls_args(d, "dest")
    d.add_argument("--allow-source", action="append", metavar="NAME",
                   help="take only sources whose certificate carries NAME (a DNS name, or the CN of a certificate "
                   "without any); repeatable (default: any the CA signed)")
    d.add_argument("--record-hints", metavar="FILE", help="at the end of the migration, write the order in which "
                   "the guest first touched its pages (for source --hints)")
    d.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics there (needs the "
                   "metrics extra; HTTPS with the --tls-* flags, plaintext only on loopback or with --insecure)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_dest)

    s = sub.add_parser("source", help="serve a paused VM's RAM file to a destination")
    s.add_argument("--ram", help="RAM file (tmpfs, hugetlbfs or a plain file); with --qmp it may be left out: "
                   "the source QEMU's one RAM backend is found over QMP (a file's mem-path, or a memfd)")
    s.add_argument("--to", required=True, help="destination HOST:PORT")
    s.add_argument("--page-size", type=_size, default=None, help="default: the RAM file system's page size")
    s.add_argument("--size", type=_size, default=None, help="bytes to serve (default: the file's size)")
    s.add_argument("--push-streams", type=_count, default=2, help="parallel background streams (default 2)")
    s.add_argument("--max-rate", type=_size, default=0, metavar="BYTES",
                   help="limit the background push to BYTES of guest RAM per second, e.g. 500M (demand "
                   "faults are never held back; default: no limit)")
    s.add_argument("--no-sparse", action="store_true",
                   help="send large pages whole (default: a 2 MiB or 1 GiB page's all-zero 4 KiB blocks are "
                   "left out, on the demand and raw push channels, when the destination accepts that)")
    s.add_argument("--push-buffer", type=_buffer, default=None, metavar="BYTES|auto|kernel",
                   help="send buffer of each push stream (default auto: about 10 GB/s x the round trip, at least "
                   "256K, and the kernel's autotuning past 4M; kernel: always the kernel's autotuning)")
    s.add_argument("--pace", choices=["auto", "on", "off"], default="auto",
                   help="keep the raw push just under the link's rate, measured at the start and every few "
                   "seconds (SO_MAX_PACING_RATE, TCP_NOTSENT_LOWAT), so the bottleneck queue stays short; "
                   "auto (default): on unless the destination is on loopback")
    s.add_argument("--batch-bytes", type=_size, default=1 << 20, help="background batch size (default 1M)")
    s.add_argument("--no-compress", action="store_true", help="with --transport grpc: send pages without zstd")
    s.add_argument("--compress", choices=["auto", "on", "off"], default="auto",
                   help="zstd on the raw push, in C: auto (default) compresses a stream's batches while the link, "
                   "not the CPU, holds it back (measured as it goes); on: always (incompressible runs still go raw); "
                   "off: never")
    s.add_argument("--transport", choices=["raw", "grpc"], default="raw",
                   help="background pages: raw = plain TCP from the RAM mapping, written in C, zstd per --compress "
                        "(default); grpc = gRPC streams with zstd in Python")
    s.add_argument("--dest-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="give up on a destination that acknowledges or takes in nothing this long (its host down, "
                   "the network split, the agent hung): this source then tries again for --recovery-window "
                   "(default 10; 0: TCP's own minutes)")
    s.add_argument("--recovery-window", type=_seconds, default=600.0, metavar="SECONDS",
                   help="a source that loses its destination mid-migration (its agent died, its host rebooted, the "
                   "link cut) tries again this long, and resumes as soon as that destination or a restarted agent "
                   "with the same guest answers; then it exits with code 4 saying what to do (default 600; 0: "
                   "exit at once)")
    s.add_argument("--resume", metavar="SESSION", help="resume this session after a failure")
    s.add_argument("--guest", default="", help="serve the destination guest attached with this name "
                   "(default: the first one waiting)")
    s.add_argument("--precopy", action="store_true",
                   help="pre-copy first, then post-copy: the source guest attaches on --attach and runs while "
                        "rounds of pages go out (docs/precopy.md)")
    s.add_argument("--attach", metavar="SOCKET", help="(--precopy) where the source guest attaches")
    s.add_argument("--attach-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="(--precopy) how long to wait for the source guest (default 60)")
    s.add_argument("--switch-below", type=int, default=None, metavar="PAGES",
                   help="(--precopy) switch once a round leaves at most this many pages written (default: 4 MiB "
                        "of them, 1024 pages of 4 KiB; -1: never for this reason)")
    s.add_argument("--switch-stall", type=int, default=3, metavar="ROUNDS",
                   help="(--precopy) switch once the pages written per round stopped shrinking for this many "
                        "rounds (default 3; 0: never for this reason)")
    s.add_argument("--switch-after", type=_seconds, default=0.0, metavar="SECONDS",
                   help="(--precopy) switch after this long in pre-copy (default 0: no limit); SIGUSR1 or "
                        "`migrate status --source PATH --switch` switches after the current round")
    s.add_argument("--qmp", metavar="SOCKET", help="QMP socket of the source QEMU: pause it, send its device "
                   "state (x-ignore-shared), then serve --ram; it stays paused once the destination runs")
    s.add_argument("--quit-source", action="store_true", help="with --qmp: quit the source QEMU once the "
                   "migration completed (default: it stays paused, its RAM kept, and the last event says where)")
    _add_tls_args(s, "source")
    s.add_argument("--hints", metavar="FILE", help="push the pages this file names first, in its order (written "
                   "by dest --record-hints on an earlier migration of this guest)")
    s.add_argument("--locality-window", type=_window, default="auto", metavar="PAGES|auto",
                   help="pages pushed after each demand fault: auto (default) grows while faults stay near "
                   "each other and shrinks when they jump; a number fixes it")
    s.add_argument("--control", metavar="SOCKET", help="the control socket `migrate status --source` asks "
                   "(default: $XDG_RUNTIME_DIR or /tmp, in migrate-UID/source-PID.sock; its first event names it)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics there (needs the "
                   "metrics extra; HTTPS with the --tls-* flags, plaintext only on loopback or with --insecure)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_source)

    st = sub.add_parser("status", help="what a running agent is doing: state, pages, rate, faults, vCPUs")
    which = st.add_mutually_exclusive_group(required=True)
    which.add_argument("--attach", metavar="SOCKET", help="a destination agent's attach socket")
    which.add_argument("--source", metavar="SOCKET", help="a source agent's control socket (its first event "
                       "names it)")
    which.add_argument("--to", metavar="HOST:PORT", help="a destination agent's gRPC address, with the TLS flags of "
                       "a source: it tells the migrations this certificate's name opened, and guests not opened yet")
    _add_tls_args(st, "source")
    st.add_argument("--timeout", type=_period, default=10.0, metavar="SECONDS", help="with --to: how long to wait "
                    "(default 10)")
    st.add_argument("--switch", action="store_true", help="with --source of a `source --precopy`: switch to "
                    "post-copy after the current round")
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.set_defaults(fn=cmd_status)

    g = sub.add_parser("guestsim", help="the simulated VM")
    g.add_argument("--attach", required=True)
    g.add_argument("--size", type=_size, required=True)
    g.add_argument("--backing", choices=["tmpfs", "tmpfs-file", "hugetlbfs", "hugetlbfs-file", "hugetlbfs-1g"],
                   default="tmpfs")
    g.add_argument("--pattern", choices=["seq", "random", "hotset", "workingset"], default="seq")
    g.add_argument("--vcpus", type=_count, default=1)
    g.add_argument("--name", default="guestsim", help="the name it attaches with (source --guest picks it)")
    g.add_argument("--start-on", choices=["switchover", "attach"], default="switchover",
                   help="start the vCPUs when a source starts serving (default, as a VM resumed on the "
                        "destination) or right after the attach")
    g.add_argument("--role", choices=["dest", "source"], default="dest",
                   help="dest (default): the VM being filled; source: the running VM of a pre-copy, "
                        "attached to `migrate source --precopy --attach` and writing until it is paused")
    g.add_argument("--write-pages", type=_count, default=256, help="(--role source) pages written each time")
    g.add_argument("--write-every", type=float, default=100.0, metavar="MS",
                   help="(--role source) milliseconds between writes (default 100)")
    g.add_argument("--hold", type=float, default=600.0, metavar="SECONDS",
                   help="(--role source) the longest it runs")
    g.add_argument("--writes", action="store_true",
                   help="(--role dest) the source guest wrote during pre-copy: verify against its "
                        "generation table, and report the RAM's sha256")
    _add_image_args(g)
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_guestsim)

    m = sub.add_parser("mkram", help="write the deterministic RAM image")
    m.add_argument("path")
    m.add_argument("--size", type=_size, required=True)
    _add_image_args(m)
    m.set_defaults(fn=cmd_mkram)

    sp = sub.add_parser("shim-path", help="print the path of the LD_PRELOAD shim for QEMU")
    sp.set_defaults(fn=cmd_shim_path)

    c = sub.add_parser("certs", help="write a CA and a certificate per host for mutual TLS (needs cryptography)")
    c.add_argument("dir", metavar="DIR", help="where to write them (ca.pem, ca.key, HOST.pem, HOST.key); a CA "
                   "already there signs the new hosts")
    c.add_argument("--hosts", required=True, metavar="A,B", help="host names (or IP addresses), comma-separated")
    c.add_argument("--days", type=_count, default=365, help="how long they are valid (default 365)")
    c.set_defaults(fn=cmd_certs)

    de = sub.add_parser("demo", help="mkram + dest + guestsim + source on loopback, then a summary")
    de.add_argument("--size", type=_size, default=1 << 30)
    de.add_argument("--backing", choices=["tmpfs", "hugetlbfs"], default="tmpfs")
    de.add_argument("--pattern", choices=["seq", "random", "hotset", "workingset"], default="random")
    de.add_argument("--vcpus", type=_count, default=2)
    de.add_argument("--placement", choices=["continue", "copy"], default="continue")
    de.add_argument("--seed", type=int, default=42)
    de.add_argument("--json", action="store_true")
    de.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="floors and migrations on loopback, compared in one run (source tree only)")
    b.add_argument("--quick", action="store_true", help="the ratio set only, under 3 minutes")
    b.add_argument("--qemu", action="store_true",
                   help="also run the QEMU guest scenario (engine vs QEMU post-copy, 512 MiB)")
    b.add_argument("--link", action="append", metavar="RATE",
                   help="run the agents in two network namespaces joined by a veth pair shaped with tbf at RATE "
                   "(tc's spelling: 10gbit, 1gbit); only the link scenarios run, with the link's own floors "
                   "(needs root); repeatable. --quick includes 10gbit and 1gbit")
    b.add_argument("--precopy", action="store_true",
                   help="also run pre-copy then post-copy with the simulated guest writing (precopy_fault_fraction); "
                   "with --qemu, the QEMU guest writing too: this engine's pre-copy vs QEMU's one pass then "
                   "post-copy (docs/qemu-precopy.md)")
    b.add_argument("--matrix", action="store_true", help="every combination of the scenario factors (long)")
    b.add_argument("--json", action="store_true", help="last stdout line: one JSON object with the ratios")
    b.add_argument("--out", metavar="DIR", help="results directory (default benchmarks/results)")
    b.add_argument("--name", help="results file name (default quick or full)")
    b.add_argument("--scenario", action="append", metavar="PATTERN",
                   help="run only scenarios whose name contains PATTERN (or matches it as a glob); repeatable")
    b.add_argument("--profile", action="append", metavar="PATTERN",
                   help="py-spy the agents of matching scenarios (needs py-spy on PATH or PY_SPY)")
    b.add_argument("--no-floors", action="store_true", help="skip the floors (ratios that need them are empty)")
    b.add_argument("--no-plots", action="store_true")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)

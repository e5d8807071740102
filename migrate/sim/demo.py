"""`migrate demo`: the embedded default. Writes an image, starts dest, guestsim
and source as separate processes on loopback, the two agents with mutual TLS
(a CA and their certificates made in the run's work directory), and prints
how the pages arrived."""

from __future__ import annotations

import json
import sys
import tempfile

from migrate import hugepages
from migrate.errors import fmt_size
from migrate.sim.localrun import LocalMigration


def run(args) -> int:
    size = args.size
    huge = args.backing == "hugetlbfs"
    ps = 2 << 20 if huge else 4096
    if size % ps:
        print(f"demo: --size {size} is not a multiple of the {fmt_size(ps)} page size", file=sys.stderr)
        return 2
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    try:
        import cryptography  # noqa: F401  (makes the demo's certificates)
        tls = True
    except ImportError:
        # (the agents take plaintext on loopback)
        say("demo: the cryptography package is missing (pip install 'migrate[tls]'): plaintext on loopback")
        tls = False
    with tempfile.TemporaryDirectory(prefix="migrate-demo-") as work:
        need = size // ps if huge else 0
        with hugepages.reserved(need) as free:
            if huge and free < need:
                print(f"demo: {need} free 2 MiB huge pages needed, {free} available: reserve them "
                      f"(echo {need} > /proc/sys/vm/nr_hugepages, as root)", file=sys.stderr)
                return 2
            with LocalMigration(work, size, backing=args.backing, seed=args.seed, pattern=args.pattern,
                                vcpus=args.vcpus, placement=args.placement, tls=tls) as lm:
                say(f"demo: writing a {fmt_size(size)} RAM image (seed {args.seed}) to {lm.image}")
                lm.make_image()
                say(f"demo: dest, guestsim ({args.backing}, {args.pattern}, {args.vcpus} vCPUs), source on loopback"
                    + (f"; the agents with mutual TLS (certificates in {lm.tls.dir})" if lm.tls else ""))
                out = lm.run(timeout=600)
    d, g, s = out.get("dest") or {}, out.get("guest") or {}, out.get("source") or {}
    ok = out["dest_rc"] == 0 and out["guest_rc"] == 0 and out["source_rc"] == 0 and bool(g.get("verified"))
    secs = s.get("seconds") or d.get("seconds") or 0
    summary = {
        "verified": bool(g.get("verified")),
        "size": size,
        "backing": args.backing,
        "pattern": args.pattern,
        "vcpus": args.vcpus,
        "placement": args.placement,
        "tls": tls,
        "pages_total": d.get("pages_total"),
        "pages_demand": d.get("pages_demand"),
        "pages_pushed": d.get("pages_pushed"),
        "pages_zero": d.get("pages_zero"),
        "fault_p50_us": d.get("fault_p50_us"),
        "fault_p99_us": d.get("fault_p99_us"),
        "guest_access_p50_us": g.get("access_p50_us"),
        "guest_access_p99_us": g.get("access_p99_us"),
        "guest_seconds": g.get("seconds"),
        "throughput_gbps": round(size / secs / 1e9, 3) if secs else None,
        "wire_bytes": s.get("wire_bytes"),
        "seconds": secs,
        "ack_ms": d.get("ack_ms"),
        "prepare_s": d.get("prepare_s"),
        "alloc_overlap_s": d.get("alloc_overlap_s"),
        "exit_codes": {"dest": out["dest_rc"], "guestsim": out["guest_rc"], "source": out["source_rc"]},
    }
    if args.json:
        print(json.dumps({"event": "summary", **summary}))
    else:
        prep = summary["prepare_s"]
        prep_line = (f"  (the destination acked the guest's attach in {summary['ack_ms']} ms, then allocated its RAM "
                     f"in the background in {prep} s, {summary['alloc_overlap_s']} s of it during the migration)\n"
                     if prep is not None else "")
        print(f"""migrated {fmt_size(size)} ({args.backing}, {summary['pages_total']} pages of {fmt_size(ps)}) in {secs} s
{prep_line}  pages by how they arrived: {summary['pages_demand']} demand, {summary['pages_pushed']} pushed, {summary['pages_zero']} zero
  demand fault p50 {summary['fault_p50_us']} us, p99 {summary['fault_p99_us']} us (request to placement, at the agent)
  guest first-access p50 {summary['guest_access_p50_us']} us, p99 {summary['guest_access_p99_us']} us
  throughput {summary['throughput_gbps']} GB/s of guest RAM, {summary['wire_bytes']} wire bytes
  {'verified' if summary['verified'] else 'NOT VERIFIED'}: every byte the guest read matched the source""")
    return 0 if ok else 1

"""From measurements to the numbers issue 4 asks for: ratios against the
floors of the same run, the targets they are held to, a Markdown table and
PNG plots."""

from __future__ import annotations

import json
import os

import numpy as np

HUGE = 2 << 20

# key: (comparison, bound, what it means)
TARGETS = {
    "fast_path_p50_ratio": ("<=", 2.0, "fast-path fault p50 / C handler CONTINUE p50 (4 KiB)"),
    "demand_p50_ratio": ("<=", 2.5, "4 KiB demand fault p50 (dest, push running) / raw TCP ping-pong p50"),
    "demand_p99_ratio": ("<=", 10.0, "4 KiB demand fault p99 (dest, push running) / raw TCP ping-pong p50"),
    "push_incompressible_ratio": (">=", 0.5, "background GB/s of guest RAM, all-random content / raw TCP GB/s"),
    "push_typical_ratio": (">=", 1.0, "background GB/s of guest RAM, typical content / raw TCP GB/s"),
    "huge_continue_vs_copy": (">=", 50.0, "2 MiB handler placement p50 (the ioctl with DONTWAKE), lowest of the "
                                          "reps: COPY / CONTINUE, C floor"),
    "huge_demand_vs_wire": ("<=", 1.2, "2 MiB demand fault p50 (dest, push running) / raw TCP 2 MiB request-reply p50"),
    "seq_fault_fraction": ("<=", 0.05, "faults / pages, sequential scan after switchover"),
    "precopy_fault_fraction": ("<=", 0.01, "pre-copy then post-copy (bench --precopy), the source guest writing 256 "
                                           "pages every 100 ms: demand faults after the switch / guest pages"),
    "qemu_total_ratio": ("<=", 0.5, "QEMU guest, 512 MiB: total migration time, this engine / QEMU's own post-copy"),
    "qemu_guest_ratio": ("<=", 0.5, "QEMU guest, 512 MiB: guest's time to read all its memory after the switch, "
                                    "this engine / QEMU's own post-copy"),
    "qemu_pause_ratio": ("<=", 1.0, "QEMU guest, 512 MiB: source STOP -> destination RESUME, median of the reps, "
                                    "this engine / QEMU's own post-copy"),
    "tls_push_ratio": (">=", 0.7, "background GB/s of guest RAM, all-random content: raw channels over TLS / "
                                  "plaintext, same run"),
    "tls_demand_p50_ratio": ("<=", 1.3, "4 KiB demand fault p50 (dest, push running): raw channels over TLS / "
                                        "plaintext, same run"),
    "hints_fault_reduction": (">=", 0.5, "1 - demand faults with source --hints / without, workingset guest "
                                         "(10% of 1 GiB, compute between touches), 1 Gbit shaped link"),
    "hints_time_reduction": (">=", 0.3, "1 - guest's time to finish its workload with source --hints / without, "
                                        "same runs"),
    "locality_auto_vs_fixed": ("<=", 1.0, "guest's time to read its memory with the adaptive locality window / a "
                                          "fixed 256 pages, four sequential vCPUs, 1 Gbit shaped link"),
    "link10g_demand_p99_ratio": ("<=", 3.0, "10 Gbit shaped link: 4 KiB demand fault p99 (dest) with the push filling "
                                            "the link / the same with the link idle"),
    "link10g_typical_ram_vs_link": (">=", 1.5, "10 Gbit shaped link: background GB/s of guest RAM, typical content / "
                                               "the link's measured bulk GB/s"),
    "link1g_typical_ram_vs_link": (">=", 3.0, "1 Gbit shaped link: the same"),
    "qemu_link_total_ratio": ("<=", 0.5, "QEMU guest, 512 MiB, over a shaped link (`--qemu --link`): total migration "
                                         "time, this engine / QEMU post-copy-preempt"),
    "qemu_link_guest_ratio": ("<=", 0.5, "the same: the guest's time to read all its memory after the switch"),
    "qemu_precopy_fault_fraction": ("<=", 0.01, "QEMU guest, 512 MiB, writing 256 pages every 100 ms (`--qemu "
                                                "--precopy`): demand faults after the switch / the guest's pages, "
                                                "median of the reps"),
    "qemu_precopy_total_ratio": ("<=", 0.5, "the same: total migration time, this engine's pre-copy / QEMU's one pass "
                                            "then post-copy, medians"),
    "qemu_precopy_pause_ratio": ("<=", 1.0, "the same: source STOP -> destination RESUME, this engine / QEMU, medians"),
    "qemu_precopy_slowdown_ratio": ("<=", 1.0, "the same: the guest's own loop time during pre-copy over with no "
                                               "migration, this engine's write tracking (qemu_precopy_guest_slowdown) "
                                               "/ QEMU's dirty logging (qemu_dirty_log_guest_slowdown), medians"),
    "attach_ack_ms": ("<=", 50.0, "longest attach ack over the run's scenarios (QEMU's too): from the guest's "
                                  "connection to its ack, while its RAM is allocated in the background"),
    "dest_rss_mib": ("<=", None, "dest agent peak own RSS (anon + file), MiB; bound 100 + 1 per GiB of guest"),
}


def _pick(results: list[dict], **want) -> dict | None:
    """The largest successful scenario with these fields (plaintext unless
    tls=True is asked for: results from before TLS have no tls field)."""
    absent = {"tls": False, "link": "", "push_rate": 0}   # fields results from before them lack
    want = {"tls": False, "link": "", "push_rate": 0, **want}
    hits = [r for r in results if r.get("ok") and all(r.get(k, absent.get(k)) == v for k, v in want.items())]
    return max(hits, key=lambda r: r["size"]) if hits else None


def _div(a, b, nd=3):
    if a is None or not b:
        return None
    return round(a / b, nd)


def ratios(floors: dict, results: list[dict], qemu: dict | None = None,
           hints: dict | None = None) -> tuple[dict, dict]:
    """Returns (ratios, provenance: which measurement each came from). The QEMU
    keys are there only when the QEMU guest scenario ran."""
    f = floors
    r: dict = {}
    src: dict = {}
    c4 = f.get("c_continue_4k", {}).get("p50_us")
    ping = f.get("tcp_pingpong", {}).get("p50_us")
    tcp = f.get("tcp_bandwidth", {}).get("gbps")
    tcp_cold = f.get("tcp_bandwidth_cold", {}).get("gbps")
    r["fast_path_p50_ratio"] = _div(f.get("fast_4k", {}).get("p50_us"), c4)
    src["fast_path_p50_ratio"] = "floors.fast_4k / floors.c_continue_4k"

    dem = _pick(results, backing="tmpfs", pattern="random", vcpus=1, content="typical", placement="continue")
    if dem:
        r["demand_p50_ratio"] = _div(dem["dest"].get("fault_p50_us"), ping)
        r["demand_p99_ratio"] = _div(dem["dest"].get("fault_p99_us"), ping)
        r["guest_demand_p50_ratio"] = _div(dem.get("guest_fault_p50_us"), ping)
        r["guest_demand_p99_ratio"] = _div(dem.get("guest_fault_p99_us"), ping)
        reps = dem["dest"].get("fault_p50_us_reps")
        src["demand_p50_ratio"] = src["demand_p99_ratio"] = (
            dem["scenario"] + " dest fault_p50/p99_us / tcp_pingpong p50"
            + (f", best of {len(reps)} runs by p50 (p50 {', '.join(str(x) for x in reps)} us; p99 "
               f"{', '.join(str(x) for x in dem['dest']['fault_p99_us_reps'])} us)" if reps else ""))
    for key, content in (("push_incompressible_ratio", "random"), ("push_typical_ratio", "typical")):
        run = _pick(results, backing="tmpfs", pattern="idle", vcpus=1, content=content, placement="continue")
        if run:
            r[key] = _div(run.get("push_gbps") or run["ram_gbps"], tcp)
            # not a target: the same push against TCP that reads and writes
            # memory as the push does, rather than one buffer kept in cache
            r[key + "_cold"] = _div(run.get("push_gbps") or run["ram_gbps"], tcp_cold)
            m = f.get("map_4k", {})
            if m.get("s_per_gib") and run["dest"].get("push_s"):
                # not a target: the share of the push's CPU (every CPU busy for
                # push_s) that mapping the guest's pages takes at the floor's rate
                r[key.replace("_ratio", "_map_cpu_share")] = _div(
                    m["s_per_gib"] * run["size"] / (1 << 30), m["cpus"] * run["dest"]["push_s"])
            reps = run.get("push_gbps_reps")
            src[key] = (run["scenario"] + " guest RAM / dest push_s (push channel open to last page)"
                        + (f", best of {', '.join(str(x) for x in reps)} GB/s" if reps else ""))
    # TLS on the raw channels against the same scenario in plaintext, both
    # measured in this run (best of their repetitions, as for the floors)
    for key, want, metric, what in (
            ("tls_push_ratio", dict(pattern="idle", content="random"),
             lambda run: run.get("push_gbps") or run["ram_gbps"], "push GB/s"),
            ("tls_demand_p50_ratio", dict(pattern="random", content="typical"),
             lambda run: run["dest"].get("fault_p50_us"), "dest fault_p50_us")):
        plain = _pick(results, backing="tmpfs", vcpus=1, placement="continue", **want)
        tls = _pick(results, backing="tmpfs", vcpus=1, placement="continue", tls=True, **want)
        if plain and tls and tls["size"] == plain["size"]:
            r[key] = _div(metric(tls), metric(plain))
            src[key] = f"{tls['scenario']} / {plain['scenario']}, {what} ({metric(tls)} / {metric(plain)})"
    # Not targets: where the TLS push's time goes. Each agent's CPU seconds a
    # GiB over its plaintext run's (same scenario, this run: the difference is
    # TLS), AES-128-GCM's own cost on one CPU, and the highest tls_push_ratio
    # this host allows if TLS added nothing but that cipher work (one
    # encryption and one decryption a byte) to a plaintext push that already
    # keeps every CPU busy: both agents share the CPUs here, so a GB takes
    # 2 / (cpus x cipher GB/s) seconds longer.
    aes = f.get("aes_gcm", {})
    plain = _pick(results, backing="tmpfs", vcpus=1, placement="continue", pattern="idle", content="random")
    tls = _pick(results, backing="tmpfs", vcpus=1, placement="continue", pattern="idle", content="random", tls=True)
    if aes.get("gbps"):
        r["tls_cipher_gbps"] = aes["gbps"]
        src["tls_cipher_gbps"] = (f"floors.aes_gcm: openssl speed -evp aes-128-gcm, {aes['record']} B, one CPU "
                                  f"({aes['s_per_gib']} s a GiB)")
    if plain and tls and tls["size"] == plain["size"]:
        for side in ("source", "dest"):
            a, b = tls.get("cpu_s_per_gib", {}).get(side), plain.get("cpu_s_per_gib", {}).get(side)
            if a is not None and b is not None:
                r[f"tls_push_{side}_cpu_s_per_gib"] = round(a - b, 3)
                src[f"tls_push_{side}_cpu_s_per_gib"] = f"{tls['scenario']} - {plain['scenario']}, {side} CPU s/GiB"
    # the same two costs on the channel path alone (floors.tls_wire): TLS's
    # CPU a GiB over plaintext's, both sides together, and the demand round
    # trip's p50 over plaintext's: the part of tls_demand_p50_ratio that
    # TLS itself adds, before the CPU its push takes from the demand threads
    w = f.get("tls_wire", {})
    if "push_tls" in w:
        cpu = {m: w[f"push_{m}"]["send_cpu_s_per_gib"] + w[f"push_{m}"]["recv_cpu_s_per_gib"] for m in ("plain", "tls")}
        r["tls_wire_push_cpu_ratio"] = _div(cpu["tls"], cpu["plain"])
        src["tls_wire_push_cpu_ratio"] = (f"floors.tls_wire, CPU s a GiB (send + receive): TLS {cpu['tls']:.3f} / "
                                          f"plaintext {cpu['plain']:.3f}")
        r["tls_wire_rr_p50_ratio"] = _div(w["rr_tls"]["p50_us"], w["rr_plain"]["p50_us"])
        src["tls_wire_rr_p50_ratio"] = (f"floors.tls_wire, 4 KiB round trip p50: TLS {w['rr_tls']['p50_us']} us / "
                                        f"plaintext {w['rr_plain']['p50_us']} us")
    plain_gbps = plain and (plain.get("push_gbps") or plain["ram_gbps"])
    if aes.get("gbps") and plain_gbps:
        r["tls_push_ratio_bound"] = _div(1, 1 + 2 * plain_gbps / ((aes.get("cpus") or 1) * aes["gbps"]))
        src["tls_push_ratio_bound"] = (f"1 / (1 + 2 x plaintext push {plain_gbps} GB/s / ({aes.get('cpus')} CPUs x "
                                       f"AES-128-GCM {aes['gbps']} GB/s))")
    c2, p2 = f.get("c_continue_2m"), f.get("c_copy_2m")
    if c2 and p2:
        # placement alone: the ioctl with DONTWAKE (waking the faulting thread
        # costs the same IPI either way and is not placement)
        r["huge_continue_vs_copy"] = _div(p2.get("place_p50_us", p2["ioctl_p50_us"]),
                                          c2.get("place_p50_us", c2["ioctl_p50_us"]), 1)
        r["huge_continue_vs_copy_with_wake"] = _div(p2.get("ioctl_p50_us_min", p2["ioctl_p50_us"]),
                                                    c2.get("ioctl_p50_us_min", c2["ioctl_p50_us"]), 1)
        r["huge_continue_vs_copy_roundtrip"] = _div(p2["p50_us"], c2["p50_us"], 1)
        src["huge_continue_vs_copy"] = ("floors.c_copy_2m / c_continue_2m, placement ioctl p50 with DONTWAKE "
                                        "(lowest rep)")
    hd = _pick(results, backing="hugetlbfs", pattern="random", vcpus=1, content="typical", placement="continue")
    rr2 = f.get("tcp_rr_2m", {}).get("p50_us")
    # the wire time of a 2 MiB page, measured: a request and a 2 MiB reply
    # between two processes over raw TCP (no userfaultfd, no push); with
    # all-random content no zero block stays behind and the whole 2 MiB moves
    for key, content in (("huge_demand_vs_wire", "typical"), ("huge_demand_vs_wire_random", "random")):
        run = _pick(results, backing="hugetlbfs", pattern="random", vcpus=1, content=content, placement="continue")
        if run and rr2:
            r[key] = _div(run["dest"].get("fault_p50_us"), rr2)
            reps = run["dest"].get("fault_p50_us_reps")
            src[key] = (run["scenario"] + f" dest fault_p50_us / tcp_rr_2m p50 {rr2:.0f} us"
                        + (f", best of {len(reps)} runs ({', '.join(str(x) for x in reps)} us)" if reps else ""))
    if hd and ping and tcp:
        # the same against a streaming estimate (ping-pong + 2 MiB at the bulk
        # rate), which a single request-reply does not reach on these hosts
        stream_us = ping + HUGE / (tcp * 1e9) * 1e6
        r["huge_demand_vs_stream"] = _div(hd["dest"].get("fault_p50_us"), stream_us)
    seq = _pick(results, backing="tmpfs", pattern="seq", vcpus=1, content="typical", placement="continue")
    if seq:
        r["seq_fault_fraction"] = seq["fault_fraction"]
        src["seq_fault_fraction"] = seq["scenario"] + " dest faults / pages_total"
    _link_ratios(results, r, src)
    ok = [x for x in results if x.get("ok") and x.get("peak_rss_mib", {}).get("dest") is not None]
    if ok:
        biggest = max(x["size"] for x in ok)
        at = [x for x in ok if x["size"] == biggest]
        worst = max(at, key=lambda x: x["peak_rss_mib"]["dest"])
        r["dest_rss_mib"] = worst["peak_rss_mib"]["dest"]
        r["dest_hwm_mib"] = worst.get("peak_hwm_mib", {}).get("dest")
        r["guest_gib"] = round(biggest / (1 << 30), 3)
        src["dest_rss_mib"] = worst["scenario"] + " peak RssAnon+RssFile of dest"
    acks = [(x["dest"]["ack_ms"], x["scenario"]) for x in results if x.get("ok") and x.get("dest", {}).get("ack_ms")]
    if qemu and qemu.get("attach_ack_ms") is not None:
        acks.append((qemu["attach_ack_ms"], "qemu engine runs (and one of 1 GiB)"))
    if acks:
        r["attach_ack_ms"], where = max(acks)
        src["attach_ack_ms"] = f"{where} dest ack_ms, the longest of {len(acks)}"
    if qemu and qemu.get("precopy") and qemu.get("keys"):
        for k, v in qemu["keys"].items():
            r[k] = v
            src[k] = (f"{qemu['scenario']}: medians of {qemu['reps']} alternating reps of each, engine pre-copy "
                      "and QEMU one pass + migrate-start-postcopy, the same writing guest")
    elif qemu and qemu.get("link") and qemu.get("ratio"):
        for k in ("qemu_link_total_ratio", "qemu_link_guest_ratio"):
            r[k] = qemu.get(k)
            src[k] = (f"qemu over {qemu['link']}: best engine {'total_ms' if 'total' in k else 'guest_verify_ms'} / "
                      "best QEMU post-copy-preempt, same link, same guest")
    elif qemu and qemu.get("ratio"):
        for k in ("qemu_total_ratio", "qemu_guest_ratio", "qemu_guest_delay_ratio", "qemu_total_ratio_tls",
                  "qemu_guest_ratio_tls"):
            if qemu.get(k) is not None:
                r[k] = qemu[k]
        if qemu.get("qemu_pause_ratio") is not None:
            r["qemu_pause_ratio"] = qemu["qemu_pause_ratio"]
            src["qemu_pause_ratio"] = "qemu: median engine downtime_ms / median QEMU post-copy (private RAM) downtime_ms"
        src["qemu_total_ratio"] = ("qemu: best engine total_ms (plaintext channels, as QEMU's stream) / best QEMU "
                                   "post-copy (private RAM) total_ms")
        src["qemu_total_ratio_tls"] = "qemu: the same with the engine's channels over mutual TLS"
        src["qemu_guest_ratio"] = ("qemu: best engine guest_verify_ms / best QEMU post-copy (private RAM) "
                                   "guest_verify_ms")
        shm = qemu.get("ratio_shm") or {}
        # QEMU post-copy with guest RAM on the same kind of share=on /dev/shm file as the engine's
        r["qemu_total_ratio_same_backing"] = shm.get("total_ms")
        r["qemu_guest_ratio_same_backing"] = shm.get("guest_verify_ms")
        b = qemu.get("best", {})
        e, q = b.get("engine", {}), b.get("qemu_postcopy", {})
        if e.get("guest_verify_local_ms") and q.get("guest_verify_ms"):
            # the lowest qemu_guest_ratio any engine could reach in this run: the
            # guest's own all-local read / QEMU's post-copy read
            r["qemu_guest_ratio_floor"] = _div(e["guest_verify_local_ms"], q["guest_verify_ms"])
    if hints and "scenario" in hints and not hints.get("error"):   # (not skipped)
        where = f"over a {hints['rate']} shaped link" if hints.get("link_floor") else f"at --max-rate {hints['rate']}"
        for k in ("hints_fault_reduction", "hints_time_reduction"):
            r[k] = hints.get(k)
            src[k] = f"{hints['scenario']} {where}: a record pass, then without hints, then with them"
        loc = hints.get("locality") or {}
        if "locality_auto_vs_fixed" in loc:
            r["locality_auto_vs_fixed"] = loc["locality_auto_vs_fixed"]
            src["locality_auto_vs_fixed"] = (f"{loc['scenario']}: guest's time with source --locality-window auto "
                                             f"/ {loc['fixed_pages']}, medians of {loc.get('reps', 1)} runs, seq 4 "
                                             "vCPUs, 256 MiB")
            r["locality_auto_vs_fixed_random"] = loc.get("locality_auto_vs_fixed_random")
            src["locality_auto_vs_fixed_random"] = "the same, random 1 vCPU (link-bound: no window can change it)"
            for p in ("seq", "random"):
                r[f"locality_auto_vs_fixed_{p}_faults"] = loc[p]["faults_auto_vs_fixed"]
    return r, src


LINK_KEYS = {"10gbit": "link10g", "1gbit": "link1g"}


def _link_ratios(results: list[dict], r: dict, src: dict) -> None:
    """The shaped-link keys (issue 19), each from scenarios run over one link
    in this run, against that link's floors measured just before them."""
    for rate in dict.fromkeys(x["link"] for x in results if x.get("link")):
        k = LINK_KEYS.get(rate, "link_" + rate)
        floor = next((x["link_floor"] for x in results if x.get("link") == rate and x.get("link_floor")), {})
        bulk = floor.get("bulk_gbps")
        r[k + "_bulk_gbps"] = bulk
        r[k + "_rtt_p50_us"] = floor.get("rtt_p50_us")
        src[k + "_bulk_gbps"] = f"link {rate}: one plaintext TCP stream across it, best of {floor.get('bulk_gbps_reps')}"
        push = _pick(results, backing="tmpfs", pattern="idle", vcpus=1, content="typical", placement="continue",
                     tls=True, link=rate)
        if push and bulk:
            r[k + "_typical_ram_vs_link"] = _div(push.get("push_gbps"), bulk)
            src[k + "_typical_ram_vs_link"] = (f"{push['scenario']} push GB/s {push.get('push_gbps')} / link bulk "
                                               f"{bulk} GB/s")
        busy = _pick(results, backing="tmpfs", pattern="random", vcpus=1, content="typical", placement="continue",
                     tls=True, link=rate)
        idle = [x for x in results if x.get("ok") and x.get("link") == rate and x.get("push_rate")
                and x.get("pattern") == "random" and x.get("content") == "typical"]
        if busy and idle:
            idle = idle[0]
            r[k + "_demand_p99_ratio"] = _div(busy["dest"].get("fault_p99_us"), idle["dest"].get("fault_p99_us"))
            r[k + "_demand_p50_ratio"] = _div(busy["dest"].get("fault_p50_us"), idle["dest"].get("fault_p50_us"))
            src[k + "_demand_p99_ratio"] = (f"{busy['scenario']} dest fault p99 {busy['dest'].get('fault_p99_us')} us "
                                            f"(push {busy.get('push_gbps')} GB/s) / {idle['scenario']} "
                                            f"{idle['dest'].get('fault_p99_us')} us")
        if busy and busy.get("link_bands"):
            # the marks counted: bytes the source's end sent in the urgent band
            r[k + "_urgent_band_mib"] = round(busy["link_bands"].get("10:10", {}).get("bytes", 0) / (1 << 20), 1)


def verdicts(r: dict) -> dict:
    out = {}
    for key, (op, bound, _) in TARGETS.items():
        v = r.get(key)
        if key == "dest_rss_mib" and r.get("guest_gib") is not None:
            bound = 100 + r["guest_gib"]
        if v is None or bound is None:
            out[key] = {"value": v, "target": None, "met": None}
            continue
        out[key] = {"value": v, "target": f"{op} {bound:g}", "met": v <= bound if op == "<=" else v >= bound}
    return out


# -- files ----------------------------------------------------------------------
def public(obj):
    """Drops the raw samples (keys starting with _) for the JSON."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


def _f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(doc: dict) -> str:
    lines = [f"# migrate bench: {doc['name']}", "",
             f"{doc['host']['when']}, {doc['host']['cpus']} CPUs, kernel {doc['host']['kernel']}, "
             f"{'quick' if doc['quick'] else 'full'} run, {doc['seconds']:.0f} s, load average "
             f"{doc['host']['loadavg_start'][0]:.2f} at start, {doc['host']['loadavg_end'][0]:.2f} at end "
             "(anything else running on the host shows up in every number)", "",
             f"Code: git {doc.get('git_head')}, engine sources {doc.get('code_start')} at start, "
             f"{doc.get('code_end')} at end" + (" (**the tree changed during the run**: see each row's code)"
                                                if doc.get('code_start') != doc.get('code_end') else ""), "",
             "## Ratios (issue 4 targets)", "", "| key | value | target | met | from |", "|---|---|---|---|---|"]
    for key, v in doc["targets"].items():
        met = {True: "yes", False: "**no**", None: "-"}[v["met"]]
        lines.append(f"| {key} | {_f(v['value'], 3)} | {v['target'] or '-'} | {met} | {doc['provenance'].get(key, '')} |")
    extra = [k for k in doc["ratios"] if k not in doc["targets"]]
    for k in extra:
        lines.append(f"| {k} | {_f(doc['ratios'][k], 3)} | - | - | |")
    lines += ["", "## Floors", "",
              "Each floor is the best of its repetitions, alternating unpinned and pinned to one CPU (on this VM a "
              "wake-up across CPUs can cost ~30-40 us more than on the same CPU).", "",
              "| floor | p50 us | p99 us | p99.9 us | handler ioctl p50 us (placement alone) | reps p50 us |",
              "|---|---|---|---|---|---|"]
    for k, v in doc["floors"].items():
        if "p50_us" in v:
            place = f" ({_f(v['place_p50_us'])})" if "place_p50_us" in v else ""
            lines.append(f"| {k} | {_f(v['p50_us'])} | {_f(v.get('p99_us'))} | {_f(v.get('p999_us'))} | "
                         f"{_f(v.get('ioctl_p50_us'))}{place} | {', '.join(_f(x) + (' (1 CPU)' if c and c.startswith('CPU') else '') for x, c in zip(v.get('reps_p50_us', []), v.get('reps_cpus') or [None] * 99))} |")
        elif "error" in v:
            lines.append(f"| {k} | error: {v['error']} | | | | |")
    for name in ("tcp_bandwidth", "tcp_bandwidth_cold"):
        bw = doc["floors"].get(name)
        if bw and "gbps" in bw:
            lines.append(f"| {name} | {bw['gbps']} GB/s | | | | {', '.join(str(x) + (' (1 CPU)' if c and c.startswith('CPU') else '') for x, c in zip(bw['reps_gbps'], bw.get('reps_cpus') or [None] * 99))} GB/s |")
    m = doc["floors"].get("map_4k")
    if m and "ns_per_page" in m:
        lines.append(f"| map_4k (mapping received pages, one CPU) | {m['ns_per_page']} ns a page, "
                     f"{m['s_per_gib']} s a GiB | | | | {', '.join(_f(x, 1) for x in m['reps_ns_per_page'])} ns |")
    for k, v in doc["floors"].items():
        if k.startswith("link_") and "bulk_gbps" in v:
            lines.append(f"| {k} (shaped link: one TCP stream; 4 KiB ping-pong) | {v['bulk_gbps']} GB/s; "
                         f"{_f(v['rtt_p50_us'])} | {_f(v['rtt_p99_us'])} | | | {', '.join(str(x) for x in v['bulk_gbps_reps'])} GB/s |")
    w = doc["floors"].get("tls_wire")
    if w and "push_tls" in w:
        for m in ("plain", "tls"):
            p, rr = w[f"push_{m}"], w[f"rr_{m}"]
            lines.append(f"| tls_wire {m} (channel path alone): push {p['gbps']} GB/s, CPU s a GiB send "
                         f"{p['send_cpu_s_per_gib']} receive {p['recv_cpu_s_per_gib']}; 4 KiB round trip | "
                         f"{_f(rr['p50_us'])} | {_f(rr.get('p99_us'))} | {_f(rr.get('p999_us'))} | | "
                         f"{', '.join(_f(x) for x in rr.get('reps_p50_us', []))} |")
    a = doc["floors"].get("aes_gcm")
    if a and "gbps" in a:
        lines.append(f"| aes_gcm (AES-128-GCM, {a['record']} B records, one CPU) | {a['gbps']} GB/s, "
                     f"{a['s_per_gib']} s a GiB | | | | {', '.join(str(x) for x in a['reps_gbps'])} GB/s |")
    lines += ["", "## Scenarios", "",
              "Times in seconds (source connect to Finish); `RAM GB/s` = guest RAM / that time; `push GB/s` = guest "
              "RAM / the push window at the destination (first push channel to last page); fault latencies in us. "
              "`dest` = the agent's request-to-"
              "placement time of demand faults; `guest` = first-access latency of pages the guest waited on "
              "(> 3 us). CPU in s per GiB of guest RAM, whole processes (the destination's includes allocating "
              "guest RAM at attach, `prep s`); RSS = peak RssAnon+RssFile in MiB (guest RAM in the "
              "shared file not counted; VmHWM in the JSON).", "",
              "| scenario | ok | s | RAM GB/s | push GB/s | wire GB/s | wire/RAM | faults/GiB | fast | dest p50 | dest p99 | "
              "dest p99.9 | guest p50 | guest p99 | guest p99.9 | demand/pushed/zero | prep s | CPU dest | CPU src | "
              "RSS dest | RSS src |",
              "|" + "---|" * 21]
    for r in doc["scenarios"]:
        if not r.get("dest"):
            lines.append(f"| {r['scenario']} | **no** | {r.get('error') or r.get('skipped', '')} |" + " |" * 18)
            continue
        d = r["dest"]
        lines.append(
            f"| {r['scenario']} | {'yes' if r['ok'] else '**no**'} | {_f(r['seconds'])} | {_f(r['ram_gbps'], 3)} | "
            f"{_f(r.get('push_gbps'), 3)} | {_f(r['wire_gbps'], 3)} | {_f(r['wire_ratio'])} | {_f(r['faults_per_gib'], 0)} | {d.get('faults_fast')} | "
            f"{_f(d.get('fault_p50_us'), 0)} | {_f(d.get('fault_p99_us'), 0)} | {_f(d.get('fault_p999_us'), 0)} | "
            f"{_f(r['guest_fault_p50_us'], 1)} | "
            f"{_f(r['guest_fault_p99_us'], 0)} | {_f(r['guest_fault_p999_us'], 0)} | "
            f"{d.get('pages_demand')}/{d.get('pages_pushed')}/{d.get('pages_zero')} | {_f(d.get('prepare_s'))} | "
            f"{_f(r['cpu_s_per_gib'].get('dest'))} | {_f(r['cpu_s_per_gib'].get('source'))} | "
            f"{_f(r['peak_rss_mib'].get('dest'), 0)} | {_f(r['peak_rss_mib'].get('source'), 0)} |"
            + (f" code {r.get('code')}" if doc.get('code_start') != doc.get('code_end') else ""))
    lines += qemu_markdown(doc.get("qemu"))
    if doc.get("profiles"):
        lines += ["", "## Where the agents spend time (py-spy, top frames by samples)", ""]
        for name, prof in doc["profiles"].items():
            lines.append(f"### {name}")
            for who, rows in prof.items():
                lines.append(f"- {who}:")
                lines += [f"  - {pct:.1f}% {frame}" for frame, pct in rows]
    return "\n".join(lines) + "\n"


QEMU_SIDES = (("engine", "this engine (shared RAM file + x-ignore-shared, demand faults + push)"),
              ("qemu_postcopy", "QEMU post-copy, private RAM, switched right after `migrate` (no precopy "
                                "pass): the baseline"),
              ("qemu_postcopy_shm", "QEMU post-copy as above, RAM on a share=on /dev/shm file (the engine's "
                                    "backing)"),
              ("qemu_precopy_postcopy", "QEMU: one precopy pass, then migrate-start-postcopy (libvirt "
                                        "--postcopy-after-precopy)"),
              ("qemu_postcopy_preempt", "QEMU post-copy with its preempt channel (postcopy-preempt), private RAM, "
                                        "over the shaped link: the baseline of `--qemu --link`"))


def _pause_markdown(q: dict) -> list[str]:
    ps = q.get("pause_split") or {}
    if not ps:
        return []
    out = ["", f"The pause (source STOP -> destination RESUME) in its parts, ms, of the repetition with the median "
               f"pause; qemu_pause_ratio (median engine / median QEMU post-copy): {_f(q.get('qemu_pause_ratio'), 3)}. "
               "Each part counts only the time after the one before it ended, so they add up to the pause. -: for "
               "QEMU, a part QMP does not expose (its save includes the stop and the send); for both, no `cont` "
               "(the destination QEMU starts itself).", "",
           "| | pause | stop | save | switch | transfer | load | cont | remainder |",
           "|---|---|---|---|---|---|---|---|---|"]
    for side, label in QEMU_SIDES:
        p = ps.get(side)
        if p:
            out.append(f"| {label} | " + " | ".join(_f(p.get(k), 2) if p.get(k) is not None else "-" for k in (
                "pause_ms", "stop_ms", "save_ms", "switch_ms", "transfer_ms", "load_ms", "cont_ms", "remainder_ms"))
                       + " |")
    return out


def qemu_markdown(q: dict | None) -> list[str]:
    if not q:
        return []
    lines = ["", "## QEMU guest", ""]
    if q.get("skipped") and not q.get("runs"):
        return lines + [f"Not run: {q['skipped']}."]
    if q.get("link"):
        fl = q.get("link_floor") or {}
        lines += [f"Over a shaped link, {q['link']} (benchmarks/link.py; measured bulk {fl.get('bulk_gbps')} GB/s, "
                  f"idle 4 KiB round trip p50 {fl.get('rtt_p50_us')} us): the source agent and the source QEMU in "
                  "one network namespace, the destination agent and the destination QEMU in the other (the "
                  "engine's QEMUs reach their agents over Unix sockets), so every page crosses the link. The "
                  "engine's channels are mutual TLS (the agents refuse plaintext off loopback); QEMU's migration "
                  "stream is plain TCP. Otherwise as below (where it says loopback TCP, read the link).", ""]
    lines += [f"The same busybox guest (Debian kernel, memfill: {q.get('mem_mb')} MiB RAM, most of it filled with a "
              "page-number pattern), TCG, both QEMUs on this machine, loopback TCP; best of "
              f"{q.get('reps')} repetitions per metric (all below). total = start of the migration (engine: the "
              "source QEMU's STOP; QEMU: its MIGRATION setup event) to the destination's last page (engine: the "
              "agent's completed event; QEMU: the destination's MIGRATION completed event); downtime = source "
              "STOP to destination RESUME (QEMU's own timestamps); guest verify = the guest's own time to read "
              "and check all of its memory, triggered the moment the destination runs; local = the same read "
              "again once every page is there (the guest's floor); blocktime = QEMU's postcopy-blocktime "
              "(destination; the engine's: its one vCPU's blocked time, from the faults' thread ids). Ratios are engine / QEMU; the goal is <= 0.5 for total and guest verify. The guest "
              "sits idle until the switch, so QEMU's precopy pass dirties nothing: with a precopy pass first, QEMU "
              "sends most of RAM before or while the source is stopped (see downtime) and the post-copy phase has "
              "little left to do.", ""]
    if q.get("error"):
        lines += [f"**Failed**: {q['error']}", ""]
    for e in q.get("errors", []):
        lines += [f"- run failed: {e}"]
    if q.get("errors"):
        lines += [""]
    best = q.get("best", {})
    lines += ["| | total ms | downtime ms | guest verify ms | verify, all local ms | postcopy-blocktime ms |",
              "|---|---|---|---|---|---|"]
    for side, label in QEMU_SIDES:
        b = best.get(side)
        if b:
            lines.append(f"| {label} | {_f(b['total_ms'], 0)} | {_f(b['downtime_ms'], 1)} | "
                         f"{_f(b['guest_verify_ms'], 0)} | {_f(b['guest_verify_local_ms'], 0)} | "
                         f"{_f(b['postcopy_blocktime_ms'], 0)} |")
    for key, side in (("ratio", "QEMU post-copy" + ("-preempt" if q.get("link") else "")),
                      ("ratio_shm", "QEMU post-copy on /dev/shm"),
                      ("ratio_precopy", "QEMU precopy pass + post-copy")):
        rr = q.get(key)
        if rr:
            lines.append(f"| **engine / {side}** | {_f(rr.get('total_ms'), 3)} | {_f(rr.get('downtime_ms'), 3)} | "
                         f"{_f(rr.get('guest_verify_ms'), 3)} | | |")
    lines += _pause_markdown(q)
    pre = q.get("runs", {}).get("qemu_precopy_postcopy", [])
    if pre and not any(r.get("went_postcopy") for r in pre):
        lines += ["", "In every precopy-first run QEMU converged on its own before the switch (the idle guest "
                      "dirties nothing): it stopped the source and copied the rest while stopped, so that row is "
                      "a precopy migration, not post-copy."]
    if q.get("qemu_guest_delay_ratio") is not None:
        lines += ["", f"What the migration adds to the guest's read (verify - local), engine / QEMU post-copy: "
                      f"{q['qemu_guest_delay_ratio']:.3f}."]
    lines += ["", "All repetitions:", "",
              "| run | load avg | total ms | downtime ms | guest verify ms | local ms | blocktime ms | details |",
              "|---|---|---|---|---|---|---|---|"]
    for side, runs in q.get("runs", {}).items():
        for i, r in enumerate(runs):
            if side == "engine":
                det = (f"{r.get('demand_faults')} demand faults (p50 {_f(r.get('fault_p50_us'), 0)} us, p99 "
                       f"{_f(r.get('fault_p99_us'), 0)} us), push {_f(r.get('ram_gbps'), 2)} GB/s of RAM, "
                       f"device state {r.get('device_state_bytes')} B: capture {_f(r.get('capture_ms'), 1)} ms, "
                       f"connected +{_f(r.get('connected_ms'), 1)} ms, load {_f(r.get('load_ms'), 1)} ms; CPU s "
                       f"dest {r.get('cpu_s', {}).get('dest')} source {r.get('cpu_s', {}).get('source')}")
            else:
                det = (f"{r.get('postcopy_requests')} post-copy requests, {r.get('ram_transferred')} B "
                       f"({r.get('postcopy_bytes')} B post-copy, {r.get('downtime_bytes')} B while stopped); precopy "
                       f"{_f(r.get('precopy_ms'), 0)} ms, QEMU total-time {r.get('qemu_total_time_ms')} ms"
                       + ("" if r.get("went_postcopy", True) else "; **converged in precopy: never went post-copy**"))
            lines.append(f"| {side} #{i + 1} | {_f(r.get('loadavg'))} | {_f(r.get('total_ms'), 0)} | "
                         f"{_f(r.get('downtime_ms'), 1)} | {_f(r.get('guest_verify_ms'), 0)} | "
                         f"{_f(r.get('guest_verify_local_ms'), 0)} | {_f(r.get('postcopy_blocktime_ms'), 0)} | {det} |")
    return lines


def plots(outdir: str, name: str, floors: dict, results: list[dict], hints: dict | None = None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def cdf(ax, samples_ns, label):
        a = np.sort(np.asarray(samples_ns, dtype=np.float64)) / 1000.0
        if len(a) == 0:
            return
        ax.plot(a, np.arange(1, len(a) + 1) / len(a), label=f"{label} (n={len(a)})", drawstyle="steps-post")

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, ps, tag in ((axes[0], 4096, "4k"), (axes[1], HUGE, "2m")):
        for key, label in ((f"c_continue_{tag}", "C handler MINOR+CONTINUE"), (f"c_copy_{tag}", "C handler MISSING+COPY"),
                           (f"py_continue_{tag}", "Python layer CONTINUE"), (f"py_copy_{tag}", "Python layer COPY"),
                           (f"fast_{tag}", "engine fast path (received, unmapped)")):
            if floors.get(key, {}).get("_samples_ns") is not None:
                cdf(ax, floors[key]["_samples_ns"], label)
        if ps == 4096 and floors.get("tcp_pingpong", {}).get("_samples_ns") is not None:
            cdf(ax, floors["tcp_pingpong"]["_samples_ns"], "raw TCP 4 KiB ping-pong")
        for r in results:
            if r.get("ok") and r["page_size"] == ps and r["pattern"] == "random" and r["vcpus"] == 1 \
                    and r["content"] == "typical" and r.get("_lat_ns") is not None and not r.get("link"):
                lat = r["_lat_ns"]
                cdf(ax, lat[lat >= 3000], f"engine demand, {r['placement']}, {r['size'] >> 20} MiB (guest)")
        ax.set_xscale("log")
        ax.set_xlabel("fault round trip / first access (us)")
        ax.set_ylabel("fraction of faults")
        ax.set_title(f"Fault latency CDF, {'4 KiB shmem' if ps == 4096 else '2 MiB hugetlbfs'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(outdir, f"{name}-fault-cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    shown = [r for r in results if r.get("ok") and r.get("_timeline")]
    shown = sorted(shown, key=lambda r: (r["backing"], -r["size"]))[:8]
    if shown:
        cols = 2
        rows = (len(shown) + 1) // 2
        fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows), squeeze=False)
        for ax, r in zip(axes.flat, shown):
            tl = r["_timeline"]
            s = np.asarray(tl["samples"], dtype=np.float64)
            t0 = s[0, 0]   # the first sample is taken at the switchover
            gib = float(1 << 30)
            # (page-cache residency is not plotted: the agent allocates the whole
            # RAM file before the source starts, so it is full from the start)
            ax.plot(s[:, 0] - t0, s[:, 1] / gib, label="mapped in the guest", linestyle="--")
            prog = [e for e in r.get("_dest_events", []) if e.get("event") == "progress"]
            if prog and "t" in prog[0]:
                ps = r["page_size"]
                for kind in ("pages_demand", "pages_pushed", "pages_zero"):
                    if kind in prog[0]:
                        ax.plot([e["t"] - t0 for e in prog], [e[kind] * ps / gib for e in prog], label=kind)
            d = r["dest"]
            ax.set_title(f"{r['scenario']}: {d['pages_demand']} demand, {d['pages_pushed']} pushed, "
                         f"{d['pages_zero']} zero", fontsize=8)
            ax.set_xlabel("s since the switchover")
            ax.set_ylabel("GiB")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(outdir, f"{name}-arrival.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    linked = [r for r in results if r.get("ok") and r.get("link") and r["pattern"] == "random"
              and r.get("_lat_ns") is not None]
    if linked:
        # demand latency over time: the guest's one vCPU touches pages one after
        # another, so the running sum of its first-access times is its clock
        fig, ax = plt.subplots(figsize=(14, 5))
        for r in sorted(linked, key=lambda r: (r["link"], r.get("push_rate", 0))):
            lat = r["_lat_ns"].astype(np.float64)
            t = np.cumsum(lat) / 1e9
            hit = lat >= 3000
            what = f"push held to {r['push_rate'] >> 20} MB/s (link idle)" if r.get("push_rate") else "push running"
            ax.plot(t[hit], lat[hit] / 1000.0, ".", markersize=1.5, alpha=0.5,
                    label=f"{r['link']}: {what} (n={int(hit.sum())}, dest p99 {r['dest'].get('fault_p99_us')} us)")
        ax.set_yscale("log")
        ax.set_xlabel("guest's time in its page accesses (s, running sum of first-access times)")
        ax.set_ylabel("first-access latency of a page the guest waited on (us)")
        ax.set_title("Demand faults over a shaped link, 4 KiB, 1 vCPU, random")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, markerscale=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"{name}-link-demand.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    arrival = (hints or {}).get("_arrival")
    if arrival and "with" in arrival and "without" in arrival:
        files.append(_hints_plot(outdir, name, hints, plt))
    return files


def _hints_plot(outdir: str, name: str, hints: dict, plt) -> str:
    """Pages arrived over time in the hints measurement's passes: all pages
    received (left) and those fetched by demand faults (right), each pass
    ending where its guest finished its work (dotted line)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    for i, pass_ in enumerate(("without", "with", "record")):
        a = hints["_arrival"].get(pass_)
        if not a or not a["samples"]:
            continue
        s = np.asarray(a["samples"], dtype=np.float64)
        label = {"without": "without hints", "with": "with source --hints",
                 "record": "record pass (dest --record-hints)"}[pass_]
        style = dict(color=f"C{i}", linestyle="--" if pass_ == "record" else "-")
        left.plot(s[:, 0], s[:, 1] * a["page_size"] / float(1 << 20), label=label, **style)
        right.plot(s[:, 0], s[:, 2], label=f"{label}: {hints[pass_]['demand_faults']} faults", **style)
        for ax in (left, right):
            ax.axvline(a["guest_s"], color=f"C{i}", linestyle=":", alpha=0.8)
    left.set_ylabel("guest RAM received (MiB)")
    right.set_ylabel("pages fetched by demand faults")
    for ax in (left, right):
        ax.set_xlabel("s since the guest's vCPUs started (dotted: the guest finished its work)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{hints['scenario']}: fault reduction {hints.get('hints_fault_reduction')}, "
                 f"time reduction {hints.get('hints_time_reduction')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(outdir, f"{name}-hints-arrival.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(outdir: str, name: str, doc: dict) -> tuple[str, str]:
    os.makedirs(outdir, exist_ok=True)
    jpath = os.path.join(outdir, f"{name}.json")
    with open(jpath, "w") as f:
        json.dump(public(doc), f, indent=1)
    mpath = os.path.join(outdir, f"{name}.md")
    with open(mpath, "w") as f:
        f.write(markdown(public(doc)))
    return jpath, mpath

"""The pause of a QEMU migration (source QEMU's STOP event to the destination
QEMU's RESUME event) split into the parts that make it up.

Both agents stamp the moments of their switchover with the wall clock
(time.time(), the clock QEMU stamps its QMP events with); the split is made
from those stamps wherever they end up (the benchmark, a person reading the
agents' JSON summaries).

The split is a critical path: the phases are taken in order, and each counts
only the time after the previous phase ended, up to its own end. A phase that
overlaps the one before it (device state sent while QEMU still writes it)
counts only what it adds; time in no phase at all (a QMP reply on its way,
a thread being woken, a poll interval) is the remainder. So the phases and
the remainder add up to the pause exactly.
"""

from __future__ import annotations

PHASES = ("stop", "save", "switch", "transfer", "load", "cont")


def split(pause_start: float, pause_end: float, spans: dict[str, tuple[float, float] | None]) -> dict:
    """{"pause_ms", one key per phase in PHASES (ms, None when that phase was
    not measured), "remainder_ms"}. spans: phase -> (start, end), epoch seconds."""
    out: dict = {"pause_ms": round((pause_end - pause_start) * 1e3, 3)}
    done = pause_start          # the critical path has come this far
    total = 0.0
    for name in PHASES:
        span = spans.get(name)
        if span is None:
            out[f"{name}_ms"] = None
            continue
        start, end = max(span[0], done), min(span[1], pause_end)
        ms = max(0.0, end - start) * 1e3
        out[f"{name}_ms"] = round(ms, 3)
        total += ms
        done = max(done, end)
    out["remainder_ms"] = round(out["pause_ms"] - total, 3)
    return out


def engine_split(stop_time: float, resume_time: float, src: dict, dst: dict) -> dict:
    """This engine's pause from the stamps the source agent (`switchover` in its
    summary) and the destination agent (the same key in its summary) took."""
    def span(a, b):
        return (a, b) if a is not None and b is not None else None

    spans = {
        # STOP is QEMU's event at the end of its own stop: with a stop command
        # (before this engine let QEMU stop the VM itself) this part is its
        # reply reaching the source agent; without, nothing
        "stop": span(stop_time, src.get("stop_done", stop_time)),
        # QEMU writing its device state into the pipe, until its end of file
        "save": span(src.get("migrate_sent"), src.get("save_end")),
        # a pre-copy's final scan and Switch, until the destination feeds
        # the stream to its QEMU (it waits for the switch to commit)
        "switch": span(stop_time, dst.get("switched")),
        # the state crossing to the destination agent and into its QEMU's pipe
        "transfer": span(src.get("send_start"), dst.get("last_chunk")),
        # the destination QEMU loading it, until its migration completed
        "load": span(dst.get("last_chunk"), dst.get("loaded")),
        # cont, until QEMU's RESUME event
        "cont": span(dst.get("cont_sent"), resume_time),
    }
    return split(stop_time, resume_time, spans)


def qemu_split(stop_time: float, resume_time: float, downtime_ms: float | None) -> dict:
    """QEMU post-copy's pause, from what QMP exposes: the STOP event, the
    source's query-migrate `downtime` (7.2: from just before its stop until
    the device state was written to the migration socket, whole ms) and the
    RESUME event. The stop ends at STOP (0 here); save and send are one figure
    (`save`); transfer is not separable on loopback (the destination reads as
    the source writes); the destination's load and its own start (no cont: a
    QEMU destination starts itself after the `run` command) are `load`."""
    spans: dict = {"stop": (stop_time, stop_time), "transfer": None, "cont": None}
    if downtime_ms is not None:
        spans["save"] = (stop_time, stop_time + downtime_ms / 1e3)
        spans["load"] = (stop_time + downtime_ms / 1e3, resume_time)
    else:
        spans["save"] = spans["load"] = None
    return split(stop_time, resume_time, spans)

"""Whether a raw push stream compresses its next batch (`source --compress`).

zstd pays only where the link, not the CPU, holds the push back: a batch
compressed to a ratio R costs the link R of its bytes and the CPU zstd's
time. Each stream decides for itself, batch by batch, from rates it measures
as it goes (C counts the bytes and times zstd; native/src_push.h):

| rate | what |
| --- | --- |
| `raw_rate` | page bytes a second its raw batches moved (the whole call: zero check, copies, the time blocked on a full socket) |
| `zstd_rate` | page bytes a second zstd took them in (zstd's own time) |
| `ratio` | frame bytes over page bytes compressed |
| `zstd_wall_rate` | page bytes a second its compressed batches moved (the whole call) |

- Raw, it starts compressing once `zstd_rate > START x raw_rate` and
  `ratio < KEEP`: a compressed batch still costs what a raw one costs the
  CPU (zero check, copies, TLS, and on a host it shares the destination's
  decompression) besides zstd's own time, and a raw stream held back by the
  CPU (a guest faulting hard takes it) is slow without a slow link, so zstd
  alone must be well ahead: on a 1 Gbit link it is 8x ahead, on 10 Gbit on
  two shared CPUs 1.2-2x (where compressing measured no faster than raw).
- A destination on loopback is never compressed to under `auto`
  (migrate.source.session): there is no link to save.
- Compressing, it goes back to raw when `raw_rate > GAIN x zstd_wall_rate`
  or the pages stop compressing (`ratio >= KEEP`).
- Either way it keeps probing the mode it is not in: one compressed batch
  (zstd's rate and ratio, a few milliseconds), or `RAW_PROBE` raw batches
  (a raw batch right after compressed ones goes into a socket that the link
  keeps full only when the link is the limit). The first probe comes after
  `FIRST_PROBE_S`, the next `PROBE_S` later; each probe that confirms the
  mode doubles the wait (up to `PROBE_MAX_S`: on a slow link raw batches
  are dear), a switch starts again from `PROBE_S`.

Each run also goes raw on its own when its frame would not be smaller than
MG_ZSTD_KEEP_PCT% of its pages (C decides: random or encrypted pages).
"""

from __future__ import annotations

import time

from migrate._binding import ffi, lib

MODES = ("auto", "on", "off")
#: zstd level of the raw push: zstd's fast levels keep the same ratio on guest
#: pages at 2-3x the speed of level 1 (measured: 0.52-0.53 of typical
#: content's non-zero pages at -1, 1 and -3; -1 about twice level 1's speed)
LEVEL = -1


class CompressPolicy:
    """One raw push stream's choice, batch by batch (see the module's
    docstring). Not thread-safe: its stream's thread only."""

    START = 3.0         # zstd's own rate over the raw rate that starts compressing
    GAIN = 1.2          # raw must look this much faster than compressed batches to stop
    KEEP = 0.9          # a ratio at or above this is not worth the CPU
    PROBE_S = 0.5       # how soon the other mode is tried again after a switch
    PROBE_MAX_S = 4.0   # ... and at most after probes that confirmed the mode
    FIRST_PROBE_S = 0.25  # the first zstd probe, once the raw rate has settled
    RAW_PROBE = 4       # raw batches in a probe of raw
    DECAY = 0.2         # weight of the newest batch in the steady mode's rates

    def __init__(self, mode: str, *, now: float | None = None):
        if mode not in MODES:
            raise ValueError(f"--compress {mode!r}: use auto, on or off")
        self.mode = mode
        self.compressing = mode == "on"
        now = time.monotonic() if now is None else now
        self.t_probe = now + self.FIRST_PROBE_S
        self.probing = 0            # batches left in a probe of the other mode
        self.interval = self.PROBE_S
        # (bytes, seconds) decayed sums: raw batches, compressed batches' wall
        # time, zstd's time; the ratio as (frame bytes, page bytes)
        self.raw = [0.0, 0.0]
        self.wall = [0.0, 0.0]
        self.zstd = [0.0, 0.0]
        self.frames = [0.0, 0.0]
        self.switches = 0

    # -- the rates ------------------------------------------------------------
    @staticmethod
    def _rate(acc: list[float]) -> float | None:
        return acc[0] / acc[1] if acc[1] > 0 and acc[0] > 0 else None

    @property
    def raw_rate(self) -> float | None:
        return self._rate(self.raw)

    @property
    def zstd_rate(self) -> float | None:
        return self._rate(self.zstd)

    @property
    def zstd_wall_rate(self) -> float | None:
        return self._rate(self.wall)

    @property
    def ratio(self) -> float | None:
        return self.frames[0] / self.frames[1] if self.frames[1] > 0 else None

    # -- the choice -----------------------------------------------------------
    def next(self, now: float | None = None) -> bool:
        """Whether the next batch is compressed."""
        if self.mode != "auto":
            return self.mode == "on"
        if self.probing:
            return not self.compressing
        now = time.monotonic() if now is None else now
        if now < self.t_probe:
            return self.compressing
        self.t_probe = now + self.interval
        self.probing = self.RAW_PROBE if self.compressing else 1
        # a probe measures afresh what it probes
        if self.compressing:
            self.raw = [0.0, 0.0]
        else:
            self.zstd, self.frames, self.wall = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
        return not self.compressing

    def done(self, compressed: bool, page_bytes: int, seconds: float, zstd_in: int, zstd_out: int,
             zstd_s: float) -> None:
        """What the batch just sent did: its non-zero page bytes, its call's
        seconds, and what zstd took in, gave out and took (0 when raw)."""
        probe = self.probing > 0
        keep = 1.0 if probe else 1.0 - self.DECAY
        if compressed:
            if zstd_in:
                self._add(self.zstd, zstd_in, zstd_s, keep)
                self._add(self.frames, zstd_out, zstd_in, keep)
            if page_bytes:
                self._add(self.wall, page_bytes, seconds, keep)
        elif page_bytes:
            self._add(self.raw, page_bytes, seconds, keep)
        if self.mode != "auto":
            return
        if probe:
            self.probing -= 1
            if self.probing:
                return
        self._decide(probe)

    @staticmethod
    def _add(acc: list[float], n: float, d: float, keep: float) -> None:
        acc[0] = acc[0] * keep + n
        acc[1] = acc[1] * keep + d

    def _decide(self, probe_done: bool) -> None:
        raw, ratio = self.raw_rate, self.ratio
        if ratio is not None and ratio >= self.KEEP:
            want = False
        elif not self.compressing:
            zstd = self.zstd_rate
            want = raw is not None and zstd is not None and ratio is not None and zstd > self.START * raw
        else:
            wall = self.zstd_wall_rate
            want = not (raw is not None and wall is not None and raw > self.GAIN * wall)
        if want != self.compressing:
            self.compressing = want
            self.switches += 1
            self.interval = self.PROBE_S
        elif probe_done:
            self.interval = min(self.PROBE_MAX_S, self.interval * 2)


class StreamStats:
    """What one raw push stream sent, read from its C counters."""

    def __init__(self, st):
        self.st = st                # its struct mg_push_stream (owned by PushStream)
        self.batches = 0
        self.batches_compressed = 0

    def as_dict(self) -> dict:
        st = self.st
        page, wire = int(st.page_bytes), int(st.wire_bytes)
        return {"page_bytes": page, "wire_bytes": wire, "ratio": round(wire / page, 3) if page else None,
                "batches": self.batches, "batches_compressed": self.batches_compressed,
                "runs": int(st.runs), "runs_zstd": int(st.runs_zstd),
                "runs_incompressible": int(st.runs_incompressible),
                "zstd_mb_per_s": round(int(st.zstd_in) / (int(st.zstd_ns) / 1e9) / 1e6, 1) if st.zstd_ns else None}


class PushStream:
    """A raw push stream's C state (struct mg_push_stream: the reused zstd
    context and its buffers) with its policy and counts. close() frees it."""

    def __init__(self, mode: str, zstd: bool):
        """zstd: both ends can (libzstd here, the Welcome offered it); without
        it every batch goes raw whatever the mode."""
        self.policy = CompressPolicy(mode if zstd else "off")
        self.st = ffi.gc(lib.mg_push_stream_new(LEVEL), lib.mg_push_stream_free)
        if self.st == ffi.NULL:
            raise MemoryError("push stream state")
        self.stats = StreamStats(self.st)

    def send(self, fd: int, ram, runs_arr, nruns: int, hold) -> int:
        """mg_push_runs with this batch's choice; its return value."""
        st, pol = self.st, self.policy
        st.compress = 1 if pol.next() else 0
        page0, in0, out0, ns0 = int(st.page_bytes), int(st.zstd_in), int(st.zstd_out), int(st.zstd_ns)
        t0 = time.monotonic()
        rc = lib.mg_push_runs(fd, ram, runs_arr, nruns, hold, st)
        seconds = time.monotonic() - t0
        # (counted even when it failed part way: its bytes are in the counters)
        self.stats.batches += 1
        self.stats.batches_compressed += st.compress
        if rc < 0:
            return rc
        pol.done(bool(st.compress), int(st.page_bytes) - page0, seconds, int(st.zstd_in) - in0,
                 int(st.zstd_out) - out0, (int(st.zstd_ns) - ns0) / 1e9)
        return rc

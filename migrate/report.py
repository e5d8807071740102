"""What a command tells the person or program running it, and the numbers it
reports: `Reporter` (one JSON line per event with --json, else a line of
human text on stderr), percentiles, and the process's CPU time and RSS."""

from __future__ import annotations

import json
import resource
import sys
import threading
import time


class Reporter:
    def __init__(self, as_json: bool = False, name: str = "migrate", quiet: bool = False):
        self.as_json = as_json
        self.name = name
        self.quiet = quiet
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.line = ""           # the live progress line on stderr (a terminal), "" when none is drawn
        self.listeners = []      # called with (event, message, fields) after each event (sd_notify)

    def event(self, event: str, message: str = "", **fields) -> None:
        with self._lock:
            self._clear_line()
            if self.as_json:
                rec = {"event": event, **fields}
                if message:
                    rec["message"] = message
                sys.stdout.write(json.dumps(rec) + "\n")
                sys.stdout.flush()
            elif not self.quiet and not (event == "progress" and self.line):
                # (on a terminal the live line shows progress instead)
                text = message or " ".join(f"{k}={v}" for k, v in fields.items())
                sys.stderr.write(f"[{self.name} {time.monotonic() - self.t0:7.3f}s] {event}: {text}\n")
                sys.stderr.flush()
            self._draw_line()
        for listener in self.listeners:
            listener(event, message, fields)

    def status_line(self, text: str) -> None:
        """Draws text as the live line at the bottom of stderr (a terminal:
        migrate.status.ProgressTicker decides); "" takes it away."""
        with self._lock:
            self._clear_line()
            self.line = text
            self._draw_line()

    def _clear_line(self) -> None:
        if self.line:
            sys.stderr.write("\r\x1b[K")

    def _draw_line(self) -> None:
        if self.line:
            sys.stderr.write(f"\r{self.line}\x1b[K")
        sys.stderr.flush()

    def summary(self, fields: dict, human: str) -> None:
        with self._lock:
            self._clear_line()
            self.line = ""
            if self.as_json:
                sys.stdout.write(json.dumps({"event": "summary", **fields}) + "\n")
                sys.stdout.flush()
            else:
                sys.stdout.write(human.rstrip("\n") + "\n")
                sys.stdout.flush()
        for listener in self.listeners:
            listener("summary", human, fields)


def percentile(sorted_values, q: float) -> float:
    """q in [0, 100]; nearest-rank on an already sorted sequence."""
    if not len(sorted_values):
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return float(sorted_values[k])


def process_usage() -> dict:
    """CPU seconds and peak RSS of this process so far (the agent's own cost)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_user_s": round(ru.ru_utime, 3), "cpu_sys_s": round(ru.ru_stime, 3),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1)}

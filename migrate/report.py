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

    def event(self, event: str, message: str = "", **fields) -> None:
        with self._lock:
            if self.as_json:
                rec = {"event": event, **fields}
                if message:
                    rec["message"] = message
                sys.stdout.write(json.dumps(rec) + "\n")
                sys.stdout.flush()
            elif not self.quiet:
                text = message or " ".join(f"{k}={v}" for k, v in fields.items())
                sys.stderr.write(f"[{self.name} {time.monotonic() - self.t0:7.3f}s] {event}: {text}\n")
                sys.stderr.flush()

    def summary(self, fields: dict, human: str) -> None:
        with self._lock:
            if self.as_json:
                sys.stdout.write(json.dumps({"event": "summary", **fields}) + "\n")
                sys.stdout.flush()
            else:
                sys.stdout.write(human.rstrip("\n") + "\n")
                sys.stdout.flush()


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

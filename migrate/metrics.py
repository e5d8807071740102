"""Prometheus metrics of an agent (`--metrics-listen HOST:PORT`), with
prometheus-client (the optional extra `metrics`). Nothing is counted twice:
each scrape reads the agent's own counters (the C page space's, the source's
senders') through `views()`, a list of per-migration dicts (the status
snapshot of migrate.status, plus `latency`: the demand-latency histogram).

| metric | type | labels |
| --- | --- | --- |
| `migrate_pages_total` | counter | role, session, via (demand, push, zero, prior) |
| `migrate_wire_bytes_total` | counter | role, session |
| `migrate_faults_total` | counter | session, kind (fast, demand) |
| `migrate_demand_latency_seconds` | histogram | session |
| `migrate_migrations` | gauge | role, state |
| `migrate_vcpu_blocked_seconds_total` | counter | session, vcpu, tid |

The endpoint is the agent's TLS: with --tls-* it serves HTTPS and takes only
clients whose certificate the same CA signed (mutual TLS 1.3); plaintext only
on loopback or with --insecure. One connection at a time, each given
METRICS_TIMEOUT s: a peer can make a scrape wait, never the agent.
"""

from __future__ import annotations

import bisect
import socket
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from migrate.errors import MigrateError
from migrate.status import STATES

METRICS_TIMEOUT = 5.0
# demand-latency buckets, seconds (the engine's fault round trip is tens of us
# on loopback, a WAN round trip is ms)
LATENCY_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
                   0.25, 1.0)
_BOUNDS_US = [b * 1e6 for b in LATENCY_BUCKETS]


class MetricsError(MigrateError):
    """--metrics-listen cannot be served."""


class LatencyHistogram:
    """A migration's demand latencies counted into LATENCY_BUCKETS as they
    come: each update() reads only the latencies recorded since the last one
    (a scrape, or the migration's retirement), where a scrape sorted the
    whole ring (a million entries) each time. The C ring keeps the last
    MG_LAT_RING: latencies overwritten before an update read them (more than
    a million faults between two scrapes) are not counted."""

    def __init__(self):
        self.lock = threading.Lock()    # (a scrape and a retirement may update at once)
        self.per_bucket = [0] * (len(LATENCY_BUCKETS) + 1)   # the last: above every bound
        self.sum_us = 0
        self.seen = 0                   # latencies recorded when last read (the C count)

    def update(self, space) -> None:
        """Counts what space (a FaultSpace) recorded since the last update."""
        with self.lock:
            new, self.seen = space.latencies_since(self.seen)
            new.sort()
            below = 0
            for i, bound in enumerate(_BOUNDS_US):
                at = bisect.bisect_right(new, bound)   # (le: a latency equal to a bound is in its bucket)
                self.per_bucket[i] += at - below
                below = at
            self.per_bucket[-1] += len(new) - below
            self.sum_us += sum(new)

    def buckets(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (le, count) buckets and the sum in seconds."""
        with self.lock:
            out, n = [], 0
            for b, c in zip(LATENCY_BUCKETS, self.per_bucket):
                n += c
                out.append((repr(b), n))
            out.append(("+Inf", n + self.per_bucket[-1]))
            return out, self.sum_us / 1e6


class Collector:
    """What a scrape reads: views() -> (role, [migration dicts], {state: ended count})."""

    def __init__(self, views):
        self.views = views

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        role, ms, ended = self.views()
        pages = CounterMetricFamily("migrate_pages", "pages placed (destination) or sent (source), by how they "
                                    "arrived", labels=("role", "session", "via"))
        wire = CounterMetricFamily("migrate_wire_bytes", "bytes on the raw demand and push channels",
                                   labels=("role", "session"))
        faults = CounterMetricFamily("migrate_faults", "guest page faults: fast (page already here) or demand "
                                     "(waited for the source)", labels=("session", "kind"))
        hist = HistogramMetricFamily("migrate_demand_latency_seconds", "a demand fault's wait for its page",
                                     labels=("session",))
        states = GaugeMetricFamily("migrate_migrations", "migrations by state (ended ones counted until the agent "
                                   "exits)", labels=("role", "state"))
        blocked = CounterMetricFamily("migrate_vcpu_blocked_seconds", "time a guest vCPU waited for pages from "
                                      "the source", labels=("session", "vcpu", "tid"))
        count = {s: ended.get(s, 0) for s in STATES}
        for m in ms:
            sid = m["session"]
            count[m["state"]] = count.get(m["state"], 0) + 1
            for via, key in (("demand", "pages_demand"), ("push", "pages_pushed"), ("zero", "pages_zero"),
                             ("prior", "pages_prior")):
                if key in m:
                    pages.add_metric((role, sid, via), m[key])
            wire.add_metric((role, sid), m.get("wire_bytes", 0))
            if role == "dest":
                faults.add_metric((sid, "fast"), m["faults_fast"])
                faults.add_metric((sid, "demand"), m["faults_demand"])
            if m.get("latency") is not None:
                buckets, total = m["latency"]
                hist.add_metric((sid,), buckets, total)
            for v in m.get("vcpus") or ():
                blocked.add_metric((sid, "" if v["vcpu"] is None else str(v["vcpu"]), str(v["tid"])),
                                   v["blocked_s"])
        for state, n in count.items():
            states.add_metric((role, state), n)
        yield from (pages, wire, faults, hist, states, blocked)


class _Handler(BaseHTTPRequestHandler):
    timeout = METRICS_TIMEOUT

    def do_GET(self):   # noqa: N802 (http.server's name)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404, "metrics are at /metrics")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass   # (a scrape is not an event)


class _Server(HTTPServer):
    """One connection at a time; a TLS handshake under the same deadline."""

    def __init__(self, addr, registry, context: ssl.SSLContext | None):
        self.registry = registry
        self.context = context
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)   # (HTTPServer's asks DNS for the host's name)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        conn, peer = self.socket.accept()
        conn.settimeout(METRICS_TIMEOUT)
        if self.context is not None:
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                raise OSError("TLS handshake failed") from None
        return conn, peer

    def handle_error(self, request, client_address):
        pass   # a scraper that went away, or sent garbage: its problem


def _context(tls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """Serves views() at http(s)://HOST:PORT/metrics on a thread of its own."""

    def __init__(self, listen: str, views, tls=None, insecure: bool = False):
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise MetricsError("--metrics-listen needs prometheus-client: pip install 'migrate[metrics]' "
                               "(make install has it)") from None
        from migrate.wire.tcp import parse_address
        from migrate.wire.tls import is_loopback
        try:
            addr = parse_address(listen, "--metrics-listen", "e.g. 127.0.0.1:9464")
        except ValueError as e:
            raise MetricsError(str(e)) from None
        if tls is None and not insecure and not is_loopback(addr.host):
            raise MetricsError(f"--metrics-listen {listen}: plaintext metrics only on loopback; give the --tls-* "
                               "flags (scrapers then need a certificate of the same CA) or --insecure")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(views))
        try:
            self.server = _Server((addr.host, addr.port), registry, _context(tls) if tls else None)
        except OSError as e:
            raise MetricsError(f"--metrics-listen {listen}: {e.strerror or e}") from None
        host, port = self.server.server_address[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls = tls is not None
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""--metrics-listen: a scrape of both agents during a migration and of the
destination after it, checked against the summaries; the TLS rules of the
endpoint and what a hostile client can do to it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client", reason="needs the metrics extra (prometheus-client)")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from migrate.sim.localrun import LocalMigration, Proc  # noqa: E402

M = 1 << 20


def scrape(address: str, context: ssl.SSLContext | None = None) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    scheme = "https" if context else "http"
    body = urllib.request.urlopen(f"{scheme}://{address}/metrics", timeout=10, context=context).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.mark.timeout(120)
def test_metrics_of_both_agents_match_their_summaries(tmp_path, host):
    """Mid-migration both agents serve counters that are under the totals;
    after the migration (serve-forever keeps it) the destination's pages by
    way, faults, wire bytes, demand-latency count and blocked seconds per vCPU
    equal its summary's, and the migration counts as completed."""
    with LocalMigration(str(tmp_path), 256 * M, seed=11, pattern="random", vcpus=2,
                        source_args=("--push-streams", "1", "--max-rate", "40M", "--metrics-listen",
                                     "127.0.0.1:0")) as lm:
        lm.make_image()
        listening = lm.start_dest(("--serve-forever", "--metrics-listen", "127.0.0.1:0"))
        dest_metrics = listening["metrics"]
        before = scrape(dest_metrics)
        assert value(before, "migrate_migrations", role="dest", state="attached") == 0
        lm.start_guest()
        lm.dest.wait_event("attached", 60)
        assert value(scrape(dest_metrics), "migrate_migrations", role="dest", state="attached") == 1
        lm.start_source()
        source_metrics = lm.source.wait_event("metrics", 30)["metrics"]
        while True:
            ev = lm.dest.wait_event("progress", 60)
            if ev["received"] > ev["pages_total"] // 10:
                break
        os.kill(lm.guest.p.pid, signal.SIGSTOP)   # the push goes on, slowly: the migration stays running
        try:
            live = scrape(dest_metrics)
            src = scrape(source_metrics)
        finally:
            os.kill(lm.guest.p.pid, signal.SIGCONT)
        session = ev["session"]
        total = 256 * M // 4096
        assert value(live, "migrate_migrations", role="dest", state="running") == 1
        placed = sum(value(live, "migrate_pages_total", role="dest", session=session, via=v)
                     for v in ("demand", "push", "zero"))
        assert total // 10 < placed < total
        assert value(live, "migrate_faults_total", session=session, kind="demand") > 0
        assert value(live, "migrate_demand_latency_seconds_count", session=session) > 0
        assert value(src, "migrate_migrations", role="source", state="running") == 1
        assert 0 < value(src, "migrate_pages_total", role="source", session=session, via="demand") < total
        assert value(src, "migrate_wire_bytes_total", role="source", session=session) > 0

        done = lm.dest.wait_event("migration", 120)
        assert done["state"] == "complete"
        assert lm.source.wait(60) == 0
        assert lm.guest.wait(60) == 0 and lm.guest.summary()["verified"] is True
        after = scrape(dest_metrics)
        for via, key in (("demand", "pages_demand"), ("push", "pages_pushed"), ("zero", "pages_zero"),
                         ("prior", "pages_prior")):
            assert value(after, "migrate_pages_total", role="dest", session=session, via=via) == done[key]
        assert value(after, "migrate_faults_total", session=session, kind="fast") == done["faults_fast"]
        assert value(after, "migrate_faults_total", session=session, kind="demand") == \
            done["faults"] - done["faults_fast"]
        assert value(after, "migrate_wire_bytes_total", role="dest", session=session) == done["wire_bytes"]
        # every demand fault's wait is in the histogram (fewer than the ring's million)
        assert value(after, "migrate_demand_latency_seconds_count", session=session) == done["demand_requests"]
        assert value(after, "migrate_demand_latency_seconds_bucket", session=session, le="+Inf") == \
            done["demand_requests"]
        assert sorted(v["vcpu"] for v in done["vcpus"]) == [0, 1]
        for v in done["vcpus"]:
            assert v["blocked_s"] > 0
            assert value(after, "migrate_vcpu_blocked_seconds_total", session=session, vcpu=str(v["vcpu"]),
                         tid=str(v["tid"])) == pytest.approx(v["blocked_s"], abs=1e-6)
        assert value(after, "migrate_migrations", role="dest", state="completed") == 1
        assert value(after, "migrate_migrations", role="dest", state="running") == 0


@pytest.mark.timeout(60)
def test_plaintext_metrics_only_on_loopback(tmp_path):
    sock = str(tmp_path / "a" / "attach.sock")
    p = Proc("dest", ["dest", "--listen", "127.0.0.1:0", "--attach", sock, "--metrics-listen", "0.0.0.0:0",
                      "--json"])
    try:
        assert p.wait(30) == 2
    finally:
        p.kill()
    assert p.errors() == ["--metrics-listen 0.0.0.0:0: plaintext metrics only on loopback; give the --tls-* flags "
                          "(scrapers then need a certificate of the same CA) or --insecure"]
    assert not os.path.exists(sock)


@pytest.mark.timeout(90)
def test_metrics_over_mutual_tls_and_a_hostile_client(tmp_path):
    """With --tls-*, metrics are HTTPS and a client needs a certificate of the
    agent's CA; a client that connects and says nothing, or sends garbage,
    delays a scrape by at most the endpoint's deadline."""
    pytest.importorskip("cryptography", reason="needs cryptography for the certificates")
    with LocalMigration(str(tmp_path), 16 * M, tls=True) as lm:
        ev = lm.start_dest(("--metrics-listen", "127.0.0.1:0"))
        addr = ev["metrics"]
        files = lm.tls._files()
        anonymous = ssl.create_default_context(cafile=files["ca"])
        anonymous.check_hostname = False
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(addr, anonymous)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(addr)   # plaintext to an HTTPS endpoint
        client = ssl.create_default_context(cafile=files["ca"])
        client.check_hostname = False
        client.load_cert_chain(files["source"], files["source.key"])
        assert value(scrape(addr, client), "migrate_migrations", role="dest", state="attached") == 0
        host, port = addr.rsplit(":", 1)
        silent = socket.create_connection((host, int(port)))
        garbage = socket.create_connection((host, int(port)))
        garbage.sendall(b"\x16\x03\x01\xff\xff" + os.urandom(512))
        t0 = time.monotonic()
        assert value(scrape(addr, client), "migrate_migrations", role="dest", state="attached") == 0
        assert time.monotonic() - t0 < 15   # (each of the two given at most 5 s)
        silent.close()
        garbage.close()
        assert lm.dest.p.poll() is None

"""Runs `python -m migrate ...` with a TlsConfig given to the agent's
Destination or Source: the benchmark's TLS scenarios and tests/test_tls_raw.py
run their agents through it, until the agents take --tls-cert/--tls-key/
--tls-ca on the command line.

    python raw_tls_agent.py TLS_JSON python -m migrate dest ...

TLS_JSON: the TlsConfig's fields (cert, key, ca, allow, peer_name)."""

from __future__ import annotations

import functools
import json
import runpy
import sys

from migrate.dest.agent import Destination
from migrate.source.session import Source
from migrate.wire.tls import TlsConfig


def _with_tls(cls, cfg: TlsConfig) -> None:
    init = cls.__init__

    @functools.wraps(init)
    def patched(self, *args, **kw):
        kw["tls"] = kw.get("tls") or cfg
        init(self, *args, **kw)

    cls.__init__ = patched


def main() -> None:
    fields = json.loads(sys.argv[1])
    cfg = TlsConfig(fields["cert"], fields["key"], fields["ca"], tuple(fields.get("allow", ())),
                    fields.get("peer_name", ""))
    _with_tls(Destination, cfg)
    _with_tls(Source, cfg)
    rest = sys.argv[2:]
    if rest[1:3] != ["-m", "migrate"]:
        raise SystemExit(f"usage: {sys.argv[0]} TLS_JSON python -m migrate ...")
    sys.argv = ["migrate", *rest[3:]]
    runpy.run_module("migrate", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

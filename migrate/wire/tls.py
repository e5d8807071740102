"""TLS credentials as both agents take them from the command line.

One `TlsConfig` per agent: its own certificate and key, the CA that signs its
peers, and who it accepts (the destination: `--allow-source` names; the
source: the destination's name, from `--to` or `--dest-name`). The gRPC
channel and the plain TCP demand and push channels all use it. `None` in its
place means plaintext, which only loopback or `--insecure` allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TlsConfig:
    cert: str                   # PEM file: this agent's certificate (chain)
    key: str                    # PEM file: its private key
    ca: str                     # PEM file: the CA(s) a peer's certificate must chain to
    # destination: a source's certificate must carry one of these as a DNS SAN
    # (or, without SANs, as its CN); empty: any certificate the CA signed
    allow: tuple[str, ...] = field(default=())
    # source: the name the destination's certificate must carry (`--dest-name`,
    # else the host of `--to`); unused by the destination
    peer_name: str = ""

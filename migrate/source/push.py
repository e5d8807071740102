"""The source's push streams: how much a raw push channel may keep in flight
(sized from the connection's round trip)."""

from __future__ import annotations

import socket

from migrate.wire.tcp import tcp_rtt_us

#: --push-buffer auto: bytes in flight a push stream may keep, sized for this
#: rate over the connection's round trip (between 256 KiB and the kernel's own
#: autotuning, which takes over on longer links).
PUSH_BUFFER_RATE = 10e9
PUSH_BUFFER_MIN = 256 << 10
PUSH_BUFFER_MAX = 4 << 20


def push_send_buffer(sock: socket.socket, want: int | None) -> int | None:
    """Sets the send buffer of a push stream. A multi-megabyte buffer (what
    autotuning grows to) on a short, fast link only queues push data ahead of
    demand replies (on loopback they share one per-CPU backlog) and lets it go
    cold in memory before it is read; a buffer of about rate x RTT keeps the
    link full. want: bytes, 0 for the kernel's autotuning, None for auto (RTT
    based; autotuning when the RTT is unknown or long). Returns what was set
    (None: autotuning)."""
    if want is None:
        rtt = tcp_rtt_us(sock)
        if rtt is None:
            return None
        want = int(PUSH_BUFFER_RATE * rtt * 1e-6)
        if want > PUSH_BUFFER_MAX:
            return None
        want = max(PUSH_BUFFER_MIN, want)
    if want <= 0:
        return None
    # the kernel doubles what it is given (bookkeeping overhead): ask for half
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1, want // 2))
    return want

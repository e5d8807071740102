"""TCP as both agents use it: HOST:PORT addresses, the peer timeout every
channel sets, and what the kernel's tcp_info says about a connection.

The demand and push channels are plain TCP beside gRPC (proto/README.md);
whatever one side needs to know about such a socket is read here, once."""

from __future__ import annotations

import enum
import errno
import socket
from dataclasses import dataclass

from migrate.errors import PEER_LOST_ERRNOS

# struct tcp_info (include/uapi/linux/tcp.h): the fields read here, by byte
# offset. The layout only grows at its end, so these hold on every kernel that
# has TCP_INFO; a shorter answer (an old kernel) reads as "unknown".
_TCP_INFO_LEN = 104
_LAST_DATA_RECV = 52    # __u32 tcpi_last_data_recv, ms since data last arrived
_RTT = 68               # __u32 tcpi_rtt, smoothed round trip, us
_BYTES_RECEIVED = 128   # __u64 tcpi_bytes_received (Linux 4.1+)


@dataclass(frozen=True)
class Address:
    """A HOST:PORT as the command line and the events spell it. `host` has no
    brackets ("::1", not "[::1]"); str() gives them back."""
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, flag: str, example: str) -> Address:
    """HOST:PORT, or ValueError naming the flag and an example to follow."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag} {text!r}: use HOST:PORT, {example}")
    return Address(host.strip("[]"), int(port))


def host_of(text: str) -> str:
    """The host part of a HOST:PORT already checked (or given) by an agent."""
    return text.rpartition(":")[0].strip("[]")


def set_peer_timeout(sock: socket.socket, seconds: float) -> None:
    """Makes the kernel give up on a peer that acknowledges nothing for about
    `seconds`: data left unacknowledged that long (TCP_USER_TIMEOUT) or, on a
    quiet connection, keepalive probes left unanswered. A peer whose host died
    or whose network split then ends the channel with ETIMEDOUT (or the
    network's own error) instead of TCP retrying for a quarter of an hour, or,
    on a channel with nothing to send, waiting for ever. A peer whose process
    hangs on a live host still acknowledges: that the caller has to notice.
    seconds <= 0 leaves the kernel's defaults."""
    if seconds <= 0:
        return
    idle = max(1, int(seconds / 2))
    interval = max(1, int(seconds / 4))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, -(-int(seconds - idle) // interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


def _tcp_info_u32(sock: socket.socket, offset: int) -> int | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(info[offset:offset + 4], "little") if len(info) >= offset + 4 else None


def tcp_silent_s(sock: socket.socket) -> float | None:
    """Seconds since the kernel last received data on a TCP socket; None where
    it cannot be read."""
    ms = _tcp_info_u32(sock, _LAST_DATA_RECV)
    return None if ms is None else ms / 1e3


def tcp_bytes_received(sock: socket.socket) -> int:
    """Bytes the kernel received on a TCP socket, TLS records and headers of
    the channel included (what crossed the wire as payload); 0 where it cannot
    be read (a closed socket, an old kernel)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_RECEIVED + 8)
    except (OSError, AttributeError):
        return 0
    end = _BYTES_RECEIVED + 8
    return int.from_bytes(info[_BYTES_RECEIVED:end], "little") if len(info) >= end else 0


def tcp_rtt_us(sock: socket.socket) -> int | None:
    """The kernel's smoothed round-trip time of a connected TCP socket, in
    microseconds; None where it cannot be read."""
    return _tcp_info_u32(sock, _RTT)


class ChannelEnd(enum.Enum):
    """How a plain TCP channel (demand or push) ended, from the return code of
    the C loop that served it (>= 0, or -errno)."""
    CLOSED = "closed"          # the peer closed or reset it, or we shut it down: an ordinary end
    PEER_LOST = "peer-lost"    # the kernel gave up on the peer: its host or the network went silent
    FAILED = "failed"          # anything else: a local failure, for the caller to raise


# The peer closed (EOF), reset the connection or went away mid-write, or this
# side shut the socket down to stop its loop: all are the channel ending, not
# a failure of this agent.
_CLOSED_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN))


def channel_end(rc: int) -> ChannelEnd:
    """The one place a channel loop's return code becomes an outcome."""
    if rc >= 0 or -rc in _CLOSED_ERRNOS:
        return ChannelEnd.CLOSED
    if -rc in PEER_LOST_ERRNOS:
        return ChannelEnd.PEER_LOST
    return ChannelEnd.FAILED


# -- sharing a bottleneck: demand ahead of push -------------------------------
# What the demand channel carries is urgent: a vCPU waits on each reply. Two
# marks say so. SO_PRIORITY (skb->priority) is what a qdisc on this host reads
# (prio's priomap, mqprio's map, an htb filter); 6 is TC_PRIO_INTERACTIVE, the
# highest a socket may set without CAP_NET_ADMIN, which the default priomap
# puts in band 0. The DSCP (EF, 46) travels in the IP header to every hop
# after this one. docs/links.md shows the tc setups that make them count.
URGENT_PRIORITY = 6
DSCP_EF = 46
_TOS_EF = DSCP_EF << 2        # the DSCP is the top six bits of the TOS byte
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_BYTES_ACKED = 120            # __u64 tcpi_bytes_acked
_PACING_UNLIMITED = (1 << 64) - 1


def mark_urgent(sock: socket.socket) -> None:
    """Marks a TCP socket's packets urgent: DSCP EF, then SO_PRIORITY (in that
    order: setting the TOS also rewrites the socket's priority)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _TOS_EF)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, _TOS_EF)   # (v4-mapped peers of an AF_INET6 socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, URGENT_PRIORITY)


def set_max_pacing_rate(sock: socket.socket, rate: int | None) -> None:
    """Caps what the kernel sends on a TCP socket at `rate` bytes a second
    (TCP's own pacing, or fq's); None lifts the cap."""
    value = _PACING_UNLIMITED if rate is None else max(1, int(rate))
    sock.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, value.to_bytes(8, "little"))


def max_pacing_rate(sock: socket.socket) -> int | None:
    """The socket's pacing cap in bytes a second; None when it has none."""
    value = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, 8).ljust(8, b"\0"), "little")
    return None if value in (_PACING_UNLIMITED, 0xFFFFFFFF) else value   # (~0U: a 32-bit answer)


def set_notsent_lowat(sock: socket.socket, nbytes: int) -> None:
    """Lets a writer keep at most about `nbytes` not yet sent in the socket:
    what waits there is committed, and keeping it short keeps the pages the
    scheduler picks next close to what the guest asked for last."""
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, int(nbytes))


def tcp_app_limited(sock: socket.socket) -> bool | None:
    """Whether the kernel's latest delivery-rate sample of a TCP socket was
    limited by the application (it did not keep the path full) rather than by
    the network; None where it cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, AttributeError):
        return None
    return bool(info[7] & 1) if len(info) >= 8 else None   # tcpi_delivery_rate_app_limited:1, byte 7


def tcp_bytes_acked(sock: socket.socket) -> int | None:
    """Bytes the peer acknowledged on a TCP socket so far; None where it
    cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_ACKED + 8)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(info[_BYTES_ACKED:_BYTES_ACKED + 8], "little") if len(info) >= _BYTES_ACKED + 8 else None

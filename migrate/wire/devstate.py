"""The device-state channel: QEMU's migration stream (device state only,
with x-ignore-shared) from the source QEMU to the destination QEMU, beside
the session's other raw channels (proto/README.md).

The source opens it right after Open, with the session's token (DEVSTATE_MAGIC
+ token, the demand and push channels' hello), before its QEMU stops. The
destination answers in words (below): `ready` once its QEMU waits in
migrate-incoming on the channel, or `refused` with why; then, once its QEMU
has loaded the state, `ack` (whether the guest runs there). What flows in
between, source to destination:
- plaintext (loopback, --insecure): QEMU's stream itself. The source agent
  hands the connected socket to its QEMU (getfd, `migrate fd:`), which
  writes into it as QEMU-to-QEMU does; the destination splices it into its
  QEMU's incoming pipe (native/devstate.c), counting every byte.
- TLS: QEMU's stream in frames inside the channel's TLS session, relayed in C
  (native/devstate.c) between each QEMU's pipe and the session.

A word: WORD_MAGIC, a 4-byte big-endian length, that many bytes of a JSON
object, at most MAX_WORD. Only the destination says words; the source reads
them with a deadline.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from migrate.errors import ProtocolError

WORD_MAGIC = b"MGDS"
MAX_WORD = 4096
_HEADER = struct.Struct("!4sI")


def say(sock: socket.socket, **word) -> None:
    data = json.dumps(word).encode()[:MAX_WORD]
    sock.sendall(_HEADER.pack(WORD_MAGIC, len(data)) + data)


def _exact(sock: socket.socket, n: int, deadline: float | None, give_up) -> bytes:
    buf = b""
    while len(buf) < n:
        if deadline is None:
            sock.settimeout(0.1)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(min(left, 0.1))
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            give_up()
            continue
        if not chunk:
            raise ConnectionError("the destination closed the device-state channel")
        buf += chunk
    return buf


def hear(sock: socket.socket, deadline: float | None = None, give_up=lambda: None) -> dict:
    """The destination's next word (deadline: time.monotonic(); None: none).
    give_up() is called every 0.1 s of waiting and may raise to end the wait.
    TimeoutError, ConnectionError (OSError), or ProtocolError for a word that
    is not one."""
    magic, n = _HEADER.unpack(_exact(sock, _HEADER.size, deadline, give_up))
    if magic != WORD_MAGIC or n > MAX_WORD:
        raise ProtocolError(f"the destination said something that is no device-state channel word "
                            f"({magic!r}, {n} bytes)")
    try:
        word = json.loads(_exact(sock, n, deadline, give_up))
    except ValueError:
        word = None
    if not isinstance(word, dict):
        raise ProtocolError("the destination's device-state channel word is not a JSON object")
    return word

"""The other end of the raw TCP floors, run as its own process.

  tcp_peer.py pong REQUEST REPLY   answer every REQUEST-byte message with REPLY bytes
  tcp_peer.py sink CHUNK [RING]    read until EOF with recv_into, CHUNK at a time
                                   into RING bytes in turn (default CHUNK), then
                                   print {"bytes", "seconds"} (first byte to EOF)

Prints the listening port on its first stdout line.
"""

import json
import socket
import sys
import time


def main() -> int:
    mode = sys.argv[1]
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "pong":
        req, rep = int(sys.argv[2]), int(sys.argv[3])
        reply = b"p" * rep
        buf = bytearray(req)
        view = memoryview(buf)
        while True:
            got = 0
            while got < req:
                k = c.recv_into(view[got:])
                if not k:
                    return 0
                got += k
            c.sendall(reply)
    chunk = int(sys.argv[2])
    ring = max(chunk, int(sys.argv[3]) // chunk * chunk if len(sys.argv) > 3 else chunk)
    view = memoryview(bytearray(b"\1") * ring)    # written through: no page faults while timed
    n = c.recv_into(view[:chunk])
    t0 = time.perf_counter()
    total, off = n, n % ring
    while n:
        n = c.recv_into(view[off:min(off + chunk, ring)])
        total += n
        off = (off + n) % ring
    seconds = time.perf_counter() - t0
    print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A guest for the hint tests: attaches to a destination agent, reads the
pages it is told to in that order (one read each, through C; optionally
pausing after each, as a guest that works between touches), then waits
until the agent says the migration is over (the attach socket's EOF) and
prints what it read as JSON."""

import hashlib
import json
import sys
import time

from migrate._binding import ffi, lib
from migrate.memory import GuestMemory
from migrate.uffd import Userfaultfd
from migrate.wire.attach import Region, attach_guest


def main():
    sock_path, size, pages = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0   # seconds of "work" after each read
    mem = GuestMemory.create("tmpfs", size, name="touch", map_alias=False)
    uffd = Userfaultfd.create()
    sock = attach_guest(sock_path, uffd.fd, mem.fd, page_size=mem.page_size, ram_size=size,
                        regions=[Region(mem.guest_addr, size, 0)], backing="tmpfs", timeout=60)
    buf = ffi.new("char[]", mem.page_size)
    digests = {}
    for p in pages:
        lib.mg_read_bytes(mem.guest_addr + p * mem.page_size, buf, mem.page_size)
        digests[p] = hashlib.sha256(ffi.buffer(buf)).hexdigest()
        time.sleep(pause)
    sock.settimeout(120)
    while sock.recv(4096):   # the agent's notices, then EOF once complete
        pass
    print(json.dumps({"digests": digests}), flush=True)
    sock.close()
    uffd.close()
    mem.close()


if __name__ == "__main__":
    main()

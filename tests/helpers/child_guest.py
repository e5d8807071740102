"""A guest in another process for the cross-process tests: creates the memory
and the userfaultfd, attaches to the test (the agent), then reads the pages it
is told to (through C, one read per page) and prints what it read as JSON."""

import hashlib
import json
import sys

from migrate._binding import ffi, lib
from migrate.memory import GuestMemory
from migrate.uffd import Userfaultfd
from migrate.wire.attach import Region, attach_guest


def main():
    sock_path, backing, size, pages = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    mem = GuestMemory.create(backing, size, name="child", map_alias=False)
    uffd = Userfaultfd.create()
    sock = attach_guest(sock_path, uffd.fd, mem.fd, page_size=mem.page_size, ram_size=size,
                        regions=[Region(mem.guest_addr, size, 0)], backing=backing, timeout=30)
    buf = ffi.new("char[]", mem.page_size)
    digests = {}
    for p in pages:
        lib.mg_read_bytes(mem.guest_addr + p * mem.page_size, buf, mem.page_size)
        digests[p] = hashlib.sha256(ffi.buffer(buf)).hexdigest()
    print(json.dumps({"digests": digests}), flush=True)
    sock.close()
    uffd.close()
    mem.close()


if __name__ == "__main__":
    main()

"""cffi builder for migrate._native (out-of-line API mode).

The declarations cffi needs live in the headers beside the C, between
`/* cdef-begin */` and `/* cdef-end */`, one header per concept, beside its
C file. What a header declares outside that block is for the other C files
only (inline helpers, the structs the receivers and senders share).
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# In dependency order (a header's cdefs may use the structs of those before it).
# Below: what is shared, the wire, the destination's side, the source's side,
# the simulated guest.
CONCEPTS = ["version", "uffd", "mem", "scm", "bitmap",
            "wire", "tls", "zstd", "devstate",
            "dest_space", "dest_demand", "dest_push", "dest_alloc", "dest_precopy",
            "src_ram", "src_demand", "src_push", "src_wp",
            "pattern", "guestsim"]
HEADERS = [f"{c}.h" for c in CONCEPTS]
SOURCES = [f"{c}.c" for c in CONCEPTS]


def _cdef(header):
    with open(os.path.join(HERE, header)) as f:
        text = f.read()
    m = re.search(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{header}: no cdef-begin/cdef-end block")
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef("\n".join(_cdef(h) for h in HEADERS))
ffibuilder.set_source(
    "migrate._native",
    "\n".join(f'#include "{h}"' for h in HEADERS),
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["pthread", "dl"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

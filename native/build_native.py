"""cffi builder for migrate._native (out-of-line API mode).

The declarations cffi needs live in the headers beside the C, between
`/* cdef-begin */` and `/* cdef-end */`, one header per kernel concept.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = ["version.h", "uffd.h", "mem.h", "scm.h", "fault.h", "pattern.h", "guestsim.h"]
SOURCES = ["version.c", "uffd.c", "mem.c", "scm.c", "fault.c", "pattern.c", "guestsim.c"]


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
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""Working-set hint files: the order in which a guest first touched its pages
(written by `dest --record-hints FILE`), replayed by `source --hints FILE`,
which pushes those pages first. Shared by both sides; imports neither.

Format (little-endian):

    magic    8 bytes  b"MGHINTS\\n"
    version  u32      1
    reserved u32      0
    page     u64      page size in bytes
    npages   u64      pages in the RAM layout
    layout   16 bytes RAM-layout fingerprint (layout_fingerprint)
    count    u64      entries (at most npages)
    length   u64      bytes of body that follow (exactly)
    body     zstd of the entries as varints: the first page, then each next
             page's zigzag delta from the one before

A hint file is input from disk: its every field is checked before anything is
allocated for it, decompression is capped by what `count` allows, and every
entry must be a page of the layout, named once.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct

import zstandard

from migrate.errors import MigrateError

MAGIC = b"MGHINTS\n"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ16sQQ")
HEADER_SIZE = _HEADER.size
MAX_VARINT = 10                       # bytes a 64-bit varint can take


class HintsError(MigrateError):
    """A hint file that cannot be used: the message says what and what to do."""


def layout_fingerprint(page_size: int, npages: int) -> bytes:
    """What both agents agree the RAM is (Hello.page_size, Hello.ram_size),
    hashed: a header whose size fields were altered no longer matches it."""
    return hashlib.blake2b(f"migrate-ram-layout:{page_size}:{npages}".encode(), digest_size=16).digest()


def encode(pages: list[int], page_size: int, npages: int) -> bytes:
    """The hint file for pages (first touches, in order; each at most once)."""
    body = bytearray()
    prev = 0
    for p in pages:
        d = p - prev
        z = d << 1 if d >= 0 else (-d << 1) - 1    # zigzag: small either way
        while z >= 0x80:
            body.append((z & 0x7F) | 0x80)
            z >>= 7
        body.append(z)
        prev = p
    comp = zstandard.ZstdCompressor(level=3).compress(bytes(body))
    return _HEADER.pack(MAGIC, VERSION, 0, page_size, npages, layout_fingerprint(page_size, npages),
                        len(pages), len(comp)) + comp


def write(path: str, pages: list[int], page_size: int, npages: int) -> int:
    """Writes the hint file atomically (a temporary beside it, then rename).
    Returns its size in bytes."""
    data = encode(pages, page_size, npages)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def decode(data: bytes, page_size: int, npages: int, what: str = "hint file") -> list[int]:
    """The pages of a hint file for a RAM of npages pages of page_size bytes,
    in order. Raises HintsError saying what is wrong."""
    again = "record it again with `migrate dest --record-hints FILE` on a migration of this guest, " \
            "or run the source without --hints"
    if len(data) < HEADER_SIZE:
        raise HintsError(f"{what}: truncated, {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header; {again}")
    magic, version, _, f_page, f_npages, fp, count, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HintsError(f"{what}: not a hint file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise HintsError(f"{what}: version {version}, this build reads version {VERSION}; {again}")
    if f_page != page_size or f_npages != npages:
        raise HintsError(f"{what} was recorded for another RAM layout: {f_npages} pages of {f_page} bytes, "
                         f"this source serves {npages} pages of {page_size} bytes; {again}")
    if fp != layout_fingerprint(page_size, npages):
        raise HintsError(f"{what}: its RAM-layout fingerprint {fp.hex()} does not match this RAM's "
                         f"{layout_fingerprint(page_size, npages).hex()} (the header was altered); {again}")
    if count > npages:
        raise HintsError(f"{what}: names {count} pages, more than the {npages} the RAM has; {again}")
    if len(data) - HEADER_SIZE != length:
        raise HintsError(f"{what}: its header promises {length} bytes of entries but {len(data) - HEADER_SIZE} "
                         f"follow (truncated or padded); {again}")
    cap = count * MAX_VARINT
    try:
        # the cap is ours, not the frame header's: at most count varints
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[HEADER_SIZE:])) as r:
            body = r.read(cap + 1) if length else b""
    except zstandard.ZstdError as e:
        raise HintsError(f"{what}: its entries do not decompress ({e}); {again}") from None
    if len(body) > cap:
        raise HintsError(f"{what}: {len(body)} bytes of entries, more than {count} entries can take; {again}")
    pages: list[int] = []
    seen = bytearray((npages + 7) // 8)
    prev = i = 0
    while i < len(body):
        z = shift = 0
        while True:
            if i >= len(body) or shift > 63:
                raise HintsError(f"{what}: entry {len(pages)} is cut short or too long; {again}")
            b = body[i]
            i += 1
            z |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        p = prev + ((z >> 1) ^ -(z & 1))
        if not 0 <= p < npages:
            raise HintsError(f"{what}: entry {len(pages)} names page {p}, outside the RAM's {npages} pages; {again}")
        if seen[p >> 3] & (1 << (p & 7)):
            raise HintsError(f"{what}: entry {len(pages)} names page {p} a second time; {again}")
        seen[p >> 3] |= 1 << (p & 7)
        pages.append(p)
        prev = p
    if len(pages) != count:
        raise HintsError(f"{what}: holds {len(pages)} entries, its header says {count}; {again}")
    return pages


def read(path: str, page_size: int, npages: int) -> list[int]:
    """decode() of the file at path, read with a bound: no more than the
    largest file npages entries can make."""
    limit = HEADER_SIZE + 64 + 2 * npages * MAX_VARINT + 1024
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise HintsError(f"hint file {path}: cannot read it ({e.strerror})") from None
    if len(data) > limit:
        raise HintsError(f"hint file {path}: larger than {limit} bytes, more than any hint file for "
                         f"{npages} pages can be; it is not one for this RAM")
    return decode(data, page_size, npages, f"hint file {path}")

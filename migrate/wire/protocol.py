"""The wire protocol's rules in code: version, limits, gRPC channel options,
PageBatch encoding, and the magics that open the plain TCP channels.
proto/migration.proto is the contract; proto/README.md shows the sequence."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import zstandard

from migrate._binding import ffi, lib
from migrate.errors import ProtocolError
from migrate.proto import migration_pb2 as pb

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 << 20
DEFAULT_BATCH_BYTES = 1 << 20
MIN_BATCH_BYTES = 256 << 10
ZSTD_LEVEL = -3   # zstd's fast levels: same ratio on guest pages here, ~3x the speed of level 1
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.http2.lookahead_bytes", 8 << 20),
    ("grpc.http2.bdp_probe", 1),
]


def channel(target: str, purpose: str, tls=None) -> grpc.Channel:
    """A channel with its own TCP connection: demand traffic never queues behind
    bulk pushes in the same connection (QEMU's preempt channel, in gRPC terms).
    tls: a migrate.wire.tls.TlsConfig for mutual TLS; None: plaintext."""
    options = CHANNEL_OPTIONS + [
        ("grpc.use_local_subchannel_pool", 1),
        ("migrate.purpose", purpose),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.channel_credentials(), options=options + tls.channel_options(target))


class BatchEncoder:
    """Builds PageBatch messages from a read-only RAM mapping (source side).
    One per stream thread: it reuses its gather buffer and zstd context."""

    def __init__(self, base_addr: int, page_size: int, max_pages: int, compress: bool = True,
                 holes=ffi.NULL, holes_end=ffi.NULL, hole_count=None):
        self.base = base_addr
        # pages known zero without reading: a page bitmap, final below *holes_end
        self.holes, self.holes_end = holes, holes_end
        self.hole_count = hole_count if hole_count is not None else ffi.new("uint64_t *")   # (uint64_t *)
        self.ps = page_size
        self.max_pages = max_pages
        self.buf = bytearray(max_pages * page_size)
        self.cbuf = ffi.from_buffer(self.buf)
        self.view = memoryview(self.buf)
        self.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else None

    def encode(self, pages: list[int], session_id: str = "") -> pb.PageBatch:
        n = len(pages)
        if n > self.max_pages:
            raise ValueError(f"batch of {n} pages exceeds the encoder's {self.max_pages}")
        zero = bytearray((n + 7) // 8)
        raw_len = lib.mg_gather_pages(self.base, self.ps, ffi.new("uint64_t[]", pages), n, self.cbuf,
                                      ffi.from_buffer(zero), self.holes, self.holes_end,
                                      self.hole_count)
        raw = self.view[:raw_len]
        comp = pb.COMPRESSION_NONE
        data = None
        if self.cctx is not None and raw_len:
            z = self.cctx.compress(raw)
            if len(z) < raw_len * 0.95:  # not worth the receiver's time otherwise
                data, comp = z, pb.COMPRESSION_ZSTD
        if data is None:
            data = bytes(raw)
        return pb.PageBatch(session_id=session_id, pages=pages, zero=bytes(zero),
                            compression=comp, data=data, raw_length=raw_len)


@dataclass
class DecodedBatch:
    pages: list[int]
    zero: bytes             # bit i (LSB first) set: pages[i] is a zero page
    data: bytes             # the non-zero pages, in order
    nonzero: int


class BatchDecoder:
    """Checks and unpacks PageBatch messages (destination side)."""

    def __init__(self, npages: int, page_size: int):
        self.npages = npages
        self.ps = page_size
        self._local = threading.local()  # a zstd context is not thread-safe: one per stream thread

    @property
    def dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def decode(self, b: pb.PageBatch) -> DecodedBatch:
        pages = b.pages
        n = len(pages)
        if len(b.zero) != (n + 7) // 8:
            raise ProtocolError(f"batch of {n} pages carries a zero bitmap of {len(b.zero)} bytes, "
                                f"expected {(n + 7) // 8}")
        if n and max(pages) >= self.npages:
            bad = next(p for p in pages if p >= self.npages)
            raise ProtocolError(f"batch names page {bad}, outside the layout of {self.npages} pages "
                                f"of {self.ps} bytes")
        zero_bits = int.from_bytes(b.zero, "little") & ((1 << n) - 1)
        nonzero = n - zero_bits.bit_count()
        want = nonzero * self.ps
        if b.raw_length != want:
            raise ProtocolError(f"batch declares {b.raw_length} bytes for {nonzero} non-zero pages of "
                                f"{self.ps} bytes (expected {want}): truncated or corrupt")
        if b.compression == pb.COMPRESSION_ZSTD:
            try:
                data = self.dctx.decompress(b.data, max_output_size=want)
            except zstandard.ZstdError as e:
                raise ProtocolError(f"batch of {n} pages: zstd data does not decompress: {e}") from None
        elif b.compression == pb.COMPRESSION_NONE:
            data = b.data
        else:
            raise ProtocolError(f"batch uses unknown compression {b.compression}")
        if len(data) != want:
            raise ProtocolError(f"batch of {nonzero} non-zero pages carries {len(data)} bytes after "
                                f"decompression, expected {want}: truncated or corrupt")
        return DecodedBatch(list(pages), zero_bits.to_bytes((n + 7) // 8, "little"), data, nonzero)


DEMAND_MAGIC = b"MGDEMAND"   # opens the demand channel
PUSH_MAGIC = b"MGPUSH\0\0"   # opens a raw push channel
DEMAND_TOKEN_BYTES = 16

"""The wire protocol's rules in code: version, limits, and PageBatch encoding.

proto/migration.proto is the contract; proto/README.md shows the sequence.
Encoding decides zero pages (flags only) and compression; decoding checks every
field against the layout before a single byte reaches guest memory.
"""

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
ZSTD_LEVEL = 1

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.http2.lookahead_bytes", 8 << 20),
    ("grpc.http2.bdp_probe", 1),
]


def channel(target: str, purpose: str) -> grpc.Channel:
    """A channel with its own TCP connection: demand traffic never queues behind
    bulk pushes in the same connection (QEMU's preempt channel, in gRPC terms)."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS + [
        ("grpc.use_local_subchannel_pool", 1),
        ("migrate.purpose", purpose),
    ])


class BatchEncoder:
    """Builds PageBatch messages from a read-only RAM mapping (source side)."""

    def __init__(self, ram_view: memoryview, base_addr: int, page_size: int, compress: bool = True):
        self.ram = ram_view
        self.base = base_addr
        self.ps = page_size
        self.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else None

    def encode(self, pages: list[int], session_id: str = "", compress: bool = True) -> pb.PageBatch:
        ps = self.ps
        flags = bytearray((len(pages) + 7) // 8)
        parts = []
        # consecutive non-zero pages are sent as one slice: no per-page copy
        run_start = run_end = None
        for i, p in enumerate(pages):
            if lib.mg_is_zero(ffi.cast("void *", self.base + p * ps), ps):
                flags[i >> 3] |= 1 << (i & 7)
                continue
            if run_end == p:
                run_end = p + 1
            else:
                if run_start is not None:
                    parts.append(self.ram[run_start * ps:run_end * ps])
                run_start, run_end = p, p + 1
        if run_start is not None:
            parts.append(self.ram[run_start * ps:run_end * ps])
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        raw_len = len(raw)
        comp = pb.COMPRESSION_NONE
        data = bytes(raw) if raw_len else b""
        if compress and self.cctx is not None and raw_len:
            z = self.cctx.compress(raw)
            if len(z) < raw_len * 0.95:  # not worth the receiver's time otherwise
                data, comp = z, pb.COMPRESSION_ZSTD
        return pb.PageBatch(session_id=session_id, pages=pages, zero=bytes(flags),
                            compression=comp, data=data, raw_length=raw_len)


@dataclass
class DecodedBatch:
    pages: list[int]
    zero: list[int]         # 1 = zero page
    offsets: list[int]      # offset of each page's bytes in data (0 for zero pages)
    data: bytes
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
        pages = list(b.pages)
        n = len(pages)
        if len(b.zero) != (n + 7) // 8:
            raise ProtocolError(f"batch of {n} pages carries a zero bitmap of {len(b.zero)} bytes, "
                                f"expected {(n + 7) // 8}")
        for p in pages:
            if p >= self.npages:
                raise ProtocolError(f"batch names page {p}, outside the layout of {self.npages} pages "
                                    f"of {self.ps} bytes")
        zf = b.zero
        zero = [(zf[i >> 3] >> (i & 7)) & 1 for i in range(n)]
        nonzero = n - sum(zero)
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
        offsets = []
        off = 0
        for z in zero:
            offsets.append(0 if z else off)
            if not z:
                off += self.ps
        return DecodedBatch(pages, zero, offsets, data, nonzero)

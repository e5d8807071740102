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
ZSTD_MAX_WINDOW = 1 << 23   # window for a zstd frame that does not state its size
ZSTD_LEVEL = -3   # zstd's fast levels: same ratio on guest pages here, ~3x the speed of level 1
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.http2.lookahead_bytes", 8 << 20),
    ("grpc.http2.bdp_probe", 1),
]


# What the destination's server takes in one message: a batch of the default
# size is 1 MiB before compression, a device state chunk 256 KiB. gRPC holds a
# whole message, and protobuf parses a page list to 8 bytes a page, before any
# handler can look at it: this bounds both.
MAX_REQUEST = 16 << 20
SERVER_OPTIONS = [(k, MAX_REQUEST if k == "grpc.max_receive_message_length" else v) for k, v in CHANNEL_OPTIONS]


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
    """Checks and unpacks PageBatch messages (destination side). Every count and
    length is checked against the layout and the batch cap before a byte is
    reserved for it, and zstd output is bounded by what the batch's pages may
    hold, whatever its frame header says."""

    def __init__(self, npages: int, page_size: int):
        self.npages = npages
        self.ps = page_size
        # the most page bytes one batch may carry: what fits a message, or one page
        self.max_bytes = max(MAX_MESSAGE, page_size)
        self.max_pages = self.max_bytes // page_size
        self._local = threading.local()  # a zstd context is not thread-safe: one per stream thread

    @property
    def dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            # a frame that does not state its size gets at most this window
            # (the decoder allocates it); migrate's encoder states the size
            d = self._local.dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        return d

    def decode(self, b: pb.PageBatch) -> DecodedBatch:
        n = len(b.pages)
        if n > self.max_pages:
            raise ProtocolError(f"batch of {n} pages is larger than the {self.max_pages} pages of {self.ps} "
                                f"bytes a batch may carry: send smaller batches (--batch-bytes)")
        if len(b.zero) != (n + 7) // 8:
            raise ProtocolError(f"batch of {n} pages carries a zero bitmap of {len(b.zero)} bytes, "
                                f"expected {(n + 7) // 8}")
        pages = list(b.pages)
        _check_ascending(pages)
        if n and pages[-1] >= self.npages:
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
            data = self._decompress(b.data, n, want)
        elif b.compression == pb.COMPRESSION_NONE:
            data = b.data
        else:
            raise ProtocolError(f"batch uses unknown compression {b.compression}")
        if len(data) != want:
            raise ProtocolError(f"batch of {nonzero} non-zero pages carries {len(data)} bytes after "
                                f"decompression, expected {want}: truncated or corrupt")
        return DecodedBatch(pages, zero_bits.to_bytes((n + 7) // 8, "little"), data, nonzero)

    def _decompress(self, data: bytes, n: int, want: int) -> bytes:
        """At most want + 1 bytes of data's zstd frames (one more than the batch
        may hold shows it lied). A frame header stating any other size is
        refused before anything is allocated: zstandard would otherwise
        allocate what the header states, max_output_size or not."""
        try:
            stated = zstandard.frame_content_size(data)
        except zstandard.ZstdError:
            raise ProtocolError(f"batch of {n} pages: zstd data does not decompress: error determining "
                                "content size from frame header") from None
        try:
            if stated != -1 and stated != want:
                raise ProtocolError(f"batch of {n} pages: zstd frame states {stated} bytes, but the batch's "
                                    f"non-zero pages are {want} bytes: refused before decompressing")
            out = self.dctx.stream_reader(data, read_across_frames=True).read(want + 1)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"batch of {n} pages: zstd data does not decompress: {e}") from None
        if len(out) > want:
            raise ProtocolError(f"batch of {n} pages: zstd data decompresses to more than the {want} bytes of "
                                "its non-zero pages: refused at the first byte beyond")
        return out


def _check_ascending(pages: list[int]) -> None:
    """A batch names each page once, in ascending order (what the contract says,
    and what keeps a batch from naming one page a million times)."""
    for i in range(1, len(pages)):
        if pages[i] <= pages[i - 1]:
            p, prev = pages[i], pages[i - 1]
            what = f"names page {p} twice" if p == prev else f"names page {p} after page {prev}"
            raise ProtocolError(f"batch {what} (entry {i}): a batch's pages must be strictly ascending")


DEMAND_MAGIC = b"MGDEMAND"   # opens the demand channel
PUSH_MAGIC = b"MGPUSH\0\0"   # opens a raw push channel
DEVSTATE_MAGIC = b"MGDEVST\0"   # opens the device-state channel (migrate.wire.devstate)
PRECOPY_MAGIC = b"MGPRECOP"  # opens the raw pre-copy channel (Hello.precopy, before the switch)
DEMAND_TOKEN_BYTES = 16

_zstd_lock = threading.Lock()
_zstd_why: list[str | None] = []   # once probed: [None] when libzstd.so.1 loaded, else [why not]


def raw_zstd_unavailable() -> str | None:
    """Why this agent cannot compress or decompress raw push runs in C (zstd
    frames, MG_RUN_ZSTD), or None when it can: libzstd.so.1, resolved at run
    time (native/zstd.h), once a process."""
    with _zstd_lock:
        if not _zstd_why:
            why = ffi.new("char[]", 256)
            rc = lib.mg_zstd_load(why, 256)
            _zstd_why.append(None if rc == 0 else f"libzstd.so.1 could not be loaded: {ffi.string(why).decode()}")
        return _zstd_why[0]

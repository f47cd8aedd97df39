"""The pagestream wire format: framed, versioned, every byte checked.

A stream is a sequence of frames over one TCP connection, sender → receiver::

    HELLO                       page size, page count, session id
    ( PAGES | ZERO )*  END_ROUND            one pre-copy round, repeated
    ( PAGES | ZERO )*  END_ROUND[FINAL]     the round taken with the VM stopped
    DIGEST                      xxh3 chunk digests of all RAM at stop time

Every frame starts with a 26-byte header (little endian)::

    magic "LP" | version u8 | type u8 | flags u16 | round u32 | length u32
    | payload xxh3-64 u64 | header crc32 u32

The CRC covers the 22 bytes before it, the xxh3 the whole payload, so a flipped
byte anywhere in the stream is a :class:`~migrate.errors.StreamError`, never a
wrong page. Page payloads carry their pages as run-length extents (start u64 and
count u32 arrays) and, for ``PAGES``, the page bytes as one zstd frame with a
content checksum (or raw bytes with the ``RAW`` flag, when compressing would be
slower than the link). ``ZERO`` frames carry only extents: pages that became
all-zero. ``END_ROUND`` repeats the round's page counts so a lost frame cannot
go unnoticed. Pure functions and small readers only: no sockets, no threads.
"""

from __future__ import annotations

import enum
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from dirtytrack.digest import RamDigest
from dirtytrack.ram import PAGE_SIZE, WORDS_PER_PAGE
from migrate.errors import StreamError

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"LP"
HEADER: Final = struct.Struct("<2sBBHIIQI")
HEADER_SIZE: Final = HEADER.size
_CHECKED = struct.Struct("<2sBBHIIQ")  # the header bytes the CRC covers

#: Upper bounds a receiver enforces before allocating anything.
MAX_PAYLOAD_BYTES: Final = 64 << 20
MAX_FRAME_PAGES: Final = 4096
SESSION_ID_BYTES: Final = 16

_HELLO = struct.Struct("<IQ16s")  # page size, page count, session id
_EXTENT_HEAD = struct.Struct("<II")  # extent count, pages covered
_ROUND_END = struct.Struct("<QQQ")  # pages, data pages, zero pages
_DIGEST_HEAD = struct.Struct("<IIQ")  # chunk size, chunk count, RAM bytes

PageRows = npt.NDArray[np.uint64]
"""Pages as a ``(count, 512)`` uint64 array, one row per 4 KiB page."""


class FrameType(enum.IntEnum):
    HELLO = 1
    PAGES = 2
    ZERO = 3
    END_ROUND = 4
    DIGEST = 5


class FrameFlag(enum.IntFlag):
    NONE = 0
    RAW = 1  # PAGES: page bytes not compressed
    FINAL = 2  # END_ROUND: the last round; the VM was stopped during it


_KNOWN_FLAGS: Final = int(FrameFlag.RAW | FrameFlag.FINAL)


@dataclass(frozen=True)
class FrameHeader:
    type: FrameType
    flags: FrameFlag
    round: int
    length: int
    payload_hash: int


@dataclass(frozen=True)
class Hello:
    page_size: int
    page_count: int
    session: bytes


@dataclass(frozen=True, eq=False)
class Extents:
    """Run-length page ranges: ``starts[i]`` .. ``starts[i] + counts[i] - 1``."""

    starts: npt.NDArray[np.uint64]
    counts: npt.NDArray[np.uint32]

    @property
    def pages(self) -> int:
        return int(self.counts.sum(dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.starts)

    def page_numbers(self) -> npt.NDArray[np.int64]:
        """Every page covered, in order."""
        if len(self.starts) == 0:
            return np.empty(0, dtype=np.int64)
        counts = self.counts.astype(np.int64)
        offsets = np.repeat(self.starts.astype(np.int64) - np.cumsum(counts) + counts, counts)
        return offsets + np.arange(int(counts.sum()), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class PageBatch:
    """Decoded ``PAGES`` (``rows`` holds the pages in extent order) or ``ZERO`` frame."""

    round: int
    extents: Extents
    rows: PageRows | None
    wire_bytes: int

    @property
    def zero(self) -> bool:
        return self.rows is None


@dataclass(frozen=True)
class RoundEnd:
    round: int
    final: bool
    pages: int
    data_pages: int
    zero_pages: int


@dataclass(frozen=True, eq=False)
class FinalDigest:
    round: int
    digest: RamDigest


Message = Hello | PageBatch | RoundEnd | FinalDigest


# --- run-length extents ---------------------------------------------------------------


def extents_of(pages: npt.NDArray[np.int64]) -> Extents:
    """Run-length encode strictly increasing page numbers.

    Raises :class:`ValueError` if they are not strictly increasing or negative.
    """
    pages = np.asarray(pages, dtype=np.int64)
    if len(pages) == 0:
        return Extents(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint32))
    steps = np.diff(pages)
    if pages[0] < 0 or (len(steps) and steps.min() < 1):
        raise ValueError("page numbers must be non-negative and strictly increasing")
    breaks = np.flatnonzero(steps != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = np.concatenate((breaks, [len(pages)]))
    counts = np.diff(np.concatenate(([0], ends)))
    return Extents(starts.astype(np.uint64), counts.astype(np.uint32))


# --- encoding -------------------------------------------------------------------------


def encode_frame(
    frame_type: FrameType, payload: bytes, round_no: int = 0, flags: FrameFlag = FrameFlag.NONE
) -> bytes:
    """Header + payload. Raises :class:`ValueError` for an oversized payload."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    checked = _CHECKED.pack(
        MAGIC,
        PROTOCOL_VERSION,
        int(frame_type),
        int(flags),
        round_no,
        len(payload),
        xxhash.xxh3_64_intdigest(payload),
    )
    return checked + struct.pack("<I", zlib.crc32(checked)) + payload


def encode_hello(hello: Hello) -> bytes:
    if len(hello.session) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes")
    return encode_frame(
        FrameType.HELLO, _HELLO.pack(hello.page_size, hello.page_count, hello.session)
    )


def _extent_payload(extents: Extents) -> bytes:
    return (
        _EXTENT_HEAD.pack(len(extents), extents.pages)
        + extents.starts.astype("<u8").tobytes()
        + extents.counts.astype("<u4").tobytes()
    )


@dataclass(frozen=True)
class EncodedBatch:
    """Frames for one batch of captured pages and what they hold.

    ``raw_bytes`` is the size of the non-zero pages, ``payload_bytes`` what their
    page data became on the wire (compressed or raw), ``wire_bytes`` every frame
    byte including headers and extent tables.
    """

    frames: bytes
    data_pages: int
    zero_pages: int
    raw_bytes: int
    payload_bytes: int

    @property
    def wire_bytes(self) -> int:
        return len(self.frames)


_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # A ZstdCompressor must not be shared between threads: one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_compressors, "cache", None)
    if cache is None:
        cache = _compressors.cache = {}
    compressor = cache.get(level)
    if compressor is None:
        compressor = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True
        )
    return compressor


def encode_pages(
    round_no: int, pages: npt.NDArray[np.int64], rows: PageRows, level: int | None
) -> EncodedBatch:
    """Frames carrying ``rows`` (the captured content of ``pages``, same order).

    All-zero pages go as a ``ZERO`` frame (extents only); the rest as one ``PAGES``
    frame, zstd-compressed at ``level`` with a content checksum, or raw if
    ``level`` is None. Safe to call from several threads at once.
    Raises :class:`ValueError` for mismatched inputs or too many pages.
    """
    if len(pages) != len(rows) or rows.ndim != 2 or rows.shape[1] != WORDS_PER_PAGE:
        raise ValueError(f"{len(pages)} page numbers for rows of shape {rows.shape}")
    if len(pages) > MAX_FRAME_PAGES:
        raise ValueError(f"{len(pages)} pages exceed {MAX_FRAME_PAGES} per frame")
    nonzero = rows.any(axis=1)
    frames: list[bytes] = []
    zero_pages = int(len(pages) - np.count_nonzero(nonzero))
    if zero_pages:
        zero_extents = extents_of(pages[~nonzero])
        frames.append(encode_frame(FrameType.ZERO, _extent_payload(zero_extents), round_no))
    data_pages = len(pages) - zero_pages
    raw_bytes = data_pages * PAGE_SIZE
    payload_bytes = 0
    if data_pages:
        data = rows if zero_pages == 0 else rows[nonzero]
        raw = np.ascontiguousarray(data).data.cast("B")
        if level is None:
            body: bytes | memoryview = raw
            flags = FrameFlag.RAW
        else:
            body = _compressor(level).compress(raw)
            flags = FrameFlag.NONE
        payload_bytes = len(body)
        payload = _extent_payload(extents_of(pages[nonzero])) + bytes(body)
        frames.append(encode_frame(FrameType.PAGES, payload, round_no, flags))
    return EncodedBatch(b"".join(frames), data_pages, zero_pages, raw_bytes, payload_bytes)


def encode_round_end(end: RoundEnd) -> bytes:
    flags = FrameFlag.FINAL if end.final else FrameFlag.NONE
    payload = _ROUND_END.pack(end.pages, end.data_pages, end.zero_pages)
    return encode_frame(FrameType.END_ROUND, payload, end.round, flags)


def encode_digest(round_no: int, digest: RamDigest) -> bytes:
    payload = _DIGEST_HEAD.pack(digest.chunk_size, len(digest.hashes), digest.size)
    return encode_frame(FrameType.DIGEST, payload + digest.hashes.astype("<u8").tobytes(), round_no)


# --- decoding -------------------------------------------------------------------------


def decode_header(raw: bytes | memoryview) -> FrameHeader:
    """Parse and check a frame header. Raises :class:`StreamError`."""
    if len(raw) != HEADER_SIZE:
        raise _corrupt(f"frame header of {len(raw)} bytes, expected {HEADER_SIZE}")
    magic, version, ftype, flags, round_no, length, payload_hash, crc = HEADER.unpack(raw)
    if zlib.crc32(raw[: _CHECKED.size]) != crc:
        raise _corrupt("frame header checksum mismatch", magic=bytes(magic))
    if magic != MAGIC:
        raise _corrupt(f"bad frame magic {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise _corrupt(
            f"unsupported pagestream version {version} (this end speaks {PROTOCOL_VERSION})"
        )
    try:
        frame_type = FrameType(ftype)
    except ValueError:
        raise _corrupt(f"unknown frame type {ftype}") from None
    if flags & ~_KNOWN_FLAGS:
        raise _corrupt(f"unknown frame flags {flags:#x}")
    if length > MAX_PAYLOAD_BYTES:
        raise _corrupt(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return FrameHeader(frame_type, FrameFlag(flags), round_no, length, payload_hash)


def decode_payload(
    header: FrameHeader,
    payload: bytes | memoryview,
    page_count: int | None,
    decompressor: zstandard.ZstdDecompressor | None = None,
) -> Message:
    """Check and decode one frame's payload.

    ``page_count`` (None only before HELLO) bounds every extent. Raises
    :class:`StreamError` for a payload that fails its hash, its zstd checksum, or
    does not describe pages of this RAM.
    """
    if len(payload) != header.length:
        raise _corrupt(f"payload of {len(payload)} bytes, header says {header.length}")
    if xxhash.xxh3_64_intdigest(payload) != header.payload_hash:
        raise _corrupt(f"{header.type.name} payload checksum mismatch", round=header.round)
    view = memoryview(payload)
    if header.type is FrameType.HELLO:
        page_size, pages, session = _unpack(_HELLO, view, "HELLO")
        return Hello(page_size, pages, bytes(session))
    if page_count is None:
        raise _corrupt(f"{header.type.name} frame before HELLO")
    if header.type is FrameType.END_ROUND:
        pages, data_pages, zero_pages = _unpack(_ROUND_END, view, "END_ROUND")
        if data_pages + zero_pages != pages:
            raise _corrupt("END_ROUND page counts do not add up")
        return RoundEnd(
            header.round, bool(header.flags & FrameFlag.FINAL), pages, data_pages, zero_pages
        )
    if header.type is FrameType.DIGEST:
        return _decode_digest(header, view)
    extents, rest = _decode_extents(view, page_count)
    if header.type is FrameType.ZERO:
        if len(rest):
            raise _corrupt("ZERO frame carries page data")
        return PageBatch(header.round, extents, None, HEADER_SIZE + header.length)
    expected = extents.pages * PAGE_SIZE
    if header.flags & FrameFlag.RAW:
        data = bytes(rest)
    else:
        try:
            data = (decompressor or zstandard.ZstdDecompressor()).decompress(
                rest, max_output_size=expected
            )
        except zstandard.ZstdError as exc:
            raise _corrupt(f"zstd frame does not decode: {exc}", round=header.round) from exc
    if len(data) != expected:
        raise _corrupt(f"PAGES frame holds {len(data)} bytes for {extents.pages} pages")
    rows = np.frombuffer(data, dtype="<u8").astype(np.uint64, copy=False)
    return PageBatch(
        header.round, extents, rows.reshape(-1, WORDS_PER_PAGE), HEADER_SIZE + header.length
    )


def _unpack(layout: struct.Struct, view: memoryview, what: str) -> tuple[int, ...]:
    if len(view) != layout.size:
        raise _corrupt(f"{what} payload of {len(view)} bytes, expected {layout.size}")
    return tuple(layout.unpack(view))


def _decode_extents(view: memoryview, page_count: int) -> tuple[Extents, memoryview]:
    if len(view) < _EXTENT_HEAD.size:
        raise _corrupt("page frame too short for its extent table")
    count, pages = _EXTENT_HEAD.unpack(view[: _EXTENT_HEAD.size])
    table_end = _EXTENT_HEAD.size + count * 12
    if count == 0 or pages == 0 or pages > MAX_FRAME_PAGES or table_end > len(view):
        raise _corrupt(f"bad extent table: {count} extents, {pages} pages")
    starts_end = _EXTENT_HEAD.size + count * 8
    starts = np.frombuffer(view[_EXTENT_HEAD.size : starts_end], dtype="<u8").astype(np.uint64)
    counts = np.frombuffer(view[starts_end:table_end], dtype="<u4").astype(np.uint32)
    total = int(counts.sum(dtype=np.uint64))
    if total != pages or counts.min() == 0:
        raise _corrupt(f"extent counts add up to {total}, header says {pages}")
    ends = starts + counts.astype(np.uint64)
    if int(ends.max()) > page_count or np.any(starts[1:] < ends[:-1]):
        raise _corrupt(f"extents outside RAM of {page_count} pages or overlapping")
    return Extents(starts, counts), view[table_end:]


def _decode_digest(header: FrameHeader, view: memoryview) -> FinalDigest:
    if len(view) < _DIGEST_HEAD.size:
        raise _corrupt("DIGEST payload too short")
    chunk_size, chunks, size = _DIGEST_HEAD.unpack(view[: _DIGEST_HEAD.size])
    body = view[_DIGEST_HEAD.size :]
    if (
        chunk_size == 0
        or chunk_size % PAGE_SIZE
        or len(body) != chunks * 8
        or chunks != (size + chunk_size - 1) // chunk_size
    ):
        raise _corrupt(f"bad DIGEST layout: {chunks} chunks of {chunk_size} for {size} bytes")
    hashes = np.frombuffer(body, dtype="<u8").astype(np.uint64)
    return FinalDigest(header.round, RamDigest(size=size, chunk_size=chunk_size, hashes=hashes))


def _corrupt(message: str, **detail: object) -> StreamError:
    return StreamError(message, side="receiver", kind="protocol", detail=detail or None)


# --- reading a stream -----------------------------------------------------------------


RecvExactly = Callable[[int], bytes]
"""Returns exactly ``n`` bytes, or fewer only at the end of the stream."""


class FrameReader:
    """Reads frames from a byte source and decodes them, checking every byte.

    ``recv_exactly`` may return fewer bytes only at end of stream; a stream ending
    inside a frame is a :class:`StreamError`, one ending between frames returns
    None from :meth:`next`. Not thread-safe.
    """

    def __init__(self, recv_exactly: RecvExactly) -> None:
        self._recv = recv_exactly
        self._decompressor = zstandard.ZstdDecompressor()
        self.page_count: int | None = None
        self.bytes_read = 0
        self.frames = 0

    def next(self) -> Message | None:
        raw = self._recv(HEADER_SIZE)
        if not raw:
            return None
        if len(raw) < HEADER_SIZE:
            raise _corrupt(f"stream ended inside a frame header ({len(raw)} bytes)")
        header = decode_header(raw)
        payload = self._recv(header.length) if header.length else b""
        if len(payload) < header.length:
            raise _corrupt(
                f"stream ended inside a {header.type.name} frame "
                f"({len(payload)} of {header.length} bytes)"
            )
        self.bytes_read += HEADER_SIZE + header.length
        self.frames += 1
        message = decode_payload(header, payload, self.page_count, self._decompressor)
        if isinstance(message, Hello):
            if self.page_count is not None:
                raise _corrupt("second HELLO in one stream")
            if message.page_size != PAGE_SIZE:
                raise _corrupt(f"page size {message.page_size}, this end uses {PAGE_SIZE}")
            self.page_count = message.page_count
        return message


def bytes_source(data: bytes) -> RecvExactly:
    """A :data:`RecvExactly` over an in-memory stream (tests, replay)."""
    view = memoryview(data)
    position = 0

    def recv(n: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + n])
        position += len(chunk)
        return chunk

    return recv

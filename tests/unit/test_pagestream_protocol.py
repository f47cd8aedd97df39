"""pagestream's wire format: round trips, and every corrupted byte caught."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtytrack.digest import ram_digest
from dirtytrack.ram import PAGE_SIZE, WORDS_PER_PAGE
from migrate.errors import StreamError
from migrate.pagestream.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    PROTOCOL_VERSION,
    FinalDigest,
    FrameFlag,
    FrameReader,
    FrameType,
    Hello,
    Message,
    PageBatch,
    RoundEnd,
    bytes_source,
    encode_digest,
    encode_frame,
    encode_hello,
    encode_pages,
    encode_round_end,
    extents_of,
)

SESSION = bytes(range(16))
PAGES = 256


def make_ram(pages: int = PAGES, seed: int = 3) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    ram = np.zeros((pages, WORDS_PER_PAGE), dtype=np.uint64)
    kinds = rng.integers(0, 3, size=pages)
    ram[kinds == 1] = rng.integers(0, 1 << 63, size=(int((kinds == 1).sum()), WORDS_PER_PAGE))
    ram[kinds == 2, :8] = np.arange(8, dtype=np.uint64)  # sparse, compressible
    return ram


def read_all(stream: bytes) -> list[Message]:
    reader = FrameReader(bytes_source(stream))
    messages = []
    while (message := reader.next()) is not None:
        messages.append(message)
    return messages


def apply(messages: list[Message], pages: int = PAGES) -> npt.NDArray[np.uint64]:
    target = np.full((pages, WORDS_PER_PAGE), 0xFF, dtype=np.uint64)
    for message in messages:
        if isinstance(message, PageBatch):
            numbers = message.extents.page_numbers()
            target[numbers] = 0 if message.rows is None else message.rows
    return target


def one_round(ram: npt.NDArray[np.uint64], level: int | None, batch: int = 64) -> bytes:
    numbers = np.arange(len(ram), dtype=np.int64)
    parts = [encode_hello(Hello(PAGE_SIZE, len(ram), SESSION))]
    data = zero = 0
    for first in range(0, len(ram), batch):
        chunk = numbers[first : first + batch]
        encoded = encode_pages(1, chunk, ram[chunk], level)
        parts.append(encoded.frames)
        data += encoded.data_pages
        zero += encoded.zero_pages
    parts.append(encode_round_end(RoundEnd(1, True, data + zero, data, zero)))
    parts.append(encode_digest(1, ram_digest(memoryview(ram.tobytes()), chunk_size=64 * 4096)))
    return b"".join(parts)


@pytest.mark.parametrize("level", [None, -7, 1, 3])
def test_round_trip_rebuilds_ram(level: int | None) -> None:
    ram = make_ram()
    messages = read_all(one_round(ram, level))
    assert isinstance(messages[0], Hello) and messages[0].session == SESSION
    assert np.array_equal(apply(messages), ram)
    end = [m for m in messages if isinstance(m, RoundEnd)]
    assert len(end) == 1 and end[0].final and end[0].pages == PAGES
    digest = messages[-1]
    assert isinstance(digest, FinalDigest)
    assert digest.digest.matches(ram_digest(memoryview(ram.tobytes()), chunk_size=64 * 4096))


def test_zero_pages_travel_as_flags_only() -> None:
    ram = np.zeros((64, WORDS_PER_PAGE), dtype=np.uint64)
    ram[10] = 7
    encoded = encode_pages(2, np.arange(64, dtype=np.int64), ram, 1)
    assert (encoded.data_pages, encoded.zero_pages) == (1, 63)
    assert encoded.raw_bytes == PAGE_SIZE
    # Zero pages cost extents, not page bytes: two runs around page 10.
    assert encoded.wire_bytes < 2 * HEADER_SIZE + 200 + encoded.payload_bytes
    messages = read_all(encode_hello(Hello(PAGE_SIZE, 64, SESSION)) + encoded.frames)
    zero = [m for m in messages if isinstance(m, PageBatch) and m.zero]
    assert zero and zero[0].extents.pages == 63 and len(zero[0].extents) == 2


def test_compression_shrinks_compressible_pages() -> None:
    ram = np.zeros((64, WORDS_PER_PAGE), dtype=np.uint64)
    ram[:, :16] = np.arange(16, dtype=np.uint64)
    compressed = encode_pages(1, np.arange(64, dtype=np.int64), ram, 1)
    raw = encode_pages(1, np.arange(64, dtype=np.int64), ram, None)
    assert raw.payload_bytes == 64 * PAGE_SIZE
    assert compressed.payload_bytes < raw.payload_bytes / 20


@given(st.lists(st.integers(0, 5000), unique=True, max_size=300))
@settings(max_examples=200, deadline=None)
def test_extents_round_trip(pages: list[int]) -> None:
    numbers = np.array(sorted(pages), dtype=np.int64)
    extents = extents_of(numbers)
    assert extents.pages == len(numbers)
    assert np.array_equal(extents.page_numbers(), numbers)
    # Maximal runs: no two extents touch.
    ends = extents.starts[:-1] + extents.counts[:-1]
    assert np.all(extents.starts[1:] > ends)


def test_extents_refuse_unsorted_pages() -> None:
    with pytest.raises(ValueError):
        extents_of(np.array([3, 2], dtype=np.int64))
    with pytest.raises(ValueError):
        extents_of(np.array([3, 3], dtype=np.int64))


def small_stream() -> bytes:
    ram = make_ram(pages=24, seed=5)
    ram[3] = 0
    numbers = np.arange(24, dtype=np.int64)
    encoded = encode_pages(1, numbers, ram, 1)
    return b"".join(
        [
            encode_hello(Hello(PAGE_SIZE, 24, SESSION)),
            encoded.frames,
            encode_round_end(RoundEnd(1, True, 24, encoded.data_pages, encoded.zero_pages)),
            encode_digest(1, ram_digest(memoryview(ram.tobytes()), chunk_size=8 * 4096)),
        ]
    )


def test_every_flipped_byte_is_a_stream_error() -> None:
    """Flip each byte of a stream in turn: every flip is detected, none decodes."""
    stream = small_stream()
    assert read_all(stream)  # the clean stream decodes
    for position in range(len(stream)):
        corrupted = bytearray(stream)
        corrupted[position] ^= 0x5A
        with pytest.raises(StreamError) as info:
            read_all(bytes(corrupted))
        assert info.value.kind == "protocol", position


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_random_bit_flips_are_stream_errors(data: st.DataObject) -> None:
    stream = small_stream()
    position = data.draw(st.integers(0, len(stream) - 1))
    bit = data.draw(st.integers(0, 7))
    corrupted = bytearray(stream)
    corrupted[position] ^= 1 << bit
    with pytest.raises(StreamError):
        read_all(bytes(corrupted))


def test_truncated_stream_is_a_stream_error() -> None:
    stream = small_stream()
    for cut in (5, HEADER_SIZE + 3, len(stream) - 1):
        with pytest.raises(StreamError, match="ended inside"):
            read_all(stream[:cut])


def _reframe(frame: bytes, payload: bytes) -> bytes:
    """The same header with a new payload and correct checksums (a faithful forger)."""
    magic, version, ftype, flags, round_no, _length, _hash, _crc = HEADER.unpack(
        frame[:HEADER_SIZE]
    )
    checked = struct.pack(
        "<2sBBHIIQ", magic, version, ftype, flags, round_no, len(payload),
        xxhash.xxh3_64_intdigest(payload),
    )  # fmt: skip
    return checked + struct.pack("<I", zlib.crc32(checked)) + payload


def test_zstd_content_checksum_is_checked() -> None:
    """Page bytes altered *inside* a well-framed zstd frame fail its content checksum."""
    ram = np.zeros((4, WORDS_PER_PAGE), dtype=np.uint64)
    ram[:] = np.arange(WORDS_PER_PAGE, dtype=np.uint64)
    frame = encode_pages(1, np.arange(4, dtype=np.int64), ram, 1).frames
    payload = bytearray(frame[HEADER_SIZE:])
    payload[-1] ^= 0xFF  # the zstd frame's checksum field
    hello = encode_hello(Hello(PAGE_SIZE, 4, SESSION))
    with pytest.raises(StreamError, match="zstd"):
        read_all(hello + _reframe(frame, bytes(payload)))


def test_newer_version_is_refused_by_name() -> None:
    frame = bytearray(encode_hello(Hello(PAGE_SIZE, 4, SESSION)))
    frame[2] = PROTOCOL_VERSION + 1
    checked = bytes(frame[:22])
    frame[22:26] = struct.pack("<I", zlib.crc32(checked))
    with pytest.raises(StreamError, match="unsupported pagestream version"):
        read_all(bytes(frame))


def _pages_payload(starts: list[int], counts: list[int], data: bytes = b"") -> bytes:
    return (
        struct.pack("<II", len(starts), sum(counts))
        + np.array(starts, dtype="<u8").tobytes()
        + np.array(counts, dtype="<u4").tobytes()
        + data
    )


@pytest.mark.parametrize(
    ("starts", "counts", "match"),
    [
        ([30], [4], "outside RAM"),  # RAM has 32 pages
        ([0, 2], [4, 1], "overlapping"),
        ([0], [0], "extent"),
    ],
)
def test_bad_extents_are_refused(starts: list[int], counts: list[int], match: str) -> None:
    hello = encode_hello(Hello(PAGE_SIZE, 32, SESSION))
    frame = encode_frame(FrameType.ZERO, _pages_payload(starts, counts), 1)
    with pytest.raises(StreamError, match=match):
        read_all(hello + frame)


def test_page_data_must_match_extents() -> None:
    hello = encode_hello(Hello(PAGE_SIZE, 32, SESSION))
    frame = encode_frame(
        FrameType.PAGES, _pages_payload([0], [2], bytes(PAGE_SIZE)), 1, FrameFlag.RAW
    )
    with pytest.raises(StreamError, match="holds 4096 bytes for 2 pages"):
        read_all(hello + frame)
    zero_with_data = encode_frame(FrameType.ZERO, _pages_payload([0], [1], b"x"), 1)
    with pytest.raises(StreamError, match="carries page data"):
        read_all(hello + zero_with_data)


def test_frames_before_hello_and_second_hello_are_refused() -> None:
    end = encode_round_end(RoundEnd(1, False, 0, 0, 0))
    with pytest.raises(StreamError, match="before HELLO"):
        read_all(end)
    hello = encode_hello(Hello(PAGE_SIZE, 32, SESSION))
    with pytest.raises(StreamError, match="second HELLO"):
        read_all(hello + hello)
    with pytest.raises(StreamError, match="page size"):
        read_all(encode_hello(Hello(8192, 32, SESSION)))


def test_round_end_counts_must_add_up() -> None:
    hello = encode_hello(Hello(PAGE_SIZE, 32, SESSION))
    bad = encode_frame(FrameType.END_ROUND, struct.pack("<QQQ", 5, 2, 2), 1)
    with pytest.raises(StreamError, match="do not add up"):
        read_all(hello + bad)


def test_encoder_refuses_bad_batches() -> None:
    rows = np.zeros((2, WORDS_PER_PAGE), dtype=np.uint64)
    with pytest.raises(ValueError):
        encode_pages(1, np.arange(3, dtype=np.int64), rows, 1)
    big = np.zeros((MAX_FRAME_PAGES + 1, WORDS_PER_PAGE), dtype=np.uint64)
    with pytest.raises(ValueError, match="per frame"):
        encode_pages(1, np.arange(MAX_FRAME_PAGES + 1, dtype=np.int64), big, 1)
    with pytest.raises(ValueError):
        encode_hello(Hello(PAGE_SIZE, 1, b"short"))

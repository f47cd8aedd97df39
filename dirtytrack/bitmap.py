"""Packed dirty-page bitmaps on numpy ``uint64`` words.

Page ``p`` is bit ``p % 64`` of word ``p // 64`` (least significant bit first), the
same order as ``np.packbits(..., bitorder="little")`` on a little-endian word, so the
serialised form is portable. Bits at and beyond ``page_count`` in the last word are
always zero: every operation that could set them (``~``, ``set_all``, ``from_bytes``)
masks or refuses them, so ``popcount`` and comparisons never need to.

A :class:`Bitmap` is mutable and not thread-safe; share copies between threads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt

from dirtytrack.errors import BitmapFormatError, BitmapShapeError, PageRangeError

WORD_BITS: Final = 64
_ALL_ONES: Final = (1 << WORD_BITS) - 1

#: Serialised form: magic, format version, reserved (zero), page count; then the
#: words as little-endian uint64.
BITMAP_MAGIC: Final = b"LMBM"
BITMAP_FORMAT_VERSION: Final = 1
_HEADER = struct.Struct("<4sHHQ")

#: Pages unpacked per step when walking extents: 1 Mi pages is a 1 MiB temporary and
#: covers 4 GiB of guest RAM per step.
DEFAULT_EXTENT_CHUNK_PAGES: Final = 1 << 20

_POPCOUNT8: Final = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``count`` consecutive pages starting at page ``start``.

    Raises :class:`ValueError` for a negative start or a count below one.
    """

    start: int
    count: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.count < 1:
            raise ValueError(f"invalid extent start={self.start} count={self.count}")

    @property
    def end(self) -> int:
        """First page after the extent (exclusive end)."""
        return self.start + self.count


@dataclass(frozen=True, eq=False)
class ExtentArrays:
    """Extents as two parallel int64 arrays (page numbers and page counts).

    For consumers that batch extents with numpy instead of iterating in Python.
    """

    starts: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[Extent]:
        for start, count in zip(self.starts.tolist(), self.counts.tolist(), strict=True):
            yield Extent(start, count)


def _word_count(page_count: int) -> int:
    return (page_count + WORD_BITS - 1) // WORD_BITS


def _popcount_words(words: npt.NDArray[np.uint64]) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one SIMD popcount per word
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return _popcount_words_table(words)


def _popcount_words_table(words: npt.NDArray[np.uint64]) -> int:
    """Popcount through a 256-entry byte table: the fallback for numpy < 2."""
    return int(_POPCOUNT8[words.view(np.uint8)].sum(dtype=np.int64))


def split_extents(arrays: ExtentArrays, max_pages: int) -> ExtentArrays:
    """Split every extent longer than ``max_pages`` into pieces of at most that size.

    Raises :class:`ValueError` if ``max_pages`` is below one.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    starts, counts = arrays.starts, arrays.counts
    if len(counts) == 0 or int(counts.max()) <= max_pages:
        return arrays
    pieces = (counts + (max_pages - 1)) // max_pages
    owner = np.repeat(np.arange(len(counts)), pieces)
    # Index of each piece within its extent: position minus the extent's first piece.
    first_piece = np.cumsum(pieces) - pieces
    within = np.arange(len(owner), dtype=np.int64) - first_piece[owner]
    new_starts = starts[owner] + within * max_pages
    new_counts = np.minimum(counts[owner] - within * max_pages, max_pages)
    return ExtentArrays(new_starts.astype(np.int64), new_counts.astype(np.int64))


class Bitmap:
    """A fixed-size set of page numbers ``[0, page_count)``, one bit per page.

    Mutating methods return ``None``; operators (``|``, ``&``, ``-`` for and-not,
    ``^``, ``~``) return new bitmaps and their in-place forms mutate. Combining
    bitmaps of different page counts raises :class:`BitmapShapeError`; page numbers
    outside the bitmap raise :class:`PageRangeError`.
    """

    __slots__ = ("_page_count", "_words")
    __hash__: ClassVar[None]  # type: ignore[assignment]  # mutable: not hashable

    def __init__(self, page_count: int) -> None:
        """An all-clear bitmap of ``page_count`` pages (``page_count >= 0``)."""
        if page_count < 0:
            raise BitmapShapeError(f"page_count must be >= 0, got {page_count}")
        self._page_count = page_count
        self._words: npt.NDArray[np.uint64] = np.zeros(_word_count(page_count), dtype=np.uint64)

    # --- construction -------------------------------------------------------------

    @classmethod
    def _adopt(cls, page_count: int, words: npt.NDArray[np.uint64]) -> Bitmap:
        bitmap = cls.__new__(cls)
        bitmap._page_count = page_count
        bitmap._words = words
        return bitmap

    @classmethod
    def full(cls, page_count: int) -> Bitmap:
        """A bitmap with every page set."""
        bitmap = cls(page_count)
        bitmap.set_all()
        return bitmap

    @classmethod
    def from_bools(cls, flags: npt.ArrayLike) -> Bitmap:
        """One page per element of a 1-D boolean array; ``True`` means dirty.

        Raises :class:`BitmapShapeError` unless ``flags`` is 1-D with dtype bool.
        """
        array = np.asarray(flags)
        if array.ndim != 1 or array.dtype != np.bool_:
            raise BitmapShapeError(
                f"expected a 1-D bool array, got shape {array.shape} dtype {array.dtype}"
            )
        page_count = len(array)
        packed = np.packbits(array, bitorder="little")
        padded = np.zeros(_word_count(page_count) * 8, dtype=np.uint8)
        padded[: len(packed)] = packed
        words = padded.view("<u8").astype(np.uint64, copy=False)
        return cls._adopt(page_count, words)

    @classmethod
    def from_indices(cls, page_count: int, pages: npt.ArrayLike) -> Bitmap:
        """A bitmap with the given page numbers set (duplicates allowed).

        Raises :class:`PageRangeError` for a page outside ``[0, page_count)``.
        """
        bitmap = cls(page_count)
        bitmap.set_indices(pages)
        return bitmap

    @classmethod
    def from_extents(cls, page_count: int, extents: Iterable[Extent]) -> Bitmap:
        """A bitmap with every page of every extent set (overlaps allowed)."""
        bitmap = cls(page_count)
        for extent in extents:
            bitmap.set_range(extent.start, extent.count)
        return bitmap

    @classmethod
    def from_words(cls, page_count: int, words: npt.ArrayLike) -> Bitmap:
        """Copy packed words (the layout of :meth:`words`).

        Raises :class:`BitmapShapeError` if the word count does not fit
        ``page_count``, :class:`BitmapFormatError` if bits past ``page_count`` are set.
        """
        array = np.array(words, dtype=np.uint64)
        if array.shape != (_word_count(page_count),):
            raise BitmapShapeError(
                f"{page_count} pages need {_word_count(page_count)} words, got shape {array.shape}"
            )
        bitmap = cls._adopt(page_count, array)
        if bitmap._tail_bits_set():
            raise BitmapFormatError(f"bits set past page_count={page_count}")
        return bitmap

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Bitmap:
        """Parse the output of :meth:`to_bytes`.

        Raises :class:`BitmapFormatError` for a short or over-long buffer, a wrong
        magic, an unknown version, a non-zero reserved field, or bits set past
        ``page_count``.
        """
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size:
            raise BitmapFormatError(f"bitmap of {len(view)} bytes is shorter than its header")
        magic, version, reserved, page_count = _HEADER.unpack_from(view)
        if magic != BITMAP_MAGIC:
            raise BitmapFormatError(f"bad bitmap magic {magic!r}, expected {BITMAP_MAGIC!r}")
        if version != BITMAP_FORMAT_VERSION:
            raise BitmapFormatError(
                f"bitmap format version {version} not supported (this is {BITMAP_FORMAT_VERSION})"
            )
        if reserved != 0:
            raise BitmapFormatError(f"bitmap header reserved field is {reserved}, expected 0")
        expected = _HEADER.size + _word_count(page_count) * 8
        if len(view) != expected:
            raise BitmapFormatError(
                f"bitmap of {page_count} pages needs {expected} bytes, got {len(view)}"
            )
        words = np.frombuffer(view[_HEADER.size :], dtype="<u8").astype(np.uint64)
        bitmap = cls._adopt(page_count, words)
        if bitmap._tail_bits_set():
            raise BitmapFormatError(f"bits set past page_count={page_count}")
        return bitmap

    # --- properties and conversions -----------------------------------------------

    @property
    def page_count(self) -> int:
        """Number of pages (bits) the bitmap covers."""
        return self._page_count

    @property
    def nbytes(self) -> int:
        """Memory held by the packed words, in bytes."""
        return int(self._words.nbytes)

    def words(self) -> npt.NDArray[np.uint64]:
        """A read-only view of the packed words (no copy)."""
        view = self._words.view()
        view.flags.writeable = False
        return view

    def copy(self) -> Bitmap:
        return Bitmap._adopt(self._page_count, self._words.copy())

    def to_bools(self) -> npt.NDArray[np.bool_]:
        """A 1-D bool array of length ``page_count``."""
        bits = np.unpackbits(self._le_bytes(), count=self._page_count, bitorder="little")
        return bits.view(np.bool_)

    def to_indices(self) -> npt.NDArray[np.int64]:
        """Sorted page numbers of the set pages."""
        return np.flatnonzero(self.to_bools()).astype(np.int64)

    def to_bytes(self) -> bytes:
        """Versioned serialisation: 16-byte header then little-endian words."""
        header = _HEADER.pack(BITMAP_MAGIC, BITMAP_FORMAT_VERSION, 0, self._page_count)
        return header + self._le_bytes().tobytes()

    def _le_bytes(self) -> npt.NDArray[np.uint8]:
        # No copy on little-endian hosts; a byte-swapped copy on big-endian ones.
        return self._words.astype("<u8", copy=False).view(np.uint8)

    # --- queries ------------------------------------------------------------------

    def popcount(self) -> int:
        """Number of set pages."""
        return _popcount_words(self._words)

    def any(self) -> bool:
        """Whether at least one page is set."""
        return bool(self._words.any())

    def __bool__(self) -> bool:
        return self.any()

    def test(self, page: int) -> bool:
        """Whether ``page`` is set. Raises :class:`PageRangeError` if out of range."""
        self._check_page(page)
        return bool((int(self._words[page >> 6]) >> (page & 63)) & 1)

    def __contains__(self, page: object) -> bool:
        if not isinstance(page, int | np.integer):
            return False
        page = int(page)
        return 0 <= page < self._page_count and self.test(page)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._page_count == other._page_count and bool(
            np.array_equal(self._words, other._words)
        )

    def __repr__(self) -> str:
        return f"Bitmap(page_count={self._page_count}, set={self.popcount()})"

    # --- single pages, ranges, index arrays ---------------------------------------

    def set(self, page: int) -> None:
        """Set one page. Raises :class:`PageRangeError` if out of range."""
        self._check_page(page)
        self._words[page >> 6] |= np.uint64(1 << (page & 63))

    def clear(self, page: int) -> None:
        """Clear one page. Raises :class:`PageRangeError` if out of range."""
        self._check_page(page)
        self._words[page >> 6] &= np.uint64(_ALL_ONES ^ (1 << (page & 63)))

    def set_range(self, start: int, count: int) -> None:
        """Set pages ``[start, start + count)``; ``count == 0`` is a no-op."""
        self._range_op(start, count, set_bits=True)

    def clear_range(self, start: int, count: int) -> None:
        """Clear pages ``[start, start + count)``; ``count == 0`` is a no-op."""
        self._range_op(start, count, set_bits=False)

    def set_indices(self, pages: npt.ArrayLike) -> None:
        """Set every page number in an integer array (duplicates allowed)."""
        words, masks = self._index_masks(pages)
        np.bitwise_or.at(self._words, words, masks)

    def clear_indices(self, pages: npt.ArrayLike) -> None:
        """Clear every page number in an integer array (duplicates allowed)."""
        words, masks = self._index_masks(pages)
        np.bitwise_and.at(self._words, words, ~masks)

    def set_all(self) -> None:
        self._words.fill(np.uint64(_ALL_ONES))
        self._mask_tail()

    def clear_all(self) -> None:
        self._words.fill(np.uint64(0))

    # --- set algebra --------------------------------------------------------------

    def __or__(self, other: Bitmap) -> Bitmap:
        return Bitmap._adopt(self._page_count, self._words | self._peer(other)._words)

    def __and__(self, other: Bitmap) -> Bitmap:
        return Bitmap._adopt(self._page_count, self._words & self._peer(other)._words)

    def __xor__(self, other: Bitmap) -> Bitmap:
        return Bitmap._adopt(self._page_count, self._words ^ self._peer(other)._words)

    def __sub__(self, other: Bitmap) -> Bitmap:
        """Pages set here and not in ``other`` (and-not)."""
        return Bitmap._adopt(self._page_count, self._words & ~self._peer(other)._words)

    def andnot(self, other: Bitmap) -> Bitmap:
        """Same as ``self - other``."""
        return self - other

    def __invert__(self) -> Bitmap:
        inverted = Bitmap._adopt(self._page_count, ~self._words)
        inverted._mask_tail()
        return inverted

    def __ior__(self, other: Bitmap) -> Bitmap:
        np.bitwise_or(self._words, self._peer(other)._words, out=self._words)
        return self

    def __iand__(self, other: Bitmap) -> Bitmap:
        np.bitwise_and(self._words, self._peer(other)._words, out=self._words)
        return self

    def __ixor__(self, other: Bitmap) -> Bitmap:
        np.bitwise_xor(self._words, self._peer(other)._words, out=self._words)
        return self

    def __isub__(self, other: Bitmap) -> Bitmap:
        # other's tail is zero, so ~other has tail ones, and self's zero tail stays zero.
        np.bitwise_and(self._words, ~self._peer(other)._words, out=self._words)
        return self

    # --- extents ------------------------------------------------------------------

    def extent_arrays(
        self,
        max_pages: int | None = None,
        chunk_pages: int = DEFAULT_EXTENT_CHUNK_PAGES,
    ) -> ExtentArrays:
        """All dirty runs as parallel arrays, in page order.

        Runs are maximal (two runs never touch) unless ``max_pages`` splits them.
        """
        starts: list[npt.NDArray[np.int64]] = []
        counts: list[npt.NDArray[np.int64]] = []
        for arrays in self._extent_chunks(chunk_pages):
            starts.append(arrays.starts)
            counts.append(arrays.counts)
        if not starts:
            empty = np.empty(0, dtype=np.int64)
            return ExtentArrays(empty, empty.copy())
        merged = ExtentArrays(np.concatenate(starts), np.concatenate(counts))
        return merged if max_pages is None else split_extents(merged, max_pages)

    def extents(
        self,
        max_pages: int | None = None,
        chunk_pages: int = DEFAULT_EXTENT_CHUNK_PAGES,
    ) -> Iterator[Extent]:
        """Iterate dirty runs in page order, unpacking ``chunk_pages`` bits at a time.

        ``max_pages`` caps each extent's length (longer runs are split), e.g. to batch
        pages for compression. ``chunk_pages`` bounds the temporary memory (one byte
        per page) and must be a positive multiple of 64. Raises :class:`ValueError`
        for a bad ``chunk_pages`` or ``max_pages``.
        """
        for arrays in self._extent_chunks(chunk_pages):
            yield from (arrays if max_pages is None else split_extents(arrays, max_pages))

    def _extent_chunks(self, chunk_pages: int) -> Iterator[ExtentArrays]:
        if chunk_pages < WORD_BITS or chunk_pages % WORD_BITS:
            raise ValueError(f"chunk_pages must be a positive multiple of 64, got {chunk_pages}")
        chunk_words = chunk_pages // WORD_BITS
        le_words = self._words.astype("<u8", copy=False)
        open_start: int | None = None  # a run that reached the end of the previous chunk
        for first_word in range(0, len(le_words), chunk_words):
            chunk = le_words[first_word : first_word + chunk_words]
            base = first_word * WORD_BITS
            if not chunk.any():
                if open_start is not None:
                    yield _single(open_start, base - open_start)
                    open_start = None
                continue
            bits = np.unpackbits(chunk.view(np.uint8), bitorder="little").view(np.int8)
            edges = np.diff(bits, prepend=np.int8(0), append=np.int8(0))
            run_starts = np.flatnonzero(edges == 1).astype(np.int64)
            run_ends = np.flatnonzero(edges == -1).astype(np.int64)
            run_starts += base
            run_ends += base
            if open_start is not None:
                if bits[0]:
                    run_starts[0] = open_start
                else:
                    yield _single(open_start, base - open_start)
                open_start = None
            chunk_end = base + len(bits)
            if len(run_ends) and run_ends[-1] == chunk_end and chunk_end < self._page_count:
                open_start = int(run_starts[-1])
                run_starts, run_ends = run_starts[:-1], run_ends[:-1]
            if len(run_starts):
                yield ExtentArrays(run_starts, run_ends - run_starts)
        # Tail bits are zero, so a run can only stay open if it ends exactly at a
        # chunk boundary that is also the end of the map; the check above excludes it.
        if open_start is not None:
            yield _single(open_start, self._page_count - open_start)

    # --- helpers ------------------------------------------------------------------

    def _peer(self, other: Bitmap) -> Bitmap:
        if not isinstance(other, Bitmap):
            raise TypeError(f"expected a Bitmap, got {type(other).__name__}")
        if other._page_count != self._page_count:
            raise BitmapShapeError(
                f"bitmaps differ in size: {self._page_count} vs {other._page_count} pages"
            )
        return other

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self._page_count:
            raise PageRangeError(f"page {page} outside [0, {self._page_count})")

    def _range_op(self, start: int, count: int, *, set_bits: bool) -> None:
        if start < 0 or count < 0 or start + count > self._page_count:
            raise PageRangeError(
                f"page range start={start} count={count} outside [0, {self._page_count})"
            )
        if count == 0:
            return
        end = start + count
        first_word, first_bit = divmod(start, WORD_BITS)
        last_word, end_bit = divmod(end, WORD_BITS)
        if first_word == last_word:
            self._apply_mask(first_word, ((1 << count) - 1) << first_bit, set_bits)
            return
        self._apply_mask(first_word, _ALL_ONES ^ ((1 << first_bit) - 1), set_bits)
        self._words[first_word + 1 : last_word] = np.uint64(_ALL_ONES if set_bits else 0)
        if end_bit:
            self._apply_mask(last_word, (1 << end_bit) - 1, set_bits)

    def _apply_mask(self, word: int, mask: int, set_bits: bool) -> None:
        if set_bits:
            self._words[word] |= np.uint64(mask)
        else:
            self._words[word] &= np.uint64(_ALL_ONES ^ mask)

    def _index_masks(
        self, pages: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        array = np.asarray(pages)
        if array.size == 0:
            return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.uint64)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise BitmapShapeError(
                f"expected a 1-D integer array, got shape {array.shape} dtype {array.dtype}"
            )
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self._page_count:
            raise PageRangeError(f"page numbers {low}..{high} outside [0, {self._page_count})")
        indices = array.astype(np.intp, copy=False)
        masks = np.left_shift(np.uint64(1), (indices & 63).astype(np.uint64))
        return indices >> 6, masks

    def _tail_mask(self) -> int:
        used = self._page_count % WORD_BITS
        return _ALL_ONES if used == 0 else (1 << used) - 1

    def _mask_tail(self) -> None:
        if len(self._words):
            self._words[-1] &= np.uint64(self._tail_mask())

    def _tail_bits_set(self) -> bool:
        if not len(self._words):
            return False
        return bool(int(self._words[-1]) & (_ALL_ONES ^ self._tail_mask()))


def _single(start: int, count: int) -> ExtentArrays:
    return ExtentArrays(np.array([start], dtype=np.int64), np.array([count], dtype=np.int64))

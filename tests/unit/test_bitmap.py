"""Bitmap against a plain Python ``set`` model: every operation, plus the invariants."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dirtytrack.bitmap import (
    BITMAP_FORMAT_VERSION,
    BITMAP_MAGIC,
    Bitmap,
    Extent,
    ExtentArrays,
    _popcount_words,
    _popcount_words_table,
    split_extents,
)
from dirtytrack.errors import BitmapFormatError, BitmapShapeError, DirtyTrackError, PageRangeError

# No deadline: a slow CI machine must not turn a correct run into a failure.
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Sizes around word boundaries matter most; include empty and one-page maps.
page_counts = st.one_of(
    st.integers(min_value=0, max_value=300),
    st.sampled_from([1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 1000, 4096 + 7]),
)


@st.composite
def model_sets(draw: st.DrawFn, page_count: int) -> set[int]:
    if page_count == 0:
        return set()
    return draw(st.sets(st.integers(0, page_count - 1), max_size=page_count))


@st.composite
def bitmaps_with_model(draw: st.DrawFn) -> tuple[Bitmap, set[int]]:
    n = draw(page_counts)
    model = draw(model_sets(n))
    return Bitmap.from_indices(n, sorted(model)), model


@st.composite
def pairs_with_model(draw: st.DrawFn) -> tuple[Bitmap, set[int], Bitmap, set[int]]:
    n = draw(page_counts)
    a, b = draw(model_sets(n)), draw(model_sets(n))
    return Bitmap.from_indices(n, sorted(a)), a, Bitmap.from_indices(n, sorted(b)), b


@st.composite
def ranges(draw: st.DrawFn, page_count: int) -> tuple[int, int]:
    start = draw(st.integers(0, page_count))
    count = draw(st.integers(0, page_count - start))
    return start, count


def members(bitmap: Bitmap) -> set[int]:
    return set(bitmap.to_indices().tolist())


def tail_is_zero(bitmap: Bitmap) -> bool:
    words = bitmap.words()
    used = bitmap.page_count % 64
    if not len(words) or used == 0:
        return True
    return int(words[-1]) >> used == 0


def extents_to_set(extents: list[Extent]) -> set[int]:
    return {p for e in extents for p in range(e.start, e.end)}


# --- construction and conversion ----------------------------------------------------


@SETTINGS
@given(bitmaps_with_model())
def test_indices_round_trip(case: tuple[Bitmap, set[int]]) -> None:
    bitmap, model = case
    assert bitmap.to_indices().tolist() == sorted(model)
    assert bitmap.popcount() == len(model)
    assert bitmap.any() is bool(model)
    assert bool(bitmap) is bool(model)
    assert tail_is_zero(bitmap)


@SETTINGS
@given(bitmaps_with_model())
def test_bools_round_trip(case: tuple[Bitmap, set[int]]) -> None:
    bitmap, model = case
    flags = bitmap.to_bools()
    assert flags.dtype == np.bool_ and flags.shape == (bitmap.page_count,)
    assert set(np.flatnonzero(flags).tolist()) == model
    assert Bitmap.from_bools(flags) == bitmap


@SETTINGS
@given(bitmaps_with_model())
def test_bytes_round_trip(case: tuple[Bitmap, set[int]]) -> None:
    bitmap, _ = case
    data = bitmap.to_bytes()
    assert data[:4] == BITMAP_MAGIC
    assert len(data) == 16 + 8 * ((bitmap.page_count + 63) // 64)
    assert Bitmap.from_bytes(data) == bitmap
    assert Bitmap.from_bytes(memoryview(bytearray(data))) == bitmap


@SETTINGS
@given(bitmaps_with_model())
def test_words_round_trip_and_copy_is_independent(case: tuple[Bitmap, set[int]]) -> None:
    bitmap, model = case
    clone = Bitmap.from_words(bitmap.page_count, bitmap.words())
    assert clone == bitmap
    copy = bitmap.copy()
    if bitmap.page_count:
        copy.set(0)
        copy.clear(bitmap.page_count - 1)
        assert members(bitmap) == model


def test_full_and_empty() -> None:
    for n in (0, 1, 63, 64, 65, 200):
        full = Bitmap.full(n)
        assert full.popcount() == n
        assert tail_is_zero(full)
        assert Bitmap(n).popcount() == 0
        assert not Bitmap(n).any()
        assert list(full.extents()) == ([Extent(0, n)] if n else [])


def test_from_extents() -> None:
    bitmap = Bitmap.from_extents(200, [Extent(3, 5), Extent(60, 10), Extent(64, 2)])
    assert members(bitmap) == set(range(3, 8)) | set(range(60, 70))


def test_bytes_header_is_documented_layout() -> None:
    bitmap = Bitmap.from_indices(70, [0, 69])
    magic, version, reserved, pages = struct.unpack_from("<4sHHQ", bitmap.to_bytes())
    assert (magic, version, reserved, pages) == (BITMAP_MAGIC, BITMAP_FORMAT_VERSION, 0, 70)
    words = struct.unpack_from("<QQ", bitmap.to_bytes(), 16)
    assert words == (1, 1 << 5)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:10], "shorter than its header"),
        (lambda d: b"XXXX" + d[4:], "bad bitmap magic"),
        (lambda d: d[:4] + struct.pack("<H", 9) + d[6:], "version 9"),
        (lambda d: d[:6] + struct.pack("<H", 1) + d[8:], "reserved"),
        (lambda d: d[:-1], "needs"),
        (lambda d: d + b"\0" * 8, "needs"),
        (lambda d: d[:-8] + struct.pack("<Q", 1 << 63), "past page_count"),
    ],
)
def test_from_bytes_rejects_malformed(mutate: object, message: str) -> None:
    data = Bitmap.from_indices(70, [1, 2, 69]).to_bytes()
    assert callable(mutate)
    with pytest.raises(BitmapFormatError, match=message) as info:
        Bitmap.from_bytes(mutate(data))
    assert isinstance(info.value, DirtyTrackError) and isinstance(info.value, ValueError)


def test_from_words_rejects_bad_shape_and_tail() -> None:
    with pytest.raises(BitmapShapeError):
        Bitmap.from_words(70, np.zeros(1, dtype=np.uint64))
    with pytest.raises(BitmapFormatError):
        Bitmap.from_words(70, np.array([0, 1 << 6], dtype=np.uint64))


def test_from_bools_rejects_non_bool() -> None:
    with pytest.raises(BitmapShapeError):
        Bitmap.from_bools(np.array([0, 1, 1]))
    with pytest.raises(BitmapShapeError):
        Bitmap.from_bools(np.zeros((2, 2), dtype=bool))


# --- single pages, ranges, index arrays ---------------------------------------------


@SETTINGS
@given(st.data())
def test_set_clear_single(data: st.DataObject) -> None:
    bitmap, model = data.draw(bitmaps_with_model())
    if bitmap.page_count == 0:
        return
    page = data.draw(st.integers(0, bitmap.page_count - 1))
    bitmap.set(page)
    model.add(page)
    assert bitmap.test(page) and page in bitmap
    assert members(bitmap) == model
    bitmap.clear(page)
    model.discard(page)
    assert not bitmap.test(page) and page not in bitmap
    assert members(bitmap) == model


@SETTINGS
@given(st.data())
def test_ranges(data: st.DataObject) -> None:
    bitmap, model = data.draw(bitmaps_with_model())
    start, count = data.draw(ranges(bitmap.page_count))
    if data.draw(st.booleans()):
        bitmap.set_range(start, count)
        model |= set(range(start, start + count))
    else:
        bitmap.clear_range(start, count)
        model -= set(range(start, start + count))
    assert members(bitmap) == model
    assert tail_is_zero(bitmap)


@SETTINGS
@given(st.data())
def test_index_arrays_with_duplicates(data: st.DataObject) -> None:
    bitmap, model = data.draw(bitmaps_with_model())
    n = bitmap.page_count
    pages = data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=50)) if n else []
    if data.draw(st.booleans()):
        bitmap.set_indices(np.array(pages, dtype=np.int64))
        model |= set(pages)
    else:
        bitmap.clear_indices(np.array(pages, dtype=np.int32))
        model -= set(pages)
    assert members(bitmap) == model


def test_out_of_range_is_refused() -> None:
    bitmap = Bitmap(70)
    for call in (
        lambda: bitmap.set(70),
        lambda: bitmap.clear(-1),
        lambda: bitmap.test(70),
        lambda: bitmap.set_range(60, 11),
        lambda: bitmap.clear_range(-1, 2),
        lambda: bitmap.set_indices([0, 70]),
        lambda: bitmap.clear_indices([-1]),
    ):
        with pytest.raises(PageRangeError):
            call()
    assert not bitmap.any()
    assert 70 not in bitmap and -1 not in bitmap and "x" not in bitmap
    with pytest.raises(BitmapShapeError):
        bitmap.set_indices(np.array([1.5]))


def test_negative_page_count_refused() -> None:
    with pytest.raises(BitmapShapeError):
        Bitmap(-1)


# --- set algebra --------------------------------------------------------------------


@SETTINGS
@given(pairs_with_model())
def test_binary_operators(case: tuple[Bitmap, set[int], Bitmap, set[int]]) -> None:
    a, ma, b, mb = case
    full = set(range(a.page_count))
    assert members(a | b) == ma | mb
    assert members(a & b) == ma & mb
    assert members(a - b) == ma - mb
    assert members(a.andnot(b)) == ma - mb
    assert members(a ^ b) == ma ^ mb
    assert members(~a) == full - ma
    for result in (a | b, a & b, a - b, a ^ b, ~a):
        assert tail_is_zero(result)
    # Operators do not touch their operands.
    assert members(a) == ma and members(b) == mb


@SETTINGS
@given(pairs_with_model())
def test_in_place_operators(case: tuple[Bitmap, set[int], Bitmap, set[int]]) -> None:
    a, ma, b, mb = case
    for op, expected in (
        ("|=", ma | mb),
        ("&=", ma & mb),
        ("-=", ma - mb),
        ("^=", ma ^ mb),
    ):
        target = a.copy()
        before = id(target)
        if op == "|=":
            target |= b
        elif op == "&=":
            target &= b
        elif op == "-=":
            target -= b
        else:
            target ^= b
        assert id(target) == before
        assert members(target) == expected
        assert tail_is_zero(target)
    assert members(b) == mb


def test_mismatched_sizes_refused() -> None:
    a, b = Bitmap(64), Bitmap(65)
    with pytest.raises(BitmapShapeError):
        _ = a | b
    with pytest.raises(BitmapShapeError):
        a &= b
    assert a != b
    assert Bitmap(64) == Bitmap(64)
    assert Bitmap(64) != "not a bitmap"


def test_bitmap_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(Bitmap(3))


# --- popcount -----------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=40))
def test_popcount_paths_agree(values: list[int]) -> None:
    words = np.array(values, dtype=np.uint64)
    expected = sum(bin(v).count("1") for v in values)
    assert _popcount_words(words) == expected
    assert _popcount_words_table(words) == expected


# --- extents ------------------------------------------------------------------------


@SETTINGS
@given(bitmaps_with_model(), st.sampled_from([64, 128, 192, 1 << 20]))
def test_extents_are_maximal_sorted_runs(case: tuple[Bitmap, set[int]], chunk_pages: int) -> None:
    bitmap, model = case
    extents = list(bitmap.extents(chunk_pages=chunk_pages))
    assert extents_to_set(extents) == model
    assert sum(e.count for e in extents) == len(model)
    for prev, nxt in itertools.pairwise(extents):
        # Strictly after and not touching: touching runs would have been merged.
        assert nxt.start > prev.end
    arrays = bitmap.extent_arrays(chunk_pages=chunk_pages)
    assert list(arrays) == extents
    assert list(bitmap.extents()) == extents


@SETTINGS
@given(bitmaps_with_model(), st.integers(1, 70))
def test_extents_split_at_max_pages(case: tuple[Bitmap, set[int]], max_pages: int) -> None:
    bitmap, model = case
    extents = list(bitmap.extents(max_pages=max_pages, chunk_pages=64))
    assert all(1 <= e.count <= max_pages for e in extents)
    assert extents_to_set(extents) == model
    assert sum(e.count for e in extents) == len(model)
    assert list(bitmap.extent_arrays(max_pages=max_pages)) == extents


def test_extents_bridge_chunk_boundaries() -> None:
    bitmap = Bitmap(64 * 5)
    bitmap.set_range(60, 64 * 3)  # spans chunks 0..3 with chunk_pages=64
    bitmap.set_range(64 * 4, 64)  # ends exactly at the end of the map
    assert list(bitmap.extents(chunk_pages=64)) == [Extent(60, 192), Extent(256, 64)]
    bitmap.clear_range(64 * 4, 1)
    bitmap.set(64 * 4 - 1)
    assert list(bitmap.extents(chunk_pages=64)) == [
        Extent(60, 192),
        Extent(255, 1),
        Extent(257, 63),
    ]


def test_extents_reject_bad_chunk() -> None:
    with pytest.raises(ValueError):
        list(Bitmap(10).extents(chunk_pages=100))
    with pytest.raises(ValueError):
        split_extents(ExtentArrays(np.array([0]), np.array([3])), 0)


def test_extent_validation() -> None:
    assert Extent(5, 3).end == 8
    with pytest.raises(ValueError):
        Extent(-1, 3)
    with pytest.raises(ValueError):
        Extent(0, 0)


# --- stateful: random operation sequences against the model -------------------------


class BitmapMachine(RuleBasedStateMachine):
    """Applies random operation sequences to one bitmap and to a set, then compares."""

    def __init__(self) -> None:
        super().__init__()
        self.bitmap = Bitmap(0)
        self.model: set[int] = set()

    @initialize(n=page_counts)
    def start(self, n: int) -> None:
        self.bitmap = Bitmap(n)
        self.model = set()

    def _page(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.bitmap.page_count - 1))

    def _other(self, data: st.DataObject) -> tuple[Bitmap, set[int]]:
        other = data.draw(model_sets(self.bitmap.page_count))
        return Bitmap.from_indices(self.bitmap.page_count, sorted(other)), other

    @precondition(lambda self: self.bitmap.page_count > 0)
    @rule(data=st.data())
    def set_one(self, data: st.DataObject) -> None:
        page = self._page(data)
        self.bitmap.set(page)
        self.model.add(page)

    @precondition(lambda self: self.bitmap.page_count > 0)
    @rule(data=st.data())
    def clear_one(self, data: st.DataObject) -> None:
        page = self._page(data)
        self.bitmap.clear(page)
        self.model.discard(page)

    @rule(data=st.data(), set_bits=st.booleans())
    def range_op(self, data: st.DataObject, set_bits: bool) -> None:
        start, count = data.draw(ranges(self.bitmap.page_count))
        pages = set(range(start, start + count))
        if set_bits:
            self.bitmap.set_range(start, count)
            self.model |= pages
        else:
            self.bitmap.clear_range(start, count)
            self.model -= pages

    @rule(data=st.data(), op=st.sampled_from(["|", "&", "-", "^"]))
    def combine(self, data: st.DataObject, op: str) -> None:
        other, other_model = self._other(data)
        if op == "|":
            self.bitmap |= other
            self.model |= other_model
        elif op == "&":
            self.bitmap &= other
            self.model &= other_model
        elif op == "-":
            self.bitmap -= other
            self.model -= other_model
        else:
            self.bitmap ^= other
            self.model ^= other_model

    @rule()
    def invert(self) -> None:
        self.bitmap = ~self.bitmap
        self.model = set(range(self.bitmap.page_count)) - self.model

    @rule()
    def serialise(self) -> None:
        self.bitmap = Bitmap.from_bytes(self.bitmap.to_bytes())

    @rule()
    def through_bools(self) -> None:
        self.bitmap = Bitmap.from_bools(self.bitmap.to_bools())

    @rule()
    def through_extents(self) -> None:
        self.bitmap = Bitmap.from_extents(
            self.bitmap.page_count, self.bitmap.extents(chunk_pages=64)
        )

    @rule(set_bits=st.booleans())
    def all_pages(self, set_bits: bool) -> None:
        if set_bits:
            self.bitmap.set_all()
            self.model = set(range(self.bitmap.page_count))
        else:
            self.bitmap.clear_all()
            self.model = set()

    @invariant()
    def agrees_with_model(self) -> None:
        assert members(self.bitmap) == self.model
        assert self.bitmap.popcount() == len(self.model)
        assert self.bitmap.any() is bool(self.model)
        assert tail_is_zero(self.bitmap)


BitmapMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestBitmapMachine = BitmapMachine.TestCase

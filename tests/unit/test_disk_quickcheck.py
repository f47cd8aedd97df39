"""The downtime re-check's range arithmetic (migrate.disks.quickcheck)."""

from __future__ import annotations

from migrate.disks.quickcheck import dirty_ranges, merge, recheck_ranges

MIB = 1 << 20
CHUNK = 4 * MIB


def test_nothing_written_nothing_differed_rechecks_nothing() -> None:
    assert recheck_ranges([], [], 1 << 30, CHUNK) == []


def test_dirty_ranges_grow_to_whole_chunks_and_merge_with_differing_chunks() -> None:
    dirty = [(MIB, MIB + (64 << 10)), (9 * MIB, 9 * MIB + 1)]
    differed = [(8 * MIB, 12 * MIB), (40 * MIB, 44 * MIB)]
    assert recheck_ranges(dirty, differed, 1 << 30, CHUNK) == [
        (0, 4 * MIB),
        (8 * MIB, 12 * MIB),
        (40 * MIB, 44 * MIB),
    ]


def test_a_range_across_a_chunk_boundary_takes_both_chunks() -> None:
    assert recheck_ranges([(4 * MIB - 1, 4 * MIB + 1)], [], 1 << 30, CHUNK) == [(0, 8 * MIB)]


def test_adjacent_chunks_merge_and_the_end_is_clipped_to_the_disk() -> None:
    size = 10 * MIB  # the last chunk is short
    assert recheck_ranges([(0, 1), (4 * MIB, 4 * MIB + 1)], [(9 * MIB, 20 * MIB)], size,
                          CHUNK) == [(0, size)]  # fmt: skip


def test_empty_and_out_of_range_ranges_are_ignored() -> None:
    assert recheck_ranges([(5, 5), (20 * MIB, 30 * MIB)], [], 10 * MIB, CHUNK) == []


def test_bitmap_map_dirty_ranges_are_the_data_false_ones() -> None:
    # qemu-img map of an NBD export with x-dirty-bitmap (checked on QEMU 7.2).
    bitmap_map = [
        {"start": 0, "length": MIB, "data": True},
        {"start": MIB, "length": 65536, "data": False},
        {"start": MIB + 65536, "length": 39 * MIB, "data": True},
        {"start": 40 * MIB, "length": 262144, "data": False},
        {"start": 40 * MIB + 262144, "length": MIB, "data": False},
    ]
    assert dirty_ranges(bitmap_map) == [(MIB, MIB + 65536), (40 * MIB, 41 * MIB + 262144)]


def test_merge_sorts_and_joins_touching_ranges() -> None:
    assert merge([(10, 20), (0, 5), (5, 8), (19, 30), (40, 40)]) == [(0, 8), (10, 30)]

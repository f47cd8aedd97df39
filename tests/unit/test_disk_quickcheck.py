"""The downtime re-check's range arithmetic and its watch of the target image
(migrate.disks.quickcheck)."""

from __future__ import annotations

import os
from pathlib import Path

from migrate.disks.quickcheck import QuickCheck, dirty_ranges, merge, recheck_ranges
from tests.fakes import FakeQmp

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


def _watched(tmp_path: Path) -> tuple[QuickCheck, Path]:
    image = tmp_path / "target.qcow2"
    image.write_bytes(bytes(8192))
    check = QuickCheck(FakeQmp(), "node", "disk0", tmp_path / "source.qcow2", image)
    check._watch_target()
    return check, image


def test_a_target_image_written_behind_its_qemus_back_voids_the_fast_path(
    tmp_path: Path,
) -> None:
    check, image = _watched(tmp_path)
    with image.open("r+b") as f:  # another process: opens, writes, closes
        f.seek(4096 + 100)
        f.write(b"\xff")
    check.seal()
    assert check.tampered is not None and "written and closed" in check.tampered
    check.seal()  # idempotent
    assert "another process" in check.tampered


def test_reads_and_the_qemu_that_holds_the_image_open_do_not_void_it(tmp_path: Path) -> None:
    image = tmp_path / "target.qcow2"
    image.write_bytes(bytes(8192))
    qemu = os.open(image, os.O_RDWR)  # opened before the watch, as the target QEMU's
    try:
        check = QuickCheck(FakeQmp(), "node", "disk0", tmp_path / "source.qcow2", image)
        check._watch_target()
        os.pwrite(qemu, b"mirror", 4096)  # the mirror's writes through the target QEMU
        assert image.read_bytes()[4096:4102] == b"mirror"  # a reader (the comparison)
        check.seal()
        assert check.tampered is None
    finally:
        os.close(qemu)


def test_a_replaced_target_image_voids_the_fast_path(tmp_path: Path) -> None:
    check, image = _watched(tmp_path)
    image.rename(tmp_path / "elsewhere.qcow2")
    check.seal()
    assert check.tampered is not None and "renamed" in check.tampered


def test_an_unwatchable_target_image_voids_the_fast_path(tmp_path: Path) -> None:
    check = QuickCheck(FakeQmp(), "node", "disk0", tmp_path / "s", tmp_path / "missing")
    check._watch_target()
    check.seal()
    assert check.tampered is not None and "cannot watch" in check.tampered


def test_the_downtime_recheck_of_scattered_writes_reads_only_their_granules() -> None:
    # One 4 KiB guest write in each of 64 chunks of a 256 MiB disk: aligned to whole
    # chunks that re-read the disk; at the bitmap's granularity, 64 granules.
    from migrate.disks.quickcheck import GRANULARITY

    dirty = [(i * CHUNK + 12 * GRANULARITY, i * CHUNK + 13 * GRANULARITY) for i in range(64)]
    assert sum(h - lo for lo, h in recheck_ranges(dirty, [], 256 * MIB, CHUNK)) == 256 * MIB
    fine = recheck_ranges(dirty, [(8 * MIB, 12 * MIB)], 256 * MIB, GRANULARITY)
    assert sum(h - lo for lo, h in fine) == 63 * GRANULARITY + 4 * MIB

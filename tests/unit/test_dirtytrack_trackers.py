"""Every tracker against one contract, plus what is specific to each and to the choice.

Soft-dirty runs against ``FakeKernel``: a ``/proc`` tree in a temp directory whose
pagemap gets bit 55 when the test writes guest RAM through it, read by the real
``ProcFS`` code (offsets, short reads, decoding).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dirtytrack.bitmap import Bitmap, Extent
from dirtytrack.digest import page_digests
from dirtytrack.errors import (
    BitmapShapeError,
    ConcurrentTrackerUse,
    DirtyTrackError,
    PageRangeError,
    TrackerUnavailable,
)
from dirtytrack.ram import PAGE_SIZE, WORDS_PER_PAGE, RamMapping
from dirtytrack.trackers import (
    Baseline,
    NoFreeze,
    PageArray,
    PageDigestTracker,
    ProcFS,
    ShadowDiffTracker,
    SoftDirtyTracker,
    Tracker,
    TrackerKind,
    choose_tracker,
)
from dirtytrack.trackers.softdirty import PM_FILE, PM_PRESENT, PM_SOFT_DIRTY

PID = 4242
VMA_START = 0x7F3A_4000_0000
PAGES = 300  # not a multiple of 64 or of any chunk size used below


# --- fakes ---------------------------------------------------------------------------


class RecordingFreezer:
    """Counts freezes and tells the fake kernel whether QEMU is frozen right now."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0

    def frozen(self) -> _Frozen:
        return _Frozen(self)


class _Frozen:
    def __init__(self, freezer: RecordingFreezer) -> None:
        self.freezer = freezer

    def __enter__(self) -> None:
        self.freezer.active = True
        self.freezer.count += 1

    def __exit__(self, *exc: object) -> None:
        self.freezer.active = False


class FakeKernel(ProcFS):
    """A ``/proc`` tree for one fake QEMU process mapping the RAM file at VMA_START.

    ``guest_write`` changes RAM and marks the page present and (if supported)
    soft-dirty; ``clear_soft_dirty`` writes clear_refs for real, then clears the bits.
    """

    def __init__(
        self,
        root: Path,
        ram_path: Path,
        page_count: int,
        *,
        supported: bool = True,
        freezer: RecordingFreezer | None = None,
    ) -> None:
        super().__init__(root)
        self.supported = supported
        self.freezer = freezer
        self.page_count = page_count
        self.clears = 0
        (root / str(PID)).mkdir(parents=True)
        (root / str(PID) / "clear_refs").write_bytes(b"")
        (root / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 1048576 kB\n")
        inode = os.stat(ram_path).st_ino
        size = page_count * PAGE_SIZE
        (root / str(PID) / "maps").write_text(
            "55d0c8a00000-55d0c8b2c000 r-xp 00000000 fd:01 1311  /usr/bin/qemu-system-x86_64\n"
            "55d0ca1f3000-55d0ca6b8000 rw-p 00000000 00:00 0     [heap]\n"
            f"{VMA_START:x}-{VMA_START + size:x} rw-s 00000000 00:1a {inode}   {ram_path}\n"
            "7ffd5b0c2000-7ffd5b0e3000 rw-p 00000000 00:00 0     [stack]\n"
        )
        # Pages QEMU touched while booting are present, not soft-dirty after a clear.
        self.entries = np.full(page_count, PM_PRESENT | PM_FILE, dtype=np.uint64)
        self.entries[::7] = 0  # some never touched: no PTE
        self._flush()

    def guest_write(self, ram: PageArray, page: int, value: int) -> None:
        ram[page, :] = np.uint64(value)
        self.entries[page] |= np.uint64(PM_PRESENT | PM_FILE)
        if self.supported:
            self.entries[page] |= np.uint64(PM_SOFT_DIRTY)
        self._flush()

    def reclaim(self, page: int) -> None:
        """The PTE disappears (and with it any soft-dirty bit)."""
        self.entries[page] = 0
        self._flush()

    def clear_soft_dirty(self, pid: int | str) -> None:
        super().clear_soft_dirty(pid)
        assert (self.path(pid, "clear_refs")).read_bytes() == b"4"
        if self.freezer is not None:
            assert self.freezer.active, "clear_refs written while QEMU was running"
        self.clears += 1
        self.entries &= np.uint64(~PM_SOFT_DIRTY & ((1 << 64) - 1))
        self._flush()

    def read_pagemap(self, pid: int | str, first_vpage: int, count: int) -> npt.NDArray[np.uint64]:
        if self.freezer is not None and str(pid) == str(PID):
            assert self.freezer.active, "pagemap read while QEMU was running"
        return super().read_pagemap(pid, first_vpage, count)

    def _flush(self) -> None:
        fd = os.open(self.path(PID, "pagemap"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, self.entries.astype("<u8").tobytes(), (VMA_START // PAGE_SIZE) * 8)
        finally:
            os.close(fd)


@dataclass
class Rig:
    """One tracker under test, the RAM it watches and how to write that RAM."""

    kind: TrackerKind
    ram: PageArray
    tracker: Tracker
    write: Callable[[int, int], None]
    exact: bool  # False: may over-report (soft-dirty)


def make_ram(pages: int = PAGES, seed: int = 1) -> PageArray:
    rng = np.random.default_rng(seed)
    ram = rng.integers(0, 1 << 63, size=(pages, WORDS_PER_PAGE), dtype=np.uint64)
    ram[rng.random(pages) < 0.4] = 0  # ~40 % zero pages, like a guest after boot
    return ram


def build_rig(kind: TrackerKind, tmp_path: Path, baseline: Baseline) -> Rig:
    ram = make_ram()

    def plain_write(page: int, value: int) -> None:
        ram[page, :] = np.uint64(value)

    if kind is TrackerKind.SHADOW_DIFF:
        return Rig(
            kind, ram, ShadowDiffTracker(ram, baseline=baseline, chunk_pages=7), plain_write, True
        )
    if kind is TrackerKind.PAGE_DIGESTS:
        return Rig(
            kind, ram, PageDigestTracker(ram, baseline=baseline, chunk_pages=50), plain_write, True
        )
    ram_file = tmp_path / "ram0"
    ram_file.write_bytes(b"")
    freezer = RecordingFreezer()
    kernel = FakeKernel(tmp_path / "proc", ram_file, PAGES, freezer=freezer)
    tracker = SoftDirtyTracker(
        ram,
        pid=PID,
        ram_path=ram_file,
        baseline=baseline,
        proc=kernel,
        freezer=freezer,
        chunk_pages=64,
    )

    def kernel_write(page: int, value: int) -> None:
        kernel.guest_write(ram, page, value)

    return Rig(kind, ram, tracker, kernel_write, False)


ALL_KINDS = [TrackerKind.SHADOW_DIFF, TrackerKind.PAGE_DIGESTS, TrackerKind.SOFT_DIRTY]


@pytest.fixture(params=ALL_KINDS, ids=[k.value for k in ALL_KINDS])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    built = build_rig(request.param, tmp_path, Baseline.LIVE)
    yield built
    built.tracker.close()


def pages_of(bitmap: Bitmap) -> set[int]:
    return set(bitmap.to_indices().tolist())


def capture_all(tracker: Tracker, dirty: Bitmap, target: PageArray) -> None:
    for extent in dirty.extents(max_pages=16):
        target[extent.start : extent.end] = tracker.capture(extent)


# --- the contract ------------------------------------------------------------------


def test_live_baseline_starts_clean(rig: Rig) -> None:
    assert not rig.tracker.collect().any()
    assert rig.tracker.name == rig.kind.value
    assert rig.tracker.page_count == PAGES


def test_reports_written_pages_until_captured(rig: Rig) -> None:
    written = {0, 63, 64, 65, 128, PAGES - 1}
    for page in written:
        rig.write(page, 0xDEAD_0000 + page)
    assert pages_of(rig.tracker.collect()) == written
    # Collect does not move the baseline.
    assert pages_of(rig.tracker.collect()) == written
    data = rig.tracker.capture(Extent(63, 3))
    assert np.array_equal(data, rig.ram[63:66])
    assert pages_of(rig.tracker.collect()) == written - {63, 64, 65}


def test_capture_into_buffer_and_bounds(rig: Rig) -> None:
    rig.write(10, 7)
    out = np.zeros((8, WORDS_PER_PAGE), dtype=np.uint64)
    data = rig.tracker.capture(Extent(9, 3), out=out)
    assert data.shape == (3, WORDS_PER_PAGE)
    assert np.shares_memory(data, out)
    assert np.array_equal(out[:3], rig.ram[9:12])
    with pytest.raises(PageRangeError):
        rig.tracker.capture(Extent(PAGES - 1, 2))
    with pytest.raises(BitmapShapeError):
        rig.tracker.capture(Extent(0, 9), out=out)
    with pytest.raises(BitmapShapeError):
        rig.tracker.capture(Extent(0, 2), out=np.zeros((2, 512), dtype=np.int64))


def test_rewrite_back_after_capture_is_still_reported(rig: Rig) -> None:
    """A page that changes A -> B, is sent as B, then changes back to A must be resent."""
    page = 77
    original = int(rig.ram[page, 0])
    rig.write(page, 0xB)
    assert page in rig.tracker.collect()
    sent = rig.tracker.capture(Extent(page, 1))
    assert int(sent[0, 0]) == 0xB
    rig.write(page, original)  # back to A: the target holds B
    assert page in rig.tracker.collect()


def test_write_between_collect_and_capture_is_sent(rig: Rig) -> None:
    rig.write(5, 1)
    dirty = rig.tracker.collect()
    rig.write(5, 2)  # lands before the sender copies the page
    sent = rig.tracker.capture(Extent(5, 1))
    assert int(sent[0, 0]) == 2
    assert 5 not in rig.tracker.collect() or not rig.exact
    assert 5 in dirty


def test_reset_selected_and_all(rig: Rig) -> None:
    for page in (3, 4, 200):
        rig.write(page, 0xABC + page)
    rig.tracker.reset(Bitmap.from_indices(PAGES, [3, 200]))
    assert pages_of(rig.tracker.collect()) == {4}
    rig.tracker.reset()
    assert not rig.tracker.collect().any()
    with pytest.raises(BitmapShapeError):
        rig.tracker.reset(Bitmap(PAGES + 1))


def test_same_bytes_rewrite(rig: Rig) -> None:
    page = 42
    rig.write(page, 9)
    rig.tracker.reset()
    rig.write(page, 9)  # identical content
    reported = page in rig.tracker.collect()
    # Content trackers see no change; soft-dirty sees a write (allowed over-report).
    assert reported is (not rig.exact)


def test_precopy_loop_converges_to_identical_target(rig: Rig) -> None:
    """Rounds of writes racing the sender, then a stopped final round: target == source."""
    rng = np.random.default_rng(7)
    target = np.zeros_like(rig.ram)
    target[:] = rig.ram  # LIVE baseline: the target starts identical
    for round_number in range(6):
        for page in rng.choice(PAGES, 20, replace=False).tolist():
            rig.write(page, int(rng.integers(0, 4)))  # small values: A-B-A rewrites happen
        dirty = rig.tracker.collect()
        for extent in dirty.extents(max_pages=8):
            target[extent.start : extent.end] = rig.tracker.capture(extent)
            # The guest keeps running while the sender works.
            rig.write(int(rng.integers(0, PAGES)), round_number)
    # Switchover: the guest is stopped, one last collect and copy.
    capture_all(rig.tracker, rig.tracker.collect(), target)
    assert np.array_equal(target, rig.ram)
    assert not rig.tracker.collect().any()


def test_capture_pages_batches_scattered_pages(rig: Rig) -> None:
    written = [2, 3, 4, 90, 150, 151, PAGES - 1]
    for page in written:
        rig.write(page, 0x5150 + page)
    assert pages_of(rig.tracker.collect()) == set(written)  # a sender collects first
    pages = np.array([2, 3, 90, 151, PAGES - 1], dtype=np.int64)
    out = np.zeros((8, WORDS_PER_PAGE), dtype=np.uint64)
    data = rig.tracker.capture_pages(pages, out=out)
    assert data.shape == (5, WORDS_PER_PAGE) and np.shares_memory(data, out)
    assert np.array_equal(data, rig.ram[pages])
    # Captured pages are the baseline now; the others are still reported.
    assert pages_of(rig.tracker.collect()) == {4, 150}
    # Written again after the capture: reported again.
    rig.write(90, 1)
    assert 90 in rig.tracker.collect()
    assert rig.tracker.capture_pages(np.empty(0, dtype=np.int64)).shape == (0, WORDS_PER_PAGE)


def test_collect_range_is_collect_restricted_to_the_range(rig: Rig) -> None:
    written = [0, 1, 63, 64, 130, 131, 250, PAGES - 1]
    for page in written:
        rig.write(page, 0x77 + page)
    full = rig.tracker.collect().to_indices()
    for start, count in [(0, PAGES), (0, 1), (1, 63), (60, 80), (131, 1), (200, PAGES - 200)]:
        found = rig.tracker.collect_range(Extent(start, count))
        expected = full[(full >= start) & (full < start + count)]
        assert found.dtype == np.int64 and np.array_equal(found, expected), (start, count)
    # A sweep: range by range, capture what each range reports; nothing is left.
    for start in range(0, PAGES, 64):
        dirty = rig.tracker.collect_range(Extent(start, min(64, PAGES - start)))
        rig.tracker.capture_pages(dirty)
    assert not rig.tracker.collect().any()
    with pytest.raises(PageRangeError):
        rig.tracker.collect_range(Extent(PAGES - 1, 2))


def test_capture_pages_refuses_bad_batches(rig: Rig) -> None:
    with pytest.raises(PageRangeError):
        rig.tracker.capture_pages(np.array([1, PAGES], dtype=np.int64))
    with pytest.raises(PageRangeError):
        rig.tracker.capture_pages(np.array([-1, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="increasing"):
        rig.tracker.capture_pages(np.array([5, 5], dtype=np.int64))
    with pytest.raises(BitmapShapeError):
        rig.tracker.capture_pages(np.arange(4), out=np.zeros((3, WORDS_PER_PAGE), np.uint64))


def test_precopy_loop_with_batched_capture(rig: Rig) -> None:
    """The pre-copy loop a sender runs: collect, capture_pages in batches, final stop."""
    rng = np.random.default_rng(11)
    target = rig.ram.copy()
    for _round in range(5):
        for page in rng.choice(PAGES, 30, replace=False).tolist():
            rig.write(page, int(rng.integers(0, 3)))
        dirty = rig.tracker.collect().to_indices()
        for first in range(0, len(dirty), 7):
            batch = dirty[first : first + 7]
            target[batch] = rig.tracker.capture_pages(batch)
            rig.write(int(rng.integers(0, PAGES)), int(rng.integers(0, 3)))
    final = rig.tracker.collect().to_indices()
    target[final] = rig.tracker.capture_pages(final)
    assert np.array_equal(target, rig.ram)
    assert not rig.tracker.collect().any()


def test_closed_tracker_refuses(rig: Rig) -> None:
    rig.tracker.close()
    with pytest.raises(DirtyTrackError, match="closed"):
        rig.tracker.collect()


@pytest.mark.parametrize("kind", ALL_KINDS, ids=[k.value for k in ALL_KINDS])
def test_zero_baseline_first_collect(kind: TrackerKind, tmp_path: Path) -> None:
    built = build_rig(kind, tmp_path, Baseline.ZERO)
    nonzero = set(np.flatnonzero(built.ram.any(axis=1)).tolist())
    first = pages_of(built.tracker.collect())
    if built.exact:
        assert first == nonzero  # zero pages never travel
    else:
        assert first == set(range(PAGES))  # the kernel cannot tell zero pages apart
    target = np.zeros_like(built.ram)
    capture_all(built.tracker, built.tracker.collect(), target)
    assert np.array_equal(target, built.ram)
    assert not built.tracker.collect().any()


class BlockingShadow(ShadowDiffTracker):
    """Holds its collect open until released, to prove overlap is refused."""

    def __init__(self, ram: PageArray) -> None:
        super().__init__(ram)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _collect(self) -> Bitmap:
        self.entered.set()
        self.release.wait()
        return super()._collect()


def test_concurrent_use_is_refused() -> None:
    tracker = BlockingShadow(make_ram())
    results: list[Bitmap] = []
    worker = threading.Thread(target=lambda: results.append(tracker.collect()))
    worker.start()
    try:
        assert tracker.entered.wait(timeout=30)
        with pytest.raises(ConcurrentTrackerUse):
            tracker.collect()
        with pytest.raises(ConcurrentTrackerUse):
            tracker.capture(Extent(0, 1))
    finally:
        tracker.release.set()
        worker.join()
    assert len(results) == 1
    # Sequential use from another thread is fine: confinement is about overlap.
    assert tracker.collect() == results[0]


# --- shadow diff ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk_pages", [1, 7, 64, 300, 5000])
def test_shadow_chunking_does_not_change_result(chunk_pages: int) -> None:
    ram = make_ram()
    tracker = ShadowDiffTracker(ram, baseline=Baseline.LIVE, chunk_pages=chunk_pages)
    ram[[0, 6, 7, 299], 100] ^= np.uint64(1)
    assert pages_of(tracker.collect()) == {0, 6, 7, 299}
    # Scratch is bounded by the chunk, the shadow is one copy of RAM.
    assert tracker.memory_overhead_bytes == ram.nbytes + min(chunk_pages, PAGES) * WORDS_PER_PAGE


@pytest.mark.parametrize(("threads", "chunk_pages"), [(2, 7), (3, 64), (4, 300), (8, 1)])
def test_parallel_shadow_scan_finds_the_same_pages(threads: int, chunk_pages: int) -> None:
    ram = make_ram()
    serial = ShadowDiffTracker(ram, baseline=Baseline.LIVE, chunk_pages=chunk_pages)
    parallel = ShadowDiffTracker(
        ram, baseline=Baseline.LIVE, chunk_pages=chunk_pages, threads=threads
    )
    rng = np.random.default_rng(threads)
    for _ in range(3):
        for page in rng.choice(PAGES, 25, replace=False).tolist():
            ram[page, int(rng.integers(0, WORDS_PER_PAGE))] ^= np.uint64(1)
        found = parallel.collect()
        assert found == serial.collect()
        part = Extent(3, PAGES - 10)
        assert np.array_equal(parallel.collect_range(part), serial.collect_range(part))
        dirty = found.to_indices()
        parallel.capture_pages(dirty)
        serial.capture_pages(dirty)
    assert not parallel.collect().any()
    parallel.close()
    serial.close()
    with pytest.raises(ValueError):
        ShadowDiffTracker(ram, threads=0)


def test_shadow_detects_a_single_bit_anywhere_in_a_page() -> None:
    ram = make_ram(pages=4)
    tracker = ShadowDiffTracker(ram, baseline=Baseline.LIVE)
    for word in (0, 255, 511):
        for bit in (0, 31, 63):
            ram[2, word] ^= np.uint64(1 << bit)
            assert pages_of(tracker.collect()) == {2}
            tracker.reset()


def test_shadow_on_a_real_ram_file(tmp_path: Path) -> None:
    """Read-only RamMapping on the source; writes arrive through QEMU's (here: ours) mapping."""
    path = tmp_path / "ram0"
    path.write_bytes(bytes(64 * PAGE_SIZE))
    with RamMapping(path, writable=True) as qemu_side, RamMapping(path) as engine_side:
        tracker = ShadowDiffTracker(engine_side, baseline=Baseline.ZERO)
        try:
            assert not tracker.collect().any()
            qemu_side.pages()[[1, 40], 3] = np.uint64(5)
            assert pages_of(tracker.collect()) == {1, 40}
            assert tracker.capture(Extent(40, 1))[0, 3] == 5
            assert pages_of(tracker.collect()) == {1}
        finally:
            tracker.close()  # releases the view so the mapping can close


def test_shadow_rejects_bad_arrays() -> None:
    with pytest.raises(BitmapShapeError):
        ShadowDiffTracker(np.zeros((4, 256), dtype=np.uint64))
    with pytest.raises(BitmapShapeError):
        ShadowDiffTracker(np.zeros((4, 512), dtype=np.uint32))
    with pytest.raises(BitmapShapeError):
        ShadowDiffTracker(np.zeros((4, 1024), dtype=np.uint64)[:, ::2])
    with pytest.raises(ValueError):
        ShadowDiffTracker(make_ram(), chunk_pages=0)


# --- page digests --------------------------------------------------------------------


def test_digests_are_seeded_xxh3_of_each_page() -> None:
    ram = make_ram()
    tracker = PageDigestTracker(ram, baseline=Baseline.LIVE, seed=1234)
    expected = page_digests(ram.data.cast("B"), seed=1234)
    assert np.array_equal(tracker.digests(), expected)
    assert tracker.seed == 1234
    assert tracker.memory_overhead_bytes == 8 * PAGES + 8 * min(4096, PAGES)
    assert not tracker.digests().flags.writeable


def test_digest_seeds_differ_between_trackers() -> None:
    ram = make_ram(pages=2)
    assert PageDigestTracker(ram).seed != PageDigestTracker(ram).seed


def test_page_digests_yielding_matches_plain() -> None:
    ram = make_ram()
    plain = page_digests(ram.data.cast("B"))
    assert np.array_equal(page_digests(ram.data.cast("B"), yield_every_pages=7), plain)
    with pytest.raises(ValueError):
        page_digests(memoryview(bytes(PAGE_SIZE + 1)))
    with pytest.raises(ValueError):
        page_digests(memoryview(bytes(PAGE_SIZE)), out=np.zeros(2, dtype=np.uint64))


# --- soft-dirty through the fake kernel -----------------------------------------------


def soft_dirty_rig(
    tmp_path: Path, **kernel_args: bool
) -> tuple[PageArray, FakeKernel, SoftDirtyTracker]:
    ram = make_ram()
    ram_file = tmp_path / "ram0"
    ram_file.write_bytes(b"")
    freezer = RecordingFreezer()
    kernel = FakeKernel(tmp_path / "proc", ram_file, PAGES, freezer=freezer, **kernel_args)
    tracker = SoftDirtyTracker(
        ram, pid=PID, ram_path=ram_file, baseline=Baseline.LIVE, proc=kernel, freezer=freezer
    )
    return ram, kernel, tracker


def test_soft_dirty_reads_and_clears_while_frozen(tmp_path: Path) -> None:
    ram, kernel, tracker = soft_dirty_rig(tmp_path)
    assert kernel.clears == 1  # LIVE baseline clears once at start
    kernel.guest_write(ram, 9, 1)
    assert pages_of(tracker.collect()) == {9}
    assert kernel.clears == 2
    assert kernel.freezer is not None and kernel.freezer.count == 2
    # Bits were cleared, but the page stays pending until captured.
    assert pages_of(tracker.collect()) == {9}
    tracker.capture(Extent(9, 1))
    assert not tracker.collect().any()
    assert tracker.memory_overhead_bytes == 2 * 8 * ((PAGES + 63) // 64)


def test_soft_dirty_counts_a_vanished_pte_as_dirty(tmp_path: Path) -> None:
    _ram, kernel, tracker = soft_dirty_rig(tmp_path)
    present_page = 1  # entries[::7] start absent, so page 1 is present
    kernel.reclaim(present_page)
    assert pages_of(tracker.collect()) == {present_page}


def test_soft_dirty_on_kernel_without_support_sees_nothing(tmp_path: Path) -> None:
    """What this lab's kernel does: writes never set bit 55 (why the probe exists)."""
    ram, kernel, tracker = soft_dirty_rig(tmp_path, supported=False)
    kernel.guest_write(ram, 9, 1)
    assert not tracker.collect().any()


# --- choosing --------------------------------------------------------------------------


def test_choose_falls_back_without_pid() -> None:
    choice = choose_tracker(make_ram(), memory_budget_bytes=1 << 30)
    assert choice.kind is TrackerKind.PAGE_DIGESTS
    assert isinstance(choice.tracker, PageDigestTracker)
    assert [r.kind for r in choice.rejected] == [TrackerKind.SOFT_DIRTY]
    assert "no QEMU pid" in choice.reason
    summary = choice.to_dict()
    assert summary["tracker"] == "page-digests"
    assert summary["rejected"] == [{"tracker": "soft-dirty", "reason": "no QEMU pid given"}]


def test_choose_honours_preference_and_budget() -> None:
    ram = make_ram()
    shadow_first = choose_tracker(
        ram,
        preference=[TrackerKind.SHADOW_DIFF, TrackerKind.PAGE_DIGESTS],
        memory_budget_bytes=1 << 30,
    )
    assert shadow_first.kind is TrackerKind.SHADOW_DIFF and not shadow_first.rejected
    tight = choose_tracker(
        ram,
        preference=[TrackerKind.SHADOW_DIFF, TrackerKind.PAGE_DIGESTS],
        memory_budget_bytes=PAGES * 8,
    )
    assert tight.kind is TrackerKind.PAGE_DIGESTS
    assert "budget" in tight.rejected[0].reason
    with pytest.raises(TrackerUnavailable, match="no dirty-page tracker usable"):
        choose_tracker(ram, memory_budget_bytes=10)
    with pytest.raises(ValueError):
        choose_tracker(ram, preference=[])
    with pytest.raises(ValueError):
        choose_tracker(ram, preference=[TrackerKind.SHADOW_DIFF, TrackerKind.SHADOW_DIFF])


class ProbeKernel(FakeKernel):
    """Also answers the probe's read of this process's own pagemap."""

    def read_pagemap(self, pid: int | str, first_vpage: int, count: int) -> npt.NDArray[np.uint64]:
        if pid == "self":
            bits = PM_PRESENT | (PM_SOFT_DIRTY if self.supported else 0)
            return np.full(count, bits, dtype=np.uint64)
        return super().read_pagemap(pid, first_vpage, count)

    def clear_soft_dirty(self, pid: int | str) -> None:
        if pid != "self":
            super().clear_soft_dirty(pid)


@pytest.mark.parametrize("supported", [True, False])
def test_choose_uses_soft_dirty_when_the_kernel_has_it(tmp_path: Path, supported: bool) -> None:
    ram_file = tmp_path / "ram0"
    ram_file.write_bytes(b"")
    kernel = ProbeKernel(tmp_path / "proc", ram_file, PAGES, supported=supported)
    choice = choose_tracker(
        make_ram(), qemu_pid=PID, ram_path=ram_file, proc=kernel, freezer=NoFreeze()
    )
    if supported:
        assert choice.kind is TrackerKind.SOFT_DIRTY and not choice.rejected
        assert choice.tracker.collect().popcount() == PAGES  # ZERO baseline: all pages
    else:
        assert choice.kind is TrackerKind.PAGE_DIGESTS
        assert "CONFIG_MEM_SOFT_DIRTY" in choice.rejected[0].reason


def test_choose_on_this_host_with_a_real_ram_file(tmp_path: Path) -> None:
    """Real /proc and kernel: this process stands in for QEMU, mapping the RAM file.

    On a kernel with soft-dirty the choice is soft-dirty; on these lab machines the
    probe refuses it and page digests take over. Either way, writes are tracked.
    """
    path = Path("/dev/shm") / f"livemig-test-{os.getpid()}-{tmp_path.name}"
    path.write_bytes(bytes(32 * PAGE_SIZE))
    try:
        with RamMapping(path, writable=True) as ram:
            choice = choose_tracker(ram, qemu_pid=os.getpid(), freezer=NoFreeze())
            try:
                if choice.kind is not TrackerKind.SOFT_DIRTY:
                    assert choice.kind is TrackerKind.PAGE_DIGESTS
                    assert choice.rejected[0].kind is TrackerKind.SOFT_DIRTY
                    assert choice.rejected[0].reason
                choice.tracker.reset()
                ram.pages()[17, 0] = np.uint64(1)
                assert 17 in choice.tracker.collect()
            finally:
                choice.tracker.close()
    finally:
        path.unlink()

"""The tracker interface shared by every dirty-page tracker.

A tracker answers one question for the pre-copy loop: which pages of guest RAM may
differ from what the target last received (the *baseline*)? The contract:

- :meth:`Tracker.collect` returns those pages. It never under-reports; it may
  over-report (soft-dirty reports a page rewritten with identical bytes). It does
  not move the baseline: a page stays reported until it is captured or reset.
- :meth:`Tracker.capture` copies an extent of live pages into a buffer *and* makes
  that copy the baseline for those pages, then returns it; the sender sends exactly
  those bytes. Reading the page once for both purposes is what makes the loop
  correct while the guest runs: a page rewritten after the copy differs from the
  baseline and is reported again, even if the guest later writes the old bytes
  back (a lock word going 0 → 1 → 0), which "send, then refresh the baseline from
  live RAM" would miss.
- :meth:`Tracker.reset` makes the *current* live content the baseline (all pages,
  or those in a bitmap). Only correct when that content cannot change between the
  caller's send and the reset, e.g. with the VM stopped, or to declare a target
  already identical.

``Baseline.ZERO`` (the default) assumes the target starts with zero-filled RAM (a
fresh ``memory-backend-file``), so the first collect returns every non-zero page and
zero pages never travel.

Trackers are thread-confined: the engine creates one, then calls it from one worker
thread at a time (numpy and xxhash work must stay off the event loop). Overlapping
calls from two threads raise :class:`~dirtytrack.errors.ConcurrentTrackerUse`
instead of corrupting the baseline. A tracker holds a view of the RAM mapping, so
close the tracker (or drop it) before closing the :class:`~dirtytrack.ram.RamMapping`.
"""

from __future__ import annotations

import abc
import enum
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import ClassVar, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from dirtytrack.bitmap import Bitmap, Extent
from dirtytrack.errors import (
    BitmapShapeError,
    ConcurrentTrackerUse,
    DirtyTrackError,
    PageRangeError,
)
from dirtytrack.ram import PAGE_SIZE, WORDS_PER_PAGE, RamMapping

PageArray: TypeAlias = npt.NDArray[np.uint64]
"""Guest RAM as a ``(page_count, 512)`` array of uint64 words, one row per 4 KiB page."""

#: Pages reset from live RAM per step in :meth:`Tracker.reset` (16 MiB).
RESET_CHUNK_PAGES: Final = 4096


class Baseline(enum.Enum):
    """What the target is assumed to hold when the tracker starts."""

    ZERO = "zero"
    """Zero-filled RAM: the first collect returns every non-zero page."""
    LIVE = "live"
    """The current live content: the first collect returns only pages changed since."""


class TrackerKind(enum.StrEnum):
    """Tracker implementations, named as they appear in reports and events."""

    SOFT_DIRTY = "soft-dirty"
    PAGE_DIGESTS = "page-digests"
    SHADOW_DIFF = "shadow-diff"


def as_page_array(ram: RamMapping | PageArray) -> PageArray:
    """View ``ram`` as a ``(pages, 512)`` uint64 array without copying.

    Raises :class:`BitmapShapeError` for an array of another dtype or shape, and
    :class:`~dirtytrack.errors.RamMappingError` for a mapping that is not open.
    """
    pages = ram.pages() if isinstance(ram, RamMapping) else ram
    if pages.dtype != np.uint64 or pages.ndim != 2 or pages.shape[1] != WORDS_PER_PAGE:
        raise BitmapShapeError(
            f"RAM must be a (pages, {WORDS_PER_PAGE}) uint64 array, "
            f"got shape {pages.shape} dtype {pages.dtype}"
        )
    if not pages.flags.c_contiguous:
        raise BitmapShapeError("RAM array must be C-contiguous (one page per row)")
    return pages


class Tracker(abc.ABC):
    """Finds pages whose content may differ from the target's copy (see module doc).

    Subclasses implement :meth:`_collect`, :meth:`_commit` and
    :attr:`memory_overhead_bytes`; the public methods add argument checks and the
    thread-confinement guard.
    """

    kind: ClassVar[TrackerKind]

    def __init__(self, ram: RamMapping | PageArray) -> None:
        self._pages: PageArray | None = as_page_array(ram)
        self._page_count = int(self._pages.shape[0])
        self._busy = threading.Lock()

    # --- public interface ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The tracker kind as text, e.g. ``"shadow-diff"``."""
        return self.kind.value

    @property
    def page_count(self) -> int:
        """Pages of guest RAM tracked (4 KiB each)."""
        return self._page_count

    @property
    @abc.abstractmethod
    def memory_overhead_bytes(self) -> int:
        """Memory this tracker holds beyond the RAM mapping, in bytes."""

    def collect(self) -> Bitmap:
        """Pages that may differ from the baseline; the baseline is unchanged.

        Raises :class:`ConcurrentTrackerUse` if another call is running, and
        :class:`DirtyTrackError` subclasses for tracker-specific failures.
        """
        with self._exclusive():
            self._live()  # refuses a closed tracker
            return self._collect()

    def collect_range(self, extent: Extent) -> npt.NDArray[np.int64]:
        """Page numbers inside ``extent`` that may differ from the baseline.

        The :meth:`collect` contract for part of RAM (sorted, absolute page
        numbers; the baseline is unchanged): a sender sweeping RAM range by range
        can send one range while it scans the next. Raises :class:`PageRangeError`
        for an extent outside RAM.
        """
        with self._exclusive():
            self._live()
            self._check_extent(extent)
            return self._collect_range(extent.start, extent.end)

    def capture(self, extent: Extent, out: PageArray | None = None) -> PageArray:
        """Copy the live pages of ``extent`` and make that copy their baseline.

        Returns ``out[:extent.count]`` (or a new ``(count, 512)`` array): the bytes to
        send. Split big dirty runs (``Bitmap.extents(max_pages=...)``) to bound the
        buffer. Raises :class:`PageRangeError` if the extent lies outside RAM and
        :class:`BitmapShapeError` if ``out`` is too small or of the wrong type.
        """
        with self._exclusive():
            live = self._live()
            self._check_extent(extent)
            data = self._out_rows(extent.count, out)
            np.copyto(data, live[extent.start : extent.end])
            self._commit(extent.start, data)
            return data

    def capture_pages(
        self, pages: npt.NDArray[np.int64], out: PageArray | None = None
    ) -> PageArray:
        """:meth:`capture` for a batch of scattered pages, in one call.

        ``pages`` must be strictly increasing page numbers; row ``i`` of the result
        is page ``pages[i]``, copied once and made its baseline (same contract as
        :meth:`capture`). A sender batches a dirty bitmap's pages this way instead
        of paying one call per small extent. Raises :class:`PageRangeError` for a
        page outside RAM, :class:`ValueError` for unsorted or repeated pages and
        :class:`BitmapShapeError` if ``out`` is too small or of the wrong type.
        """
        with self._exclusive():
            live = self._live()
            pages = np.asarray(pages, dtype=np.int64)
            count = len(pages)
            if count and (pages[0] < 0 or pages[-1] >= self._page_count):
                raise PageRangeError(
                    f"pages {int(pages[0])}..{int(pages[-1])} outside RAM of "
                    f"{self._page_count} pages"
                )
            if count > 1 and int(np.diff(pages).min()) < 1:
                raise ValueError("capture_pages needs strictly increasing page numbers")
            data = self._out_rows(count, out)
            # Range checked above, so "clip" only skips numpy's buffered bounds check.
            if count:
                np.take(live, pages, axis=0, out=data, mode="clip")
                self._commit_pages(pages, data)
            return data

    def reset(self, pages: Bitmap | None = None) -> None:
        """Make the current live content the baseline, for ``pages`` or for all pages.

        See the module doc for when this is safe. Raises :class:`BitmapShapeError`
        if ``pages`` covers a different number of pages.
        """
        with self._exclusive():
            self._live()
            if pages is not None and pages.page_count != self._page_count:
                raise BitmapShapeError(
                    f"reset bitmap has {pages.page_count} pages, tracker has {self._page_count}"
                )
            self._reset(pages)

    def close(self) -> None:
        """Drop the RAM view and baseline memory; the tracker is unusable afterwards."""
        with self._exclusive():
            self._pages = None
            self._release()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pages={self._page_count})"

    # --- for subclasses -----------------------------------------------------------

    @staticmethod
    def _out_rows(count: int, out: PageArray | None) -> PageArray:
        if out is None:
            return np.empty((count, WORDS_PER_PAGE), dtype=np.uint64)
        if (
            out.dtype != np.uint64
            or out.ndim != 2
            or out.shape[1] != WORDS_PER_PAGE
            or out.shape[0] < count
            or not out.flags.c_contiguous
        ):
            raise BitmapShapeError(
                f"out must be a C-contiguous (>= {count}, {WORDS_PER_PAGE}) "
                f"uint64 array, got shape {out.shape} dtype {out.dtype}"
            )
        return out[:count]

    def _commit_pages(self, pages: npt.NDArray[np.int64], data: PageArray) -> None:
        """Record rows of ``data`` as the content of ``pages`` (sorted, unique).

        The default commits each run of consecutive pages; subclasses override it
        with one vectorised update.
        """
        if len(pages) == 0:
            return
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        bounds = [0, *breaks.tolist(), len(pages)]
        for first, last in itertools.pairwise(bounds):
            self._commit(int(pages[first]), data[first:last])

    @abc.abstractmethod
    def _collect(self) -> Bitmap: ...

    def _collect_range(self, start: int, end: int) -> npt.NDArray[np.int64]:
        """Dirty pages in ``[start, end)``. The default collects everything and keeps
        the range (right for every tracker); scanning trackers override it."""
        return np.flatnonzero(self._collect().to_bools()[start:end]).astype(np.int64) + start

    @abc.abstractmethod
    def _commit(self, start: int, data: PageArray) -> None:
        """Record ``data`` (rows = pages from ``start``) as the target's content."""

    def _reset(self, pages: Bitmap | None) -> None:
        live = self._live()
        if pages is None:
            for start in range(0, self._page_count, RESET_CHUNK_PAGES):
                end = min(start + RESET_CHUNK_PAGES, self._page_count)
                self._commit(start, live[start:end])
            return
        for extent in pages.extents(max_pages=RESET_CHUNK_PAGES):
            self._commit(extent.start, live[extent.start : extent.end])

    @abc.abstractmethod
    def _release(self) -> None:
        """Free baseline memory on close."""

    def _live(self) -> PageArray:
        if self._pages is None:
            raise DirtyTrackError(f"{self.name} tracker is closed")
        return self._pages

    def _check_extent(self, extent: Extent) -> None:
        if extent.end > self._page_count:
            raise PageRangeError(
                f"extent {extent.start}+{extent.count} outside RAM of {self._page_count} pages"
            )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise ConcurrentTrackerUse(
                f"{self.name} tracker entered from two threads at once; "
                "trackers are thread-confined"
            )
        try:
            yield
        finally:
            self._busy.release()


__all__ = [
    "PAGE_SIZE",
    "Baseline",
    "PageArray",
    "Tracker",
    "TrackerKind",
    "as_page_array",
]

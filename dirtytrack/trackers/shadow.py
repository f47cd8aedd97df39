"""Shadow-diff tracker: compare live RAM against a copy of what was last sent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import numpy.typing as npt

from dirtytrack.bitmap import Bitmap
from dirtytrack.ram import WORDS_PER_PAGE, RamMapping
from dirtytrack.trackers.base import Baseline, PageArray, Tracker, TrackerKind

#: Pages compared per step: 4 MiB of RAM and a 2 MiB boolean temporary. Larger
#: chunks gain nothing measurable; much smaller ones pay Python overhead per step.
DEFAULT_SHADOW_CHUNK_PAGES: Final = 1024


class ShadowDiffTracker(Tracker):
    """Keeps a full copy (the *shadow*) of the target's RAM and diffs against it.

    Memory: one byte of shadow per byte of guest RAM, plus ``chunk_pages`` x 512
    bytes of scratch. With ``Baseline.ZERO`` the shadow starts as untouched zero
    memory (``calloc``), so it only becomes resident as pages are captured.
    CPU: one vectorised compare per chunk; numpy releases the GIL while comparing,
    so a scan in a worker thread does not stall the event loop.

    ``threads`` > 1 splits a collect into that many page ranges compared in
    parallel (memory-bound: ~15 GB/s on one core, ~21 GB/s with two here); the
    tracker is still called from one thread at a time. ``reset(pages)``
    refreshes the shadow of just those pages from live RAM; :meth:`capture` is
    the race-free way for a sender (see :mod:`dirtytrack.trackers.base`). Raises
    :class:`ValueError` for ``chunk_pages`` or ``threads`` < 1.
    """

    kind = TrackerKind.SHADOW_DIFF

    def __init__(
        self,
        ram: RamMapping | PageArray,
        *,
        baseline: Baseline = Baseline.ZERO,
        chunk_pages: int = DEFAULT_SHADOW_CHUNK_PAGES,
        threads: int = 1,
    ) -> None:
        super().__init__(ram)
        if chunk_pages < 1 or threads < 1:
            raise ValueError(f"chunk_pages and threads must be >= 1, got {chunk_pages}, {threads}")
        self._chunk_pages = chunk_pages
        self._shadow: PageArray = np.zeros((self.page_count, WORDS_PER_PAGE), dtype=np.uint64)
        # One scratch buffer per scanning thread.
        self._threads = max(1, min(threads, -(-self.page_count // chunk_pages)))
        self._scratch = np.empty(
            (self._threads, min(chunk_pages, self.page_count), WORDS_PER_PAGE), dtype=np.bool_
        )
        self._pool = (
            ThreadPoolExecutor(self._threads, thread_name_prefix="shadow-diff")
            if self._threads > 1
            else None
        )
        if baseline is Baseline.LIVE:
            self._reset(None)

    @property
    def memory_overhead_bytes(self) -> int:
        return int(self._shadow.nbytes + self._scratch.nbytes)

    def _collect(self) -> Bitmap:
        return Bitmap.from_bools(self._scan(0, self.page_count))

    def _collect_range(self, start: int, end: int) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self._scan(start, end)).astype(np.int64) + start

    def _scan(self, first: int, last: int) -> npt.NDArray[np.bool_]:
        """Dirty flags of pages ``[first, last)``, split over the threads."""
        live = self._live()
        dirty = np.empty(last - first, dtype=np.bool_)
        chunks = -(-(last - first) // self._chunk_pages)
        parts = min(self._threads, chunks)
        if self._pool is None or parts < 2:
            self._compare(live, dirty, first, first, last, 0)
            return dirty
        # Contiguous ranges on chunk boundaries, one per thread.
        bounds = [
            min(last, first + (chunks * i // parts) * self._chunk_pages) for i in range(parts + 1)
        ]
        futures = [
            self._pool.submit(self._compare, live, dirty, first, bounds[i], bounds[i + 1], i)
            for i in range(parts)
        ]
        for future in futures:
            future.result()
        return dirty

    def _compare(
        self,
        live: PageArray,
        dirty: npt.NDArray[np.bool_],
        origin: int,
        first: int,
        last: int,
        slot: int,
    ) -> None:
        """Flags of pages ``[first, last)`` into ``dirty[first - origin:...]``."""
        scratch = self._scratch[slot]
        for start in range(first, last, self._chunk_pages):
            end = min(start + self._chunk_pages, last)
            unequal = scratch[: end - start]
            np.not_equal(live[start:end], self._shadow[start:end], out=unequal)
            # 512 bools of a page viewed as 64 words: a cheaper reduction per page.
            np.any(unequal.view(np.uint64), axis=1, out=dirty[start - origin : end - origin])

    def _commit(self, start: int, data: PageArray) -> None:
        self._shadow[start : start + len(data)] = data

    def _commit_pages(self, pages: npt.NDArray[np.int64], data: PageArray) -> None:
        self._shadow[pages] = data

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._shadow = np.zeros((0, WORDS_PER_PAGE), dtype=np.uint64)
        self._scratch = np.zeros((0, 0, WORDS_PER_PAGE), dtype=np.bool_)

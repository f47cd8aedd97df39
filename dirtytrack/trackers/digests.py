"""Page-digest tracker: a 64-bit hash per page instead of a copy of the page."""

from __future__ import annotations

import secrets
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from dirtytrack.bitmap import Bitmap
from dirtytrack.digest import page_digests, yield_gil
from dirtytrack.ram import PAGE_SIZE, RamMapping
from dirtytrack.trackers.base import Baseline, PageArray, Tracker, TrackerKind

#: Pages hashed between GIL hand-offs: 16 MiB, ~1 ms at the measured ~17 GB/s.
DEFAULT_DIGEST_CHUNK_PAGES: Final = 4096


class PageDigestTracker(Tracker):
    """Keeps one seeded xxh3-64 digest per page of the target's content.

    Memory: 8 bytes per 4 KiB page (0.2 % of RAM) plus 8 bytes per ``chunk_pages``
    of scratch. CPU: every collect hashes all of RAM (one xxh3 call per page: ~17
    GB/s per core here, faster than the shadow compare but it holds the GIL; the
    tracker hands the GIL over every ``chunk_pages`` pages so an event loop in
    another thread waits ~1 ms at most).

    Soundness: a changed page is missed only if its new content hashes to the old
    digest, ~2^-64 per changed page and round for xxh3. The seed is random per
    tracker unless given, so a guest cannot precompute colliding page contents.
    Vectorised numpy hashes that release the GIL were measured at ~5 GB/s (see
    ``bench/trackers.py``), slower than xxh3, so they are not used.

    Raises :class:`ValueError` for ``chunk_pages`` < 1.
    """

    kind = TrackerKind.PAGE_DIGESTS

    def __init__(
        self,
        ram: RamMapping | PageArray,
        *,
        baseline: Baseline = Baseline.ZERO,
        seed: int | None = None,
        chunk_pages: int = DEFAULT_DIGEST_CHUNK_PAGES,
    ) -> None:
        super().__init__(ram)
        if chunk_pages < 1:
            raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
        self._chunk_pages = chunk_pages
        self._seed = secrets.randbits(64) if seed is None else seed
        zero_digest = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE), self._seed)
        self._digests: npt.NDArray[np.uint64] = np.full(
            self.page_count, zero_digest, dtype=np.uint64
        )
        self._scratch: npt.NDArray[np.uint64] = np.empty(
            min(chunk_pages, self.page_count), dtype=np.uint64
        )
        if baseline is Baseline.LIVE:
            self._reset(None)

    @property
    def memory_overhead_bytes(self) -> int:
        return int(self._digests.nbytes + self._scratch.nbytes)

    @property
    def seed(self) -> int:
        """The xxh3 seed of this tracker's digests."""
        return self._seed

    def digests(self) -> npt.NDArray[np.uint64]:
        """A read-only view of the baseline digests, one per page."""
        view = self._digests.view()
        view.flags.writeable = False
        return view

    def _collect(self) -> Bitmap:
        return Bitmap.from_bools(self._scan(0, self.page_count))

    def _collect_range(self, start: int, end: int) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self._scan(start, end)).astype(np.int64) + start

    def _scan(self, first: int, last: int) -> npt.NDArray[np.bool_]:
        raw = self._live().data.cast("B")
        dirty = np.empty(last - first, dtype=np.bool_)
        for start in range(first, last, self._chunk_pages):
            end = min(start + self._chunk_pages, last)
            current = page_digests(
                raw[start * PAGE_SIZE : end * PAGE_SIZE],
                seed=self._seed,
                out=self._scratch[: end - start],
            )
            np.not_equal(current, self._digests[start:end], out=dirty[start - first : end - first])
            if end < last:
                yield_gil()
        return dirty

    def _commit(self, start: int, data: PageArray) -> None:
        page_digests(
            data.data.cast("B"),
            seed=self._seed,
            out=self._digests[start : start + len(data)],
            yield_every_pages=self._chunk_pages,
        )

    def _commit_pages(self, pages: npt.NDArray[np.int64], data: PageArray) -> None:
        hashes = page_digests(
            data.data.cast("B"), seed=self._seed, yield_every_pages=self._chunk_pages
        )
        self._digests[pages] = hashes

    def _release(self) -> None:
        self._digests = np.zeros(0, dtype=np.uint64)
        self._scratch = np.zeros(0, dtype=np.uint64)

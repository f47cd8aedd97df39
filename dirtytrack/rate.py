"""Dirty-rate estimates from successive dirty bitmaps, in the model's units.

Each observation is a bitmap of the pages that changed during one interval (what a
tracker's ``collect`` returns right after the previous round was captured) and the
interval's monotonic start and end. A bitmap counts *distinct* pages, so the rate
of a guest rewriting a small hot set falls as intervals grow: measure over
intervals close to the round times the model will simulate, and pass the working
set as the model's cap (:class:`dirtytrack.model.PrecopyScenario`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from dirtytrack.bitmap import Bitmap
from dirtytrack.errors import BitmapShapeError
from dirtytrack.ram import PAGE_SIZE

MIB: Final = 1 << 20


@dataclass(frozen=True)
class DirtyRateEstimate:
    """Dirty rate after the latest observation.

    ``pages_per_s`` is the latest interval's rate, ``pages_per_s_ewma`` a
    time-weighted moving average (half-life set on the estimator), and
    ``working_set_pages`` the distinct pages dirtied over ``window_s`` seconds (the
    intervals kept). ``end_s`` is the monotonic end of the latest interval.
    """

    end_s: float
    interval_s: float
    dirty_pages: int
    pages_per_s: float
    pages_per_s_ewma: float
    working_set_pages: int
    window_s: float
    samples: int
    page_size: int = PAGE_SIZE

    @property
    def bytes_per_s(self) -> float:
        return self.pages_per_s * self.page_size

    @property
    def bytes_per_s_ewma(self) -> float:
        """The smoothed rate in bytes/s: the model's ``dirty_rate_bytes_per_s``."""
        return self.pages_per_s_ewma * self.page_size

    @property
    def mib_per_s(self) -> float:
        return self.bytes_per_s / MIB

    @property
    def mib_per_s_ewma(self) -> float:
        return self.bytes_per_s_ewma / MIB

    @property
    def working_set_bytes(self) -> int:
        """The model's ``working_set_bytes``."""
        return self.working_set_pages * self.page_size

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready figures, including the derived byte and MiB rates."""
        return {
            "end_s": self.end_s,
            "interval_s": self.interval_s,
            "dirty_pages": self.dirty_pages,
            "pages_per_s": self.pages_per_s,
            "pages_per_s_ewma": self.pages_per_s_ewma,
            "bytes_per_s": self.bytes_per_s,
            "bytes_per_s_ewma": self.bytes_per_s_ewma,
            "mib_per_s": self.mib_per_s,
            "mib_per_s_ewma": self.mib_per_s_ewma,
            "working_set_pages": self.working_set_pages,
            "working_set_bytes": self.working_set_bytes,
            "window_s": self.window_s,
            "samples": self.samples,
            "page_size": self.page_size,
        }


@dataclass(frozen=True, eq=False)
class _Interval:
    start_s: float
    end_s: float
    dirty: Bitmap


class DirtyRateEstimator:
    """Turns dirty bitmaps into a :class:`DirtyRateEstimate` (not thread-safe).

    ``half_life_s`` is the EWMA's half-life in seconds of observed time; intervals
    ending more than ``window_s`` seconds before the latest one drop out of the
    working set. Raises :class:`ValueError` for non-positive settings.
    """

    def __init__(
        self,
        page_count: int,
        *,
        half_life_s: float = 5.0,
        window_s: float = 30.0,
        page_size: int = PAGE_SIZE,
    ) -> None:
        if page_count < 0 or not half_life_s > 0 or not window_s > 0 or page_size < 1:
            raise ValueError(
                f"invalid estimator settings: page_count={page_count} "
                f"half_life_s={half_life_s} window_s={window_s} page_size={page_size}"
            )
        self.page_count = page_count
        self.half_life_s = half_life_s
        self.window_s = window_s
        self.page_size = page_size
        self._intervals: deque[_Interval] = deque()
        self._ewma: float | None = None
        self._samples = 0
        self._latest: DirtyRateEstimate | None = None

    @property
    def latest(self) -> DirtyRateEstimate | None:
        """The estimate after the last observation, ``None`` before the first."""
        return self._latest

    def observe(self, dirty: Bitmap, *, start_s: float, end_s: float) -> DirtyRateEstimate:
        """Add the pages dirtied during ``[start_s, end_s]`` (monotonic seconds).

        Raises :class:`BitmapShapeError` for a bitmap of another size and
        :class:`ValueError` for an empty interval or one ending before the
        previous observation's end.
        """
        if dirty.page_count != self.page_count:
            raise BitmapShapeError(
                f"bitmap has {dirty.page_count} pages, estimator tracks {self.page_count}"
            )
        if not end_s > start_s:
            raise ValueError(f"interval [{start_s}, {end_s}] is empty")
        if self._latest is not None and end_s < self._latest.end_s:
            raise ValueError(f"interval ends at {end_s}, before the previous {self._latest.end_s}")
        interval = end_s - start_s
        dirty_pages = dirty.popcount()
        rate = dirty_pages / interval
        if self._ewma is None:
            self._ewma = rate
        else:
            # Weight by elapsed time, so irregular rounds are averaged fairly.
            weight = 1.0 - math.pow(2.0, -interval / self.half_life_s)
            self._ewma += weight * (rate - self._ewma)
        self._samples += 1
        self._intervals.append(_Interval(start_s, end_s, dirty.copy()))
        while self._intervals[0].end_s < end_s - self.window_s:
            self._intervals.popleft()
        working_set = Bitmap(self.page_count)
        for kept in self._intervals:
            working_set |= kept.dirty
        self._latest = DirtyRateEstimate(
            end_s=end_s,
            interval_s=interval,
            dirty_pages=dirty_pages,
            pages_per_s=rate,
            pages_per_s_ewma=self._ewma,
            working_set_pages=working_set.popcount(),
            window_s=end_s - min(kept.start_s for kept in self._intervals),
            samples=self._samples,
            page_size=self.page_size,
        )
        return self._latest

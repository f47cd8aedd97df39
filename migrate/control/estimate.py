"""Live estimates from samples: bandwidth over a window, time left, round starts.

Used by :class:`~migrate.control.livemig.LivemigController` and by
:mod:`migrate.progress` (the ETA a progress bar shows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from migrate.report import Sample


@dataclass(frozen=True)
class RoundStart:
    """The remaining set when a pre-copy round began (QEMU's dirty sync).

    ``dirty_rate_bytes_per_s`` is QEMU's ``dirty-pages-rate`` as of that sync:
    distinct pages dirtied during the previous round over its duration.
    """

    sync: int
    elapsed_ms: float
    remaining_bytes: int
    dirty_rate_bytes_per_s: float
    throttle_pct: int = 0


@dataclass(frozen=True)
class LiveEstimate:
    """The controller's current view, from live samples (bytes, bytes/s, ms).

    ``bandwidth_bytes_per_s`` is raw page bytes per second (what QEMU counts as
    transferred; with multifd+zstd that is before compression).
    """

    bandwidth_bytes_per_s: float | None
    dirty_rate_bytes_per_s: float | None
    working_set_bytes: int | None
    remaining_bytes: int
    eta_ms: float | None
    rounds: int


class BandwidthEstimator:
    """Transferred bytes per second over the last ``window_ms`` of active samples.

    A window of seconds, not single sample gaps, because multifd and tbf send in
    bursts: 100 ms slices of one steady stream were seen to vary by 4x here.
    """

    def __init__(self, window_ms: float = 2000.0, min_span_ms: float = 400.0) -> None:
        self.window_ms = window_ms
        self.min_span_ms = min_span_ms
        self._points: deque[tuple[float, int]] = deque()
        self._rate: float | None = None

    def add(self, sample: Sample) -> None:
        if sample.status != "active":
            self._points.clear()
            return
        self._points.append((sample.elapsed_ms, sample.ram_transferred_bytes))
        while self._points and self._points[0][0] < sample.elapsed_ms - self.window_ms:
            self._points.popleft()
        first, last = self._points[0], self._points[-1]
        span = last[0] - first[0]
        if span >= self.min_span_ms and last[1] > first[1]:
            self._rate = (last[1] - first[1]) / (span / 1e3)

    @property
    def bytes_per_s(self) -> float | None:
        """The latest estimate (kept across pauses), None before the first."""
        return self._rate


def remaining_time_ms(remaining: float, dirty_rate: float, bandwidth: float) -> float | None:
    """Time to send ``remaining`` bytes while the guest dirties ``dirty_rate``: R / (B - r).

    The geometric series of pre-copy rounds sums to that; ``None`` when the dirty
    rate reaches the bandwidth (no end in sight).
    """
    if bandwidth <= 0 or dirty_rate >= bandwidth:
        return None
    return remaining / (bandwidth - dirty_rate) * 1e3

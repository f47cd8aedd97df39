"""Dirty-rate estimates from bitmaps with known timestamps (no clocks involved)."""

from __future__ import annotations

import math

import pytest

from dirtytrack.bitmap import Bitmap
from dirtytrack.errors import BitmapShapeError
from dirtytrack.model import PrecopyScenario, predict
from dirtytrack.rate import DirtyRateEstimator

PAGES = 1 << 16  # 256 MiB


def dirty(pages: range | list[int]) -> Bitmap:
    return Bitmap.from_indices(PAGES, list(pages))


def test_first_sample_sets_rate_and_units() -> None:
    estimator = DirtyRateEstimator(PAGES)
    assert estimator.latest is None
    estimate = estimator.observe(dirty(range(2560)), start_s=10.0, end_s=11.0)
    assert estimate.pages_per_s == 2560
    assert estimate.pages_per_s_ewma == 2560
    assert estimate.bytes_per_s == 2560 * 4096
    assert estimate.mib_per_s == pytest.approx(10.0)
    assert estimate.working_set_pages == 2560
    assert estimate.working_set_bytes == 2560 * 4096
    assert estimate.window_s == 1.0 and estimate.samples == 1
    assert estimator.latest is estimate


def test_ewma_weights_by_elapsed_time() -> None:
    estimator = DirtyRateEstimator(PAGES, half_life_s=2.0)
    estimator.observe(dirty(range(1000)), start_s=0.0, end_s=1.0)  # 1000 pages/s
    # A 2 s interval (one half-life) at 3000 pages/s moves the average halfway.
    second = estimator.observe(dirty(range(6000)), start_s=1.0, end_s=3.0)
    assert second.pages_per_s == 3000
    assert second.pages_per_s_ewma == pytest.approx(2000)
    # A very short interval barely moves it.
    third = estimator.observe(dirty(range(10)), start_s=3.0, end_s=3.001)
    weight = 1 - math.pow(2, -0.001 / 2.0)
    assert third.pages_per_s_ewma == pytest.approx(2000 + weight * (10_000 - 2000))


def test_working_set_is_distinct_pages_over_the_window() -> None:
    estimator = DirtyRateEstimator(PAGES, window_s=10.0)
    estimator.observe(dirty(range(0, 100)), start_s=0.0, end_s=1.0)
    estimator.observe(dirty(range(50, 150)), start_s=1.0, end_s=2.0)
    both = estimator.observe(dirty(range(100, 150)), start_s=2.0, end_s=3.0)
    assert both.working_set_pages == 150  # overlaps counted once
    assert both.window_s == 3.0
    # Ending at 12.5 s, the window starts at 2.5 s: the intervals ending at 1 s and
    # 2 s drop out, the one ending at 3 s stays whole.
    later = estimator.observe(dirty(range(1000, 1010)), start_s=3.0, end_s=12.5)
    assert later.working_set_pages == 60
    assert later.window_s == 10.5


def test_estimate_feeds_the_model() -> None:
    estimator = DirtyRateEstimator(PAGES)
    # A guest that keeps rewriting the same 2560 pages (10 MiB) every second.
    hot = dirty(range(2560))
    for second in range(5):
        estimate = estimator.observe(hot, start_s=second, end_s=second + 1.0)
    scenario = PrecopyScenario(
        ram_bytes=PAGES * 4096,
        dirty_rate_bytes_per_s=estimate.bytes_per_s_ewma,
        bandwidth_bytes_per_s=5 * (1 << 20),  # slower than the dirty rate
        downtime_limit_s=3.0,
        working_set_bytes=estimate.working_set_bytes,
    )
    # r > B, but the working set (10 MiB, 2 s at 5 MiB/s) fits the limit.
    assert predict(scenario).converges
    assert estimate.to_dict()["mib_per_s_ewma"] == pytest.approx(10.0)


def test_refusals() -> None:
    estimator = DirtyRateEstimator(PAGES)
    with pytest.raises(BitmapShapeError):
        estimator.observe(Bitmap(PAGES + 1), start_s=0, end_s=1)
    with pytest.raises(ValueError, match="empty"):
        estimator.observe(dirty([]), start_s=1, end_s=1)
    estimator.observe(dirty([]), start_s=1, end_s=2)
    with pytest.raises(ValueError, match="before the previous"):
        estimator.observe(dirty([]), start_s=0, end_s=1.5)
    for bad in ({"half_life_s": 0.0}, {"window_s": -1.0}, {"page_size": 0}):
        with pytest.raises(ValueError):
            DirtyRateEstimator(PAGES, **bad)

"""The link measured on QEMU's own stream, and the forecast made again with it."""

from __future__ import annotations

import dataclasses

import pytest

from migrate.plan import Measurement, RamSample, measured_from
from migrate.plan.forecasting import (
    DEFAULT_RESUME_OVERHEAD_MS,
    RESUME_OVERHEAD_SPREAD_MS,
    BandwidthHint,
    forecast,
)
from migrate.plan.linkrate import MIN_WINDOW_BYTES, StreamMeter, StreamRate, revised_forecast
from migrate.presets import preset
from migrate.report import Sample, Timeline
from tests.unit.test_plan import _report

MIB = 1 << 20


def _sample(ms: float, mib: float, status: str = "active") -> Sample:
    return Sample(time=0, elapsed_ms=ms, status=status, ram_transferred_bytes=int(mib * MIB))


def test_the_meter_measures_from_the_first_sample_once() -> None:
    meter = StreamMeter()
    assert meter.add(_sample(10, 4, "setup")) is None  # opens the window
    assert meter.add(_sample(60, 24)) is None  # 50 ms: too short
    assert meter.add(_sample(100, 40, "device")) is None  # only active samples close it
    rate = meter.add(_sample(110, 44))  # 40 MiB in 100 ms
    assert rate is not None
    assert rate.bytes_per_s == pytest.approx(400 * MIB)
    assert (rate.window_ms, rate.bytes, rate.at_ms) == (100, 40 * MIB, 110)
    assert meter.add(_sample(210, 84)) is None  # only once
    assert meter.rate is rate
    # 4 MiB at 400 MiB/s take 10 ms: the window opening at 10 ms lost nothing.
    assert rate.lag_ms == pytest.approx(0.0, abs=1e-9)


def test_a_stream_that_started_late_counts_the_time_it_lost() -> None:
    meter = StreamMeter()
    meter.add(_sample(66, 3))  # the first answer came late, with little sent
    rate = meter.add(_sample(166, 43))
    assert rate is not None and rate.bytes_per_s == pytest.approx(400 * MIB)
    assert rate.lag_ms == pytest.approx(66 - 3 / 400 * 1e3)
    m = _idle(100)
    on_time = revised_forecast(m, dataclasses.replace(rate, lag_ms=0.0), preset("livemig"))
    late = revised_forecast(m, rate, preset("livemig"))
    assert late.policy_forecast is not None and on_time.policy_forecast is not None
    assert late.policy_forecast.total_time_ms == pytest.approx(
        on_time.policy_forecast.total_time_ms + rate.lag_ms
    )
    assert late.policy_forecast.downtime_ms == on_time.policy_forecast.downtime_ms
    assert all(
        a.total_time_ms == pytest.approx(b.total_time_ms + rate.lag_ms)
        for a, b in zip(late.forecasts, on_time.forecasts, strict=True)
    )


def test_the_window_needs_bytes_as_well_as_time() -> None:
    meter = StreamMeter()
    meter.add(_sample(0, 0))
    assert meter.add(_sample(500, (MIN_WINDOW_BYTES - 1) / MIB)) is None
    assert meter.add(_sample(900, 10)) is not None


def _idle(nonzero_mib: float) -> Measurement:
    return Measurement(
        ram_bytes=256 * MIB,
        dirty_rate_bytes_per_s=0.0,
        dirty_rate_method="test",
        sample=RamSample(
            pages=2048,
            zero_fraction=1 - nonzero_mib / 256,
            zstd_ratio=2.0,
            zstd_bytes_per_s=300 * MIB,
            xbzrle_ratio=None,
            changed_fraction=0.0,
        ),
        measure_time_ms=1000,
    )


def test_the_revised_forecast_is_the_non_zero_ram_at_the_measured_rate() -> None:
    m = _idle(100)
    policy = preset("livemig")
    before = forecast(m, BandwidthHint.for_policy(policy), policy)
    assert before.bandwidth_source.startswith("assumed")
    assert before.bandwidth_measured_at_ms is None
    rate = StreamRate(400 * MIB, 100, 40 * MIB, 110)
    after = revised_forecast(m, rate, policy)
    assert after.bandwidth_bytes_per_s == 400 * MIB
    assert after.bandwidth_source.startswith("measured: QEMU's stream carried 40.0 MiB in 100 ms")
    assert after.bandwidth_measured_at_ms == 110
    f = after.policy_forecast
    assert f is not None and f.converges and f.compression == "none"
    # An idle guest: one round of its non-zero RAM, then the fixed switchover work
    # (device state at the same rate, the RAM check and cont).
    fixed_ms = after.device_state_bytes / (400 * MIB) * 1e3 + DEFAULT_RESUME_OVERHEAD_MS
    assert f.total_time_ms == pytest.approx(100 / 400 * 1e3 + fixed_ms, rel=1e-6)
    assert f.downtime_ms == pytest.approx(fixed_ms, rel=1e-6)
    # The band: no RAM left at the stop .. the limit's worth plus the spread.
    assert f.downtime_low_ms == pytest.approx(fixed_ms)
    assert f.downtime_high_ms == pytest.approx(
        f.downtime_limit_ms + fixed_ms + RESUME_OVERHEAD_SPREAD_MS
    )
    # 128 MiB/s assumed was 3x too slow for this link.
    assert before.policy_forecast is not None
    assert before.policy_forecast.total_time_ms > 2.5 * f.total_time_ms


def test_measured_switchover_against_the_band() -> None:
    policy = preset("livemig")
    predicted = revised_forecast(_idle(100), StreamRate(400 * MIB, 100, 40 * MIB, 110), policy)
    f = predicted.policy_forecast
    assert f is not None and f.downtime_high_ms is not None
    report = _report([], f.total_time_ms, 5.0)
    inside = dataclasses.replace(
        report, timeline=Timeline(0.0, source_stop_ms=200, target_resume_ms=230)
    )
    m = measured_from(inside, predicted)
    assert m.switchover_ms == 30 and m.switchover_in_band
    assert m.total_time_error_pct == pytest.approx(0.0)
    outside = dataclasses.replace(
        report,
        timeline=Timeline(0.0, source_stop_ms=200, target_resume_ms=200 + f.downtime_high_ms + 1),
    )
    assert measured_from(outside, predicted).switchover_in_band is False
    assert measured_from(report, predicted).switchover_in_band is None  # no timeline marks

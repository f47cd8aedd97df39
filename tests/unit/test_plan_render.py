"""Forecasts as text: ``livemig plan`` and the report's forecast lines."""

from __future__ import annotations

import dataclasses

from migrate.cli_plan import render_plan
from migrate.phase import Phase
from migrate.plan import BandwidthHint, forecast, measured_from
from migrate.presets import preset
from migrate.render import render_report
from migrate.report import MigrationReport, Status, Timeline
from tests.unit.test_plan import _measurement

MIB = 1 << 20


def test_plan_text_lists_every_setting_and_the_recommendation() -> None:
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=0)  # no lever left
    predicted = forecast(
        _measurement(20, zstd=1.0, xbzrle=1.0), BandwidthHint.from_link_mbit(80), policy
    )
    text = render_plan(predicted, policy)
    assert "dirty rate:  20.0 MiB/s (test)" in text
    assert "link cap 80 Mbit/s" in text
    for f in predicted.forecasts:
        assert f.setting in text
    assert "not allowed" in text and "recommendation: do not migrate now" in text
    assert "does not converge" in text


def test_report_shows_forecast_against_measured() -> None:
    predicted = forecast(_measurement(0.5), BandwidthHint.from_link_mbit(80), preset("livemig"))
    assert predicted.policy_forecast is not None
    report = MigrationReport(
        status=Status.COMPLETED, strategy="native", mode="live", vm="vm", source="a",
        target="b", policy="livemig", phase=Phase.COMPLETED,
        total_time_ms=predicted.policy_forecast.total_time_ms * 0.9, ram_bytes=128 * MIB,
        timeline=Timeline(started_at=0.0), predicted=predicted,
    )  # fmt: skip
    report = dataclasses.replace(report, measured=measured_from(report, predicted))
    text = render_report(report)
    assert f"forecast:           {predicted.policy_forecast.setting}" in text
    assert "measured:" in text and "(-10%)" in text

"""What happened against what was predicted: a finished report in the forecast's terms."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from migrate.report import Measured, MigrationReport, Predicted, Sample


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_from(report: MigrationReport, predicted: Predicted | None) -> Measured:
    """The report's outcome in the prediction's terms (see :class:`Measured`)."""
    samples = [s for s in report.samples if s.status == "active"]
    rates = _payload_rates(samples)
    dirty = [s.dirty_rate_bytes_per_s for s in samples if s.dirty_sync_count >= 2]
    limits = [
        float(d.arguments["downtime-limit"])
        for d in report.decisions
        if d.command == "migrate-set-parameters" and "downtime-limit" in d.arguments
    ]
    throttles = [s.cpu_throttle_pct for s in report.samples]
    forecast_ = predicted.policy_forecast if predicted is not None else None
    total_error = downtime_error = None
    if forecast_ is not None and forecast_.total_time_ms > 0:
        total_error = (report.total_time_ms - forecast_.total_time_ms) / forecast_.total_time_ms
        total_error *= 100
    if forecast_ is not None and report.downtime_ms is not None and forecast_.downtime_ms > 0:
        downtime_error = (report.downtime_ms - forecast_.downtime_ms) / forecast_.downtime_ms * 100
    switchover = report.timeline.stop_to_resume_ms
    in_band = None
    if switchover is not None and forecast_ is not None and forecast_.downtime_high_ms is not None:
        low = forecast_.downtime_low_ms or 0.0
        in_band = low <= switchover <= forecast_.downtime_high_ms
    return Measured(
        rounds=report.precopy_rounds,
        total_time_ms=report.total_time_ms,
        bandwidth_bytes_per_s=_median(rates),
        dirty_rate_bytes_per_s=_median(dirty),
        downtime_ms=report.downtime_ms,
        final_downtime_limit_ms=limits[-1] if limits else None,
        max_throttle_pct=max(throttles, default=0),
        postcopy=any(s.status.startswith("postcopy") for s in report.samples),
        total_time_error_pct=total_error,
        downtime_error_pct=downtime_error,
        switchover_ms=switchover,
        switchover_in_band=in_band,
    )


def _payload_rates(samples: Sequence[Sample]) -> list[float]:
    rates = []
    for a, b in itertools.pairwise(samples):
        span = (b.elapsed_ms - a.elapsed_ms) / 1e3
        sent = b.ram_transferred_bytes - a.ram_transferred_bytes
        if span >= 0.05 and sent > 0:
            rates.append(sent / span)
    return rates

"""Prediction before anything moves, and the comparison after.

- :mod:`~migrate.plan.measuring` — I/O: ``calc-dirty-rate`` over QMP and a sample of
  the guest's RAM file → :class:`Measurement`.
- :mod:`~migrate.plan.forecasting` — pure: :mod:`dirtytrack.model` per setting, what
  the policy allows, the recommendation → :class:`~migrate.report.Predicted`.
- :mod:`~migrate.plan.compare` — a finished report's outcome in the same terms
  (:class:`~migrate.report.Measured`), so a report can show predicted against
  measured.

:func:`plan_migration` does the first two.
"""

from __future__ import annotations

from pathlib import Path

from migrate.plan.compare import measured_from
from migrate.plan.forecasting import (
    BandwidthHint,
    Measurement,
    RamSample,
    allowed,
    bandwidth_known,
    forecast,
    policy_forecast,
    with_policy,
)
from migrate.plan.measuring import measure
from migrate.policy import Policy
from migrate.qmp import QmpSession
from migrate.report import Predicted

__all__ = [
    "BandwidthHint",
    "Measurement",
    "RamSample",
    "allowed",
    "bandwidth_known",
    "forecast",
    "measure",
    "measured_from",
    "plan_migration",
    "policy_forecast",
    "with_policy",
]


async def plan_migration(
    source: QmpSession,
    policy: Policy,
    bandwidth: BandwidthHint,
    ram_path: Path | None = None,
    calc_time_s: int = 1,
) -> Predicted:
    """:func:`measure` then :func:`forecast`."""
    m = await measure(source, ram_path, calc_time_s)
    return forecast(m, bandwidth, policy)

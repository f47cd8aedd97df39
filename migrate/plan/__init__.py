"""Prediction before anything moves, and the comparison after.

- :mod:`~migrate.plan.measuring` — I/O: ``calc-dirty-rate`` over QMP and a sample of
  the guest's RAM file → :class:`Measurement`.
- :mod:`~migrate.plan.forecasting` — pure: :mod:`dirtytrack.model` per setting, what
  the policy allows, the recommendation → :class:`~migrate.report.Predicted`.
- :mod:`~migrate.plan.compare` — a finished report's outcome in the same terms
  (:class:`~migrate.report.Measured`), so a report can show predicted against
  measured.

:mod:`~migrate.plan.disks` adds the local disks a migration copies (their first
copy and the guest's writes to them). :func:`plan_migration` does the first two
(and the disks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from migrate.disks.model import BlockDisk
from migrate.plan.compare import measured_from
from migrate.plan.disks import (
    forecast_with_disks,
    measure_with_disks,
    with_disk_copy,
)
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
    "forecast_with_disks",
    "measure",
    "measure_with_disks",
    "measured_from",
    "plan_migration",
    "policy_forecast",
    "with_disk_copy",
    "with_policy",
]


async def plan_migration(
    source: QmpSession,
    policy: Policy,
    bandwidth: BandwidthHint,
    ram_path: Path | None = None,
    calc_time_s: int = 1,
    disks: Sequence[BlockDisk] = (),
) -> Predicted:
    """:func:`measure` then :func:`forecast`; with ``disks`` (the local disks a
    migration would copy) their copy and the guest's writes to them are in it."""
    m, write_rate = await measure_with_disks(source, ram_path, disks, calc_time_s)
    disk_bytes = sum(d.allocated_bytes() for d in disks)
    return forecast_with_disks(m, bandwidth, policy, disk_bytes, write_rate)

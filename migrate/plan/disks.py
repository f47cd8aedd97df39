"""The disks in a forecast: their first copy and the guest's writes to them.

A ``--with-local-disks`` migration first copies each local disk (its allocated
bytes), then keeps a write-blocking mirror running until the switchover: every
guest write goes to the target as it happens, on the same link as the copy and the
RAM. :func:`measure_with_disks` reads QEMU's write counters of those disks around
the RAM measurement (same window, so the two rates describe the same moment);
:func:`forecast_with_disks` forecasts the RAM on what the disks' writes leave of the
link and adds the copy and those writes to each forecast (pure).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from migrate.disks.model import BlockDisk
from migrate.disks.writerate import written_bytes
from migrate.plan.forecasting import BandwidthHint, Measurement, forecast
from migrate.plan.measuring import measure
from migrate.policy import Policy
from migrate.qmp import QmpSession
from migrate.report import Forecast, Predicted


async def measure_with_disks(
    source: QmpSession, ram_path: Path | None, disks: Sequence[BlockDisk], calc_time_s: int = 1
) -> tuple[Measurement, float]:
    """:func:`~migrate.plan.measuring.measure`, and the guest's write rate to ``disks``
    (bytes/s) over the same window (0 without disks)."""
    if not disks:
        return await measure(source, ram_path, calc_time_s), 0.0
    before, started = await written_bytes(source, disks), time.monotonic()
    measurement = await measure(source, ram_path, calc_time_s)
    elapsed = max(time.monotonic() - started, 1e-3)
    return measurement, max(await written_bytes(source, disks) - before, 0) / elapsed


def with_disk_copy(predicted: Predicted, disk_bytes: int, write_rate: float = 0.0) -> Predicted:
    """``predicted`` with the disks: their first full copy before the RAM, and the
    guest's disk writes (``write_rate`` bytes/s) that a write-blocking mirror sends
    along until the switchover.

    ``predicted`` is forecast on what the writes leave of the link (its bandwidth is
    what the copy and RAM get): each forecast's time grows by the copy at that
    bandwidth, its bytes by the copy and by the writes during the whole migration."""
    if disk_bytes <= 0 and write_rate <= 0:
        return predicted
    copy_ms = disk_bytes / max(predicted.bandwidth_bytes_per_s, 1.0) * 1e3

    def grow(f: Forecast) -> Forecast:
        total_ms = f.total_time_ms + copy_ms
        written = int(write_rate * total_ms / 1e3)
        return dataclasses.replace(
            f, total_time_ms=total_ms, transferred_bytes=f.transferred_bytes + disk_bytes + written
        )

    return dataclasses.replace(
        predicted,
        forecasts=tuple(grow(f) for f in predicted.forecasts),
        policy_forecast=grow(predicted.policy_forecast) if predicted.policy_forecast else None,
        disk_copy_bytes=disk_bytes,
        disk_write_bytes_per_s=write_rate,
    )


def forecast_with_disks(
    m: Measurement, bandwidth: BandwidthHint, policy: Policy, disk_bytes: int, write_rate: float
) -> Predicted:
    """Forecast the RAM on ``bandwidth`` less the disks' writes, then add the disks."""
    available = bandwidth.less(write_rate, "the guest's disk writes")
    return with_disk_copy(forecast(m, available, policy), disk_bytes, write_rate)

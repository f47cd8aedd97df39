"""The disks in a forecast: QEMU's write counters, and what the writes cost the link."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migrate.disks.model import BlockDisk, CacheMode
from migrate.disks.writerate import written_bytes
from migrate.errors import QemuError
from migrate.plan import BandwidthHint, forecast_with_disks, with_disk_copy
from migrate.plan.forecasting import Measurement
from migrate.presets import preset
from migrate.report import Forecast, Predicted
from tests.fakes.qmp import FakeQmp

MIB = 1 << 20


def _disk(device: str, node: str) -> BlockDisk:
    return BlockDisk(device, node, Path(f"/img/{device}.qcow2"), "qcow2", 1 << 30,
                     CacheMode.NONE, readonly=False)  # fmt: skip


def _stats(**by_node: int) -> list[dict[str, object]]:
    # As QEMU 7.2 answers for -blockdev devices: no legacy drive name, the qdev path.
    return [
        {"device": "", "node-name": node, "qdev": f"/machine/peripheral/{node[6:]}/virtio-backend",
         "stats": {"wr_bytes": written, "rd_bytes": 0}}
        for node, written in by_node.items()
    ]  # fmt: skip


def test_written_bytes_sums_the_copied_disks_only() -> None:
    async def scenario() -> int:
        qmp = FakeQmp()
        qmp.on("query-blockstats", [_stats(**{"drive-disk0": 5 * MIB, "drive-disk1": 7 * MIB})])
        return await written_bytes(qmp, [_disk("disk0", "drive-disk0")])

    assert asyncio.run(scenario()) == 5 * MIB


def test_a_disk_is_found_by_its_qdev_path_too() -> None:
    async def scenario() -> int:
        qmp = FakeQmp()
        qmp.on("query-blockstats", [_stats(**{"drive-disk0": 3 * MIB})])
        return await written_bytes(qmp, [_disk("disk0", "some-other-node")])

    assert asyncio.run(scenario()) == 3 * MIB


@pytest.mark.parametrize(
    "answer",
    [{"not": "a list"}, [], [{"node-name": "drive-disk0", "stats": {"wr_bytes": -1}}],
     [{"node-name": "drive-disk0", "stats": {"wr_bytes": True}}]],
)  # fmt: skip
def test_an_answer_without_a_write_counter_is_a_qemu_error(answer: object) -> None:
    async def scenario() -> None:
        qmp = FakeQmp()
        qmp.on("query-blockstats", [answer])
        await written_bytes(qmp, [_disk("disk0", "drive-disk0")])

    with pytest.raises(QemuError, match="query-blockstats"):
        asyncio.run(scenario())


def _predicted(bandwidth: float) -> Predicted:
    f = Forecast("native", True, 3, 1000.0, 50.0, 1e8, "converges")
    return Predicted(1 << 28, 1e6, "sample", bandwidth, "link", 1 << 20, 10.0, (f,),
                     "native", "best", policy_forecast=f)  # fmt: skip


def test_the_disk_writes_go_along_for_the_whole_migration() -> None:
    grown = with_disk_copy(_predicted(100e6), 50_000_000, write_rate=4e6)
    assert grown.disk_write_bytes_per_s == 4e6 and grown.disk_copy_bytes == 50_000_000
    (f,) = grown.forecasts
    assert f.total_time_ms == pytest.approx(1500.0)  # the copy at what is left of the link
    # RAM, the copy, and 4 MB/s of mirrored writes for the whole 1.5 s.
    assert f.transferred_bytes == pytest.approx(1e8 + 5e7 + 6e6, abs=1)
    assert with_disk_copy(_predicted(100e6), 0, 0.0).disk_write_bytes_per_s == 0


def test_the_ram_is_forecast_on_what_the_disk_writes_leave_of_the_link() -> None:
    m = Measurement(128 * MIB, 1 * MIB, "test", None, 1.0)
    link = BandwidthHint(20 * MIB, "link cap")
    policy = preset("livemig")
    quiet = forecast_with_disks(m, link, policy, 0, 0.0)
    busy = forecast_with_disks(m, link, policy, 0, 10 * MIB)
    assert busy.bandwidth_bytes_per_s == pytest.approx(10 * MIB)
    assert "less the guest's disk writes (10.0 MiB/s)" in busy.bandwidth_source
    assert busy.policy_forecast is not None and quiet.policy_forecast is not None
    assert busy.policy_forecast.total_time_ms > 1.8 * quiet.policy_forecast.total_time_ms
    # A disk writing faster than the link still leaves the copy a tenth of it.
    assert link.less(100 * MIB, "x").bytes_per_s == pytest.approx(2 * MIB)
    assert link.less(0, "x") is link

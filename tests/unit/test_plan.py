"""Prediction before start: measurement (with a fake QMP), RAM sampling, forecasts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migrate.codec import from_dict, to_dict
from migrate.control.intents import SetDowntimeLimit
from migrate.phase import Phase
from migrate.plan import (
    BandwidthHint,
    Measurement,
    RamSample,
    allowed,
    bandwidth_known,
    forecast,
    measure,
    measured_from,
    with_policy,
)
from migrate.plan.measuring import (
    dirty_rate_and_working_set,
    measure_dirty_rate,
    read_sample,
    sample_from,
    xbzrle_size,
)
from migrate.presets import preset
from migrate.qmp import QmpSession
from migrate.report import Decision, MigrationReport, Predicted, Sample, Status, Timeline

MIB = 1 << 20


class FakeQmp:
    """Answers the commands the measurement sends, records them."""

    def __init__(self, rate_mibps: int = 12, status: str = "running", polls: int = 2) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.rate = rate_mibps
        self.vm_status = status
        self.polls = polls

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append((command, arguments))
        if command == "query-memory-size-summary":
            return {"base-memory": 128 * MIB}
        if command == "calc-dirty-rate":
            return {}
        if command == "query-dirty-rate":
            self.polls -= 1
            status = "measured" if self.polls <= 0 else "measuring"
            return {"status": status, "dirty-rate": self.rate, "mode": "page-sampling"}
        raise AssertionError(f"unexpected command {command}")

    async def status(self) -> str:
        return self.vm_status


def _session(fake: FakeQmp) -> QmpSession:
    return fake  # type: ignore[return-value]


def test_dirty_rate_uses_page_sampling_never_the_bitmap_mode() -> None:
    fake = FakeQmp(rate_mibps=12)
    rate, method = asyncio.run(measure_dirty_rate(_session(fake), 128 * MIB))
    assert rate == 12 * MIB
    calc = [args for cmd, args in fake.sent if cmd == "calc-dirty-rate"]
    assert calc == [{"calc-time": 1, "sample-pages": 4096, "mode": "page-sampling"}]
    assert "512 pages sampled" in method


def test_a_paused_vm_is_not_measured(tmp_path: Path) -> None:
    fake = FakeQmp(status="paused")
    m = asyncio.run(measure(_session(fake), None))
    assert m.dirty_rate_bytes_per_s == 0 and "paused" in m.dirty_rate_method
    assert not [cmd for cmd, _ in fake.sent if cmd == "calc-dirty-rate"]


def _ram_file(tmp_path: Path) -> Path:
    """16 MiB: a quarter zero pages, a quarter random, half a repeated text."""
    pages = 4096
    rng = np.random.default_rng(7)
    ram = np.zeros((pages, 512), dtype=np.uint64)
    ram[1024:2048] = rng.integers(0, 2**63, size=(1024, 512), dtype=np.uint64)
    text = np.frombuffer(b"livemig!" * 256 + b"planplan" * 256, dtype=np.uint64)
    ram[2048:] = text
    path = tmp_path / "ram"
    ram.tofile(path)
    return path


def test_measure_takes_the_rate_from_the_ram_sample_when_it_has_one(tmp_path: Path) -> None:
    path = _ram_file(tmp_path)  # nothing writes it: the sample sees no dirty page
    m = asyncio.run(measure(_session(FakeQmp(rate_mibps=12)), path, sample_pages=1024))
    assert m.sample is not None and m.sample.pages == 1024
    assert m.dirty_rate_bytes_per_s == 0 and m.working_set_bytes is None
    assert m.dirty_rate_method.startswith("RAM sample (1024 pages, two ")
    assert "said 12 MiB/s" in m.dirty_rate_method


def test_measure_falls_back_to_qemu_when_the_ram_file_goes(tmp_path: Path) -> None:
    path = _ram_file(tmp_path)

    class Vanishing(FakeQmp):
        async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
            if command == "calc-dirty-rate":
                path.unlink()
            return await super().execute(command, arguments)

    m = asyncio.run(measure(_session(Vanishing(rate_mibps=12)), path))
    assert m.sample is None and m.working_set_bytes is None
    assert m.dirty_rate_bytes_per_s == 12 * MIB
    assert m.dirty_rate_method.startswith("calc-dirty-rate page-sampling")


def test_a_ram_sample_counts_zero_pages_and_compression(tmp_path: Path) -> None:
    path = _ram_file(tmp_path)
    copy = read_sample(path, pages=2048, seed=3)
    sample = sample_from(copy)
    assert sample.pages == 2048 and copy.shape == (2048, 512)
    assert 0.18 < sample.zero_fraction < 0.32
    # A third of the non-zero pages is random, two thirds compress very well.
    assert 1.3 < sample.zstd_ratio < 3.5
    assert sample.zstd_bytes_per_s > 0 and sample.xbzrle_ratio is None
    # Change a few words in some pages, then sample again: xbzrle sends only those.
    ram = np.memmap(path, dtype=np.uint64, mode="r+").reshape(-1, 512)
    ram[2048:2100, 5] += np.uint64(1)
    ram.flush()
    del ram
    again = sample_from(read_sample(path, pages=2048, seed=3), before=copy)
    assert again.changed_fraction is not None and 0 < again.changed_fraction < 0.05
    assert again.xbzrle_ratio is not None and again.xbzrle_ratio > 50


def _rewrite(copy: np.ndarray, pages: np.ndarray) -> np.ndarray:
    out = copy.copy()
    out[pages, 0] += np.uint64(1)
    return out


def test_a_guest_writing_fresh_pages_shows_its_rate_and_no_working_set() -> None:
    first = np.zeros((2048, 512), dtype=np.uint64)
    middle = _rewrite(first, np.arange(0, 40))
    last = _rewrite(middle, np.arange(40, 80))
    rate, working_set = dirty_rate_and_working_set(first, middle, last, 1.0, 128 * MIB)
    # 80 of 2048 sampled pages of 128 MiB in 1 s; QEMU would have said "5 MiB/s".
    assert rate == pytest.approx(80 / 2048 * 128 * MIB)
    assert working_set is None


def test_a_guest_rewriting_a_hot_set_shows_its_size() -> None:
    # A hot set of 100 sampled pages; each half-window rewrites 60 of them at random.
    rng = np.random.default_rng(5)
    hot = rng.choice(2048, size=100, replace=False)
    first = np.zeros((2048, 512), dtype=np.uint64)
    middle = _rewrite(first, rng.choice(hot, size=60, replace=False))
    last = _rewrite(middle, rng.choice(hot, size=60, replace=False))
    rate, working_set = dirty_rate_and_working_set(first, middle, last, 1.0, 128 * MIB)
    assert rate == pytest.approx(120 / 2048 * 128 * MIB)
    assert working_set is not None
    # Capture-recapture: 60 x 60 / overlap (~36) is ~100 pages; never below what was seen.
    assert 60 / 2048 * 128 * MIB <= working_set < 140 / 2048 * 128 * MIB


def test_a_working_set_bounds_the_forecast_rounds() -> None:
    link = BandwidthHint.from_link_mbit(80)
    unbounded = forecast(_measurement(3), link, preset("livemig"))
    bounded = forecast(dataclasses.replace(_measurement(3), working_set_bytes=3 * MIB), link,
                       preset("livemig"))  # fmt: skip
    assert bounded.working_set_bytes == 3 * MIB
    a, b = unbounded.policy_forecast, bounded.policy_forecast
    assert a is not None and b is not None and a.converges and b.converges
    # The bulk round (~11 s) would dirty ~33 MiB at 3 MiB/s; a 3 MiB hot set only 3 MiB.
    assert b.total_time_ms < a.total_time_ms - 2_000
    assert b.transferred_bytes < a.transferred_bytes - 20 * MIB


def test_xbzrle_size() -> None:
    old = np.zeros(512, dtype=np.uint64)
    assert xbzrle_size(old, old.copy()) == 0
    new = old.copy()
    new[0] = np.uint64(0xFF)
    assert xbzrle_size(old, new) == 1 + 1 + 2  # a byte, two run lengths (upper bound)
    scrambled = np.random.default_rng(1).integers(0, 2**63, size=512, dtype=np.uint64)
    assert xbzrle_size(old, scrambled) == 4096 + 3  # goes plain


def _measurement(rate_mibps: float, nonzero_mib: float = 100, zstd: float = 2.5,
                 xbzrle: float | None = 1.5) -> Measurement:  # fmt: skip
    return Measurement(
        ram_bytes=128 * MIB,
        dirty_rate_bytes_per_s=rate_mibps * MIB,
        dirty_rate_method="test",
        sample=RamSample(
            pages=2048,
            zero_fraction=1 - nonzero_mib / 128,
            zstd_ratio=zstd,
            zstd_bytes_per_s=400 * MIB,
            xbzrle_ratio=xbzrle,
            changed_fraction=0.01,
        ),
        measure_time_ms=1000,
    )


def test_a_known_slow_link_prefers_a_plain_stream_that_converges() -> None:
    link = BandwidthHint.from_link_mbit(80)
    assert link.bytes_per_s == pytest.approx(10e6 * 1448 / 1514)
    predicted = forecast(_measurement(0.5), link, preset("livemig"))
    names = [f.setting for f in predicted.forecasts]
    assert "native, downtime-limit 20 ms" in names and "native, downtime-limit 300 ms" in names
    assert any(f.compression == "zstd" for f in predicted.forecasts)
    # zstd would be quicker, but its switchover cost is not modelled (measured large):
    # compression is only a convergence aid.
    zstd = next(f for f in predicted.forecasts if f.compression == "zstd" and f.converges)
    assert predicted.recommendation.startswith("native, downtime-limit")
    assert predicted.policy_forecast is not None
    assert predicted.policy_forecast.compression == "none"
    assert predicted.policy_forecast.total_time_ms > zstd.total_time_ms
    plain = next(f for f in predicted.forecasts if f.setting == "native, downtime-limit 20 ms")
    # 100 MiB at ~9.1 MiB/s, then a little more.
    assert 10_000 < plain.total_time_ms < 13_000 and plain.converges
    # Device state and the RAM check are on top of every forecast downtime.
    assert plain.downtime_ms >= 600_000 / link.bytes_per_s * 1e3 + 15
    data = json.loads(json.dumps(to_dict(predicted)))
    assert from_dict(Predicted, data) == predicted


def test_compression_is_recommended_when_no_plain_setting_converges() -> None:
    link = BandwidthHint.from_link_mbit(80)
    predicted = forecast(_measurement(12), link, preset("livemig"))
    # (a 33% throttle would converge uncompressed, but the livemig policy allows none)
    plain_allowed = [
        f for f in predicted.forecasts
        if f.compression == "none" and not f.postcopy and f.throttle_pct == 0
    ]  # fmt: skip
    assert plain_allowed and not any(f.converges for f in plain_allowed)
    assert predicted.recommendation.startswith("native + multifd zstd")
    assert predicted.policy_forecast is not None
    assert predicted.policy_forecast.compression == "zstd"


def test_an_assumed_bandwidth_never_bets_on_compression() -> None:
    hint = BandwidthHint.for_policy(preset("livemig"))
    assert hint.source.startswith("assumed") and hint.bytes_per_s == 128 * MIB
    predicted = forecast(_measurement(0.5), hint, preset("livemig"))
    assert not bandwidth_known(predicted)
    assert predicted.policy_forecast is not None
    assert predicted.policy_forecast.compression == "none"
    assert "zstd" not in predicted.recommendation


def test_bandwidth_hint_sources() -> None:
    capped = dataclasses.replace(preset("livemig"), max_bandwidth_bytes_per_s=5 * MIB)
    assert BandwidthHint.for_policy(capped).source == "policy cap 5 MiB/s"
    assert BandwidthHint.for_policy(capped, 1000).bytes_per_s == 5 * MIB  # cap below the link
    assert BandwidthHint.for_policy(preset("nova"), 80).source == "link cap 80 Mbit/s"


def test_a_guest_outrunning_the_link_gets_no_converging_plain_setting() -> None:
    link = BandwidthHint.from_link_mbit(80)
    m = _measurement(20, zstd=1.0, xbzrle=1.0)
    # The default allows a throttle, and the plan says before the start it needs one.
    default = forecast(m, link, preset("livemig"))
    assert default.recommendation.startswith("native + throttle")
    no_levers = dataclasses.replace(preset("livemig"), max_throttle_pct=0)
    predicted = forecast(m, link, no_levers)
    plain = [f for f in predicted.forecasts if not f.postcopy and not f.throttle_pct]
    assert not any(f.converges for f in plain)
    assert predicted.recommendation == "do not migrate now"
    assert "post-copy after the bulk round" in predicted.recommendation_reason
    throttled = [f for f in predicted.forecasts if f.throttle_pct]
    assert throttled and throttled[0].converges and not allowed(throttled[0], no_levers)
    # A policy that allows post-copy (and no throttle) gets it recommended.
    lenient = dataclasses.replace(no_levers, postcopy_allowed=True)
    judged = with_policy(predicted, lenient)
    assert judged.recommendation.startswith("post-copy")
    assert judged.policy_forecast is not None and judged.policy_forecast.postcopy


def test_peer_policies_are_forecast_at_their_start_limit() -> None:
    link = BandwidthHint.from_link_mbit(200)
    predicted = forecast(_measurement(1), link, preset("qemu-default"))
    assert predicted.policy_forecast is not None
    assert predicted.policy_forecast.downtime_limit_ms == 300
    assert predicted.policy_forecast.compression == "none"


def _report(samples: list[Sample], total_ms: float, downtime: float | None) -> MigrationReport:
    return MigrationReport(
        status=Status.COMPLETED, strategy="native", mode="live", vm="vm", source="a", target="b",
        policy="livemig", phase=Phase.COMPLETED, total_time_ms=total_ms, ram_bytes=128 * MIB,
        timeline=Timeline(started_at=0.0), downtime_ms=downtime, precopy_rounds=3,
        samples=tuple(samples),
        decisions=(Decision(0, "x", (SetDowntimeLimit(20),)),),
    )  # fmt: skip


def test_measured_against_predicted() -> None:
    samples = [
        Sample(time=0, elapsed_ms=ms, status="active", ram_transferred_bytes=int(ms * 10 * MIB / 1e3),
               dirty_pages_rate=256, dirty_sync_count=1 + int(ms >= 900))
        for ms in range(0, 1000, 100)
    ]  # fmt: skip
    predicted = forecast(_measurement(1), BandwidthHint.from_link_mbit(80), preset("livemig"))
    assert predicted.policy_forecast is not None
    expected_ms = predicted.policy_forecast.total_time_ms
    measured = measured_from(_report(samples, expected_ms * 1.1, 5.0), predicted)
    assert measured.bandwidth_bytes_per_s == pytest.approx(10 * MIB)
    assert measured.dirty_rate_bytes_per_s == 256 * 4096
    assert measured.final_downtime_limit_ms == 20
    assert measured.total_time_error_pct == pytest.approx(10.0)
    assert measured.rounds == 3 and not measured.postcopy
    bare = measured_from(_report([], 100, None), None)
    assert bare.total_time_error_pct is None and bare.bandwidth_bytes_per_s is None

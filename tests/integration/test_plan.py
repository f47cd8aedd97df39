"""Prediction before start against real QEMU: ``livemig plan``, forecast vs outcome.

Tolerance: the forecast total time of the policy's own setting must lie within
±30 % of the measured one (migrate issued → VM running on the target). Measured
here (2 cores, TCG, 128 MiB guest, runs of 2026-11-25, dirty rate and working set
from the three-read RAM sample): idle over 80 Mbit/s +0.1/+0.4 %, openssl over 80
Mbit/s -3.1/-2.6 %, dirty:4 over 200 Mbit/s +5.7/+3.8 %. Before the working-set
estimate, openssl's forecast took QEMU's whole-MB/s dirty rate (1-3 MiB/s) as if it
dirtied fresh pages for the whole 10 s bulk round and came out -8 to -30 % (one CI
run failed at -30.4 %). The margin is for a machine shared with other tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.demo import DemoConfig, Workload, run_demo
from lab.guest import GuestImage
from migrate.presets import PRESET_NAMES, preset
from migrate.report import Status
from tests.jsonschemas import validate_report

TOLERANCE = 0.30


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrate.cli", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_plan_json_on_the_lab_guest(guest: GuestImage, tmp_path: Path) -> None:
    result = _cli("plan", "--lab", "--json", "--workload", "dirty:8", "--memory-mib", "128",
                  "--dirty-mib", "32", "--bandwidth-mbit", "80", "--log-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    plan = json.loads(lines[0])
    mib = 1 << 20
    assert plan["policy"] == "livemig" and plan["ram_bytes"] == 128 * mib
    # The guest writes 8 MiB/s; page-sampling sees it within its sampling noise.
    assert 3 * mib < plan["dirty_rate_bytes_per_s"] < 16 * mib, plan["dirty_rate_bytes_per_s"]
    assert "page-sampling" in plan["dirty_rate_method"]
    assert plan["bandwidth_source"] == "link cap 80 Mbit/s"
    assert 0 < plan["nonzero_ram_bytes"] < 128 * mib
    assert {"zstd", "xbzrle"} <= set(plan["compression_ratios"])
    settings = {f["setting"] for f in plan["forecasts"]}
    assert "native, downtime-limit 20 ms" in settings
    assert any(s.startswith("post-copy") for s in settings)
    for forecast in plan["forecasts"]:
        assert forecast["total_time_ms"] >= forecast["downtime_ms"] > 0
        assert forecast["rounds"] >= 1 and forecast["reason"]
    assert plan["recommendation"] and plan["recommendation_reason"]
    assert plan["environment"]["workload"] == "dirty:8"


# (An idle guest, once a third case here, is openssl's guest without the loop: its
# forecast was within 0.4 %; the bench suites keep forecasting it.)
@pytest.mark.parametrize(
    ("workload", "mbit", "compression"),
    [("openssl", 80, True), ("dirty:4", 200, False)],
)
def test_forecast_total_time_matches_the_migration(
    tmp_path: Path, workload: str, mbit: float, compression: bool
) -> None:
    policy = dataclasses.replace(preset("livemig"), compression_allowed=compression)
    config = DemoConfig(
        workload=Workload.parse(workload), memory_mib=128, dirty_mib=32, bandwidth_mbit=mbit,
        policy=policy, log_dir=tmp_path, warmup_s=0.5,
    )  # fmt: skip
    report = asyncio.run(run_demo(config)).report
    assert report.status is Status.COMPLETED, report.error
    assert report.predicted is not None and report.measured is not None
    forecast = report.predicted.policy_forecast
    assert forecast is not None and forecast.converges
    # Compression is only a convergence aid: these guests converge uncompressed on
    # these links, so the plain stream is chosen even where zstd is allowed.
    assert forecast.compression == "none"
    error = (report.total_time_ms - forecast.total_time_ms) / forecast.total_time_ms
    assert abs(error) <= TOLERANCE, (
        f"{workload}: forecast {forecast.total_time_ms:.0f} ms ({forecast.setting}), "
        f"measured {report.total_time_ms:.0f} ms"
    )
    assert report.measured.total_time_error_pct == pytest.approx(error * 100)


# qemu-default runs against real QEMU in test_convergence (its non-convergence) and as
# the raw peer in test_bench_raw; the others only here.
@pytest.mark.parametrize("policy", [name for name in PRESET_NAMES if name != "qemu-default"])
def test_demo_json_for_every_preset(guest: GuestImage, tmp_path: Path, policy: str) -> None:
    result = _cli("demo", "--policy", policy, "--json", "--workload", "idle",
                  "--memory-mib", "128", "--log-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    report = validate_report(json.loads(lines[0]))
    assert report["status"] == "completed" and report["integrity"] == "ok"
    assert report["policy"] == policy
    assert report["predicted"]["policy_forecast"] is not None
    assert report["measured"]["total_time_ms"] == report["total_time_ms"]
    assert report["decisions"] and all(d["reason"] for d in report["decisions"])
    caps = {
        c["capability"]
        for d in report["decisions"]
        if d["command"] == "migrate-set-capabilities"
        for c in d["arguments"]["capabilities"]
    }
    if policy == "proxmox":
        assert any("xbzrle-cache-size" in d["arguments"] for d in report["decisions"])
    if policy == "nova":
        assert any(d["arguments"].get("downtime-limit") == 50 for d in report["decisions"])
    if policy == "livemig":
        # An unknown (uncapped) link: no bet on compression.
        assert not caps & {"multifd", "xbzrle"}

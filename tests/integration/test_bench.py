"""The benchmark end to end against real QEMU: a tiny suite, its results, report, plots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bench.backend import LabBackend
from bench.report import write_report
from bench.results import BenchResults
from bench.runner import run_suite
from bench.scenario import Comparison, Scenario, Suite
from lab.guest import GuestImage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _openssl(name: str, policy: str) -> Scenario:
    return Scenario(
        name, policy=policy, workload="openssl", memory_mib=128, warmup_s=1.5, settle_s=1.5
    )


def _tiny() -> Suite:
    return Suite(
        name="tiny",
        description="livemig native against qemu-default, once",
        comparisons=(
            Comparison(
                name="openssl",
                description="128 MiB openssl guest, uncapped veth",
                scenarios=(
                    _openssl("livemig-native", "livemig"),
                    _openssl("qemu-default", "qemu-default"),
                ),
                repetitions=1,
            ),
        ),
        budget_s=60.0,
    )


def test_tiny_suite_end_to_end(guest: GuestImage, tmp_path: Path) -> None:
    del guest  # prerequisites checked, labs of killed runs swept
    results = asyncio.run(run_suite(_tiny(), LabBackend(), tmp_path, command="test"))
    written = write_report(results, tmp_path)

    data = json.loads((tmp_path / "results.json").read_text())
    assert BenchResults.from_dict(data) == results
    assert [run["config"] for run in data["runs"]] == [
        "openssl/livemig-native",
        "openssl/qemu-default",
    ]
    for run in data["runs"]:
        assert run["status"] == "completed", run["error"]
        assert isinstance(run["guest_downtime_ms"], float) and run["guest_downtime_ms"] > 0
        assert run["integrity"] == "ok"
        assert run["repetition"] == 0
        assert run["total_time_ms"] > 0 and run["transferred_bytes"] > 0
        assert run["downtime_ms"] is not None  # QEMU's figure, kept even when 0
        assert run["probe_sent"] > 0 and run["probe_lost"] >= 0
        assert 0 < run["nonzero_ram_bytes"] <= run["ram_bytes"] == 128 << 20
        assert run["wire_bytes"] >= run["transferred_bytes"] * 0.9
        throughput = run["throughput"]
        assert throughput["before_kbps"] > 0 and throughput["after_kbps"] > 0
        assert {p["side"] for p in throughput["points"]} == {"source", "target"}
        cpu = run["cpu"]
        assert cpu["window_s"] > 0 and cpu["source_s"] > 0 and cpu["engine_s"] > 0
        assert cpu["target_s"] is not None
        assert run["samples"] and run["timeline"]["target_resume_ms"] is not None
    (link,) = data["links"]
    assert link["nominal_mbit"] is None and link["measured_bytes_per_s"] > 0

    assert [p.name for p in written] == [
        "downtime.png", "timeline-openssl.png", "openssl-openssl.png", "report.md"
    ]  # fmt: skip
    for png in written[:-1]:
        assert png.read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "report.md").read_text()
    # A peer preset run inside livemig's engine is labelled as such (raw peers are not).
    for label in ("livemig native", "qemu-default (emulated)"):
        assert f"| {label} | 1/1 |" in report
    assert "| qemu-default (emulated) | 1/1 | " in report and "| 1.00x |" in report
    assert "None: every run completed." in report
    assert not (tmp_path / "logs").exists()  # completed runs leave no logs behind

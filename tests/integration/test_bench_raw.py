"""The benchmark end to end against real QEMU: the ``ci`` suite, its results, report, plots.

livemig native, plain QEMU (target without ``-S``, it starts by itself) and Proxmox
(target with ``-S``, resumed at Proxmox's own poll) in one interleaved suite, measured
by the same probe and timeline, the guest checking itself afterwards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bench.backend import LabBackend
from bench.report import write_report
from bench.results import BenchResults
from bench.runner import run_suite
from bench.scenario import suite_named
from lab.guest import GuestImage
from migrate.control.base import GIB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ci_suite_runs_raw_peers_beside_livemig(guest: GuestImage, tmp_path: Path) -> None:
    del guest  # prerequisites checked, labs of killed runs swept
    results = asyncio.run(
        run_suite(suite_named("ci"), LabBackend(), tmp_path, command="test", keep_logs=True)
    )
    written = write_report(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert BenchResults.from_dict(data) == results

    runs = {run.scenario.label: run for run in results.runs}
    assert list(runs) == ["livemig native", "raw:qemu-default", "raw:proxmox"]
    for label, run in runs.items():
        assert run.status == "completed", (label, run.error)
        # A guest that crashed on the target never answers again: no downtime to give.
        assert (run.guest_downtime_ms or 0) > 0 or run.integrity == "corrupted", label
        assert run.stop_to_resume_ms is not None and run.stop_to_resume_ms >= 0, label
        assert run.total_time_ms is not None and run.transferred_bytes, label
        assert run.probe_sent and run.guest_check is not None, label
        assert run.cpu is not None and run.cpu.source_s is not None, label
        assert run.samples and run.timeline is not None, label
    assert runs["livemig native"].integrity == "ok"
    # Everything a run records, as results.json carries it (livemig's run: it never
    # corrupts the guest, so every figure is there).
    (native,) = (run for run in data["runs"] if run["config"] == "openssl/livemig-native")
    assert isinstance(native["guest_downtime_ms"], float) and native["guest_downtime_ms"] > 0
    assert native["repetition"] == 0
    assert native["downtime_ms"] is not None  # QEMU's figure, kept even when 0
    assert native["probe_sent"] > 0 and native["probe_lost"] >= 0
    assert 0 < native["nonzero_ram_bytes"] <= native["ram_bytes"] == 128 << 20
    assert native["wire_bytes"] >= native["transferred_bytes"] * 0.9
    throughput = native["throughput"]
    assert throughput["before_kbps"] > 0 and throughput["after_kbps"] > 0
    assert {p["side"] for p in throughput["points"]} == {"source", "target"}
    cpu = native["cpu"]
    assert cpu["window_s"] > 0 and cpu["source_s"] > 0 and cpu["engine_s"] > 0
    assert cpu["target_s"] is not None
    (link,) = data["links"]
    assert link["nominal_mbit"] is None and link["measured_bytes_per_s"] > 0
    for label in ("raw:qemu-default", "raw:proxmox"):
        run = runs[label]
        # No RAM check: integrity is the guest's own verdict, never hidden.
        assert run.integrity == (
            "corrupted" if run.guest_check.startswith("failed") else "unchecked"
        )
        assert run.repaired_pages == 0

    plain = runs["raw:qemu-default"]
    assert plain.decisions == ()  # nobody steers plain QEMU
    assert plain.samples[-1].status == "completed"

    proxmox = runs["raw:proxmox"]
    first = proxmox.decisions[0]
    assert first.outcome == "applied"
    assert first.arguments["max-bandwidth"] == 16 * GIB
    assert first.arguments["downtime-limit"] == 100
    # Proxmox looks 1 s after migrate at the earliest and resumes the target only then;
    # the guest is down from the source's STOP until that resume.
    assert proxmox.timeline is not None and proxmox.timeline.target_resume_ms is not None
    assert proxmox.timeline.target_resume_ms >= 1000
    assert proxmox.stop_to_resume_ms is not None
    if proxmox.integrity != "corrupted":
        # (A guest that QEMU 7.2's lost pages crashed on the target never answers
        # again: then there is no gap to compare; the run is counted as corrupted.)
        assert proxmox.guest_downtime_ms is not None
        assert proxmox.guest_downtime_ms >= proxmox.stop_to_resume_ms - 5

    report = (tmp_path / "report.md").read_text()
    for label in runs:
        assert f"| {label} | 1/1 |" in report
    assert "x best peer: the raw peer with the lowest median guest downtime" in report
    assert "## Runs that corrupted the guest" in report
    assert [p.name for p in written] == [
        "downtime.png", "timeline-openssl.png", "openssl-openssl.png", "report.md"
    ]  # fmt: skip
    for png in written[:-1]:
        assert png.read_bytes()[:8] == PNG_MAGIC

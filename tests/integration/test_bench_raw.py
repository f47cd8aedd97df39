"""Raw peers in the benchmark against real QEMU: the ``ci`` suite end to end.

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


def test_ci_suite_runs_raw_peers_beside_livemig(guest: GuestImage, tmp_path: Path) -> None:
    del guest  # prerequisites checked, labs of killed runs swept
    results = asyncio.run(
        run_suite(suite_named("ci"), LabBackend(), tmp_path, command="test", keep_logs=True)
    )
    write_report(results, tmp_path)
    assert BenchResults.from_dict(json.loads((tmp_path / "results.json").read_text())) == results

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
    assert proxmox.guest_downtime_ms is not None and proxmox.stop_to_resume_ms is not None
    assert proxmox.guest_downtime_ms >= proxmox.stop_to_resume_ms - 5

    report = (tmp_path / "report.md").read_text()
    for label in runs:
        assert f"| {label} | 1/1 |" in report
    assert "x best peer: the raw peer with the lowest median guest downtime" in report
    assert "## Runs that corrupted the guest" in report

"""The benchmark runner with a fake backend: order, failures, saving; report, plots, CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.errors import BenchError, PlotsUnavailable
from bench.report import render_report, write_report
from bench.results import (
    BenchEnvironment,
    BenchResults,
    LinkMeasurement,
    RunResult,
    RunStatus,
)
from bench.runner import PlannedRun, run_suite, schedule
from bench.scenario import Comparison, Omitted, Suite
from migrate.cli import main
from migrate.errors import QemuLaunchError
from tests.unit.test_bench import (
    NATIVE,
    PROXMOX,
    QEMU_DEFAULT,
    completed_run,
    environment,
    tiny_suite,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeBackend:
    """Answers every run with a plausible result; chosen configurations fail or hang."""

    def __init__(
        self, fail: dict[str, BaseException] | None = None, hang: frozenset[str] = frozenset()
    ) -> None:
        self.fail = fail or {}
        self.hang = hang
        self.calls: list[str] = []
        self.links: list[float | None] = []

    async def environment(self) -> BenchEnvironment:
        return environment()

    def other_activity(self) -> tuple[str, ...]:
        # Someone else's test run shows up before the third run.
        return ("4242 pytest tests/integration",) if len(self.calls) == 2 else ()

    async def measure_link(self, bandwidth_mbit: float | None) -> LinkMeasurement:
        self.links.append(bandwidth_mbit)
        measured = 2e9 if bandwidth_mbit is None else bandwidth_mbit * 1e6 / 8 * 0.96
        return LinkMeasurement(bandwidth_mbit, measured, 1.5)

    async def run(self, planned: PlannedRun, log_dir: Path) -> RunResult:
        self.calls.append(planned.config)
        log_dir.mkdir(parents=True)
        (log_dir / "source.serial.log").write_text("LIVEMIG READY\n")
        if planned.config in self.fail:
            raise self.fail[planned.config]
        if planned.config in self.hang:
            await asyncio.Event().wait()  # never set: the runner's timeout ends it
        downtime = {"livemig": 45.0, "qemu-default": 110.0}.get(planned.scenario.policy, 80.0)
        return completed_run(
            planned.comparison,
            planned.scenario,
            planned.repetition,
            planned.index,
            guest_downtime_ms=downtime + planned.repetition,
        )


class RecordingListener:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.total = 0
        self.started: list[int] = []
        self.saved_runs: list[int] = []

    def suite_started(self, total: int) -> None:
        self.total = total

    def run_started(self, planned: PlannedRun) -> None:
        self.started.append(planned.index)

    def run_finished(self, result: RunResult) -> None:
        saved = json.loads((self.out_dir / "results.json").read_text())
        self.saved_runs.append(len(saved["runs"]))


def test_schedule_interleaves_configurations() -> None:
    order = [(p.config, p.repetition) for p in schedule(tiny_suite(repetitions=2))]
    assert order == [
        ("openssl/livemig-native", 0),
        ("openssl/qemu-default", 0),
        ("openssl/proxmox", 0),
        ("capped/livemig-native", 0),
        ("capped/qemu-default", 0),
        ("openssl/livemig-native", 1),
        ("openssl/qemu-default", 1),
        ("openssl/proxmox", 1),
    ]
    planned = schedule(tiny_suite())
    assert [p.index for p in planned] == list(range(len(planned)))
    assert planned[3].slug == "003-capped-livemig-native-r0"


def test_failed_and_hung_runs_are_recorded_not_dropped(tmp_path: Path) -> None:
    suite = replace(tiny_suite(repetitions=2), run_timeout_s=0.2)
    backend = FakeBackend(
        fail={"openssl/proxmox": QemuLaunchError("target QEMU did not start", ["qemu"], 1, "")},
        hang=frozenset({"capped/qemu-default"}),
    )
    listener = RecordingListener(tmp_path)
    results = asyncio.run(run_suite(suite, backend, tmp_path, command="test", listener=listener))
    assert backend.calls == [p.config for p in schedule(suite)]
    assert backend.links == [None, 400.0]
    assert listener.total == len(backend.calls) == len(results.runs) == 8
    assert listener.saved_runs == list(range(1, 9))  # results.json rewritten after each run
    statuses = {(r.config, r.repetition): r.status for r in results.runs}
    assert statuses[("openssl/proxmox", 0)] is RunStatus.ERROR
    assert statuses[("openssl/proxmox", 1)] is RunStatus.ERROR
    assert statuses[("capped/qemu-default", 0)] is RunStatus.TIMEOUT
    assert statuses[("openssl/livemig-native", 1)] is RunStatus.COMPLETED
    error = next(r for r in results.runs if r.status is RunStatus.ERROR)
    assert error.error is not None and "QemuLaunchError: target QEMU did not start" in error.error
    assert error.guest_downtime_ms is None and error.scenario == PROXMOX
    # Failed runs keep their logs; completed ones don't.
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == [
        "002-openssl-proxmox-r0",
        "004-capped-qemu-default-r0",
        "007-openssl-proxmox-r1",
    ]
    assert BenchResults.load(tmp_path) == results
    assert results.finished_at is not None and results.environment.load_after is not None


def test_a_bug_in_a_run_ends_the_suite_but_keeps_what_was_measured(tmp_path: Path) -> None:
    backend = FakeBackend(fail={"openssl/qemu-default": ZeroDivisionError("bug")})
    with pytest.raises(ZeroDivisionError):
        asyncio.run(run_suite(tiny_suite(), backend, tmp_path, command="test"))
    saved = BenchResults.load(tmp_path)
    assert [r.config for r in saved.runs] == ["openssl/livemig-native"]
    assert saved.finished_at is not None


def test_link_failure_is_a_bench_error(tmp_path: Path) -> None:
    class NoLink(FakeBackend):
        async def measure_link(self, bandwidth_mbit: float | None) -> LinkMeasurement:
            raise BenchError("no link")

    with pytest.raises(BenchError, match="no link"):
        asyncio.run(run_suite(tiny_suite(), NoLink(), tmp_path, command="test"))


def _recorded(tmp_path: Path) -> Path:
    """A results.json as a real suite run writes it (through the runner)."""
    backend = FakeBackend(fail={"capped/qemu-default": QemuLaunchError("no", ["q"], 1, "")})
    omitted = (Omitted("openssl/livemig-pagestream", "strategy 'pagestream' is not registered"),)
    asyncio.run(
        run_suite(
            tiny_suite(repetitions=3), backend, tmp_path, command="bench test", omitted=omitted
        )
    )
    return tmp_path


def test_report_and_plots_from_a_recorded_results_json(tmp_path: Path) -> None:
    results = BenchResults.load(_recorded(tmp_path))
    written = write_report(results, tmp_path)
    names = [p.name for p in written]
    assert names == [
        "downtime.png",
        "timeline-openssl.png",
        "openssl-openssl.png",
        "timeline-capped.png",
        "openssl-capped.png",
        "report.md",
    ]
    for png in written[:-1]:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "## openssl" in report and "## capped" in report
    # Median 46 ms for livemig vs 111 ms for qemu-default, the best peer (proxmox) 81 ms.
    row = next(line for line in report.splitlines() if line.startswith("| livemig native | 3/3"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["46.0", "46.8", "45.0 to 47.0", "0.41x", "0.57x"]
    assert "| qemu-default (emulated) | 0/1 |" in report
    assert "**error**: QemuLaunchError: no" in report
    assert "tbf cap 400 Mbit/s" in report and "floor" in report
    assert "`openssl/livemig-pagestream`: strategy 'pagestream' is not registered" in report
    assert "![downtime](downtime.png)" in report
    assert "while others' pytest or QEMU processes ran: 1 of 11." in report
    assert results.runs[2].other_processes == ("4242 pytest tests/integration",)


def test_report_without_completed_runs_renders(tmp_path: Path) -> None:
    suite = Suite("s", "d", (Comparison("c", "d", (NATIVE, QEMU_DEFAULT), 1),), 10.0)
    backend = FakeBackend(fail={"c/livemig-native": BenchError("x"), "c/qemu-default": OSError()})
    results = asyncio.run(run_suite(suite, backend, tmp_path, command="t"))
    assert all(r.status is RunStatus.ERROR for r in results.runs)
    text = render_report(results)
    assert "| livemig native | 0/1 | n/a |" in text
    assert len(write_report(results, tmp_path)) == 4  # downtime, timeline, openssl, report


def test_cli_bench_plot_list_and_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = _recorded(tmp_path / "recorded")
    assert main(["bench", "plot", str(recorded)]) == 0
    assert (recorded / "report.md").is_file() and (recorded / "downtime.png").is_file()
    assert "report.md" in capsys.readouterr().out
    assert main(["bench", "plot", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "livemig: error:" in err and "cannot read" in err
    assert main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    assert "smoke:" in out and "default:" in out and "ci:" in out
    assert "ovirt-minimal-downtime (emulated)" in out and "raw:ovirt-minimal-downtime" in out
    with pytest.raises(SystemExit) as info:
        main(["bench", "run", "--suite", "nope"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["bench", "run", "--repetitions", "0"])
    assert info.value.code == 2


def test_cli_bench_run_writes_results_report_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from migrate import cli_bench

    monkeypatch.setattr(cli_bench, "_backend", FakeBackend)
    out = tmp_path / "smoke"
    assert main(["bench", "run", "--suite", "smoke", "--out", str(out)]) == 0
    results = BenchResults.load(out)
    assert results.command == f"livemig bench run --suite smoke --out {out}"
    assert {r.config for r in results.runs} | {o.config for o in results.omitted} == {
        "openssl/livemig-native", "openssl/livemig-pagestream", "openssl/raw-qemu-default"
    }  # fmt: skip
    assert all(r.completed for r in results.runs)
    assert {p.name for p in out.iterdir()} == {
        "results.json", "report.md", "downtime.png", "timeline-openssl.png", "openssl-openssl.png"
    }  # fmt: skip
    err = capsys.readouterr().err
    assert "openssl/livemig-native #0: completed guest downtime 45.0 ms" in err
    assert f"wrote {out / 'results.json'}" in err.replace("\n", "")


def test_without_matplotlib_bench_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from migrate import cli_bench

    recorded = _recorded(tmp_path / "recorded")
    # What `import matplotlib` meets when the bench extra is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "bench.plots", raising=False)
    with pytest.raises(PlotsUnavailable):
        write_report(BenchResults.load(recorded), recorded)
    assert not (recorded / "report.md").exists()
    assert main(["bench", "plot", str(recorded)]) == 1
    line = "livemig: error: matplotlib is not installed: install livemig[bench] for plots\n"
    assert capsys.readouterr().err == line
    # `bench run` says it before the suite runs, not after.
    backend = FakeBackend()
    monkeypatch.setattr(cli_bench, "_backend", lambda: backend)
    assert main(["bench", "run", "--suite", "smoke", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == line
    assert backend.calls == [] and not (tmp_path / "run").exists()

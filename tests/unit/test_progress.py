"""Progress: the folded view, the terminal bar, JSON lines, the CLI's output shapes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

from migrate.control.intents import Abort, AnnounceEarly, SetDowntimeLimit
from migrate.events import DecisionMade, Finished, Notice, PhaseChanged, Planned
from migrate.events import Progress as ProgressEvent
from migrate.phase import Phase
from migrate.progress import JsonLines, ProgressBar, ProgressState, describe, event_record
from migrate.report import (
    Decision,
    MigrationReport,
    Predicted,
    Sample,
    Status,
    Timeline,
)

MIB = 1 << 20


def _sample(ms: float, remaining_mib: float, sent_mib: float, sync: int,
            status: str = "active", rate_pages: int = 0) -> ProgressEvent:  # fmt: skip
    return ProgressEvent(
        Sample(
            time=ms / 1e3,
            elapsed_ms=ms,
            status=status,
            ram_total_bytes=128 * MIB,
            ram_remaining_bytes=int(remaining_mib * MIB),
            ram_transferred_bytes=int(sent_mib * MIB),
            dirty_sync_count=sync,
            dirty_pages_rate=rate_pages,
        )
    )


def _report(status: Status = Status.COMPLETED) -> MigrationReport:
    return MigrationReport(
        status=status, strategy="native", mode="live", vm="vm", source="a", target="b",
        policy="livemig", phase=Phase.COMPLETED if status == "completed" else Phase.ABORTED,
        total_time_ms=1000, ram_bytes=128 * MIB, timeline=Timeline(started_at=0.0),
    )  # fmt: skip


def _stall_events() -> list[ProgressEvent]:
    """A bulk round, then rounds whose set comes back: remaining jumps up each time."""
    events = [_sample(ms, 100 - ms / 100, ms / 100, 1) for ms in range(0, 10000, 500)]
    sent = 100.0
    for rnd in range(4):
        for step in range(7):
            sent += 4.5
            events.append(_sample(10000 + rnd * 3500 + step * 500, 31 - step * 4.5, sent,
                                  2 + rnd, rate_pages=2300))  # fmt: skip
    return events


def test_percent_never_goes_back_though_remaining_jumps() -> None:
    state = ProgressState()
    percents = [state.update(e).percent for e in _stall_events()]
    assert percents == sorted(percents)
    assert 0 < percents[-1] <= 99.0
    raw = [
        100
        * e.sample.ram_transferred_bytes
        / (e.sample.ram_transferred_bytes + e.sample.ram_remaining_bytes)
        for e in _stall_events()
    ]
    assert raw != sorted(raw)  # the raw ratio does go back at each sync
    assert state.update(Finished(_report())).percent == 100.0


def test_view_figures() -> None:
    state = ProgressState()
    state.update(DecisionMade(Decision(0, "x", (SetDowntimeLimit(20),))))
    state.update(DecisionMade(Decision(0, "x", (AnnounceEarly(0),))))
    state.update(PhaseChanged(0, Phase.SETUP, Phase.PRECOPY))
    view = None
    for ms in range(0, 2000, 100):
        view = state.update(_sample(ms, 100 - ms / 100, ms / 100, 1))
    assert view is not None
    assert view.phase == "precopy" and view.downtime_limit_ms == 20
    assert view.rate_bytes_per_s is not None and abs(view.rate_bytes_per_s - 10 * MIB) < MIB
    # 81 MiB at 10 MiB/s with nothing dirtied: about 8 s.
    assert view.eta_ms is not None and 7000 < view.eta_ms < 9000
    text = describe(view)
    assert "10.0 MiB/s" in text and "left 81.0 MiB" in text and "limit 20 ms" in text


def test_eta_uses_the_forecast_before_the_stream_has_a_rate() -> None:
    state = ProgressState()
    predicted = Predicted(
        ram_bytes=1, dirty_rate_bytes_per_s=5 * MIB, dirty_rate_method="t",
        bandwidth_bytes_per_s=1, bandwidth_source="t", device_state_bytes=0,
        resume_overhead_ms=0, forecasts=(), recommendation="", recommendation_reason="",
    )  # fmt: skip
    state.update(Planned(0, predicted))
    view = state.update(_sample(0, 100, 0, 1))
    assert view.dirty_rate_bytes_per_s == 5 * MIB
    # A guest dirtying faster than the link: no end in sight.
    for ms in range(100, 1500, 100):
        view = state.update(_sample(ms, 100, ms / 1000 * 4, 1))
    assert view.eta_ms is None and "ETA ∞" in describe(view)


def test_bar_renders_percent_and_figures() -> None:
    stream = io.StringIO()
    with ProgressBar(stream, "demo") as bar:
        for event in _stall_events()[:25]:
            bar.handle(event)
        bar.handle(Notice(0, "hello operator"))
    out = stream.getvalue()
    assert "hello operator" in out
    shown = [float(p) for p in re.findall(r"(\d+\.\d)%", out)]
    assert shown and shown == sorted(shown) and shown[-1] > 50
    assert "left 31.0 MiB" in out  # the second round's set, come back


def test_json_lines_one_object_per_event_and_the_report_last() -> None:
    stream = io.StringIO()
    lines = JsonLines(stream, final_by_caller=True)
    lines.handle(PhaseChanged(0, Phase.SETUP, Phase.PRECOPY))
    for event in _stall_events()[:3]:
        lines.handle(event)
    lines.handle(DecisionMade(Decision(1.0, "because", (Abort(),))))
    lines.handle(Finished(_report(Status.ABORTED)))  # held back for the caller
    lines.finish({"status": "aborted", "extra": 1})
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds == ["phase", "progress", "progress", "progress", "decision", "finished"]
    assert records[1]["view"]["percent"] == 0.0 and "sample" in records[1]
    assert records[4]["decision"]["reason"] == "because"
    assert [r["seq"] for r in records[:-1]] == [0] * 5  # not through a bus: unstamped
    assert all(r["schema_version"] == 1 for r in records)
    assert records[-1]["report"] == {"status": "aborted", "extra": 1}
    assert event_record(Finished(_report()))["report"]["status"] == "completed"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrate.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_events_and_json_are_mutually_exclusive() -> None:
    result = _cli("demo", "--json", "--events")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_cli_policy_names_and_plan_arguments() -> None:
    result = _cli("demo", "--policy", "vmware")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = _cli("plan")
    assert result.returncode == 2 and "--source-qmp" in result.stderr
    result = _cli("plan", "--source-qmp", "/nonexistent/qmp.sock")
    assert result.returncode == 1 and "no QMP socket" in result.stderr
    assert len(result.stderr.splitlines()) == 1

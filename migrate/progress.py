"""Live progress: a state that folds migration events, a terminal bar, JSON lines.

:class:`ProgressState` is pure: feed it events (:meth:`ProgressState.update`) and
read a :class:`ProgressView` — percent done (never decreasing: QEMU's remaining
jumps up at every dirty sync, so the raw ratio would go backwards), transfer rate,
remaining bytes, dirty rate, round, ETA and the downtime limit in force.

:class:`ProgressBar` renders that with ``rich`` on a terminal (stderr), redrawn on
each event; :class:`JsonLines` writes one JSON object per event for orchestrators
(``livemig migrate --events``): ``{"event": "progress", ...}`` with the sample and
the view, ``planned``, ``phase``, ``decision``, ``notice``, and last ``finished``
carrying the whole report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column

from migrate.codec import to_dict
from migrate.control.estimate import BandwidthEstimator, remaining_time_ms
from migrate.events import (
    EVENT_KINDS,
    EVENT_SCHEMA_VERSION,
    DecisionMade,
    DiskProgress,
    Finished,
    MigrationEvent,
    Notice,
    PhaseChanged,
    Planned,
    event_time,
)
from migrate.events import (
    Progress as ProgressEvent,
)
from migrate.phase import Phase

MIB = 1 << 20


@dataclass(frozen=True)
class ProgressView:
    """What the bar shows (bytes, bytes/s, ms; None when not known yet)."""

    phase: str
    percent: float
    rate_bytes_per_s: float | None
    remaining_bytes: int
    transferred_bytes: int
    dirty_rate_bytes_per_s: float | None
    round: int
    eta_ms: float | None
    downtime_limit_ms: float | None
    throttle_pct: int
    elapsed_ms: float
    status: str
    disk_copied_bytes: int = 0
    disk_total_bytes: int = 0
    disks_ready: bool = False


class ProgressState:
    """Folds migration events into a :class:`ProgressView`."""

    def __init__(self) -> None:
        self.bandwidth = BandwidthEstimator()
        self.phase = Phase.SETUP.value
        self.percent = 0.0
        self.remaining = 0
        self.transferred = 0
        self.total = 0
        self.round = 0
        self.dirty_rate: float | None = None
        self.predicted_dirty_rate: float | None = None
        self.predicted_total_ms: float | None = None
        self.downtime_limit_ms: float | None = None
        self.throttle_pct = 0
        self.elapsed_ms = 0.0
        self.status = "setup"
        self.finished = False
        self.disk_copied = 0
        self.disk_total = 0
        self.disks_ready = False

    def update(self, event: MigrationEvent) -> ProgressView:
        """Take one event; return the view after it."""
        if isinstance(event, Planned):
            self.predicted_dirty_rate = event.predicted.dirty_rate_bytes_per_s
            forecast = event.predicted.policy_forecast
            self.predicted_total_ms = forecast.total_time_ms if forecast else None
        elif isinstance(event, PhaseChanged):
            self.phase = event.phase.value
        elif isinstance(event, DecisionMade):
            limit = event.decision.arguments.get("downtime-limit")
            if isinstance(limit, int | float) and event.decision.side in ("source", "both"):
                self.downtime_limit_ms = float(limit)
        elif isinstance(event, ProgressEvent):
            self._sample(event)
        elif isinstance(event, DiskProgress):
            self.disk_copied = sum(d.copied_bytes for d in event.disks)
            self.disk_total = sum(d.total_bytes for d in event.disks)
            self.disks_ready = all(d.ready for d in event.disks)
            self.elapsed_ms = max(self.elapsed_ms, event.elapsed_ms)
        elif isinstance(event, Finished):
            self.finished = True
            self.status = event.report.status.value
            self.phase = event.report.phase.value
            if event.report.status == "completed":
                self.percent = 100.0
                self.remaining = 0
        return self.view()

    def _sample(self, event: ProgressEvent) -> None:
        s = event.sample
        self.bandwidth.add(s)
        self.status = s.status
        self.elapsed_ms = s.elapsed_ms
        self.throttle_pct = s.cpu_throttle_pct
        if s.ram_total_bytes:
            self.total = s.ram_total_bytes
        if s.status in ("setup", "none"):
            return
        self.remaining = s.ram_remaining_bytes
        self.transferred = s.ram_transferred_bytes
        self.round = max(self.round, s.dirty_sync_count)
        if s.dirty_sync_count >= 2:
            self.dirty_rate = s.dirty_rate_bytes_per_s
        done = s.ram_transferred_bytes
        denominator = done + s.ram_remaining_bytes
        if s.status == "completed":
            raw = 100.0
        elif denominator > 0:
            # Below 100 until the target has it all: the last bytes go at switchover.
            raw = min(99.0, 100.0 * done / denominator)
        else:
            raw = 0.0
        self.percent = max(self.percent, raw)

    def view(self) -> ProgressView:
        rate = self.bandwidth.bytes_per_s
        dirty = self.dirty_rate
        if self.throttle_pct == 0 and self.predicted_dirty_rate is not None:
            # QEMU counts distinct pages per round; before a throttle the measured
            # rate before the start is the better guide.
            dirty = max(dirty or 0.0, self.predicted_dirty_rate)
        eta: float | None = None
        if self.finished or (self.round and not self.remaining):
            eta = 0.0
        elif rate is not None and self.remaining:
            eta = remaining_time_ms(self.remaining, dirty or 0.0, rate)
        elif rate is None and self.predicted_total_ms is not None:
            eta = max(0.0, self.predicted_total_ms - self.elapsed_ms)
        return ProgressView(
            phase=self.phase,
            percent=self.percent,
            rate_bytes_per_s=rate,
            remaining_bytes=self.remaining,
            transferred_bytes=self.transferred,
            dirty_rate_bytes_per_s=dirty,
            round=self.round,
            eta_ms=eta,
            downtime_limit_ms=self.downtime_limit_ms,
            throttle_pct=self.throttle_pct,
            elapsed_ms=self.elapsed_ms,
            status=self.status,
            disk_copied_bytes=self.disk_copied,
            disk_total_bytes=self.disk_total,
            disks_ready=self.disks_ready,
        )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB/s"


def _eta(ms: float | None) -> str:
    if ms is None:
        return "∞"
    seconds = ms / 1e3
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe(view: ProgressView) -> str:
    """One line of figures beside the bar."""
    limit = "-" if view.downtime_limit_ms is None else f"{view.downtime_limit_ms:.0f} ms"
    throttle = f" | throttle {view.throttle_pct}%" if view.throttle_pct else ""
    disk = ""
    if view.disk_total_bytes:
        state = "ready" if view.disks_ready else "copying"
        disk = (
            f"disk {view.disk_copied_bytes / MIB:.0f}/{view.disk_total_bytes / MIB:.0f} MiB "
            f"{state} | "
        )
    # Most telling first: a narrow terminal cuts the end.
    return (
        disk + f"left {view.remaining_bytes / MIB:.1f} MiB | {_rate(view.rate_bytes_per_s)} | "
        f"ETA {_eta(view.eta_ms)} | round {view.round} | "
        f"dirty {_rate(view.dirty_rate_bytes_per_s)} | limit {limit}{throttle}"
    )


class ProgressBar:
    """A ``rich`` progress bar on ``stream`` (a terminal), redrawn on every event.

    Use as a context manager around the migration; pass :meth:`handle` to
    :meth:`~migrate.events.EventBus.add_callback`.
    """

    def __init__(self, stream: IO[str], title: str = "migration") -> None:
        self.state = ProgressState()
        self.console = Console(file=stream, force_terminal=True, highlight=False)
        # Phase and percent first: a narrow terminal cuts the figures, not those.
        self.progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=17)),
            BarColumn(bar_width=20, table_column=Column(min_width=20)),
            TextColumn("{task.fields[figures]}", table_column=Column(no_wrap=True)),
            console=self.console,
            auto_refresh=False,
            transient=False,
        )
        self.title = title
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        self._task = self.progress.add_task(f"{self.title:<10}   0.0%", total=100.0, figures="")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def handle(self, event: MigrationEvent) -> None:
        view = self.state.update(event)
        if self._task is None:
            return
        if isinstance(event, DecisionMade | Notice):
            text = event.decision.reason if isinstance(event, DecisionMade) else event.message
            self.progress.console.print(f"  {_kind(event)}: {text}", markup=False)
        self.progress.update(
            self._task,
            completed=view.percent,
            description=f"{view.phase:<10} {view.percent:5.1f}%",
            # Cut here: rich would rather squeeze the bar out than wrap the text.
            figures=describe(view)[: max(0, self.console.width - 42)],
        )
        self.progress.refresh()


def _kind(event: MigrationEvent) -> str:
    if isinstance(event, DecisionMade):
        return event.decision.action
    return "notice"


def event_record(event: MigrationEvent, view: ProgressView | None = None) -> dict[str, Any]:
    """One event as a JSON-ready object (docs/schema/events.json).

    Every record carries ``schema_version``, ``migration_id``, ``seq`` (1, 2, ... in
    emission order), ``event`` (its kind) and ``time``; then the kind's own fields.
    """
    record: dict[str, Any] = {
        "schema_version": EVENT_SCHEMA_VERSION,
        "migration_id": event.migration_id,
        "seq": event.seq,
        "event": EVENT_KINDS[type(event)],
        "time": event_time(event),
    }
    if isinstance(event, ProgressEvent):
        record["sample"] = to_dict(event.sample)
        if view is not None:
            record["view"] = to_dict(view)
    elif isinstance(event, Planned):
        record["predicted"] = to_dict(event.predicted)
    elif isinstance(event, PhaseChanged):
        record["previous"] = event.previous.value
        record["phase"] = event.phase.value
    elif isinstance(event, DecisionMade):
        record["decision"] = to_dict(event.decision)
    elif isinstance(event, Notice):
        record["message"] = event.message
    elif isinstance(event, DiskProgress):
        record["elapsed_ms"] = event.elapsed_ms
        record["disks"] = [to_dict(d) for d in event.disks]
        if view is not None:
            record["view"] = to_dict(view)
    else:
        record["report"] = event.report.to_dict()
    return record


class JsonLines:
    """Writes each event as one line of JSON to ``stream`` (flushed per line).

    With ``final_by_caller`` the engine's own ``finished`` event is held back and
    the caller writes the last line with :meth:`finish` (the demo adds what only
    the lab sees: guest downtime, guest check, environment).
    """

    def __init__(self, stream: IO[str], final_by_caller: bool = False) -> None:
        self.stream = stream
        self.state = ProgressState()
        self.final_by_caller = final_by_caller
        self._last: MigrationEvent | None = None
        self._held: Finished | None = None

    def handle(self, event: MigrationEvent) -> None:
        view = self.state.update(event)
        self._last = event
        if isinstance(event, Finished) and self.final_by_caller:
            self._held = event
            return
        self._write(event_record(event, view))

    def finish(self, report: dict[str, Any]) -> None:
        """Write the closing ``finished`` line carrying ``report``.

        It keeps the engine's ``finished`` event's sequence number when there was
        one (else the next after the last event written).
        """
        if self._held is not None:
            record = event_record(self._held)
        else:
            record = {
                "schema_version": EVENT_SCHEMA_VERSION,
                "migration_id": str(report.get("migration_id", "")),
                "seq": (self._last.seq if self._last is not None else 0) + 1,
                "event": "finished",
                "time": time.time(),
            }
        record["report"] = report
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

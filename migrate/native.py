"""The ``native`` strategy: QEMU's own migration stream, steered by our controller."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from migrate.errors import MigrationAborted, MigrationError, QemuError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged, Progress
from migrate.integrity import RamComparison
from migrate.phase import Phase, PhaseTracker
from migrate.policy import ControlContext, Controller
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.report import Decision, MigrationReport, Sample, Status, Timeline, offset_ms
from migrate.strategy import (
    MigrationRequest,
    StartState,
    Switchover,
    apply_decision,
    check_start,
    describe,
    failure_phase,
    finish_on_target,
    ram_backing_file,
    rollback,
    set_capabilities,
    start_incoming,
)

_TERMINAL = frozenset({"completed", "failed", "cancelled"})


class NativeStrategy:
    """Pre-copy with QEMU's migration stream; see :class:`~migrate.strategy.Strategy`."""

    name = "native"

    async def run(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
    ) -> MigrationReport:
        """Migrate; return the report, or raise :class:`MigrationError` carrying it.

        On any failure or cancellation the VM is left running on the source (if it
        was running) and the target QEMU is told to quit.
        """
        start = await check_start(source, target, request)
        run = _NativeRun(request, source, target, controller, events, start)
        return await run.execute()


class _NativeRun:
    def __init__(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
        start: StartState,
    ) -> None:
        self.request = request
        self.source = source
        self.target = target
        self.controller = controller
        self.events = events
        self.start = start
        self.phase = PhaseTracker(lambda a, b: events.emit(PhaseChanged(time.time(), a, b)))
        self.samples: list[Sample] = []
        self.decisions: list[Decision] = []
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.final_info: dict[str, Any] = {}
        self.switchover = Switchover()
        self.comparison: RamComparison | None = None

    async def execute(self) -> MigrationReport:
        async with EventRecorder(self.source) as src_log, EventRecorder(self.target) as tgt_log:
            try:
                await self._migrate(src_log, tgt_log)
            except BaseException as exc:
                if self.switchover.resumed:
                    # The VM already runs on the target: rolling back would lose its work.
                    self.phase.advance(Phase.COMPLETED)
                    self.events.emit(Finished(self._report(src_log, tgt_log, error=describe(exc))))
                    raise
                notes = await asyncio.shield(
                    rollback(self.source, self.target, self.start, self.events)
                )
                self.phase.advance(failure_phase(exc))
                report = self._report(
                    src_log, tgt_log, error=f"{describe(exc)} ({'; '.join(notes)})"
                )
                self.events.emit(Finished(report))
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                    raise
                error_type = (
                    MigrationAborted if isinstance(exc, MigrationAborted) else MigrationError
                )
                raise error_type(
                    f"migration {report.status}: {describe(exc)}; the VM stays on the source",
                    phase=report.phase,
                    report=report,
                ) from exc
            finally:
                if self.comparison is not None:
                    await self.comparison.close()
            report = self._report(src_log, tgt_log)
        self.events.emit(Finished(report))
        return report

    async def _migrate(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        request, source, target = self.request, self.source, self.target
        if request.offline and self.start.was_running:
            await source.execute("stop")
        await set_capabilities(
            (source, target), {"events": True, **dict(request.policy.capabilities)}
        )
        context = ControlContext(ram_bytes=self.start.ram_bytes, started_monotonic=self.t0)
        for decision in self.controller.start(context):
            await self._apply(decision)
        if request.verify:
            src_ram, tgt_ram = await ram_backing_file(source), await ram_backing_file(target)
            if src_ram is not None and tgt_ram is not None:
                self.comparison = RamComparison(src_ram, tgt_ram)
                self.comparison.prepare()
        await start_incoming(target, request.migration_uri)
        if self.comparison is not None:
            await self.comparison.ready()
        self.started_at, self.t0 = time.time(), time.monotonic()
        await source.execute("migrate", {"uri": request.migration_uri})
        self.phase.advance(Phase.PRECOPY)
        info = await self._follow(src_log)
        if info.get("status") != "completed":
            reason = info.get("error-desc") or f"QEMU reported status {info.get('status')}"
            raise MigrationError(str(reason))
        self.phase.advance(Phase.SWITCHOVER)
        await finish_on_target(
            self.switchover, target, tgt_log, self.comparison, request.hooks, request.repair
        )
        self.phase.advance(Phase.COMPLETED)
        if request.quit_source:
            await _quit(source)

    async def _follow(self, src_log: EventRecorder) -> dict[str, Any]:
        """Sample ``query-migrate`` until a terminal status, reacting to events at once."""
        seen = 0
        while True:
            info: dict[str, Any] = await self.source.execute("query-migrate")
            sample = Sample.from_query_migrate(
                info, time.time(), (time.monotonic() - self.t0) * 1e3
            )
            self.samples.append(sample)
            self.events.emit(Progress(sample))
            if sample.status in _TERMINAL:
                self.final_info = info
                return info
            if src_log.find("STOP", since=seen) is not None or sample.status == "device":
                self.phase.advance(Phase.SWITCHOVER)
                if self.comparison is not None:
                    self.comparison.source_stopped()
            for decision in self.controller.on_sample(sample):
                await self._apply(decision)
            seen = len(src_log.events)
            terminal = src_log.find("MIGRATION", migration_status_is(*_TERMINAL), since=0)
            if terminal is None:
                await src_log.wait_any(self.request.sample_interval_s, since=seen)

    async def _apply(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.action == "abort":
            self.events.emit(DecisionMade(decision))
            raise MigrationAborted(decision.reason)
        await apply_decision(decision, self.source, self.target, self.events)

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None = None
    ) -> MigrationReport:
        info = self.final_info
        ram = info.get("ram") or {}
        stop = src_log.find("STOP")
        src_done = src_log.find("MIGRATION", migration_status_is("completed"))
        sw = self.switchover
        at = self.started_at
        timeline = Timeline(
            started_at=at,
            source_stop_ms=offset_ms(at, stop.timestamp if stop else None),
            source_completed_ms=offset_ms(at, src_done.timestamp if src_done else None),
            target_completed_ms=offset_ms(at, sw.target_completed),
            verified_ms=offset_ms(at, sw.verified),
            target_resume_ms=offset_ms(at, sw.target_resume),
            ended_ms=(time.time() - at) * 1e3,
        )
        status = {
            Phase.COMPLETED: Status.COMPLETED,
            Phase.ABORTED: Status.ABORTED,
        }.get(self.phase.phase, Status.FAILED)
        total_ms = (
            timeline.target_resume_ms
            if timeline.target_resume_ms is not None
            else (time.monotonic() - self.t0) * 1e3
        )
        return MigrationReport(
            status=status,
            strategy="native",
            mode=self.start.mode,
            vm=self.request.vm,
            source=self.request.source.name,
            target=self.request.target.name,
            policy=self.controller.policy.name,
            phase=self.phase.phase,
            total_time_ms=total_ms,
            ram_bytes=self.start.ram_bytes,
            timeline=timeline,
            downtime_ms=_float(info.get("downtime")),
            qemu_total_time_ms=_float(info.get("total-time")),
            setup_time_ms=_float(info.get("setup-time")),
            transferred_bytes=int(ram.get("transferred", 0)),
            precopy_rounds=int(ram.get("dirty-sync-count", 0)),
            integrity=sw.integrity.integrity,
            integrity_detail=sw.integrity.detail,
            repaired_pages=sw.integrity.repaired_pages,
            samples=tuple(self.samples),
            decisions=tuple(self.decisions),
            error=error,
        )


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


async def _quit(session: QmpSession) -> None:
    # QEMU closes the QMP socket while answering quit; a lost session here is success.
    with contextlib.suppress(QemuError):
        await session.execute("quit")

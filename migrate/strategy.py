"""What every strategy shares: the request, start conditions, switchover tail, rollback.

The safety rule lives here, once: the target is resumed only after the source has
stopped and integrity holds; any failure before that stops the target and resumes
the source (if it was running), so exactly one copy of the VM runs at every moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from migrate.control.base import Controller
from migrate.errors import ConfigError, MigrationAborted, MigrationError, QemuError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged
from migrate.integrity import IntegrityResult, RamComparison
from migrate.phase import Phase, PhaseTracker
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Sample,
    Status,
    Timeline,
    new_migration_id,
    offset_ms,
)

ACTIVE_STATUSES = frozenset(
    {"setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
     "postcopy-recover", "wait-unplug", "cancelling"}
)  # fmt: skip
SOURCE_START_STATUSES = frozenset({"running", "paused"})
ANNOUNCE_NOW = {"initial": 0, "max": 100, "rounds": 3, "step": 50}


@dataclass(frozen=True)
class HostEndpoint:
    """How to reach one side: its QMP socket and (target) the migration listen URI.

    ``netns`` is the network namespace the host's migration address lives in (the
    lab's hosts); helpers that must reach that address (pagestream's agents) run
    there. None: this machine's own namespace.
    """

    name: str
    qmp_socket: Path | None = None
    migration_uri: str | None = None
    netns: str | None = None


@dataclass(frozen=True)
class MigrationHooks:
    """Points where an embedding program (or a fault-injection test) may act.

    ``before_target_resume`` runs once the target has loaded the VM, paused, before
    the integrity check and ``cont``.
    """

    before_target_resume: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class MigrationRequest:
    """One migration to perform.

    ``offline`` stops a running VM first and starts it on the target afterwards.
    ``verify`` compares source and target RAM before the target resumes (needs both
    RAMs in files this process can map, and a target started with ``-S``).
    ``repair`` copies pages that differ from the stopped source into the paused
    target (then re-verifies) instead of aborting; see :mod:`migrate.integrity`.
    ``quit_source`` ends the source QEMU once the VM runs on the target.
    ``force`` overrides forceable preflight refusals (CPU, target memory);
    ``cpu_model`` is the VM's ``-cpu`` string when known (QMP shows only the model
    name); ``source_host``/``target_host`` describe the hosts for preflight.
    ``predict`` measures the VM and forecasts the migration before it starts
    (:mod:`migrate.plan`; about a second more before ``migrate``; the CLI and the
    demo ask for it); ``link_mbit`` is the migration link's speed when known (the
    forecast's bandwidth; otherwise a stated assumption). ``migration_id`` names
    this migration in its report and events.
    """

    source: HostEndpoint
    target: HostEndpoint
    strategy: str = "native"
    policy: Policy = field(default_factory=Policy)
    offline: bool = False
    verify: bool = True
    repair: bool = True
    quit_source: bool = True
    force: bool = False
    cpu_model: str | None = None
    source_host: HostFacts = field(default_factory=HostFacts)
    target_host: HostFacts = field(default_factory=HostFacts)
    sample_interval_s: float = 0.1
    vm: str = "vm"
    hooks: MigrationHooks = field(default_factory=MigrationHooks)
    predict: bool = False
    link_mbit: float | None = None
    migration_id: str = field(default_factory=new_migration_id)

    @property
    def migration_uri(self) -> str:
        if not self.target.migration_uri:
            raise ConfigError("the target needs a migration URI (e.g. tcp:198.19.0.2:4444)")
        return self.target.migration_uri


class Strategy(Protocol):
    name: str

    async def run(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
    ) -> MigrationReport: ...


@dataclass(frozen=True)
class StartState:
    """The VM's situation when the migration began."""

    was_running: bool
    offline: bool
    ram_bytes: int

    @property
    def mode(self) -> str:
        return "offline" if self.offline else "live"


async def check_start(
    source: QmpSession, target: QmpSession, request: MigrationRequest
) -> StartState:
    """Refuse to start unless the source has a VM and the target waits for one.

    Raises :class:`ConfigError` naming the state found.
    """
    src_status = await source.status()
    if src_status not in SOURCE_START_STATUSES:
        raise ConfigError(f"source VM is not running (its state is {src_status!r})")
    tgt_status = await target.status()
    if tgt_status != "inmigrate":
        raise ConfigError(
            f"target QEMU is not waiting for an incoming migration (its state is {tgt_status!r}; "
            "start it with -incoming defer)"
        )
    info = await source.execute("query-migrate")
    if info.get("status") in ACTIVE_STATUSES:
        raise ConfigError(f"the source is already migrating (status {info['status']})")
    size = await source.execute("query-memory-size-summary")
    was_running = src_status == "running"
    return StartState(
        was_running=was_running,
        offline=request.offline or not was_running,
        ram_bytes=int(size["base-memory"]),
    )


async def ram_backing_file(session: QmpSession) -> Path | None:
    """The file behind the VM's main RAM if it is a shared ``memory-backend-file``."""
    try:
        children = await session.execute("qom-list", {"path": "/objects"})
    except QemuError:
        return None
    for child in children:
        if child.get("type") != "child<memory-backend-file>":
            continue
        path = f"/objects/{child['name']}"
        share = await session.execute("qom-get", {"path": path, "property": "share"})
        mem_path = await session.execute("qom-get", {"path": path, "property": "mem-path"})
        if share and mem_path:
            return Path(mem_path)
    return None


async def set_capabilities(sessions: tuple[QmpSession, ...], capabilities: dict[str, bool]) -> None:
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    for session in sessions:
        await session.execute("migrate-set-capabilities", {"capabilities": caps})


async def start_incoming(target: QmpSession, uri: str) -> None:
    """``migrate-incoming`` on a target started with ``-incoming defer``.

    A target started with ``-incoming URI`` already listens; that is accepted.
    """
    try:
        await target.execute("migrate-incoming", {"uri": uri})
    except QemuError as exc:
        desc = str((exc.detail or {}).get("desc", ""))
        if "incoming defer" not in desc:
            raise


async def apply_decision(
    decision: Decision, source: QmpSession, target: QmpSession, events: EventBus
) -> None:
    """Carry out a controller decision over QMP and report it.

    ``decision.side`` is ``source``, ``target`` or ``both`` (capabilities).
    """
    events.emit(DecisionMade(decision))
    if decision.command is None:
        return
    sessions = {"target": (target,), "both": (source, target)}.get(decision.side, (source,))
    for session in sessions:
        await session.execute(decision.command, decision.arguments or None)


class RamVerifier(Protocol):
    """Compares the stopped source's RAM with the paused target's (e.g. RamComparison)."""

    async def compare(self, repair: bool = False) -> IntegrityResult: ...


@dataclass
class Switchover:
    """Timestamps and results of the switchover tail."""

    target_completed: float | None = None
    verified: float | None = None
    target_resume: float | None = None
    resumed: bool = False
    integrity: IntegrityResult = field(
        default_factory=lambda: IntegrityResult(Integrity.UNCHECKED, "not compared")
    )


async def finish_on_target(
    result: Switchover,
    target: QmpSession,
    target_events: EventRecorder,
    comparison: RamVerifier | None,
    hooks: MigrationHooks,
    repair: bool,
    timeout: float = 30.0,
) -> None:
    """Wait for the target to load the VM, verify its RAM, then resume it.

    Fills ``result`` as it goes; ``result.resumed`` turns true the moment the VM
    runs on the target, after which nothing may roll the migration back.
    Raises :class:`MigrationError` if the target fails to load, and
    :class:`MigrationAborted` if its RAM differs from the source's.
    """
    done = await target_events.wait_for(
        "MIGRATION", migration_status_is("completed", "failed"), timeout=timeout
    )
    if done is None or done.data.get("status") != "completed":
        raise MigrationError("the target did not finish loading the VM")
    result.target_completed = done.timestamp
    if hooks.before_target_resume is not None:
        await hooks.before_target_resume()
    status = await target.status()
    if status == "running":
        result.integrity = IntegrityResult(
            Integrity.UNCHECKED, "target resumed on its own (not started with -S): RAM not compared"
        )
    elif comparison is not None:
        result.integrity = await comparison.compare(repair=repair)
        result.verified = time.time()
        if result.integrity.integrity is Integrity.FAILED:
            raise MigrationAborted(f"integrity check failed: {result.integrity.detail}")
    elif result.integrity.integrity is Integrity.UNCHECKED:
        result.integrity = IntegrityResult(Integrity.UNCHECKED, "RAM not mappable on both sides")
    if status == "paused":
        await target.execute("cont")
    result.resumed = True
    resume = await target_events.wait_for("RESUME", timeout=10.0)
    result.target_resume = resume.timestamp if resume else time.time()


async def rollback(
    source: QmpSession, target: QmpSession, start: StartState, events: EventBus
) -> list[str]:
    """Put the VM back on the source: cancel, stop the target, resume the source.

    Best effort at every step (each step's failure is recorded, the next still
    runs); returns what was done, for the report.
    """
    notes: list[str] = []
    with contextlib.suppress(QemuError):
        info = await source.execute("query-migrate")
        if info.get("status") in ACTIVE_STATUSES - {"cancelling"}:
            await source.execute("migrate_cancel")
            notes.append("cancelled the outgoing migration")
        deadline = time.monotonic() + 10
        while (await source.execute("query-migrate")).get("status") in ACTIVE_STATUSES:
            if time.monotonic() > deadline:
                notes.append("source migration did not stop within 10 s")
                break
            await asyncio.sleep(0.05)
    # Stop the target before the source runs again: never two running copies.
    try:
        await asyncio.wait_for(target.execute("quit"), 5)
        notes.append("stopped the target QEMU")
    except (QemuError, TimeoutError):
        notes.append("target QEMU already gone")
    if start.was_running:
        try:
            if await source.status() != "running":
                await source.execute("cont")
                notes.append("resumed the VM on the source")
            # The target may have announced the guest's MAC already: point the
            # switches back at the source.
            await source.execute("announce-self", ANNOUNCE_NOW)
        except QemuError as exc:
            notes.append(f"could not resume the source: {exc}")
            events.notice(f"could not resume the source: {exc}")
    for note in notes:
        events.notice(note)
    return notes


def failure_phase(exc: BaseException) -> Phase:
    aborted = isinstance(exc, MigrationAborted | asyncio.CancelledError | KeyboardInterrupt)
    return Phase.ABORTED if aborted else Phase.FAILED


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "cancelled by the operator"
    return str(exc) or type(exc).__name__


def qemu_figure(value: object) -> float | None:
    """A number from ``query-migrate`` (absent or non-numeric → None)."""
    return float(value) if isinstance(value, int | float) else None


class StrategyRun:
    """One migration's shared state and its outcome handling, for every strategy.

    The safety rule's outcome side lives here, once: on any failure or cancellation
    before the target resumed, the data plane is stopped, the migration rolled back
    (:func:`rollback`) and the error raised with the report; after the target
    resumed nothing rolls back. Subclasses implement :meth:`_migrate` and
    :meth:`_report`, and may stop their own data plane in :meth:`_stop_data_plane`.
    """

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
        """Run :meth:`_migrate`; the report, or :class:`MigrationError` carrying it."""
        async with EventRecorder(self.source) as src_log, EventRecorder(self.target) as tgt_log:
            try:
                await self._migrate(src_log, tgt_log)
            except BaseException as exc:
                # Stop the data plane before anything resumes: no page may land later.
                await asyncio.shield(self._stop_data_plane())
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
                await self._stop_data_plane()
                if self.comparison is not None:
                    await self.comparison.close()
            report = self._report(src_log, tgt_log)
        self.events.emit(Finished(report))
        return report

    async def _migrate(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        raise NotImplementedError

    async def _stop_data_plane(self) -> None:
        """Stop anything that still moves pages (idempotent); nothing by default."""

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None = None
    ) -> MigrationReport:
        raise NotImplementedError

    def _timeline(self, src_log: EventRecorder) -> Timeline:
        """The switchover as QEMU's events and our own marks saw it."""
        stop = src_log.find("STOP")
        src_done = src_log.find("MIGRATION", migration_status_is("completed"))
        sw = self.switchover
        at = self.started_at
        return Timeline(
            started_at=at,
            source_stop_ms=offset_ms(at, stop.timestamp if stop else None),
            source_completed_ms=offset_ms(at, src_done.timestamp if src_done else None),
            target_completed_ms=offset_ms(at, sw.target_completed),
            verified_ms=offset_ms(at, sw.verified),
            target_resume_ms=offset_ms(at, sw.target_resume),
            ended_ms=(time.time() - at) * 1e3,
        )

    def _base_report(
        self,
        src_log: EventRecorder,
        strategy: str,
        error: str | None,
        timeline: Timeline | None = None,
        **figures: Any,
    ) -> MigrationReport:
        """The report's fields every strategy shares; ``figures`` adds its own."""
        timeline = timeline or self._timeline(src_log)
        status = {Phase.COMPLETED: Status.COMPLETED, Phase.ABORTED: Status.ABORTED}.get(
            self.phase.phase, Status.FAILED
        )
        total_ms = (
            timeline.target_resume_ms
            if timeline.target_resume_ms is not None
            else (time.monotonic() - self.t0) * 1e3
        )
        integrity = self.switchover.integrity
        return MigrationReport(
            status=status,
            strategy=strategy,
            mode=self.start.mode,
            vm=self.request.vm,
            source=self.request.source.name,
            target=self.request.target.name,
            policy=self.controller.policy.name,
            phase=self.phase.phase,
            total_time_ms=total_ms,
            ram_bytes=self.start.ram_bytes,
            timeline=timeline,
            qemu_total_time_ms=qemu_figure(self.final_info.get("total-time")),
            integrity=integrity.integrity,
            integrity_detail=integrity.detail,
            repaired_pages=integrity.repaired_pages,
            samples=tuple(self.samples),
            decisions=tuple(self.decisions),
            error=error,
            migration_id=self.request.migration_id,
            **figures,
        )

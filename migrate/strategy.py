"""What every strategy shares: the start conditions and one template for a migration.

:class:`StrategyRun` is that template: set-up → transfer → switchover → outcome,
the same for every strategy, which fills in the hooks. The safety rule it relies
on (who may resume a target or a source) lives in :mod:`migrate.safety`; the
request in :mod:`migrate.request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from migrate.control.base import ControlContext, Controller
from migrate.control.intents import Abort
from migrate.disks.run import MigrationDisks
from migrate.errors import ConfigError, MigrationAborted, MigrationError, QemuError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged
from migrate.integrity import RamCheck
from migrate.journal import MigrationSettings
from migrate.phase import Phase, PhaseTracker
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.report import (
    Decision,
    MigrationReport,
    Outcome,
    Sample,
    Status,
    Timeline,
)

# The request's types are re-exported: this module was their home before migrate.request.
from migrate.request import HostEndpoint as HostEndpoint
from migrate.request import MigrationHooks as MigrationHooks
from migrate.request import MigrationRequest as MigrationRequest
from migrate.request import migration_uri_host
from migrate.safety import (
    ACTIVE_STATUSES,
    Switchover,
    rollback,
    snapshot_settings,
)
from migrate.tls import drop_migration_tls, use_migration_tls

SOURCE_START_STATUSES = frozenset({"running", "paused"})


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


async def set_capabilities(sessions: tuple[QmpSession, ...], capabilities: dict[str, bool]) -> None:
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    for session in sessions:
        await session.execute("migrate-set-capabilities", {"capabilities": caps})


async def clear_stale_capabilities(
    session: QmpSession, current: dict[str, bool], wanted: dict[str, bool]
) -> list[str]:
    """Turn off every capability ``session`` has on that this migration does not ask
    for; the names turned off.

    A QEMU that was itself the target of a migration keeps that migration's
    capabilities (pagestream's ``x-ignore-shared``): left on at one end only, the
    next migration's stream does not parse at the other end, which drops it.
    """
    stale = sorted(name for name, on in current.items() if on and name not in wanted)
    if stale:
        await set_capabilities((session,), dict.fromkeys(stale, False))
    return stale


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


async def send_to_qemu(decision: Decision, source: QmpSession, target: QmpSession) -> None:
    """Send a decision's QMP command (QEMU's rendering of its intents) to its side(s).

    ``decision.side`` is ``source``, ``target`` or ``both`` (capabilities).
    """
    if decision.command is None:
        return
    sessions = {"target": (target,), "both": (source, target)}.get(decision.side, (source,))
    for session in sessions:
        await session.execute(decision.command, decision.arguments or None)


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
    """One migration's shared state, its fixed sequence and its outcome, for every strategy.

    :meth:`_migrate` is the template; a strategy fills in the hooks::

        set-up      stop an offline VM, capabilities (:meth:`_capabilities`,
                    :meth:`_source_capabilities`), the controller's start decisions,
                    the strategy's own set-up (:meth:`_setup`), the target listens
        transfer    PRECOPY: move RAM until ready to switch over (:meth:`_transfer`)
        switchover  SWITCHOVER: stop, last pages, device state, then the target
                    completed, verified and resumed (:meth:`_switchover`, through
                    :func:`~migrate.safety.finish_on_target`)
        outcome     COMPLETED and the source QEMU quit; or, in :meth:`execute`, rollback

    Controller decisions go through :meth:`_apply` (abort is handled here) to
    :meth:`_carry_out`. The outcome side of the safety rule lives here, once: on
    any failure or cancellation before the target resumed, the data plane is
    stopped (:meth:`_stop_data_plane`), the migration rolled back
    (:func:`~migrate.safety.rollback`) and the error raised with the report
    (:meth:`_report`); after the target resumed nothing rolls back.
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
        self.comparison: RamCheck | None = None
        self.running = start.was_running  # the VM runs on the source
        self.setup_ms: float | None = None
        self.settings: MigrationSettings | None = None  # the source's, before we changed them
        self.unknown: str | None = None  # why neither copy could be resumed
        self.tls_used = False  # creds objects were added (request.tls)
        self.disks = MigrationDisks(request, source, target, events, self.t0)
        #: Index of the first source event after the disk copy (see ``_migrate``).
        self.transfer_events_from = 0

    async def execute(self) -> MigrationReport:
        """Run :meth:`_migrate`; the report, or :class:`MigrationError` carrying it."""
        async with EventRecorder(self.source) as src_log, EventRecorder(self.target) as tgt_log:
            try:
                await self._migrate(src_log, tgt_log)
            except BaseException as exc:
                # Stop the data plane before anything resumes: no page may land later.
                await asyncio.shield(self._stop_data_plane())
                for note in await asyncio.shield(self.disks.abort()):
                    self.events.notice(note)
                if self.switchover.resumed and self.phase.phase is Phase.POSTCOPY:
                    # Post-copy did not finish: the VM runs on the target, part of its
                    # RAM still on the source. Nothing rolls back. Only if the source
                    # is gone (its pages with it) is the VM lost, and the target, which
                    # can never get them, is stopped.
                    self.phase.advance(Phase.FAILED)
                    why = f"post-copy did not finish: {describe(exc)}; "
                    if await asyncio.shield(self.source.gone()) is True:
                        with contextlib.suppress(QemuError):
                            await asyncio.shield(self.target.execute("quit", timeout=5.0))
                        why += (
                            "the source QEMU is gone with pages the target never received: "
                            "the VM is lost (the target, which cannot run without them, "
                            "was stopped)"
                        )
                    else:
                        why += (
                            "the VM is on the target and pages it lacks are still on the "
                            "source: keep the source QEMU"
                        )
                    report = self._report(src_log, tgt_log, error=why)
                    self.events.emit(Finished(report))
                    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                        raise
                    raise MigrationError(why, phase=report.phase, report=report) from exc
                if self.switchover.resumed:
                    # The VM already runs on the target: rolling back would lose its work.
                    for note in self.disks.settle_replicas(on_target=True):
                        self.events.notice(note)
                    self.phase.advance(Phase.COMPLETED)
                    self.events.emit(Finished(self._report(src_log, tgt_log, error=describe(exc))))
                    raise
                back = await asyncio.shield(
                    rollback(
                        self.source,
                        self.target,
                        self.start.was_running,
                        self.events,
                        self.settings,
                        target_may_run=self.switchover.unknown is not None,
                    )
                )
                self.unknown = back.unknown
                lost = back.lost
                if back.unknown is None and (
                    back.target_stopped or await asyncio.shield(self.target.gone()) is True
                ):
                    # A QEMU that answered `quit` may still be exiting; unlinking the
                    # image it still holds open is safe (it writes nothing more).
                    back.notes += self.disks.remove_target_images()
                if back.unknown is None:
                    back.notes += self.disks.settle_replicas(on_target=False)
                self.phase.advance(failure_phase(exc))
                notes = back.notes + ([back.unknown] if back.unknown else [])
                report = self._report(
                    src_log, tgt_log, error=f"{describe(exc)} ({'; '.join(notes)})"
                )
                self.events.emit(Finished(report))
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                    raise
                if back.unknown is not None:
                    raise MigrationError(
                        f"migration outcome unknown: {describe(exc)}; {back.unknown}",
                        phase=report.phase,
                        report=report,
                    ) from exc
                error_type = (
                    MigrationAborted if isinstance(exc, MigrationAborted) else MigrationError
                )
                where = "stays on" if self.start.was_running else "stays (stopped) on"
                fate = (
                    "the source QEMU is gone: the VM is lost"
                    if lost
                    else f"the VM {where} the source"
                )
                raise error_type(
                    f"migration {report.status}: {describe(exc)}; {fate}",
                    phase=report.phase,
                    report=report,
                ) from exc
            finally:
                await self._stop_data_plane()
                if self.comparison is not None:
                    await self.comparison.close()
                if self.tls_used and self.phase.phase is not Phase.COMPLETED:
                    # The VM stays on the source: leave it without our creds object.
                    await asyncio.shield(drop_migration_tls(self.source))
            report = self._report(src_log, tgt_log)
        self.events.emit(Finished(report))
        return report

    # --- the template -------------------------------------------------------------------

    async def _migrate(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        await self._set_up(src_log)
        self.phase.advance(Phase.PRECOPY)
        await self.disks.copy()  # RAM moves once every disk mirror is READY
        # A copy on top of a replica pauses the guest a moment to start its mirror:
        # that STOP/RESUME is not the switchover's, so the source's events are read
        # from here on.
        self.transfer_events_from = len(src_log.events)
        await self._transfer(src_log)
        if self.phase.phase is not Phase.POSTCOPY:
            # After a post-copy switch the VM already runs on the target: no switchover.
            self.phase.advance(Phase.SWITCHOVER)
        await self._switchover(src_log, tgt_log)
        for note in await self.disks.close_checks():  # verify removed them unless skipped
            self.events.notice(note)
        self.phase.advance(Phase.COMPLETED)
        for note in self.disks.settle_replicas(on_target=True):
            self.events.notice(note)
        self._on_completed()
        if self.request.quit_source:
            # QEMU closes the QMP socket while answering quit; a lost session is success.
            with contextlib.suppress(QemuError):
                await self.source.execute("quit")

    async def _set_up(self, src_log: EventRecorder) -> None:
        request, source, target = self.request, self.source, self.target
        began = time.monotonic()
        self.settings = await snapshot_settings(source)
        if request.offline and self.running:
            await source.execute("stop")
            self.running = False
        # Before migrate/migrate-incoming, on both sides: exactly what this migration
        # asks for (a QEMU that arrived by migration may keep that one's capabilities).
        wanted = {"events": True, **self._capabilities()}
        source_only = self._source_capabilities()
        target_caps = (await snapshot_settings(target)).capabilities
        for side, session, current, want in (
            ("source", source, self.settings.capabilities, {**wanted, **source_only}),
            ("target", target, target_caps, wanted),
        ):
            stale = await clear_stale_capabilities(session, current, want)
            if stale:
                self.events.notice(
                    f"turned off {', '.join(stale)} on the {side} QEMU "
                    "(left from an earlier migration)"
                )
        await set_capabilities((source, target), wanted)
        if source_only:
            await set_capabilities((source,), source_only)
        context = ControlContext(ram_bytes=self.start.ram_bytes, started_monotonic=self.t0)
        for decision in self.controller.start(context):
            await self._apply(decision, src_log)
        if request.tls is not None:
            self.tls_used = True
            host = migration_uri_host(request.migration_uri) or ""
            await use_migration_tls(source, target, request.tls, host)
        await self._setup()
        await self.disks.prepare()  # the target's NBD exports, before migrate-incoming
        # The target listens now, outside the downtime.
        await start_incoming(target, request.migration_uri)
        if self.comparison is not None:
            await self.comparison.ready()
        self.setup_ms = (time.monotonic() - began) * 1e3
        self.started_at, self.t0 = time.time(), time.monotonic()
        self.disks.t0 = self.t0

    async def _apply(self, decision: Decision, src_log: EventRecorder) -> None:
        """Abort, or have the strategy carry a decision out; either way record its outcome.

        The decision goes into the report and out as an event with what became of
        it (applied, rejected and why, failed); then :meth:`_after` may act on it.
        """
        if decision.has(Abort):
            self._record(decision.settled(Outcome.APPLIED))
            raise MigrationAborted(decision.reason)
        try:
            outcome, detail = await self._carry_out(decision, src_log)
        except QemuError as exc:
            self._record(decision.settled(Outcome.FAILED, str(exc)))
            raise
        settled = decision.settled(outcome, detail)
        self._record(settled)
        if outcome is not Outcome.REJECTED:
            await self._after(settled, src_log)

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.events.emit(DecisionMade(decision))

    # --- the hooks ----------------------------------------------------------------------

    def _capabilities(self) -> dict[str, bool]:
        """Migration capabilities for both QEMUs besides ``events``: the policy's."""
        return dict(self.request.policy.capabilities)

    def _source_capabilities(self) -> dict[str, bool]:
        """Capabilities for the source QEMU only; none by default."""
        return {}

    async def _setup(self) -> None:
        """The strategy's own set-up before the target listens (RAM comparison, helpers)."""

    async def _transfer(self, src_log: EventRecorder) -> None:
        """Pre-copy until ready to switch over (post-copy may resume the target here)."""
        raise NotImplementedError

    async def _switchover(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        """From the source's stop until the VM runs on the target (or post-copy's end)."""
        raise NotImplementedError

    async def _carry_out(self, decision: Decision, src_log: EventRecorder) -> tuple[Outcome, str]:
        """Carry out a decision (not an abort); its outcome and why.

        By default QEMU's own stream carries it: the intents' QMP command is sent.
        A strategy without some lever rejects those intents, saying why.
        """
        await send_to_qemu(decision, self.source, self.target)
        return Outcome.APPLIED, ""

    async def _after(self, decision: Decision, src_log: EventRecorder) -> None:
        """Act on a decision once carried out and recorded (e.g. post-copy); nothing by default."""

    def _on_completed(self) -> None:
        """Once the phase is COMPLETED, before the source quits; nothing by default."""

    async def _stop_data_plane(self) -> None:
        """Stop anything that still moves pages (idempotent); nothing by default."""

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None = None
    ) -> MigrationReport:
        raise NotImplementedError

    # --- the report ---------------------------------------------------------------------

    def _timeline(self, src_log: EventRecorder) -> Timeline:
        """The switchover as QEMU's events and our own marks saw it."""
        stop = src_log.find("STOP", since=self.transfer_events_from)
        src_done = src_log.find("MIGRATION", migration_status_is("completed"))
        return self.switchover.timeline(
            self.started_at,
            stop.timestamp if stop else None,
            src_done.timestamp if src_done else None,
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
        if self.unknown is not None:
            status = Status.UNKNOWN
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
            transport=self.request.transport,
            disks=self.disks.reports(),
            **figures,
        )

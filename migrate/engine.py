"""The engine's front door: pick the strategy and controller, run, return the report.

``run_migration`` works on QMP sessions the caller already holds (the demo's own
QEMU processes); ``migrate`` opens the sessions from endpoints (the ``livemig
migrate`` command, for QEMUs launched by someone else).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from migrate.control.base import Controller, PredictionAware
from migrate.deadline import within
from migrate.disks.run import MigrationDisks
from migrate.errors import ConfigError, LivemigError, MigrationError, PreflightError, QemuError
from migrate.events import EventBus, Finished, MigrationEvent, PhaseChanged, Planned, Progress
from migrate.journal import (
    JournalOutcome,
    JournalRecord,
    JournalStore,
    MigrationJournal,
)
from migrate.journal import active as journal_active
from migrate.native import NativeStrategy
from migrate.pagestream.strategy import PagestreamStrategy
from migrate.plan import (
    BandwidthHint,
    Measurement,
    bandwidth_known,
    forecast_with_disks,
    measure_with_disks,
    measured_from,
)
from migrate.plan.linkrate import StreamMeter, revised_forecast
from migrate.preflight import run_preflight
from migrate.presets import controller_for
from migrate.qmp import QmpSession
from migrate.ramfiles import ram_backing_file
from migrate.recover import observe_held, vm_location
from migrate.report import MigrationReport, Predicted, PreflightCheck, Verdict
from migrate.request import HostEndpoint, MigrationRequest
from migrate.safety import snapshot_settings
from migrate.strategy import Strategy, check_start
from migrate.tls import client_context

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[Strategy]] = {"native": NativeStrategy, "pagestream": PagestreamStrategy}


def strategy_for(name: str) -> Strategy:
    """The strategy called ``name``. Raises :class:`ConfigError` for unknown names."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        ) from None


class _StrategyEvents(EventBus):
    """The bus a strategy emits on: everything goes to the caller's bus except
    :class:`Finished`, which the engine emits itself once the report is whole
    (preflight, forecast and measured figures added).

    With a journal, each phase change is written to it before the event goes on,
    i.e. before the phase's first step (a failed write fails the migration there,
    which rolls back); an ending phase's write never raises.
    """

    def __init__(
        self,
        outer: EventBus,
        journal: MigrationJournal | None = None,
        replan: _Replanner | None = None,
    ) -> None:
        super().__init__(outer.migration_id)
        self.outer = outer
        self.journal = journal
        self.replan = replan
        self.report: MigrationReport | None = None

    def emit(self, event: MigrationEvent) -> None:
        if isinstance(event, Finished):
            self.report = event.report
            return
        if isinstance(event, Progress) and self.replan is not None:
            self.replan.add(event, self.outer)
        if isinstance(event, PhaseChanged) and self.journal is not None:
            if event.phase.terminal:
                try:
                    self.journal.phase(event.phase)
                except OSError as exc:
                    log.error("migration journal: cannot record phase %s: %s", event.phase, exc)
            else:
                self.journal.phase(event.phase)
        self.outer.emit(event)


class _Replanner:
    """Forecasts again once QEMU's own stream shows what the link carries.

    When nobody said what the link carries, the forecast before the start had to
    assume QEMU's default cap (see :mod:`migrate.plan.linkrate`); the first
    ``query-migrate`` samples of a native migration measure it. A known link (the
    operator's ``link_mbit``, a policy cap) is kept, as before: the forecast on
    known links is what ``tests/integration/test_plan.py`` holds to its tolerance,
    and a capped link's first 100 ms were not measured against its cap. The revised forecast is emitted as a second
    :class:`Planned` and is the one the report compares with.
    """

    def __init__(self, measurement: Measurement, predicted: Predicted, request: MigrationRequest):
        self.measurement = measurement
        self.predicted = predicted
        self.policy = request.policy
        self.meter = StreamMeter()

    def add(self, event: Progress, outer: EventBus) -> None:
        rate = self.meter.add(event.sample)
        if rate is None:
            return
        self.predicted = revised_forecast(self.measurement, rate, self.policy)
        outer.emit(Planned(time.time(), self.predicted))


async def run_migration(
    request: MigrationRequest,
    source: QmpSession,
    target: QmpSession,
    controller: Controller | None = None,
    events: EventBus | None = None,
) -> MigrationReport:
    """Migrate the VM behind ``source`` to ``target``, after preflight checks.

    Raises :class:`~migrate.errors.PreflightError` if a check refuses the move.
    Returns the report of a completed migration; raises
    :class:`~migrate.errors.MigrationError` (with ``.report``) otherwise, the VM
    left running on the source. Once the strategy has started, ``events`` ends
    with :class:`Finished` carrying the same report, whatever the outcome.

    With ``request.state_dir`` the migration keeps a journal there
    (:mod:`migrate.journal`); a VM with an unfinished one is refused
    (:class:`~migrate.errors.ConfigError`). At the end the journal is finished
    once both QEMUs show exactly one copy of the VM running; otherwise it stays
    for ``livemig recover`` (a :class:`~migrate.events.Notice` says so).
    """
    strategy = strategy_for(request.strategy)
    events = events or EventBus()
    events.bind(request.migration_id)
    for session in (source, target):
        session.timeout_s = request.qmp_timeout_s
    journal = await _begin_journal(request, source, target)
    relay = _StrategyEvents(events, journal)
    ended = False

    def planned(first: Predicted | None) -> Predicted | None:
        return relay.replan.predicted if relay.replan is not None else first

    async def end(report: MigrationReport | None, error: BaseException | None) -> None:
        nonlocal ended
        ended = True
        try:
            if journal is not None:
                await asyncio.shield(_end_journal(journal, source, target, report, error, events))
        finally:
            if report is not None:
                events.emit(Finished(report))

    with journal_active(journal):
        try:
            checks = await run_preflight(
                source,
                target,
                request.source_host,
                request.target_host,
                request.cpu_model,
                with_local_disks=request.with_local_disks,
                shared_disks=request.shared_disks,
            )
            for check in checks.checks:
                if check.verdict is not Verdict.OK:
                    events.notice(f"preflight {check.name}: {check.verdict}: {check.detail}")
            checks.enforce(request.force)
            measurement, predicted = await _predict(request, source, target, events)
            if (
                measurement is not None
                and predicted is not None
                and request.strategy == "native"
                and not request.with_local_disks  # the RAM stream starts after the disk copy
                and not bandwidth_known(predicted)
            ):
                relay.replan = _Replanner(measurement, predicted, request)
            if controller is None:
                controller = controller_for(request.policy, predicted)
            elif predicted is not None and isinstance(controller, PredictionAware):
                controller.use_prediction(predicted)
            try:
                report = await strategy.run(request, source, target, controller, relay)
            except MigrationError as exc:
                if exc.report is not None:
                    exc.report = _with_plan(exc.report, checks.checks, planned(predicted))
                await end(exc.report, exc)
                raise
            except BaseException as exc:
                # Cancelled: the strategy rolled back and reported (if it had started).
                partial = relay.report
                await end(
                    _with_plan(partial, checks.checks, planned(predicted))
                    if partial is not None
                    else None,
                    exc,
                )
                raise
            report = _with_plan(report, checks.checks, planned(predicted))
            await end(report, None)
            return report
        except BaseException as exc:
            if not ended:  # refused before the strategy ran (preflight, a bad request)
                await end(None, exc)
            raise


async def _begin_journal(
    request: MigrationRequest, source: QmpSession, target: QmpSession
) -> MigrationJournal | None:
    """The migration's journal, if the request keeps one; refuses a VM with an unfinished one.

    The start checks run first (without a journal): a move refused there changes
    nothing, so it leaves nothing to recover.
    """
    if request.state_dir is None:
        return None
    if request.source.qmp_socket is None or request.target.qmp_socket is None:
        raise ConfigError(
            "a migration journal (state_dir) needs both endpoints' QMP socket paths: "
            "recovery connects to them"
        )
    store = JournalStore(request.state_dir)
    store.check_vm_free(request)
    start = await check_start(source, target, request)
    settings = await snapshot_settings(source)
    record = JournalRecord.for_request(request, start.was_running, settings)
    return store.begin(request, record)


#: How long the end-of-migration check may look at both QEMUs (and a quit one take to exit).
_LOCATE_S = 5.0


async def _end_journal(
    journal: MigrationJournal,
    source: QmpSession,
    target: QmpSession,
    report: MigrationReport | None,
    error: BaseException | None,
    events: EventBus,
) -> None:
    """Record the outcome; finish the journal if the VM runs in exactly one place."""
    record = journal.record
    if report is None and isinstance(error, ConfigError | PreflightError):
        journal.finish(JournalOutcome("refused", str(error), "source", time.time()))
        return
    status = str(report.status) if report is not None else "error"
    why = report.error if report is not None else None
    if why is None and error is not None:
        why = str(error) or type(error).__name__
    try:
        where = await within(
            _locate(record, source, target, completed=status == "completed"), 2 * _LOCATE_S + 1
        )
    except (TimeoutError, LivemigError):
        where = None
    outcome = JournalOutcome(status, why, where, time.time())
    if where is not None:
        journal.finish(outcome)
        return
    journal.keep(outcome)
    events.notice(
        f"could not confirm that exactly one copy of VM {record.vm} runs: its journal "
        f"{journal.path} stays; run `livemig recover`"
    )


async def _locate(
    record: JournalRecord, source: QmpSession, target: QmpSession, completed: bool
) -> str | None:
    """Where the VM runs now, by the engine's own sessions (None: not settled)."""
    tgt = await observe_held(
        target, "target", record.target.qmp_socket, _LOCATE_S, gone_wait_s=_LOCATE_S
    )
    if completed and tgt.running:
        return "target"  # the source was told to quit (or kept paused on request)
    src = await observe_held(
        source, "source", record.source.qmp_socket, _LOCATE_S, gone_wait_s=_LOCATE_S
    )
    return vm_location(record.source_was_running, src, tgt)


def _with_plan(
    report: MigrationReport, checks: tuple[PreflightCheck, ...], predicted: Predicted | None
) -> MigrationReport:
    return dataclasses.replace(
        report, preflight=checks, predicted=predicted, measured=measured_from(report, predicted)
    )


async def _predict(
    request: MigrationRequest, source: QmpSession, target: QmpSession, events: EventBus
) -> tuple[Measurement | None, Predicted | None]:
    """The pre-start measurement and forecast (with the disks' first copy and their
    write rate over the same window), or None (not asked for, offline, or QEMU refused)."""
    if not request.predict or request.offline:
        return None, None
    bandwidth = BandwidthHint.for_policy(request.policy, request.link_mbit)
    try:
        ram_path = await ram_backing_file(source)
        disk_bytes, copied = 0, []
        if request.with_local_disks:
            disks = MigrationDisks(request, source, target, events)
            disk_bytes = await disks.copy_bytes()  # a replica's: only what changed
            copied = [p.source for p in disks.classification.mirrored]
        measurement, write_rate = await measure_with_disks(source, ram_path, copied)
    except QemuError as exc:
        events.notice(f"no forecast: {exc}")
        return None, None
    predicted = forecast_with_disks(measurement, bandwidth, request.policy, disk_bytes, write_rate)
    events.emit(Planned(time.time(), predicted))
    return measurement, predicted


async def connect_endpoint(endpoint: HostEndpoint, role: str, timeout: float) -> QmpSession:
    """A QMP session to ``endpoint``: its UNIX socket, or its TCP+TLS address.

    Raises :class:`ConfigError` if it has neither, :class:`QemuError` if the QEMU
    cannot be reached (or the TLS handshake fails).
    """
    if endpoint.qmp_tcp is not None:
        address = endpoint.qmp_tcp
        context = client_context(address.credentials)
        return await QmpSession.connect_tcp(address.host, address.port, role, context, timeout)
    if endpoint.qmp_socket is None:
        raise ConfigError(f"the {role} endpoint needs a QMP socket path or a QMP TCP address")
    return await QmpSession.connect(endpoint.qmp_socket, role, timeout)


@contextlib.asynccontextmanager
async def open_sessions(
    request: MigrationRequest, connect_timeout: float = 5.0
) -> AsyncIterator[tuple[QmpSession, QmpSession]]:
    """QMP sessions to the request's source and target, closed on exit."""
    src, tgt = request.source, request.target
    a, b = src.qmp_socket, tgt.qmp_socket
    if a is not None and b is not None and a.resolve() == b.resolve():
        raise ConfigError(f"source and target are the same QEMU ({src.qmp_socket})")
    source = await connect_endpoint(src, "source", connect_timeout)
    try:
        target = await connect_endpoint(tgt, "target", connect_timeout)
        try:
            yield source, target
        finally:
            await target.close()
    finally:
        await source.close()


async def migrate(
    request: MigrationRequest,
    controller: Controller | None = None,
    events: EventBus | None = None,
    connect_timeout: float = 5.0,
) -> MigrationReport:
    """Like :func:`run_migration`, opening QMP sessions from the request's endpoints."""
    strategy_for(request.strategy)
    async with open_sessions(request, connect_timeout) as (source, target):
        return await run_migration(request, source, target, controller, events)

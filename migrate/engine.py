"""The engine's front door: pick the strategy and controller, run, return the report.

``run_migration`` works on QMP sessions the caller already holds (the demo's own
QEMU processes); ``migrate`` opens the sessions from endpoints (the ``livemig
migrate`` command, for QEMUs launched by someone else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from migrate.control.base import Controller, PredictionAware
from migrate.errors import ConfigError, MigrationError, QemuError
from migrate.events import EventBus, Finished, MigrationEvent, Planned
from migrate.native import NativeStrategy
from migrate.pagestream.strategy import PagestreamStrategy
from migrate.plan import BandwidthHint, measured_from, plan_migration
from migrate.preflight import run_preflight
from migrate.presets import controller_for
from migrate.qmp import QmpSession
from migrate.ramfiles import ram_backing_file
from migrate.report import MigrationReport, Predicted, PreflightCheck, Verdict
from migrate.request import MigrationRequest
from migrate.strategy import Strategy

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
    (preflight, forecast and measured figures added)."""

    def __init__(self, outer: EventBus) -> None:
        super().__init__(outer.migration_id)
        self.outer = outer
        self.report: MigrationReport | None = None

    def emit(self, event: MigrationEvent) -> None:
        if isinstance(event, Finished):
            self.report = event.report
        else:
            self.outer.emit(event)


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
    """
    strategy = strategy_for(request.strategy)
    events = events or EventBus()
    events.bind(request.migration_id)
    for session in (source, target):
        session.timeout_s = request.qmp_timeout_s
    checks = await run_preflight(
        source, target, request.source_host, request.target_host, request.cpu_model
    )
    for check in checks.checks:
        if check.verdict is not Verdict.OK:
            events.notice(f"preflight {check.name}: {check.verdict}: {check.detail}")
    checks.enforce(request.force)
    predicted = await _predict(request, source, events)
    if controller is None:
        controller = controller_for(request.policy, predicted)
    elif predicted is not None and isinstance(controller, PredictionAware):
        controller.use_prediction(predicted)
    relay = _StrategyEvents(events)
    try:
        report = await strategy.run(request, source, target, controller, relay)
    except MigrationError as exc:
        if exc.report is not None:
            exc.report = _with_plan(exc.report, checks.checks, predicted)
            events.emit(Finished(exc.report))
        raise
    except BaseException:
        if relay.report is not None:  # cancelled: the strategy rolled back and reported
            events.emit(Finished(_with_plan(relay.report, checks.checks, predicted)))
        raise
    report = _with_plan(report, checks.checks, predicted)
    events.emit(Finished(report))
    return report


def _with_plan(
    report: MigrationReport, checks: tuple[PreflightCheck, ...], predicted: Predicted | None
) -> MigrationReport:
    return dataclasses.replace(
        report, preflight=checks, predicted=predicted, measured=measured_from(report, predicted)
    )


async def _predict(
    request: MigrationRequest, source: QmpSession, events: EventBus
) -> Predicted | None:
    """The pre-start forecast, or None (not asked for, offline, or QEMU refused)."""
    if not request.predict or request.offline:
        return None
    bandwidth = BandwidthHint.for_policy(request.policy, request.link_mbit)
    try:
        ram_path = await ram_backing_file(source)
        predicted = await plan_migration(source, request.policy, bandwidth, ram_path)
    except QemuError as exc:
        events.notice(f"no forecast: {exc}")
        return None
    events.emit(Planned(time.time(), predicted))
    return predicted


@contextlib.asynccontextmanager
async def open_sessions(
    request: MigrationRequest, connect_timeout: float = 5.0
) -> AsyncIterator[tuple[QmpSession, QmpSession]]:
    """QMP sessions to the request's source and target, closed on exit."""
    if request.source.qmp_socket is None or request.target.qmp_socket is None:
        raise ConfigError("both endpoints need a QMP socket path")
    if request.source.qmp_socket.resolve() == request.target.qmp_socket.resolve():
        raise ConfigError(f"source and target are the same QEMU ({request.source.qmp_socket})")
    source = await QmpSession.connect(request.source.qmp_socket, "source", connect_timeout)
    try:
        target = await QmpSession.connect(request.target.qmp_socket, "target", connect_timeout)
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

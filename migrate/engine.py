"""The engine's front door: pick the strategy and controller, run, return the report.

``run_migration`` works on QMP sessions the caller already holds (the demo's own
QEMU processes); ``migrate`` opens the sessions from endpoints (the ``livemig
migrate`` command, for QEMUs launched by someone else).
"""

from __future__ import annotations

import dataclasses

from migrate.errors import ConfigError, MigrationError
from migrate.events import EventBus
from migrate.native import NativeStrategy
from migrate.pagestream.strategy import PagestreamStrategy
from migrate.policy import Controller
from migrate.preflight import run_preflight
from migrate.presets import controller_for
from migrate.qmp import QmpSession
from migrate.report import MigrationReport, Verdict
from migrate.strategy import MigrationRequest, Strategy

STRATEGIES: dict[str, type[Strategy]] = {"native": NativeStrategy, "pagestream": PagestreamStrategy}


def strategy_for(name: str) -> Strategy:
    """The strategy called ``name``. Raises :class:`ConfigError` for unknown names."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        ) from None


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
    left running on the source.
    """
    strategy = strategy_for(request.strategy)
    events = events or EventBus()
    checks = await run_preflight(
        source, target, request.source_host, request.target_host, request.cpu_model
    )
    for check in checks.checks:
        if check.verdict is not Verdict.OK:
            events.notice(f"preflight {check.name}: {check.verdict}: {check.detail}")
    checks.enforce(request.force)
    controller = controller or controller_for(request.policy)
    try:
        report = await strategy.run(request, source, target, controller, events)
    except MigrationError as exc:
        if exc.report is not None:
            exc.report = dataclasses.replace(exc.report, preflight=checks.checks)
        raise
    return dataclasses.replace(report, preflight=checks.checks)


async def migrate(
    request: MigrationRequest,
    controller: Controller | None = None,
    events: EventBus | None = None,
    connect_timeout: float = 5.0,
) -> MigrationReport:
    """Like :func:`run_migration`, opening QMP sessions from the request's endpoints."""
    if request.source.qmp_socket is None or request.target.qmp_socket is None:
        raise ConfigError("both endpoints need a QMP socket path")
    if request.source.qmp_socket.resolve() == request.target.qmp_socket.resolve():
        raise ConfigError(f"source and target are the same QEMU ({request.source.qmp_socket})")
    strategy_for(request.strategy)
    source = await QmpSession.connect(request.source.qmp_socket, "source", connect_timeout)
    try:
        target = await QmpSession.connect(request.target.qmp_socket, "target", connect_timeout)
        try:
            return await run_migration(request, source, target, controller, events)
        finally:
            await target.close()
    finally:
        await source.close()

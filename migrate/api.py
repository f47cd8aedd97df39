"""The engine's front door for programs that embed it: the :class:`Migration` handle.

::

    migration = Migration(request)            # or Migration(request, source=s, target=t)
    await migration.start()
    async for event in migration.events():    # typed events, the last is Finished
        if isinstance(event, Progress) and too_slow(event.sample):
            migration.abort("maintenance window closed")
    report = await migration.wait()           # the report, whatever the outcome

The handle owns one migration: its id (``request.migration_id``, on the report and
every event), its event bus and the task that runs it. What an operator can do
while it runs (:meth:`~Migration.abort`, :meth:`~Migration.switchover_now`,
:meth:`~Migration.start_postcopy`, :meth:`~Migration.update_policy`) goes to the
controller as an operator request and reaches the strategy at its next sample, like
any controller decision: the safety rule (:mod:`migrate.strategy`) is the same for
every path. An abort that the strategy does not pick up within
``abort_grace_s`` (e.g. during a long pre-start measurement) cancels the task, which
rolls back the same way.

Subscribers cannot break a migration (see :mod:`migrate.events`). Cancelling the
task that awaits :meth:`~Migration.wait` does not cancel the migration; call
:meth:`~Migration.abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from migrate.control.base import Controller
from migrate.control.operator import OperatorControl
from migrate.engine import open_sessions, run_migration, strategy_for
from migrate.errors import ConfigError, LivemigError, MigrationError
from migrate.events import EventBus, Finished, MigrationEvent
from migrate.policy import Policy
from migrate.qmp import QmpSession
from migrate.report import MigrationReport
from migrate.strategy import MigrationRequest

log = logging.getLogger(__name__)


class MigrationHandle:
    """What every handle shares: one migration's id, event bus, task and steering.

    Subclasses say how the migration runs (:meth:`_execute`); ``request`` needs a
    ``migration_id`` and a ``policy``. :class:`Migration` runs QEMU migrations
    through the engine; :class:`migrate.libvirt.LibvirtMigration` libvirt's job.
    """

    def __init__(
        self,
        request: Any,
        *,
        controller: Controller | None = None,
        abort_grace_s: float = 5.0,
        events: EventBus | None = None,
    ) -> None:
        self.request = request
        self._abort_grace_s = abort_grace_s
        self._bus = events if events is not None else EventBus(request.migration_id)
        self._bus.bind(request.migration_id)
        self._operator = OperatorControl(request.policy, controller)
        self._task: asyncio.Task[MigrationReport] | None = None
        self._report: MigrationReport | None = None
        self._abort_reason: str | None = None

    @property
    def id(self) -> str:
        return str(self.request.migration_id)

    @property
    def policy(self) -> Policy:
        """The policy in force (after :meth:`update_policy`)."""
        return self._operator.policy

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def start(self) -> None:
        """Start the migration in a task of the running event loop (once)."""
        if self._task is not None:
            raise ConfigError(f"migration {self.id} was already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"livemig-migration-{self.id[:8]}"
        )
        await asyncio.sleep(0)

    async def _execute(self) -> MigrationReport:
        """Run the migration to its end (the subclass's way)."""
        raise NotImplementedError

    async def _run(self) -> MigrationReport:
        try:
            return await self._execute()
        finally:
            for event in reversed(self._bus.history):
                if isinstance(event, Finished):
                    self._report = event.report
                    break
            self._bus.close()

    async def events(self) -> AsyncIterator[MigrationEvent]:
        """Every event of this migration from its first (replayed) to :class:`Finished`.

        Ends when the migration has ended (also when it was refused before it
        started: then without ``Finished``; :meth:`wait` says why).
        """
        async for event in self._bus.subscribe(replay=True):
            yield event

    def add_callback(self, callback: Any) -> None:
        """Call ``callback(event)`` for every event from now on (errors are logged)."""
        self._bus.add_callback(callback)

    async def wait(self) -> MigrationReport:
        """The report once the migration has ended, whatever its outcome.

        Raises the engine's error when there is no report: the move was refused
        (:class:`~migrate.errors.PreflightError`), the request was wrong
        (:class:`~migrate.errors.ConfigError`), or QEMU could not be reached.
        """
        task = self._require_task()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # the waiter was cancelled, not the migration
        except Exception:
            if self._report is None:
                raise  # refused or unreachable: no report to give
        if self._report is not None:
            return self._report
        if task.cancelled():
            raise MigrationError(f"migration {self.id} was cancelled before it started")
        return task.result()

    async def run(self, cancel_reason: str = "cancelled by the operator") -> MigrationReport:
        """Start (if not yet) and wait for the report; cancelling the caller aborts it.

        Unlike :meth:`wait`, a cancellation of the awaiting task becomes an abort
        (``cancel_reason``): the migration rolls back, then ``CancelledError`` is
        raised on.
        """
        if self._task is None:
            await self.start()
        try:
            return await self.wait()
        except asyncio.CancelledError:
            self.abort(cancel_reason)
            with contextlib.suppress(LivemigError):
                await self.wait()
            raise

    def abort(self, reason: str) -> None:
        """Abort: the VM stays on (goes back to) the source. Too late after switchover."""
        task = self._require_task()
        reason = reason.strip() or "aborted by the operator"
        if task.done() or self._abort_reason is not None:
            return
        self._abort_reason = reason
        self._operator.request_abort(reason)
        task.get_loop().call_later(self._abort_grace_s, self._cancel_if_running, reason)

    def _cancel_if_running(self, reason: str) -> None:
        if self._task is not None and not self._task.done():
            log.info("migration %s: abort not picked up in %.1f s, cancelling (%s)",
                     self.id, self._abort_grace_s, reason)  # fmt: skip
            self._task.cancel(f"aborted: {reason}")

    def switchover_now(self) -> None:
        """Switch over at the next opportunity, whatever the downtime it costs."""
        self._require_task()
        self._operator.request_switchover()

    def start_postcopy(self) -> None:
        """Switch to post-copy now (only if the policy allows post-copy)."""
        self._require_task()
        if not self._operator.policy.postcopy_allowed:
            raise ConfigError("the policy does not allow post-copy (postcopy_allowed=False)")
        self._operator.request_postcopy()

    def update_policy(self, **changes: Any) -> Policy:
        """Change the policy while it runs (e.g. ``max_downtime_ms=500``); the new one.

        Raises :class:`ConfigError` for unknown fields or values of the wrong kind.
        """
        self._require_task()
        names = {f.name for f in dataclasses.fields(Policy)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown policy field(s): {', '.join(unknown)}")
        try:
            policy = dataclasses.replace(self._operator.policy, **changes)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad policy change: {exc}") from None
        self._operator.request_policy(policy, time.time())
        return policy

    def _require_task(self) -> asyncio.Task[MigrationReport]:
        if self._task is None:
            raise ConfigError(f"migration {self.id} has not been started")
        return self._task


class Migration(MigrationHandle):
    """One QEMU migration, started, watched and steered by an embedding program.

    ``source``/``target``: QMP sessions the caller already holds (they stay the
    caller's); without them the handle connects to the request's endpoints and
    closes those sessions at the end. ``controller`` overrides the policy's own.
    """

    def __init__(
        self,
        request: MigrationRequest,
        *,
        source: QmpSession | None = None,
        target: QmpSession | None = None,
        controller: Controller | None = None,
        connect_timeout_s: float = 5.0,
        abort_grace_s: float = 5.0,
        events: EventBus | None = None,
    ) -> None:
        if (source is None) != (target is None):
            raise ConfigError("give both QMP sessions or neither")
        strategy_for(request.strategy)  # unknown names refused before anything starts
        super().__init__(request, controller=controller, abort_grace_s=abort_grace_s, events=events)
        self._sessions = (source, target) if source is not None and target is not None else None
        self._connect_timeout_s = connect_timeout_s

    async def _execute(self) -> MigrationReport:
        if self._sessions is not None:
            return await run_migration(
                self.request, *self._sessions, controller=self._operator, events=self._bus
            )
        async with open_sessions(self.request, self._connect_timeout_s) as sessions:
            return await run_migration(
                self.request, *sessions, controller=self._operator, events=self._bus
            )


async def migrate_once(request: MigrationRequest, **kwargs: Any) -> MigrationReport:
    """Run one migration to its end and return its report (see :meth:`Migration.run`).

    Raises :class:`~migrate.errors.LivemigError` when there is no report.
    """
    return await Migration(request, **kwargs).run()

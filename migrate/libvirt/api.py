"""The handle for a libvirt migration, shaped like :class:`migrate.api.Migration`.

::

    migration = LibvirtMigration(LibvirtRequest(source, target, "demo"))
    await migration.start()
    migration.abort("maintenance window closed")      # any time; libvirt's abortJob
    report = await migration.wait()

Operator requests (abort, switch over now, post-copy) go through the same
:class:`~migrate.control.operator.OperatorControl` as the QEMU strategies and reach
libvirt at the next sample.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from migrate.control.base import Controller
from migrate.control.operator import OperatorControl
from migrate.errors import ConfigError, LivemigError, MigrationError
from migrate.events import EventBus, Finished, MigrationEvent
from migrate.libvirt.request import LibvirtRequest
from migrate.libvirt.run import LibvirtRun
from migrate.report import MigrationReport


class LibvirtMigration:
    """One libvirt migration: started, watched, steered, waited for."""

    def __init__(
        self,
        request: LibvirtRequest,
        *,
        controller: Controller | None = None,
        events: EventBus | None = None,
        abort_grace_s: float = 5.0,
    ) -> None:
        self.request = request
        self._bus = events if events is not None else EventBus(request.migration_id)
        self._bus.bind(request.migration_id)
        self._operator = OperatorControl(request.policy, controller)
        self._abort_grace_s = abort_grace_s
        self._task: asyncio.Task[MigrationReport] | None = None
        self._report: MigrationReport | None = None
        self._aborting = False

    @property
    def id(self) -> str:
        return self.request.migration_id

    async def start(self) -> None:
        if self._task is not None:
            raise ConfigError(f"migration {self.id} was already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"livemig-libvirt-{self.id[:8]}"
        )
        await asyncio.sleep(0)

    async def _run(self) -> MigrationReport:
        try:
            return await LibvirtRun(self.request, self._operator, self._bus).execute()
        finally:
            for event in reversed(self._bus.history):
                if isinstance(event, Finished):
                    self._report = event.report
                    break
            self._bus.close()

    async def events(self) -> AsyncIterator[MigrationEvent]:
        async for event in self._bus.subscribe(replay=True):
            yield event

    async def wait(self) -> MigrationReport:
        """The report, whatever the outcome; raises when there is none (refused,
        unreachable daemon)."""
        task = self._require_task()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise
        except Exception:
            if self._report is None:
                raise
        if self._report is not None:
            return self._report
        if task.cancelled():
            raise MigrationError(f"migration {self.id} was cancelled before it started")
        return task.result()

    async def run(self, cancel_reason: str = "cancelled by the operator") -> MigrationReport:
        """Start and wait; a cancellation of the caller aborts the migration first."""
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
        """Abort at the next sample (libvirt's abortJob); the VM stays on the source."""
        task = self._require_task()
        if task.done() or self._aborting:
            return
        self._aborting = True
        self._operator.request_abort(reason.strip() or "aborted by the operator")
        task.get_loop().call_later(self._abort_grace_s, self._cancel_if_running, reason)

    def _cancel_if_running(self, reason: str) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel(f"aborted: {reason}")

    def switchover_now(self) -> None:
        self._require_task()
        self._operator.request_switchover()

    def _require_task(self) -> asyncio.Task[MigrationReport]:
        if self._task is None:
            raise ConfigError(f"migration {self.id} has not been started")
        return self._task


async def migrate_domain(request: LibvirtRequest, **kwargs: object) -> MigrationReport:
    """Run one libvirt migration to its end; its report (see :meth:`LibvirtMigration.run`)."""
    return await LibvirtMigration(request, **kwargs).run()  # type: ignore[arg-type]

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

from migrate.api import MigrationHandle
from migrate.control.base import Controller
from migrate.events import EventBus
from migrate.libvirt.request import LibvirtRequest
from migrate.libvirt.run import LibvirtRun
from migrate.report import MigrationReport


class LibvirtMigration(MigrationHandle):
    """One libvirt migration: started, watched, steered, waited for (abort is
    libvirt's abortJob at the next sample)."""

    def __init__(
        self,
        request: LibvirtRequest,
        *,
        controller: Controller | None = None,
        events: EventBus | None = None,
        abort_grace_s: float = 5.0,
    ) -> None:
        super().__init__(request, controller=controller, abort_grace_s=abort_grace_s, events=events)

    async def _execute(self) -> MigrationReport:
        return await LibvirtRun(self.request, self._operator, self._bus).execute()


async def migrate_domain(request: LibvirtRequest, **kwargs: object) -> MigrationReport:
    """Run one libvirt migration to its end; its report (see :meth:`LibvirtMigration.run`)."""
    return await LibvirtMigration(request, **kwargs).run()  # type: ignore[arg-type]

"""The ``pagestream`` strategy: livemig's own pre-copy of guest RAM; QEMU moves device state.

Both QEMUs keep guest RAM in ``memory-backend-file,share=on`` files. A sender
agent on the source host scans the source RAM file for dirty pages (a
:mod:`dirtytrack` tracker), captures and zstd-compresses them and streams them to
a receiver agent on the target host, which writes them into the target RAM file
(:mod:`migrate.pagestream.protocol`). Rounds repeat until the dirty set is small
enough for the policy's downtime limit (:mod:`migrate.pagestream.planner`); then::

    stop → migrate (x-ignore-shared: QEMU sends only its ~450 KB of non-shared RAM,
    then waits: pause-before-switchover) ‖ final scan + delta → receiver: "applied"
    → migrate-continue (device state) → target loaded → digests agree → cont

The stream's final digest (source RAM at stop vs target RAM after the last
round, computed by the agents while QEMU loads device state) must hold before
``cont``; otherwise the VM goes back to the source
(:func:`~migrate.safety.finish_on_target`, :func:`~migrate.safety.rollback`).
The engine's own comparison of both RAM files (``engine_compare``) repeats that
check after the device-state load, at the cost of two more passes over RAM in
the downtime; on a digest mismatch it is used anyway, to name the pages.

Here the strategy's entry (:class:`PagestreamStrategy`); the run itself in
:mod:`migrate.pagestream.run`, its options in :mod:`migrate.pagestream.options`,
the check before ``cont`` in :mod:`migrate.pagestream.verifier` and its figures
in :mod:`migrate.pagestream.totals`.
"""

from __future__ import annotations

from migrate.control.base import Controller
from migrate.errors import ConfigError
from migrate.events import EventBus
from migrate.pagestream.options import PagestreamOptions, stream_host
from migrate.pagestream.run import PagestreamRun
from migrate.qmp import QmpSession
from migrate.ramfiles import (
    check_ram_space,
    ram_backing_file,
    ram_backing_files,
    refuse_shared_file,
)
from migrate.report import MigrationReport
from migrate.request import MigrationRequest
from migrate.strategy import check_start


class PagestreamStrategy:
    """Pre-copy with livemig's own page stream; see the module docstring."""

    name = "pagestream"

    def __init__(self, options: PagestreamOptions | None = None) -> None:
        self.options = options or PagestreamOptions()

    async def run(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
    ) -> MigrationReport:
        """Migrate; return the report, or raise :class:`MigrationError` carrying it.

        Raises :class:`ConfigError` before anything changes if either VM's RAM is
        not in a shared memory-backend-file or the URI is not TCP. On any failure
        or cancellation later the VM is left running on the source (if it was
        running), the target QEMU is told to quit and both agents are ended.
        """
        start = await check_start(source, target, request)
        for side, session in (("source", source), ("target", target)):
            files = await ram_backing_files(session)
            if len(files) > 1:
                raise ConfigError(
                    f"pagestream moves one RAM backend; the {side} VM has {len(files)} "
                    f"({', '.join(sorted(files))}): use the native strategy"
                )
        source_ram, target_ram = await ram_backing_file(source), await ram_backing_file(target)
        missing = [
            side for side, ram in (("source", source_ram), ("target", target_ram)) if ram is None
        ]
        if missing or source_ram is None or target_ram is None:
            raise ConfigError(
                f"pagestream needs guest RAM in a shared file on both sides "
                f"(memory-backend-file,share=on); the {' and '.join(missing)} VM has none"
            )
        if request.target_ram is None:
            # The target's path means a file here only when it runs here; otherwise
            # its receiver agent maps it on its own host.
            refuse_shared_file(source_ram, target_ram)
            check_ram_space(target_ram)
        host = stream_host(request.migration_uri)
        run = PagestreamRun(
            request, source, target, controller, events, start, self.options,
            source_ram, target_ram, host,
        )  # fmt: skip
        return await run.execute()

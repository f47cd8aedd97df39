"""The ``libvirt`` strategy: libvirt's own migration job, steered by livemig.

libvirt (``migrateToURI3`` with ``VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER``)
moves the domain; livemig runs the preflight through libvirt, reads the job's
statistics into its samples, runs the policy's controller and carries its intents
out through libvirt's calls, keeps the target paused until its RAM matches the
source's, and reports like every strategy. Modules: ``request`` (what to move),
``api`` (the :class:`LibvirtMigration` handle), ``run`` (one migration),
``levers`` (intents → libvirt), ``stats`` (job stats → samples), ``monitor``
(QEMU's events through libvirt), ``preflight``, ``ram`` (where the RAM file is),
``conn`` (libvirt-python, connections, the event loop; :class:`LibvirtError`).
"""

from migrate.libvirt.api import LibvirtMigration, migrate_domain
from migrate.libvirt.conn import LibvirtError
from migrate.libvirt.request import LibvirtEndpoint, LibvirtRequest

__all__ = [
    "LibvirtEndpoint",
    "LibvirtError",
    "LibvirtMigration",
    "LibvirtRequest",
    "migrate_domain",
]

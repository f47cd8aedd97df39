"""How fast the guest writes the disks a migration copies (``query-blockstats``).

A write-blocking mirror sends every guest write to the target as it happens: while
the first copy runs and for as long as RAM pre-copy runs after it, the disks' writes
share the link with the copy and with RAM. The forecast needs that rate; QEMU counts
the bytes each block device wrote, so two readings of the counters bracket it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from migrate.disks.model import BlockDisk
from migrate.errors import QemuError
from migrate.qmp import QmpSession


def _is_disk(entry: dict[str, Any], disk: BlockDisk) -> bool:
    """Whether a ``query-blockstats`` entry is ``disk``'s device (by node, drive or qdev)."""
    if entry.get("node-name") == disk.node_name:
        return True
    if disk.device and entry.get("device") == disk.device:
        return True
    qdev = entry.get("qdev")
    return bool(disk.device) and isinstance(qdev, str) and f"/{disk.device}/" in f"{qdev}/"


async def written_bytes(source: QmpSession, disks: Iterable[BlockDisk]) -> int:
    """The bytes the guest wrote so far to ``disks`` (QEMU's ``wr_bytes`` counters).

    Raises :class:`QemuError` if QEMU's answer is not the documented shape or a disk
    has no counters.
    """
    stats = await source.execute("query-blockstats", {"query-nodes": False})
    if not isinstance(stats, list):
        raise QemuError("query-blockstats: unexpected answer", command="query-blockstats")
    total = 0
    for disk in disks:
        entry = next((e for e in stats if isinstance(e, dict) and _is_disk(e, disk)), None)
        counters = entry.get("stats") if entry is not None else None
        written = counters.get("wr_bytes") if isinstance(counters, dict) else None
        if not isinstance(written, int) or isinstance(written, bool) or written < 0:
            raise QemuError(
                f"query-blockstats has no write counter for disk {disk.name}",
                command="query-blockstats",
            )
        total += written
    return total

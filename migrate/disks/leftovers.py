"""What a crashed engine's disk copy left on both QEMUs, removed by ``livemig recover``.

The migration journal records the disk copy (:class:`~migrate.journal.JournalDisks`)
before it starts. When the engine dies mid-copy, recovery (:mod:`migrate.recover`)
settles the VM and calls, depending on where it stays:

- the VM stays on the source: :func:`stop_source_copy` on the source (before the
  target QEMU is told to quit, so that no mirror write fails on a vanished target):
  the mirror jobs (and a replica catch-up's backup jobs) force-cancelled, the NBD
  client nodes deleted, the in-downtime comparison's export, NBD server and bitmaps
  removed; once the target QEMU is gone, :func:`remove_target_images` removes its
  partial images;
- the VM runs on the target: :func:`stop_target_exports` on the target (once the
  source was told to quit): its NBD exports of the VM's disks deleted and the NBD
  server stopped. The target's images are the VM's disks: they stay.

Either way :func:`settle_replicas` marks a replica the copy started from released
(the VM on the source) or consumed (on the target).

Every step is best effort with the caller's deadline per command; what was done and
what failed come back as notes. A name the QEMU does not know (the engine had not
got that far, or had already cleaned it) is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from migrate.disks.replica_store import ReplicaStore
from migrate.errors import ConfigError, QemuError
from migrate.journal import JournalDisks

#: Runs one QMP command on one QEMU (with a deadline); raises QemuError.
Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
#: How long cancelled jobs may take to go, and an export to lose its client (s).
WAIT_S = 10.0
_POLL_S = 0.05


def _missing(exc: QemuError) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("not found", "no such", "cannot find", "failed to find"))


async def _try(execute: Execute, notes: list[str], command: str, args: dict[str, Any]) -> bool:
    """Run ``command``; True if it was done, False if its object was gone (or it failed:
    noted)."""
    try:
        await execute(command, args)
        return True
    except QemuError as exc:
        if not _missing(exc):
            notes.append(f"could not {command} {args}: {exc}")
        return False


async def _job_ids(execute: Execute) -> set[str]:
    answer = await execute("query-block-jobs", None)
    return (
        {str(j.get("device")) for j in answer if isinstance(j, dict)}
        if isinstance(answer, list)
        else set()
    )


async def _bitmaps(execute: Execute) -> dict[str, set[str]]:
    """Each disk node's dirty bitmaps (``query-block``)."""
    found: dict[str, set[str]] = {}
    answer = await execute("query-block", None)
    for entry in answer if isinstance(answer, list) else ():
        inserted = entry.get("inserted") if isinstance(entry, dict) else None
        if isinstance(inserted, dict):
            maps = inserted.get("dirty-bitmaps") or entry.get("dirty-bitmaps") or ()
            found[str(inserted.get("node-name"))] = {
                str(b.get("name")) for b in maps if isinstance(b, dict)
            }
    return found


async def _export_ids(execute: Execute) -> set[str]:
    answer = await execute("query-block-exports", None)
    return (
        {str(e.get("id")) for e in answer if isinstance(e, dict)}
        if isinstance(answer, list)
        else set()
    )


async def stop_source_copy(execute: Execute, disks: JournalDisks) -> list[str]:
    """On the source, the VM staying there: stop the copy and remove its traces."""
    notes: list[str] = []
    try:
        running = await _job_ids(execute)
    except QemuError as exc:
        return [f"could not list the source's block jobs: {exc}"]

    def ours(job: str) -> bool:
        return any(job == d.job_id or job.startswith(d.job_id + "-") for d in disks.disks)

    jobs = sorted(j for j in running if ours(j))
    for job in jobs:
        await _try(execute, notes, "block-job-cancel", {"device": job, "force": True})
    deadline = time.monotonic() + WAIT_S
    while jobs:
        try:
            left = [j for j in await _job_ids(execute) if ours(j)]
        except QemuError as exc:
            notes.append(f"could not watch the disk jobs stop: {exc}")
            break
        if not left:
            notes.append(f"cancelled the disk copy job(s) on the source: {', '.join(jobs)}")
            break
        if time.monotonic() > deadline:
            notes.append(f"disk copy job(s) still on the source after {WAIT_S:g} s: {left}")
            break
        await asyncio.sleep(_POLL_S)
    dropped = [
        d.client_node
        for d in disks.disks
        if await _try(execute, notes, "blockdev-del", {"node-name": d.client_node})
    ]
    if dropped:
        notes.append(f"removed the source's NBD client node(s) {', '.join(dropped)}")
    notes += await _drop_verify(execute, disks)
    return notes


async def _drop_verify(execute: Execute, disks: JournalDisks) -> list[str]:
    """The in-downtime comparison's export, NBD server and bitmaps, and a replica
    catch-up's round bitmaps, on the source."""
    notes: list[str] = []
    if disks.verify_export:
        with contextlib.suppress(QemuError):
            if disks.verify_export in await _export_ids(execute):
                # Only the comparison starts an NBD server on the source.
                await _try(execute, notes, "block-export-del", {"id": disks.verify_export})
                await _try(execute, notes, "nbd-server-stop", {})
                notes.append("removed the source's NBD export of the disk comparison")
    try:
        bitmaps = await _bitmaps(execute)
    except QemuError as exc:
        return [*notes, f"could not list the source's dirty bitmaps: {exc}"]
    for disk in disks.disks:
        for name in sorted(bitmaps.get(disk.source_node, ())):
            if name == disks.verify_bitmap or name.startswith(disk.job_id + "-round-"):
                args = {"node": disk.source_node, "name": name}
                if await _try(execute, notes, "block-dirty-bitmap-remove", args):
                    notes.append(f"removed the dirty bitmap {name} of disk {disk.name}")
    return notes


async def stop_target_exports(execute: Execute, disks: JournalDisks) -> list[str]:
    """On the target, the VM running there: its NBD exports and server go (the
    images stay: they are the VM's disks now)."""
    notes: list[str] = []
    try:
        exports = await _export_ids(execute)
    except QemuError as exc:
        return [f"could not list the target's NBD exports: {exc}"]
    dropped = []
    deadline = time.monotonic() + WAIT_S
    for disk in disks.disks:
        if disk.export_id not in exports:
            continue
        while True:
            try:
                await execute("block-export-del", {"id": disk.export_id})
                dropped.append(disk.export_id)
                break
            except QemuError as exc:
                if _missing(exc):
                    break
                if time.monotonic() > deadline:  # "in use": a client still connected
                    notes.append(f"could not block-export-del {disk.export_id}: {exc}")
                    break
                await asyncio.sleep(_POLL_S)
    while dropped and time.monotonic() < deadline:
        with contextlib.suppress(QemuError):
            if not {d.export_id for d in disks.disks} & await _export_ids(execute):
                break
        await asyncio.sleep(_POLL_S)
    try:
        await execute("nbd-server-stop", {})
        notes.append(f"stopped the target's NBD server ({disks.nbd_address})")
    except QemuError as exc:
        if "not running" not in str(exc).lower():
            notes.append(f"could not stop the target's NBD server: {exc}")
    if dropped:
        notes.insert(0, f"removed the target's NBD export(s) {', '.join(dropped)}")
    return notes


def remove_target_images(disks: JournalDisks) -> list[str]:
    """Remove the target's partial images (call once the target QEMU is gone)."""
    notes = []
    for disk in disks.disks:
        if disk.target_image is None:
            continue
        try:
            os.unlink(disk.target_image)
        except FileNotFoundError:
            continue
        except OSError as exc:
            notes.append(f"could not remove the target's partial image {disk.target_image}: {exc}")
            continue
        notes.append(f"removed the target's partial copy of disk {disk.name} ({disk.target_image})")
    return notes


def settle_replicas(disks: JournalDisks, migration_id: str, on_target: bool) -> list[str]:
    """Release (VM on the source) or mark consumed (on the target) the replicas the
    copy started from (:meth:`~migrate.disks.replica_store.ReplicaStore.mark`)."""
    notes = []
    action = "consume" if on_target else "release"
    for disk in disks.disks:
        if disk.replica_dir is None:
            continue
        try:
            ReplicaStore(Path(disk.replica_dir)).mark(disk.name, migration_id, action)
        except (ConfigError, OSError) as exc:
            notes.append(f"could not mark the replica of disk {disk.name} {action}d: {exc}")
            continue
        notes.append(
            f"marked the replica of disk {disk.name} in {disk.replica_dir} "
            + ("consumed (it backs the VM's disk on the target)" if on_target else "released")
        )
    return notes

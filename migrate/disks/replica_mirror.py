"""A migration's disk copy on top of a replica: send only what changed since it.

The target image is an overlay backed by the replica (:func:`fresh_replica` says
whether the replica is current: same disk size, and the source still has the
replica generation's persistent bitmap, intact). QEMU 7.2's ``blockdev-mirror`` has
no ``bitmap`` argument (``sync`` is ``full``, ``top`` or ``none``; checked in the
QMP schema here), and a ``blockdev-backup`` cannot run on a node a mirror is using
(``Node ... is busy: block device is in use by block job: mirror``, also on the
mirror's filter node), so the two cannot overlap. :func:`mirror_from_replica` does:

1. rounds of ``blockdev-backup sync=bitmap bitmap-mode=never`` to the target's NBD
   node, each in a transaction that starts a fresh (non-persistent) bitmap for the
   next round: round 1 copies the replica bitmap's set, each later round what the
   guest wrote during the previous one, until that is at most ``pause_bytes`` (or
   ``max_rounds`` have run);
2. a short pause of the guest (``stop``, which drains its I/O): the last round's
   set is copied and ``blockdev-mirror sync=none copy-mode=write-blocking`` started,
   then ``cont``; from then on every guest write reaches both images, as in the full
   mirror. The pause is measured and reported.

The replica's own bitmap is never changed, so an aborted migration leaves the
replica (untouched: the target wrote into its overlay) and its bitmap valid.
From step 2 on the job is an ordinary READY mirror: the caller completes or
aborts it exactly like the full mirror (:class:`~migrate.disks.mirror.NbdMirror`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrate.disks.model import DiskPlacement
from migrate.disks.replica_store import DiskReplica, ReplicaStore
from migrate.disks.replicate import (
    ReplicationError,
    SourceDisk,
    cancel_copy_job,
    source_disks,
    wait_copy_job,
)
from migrate.errors import ConfigError, QemuError
from migrate.qmp import EventRecorder, QmpSession

#: Pause the guest to start the mirror once a round leaves at most this much (bytes).
DEFAULT_PAUSE_BYTES = 8 << 20
DEFAULT_MAX_ROUNDS = 6


@dataclass(frozen=True)
class CatchUp:
    """What bringing a target image up to date from a replica took: ``rounds`` of
    backup while the guest ran, the bytes they copied, the bytes copied while the
    guest was paused to start the mirror, and that pause (s)."""

    rounds: int
    bytes: int
    final_bytes: int
    pause_s: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "bytes": self.bytes,
            "final_bytes": self.final_bytes,
            "pause_ms": round(self.pause_s * 1000, 1),
            "seconds": round(self.seconds, 4),
        }


def fresh_replica(
    store: ReplicaStore, disk: SourceDisk, migration_id: str | None = None
) -> DiskReplica | None:
    """The replica of ``disk`` in ``store`` if a migration can start from it: the state
    file knows it, no commit is pending, no other migration uses it, none consumed it,
    the sizes match, its image exists, and the source still has its generation's
    bitmap, persistent and consistent."""
    if not store.exists():
        return None
    replica = store.load().disks.get(disk.name)
    if replica is None or replica.overlay is not None or replica.unusable(migration_id):
        return None
    if replica.virtual_size != disk.virtual_size or not store.base(disk.name).is_file():
        return None
    return replica if disk.usable_bitmap(replica.bitmap) else None


async def _bitmap_count(session: QmpSession, node: str, name: str) -> int:
    for entry in await session.execute("query-block"):
        inserted = entry.get("inserted") or {}
        if inserted.get("node-name") == node:
            for bitmap in inserted.get("dirty-bitmaps") or ():
                if bitmap.get("name") == name:
                    return int(bitmap.get("count", 0))
    raise ReplicationError(f"bitmap {name} vanished from {node}")


async def mirror_from_replica(
    session: QmpSession,
    *,
    device_node: str,
    client_node: str,
    job_id: str,
    bitmap: str,
    pause_bytes: int = DEFAULT_PAUSE_BYTES,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    round_timeout_s: float = 600.0,
    stall_s: float = 60.0,
) -> CatchUp:
    """Bring the image behind ``client_node`` (an NBD node on the source, the target's
    overlay on the replica) up to date from the replica generation's ``bitmap``, then
    start mirror ``job_id`` (``sync=none``, write-blocking). See the module docstring.

    Raises :class:`ReplicationError` (or :class:`QemuError`); on failure the guest is
    running again if it was, the temporary bitmaps are gone, no mirror was started.
    """
    began = time.monotonic()
    copy_job = f"{job_id}-catchup"
    rounds, copied, final, pause_s = 0, 0, 0, 0.0
    current = bitmap  # the set the next copy must send
    made: list[str] = []
    async with EventRecorder(session) as events:

        async def copy(source_bitmap: str, new_bitmap: str | None) -> int:
            actions: list[dict[str, Any]] = []
            if new_bitmap is not None:
                actions.append(
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": device_node, "name": new_bitmap, "persistent": False}}
                )  # fmt: skip
                made.append(new_bitmap)
            actions.append(
                {"type": "blockdev-backup",
                 "data": {"job-id": copy_job, "device": device_node, "target": client_node,
                          "sync": "bitmap", "bitmap": source_bitmap, "bitmap-mode": "never"}}
            )  # fmt: skip
            since = len(events.events)
            await session.execute("transaction", {"actions": actions})
            try:
                return await wait_copy_job(
                    session, events, copy_job, since, round_timeout_s, stall_s
                )
            except BaseException:
                await cancel_copy_job(session, events, copy_job, since)
                raise

        async def drop(name: str) -> None:
            if name in made:
                made.remove(name)
                with contextlib.suppress(QemuError):
                    await session.execute(
                        "block-dirty-bitmap-remove", {"node": device_node, "name": name}
                    )

        try:
            while True:
                rounds += 1
                following = f"{job_id}-round-{rounds}"
                copied += await copy(current, following)
                await drop(current)
                current = following
                left = await _bitmap_count(session, device_node, current)
                if left <= pause_bytes or rounds >= max_rounds:
                    break
            was_running = (await session.status()) == "running"
            paused_at = time.monotonic()
            if was_running:
                await session.execute("stop")
            try:
                final = await copy(current, None)
                await session.execute(
                    "blockdev-mirror",
                    {"job-id": job_id, "device": device_node, "target": client_node,
                     "sync": "none", "copy-mode": "write-blocking",
                     "auto-finalize": True, "auto-dismiss": True},
                )  # fmt: skip
            finally:
                if was_running:
                    # Never leave the guest paused, whatever failed.
                    await asyncio.shield(session.execute("cont"))
                pause_s = time.monotonic() - paused_at
        finally:
            for name in list(made):
                await drop(name)
    return CatchUp(rounds, copied, final, pause_s, time.monotonic() - began)


@dataclass(frozen=True)
class ReplicaUse:
    """A disk a migration copies from its replica: the replica generation's source
    bitmap, the bytes it marks (what the catch-up will send), the replica image."""

    bitmap: str
    dirty_bytes: int
    generation: int
    image: str


async def detect_replicas(
    source: QmpSession,
    target: QmpSession,
    placements: Sequence[DiskPlacement],
    migration_id: str | None = None,
) -> dict[str, ReplicaUse]:
    """The disks among ``placements`` whose target image is an overlay on a fresh
    replica of the source's disk (see :func:`fresh_replica`), by disk name.

    The target's image says where its replica is: its backing file is
    ``NAME.qcow2`` in a replica directory (whose state file is read). Over agents
    the target agent would answer this from its own replica directory.
    """
    answer = await target.execute("query-block")
    backing: dict[str, Path] = {}
    for entry in answer if isinstance(answer, list) else ():
        inserted = entry.get("inserted") if isinstance(entry, dict) else None
        image = inserted.get("image") if isinstance(inserted, dict) else None
        if isinstance(inserted, dict) and isinstance(image, dict):
            name = image.get("full-backing-filename") or image.get("backing-filename")
            if isinstance(name, str) and name.startswith("/"):
                backing[str(inserted["node-name"])] = Path(name)
    if not backing:
        return {}
    disks = {d.name: d for d in await source_disks(source)}
    found: dict[str, ReplicaUse] = {}
    for placement in placements:
        base = backing.get(placement.target.node_name) if placement.target else None
        disk = disks.get(placement.name)
        if base is None or disk is None:
            continue
        try:
            store = ReplicaStore(base.parent)
            replica = fresh_replica(store, disk, migration_id)
            same = replica is not None and store.base(replica.name).resolve() == base.resolve()
        except (ConfigError, OSError):
            continue  # not a replica directory we can read: a plain mirror then
        if replica is not None and same:
            found[placement.name] = ReplicaUse(
                bitmap=replica.bitmap,
                dirty_bytes=int((disk.bitmap(replica.bitmap) or {}).get("count", 0)),
                generation=replica.generation,
                image=str(base),
            )
    return found

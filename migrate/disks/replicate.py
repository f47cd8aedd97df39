"""Disk replication: keep a replica of each local disk on the target host, so that the
next migration sends only what changed since (``livemig replicate``).

How a run works, per qcow2 disk of the source QEMU (QMP only; no agent needed):

1. The replica directory (:mod:`migrate.disks.replica_store`) is settled: a finished
   run not yet committed into its base image is committed, a killed run's ``.next``
   image removed. On the source, a killed run's job, NBD node and bitmap are removed.
2. The target image for this run is ``NAME.next.qcow2``: a fresh image for a full
   run; for an incremental run an overlay backed by ``NAME.qcow2`` (the last good
   replica), which receives only the dirty clusters. A ``qemu-storage-daemon``
   (:mod:`migrate.disks.storage_daemon`) exports it writable over NBD.
3. On the source, one ``transaction`` adds the next generation's persistent dirty
   bitmap and starts ``blockdev-backup`` to the NBD node: ``sync=full`` the first
   time, then ``sync=bitmap`` with the previous generation's bitmap and
   ``bitmap-mode=never``. The copy is the disk as it was at that instant; the new
   bitmap records every write after it. The previous bitmap is left untouched, so a
   run that fails or is killed loses nothing: the next run copies from it again.
4. Success: the image is renamed into place (a full copy replaces ``NAME.qcow2``; an
   incremental overlay becomes ``NAME.commit.qcow2`` on top of it) and the state
   file records the new generation, then the overlay is committed into the base
   (only the changed clusters are written) and the previous bitmap removed. Every
   step leaves the state file naming a valid image chain.

A failure raises :class:`ReplicationError`; the last good replica stays what the
state file says. Over the agents of two real hosts the same steps split in two: the
target agent owns the replica directory and the storage daemon (steps 1, 2, 4's
rename and commit) and hands the source agent an NBD address (TLS with the
cluster's certificates); the source agent drives step 3 on its QEMU's QMP socket.
:class:`ReplicaTarget` is that target half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from migrate.deadline import within
from migrate.disks.classify import parse_query_block
from migrate.disks.replica_store import (
    DiskReplica,
    ReplicaState,
    ReplicaStore,
    check_disk_name,
)
from migrate.disks.storage_daemon import NbdAddress, StorageDaemon
from migrate.errors import ConfigError, LivemigError, QemuError
from migrate.qmp import EventRecorder, QmpSession

JOB_PREFIX = "livemig-replica-"
#: How long a copy job may make no progress before the run gives up (s).
DEFAULT_STALL_S = 60.0
#: The whole run's deadline (s).
DEFAULT_TIMEOUT_S = 6 * 3600.0


class ReplicationError(LivemigError):
    """A replication run failed; the previous replica (if any) is still valid.

    ``disk`` names the disk the run was copying when it failed, if any.
    """

    def __init__(self, message: str, disk: str | None = None) -> None:
        super().__init__(message)
        self.disk = disk


@dataclass(frozen=True)
class SourceDisk:
    """A writable qcow2 disk of the source QEMU and its dirty bitmaps (``query-block``)."""

    name: str
    node_name: str
    virtual_size: int
    path: str
    bitmaps: tuple[dict[str, Any], ...]

    def bitmap(self, name: str) -> dict[str, Any] | None:
        return next((b for b in self.bitmaps if b.get("name") == name), None)

    def usable_bitmap(self, name: str) -> bool:
        """Whether bitmap ``name`` holds every write since it was made: persistent,
        recording, not marked inconsistent (a QEMU that crashed while it was open)."""
        found = self.bitmap(name)
        return bool(
            found
            and found.get("persistent")
            and found.get("recording", True)
            and not found.get("inconsistent")
        )


async def source_disks(session: QmpSession) -> list[SourceDisk]:
    """The source QEMU's writable qcow2 disks (named as :mod:`~migrate.disks.classify`
    names them) with their dirty bitmaps. Raises :class:`QemuError` on a reply of the
    wrong shape."""
    answer = await session.execute("query-block")
    bitmaps: dict[str, tuple[dict[str, Any], ...]] = {}
    for entry in answer if isinstance(answer, list) else ():
        inserted = entry.get("inserted") if isinstance(entry, dict) else None
        if isinstance(inserted, dict):
            found = inserted.get("dirty-bitmaps") or entry.get("dirty-bitmaps") or ()
            bitmaps[str(inserted.get("node-name"))] = tuple(b for b in found if isinstance(b, dict))
    return [
        SourceDisk(
            name=disk.name,
            node_name=disk.node_name,
            virtual_size=disk.virtual_size,
            path=str(disk.path),
            bitmaps=bitmaps.get(disk.node_name, ()),
        )
        for disk in parse_query_block(answer)
        if not disk.readonly and disk.format == "qcow2"
    ]


@dataclass(frozen=True)
class DiskRun:
    """What one run did to one disk. ``bytes`` is what the copy job copied (QEMU's
    ``len``); ``written_bytes`` the data that landed in the new image; ``dirty_bytes``
    the bitmap's count when the run began (the whole disk for a full run)."""

    name: str
    mode: str  # full | incremental
    generation: int
    bytes: int
    dirty_bytes: int
    written_bytes: int
    seconds: float
    commit_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "generation": self.generation,
            "bytes": self.bytes,
            "dirty_bytes": self.dirty_bytes,
            "written_bytes": self.written_bytes,
            "seconds": round(self.seconds, 4),
            "commit_seconds": round(self.commit_seconds, 4),
        }


@dataclass(frozen=True)
class RunResult:
    """One ``livemig replicate`` run: when, how long, per disk."""

    replica_dir: str
    started: float
    seconds: float
    disks: tuple[DiskRun, ...]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica_dir": self.replica_dir,
            "started": self.started,
            "seconds": round(self.seconds, 4),
            "bytes": self.bytes,
            "disks": [d.to_dict() for d in self.disks],
        }


async def qemu_img(*args: str, timeout: float = 600.0) -> str:
    """Run ``qemu-img ARGS``; its stdout. Raises :class:`QemuError` on failure or timeout."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await within(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuError(f"qemu-img {args[0]} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()
        raise QemuError(
            f"qemu-img {args[0]} failed: {detail[-1] if detail else proc.returncode}",
            command=f"qemu-img {' '.join(args)}",
        )
    return out.decode("utf-8", "replace")


async def top_layer_bytes(image: Path) -> int:
    """Bytes of data allocated in ``image`` itself (not in its backing files)."""
    extents = json.loads(await qemu_img("map", "--output=json", "-U", str(image)))
    return sum(
        int(e["length"])
        for e in extents
        if e.get("depth") == 0 and e.get("data") and e.get("present", True)
    )


class ReplicaTarget:
    """The target half of a run (see the module docstring): the replica directory and
    the storage daemon that exports a run's image over NBD. Local to this host; an
    agent-backed target would offer the same methods over its API."""

    def __init__(self, store: ReplicaStore, daemon: StorageDaemon) -> None:
        self.store = store
        self.daemon = daemon

    @property
    def nbd(self) -> NbdAddress:
        return self.daemon.nbd

    async def settle(self, state: ReplicaState) -> ReplicaState:
        """Commit finished overlays into their base images; remove killed runs' images."""
        for disk in list(state.disks.values()):
            if disk.overlay is not None:
                state = await self.commit_overlay(state, disk)
        for stale in self.store.dir.glob("*.next.qcow2"):
            stale.unlink()
        return state

    async def open_next(self, name: str, size: int, incremental: bool) -> Path:
        """Create ``NAME.next.qcow2`` (an overlay on ``NAME.qcow2`` when ``incremental``)
        and export it as ``name``."""
        path = self.store.next(name)
        path.unlink(missing_ok=True)
        if incremental:
            base = self.store.base(name).name  # relative: the directory may move
            await qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2",
                           str(path), str(size))  # fmt: skip
        else:
            await qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
        try:
            await self.daemon.export(name, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    async def close_next(self, name: str) -> None:
        await self.daemon.unexport(name)

    async def discard_next(self, name: str) -> None:
        with contextlib.suppress(QemuError):
            await self.daemon.unexport(name)
        self.store.next(name).unlink(missing_ok=True)

    async def accept(self, state: ReplicaState, disk: DiskReplica, full: bool) -> ReplicaState:
        """Make the closed ``.next`` image generation ``disk.generation``; commit it."""
        name = disk.name
        if full:
            os.replace(self.store.next(name), self.store.base(name))
            self.store.sync_dir()
            state = state.with_disk(replace(disk, overlay=None))
            self.store.save(state)
            return state
        os.replace(self.store.next(name), self.store.commit(name))
        self.store.sync_dir()
        disk = replace(disk, overlay=self.store.commit(name).name)
        state = state.with_disk(disk)
        self.store.save(state)
        return await self.commit_overlay(state, disk)

    async def commit_overlay(self, state: ReplicaState, disk: DiskReplica) -> ReplicaState:
        """Write the overlay's clusters into the base image, then drop the overlay.

        Safe to repeat after a crash: the chain base+overlay reads the same data
        before, during and after the commit (the overlay shadows each cluster being
        written), and the state file names the overlay until the commit is done.
        """
        overlay = self.store.commit(disk.name)
        await qemu_img("commit", "-q", "-d", str(overlay))
        state = state.with_disk(replace(disk, overlay=None))
        self.store.save(state)
        overlay.unlink(missing_ok=True)
        return state


async def _clean_source(
    session: QmpSession, state: ReplicaState, disks: Sequence[SourceDisk]
) -> None:
    """Remove what a killed run left in the source QEMU: its job, its NBD node, and
    bitmaps of this replica other than each disk's current generation's."""
    jobs = await session.execute("query-block-jobs")
    for job in jobs if isinstance(jobs, list) else ():
        if str(job.get("device", "")).startswith(JOB_PREFIX):
            with contextlib.suppress(QemuError):
                await session.execute("block-job-cancel", {"device": job["device"], "force": True})
    deadline = time.monotonic() + 30.0
    while any(
        str(j.get("device", "")).startswith(JOB_PREFIX)
        for j in await session.execute("query-block-jobs")
    ):
        if time.monotonic() > deadline:
            raise ReplicationError("a killed run's copy job did not go away within 30 s")
        await asyncio.sleep(0.1)
    nodes = await session.execute("query-named-block-nodes", {"flat": True})
    for node in nodes if isinstance(nodes, list) else ():
        if str(node.get("node-name", "")).startswith(JOB_PREFIX):
            await session.execute("blockdev-del", {"node-name": node["node-name"]})
    prefix = state.bitmap_prefix()
    for disk in disks:
        known = state.disks.get(disk.name)
        keep = known.bitmap if known else None
        for bitmap in disk.bitmaps:
            name = str(bitmap.get("name", ""))
            if name.startswith(prefix) and name != keep:
                await session.execute(
                    "block-dirty-bitmap-remove", {"node": disk.node_name, "name": name}
                )


async def wait_copy_job(
    session: QmpSession,
    events: EventRecorder,
    job: str,
    since: int,
    timeout_s: float,
    stall_s: float,
) -> int:
    """Wait for copy job ``job`` to complete; the bytes it copied. Raises
    :class:`ReplicationError` if it fails, is cancelled, stalls ``stall_s`` s or
    outlives ``timeout_s`` s."""
    deadline = time.monotonic() + timeout_s
    progress, changed = -1, time.monotonic()

    def mine(event: Any) -> bool:
        return bool(event.data.get("device") == job)

    while True:
        done = await events.wait_for("BLOCK_JOB_COMPLETED", mine, timeout=1.0, since=since)
        if done is not None:
            if done.data.get("error"):
                raise ReplicationError(f"copy failed: {done.data['error']}")
            return int(done.data.get("len", 0))
        if events.find("BLOCK_JOB_CANCELLED", mine, since) is not None:
            raise ReplicationError("copy job cancelled")
        now = time.monotonic()
        jobs = await session.execute("query-jobs")
        current = (
            next((j for j in jobs if j.get("id") == job), None) if isinstance(jobs, list) else None
        )
        if current is None:
            if await events.wait_for("BLOCK_JOB_COMPLETED", mine, timeout=1.0, since=since):
                continue
            raise ReplicationError(f"copy job {job} vanished without completing")
        if current.get("current-progress") != progress:
            progress, changed = current.get("current-progress"), now
        elif now - changed > stall_s:
            raise ReplicationError(f"copy made no progress for {stall_s:g} s")
        if now > deadline:
            raise ReplicationError(f"copy did not finish within {timeout_s:g} s")


async def cancel_copy_job(session: QmpSession, events: EventRecorder, job: str, since: int) -> None:
    with contextlib.suppress(QemuError):
        await session.execute("block-job-cancel", {"device": job, "force": True})

    def mine(event: Any) -> bool:
        return bool(event.data.get("device") == job)

    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if events.find("BLOCK_JOB_CANCELLED", mine, since) or events.find(
            "BLOCK_JOB_COMPLETED", mine, since
        ):
            return
        jobs = await session.execute("query-block-jobs")
        if not any(j.get("device") == job for j in jobs):
            return
        await asyncio.sleep(0.1)


async def _copy_disk(
    session: QmpSession,
    events: EventRecorder,
    target: ReplicaTarget,
    state: ReplicaState,
    disk: SourceDisk,
    *,
    rate_limit: int | None,
    timeout_s: float,
    stall_s: float,
) -> tuple[ReplicaState, DiskRun]:
    began = time.monotonic()
    prev = state.disks.get(disk.name)
    incremental = bool(
        prev is not None
        and prev.overlay is None
        and prev.virtual_size == disk.virtual_size
        and target.store.base(disk.name).is_file()
        and disk.usable_bitmap(prev.bitmap)
    )
    generation = prev.generation + 1 if prev is not None else 1
    new_bitmap = state.bitmap_name(generation)
    node = job = f"{JOB_PREFIX}{disk.name}"
    backup: dict[str, Any] = {"job-id": job, "device": disk.node_name, "target": node}
    if incremental:
        assert prev is not None
        found = disk.bitmap(prev.bitmap) or {}
        dirty = int(found.get("count", 0))
        backup |= {"sync": "bitmap", "bitmap": prev.bitmap, "bitmap-mode": "never"}
    else:
        dirty = disk.virtual_size
        backup["sync"] = "full"
    if rate_limit:
        backup["speed"] = rate_limit
    next_image = await target.open_next(disk.name, disk.virtual_size, incremental)
    since = len(events.events)
    started = False
    try:
        await session.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": node,
                "server": target.nbd.client_arg(),
                "export": disk.name,
            },
        )
        bitmap_add = {"node": disk.node_name, "name": new_bitmap, "persistent": True}
        await session.execute(
            "transaction",
            {
                "actions": [
                    {"type": "block-dirty-bitmap-add", "data": bitmap_add},
                    {"type": "blockdev-backup", "data": backup},
                ]
            },
        )
        started = True
        copied = await wait_copy_job(session, events, job, since, timeout_s, stall_s)
        await session.execute("blockdev-del", {"node-name": node})
        await target.close_next(disk.name)
    except BaseException as exc:
        # The previous generation's bitmap was never touched: nothing is lost.
        with contextlib.suppress(QemuError, OSError):
            if started:
                await cancel_copy_job(session, events, job, since)
            with contextlib.suppress(QemuError):
                await session.execute("blockdev-del", {"node-name": node})
            with contextlib.suppress(QemuError):
                await session.execute(
                    "block-dirty-bitmap-remove", {"node": disk.node_name, "name": new_bitmap}
                )
            await target.discard_next(disk.name)
        if isinstance(exc, LivemigError) and not isinstance(exc, ReplicationError):
            raise ReplicationError(f"disk {disk.name}: {exc}", disk.name) from exc
        if isinstance(exc, ReplicationError) and exc.disk is None:
            raise ReplicationError(f"disk {disk.name}: {exc}", disk.name) from exc
        raise
    copy_seconds = time.monotonic() - began
    written = await top_layer_bytes(next_image)
    record = DiskReplica(
        name=disk.name,
        device=disk.node_name,
        virtual_size=disk.virtual_size,
        generation=generation,
        bitmap=new_bitmap,
        last_run=time.time(),
        last_mode="incremental" if incremental else "full",
        last_bytes=copied,
        last_seconds=copy_seconds,
        total_bytes=(prev.total_bytes if prev else 0) + copied,
        runs=(prev.runs if prev else 0) + 1,
    )
    commit_began = time.monotonic()
    state = await target.accept(state, record, full=not incremental)
    commit_seconds = time.monotonic() - commit_began
    if prev is not None and disk.bitmap(prev.bitmap) is not None:
        with contextlib.suppress(QemuError):  # a leftover is removed by the next run
            await session.execute(
                "block-dirty-bitmap-remove", {"node": disk.node_name, "name": prev.bitmap}
            )
    run = DiskRun(
        name=disk.name,
        mode=record.last_mode,
        generation=generation,
        bytes=copied,
        dirty_bytes=dirty,
        written_bytes=written,
        seconds=time.monotonic() - began,
        commit_seconds=commit_seconds,
    )
    return state, run


def _choose(disks: Sequence[SourceDisk], names: Sequence[str]) -> list[SourceDisk]:
    if not disks:
        raise ConfigError("the source QEMU has no writable qcow2 disk to replicate")
    for disk in disks:
        check_disk_name(disk.name)
    if not names:
        return list(disks)
    by_name = {d.name: d for d in disks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(
            f"no writable qcow2 disk named {', '.join(unknown)} (known: {', '.join(by_name)})"
        )
    return [by_name[n] for n in names]


async def replicate_once(
    session: QmpSession,
    store: ReplicaStore,
    *,
    disks: Sequence[str] = (),
    nbd: NbdAddress | None = None,
    rate_limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    stall_s: float = DEFAULT_STALL_S,
) -> RunResult:
    """One replication run of the source QEMU behind ``session`` into ``store``.

    ``disks`` restricts it to those disk names (default: every writable qcow2 disk);
    ``nbd`` is where the storage daemon listens (default a UNIX socket in the replica
    directory); ``rate_limit`` caps each copy (bytes/s). Raises
    :class:`ReplicationError` (the previous replica still valid), :class:`ConfigError`
    for bad input or a directory another run holds, :class:`QemuError`.
    """
    began, started = time.monotonic(), time.time()
    with store.locked():
        state = store.load()
        try:
            chosen = _choose(await source_disks(session), disks)
            for disk in chosen:
                known = state.disks.get(disk.name)
                why = known.unusable() if known is not None else None
                if why is not None:
                    # Its base image backs a migrated VM's disk (or soon may): never
                    # write it, not even for a fresh baseline.
                    raise ConfigError(f"{why} ({store.dir})")
            runs: list[DiskRun] = []
            async with StorageDaemon(store.dir, nbd) as daemon, EventRecorder(session) as events:
                target = ReplicaTarget(store, daemon)
                state = await target.settle(state)
                await _clean_source(session, state, await source_disks(session))
                for disk in _choose(await source_disks(session), [d.name for d in chosen]):
                    state, run = await _copy_disk(
                        session, events, target, state, disk,
                        rate_limit=rate_limit, timeout_s=timeout_s, stall_s=stall_s,
                    )  # fmt: skip
                    runs.append(run)
        except LivemigError as exc:
            with contextlib.suppress(OSError):
                store.save(store.load().with_failure(str(exc)))
            raise
    return RunResult(str(store.dir), started, time.monotonic() - began, tuple(runs))


def replica_status(store: ReplicaStore, now: float | None = None) -> dict[str, Any]:
    """The replica directory's state for ``livemig replicate status``: per disk its
    generation, last run (realtime s), age (s), mode, bytes and duration."""
    if not store.exists():
        raise ConfigError(f"no replica in {store.dir} (no {store.state_path.name})")
    state = store.load()
    now = time.time() if now is None else now
    return {
        "replica_dir": str(store.dir),
        "replica_id": state.replica_id,
        "disks": [
            {
                "name": d.name,
                "generation": d.generation,
                "last_run": d.last_run,
                "age_s": round(max(0.0, now - d.last_run), 1),
                "last_mode": d.last_mode,
                "last_bytes": d.last_bytes,
                "last_seconds": round(d.last_seconds, 3),
                "total_bytes": d.total_bytes,
                "runs": d.runs,
                "image": str(store.top(d)),
                "bitmap": d.bitmap,
            }
            for d in sorted(state.disks.values(), key=lambda d: d.name)
        ],
        "last_failure": state.last_failure,
    }

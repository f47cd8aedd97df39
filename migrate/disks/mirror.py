"""The NBD mirror's lifecycle: a source QEMU's local disks copied into a target QEMU.

One :class:`NbdMirror` per migration, in this order (QEMU 7.2, checked in the lab)::

    export()    target: nbd-server-start on the migration address, then
                block-export-add (writable) of each disk's node — before
                migrate-incoming
    start()     source: blockdev-add of an NBD client node per disk, then
                blockdev-mirror sync=full (copy-mode write-blocking by default:
                once READY every guest write reaches both images before it
                completes, so a busy disk converges)
    wait_ready()  every job READY (the first full copy done), with a deadline
    ...         RAM migration; the source stops, RAM and device state complete
    finish_jobs()  once the source is stopped, in QEMU's pre-switchover pause:
                block-job-cancel on each READY job, which for a mirror finishes
                consistently (BLOCK_JOB_COMPLETED, not CANCELLED); blockdev-del
                of the client node (its close flushes the target)
    complete()  finish_jobs() if not done yet; then on the target
                block-export-del (refused "in use" until the client has gone:
                retried) and nbd-server-stop
    abort()     any time before the target resumes: force-cancel the jobs,
                blockdev-del, drop the exports and the server; best effort, every
                step with a deadline, notes of what failed

``job_bytes`` tells what each mirror copied (its final ``offset``, re-copies of
dirtied blocks included). A bitmap-driven variant (``sync=incremental`` from a
replica) fits as another :class:`MirrorSpec` ``sync``/``bitmap`` pair; see
``mirror_arguments``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from migrate.deadline import within
from migrate.disks.model import DiskPlacement
from migrate.disks.replica_mirror import mirror_from_replica
from migrate.errors import MigrationError, QemuError
from migrate.qmp import QmpSession

#: How long every mirror may take to reach READY (s), unless the caller says.
READY_TIMEOUT_S = 600.0
#: How long completing (or cancelling) the jobs and dropping the exports may take (s).
FINISH_TIMEOUT_S = 30.0
_POLL_S = 0.1


class CopyMode(StrEnum):
    """``blockdev-mirror copy-mode``: ``write-blocking`` sends each guest write to the
    target before completing it (converges under any write rate, at the cost of write
    latency); ``background`` copies dirtied blocks later (may never converge)."""

    WRITE_BLOCKING = "write-blocking"
    BACKGROUND = "background"


@dataclass(frozen=True)
class NbdAddress:
    """Where the target's NBD server listens: ``host``:``port`` or a UNIX socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def beside(cls, migration_uri: str, port: int | None = None) -> NbdAddress:
        """The NBD address on the migration's address: ``tcp:H:P`` → ``H:port`` (default
        P+1), ``unix:/S`` → ``/S.nbd``."""
        if migration_uri.startswith("unix:"):
            return cls(path=migration_uri[5:] + ".nbd")
        host, _, mig_port = migration_uri[4:].rpartition(":")
        return cls(host=host.strip("[]"), port=port or int(mig_port) + 1)

    def qmp(self) -> dict[str, Any]:
        """As a QMP ``SocketAddress`` (flat, as blockdev-add's ``server`` wants it)."""
        if self.path is not None:
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


@dataclass
class MirrorJob:
    """One disk's mirror: its names on both sides and what it did."""

    placement: DiskPlacement
    export_id: str
    client_node: str
    job_id: str
    exported: bool = False
    client_added: bool = False
    started: bool = False
    ready_at: float | None = None
    finished: bool = False
    bytes: int = 0
    length: int = 0
    #: Replica mode: the replica generation's source bitmap; the catch-up's figures.
    replica_bitmap: str | None = None
    catch_up_bytes: int = 0
    catch_up_pause_ms: float = 0.0


def mirror_arguments(job: MirrorJob, copy_mode: CopyMode) -> dict[str, Any]:
    """The ``blockdev-mirror`` of a full copy (a bitmap-driven variant would add
    ``sync: incremental``/``bitmap`` here; QEMU 7.2's mirror takes ``sync: full``
    or ``top`` only, which is why replication uses ``blockdev-backup``)."""
    return {
        "job-id": job.job_id,
        "device": job.placement.source.node_name,
        "target": job.client_node,
        "sync": "full",
        "copy-mode": copy_mode.value,
        "auto-finalize": True,
        "auto-dismiss": True,
    }


@dataclass
class NbdMirror:
    """The mirrors of one migration (see the module docstring for the order)."""

    source: QmpSession
    target: QmpSession
    placements: tuple[DiskPlacement, ...]
    address: NbdAddress
    copy_mode: CopyMode = CopyMode.WRITE_BLOCKING
    tag: str = "livemig"
    on_progress: Callable[[dict[str, tuple[int, int]]], None] | None = None
    jobs: list[MirrorJob] = field(default_factory=list)
    server_started: bool = False
    started_at: float | None = None

    def __post_init__(self) -> None:
        for placement in self.placements:
            name = placement.name
            self.jobs.append(
                MirrorJob(
                    placement,
                    export_id=f"{self.tag}-{name}",
                    client_node=f"{self.tag}-nbd-{name}",
                    job_id=f"{self.tag}-mirror-{name}",
                )
            )

    # -- target side -----------------------------------------------------------------

    async def export(self) -> None:
        """Start the target's NBD server and export every disk writable."""
        await self.target.execute(
            "nbd-server-start", {"addr": {"type": self.address.qmp()["type"],
                                          "data": _nested(self.address)}}
        )  # fmt: skip
        self.server_started = True
        for job in self.jobs:
            twin = job.placement.target
            if twin is None:
                raise MigrationError(f"disk {job.placement.name}: no target disk to export")
            await self.target.execute(
                "block-export-add",
                {"type": "nbd", "id": job.export_id, "node-name": twin.node_name,
                 "name": job.export_id, "writable": True},
            )  # fmt: skip
            job.exported = True

    # -- source side -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect the source to every export and start the mirrors."""
        self.started_at = time.monotonic()
        for job in self.jobs:
            await self.source.execute(
                "blockdev-add",
                {"driver": "nbd", "node-name": job.client_node,
                 "server": self.address.qmp(), "export": job.export_id},
            )  # fmt: skip
            job.client_added = True
            if job.replica_bitmap is not None:
                # The target image is an overlay on a fresh replica: send only what
                # changed since it, then mirror (sync=none) from there.
                job.started = True  # an abort cancels whatever mirror may have begun
                catch_up = await mirror_from_replica(
                    self.source, device_node=job.placement.source.node_name,
                    client_node=job.client_node, job_id=job.job_id, bitmap=job.replica_bitmap,
                )  # fmt: skip
                job.catch_up_bytes = catch_up.bytes + catch_up.final_bytes
                job.catch_up_pause_ms = catch_up.pause_s * 1000
                continue
            await self.source.execute("blockdev-mirror", mirror_arguments(job, self.copy_mode))
            job.started = True

    async def _jobs(self) -> dict[str, dict[str, Any]]:
        answer = await self.source.execute("query-block-jobs")
        if not isinstance(answer, list):
            raise QemuError(f"query-block-jobs: unexpected answer {answer!r:.80}")
        return {str(j.get("device")): j for j in answer if isinstance(j, dict)}

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every mirror is READY. Raises :class:`MigrationError` when one fails,
        vanishes, or the deadline passes first."""
        deadline = time.monotonic() + timeout
        while True:
            running = await self._jobs()
            for job in self.jobs:
                info = running.get(job.job_id)
                if info is None:
                    raise MigrationError(f"disk {job.placement.name}: its mirror job ended early")
                if info.get("io-status", "ok") != "ok" or info.get("status") == "aborting":
                    raise MigrationError(
                        f"disk {job.placement.name}: mirror failed ({info.get('io-status')}, "
                        f"{info.get('error', info.get('status'))})"
                    )
                job.bytes, job.length = int(info.get("offset", 0)), int(info.get("len", 0))
                if info.get("ready") and job.ready_at is None:
                    job.ready_at = time.monotonic()
            if self.on_progress is not None:
                self.on_progress({j.placement.name: (j.bytes, j.length) for j in self.jobs})
            if all(j.ready_at is not None for j in self.jobs):
                return
            if time.monotonic() > deadline:
                slow = [j.placement.name for j in self.jobs if j.ready_at is None]
                raise MigrationError(
                    f"disk mirror not READY within {timeout:g} s: {', '.join(slow)}"
                )
            await asyncio.sleep(_POLL_S)

    async def sample(self) -> None:
        """Refresh ``bytes`` of the running jobs (progress while RAM moves)."""
        running = await self._jobs()
        for job in self.jobs:
            info = running.get(job.job_id)
            if info is not None:
                job.bytes, job.length = int(info.get("offset", 0)), int(info.get("len", 0))

    async def complete(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """Finish every READY mirror consistently (:meth:`finish_jobs`, if not done
        yet), then tear the NBD path down on both sides.

        Raises :class:`MigrationError` if a job does not end as completed in time.
        """
        deadline = time.monotonic() + timeout
        await self.finish_jobs(timeout)
        await self._teardown(deadline, strict=True)

    async def finish_jobs(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """``block-job-cancel`` every READY mirror and wait for BLOCK_JOB_COMPLETED;
        then drop the source's NBD client nodes (their close flushes the target).

        Call once the source is stopped (no guest writes): in QEMU's
        ``pre-switchover`` pause, before the source's images are inactivated (a
        background mirror writing after that makes QEMU 7.2 abort). Idempotent.
        """
        deadline = time.monotonic() + timeout
        if all(j.finished for j in self.jobs):
            return
        await self.sample()
        with self.source.listener(
            ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
        ) as events:
            for job in self.jobs:
                if not job.finished:
                    await self.source.execute("block-job-cancel", {"device": job.job_id})
            pending = {j.job_id: j for j in self.jobs if not j.finished}
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MigrationError(
                        f"disk mirrors did not complete within {timeout:g} s: "
                        + ", ".join(j.placement.name for j in pending.values())
                    )
                try:
                    event = await within(events.get(), remaining)
                except TimeoutError:
                    continue
                raw = event.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                name = str(event.get("event"))
                ended = pending.get(str(data.get("device")))
                if ended is None:
                    continue
                if name != "BLOCK_JOB_COMPLETED" or data.get("error"):
                    raise MigrationError(
                        f"disk {ended.placement.name}: mirror ended with {name} "
                        f"{data.get('error', '')}".strip()
                    )
                job = ended
                job.bytes = int(data.get("offset", job.bytes))
                job.finished = True
                del pending[job.job_id]
        for job in self.jobs:
            if job.client_added:
                try:
                    await self.source.execute("blockdev-del", {"node-name": job.client_node})
                except QemuError as exc:
                    raise MigrationError(f"blockdev-del {job.client_node}: {exc}") from exc
                job.client_added = False

    async def abort(self, timeout: float = FINISH_TIMEOUT_S) -> list[str]:
        """Stop every mirror and drop the NBD path; never raises. Notes of what was done."""
        notes: list[str] = []
        deadline = time.monotonic() + timeout
        started = [j for j in self.jobs if j.started and not j.finished]
        for job in started:
            try:
                await self.source.execute("block-job-cancel", {"device": job.job_id, "force": True})
            except QemuError as exc:
                notes.append(f"disk {job.placement.name}: block-job-cancel: {exc}")
        while started and time.monotonic() < deadline:
            try:
                running = await self._jobs()
            except QemuError as exc:
                notes.append(f"could not watch the disk mirrors stop: {exc}")
                break
            if not any(j.job_id in running for j in started):
                break
            await asyncio.sleep(_POLL_S)
        else:
            if started:
                notes.append("disk mirrors did not stop in time")
        for job in started:
            job.finished = True
        if started:
            notes.append(f"cancelled {len(started)} disk mirror(s)")
        notes += await self._teardown(deadline, strict=False)
        return notes

    async def _teardown(self, deadline: float, strict: bool) -> list[str]:
        notes: list[str] = []

        async def step(session: QmpSession, command: str, args: dict[str, Any]) -> bool:
            try:
                await session.execute(command, args)
                return True
            except QemuError as exc:
                if strict:
                    raise MigrationError(f"{command}: {exc}") from exc
                notes.append(f"{command}: {exc}")
                return False

        for job in self.jobs:
            if job.client_added and await step(
                self.source, "blockdev-del", {"node-name": job.client_node}
            ):
                job.client_added = False
        for job in self.jobs:
            while job.exported:
                try:
                    await self.target.execute("block-export-del", {"id": job.export_id})
                    job.exported = False
                except QemuError as exc:
                    # "in use" until the client's disconnect has reached the target.
                    if time.monotonic() > deadline:
                        if strict:
                            raise MigrationError(f"block-export-del: {exc}") from exc
                        notes.append(f"block-export-del {job.export_id}: {exc}")
                        break
                    if "not found" in str(exc).lower():
                        job.exported = False
                        break
                    await asyncio.sleep(_POLL_S)
        if self.server_started:
            # The exports may still be going away; wait for that before stopping.
            while await self._export_count() and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
            if await step(self.target, "nbd-server-stop", {}):
                self.server_started = False
        return notes

    async def _export_count(self) -> int:
        with contextlib.suppress(QemuError):
            answer = await self.target.execute("query-block-exports")
            if isinstance(answer, list):
                ours = {j.export_id for j in self.jobs}
                return sum(1 for e in answer if isinstance(e, dict) and e.get("id") in ours)
        return 0

    def ready_ms(self, job: MirrorJob) -> float | None:
        if job.ready_at is None or self.started_at is None:
            return None
        return (job.ready_at - self.started_at) * 1e3


def _nested(address: NbdAddress) -> dict[str, Any]:
    """The ``data`` of a QAPI ``SocketAddressLegacy`` (what nbd-server-start takes)."""
    if address.path is not None:
        return {"path": address.path}
    return {"host": address.host, "port": str(address.port)}

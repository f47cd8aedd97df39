"""A migration's disks, from classification to report: what a strategy run holds.

:class:`MigrationDisks` ties :mod:`~migrate.disks.classify`,
:mod:`~migrate.disks.mirror` and :mod:`~migrate.disks.integrity` together in the
order :class:`~migrate.strategy.StrategyRun` calls them:

    prepare()     classify; export the local disks from the target (before
                  migrate-incoming)
    mirror()      start the mirrors, wait until every one is READY
    complete() / verify()   at switchover (:class:`~migrate.safety.DiskFinisher`)
    abort()       on failure, before the source resumes
    remove_target_images()  after rollback, once the target QEMU is gone
    reports()     :class:`~migrate.report.DiskReport` per writable disk

A replica mode (``DiskMode.REPLICA``) fits in as another placement whose
``prepare``/``mirror`` steps copy only what changed since the replica.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from migrate.disks.classify import Classification, block_disks, classify
from migrate.disks.images import remove_image
from migrate.disks.integrity import DiskComparison, compare_images
from migrate.disks.mirror import CopyMode, NbdAddress, NbdMirror
from migrate.disks.model import DiskMode, DiskPlacement
from migrate.disks.quickcheck import BITMAP as VERIFY_BITMAP
from migrate.disks.quickcheck import EXPORT as VERIFY_EXPORT
from migrate.disks.quickcheck import QuickCheck
from migrate.disks.replica_mirror import ReplicaUse, detect_replicas
from migrate.disks.replica_store import ReplicaStore
from migrate.errors import ConfigError, MigrationError
from migrate.events import DiskCopy, DiskProgress, EventBus
from migrate.integrity import IntegrityResult
from migrate.journal import JournalDisk, JournalDisks, record_disks
from migrate.qmp import QmpSession
from migrate.report import DiskReport, Integrity
from migrate.request import MigrationRequest

#: How often (s) mirror progress goes out (:class:`~migrate.events.DiskProgress`)
#: while the first copy runs.
PROGRESS_EVERY_S = 0.5


class MigrationDisks:
    """The disks of one migration (see the module docstring)."""

    def __init__(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        events: EventBus,
        t0: float | None = None,
    ) -> None:
        self.request = request
        self.source = source
        self.target = target
        self.events = events
        self.notice = events.notice
        self.t0 = time.monotonic() if t0 is None else t0
        self.classification = Classification((), ())
        self.mirror: NbdMirror | None = None
        self.comparisons: dict[str, DiskComparison] = {}
        self.removed: list[str] = []
        self._last_progress = 0.0
        self.replicas: dict[str, ReplicaUse] = {}
        #: Disks whose replica this migration may not use (its claim was refused).
        self.refused_replicas: dict[str, str] = {}
        #: Disks whose replica this migration marked in use (see ReplicaStore.mark).
        self.claimed: list[str] = []
        self.checks: dict[str, QuickCheck] = {}

    async def classify(self) -> Classification:
        src, dst = await block_disks(self.source), await block_disks(self.target)
        found = classify(src, dst, self.request.with_local_disks, self.request.shared_disks)
        if found.mirrored:
            self.replicas = await detect_replicas(
                self.source, self.target, found.mirrored, self.request.migration_id
            )
            for name in self.refused_replicas:
                self.replicas.pop(name, None)
        self.classification = replace(
            found, placements=tuple(self._on_replica(p) for p in found.placements)
        )
        return self.classification

    def _on_replica(self, placement: DiskPlacement) -> DiskPlacement:
        use = self.replicas.get(placement.name)
        if use is None or not placement.mode.copies:
            return placement
        return replace(
            placement,
            mode=DiskMode.REPLICA,
            reason=f"target image is an overlay on replica generation {use.generation} "
            f"({use.image}); {use.dirty_bytes} bytes changed since",
        )

    async def prepare(self) -> None:
        """Classify the disks; export the ones to copy from the target."""
        mirrored = (await self.classify()).mirrored
        if not mirrored:
            return
        if self.request.policy.postcopy_allowed:
            # The target would run before its disks are complete.
            raise ConfigError("post-copy with local disks is not supported: leave it off")
        self.mirror = NbdMirror(
            self.source,
            self.target,
            mirrored,
            NbdAddress.beside(self.request.migration_uri, self.request.nbd_port),
            CopyMode(self.request.disk_copy_mode),
            tag=f"lm{self.request.migration_id[:8]}",
            on_progress=self._progress,
        )
        try:
            # Before the first step: a crash from here on leaves what recovery removes
            # (and the replicas it releases or marks consumed).
            record_disks(self.journal_entry())
        except OSError as exc:
            raise MigrationError(f"cannot record the disk copy in the journal: {exc}") from exc
        self._claim_replicas()
        for job in self.mirror.jobs:
            use = self.replicas.get(job.placement.name)
            job.replica_bitmap = use.bitmap if use is not None else None
        await self.mirror.export()
        # The mirrors are completed in QEMU's pre-switchover pause (the strategy
        # calls finish_at_switchover, then migrate-continue).
        await self.source.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )

    def _replica_store(self, name: str) -> ReplicaStore:
        return ReplicaStore(Path(self.replicas[name].image).parent)

    def _claim_replicas(self) -> None:
        """Mark each replica this migration starts from as in use by it; a replica
        that cannot be claimed is not used (the whole disk is mirrored)."""
        for name in list(self.replicas):
            try:
                self._replica_store(name).mark(name, self.request.migration_id, "claim")
            except (ConfigError, OSError) as exc:
                self.refused_replicas[name] = str(exc)
                del self.replicas[name]
                self.notice(f"disk {name}: not starting from its replica ({exc}); "
                            "mirroring the whole disk")  # fmt: skip
                continue
            self.claimed.append(name)
        if self.refused_replicas:
            self.classification = replace(
                self.classification,
                placements=tuple(
                    replace(
                        p,
                        mode=DiskMode.MIRRORED,
                        reason=f"replica not used: {self.refused_replicas[p.name]}",
                    )
                    if p.name in self.refused_replicas and p.mode is DiskMode.REPLICA
                    else p
                    for p in self.classification.placements
                ),
            )
            assert self.mirror is not None
            self.mirror.placements = self.classification.mirrored
            for job in self.mirror.jobs:
                job.placement = next(
                    p for p in self.mirror.placements if p.name == job.placement.name
                )

    def settle_replicas(self, on_target: bool) -> list[str]:
        """Once the migration ended: the replicas it used are consumed (the VM runs on
        the target, on top of them) or released (it stays on the source). Notes."""
        notes = []
        action = "consume" if on_target else "release"
        for name in self.claimed:
            try:
                self._replica_store(name).mark(name, self.request.migration_id, action)
            except (ConfigError, OSError) as exc:
                notes.append(f"disk {name}: could not mark its replica {action}d: {exc}")
                continue
            if on_target:
                notes.append(f"disk {name}: its replica ({self.replicas[name].image}) now backs "
                             "the migrated disk: marked consumed")  # fmt: skip
        self.claimed = []
        return notes

    def journal_entry(self) -> JournalDisks:
        """The disk copy as the migration journal records it (for ``livemig recover``)."""
        assert self.mirror is not None
        return JournalDisks(
            nbd_address=str(self.mirror.address),
            disks=tuple(
                JournalDisk(
                    name=job.placement.name,
                    target_image=str(job.placement.target.path)
                    if job.placement.target is not None
                    else None,
                    export_id=job.export_id,
                    client_node=job.client_node,
                    job_id=job.job_id,
                    source_node=job.placement.source.node_name,
                    replica_dir=str(Path(self.replicas[job.placement.name].image).parent)
                    if job.placement.name in self.replicas
                    else None,
                )
                for job in self.mirror.jobs
            ),
            verify_bitmap=VERIFY_BITMAP,
            verify_export=VERIFY_EXPORT,
        )

    async def copy_bytes(self) -> int:
        """About the bytes the first copy moves: each local disk's allocated bytes
        (:meth:`BlockDisk.allocated_bytes`), on a replica what changed since it."""
        total = 0
        for placement in (await self.classify()).mirrored:
            if placement.mode is DiskMode.REPLICA:
                total += self.replicas[placement.name].dirty_bytes
            else:
                total += placement.source.allocated_bytes()
        return total

    async def copy(self) -> None:
        """Start the mirrors; return once all are READY (raises MigrationError otherwise)."""
        if self.mirror is None:
            return
        names = ", ".join(p.name for p in self.mirror.placements)
        self.notice(f"disks: mirroring {names} over NBD to {self.mirror.address} "
                    f"({self.mirror.copy_mode})")  # fmt: skip
        await self.mirror.start()
        for job in self.mirror.jobs:
            if job.replica_bitmap is not None:
                use = self.replicas[job.placement.name]
                self.notice(
                    f"disk {job.placement.name}: on replica generation {use.generation}, "
                    f"caught up {job.catch_up_bytes} bytes (guest paused "
                    f"{job.catch_up_pause_ms:.0f} ms to start the mirror)"
                )
        await self.mirror.wait_ready(self.request.disk_ready_timeout_s)
        for job in self.mirror.jobs:
            self.notice(
                f"disk {job.placement.name}: mirror READY, {job.bytes} bytes copied in "
                f"{(self.mirror.ready_ms(job) or 0) / 1e3:.1f} s"
            )
        if self.request.hooks.after_disks_ready is not None:
            await self.request.hooks.after_disks_ready()
        # Compare now, the guest running (the mirrors keep both images in step); the
        # downtime re-checks only what the guest writes from here on.
        for placement in self.mirror.placements:
            assert placement.target is not None
            check = QuickCheck(self.source, placement.source.node_name, placement.name,
                               placement.source.path, placement.target.path)  # fmt: skip
            self.checks[placement.name] = check
            await check.start()
            background = check.background
            self.notice(
                f"disk {placement.name}: compared in the background, {background.compared} "
                f"bytes in {background.ms:.0f} ms, {len(background.differed)} chunk range(s) "
                "to re-check"
                if background is not None
                else f"disk {placement.name}: {check.problem}; the downtime compares it in full"
            )
        if self.request.hooks.after_disks_compared is not None:
            await self.request.hooks.after_disks_compared()

    def _progress(self, state: dict[str, tuple[int, int]]) -> None:
        now = time.monotonic()
        ready = self.mirror is not None and all(j.ready_at is not None for j in self.mirror.jobs)
        if now - self._last_progress < PROGRESS_EVERY_S and not ready:
            return
        self._last_progress = now
        jobs = {j.placement.name: j for j in self.mirror.jobs} if self.mirror else {}
        copies = tuple(
            DiskCopy(name, done, total, jobs[name].ready_at is not None if name in jobs else False)
            for name, (done, total) in state.items()
        )
        self.events.emit(DiskProgress(time.time(), (now - self.t0) * 1e3, copies))

    # -- DiskFinisher ---------------------------------------------------------------

    async def finish_at_switchover(self) -> None:
        """In the source's pre-switchover pause: complete the mirrors before the
        source hands its images over (:meth:`NbdMirror.finish_jobs`). The watches
        of the target images end here (:meth:`QuickCheck.seal`)."""
        for check in self.checks.values():
            check.seal()
        if self.mirror is not None:
            await self.mirror.finish_jobs()

    async def complete(self) -> None:
        if self.mirror is not None:
            await self.mirror.complete()

    async def verify(self) -> IntegrityResult:
        """Compare every mirrored disk's images; the worst verdict, all details."""
        if self.mirror is None:
            return IntegrityResult(Integrity.UNCHECKED, "no disk copied")
        for placement in self.mirror.placements:
            assert placement.target is not None
            check = self.checks.pop(placement.name, None)
            if check is not None:
                result = await check.verify()
            else:
                result = await compare_images(
                    placement.name, placement.source.path, placement.target.path
                )
            self.comparisons[placement.name] = result
        verdicts = [c.integrity for c in self.comparisons.values()]
        worst = (
            Integrity.FAILED
            if Integrity.FAILED in verdicts
            else Integrity.UNCHECKED
            if Integrity.UNCHECKED in verdicts
            else Integrity.OK
        )
        detail = "; ".join(f"{c.name}: {c.detail}" for c in self.comparisons.values())
        return IntegrityResult(worst, detail)

    # -- failure ------------------------------------------------------------------------

    async def abort(self) -> list[str]:
        notes = []
        for check in self.checks.values():
            notes += await check.close()
        self.checks.clear()
        return notes + (await self.mirror.abort() if self.mirror is not None else [])

    async def close_checks(self) -> list[str]:
        """Remove what the background comparisons left on the source (bitmaps)."""
        notes = []
        for check in self.checks.values():
            notes += await check.close()
        self.checks.clear()
        return notes

    def remove_target_images(self) -> list[str]:
        """Remove the target's copies of mirrored disks (call once its QEMU is gone)."""
        notes = []
        for placement in self.classification.mirrored:
            if placement.target is not None and remove_image(placement.target.path):
                self.removed.append(placement.name)
                notes.append(f"removed the target's partial copy of disk {placement.name} "
                             f"({placement.target.path})")  # fmt: skip
        return notes

    # -- report ---------------------------------------------------------------------------

    def reports(self) -> tuple[DiskReport, ...]:
        out = []
        jobs = {j.placement.name: j for j in self.mirror.jobs} if self.mirror else {}
        for placement in self.classification.placements:
            job = jobs.get(placement.name)
            comparison = self.comparisons.get(placement.name)
            if placement.mode is DiskMode.SHARED:
                integrity, detail = Integrity.UNCHECKED, f"shared: {placement.reason}"
            elif comparison is not None:
                integrity, detail = comparison.integrity, comparison.detail
            else:
                integrity, detail = Integrity.UNCHECKED, "not compared (migration did not finish)"
            if placement.name in self.removed:
                detail += "; the target's copy was removed"
            out.append(
                DiskReport(
                    name=placement.name,
                    mode=placement.mode,
                    bytes=job.bytes + job.catch_up_bytes if job else 0,
                    integrity=integrity,
                    detail=detail,
                    virtual_size=placement.source.virtual_size,
                    copy_mode=self.mirror.copy_mode.value if job and self.mirror else "",
                    ready_ms=self.mirror.ready_ms(job) if job and self.mirror else None,
                )
            )
        return tuple(out)

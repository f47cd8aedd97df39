"""One libvirt migration: libvirt's job, watched and steered by the engine.

::

    preflight (migrate.libvirt.preflight) ──► PreflightError with every reason
    controller.start → migrateToURI3 flags + parameters (migrate.libvirt.levers)
    job thread:      dom.migrateToURI3(peer URI, params, LIVE|PEER2PEER[|PAUSED|POSTCOPY...])
    this task:       every sample_interval_s jobStats() on its own connection → Sample →
                     Progress event → controller.on_sample → intents carried out through
                     libvirt (migrateSetMaxDowntime, migrateSetMaxSpeed, migrateStartPostCopy,
                     abortJob) or rejected with the reason
    QEMU's events:   STOP/RESUME/MIGRATION from both daemons with QEMU's timestamps
                     (migrate.libvirt.monitor) → the report's timeline

The safety rule, as far as libvirt lets us hold it: with ``verify`` the job runs
with ``VIR_MIGRATE_PAUSED``, so libvirt leaves the target paused; the engine
compares its RAM with the source's as the source QEMU left it (mapped before the
start: the mapping outlives the source QEMU, which libvirt ends right after the
switchover), repairs stale pages if allowed, and only then resumes the target.
Before the switchover any failure or abort goes through ``abortJob``, and libvirt
itself puts the domain back to running on the source and removes the target.
What libvirt does not let us do: keep the source after the switchover. Once QEMU
completed, libvirt's confirm phase ends the source, so a RAM mismatch found then
(only with ``repair`` off) leaves the VM paused on the target, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from migrate.control.base import ControlContext, Controller
from migrate.control.intents import Abort, StartPostcopy
from migrate.deadline import within
from migrate.errors import ConfigError, MigrationAborted, MigrationError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged, Progress
from migrate.integrity import IntegrityResult, RamComparison
from migrate.libvirt.conn import (
    LibvirtError,
    close_quietly,
    open_connection,
    require_libvirt,
    translate,
)
from migrate.libvirt.levers import Pending, settle_live, settle_pending, start_settings
from migrate.libvirt.monitor import MonitorLog
from migrate.libvirt.preflight import DomainFacts, domain_facts, run_preflight
from migrate.libvirt.ram import qemu_ram_file
from migrate.libvirt.request import LibvirtRequest
from migrate.libvirt.stats import completed_figure, sample_from_job_stats
from migrate.phase import Phase, PhaseTracker
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Outcome,
    PreflightCheck,
    Sample,
    Status,
    Timeline,
    Verdict,
)
from migrate.safety import Switchover

STRATEGY = "libvirt"
_ENDED = frozenset({"none", "completed", "failed", "cancelled"})
#: How long libvirt gets to end a cancelled job and put the domain back.
ROLLBACK_TIMEOUT_S = 60.0


class LibvirtRun:
    """One migration of a libvirt domain; :meth:`execute` is the whole of it."""

    def __init__(self, request: LibvirtRequest, controller: Controller, events: EventBus) -> None:
        self.request = request
        self.controller = controller
        self.events = events
        self.phase = PhaseTracker(lambda a, b: events.emit(PhaseChanged(time.time(), a, b)))
        self.samples: list[Sample] = []
        self.decisions: list[Decision] = []
        self.preflight: tuple[PreflightCheck, ...] = ()
        self.switchover = Switchover()
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.mode = "live"
        self.ram_bytes = 0
        self.completed: dict[str, Any] = {}
        self.comparison: RamComparison | None = None
        self.source_fd: int | None = None
        self.postcopy_armed = False
        self.postcopy = False
        self.verify = False
        self.integrity_note = ""
        self.stranded = False
        self._conns: list[Any] = []
        self._monitor: MonitorLog | None = None
        self._facts: DomainFacts | None = None
        self._ctl_domain: Any = None
        self._job: asyncio.Task[Any] | None = None
        self._target_unmappable = False

    # -- the whole run -------------------------------------------------------------------

    async def execute(self) -> MigrationReport:
        """Preflight, migrate, report. Raises PreflightError (nothing moved),
        MigrationError/MigrationAborted carrying the report, or LibvirtError when a
        daemon cannot be reached."""
        lv = require_libvirt()
        try:
            src, ctl, dst = [
                await self._open(uri)
                for uri in (self.request.source.uri, self.request.source.uri,
                            self.request.target.uri)
            ]  # fmt: skip
            domain = await asyncio.to_thread(self._lookup, src)
            facts = self._facts = await asyncio.to_thread(domain_facts, domain)
            checks = await asyncio.to_thread(run_preflight, facts, src, dst)
            self.preflight = checks.checks
            for check in checks.checks:
                if check.verdict is not Verdict.OK:
                    self.events.notice(f"preflight {check.name}: {check.verdict}: {check.detail}")
            checks.enforce(self.request.force)
            self._ctl_domain = await asyncio.to_thread(ctl.lookupByUUIDString, facts.uuid)
            self._monitor = MonitorLog(asyncio.get_running_loop())
            for conn, side in ((src, "source"), (dst, "target")):
                await asyncio.to_thread(self._monitor.register, conn, side, lambda: facts.uuid)
            return await self._run(domain, dst)
        except lv.libvirtError as exc:
            raise translate(exc, "libvirt") from exc
        finally:
            await self._close()

    async def _open(self, uri: str) -> Any:
        conn = await asyncio.to_thread(open_connection, uri)
        self._conns.append(conn)
        return conn

    def _lookup(self, conn: Any) -> Any:
        lv = require_libvirt()
        try:
            return conn.lookupByName(self.request.domain)
        except lv.libvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                raise ConfigError(
                    f"no domain {self.request.domain!r} on {self.request.source.uri}"
                ) from exc
            raise

    async def _close(self) -> None:
        if self._monitor is not None:
            await asyncio.to_thread(self._monitor.close)
        if self.comparison is not None:
            await self.comparison.close()
        if self.source_fd is not None:
            os.close(self.source_fd)
            self.source_fd = None
        for conn in self._conns:
            await asyncio.to_thread(close_quietly, conn)
        self._conns.clear()

    async def _run(self, domain: Any, dst: Any) -> MigrationReport:
        lv = require_libvirt()
        facts = self._facts
        assert facts is not None
        self.ram_bytes = facts.memory_bytes
        persistent = bool(await asyncio.to_thread(domain.isPersistent))
        flags = lv.VIR_MIGRATE_PEER2PEER
        if persistent:
            flags |= lv.VIR_MIGRATE_PERSIST_DEST | lv.VIR_MIGRATE_UNDEFINE_SOURCE
        if not facts.active:
            self.mode = "offline"
            flags |= lv.VIR_MIGRATE_OFFLINE
            decisions: list[Decision] = []
        else:
            self.mode = "offline" if self.request.offline else "live"
            if not self.request.offline:
                flags |= lv.VIR_MIGRATE_LIVE
            context = ControlContext(ram_bytes=facts.memory_bytes, started_monotonic=self.t0)
            decisions = self.controller.start(context)
        settings = start_settings(decisions, flags)
        for settled in settings.settled:
            self._record(settled)
        self.postcopy_armed = bool(settings.flags & lv.VIR_MIGRATE_POSTCOPY)
        if facts.active:
            await self._prepare_verify(domain)
        if self.verify:
            settings.flags |= lv.VIR_MIGRATE_PAUSED
        self.started_at, self.t0 = time.time(), time.monotonic()
        uri = self.request.target.migration_uri
        self._job = asyncio.create_task(
            asyncio.to_thread(domain.migrateToURI3, uri, settings.params, settings.flags),
            name=f"libvirt-migrate-{self.request.domain}",
        )
        try:
            self.phase.advance(Phase.PRECOPY if self.mode == "live" else Phase.SWITCHOVER)
            if facts.active:
                await self._follow(settings.pending)
            if self.verify and not self.postcopy:
                await self._finish_on_target(dst)
            await self._wait_job()
            self.phase.advance(Phase.COMPLETED)
            await self._completed_stats(dst)
        except BaseException as exc:
            error = await self._failed(exc, dst)
            if error is None:
                raise
            raise error from exc
        report = self._report()
        self.events.emit(Finished(report))
        return report

    # -- set-up --------------------------------------------------------------------------

    async def _prepare_verify(self, domain: Any) -> None:
        """Map the source's RAM now (the mapping outlives the source QEMU) if asked."""
        if not self.request.verify:
            self.integrity_note = "not asked (--no-verify): libvirt resumed the target itself"
            return
        if self.postcopy_armed:
            self.integrity_note = (
                "post-copy armed: libvirt resumes the target at the post-copy switch, "
                "RAM not compared"
            )
            return
        assert self._facts is not None
        path, why = await asyncio.to_thread(qemu_ram_file, self._facts.uuid, False)
        if path is None:
            self.integrity_note = f"source RAM not mappable: {why}"
            return
        try:
            # Held open so the file can be mapped after libvirt removed it with the
            # source QEMU: /proc/self/fd/N reopens the same inode.
            self.source_fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self.integrity_note = f"source RAM file {path}: {exc.strerror}"
            return
        self.verify = True

    # -- the job -------------------------------------------------------------------------

    async def _follow(self, pending: list[Pending]) -> None:
        """Sample the job and steer it until it ends (or, verifying, the target has it all)."""
        monitor = self._monitor
        assert monitor is not None and self._job is not None
        lv = require_libvirt()
        interval = self.request.sample_interval_s
        deadline = time.monotonic() + self.request.job_timeout_s
        started = False
        while not self._job.done():
            if time.monotonic() > deadline:
                raise MigrationError(f"libvirt's job ran past {self.request.job_timeout_s:.0f} s")
            try:
                stats = await asyncio.to_thread(self._ctl_domain.jobStats, 0)
            except lv.libvirtError:
                stats = {}  # the job is ending: the source domain is going away
            qemu_status = monitor.last_status("source")
            sample = sample_from_job_stats(
                stats, time.time(), (time.monotonic() - self.t0) * 1e3, qemu_status
            )
            await self._watch_target()
            if monitor.find("source", "STOP", since=self.started_at) is not None:
                self._source_stopped()
            # Before QEMU's stream starts libvirt is still preparing the target: the
            # job's figures are zeros and its parameters not yet QEMU's.
            if qemu_status is not None and sample.status not in _ENDED:
                self.samples.append(sample)
                self.events.emit(Progress(sample))
                if self.phase.phase is Phase.PRECOPY and sample.cpu_throttle_pct > 0:
                    self.phase.advance(Phase.THROTTLING)
                if not started and qemu_status != "setup":
                    started = True
                    for waiting in pending:
                        self._record(
                            await asyncio.to_thread(
                                settle_pending, waiting, self._ctl_domain, self.postcopy_armed
                            )
                        )
                for decision in self.controller.on_sample(sample):
                    await self._apply(decision)
            if self.verify and monitor.find("target", "MIGRATION", "completed") is not None:
                return
            await monitor.wait(interval)

    def _source_stopped(self) -> None:
        if self.phase.phase in (Phase.PRECOPY, Phase.THROTTLING):
            self.phase.advance(Phase.SWITCHOVER)
        if self.comparison is not None:
            self.comparison.source_stopped()

    async def _watch_target(self) -> None:
        """Once the target QEMU exists, find and map its RAM file (during pre-copy)."""
        if self.comparison is not None or self.source_fd is None or self._target_unmappable:
            return
        assert self._monitor is not None and self._facts is not None
        if self._monitor.find("target", "MIGRATION", "setup") is None:
            return
        path, why = await asyncio.to_thread(qemu_ram_file, self._facts.uuid, True)
        if path is None:
            self.integrity_note = f"target RAM not mappable: {why}"
            self._target_unmappable = True
            self.events.notice(f"RAM will not be compared: {why}")
            return
        self.comparison = RamComparison(Path(f"/proc/self/fd/{self.source_fd}"), path)
        self.comparison.prepare()

    async def _apply(self, decision: Decision) -> None:
        """Carry out a decision through libvirt (abort: raise) and record its outcome."""
        if decision.has(Abort):
            self._record(decision.settled(Outcome.APPLIED, "abortJob"))
            raise MigrationAborted(decision.reason)
        if decision.has(StartPostcopy) and self.phase.phase is Phase.SWITCHOVER:
            # The source already stopped for the ordinary switchover: there is no
            # pre-copy left to turn into post-copy.
            self._record(
                decision.settled(Outcome.REJECTED, "too late: the switchover already began")
            )
            return
        settled = await asyncio.to_thread(
            settle_live, decision, self._ctl_domain, self.postcopy_armed
        )
        self._record(settled)
        if decision.has(StartPostcopy) and settled.outcome is Outcome.APPLIED:
            self.postcopy = True
            self.phase.advance(Phase.POSTCOPY)

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.events.emit(DecisionMade(decision))

    async def _finish_on_target(self, dst: Any) -> None:
        """The target holds everything, paused: compare (repair) RAM, then resume it."""
        monitor = self._monitor
        assert monitor is not None and self._facts is not None and self._job is not None
        lv = require_libvirt()
        deadline = time.monotonic() + 60
        while (done := monitor.find("target", "MIGRATION", "completed")) is None:
            if self._job.done():
                await self._job  # raises libvirt's reason when the job failed
                raise MigrationError("libvirt's job ended but the target never completed")
            if time.monotonic() > deadline:
                raise MigrationError("the target did not complete within 60 s")
            await monitor.wait(0.05)
        self._source_stopped()
        sw = self.switchover
        sw.target_completed = done.timestamp
        if self.comparison is None:
            await self._watch_target()
        if self.comparison is not None:
            sw.integrity = await self.comparison.compare(repair=self.request.repair)
            sw.verified = time.time()
            if sw.integrity.integrity is Integrity.FAILED:
                # libvirt's confirm phase is ending the source: no way back.
                self.stranded = True
                raise MigrationAborted(f"integrity check failed: {sw.integrity.detail}")
            sw.integrity = IntegrityResult(
                sw.integrity.integrity,
                "source RAM as the stopped source QEMU left it (mapped before the start) "
                "against the target's, paused by VIR_MIGRATE_PAUSED, before livemig "
                f"resumed it: {sw.integrity.detail}",
                sw.integrity.differing_pages,
                sw.integrity.repaired_pages,
            )
        target = await asyncio.to_thread(dst.lookupByUUIDString, self._facts.uuid)
        try:
            # Waits for libvirt's finish phase to release the domain, then resumes.
            await asyncio.to_thread(target.resume)
        except lv.libvirtError as exc:
            raise translate(exc, "resume the target") from exc
        sw.resumed = True
        resumed_at = time.time()
        while (resume := monitor.find("target", "RESUME", since=done.timestamp)) is None:
            if time.time() - resumed_at > 5:
                break
            await monitor.wait(0.05)
        sw.target_resume = resume.timestamp if resume is not None else resumed_at

    async def _wait_job(self) -> None:
        """The job thread's end; libvirt's error becomes a MigrationError."""
        lv = require_libvirt()
        assert self._job is not None
        try:
            await within(asyncio.shield(self._job), self.request.job_timeout_s)
        except lv.libvirtError as exc:
            raise MigrationError(f"libvirt: {exc.get_error_message() or exc}") from exc
        if not self.switchover.resumed and self._monitor is not None:
            sw = self.switchover
            done = self._monitor.find("target", "MIGRATION", "completed")
            sw.target_completed = done.timestamp if done else None
            resume = self._monitor.find("target", "RESUME", since=self.started_at)
            sw.target_resume = resume.timestamp if resume else None
            sw.resumed = True

    async def _completed_stats(self, dst: Any) -> None:
        """The completed job's statistics, which libvirt keeps on the destination."""
        lv = require_libvirt()
        if self._facts is None or not self._facts.active:
            return
        try:
            target = await asyncio.to_thread(dst.lookupByUUIDString, self._facts.uuid)
            stats = await asyncio.to_thread(target.jobStats, lv.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except lv.libvirtError as exc:
            self.events.notice(f"no completed job statistics: {exc}")
            return
        self.completed = dict(stats)

    # -- failure -------------------------------------------------------------------------

    async def _failed(self, exc: BaseException, dst: Any) -> MigrationError | None:
        """Put the VM back where libvirt can (abortJob) and report; the error to raise
        with the report, or None to raise ``exc`` itself (cancelled, or it runs on the
        target already)."""
        if self.switchover.resumed:
            # The VM already runs on the target: nothing rolls back.
            self.phase.advance(Phase.COMPLETED)
            self.events.emit(Finished(self._report(error=_describe(exc))))
            return None
        notes, cancelled = await _to_the_end(self._rollback(dst))
        aborted = isinstance(exc, MigrationAborted | asyncio.CancelledError | KeyboardInterrupt)
        self.phase.advance(Phase.ABORTED if aborted else Phase.FAILED)
        report = self._report(error=f"{_describe(exc)} ({'; '.join(notes)})")
        self.events.emit(Finished(report))
        if cancelled:
            raise asyncio.CancelledError("cancelled during rollback (rolled back first)")
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            return None
        where = "the VM is paused on the target" if self.stranded else "the VM stays on the source"
        error_type = MigrationAborted if isinstance(exc, MigrationAborted) else MigrationError
        return error_type(
            f"migration {report.status}: {_describe(exc)}; {where}",
            phase=report.phase,
            report=report,
        )

    async def _rollback(self, dst: Any) -> list[str]:
        """abortJob if the job still runs, wait for libvirt to end it, say where the VM is."""
        lv = require_libvirt()
        notes: list[str] = []
        job, facts = self._job, self._facts
        if job is not None and not job.done():
            try:
                await asyncio.to_thread(self._ctl_domain.abortJob)
                notes.append("libvirt job aborted")
            except lv.libvirtError as exc:
                notes.append(f"abortJob failed: {exc.get_error_message()}")
        if job is not None:
            with contextlib.suppress(lv.libvirtError, TimeoutError, LibvirtError):
                await within(asyncio.shield(job), ROLLBACK_TIMEOUT_S)
            if not job.done():
                notes.append(f"libvirt's job did not end within {ROLLBACK_TIMEOUT_S:.0f} s")
        if facts is None:
            return notes
        source_state = await asyncio.to_thread(_state_of, self._conns[0], facts.uuid)
        target_state = await asyncio.to_thread(_state_of, dst, facts.uuid)
        if self.stranded:
            notes.append(
                f"libvirt ended the source at the switchover; the VM is {target_state} on the "
                "target, not resumed: resume or destroy it by hand"
            )
        else:
            notes.append(f"the domain is {source_state} on the source")
            notes.append(
                "nothing left on the target"
                if target_state == "absent"
                else f"the domain is {target_state} on the target"
            )
        for note in notes:
            self.events.notice(note)
        return notes

    # -- the report ----------------------------------------------------------------------

    def _timeline(self) -> Timeline:
        monitor, at = self._monitor, self.started_at
        stop = monitor.find("source", "STOP", since=at) if monitor else None
        src_done = monitor.find("source", "MIGRATION", "completed") if monitor else None
        return self.switchover.timeline(
            at, stop.timestamp if stop else None, src_done.timestamp if src_done else None
        )

    def _integrity(self) -> IntegrityResult:
        sw = self.switchover
        if sw.verified is not None:
            return sw.integrity
        if self.mode == "offline" and self._facts is not None and not self._facts.active:
            return IntegrityResult(
                Integrity.UNCHECKED,
                "offline: the domain was shut off, only its definition moved (no RAM)",
            )
        return IntegrityResult(Integrity.UNCHECKED, self.integrity_note or "RAM not compared")

    def _report(self, error: str | None = None) -> MigrationReport:
        timeline = self._timeline()
        status = {Phase.COMPLETED: Status.COMPLETED, Phase.ABORTED: Status.ABORTED}.get(
            self.phase.phase, Status.FAILED
        )
        total = (
            timeline.target_resume_ms
            if timeline.target_resume_ms is not None
            else (time.monotonic() - self.t0) * 1e3
        )
        done = self.completed
        integrity = self._integrity()
        return MigrationReport(
            status=status,
            strategy=STRATEGY,
            mode=self.mode,
            vm=self.request.domain,
            source=self.request.source.name,
            target=self.request.target.name,
            policy=self.controller.policy.name,
            phase=self.phase.phase,
            total_time_ms=total,
            ram_bytes=self.ram_bytes,
            timeline=timeline,
            downtime_ms=completed_figure(done, "downtime"),
            qemu_total_time_ms=completed_figure(done, "time_elapsed"),
            setup_time_ms=completed_figure(done, "setup_time"),
            transferred_bytes=int(completed_figure(done, "memory_processed") or 0),
            precopy_rounds=int(completed_figure(done, "memory_iteration") or 0),
            integrity=integrity.integrity,
            integrity_detail=integrity.detail,
            repaired_pages=integrity.repaired_pages,
            preflight=self.preflight,
            samples=tuple(self.samples),
            decisions=tuple(self.decisions),
            error=error,
            migration_id=self.request.migration_id,
        )


async def _to_the_end(rollback: Coroutine[Any, Any, list[str]]) -> tuple[list[str], bool]:
    """Run ``rollback`` to its end even if this task is cancelled meanwhile (an abort's
    grace period can expire while libvirt ends its job): its notes, and whether a
    cancellation came in the meantime (the caller raises it once it has reported)."""
    task = asyncio.ensure_future(rollback)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True


def _state_of(conn: Any, uuid: str) -> str:
    """``running``, ``paused``, ``shut off``... of the domain on ``conn``, or ``absent``."""
    lv = require_libvirt()
    try:
        domain = conn.lookupByUUIDString(uuid)
        state = domain.state()[0]
    except lv.libvirtError:
        return "absent"
    return {
        lv.VIR_DOMAIN_RUNNING: "running",
        lv.VIR_DOMAIN_PAUSED: "paused",
        lv.VIR_DOMAIN_SHUTOFF: "shut off",
        lv.VIR_DOMAIN_SHUTDOWN: "shutting down",
        lv.VIR_DOMAIN_CRASHED: "crashed",
    }.get(state, f"in state {state}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "cancelled by the operator"
    return str(exc) or type(exc).__name__

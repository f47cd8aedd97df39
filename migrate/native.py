"""The ``native`` strategy: QEMU's own migration stream, steered by our controller.

Pre-copy ends in the switchover tail of :mod:`migrate.safety` (verify, then
resume the target), in :class:`~migrate.strategy.StrategyRun`'s template. A
controller may instead switch to post-copy (``postcopy`` decision, only if the
policy allows it): QEMU stops the source and sends the device state; the target,
started with ``-S``, loads it and stays paused. Before it runs, the pages it
already holds are compared with the stopped source and stale ones repaired (QEMU
7.2 under TCG misses dirty pages, see :mod:`migrate.integrity`); pages it does not
hold yet are holes in its RAM file, skipped here, and arrive from the stopped
source on demand once it runs. From ``cont`` on there is no way back, and the
RAM as a whole is never compared (the target runs while it fills).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.control.base import Controller
from migrate.control.intents import StartPostcopy
from migrate.errors import MigrationError, QemuError
from migrate.events import EventBus, Progress
from migrate.integrity import IntegrityResult, RamComparison, RamComparisons
from migrate.phase import Phase
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.ramfiles import (
    check_ram_space,
    known_tcg_dirty_bug,
    ram_backing_files,
    refuse_shared_file,
)
from migrate.remoteram import RemoteRamComparison
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Sample,
)
from migrate.request import MigrationRequest
from migrate.safety import finish_on_target, resume_postcopy_target
from migrate.strategy import StartState, StrategyRun, check_start, qemu_figure

_TERMINAL = frozenset({"completed", "failed", "cancelled"})
#: How often a paused post-copy is reconnected before giving up, and how long each
#: reconnection may take to show the migration moving again (s).
POSTCOPY_RECOVERY_ATTEMPTS = 3
POSTCOPY_RECOVERY_WAIT_S = 10.0


class ProgressWatch:
    """Tells when a counter has not grown for ``limit_s`` seconds (monotonic clock)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._value = -1
        self._since = time.monotonic()

    def stalled(self, value: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if value > self._value:
            self._value, self._since = value, now
            return False
        return now - self._since > self.limit_s


class NativeStrategy:
    """Pre-copy with QEMU's migration stream; see :class:`~migrate.strategy.Strategy`."""

    name = "native"

    async def run(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
    ) -> MigrationReport:
        """Migrate; return the report, or raise :class:`MigrationError` carrying it.

        On any failure or cancellation the VM is left running on the source (if it
        was running) and the target QEMU is told to quit.
        """
        start = await check_start(source, target, request)
        run = _NativeRun(request, source, target, controller, events, start)
        return await run.execute()


class _NativeRun(StrategyRun):
    def __init__(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
        start: StartState,
    ) -> None:
        super().__init__(request, source, target, controller, events, start)
        self.ram_files: tuple[Path, Path] | None = None
        self.postcopy = False
        self.repair_allowed = False
        self.postcopy_recoveries = 0

    async def _setup(self) -> None:
        src_files = await ram_backing_files(self.source)
        tgt_files = await ram_backing_files(self.target)
        remote = self.request.target_ram
        if remote is None:
            # Paths the target reports are only meaningful here if it runs here.
            for name, path in src_files.items():
                if name in tgt_files:
                    refuse_shared_file(path, tgt_files[name])
            for path in tgt_files.values():
                check_ram_space(path)
        # Repair exists for one known bug (QEMU < 9.0 under TCG loses dirty pages);
        # anywhere else a differing page is a real fault, to be named, not hidden.
        self.repair_allowed = self.request.repair and await known_tcg_dirty_bug(self.source)
        if not self.request.verify or not src_files or set(src_files) != set(tgt_files):
            return
        if remote is not None:
            if len(src_files) != 1:
                self.events.notice(
                    f"RAM not compared: a remote target's check covers one RAM backend, "
                    f"this VM has {len(src_files)}"
                )
                return
            check = RemoteRamComparison(next(iter(src_files.values())), remote)
            check.prepare()
            self.comparison = check
            return
        first = next(iter(src_files))
        self.ram_files = (src_files[first], tgt_files[first])
        parts = {name: RamComparison(src_files[name], tgt_files[name]) for name in src_files}
        comparison = parts[first] if len(parts) == 1 else RamComparisons(parts)
        comparison.prepare()
        self.comparison = comparison

    async def _transfer(self, src_log: EventRecorder) -> None:
        """QEMU's pre-copy, followed to its end (QEMU switches over by itself)."""
        await self.source.execute("migrate", {"uri": self.request.migration_uri})
        info = await self._follow(src_log)
        if info.get("status") != "completed":
            reason = info.get("error-desc") or f"QEMU reported status {info.get('status')}"
            raise MigrationError(str(reason))

    async def _switchover(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        if self.postcopy:
            await self._postcopy_finish(tgt_log)
            return
        request = self.request
        await finish_on_target(
            self.switchover, self.target, tgt_log, self.comparison, request.hooks,
            self.repair_allowed,
        )  # fmt: skip

    async def _follow(self, src_log: EventRecorder) -> dict[str, Any]:
        """Sample ``query-migrate`` until a terminal status, reacting to events at once.

        Raises :class:`MigrationError` when nothing moves for the request's
        ``stall_timeout_s`` (the link is down or QEMU stuck): the caller rolls back.
        """
        seen = 0
        watch = ProgressWatch(self.request.stall_timeout_s)
        while True:
            info = await self.source.execute("query-migrate")
            if not isinstance(info, dict):
                raise MigrationError(f"query-migrate: unexpected answer {info!r:.80}")
            sample = Sample.from_query_migrate(
                info, time.time(), (time.monotonic() - self.t0) * 1e3
            )
            self.samples.append(sample)
            self.events.emit(Progress(sample))
            if sample.status in _TERMINAL:
                self.final_info = info
                return info
            if sample.status == "postcopy-paused":
                await self._recover_postcopy()
                continue
            if sample.status in ("setup", "active") and watch.stalled(sample.ram_transferred_bytes):
                raise MigrationError(
                    f"no progress for {watch.limit_s:g} s at {sample.ram_transferred_bytes} "
                    "bytes sent: the migration link is down or QEMU is stuck"
                )
            precopy = self.phase.phase in (Phase.PRECOPY, Phase.THROTTLING)
            if precopy and sample.cpu_throttle_pct > 0:
                self.phase.advance(Phase.THROTTLING)
            stopped = src_log.find("STOP", since=seen) is not None or sample.status == "device"
            if precopy and stopped:
                self.phase.advance(Phase.SWITCHOVER)
                if self.comparison is not None:
                    self.comparison.source_stopped()
            for decision in self.controller.on_sample(sample):
                await self._apply(decision, src_log)
            seen = len(src_log.events)
            terminal = src_log.find("MIGRATION", migration_status_is(*_TERMINAL), since=0)
            if terminal is None:
                await src_log.wait_any(self.request.sample_interval_s, since=seen)

    async def _after(self, decision: Decision, src_log: EventRecorder) -> None:
        if decision.has(StartPostcopy):
            self.postcopy = True
            self.phase.advance(Phase.POSTCOPY)
            await self._postcopy_resume(src_log)

    async def _postcopy_resume(self, src_log: EventRecorder, timeout: float = 30.0) -> None:
        """Wait until the target has the device state, then check and resume it.

        Raises :class:`MigrationError` if the target does not get there, and
        :class:`MigrationAborted` if stale pages may not be repaired (before
        ``cont``, so the VM can still go back to the source).
        """
        deadline = time.monotonic() + timeout
        await src_log.wait_for("STOP", timeout=timeout)
        if self.comparison is not None:
            self.comparison.source_stopped()
        while (status := await self.target.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise MigrationError("the target did not load the device state for post-copy")
            await asyncio.sleep(0.005)
        if status not in ("paused", "running"):
            raise MigrationError(f"the target is {status!r} after the post-copy switch")
        present = _PresentPagesCheck(self.ram_files) if self.ram_files is not None else None
        await resume_postcopy_target(
            self.switchover, self.target, status, present, self.request.hooks, self.repair_allowed
        )

    async def _recover_postcopy(self) -> None:
        """The link broke in post-copy (both sides ``postcopy-paused``): reconnect them.

        ``migrate-recover`` makes the target listen again, ``migrate`` with
        ``resume`` reconnects the source; up to :data:`POSTCOPY_RECOVERY_ATTEMPTS`
        tries, a growing pause between them. Raises :class:`MigrationError` when
        none holds (the VM stays on the target, paused for pages the source keeps).
        """
        uri = self.request.migration_uri
        failures: list[str] = []
        for attempt in range(1, POSTCOPY_RECOVERY_ATTEMPTS + 1):
            self.events.notice(f"post-copy paused (link lost?): recovery attempt {attempt}")
            try:
                target_info = await self.target.execute("query-migrate")
                if isinstance(target_info, dict) and target_info.get("status") == "postcopy-paused":
                    await self.target.execute("migrate-recover", {"uri": uri})
                await self.source.execute("migrate", {"uri": uri, "resume": True})
                deadline = time.monotonic() + POSTCOPY_RECOVERY_WAIT_S
                while time.monotonic() < deadline:
                    info = await self.source.execute("query-migrate")
                    status = info.get("status") if isinstance(info, dict) else None
                    if status in ("postcopy-active", "completed"):
                        self.postcopy_recoveries += 1
                        self.events.notice(f"post-copy recovered (attempt {attempt})")
                        return
                    if status == "postcopy-paused" and time.monotonic() > deadline - 1:
                        break
                    await asyncio.sleep(0.1)
                failures.append(f"attempt {attempt}: still paused")
            except QemuError as exc:
                failures.append(f"attempt {attempt}: {exc}")
            await asyncio.sleep(attempt)
        raise MigrationError(
            f"post-copy paused and {POSTCOPY_RECOVERY_ATTEMPTS} recovery attempts failed "
            f"({'; '.join(failures)})"
        )

    async def _postcopy_finish(self, tgt_log: EventRecorder, timeout: float = 120.0) -> None:
        """Wait for the target to have every page (post-copy's end), watching it live."""
        deadline = time.monotonic() + timeout
        done = None
        while done is None and time.monotonic() < deadline:
            done = await tgt_log.wait_for(
                "MIGRATION", migration_status_is("completed", "failed"), timeout=1.0
            )
            if done is None:
                try:
                    await self.target.status(timeout=min(self.target.timeout_s, 3.0))
                except QemuError as exc:
                    raise MigrationError(
                        f"the target QEMU is gone during post-copy ({exc}): the VM is lost"
                    ) from exc
        if done is None or done.data.get("status") != "completed":
            raise MigrationError("the target did not complete post-copy (it runs on the target)")
        sw = self.switchover
        sw.target_completed = done.timestamp
        resume = tgt_log.find("RESUME")
        if resume is not None:
            sw.target_resume = resume.timestamp

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None = None
    ) -> MigrationReport:
        ram = self.final_info.get("ram") or {}
        return self._base_report(
            src_log,
            "native",
            error,
            downtime_ms=qemu_figure(self.final_info.get("downtime")),
            setup_time_ms=qemu_figure(self.final_info.get("setup-time")),
            transferred_bytes=int(ram.get("transferred", 0)),
            precopy_rounds=int(ram.get("dirty-sync-count", 0)),
        )


@dataclass(frozen=True)
class _PresentPagesCheck:
    """:func:`compare_present_pages` as the post-copy target's RAM check."""

    ram_files: tuple[Path, Path]

    async def compare(self, repair: bool = False) -> IntegrityResult:
        check = await asyncio.to_thread(compare_present_pages, *self.ram_files, repair=repair)
        return check.result()


@dataclass(frozen=True)
class PresentPages:
    """A post-copy target's RAM compared with the stopped source where it holds pages."""

    checked: int
    missing: int
    differing: int
    repaired: int
    first_differing: tuple[int, ...]

    def result(self) -> IntegrityResult:
        detail = (
            f"post-copy: {self.checked} pages the target held compared with the stopped "
            f"source before it resumed"
            + (f", {self.repaired} stale repaired" if self.repaired else "")
            + (f", {self.differing} differ" if self.differing and not self.repaired else "")
            + f"; {self.missing} pages arrived on demand afterwards, not compared"
        )
        if self.differing and not self.repaired:
            return IntegrityResult(Integrity.FAILED, detail, self.first_differing)
        return IntegrityResult(
            Integrity.UNCHECKED, detail, self.first_differing, repaired_pages=self.repaired
        )


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """Page ranges ``[first, end)`` of ``path`` that hold data (holes skipped)."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after offset
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start // PAGE_SIZE, -(-end // PAGE_SIZE)))
            offset = end
    finally:
        os.close(fd)
    return extents


def compare_present_pages(
    source: Path, target: Path, repair: bool, chunk_pages: int = 4096
) -> PresentPages:
    """Compare the pages the target's RAM file holds with the source's (blocking).

    Only data extents of the target are read: reading a hole through a mapping would
    allocate a page there, and a post-copy target would then never ask for it.
    With ``repair`` differing pages are copied from the source.
    """
    checked = differing = repaired = 0
    named: list[int] = []
    extents = _data_extents(target)
    with RamMapping(source) as src, RamMapping(target, writable=repair) as dst:
        total = dst.page_count
        src_pages, dst_pages = src.pages(), dst.pages()
        for first, end in extents:
            for lo in range(first, min(end, total), chunk_pages):
                hi = min(lo + chunk_pages, end, total)
                rows = np.flatnonzero(np.any(src_pages[lo:hi] != dst_pages[lo:hi], axis=1)) + lo
                checked += hi - lo
                if len(rows):
                    differing += len(rows)
                    named.extend(int(r) for r in rows[: max(0, 8 - len(named))])
                    if repair:
                        dst_pages[rows] = src_pages[rows]
                        repaired += len(rows)
        del src_pages, dst_pages
    return PresentPages(checked, total - checked, differing, repaired, tuple(named))

"""The safety rule, once: the only code that resumes a target or a source.

The target is resumed only after the source has stopped and integrity holds
(:func:`finish_on_target`; post-copy's one exception, which a policy must allow,
in :func:`resume_postcopy_target`); any failure before that stops the target and
resumes the source if it was running (:func:`rollback`), so exactly one copy of
the VM runs at every moment. :class:`~migrate.strategy.StrategyRun` decides which
of them runs when.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Protocol

from migrate import journal
from migrate.errors import MigrationAborted, MigrationError, QemuError
from migrate.events import EventBus
from migrate.integrity import IntegrityResult, RamComparison, RamComparisons
from migrate.journal import MigrationSettings
from migrate.qmp import EventRecorder, QmpSession, migration_status_is, process_exited
from migrate.report import Integrity, Timeline, offset_ms
from migrate.request import MigrationHooks

ACTIVE_STATUSES = frozenset(
    {"setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
     "postcopy-recover", "wait-unplug", "cancelling"}
)  # fmt: skip
ANNOUNCE_NOW = {"initial": 0, "max": 100, "rounds": 3, "step": 50}


class RamVerifier(Protocol):
    """Compares the stopped source's RAM with the paused target's (e.g. RamComparison)."""

    async def compare(self, repair: bool = False) -> IntegrityResult: ...


class DiskFinisher(Protocol):
    """Completes the disk copies once the source stopped and RAM arrived
    (:meth:`complete`), then compares the images (:meth:`verify`)."""

    async def complete(self) -> None: ...

    async def verify(self) -> IntegrityResult: ...


@dataclass
class Switchover:
    """Timestamps and results of the switchover tail."""

    target_completed: float | None = None
    verified: float | None = None
    target_resume: float | None = None
    resumed: bool = False
    cont_sent: bool = False
    unknown: str | None = None
    integrity: IntegrityResult = field(
        default_factory=lambda: IntegrityResult(Integrity.UNCHECKED, "not compared")
    )

    def timeline(
        self, started_at: float, source_stop: float | None, source_completed: float | None
    ) -> Timeline:
        """The switchover's timeline from ``started_at`` (realtime seconds): the
        source's STOP and ``completed`` as its QEMU reported them, then our marks."""
        at = started_at
        return Timeline(
            started_at=at,
            source_stop_ms=offset_ms(at, source_stop),
            source_completed_ms=offset_ms(at, source_completed),
            target_completed_ms=offset_ms(at, self.target_completed),
            verified_ms=offset_ms(at, self.verified),
            target_resume_ms=offset_ms(at, self.target_resume),
            ended_ms=(time.time() - at) * 1e3,
        )


async def finish_on_target(
    result: Switchover,
    target: QmpSession,
    target_events: EventRecorder,
    comparison: RamVerifier | None,
    hooks: MigrationHooks,
    repair: bool,
    timeout: float = 30.0,
    disks: DiskFinisher | None = None,
) -> None:
    """Wait for the target to load the VM, verify its RAM, then resume it.

    With ``disks``, their copies are completed right after the target loaded the
    VM and compared after the RAM: a disk that differs aborts like RAM does.

    Fills ``result`` as it goes; ``result.resumed`` turns true the moment the VM
    runs on the target, after which nothing may roll the migration back.
    Raises :class:`MigrationError` if the target fails to load, and
    :class:`MigrationAborted` if its RAM differs from the source's.
    """
    done = await target_events.wait_for(
        "MIGRATION", migration_status_is("completed", "failed"), timeout=timeout
    )
    if done is None or done.data.get("status") != "completed":
        raise MigrationError("the target did not finish loading the VM")
    result.target_completed = done.timestamp
    if disks is not None:
        await disks.complete()
    if hooks.before_target_resume is not None:
        await hooks.before_target_resume()
    # The run state and the RAM check go together (one QMP round trip less in the
    # downtime); a target that resumed on its own makes the check moot.
    # A digest thread cannot be stopped half way and reads mapped RAM: it is
    # always waited for (bounded by the RAM size), never abandoned.
    # Only a verifier whose check may be asked again cheaply (RamComparison keeps
    # the paused target's digest) is started early; others (pagestream's waits for
    # its receiver's one verdict) check once, after the run state.
    check = None
    if isinstance(comparison, RamComparison | RamComparisons):
        check = asyncio.create_task(comparison.compare(repair=False))
    try:
        status = await target.status()
    except BaseException:
        if check is not None:
            await _settle(check)
        raise
    if status == "running":
        if check is not None:
            await _settle(check)
        result.integrity = IntegrityResult(
            Integrity.UNCHECKED, "target resumed on its own (not started with -S): RAM not compared"
        )
    elif comparison is not None:
        if check is None:
            result.integrity = await comparison.compare(repair=repair)
        else:
            result.integrity = await check
            if result.integrity.integrity is Integrity.FAILED and repair:
                # Repair copies into the paused target's RAM: only now that it is
                # known to be paused.
                result.integrity = await comparison.compare(repair=True)
        result.verified = time.time()
        if result.integrity.integrity is Integrity.FAILED:
            raise MigrationAborted(f"integrity check failed: {result.integrity.detail}")
        if result.integrity.integrity is Integrity.UNCHECKED:
            # A check that was set up but could not finish (the target's RAM owner
            # unreachable, a mapping gone) proves nothing; resuming would trust a
            # QEMU that loses dirty pages (7.2 under TCG). The source still holds
            # the VM: stay there.
            raise MigrationAborted(
                f"integrity check could not be completed: {result.integrity.detail}"
            )
    elif result.integrity.integrity is Integrity.UNCHECKED:
        result.integrity = IntegrityResult(Integrity.UNCHECKED, "RAM not mappable on both sides")
    if disks is not None and status == "paused":  # a running target writes its disks
        disk_integrity = await disks.verify()
        if disk_integrity.integrity is Integrity.FAILED:
            raise MigrationAborted(f"disk integrity check failed: {disk_integrity.detail}")
    journal.point_of_no_return()  # from here on, recovery makes the target the VM
    if status == "paused":
        await resume_target(result, target, hooks)
    result.resumed = True
    resume = await target_events.wait_for("RESUME", timeout=10.0)
    result.target_resume = resume.timestamp if resume else time.time()


async def _settle(task: asyncio.Task[IntegrityResult]) -> None:
    """Wait for ``task`` to end, whatever its outcome (shielded from cancellation)."""
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)
    if not task.done():
        with contextlib.suppress(BaseException):
            await task


async def resume_postcopy_target(
    result: Switchover,
    target: QmpSession,
    status: str,
    present: RamVerifier | None,
    hooks: MigrationHooks,
    repair: bool,
) -> None:
    """Resume a post-copy target that loaded the device state (its runstate ``status``).

    ``present`` compares the pages the target already holds with the stopped
    source (and repairs stale ones if ``repair``); the rest arrive on demand once
    it runs, so from here on there is no way back. Raises
    :class:`MigrationAborted` before ``cont`` if pages differ and may not be
    repaired.
    """
    if hooks.before_target_resume is not None:
        await hooks.before_target_resume()
    if present is not None:
        result.integrity = await present.compare(repair=repair)
        result.verified = time.time()
        if result.integrity.integrity is Integrity.FAILED:
            raise MigrationAborted(f"integrity check failed: {result.integrity.detail}")
    else:
        result.integrity = IntegrityResult(
            Integrity.UNCHECKED, "post-copy: RAM not mappable on both sides"
        )
    journal.point_of_no_return()  # from here on, recovery makes the target the VM
    if status == "paused":
        await resume_target(result, target, hooks)
    result.resumed = True
    result.target_resume = time.time()


#: How long ``cont`` may take before the engine asks the target what became of it (s).
CONT_TIMEOUT_S = 5.0
#: How long rollback waits for the source's migration to stop after migrate_cancel (s).
CANCEL_DEADLINE_S = 10.0
#: How long the target gets to answer ``quit`` (s).
QUIT_TIMEOUT_S = 5.0


class OutcomeUnknown(MigrationError):
    """``cont`` went to the target and what came of it cannot be told: the VM may run
    there. Nothing may resume the source now (``livemig recover`` decides later)."""


async def resume_target(result: Switchover, target: QmpSession, hooks: MigrationHooks) -> None:
    """Send ``cont`` to the paused target: the point of no return.

    ``hooks.point_of_no_return`` runs first (a journal records it). If the reply
    does not come (lost, timed out, or this task is cancelled meanwhile), the
    target is asked for its run state: running means the VM is there
    (``result.resumed``; a lost reply alone is then no error); any other answer
    means ``cont`` did not take and the error goes on (rollback may quit the
    target); no answer sets ``result.unknown`` and raises :class:`OutcomeUnknown`.
    """
    if hooks.point_of_no_return is not None:
        hooks.point_of_no_return()
    result.cont_sent = True
    try:
        await target.execute("cont", timeout=min(target.timeout_s, CONT_TIMEOUT_S))
    except BaseException as exc:
        state = await asyncio.shield(_runstate(target))
        if state == "running":
            result.resumed = True
            if isinstance(exc, QemuError):
                return  # the reply was lost, the VM runs on the target
            raise
        if state is None:
            result.unknown = (
                f"`cont` was sent to the target and its outcome is unknown ({exc or type(exc).__name__}); "
                "the target does not answer, so the source stays stopped"
            )
            raise OutcomeUnknown(result.unknown) from exc
        raise
    result.resumed = True


async def _runstate(session: QmpSession) -> str | None:
    """The run state, or None when the session cannot tell (dead, silent, cut)."""
    try:
        return await session.status(timeout=min(session.timeout_s, CONT_TIMEOUT_S))
    except QemuError:
        return None


async def snapshot_settings(session: QmpSession) -> MigrationSettings:
    """Read ``session``'s migration capabilities and parameters (to restore them later)."""
    caps = await session.execute("query-migrate-capabilities")
    params = await session.execute("query-migrate-parameters")
    if not isinstance(caps, list) or not isinstance(params, dict):
        raise QemuError("unexpected answer to query-migrate-capabilities/-parameters")
    return MigrationSettings(
        {str(c["capability"]): bool(c["state"]) for c in caps if isinstance(c, dict)},
        dict(params),
    )


async def restore_settings(session: QmpSession, snapshot: MigrationSettings) -> list[str]:
    """Put back whatever differs from ``snapshot``; notes of what was done or failed."""
    notes: list[str] = []
    try:
        now = await snapshot_settings(session)
    except QemuError as exc:
        return [f"could not read the source's migration settings to restore them: {exc}"]
    caps = [
        {"capability": name, "state": state}
        for name, state in snapshot.capabilities.items()
        if name in now.capabilities and now.capabilities[name] != state
    ]
    params = {
        name: value
        for name, value in snapshot.parameters.items()
        if name in now.parameters
        and now.parameters[name] != value
        and name != "block-bitmap-mapping"
    }
    try:
        if caps:
            await session.execute("migrate-set-capabilities", {"capabilities": caps})
        if params:
            await session.execute("migrate-set-parameters", params)
        if caps or params:
            notes.append(
                f"restored the source's migration settings ({len(caps)} capabilities, "
                f"{len(params)} parameters)"
            )
    except QemuError as exc:
        notes.append(f"could not restore the source's migration settings: {exc}")
    return notes


@dataclass
class RollbackResult:
    """What rollback did (``notes``) and, when it could not prove one running copy,
    why it resumed nothing (``unknown``)."""

    notes: list[str]
    unknown: str | None = None
    lost: bool = False
    #: The target QEMU answered ``quit`` (or is proven gone): it will not run the VM
    #: nor write its images any more, though it may still be exiting.
    target_stopped: bool = False


async def rollback(
    source: QmpSession,
    target: QmpSession,
    was_running: bool,
    events: EventBus,
    settings: MigrationSettings | None = None,
    target_may_run: bool = False,
) -> RollbackResult:
    """Put the VM back on the source: cancel, stop the target, resume the source.

    The source is resumed only with proof that the target will not run the VM:
    its ``quit`` answered, or its QMP socket has nobody listening any more. Without
    that proof — or when ``target_may_run`` (``cont`` went out and its outcome is
    unknown) — nothing is resumed and ``unknown`` says why. Every step has a
    deadline; every failure is in the notes. ``settings`` are put back on the
    source first (what the migration changed must not stick to the next one).
    """
    notes: list[str] = []
    await _cancel_outgoing(source, notes)
    if settings is not None:
        notes += await restore_settings(source, settings)
    if target_may_run:
        unknown = "the target may be running the VM (`cont` sent, outcome unknown)"
        return _finish(RollbackResult(notes, await _describe_unknown(source, target, unknown)),
                       events)  # fmt: skip
    if await _runstate(source) is None and await source.gone():
        # No source to go back to. A target that loaded everything holds the VM.
        if await _runstate(target) == "paused":
            why = "the source QEMU is gone; the target holds a complete copy, paused"
            return _finish(RollbackResult(notes, await _describe_unknown(source, target, why)),
                           events)  # fmt: skip
        await _stop_target(target, notes)
        notes.append("the source QEMU is gone: the VM is lost")
        return _finish(RollbackResult(notes, lost=True), events)
    target_dead = await _stop_target(target, notes)
    if not was_running:
        return _finish(RollbackResult(notes, target_stopped=target_dead), events)
    source_state = await _runstate(source)
    if source_state == "running":
        notes.append("the VM kept running on the source")
        return _finish(RollbackResult(notes, target_stopped=target_dead), events)
    if not target_dead:
        why = "the target could not be stopped or proven gone and the source is stopped"
        return _finish(RollbackResult(notes, await _describe_unknown(source, target, why)), events)
    try:
        await source.execute("cont")
        notes.append("resumed the VM on the source")
        # The target may have announced the guest's MAC already: point the
        # switches back at the source.
        await source.execute("announce-self", ANNOUNCE_NOW)
    except QemuError as exc:
        notes.append(f"could not resume the source: {exc}")
        return _finish(
            RollbackResult(
                notes, f"could not resume the source: {exc}", target_stopped=target_dead
            ),
            events,
        )
    return _finish(RollbackResult(notes, target_stopped=target_dead), events)


def _finish(result: RollbackResult, events: EventBus) -> RollbackResult:
    for note in result.notes:
        events.notice(note)
    if result.unknown is not None:
        events.notice(f"outcome unknown: {result.unknown}")
    return result


async def _cancel_outgoing(source: QmpSession, notes: list[str]) -> None:
    """migrate_cancel if the source migrates (or cannot say), then wait for it to stop."""
    try:
        info = await source.execute("query-migrate")
        status = str(info.get("status")) if isinstance(info, dict) else "unknown"
    except QemuError as exc:
        notes.append(f"query-migrate on the source failed: {exc}")
        status = "unknown"
    if status not in ACTIVE_STATUSES - {"cancelling"} and status != "unknown":
        return
    try:
        await source.execute("migrate_cancel")
        notes.append("cancelled the outgoing migration")
    except QemuError as exc:
        notes.append(f"migrate_cancel failed on the source: {exc}")
        return  # nothing to wait for
    deadline = time.monotonic() + CANCEL_DEADLINE_S
    while True:
        try:
            info = await source.execute("query-migrate")
        except QemuError as exc:
            notes.append(f"could not see the source's migration stop: {exc}")
            return
        if not isinstance(info, dict) or info.get("status") not in ACTIVE_STATUSES:
            return
        if time.monotonic() > deadline:
            notes.append(
                f"the source's migration did not stop within {CANCEL_DEADLINE_S:g} s "
                f"(status {info.get('status')})"
            )
            return
        await asyncio.sleep(0.05)


async def _stop_target(target: QmpSession, notes: list[str]) -> bool:
    """Quit the target; whether it is proven gone (answered, nothing listens, or —
    a silent QEMU on this host, never resumed — its process killed and gone)."""
    try:
        await target.execute("quit", timeout=min(target.timeout_s, QUIT_TIMEOUT_S))
        notes.append("stopped the target QEMU")
        return True
    except QemuError as exc:
        gone = await target.gone()
        if gone:
            notes.append("target QEMU already gone")
            return True
        pid = target.peer_pid
        if pid is not None and await _kill_and_reap(pid):
            notes.append(
                f"killed the target QEMU (pid {pid}): it did not answer `quit` ({exc}) and "
                "had never been resumed"
            )
            return True
        notes.append(f"could not stop the target QEMU ({exc}); it may still hold the VM")
        return False


async def _kill_and_reap(pid: int, timeout: float = 5.0) -> bool:
    """SIGKILL ``pid`` (also when stopped) and wait until it is gone; whether it is."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_exited(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def _describe_unknown(source: QmpSession, target: QmpSession, why: str) -> str:
    src, tgt = await _runstate(source), await _runstate(target)
    return (
        f"{why}; neither copy was resumed (source: {src or 'no answer'}, target: "
        f"{tgt or 'no answer'}); check both QEMUs, then resume exactly one "
        "(`livemig recover` where a journal exists)"
    )

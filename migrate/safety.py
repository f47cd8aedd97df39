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
import time
from dataclasses import dataclass, field
from typing import Protocol

from migrate import journal
from migrate.errors import MigrationAborted, MigrationError, QemuError
from migrate.events import EventBus
from migrate.integrity import IntegrityResult
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.report import Integrity
from migrate.request import MigrationHooks

ACTIVE_STATUSES = frozenset(
    {"setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
     "postcopy-recover", "wait-unplug", "cancelling"}
)  # fmt: skip
ANNOUNCE_NOW = {"initial": 0, "max": 100, "rounds": 3, "step": 50}


class RamVerifier(Protocol):
    """Compares the stopped source's RAM with the paused target's (e.g. RamComparison)."""

    async def compare(self, repair: bool = False) -> IntegrityResult: ...


@dataclass
class Switchover:
    """Timestamps and results of the switchover tail."""

    target_completed: float | None = None
    verified: float | None = None
    target_resume: float | None = None
    resumed: bool = False
    integrity: IntegrityResult = field(
        default_factory=lambda: IntegrityResult(Integrity.UNCHECKED, "not compared")
    )


async def finish_on_target(
    result: Switchover,
    target: QmpSession,
    target_events: EventRecorder,
    comparison: RamVerifier | None,
    hooks: MigrationHooks,
    repair: bool,
    timeout: float = 30.0,
) -> None:
    """Wait for the target to load the VM, verify its RAM, then resume it.

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
    if hooks.before_target_resume is not None:
        await hooks.before_target_resume()
    status = await target.status()
    if status == "running":
        result.integrity = IntegrityResult(
            Integrity.UNCHECKED, "target resumed on its own (not started with -S): RAM not compared"
        )
    elif comparison is not None:
        result.integrity = await comparison.compare(repair=repair)
        result.verified = time.time()
        if result.integrity.integrity is Integrity.FAILED:
            raise MigrationAborted(f"integrity check failed: {result.integrity.detail}")
    elif result.integrity.integrity is Integrity.UNCHECKED:
        result.integrity = IntegrityResult(Integrity.UNCHECKED, "RAM not mappable on both sides")
    journal.point_of_no_return()  # from here on, recovery makes the target the VM
    if status == "paused":
        await target.execute("cont")
    result.resumed = True
    resume = await target_events.wait_for("RESUME", timeout=10.0)
    result.target_resume = resume.timestamp if resume else time.time()


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
        await target.execute("cont")
    result.resumed = True
    result.target_resume = time.time()


async def rollback(
    source: QmpSession, target: QmpSession, was_running: bool, events: EventBus
) -> list[str]:
    """Put the VM back on the source: cancel, stop the target, resume the source.

    ``was_running``: the VM ran on the source when the migration began. Best
    effort at every step (each step's failure is recorded, the next still runs);
    returns what was done, for the report.
    """
    notes: list[str] = []
    with contextlib.suppress(QemuError):
        info = await source.execute("query-migrate")
        if info.get("status") in ACTIVE_STATUSES - {"cancelling"}:
            await source.execute("migrate_cancel")
            notes.append("cancelled the outgoing migration")
        deadline = time.monotonic() + 10
        while (await source.execute("query-migrate")).get("status") in ACTIVE_STATUSES:
            if time.monotonic() > deadline:
                notes.append("source migration did not stop within 10 s")
                break
            await asyncio.sleep(0.05)
    # Stop the target before the source runs again: never two running copies.
    try:
        await asyncio.wait_for(target.execute("quit"), 5)
        notes.append("stopped the target QEMU")
    except (QemuError, TimeoutError):
        notes.append("target QEMU already gone")
    if was_running:
        try:
            if await source.status() != "running":
                await source.execute("cont")
                notes.append("resumed the VM on the source")
            # The target may have announced the guest's MAC already: point the
            # switches back at the source.
            await source.execute("announce-self", ANNOUNCE_NOW)
        except QemuError as exc:
            notes.append(f"could not resume the source: {exc}")
            events.notice(f"could not resume the source: {exc}")
    for note in notes:
        events.notice(note)
    return notes

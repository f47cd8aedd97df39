"""Migration events: what strategies report while they run.

Strategies only emit; the CLI, the Python API (:class:`migrate.api.Migration`) and
the agent subscribe. Every event the bus hands out is stamped with the migration's
id and a sequence number (1, 2, 3... in emission order), and the stream always ends
with :class:`Finished`, carrying the report.

Two ways to listen: a synchronous callback (:meth:`EventBus.add_callback`, called
in the emitting task, must not block) or a typed async stream
(:meth:`EventBus.subscribe`, which replays what was emitted before it subscribed).
A subscriber cannot break a migration: a callback that raises is logged and the
migration goes on; a slow async subscriber only grows its own queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from migrate.phase import Phase
from migrate.report import Decision, MigrationReport, Predicted, Sample

log = logging.getLogger(__name__)

#: Version of the event stream's JSON form (docs/schema/events.json).
EVENT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PhaseChanged:
    time: float
    previous: Phase
    phase: Phase
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class Progress:
    sample: Sample
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class DecisionMade:
    decision: Decision
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class Notice:
    time: float
    message: str
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class Planned:
    """The forecast made before the start (before any other migration event)."""

    time: float
    predicted: Predicted
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class DiskCopy:
    """One disk's copy: bytes copied so far (re-copies of dirtied blocks included),
    the job's current total, and whether it is READY (the first full copy done)."""

    name: str
    copied_bytes: int
    total_bytes: int
    ready: bool


@dataclass(frozen=True)
class DiskProgress:
    """Where the disk copies stand (``--with-local-disks``); ``elapsed_ms`` since the start."""

    time: float
    elapsed_ms: float
    disks: tuple[DiskCopy, ...]
    seq: int = 0
    migration_id: str = ""


@dataclass(frozen=True)
class Finished:
    """The last event of a migration, whatever its outcome (also on cancellation)."""

    report: MigrationReport
    seq: int = 0
    migration_id: str = ""


MigrationEvent = Planned | PhaseChanged | Progress | DiskProgress | DecisionMade | Notice | Finished

#: The ``event`` field of each kind's JSON record.
EVENT_KINDS: dict[type, str] = {
    Planned: "planned",
    PhaseChanged: "phase",
    Progress: "progress",
    DiskProgress: "disk-progress",
    DecisionMade: "decision",
    Notice: "notice",
    Finished: "finished",
}


def event_time(event: MigrationEvent) -> float:
    """When ``event`` happened (realtime seconds)."""
    if isinstance(event, Progress):
        return event.sample.time
    if isinstance(event, DecisionMade):
        return event.decision.time
    if isinstance(event, Finished):
        return event.report.timeline.started_at + event.report.timeline.ended_ms / 1e3
    return event.time


class EventBus:
    """Fans one migration's events out to callbacks and async subscribers.

    ``migration_id`` stamps every event (and may be set later with :meth:`bind`,
    before the first event). After :meth:`close` further events are dropped.
    """

    def __init__(self, migration_id: str = "") -> None:
        self.migration_id = migration_id
        self._callbacks: list[Callable[[MigrationEvent], None]] = []
        self._queues: list[asyncio.Queue[MigrationEvent | None]] = []
        self._history: list[MigrationEvent] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def history(self) -> tuple[MigrationEvent, ...]:
        """Every event emitted so far, stamped, in order."""
        return tuple(self._history)

    def bind(self, migration_id: str) -> None:
        """Set the migration id events are stamped with (before the first event)."""
        if self._history and migration_id != self.migration_id:
            raise RuntimeError("the event bus already stamped events with another id")
        self.migration_id = migration_id

    def add_callback(self, callback: Callable[[MigrationEvent], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, event: MigrationEvent) -> None:
        """Stamp ``event`` and hand it to every listener (dropped after :meth:`close`)."""
        if self._closed:
            log.debug("event after close dropped: %r", event)
            return
        stamped = dataclasses.replace(
            event, seq=len(self._history) + 1, migration_id=self.migration_id
        )
        self._history.append(stamped)
        for callback in tuple(self._callbacks):
            try:
                callback(stamped)
            except Exception:  # a subscriber must never break a migration
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)
        for queue in self._queues:
            queue.put_nowait(stamped)

    def notice(self, message: str) -> None:
        self.emit(Notice(time.time(), message))

    async def subscribe(self, replay: bool = True) -> AsyncIterator[MigrationEvent]:
        """Events until :meth:`close` (with ``replay``, those emitted before, first)."""
        queue: asyncio.Queue[MigrationEvent | None] = asyncio.Queue()
        if replay:
            for past in self._history:
                queue.put_nowait(past)
        if self._closed:
            queue.put_nowait(None)
        else:
            self._queues.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if queue in self._queues:
                self._queues.remove(queue)

    def close(self) -> None:
        """End every subscription (after the events already queued). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(None)

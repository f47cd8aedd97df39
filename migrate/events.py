"""Migration events: what strategies report while they run.

Strategies only emit; the CLI, the Python API and (later) the agent subscribe. Two
ways to listen: a synchronous callback (:meth:`EventBus.add_callback`, called in the
emitting task, must not block) or a typed async stream (:meth:`EventBus.subscribe`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from migrate.phase import Phase
from migrate.report import Decision, MigrationReport, Predicted, Sample


@dataclass(frozen=True)
class PhaseChanged:
    time: float
    previous: Phase
    phase: Phase


@dataclass(frozen=True)
class Progress:
    sample: Sample


@dataclass(frozen=True)
class DecisionMade:
    decision: Decision


@dataclass(frozen=True)
class Notice:
    time: float
    message: str


@dataclass(frozen=True)
class Planned:
    """The forecast made before the start (before any other migration event)."""

    time: float
    predicted: Predicted


@dataclass(frozen=True)
class Finished:
    """The last event of a migration, whatever its outcome (also on cancellation)."""

    report: MigrationReport


MigrationEvent = Planned | PhaseChanged | Progress | DecisionMade | Notice | Finished


class EventBus:
    """Fans migration events out to callbacks and async subscribers."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[MigrationEvent], None]] = []
        self._queues: list[asyncio.Queue[MigrationEvent | None]] = []
        self._closed = False

    def add_callback(self, callback: Callable[[MigrationEvent], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, event: MigrationEvent) -> None:
        for callback in self._callbacks:
            callback(event)
        for queue in self._queues:
            queue.put_nowait(event)

    def notice(self, message: str) -> None:
        self.emit(Notice(time.time(), message))

    async def subscribe(self) -> AsyncIterator[MigrationEvent]:
        """Events from now until :meth:`close`."""
        queue: asyncio.Queue[MigrationEvent | None] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._queues.remove(queue)

    def close(self) -> None:
        """End every subscription (after the events already queued)."""
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(None)

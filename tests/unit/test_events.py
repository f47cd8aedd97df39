"""The event bus: stamping, replay, closing, and subscribers that cannot break it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from migrate.events import EventBus, Finished, MigrationEvent, Notice
from tests.unit.test_report import _report


def test_events_are_stamped_in_order() -> None:
    bus = EventBus("id-1")
    seen: list[MigrationEvent] = []
    bus.add_callback(seen.append)
    for i in range(3):
        bus.notice(f"n{i}")
    assert [(e.seq, e.migration_id) for e in seen] == [(1, "id-1"), (2, "id-1"), (3, "id-1")]
    assert bus.history == tuple(seen)


def test_a_raising_subscriber_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    seen: list[MigrationEvent] = []

    def broken(event: MigrationEvent) -> None:
        raise RuntimeError("subscriber bug")

    bus.add_callback(broken)
    bus.add_callback(seen.append)
    with caplog.at_level(logging.ERROR, logger="migrate.events"):
        bus.notice("still here")
    assert len(seen) == 1
    assert "subscriber" in caplog.text and "subscriber bug" in caplog.text


def test_subscribe_replays_history_and_ends_at_close() -> None:
    async def scenario() -> list[str]:
        bus = EventBus("x")
        bus.notice("before")
        got: list[str] = []

        async def consume() -> None:
            async for event in bus.subscribe():
                got.append(event.message if isinstance(event, Notice) else "finished")

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        bus.notice("after")
        bus.emit(Finished(_report()))
        bus.close()
        bus.notice("dropped")
        await asyncio.wait_for(task, 1)
        # a late subscriber of a closed bus gets the whole history, then the end
        late = [e.seq async for e in bus.subscribe()]
        assert late == [1, 2, 3]
        return got

    assert asyncio.run(scenario()) == ["before", "after", "finished"]


def test_bind_refuses_a_second_id_after_events() -> None:
    bus = EventBus()
    bus.bind("a")
    bus.notice("x")
    bus.bind("a")
    with pytest.raises(RuntimeError):
        bus.bind("b")

"""migrate.deadline.within: a bounded await that never swallows a cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migrate.deadline import within


async def _answer(reply: asyncio.Future[int]) -> int:
    return await reply


def test_a_cancel_that_arrives_with_the_answer_is_not_lost() -> None:
    """Python 3.11's wait_for returns the answer here and the caller carries on."""

    async def scenario() -> str:
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def caller() -> str:
            await within(_answer(reply), 5.0)
            return "carried on after the cancel"

        task = asyncio.create_task(caller())
        await asyncio.sleep(0.01)
        reply.set_result(1)  # the answer comes in...
        task.cancel()  # ...in the same loop iteration as the operator's cancel
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario()) == "cancelled"


def test_the_time_limit_raises_timeout_and_cancels_the_awaited_task() -> None:
    async def scenario() -> bool:
        never = asyncio.create_task(asyncio.sleep(60))
        with pytest.raises(TimeoutError):
            await within(never, 0.05)
        await asyncio.sleep(0)
        return never.cancelled()

    assert asyncio.run(scenario()) is True


def test_the_answer_within_the_limit_is_returned() -> None:
    async def scenario() -> int:
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, reply.set_result, 7)
        return await within(_answer(reply), 5.0) + await within(asyncio.sleep(0, 1), None)

    assert asyncio.run(scenario()) == 8


def test_no_module_bounds_an_await_with_wait_for() -> None:
    """The engine, the lab and the bench use ``within`` (cpumodel, which may not import
    the engine, uses ``asyncio.timeout`` directly)."""
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for package in ("migrate", "dirtytrack", "cpumodel", "lab", "bench")
        for path in sorted((root / package).rglob("*.py"))
        if "asyncio.wait_for(" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []

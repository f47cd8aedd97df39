"""Bounded awaits that never swallow a cancellation.

Python 3.11's :func:`asyncio.wait_for` returns the awaited result when a
cancellation arrives in the same loop iteration as that result (gh-86296, fixed by
3.12's rewrite on top of :func:`asyncio.timeout`): a migration cancelled just as a
QMP answer came in carried on as if nothing had been asked — with QEMU's default
policy, which never gives up, until the end of time (seen in CI). :func:`within`
is ``wait_for`` on :func:`asyncio.timeout`, which tells its own deadline from a
cancellation by somebody else. Everything in livemig that bounds an await uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """Await ``awaitable`` for at most ``seconds`` (None: no bound).

    Raises :class:`TimeoutError` when the time is up (the awaitable, a task
    included, is cancelled), and lets a cancellation of the caller through.
    """
    async with asyncio.timeout(seconds):
        return await awaitable

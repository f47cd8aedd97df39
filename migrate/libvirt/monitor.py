"""QEMU's own events as libvirt relays them, with QEMU's timestamps.

``libvirt_qemu.qemuMonitorEventRegister`` hands every QMP event of a daemon's
domains (STOP, RESUME, MIGRATION status...) to a callback in libvirt's event-loop
thread, with the time QEMU stamped on it: the same clock the native strategy's
timeline uses. :class:`MonitorLog` keeps them per side and wakes asyncio waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migrate.deadline import within
from migrate.libvirt.conn import require_libvirt


@dataclass(frozen=True)
class MonitorEvent:
    """One QMP event: its side (``source``/``target``), name, QEMU's time, data."""

    side: str
    name: str
    timestamp: float
    data: dict[str, Any] = field(default_factory=dict)
    domain_uuid: str = ""


class MonitorLog:
    """Collects QEMU events from both daemons; a context manager per registration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self.events: list[MonitorEvent] = []
        self._changed = asyncio.Event()
        self._registrations: list[tuple[Any, int]] = []

    def register(self, conn: Any, side: str, domain_uuid: Callable[[], str | None]) -> None:
        """Listen to ``conn``'s QEMU events for the domain whose UUID ``domain_uuid()``
        gives (read at each event: the target's domain exists only once it is prepared)."""
        import libvirt_qemu

        require_libvirt()

        def on_event(
            _conn: Any, dom: Any, name: str, secs: int, micros: int, details: Any, _o: Any
        ) -> None:
            uuid = dom.UUIDString() if dom is not None else ""
            wanted = domain_uuid()
            if wanted is not None and uuid != wanted:
                return
            data: dict[str, Any] = {}
            if details:
                with contextlib.suppress(ValueError, TypeError):
                    parsed = json.loads(details)
                    data = parsed if isinstance(parsed, dict) else {}
            event = MonitorEvent(side, name, secs + micros / 1e6, data, uuid)
            with self._lock:
                self.events.append(event)
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._changed.set)

        callback_id = libvirt_qemu.qemuMonitorEventRegister(conn, None, None, on_event, None, 0)
        self._registrations.append((conn, callback_id))

    def close(self) -> None:
        import libvirt_qemu

        lv = require_libvirt()
        for conn, callback_id in self._registrations:
            with contextlib.suppress(lv.libvirtError):
                libvirt_qemu.qemuMonitorEventDeregister(conn, callback_id)
        self._registrations.clear()

    def find(
        self, side: str, name: str, status: str | None = None, since: float = 0.0
    ) -> MonitorEvent | None:
        """The first ``name`` event of ``side`` (with MIGRATION ``status``) at/after ``since``."""
        with self._lock:
            for event in self.events:
                if event.side != side or event.name != name or event.timestamp < since:
                    continue
                if status is None or event.data.get("status") == status:
                    return event
        return None

    def last_status(self, side: str) -> str | None:
        """The latest MIGRATION status ``side``'s QEMU reported."""
        with self._lock:
            for event in reversed(self.events):
                if event.side == side and event.name == "MIGRATION":
                    status = event.data.get("status")
                    return str(status) if status is not None else None
        return None

    async def wait(self, timeout: float) -> None:
        """Until a new event arrives or ``timeout`` s pass."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await within(self._changed.wait(), timeout)

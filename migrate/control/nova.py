"""OpenStack Nova's libvirt driver schedule (``nova/virt/libvirt``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from migrate.control.base import (
    GIB,
    UNLIMITED_BANDWIDTH,
    ControlContext,
    abort,
    decide,
)
from migrate.control.intents import CapBandwidth, SetDowntimeLimit
from migrate.policy import Policy
from migrate.report import Decision, Sample


def nova_downtime_steps(data_gb: float, downtime_ms: int = 500, steps: int = 10,
                        delay_s: int = 75) -> list[tuple[int, int]]:  # fmt: skip
    """Nova's ``downtime_steps`` (nova/virt/libvirt/migration.py): (after s, limit ms).

    Linear from ``downtime/steps`` to ``downtime`` in ``steps`` steps, one every
    ``delay_s * data_gb`` seconds (``live_migration_downtime``, ``_steps``,
    ``_delay`` defaults 500 ms, 10, 75 s/GiB).
    """
    delay = int(delay_s * data_gb)
    base = downtime_ms / steps
    offset = (downtime_ms - base) / steps
    return [(int(delay * i), int(base + offset * i)) for i in range(steps + 1)]


def nova_data_gb(ram_bytes: int, disk_bytes: Sequence[int] = ()) -> float:
    """Nova's ``_live_migration_data_gb`` (nova/virt/libvirt/driver.py): RAM, at least 2
    GiB, plus each migrated disk, each at least 2 GiB."""
    ram_gb = max(ram_bytes / GIB, 2.0)
    return ram_gb + sum(max(size / GIB, 2.0) for size in disk_bytes)


class NovaController:
    """OpenStack Nova's libvirt driver, ``_live_migration_monitor`` with its defaults.

    Polls every 0.5 s; on each poll ``update_downtime`` applies the last of
    :func:`nova_downtime_steps` whose time has passed (50 ms at once, 95 ms after
    75 s/GiB, ... 500 ms), and past ``live_migration_completion_timeout`` (800 s per
    GiB of :func:`nova_data_gb`) the ``abort`` timeout action cancels the migration.
    No capabilities (auto-converge and post-copy are off by default); libvirt's
    default bandwidth is unlimited. Before the first poll QEMU's 300 ms applies.
    """

    poll_ms = 500.0

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._steps: list[tuple[int, int]] = []
        self._timeout_s = 0.0
        self._current: int | None = None
        self._next_poll_ms = 0.0

    def start(self, context: ControlContext) -> list[Decision]:
        data_gb = nova_data_gb(context.ram_bytes)
        self._steps = nova_downtime_steps(data_gb)
        self._timeout_s = 800 * data_gb
        bandwidth = self.policy.max_bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH
        return [
            decide(
                time.time(),
                "nova: libvirt's default bandwidth (unlimited); downtime steps "
                + ", ".join(f"{ms} ms@{s} s" for s, ms in self._steps)
                + f"; completion timeout {self._timeout_s:.0f} s (800 s/GiB of {data_gb:g} GiB)",
                CapBandwidth(bandwidth),
            )
        ]

    @property
    def next_poll_ms(self) -> float:
        """When the peer polls next (ms after ``migrate``; see ``PeerPollLoop``)."""
        return self._next_poll_ms

    def on_sample(self, sample: Sample) -> list[Decision]:
        if sample.elapsed_ms < self._next_poll_ms:
            return []
        # Nova's monitor sleeps 0.5 s after every look, whatever it found.
        self._next_poll_ms = sample.elapsed_ms + self.poll_ms
        if sample.status not in ("active", "setup"):
            return []
        elapsed_s = sample.elapsed_ms / 1e3
        if self._timeout_s and elapsed_s > self._timeout_s:
            return [
                abort(
                    sample.time,
                    f"nova: live migration not completed after {self._timeout_s:.0f} s "
                    "(live_migration_completion_timeout, action abort)",
                )
            ]
        current = None
        for after_s, limit_ms in self._steps:
            if elapsed_s > after_s:
                current = (after_s, limit_ms)
        if current is None or current[1] == self._current:
            return []
        self._current = current[1]
        return [
            decide(
                sample.time,
                f"nova: increasing downtime to {current[1]} ms after {current[0]} s elapsed",
                SetDowntimeLimit(current[1]),
            )
        ]

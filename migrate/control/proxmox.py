"""Proxmox VE's live migration schedule (qemu-server ``PVE/QemuMigrate.pm``)."""

from __future__ import annotations

import time

from migrate.control.base import (
    GIB,
    MIB,
    QEMU_MAX_DOWNTIME_MS,
    ControlContext,
    decide,
    fmt_mib,
    round_powerof2,
)
from migrate.control.intents import CapBandwidth, SetDowntimeLimit, SetXbzrleCache
from migrate.policy import Policy
from migrate.report import Decision, Sample


class ProxmoxController:
    """Proxmox VE's live migration, from qemu-server ``PVE/QemuMigrate.pm`` ``phase2``.

    Before ``migrate``: capabilities ``auto-converge`` and ``xbzrle`` on
    (``PVE::QemuServer::set_migration_caps``; in the policy), ``max-bandwidth``
    16 GiB/s when no limit is configured ("always set migrate speed"),
    ``downtime-limit`` 100 ms (``migrate_downtime`` default 0.1 s) and
    ``xbzrle-cache-size`` = 10 % of the VM's memory rounded up to a power of two.
    Then it polls ``query-migrate`` every second (every 100 ms once the remaining
    bytes drop below the average transferred per poll); whenever the transferred
    counter moved and the remaining bytes rose or were 0, a counter goes up, and
    after more than 5 such polls the downtime limit doubles (counter reset). It
    never aborts on its own.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._downtime_ms = policy.downtime_limit_ms
        self._next_poll_ms = 1000.0
        self._sleep_ms = 1000.0
        self._polls = 0
        self._last_transferred = 0
        self._last_remaining: int | None = None
        self._counter = 0

    def start(self, context: ControlContext) -> list[Decision]:
        now = time.time()
        cache = round_powerof2(int(context.ram_bytes / 10))
        bandwidth = self.policy.max_bandwidth_bytes_per_s or 16 * GIB
        return [
            decide(
                now,
                f"proxmox: downtime {self._downtime_ms:.0f} ms, speed limit "
                f"{bandwidth / MIB:.0f} MiB/s, xbzrle cache 10% of RAM rounded up to a "
                f"power of two ({fmt_mib(cache)})",
                CapBandwidth(bandwidth),
                SetDowntimeLimit(int(self._downtime_ms)),
                SetXbzrleCache(cache),
            )
        ]

    @property
    def next_poll_ms(self) -> float:
        """When the peer polls next (ms after ``migrate``; see ``PeerPollLoop``)."""
        return self._next_poll_ms

    def on_sample(self, sample: Sample) -> list[Decision]:
        if sample.elapsed_ms < self._next_poll_ms:
            return []
        self._polls += 1
        average = self._last_transferred / self._polls if self._last_transferred else 0.0
        decisions: list[Decision] = []
        if sample.status == "setup":
            self._next_poll_ms = sample.elapsed_ms + 1000 + self._sleep_ms
            return []
        if sample.status == "active":
            transferred, remaining = sample.ram_transferred_bytes, sample.ram_remaining_bytes
            if transferred != self._last_transferred:
                if average and remaining < average:
                    self._sleep_ms = 100.0
                if (self._last_remaining and remaining > self._last_remaining) or remaining == 0:
                    self._counter += 1
                self._last_remaining = remaining
                if self._counter > 5:
                    self._counter = 0
                    self._downtime_ms *= 2
                    decisions.append(
                        decide(
                            sample.time,
                            "proxmox: remaining rose (or was 0) on more than 5 polls: "
                            f"auto-increased downtime to {self._downtime_ms:.0f} ms",
                            SetDowntimeLimit(int(min(self._downtime_ms, QEMU_MAX_DOWNTIME_MS))),
                        )
                    )
            self._last_transferred = transferred
        self._next_poll_ms = sample.elapsed_ms + self._sleep_ms
        return decisions

"""The controller that does not steer: the policy's settings once, then a time limit."""

from __future__ import annotations

import time

from migrate.control.base import UNLIMITED_BANDWIDTH, ControlContext, abort, decide
from migrate.control.intents import AnnounceEarly, CapBandwidth, Intent, SetDowntimeLimit
from migrate.policy import Policy
from migrate.report import Decision, Sample


class StaticController:
    """Applies the policy's initial settings and aborts past ``max_total_time_s``."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._context: ControlContext | None = None

    def start(self, context: ControlContext) -> list[Decision]:
        self._context = context
        now = time.time()
        limit = min(self.policy.downtime_limit_ms, self.policy.max_downtime_ms)
        intents: list[Intent] = [SetDowntimeLimit(int(limit))]
        if self.policy.max_bandwidth_bytes_per_s is not None:
            intents.append(
                CapBandwidth(self.policy.max_bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH)
            )
        decisions = [decide(now, f"policy {self.policy.name}: initial settings", *intents)]
        if self.policy.announce_initial_ms is not None:
            decisions.append(
                decide(
                    now,
                    "announce the guest's new location early after switchover",
                    AnnounceEarly(self.policy.announce_initial_ms),
                )
            )
        return decisions

    def on_sample(self, sample: Sample) -> list[Decision]:
        limit = self.policy.max_total_time_s
        if limit is not None and sample.elapsed_ms > limit * 1e3:
            return [
                abort(
                    sample.time,
                    f"total time {sample.elapsed_ms / 1e3:.1f} s exceeds the policy's {limit} s",
                )
            ]
        return []


class HandsOffController:
    """Sets nothing and steers nothing: the migration runs at its own defaults.

    What an operator gets who starts libvirt's (or QEMU's) migration and leaves it
    alone: no start settings, no changes while it runs, no abort.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def start(self, context: ControlContext) -> list[Decision]:
        del context
        return []

    def on_sample(self, sample: Sample) -> list[Decision]:
        del sample
        return []

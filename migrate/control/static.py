"""The controller that does not steer: the policy's settings once, then a time limit."""

from __future__ import annotations

import time

from migrate.control.base import UNLIMITED_BANDWIDTH, ControlContext
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
        params: dict[str, object] = {"downtime-limit": int(limit)}
        if self.policy.max_bandwidth_bytes_per_s is not None:
            bandwidth = self.policy.max_bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH
            params["max-bandwidth"] = bandwidth
        decisions = [
            Decision(
                time=now,
                action="set-parameters",
                reason=f"policy {self.policy.name}: initial settings",
                command="migrate-set-parameters",
                arguments=params,
            )
        ]
        if self.policy.announce_initial_ms is not None:
            decisions.append(
                Decision(
                    time=now,
                    action="set-parameters",
                    reason="announce the guest's new location early after switchover",
                    command="migrate-set-parameters",
                    arguments={"announce-initial": self.policy.announce_initial_ms},
                    side="target",
                )
            )
        return decisions

    def on_sample(self, sample: Sample) -> list[Decision]:
        limit = self.policy.max_total_time_s
        if limit is not None and sample.elapsed_ms > limit * 1e3:
            return [
                Decision(
                    time=sample.time,
                    action="abort",
                    reason=f"total time {sample.elapsed_ms / 1e3:.1f} s exceeds the policy's {limit} s",
                )
            ]
        return []

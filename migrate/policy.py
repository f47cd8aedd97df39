"""Operator limits for a migration (:class:`Policy`) and the controller interface.

A :class:`Controller` is pure logic: given the policy and live samples it returns
:class:`~migrate.report.Decision` objects; the strategy carries them out over QMP
and emits them as events. :class:`StaticController` applies the policy's settings
once and then only enforces the total-time limit. The adaptive ``livemig``
controller and the peer schedules live in :mod:`migrate.controller`; named policies
in :mod:`migrate.presets` (``controller_for`` picks the controller a policy names).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from migrate.report import Decision, Predicted, Sample

# QEMU 7.2 rejects max-bandwidth above SIZE_MAX / 1000 bytes/s; 1 TiB/s is "no cap".
UNLIMITED_BANDWIDTH = 1 << 40


@dataclass(frozen=True)
class Policy:
    """The operator's limits and the settings a migration starts with.

    ``downtime_limit_ms`` is the downtime-limit a migration starts with;
    ``max_downtime_ms`` the hard ceiling no controller decision may exceed (on 2
    TCG cores a 20 ms start gave 35-48 ms guest-visible gaps where QEMU's default
    300 ms gave 65-135 ms: a late stop leaves a large final set). ``None`` for
    ``max_bandwidth_bytes_per_s`` leaves QEMU's default cap (128 MiB/s), 0 means no
    cap, the default: like Proxmox and Nova, whose uncapped runs here took ~200 ms
    where the 128 MiB/s cap took ~800 ms, with the same guest-visible downtime
    (docs/bench/default, 256 MiB openssl guest, uncapped link).
    ``capabilities`` are QEMU migration capabilities set on both sides before start.
    ``max_total_time_s`` bounds the migration (abort past it, or switch to post-copy
    where allowed); ``max_throttle_pct`` is the most guest CPU auto-converge may take
    (0: never throttle); ``postcopy_allowed`` lets a controller switch to post-copy,
    after which the VM cannot go back to the source and its RAM cannot be compared
    before it resumes; ``compression_allowed`` lets a controller pick xbzrle or
    multifd+zstd before start when the plan says it pays. ``controller`` names the
    algorithm that steers: ``livemig`` (measures and decides), ``static``,
    ``proxmox``, ``nova`` or ``ovirt`` (the peers' fixed schedules).
    ``announce_initial_ms`` is the target's delay before its first self-announce
    (RARP), which is when the switch learns where the guest went (QEMU's default is
    50 ms after the incoming side completes; 0 announces at once, while the target
    is still paused, so traffic queues on the target's tap until it resumes).
    """

    name: str = "livemig"
    controller: str = "livemig"
    downtime_limit_ms: float = 20.0
    max_downtime_ms: float = 300.0
    max_total_time_s: float | None = None
    max_throttle_pct: int = 0
    postcopy_allowed: bool = False
    max_bandwidth_bytes_per_s: int | None = 0
    capabilities: tuple[tuple[str, bool], ...] = ()
    announce_initial_ms: int | None = 0
    compression_allowed: bool = True


@dataclass(frozen=True)
class ControlContext:
    """What a controller knows when the migration starts."""

    ram_bytes: int
    started_monotonic: float


class Controller(Protocol):
    """Decides migration settings; never talks to QEMU itself."""

    policy: Policy

    def start(self, context: ControlContext) -> list[Decision]:
        """Settings to apply before ``migrate`` is issued."""
        ...

    def on_sample(self, sample: Sample) -> list[Decision]:
        """Changes to make after a new observation (may include ``abort``)."""
        ...


@runtime_checkable
class PredictionAware(Protocol):
    """A controller that can use the forecast made before the start."""

    def use_prediction(self, predicted: Predicted) -> None:
        """Take the pre-start measurement and forecast into account (before ``start``)."""
        ...


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

"""oVirt's "Minimal downtime" migration policy as vdsm runs it."""

from __future__ import annotations

from collections.abc import Sequence

from migrate.control.base import ControlContext, abort, decide
from migrate.control.intents import SetDowntimeLimit
from migrate.control.static import StaticController
from migrate.policy import Policy
from migrate.report import Decision, Sample

#: oVirt's "Minimal downtime" migration policy (ovirt-engine's MigrationPolicies
#: default): initial downtime 100 ms, then (stalling limit, action) in order.
OVIRT_MINIMAL_DOWNTIME: tuple[tuple[int, int | None], ...] = (
    (1, 150), (2, 200), (3, 300), (4, 400), (6, 500), (-1, None),
)  # fmt: skip


class OvirtController:
    """oVirt's "Minimal downtime" policy as vdsm runs it (lib/vdsm/virt/migration.py).

    The engine sends the convergence schedule (initial ``setDowntime`` 100 ms;
    stalling limits 1→150, 2→200, 3→300, 4→400, 6→500 ms; last item ``abort``,
    limit -1) with auto-converge on and compression off. vdsm's ``MonitorThread``
    wakes every ``migration_monitor_interval`` (10 s); when libvirt's memory
    iteration (QEMU's ``dirty-sync-count``) grew since its last look, it counts
    iterations since its first look and runs the schedule's head action if its limit
    is below that count, one action per look.
    """

    poll_ms = 10_000.0

    def __init__(self, policy: Policy,
                 schedule: Sequence[tuple[int, int | None]] = OVIRT_MINIMAL_DOWNTIME) -> None:  # fmt: skip
        self.policy = policy
        self._schedule = list(schedule)
        self._next_poll_ms = self.poll_ms
        self._initial: int | None = None
        self._last: int | None = None

    def start(self, context: ControlContext) -> list[Decision]:
        static = StaticController(self.policy).start(context)
        return [Decision(d.time, f"ovirt: initial action: {d.reason}", d.intents) for d in static]

    @property
    def next_poll_ms(self) -> float:
        """When the peer polls next (ms after ``migrate``; see ``PeerPollLoop``)."""
        return self._next_poll_ms

    def on_sample(self, sample: Sample) -> list[Decision]:
        if sample.elapsed_ms < self._next_poll_ms:
            return []
        # vdsm's monitor keeps waking every interval, whatever it finds.
        self._next_poll_ms = sample.elapsed_ms + self.poll_ms
        if not self._schedule or sample.status not in ("active", "setup"):
            return []
        iteration = sample.dirty_sync_count
        if self._initial is None:
            self._initial = self._last = iteration
            return []
        assert self._last is not None
        if iteration <= self._last:
            return []
        self._last = iteration
        current = iteration - self._initial
        limit, downtime = self._schedule[0]
        if not limit < current:
            return []
        self._schedule.pop(0)
        if downtime is None:
            self._schedule.clear()
            return [abort(sample.time, f"ovirt: still stalling after {current} iterations: abort")]
        return [
            decide(
                sample.time,
                f"ovirt: stalling for {current} iterations (limit {limit}): downtime {downtime} ms",
                SetDowntimeLimit(downtime),
            )
        ]

"""Controllers: the adaptive ``livemig`` controller and the peers' fixed schedules.

Every controller is pure logic (see :class:`~migrate.policy.Controller`): it reads
samples and returns :class:`~migrate.report.Decision` objects with their reasons;
the strategy carries them out and emits each as an event.

:class:`LivemigController` measures and decides. Before the start it takes the
forecast (:class:`~migrate.report.Predicted`, made by :mod:`migrate.plan`) to pick
what can only be chosen then: compression (xbzrle or multifd+zstd, if the model
says it pays at the measured bandwidth), auto-converge (if the policy allows any
throttle), post-copy (if allowed). While pre-copy runs it estimates bandwidth from
the bytes sent between samples and the dirty rate from QEMU's per-round count,
records the remaining set at the start of every round, and when that set stops
shrinking (a stall) or the model says the time budget will not hold, it climbs a
ladder: raise ``downtime-limit`` to what the measured remaining set needs at the
measured bandwidth (never above the policy's hard maximum), throttle the guest (up
to the policy's maximum, watching whether the dirty rate really falls), switch to
post-copy (if allowed), and abort with the reason when nothing is left.

The peers reproduce what their projects do, at their own poll intervals:
:class:`ProxmoxController`, :class:`NovaController`, :class:`OvirtController`
(qemu-default is :class:`~migrate.policy.StaticController`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from dirtytrack.model import PrecopyScenario, min_downtime_limit, predict, required_throttle
from migrate.policy import UNLIMITED_BANDWIDTH, ControlContext, Policy, StaticController
from migrate.report import Decision, Forecast, Predicted, Sample

MIB = 1 << 20
GIB = 1 << 30

#: QEMU's largest downtime-limit (MAX_MIGRATE_DOWNTIME, migration/migration.c): 2000 s.
QEMU_MAX_DOWNTIME_MS = 2_000_000
#: QEMU's default max-bandwidth (MAX_THROTTLE, migration/migration.c): 128 MiB/s.
QEMU_DEFAULT_BANDWIDTH = 128 * MIB
#: Device state of the test guest (~600 KB measured with the pagestream prototype).
DEFAULT_DEVICE_STATE_BYTES = 600_000


def set_parameters(now: float, reason: str, side: str = "source", **params: object) -> Decision:
    """A ``migrate-set-parameters`` decision; parameter names with ``_`` become ``-``."""
    arguments = {name.replace("_", "-"): value for name, value in params.items()}
    return Decision(now, "set-parameters", reason, "migrate-set-parameters", arguments, side)


def set_capabilities(now: float, reason: str, capabilities: dict[str, bool]) -> Decision:
    """A ``migrate-set-capabilities`` decision for both sides (before ``migrate`` only)."""
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    return Decision(
        now, "set-capabilities", reason, "migrate-set-capabilities", {"capabilities": caps}, "both"
    )


def abort(now: float, reason: str) -> Decision:
    return Decision(now, "abort", reason)


def start_postcopy(now: float, reason: str) -> Decision:
    return Decision(now, "postcopy", reason, "migrate-start-postcopy")


def _mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


# -- peers ------------------------------------------------------------------------------


def round_powerof2(value: int) -> int:
    """Proxmox's ``round_powerof2`` (PVE/QemuMigrate.pm): the next power of two >= value.

    ``2 << int(log2(value - 1))``, and 1 below 2, as written there.
    """
    if value < 2:
        return 1
    return 2 << int(math.log(value - 1) / math.log(2))


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
            set_parameters(
                now,
                f"proxmox: downtime {self._downtime_ms:.0f} ms, speed limit "
                f"{bandwidth / MIB:.0f} MiB/s, xbzrle cache 10% of RAM rounded up to a "
                f"power of two ({_mib(cache)})",
                max_bandwidth=bandwidth,
                downtime_limit=int(self._downtime_ms),
                xbzrle_cache_size=cache,
            )
        ]

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
                        set_parameters(
                            sample.time,
                            "proxmox: remaining rose (or was 0) on more than 5 polls: "
                            f"auto-increased downtime to {self._downtime_ms:.0f} ms",
                            downtime_limit=int(min(self._downtime_ms, QEMU_MAX_DOWNTIME_MS)),
                        )
                    )
            self._last_transferred = transferred
        self._next_poll_ms = sample.elapsed_ms + self._sleep_ms
        return decisions


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
            set_parameters(
                time.time(),
                "nova: libvirt's default bandwidth (unlimited); downtime steps "
                + ", ".join(f"{ms} ms@{s} s" for s, ms in self._steps)
                + f"; completion timeout {self._timeout_s:.0f} s (800 s/GiB of {data_gb:g} GiB)",
                max_bandwidth=bandwidth,
            )
        ]

    def on_sample(self, sample: Sample) -> list[Decision]:
        if sample.elapsed_ms < self._next_poll_ms or sample.status not in ("active", "setup"):
            return []
        self._next_poll_ms = sample.elapsed_ms + self.poll_ms
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
            set_parameters(
                sample.time,
                f"nova: increasing downtime to {current[1]} ms after {current[0]} s elapsed",
                downtime_limit=current[1],
            )
        ]


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
        return [
            Decision(
                d.time,
                d.action,
                f"ovirt: initial action: {d.reason}",
                d.command,
                d.arguments,
                d.side,
            )
            for d in static
        ]

    def on_sample(self, sample: Sample) -> list[Decision]:
        if sample.elapsed_ms < self._next_poll_ms or not self._schedule:
            return []
        self._next_poll_ms = sample.elapsed_ms + self.poll_ms
        if sample.status not in ("active", "setup"):
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
            set_parameters(
                sample.time,
                f"ovirt: stalling for {current} iterations (limit {limit}): downtime {downtime} ms",
                downtime_limit=downtime,
            )
        ]


# -- livemig ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundStart:
    """The remaining set when a pre-copy round began (QEMU's dirty sync).

    ``dirty_rate_bytes_per_s`` is QEMU's ``dirty-pages-rate`` as of that sync:
    distinct pages dirtied during the previous round over its duration.
    """

    sync: int
    elapsed_ms: float
    remaining_bytes: int
    dirty_rate_bytes_per_s: float
    throttle_pct: int = 0


@dataclass(frozen=True)
class LiveEstimate:
    """The controller's current view, from live samples (bytes, bytes/s, ms).

    ``bandwidth_bytes_per_s`` is raw page bytes per second (what QEMU counts as
    transferred; with multifd+zstd that is before compression).
    """

    bandwidth_bytes_per_s: float | None
    dirty_rate_bytes_per_s: float | None
    working_set_bytes: int | None
    remaining_bytes: int
    eta_ms: float | None
    rounds: int


class BandwidthEstimator:
    """Transferred bytes per second over the last ``window_ms`` of active samples.

    A window of seconds, not single sample gaps, because multifd and tbf send in
    bursts: 100 ms slices of one steady stream were seen to vary by 4x here.
    """

    def __init__(self, window_ms: float = 2000.0, min_span_ms: float = 400.0) -> None:
        self.window_ms = window_ms
        self.min_span_ms = min_span_ms
        self._points: deque[tuple[float, int]] = deque()
        self._rate: float | None = None

    def add(self, sample: Sample) -> None:
        if sample.status != "active":
            self._points.clear()
            return
        self._points.append((sample.elapsed_ms, sample.ram_transferred_bytes))
        while self._points and self._points[0][0] < sample.elapsed_ms - self.window_ms:
            self._points.popleft()
        first, last = self._points[0], self._points[-1]
        span = last[0] - first[0]
        if span >= self.min_span_ms and last[1] > first[1]:
            self._rate = (last[1] - first[1]) / (span / 1e3)

    @property
    def bytes_per_s(self) -> float | None:
        """The latest estimate (kept across pauses), None before the first."""
        return self._rate


def remaining_time_ms(remaining: float, dirty_rate: float, bandwidth: float) -> float | None:
    """Time to send ``remaining`` bytes while the guest dirties ``dirty_rate``: R / (B - r).

    The geometric series of pre-copy rounds sums to that; ``None`` when the dirty
    rate reaches the bandwidth (no end in sight).
    """
    if bandwidth <= 0 or dirty_rate >= bandwidth:
        return None
    return remaining / (bandwidth - dirty_rate) * 1e3


class LivemigController:
    """Measures and decides; see the module docstring for the ladder it climbs.

    It judges at the start of every pre-copy round (QEMU's dirty sync), from the
    second on: a round whose starting set did not shrink by ``min_shrink`` (10 %)
    against the smallest earlier one counts as stalled. It acts when the model,
    fed the measured set, dirty rate and bandwidth, says pre-copy will not meet
    the current limit, when ``stall_rounds`` rounds stalled, or when the forecast
    end lies past the policy's time budget. Before any throttle has acted the dirty
    rate is the larger of QEMU's per-round figure and the pre-start measurement
    (QEMU counts distinct pages per round, which a small working set caps).
    ``headroom`` multiplies the downtime the measured set needs, so that QEMU's own
    short-window bandwidth estimate still lets it switch over.

    Throttle goes through QEMU's auto-converge, which applies a new level only at a
    dirty sync and at most every second one; so levels are chosen big: the model's
    linear estimate (plus a margin) first, then a quarter of the distance left to
    99 % each time the previous level, once applied for a whole round, did not
    make the set shrink. Guests do not all slow linearly with CPU time (the test
    guest's writer catches up on lost ticks), hence the feedback.
    """

    def __init__(
        self,
        policy: Policy,
        predicted: Predicted | None = None,
        *,
        stall_rounds: int = 2,
        min_shrink: float = 0.10,
        headroom: float = 1.3,
        device_state_bytes: int = DEFAULT_DEVICE_STATE_BYTES,
    ) -> None:
        self.policy = policy
        self.predicted = predicted
        self.stall_rounds = stall_rounds
        self.min_shrink = min_shrink
        self.headroom = headroom
        self.device_state_bytes = device_state_bytes
        self.bandwidth = BandwidthEstimator()
        self.rounds: list[RoundStart] = []
        self.limit_ms = min(policy.downtime_limit_ms, policy.max_downtime_ms)
        self.compression = "none"
        self.auto_converge = False
        self.postcopy_ready = False
        self.postcopy_started = False
        self.throttle_target = 0
        self.aborted = False
        self._stalled = 0
        self._wait_until_round = 0
        self._throttle_applied_round: int | None = None
        self._throttle_decided_round = 0
        self._last: Sample | None = None

    # -- before the start ------------------------------------------------------------

    def use_prediction(self, predicted: Predicted) -> None:
        self.predicted = predicted

    def start(self, context: ControlContext) -> list[Decision]:
        now = time.time()
        policy = self.policy
        decisions = StaticController(policy).start(context)
        caps: dict[str, bool] = {}
        reasons: list[str] = []
        params: dict[str, object] = {}
        choice = self._compression_choice()
        if choice is not None:
            method, why = choice
            self.compression = method
            reasons.append(why)
            if method == "xbzrle":
                caps["xbzrle"] = True
                params["xbzrle-cache-size"] = _xbzrle_cache(context.ram_bytes)
            else:
                caps["multifd"] = True
                # Both ends must agree on the channels and the compression.
                both = {"multifd-compression": "zstd", "multifd-channels": 2}
                decisions.append(
                    Decision(now, "set-parameters", why, "migrate-set-parameters", both, "both")
                )
        if policy.max_throttle_pct > 0:
            self.auto_converge = True
            caps["auto-converge"] = True
            # QEMU's own trigger may fire before this controller decides: until then
            # it may take no more than 1 %.
            params.update(
                {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}
            )
            reasons.append(
                f"auto-converge armed (up to {policy.max_throttle_pct}% when this controller "
                "decides, 1% until then)"
            )
        if policy.postcopy_allowed and self.compression != "zstd":
            self.postcopy_ready = True
            caps["postcopy-ram"] = True
            reasons.append("post-copy allowed by the policy: postcopy-ram on both sides")
        if caps:
            decisions.append(set_capabilities(now, "; ".join(reasons), caps))
        if params:
            reason = "; ".join(reasons)
            decisions.append(
                Decision(now, "set-parameters", reason, "migrate-set-parameters", params)
            )
        return decisions

    def _compression_choice(self) -> tuple[str, str] | None:
        """The compression of the plan's forecast for this policy, and why (None: none).

        :mod:`migrate.plan` picks that forecast among the settings the policy allows
        (and compression only on a known link), so controller and plan agree.
        """
        predicted = self.predicted
        if not self.policy.compression_allowed or predicted is None:
            return None
        chosen = predicted.policy_forecast
        if chosen is None or chosen.compression == "none":
            return None
        if chosen.compression == "zstd" and self.policy.postcopy_allowed and not chosen.converges:
            return None  # multifd would rule out the post-copy fallback (QEMU 7.2)
        plain = [
            f
            for f in predicted.forecasts
            if f.compression == "none" and not f.postcopy and not f.throttle_pct
            and f.downtime_limit_ms == chosen.downtime_limit_ms
        ]  # fmt: skip
        ratio = predicted.compression_ratios.get(chosen.compression, 1.0)

        def verdict(f: Forecast) -> str:
            return f"{f.total_time_ms / 1e3:.1f} s" + ("" if f.converges else " (no convergence)")

        against = f" against {verdict(plain[0])} without" if plain else ""
        return chosen.compression, (
            f"{chosen.compression} pays: ratio {ratio:.2f} at "
            f"{_mib(predicted.bandwidth_bytes_per_s)}/s ({predicted.bandwidth_source}), "
            f"forecast {verdict(chosen)}{against}"
        )

    # -- while it runs ---------------------------------------------------------------

    def estimate(self) -> LiveEstimate | None:
        """The current view (None before the first sample)."""
        last = self._last
        if last is None:
            return None
        bandwidth = self.bandwidth.bytes_per_s
        rate = self._dirty_rate()
        eta = None
        if bandwidth is not None and rate is not None:
            eta = remaining_time_ms(last.ram_remaining_bytes, rate, self._page_bandwidth(bandwidth))
        return LiveEstimate(
            bandwidth, rate, self._working_set(), last.ram_remaining_bytes, eta, len(self.rounds)
        )

    def on_sample(self, sample: Sample) -> list[Decision]:
        self.bandwidth.add(sample)
        self._last = sample
        if self.aborted or self.postcopy_started:
            return []
        limit_s = self.policy.max_total_time_s
        if limit_s is not None and sample.elapsed_ms > limit_s * 1e3:
            why = f"total time {sample.elapsed_ms / 1e3:.1f} s exceeds the policy's {limit_s:g} s"
            return self._last_resort(sample, why)
        if sample.status != "active":
            return []
        if (
            self.throttle_target
            and self._throttle_applied_round is None
            and sample.cpu_throttle_pct >= self.throttle_target
        ):
            self._throttle_applied_round = sample.dirty_sync_count
        if self.rounds and sample.dirty_sync_count <= self.rounds[-1].sync:
            return []
        self.rounds.append(
            RoundStart(
                sample.dirty_sync_count,
                sample.elapsed_ms,
                sample.ram_remaining_bytes,
                sample.dirty_rate_bytes_per_s,
                sample.cpu_throttle_pct,
            )
        )
        return self._judge(sample)

    def _working_set(self) -> int | None:
        sets = [r.remaining_bytes for r in self.rounds[1:]]
        return max(sets) if sets else None

    def _dirty_rate(self) -> float | None:
        live = [r.dirty_rate_bytes_per_s for r in self.rounds[1:] if r.dirty_rate_bytes_per_s]
        predicted = self.predicted.dirty_rate_bytes_per_s if self.predicted else None
        if self._throttle_applied_round is not None:
            return live[-1] if live else predicted
        candidates = [v for v in (live[-1] if live else None, predicted) if v is not None]
        return max(candidates) if candidates else None

    def _page_bandwidth(self, transferred_rate: float) -> float:
        # xbzrle's transferred bytes are encoded pages; multifd counts raw pages.
        if self.compression == "xbzrle" and self.predicted is not None:
            return transferred_rate * self.predicted.compression_ratios.get("xbzrle", 1.0)
        return transferred_rate

    def _judge(self, sample: Sample) -> list[Decision]:
        # rounds[0] is the bulk round; a dirty set to judge exists from the second on.
        if len(self.rounds) < 2:
            return []
        current = self.rounds[-1]
        earlier = [r.remaining_bytes for r in self.rounds[1:-1]]
        if earlier:
            shrunk = current.remaining_bytes <= (1 - self.min_shrink) * min(earlier)
            self._stalled = 0 if shrunk else self._stalled + 1
        transferred_rate = self.bandwidth.bytes_per_s
        rate = self._dirty_rate()
        if transferred_rate is None or rate is None or current.sync < self._wait_until_round:
            return []
        bandwidth = self._page_bandwidth(transferred_rate)
        scenario = self._scenario(current.remaining_bytes, rate, bandwidth, self.limit_ms)
        will_converge = predict(scenario).converges
        stalled = self._stalled >= self.stall_rounds
        over_budget = self._over_budget(sample, current.remaining_bytes, rate, bandwidth)
        if will_converge and not stalled and not over_budget:
            return []
        state = (
            f"has not shrunk for {self._stalled} rounds" if stalled
            else "will not end within the time budget" if over_budget
            else f"will not fit {self.limit_ms:.0f} ms"
        )  # fmt: skip
        why = (
            f"round {len(self.rounds)}: remaining {_mib(current.remaining_bytes)} {state} "
            f"(dirty rate {_mib(rate)}/s, bandwidth {_mib(bandwidth)}/s)"
        )
        return self._escalate(sample, current, rate, bandwidth, why)

    def _over_budget(self, sample: Sample, remaining: int, rate: float, bandwidth: float) -> bool:
        limit_s = self.policy.max_total_time_s
        if limit_s is None:
            return False
        eta = remaining_time_ms(remaining, rate, bandwidth)
        return eta is None or sample.elapsed_ms + eta > limit_s * 1e3

    def _scenario(self, remaining: int, rate: float, bandwidth: float,
                  limit_ms: float) -> PrecopyScenario:  # fmt: skip
        # QEMU's switchover rule counts RAM only: no device state here.
        working_set = max(self._working_set() or remaining, remaining, 1)
        return PrecopyScenario(
            ram_bytes=working_set,
            dirty_rate_bytes_per_s=rate,
            bandwidth_bytes_per_s=bandwidth,
            downtime_limit_s=limit_ms / 1e3,
            nonzero_ram_bytes=remaining,
            working_set_bytes=working_set,
            max_rounds=10,
        )

    def _escalate(self, sample: Sample, current: RoundStart, rate: float, bandwidth: float,
                  why: str) -> list[Decision]:  # fmt: skip
        policy = self.policy
        top = policy.max_downtime_ms
        scenario = self._scenario(current.remaining_bytes, rate, bandwidth, top)
        needed_ms = min_downtime_limit(scenario, within_rounds=3) * 1e3
        wanted_ms = needed_ms * self.headroom
        decisions: list[Decision] = []
        if self.limit_ms < top:
            # 1. A downtime limit the measured set fits (or the maximum, which at least
            # shortens what the last rounds must bring down).
            self.limit_ms = min(top, max(wanted_ms, self.limit_ms * 2))
            self._wait_until_round = current.sync + 1
            fits = needed_ms <= top
            decisions.append(
                set_parameters(
                    sample.time,
                    f"{why}: the smallest set the next rounds reach needs {needed_ms:.0f} ms "
                    + (
                        f"at the measured bandwidth; downtime-limit {self.limit_ms:.0f} ms"
                        if fits
                        else f"> policy maximum {top:g} ms; downtime-limit to {self.limit_ms:.0f} ms"
                    ),
                    downtime_limit=math.ceil(self.limit_ms),
                )
            )
            if fits:
                return decisions
        elif needed_ms <= top and not self._stalled:
            return []  # it fits the limit on paper: give QEMU the round
        # 2. Throttle, 3. post-copy, 4. abort.
        return decisions + self._throttle(sample, current, scenario, why)

    def _throttle(self, sample: Sample, current: RoundStart, scenario: PrecopyScenario,
                  why: str) -> list[Decision]:  # fmt: skip
        policy = self.policy
        ceiling = min(policy.max_throttle_pct, 99)
        if self.throttle_target:
            applied = self._throttle_applied_round
            if applied is None and current.sync - self._throttle_decided_round > 4:
                # QEMU's trigger (dirty > 50 % of sent, twice) never fired: go on.
                applied = self._throttle_applied_round = self._throttle_decided_round
            if applied is None or current.sync <= applied or not self._stalled:
                return []  # the last level has not acted for a whole round yet, or it works
        if not self.auto_converge or self.throttle_target >= ceiling:
            # Give up only on what was seen: a round that did not shrink.
            return self._last_resort(sample, why) if self._stalled else []
        if self.throttle_target == 0:
            needed = required_throttle(scenario)
            linear = 99 if needed is None else math.ceil(needed * 100)
            target = max(30, linear + 10)
            basis = (
                "the model needs more than any throttle gives" if needed is None
                else f"the linear model needs {linear}%"
            )  # fmt: skip
        else:
            target = math.ceil(100 - (100 - self.throttle_target) / 4)
            basis = f"{self.throttle_target}% did not make the set shrink"
        target = max(1, min(ceiling, target))
        previous = max(self.throttle_target, 1)
        self.throttle_target = target
        self._throttle_applied_round = None
        self._throttle_decided_round = current.sync
        return [
            set_parameters(
                sample.time,
                f"{why}: throttle the guest to {target}% ({basis}; policy maximum "
                f"{policy.max_throttle_pct}%); auto-converge applies it at a coming dirty sync",
                cpu_throttle_initial=target,
                cpu_throttle_increment=max(1, min(99, target - previous)),
                max_cpu_throttle=target,
            )
        ]

    def _last_resort(self, sample: Sample, why: str) -> list[Decision]:
        policy = self.policy
        if self.postcopy_ready and not self.postcopy_started:
            self.postcopy_started = True
            return [
                start_postcopy(
                    sample.time,
                    f"{why}: pre-copy cannot meet the policy's limits; switching to post-copy "
                    "(allowed by the policy)",
                )
            ]
        self.aborted = True
        levers = [f"downtime-limit at the maximum {policy.max_downtime_ms:g} ms"]
        levers.append(
            f"throttle at the maximum {self.throttle_target}%"
            if policy.max_throttle_pct
            else "no throttle allowed"
        )
        levers.append(
            "post-copy not allowed" if not policy.postcopy_allowed else "post-copy unavailable"
        )
        return [abort(sample.time, f"{why}; nothing left to try ({', '.join(levers)})")]


def _xbzrle_cache(ram_bytes: int) -> int:
    # QEMU wants a power of two no larger than the RAM; a quarter caps a hot set well.
    return round_powerof2(max(ram_bytes // 4, 1 << 20))

"""The adaptive ``livemig`` controller: it measures and decides.

Like every controller it is pure logic (see :class:`~migrate.control.base.Controller`):
it reads samples and returns :class:`~migrate.report.Decision` objects with their
reasons; the strategy carries them out and emits each as an event.

Before the start it takes the forecast (:class:`~migrate.report.Predicted`, made by
:mod:`migrate.plan`) to pick what can only be chosen then: compression (xbzrle or
multifd+zstd, if the model says it pays at the measured bandwidth), auto-converge
(if the policy allows any throttle), post-copy (if allowed). While pre-copy runs it
estimates bandwidth from the bytes sent between samples and the dirty rate from
QEMU's per-round count, records the remaining set at the start of every round, and
when that set stops shrinking (a stall) or the model says the time budget will not
hold, it climbs a ladder: raise ``downtime-limit`` to what the measured remaining
set needs at the measured bandwidth (never above the policy's hard maximum),
throttle the guest (up to the policy's maximum, watching whether the dirty rate
really falls), switch to post-copy (if allowed), and abort with the reason when
nothing is left.
"""

from __future__ import annotations

import math
import time

from dirtytrack.model import PrecopyScenario, min_downtime_limit, predict, required_throttle
from migrate.control.base import (
    DEFAULT_DEVICE_STATE_BYTES,
    ControlContext,
    abort,
    decide,
    fmt_mib,
    round_powerof2,
    start_postcopy,
)
from migrate.control.estimate import (
    BandwidthEstimator,
    LiveEstimate,
    RoundStart,
    remaining_time_ms,
)
from migrate.control.intents import (
    ArmAutoConverge,
    ArmPostcopy,
    Compress,
    Intent,
    SetDowntimeLimit,
    SetMultifd,
    SetXbzrleCache,
    Throttle,
)
from migrate.control.static import StaticController
from migrate.policy import Policy
from migrate.report import Decision, Forecast, Predicted, Sample


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
        caps: list[Intent] = []
        reasons: list[str] = []
        params: list[Intent] = []
        choice = self._compression_choice()
        if choice is not None:
            method, why = choice
            self.compression = method
            reasons.append(why)
            if method == "xbzrle":
                caps.append(Compress("xbzrle"))
                params.append(SetXbzrleCache(_xbzrle_cache(context.ram_bytes)))
            else:
                caps.append(Compress("multifd"))
                # Both ends must agree on the channels and the compression.
                decisions.append(decide(now, why, SetMultifd(channels=2, compression="zstd")))
        if policy.max_throttle_pct > 0:
            self.auto_converge = True
            caps.append(ArmAutoConverge())
            # QEMU's own trigger may fire before this controller decides: until then
            # it may take no more than 1 %.
            params.append(Throttle(initial_pct=1, increment_pct=1, max_pct=1))
            reasons.append(
                f"auto-converge armed (up to {policy.max_throttle_pct}% when this controller "
                "decides, 1% until then)"
            )
        if policy.postcopy_allowed and self.compression != "zstd":
            self.postcopy_ready = True
            caps.append(ArmPostcopy())
            reasons.append("post-copy allowed by the policy: postcopy-ram on both sides")
        if caps:
            decisions.append(decide(now, "; ".join(reasons), *caps))
        if params:
            decisions.append(decide(now, "; ".join(reasons), *params))
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
            f"{fmt_mib(predicted.bandwidth_bytes_per_s)}/s ({predicted.bandwidth_source}), "
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
            f"round {len(self.rounds)}: remaining {fmt_mib(current.remaining_bytes)} {state} "
            f"(dirty rate {fmt_mib(rate)}/s, bandwidth {fmt_mib(bandwidth)}/s)"
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
                decide(
                    sample.time,
                    f"{why}: the smallest set the next rounds reach needs {needed_ms:.0f} ms "
                    + (
                        f"at the measured bandwidth; downtime-limit {self.limit_ms:.0f} ms"
                        if fits
                        else f"> policy maximum {top:g} ms; downtime-limit to {self.limit_ms:.0f} ms"
                    ),
                    SetDowntimeLimit(math.ceil(self.limit_ms)),
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
            decide(
                sample.time,
                f"{why}: throttle the guest to {target}% ({basis}; policy maximum "
                f"{policy.max_throttle_pct}%); auto-converge applies it at a coming dirty sync",
                Throttle(target, max(1, min(99, target - previous)), target),
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

"""The operator's hand on a running migration, as a controller.

:class:`OperatorControl` wraps the policy's controller: requests made through the
:class:`~migrate.api.Migration` handle (abort, switch over now, post-copy, a new
policy) wait here and go out at the next sample, before the wrapped controller's
own decisions, so every strategy receives them exactly like a controller's and the
report shows them with their ``operator:`` reason. Pure logic, no I/O.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from migrate.control.base import (
    UNLIMITED_BANDWIDTH,
    ControlContext,
    Controller,
    PredictionAware,
    abort,
    decide,
)
from migrate.control.intents import (
    QEMU_MAX_DOWNTIME_MS,
    CapBandwidth,
    Intent,
    SetDowntimeLimit,
    StartPostcopy,
    SwitchoverNow,
)
from migrate.policy import Policy
from migrate.presets import controller_for
from migrate.report import Decision, Predicted, Sample

#: QEMU's largest downtime-limit: setting it makes QEMU switch over at its next
#: iteration, whatever is left.
SWITCHOVER_NOW_MS = QEMU_MAX_DOWNTIME_MS


class OperatorControl:
    """A controller that passes the operator's requests ahead of ``inner``'s decisions.

    ``inner`` is built by ``make_inner(policy, predicted)`` (by default the policy's
    own controller, :func:`migrate.presets.controller_for`) unless one is given.
    Requests may come from any thread.
    """

    def __init__(
        self,
        policy: Policy,
        inner: Controller | None = None,
        make_inner: Callable[[Policy, Predicted | None], Controller] | None = None,
    ) -> None:
        self._policy = policy
        self._inner = inner
        self._make_inner = make_inner
        self._lock = threading.Lock()
        self._pending: list[Decision] = []
        self._aborted = False

    # -- Controller -------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._inner.policy if self._inner is not None else self._policy

    @policy.setter
    def policy(self, value: Policy) -> None:
        self._policy = value
        if self._inner is not None:
            self._inner.policy = value

    @property
    def inner(self) -> Controller:
        if self._inner is None:
            self._inner = self._build(None)
        return self._inner

    def use_prediction(self, predicted: Predicted) -> None:
        if self._inner is None:
            self._inner = self._build(predicted)
        elif isinstance(self._inner, PredictionAware):
            self._inner.use_prediction(predicted)

    def start(self, context: ControlContext) -> list[Decision]:
        return self._take() + self.inner.start(context)

    def on_sample(self, sample: Sample) -> list[Decision]:
        pending = self._take()
        if any(d.action == "abort" for d in pending):
            return pending
        return pending + self.inner.on_sample(sample)

    # -- operator requests --------------------------------------------------------------

    def request_abort(self, reason: str, now: float | None = None) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self._pending.append(abort(_now(now), f"operator: {reason}"))

    def request_switchover(self, now: float | None = None) -> None:
        self._push(
            decide(_now(now), "operator: switch over now, whatever the downtime", SwitchoverNow())
        )

    def request_postcopy(self, now: float | None = None) -> None:
        self._push(decide(_now(now), "operator: start post-copy", StartPostcopy()))

    def request_policy(self, policy: Policy, now: float | None = None) -> None:
        """Adopt ``policy``; the settings QEMU holds change at the next sample."""
        old = self.policy
        self.policy = policy
        intents: list[Intent] = []
        limit = min(policy.downtime_limit_ms, policy.max_downtime_ms)
        if limit != min(old.downtime_limit_ms, old.max_downtime_ms):
            intents.append(SetDowntimeLimit(int(limit)))
        if (
            policy.max_bandwidth_bytes_per_s != old.max_bandwidth_bytes_per_s
            and policy.max_bandwidth_bytes_per_s is not None
        ):
            intents.append(CapBandwidth(policy.max_bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH))
        if intents:
            self._push(decide(_now(now), "operator: policy updated", *intents))

    def _push(self, decision: Decision) -> None:
        with self._lock:
            self._pending.append(decision)

    def _take(self) -> list[Decision]:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    def _build(self, predicted: Predicted | None) -> Controller:
        make = self._make_inner or controller_for
        return make(self._policy, predicted)


def _now(now: float | None) -> float:
    return time.time() if now is None else now

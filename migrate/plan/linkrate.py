"""The link as QEMU's own stream shows it in the first moments of the migration (pure).

Before the start nothing says what the link carries: a TCP probe between the hosts
would measure the wire, while on a fast link QEMU's stream is bound by its own CPU
(here: 2 cores shared with the guest's TCG vCPU, ~350-550 MiB/s on a link that
carries several GB/s). So the engine forecasts first with a :class:`BandwidthHint`
(the link cap, the policy's cap, or QEMU's default as a stated assumption), then
feeds the first ``query-migrate`` samples to a :class:`StreamMeter`; once QEMU's
stream has run for :data:`MIN_WINDOW_MS` and carried :data:`MIN_WINDOW_BYTES`,
:func:`revised_forecast` forecasts again with what it carried.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from migrate.plan.forecasting import BandwidthHint, Measurement, forecast
from migrate.policy import Policy
from migrate.report import Forecast, Predicted, Sample

MIB = 1 << 20
#: The shortest window of QEMU's stream the link is judged on.
MIN_WINDOW_MS = 80.0
#: The fewest bytes that window must carry.
MIN_WINDOW_BYTES = 8 * MIB


@dataclass(frozen=True)
class StreamRate:
    """What QEMU's stream carried: ``bytes`` in ``window_ms``, ending ``at_ms`` after the start."""

    bytes_per_s: float
    window_ms: float
    bytes: int
    at_ms: float
    #: Time lost before the stream got going: the window opened this late for the
    #: bytes it had then (a slow set-up, a QMP answer held up on a busy host).
    lag_ms: float = 0.0

    def hint(self) -> BandwidthHint:
        return BandwidthHint(
            self.bytes_per_s,
            f"measured: QEMU's stream carried {self.bytes / MIB:.1f} MiB in "
            f"{self.window_ms:.0f} ms ({self.at_ms:.0f} ms after the start)",
        )


class StreamMeter:
    """Feed it ``query-migrate`` samples in order; :meth:`add` returns the rate once.

    The window opens at the first sample (``setup`` lasts 1-3 ms here, and a
    migration of a few hundred ms may show only one ``active`` sample) and closes
    at the first ``active`` sample at least :data:`MIN_WINDOW_MS` and
    :data:`MIN_WINDOW_BYTES` further. A migration over before that gives none.
    """

    def __init__(
        self, min_window_ms: float = MIN_WINDOW_MS, min_bytes: int = MIN_WINDOW_BYTES
    ) -> None:
        self.min_window_ms = min_window_ms
        self.min_bytes = min_bytes
        self._first: Sample | None = None
        self.rate: StreamRate | None = None

    def add(self, sample: Sample) -> StreamRate | None:
        """The rate if this sample closes the window (only once), else None."""
        if self.rate is not None:
            return None
        if self._first is None:
            if sample.status in ("setup", "active"):
                self._first = sample
            return None
        if sample.status != "active":
            return None
        span_ms = sample.elapsed_ms - self._first.elapsed_ms
        sent = sample.ram_transferred_bytes - self._first.ram_transferred_bytes
        if span_ms < self.min_window_ms or sent < self.min_bytes:
            return None
        rate = sent / (span_ms / 1e3)
        opened = self._first
        lag_ms = max(0.0, opened.elapsed_ms - opened.ram_transferred_bytes / rate * 1e3)
        self.rate = StreamRate(rate, span_ms, sent, sample.elapsed_ms, lag_ms)
        return self.rate


def revised_forecast(m: Measurement, rate: StreamRate, policy: Policy) -> Predicted:
    """The forecast for ``m`` again, at the bandwidth QEMU's stream showed; every
    total also counts the time the stream lost before it got going."""
    revised = forecast(m, rate.hint(), policy)

    def late(f: Forecast) -> Forecast:
        return dataclasses.replace(f, total_time_ms=f.total_time_ms + rate.lag_ms)

    chosen = revised.policy_forecast
    return dataclasses.replace(
        revised,
        forecasts=tuple(late(f) for f in revised.forecasts),
        policy_forecast=late(chosen) if chosen is not None else None,
        bandwidth_measured_at_ms=rate.at_ms,
    )

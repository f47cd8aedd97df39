"""Forecast each way of migrating from a measurement (pure: no QMP, no file I/O).

:func:`forecast` runs :mod:`dirtytrack.model` on a :class:`Measurement` (made by
:mod:`migrate.plan.measuring`) for a set of settings (downtime limits, compression,
throttle, post-copy), marks which of them the policy allows (:func:`allowed`), and
recommends one: the allowed setting that converges with the least downtime, then
the least total time. :func:`policy_forecast` is the forecast for how a policy
would run; :func:`with_policy` judges the same forecasts for another policy.

Bandwidth cannot be measured before the stream exists without owning both hosts;
it comes from a :class:`BandwidthHint` (the operator, the lab's link cap, the
policy's cap, or QEMU's default cap as a stated assumption) and the live
controller replaces it with what the first round shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dirtytrack.model import (
    PrecopyScenario,
    Prediction,
    predict,
    predict_postcopy,
    required_throttle,
)
from migrate.control.base import (
    DEFAULT_DEVICE_STATE_BYTES,
    QEMU_DEFAULT_BANDWIDTH,
    UNLIMITED_BANDWIDTH,
)
from migrate.policy import Policy
from migrate.report import Forecast, Predicted

MIB = 1 << 20
#: TCP/IPv4 payload per 1514-byte Ethernet frame at MTU 1500 (1448 bytes with
#: timestamps): what a link cap leaves for the migration stream.
TCP_PAYLOAD_SHARE = 1448 / 1514
#: Switchover work after QEMU's downtime: RAM verify (~8-13 ms per 128-256 MiB
#: here) and ``cont``.
DEFAULT_RESUME_OVERHEAD_MS = 15.0
#: How much longer than :data:`DEFAULT_RESUME_OVERHEAD_MS` that work may take: a
#: repair of stale pages and its second digest, a target QEMU slow to report
#: ``completed`` on two shared cores (STOP->RESUME 27-78 ms for a 20 ms limit in
#: the runs of issue 13).
RESUME_OVERHEAD_SPREAD_MS = 45.0


@dataclass(frozen=True)
class BandwidthHint:
    """Where the forecast's bandwidth (payload bytes per second) comes from."""

    bytes_per_s: float
    source: str

    @classmethod
    def from_link_mbit(cls, mbit: float, source: str = "link cap") -> BandwidthHint:
        """A link of ``mbit`` Mbit/s, less TCP/IP headers."""
        return cls(mbit * 1e6 / 8 * TCP_PAYLOAD_SHARE, f"{source} {mbit:g} Mbit/s")

    @classmethod
    def for_policy(cls, policy: Policy, link_mbit: float | None = None) -> BandwidthHint:
        """The link cap if known, else the policy's bandwidth cap, else QEMU's default cap."""
        cap = policy.max_bandwidth_bytes_per_s
        capped = cap is not None and cap not in (0, UNLIMITED_BANDWIDTH)
        if link_mbit is not None:
            hint = cls.from_link_mbit(link_mbit)
            if capped and cap is not None and cap < hint.bytes_per_s:
                return cls(float(cap), f"policy cap {cap / MIB:g} MiB/s")
            return hint
        if capped and cap is not None:
            return cls(float(cap), f"policy cap {cap / MIB:g} MiB/s")
        return cls(
            float(QEMU_DEFAULT_BANDWIDTH),
            f"{ASSUMED}: QEMU's default max-bandwidth 128 MiB/s (link speed unknown)",
        )

    def less(self, other_bytes_per_s: float, what: str) -> BandwidthHint:
        """What is left for the migration when ``what`` takes ``other_bytes_per_s`` of
        the same link (never less than a tenth: the copy still moves, just slowly)."""
        if other_bytes_per_s <= 0:
            return self
        left = max(self.bytes_per_s - other_bytes_per_s, self.bytes_per_s / 10)
        return BandwidthHint(
            left, f"{self.source}, less {what} ({other_bytes_per_s / MIB:.1f} MiB/s)"
        )


@dataclass(frozen=True)
class RamSample:
    """What a sample of guest pages shows (ratios are raw / compressed bytes).

    ``zstd_changed_ratio`` is zstd's ratio on the sampled pages that changed during
    the dirty-rate window: the pages later rounds send again (a guest's hot pages
    may compress much worse than its RAM as a whole).
    """

    pages: int
    zero_fraction: float
    zstd_ratio: float
    zstd_bytes_per_s: float
    xbzrle_ratio: float | None
    changed_fraction: float | None
    zstd_changed_ratio: float | None = None


@dataclass(frozen=True)
class Measurement:
    """The VM before the start: RAM, dirty rate and (if mappable) its pages."""

    ram_bytes: int
    dirty_rate_bytes_per_s: float
    dirty_rate_method: str
    sample: RamSample | None
    measure_time_ms: float
    #: Bytes the guest keeps rewriting (None: no bound seen in the sample).
    working_set_bytes: int | None = None

    @property
    def nonzero_ram_bytes(self) -> int | None:
        if self.sample is None:
            return None
        return int(self.ram_bytes * (1.0 - self.sample.zero_fraction))


@dataclass(frozen=True)
class _Setting:
    name: str
    downtime_limit_ms: float
    compression: str = "none"
    throttle_pct: int = 0
    postcopy: bool = False


def _scenario(m: Measurement, bandwidth: BandwidthHint, setting: _Setting) -> PrecopyScenario:
    ratio, resend, throughput = 1.0, 1.0, None
    if setting.compression == "zstd" and m.sample is not None:
        ratio = m.sample.zstd_ratio
        throughput = m.sample.zstd_bytes_per_s or None
        if m.sample.zstd_changed_ratio is not None:
            resend = m.sample.zstd_changed_ratio / ratio
    elif setting.compression == "xbzrle" and m.sample is not None:
        resend = m.sample.xbzrle_ratio or 1.0
    rate = m.dirty_rate_bytes_per_s * (1 - setting.throttle_pct / 100)
    nonzero = m.nonzero_ram_bytes
    return PrecopyScenario(
        ram_bytes=m.ram_bytes,
        dirty_rate_bytes_per_s=rate,
        bandwidth_bytes_per_s=bandwidth.bytes_per_s,
        downtime_limit_s=setting.downtime_limit_ms / 1e3,
        # QEMU switches over when the RAM left fits the limit at its measured
        # bandwidth; device state and our RAM check come on top (see _as_forecast).
        nonzero_ram_bytes=nonzero,
        # Zero pages are rarely dirtied: the non-zero RAM caps a round's dirty set,
        # and a guest rewriting a hot set dirties no more than that set per round.
        working_set_bytes=_working_set(m),
        compression_ratio=ratio,
        resend_compression_ratio=resend,
        compression_throughput_bytes_per_s=throughput,
    )


def _working_set(m: Measurement) -> int | None:
    bounds = [b for b in (m.nonzero_ram_bytes, m.working_set_bytes) if b is not None]
    return min(bounds) if bounds else None


def _as_forecast(setting: _Setting, prediction: Prediction, fixed_ms: float,
                 device_state_bytes: int) -> Forecast:  # fmt: skip
    """The model's figures plus the fixed switchover work, and the downtime band.

    The band is for source STOP to target RESUME: at least the fixed work (device
    state, RAM check, ``cont``) with no RAM left; at most the RAM QEMU leaves for the
    stop (up to the downtime limit's worth, or the forced remainder when pre-copy
    does not converge) plus the fixed work and :data:`RESUME_OVERHEAD_SPREAD_MS`.
    """
    downtime_ms = prediction.downtime_s * 1e3 + fixed_ms
    return Forecast(
        setting=setting.name,
        converges=prediction.converges,
        rounds=prediction.rounds,
        total_time_ms=prediction.total_time_s * 1e3 + fixed_ms,
        downtime_ms=downtime_ms,
        transferred_bytes=prediction.bytes_transferred + device_state_bytes,
        reason=prediction.reason,
        strategy="native",
        downtime_limit_ms=setting.downtime_limit_ms,
        compression=setting.compression,
        throttle_pct=setting.throttle_pct,
        postcopy=setting.postcopy,
        downtime_low_ms=fixed_ms,
        downtime_high_ms=max(downtime_ms, setting.downtime_limit_ms + fixed_ms)
        + RESUME_OVERHEAD_SPREAD_MS,
    )


def _settings(m: Measurement, limits: Sequence[float]) -> list[_Setting]:
    methods = ["none"]
    if m.sample is not None:
        methods.append("zstd")
        if m.sample.xbzrle_ratio is not None:
            methods.append("xbzrle")
    label = {"none": "native", "zstd": "native + multifd zstd", "xbzrle": "native + xbzrle"}
    settings = [
        _Setting(f"{label[method]}, downtime-limit {limit:g} ms", limit, method)
        for method in methods
        for limit in limits
    ]
    top = max(limits)
    settings.append(_Setting(f"post-copy after the bulk round, {top:g} ms", top, postcopy=True))
    return settings


#: How :class:`BandwidthHint` marks a bandwidth nobody measured or configured.
ASSUMED = "assumed"


def bandwidth_known(predicted: Predicted) -> bool:
    """Whether the forecast's bandwidth is a known link or cap (not an assumption)."""
    return not predicted.bandwidth_source.startswith(ASSUMED)


def allowed(forecast: Forecast, policy: Policy) -> bool:
    """Whether ``policy`` lets a controller migrate as ``forecast`` assumes."""
    if forecast.downtime_limit_ms > policy.max_downtime_ms:
        return False
    if forecast.throttle_pct > policy.max_throttle_pct:
        return False
    if forecast.postcopy and not policy.postcopy_allowed:
        return False
    return forecast.compression == "none" or policy.compression_allowed


def forecast(
    m: Measurement,
    bandwidth: BandwidthHint,
    policy: Policy,
    device_state_bytes: int = DEFAULT_DEVICE_STATE_BYTES,
    resume_overhead_ms: float = DEFAULT_RESUME_OVERHEAD_MS,
) -> Predicted:
    """Forecast each setting for ``m`` at ``bandwidth``; recommend one ``policy`` allows."""
    start_ms = min(policy.downtime_limit_ms, policy.max_downtime_ms)
    limits = sorted({start_ms, min(policy.max_downtime_ms, 300.0), policy.max_downtime_ms})
    fixed_ms = device_state_bytes / bandwidth.bytes_per_s * 1e3 + resume_overhead_ms
    results: list[Forecast] = []
    for setting in _settings(m, limits):
        scenario = _scenario(m, bandwidth, setting)
        prediction = predict_postcopy(scenario) if setting.postcopy else predict(scenario)
        results.append(_as_forecast(setting, prediction, fixed_ms, device_state_bytes))
    # The throttle pre-copy would need at the policy's maximum downtime.
    needed = required_throttle(_scenario(m, bandwidth, _Setting("", policy.max_downtime_ms)))
    if needed is not None and 0 < needed < 0.995:
        pct = min(99, math.ceil(needed * 100))
        setting = _Setting(
            f"native + throttle {pct}%, {policy.max_downtime_ms:g} ms", policy.max_downtime_ms,
            throttle_pct=pct,
        )  # fmt: skip
        prediction = predict(_scenario(m, bandwidth, setting))
        results.append(_as_forecast(setting, prediction, fixed_ms, device_state_bytes))
    known = not bandwidth.source.startswith(ASSUMED)
    recommendation, why = _recommend(results, policy, known)
    return Predicted(
        ram_bytes=m.ram_bytes,
        dirty_rate_bytes_per_s=m.dirty_rate_bytes_per_s,
        dirty_rate_method=m.dirty_rate_method,
        bandwidth_bytes_per_s=bandwidth.bytes_per_s,
        bandwidth_source=bandwidth.source,
        device_state_bytes=device_state_bytes,
        resume_overhead_ms=resume_overhead_ms,
        forecasts=tuple(results),
        recommendation=recommendation,
        recommendation_reason=why,
        nonzero_ram_bytes=m.nonzero_ram_bytes,
        working_set_bytes=m.working_set_bytes,
        compression_ratios=_ratios(m),
        compression_speed_bytes_per_s=m.sample.zstd_bytes_per_s if m.sample else None,
        policy_forecast=policy_forecast(results, policy, known),
        measure_time_ms=m.measure_time_ms,
    )


def _ratios(m: Measurement) -> dict[str, float]:
    if m.sample is None:
        return {}
    ratios = {"zstd": m.sample.zstd_ratio}
    if m.sample.xbzrle_ratio is not None:
        ratios["xbzrle"] = m.sample.xbzrle_ratio
    return ratios


def _rank(f: Forecast) -> tuple[bool, float, float]:
    return (not f.converges, round(f.downtime_ms, 1), f.total_time_ms)


#: Downtimes this close count as equal when choosing: then the quicker one wins.
DOWNTIME_TOLERANCE_MS = 50.0


def _pick(forecasts: Sequence[Forecast]) -> Forecast:
    """The least downtime (within :data:`DOWNTIME_TOLERANCE_MS`), then the least time."""
    least = min(f.downtime_ms for f in forecasts)
    close = [f for f in forecasts if f.downtime_ms <= least + DOWNTIME_TOLERANCE_MS]
    return min(close, key=lambda f: (f.total_time_ms, f.downtime_ms))


def _candidates(results: Sequence[Forecast], policy: Policy, known: bool) -> list[Forecast]:
    # Compression trades CPU for link time: only a known, slower link makes that a
    # bet worth taking (on the uncapped lab link zstd was no faster: 0.73-1.4 s
    # against 0.72-0.77 s plain, 2 cores shared with the guest). And even there it
    # is a convergence aid, not a speed-up: its switchover cost is not in the model
    # and was large when measured (400 Mbit/s link, 128 MiB guest writing 16 MiB/s:
    # multifd zstd STOP->RESUME 143-191 ms against ~70 ms for plain streams), so a
    # plain setting that converges is preferred.
    #
    # Then by harm to the guest: no lever at all, then compression (host CPU only),
    # then the least throttle (the guest's own CPU), then post-copy (no way back,
    # no RAM check before the target runs).
    permitted = [f for f in results if allowed(f, policy) and (known or f.compression == "none")]
    converging = [f for f in permitted if f.converges]
    untouched = [f for f in converging if not f.throttle_pct and not f.postcopy]
    tiers = (
        [f for f in untouched if f.compression == "none"],
        untouched,
        _least_throttle([f for f in converging if f.throttle_pct and not f.postcopy]),
        [f for f in converging if f.postcopy],
    )
    return next((tier for tier in tiers if tier), permitted)


def _least_throttle(forecasts: list[Forecast]) -> list[Forecast]:
    least = min((f.throttle_pct for f in forecasts), default=0)
    return [f for f in forecasts if f.throttle_pct == least]


def _recommend(results: Sequence[Forecast], policy: Policy, known: bool = True) -> tuple[str, str]:
    permitted = _candidates(results, policy, known)
    converging = [f for f in permitted if f.converges]
    if converging:
        best = _pick(converging)
        return best.setting, (
            f"converges in {best.total_time_ms / 1e3:.1f} s with {best.downtime_ms:.0f} ms "
            f"downtime, within policy {policy.name}"
        )
    others = [f for f in results if f.converges and not allowed(f, policy)]
    hint = f"; {min(others, key=_rank).setting} would (not allowed by the policy)" if others else ""
    return "do not migrate now", (
        f"no setting policy {policy.name} allows converges within "
        f"{policy.max_downtime_ms:g} ms{hint}"
    )


def policy_forecast(
    results: Sequence[Forecast], policy: Policy, known: bool = True
) -> Forecast | None:
    """The forecast for how ``policy`` would run: its controller's best allowed setting
    (livemig), else its start settings (fixed schedules)."""
    if policy.controller == "livemig":
        permitted = _candidates(results, policy, known)
        converging = [f for f in permitted if f.converges]
        if converging:
            return _pick(converging)
        pool = [f for f in permitted if not f.postcopy and f.throttle_pct == 0]
        return min(pool, key=_rank) if pool else None
    start = min(policy.downtime_limit_ms, policy.max_downtime_ms)
    plain = [
        f for f in results if f.compression == "none" and not f.postcopy and not f.throttle_pct
    ]
    return min(plain, key=lambda f: abs(f.downtime_limit_ms - start)) if plain else None


def with_policy(predicted: Predicted, policy: Policy) -> Predicted:
    """The same forecasts judged for another policy (recommendation, policy forecast)."""
    known = bandwidth_known(predicted)
    recommendation, why = _recommend(predicted.forecasts, policy, known)
    return dataclasses.replace(
        predicted,
        recommendation=recommendation,
        recommendation_reason=why,
        policy_forecast=policy_forecast(predicted.forecasts, policy, known),
    )

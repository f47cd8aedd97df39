"""Pre-copy convergence model: will a live migration converge, and at what cost?

Round 1 sends the RAM (or only its non-zero pages, which is what pagestream sends);
each later round sends what the guest dirtied while the previous one was on the
wire::

    V0 = RAM (or non-zero RAM)        T_i = V_i / B_raw
    V_{i+1} = min(r * T_i, W)         B_raw = B * compression_ratio

where ``r`` is the dirty rate and ``W`` the working set (RAM when unknown): a guest
rewriting the same 100 MiB can never dirty more than 100 MiB in a round, however
long the round. After each round the remaining set ``V_{i+1}`` is checked: if

    downtime = V_{i+1} / B_raw + device_state / B + resume_overhead <= limit

the source stops and copies it (switchover). Without a working-set cap this
converges only if ``r < B_raw``; with one, ``W`` itself may fit. Device state goes
through QEMU's own stream, so it is not compressed. This is QEMU's own rule (it
switches over when the pending bytes fit ``downtime-limit`` at the measured
bandwidth), so the model also describes the native strategy.

Compression comes in two shapes. ``compression_ratio`` applies to every page sent
(multifd with zstd compresses the bulk round as well), optionally capped by the
compressor's own speed (``compression_throughput_bytes_per_s``, raw bytes per
second): ``B_raw = min(B * ratio, throughput)``. ``resend_compression_ratio``
applies only to pages sent again (xbzrle encodes a page against the copy it sent
before, so the bulk round goes out plain).

:func:`predict_postcopy` forecasts switching to post-copy after a number of
pre-copy rounds: the guest stops only for the device state (and ``resume``), then
the pages dirtied since they were sent follow on demand.

Units: bytes, bytes per second, seconds throughout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

#: Bisection steps for :func:`required_throttle`: 2^-40 resolution on [0, 1].
_THROTTLE_STEPS: Final = 40


@dataclass(frozen=True)
class PrecopyScenario:
    """Inputs of the model.

    ``dirty_rate_bytes_per_s`` is distinct bytes dirtied per second (pages x 4096),
    ``bandwidth_bytes_per_s`` the link's payload rate, ``downtime_limit_s`` the
    longest acceptable pause. ``nonzero_ram_bytes`` (optional) is what round 1 must
    really send when zero pages travel as flags; ``working_set_bytes`` (optional)
    caps the dirty set of any round; ``compression_ratio`` is raw / wire bytes of
    page data (``resend_compression_ratio`` only for pages sent again;
    ``compression_throughput_bytes_per_s`` caps the raw rate a compressor reaches).
    ``max_rounds`` bounds the pre-copy rounds. Raises
    :class:`ValueError` for negative sizes or rates, a non-positive bandwidth,
    ratio or round count, or optional sizes larger than the RAM.
    """

    ram_bytes: int
    dirty_rate_bytes_per_s: float
    bandwidth_bytes_per_s: float
    downtime_limit_s: float
    device_state_bytes: int = 0
    resume_overhead_s: float = 0.0
    max_rounds: int = 30
    nonzero_ram_bytes: int | None = None
    compression_ratio: float = 1.0
    working_set_bytes: int | None = None
    resend_compression_ratio: float = 1.0
    compression_throughput_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.ram_bytes < 0:
            problems.append(f"ram_bytes={self.ram_bytes} < 0")
        if not self.dirty_rate_bytes_per_s >= 0 or math.isinf(self.dirty_rate_bytes_per_s):
            problems.append(f"dirty_rate_bytes_per_s={self.dirty_rate_bytes_per_s} is not >= 0")
        if not self.bandwidth_bytes_per_s > 0 or math.isinf(self.bandwidth_bytes_per_s):
            problems.append(f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} is not > 0")
        if not self.downtime_limit_s >= 0:
            problems.append(f"downtime_limit_s={self.downtime_limit_s} is not >= 0")
        if self.device_state_bytes < 0:
            problems.append(f"device_state_bytes={self.device_state_bytes} < 0")
        if not self.resume_overhead_s >= 0:
            problems.append(f"resume_overhead_s={self.resume_overhead_s} is not >= 0")
        if self.max_rounds < 1:
            problems.append(f"max_rounds={self.max_rounds} < 1")
        for name in ("compression_ratio", "resend_compression_ratio"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                problems.append(f"{name}={value} is not > 0")
        throughput = self.compression_throughput_bytes_per_s
        if throughput is not None and not throughput > 0:
            problems.append(f"compression_throughput_bytes_per_s={throughput} is not > 0")
        for name in ("nonzero_ram_bytes", "working_set_bytes"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.ram_bytes:
                problems.append(f"{name}={value} outside [0, ram_bytes={self.ram_bytes}]")
        if problems:
            raise ValueError("invalid pre-copy scenario: " + "; ".join(problems))

    @property
    def page_bandwidth_bytes_per_s(self) -> float:
        """Raw page bytes moved per second once compression is counted."""
        raw = self.bandwidth_bytes_per_s * self.compression_ratio
        if self.compression_throughput_bytes_per_s is not None:
            raw = min(raw, self.compression_throughput_bytes_per_s)
        return raw

    @property
    def resend_bandwidth_bytes_per_s(self) -> float:
        """Raw page bytes per second for pages sent again (rounds after the first)."""
        return self.page_bandwidth_bytes_per_s * self.resend_compression_ratio

    @property
    def fixed_downtime_s(self) -> float:
        """Downtime paid even with no dirty page left: device state plus resume."""
        return self.device_state_bytes / self.bandwidth_bytes_per_s + self.resume_overhead_s

    def downtime_for(self, remaining_bytes: float) -> float:
        """Downtime of a switchover that must copy ``remaining_bytes`` of RAM, in s."""
        return remaining_bytes / self.resend_bandwidth_bytes_per_s + self.fixed_downtime_s

    def wire_bytes(self, raw_bytes: float, resent: bool) -> float:
        """Bytes on the wire for ``raw_bytes`` of pages (first time or sent again)."""
        ratio = self.compression_ratio * (self.resend_compression_ratio if resent else 1.0)
        return raw_bytes / ratio


@dataclass(frozen=True)
class Prediction:
    """What the model expects for one scenario.

    ``rounds`` counts live pre-copy rounds (at least one: the bulk copy);
    ``round_bytes`` holds the raw bytes each of them sends and ``switchover_bytes``
    what is copied with the guest stopped. When ``converges`` is false the times and
    sizes describe a switchover forced after the last round simulated, so an
    operator sees how bad forcing it would be; ``reason`` says why it stopped.
    ``bytes_transferred`` counts wire bytes (after compression) plus device state.
    """

    converges: bool
    rounds: int
    total_time_s: float
    downtime_s: float
    bytes_transferred: float
    reason: str
    round_bytes: tuple[float, ...]
    switchover_bytes: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` reverses it."""
        data = dataclasses.asdict(self)
        data["round_bytes"] = list(self.round_bytes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        """Rebuild from :meth:`to_dict` output. Raises :class:`KeyError`/`TypeError`
        for missing or unexpected fields."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unexpected = set(data) - fields
        if unexpected:
            raise TypeError(f"unexpected Prediction fields: {sorted(unexpected)}")
        return cls(
            converges=bool(data["converges"]),
            rounds=int(data["rounds"]),
            total_time_s=float(data["total_time_s"]),
            downtime_s=float(data["downtime_s"]),
            bytes_transferred=float(data["bytes_transferred"]),
            reason=str(data["reason"]),
            round_bytes=tuple(float(v) for v in data["round_bytes"]),
            switchover_bytes=float(data["switchover_bytes"]),
        )


@dataclass(frozen=True)
class _Round:
    sent_bytes: float
    duration_s: float
    remaining_bytes: float  # dirtied while this round was on the wire


def _rounds(scenario: PrecopyScenario, limit: int) -> Iterator[_Round]:
    """Pre-copy rounds until ``limit`` or until the remaining set stops shrinking."""
    cap = float(
        scenario.working_set_bytes if scenario.working_set_bytes is not None else scenario.ram_bytes
    )
    volume = float(
        scenario.nonzero_ram_bytes if scenario.nonzero_ram_bytes is not None else scenario.ram_bytes
    )
    for index in range(limit):
        bandwidth = (
            scenario.page_bandwidth_bytes_per_s
            if index == 0
            else scenario.resend_bandwidth_bytes_per_s
        )
        duration = volume / bandwidth
        remaining = min(scenario.dirty_rate_bytes_per_s * duration, cap)
        yield _Round(volume, duration, remaining)
        if remaining >= volume and remaining > 0:
            return  # a fixed point: more rounds cannot shrink the set
        volume = remaining


def predict(scenario: PrecopyScenario) -> Prediction:
    """Simulate pre-copy rounds and the switchover for ``scenario``."""
    sent: list[float] = []
    elapsed = 0.0
    last: _Round | None = None
    for step in _rounds(scenario, scenario.max_rounds):
        sent.append(step.sent_bytes)
        elapsed += step.duration_s
        last = step
        if scenario.downtime_for(step.remaining_bytes) <= scenario.downtime_limit_s:
            return _prediction(
                scenario, True, sent, elapsed, step, _converged_reason(scenario, step)
            )
    assert last is not None  # max_rounds >= 1
    return _prediction(scenario, False, sent, elapsed, last, _stuck_reason(scenario, sent, last))


def _prediction(
    scenario: PrecopyScenario,
    converges: bool,
    sent: list[float],
    elapsed: float,
    last: _Round,
    reason: str,
) -> Prediction:
    downtime = scenario.downtime_for(last.remaining_bytes)
    wire = scenario.wire_bytes(sent[0], resent=False) + sum(
        scenario.wire_bytes(v, resent=True) for v in [*sent[1:], last.remaining_bytes]
    )
    return Prediction(
        converges=converges,
        rounds=len(sent),
        total_time_s=elapsed + downtime,
        downtime_s=downtime,
        bytes_transferred=wire + scenario.device_state_bytes,
        reason=reason,
        round_bytes=tuple(sent),
        switchover_bytes=last.remaining_bytes,
    )


def _converged_reason(scenario: PrecopyScenario, last: _Round) -> str:
    return (
        f"remaining {_mib(last.remaining_bytes)} fits the {scenario.downtime_limit_s * 1e3:.0f} ms "
        f"downtime limit at {_mib(scenario.page_bandwidth_bytes_per_s)}/s"
    )


def _stuck_reason(scenario: PrecopyScenario, sent: list[float], last: _Round) -> str:
    limit_ms = scenario.downtime_limit_s * 1e3
    if scenario.fixed_downtime_s > scenario.downtime_limit_s:
        return (
            f"device state ({_mib(scenario.device_state_bytes)}) and resume overhead alone take "
            f"{scenario.fixed_downtime_s * 1e3:.0f} ms, over the {limit_ms:.0f} ms limit"
        )
    rate, bandwidth = scenario.dirty_rate_bytes_per_s, scenario.page_bandwidth_bytes_per_s
    if last.remaining_bytes >= last.sent_bytes and last.remaining_bytes > 0:
        capped = (
            scenario.working_set_bytes is not None
            and last.remaining_bytes >= scenario.working_set_bytes
        )
        if capped:
            return (
                f"remaining set stalls at the {_mib(last.remaining_bytes)} working set: "
                f"{scenario.downtime_for(last.remaining_bytes) * 1e3:.0f} ms downtime > {limit_ms:.0f} ms"
            )
        return (
            f"dirty rate {_mib(rate)}/s >= bandwidth {_mib(bandwidth)}/s: "
            "the remaining set never shrinks"
        )
    return (
        f"after {len(sent)} rounds (the maximum) {_mib(last.remaining_bytes)} remain: "
        f"{scenario.downtime_for(last.remaining_bytes) * 1e3:.0f} ms downtime > {limit_ms:.0f} ms"
    )


def predict_postcopy(scenario: PrecopyScenario, precopy_rounds: int = 1) -> Prediction:
    """Forecast switching to post-copy after ``precopy_rounds`` pre-copy rounds.

    The guest pauses for the device state and the resume overhead only; then the
    set dirtied during the last pre-copy round (capped by the working set) is sent
    once more while the guest runs on the target, whatever the dirty rate, so this
    always ends (``converges`` is false only when the fixed downtime alone exceeds
    the limit). Raises :class:`ValueError` if ``precopy_rounds`` < 1.
    """
    if precopy_rounds < 1:
        raise ValueError(f"precopy_rounds must be >= 1, got {precopy_rounds}")
    sent: list[float] = []
    elapsed = 0.0
    last: _Round | None = None
    for step in _rounds(scenario, precopy_rounds):
        sent.append(step.sent_bytes)
        elapsed += step.duration_s
        last = step
    assert last is not None
    downtime = scenario.fixed_downtime_s
    postcopy_s = last.remaining_bytes / scenario.resend_bandwidth_bytes_per_s
    wire = scenario.wire_bytes(sent[0], resent=False) + sum(
        scenario.wire_bytes(v, resent=True) for v in [*sent[1:], last.remaining_bytes]
    )
    fits = downtime <= scenario.downtime_limit_s
    pause = f"pause {downtime * 1e3:.0f} ms, then " if downtime else ""
    reason = (
        f"post-copy after {len(sent)} round(s): {pause}"
        f"{_mib(last.remaining_bytes)} follow on demand in {postcopy_s:.1f} s"
        if fits
        else f"device state and resume alone take {downtime * 1e3:.0f} ms, over the "
        f"{scenario.downtime_limit_s * 1e3:.0f} ms limit"
    )
    return Prediction(
        converges=fits,
        rounds=len(sent),
        total_time_s=elapsed + downtime + postcopy_s,
        downtime_s=downtime,
        bytes_transferred=wire + scenario.device_state_bytes,
        reason=reason,
        round_bytes=tuple(sent),
        switchover_bytes=0.0,
    )


def min_downtime_limit(scenario: PrecopyScenario, within_rounds: int | None = None) -> float:
    """Smallest downtime limit (s) for which pre-copy converges within the rounds.

    ``within_rounds`` defaults to ``scenario.max_rounds``. The remaining sets do not
    depend on the limit, so this is the smallest downtime any of those rounds
    offers. Raises :class:`ValueError` if ``within_rounds`` < 1.
    """
    rounds = scenario.max_rounds if within_rounds is None else within_rounds
    if rounds < 1:
        raise ValueError(f"within_rounds must be >= 1, got {rounds}")
    return min(scenario.downtime_for(step.remaining_bytes) for step in _rounds(scenario, rounds))


def required_throttle(scenario: PrecopyScenario) -> float | None:
    """Fraction of guest CPU to take away (0..1) so that pre-copy converges.

    Assumes the dirty rate scales with the CPU time the guest gets, as QEMU's
    auto-converge does: throttle ``t`` leaves ``r * (1 - t)``. Returns 0.0 if no
    throttle is needed, ``None`` if even a fully stopped guest would not meet the
    limit (device state and resume overhead exceed it), else the smallest throttle
    found by bisection, rounded up to 2^-40 so it is sufficient.
    """
    if predict(scenario).converges:
        return 0.0
    if not _converges_at(scenario, 1.0):
        return None
    low, high = 0.0, 1.0
    for _ in range(_THROTTLE_STEPS):
        middle = (low + high) / 2
        if _converges_at(scenario, middle):
            high = middle
        else:
            low = middle
    return high


def _converges_at(scenario: PrecopyScenario, throttle: float) -> bool:
    slowed = dataclasses.replace(
        scenario, dirty_rate_bytes_per_s=scenario.dirty_rate_bytes_per_s * (1.0 - throttle)
    )
    return predict(slowed).converges


def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"

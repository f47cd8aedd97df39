"""The pre-copy convergence model: closed forms, edge cases, helpers, invariants."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtytrack.model import (
    PrecopyScenario,
    Prediction,
    min_downtime_limit,
    predict,
    required_throttle,
)

MIB = 1 << 20
GIB = 1 << 30


def scenario(**overrides: float | int | None) -> PrecopyScenario:
    base: dict[str, float | int | None] = {
        "ram_bytes": GIB,
        "dirty_rate_bytes_per_s": 0.0,
        "bandwidth_bytes_per_s": 100 * MIB,
        "downtime_limit_s": 0.3,
    }
    base.update(overrides)
    return PrecopyScenario(**base)  # type: ignore[arg-type]


def test_idle_guest_one_round_then_fixed_downtime() -> None:
    s = scenario(device_state_bytes=600_000, resume_overhead_s=0.04)
    p = predict(s)
    assert p.converges and p.rounds == 1
    assert p.round_bytes == (float(GIB),) and p.switchover_bytes == 0
    assert p.downtime_s == pytest.approx(600_000 / (100 * MIB) + 0.04)
    assert p.total_time_s == pytest.approx(GIB / (100 * MIB) + p.downtime_s)
    assert p.bytes_transferred == pytest.approx(GIB + 600_000)


def test_geometric_rounds_match_closed_form() -> None:
    # r = B/2 halves the remaining set each round; 1 GiB at 100 MiB/s.
    b = 100 * MIB
    s = scenario(dirty_rate_bytes_per_s=b / 2, downtime_limit_s=0.05)
    p = predict(s)
    # Switch over once V_k / B <= 50 ms, i.e. V_k <= 5 MiB: 1024 / 2^k <= 5 -> k = 8.
    assert p.converges and p.rounds == 8
    assert p.round_bytes == tuple(GIB / 2**i for i in range(8))
    assert p.switchover_bytes == pytest.approx(GIB / 2**8)
    assert p.downtime_s == pytest.approx(GIB / 2**8 / b)
    sent = sum(GIB / 2**i for i in range(9))
    assert p.total_time_s == pytest.approx(sent / b)
    assert p.bytes_transferred == pytest.approx(sent)
    assert "fits" in p.reason


def test_dirty_rate_at_bandwidth_never_converges() -> None:
    p = predict(scenario(dirty_rate_bytes_per_s=100 * MIB))
    assert not p.converges
    assert p.rounds == 1  # the first round already shows no shrink
    assert "never shrinks" in p.reason
    # Forced switchover: the whole RAM again.
    assert p.switchover_bytes == GIB
    assert p.downtime_s == pytest.approx(GIB / (100 * MIB))
    assert not predict(scenario(dirty_rate_bytes_per_s=300 * MIB)).converges


def test_working_set_cap_makes_a_fast_dirtier_converge() -> None:
    # r = 3B, but the guest only ever rewrites 20 MiB: 0.2 s <= 0.3 s limit.
    s = scenario(dirty_rate_bytes_per_s=300 * MIB, working_set_bytes=20 * MIB)
    p = predict(s)
    assert p.converges and p.rounds == 1
    assert p.switchover_bytes == 20 * MIB
    assert p.downtime_s == pytest.approx(0.2)


def test_working_set_too_big_stalls_with_that_reason() -> None:
    s = scenario(dirty_rate_bytes_per_s=300 * MIB, working_set_bytes=200 * MIB)
    p = predict(s)
    assert not p.converges
    assert p.rounds == 2  # 1 GiB, then 200 MiB, then 200 MiB again: a fixed point
    assert p.round_bytes == (float(GIB), float(200 * MIB))
    assert "working set" in p.reason
    assert p.downtime_s == pytest.approx(2.0)


def test_tiny_ram_converges_even_when_rate_exceeds_bandwidth() -> None:
    # One page; whatever the rate, at most one page can be dirty.
    s = scenario(ram_bytes=4096, dirty_rate_bytes_per_s=1e12, downtime_limit_s=0.001)
    p = predict(s)
    assert p.converges and p.rounds == 1 and p.switchover_bytes == 4096


def test_zero_ram() -> None:
    p = predict(scenario(ram_bytes=0, dirty_rate_bytes_per_s=1e9))
    assert p.converges and p.rounds == 1 and p.total_time_s == 0 and p.bytes_transferred == 0


def test_device_state_over_the_limit_never_converges() -> None:
    s = scenario(device_state_bytes=50 * MIB, downtime_limit_s=0.3)  # 0.5 s of device state
    p = predict(s)
    assert not p.converges
    assert "device state" in p.reason
    assert p.downtime_s == pytest.approx(0.5)
    assert required_throttle(s) is None


def test_max_rounds_reached() -> None:
    s = scenario(dirty_rate_bytes_per_s=90 * MIB, downtime_limit_s=0.01, max_rounds=3)
    p = predict(s)
    assert not p.converges and p.rounds == 3
    assert "maximum" in p.reason
    assert p.switchover_bytes == pytest.approx(GIB * 0.9**3)


def test_compression_and_zero_pages() -> None:
    # 150 MiB/s dirtying over 100 MiB/s would diverge; 2x compression moves 200 MiB/s.
    plain = scenario(dirty_rate_bytes_per_s=150 * MIB, downtime_limit_s=0.1)
    assert not predict(plain).converges
    packed = predict(dataclasses.replace(plain, compression_ratio=2.0))
    assert packed.converges
    assert packed.bytes_transferred == pytest.approx(
        (sum(packed.round_bytes) + packed.switchover_bytes) / 2
    )
    sparse = predict(scenario(nonzero_ram_bytes=GIB // 4))
    assert sparse.round_bytes == (float(GIB // 4),)
    assert sparse.total_time_s == pytest.approx((GIB // 4) / (100 * MIB))


def test_min_downtime_limit_is_tight() -> None:
    s = scenario(dirty_rate_bytes_per_s=60 * MIB, device_state_bytes=MIB, resume_overhead_s=0.02)
    for rounds in (1, 3, 6):
        limit = min_downtime_limit(s, within_rounds=rounds)
        at = predict(dataclasses.replace(s, downtime_limit_s=limit, max_rounds=rounds))
        assert at.converges and at.rounds <= rounds
        below = dataclasses.replace(s, downtime_limit_s=limit * (1 - 1e-9), max_rounds=rounds)
        assert not predict(below).converges
    assert min_downtime_limit(s, 6) < min_downtime_limit(s, 3) < min_downtime_limit(s, 1)
    with pytest.raises(ValueError):
        min_downtime_limit(s, 0)


def test_min_downtime_limit_of_a_diverging_guest_is_the_first_round() -> None:
    s = scenario(dirty_rate_bytes_per_s=200 * MIB)
    assert min_downtime_limit(s) == pytest.approx(GIB / (100 * MIB))


def test_required_throttle() -> None:
    s = scenario(dirty_rate_bytes_per_s=150 * MIB, downtime_limit_s=0.1, max_rounds=10)
    throttle = required_throttle(s)
    assert throttle is not None and 1 / 3 < throttle < 1
    slowed = dataclasses.replace(s, dirty_rate_bytes_per_s=150 * MIB * (1 - throttle))
    assert predict(slowed).converges
    less = dataclasses.replace(s, dirty_rate_bytes_per_s=150 * MIB * (1 - throttle + 1e-6))
    assert not predict(less).converges
    assert required_throttle(scenario(dirty_rate_bytes_per_s=MIB)) == 0.0


def test_prediction_round_trip() -> None:
    p = predict(scenario(dirty_rate_bytes_per_s=50 * MIB, device_state_bytes=600_000))
    data = json.loads(json.dumps(p.to_dict()))
    assert Prediction.from_dict(data) == p
    with pytest.raises(TypeError):
        Prediction.from_dict({**data, "bogus": 1})


@pytest.mark.parametrize(
    "bad",
    [
        {"ram_bytes": -1},
        {"dirty_rate_bytes_per_s": -1.0},
        {"dirty_rate_bytes_per_s": math.nan},
        {"bandwidth_bytes_per_s": 0.0},
        {"bandwidth_bytes_per_s": math.inf},
        {"downtime_limit_s": -0.1},
        {"max_rounds": 0},
        {"compression_ratio": 0.0},
        {"nonzero_ram_bytes": GIB + 1},
        {"working_set_bytes": -1},
        {"device_state_bytes": -1},
        {"resume_overhead_s": -1.0},
    ],
)
def test_invalid_scenarios(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid pre-copy scenario"):
        scenario(**bad)


scenarios = st.builds(
    PrecopyScenario,
    ram_bytes=st.integers(0, 64 * GIB),
    dirty_rate_bytes_per_s=st.floats(0, 10 * GIB),
    bandwidth_bytes_per_s=st.floats(1e3, 10 * GIB),
    downtime_limit_s=st.floats(0, 5),
    device_state_bytes=st.integers(0, 100 * MIB),
    resume_overhead_s=st.floats(0, 0.5),
    max_rounds=st.integers(1, 50),
    compression_ratio=st.floats(0.5, 8),
)


@settings(max_examples=300, deadline=None)
@given(scenarios)
def test_invariants(s: PrecopyScenario) -> None:
    p = predict(s)
    assert 1 <= p.rounds <= s.max_rounds == s.max_rounds
    assert len(p.round_bytes) == p.rounds
    assert p.downtime_s >= s.fixed_downtime_s
    assert p.total_time_s >= p.downtime_s
    assert p.bytes_transferred >= s.device_state_bytes
    if p.converges:
        assert p.downtime_s <= s.downtime_limit_s
        assert min_downtime_limit(s) <= s.downtime_limit_s
    # Less dirtying never hurts.
    calmer = predict(dataclasses.replace(s, dirty_rate_bytes_per_s=s.dirty_rate_bytes_per_s / 2))
    assert calmer.converges or not p.converges
    throttle = required_throttle(s)
    if throttle is not None:
        slowed = dataclasses.replace(
            s, dirty_rate_bytes_per_s=s.dirty_rate_bytes_per_s * (1 - throttle)
        )
        assert predict(slowed).converges

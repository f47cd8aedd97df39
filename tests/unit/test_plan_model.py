"""The model's extensions for planning: resend compression, compressor speed, post-copy."""

from __future__ import annotations

import dataclasses

import pytest

from dirtytrack.model import PrecopyScenario, predict, predict_postcopy

MIB = 1 << 20


def _s(**kw: float | int | None) -> PrecopyScenario:
    base: dict[str, float | int | None] = {
        "ram_bytes": 128 * MIB,
        "dirty_rate_bytes_per_s": 4 * MIB,
        "bandwidth_bytes_per_s": 10 * MIB,
        "downtime_limit_s": 0.05,
    }
    base.update(kw)
    return PrecopyScenario(**base)  # type: ignore[arg-type]


def test_resend_compression_leaves_the_bulk_round_plain() -> None:
    plain = predict(_s())
    xbzrle = predict(_s(resend_compression_ratio=4.0))
    assert plain.round_bytes[0] == xbzrle.round_bytes[0] == 128 * MIB
    # The first round takes as long; later rounds go four times faster.
    assert xbzrle.total_time_s < plain.total_time_s
    assert xbzrle.total_time_s > 128 * MIB / (10 * MIB)
    assert xbzrle.bytes_transferred < plain.bytes_transferred


def test_compressor_speed_caps_the_raw_rate() -> None:
    fast_link = _s(bandwidth_bytes_per_s=100 * MIB, compression_ratio=3.0)
    assert fast_link.page_bandwidth_bytes_per_s == 300 * MIB
    capped = dataclasses.replace(fast_link, compression_throughput_bytes_per_s=150 * MIB)
    assert capped.page_bandwidth_bytes_per_s == 150 * MIB
    assert predict(capped).total_time_s > predict(fast_link).total_time_s
    with pytest.raises(ValueError, match="compression_throughput"):
        _s(compression_throughput_bytes_per_s=0.0)
    with pytest.raises(ValueError, match="resend_compression_ratio"):
        _s(resend_compression_ratio=0.0)


def test_postcopy_always_ends_with_only_the_fixed_pause() -> None:
    hopeless = _s(dirty_rate_bytes_per_s=50 * MIB, device_state_bytes=600_000,
                  resume_overhead_s=0.01, downtime_limit_s=0.3)  # fmt: skip
    assert not predict(hopeless).converges
    post = predict_postcopy(hopeless)
    assert post.converges and post.rounds == 1
    assert post.downtime_s == pytest.approx(600_000 / (10 * MIB) + 0.01)
    # Bulk round, then the set dirtied meanwhile (capped by RAM) once more.
    assert post.total_time_s == pytest.approx(12.8 + 12.8 + post.downtime_s)
    assert "post-copy after 1 round" in post.reason
    with pytest.raises(ValueError):
        predict_postcopy(hopeless, 0)
    tight = dataclasses.replace(hopeless, downtime_limit_s=0.01)
    assert not predict_postcopy(tight).converges

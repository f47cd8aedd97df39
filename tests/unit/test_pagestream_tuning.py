"""Compression tuning and the switchover decision: pure logic on recorded numbers."""

from __future__ import annotations

import pytest

from migrate.pagestream.planner import SwitchoverPlanner
from migrate.pagestream.tuning import (
    LEVELS,
    CompressionSetting,
    CompressionTuner,
    PipelineSample,
    level_label,
)

COMPRESS_BOUND = PipelineSample(262144, 130000, compress_wait_s=0.004, send_wait_s=0.0005)
LINK_BOUND = PipelineSample(262144, 130000, compress_wait_s=0.0001, send_wait_s=0.010)
BALANCED = PipelineSample(262144, 130000, compress_wait_s=0.002, send_wait_s=0.002)


def feed(tuner: CompressionTuner, sample: PipelineSample, windows: int) -> CompressionSetting:
    setting = tuner.setting
    for _ in range(windows * tuner.window):
        setting = tuner.observe(sample)
    return setting


def test_link_faster_than_compressor_adds_threads_then_lowers_level() -> None:
    tuner = CompressionTuner(max_threads=2, start_level=1)
    assert tuner.setting == CompressionSetting(1, 1)
    assert feed(tuner, COMPRESS_BOUND, 2) == CompressionSetting(1, 2)
    assert feed(tuner, COMPRESS_BOUND, 2) == CompressionSetting(-1, 2)
    # All the way down to raw pages, and no further.
    assert feed(tuner, COMPRESS_BOUND, 20) == CompressionSetting(None, 2)


def test_slow_link_raises_the_level_to_the_top() -> None:
    tuner = CompressionTuner(max_threads=2, start_level=None)
    assert feed(tuner, LINK_BOUND, 2).level == -7
    assert feed(tuner, LINK_BOUND, 40).level == LEVELS[-1]


def test_one_window_against_the_trend_does_not_move_it() -> None:
    tuner = CompressionTuner(max_threads=1, start_level=1, patience=2)
    for _ in range(10):
        feed(tuner, LINK_BOUND, 1)
        feed(tuner, COMPRESS_BOUND, 1)
    assert tuner.setting == CompressionSetting(1, 1)
    assert feed(tuner, BALANCED, 5) == CompressionSetting(1, 1)
    assert tuner.history == [CompressionSetting(1, 1)]


def test_history_records_each_change() -> None:
    tuner = CompressionTuner(max_threads=1, start_level=1)
    feed(tuner, LINK_BOUND, 2)
    feed(tuner, COMPRESS_BOUND, 2)
    assert [s.level for s in tuner.history] == [1, 3, 1]


def test_tuner_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        CompressionTuner(max_threads=0)
    with pytest.raises(ValueError):
        CompressionTuner(max_threads=1, start_level=42)
    with pytest.raises(ValueError):
        CompressionTuner(max_threads=1, patience=0)
    assert level_label(None) == "raw" and level_label(-7) == "-7"


# --- switchover planner -------------------------------------------------------------


def test_no_switch_before_a_throughput_is_known() -> None:
    planner = SwitchoverPlanner()
    verdict = planner.decide(30000, 0.01, 20, 300)
    assert not verdict.switch and verdict.expected_transfer_ms is None
    assert planner.decide(0, 0.01, 20, 300).switch  # nothing to send at all


def test_switch_when_the_rest_fits_the_downtime_limit() -> None:
    planner = SwitchoverPlanner(fixed_downtime_ms=20)
    planner.record_round(pages=25600, duration_s=1.0)  # 100 MiB/s
    big = planner.decide(2560, 0.01, 20, 300)  # 100 ms of pages
    assert not big.switch and big.expected_transfer_ms == pytest.approx(100)
    small = planner.decide(256, 0.01, 20, 300)  # 10 ms
    assert small.switch and "<= downtime limit 20 ms" in small.reason
    # The final sweep overlaps its scan (10 ms) with sending (10 ms).
    assert small.expected_downtime_ms == pytest.approx(max(10, 10) + 20)


def test_stalled_set_switches_only_within_the_hard_maximum() -> None:
    planner = SwitchoverPlanner(fixed_downtime_ms=20, stall_rounds=2)
    planner.record_round(pages=25600, duration_s=1.0)
    # 50 ms of pages each round: over the 20 ms limit, but within 300 ms.
    verdicts = [planner.decide(1280, 0.01, 20, 300) for _ in range(3)]
    assert [v.switch for v in verdicts] == [False, False, True]
    assert "stopped shrinking" in verdicts[-1].reason
    # Same stall with a maximum the downtime cannot meet: keep going.
    strict = SwitchoverPlanner(fixed_downtime_ms=20, stall_rounds=2)
    strict.record_round(pages=25600, duration_s=1.0)
    assert not any(strict.decide(1280, 0.01, 20, 60).switch for _ in range(5))


def test_shrinking_set_is_not_a_stall() -> None:
    planner = SwitchoverPlanner(stall_rounds=2)
    planner.record_round(pages=25600, duration_s=1.0)
    for dirty in (20000, 15000, 10000, 7000):
        assert not planner.decide(dirty, 0.01, 20, 300).switch


def test_round_cap_switches_within_the_maximum() -> None:
    planner = SwitchoverPlanner(max_rounds=3, stall_rounds=100)
    for dirty in (9000, 8000, 7000):
        planner.record_round(pages=25600, duration_s=1.0)
        verdict = planner.decide(dirty // 10, 0.01, 20, 300)
    assert verdict.switch and "3 rounds sent" in verdict.reason

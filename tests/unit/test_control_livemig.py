"""The livemig controller on recorded and synthetic sample sequences (pure logic)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.control.base import ControlContext
from migrate.control.estimate import BandwidthEstimator, remaining_time_ms
from migrate.control.intents import Compress, SetMultifd
from migrate.control.livemig import LivemigController
from migrate.policy import Policy
from migrate.presets import preset
from migrate.report import Decision, Forecast, Predicted, Sample

MIB = 1 << 20

#: A real run (qemu-default settings, so nothing steered it): 128 MiB guest writing
#: 20 MiB/s over a 32 MiB working set, migration link capped at 80 Mbit/s. One row
#: per 500 ms: elapsed ms, remaining KiB, transferred KiB, dirty-sync-count,
#: dirty-pages-rate, cpu-throttle-percentage. The set after every round is ~31 MiB:
#: it never converges. calc-dirty-rate measured 21 MiB/s before the start.
RECORDED_STALL = [
    (4, 130640, 254, 1, 0, 0), (513, 124912, 5993, 1, 0, 0), (1034, 120532, 10382, 1, 0, 0),
    (1550, 113972, 15439, 1, 0, 0), (2014, 109720, 19700, 1, 0, 0),
    (2533, 104820, 24609, 1, 0, 0), (3045, 100048, 29391, 1, 0, 0),
    (3566, 95276, 34164, 1, 0, 0), (4096, 90376, 39074, 1, 0, 0), (4552, 85996, 42682, 1, 0, 0),
    (5067, 80968, 47720, 1, 0, 0), (5503, 74240, 51526, 1, 0, 0), (6022, 68652, 56733, 1, 0, 0),
    (6537, 63592, 61615, 1, 0, 0), (7056, 57032, 66325, 1, 0, 0), (7574, 45476, 71069, 1, 0, 0),
    (8085, 39552, 75965, 1, 0, 0), (8597, 35168, 80357, 1, 0, 0), (9003, 31300, 84233, 1, 0, 0),
    (9539, 25508, 90036, 1, 0, 0), (10067, 14604, 94775, 1, 0, 0), (10579, 9844, 99349, 1, 0, 0),
    (11100, 4956, 104246, 1, 0, 0), (11575, 32488, 108760, 2, 714, 0),
    (12087, 27924, 113333, 2, 714, 0), (12601, 23092, 117975, 2, 714, 0),
    (13025, 19048, 121871, 2, 714, 0), (13538, 14416, 126512, 2, 714, 0),
    (14045, 9140, 131794, 2, 714, 0), (14556, 4508, 136435, 2, 714, 0),
    (15059, 31432, 140948, 3, 2255, 0), (15575, 26800, 145589, 3, 2255, 0),
    (16081, 21524, 150876, 3, 2255, 0), (16589, 16508, 155537, 3, 2255, 0),
    (17099, 12004, 160050, 3, 2255, 0), (17509, 8144, 163918, 3, 2255, 0),
    (18018, 3640, 168427, 3, 2255, 0), (18542, 29112, 173841, 4, 2356, 0),
    (19053, 24608, 178354, 4, 2356, 0), (19564, 19976, 182995, 4, 2356, 0),
    (20052, 14960, 187605, 4, 2356, 0), (20566, 10328, 192246, 4, 2356, 0),
    (21080, 5824, 196759, 4, 2356, 0), (21516, 32108, 201396, 5, 2355, 0),
    (22028, 27604, 205909, 5, 2355, 0),
]  # fmt: skip


def _samples(rows: Iterable[tuple[int, int, int, int, int, int]]) -> list[Sample]:
    return [
        Sample(
            time=1000 + ms / 1e3,
            elapsed_ms=float(ms),
            status="active",
            ram_total_bytes=128 * MIB,
            ram_remaining_bytes=rem << 10,
            ram_transferred_bytes=xfer << 10,
            dirty_pages_rate=rate,
            dirty_sync_count=sync,
            cpu_throttle_pct=throttle,
        )
        for ms, rem, xfer, sync, rate, throttle in rows
    ]


def _predicted(dirty_mibps: float, forecasts: Sequence[Forecast] = ()) -> Predicted:
    return Predicted(
        ram_bytes=128 * MIB,
        dirty_rate_bytes_per_s=dirty_mibps * MIB,
        dirty_rate_method="test",
        bandwidth_bytes_per_s=9.1 * MIB,
        bandwidth_source="link cap 80 Mbit/s",
        device_state_bytes=600_000,
        resume_overhead_ms=15,
        forecasts=tuple(forecasts),
        recommendation="",
        recommendation_reason="",
        compression_ratios={"zstd": 2.9, "xbzrle": 1.8},
        policy_forecast=forecasts[0] if forecasts else None,
    )


def _run(controller: LivemigController, samples: Iterable[Sample]) -> list[tuple[float, Decision]]:
    controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0.0))
    seen = []
    for sample in samples:
        for decision in controller.on_sample(sample):
            seen.append((sample.elapsed_ms, decision))
        if controller.aborted:
            break
    return seen


def _limits(decisions: Iterable[tuple[float, Decision]]) -> list[float]:
    return [
        float(d.arguments["downtime-limit"])
        for _, d in decisions
        if "downtime-limit" in d.arguments
    ]


def test_recorded_stall_is_judged_after_the_bulk_round_and_aborted_once_seen() -> None:
    # livemig without levers (the default allows a throttle: see the next test)
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=0)
    controller = LivemigController(policy, _predicted(21))
    decisions = _run(controller, _samples(RECORDED_STALL))
    # After the bulk round (11.6 s) the model says 31 MiB at ~9 MiB/s cannot fit:
    # the limit goes straight to the policy maximum.
    first_at, first = decisions[0]
    assert first_at == 11575 and first.arguments == {"downtime-limit": 300}
    assert "> policy maximum 300 ms" in first.reason
    # One round later the set has not shrunk: nothing is left (no throttle, no
    # post-copy), so it aborts with every lever named.
    abort_at, abort = decisions[-1]
    assert abort.action == "abort" and abort_at == 15059
    assert "has not shrunk" in abort.reason or "will not fit" in abort.reason
    assert "no throttle allowed" in abort.reason and "post-copy not allowed" in abort.reason
    assert len(decisions) == 2


def test_recorded_stall_with_throttle_allowed_throttles_then_climbs() -> None:
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=99)
    controller = LivemigController(policy, _predicted(21))
    start = controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0))
    caps = [d for d in start if d.command == "migrate-set-capabilities"]
    assert caps and caps[0].side == "both"
    assert {"capability": "auto-converge", "state": True} in caps[0].arguments["capabilities"]
    armed = [d for d in start if "max-cpu-throttle" in d.arguments]
    assert armed[0].arguments["max-cpu-throttle"] == 1  # nothing until it decides
    decisions = []
    samples = _samples(RECORDED_STALL)
    for sample in samples:
        decisions += [(sample.elapsed_ms, d) for d in controller.on_sample(sample)]
    throttles = [d for _, d in decisions if "max-cpu-throttle" in d.arguments]
    assert throttles, decisions
    first = throttles[0].arguments
    assert 30 <= first["max-cpu-throttle"] <= 99
    assert first["cpu-throttle-initial"] == first["max-cpu-throttle"]
    assert not any(d.action == "abort" for _, d in decisions)
    # The level has not been applied by QEMU in the recording (throttle stays 0):
    # the controller waits for it rather than stacking more levels.
    assert len(throttles) == 1


def _stall_rows(start_ms: int, rounds: int, throttle: Sequence[int], shrink: bool = False,
                round_ms: int = 3400) -> list[tuple[int, int, int, int, int, int]]:  # fmt: skip
    """Synthetic rounds after the bulk one: 32 MiB sets (or shrinking), 9 MiB/s."""
    rows = []
    transferred = 110 * 1024 + (start_ms - 11000) * 9
    remaining = 32 * 1024
    for i in range(rounds):
        sync = 2 + i
        if shrink:
            remaining = max(256, remaining // 3)
        for step in range(0, round_ms, 500):
            left = max(0, remaining - step * 9)
            rows.append((start_ms + i * round_ms + step, left, transferred, sync, 2300,
                         throttle[min(i, len(throttle) - 1)]))  # fmt: skip
            transferred += 4600
    return rows


def _bulk() -> list[tuple[int, int, int, int, int, int]]:
    return [(ms, 128 * 1024 - ms * 9, ms * 9, 1, 0, 0) for ms in range(0, 11000, 500)]


def test_throttle_climbs_only_after_qemu_applied_it_and_the_set_did_not_shrink() -> None:
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=95)
    controller = LivemigController(policy, _predicted(21))
    # QEMU applies whatever was last asked a round later; the set never shrinks.
    applied: list[int] = [0]
    decisions = controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0))
    for sample in _samples(_bulk()):
        decisions += controller.on_sample(sample)
    for rnd in range(12):
        rows = _stall_rows(11000 + rnd * 3400, 1, [applied[-1]])
        rows = [(ms, rem, xfer, 2 + rnd, rate, thr) for ms, rem, xfer, _, rate, thr in rows]
        for sample in _samples(rows):
            for d in controller.on_sample(sample):
                decisions.append(d)
        applied.append(controller.throttle_target)
        if controller.aborted:
            break
    levels = [
        int(d.arguments["max-cpu-throttle"]) for d in decisions if "max-cpu-throttle" in d.arguments
    ]
    assert levels[0] == 1  # armed at start
    assert levels[1:] == sorted(levels[1:]) and len(set(levels[1:])) == len(levels[1:])
    assert max(levels) == 95  # never above the policy
    assert decisions[-1].action == "abort"
    assert "throttle at the maximum 95%" in decisions[-1].reason


def test_a_working_throttle_is_left_alone() -> None:
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=99)
    controller = LivemigController(policy, _predicted(21))
    decisions = _run(controller, _samples(_bulk() + _stall_rows(11000, 3, [0, 60, 60])))
    target = controller.throttle_target
    assert target >= 30
    # Now the set shrinks under the applied level: no new level, no abort.
    more = _run_more(controller, _samples(_stall_rows(21200, 4, [target], shrink=True)))
    assert not [d for d in more if "max-cpu-throttle" in d.arguments]
    assert not [d for d in more if d.action == "abort"]
    assert decisions


def _run_more(controller: LivemigController, samples: Iterable[Sample]) -> list[Decision]:
    out = []
    for sample in samples:
        # Rounds continue the numbering of the earlier ones.
        shifted = dataclasses.replace(sample, dirty_sync_count=sample.dirty_sync_count + 10)
        out += controller.on_sample(shifted)
    return out


def test_postcopy_instead_of_abort_when_allowed() -> None:
    # No throttle allowed: post-copy is the lever left (a throttle would come first).
    policy = dataclasses.replace(preset("livemig"), postcopy_allowed=True, max_throttle_pct=0)
    controller = LivemigController(policy, _predicted(21))
    start = controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0))
    caps = next(d for d in start if d.command == "migrate-set-capabilities")
    assert {"capability": "postcopy-ram", "state": True} in caps.arguments["capabilities"]
    decisions = [d for _, d in _run(controller, _samples(RECORDED_STALL))]
    assert decisions[-1].action == "postcopy"
    assert decisions[-1].command == "migrate-start-postcopy"
    assert not any(d.action == "abort" for d in decisions)
    # Nothing more once post-copy runs.
    assert controller.on_sample(_samples([(30000, 1, 1, 9, 1, 0)])[0]) == []


def test_total_time_budget_aborts() -> None:
    policy = dataclasses.replace(preset("livemig"), max_total_time_s=5.0)
    controller = LivemigController(policy, _predicted(0.1))
    decisions = _run(controller, _samples(_bulk()))
    assert decisions[-1][1].action == "abort"
    assert "exceeds the policy's 5 s" in decisions[-1][1].reason
    assert decisions[-1][0] > 5000


def test_a_light_guest_gets_no_decision_after_the_start() -> None:
    rows = [(ms, 100 * 1024 - ms * 100, ms * 100, 1, 0, 0) for ms in range(0, 1000, 100)]
    rows += [(1000 + ms, 200, 102400 + ms, 2, 30, 0) for ms in range(0, 300, 100)]
    controller = LivemigController(preset("livemig"), _predicted(0.1))
    assert _run(controller, _samples(rows)) == []


def test_a_set_that_fits_on_paper_gets_a_matching_limit() -> None:
    # 6 MiB left each round at ~9 MiB/s: 20 ms is too little, 300 ms would do.
    rows = _bulk() + _stall_rows(11000, 3, [0], round_ms=1000)
    rows = [(ms, min(rem, 6 * 1024), xfer, sync, 400, thr) for ms, rem, xfer, sync, _, thr in rows]
    controller = LivemigController(preset("livemig"), _predicted(0.3))
    decisions = _run(controller, _samples(rows))
    limits = _limits(decisions)
    assert limits and 20 < limits[0] <= 300
    assert "at the measured bandwidth" in decisions[0][1].reason


def test_compression_follows_the_plan_for_the_policy() -> None:
    zstd = Forecast("native + multifd zstd, downtime-limit 20 ms", True, 1, 3600, 80, 30e6,
                    "fits", downtime_limit_ms=20, compression="zstd")  # fmt: skip
    plain = dataclasses.replace(zstd, setting="native", total_time_ms=10300, compression="none")
    controller = LivemigController(preset("livemig"), _predicted(0, [zstd, plain]))
    start = controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0))
    both = [d for d in start if d.side == "both"]
    assert any(d.arguments.get("multifd-compression") == "zstd" for d in both)
    assert any({"capability": "multifd", "state": True} in d.arguments.get("capabilities", [])
               for d in both)  # fmt: skip
    assert "zstd pays" in both[0].reason and "10.3 s without" in both[0].reason
    # Not allowed by the policy: nothing.
    off = dataclasses.replace(preset("livemig"), compression_allowed=False)
    quiet = LivemigController(off, _predicted(0, [zstd, plain])).start(
        ControlContext(ram_bytes=128 * MIB, started_monotonic=0)
    )
    assert not [d for d in quiet if d.has(Compress) or d.has(SetMultifd)]


def test_bandwidth_estimator_uses_a_window_not_single_gaps() -> None:
    estimator = BandwidthEstimator(window_ms=2000, min_span_ms=400)
    assert estimator.bytes_per_s is None
    # Bursty: 4 MiB then nothing, every 100 ms, averaging 20 MiB/s.
    transferred = 0
    for step in range(40):
        transferred += 4 * MIB if step % 2 == 0 else 0
        estimator.add(Sample(time=0, elapsed_ms=step * 100.0, status="active",
                             ram_transferred_bytes=transferred))  # fmt: skip
    rate = estimator.bytes_per_s
    assert rate is not None and 18 * MIB < rate < 23 * MIB
    assert remaining_time_ms(10 * MIB, 5 * MIB, 10 * MIB) == 2000.0
    assert remaining_time_ms(10 * MIB, 10 * MIB, 10 * MIB) is None


rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 130 * 1024),  # remaining KiB
        st.integers(0, 20 * 1024),  # KiB sent since the previous sample
        st.booleans(),  # a new round starts
        st.integers(0, 10000),  # dirty pages rate
        st.integers(0, 99),  # throttle QEMU reports
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(
    rows_strategy,
    st.integers(0, 99),
    st.booleans(),
    st.floats(10, 2000),
    st.one_of(st.none(), st.floats(1, 60)),
)
def test_decisions_respect_the_policy_whatever_the_samples(
    rows: list[tuple[int, int, bool, int, int]],
    max_throttle: int,
    postcopy: bool,
    max_downtime: float,
    budget: float | None,
) -> None:
    policy = Policy(
        max_throttle_pct=max_throttle,
        postcopy_allowed=postcopy,
        max_downtime_ms=max_downtime,
        max_total_time_s=budget,
    )
    controller = LivemigController(policy, _predicted(15))
    decisions = controller.start(ControlContext(ram_bytes=128 * MIB, started_monotonic=0))
    elapsed, sent, sync = 0, 0, 1
    ended = False
    for remaining, step, new_round, rate, throttle in rows:
        elapsed += 250
        sent += step
        sync += int(new_round)
        sample = Sample(time=elapsed / 1e3, elapsed_ms=float(elapsed), status="active",
                        ram_remaining_bytes=remaining << 10, ram_transferred_bytes=sent << 10,
                        dirty_pages_rate=rate, dirty_sync_count=sync,
                        cpu_throttle_pct=throttle)  # fmt: skip
        got = controller.on_sample(sample)
        assert not (ended and got), "decisions after abort or post-copy"
        decisions += got
        ended = ended or any(d.action in ("abort", "postcopy") for d in got)
    for d in decisions:
        if "downtime-limit" in d.arguments:
            assert d.arguments["downtime-limit"] <= max(max_downtime, 20) + 1
        if "max-cpu-throttle" in d.arguments:
            assert d.arguments["max-cpu-throttle"] <= max(max_throttle, 1)
        if d.action == "postcopy":
            assert postcopy
        assert d.reason
    assert sum(d.action in ("abort", "postcopy") for d in decisions) <= 1

from migrate.control.base import ControlContext
from migrate.control.static import StaticController
from migrate.policy import Policy
from migrate.report import Sample


def test_static_controller_starts_with_policy_settings() -> None:
    policy = Policy(downtime_limit_ms=20, max_downtime_ms=300, max_bandwidth_bytes_per_s=0)
    decisions = StaticController(policy).start(
        ControlContext(ram_bytes=1 << 28, started_monotonic=0)
    )
    params = decisions[0].arguments
    assert decisions[0].command == "migrate-set-parameters" and decisions[0].side == "source"
    assert params["downtime-limit"] == 20
    assert params["max-bandwidth"] == 1 << 40  # 0 means "no cap"
    announce = [d for d in decisions if d.side == "target"]
    assert announce and announce[0].arguments == {"announce-initial": 0}


def test_start_limit_never_exceeds_the_hard_ceiling() -> None:
    policy = Policy(
        downtime_limit_ms=500, max_downtime_ms=100, announce_initial_ms=None,
        max_bandwidth_bytes_per_s=None,
    )  # fmt: skip
    decisions = StaticController(policy).start(ControlContext(ram_bytes=1, started_monotonic=0))
    assert decisions[0].arguments == {"downtime-limit": 100}  # None: QEMU's cap stays
    assert len(decisions) == 1


def test_aborts_past_total_time() -> None:
    controller = StaticController(Policy(max_total_time_s=2.0))
    assert controller.on_sample(Sample(time=1.0, elapsed_ms=1500, status="active")) == []
    (abort,) = controller.on_sample(Sample(time=1.0, elapsed_ms=2500, status="active"))
    assert abort.action == "abort" and "2.5 s" in abort.reason

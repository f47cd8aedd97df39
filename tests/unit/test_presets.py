"""Named policies and the peers' schedules, replayed on synthetic sample sequences."""

from __future__ import annotations

import dataclasses

import pytest

from migrate.control.base import UNLIMITED_BANDWIDTH, ControlContext, round_powerof2
from migrate.control.livemig import LivemigController
from migrate.control.nova import NovaController, nova_data_gb, nova_downtime_steps
from migrate.control.ovirt import OvirtController
from migrate.control.proxmox import ProxmoxController
from migrate.control.static import HandsOffController, StaticController
from migrate.errors import ConfigError
from migrate.presets import PRESET_NAMES, controller_for, preset
from migrate.report import Decision, Sample

MIB = 1 << 20
GIB = 1 << 30


def _ctx(ram: int = 128 * MIB) -> ControlContext:
    return ControlContext(ram_bytes=ram, started_monotonic=0.0)


def _sample(elapsed_ms: float, remaining: int = 50 * MIB, transferred: int = 0,
            sync: int = 1, status: str = "active") -> Sample:  # fmt: skip
    return Sample(
        time=1000 + elapsed_ms / 1e3,
        elapsed_ms=elapsed_ms,
        status=status,
        ram_total_bytes=128 * MIB,
        ram_remaining_bytes=remaining,
        ram_transferred_bytes=transferred,
        dirty_sync_count=sync,
    )


def _limits(decisions: list[Decision]) -> list[int]:
    return [
        int(d.arguments["downtime-limit"]) for d in decisions if "downtime-limit" in d.arguments
    ]


def test_every_name_has_a_policy_and_a_controller() -> None:
    assert PRESET_NAMES == ("livemig", "qemu-default", "proxmox", "nova", "ovirt-minimal-downtime")
    kinds = {
        "livemig": LivemigController,
        "qemu-default": StaticController,
        "proxmox": ProxmoxController,
        "nova": NovaController,
        "ovirt-minimal-downtime": OvirtController,
    }
    for name in PRESET_NAMES:
        policy = preset(name)
        assert policy.name == name
        assert isinstance(controller_for(policy), kinds[name])
        # A customised preset keeps its controller.
        custom = dataclasses.replace(policy, max_downtime_ms=1000)
        assert isinstance(controller_for(custom), kinds[name])


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: livemig, qemu-default, proxmox"):
        preset("vmware")
    with pytest.raises(ConfigError, match="unknown controller"):
        controller_for(dataclasses.replace(preset("livemig"), controller="magic"))


def test_qemu_default_is_qemus_defaults_and_never_aborts() -> None:
    policy = preset("qemu-default")
    (params,) = controller_for(policy).start(_ctx())
    assert params.arguments == {"downtime-limit": 300, "max-bandwidth": 128 * MIB}
    assert policy.capabilities == () and policy.max_total_time_s is None
    controller = controller_for(policy)
    assert controller.on_sample(_sample(10_000_000)) == []


def test_the_hands_off_controller_sets_and_steers_nothing() -> None:
    # libvirt-default in the bench: libvirt's migration left alone.
    controller = controller_for(dataclasses.replace(preset("livemig"), controller="none"))
    assert isinstance(controller, HandsOffController)
    assert controller.start(_ctx()) == []
    assert controller.on_sample(_sample(10_000_000, remaining=MIB)) == []


def test_livemig_starts_at_20_ms_and_announces_early() -> None:
    decisions = controller_for(preset("livemig")).start(_ctx())
    # No bandwidth cap (like Proxmox and Nova): QEMU's 128 MiB/s default made the
    # uncapped lab migration ~4x slower at the same downtime.
    assert decisions[0].arguments == {"downtime-limit": 20, "max-bandwidth": UNLIMITED_BANDWIDTH}
    assert any(d.side == "target" and d.arguments == {"announce-initial": 0} for d in decisions)


def test_round_powerof2_rounds_up_like_proxmox() -> None:
    assert [round_powerof2(v) for v in (0, 1, 2, 3, 4, 5, 1000)] == [1, 1, 2, 4, 4, 8, 1024]
    assert round_powerof2(int(128 * MIB / 10)) == 16 * MIB
    assert round_powerof2(int(256 * MIB / 10)) == 32 * MIB
    assert round_powerof2(int(1024 * MIB / 10)) == 128 * MIB


def test_proxmox_start_settings() -> None:
    policy = preset("proxmox")
    assert dict(policy.capabilities) == {"auto-converge": True, "xbzrle": True}
    (params,) = controller_for(policy).start(_ctx(256 * MIB))
    assert params.arguments == {
        "max-bandwidth": 16 * GIB,
        "downtime-limit": 100,
        "xbzrle-cache-size": 32 * MIB,
    }


def test_proxmox_doubles_after_more_than_five_bad_polls_and_never_aborts() -> None:
    controller = ProxmoxController(preset("proxmox"))
    controller.start(_ctx())
    # Before the first second nothing is polled.
    assert controller.on_sample(_sample(500, remaining=10 * MIB, transferred=1)) == []
    limits: list[int] = []
    doubled_at: list[int] = []
    remaining, transferred = 60 * MIB, 0
    for second in range(1, 40):
        # Remaining rises on every poll: a guest outrunning the link.
        remaining += MIB
        transferred += 5 * MIB
        decisions = controller.on_sample(_sample(second * 1000, remaining, transferred))
        assert all(d.action != "abort" for d in decisions)
        if decisions:
            doubled_at.append(second)
        limits += _limits(decisions)
    # The first poll has no previous remaining; then every 6th rising poll doubles.
    assert doubled_at == [7, 13, 19, 25, 31, 37]
    assert limits == [200, 400, 800, 1600, 3200, 6400]


def test_proxmox_counts_zero_remaining_and_ignores_polls_without_progress() -> None:
    controller = ProxmoxController(preset("proxmox"))
    controller.start(_ctx())
    limits = []
    for second in range(1, 30):
        # No progress: transferred unchanged, nothing counted.
        limits += _limits(controller.on_sample(_sample(second * 1000, 0, transferred=MIB)))
    assert limits == []


def test_nova_steps_follow_the_linear_function() -> None:
    assert nova_data_gb(128 * MIB) == 2.0  # at least 2 GiB
    assert nova_data_gb(3 * GIB) == 3.0
    steps = nova_downtime_steps(2.0)
    assert steps[0] == (0, 50) and steps[1] == (150, 95) and steps[-1] == (1500, 500)
    assert len(steps) == 11
    # The example in Nova's docstring: 400 ms, 30 s delay, 3 GB.
    example = nova_downtime_steps(3.0, downtime_ms=400, steps=10, delay_s=30)
    assert example[:3] == [(0, 40), (90, 76), (180, 112)] and example[-1] == (900, 400)


def test_nova_sets_50ms_on_the_first_poll_then_steps_and_aborts_after_800s_per_gib() -> None:
    controller = NovaController(preset("nova"))
    (start,) = controller.start(_ctx())
    assert start.arguments == {"max-bandwidth": 1 << 40}
    assert _limits(controller.on_sample(_sample(5))) == [50]
    assert controller.on_sample(_sample(300)) == []  # within the same 0.5 s poll
    assert controller.on_sample(_sample(600)) == []  # same step
    assert _limits(controller.on_sample(_sample(150_500))) == [95]
    assert _limits(controller.on_sample(_sample(1_500_600))) == [500]
    assert controller.on_sample(_sample(1_599_000)) == []
    (abort,) = controller.on_sample(_sample(1_600_600))
    assert abort.action == "abort" and "1600 s" in abort.reason


def test_ovirt_schedule_by_iteration_then_abort() -> None:
    policy = preset("ovirt-minimal-downtime")
    assert dict(policy.capabilities) == {"auto-converge": True}
    controller = OvirtController(policy)
    (init,) = controller.start(_ctx())
    assert init.arguments == {"downtime-limit": 100}
    # vdsm looks every 10 s; the first look only records the iteration.
    assert controller.on_sample(_sample(9_000, sync=3)) == []
    assert controller.on_sample(_sample(10_000, sync=3)) == []
    actions: list[Decision] = []
    for look in range(1, 12):
        actions += controller.on_sample(_sample(10_000 + look * 10_000, sync=3 + look))
    limits = _limits(actions)
    assert limits == [150, 200, 300, 400, 500]
    assert actions[-1].action == "abort"
    # Looks at which the iteration did not move do nothing.
    quiet = OvirtController(policy)
    quiet.start(_ctx())
    for look in range(1, 10):
        assert quiet.on_sample(_sample(look * 10_000, sync=2)) == []

"""Typed intents: QEMU's rendering, decoding by kind, and the decision's derived fields."""

from __future__ import annotations

import json

import pytest

from migrate.codec import from_dict, to_dict
from migrate.control.intents import (
    QEMU_MAX_DOWNTIME_MS,
    Abort,
    ArmAutoConverge,
    ArmPostcopy,
    CapBandwidth,
    Compress,
    SetDowntimeLimit,
    SetXbzrleCache,
    StartPostcopy,
    SwitchoverNow,
    Throttle,
    qemu_command,
)
from migrate.report import Decision, Outcome


def test_parameters_of_one_decision_merge_into_one_command() -> None:
    command, args, side = qemu_command((SetDowntimeLimit(20), CapBandwidth(1 << 30)))
    assert (command, side) == ("migrate-set-parameters", "source")
    assert args == {"downtime-limit": 20, "max-bandwidth": 1 << 30}
    command, args, _ = qemu_command((Throttle(10, 5, 40),))
    assert args == {"cpu-throttle-initial": 10, "cpu-throttle-increment": 5, "max-cpu-throttle": 40}


def test_capabilities_render_for_both_sides() -> None:
    command, args, side = qemu_command((Compress("xbzrle"), ArmAutoConverge(), ArmPostcopy()))
    assert (command, side) == ("migrate-set-capabilities", "both")
    assert args == {"capabilities": [{"capability": "xbzrle", "state": True},
                                     {"capability": "auto-converge", "state": True},
                                     {"capability": "postcopy-ram", "state": True}]}  # fmt: skip


def test_intents_needing_two_commands_are_refused() -> None:
    with pytest.raises(ValueError, match="more than one"):
        qemu_command((SetDowntimeLimit(20), ArmAutoConverge()))
    with pytest.raises(ValueError):
        Decision(0.0, "x", (StartPostcopy(), SetDowntimeLimit(1)))


def test_decision_fields_derive_from_intents_and_survive_json() -> None:
    decision = Decision(1.0, "operator", (SwitchoverNow(),))
    assert decision.action == "switchover-now"
    assert decision.arguments == {"downtime-limit": QEMU_MAX_DOWNTIME_MS}
    assert Decision(1.0, "stop", (Abort(),)).command is None
    settled = decision.settled(Outcome.REJECTED, "no lever")
    data = json.loads(json.dumps(to_dict(settled)))
    assert data["intents"] == [{"kind": "switchover-now"}] and data["outcome"] == "rejected"
    assert from_dict(Decision, data) == settled
    # empty intents of the same shape are told apart by their kind
    assert from_dict(Decision, to_dict(Decision(1.0, "x", (StartPostcopy(),)))).has(StartPostcopy)
    with pytest.raises(ValueError):
        from_dict(Decision, {**data, "intents": [{"kind": "teleport"}]})


def test_a_decision_recorded_before_intents_reads_back() -> None:
    legacy = {"time": 1.0, "action": "set-parameters", "reason": "start",
              "command": "migrate-set-parameters", "side": "source",
              "arguments": {"downtime-limit": 20, "max-bandwidth": 1 << 40,
                            "xbzrle-cache-size": 1 << 24}}  # fmt: skip
    decision = from_dict(Decision, legacy)
    assert decision.intents == (
        SetDowntimeLimit(20),
        CapBandwidth(1 << 40),
        SetXbzrleCache(1 << 24),
    )
    assert decision.arguments == legacy["arguments"] and decision.outcome is Outcome.PROPOSED
    caps = {"time": 1.0, "action": "set-capabilities", "reason": "r",
            "command": "migrate-set-capabilities", "side": "both",
            "arguments": {"capabilities": [{"capability": "auto-converge", "state": True}]}}  # fmt: skip
    assert from_dict(Decision, caps).intents == (ArmAutoConverge(),)
    assert from_dict(Decision, {"time": 2.0, "action": "abort", "reason": "x"}).has(Abort)

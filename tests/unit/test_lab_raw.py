"""Raw peers (``lab.raw``) against two fake QEMUs: what each peer sets, where, when it
resumes the target, and how an abort, a failure or a hang ends.

The fakes (:mod:`tests.fakes.qmp`) advance the migration at each ``query-migrate`` on
the source, so the driver's observation samples (every 10 ms here) move it along;
the peers' own polls keep their real cadence (Proxmox: 1 s).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from bench.scenario import PEER_POLICIES
from lab.raw import RAW_PEERS, RawPeer, RawPeerRun, Resume, raw_peer
from migrate.control.base import GIB, UNLIMITED_BANDWIDTH, ControlContext, abort, round_powerof2
from migrate.errors import ConfigError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged, Progress
from migrate.phase import Phase
from migrate.policy import Policy
from migrate.report import Decision, Integrity, MigrationReport, Outcome, Sample, Status
from tests.fakes import FakeQmp, fake_pair
from tests.fakes.qmp import DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS

URI = "tcp:198.19.0.2:4444"
RAM = 128 << 20


def _run(
    peer: RawPeer,
    source: FakeQmp,
    target: FakeQmp,
    bus: EventBus | None = None,
    **kwargs: object,
) -> MigrationReport:
    run = RawPeerRun(peer, source, target, URI, events=bus, observe_interval_s=0.01, **kwargs)  # type: ignore[arg-type]
    return asyncio.run(asyncio.wait_for(run.run(), 10.0))


def _set(fake: FakeQmp) -> dict[str, object]:
    """Parameters ``fake`` was given (merged, in order)."""
    out: dict[str, object] = {}
    for call in fake.calls_to("migrate-set-parameters"):
        out.update(call.arguments or {})
    return out


def _caps_on(fake: FakeQmp) -> set[str]:
    return {k for k, v in fake.capabilities.items() if v and not DEFAULT_CAPABILITIES[k]}


def test_every_peer_preset_has_a_raw_peer() -> None:
    assert set(RAW_PEERS) == set(PEER_POLICIES)
    assert raw_peer("raw:proxmox") is raw_peer("proxmox") is RAW_PEERS["proxmox"]
    assert raw_peer("qemu-default").resume is Resume.AUTOSTART
    assert not Resume.AUTOSTART.target_paused and Resume.AT_POLL.target_paused
    with pytest.raises(ConfigError, match="raw:nova"):
        raw_peer("vmware")


def test_plain_qemu_sets_nothing_and_the_target_starts_by_itself() -> None:
    source, target = fake_pair(autostart=True, ram_bytes=RAM)
    bus = EventBus()
    report = _run(raw_peer("qemu-default"), source, target, bus=bus)

    assert report.status is Status.COMPLETED, report.error
    assert report.policy == "raw:qemu-default" and report.strategy == "raw"
    assert report.integrity is Integrity.UNCHECKED and "not compared" in report.integrity_detail
    # Nobody steers: only the events capability (for the timeline), no parameters.
    assert _caps_on(source) == _caps_on(target) == {"events"}
    assert source.parameters == target.parameters == DEFAULT_PARAMETERS
    assert report.decisions == ()
    # QEMU resumed the target itself; the source quit afterwards.
    assert target.count("cont") == 0 and target.running
    assert not source.alive and source.commands[-1] == "quit"
    world = source.world
    assert world.position("target", "event", "RESUME") < world.position("source", "command", "quit")
    assert world.violations == []
    tl = report.timeline
    assert tl.source_stop_ms is not None and tl.target_resume_ms is not None
    assert tl.stop_to_resume_ms is not None and tl.stop_to_resume_ms >= 0
    assert report.total_time_ms == tl.target_resume_ms
    assert report.downtime_ms == 12 and report.transferred_bytes == RAM
    assert report.samples and report.samples[-1].status == "completed"
    kinds = [type(e) for e in bus.history]
    assert kinds[0] is PhaseChanged and kinds[-1] is Finished and Progress in kinds
    phases = [e.phase for e in bus.history if isinstance(e, PhaseChanged)]
    assert phases == [Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMPLETED]


def test_proxmox_sets_its_settings_on_the_source_and_resumes_at_its_own_poll() -> None:
    source, target = fake_pair(autostart=False, ram_bytes=RAM)
    report = _run(raw_peer("proxmox"), source, target)

    assert report.status is Status.COMPLETED, report.error
    assert _caps_on(source) == {"events", "auto-converge", "xbzrle"}
    assert _caps_on(target) == {"events"}  # set_migration_caps runs on the source only
    assert _set(source) == {
        "max-bandwidth": 16 * GIB,
        "downtime-limit": 100,
        "xbzrle-cache-size": round_powerof2(RAM // 10),
    }
    assert target.count("migrate-set-parameters") == 0
    # The fake completes within ~30 ms; Proxmox first looks after 1 s and only then
    # resumes the target (-S until then).
    world = source.world
    migrate = world.entries("source", "command", "migrate")[0].at
    completed = world.entries("source", "migration", "completed")[0].at
    cont = world.entries("target", "command", "cont")[0].at
    assert completed - migrate < 0.5 <= 1.0 <= cont - migrate
    assert report.timeline.target_resume_ms is not None
    assert report.timeline.target_resume_ms >= 1000
    assert world.violations == []
    assert [d.outcome for d in report.decisions] == [Outcome.APPLIED]


def test_a_libvirt_peer_continues_at_pre_switchover_and_resumes_on_the_targets_event() -> None:
    source, target = fake_pair(autostart=False, ram_bytes=RAM)
    report = _run(raw_peer("nova"), source, target)

    assert report.status is Status.COMPLETED, report.error
    assert _caps_on(source) == {"events", "pause-before-switchover"}
    assert _caps_on(target) == {"events", "late-block-activate"}
    (cont,) = source.calls_to("migrate-continue")
    assert cont.arguments == {"state": "pre-switchover"}
    # Nova's first look sets 50 ms; libvirt's bandwidth is unlimited.
    assert _set(source) == {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 50}
    world = source.world
    assert world.position("target", "migration", "completed") < world.position(
        "target", "command", "cont"
    )
    tl = report.timeline
    assert tl.target_resume_ms is not None and tl.target_resume_ms < 1000
    assert world.violations == []


@dataclass
class AbortAtOnce:
    """A controller that gives up at its first sample."""

    policy: Policy = field(default_factory=lambda: Policy(name="test"))

    def start(self, context: ControlContext) -> list[Decision]:
        del context
        return []

    def on_sample(self, sample: Sample) -> list[Decision]:
        return [abort(sample.time, "test: maintenance window closed")]


def test_an_abort_cancels_and_the_vm_stays_on_the_source() -> None:
    source, target = fake_pair(autostart=False, precopy_polls=None, ram_bytes=RAM)
    report = _run(raw_peer("nova"), source, target, controller=AbortAtOnce())

    assert report.status is Status.ABORTED
    assert report.error == "test: maintenance window closed"
    assert "migrate_cancel" in source.commands and source.running
    assert not target.running and target.count("cont") == 0
    assert report.decisions[-1].outcome is Outcome.APPLIED
    assert source.world.violations == []


def test_a_failed_migration_leaves_the_vm_on_the_source() -> None:
    source, target = fake_pair(autostart=True, ram_bytes=RAM)
    target.on("migrate-incoming", {})  # answers, but nothing listens
    report = _run(raw_peer("qemu-default"), source, target)

    assert report.status is Status.FAILED
    assert report.error is not None and "Connection refused" in report.error
    assert source.running and not target.running
    assert report.timeline.target_resume_ms is None


def test_a_migration_that_never_ends_is_cancelled_at_the_timeout() -> None:
    source, target = fake_pair(autostart=True, precopy_polls=None, ram_bytes=RAM)
    report = _run(raw_peer("qemu-default"), source, target, timeout_s=0.2)

    assert report.status is Status.FAILED
    assert report.error is not None and "did not end within" in report.error
    assert "migrate_cancel" in source.commands and source.running
    assert source.world.violations == []


def test_a_target_that_never_loads_the_vm_fails_the_run() -> None:
    source, target = fake_pair(autostart=False, ram_bytes=RAM)
    # The libvirt peer waits for the target's completion; this target dies instead.
    target.on("migrate-incoming", error="Failed to bind socket")
    report = _run(raw_peer("ovirt-minimal-downtime"), source, target)

    assert report.status is Status.FAILED
    assert report.error is not None and "Failed to bind socket" in report.error
    assert source.running


def test_the_decisions_are_reported_as_events() -> None:
    source, target = fake_pair(autostart=False, ram_bytes=RAM)
    bus = EventBus()
    report = _run(raw_peer("nova"), source, target, bus=bus)
    made = [e.decision for e in bus.history if isinstance(e, DecisionMade)]
    assert made == list(report.decisions) and len(made) == 2
    (finished,) = [e for e in bus.history if isinstance(e, Finished)]
    assert finished.report == report

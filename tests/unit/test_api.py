"""The Migration handle against two fake QEMUs: start, events, abort, steering."""

from __future__ import annotations

import asyncio
import logging

import pytest

from migrate.api import Migration, migrate_once
from migrate.control.operator import SWITCHOVER_NOW_MS, OperatorControl
from migrate.errors import ConfigError, PreflightError
from migrate.events import Finished, MigrationEvent, Progress
from migrate.policy import Policy
from migrate.report import Sample, Status
from tests.fakes import fake_pair
from tests.unit.test_safety_fake_qmp import _committed_cpu_models, make_request

__all__ = ["_committed_cpu_models"]  # the autouse fixture, re-used


def _sample(t: float = 1.0) -> Sample:
    return Sample(time=t, elapsed_ms=t * 1e3, status="active")


async def _collect(migration: Migration) -> list[MigrationEvent]:
    return [event async for event in migration.events()]


def test_events_end_with_finished_and_carry_one_id_in_order() -> None:
    async def scenario() -> None:
        source, target = fake_pair()
        migration = Migration(make_request(), source=source, target=target)
        await migration.start()
        events = await asyncio.wait_for(_collect(migration), 5)
        report = await migration.wait()
        assert report.status is Status.COMPLETED
        assert isinstance(events[-1], Finished) and events[-1].report == report
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert {e.migration_id for e in events} == {migration.id} == {report.migration_id}
        # a subscriber arriving after the end still gets the whole stream
        assert [e.seq for e in await _collect(migration)] == [e.seq for e in events]

    asyncio.run(scenario())


def test_abort_with_a_reason_rolls_back_and_says_why() -> None:
    async def scenario() -> None:
        source, target = fake_pair(precopy_polls=None)
        migration = Migration(make_request(), source=source, target=target)
        await migration.start()
        async for event in migration.events():
            if isinstance(event, Progress) and event.sample.status == "active":
                migration.abort("maintenance window closed")
        report = await migration.wait()
        assert report.status is Status.ABORTED
        assert "maintenance window closed" in (report.error or "")
        assert [d.reason for d in report.decisions if d.action == "abort"] == [
            "operator: maintenance window closed"
        ]
        assert source.running and not target.alive

    asyncio.run(scenario())


def test_a_raising_subscriber_does_not_break_the_migration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        source, target = fake_pair()
        migration = Migration(make_request(), source=source, target=target)

        def broken(event: MigrationEvent) -> None:
            raise RuntimeError("orchestrator bug")

        migration.add_callback(broken)
        await migration.start()
        report = await migration.wait()
        assert report.status is Status.COMPLETED and target.running

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert "orchestrator bug" in caplog.text


def test_switchover_now_makes_a_non_converging_migration_finish() -> None:
    async def scenario() -> None:
        source, target = fake_pair(precopy_polls=None)
        migration = Migration(make_request(), source=source, target=target)
        await migration.start()
        async for event in migration.events():
            if isinstance(event, Progress) and event.sample.status == "active":
                migration.switchover_now()
                break
        report = await asyncio.wait_for(migration.wait(), 5)
        assert report.status is Status.COMPLETED and target.running
        assert source.parameters["downtime-limit"] == SWITCHOVER_NOW_MS or not source.alive
        assert any(d.action == "switchover-now" for d in report.decisions)

    asyncio.run(scenario())


def test_update_policy_reaches_qemu_and_the_report() -> None:
    async def scenario() -> None:
        source, target = fake_pair(precopy_polls=None)
        migration = Migration(make_request(), source=source, target=target)
        await migration.start()
        async for event in migration.events():
            if isinstance(event, Progress) and event.sample.status == "active":
                policy = migration.update_policy(downtime_limit_ms=150.0, max_downtime_ms=400.0)
                assert migration.policy == policy
                break
        await source.wait_command("migrate-set-parameters", n=2)
        assert source.parameters["downtime-limit"] == 150
        migration.abort("enough")
        report = await migration.wait()
        assert any(d.reason == "operator: policy updated" for d in report.decisions)

    asyncio.run(scenario())


def test_steering_calls_are_checked() -> None:
    async def scenario() -> None:
        source, target = fake_pair()
        migration = Migration(make_request(), source=source, target=target)
        with pytest.raises(ConfigError, match="not been started"):
            migration.abort("x")
        await migration.start()
        with pytest.raises(ConfigError, match="already started"):
            await migration.start()
        with pytest.raises(ConfigError, match="post-copy"):
            migration.start_postcopy()
        with pytest.raises(ConfigError, match="unknown policy field"):
            migration.update_policy(max_downtime=1)
        await migration.wait()

    asyncio.run(scenario())
    with pytest.raises(ConfigError, match="both QMP sessions"):
        Migration(make_request(), source=fake_pair()[0])
    with pytest.raises(ConfigError, match="unknown strategy"):
        Migration(make_request(strategy="teleport"))


def test_a_refused_move_raises_from_wait_and_ends_the_stream() -> None:
    async def scenario() -> None:
        source, target = fake_pair()
        target.ram_bytes = source.ram_bytes
        request = make_request(
            target_host=make_request().target_host.__class__(available_memory=1 << 20)
        )
        migration = Migration(request, source=source, target=target)
        await migration.start()
        events = await asyncio.wait_for(_collect(migration), 5)
        assert not any(isinstance(e, Finished) for e in events)
        with pytest.raises(PreflightError):
            await migration.wait()
        assert source.running

    asyncio.run(scenario())


def test_migrate_once_returns_the_report() -> None:
    async def scenario() -> None:
        source, target = fake_pair()
        report = await migrate_once(make_request(), source=source, target=target)
        assert report.status is Status.COMPLETED

    asyncio.run(scenario())


def test_operator_requests_go_out_before_the_controllers_decisions() -> None:
    control = OperatorControl(Policy(name="p", controller="static", max_total_time_s=0.5))
    control.request_switchover(now=1.0)
    decisions = control.on_sample(_sample(1.0))
    assert [d.action for d in decisions] == ["switchover-now", "abort"]  # static: past 0.5 s
    control.request_abort("stop", now=2.0)
    control.request_abort("again", now=2.0)
    assert [d.reason for d in control.on_sample(_sample(2.0))] == ["operator: stop"]


def test_capabilities_left_from_an_earlier_migration_are_turned_off() -> None:
    """A VM that arrived by pagestream keeps x-ignore-shared on: on one end only, the
    next (native) stream would not parse at the other. The engine turns it off first."""

    async def scenario() -> None:
        source, target = fake_pair()
        stale = [{"capability": "x-ignore-shared", "state": True}]
        await source.execute("migrate-set-capabilities", {"capabilities": stale})
        migration = Migration(make_request(), source=source, target=target)
        await migration.start()
        events = await asyncio.wait_for(_collect(migration), 5)
        report = await migration.wait()
        assert report.status is Status.COMPLETED
        notices = [getattr(e, "message", "") for e in events]
        wanted = "turned off x-ignore-shared on the source QEMU (left from an earlier migration)"
        assert wanted in notices, notices
        off = {"capability": "x-ignore-shared", "state": False}
        cleared = [
            call.seq
            for call in source.calls_to("migrate-set-capabilities")
            if call.arguments and off in call.arguments["capabilities"]
        ]
        (migrate,) = source.calls_to("migrate")
        # Turned off before `migrate`; the target (fresh) is left as it was.
        assert cleared and cleared[0] < migrate.seq, source.calls_to("migrate-set-capabilities")
        assert not any(
            "x-ignore-shared" in str(call.arguments)
            for call in target.calls_to("migrate-set-capabilities")
        )

    asyncio.run(scenario())

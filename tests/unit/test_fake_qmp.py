"""The fake QMP session itself: scripting, the QEMU model, events, the one-copy log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cpumodel.qemu import QmpCpuSession
from migrate.errors import QemuError
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from tests.fakes import DEFAULT, Delay, Fail, FakeQmp, FakeWorld, Reply, fake_pair

URI = "tcp:198.19.0.2:4444"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _start(source: FakeQmp, target: FakeQmp, events: bool = True) -> None:
    caps = {"capabilities": [{"capability": "events", "state": events}]}
    for fake in (source, target):
        await fake.execute("migrate-set-capabilities", caps)
    await target.execute("migrate-incoming", {"uri": URI})
    await source.execute("migrate", {"uri": URI})


def test_it_is_a_qmp_session_with_a_logged_default_model() -> None:
    fake = FakeQmp("vm")
    assert isinstance(fake, QmpSession)

    async def go() -> None:
        assert await fake.status() == "running"
        assert (await fake.execute("query-memory-size-summary"))["base-memory"] == 128 << 20
        with pytest.raises(QemuError) as info:
            await fake.execute("no-such-command")
        assert info.value.command == "no-such-command"
        assert info.value.detail == {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        }

    run(go())
    assert fake.commands == ["query-status", "query-memory-size-summary", "no-such-command"]
    assert [c.outcome for c in fake.calls] == ["ok", "ok", "error"]


def test_scripted_lists_then_the_simulation_answers_again() -> None:
    fake = FakeQmp("vm")
    fake.on("query-status", [{"status": "paused"}, Fail("boom"), DEFAULT, Reply(["a", "list"])])

    async def go() -> list[Any]:
        answers: list[Any] = [await fake.execute("query-status")]
        with pytest.raises(QemuError, match="query-status failed on vm: boom"):
            await fake.execute("query-status")
        answers.append(await fake.execute("query-status"))
        answers.append(await fake.execute("query-status"))
        answers.append(await fake.execute("query-status"))
        return answers

    first, third, fourth, fifth = run(go())
    assert first == {"status": "paused"}
    assert third["status"] == "running" and fifth["status"] == "running"
    assert fourth == ["a", "list"]


def test_after_times_and_the_latest_rule_wins() -> None:
    fake = FakeQmp("vm")
    fake.on("query-version", Reply({"v": 1}))
    fake.on("query-version", Reply({"v": 2}), after=1, times=2)

    async def go() -> list[Any]:
        return [await fake.execute("query-version") for _ in range(5)]

    answers = run(go())
    assert "qemu" in answers[0]  # ``after``: the simulation answered
    assert answers[1:3] == [{"v": 2}, {"v": 2}]
    assert answers[3:] == [{"v": 1}, {"v": 1}]  # spent: the older rule again


def test_callable_replies_see_the_arguments() -> None:
    fake = FakeQmp("vm")
    fake.on("qom-get", lambda args: Fail("no") if args["property"] == "x" else f"<{args['path']}>")

    async def go() -> Any:
        with pytest.raises(QemuError):
            await fake.execute("qom-get", {"path": "/a", "property": "x"})
        return await fake.execute("qom-get", {"path": "/a", "property": "y"})

    assert run(go()) == "</a>"


def test_delay_hang_and_dead_sessions() -> None:
    fake = FakeQmp("vm")
    fake.on("query-status", delay=0.05, times=1)
    fake.on("query-kvm", hang=True)

    async def go() -> None:
        t0 = time.monotonic()
        await fake.status()
        assert time.monotonic() - t0 >= 0.05
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fake.execute("query-kvm"), 0.05)
        hung = asyncio.create_task(fake.execute("query-kvm"))
        await asyncio.sleep(0.01)
        fake.drop_pending()
        with pytest.raises(QemuError, match="connection lost"):
            await hung
        await fake.execute("quit")
        with pytest.raises(QemuError, match="query-status: lost the QMP session to vm"):
            await fake.status()

    run(go())
    assert [c.outcome for c in fake.calls_to("query-kvm")] == ["hung", "hung"]
    assert not fake.alive and fake.events("SHUTDOWN")


def test_cut_link_keeps_the_vm_and_freeze_hangs_everything() -> None:
    fake = FakeQmp("vm")

    async def go() -> None:
        fake.cut_link()
        with pytest.raises(QemuError, match="connection lost"):
            await fake.execute("stop")
        assert fake.alive and fake.running
        fake.restore_link()
        fake.freeze()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fake.status(), 0.02)
        fake.thaw()
        assert await fake.status() == "running"

    run(go())


def test_a_lost_reply_performs_the_effect() -> None:
    fake = FakeQmp("vm", runstate="paused")
    fake.on("cont", lose_reply=True)

    async def go() -> None:
        async with EventRecorder(fake) as log:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(fake.execute("cont"), 0.05)
            assert await log.wait_for("RESUME", timeout=1) is not None

    run(go())
    assert fake.running and fake.calls_to("cont")[0].outcome == "reply-lost"


def test_the_default_migration_walk_and_its_events() -> None:
    source, target = fake_pair(precopy_polls=2)

    async def go() -> list[str]:
        async with EventRecorder(source) as src_log, EventRecorder(target) as tgt_log:
            t0 = time.time()
            await _start(source, target)
            statuses: list[str] = []
            while not statuses or statuses[-1] != "completed":
                statuses.append((await source.execute("query-migrate"))["status"])
            stop = await src_log.wait_for("STOP", timeout=1)
            done = await tgt_log.wait_for("MIGRATION", migration_status_is("completed"), timeout=1)
            assert stop is not None and done is not None
            assert t0 - 1 <= stop.timestamp <= time.time() + 1
            assert await target.status() == "paused"
            await target.execute("cont")
            assert await tgt_log.wait_for("RESUME", timeout=1) is not None
            return statuses

    assert run(go()) == ["active", "active", "completed"]
    assert source.runstate == "postmigrate" and target.running
    info = source._migration_info()
    assert info["ram"]["remaining"] == 0 and info["downtime"] == 12
    assert [e.data["status"] for e in source.events("MIGRATION")] == [
        "setup",
        "active",
        "completed",
    ]
    assert source.world.violations == []


def test_no_migration_events_without_the_events_capability() -> None:
    source, target = fake_pair(precopy_polls=0)

    async def go() -> None:
        await _start(source, target, events=False)
        await source.execute("query-migrate")
        await source.execute("query-migrate")

    run(go())
    assert source.migration_status == target.migration_status == "completed"
    assert not source.events("MIGRATION") and source.events("STOP")


def test_nobody_listening_fails_on_the_next_poll() -> None:
    source = FakeQmp("source")

    async def go() -> dict[str, Any]:
        await source.execute("migrate", {"uri": URI})
        result: dict[str, Any] = await source.execute("query-migrate")
        return result

    info = run(go())
    assert info["status"] == "failed" and "Connection refused" in info["error-desc"]
    assert source.running


def test_cancel_restarts_nothing_and_the_target_exits() -> None:
    source, target = fake_pair(precopy_polls=None)

    async def go() -> None:
        await _start(source, target)
        await source.execute("query-migrate")
        await source.execute("migrate_cancel")

    run(go())
    assert source.migration_status == "cancelled" and source.running
    assert target.migration_status == "failed" and not target.alive


def test_pause_before_switchover_waits_for_migrate_continue() -> None:
    source, target = fake_pair(precopy_polls=1)

    async def go() -> None:
        await source.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )
        await _start(source, target)
        await source.execute("query-migrate")
        info = await source.execute("query-migrate")
        assert info["status"] == "pre-switchover" and source.runstate == "finish-migrate"
        with pytest.raises(QemuError):
            await source.execute("migrate-set-capabilities", {"capabilities": []})
        await source.execute("migrate-continue", {"state": "pre-switchover"})

    run(go())
    assert source.migration_status == "completed" and target.runstate == "paused"


def test_cont_on_an_incoming_qemu_only_sets_autostart() -> None:
    source, target = fake_pair(precopy_polls=0)

    async def go() -> None:
        await target.execute("cont")
        assert target.runstate == "inmigrate"
        await _start(source, target)
        await source.execute("query-migrate")
        await source.execute("query-migrate")

    run(go())
    assert target.running and source.world.violations == []


def test_the_world_reports_two_running_copies_and_a_split_brain() -> None:
    source, target = fake_pair(precopy_polls=0)

    async def go() -> None:
        await _start(source, target)
        await source.execute("query-migrate")
        await source.execute("query-migrate")
        await target.execute("cont")
        await source.execute("cont")

    run(go())
    assert len(source.world.violations) == 2
    assert "two copies" in source.world.violations[0]
    assert "split brain" in source.world.violations[1]


def test_the_shared_log_orders_both_sides() -> None:
    world = FakeWorld()
    a, b = FakeQmp("a", world=world), FakeQmp("b", world=world)

    async def go() -> None:
        await a.execute("stop")
        await b.execute("query-status")
        await a.execute("cont")

    run(go())
    assert world.position("a", "event", "STOP") < world.position("b", "command", "query-status")
    assert world.position("b", "reply", "query-status") < world.position("a", "event", "RESUME")
    with pytest.raises(AssertionError, match="no event RESUME"):
        world.position("b", "event", "RESUME")


def test_cpumodel_reaches_it_through_the_client() -> None:
    fake = FakeQmp("vm")
    fake.on("query-cpu-definitions", Delay(0.0, Fail("no")))
    cpu = QmpCpuSession(fake.client)

    async def go() -> bool:
        return await cpu.kvm_enabled()

    assert run(go()) is False
    assert fake.commands == ["query-kvm"]


def test_bad_scripts_are_refused() -> None:
    fake = FakeQmp("vm")
    with pytest.raises(ValueError):
        fake.on("cont", error="x", hang=True)
    with pytest.raises(ValueError):
        fake.on("cont", lambda args: {}, delay=1)


def test_an_error_with_effect_acts_first() -> None:
    fake = FakeQmp("vm")
    fake.on("stop", Fail("reply garbled", effect=True))

    async def go() -> None:
        with pytest.raises(QemuError, match="reply garbled"):
            await fake.execute("stop")

    run(go())
    assert fake.runstate == "paused" and fake.events("STOP")

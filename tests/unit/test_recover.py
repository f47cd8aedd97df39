"""``livemig recover``'s decisions, against two fake QEMUs left as a crashed engine left them.

Each test drives the fakes (as the engine would have) to where a crash could leave
them, writes the journal the engine would have written up to there, drops its lock
(the engine died), then runs :func:`migrate.recover.recover_all`. Every test also
checks the fakes' one-copy invariant (never two copies running, never the source
again after the VM ran on the target).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migrate.errors import ConfigError, QemuError
from migrate.journal import JournalRecord, JournalStore, MigrationJournal
from migrate.phase import Phase
from migrate.qmp import QmpSession
from migrate.recover import (
    IN_PROGRESS,
    UNKNOWN,
    VM_BACK_ON_SOURCE,
    VM_ON_TARGET,
    Recovery,
    SideState,
    forget,
    recover_all,
    vm_location,
)
from tests.fakes import FakeQmp, fake_pair
from tests.fakes.qmp import DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS
from tests.unit.test_journal import record_for, request_for
from tests.unit.test_safety_fake_qmp import URI, assert_one_copy

TIMEOUT = 0.2


class FakeQemus:
    """Fake QEMUs by QMP socket path: a killed one is gone (nothing listens)."""

    def __init__(self, tmp_path: Path, source: FakeQmp, target: FakeQmp) -> None:
        self.by_socket = {
            str((tmp_path / "source.qmp").resolve()): source,
            str((tmp_path / "target.qmp").resolve()): target,
        }
        self.connects: list[str] = []

    async def listening(self, socket: str, timeout: float) -> bool | None:
        fake = self.by_socket.get(socket)
        return fake is not None and fake.alive

    async def connect(self, socket: str, side: str, timeout: float) -> QmpSession:
        self.connects.append(side)
        fake = self.by_socket.get(socket)
        if fake is None or not fake.alive:
            raise ConfigError(f"no QMP socket at {socket}")
        if not fake.reachable:
            raise QemuError(f"cannot open a QMP session on {socket}: connection lost")
        if fake.frozen:
            await asyncio.sleep(timeout)
            raise QemuError(f"no QMP greeting on {socket} within {timeout} s")
        fake.closed = False  # a new session
        return fake


_PHASES_TO = {
    Phase.SETUP: (),
    Phase.PRECOPY: (Phase.PRECOPY,),
    Phase.SWITCHOVER: (Phase.PRECOPY, Phase.SWITCHOVER),
    Phase.POSTCOPY: (Phase.PRECOPY, Phase.POSTCOPY),
}


def crashed_journal(
    tmp_path: Path, phase: Phase, point_of_no_return: bool = False, was_running: bool = True
) -> tuple[JournalStore, JournalRecord]:
    """The journal an engine killed in ``phase`` leaves (its lock released by its death)."""
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    record = record_for(request)
    if not was_running:
        record = JournalRecord.from_json(
            record.to_json().replace(b'"source_was_running": true', b'"source_was_running": false')
        )
    journal: MigrationJournal = store.begin(request, record)
    for step in _PHASES_TO[phase]:
        journal.phase(step)
    if point_of_no_return:
        journal.point_of_no_return()
    journal.close()
    return store, journal.record


async def engine_setup(source: FakeQmp, target: FakeQmp, *, pause: bool = False) -> None:
    """What the engine does before pre-copy: capabilities, parameters, the target listens."""
    caps = [{"capability": "events", "state": True}]
    if pause:
        caps.append({"capability": "pause-before-switchover", "state": True})
    await source.execute("migrate-set-capabilities", {"capabilities": caps})
    await target.execute("migrate-set-capabilities", {"capabilities": caps[:1]})
    await source.execute("migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 1 << 20})
    await target.execute("migrate-incoming", {"uri": URI})
    await source.execute("migrate", {"uri": URI})


async def poll_until(source: FakeQmp, status: str, limit: int = 20) -> None:
    for _ in range(limit):
        if (await source.execute("query-migrate")).get("status") == status:
            return
    raise AssertionError(f"source never reached {status}: {source.migration_status}")


def recover(
    tmp_path: Path, source: FakeQmp, target: FakeQmp, **kwargs: Any
) -> tuple[list[Recovery], JournalStore]:
    store = JournalStore(tmp_path / "state")
    qemus = FakeQemus(tmp_path, source, target)
    results = asyncio.run(recover_all(store, qemus, timeout=TIMEOUT, **kwargs))
    return results, store


def assert_finished(store: JournalStore, result: Recovery, vm_on: str) -> None:
    assert result.recovered, result
    assert store.unfinished() == []
    done = store.finished(result.migration_id)
    assert done is not None and done.finished and done.outcome is not None
    assert (done.outcome.status, done.outcome.vm_on) == ("recovered", vm_on)
    assert done.recovery is not None and done.recovery["result"] == result.result


def assert_unfinished(store: JournalStore, result: Recovery) -> None:
    assert not result.recovered and result.result == UNKNOWN
    assert [r.migration_id for r in store.unfinished()] == [result.migration_id]
    assert result.advice and "livemig recover" in result.advice


# -- before the point of no return: back to the source ------------------------------------------


def test_a_crash_mid_precopy_cancels_quits_the_target_and_restores_the_source(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=None)

    async def crash_mid_precopy() -> None:
        await engine_setup(source, target)
        await poll_until(source, "active")
        await source.execute("query-migrate")

    asyncio.run(crash_mid_precopy())
    crashed_journal(tmp_path, Phase.PRECOPY)
    assert source.parameters != DEFAULT_PARAMETERS
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert result.source is not None and result.source.migration == "active"
    assert result.target is not None and result.target.status == "inmigrate"
    assert source.count("migrate_cancel") == 1 and source.migration_status == "cancelled"
    assert not target.alive  # QEMU exits when its incoming migration fails
    assert "the target QEMU exited (its incoming migration was cancelled)" in result.actions
    assert source.running and source.count("cont") == 0  # it never stopped
    assert source.capabilities == DEFAULT_CAPABILITIES
    assert source.parameters == DEFAULT_PARAMETERS
    assert "announce-self" in source.commands
    assert any("restored" in a for a in result.actions), result.actions
    assert_finished(store, result, "source")
    assert_one_copy(source)
    world = source.world
    assert world.position("target", "died", f"incoming migration failed: {target.error_desc}") < (
        world.position("source", "command", "announce-self")
    )


def test_a_crash_after_completion_before_cont_resumes_the_stopped_source(
    tmp_path: Path,
) -> None:
    # Native, killed while verifying RAM: the source stopped and completed, the target
    # (-S) holds the VM paused, unchecked. It never ran: the source is the VM.
    source, target = fake_pair(precopy_polls=2)

    async def crash_in_switchover() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(crash_in_switchover())
    assert source.runstate == "postmigrate" and target.runstate == "paused"
    crashed_journal(tmp_path, Phase.SWITCHOVER)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert not target.alive and target.count("cont") == 0
    assert source.running and source.count("cont") == 1
    world = source.world
    assert world.position("target", "died", "quit") < world.position("source", "command", "cont")
    assert_finished(store, result, "source")
    assert_one_copy(source)


def test_a_crash_in_pagestreams_pre_switchover_cancels_and_resumes(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=1)

    async def crash_at_pre_switchover() -> None:
        await engine_setup(source, target, pause=True)
        await source.execute("stop")
        await poll_until(source, "pre-switchover")

    asyncio.run(crash_at_pre_switchover())
    crashed_journal(tmp_path, Phase.SWITCHOVER)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert source.migration_status == "cancelled" and source.running
    assert source.capabilities == DEFAULT_CAPABILITIES
    assert not target.alive
    assert_finished(store, result, "source")
    assert_one_copy(source)


def test_a_vm_paused_at_the_start_stays_paused(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=None)
    source.runstate = "paused"

    async def crash_mid_precopy() -> None:
        await engine_setup(source, target)
        await poll_until(source, "active")

    asyncio.run(crash_mid_precopy())
    crashed_journal(tmp_path, Phase.PRECOPY, was_running=False)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert source.runstate == "paused" and source.count("cont") == 0
    assert_finished(store, result, "source")


def test_a_crash_during_setup_quits_the_waiting_target(tmp_path: Path) -> None:
    source, target = fake_pair()
    crashed_journal(tmp_path, Phase.SETUP)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert not target.alive and source.running
    assert "migrate_cancel" not in source.commands and source.count("cont") == 0
    assert result.actions == ["quit the target QEMU"], result.actions
    assert_finished(store, result, "source")


# -- the target is (or becomes) the VM --------------------------------------------------------


def test_after_the_point_of_no_return_a_paused_target_is_resumed_and_the_source_quit(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=2)

    async def crash_just_before_cont() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(crash_just_before_cont())
    crashed_journal(tmp_path, Phase.SWITCHOVER, point_of_no_return=True)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_ON_TARGET, result
    assert target.running and target.count("cont") == 1
    assert not source.alive and source.count("cont") == 0
    world = source.world
    assert world.position("target", "event", "RESUME") < world.position("source", "command", "quit")
    assert_finished(store, result, "target")
    assert_one_copy(source)


def test_a_post_copy_target_paused_after_the_point_of_no_return_is_resumed(
    tmp_path: Path,
) -> None:
    # Killed between the post-copy target's RAM check and its cont: the device state is
    # loaded, pages still come from the (stopped) source.
    source, target = fake_pair()

    async def scenario() -> list[Recovery]:
        await target.set_runstate("paused")
        await target.set_migration("postcopy-active")
        source.runstate = "postmigrate"
        await source.set_migration("postcopy-active")

        async def complete_later() -> None:
            await target.wait_command("cont")
            await asyncio.sleep(0.2)
            await source.set_migration("completed")
            await target.set_migration("completed")

        done = asyncio.create_task(complete_later())
        store = JournalStore(tmp_path / "state")
        results = await recover_all(store, FakeQemus(tmp_path, source, target), timeout=TIMEOUT)
        await done
        return results

    crashed_journal(tmp_path, Phase.POSTCOPY, point_of_no_return=True)
    (result,) = asyncio.run(scenario())
    assert result.result == VM_ON_TARGET, result
    assert target.running and target.count("cont") == 1 and not source.alive
    world = source.world
    assert world.position("target", "migration", "completed") < world.position(
        "source", "command", "quit"
    )
    assert_finished(JournalStore(tmp_path / "state"), result, "target")
    assert_one_copy(source)


def test_a_resumed_target_whose_source_cannot_be_quit_is_not_called_recovered(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=2)

    async def crash_just_before_cont() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(crash_just_before_cont())
    source.cut_link()
    crashed_journal(tmp_path, Phase.SWITCHOVER, point_of_no_return=True)
    (result,), store = recover(tmp_path, source, target)
    assert target.running and source.alive and not source.running
    assert_unfinished(store, result)
    assert result.advice is not None
    assert "Done so far: resumed the VM on the target" in result.advice
    assert "source QEMU cannot be reached to quit it" in result.advice
    assert_one_copy(source)


def test_a_target_that_runs_on_its_own_is_the_vm_even_before_the_point_of_no_return(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=2, autostart=True)  # a target without -S

    async def crash_after_completion() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(crash_after_completion())
    assert target.running
    crashed_journal(tmp_path, Phase.SWITCHOVER)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_ON_TARGET, result
    assert target.running and not source.alive
    assert target.count("cont") == 0 and source.count("cont") == 0
    assert_finished(store, result, "target")
    assert_one_copy(source)


def test_a_running_post_copy_target_keeps_its_source_until_every_page_is_there(
    tmp_path: Path,
) -> None:
    source, target = fake_pair()

    async def scenario() -> list[Recovery]:
        await target.set_runstate("running")
        await target.set_migration("postcopy-active")
        source.runstate = "postmigrate"
        await source.set_migration("postcopy-active")

        async def complete_later() -> None:
            await asyncio.sleep(0.3)
            await source.set_migration("completed")
            await target.set_migration("completed")

        done = asyncio.create_task(complete_later())
        store = JournalStore(tmp_path / "state")
        results = await recover_all(store, FakeQemus(tmp_path, source, target), timeout=TIMEOUT)
        await done
        return results

    crashed_journal(tmp_path, Phase.POSTCOPY, point_of_no_return=True)
    (result,) = asyncio.run(scenario())
    assert result.result == VM_ON_TARGET, result
    world = source.world
    assert world.position("target", "migration", "completed") < world.position(
        "source", "command", "quit"
    )
    assert any("post-copy" in a for a in result.actions), result.actions
    assert_finished(JournalStore(tmp_path / "state"), result, "target")


def test_a_paused_post_copy_keeps_the_source_and_says_so(tmp_path: Path) -> None:
    source, target = fake_pair()

    async def scenario() -> None:
        await target.set_runstate("running")
        await target.set_migration("postcopy-paused")
        source.runstate = "postmigrate"
        await source.set_migration("postcopy-paused")

    asyncio.run(scenario())
    crashed_journal(tmp_path, Phase.POSTCOPY, point_of_no_return=True)
    (result,), store = recover(tmp_path, source, target)
    assert source.alive and "quit" not in source.commands
    assert_unfinished(store, result)
    assert result.advice is not None and "post-copy is paused" in result.advice


# -- nothing provable: resume nothing -----------------------------------------------------------


def test_both_sides_unreachable_is_unknown_and_touches_nothing(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=None)

    async def crash_mid_precopy() -> None:
        await engine_setup(source, target)
        await poll_until(source, "active")

    asyncio.run(crash_mid_precopy())
    crashed_journal(tmp_path, Phase.PRECOPY)
    source.cut_link()
    target.freeze()
    (result,), store = recover(tmp_path, source, target)
    assert_unfinished(store, result)
    assert result.source is not None and not result.source.reachable and not result.source.gone
    assert result.target is not None and not result.target.reachable
    assert "connection lost" in result.source.detail and "greeting" in result.target.detail
    assert source.alive and target.alive and source.migration_status == "active"
    assert result.seconds < 2


def test_after_the_point_of_no_return_a_gone_target_resumes_nothing(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=2)

    async def target_dies_after_cont() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")
        await target.kill("segfault")

    asyncio.run(target_dies_after_cont())
    crashed_journal(tmp_path, Phase.SWITCHOVER, point_of_no_return=True)
    (result,), store = recover(tmp_path, source, target)
    assert_unfinished(store, result)
    assert result.target is not None and result.target.gone
    assert result.source is not None and result.source.status == "postmigrate"
    assert source.alive and source.count("cont") == 0 and not source.running
    assert result.advice is not None and "point of no return" in result.advice


def test_before_the_point_of_no_return_a_gone_source_resumes_nothing(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=2)

    async def source_dies() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")
        await source.kill("oom")

    asyncio.run(source_dies())
    crashed_journal(tmp_path, Phase.SWITCHOVER)
    (result,), store = recover(tmp_path, source, target)
    assert_unfinished(store, result)
    assert target.alive and target.runstate == "paused" and target.count("cont") == 0
    assert "quit" not in target.commands


def test_a_silent_target_that_may_hold_the_whole_vm_keeps_the_source_stopped(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=2)

    async def scenario() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(scenario())
    target.freeze()
    crashed_journal(tmp_path, Phase.SWITCHOVER)
    (result,), store = recover(tmp_path, source, target)
    assert_unfinished(store, result)
    assert not source.running and source.count("cont") == 0
    assert result.advice is not None and "second copy" in result.advice


def test_a_silent_target_that_never_got_the_vm_does_not_block_the_source(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=None)

    async def scenario() -> None:
        await engine_setup(source, target)
        await poll_until(source, "active")

    asyncio.run(scenario())
    target.exit_on_incoming_failure = False  # it lives on, wedged
    target.freeze()
    crashed_journal(tmp_path, Phase.PRECOPY)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert source.running and source.migration_status == "cancelled"
    assert any("could not quit the target" in a for a in result.actions), result.actions
    assert target.alive and not target.running
    assert_finished(store, result, "source")


# -- bookkeeping ------------------------------------------------------------------------------------


def test_a_migration_whose_engine_lives_is_left_alone(tmp_path: Path) -> None:
    source, target = fake_pair()
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    journal = store.begin(request, record_for(request))  # its engine still runs
    try:
        (result,), _ = recover(tmp_path, source, target)
    finally:
        journal.close()
    assert result.result == IN_PROGRESS and not result.recovered
    assert source.commands == [] and target.commands == []


def test_forget_finishes_a_journal_without_touching_the_vm(tmp_path: Path) -> None:
    _, record = crashed_journal(tmp_path, Phase.PRECOPY)
    store = JournalStore(tmp_path / "state")
    forget(store, record.migration_id)
    assert store.unfinished() == []
    done = store.finished(record.migration_id)
    assert done is not None and done.outcome is not None and done.outcome.status == "forgotten"
    with pytest.raises(ConfigError, match="no unfinished migration"):
        forget(store, record.migration_id)


def test_vm_location_needs_proof_for_each_side() -> None:
    def side(name: str, **kw: Any) -> SideState:
        return SideState(name, f"/{name}.qmp", **kw)

    running = {"reachable": True, "status": "running", "migration": "none"}
    gone = {"gone": True}
    silent: dict[str, Any] = {}
    assert vm_location(True, side("source", **running), side("target", **gone)) == "source"
    assert vm_location(True, side("source", **gone), side("target", **running)) == "target"
    assert vm_location(True, side("source", **running), side("target", **running)) is None
    assert vm_location(True, side("source", **running), side("target", **silent)) is None
    assert vm_location(True, side("source", **silent), side("target", **running)) is None
    migrating = {**running, "migration": "active"}
    assert vm_location(True, side("source", **migrating), side("target", **gone)) is None
    paused = {**running, "status": "paused"}
    assert vm_location(True, side("source", **paused), side("target", **gone)) is None
    assert vm_location(False, side("source", **paused), side("target", **gone)) == "source"


def _livemig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrate.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_the_cli_reports_unknown_as_json_and_exits_non_zero(tmp_path: Path) -> None:
    # Nothing listens on either socket: both QEMUs are gone.
    _, record = crashed_journal(tmp_path, Phase.PRECOPY)
    state = str(tmp_path / "state")
    result = _livemig("recover", "--state-dir", state, "--json", "--timeout", "1")
    assert result.returncode == 1, result.stderr
    (line,) = result.stdout.splitlines()
    data = json.loads(line)
    assert data["recovered"] is False and data["state_dir"] == state
    (one,) = data["migrations"]
    assert one["migration_id"] == record.migration_id and one["result"] == "unknown"
    assert one["source"]["gone"] and one["target"]["gone"]
    assert f"livemig recover --forget {record.migration_id}" in one["advice"]
    text = _livemig("recover", "--state-dir", state)
    assert text.returncode == 1 and f"migration {record.migration_id}" in text.stdout
    assert "source QEMU gone" in text.stdout
    forgotten = _livemig("recover", "--state-dir", state, "--forget", record.migration_id)
    assert forgotten.returncode == 0, forgotten.stderr
    again = _livemig("recover", "--state-dir", state, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["migrations"] == []

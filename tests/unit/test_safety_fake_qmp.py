"""The engine's safety decisions, driven through ``run_migration`` against two fake QEMUs.

The real engine (preflight, the native strategy, the controller, rollback) runs; the
QEMUs are :class:`tests.fakes.FakeQmp` (no root, no QEMU, RAM not compared:
``verify=False``). Every test also checks the fakes' one-copy invariant: never two
sides running at once, never the source running again after the VM ran on the target.

The issue-11 cases (a lost `cont` reply, an unreachable target during rollback, a
failed `migrate_cancel`, silent QMP peers, settings left changed) were written first
as strict xfails against the engine that had those bugs; they pass now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import cpumodel.qemu
from cpumodel.host import HostCpu
from cpumodel.models import ModelCatalog
from migrate.control.base import Controller
from migrate.control.intents import Abort
from migrate.control.static import StaticController
from migrate.engine import run_migration
from migrate.errors import LivemigError, MigrationAborted, MigrationError
from migrate.events import EventBus, Finished, MigrationEvent
from migrate.phase import Phase
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.report import Decision, MigrationReport, Sample, Status
from migrate.strategy import HostEndpoint, MigrationHooks, MigrationRequest
from tests.fakes import FakeQmp, fake_pair
from tests.fakes.qmp import DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS

URI = "tcp:198.19.0.2:4444"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cpu"
# How long a test lets the engine run before calling it hung, where the safe engine
# must give up on a silent QMP peer by itself (a deadline per QMP command).
BOUND_S = 5.0


@functools.cache
def _catalog() -> ModelCatalog:
    return ModelCatalog.from_dict(json.loads((FIXTURES / "qemu-models.json").read_text()))


@functools.cache
def _host_cpu() -> HostCpu:
    return HostCpu.from_dict(json.loads((FIXTURES / "alderlake-i9-12900k.json").read_text()))


@pytest.fixture(autouse=True)
def _committed_cpu_models(monkeypatch: pytest.MonkeyPatch) -> None:
    # Preflight's CPU check would probe the installed QEMU for its models.
    monkeypatch.setattr(cpumodel.qemu, "load_catalog", lambda *a, **k: _catalog())


def make_request(**changes: object) -> MigrationRequest:
    host = HostFacts(cpu=_host_cpu(), available_memory=8 << 30)
    request = MigrationRequest(
        source=HostEndpoint("src"),
        target=HostEndpoint("dst", migration_uri=URI),
        policy=Policy(name="test", controller="static"),
        verify=False,
        sample_interval_s=0.005,
        qmp_timeout_s=1.0,  # the fakes answer at once; a silent one is caught in 1 s
        source_host=host,
        target_host=host,
    )
    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


class AbortAt(StaticController):
    """The static controller, deciding ``abort`` on the ``n``-th sample."""

    def __init__(self, n: int) -> None:
        super().__init__(Policy(name="test", controller="static"))
        self.n = n
        self.seen = 0

    def on_sample(self, sample: Sample) -> list[Decision]:
        self.seen += 1
        if self.seen >= self.n:
            return [Decision(sample.time, "test: abort mid pre-copy", (Abort(),))]
        return super().on_sample(sample)


@dataclass
class Outcome:
    """How a driven migration ended: a report, an exception, or hung past the bound."""

    report: MigrationReport | None
    error: BaseException | None
    hung: bool
    seconds: float
    events: list[MigrationEvent]

    @property
    def final_report(self) -> MigrationReport | None:
        if self.report is not None:
            return self.report
        return getattr(self.error, "report", None)

    @property
    def finished(self) -> list[Finished]:
        return [e for e in self.events if isinstance(e, Finished)]


async def drive(
    source: FakeQmp,
    target: FakeQmp,
    request: MigrationRequest | None = None,
    controller: Controller | None = None,
    *,
    during: Callable[[asyncio.Task[MigrationReport]], Coroutine[Any, Any, None]] | None = None,
    bound: float = BOUND_S,
) -> Outcome:
    """Run ``run_migration`` on the fakes (``during`` alongside it) for up to ``bound`` s.

    Past the bound the run counts as hung: it is cancelled and the fakes' hung
    commands fail, so that it ends (what it did then is in the fakes' state).
    """
    bus = EventBus()
    seen: list[MigrationEvent] = []
    bus.add_callback(seen.append)
    task = asyncio.create_task(
        run_migration(request or make_request(), source, target, controller, bus)
    )
    side = asyncio.create_task(during(task)) if during is not None else None
    t0 = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=bound)
    seconds = time.monotonic() - t0
    hung = not done
    if hung:
        task.cancel()
        for fake in source.world.sessions.values():
            fake.drop_pending()
        await asyncio.wait({task}, timeout=0.5)
        for fake in source.world.sessions.values():
            fake.cut_link()
        await asyncio.wait({task}, timeout=1.0)
    if side is not None:
        if not side.done():
            side.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await side  # an assertion failing in ``during`` fails the test
    report: MigrationReport | None = None
    error: BaseException | None = None
    if task.done():
        if task.cancelled():
            error = asyncio.CancelledError()
        elif task.exception() is not None:
            error = task.exception()
        else:
            report = task.result()
    return Outcome(report, error, hung, seconds, seen)


def assert_one_copy(source: FakeQmp) -> None:
    assert source.world.violations == [], "\n".join(
        [*source.world.violations, source.world.format()]
    )


# -- what works today ---------------------------------------------------------------------


def test_happy_path_resumes_the_target_once_after_the_source_stopped() -> None:
    source, target = fake_pair()
    out = asyncio.run(drive(source, target))
    assert out.error is None and out.report is not None, out.error
    assert out.report.status is Status.COMPLETED and out.report.phase is Phase.COMPLETED
    assert target.running and target.count("cont") == 1 and len(target.events("RESUME")) == 1
    assert source.count("cont") == 0 and "quit" in source.commands and not source.alive
    world = source.world
    cont = world.position("target", "command", "cont")
    assert world.position("source", "event", "STOP") < cont
    assert world.position("target", "event", "MIGRATION", status="completed") < cont
    assert world.position("target", "command", "migrate-incoming") < world.position(
        "source", "command", "migrate"
    )
    assert len(out.finished) == 1 and out.finished[0].report.status is Status.COMPLETED
    assert out.report.timeline.target_resume_ms is not None
    assert out.seconds < 2
    assert_one_copy(source)


def test_a_target_without_dash_S_is_not_sent_cont() -> None:
    source, target = fake_pair(autostart=True)
    out = asyncio.run(drive(source, target))
    assert out.report is not None and out.report.status is Status.COMPLETED, out.error
    assert target.running and target.count("cont") == 0
    assert "resumed on its own" in out.report.integrity_detail
    assert_one_copy(source)


def test_failed_migrate_incoming_rolls_back_to_the_source() -> None:
    source, target = fake_pair()
    target.on("migrate-incoming", error="Failed to bind socket: Address already in use")
    out = asyncio.run(drive(source, target))
    assert isinstance(out.error, MigrationError) and not isinstance(out.error, MigrationAborted)
    assert "Address already in use" in str(out.error)
    report = out.final_report
    assert report is not None and report.status is Status.FAILED
    assert "migrate" not in source.commands
    assert source.running and source.count("cont") == 0
    assert "quit" in target.commands and not target.alive
    assert "stopped the target QEMU" in (report.error or "")
    assert len(out.finished) == 1
    assert_one_copy(source)


def test_controller_abort_mid_precopy_cancels_and_keeps_the_vm_on_the_source() -> None:
    source, target = fake_pair(precopy_polls=None)
    out = asyncio.run(drive(source, target, controller=AbortAt(2)))
    assert isinstance(out.error, MigrationAborted), out.error
    report = out.final_report
    assert report is not None and report.status is Status.ABORTED
    assert report.decisions[-1].action == "abort"
    assert source.count("migrate_cancel") == 1 and source.migration_status == "cancelled"
    assert source.running and source.count("cont") == 0
    assert "quit" in target.commands and not target.alive
    world = source.world
    assert world.position("source", "command", "migrate_cancel") < world.position(
        "target", "command", "quit"
    )
    assert_one_copy(source)


def test_cancelling_the_task_during_precopy_rolls_back_and_propagates() -> None:
    source, target = fake_pair(precopy_polls=None)

    async def cancel_mid_precopy(task: asyncio.Task[MigrationReport]) -> None:
        await source.wait_command("migrate")
        await source.wait_command("query-migrate", n=source.count("query-migrate") + 2)
        task.cancel()

    out = asyncio.run(drive(source, target, during=cancel_mid_precopy))
    assert isinstance(out.error, asyncio.CancelledError), out.error
    assert len(out.finished) == 1
    report = out.finished[0].report
    assert report.status is Status.ABORTED and "cancelled by the operator" in (report.error or "")
    assert source.count("migrate_cancel") == 1
    assert source.running and source.count("cont") == 0
    assert "quit" in target.commands and not target.alive
    assert_one_copy(source)


def test_a_target_crash_mid_precopy_fails_the_migration_on_the_source() -> None:
    source, target = fake_pair(precopy_polls=None)

    async def crash_target(task: asyncio.Task[MigrationReport]) -> None:
        await source.wait_command("migrate")
        await source.wait_command("query-migrate", n=source.count("query-migrate") + 1)
        await target.kill("segfault")

    out = asyncio.run(drive(source, target, during=crash_target))
    assert isinstance(out.error, MigrationError), out.error
    assert "Connection reset by peer" in str(out.error)
    report = out.final_report
    assert report is not None and report.status is Status.FAILED
    assert "target QEMU already gone" in (report.error or "")
    assert source.running and source.count("migrate_cancel") == 0
    assert_one_copy(source)


# -- issue 11: what the engine gets wrong today ---------------------------------------------


@pytest.mark.timeout(10)
def test_a_lost_cont_reply_then_cancellation_never_resumes_the_source() -> None:
    source, target = fake_pair()
    target.on("cont", lose_reply=True)

    async def cancel_after_cont(task: asyncio.Task[MigrationReport]) -> None:
        await target.wait_command("cont")
        await asyncio.sleep(0.1)
        task.cancel()

    out = asyncio.run(drive(source, target, during=cancel_after_cont))
    assert target.running, "the VM running on the target was stopped"
    assert not source.running and source.count("cont") == 0
    assert len(out.finished) == 1
    assert_one_copy(source)


@pytest.mark.timeout(10)
def test_a_lost_cont_reply_ends_within_a_deadline_with_the_vm_on_the_target() -> None:
    source, target = fake_pair()
    target.on("cont", lose_reply=True)
    out = asyncio.run(drive(source, target))
    assert not out.hung, f"still waiting for the `cont` reply after {BOUND_S} s"
    assert target.running and not source.running and source.count("cont") == 0
    assert len(out.finished) == 1
    assert_one_copy(source)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("fault", ["raises", "hangs"])
def test_an_unreachable_target_during_rollback_keeps_the_source_stopped(fault: str) -> None:
    source, target = fake_pair()

    async def refuse_switchover() -> None:
        if fault == "raises":
            target.cut_link()
        else:
            target.freeze()
        raise MigrationAborted("test: the operator refused the switchover")

    request = make_request(hooks=MigrationHooks(before_target_resume=refuse_switchover))
    # The engine's own quit deadline is 5 s: allow it.
    out = asyncio.run(drive(source, target, request, bound=8.0))
    assert not out.hung
    assert isinstance(out.error, MigrationError), out.error
    assert target.alive and target.runstate == "paused"  # the fake's truth
    assert not source.running and source.count("cont") == 0, (
        "the source was resumed without proof that the target is dead"
    )
    assert_one_copy(source)


def test_a_failed_migrate_cancel_is_recorded_in_the_report() -> None:
    source, target = fake_pair(precopy_polls=None)
    source.on("migrate_cancel", error="test: cancel refused")
    out = asyncio.run(drive(source, target, controller=AbortAt(2)))
    assert isinstance(out.error, MigrationAborted), out.error
    assert source.running and source.count("cont") == 0
    assert_one_copy(source)
    report = out.final_report
    assert report is not None
    assert "migrate_cancel" in (report.error or "") and "cancel refused" in (report.error or "")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("side", "command", "after"),
    [
        ("target", "query-status", 0),  # before anything started (check_start)
        ("source", "query-migrate", 3),  # mid pre-copy: preflight, start check, 1 poll
    ],
)
def test_a_silent_peer_gives_one_clear_error_within_a_deadline(
    side: str, command: str, after: int
) -> None:
    source, target = fake_pair(precopy_polls=None)
    silent = source if side == "source" else target
    silent.on(command, hang=True, after=after)

    async def run() -> Outcome:
        return await asyncio.wait_for(drive(source, target), BOUND_S + 4)

    out = asyncio.run(run())
    assert not out.hung, f"{side} {command} never answered and the engine waited {BOUND_S} s"
    assert isinstance(out.error, LivemigError), out.error
    assert command in str(out.error) and side in str(out.error)
    assert_one_copy(source)


def test_rollback_restores_the_source_migration_settings() -> None:
    source, target = fake_pair()
    target.on("migrate-incoming", error="Failed to bind socket: Address already in use")
    out = asyncio.run(drive(source, target))
    assert isinstance(out.error, MigrationError)
    assert source.count("migrate-set-parameters") >= 1  # the engine did change them
    assert source.running
    assert source.capabilities == DEFAULT_CAPABILITIES
    assert source.parameters == DEFAULT_PARAMETERS


def test_no_progress_within_the_stall_deadline_rolls_back() -> None:
    """A link that stops carrying anything (transferred frozen) ends the migration."""
    source, target = fake_pair(precopy_polls=None)  # the fake's counter stops growing
    out = asyncio.run(drive(source, target, make_request(stall_timeout_s=0.3)))
    assert not out.hung
    assert isinstance(out.error, MigrationError) and "no progress" in str(out.error)
    assert source.running and not target.alive
    assert_one_copy(source)


def test_a_dead_source_is_reported_as_a_lost_vm_not_as_staying_on_the_source() -> None:
    source, target = fake_pair(precopy_polls=None)

    async def crash_source(task: asyncio.Task[MigrationReport]) -> None:
        await source.wait_command("query-migrate", n=3)
        await source.kill("segfault")

    out = asyncio.run(drive(source, target, during=crash_source))
    assert isinstance(out.error, MigrationError), out.error
    assert "VM is lost" in str(out.error) and "stays on the source" not in str(out.error)
    report = out.final_report
    assert report is not None and report.status is Status.FAILED
    assert "the VM is lost" in (report.error or "")
    assert not target.running


def test_progress_watch() -> None:
    from migrate.native import ProgressWatch

    watch = ProgressWatch(1.0)
    assert not watch.stalled(10, now=0.0)
    assert not watch.stalled(10, now=0.9)
    assert watch.stalled(10, now=1.1)
    assert not watch.stalled(11, now=1.2)


def test_a_silent_process_on_this_host_is_killed_for_proof() -> None:
    """A stopped (SIGSTOP) process answers nothing; SIGKILL still ends it, and the
    reaped (or zombie) process counts as gone."""
    import signal
    import subprocess

    from migrate.qmp import process_exited
    from migrate.safety import _kill_and_reap

    proc = subprocess.Popen(["sleep", "30"])
    try:
        proc.send_signal(signal.SIGSTOP)
        assert not process_exited(proc.pid)
        assert asyncio.run(_kill_and_reap(proc.pid)) is True
        assert process_exited(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_ram_check_that_cannot_finish_keeps_the_vm_on_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host's RAM owner unreachable at switchover: the check proves nothing,
    so the target is not resumed (QEMU 7.2 under TCG loses dirty pages); the VM
    stays on the source."""
    import migrate.native
    from dirtytrack.digest import RamDigest
    from migrate.remoteram import RemoteRam

    ram = tmp_path / "source.ram"
    ram.write_bytes(bytes(64 * 4096))

    async def files(_session: object) -> dict[str, Path]:
        return {"ram0": ram}

    async def unreachable() -> RamDigest:
        raise OSError("agent unreachable")

    async def never(*_args: object) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(migrate.native, "ram_backing_files", files)
    source, target = fake_pair()
    request = make_request(
        verify=True,
        target_ram=RemoteRam(unreachable, never, never),  # type: ignore[arg-type]
    )
    out = asyncio.run(drive(source, target, request))
    assert isinstance(out.error, MigrationAborted), out.error
    assert "integrity check could not be completed" in str(out.error)
    assert "agent unreachable" in str(out.error)
    assert target.count("cont") == 0 and not target.running
    assert source.running
    assert_one_copy(source)

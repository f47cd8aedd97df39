"""The migration journal: atomic files, one per migration, and the refusal of a VM left unfinished.

The engine's use of it runs against two fake QEMUs (``tests.fakes``): every phase is
recorded before it starts, the point of no return before the target's ``cont``, and
the journal is finished once exactly one copy of the VM runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from migrate.errors import ConfigError, MigrationAborted
from migrate.journal import (
    KEEP_FINISHED_S,
    JournalBusy,
    JournalOutcome,
    JournalRecord,
    JournalStore,
    MigrationSettings,
    point_of_no_return,
    state_dir_for_cli,
    write_atomically,
)
from migrate.phase import Phase
from migrate.report import Status
from migrate.request import HostEndpoint, MigrationRequest
from tests.fakes import DEFAULT, Fail, fake_pair
from tests.fakes.qmp import DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS
from tests.unit.test_safety_fake_qmp import (  # noqa: F401 (a fixture)
    AbortAt,
    _committed_cpu_models,
    assert_one_copy,
    drive,
    make_request,
)


def request_for(tmp_path: Path, **changes: Any) -> MigrationRequest:
    """A fake migration with socket paths (nothing listens there) and a state dir."""
    request = make_request(
        source=HostEndpoint("src", tmp_path / "source.qmp"),
        target=HostEndpoint("dst", tmp_path / "target.qmp", "tcp:198.19.0.2:4444"),
        state_dir=tmp_path / "state",
    )
    return dataclasses.replace(request, **changes)


def record_for(request: MigrationRequest) -> JournalRecord:
    settings = MigrationSettings(dict(DEFAULT_CAPABILITIES), dict(DEFAULT_PARAMETERS))
    return JournalRecord.for_request(request, True, settings)


# -- files ------------------------------------------------------------------------------------


def test_an_atomic_write_leaves_the_old_file_whole_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.json"
    write_atomically(path, b'{"old": 1}')
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b'{"new": 2}')
    assert path.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json"]  # no temporary left


def test_a_record_round_trips_through_its_json(tmp_path: Path) -> None:
    record = record_for(request_for(tmp_path))
    assert JournalRecord.from_json(record.to_json()) == record
    data = json.loads(record.to_json())
    assert data["source"]["qmp_socket"] == str((tmp_path / "source.qmp").resolve())
    assert data["target"]["migration_uri"] == "tcp:198.19.0.2:4444"
    assert data["phase"] == "setup" and data["point_of_no_return"] is False
    assert data["settings"]["parameters"]["downtime-limit"] == 300


def test_each_change_rewrites_the_file_and_finish_moves_it_to_done(tmp_path: Path) -> None:
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    journal = store.begin(request, record_for(request))
    path = store.path(request.migration_id)
    assert store.lock_path(request.migration_id).exists() and store.owner_alive(
        request.migration_id
    )
    journal.phase(Phase.PRECOPY)
    assert JournalRecord.from_json(path.read_bytes()).phase is Phase.PRECOPY
    journal.point_of_no_return()
    on_disk = JournalRecord.from_json(path.read_bytes())
    assert on_disk.point_of_no_return and on_disk.point_of_no_return_at is not None
    assert [m.phase for m in on_disk.history] == [Phase.SETUP, Phase.PRECOPY]
    assert journal.finish(JournalOutcome("completed", None, "target", time.time()))
    assert not path.exists() and not store.lock_path(request.migration_id).exists()
    done = store.finished(request.migration_id)
    assert done is not None and done.finished and done.outcome is not None
    assert done.outcome.vm_on == "target"
    assert store.unfinished() == []
    assert [
        p.name for p in store.dir.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"
    ] == []


def test_point_of_no_return_marks_only_the_active_journal(tmp_path: Path) -> None:
    from migrate.journal import active

    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    journal = store.begin(request, record_for(request))
    point_of_no_return()  # no active journal: nothing
    assert not journal.record.point_of_no_return
    with active(journal):
        point_of_no_return()
    assert JournalRecord.from_json(journal.path.read_bytes()).point_of_no_return
    journal.close()


def test_finished_journals_are_pruned_after_a_month(tmp_path: Path) -> None:
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    store.begin(request, record_for(request)).finish(JournalOutcome("completed", None, "target", 0))
    done = store.done_dir / f"{request.migration_id}.json"
    store.prune()
    assert done.exists()
    store.prune(now=time.time() + KEEP_FINISHED_S + 60)
    assert not done.exists()


def test_the_cli_state_dir_comes_from_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LIVEMIG_STATE_DIR", raising=False)
    assert state_dir_for_cli(None) == Path("/var/lib/livemig")
    monkeypatch.setenv("LIVEMIG_STATE_DIR", "/srv/lm")
    assert state_dir_for_cli(None) == Path("/srv/lm")
    assert state_dir_for_cli(Path("/x")) == Path("/x")


def test_an_id_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    # The request refuses it first; the journal refuses it too, for records built
    # around the request (e.g. by dataclasses.replace on an existing one).
    with pytest.raises(ConfigError, match="not a valid name"):
        request_for(tmp_path, migration_id="../../etc/passwd")
    request = request_for(tmp_path)
    object.__setattr__(request, "migration_id", "../../etc/passwd")
    with pytest.raises(ConfigError, match="cannot name a journal file"):
        JournalStore(tmp_path / "state").begin(request, record_for(request))


# -- refusal ----------------------------------------------------------------------------------


def test_a_vm_with_an_unfinished_journal_is_refused_until_recovered(tmp_path: Path) -> None:
    first = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    journal = store.begin(first, record_for(first))
    journal.phase(Phase.PRECOPY)
    # While its owner lives the lock is held: "being migrated".
    second = request_for(tmp_path)
    with pytest.raises(JournalBusy, match=f"being migrated.*{first.migration_id}"):
        store.begin(second, record_for(second))
    journal.close()  # the owner died: the kernel dropped its lock, the journal stays
    with pytest.raises(ConfigError) as refused:
        store.begin(second, record_for(second))
    assert str(refused.value) == (
        f"VM vm ({(tmp_path / 'source.qmp').resolve()}) has an unfinished migration "
        f"{first.migration_id} (phase precopy): run `livemig recover --state-dir "
        f"{tmp_path / 'state'}`"
    )
    # Migrating the VM back from the old target is the same VM too.
    back = dataclasses.replace(
        second,
        source=HostEndpoint("dst", tmp_path / "target.qmp"),
        target=HostEndpoint("src", tmp_path / "other.qmp", "tcp:198.19.0.1:4444"),
    )
    with pytest.raises(ConfigError, match="unfinished migration"):
        store.begin(back, record_for(back))
    # Another VM is not concerned.
    other = dataclasses.replace(
        second,
        source=HostEndpoint("a", tmp_path / "vm2-a.qmp"),
        target=HostEndpoint("b", tmp_path / "vm2-b.qmp", "tcp:198.19.0.2:4445"),
    )
    store.begin(other, record_for(other)).close()


def test_an_unreadable_journal_is_reported_by_name(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "state")
    store.dir.mkdir(parents=True)
    (store.dir / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"unreadable migration journal .*broken\.json"):
        store.unfinished()


# -- the engine keeps it -------------------------------------------------------------------------


def test_a_completed_migration_records_each_phase_and_the_point_of_no_return_before_cont(
    tmp_path: Path,
) -> None:
    source, target = fake_pair()
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    seen_at: dict[str, JournalRecord] = {}

    def read_journal(name: str) -> Any:
        def answer(arguments: dict[str, Any] | None) -> Any:
            seen_at[name] = JournalRecord.from_json(store.path(request.migration_id).read_bytes())
            return DEFAULT

        return answer

    source.on("migrate-set-capabilities", read_journal("set-up"), times=1)
    source.on("migrate", read_journal("migrate"))
    target.on("cont", read_journal("cont"))
    out = asyncio.run(drive(source, target, request))
    assert out.report is not None and out.report.status is Status.COMPLETED, out.error
    # Recorded before the first change, the first transfer and the target's cont.
    assert seen_at["set-up"].phase is Phase.SETUP and seen_at["set-up"].source_was_running
    assert seen_at["set-up"].settings is not None
    assert seen_at["set-up"].settings.capabilities == DEFAULT_CAPABILITIES
    assert seen_at["migrate"].phase is Phase.PRECOPY
    assert not seen_at["migrate"].point_of_no_return
    assert seen_at["cont"].phase is Phase.SWITCHOVER and seen_at["cont"].point_of_no_return
    done = store.finished(request.migration_id)
    assert done is not None and done.outcome is not None
    assert done.outcome.status == "completed" and done.outcome.vm_on == "target"
    assert [m.phase for m in done.history] == [
        Phase.SETUP, Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMPLETED,
    ]  # fmt: skip
    assert store.unfinished() == [] and not store.owner_alive(request.migration_id)
    assert_one_copy(source)


def test_an_aborted_migration_finishes_its_journal_with_the_vm_on_the_source(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=None)
    request = request_for(tmp_path)
    out = asyncio.run(drive(source, target, request, controller=AbortAt(2)))
    assert isinstance(out.error, MigrationAborted), out.error
    done = JournalStore(tmp_path / "state").finished(request.migration_id)
    assert done is not None and done.outcome is not None
    assert (done.outcome.status, done.outcome.vm_on) == ("aborted", "source")
    assert not done.point_of_no_return and done.phase is Phase.ABORTED
    assert len(out.finished) == 1 and out.events[-1] is out.finished[0]


def test_a_refused_start_leaves_nothing_to_recover(tmp_path: Path) -> None:
    source, target = fake_pair()
    source.blockers = ("a vfio device",)
    request = request_for(tmp_path)
    out = asyncio.run(drive(source, target, request))
    assert out.error is not None and "preflight refused" in str(out.error)
    done = JournalStore(tmp_path / "state").finished(request.migration_id)
    assert done is not None and done.outcome is not None and done.outcome.status == "refused"
    # A target that is not waiting is refused before any journal exists.
    source2, busy = fake_pair()
    busy.runstate = "running"
    request2 = request_for(tmp_path)
    out = asyncio.run(drive(source2, busy, request2))
    assert isinstance(out.error, ConfigError) and "not waiting" in str(out.error)
    store = JournalStore(tmp_path / "state")
    assert store.finished(request2.migration_id) is None and store.unfinished() == []


def test_a_rollback_that_cannot_prove_one_copy_keeps_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The target stops answering as its incoming migration fails, and its QMP socket
    # still has a listener: the engine cannot tell whether it runs, so the journal
    # stays for recovery (whatever the rollback did with the source).
    import socket

    import migrate.engine

    monkeypatch.setattr(migrate.engine, "_LOCATE_S", 0.3)
    source, target = fake_pair()

    def fail_and_go_silent(arguments: dict[str, Any] | None) -> Any:
        target.cut_link()
        return Fail("Failed to bind socket: Address already in use")

    target.on("migrate-incoming", fail_and_go_silent)
    request = request_for(tmp_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "target.qmp"))
    listener.listen()
    try:
        out = asyncio.run(drive(source, target, request, bound=20))
    finally:
        listener.close()
    assert out.error is not None and "Address already in use" in str(out.error)
    store = JournalStore(tmp_path / "state")
    (kept,) = store.unfinished()
    assert kept.migration_id == request.migration_id and kept.outcome is not None
    assert kept.outcome.status == "failed" and kept.outcome.vm_on is None
    assert not store.owner_alive(request.migration_id)
    notices = [getattr(e, "message", "") for e in out.events]
    assert any("livemig recover" in n for n in notices), notices
    assert out.finished and out.events[-1] is out.finished[0]


def test_the_engine_refuses_a_vm_with_an_unfinished_journal_before_touching_it(
    tmp_path: Path,
) -> None:
    store = JournalStore(tmp_path / "state")
    crashed = request_for(tmp_path)
    store.begin(crashed, record_for(crashed)).close()  # its engine died
    source, target = fake_pair()
    out = asyncio.run(drive(source, target, request_for(tmp_path)))
    assert isinstance(out.error, ConfigError), out.error
    assert f"unfinished migration {crashed.migration_id} (phase setup)" in str(out.error)
    assert source.commands == [] and target.commands == []


def test_without_a_state_dir_nothing_is_written(tmp_path: Path) -> None:
    source, target = fake_pair()
    request = request_for(tmp_path, state_dir=None)
    out = asyncio.run(drive(source, target, request))
    assert out.report is not None and out.report.status is Status.COMPLETED
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("failing", ["phase", "point-of-no-return"])
def test_a_journal_that_cannot_be_written_stops_the_migration_before_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    from migrate import journal as journal_module

    real = journal_module.write_atomically

    def disk_full(path: Path, data: bytes) -> None:
        record = json.loads(data)
        if (failing == "phase" and record["phase"] == "precopy") or (
            failing == "point-of-no-return" and record["point_of_no_return"]
        ):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(journal_module, "write_atomically", disk_full)
    source, target = fake_pair()
    request = request_for(tmp_path)
    out = asyncio.run(drive(source, target, request))
    assert out.error is not None and "No space left on device" in str(out.error)
    if failing == "phase":
        assert "migrate" not in source.commands  # pre-copy never started
    assert target.count("cont") == 0 and not target.alive
    assert source.running and source.count("cont") == (1 if failing != "phase" else 0)
    done = JournalStore(tmp_path / "state").finished(request.migration_id)
    assert done is not None and done.outcome is not None
    assert (done.outcome.status, done.outcome.vm_on) == ("failed", "source")
    assert_one_copy(source)

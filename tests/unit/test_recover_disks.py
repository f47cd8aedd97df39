"""``livemig recover`` after a crash mid disk copy (``--with-local-disks``), on fake QEMUs.

The journal records the disk copy before it starts (:class:`JournalDisks`); recovery
stops it on the source and removes the target's partial image when the VM stays on
the source, or drops the target's NBD exports (its image stays) when the VM runs on
the target. :class:`BlockModel` gives a fake QEMU the block objects a disk copy makes
(jobs, nodes, exports, the NBD server, dirty bitmaps) and the QMP commands on them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from migrate.disks import leftovers
from migrate.disks.replica_store import DiskReplica, ReplicaState, ReplicaStore
from migrate.journal import JournalDisk, JournalDisks, JournalRecord, JournalStore
from migrate.phase import Phase
from tests.fakes import FakeQmp, fake_pair
from tests.fakes.qmp import Fail, Reply
from tests.unit.test_journal import record_for, request_for
from tests.unit.test_recover import (
    _PHASES_TO,
    VM_BACK_ON_SOURCE,
    VM_ON_TARGET,
    assert_finished,
    engine_setup,
    poll_until,
    recover,
)
from tests.unit.test_safety_fake_qmp import assert_one_copy

TAG = "lmabcd1234"
JOB, CLIENT, EXPORT = f"{TAG}-mirror-disk0", f"{TAG}-nbd-disk0", f"{TAG}-disk0"
NODE = "drive-disk0-fmt"


class BlockModel:
    """A fake QEMU's block layer, as far as a disk copy touches it."""

    def __init__(self, fake: FakeQmp) -> None:
        self.jobs: set[str] = set()
        self.nodes: set[str] = set()
        self.exports: set[str] = set()
        self.server = False
        self.bitmaps: set[str] = set()
        self.fake = fake
        fake.on(
            "query-block-jobs",
            lambda a: Reply(
                [{"device": j, "ready": True, "offset": 1, "len": 2} for j in self.jobs]
            ),
        )
        fake.on("block-job-cancel", self._cancel)
        fake.on("blockdev-del", self._del)
        fake.on("query-block-exports", lambda a: Reply([{"id": e} for e in self.exports]))
        fake.on("block-export-del", self._export_del)
        fake.on("nbd-server-stop", self._server_stop)
        fake.on(
            "query-block",
            lambda a: Reply(
                [
                    {
                        "device": "disk0",
                        "inserted": {
                            "node-name": NODE,
                            "dirty-bitmaps": [{"name": b} for b in self.bitmaps],
                        },
                    }
                ]
            ),
        )
        fake.on("block-dirty-bitmap-remove", self._bitmap_remove)

    def _cancel(self, args: dict[str, Any]) -> Any:
        if args["device"] not in self.jobs:
            return Fail(f"Job '{args['device']}' not found", "DeviceNotActive")
        assert args.get("force") is True, "a READY mirror cancelled without force completes"
        self.jobs.discard(args["device"])
        return Reply({})

    def _del(self, args: dict[str, Any]) -> Any:
        if args["node-name"] not in self.nodes:
            return Fail(f"Failed to find node with node-name='{args['node-name']}'")
        if self.jobs:
            return Fail("Node is in use")
        self.nodes.discard(args["node-name"])
        return Reply({})

    def _export_del(self, args: dict[str, Any]) -> Any:
        if args["id"] not in self.exports:
            return Fail(f"Export '{args['id']}' is not found")
        self.exports.discard(args["id"])
        return Reply({})

    def _server_stop(self, args: dict[str, Any]) -> Any:
        if not self.server:
            return Fail("NBD server not running")
        self.server = False
        return Reply({})

    def _bitmap_remove(self, args: dict[str, Any]) -> Any:
        assert args["node"] == NODE
        if args["name"] not in self.bitmaps:
            return Fail(f"Dirty bitmap '{args['name']}' not found")
        self.bitmaps.discard(args["name"])
        return Reply({})


def disks_entry(image: Path, replica_dir: Path | None = None) -> JournalDisks:
    replica = str(replica_dir) if replica_dir else None
    return JournalDisks(
        nbd_address="198.19.0.2:4445",
        disks=(JournalDisk("disk0", str(image), EXPORT, CLIENT, JOB, NODE, replica),),
        verify_bitmap="livemig-verify",
        verify_export="livemig-verify",
    )


def crashed_with_disks(
    tmp_path: Path, phase: Phase, disks: JournalDisks, point_of_no_return: bool = False
) -> JournalRecord:
    request = request_for(tmp_path)
    store = JournalStore(tmp_path / "state")
    journal = store.begin(request, record_for(request))
    journal.record_disks(disks)
    for step in _PHASES_TO[phase]:
        journal.phase(step)
    if point_of_no_return:
        journal.point_of_no_return()
    journal.close()
    return journal.record


def claimed_replica(tmp_path: Path, migration_id: str) -> ReplicaStore:
    """A replica directory whose disk0 the crashed migration had claimed."""
    store = ReplicaStore(tmp_path / "replica")
    store.dir.mkdir()
    disk = DiskReplica("disk0", "drive-disk0", 1 << 26, 3, "livemig-replica-0123abcd-3",
                       1.5e9, "full", 1 << 26, 0.5)  # fmt: skip
    store.save(ReplicaState("0123abcd").with_disk(disk))
    store.mark("disk0", migration_id, "claim")
    return store


def test_the_journal_keeps_the_disk_copy_and_reads_older_journals_without_it(
    tmp_path: Path,
) -> None:
    disks = disks_entry(tmp_path / "t.qcow2")
    record = crashed_with_disks(tmp_path, Phase.SETUP, disks)
    (again,) = JournalStore(tmp_path / "state").unfinished()
    assert again.disks == disks == record.disks
    old = record.to_json().replace(b'"disks"', b'"unused"')
    assert JournalRecord.from_json(old).disks is None


def test_a_crash_mid_mirror_stops_the_copy_quits_the_target_and_removes_its_image(
    tmp_path: Path,
) -> None:
    source, target = fake_pair()
    src, dst = BlockModel(source), BlockModel(target)
    image = tmp_path / "target-disk0.qcow2"
    image.write_bytes(b"partial")
    # The engine died mid-mirror: the first copy runs, a catch-up round's bitmap is
    # left from a replica start, the target exports the disk; no RAM migration yet.
    src.jobs, src.nodes = {JOB}, {CLIENT}
    src.bitmaps = {f"{JOB}-round-2", "livemig-replica-7"}
    dst.exports, dst.server = {EXPORT}, True
    record = crashed_with_disks(tmp_path, Phase.SETUP, disks_entry(image, tmp_path / "replica"))
    replica = claimed_replica(tmp_path, record.migration_id)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert source.running and not target.alive
    # The replica it started from is untouched, released: the next run may use it.
    released = replica.load().disks["disk0"]
    assert released.in_use_by is None and released.consumed_by is None
    assert any("marked the replica of disk disk0" in a and "released" in a
               for a in result.actions), result.actions  # fmt: skip
    assert src.jobs == set() and src.nodes == set()
    assert src.bitmaps == {"livemig-replica-7"}  # the replica's own bitmap stays
    assert not image.exists()
    actions = result.actions
    assert f"cancelled the disk copy job(s) on the source: {JOB}" in actions, actions
    assert f"removed the source's NBD client node(s) {CLIENT}" in actions, actions
    assert f"removed the target's partial copy of disk disk0 ({image})" in actions, actions
    assert not [a for a in actions if a.startswith("could not")], actions
    world = source.world
    # The mirror stops before its NBD server goes (a write to a vanished target fails).
    assert world.position("source", "command", "block-job-cancel") < world.position(
        "target", "died", "quit"
    )
    assert_finished(store, result, "source")
    assert_one_copy(source)


def test_a_crash_in_precopy_with_disks_leaves_no_comparison_export_on_the_source(
    tmp_path: Path,
) -> None:
    source, target = fake_pair(precopy_polls=None)
    src, dst = BlockModel(source), BlockModel(target)
    image = tmp_path / "target-disk0.qcow2"
    image.write_bytes(b"partial")

    async def crash_mid_precopy() -> None:
        await engine_setup(source, target)
        await poll_until(source, "active")

    asyncio.run(crash_mid_precopy())
    src.jobs, src.nodes, src.bitmaps = {JOB}, {CLIENT}, {"livemig-verify"}
    src.exports, src.server = {"livemig-verify"}, True  # the comparison's own server
    dst.exports, dst.server = {EXPORT}, True
    crashed_with_disks(tmp_path, Phase.PRECOPY, disks_entry(image))
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert source.count("migrate_cancel") == 1 and source.running and not target.alive
    assert (src.jobs, src.nodes, src.exports, src.bitmaps) == (set(), set(), set(), set())
    assert src.server is False and not image.exists()
    assert_finished(store, result, "source")


def test_a_target_that_cannot_be_shown_gone_keeps_its_image(tmp_path: Path) -> None:
    source, target = fake_pair()
    src = BlockModel(source)
    src.jobs, src.nodes = {JOB}, {CLIENT}
    image = tmp_path / "target-disk0.qcow2"
    image.write_bytes(b"partial")
    target.cut_link()  # alive, QMP unreachable: it never got the VM (no RAM sent)
    crashed_with_disks(tmp_path, Phase.SETUP, disks_entry(image))
    (result,), _ = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert src.jobs == set() and image.exists()
    assert "kept the target's partial disk images: its QEMU may still hold them" in result.actions


def test_the_vm_on_the_target_keeps_its_image_and_loses_the_nbd_exports(tmp_path: Path) -> None:
    source, target = fake_pair(precopy_polls=2)
    dst = BlockModel(target)
    image = tmp_path / "target-disk0.qcow2"
    image.write_bytes(b"the VM's disk now")

    async def crash_just_before_cont() -> None:
        await engine_setup(source, target)
        await poll_until(source, "completed")

    asyncio.run(crash_just_before_cont())
    dst.exports, dst.server = {EXPORT}, True  # killed before the exports were dropped
    record = crashed_with_disks(
        tmp_path, Phase.SWITCHOVER, disks_entry(image, tmp_path / "replica"),
        point_of_no_return=True,
    )  # fmt: skip
    replica = claimed_replica(tmp_path, record.migration_id)
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_ON_TARGET, result
    # The replica backs the VM's disk now: consumed, never to be written or reused.
    assert replica.load().disks["disk0"].consumed_by == record.migration_id
    assert target.running and not source.alive
    assert dst.exports == set() and dst.server is False
    assert image.read_bytes() == b"the VM's disk now"
    assert f"removed the target's NBD export(s) {EXPORT}" in result.actions, result.actions
    assert "stopped the target's NBD server (198.19.0.2:4445)" in result.actions
    world = source.world
    assert world.position("source", "died", "quit") < world.position(
        "target", "command", "block-export-del"
    )
    assert_finished(store, result, "target")
    assert_one_copy(source)


def test_a_mirror_that_outlives_its_cancel_is_cleaned_up_once_the_target_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a slow link a force-cancelled mirror drains its writes in flight first; it
    # ends (and frees its NBD client node) only when the target's NBD server goes.
    monkeypatch.setattr(leftovers, "WAIT_S", 0.2)
    source, target = fake_pair()
    src = BlockModel(source)
    src.jobs, src.nodes = {JOB}, {CLIENT}
    image = tmp_path / "target-disk0.qcow2"
    image.write_bytes(b"partial")

    def jobs(args: dict[str, Any]) -> Any:
        if not target.alive:
            src.jobs.clear()
        return Reply([{"device": j} for j in src.jobs])

    source.on("query-block-jobs", jobs)
    source.on("block-job-cancel", Reply({}))  # accepted, the job goes on
    crashed_with_disks(tmp_path, Phase.SETUP, disks_entry(image))
    (result,), store = recover(tmp_path, source, target)
    assert result.result == VM_BACK_ON_SOURCE, result
    assert src.jobs == set() and src.nodes == set() and not image.exists()
    assert any("still on the source" in a for a in result.actions), result.actions
    assert f"removed the source's NBD client node(s) {CLIENT}" in result.actions
    assert_finished(store, result, "source")

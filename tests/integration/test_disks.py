"""VMs with a local disk between the lab's hosts: mirrored over NBD, refused without
``--with-local-disks``, and an abort mid-mirror that leaves the VM and its disk on
the source and no target image behind — also when the engine itself is killed
mid-mirror and ``livemig recover`` cleans up after it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.demo import DISK_ID, DemoConfig, LabPair, Workload, run_demo, run_in_lab
from lab.qemu import QemuProcess
from migrate.api import Migration
from migrate.disks.classify import block_disks
from migrate.disks.images import create_like, extent_map, image_info
from migrate.errors import PreflightError, QemuError
from migrate.events import EventBus
from migrate.journal import JournalStore
from migrate.qmp import QmpSession
from migrate.report import Integrity, MigrationReport, Status
from migrate.strategy import HostEndpoint, MigrationHooks, MigrationRequest
from tests.integration.conftest import livemig_cli
from tests.jsonschemas import validate_report


def _config(tmp_path: Path, **kwargs: object) -> DemoConfig:
    base: dict[str, object] = {
        "workload": Workload("openssl+disk:4"),
        "memory_mib": 128,
        "disk_mib": 32,
        "log_dir": tmp_path,
        "warmup_s": 0.5,
        "with_local_disks": True,
    }
    base.update(kwargs)
    return DemoConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["native", "pagestream"])
def test_local_disk_moves_live_with_its_disk(tmp_path: Path, strategy: str) -> None:
    result = asyncio.run(run_demo(_config(tmp_path, strategy=strategy)))
    report = result.report
    data = validate_report(json.loads(json.dumps(result.to_dict())))
    assert report.status is Status.COMPLETED, report.error
    assert report.integrity is Integrity.OK, report.integrity_detail
    assert str(report.guest_check).startswith("ok"), report.guest_check
    assert "diskcheck" in str(report.guest_check) and "openssl" in str(report.guest_check)
    (disk,) = data["disks"]
    assert disk["name"] == "disk0" and disk["mode"] == "mirrored"
    assert disk["integrity"] == "ok", disk["detail"]
    # The guest filled its whole 32 MiB disk: all of it was copied, and compared.
    assert disk["bytes"] >= 32 << 20 and disk["copy_mode"] == "write-blocking"
    assert disk["ready_ms"] is not None and disk["ready_ms"] > 0
    # The downtime re-checked only what changed since the background pass (nothing
    # but the mirror wrote the target image: its watch saw no other writer).
    assert "re-checked" in disk["detail"] and "full comparison" not in disk["detail"], disk
    checks = {c.name: c for c in report.preflight}
    assert checks["local-disks"].verdict == "ok" and "disk0" in checks["local-disks"].detail
    # The forecast counted the first copy and what the guest writes to the disk
    # (disk:4 writes 4 MiB/s in bursts between its read-backs; QEMU's counters saw it).
    predicted = data["predicted"]
    assert predicted["disk_copy_bytes"] >= 32 << 20
    assert 0.5 * (1 << 20) < predicted["disk_write_bytes_per_s"] < 16 * (1 << 20), predicted
    assert "less the guest's disk writes" in predicted["bandwidth_source"]


async def _source_status(pair: LabPair) -> str:
    """The source's run state; if its QMP session is lost, why (QEMU's exit code, the
    end of its log and of the guest's console: a QEMU abort or a guest panic under
    ``-no-reboot`` both end the process)."""
    try:
        return await pair.source.qmp.status()
    except QemuError as exc:
        await asyncio.sleep(0.5)
        raise AssertionError(
            f"{exc}; source QEMU exit code {pair.source.returncode}; its log ends: "
            f"{pair.source.read_qemu_log()[-1500:]!r}; console ends: "
            f"{[line.text for line in pair.source.console.lines[-15:]]}"
        ) from exc


async def _kill_engine_mid_mirror_then_recover(
    pair: LabPair, tmp_path: Path, seen: dict[str, object]
) -> None:
    """``livemig migrate --with-local-disks`` to a fresh target, SIGKILLed while its
    mirror copies (QEMU's mirror goes on without it), then ``livemig recover``."""
    assert pair.disk_images is not None
    source_image, first_target_image = pair.disk_images
    image = first_target_image.with_name("target-2-disk0.qcow2")
    await create_like(image, await image_info(source_image))
    state_dir = tmp_path / "state"
    target = QemuProcess(
        pair.spec, role="target-2", netns=pair.lab.host_b.netns,
        taps={"net0": pair.lab.add_tap(pair.lab.host_b)}, incoming=True, paused=True,
        log_dir=tmp_path, disk_paths={DISK_ID: image},
    )  # fmt: skip
    async with target:
        await pair.source.release_qmp()
        await target.release_qmp()
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migrate.cli", "migrate", "--events",
            "--source-qmp", str(pair.source.site.qmp_socket),
            "--target-qmp", str(target.site.qmp_socket),
            "--target-uri", pair.lab.host_b.migration_uri(4446),
            "--state-dir", str(state_dir), "--with-local-disks", "--no-predict",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, "the CLI ended before its mirror copied"
                record = json.loads(line)
                if record["event"] == "disk-progress":
                    (disk,) = record["disks"]
                    if disk["copied_bytes"] > 1 << 20 and not disk["ready"]:
                        seen["killed_at"] = disk["copied_bytes"]
                        break
            proc.kill()  # SIGKILL: no rollback; the mirror and the NBD server stay
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        store = JournalStore(state_dir)
        (journal,) = store.unfinished()
        assert journal.disks is not None
        (recorded,) = journal.disks.disks
        assert recorded.target_image == str(image) and image.exists()
        code, out, err = await livemig_cli("recover", "--state-dir", str(state_dir), "--json")
        assert code == 0, (out, err)
        (result,) = json.loads(out)["migrations"]
        seen["recover"] = result
        seen["crash_s"] = time.monotonic() - began
        seen["target_2_exited"] = await target.wait_exited(10) is not None
        seen["target_2_image"] = image.exists()
        session = await QmpSession.connect(pair.source.site.qmp_socket, "check", 5)
        try:
            seen["after_status"] = await session.status()
            seen["after_jobs"] = await session.execute("query-block-jobs")
            nodes = await session.execute("query-named-block-nodes", {"flat": True})
            seen["after_nbd_nodes"] = [n["node-name"] for n in nodes if n["drv"] == "nbd"]
            seen["after_exports"] = await session.execute("query-block-exports")
        finally:
            await session.close()
        mark = len(pair.source.console.lines)
        line = await pair.source.console.wait_for(r"^DISKCHECK pass=", 30, since=mark)
        seen["after_check"] = line.text
        seen["recover_done"] = store.unfinished() == []


def test_abort_mid_mirror_leaves_vm_and_disk_on_source(tmp_path: Path) -> None:
    """A slow link keeps the mirror busy; the abort comes while it copies. Then the
    same with the engine killed mid-mirror and ``livemig recover``."""
    seen: dict[str, object] = {}

    async def migrate(pair: LabPair) -> MigrationReport:
        assert pair.disk_images is not None
        source_image, target_image = pair.disk_images
        request = MigrationRequest(
            source=HostEndpoint("host-a", pair.source.site.qmp_socket),
            target=HostEndpoint("host-b", pair.target.site.qmp_socket, pair.migration_uri),
            vm=pair.spec.name,
            with_local_disks=True,
        )
        migration = Migration(request, source=pair.source.qmp, target=pair.target.qmp,
                              events=EventBus())  # fmt: skip
        await migration.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = await pair.source.qmp.execute("query-block-jobs")
            if jobs and jobs[0]["offset"] > 0 and not jobs[0]["ready"]:
                seen["offset"], seen["len"] = jobs[0]["offset"], jobs[0]["len"]
                break
            await asyncio.sleep(0.05)
        migration.abort("test: abort mid-mirror")
        report = await migration.wait()
        mark = len(pair.source.console.lines)
        # The VM runs on the source, its disk workload still checks out there.
        assert await _source_status(pair) == "running"
        line = await pair.source.console.wait_for(r"^DISKCHECK pass=", 30, since=mark)
        line = await pair.source.console.wait_for(
            r"^DISKCHECK pass=", 30, since=pair.source.console.lines.index(line) + 1
        )
        seen["source_check"] = line.text
        seen["source_jobs"] = await pair.source.qmp.execute("query-block-jobs")
        seen["source_disks"] = [d.path for d in await block_disks(pair.source.qmp)]
        seen["target_alive"] = await pair.target.wait_exited(5.0) is None
        seen["target_image"] = target_image.exists()
        seen["source_image"] = subprocess.run(
            ["qemu-img", "check", "-U", str(source_image)], capture_output=True, text=True
        ).returncode
        await _kill_engine_mid_mirror_then_recover(pair, tmp_path, seen)
        return report

    config = _config(tmp_path, bandwidth_mbit=40.0, disk_mib=64)
    result = asyncio.run(run_in_lab(config, migrate))
    report = result.report
    assert "offset" in seen, "the mirror was never seen copying"
    assert report.status is Status.ABORTED, report.error
    assert "on the source" in str(report.error), report.error
    assert " bad=0 " in str(seen["source_check"]), seen["source_check"]
    assert seen["source_jobs"] == []
    assert seen["target_alive"] is False
    assert seen["target_image"] is False, "the target's partial copy was left behind"
    assert seen["source_image"] == 0
    (disk,) = report.disks
    assert disk.mode == "mirrored" and disk.integrity is Integrity.UNCHECKED
    assert "removed" in disk.detail
    # The engine killed mid-mirror: recover leaves exactly one running VM (the
    # source, its disk checking out), no mirror, no NBD node or server, no target image.
    result = seen["recover"]
    assert isinstance(result, dict)
    print(
        f"\nkilled mid-mirror at {seen['killed_at']} bytes; livemig recover: "
        f"{result['seconds'] * 1e3:.0f} ms; crash+recover {seen['crash_s']:.1f} s; did: "
        + "; ".join(result["actions"])
    )
    assert result["result"] == "vm back on source", result
    assert result["source"]["migration"] == "none", result["source"]
    assert any("cancelled the disk copy job" in a for a in result["actions"]), result
    assert any("removed the target's partial copy" in a for a in result["actions"]), result
    assert not [a for a in result["actions"] if a.startswith("could not")], result
    assert seen["target_2_exited"] is True and seen["target_2_image"] is False
    assert seen["after_status"] == "running" and seen["after_jobs"] == []
    assert seen["after_nbd_nodes"] == [] and seen["after_exports"] == []
    assert " bad=0 " in str(seen["after_check"]), seen["after_check"]
    assert seen["recover_done"] is True


def test_disk_that_differs_keeps_the_vm_on_the_source(tmp_path: Path) -> None:
    """A byte of the target's copy changed behind QEMU's back once its mirror is READY
    (before the background comparison: a change the guest did not write is not in
    the source's dirty bitmap), and another after the background pass: the
    comparison catches it, the VM stays on the source, the target copy goes."""
    seen: dict[str, object] = {}

    async def migrate(pair: LabPair) -> MigrationReport:
        assert pair.disk_images is not None
        source_image, target_image = pair.disk_images

        async def flip(where: str, block: int) -> None:
            extents = [e for e in await extent_map(target_image) if e.data and not e.zero]
            assert extents and extents[0].offset is not None
            with target_image.open("r+b") as image:
                image.seek(extents[0].offset + 4096 * block + 100)
                old = image.read(1)
                image.seek(-1, 1)
                image.write(bytes([old[0] ^ 0xFF]))
            seen[where] = True

        async def corrupt() -> None:
            await flip("corrupted", 3)

        async def corrupt_after_the_background_pass() -> None:
            # Neither in the source's dirty bitmap nor among the chunks the background
            # pass saw differ: only the watch of the target image file tells.
            await flip("corrupted_late", 11)

        request = MigrationRequest(
            source=HostEndpoint("host-a", pair.source.site.qmp_socket),
            target=HostEndpoint("host-b", pair.target.site.qmp_socket, pair.migration_uri),
            vm=pair.spec.name,
            with_local_disks=True,
            hooks=MigrationHooks(
                after_disks_ready=corrupt, after_disks_compared=corrupt_after_the_background_pass
            ),
        )
        # First without --with-local-disks: refused before anything moves, naming the disk.
        unflagged = dataclasses.replace(request, with_local_disks=False)
        with pytest.raises(PreflightError) as refused:
            await Migration(unflagged, source=pair.source.qmp, target=pair.target.qmp,
                            events=EventBus()).run()  # fmt: skip
        seen["refused"] = " ".join(refused.value.reasons)
        migration = Migration(request, source=pair.source.qmp, target=pair.target.qmp,
                              events=EventBus())  # fmt: skip
        report = await migration.run()
        mark = len(pair.source.console.lines)
        assert await _source_status(pair) == "running"
        line = await pair.source.console.wait_for(r"^DISKCHECK pass=", 30, since=mark)
        seen["source_check"] = line.text
        seen["target_image"] = target_image.exists()
        seen["source_image"] = subprocess.run(
            ["qemu-img", "check", "-U", str(source_image)], capture_output=True, text=True
        ).returncode
        return report

    result = asyncio.run(run_in_lab(_config(tmp_path, workload=Workload("disk:4")), migrate))
    report = result.report
    # A local disk without the flag: refused, naming it and the flag.
    assert "local-disks" in str(seen["refused"]) and "disk0" in str(seen["refused"])
    assert "--with-local-disks" in str(seen["refused"])
    assert seen.get("corrupted") is True and seen.get("corrupted_late") is True
    assert report.status is Status.ABORTED, report.error
    assert "disk integrity check failed" in str(report.error)
    (disk,) = report.disks
    assert disk.integrity is Integrity.FAILED and "differs at guest offset" in disk.detail
    # The downtime did not trust its fast path: the image was written behind QEMU's back.
    assert "full comparison in the downtime" in disk.detail, disk.detail
    assert "written and closed by another process" in disk.detail, disk.detail
    assert seen["target_image"] is False
    assert seen["source_image"] == 0
    assert " bad=0 " in str(seen["source_check"]), seen["source_check"]

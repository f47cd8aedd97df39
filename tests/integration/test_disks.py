"""VMs with a local disk between the lab's hosts: mirrored over NBD, refused without
``--with-local-disks``, and an abort mid-mirror that leaves the VM and its disk on
the source and no target image behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from lab.demo import DemoConfig, LabPair, Workload, run_demo, run_in_lab
from migrate.api import Migration
from migrate.disks.classify import block_disks
from migrate.disks.images import extent_map
from migrate.errors import PreflightError
from migrate.events import EventBus
from migrate.report import Integrity, MigrationReport, Status
from migrate.strategy import HostEndpoint, MigrationHooks, MigrationRequest
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
    checks = {c.name: c for c in report.preflight}
    assert checks["local-disks"].verdict == "ok" and "disk0" in checks["local-disks"].detail


def test_local_disk_refused_without_the_flag(tmp_path: Path) -> None:
    config = _config(tmp_path, workload=Workload("disk:4"), with_local_disks=False)
    with pytest.raises(PreflightError) as refused:
        asyncio.run(run_demo(config))
    reasons = " ".join(refused.value.reasons)
    assert "local-disks" in reasons and "disk0" in reasons and "--with-local-disks" in reasons


def test_abort_mid_mirror_leaves_vm_and_disk_on_source(tmp_path: Path) -> None:
    """A slow link keeps the mirror busy; the abort comes while it copies."""
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
        assert await pair.source.qmp.status() == "running"
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


def test_disk_that_differs_keeps_the_vm_on_the_source(tmp_path: Path) -> None:
    """A byte of the target's copy changed behind QEMU's back once its mirror is READY
    (before the background comparison: a change the guest did not write is not in
    the source's dirty bitmap): the comparison catches it, the VM stays on the
    source, the target copy goes."""
    seen: dict[str, object] = {}

    async def migrate(pair: LabPair) -> MigrationReport:
        assert pair.disk_images is not None
        source_image, target_image = pair.disk_images

        async def corrupt() -> None:
            extents = [e for e in await extent_map(target_image) if e.data and not e.zero]
            assert extents and extents[0].offset is not None
            with target_image.open("r+b") as image:
                image.seek(extents[0].offset + 4096 * 3 + 100)
                old = image.read(1)
                image.seek(-1, 1)
                image.write(bytes([old[0] ^ 0xFF]))
            seen["corrupted"] = True

        request = MigrationRequest(
            source=HostEndpoint("host-a", pair.source.site.qmp_socket),
            target=HostEndpoint("host-b", pair.target.site.qmp_socket, pair.migration_uri),
            vm=pair.spec.name,
            with_local_disks=True,
            hooks=MigrationHooks(after_disks_ready=corrupt),
        )
        migration = Migration(request, source=pair.source.qmp, target=pair.target.qmp,
                              events=EventBus())  # fmt: skip
        report = await migration.run()
        mark = len(pair.source.console.lines)
        assert await pair.source.qmp.status() == "running"
        line = await pair.source.console.wait_for(r"^DISKCHECK pass=", 30, since=mark)
        seen["source_check"] = line.text
        seen["target_image"] = target_image.exists()
        seen["source_image"] = subprocess.run(
            ["qemu-img", "check", "-U", str(source_image)], capture_output=True, text=True
        ).returncode
        return report

    result = asyncio.run(run_in_lab(_config(tmp_path, workload=Workload("disk:4")), migrate))
    report = result.report
    assert seen.get("corrupted") is True
    assert report.status is Status.ABORTED, report.error
    assert "disk integrity check failed" in str(report.error)
    (disk,) = report.disks
    assert disk.integrity is Integrity.FAILED and "differs at guest offset" in disk.detail
    assert seen["target_image"] is False
    assert seen["source_image"] == 0
    assert " bad=0 " in str(seen["source_check"]), seen["source_check"]

"""``livemig replicate`` against a real QEMU 7.2 and qemu-storage-daemon.

One source QEMU (paused: the guest need not run; the host writes into its disk with
HMP ``qemu-io``) and one replica directory, through four runs of the real CLI: a
full first run, an incremental run that copies what was written, a run SIGKILLed
mid-copy that leaves the previous replica exactly as it was, and a run after it
that recovers everything the killed run was copying.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from lab.qemu import QemuProcess
from migrate.disks.model import CacheMode, DiskSpec
from migrate.disks.replica_mirror import mirror_from_replica
from migrate.disks.storage_daemon import StorageDaemon
from migrate.qmp import EventRecorder, QmpSession
from migrate.vmspec import VMSpec

MIB = 1 << 20
DISK = "disk0"
ROOT = Path(__file__).resolve().parents[2]


def _require() -> None:
    missing = [
        t
        for t in ("qemu-system-x86_64", "qemu-storage-daemon", "qemu-img")
        if shutil.which(t) is None
    ]
    if missing:
        pytest.fail(f"replication prerequisites missing: {', '.join(missing)}")


async def _hmp(sock: Path, *lines: str) -> None:
    session = await QmpSession.connect(sock, "test", timeout=10.0)
    try:
        for line in lines:
            out = await session.execute("human-monitor-command", {"command-line": line})
            assert "error" not in str(out).lower(), out
    finally:
        await session.close()


async def _write(sock: Path, pattern: int, offset_mib: int, length_mib: int) -> None:
    qdev = f"/machine/peripheral/{DISK}/virtio-backend"
    await _hmp(
        sock,
        f'qemu-io -d {qdev} "write -P {pattern:#x} {offset_mib}M {length_mib}M"',
        f'qemu-io -d {qdev} "flush"',  # the image file (qcow2 metadata too) is current
    )


async def _qmp(sock: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    session = await QmpSession.connect(sock, "test", timeout=10.0)
    try:
        return await session.execute(command, args)
    finally:
        await session.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate.cli", "replicate", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def _run(*args: str) -> dict[str, Any]:
    proc = await asyncio.to_thread(
        subprocess.run, _cli(*args, "--json"), env=_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _identical(a: Path, b: Path) -> bool:
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def _daemons_for(directory: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "qemu-storage-daemon" in cmdline and str(directory) in cmdline:
            found.append(proc.pid)
    return found


def test_replicate_full_incremental_and_killed_run(tmp_path: Path) -> None:
    _require()
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True)
    replica_dir = tmp_path / "replica"
    replica = replica_dir / f"{DISK}.qcow2"
    spec = VMSpec(
        name="repl",
        memory_mib=32,
        disks=(DiskSpec(DISK, src, 64 * MIB, cache=CacheMode.WRITEBACK),),
    )
    async with QemuProcess(spec, role="source", paused=True, log_dir=tmp_path) as vm:
        await vm.release_qmp()  # QEMU serves one QMP client at a time: the CLI's turn
        sock = vm.site.qmp_socket
        common = ("--qmp", str(sock), "--replica-dir", str(replica_dir))

        # 1. First run: the whole disk.
        await _write(sock, 0x11, 0, 16)
        first = await _run(*common)
        (disk,) = first["disks"]
        assert (disk["name"], disk["mode"], disk["generation"]) == (DISK, "full", 1)
        assert disk["written_bytes"] == 16 * MIB  # only the data landed; zeroes stayed holes
        assert _identical(src, replica)

        # 2. After 8 MiB written: an incremental run copies those 8 MiB, no more.
        await _write(sock, 0x22, 32, 8)
        second = await _run(*common)
        (disk,) = second["disks"]
        assert (disk["mode"], disk["generation"]) == ("incremental", 2)
        assert disk["dirty_bytes"] == 8 * MIB
        assert disk["bytes"] == 8 * MIB, disk
        assert disk["written_bytes"] == 8 * MIB
        assert _identical(src, replica)
        reference = tmp_path / "at-generation-2.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(src), str(reference)], check=True
        )

        # 3. A run SIGKILLed mid-copy (rate-limited so that there is a middle).
        await _write(sock, 0x33, 8, 24)
        killed = subprocess.Popen(
            _cli(*common, "--rate-limit", "4", "--json"),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            next_image = replica_dir / f"{DISK}.next.qcow2"
            while not (next_image.exists() and next_image.stat().st_size > 4 * MIB):
                assert killed.poll() is None, killed.communicate()
                assert time.monotonic() < deadline, "the run never started copying"
                await asyncio.sleep(0.05)
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while _daemons_for(replica_dir):  # PR_SET_PDEATHSIG takes the daemon down with it
            assert time.monotonic() < deadline, "the storage daemon outlived its owner"
            await asyncio.sleep(0.05)
        assert _identical(reference, replica), "the killed run changed the last good replica"
        state = json.loads((replica_dir / "replica.json").read_text())
        assert state["disks"][0]["generation"] == 2

        status = subprocess.run(
            _cli("status", "--replica-dir", str(replica_dir), "--json"),
            env=_env(), capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        (listed,) = json.loads(status.stdout)["disks"]
        assert (listed["generation"], listed["last_bytes"]) == (2, 8 * MIB)
        assert listed["age_s"] >= 0

        # 4. The next run recovers: it copies everything the killed one was copying.
        fourth = await _run(*common)
        (disk,) = fourth["disks"]
        assert (disk["mode"], disk["generation"]) == ("incremental", 3)
        assert disk["bytes"] == 24 * MIB, disk
        assert _identical(src, replica)
        assert sorted(p.name for p in replica_dir.glob("*.qcow2")) == [f"{DISK}.qcow2"]
        blocks = await _qmp(sock, "query-block")
        bitmaps = [b["name"] for b in blocks[0]["inserted"].get("dirty-bitmaps", [])]
        assert bitmaps == [state["disks"][0]["bitmap"].rsplit("-", 1)[0] + "-3"], bitmaps
        nodes = await _qmp(sock, "query-named-block-nodes", {"flat": True})
        assert not [n["node-name"] for n in nodes if n["node-name"].startswith("livemig-")]
        assert not _daemons_for(replica_dir)

        # 5. A migration's disk copy on top of the replica sends only what changed
        #    since it, and the target image (an overlay on the replica) ends identical,
        #    writes made while the mirror runs included.
        await _write(sock, 0x44, 40, 8)
        target = tmp_path / "target.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(replica), "-F", "qcow2",
             str(target), "64M"], check=True,
        )  # fmt: skip
        replica_state = json.loads((replica_dir / "replica.json").read_text())["disks"][0]
        async with StorageDaemon(tmp_path / "incoming") as daemon:
            await daemon.export(DISK, target)
            session = await QmpSession.connect(sock, "test", timeout=10.0)
            try:
                async with EventRecorder(session) as events:
                    await session.execute(
                        "blockdev-add",
                        {"driver": "nbd", "node-name": "mig", "export": DISK,
                         "server": daemon.nbd.client_arg()},
                    )  # fmt: skip
                    catch_up = await mirror_from_replica(
                        session, device_node=f"drive-{DISK}", client_node="mig",
                        job_id="mig-mirror", bitmap=replica_state["bitmap"],
                    )  # fmt: skip
                    assert catch_up.bytes + catch_up.final_bytes == 8 * MIB, catch_up
                    qdev = f"/machine/peripheral/{DISK}/virtio-backend"
                    await session.execute(
                        "human-monitor-command",
                        {"command-line": f'qemu-io -d {qdev} "write -P 0x55 44M 2M"'},
                    )
                    # Cancelling a mirror before it is READY cancels it (no COMPLETED):
                    # under load the sync=none mirror may take a moment to get there.
                    ready = await events.wait_for(
                        "BLOCK_JOB_READY", lambda e: e.data.get("device") == "mig-mirror", 30
                    )
                    assert ready is not None, "the mirror never became READY"
                    await session.execute("block-job-cancel", {"device": "mig-mirror"})
                    done = await events.wait_for(
                        "BLOCK_JOB_COMPLETED", lambda e: e.data.get("device") == "mig-mirror", 30
                    )
                    assert done is not None and not done.data.get("error"), done
                    await session.execute("blockdev-del", {"node-name": "mig"})
                    await session.execute(
                        "human-monitor-command", {"command-line": f'qemu-io -d {qdev} "flush"'}
                    )
            finally:
                await session.close()
            await daemon.unexport(DISK)
        assert _identical(src, target)
        # The replica itself and its bitmap are untouched: still generation 3.
        blocks = await _qmp(sock, "query-block")
        assert [b["name"] for b in blocks[0]["inserted"]["dirty-bitmaps"]] == [
            replica_state["bitmap"]
        ]


def test_migration_on_a_replica_sends_only_the_change(tmp_path: Path) -> None:
    """A guest writing its disk (``disk:1``) is replicated, keeps writing, then migrates
    with ``--with-local-disks`` onto an overlay of the replica: the disk is reported
    ``replica``, far fewer bytes than the disk move, and it arrives intact."""
    _require()
    asyncio.run(_migrate_on_replica(tmp_path))


async def _migrate_on_replica(tmp_path: Path) -> None:
    from lab.demo import (
        DISK_ID,
        DemoConfig,
        Workload,
        guest_check,
        guest_spec,
        prepare_guest,
        wait_workload_started,
    )
    from lab.net import Lab
    from migrate.api import Migration
    from migrate.disks.model import DiskMode
    from migrate.disks.replica_store import ReplicaStore
    from migrate.disks.replicate import replicate_once
    from migrate.events import EventBus
    from migrate.report import Integrity, Status
    from migrate.strategy import HostEndpoint, MigrationRequest

    config = DemoConfig(workload=Workload("disk:1"), memory_mib=128, disk_mib=128,
                        log_dir=tmp_path, with_local_disks=True)  # fmt: skip
    guest, accel, _environment = await prepare_guest(config)
    source_image = tmp_path / "source-disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source_image), "128M"],
                   check=True)  # fmt: skip
    store = ReplicaStore(tmp_path / "replica")
    with Lab() as lab:
        spec = guest_spec(config, guest, accel, lab.next_guest_address(), source_image)
        source = QemuProcess(spec, role="source", netns=lab.host_a.netns,
                             taps={"net0": lab.add_tap(lab.host_a)}, log_dir=tmp_path)  # fmt: skip
        async with source:
            await wait_workload_started(source, config.workload)
            first = await replicate_once(source.qmp, store)
            assert first.disks[0].mode == "full"
            target_image = tmp_path / "target-disk0.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(store.base(DISK_ID)),
                 "-F", "qcow2", str(target_image), "128M"], check=True,
            )  # fmt: skip
            target = QemuProcess(spec, role="target", netns=lab.host_b.netns,
                                 taps={"net0": lab.add_tap(lab.host_b)}, incoming=True,
                                 paused=True, log_dir=tmp_path,
                                 disk_paths={DISK_ID: target_image})  # fmt: skip
            async with target:
                request = MigrationRequest(
                    source=HostEndpoint("host-a", source.site.qmp_socket),
                    target=HostEndpoint(
                        "host-b", target.site.qmp_socket, lab.host_b.migration_uri(4444)
                    ),
                    vm=spec.name,
                    with_local_disks=True,
                )
                mark = len(target.console.lines)
                blocks = await source.qmp.execute("query-block")
                (bitmap,) = [
                    b for e in blocks for b in (e.get("inserted") or {}).get("dirty-bitmaps", [])
                ]
                changed = int(bitmap["count"])
                bus = EventBus()
                migration = Migration(request, source=source.qmp, target=target.qmp,
                                      events=bus)  # fmt: skip
                await migration.start()
                report = await migration.wait()
                assert report.status is Status.COMPLETED, report.error
                (disk,) = report.disks
                assert disk.mode is DiskMode.REPLICA, disk
                assert disk.integrity is Integrity.OK, disk.detail
                check = await guest_check(target, config.workload, mark)
                assert check.startswith("ok"), check
                caught_up = [
                    int(m.group(1))
                    for e in bus.history
                    if (m := re.search(r"caught up (\d+) bytes", str(getattr(e, "message", ""))))
                ]
                # At least what the replica's bitmap held when the move began, less than
                # the disk (the guest's scattered 4 KiB writes dirty whole 64 KiB
                # clusters: ~16 MiB/s of them at 1 MiB/s); the mirror then carries the
                # writes made during the move.
                assert len(caught_up) == 1 and changed <= caught_up[0] < 96 * MIB, (
                    caught_up,
                    changed,
                )
                assert disk.bytes >= caught_up[0]
                # The replica now backs the migrated disk: consumed, never written again.
                used = store.load().disks[DISK_ID]
                assert used.consumed_by == report.migration_id and used.in_use_by is None

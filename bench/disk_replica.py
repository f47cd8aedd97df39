"""Bench: a migration's disk copy with a replica vs without, and replication runs.

A 1 GiB qcow2 disk full of data on a running QEMU (no guest kernel: SeaBIOS spins,
the host writes with HMP ``qemu-io``). Per run:

* ``replicate full``: the first ``livemig replicate`` run (the whole disk);
* 64 MiB changed (64 scattered 1 MiB writes), then
* ``mirror full``: what Proxmox/libvirt do for a local disk — ``blockdev-mirror
  sync=full`` (write-blocking) into a fresh image exported over NBD, until READY;
* ``mirror on replica``: :func:`~migrate.disks.replica_mirror.mirror_from_replica`
  into an overlay on the replica, until the mirror runs (READY at once);
* ``replicate incremental``: the next replication run (the 64 MiB).

Bytes are what the QEMU jobs copied; every target image is compared with the
source (``qemu-img compare``). The RAM part of a migration is the same with or
without a replica and is not run here. Usage::

    python -m bench.disk_replica --runs 3 --out docs/bench/disks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.qemu import QemuProcess
from migrate.disks.model import CacheMode, DiskSpec
from migrate.disks.replica_mirror import mirror_from_replica
from migrate.disks.replica_store import ReplicaStore
from migrate.disks.replicate import replicate_once
from migrate.disks.storage_daemon import StorageDaemon
from migrate.qmp import EventRecorder, QmpSession
from migrate.vmspec import VMSpec

MIB = 1 << 20
DISK = "disk0"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def _identical(a: Path, b: Path) -> bool:
    return (
        subprocess.run(
            ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True
        ).returncode
        == 0
    )


async def _hmp(session: QmpSession, line: str) -> None:
    await session.execute("human-monitor-command", {"command-line": line}, timeout=120)


async def change_disk(session: QmpSession, mib: int, size_mib: int, seed: int) -> None:
    """Write `mib` scattered 1 MiB blocks (a random pattern each) from the host."""
    qdev = f"/machine/peripheral/{DISK}/virtio-backend"
    rng = random.Random(seed)
    for offset in rng.sample(range(size_mib), mib):
        await _hmp(session, f'qemu-io -d {qdev} "write -P {rng.randrange(1, 255)} {offset}M 1M"')
    await _hmp(session, f'qemu-io -d {qdev} "flush"')


async def _mirror_full(session: QmpSession, work: Path, size: int) -> dict[str, Any]:
    target = work / "full-target.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size))
    async with StorageDaemon(work / "qsd-full") as daemon, EventRecorder(session) as events:
        await daemon.export(DISK, target)
        began = time.monotonic()
        await session.execute("blockdev-add", {"driver": "nbd", "node-name": "b-full",
                                               "server": daemon.nbd.client_arg(), "export": DISK})  # fmt: skip
        await session.execute("blockdev-mirror", {"job-id": "m-full", "device": f"drive-{DISK}",
                                                  "target": "b-full", "sync": "full",
                                                  "copy-mode": "write-blocking"})  # fmt: skip
        ready = await events.wait_for(
            "BLOCK_JOB_READY", lambda e: e.data.get("device") == "m-full", 600
        )
        seconds = time.monotonic() - began
        assert ready is not None
        jobs = await session.execute("query-block-jobs")
        copied = int(next(j for j in jobs if j["device"] == "m-full")["offset"])
        await session.execute("block-job-cancel", {"device": "m-full"})
        await events.wait_for("BLOCK_JOB_COMPLETED", lambda e: e.data.get("device") == "m-full", 30)
        await session.execute("blockdev-del", {"node-name": "b-full"})
        await daemon.unexport(DISK)
    return {"seconds": round(seconds, 3), "bytes": copied, "pause_ms": 0.0, "target": target}


async def _mirror_replica(
    session: QmpSession, work: Path, store: ReplicaStore, size: int
) -> dict[str, Any]:
    state = store.load()
    replica = state.disks[DISK]
    target = work / "replica-target.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(store.base(DISK)), "-F", "qcow2",
        str(target), str(size))  # fmt: skip
    async with StorageDaemon(work / "qsd-rep") as daemon, EventRecorder(session) as events:
        await daemon.export(DISK, target)
        began = time.monotonic()
        await session.execute("blockdev-add", {"driver": "nbd", "node-name": "b-rep",
                                               "server": daemon.nbd.client_arg(), "export": DISK})  # fmt: skip
        catch_up = await mirror_from_replica(
            session, device_node=f"drive-{DISK}", client_node="b-rep", job_id="m-rep",
            bitmap=replica.bitmap,
        )  # fmt: skip
        ready = await events.wait_for(
            "BLOCK_JOB_READY", lambda e: e.data.get("device") == "m-rep", 600
        )
        seconds = time.monotonic() - began
        assert ready is not None
        await session.execute("block-job-cancel", {"device": "m-rep"})
        await events.wait_for("BLOCK_JOB_COMPLETED", lambda e: e.data.get("device") == "m-rep", 30)
        await session.execute("blockdev-del", {"node-name": "b-rep"})
        await daemon.unexport(DISK)
    return {
        "seconds": round(seconds, 3),
        "bytes": catch_up.bytes + catch_up.final_bytes,
        "pause_ms": round(catch_up.pause_s * 1000, 1),
        "rounds": catch_up.rounds,
        "target": target,
    }


async def one_run(work: Path, size_mib: int, changed_mib: int, seed: int) -> dict[str, Any]:
    src = work / "src.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(src), f"{size_mib}M")
    _sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size_mib}M", str(src))
    spec = VMSpec(name="bench", memory_mib=32,
                  disks=(DiskSpec(DISK, src, size_mib * MIB, cache=CacheMode.WRITEBACK),))  # fmt: skip
    store = ReplicaStore(work / "replica")
    out: dict[str, Any] = {}
    async with QemuProcess(spec, role="source", log_dir=work) as vm:
        session = vm.qmp
        full = await replicate_once(session, store)
        out["replicate_full"] = {"seconds": round(full.seconds, 3), "bytes": full.bytes}
        await change_disk(session, changed_mib, size_mib, seed)
        mirror = await _mirror_full(session, work, size_mib * MIB)
        on_replica = await _mirror_replica(session, work, store, size_mib * MIB)
        await _hmp(session, f'qemu-io -d /machine/peripheral/{DISK}/virtio-backend "flush"')
        for name, result in (("mirror_full", mirror), ("mirror_on_replica", on_replica)):
            target = result.pop("target")
            result["identical"] = _identical(src, target)
            out[name] = result
        incremental = await replicate_once(session, store)
        out["replicate_incremental"] = {
            "seconds": round(incremental.seconds, 3),
            "bytes": incremental.bytes,
            "identical": _identical(src, store.base(DISK)),
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="livemig-bench-disk-", dir=args.workdir) as tmp:
            runs.append(await one_run(Path(tmp), args.size_mib, args.changed_mib, seed=index))
            print(json.dumps(runs[-1]), flush=True)
    summary = {
        name: {
            "seconds_median": statistics.median(r[name]["seconds"] for r in runs),
            "bytes_median": statistics.median(r[name]["bytes"] for r in runs),
        }
        for name in runs[0]
    }
    return {
        "disk_mib": args.size_mib,
        "changed_mib": args.changed_mib,
        "runs": runs,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--changed-mib", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "replica.json").write_text(text + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()

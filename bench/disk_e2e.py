"""Bench: a whole live migration of the lab guest with a 1 GiB local disk, onto a
replica vs a full NBD copy.

Per run, in a fresh lab (guest on host A, target on host B), the native strategy
and livemig's default policy, ``with_local_disks``:

* the source's qcow2 disk is filled before the guest boots (pattern writes over the
  whole disk: every cluster allocated);
* ``replica`` mode: the first ``livemig replicate`` run
  (:func:`~migrate.disks.replicate.replicate_once`) copies the disk to a replica,
  then ``changed_mib`` are written from the host (HMP ``qemu-io``, scattered 1 MiB
  writes), the target's image is an overlay on the replica and the migration sends
  only the change (``disks[].mode = replica``);
* ``mirrored`` mode: the same writes, the target's image is empty and the migration
  copies the whole disk (``blockdev-mirror sync=full`` over NBD, what Proxmox and
  libvirt's ``--copy-storage-all`` do).

The modes alternate, so both see the same machine load. Recorded per run: the
report's total time, QEMU's downtime and the probe's guest-visible downtime, disk
bytes / mode / integrity, RAM bytes / integrity, bytes on the migration link and
the guest's own check on the target. Usage::

    python -m bench.disk_e2e --runs 3 --out docs/bench/disks
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.disk_replica import change_disk
from lab.demo import (
    DISK_ID,
    MIGRATION_PORT,
    DemoConfig,
    Workload,
    _with_probe,
    guest_check,
    guest_spec,
    prepare_guest,
    wait_workload_started,
)
from lab.net import Lab
from lab.probe import NetworkProbe
from lab.qemu import RAM_DIR, QemuProcess
from migrate.api import Migration
from migrate.disks.replica_store import ReplicaStore
from migrate.disks.replicate import replicate_once
from migrate.events import EventBus
from migrate.strategy import HostEndpoint, MigrationRequest

MIB = 1 << 20
MODES = ("mirrored", "replica")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


async def _bitmap_count(vm: QemuProcess) -> int | None:
    blocks = await vm.qmp.execute("query-block")
    counts = [
        int(b["count"])
        for e in blocks
        for b in (e.get("inserted") or {}).get("dirty-bitmaps", [])
        if b.get("persistent")
    ]
    return max(counts) if counts else None


async def one_run(
    work: Path, mode: str, config: DemoConfig, changed_mib: int, seed: int
) -> dict[str, Any]:
    """One migration of the lab guest in ``mode`` (``mirrored`` or ``replica``)."""
    guest, accel, _environment = await prepare_guest(config)
    size = config.disk_mib * MIB
    source_image, target_image = work / "source-disk0.qcow2", work / "target-disk0.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(source_image), str(size))
    _sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(source_image))
    store = ReplicaStore(work / "replica")
    out: dict[str, Any] = {"mode": mode, "seed": seed}
    with Lab() as lab:
        address = lab.next_guest_address()
        spec = guest_spec(config, guest, accel, address, source_image)
        source = QemuProcess(spec, role="source", netns=lab.host_a.netns,
                             taps={"net0": lab.add_tap(lab.host_a)}, log_dir=config.log_dir)  # fmt: skip
        async with source:
            await wait_workload_started(source, config.workload)
            if mode == "replica":
                first = await replicate_once(source.qmp, store)
                out["replicate_full"] = {"seconds": round(first.seconds, 3), "bytes": first.bytes}
            await change_disk(source.qmp, changed_mib, config.disk_mib, seed)
            if mode == "replica":
                out["replica_bitmap_bytes"] = await _bitmap_count(source)
                _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(store.base(DISK_ID)),
                    "-F", "qcow2", str(target_image), str(size))  # fmt: skip
            else:
                _sh("qemu-img", "create", "-q", "-f", "qcow2", str(target_image), str(size))
            target = QemuProcess(spec, role="target", netns=lab.host_b.netns,
                                 taps={"net0": lab.add_tap(lab.host_b)}, incoming=True,
                                 paused=True, log_dir=config.log_dir,
                                 disk_paths={DISK_ID: target_image})  # fmt: skip
            guest_ip = address.split("/")[0]
            async with (
                target,
                NetworkProbe(guest_ip, lab.client_ns, config.probe_interval_ms / 1e3) as probe,
            ):
                probe_started = time.time()
                await asyncio.sleep(config.warmup_s)
                link_before = lab.migration_link_stats(lab.host_a).tx_bytes
                mark = len(target.console.lines)
                request = MigrationRequest(
                    source=HostEndpoint("host-a", source.site.qmp_socket, netns=lab.host_a.netns),
                    target=HostEndpoint("host-b", target.site.qmp_socket,
                                        lab.host_b.migration_uri(MIGRATION_PORT),
                                        netns=lab.host_b.netns),
                    strategy=config.strategy, policy=config.policy,
                    with_local_disks=True, cpu_model=spec.cpu_model, vm=spec.name,
                )  # fmt: skip
                migration = Migration(request, source=source.qmp, target=target.qmp,
                                      events=EventBus())  # fmt: skip
                await migration.start()
                report = await migration.run()
                await asyncio.sleep(config.settle_s)
                wire = lab.migration_link_stats(lab.host_a).tx_bytes - link_before
                check = None
                if report.status == "completed":
                    check = await guest_check(target, config.workload, mark)
            assert probe.record is not None
            report = dataclasses.replace(
                _with_probe(report, probe.record, probe_started), wire_bytes=wire, guest_check=check
            )
    disks = [
        {
            "name": d.name,
            "mode": d.mode.value,
            "bytes": d.bytes,
            "integrity": d.integrity.value,
            "ready_ms": d.ready_ms,
            "detail": d.detail,
        }
        for d in report.disks
    ]
    tl = report.timeline
    out.update(
        status=report.status.value,
        error=report.error,
        total_time_ms=round(report.total_time_ms, 1),
        downtime_ms=report.downtime_ms,
        guest_downtime_ms=report.guest_downtime_ms,
        stop_to_resume_ms=tl.stop_to_resume_ms,
        timeline_ms={k: v for k, v in dataclasses.asdict(tl).items() if k != "started_at"},
        ram_transferred_bytes=report.transferred_bytes,
        ram_integrity=report.integrity.value,
        wire_bytes=report.wire_bytes,
        disks=disks,
        guest_check=report.guest_check,
    )
    return out


def _median(runs: list[dict[str, Any]], key: Any) -> float | None:
    values = [v for r in runs if (v := key(r)) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode and r["status"] == "completed"]
        summary[mode] = {
            "runs": len(mine),
            "total_time_ms": _median(mine, lambda r: r["total_time_ms"]),
            "guest_downtime_ms": _median(mine, lambda r: r["guest_downtime_ms"]),
            "stop_to_resume_ms": _median(mine, lambda r: r["stop_to_resume_ms"]),
            "disk_bytes": _median(mine, lambda r: sum(d["bytes"] for d in r["disks"])),
            "ram_transferred_bytes": _median(mine, lambda r: r["ram_transferred_bytes"]),
            "wire_bytes": _median(mine, lambda r: r["wire_bytes"]),
        }
    return summary


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = DemoConfig(workload=Workload(args.workload), memory_mib=args.memory_mib,
                        disk_mib=args.size_mib, with_local_disks=True)  # fmt: skip
    runs: list[dict[str, Any]] = []
    for index in range(args.runs):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            with tempfile.TemporaryDirectory(prefix="livemig-bench-e2e-", dir=RAM_DIR) as tmp:
                runs.append(await one_run(Path(tmp), mode, config, args.changed_mib, seed=index))
            print(json.dumps(runs[-1]), flush=True)
            if args.out:
                _write(args.out, _result(args, config, runs))
    return _result(args, config, runs)


def _result(
    args: argparse.Namespace, config: DemoConfig, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "disk_mib": args.size_mib,
        "changed_mib": args.changed_mib,
        "memory_mib": config.memory_mib,
        "workload": config.workload.text,
        "strategy": config.strategy,
        "policy": config.policy.name,
        "runs": runs,
        "summary": summarize(runs),
    }


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f} MiB"


def _ms(n: float | None) -> str:
    return "-" if n is None else f"{n:.0f}"


def table(result: dict[str, Any]) -> str:
    """The runs and the medians as Markdown tables."""
    lines = [
        "| run | mode | total ms | guest downtime ms | stop→resume ms | RAM verified→resume ms "
        "| disk READY ms | disk bytes | RAM bytes | link bytes | disk integrity | RAM integrity | guest check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(result["runs"], 1):
        tl = r["timeline_ms"]
        compare = (
            tl["target_resume_ms"] - tl["verified_ms"]
            if tl.get("target_resume_ms") is not None and tl.get("verified_ms") is not None
            else None
        )
        disk = r["disks"][0] if r["disks"] else {}
        lines.append(
            f"| {index} | {disk.get('mode', r['mode'])} | {_ms(r['total_time_ms'])} "
            f"| {_ms(r['guest_downtime_ms'])} | {_ms(r['stop_to_resume_ms'])} | {_ms(compare)} "
            f"| {_ms(disk.get('ready_ms'))} | {_mib(disk.get('bytes'))} | {_mib(r['ram_transferred_bytes'])} "
            f"| {_mib(r['wire_bytes'])} | {disk.get('integrity', '-')} | {r['ram_integrity']} "
            f"| {(r['guest_check'] or r['status']).split(':')[0]} |"
        )
    lines += [
        "",
        "| median | runs | total ms | guest downtime ms | stop→resume ms | disk bytes | RAM bytes "
        "| link bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in result["summary"].items():
        lines.append(
            f"| {mode} | {m['runs']} | {_ms(m['total_time_ms'])} | {_ms(m['guest_downtime_ms'])} "
            f"| {_ms(m['stop_to_resume_ms'])} | {_mib(m['disk_bytes'])} "
            f"| {_mib(m['ram_transferred_bytes'])} | {_mib(m['wire_bytes'])} |"
        )
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "end-to-end.json").write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--changed-mib", type=int, default=64)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--workload", default="openssl")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="print a result JSON's tables")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    result = asyncio.run(main_async(args))
    if args.out:
        _write(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()

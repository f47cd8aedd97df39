"""The disk model, classification, image comparison and the disk-related request,
workload and forecast rules (no QEMU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lab.demo import Workload
from migrate.disks.classify import classify, parse_query_block
from migrate.disks.images import Extent
from migrate.disks.integrity import compare_mapped, data_ranges
from migrate.disks.mirror import CopyMode, MirrorJob, NbdAddress, NbdMirror, mirror_arguments
from migrate.disks.model import BlockDisk, CacheMode, DiskMode, DiskPlacement, DiskSpec
from migrate.errors import ConfigError
from migrate.plan import with_disk_copy
from migrate.report import (
    DiskReport,
    Forecast,
    Integrity,
    MigrationReport,
    Phase,
    Predicted,
    Status,
    Timeline,
    Verdict,
)
from migrate.request import HostEndpoint, MigrationRequest
from migrate.vmspec import LaunchSite, RamBackendKind, VMSpec

QUERY_BLOCK = [
    {
        "device": "",
        "qdev": "/machine/peripheral/disk0/virtio-backend",
        "inserted": {
            "node-name": "drive-disk0",
            "file": "/images/a.qcow2",
            "drv": "qcow2",
            "ro": False,
            "backing_file_depth": 0,
            "cache": {"no-flush": False, "direct": False, "writeback": True},
            "image": {"virtual-size": 1 << 26, "filename": "/images/a.qcow2", "format": "qcow2"},
        },
    },
    {"device": "cd0", "qdev": "/machine/peripheral/cd0", "locked": False},
]


def _disk(
    path: str, cache: CacheMode = CacheMode.NONE, size: int = 1 << 26, **kw: object
) -> BlockDisk:
    return BlockDisk("disk0", "drive-disk0", Path(path), "qcow2", size, cache, False, **kw)  # type: ignore[arg-type]


def test_query_block_gives_the_disk_by_device_name() -> None:
    (disk,) = parse_query_block(QUERY_BLOCK)
    assert disk.name == "disk0" and disk.node_name == "drive-disk0"
    assert disk.path == Path("/images/a.qcow2") and disk.virtual_size == 1 << 26
    assert disk.cache is CacheMode.WRITEBACK and not disk.readonly


def test_cache_mode_from_query_block_flags() -> None:
    assert CacheMode.from_flags(True, False, True) is CacheMode.NONE
    assert CacheMode.from_flags(True, False, False) is CacheMode.DIRECTSYNC
    assert CacheMode.from_flags(False, False, False) is CacheMode.WRITETHROUGH
    assert CacheMode.from_flags(False, True, True) is CacheMode.UNSAFE


def test_local_disk_without_the_flag_is_refused_by_name() -> None:
    result = classify([_disk("/a/d.qcow2")], [_disk("/b/d.qcow2")], with_local_disks=False)
    (check,) = result.checks
    assert check.verdict is Verdict.REFUSED and not check.forceable
    assert "disk0" in check.detail and "--with-local-disks" in check.detail
    assert result.placements == ()


def test_local_disk_with_the_flag_is_mirrored() -> None:
    result = classify([_disk("/a/d.qcow2")], [_disk("/b/d.qcow2")], with_local_disks=True)
    (placement,) = result.mirrored
    assert placement.mode is DiskMode.MIRRORED and placement.target is not None
    assert all(c.verdict is Verdict.OK for c in result.checks)


def test_same_file_is_shared_and_unsafe_cache_refused_forceably(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"x")
    link = tmp_path / "other-name.qcow2"
    link.hardlink_to(image)
    safe = classify([_disk(str(image))], [_disk(str(link))], with_local_disks=False)
    assert [p.mode for p in safe.placements] == [DiskMode.SHARED]
    assert all(c.verdict is Verdict.OK for c in safe.checks)
    unsafe = classify(
        [_disk(str(image), CacheMode.WRITEBACK)], [_disk(str(link))], with_local_disks=False
    )
    cache = {c.name: c for c in unsafe.checks}["disk-cache"]
    assert cache.verdict is Verdict.REFUSED and cache.forceable and "disk0" in cache.detail


def test_declared_shared_disk_is_not_copied() -> None:
    result = classify([_disk("/a/d")], [_disk("/b/d")], False, shared_names=("disk0",))
    assert [p.mode for p in result.placements] == [DiskMode.SHARED]


def test_missing_or_smaller_target_disk_is_refused() -> None:
    missing = classify([_disk("/a/d")], [], with_local_disks=True)
    assert any(c.name == "disk-targets" and c.verdict is Verdict.REFUSED for c in missing.checks)
    small = classify([_disk("/a/d")], [_disk("/b/d", size=1 << 20)], with_local_disks=True)
    assert any("bytes" in c.detail and c.verdict is Verdict.REFUSED for c in small.checks)


def _raw(path: Path, blocks: dict[int, bytes], size: int) -> list[Extent]:
    """A raw image with ``blocks`` (4 KiB index -> byte) written, and its map."""
    with path.open("wb") as f:
        f.truncate(size)
        for index, fill in blocks.items():
            f.seek(index * 4096)
            f.write(fill * 4096)
    extents = []
    pos = 0
    for index in sorted(blocks):
        if index * 4096 > pos:
            extents.append(Extent(pos, index * 4096 - pos, False, True, 0, pos))
        extents.append(Extent(index * 4096, 4096, True, False, 0, index * 4096))
        pos = index * 4096 + 4096
    if pos < size:
        extents.append(Extent(pos, size - pos, False, True, 0, pos))
    return extents


def test_images_with_the_same_data_compare_ok_and_a_difference_is_located(tmp_path: Path) -> None:
    size = 1 << 20
    a = _raw(tmp_path / "a", {1: b"a", 7: b"b"}, size)
    b = _raw(tmp_path / "b", {1: b"a", 7: b"b"}, size)
    ok = compare_mapped("d", tmp_path / "a", a, tmp_path / "b", b, chunk_bytes=8192)
    assert ok.integrity is Integrity.OK and ok.compared_bytes == 2 * 4096
    c = _raw(tmp_path / "c", {1: b"a", 7: b"c"}, size)
    bad = compare_mapped("d", tmp_path / "a", a, tmp_path / "c", c)
    assert bad.integrity is Integrity.FAILED and bad.first_difference == 7 * 4096
    # Data on one side only, where the other reads zeros, is a difference too.
    d = _raw(tmp_path / "d", {1: b"a"}, size)
    assert compare_mapped("d", tmp_path / "a", a, tmp_path / "d", d).integrity is Integrity.FAILED
    # ...unless that data is zeros.
    z = _raw(tmp_path / "z", {1: b"a", 7: b"b", 9: b"\0"}, size)
    assert compare_mapped("d", tmp_path / "a", a, tmp_path / "z", z).integrity is Integrity.OK


def test_data_ranges_merge_both_maps() -> None:
    m1 = [Extent(0, 10, True, False), Extent(10, 10, False, True), Extent(20, 5, True, False)]
    m2 = [Extent(5, 10, True, False)]
    assert data_ranges(m1, m2) == [(0, 15), (20, 25)]


def test_disk_spec_checks_and_qemu_args() -> None:
    with pytest.raises(ConfigError, match="disk id"):
        DiskSpec("0bad", Path("/x"), 1 << 20)
    with pytest.raises(ConfigError, match="absolute"):
        DiskSpec("d", Path("rel"), 1 << 20)
    with pytest.raises(ConfigError, match="comma"):
        DiskSpec("d", Path("/a,b"), 1 << 20)
    with pytest.raises(ConfigError, match="unknown cache"):
        DiskSpec("d", Path("/a"), 1 << 20, cache="fast")  # type: ignore[arg-type]
    disk = DiskSpec("disk0", Path("/src/d.qcow2"), 1 << 20, cache="none")  # type: ignore[arg-type]
    spec = VMSpec("vm", 64, ram_backend=RamBackendKind.ANONYMOUS, disks=(disk,))
    site = LaunchSite(Path("/q"), Path("/s"), disk_paths={"disk0": Path("/dst/d.qcow2")})
    argv = " ".join(spec.qemu_argv(site))
    assert "filename=/dst/d.qcow2,cache.direct=on" in argv
    assert "virtio-blk-pci,drive=drive-disk0,id=disk0,write-cache=on" in argv
    with pytest.raises(ConfigError, match="duplicate disk"):
        VMSpec("vm", 64, disks=(disk, disk))


def test_disk_workloads_parse_and_combine() -> None:
    w = Workload.parse("openssl+disk:4")
    assert w.runs_openssl and w.writes_disk and not w.dirties_memory
    assert Workload.parse("openssl+dirty:8").dirties_memory
    assert Workload.parse("dirty:2+disk:1").writes_disk
    for bad in ("disk:0", "disk:", "disk:4+disk:2", "openssl+", "disk:4 x", "idle+disk:1"):
        with pytest.raises(ConfigError):
            Workload.parse(bad)


def _endpoints() -> dict[str, HostEndpoint]:
    return {
        "source": HostEndpoint("a", Path("/tmp/a.sock")),
        "target": HostEndpoint("b", Path("/tmp/b.sock"), "tcp:198.19.0.2:4444"),
    }


def test_request_disk_options() -> None:
    request = MigrationRequest(**_endpoints(), with_local_disks=True)  # type: ignore[arg-type]
    assert request.disk_copy_mode == "write-blocking"
    background = MigrationRequest(**_endpoints(), disk_copy_mode="background")  # type: ignore[arg-type]
    assert background.disk_copy_mode == "background"
    with pytest.raises(ConfigError, match="copy mode"):
        MigrationRequest(**_endpoints(), disk_copy_mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shared_disks"):
        MigrationRequest(**_endpoints(), shared_disks=["d"])  # type: ignore[arg-type]


def test_nbd_address_beside_the_migration_address() -> None:
    assert str(NbdAddress.beside("tcp:198.19.0.2:4444")) == "198.19.0.2:4445"
    assert NbdAddress.beside("tcp:h:4444", 10809).qmp() == {
        "type": "inet", "host": "h", "port": "10809"
    }  # fmt: skip
    assert NbdAddress.beside("unix:/run/m.sock").qmp() == {
        "type": "unix",
        "path": "/run/m.sock.nbd",
    }


def test_mirror_is_a_full_write_blocking_copy_into_the_nbd_node() -> None:
    placement = DiskPlacement(_disk("/a"), DiskMode.MIRRORED, "local", _disk("/b"))
    job = MirrorJob(placement, "e", "nbd-node", "job")
    args = mirror_arguments(job, CopyMode.WRITE_BLOCKING)
    assert args["device"] == "drive-disk0" and args["target"] == "nbd-node"
    assert args["sync"] == "full" and args["copy-mode"] == "write-blocking"


def test_forecast_includes_the_disk_copy() -> None:
    forecast = Forecast("native", True, 3, 1000.0, 50.0, 1e8, "converges")
    predicted = Predicted(
        1 << 28, 1e6, "sample", 1e8, "link", 1 << 20, 10.0, (forecast,), "native", "best",
        policy_forecast=forecast,
    )  # fmt: skip
    grown = with_disk_copy(predicted, 50_000_000)
    assert grown.disk_copy_bytes == 50_000_000
    assert grown.forecasts[0].total_time_ms == pytest.approx(1500.0)
    assert grown.policy_forecast is not None
    assert grown.policy_forecast.transferred_bytes == pytest.approx(1.5e8)
    assert with_disk_copy(predicted, 0) is predicted


def test_report_round_trips_its_disks() -> None:
    report = MigrationReport(
        Status.COMPLETED, "native", "live", "vm", "a", "b", "livemig", Phase.COMPLETED, 1.0,
        1 << 20, Timeline(started_at=1.0),
        disks=(DiskReport("disk0", DiskMode.MIRRORED, 123, Integrity.OK, "same", 1 << 20,
                          "write-blocking", 5.0),),
    )  # fmt: skip
    data = report.to_dict()
    assert data["disks"][0]["mode"] == "mirrored" and data["disks"][0]["integrity"] == "ok"
    assert MigrationReport.from_dict(data) == report


def test_disk_progress_shows_in_the_view_and_the_event_stream() -> None:
    from migrate.events import DiskCopy, DiskProgress, EventBus
    from migrate.progress import ProgressState, describe, event_record
    from tests.jsonschemas import validate_event

    bus = EventBus("m1")
    bus.emit(DiskProgress(1.0, 250.0, (DiskCopy("disk0", 16 << 20, 64 << 20, False),)))
    (event,) = bus.history
    state = ProgressState()
    view = state.update(event)
    assert view.disk_copied_bytes == 16 << 20 and view.disk_total_bytes == 64 << 20
    assert describe(view).startswith("disk 16/64 MiB copying | ")
    record = event_record(event, view)
    assert record["event"] == "disk-progress" and record["disks"][0]["name"] == "disk0"
    validate_event(record)


def _scripted_pair() -> tuple[object, object, dict[str, object]]:
    from tests.fakes.qmp import Reply, fake_pair

    src, dst = fake_pair()
    job: dict[str, object] = {"running": False, "offset": 0, "ready": False}

    def jobs(_: object) -> Reply:
        if not job["running"]:
            return Reply([])
        offset = int(job["offset"]) + (1 << 20)  # type: ignore[call-overload]
        job.update(offset=min(offset, 2 << 20), ready=offset >= 2 << 20)
        return Reply([{"device": "lmt-mirror-disk0", "offset": job["offset"], "len": 2 << 20,
                       "ready": job["ready"], "io-status": "ok", "status": "running"}])  # fmt: skip

    def mirror(_: object) -> dict[str, object]:
        job["running"] = True
        return {}

    def cancel(args: dict[str, object]) -> dict[str, object]:
        job["running"] = False
        if not args.get("force"):
            data = {"device": "lmt-mirror-disk0", "offset": 2 << 20, "len": 2 << 20}
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(src.emit("BLOCK_JOB_COMPLETED", data))
            )
        return {}

    for command in ("blockdev-add", "blockdev-del", "migrate-set-capabilities"):
        src.on(command, {})
    src.on("blockdev-mirror", mirror).on("query-block-jobs", jobs).on("block-job-cancel", cancel)
    for command in ("nbd-server-start", "block-export-add", "block-export-del", "nbd-server-stop"):
        dst.on(command, {})
    dst.on("query-block-exports", Reply([]))
    return src, dst, job


def _mirror(src: object, dst: object) -> NbdMirror:
    placement = DiskPlacement(_disk("/a"), DiskMode.MIRRORED, "local", _disk("/b"))
    return NbdMirror(src, dst, (placement,), NbdAddress("h", 4445), tag="lmt")  # type: ignore[arg-type]


def test_mirror_lifecycle_in_order() -> None:
    async def scenario() -> tuple[list[str], list[str], NbdMirror]:
        src, dst, _ = _scripted_pair()
        mirror = _mirror(src, dst)
        await mirror.export()
        await mirror.start()
        await mirror.wait_ready(timeout=5)
        await mirror.finish_jobs(timeout=5)
        await mirror.complete(timeout=5)
        return src.commands, dst.commands, mirror  # type: ignore[attr-defined]

    src_cmds, dst_cmds, mirror = asyncio.run(scenario())
    ours = [c for c in src_cmds if c not in ("query-block-jobs",)]
    assert ours == ["blockdev-add", "blockdev-mirror", "block-job-cancel", "blockdev-del"]
    assert dst_cmds[:2] == ["nbd-server-start", "block-export-add"]
    assert [c for c in dst_cmds if c != "query-block-exports"][-2:] == [
        "block-export-del", "nbd-server-stop"
    ]  # fmt: skip
    assert mirror.jobs[0].bytes == 2 << 20 and mirror.jobs[0].finished


def test_mirror_abort_before_ready_cancels_and_tears_down() -> None:
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        src, dst, _ = _scripted_pair()
        mirror = _mirror(src, dst)
        await mirror.export()
        await mirror.start()
        notes = await mirror.abort(timeout=5)
        return src.commands, dst.commands, notes  # type: ignore[attr-defined]

    src_cmds, dst_cmds, notes = asyncio.run(scenario())
    assert [c for c in src_cmds if c != "query-block-jobs"][-2:] == [
        "block-job-cancel",
        "blockdev-del",
    ]
    assert "nbd-server-stop" in dst_cmds and "block-export-del" in dst_cmds
    assert any("cancelled 1 disk mirror" in n for n in notes)


def test_compared_ranges_report_what_differs_by_piece_within_a_chunk(tmp_path: Path) -> None:
    from migrate.disks.integrity import compare_ranges

    size = 1 << 20
    a = _raw(tmp_path / "a", {1: b"a", 40: b"b", 200: b"c"}, size)
    b = _raw(tmp_path / "b", {1: b"a", 40: b"x", 200: b"y"}, size)
    everything = [(0, size)]
    compared, chunks = compare_ranges(everything, tmp_path / "a", a, tmp_path / "b", b, size)
    assert compared == size and chunks == [(0, size)]
    piece = 64 << 10
    _, pieces = compare_ranges(everything, tmp_path / "a", a, tmp_path / "b", b, size,
                               differ_bytes=piece)  # fmt: skip
    # Block 40 (160 KiB) and block 200 (800 KiB): their 64 KiB pieces only.
    assert pieces == [(2 * piece, 3 * piece), (12 * piece, 13 * piece)]

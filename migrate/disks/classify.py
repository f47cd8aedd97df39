"""Which disks does a move concern, and how does each reach the target?

:func:`block_disks` reads a QEMU's disks (``query-block``); :func:`classify`
places each writable disk of the source: **shared** when the target QEMU opens the
same image (the same file: device and inode identity, as both QEMUs' paths are
visible here; or named shared by the operator), otherwise **local**, which a move
copies (``mirrored``) only when asked (``--with-local-disks``). The verdicts, as
preflight checks, refuse a local disk without the flag (naming it), a disk the
target lacks or has in another size, and — like libvirt — a shared disk whose
cache mode lets the target read stale host-cached blocks (forceable).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrate.disks.model import BlockDisk, CacheMode, DiskMode, DiskPlacement
from migrate.errors import QemuError
from migrate.qmp import QmpSession
from migrate.report import PreflightCheck, Verdict


def _device_name(dev: dict[str, Any]) -> str:
    """``disk0`` from ``/machine/peripheral/disk0/virtio-backend``; else the drive name."""
    qdev = str(dev.get("qdev") or "")
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[1] == "peripheral":
        return parts[2]
    return str(dev.get("device") or qdev)


def parse_query_block(answer: Any) -> list[BlockDisk]:
    """The disks with a medium in a ``query-block`` answer. Raises :class:`QemuError`
    for an answer of the wrong shape."""
    if not isinstance(answer, list):
        raise QemuError(f"query-block: unexpected answer {answer!r:.80}")
    disks = []
    for dev in answer:
        if not isinstance(dev, dict):
            raise QemuError(f"query-block: unexpected entry {dev!r:.80}")
        inserted = dev.get("inserted")
        if not isinstance(inserted, dict):
            continue
        cache = inserted.get("cache") or {}
        image = inserted.get("image") or {}
        try:
            disks.append(
                BlockDisk(
                    device=_device_name(dev),
                    node_name=str(inserted["node-name"]),
                    path=Path(str(inserted.get("file") or image.get("filename"))),
                    format=str(inserted.get("drv") or image.get("format")),
                    virtual_size=int(image.get("virtual-size", 0)),
                    cache=CacheMode.from_flags(
                        bool(cache.get("direct")),
                        bool(cache.get("no-flush")),
                        bool(cache.get("writeback", True)),
                    ),
                    readonly=bool(inserted.get("ro", False)),
                    backing=int(inserted.get("backing_file_depth", 0)) > 0,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QemuError(f"query-block: unexpected entry {dev!r:.120}") from exc
    return disks


async def block_disks(session: QmpSession) -> list[BlockDisk]:
    """The disks of the QEMU behind ``session``."""
    return parse_query_block(await session.execute("query-block"))


def same_image(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (device and inode); equal paths when
    neither can be looked at from here."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@dataclass(frozen=True)
class Classification:
    """The writable disks' placements and the preflight checks they gave."""

    placements: tuple[DiskPlacement, ...]
    checks: tuple[PreflightCheck, ...]

    @property
    def mirrored(self) -> tuple[DiskPlacement, ...]:
        """The disks a migration copies (``mirrored``, and ``replica``: mirrored on top
        of a replica)."""
        return tuple(p for p in self.placements if p.mode.copies)


def classify(
    source: list[BlockDisk],
    target: list[BlockDisk],
    with_local_disks: bool,
    shared_names: Collection[str] = (),
) -> Classification:
    """Place every writable source disk and judge the lot (see the module docstring)."""
    by_name = {d.name: d for d in target}
    placements: list[DiskPlacement] = []
    refused_local: list[str] = []
    unsafe: list[str] = []
    problems: list[str] = []
    for disk in source:
        if disk.readonly:
            continue
        twin = by_name.get(disk.name)
        if twin is None:
            problems.append(f"{disk.name}: the target QEMU has no disk {disk.name}")
            continue
        if disk.name in shared_names or same_image(disk.path, twin.path):
            placements.append(
                DiskPlacement(
                    disk, DiskMode.SHARED, f"target opens the same image {twin.path}", twin
                )
            )
            if not disk.cache.safe_on_shared_storage:
                unsafe.append(f"{disk.name} ({disk.path}, cache={disk.cache})")
            continue
        if not with_local_disks:
            refused_local.append(f"{disk.name} ({disk.path})")
            continue
        if twin.virtual_size != disk.virtual_size:
            problems.append(
                f"{disk.name}: target image {twin.path} is {twin.virtual_size} bytes, "
                f"the source's {disk.virtual_size}"
            )
            continue
        placements.append(
            DiskPlacement(disk, DiskMode.MIRRORED, f"local: copied over NBD to {twin.path}", twin)
        )
    checks: list[PreflightCheck] = []
    if refused_local:
        checks.append(
            PreflightCheck(
                "local-disks",
                Verdict.REFUSED,
                "local disks the target does not share: "
                + ", ".join(refused_local)
                + " (copy them with --with-local-disks)",
                forceable=False,
            )
        )
    elif any(p.mode is DiskMode.MIRRORED for p in placements):
        names = ", ".join(p.name for p in placements if p.mode is DiskMode.MIRRORED)
        checks.append(PreflightCheck("local-disks", Verdict.OK, f"copied over NBD: {names}"))
    else:
        checks.append(PreflightCheck("local-disks", Verdict.OK, "no local writable disks"))
    if problems:
        checks.append(
            PreflightCheck("disk-targets", Verdict.REFUSED, "; ".join(problems), forceable=False)
        )
    if unsafe:
        checks.append(
            PreflightCheck(
                "disk-cache",
                Verdict.REFUSED,
                "shared disks with a cache mode that may serve the target stale blocks "
                "(want cache=none or directsync): " + ", ".join(unsafe),
            )
        )
    return Classification(tuple(placements), tuple(checks))

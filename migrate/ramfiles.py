"""The VM's RAM files: which there are, and what must hold before one is written.

Guest RAM in shared ``memory-backend-file`` objects is what lets livemig compare
(and pagestream write) it. These checks run before anything changes: the same file
on both sides, a target filesystem too small for the RAM, and whether QEMU's known
TCG dirty-page bug applies (the only case where stale pages are repaired).
"""

from __future__ import annotations

import os
from pathlib import Path

from dirtytrack.errors import RamMappingError
from dirtytrack.ram import require_room
from migrate.errors import ConfigError, QemuError
from migrate.qmp import QmpSession


async def ram_backing_files(session: QmpSession) -> dict[str, Path]:
    """Every shared ``memory-backend-file`` of the VM: object id -> file."""
    try:
        children = await session.execute("qom-list", {"path": "/objects"})
    except QemuError:
        return {}
    found: dict[str, Path] = {}
    for child in children if isinstance(children, list) else []:
        if not isinstance(child, dict) or child.get("type") != "child<memory-backend-file>":
            continue
        path = f"/objects/{child['name']}"
        share = await session.execute("qom-get", {"path": path, "property": "share"})
        mem_path = await session.execute("qom-get", {"path": path, "property": "mem-path"})
        if share and isinstance(mem_path, str) and mem_path:
            found[str(child["name"])] = Path(mem_path)
    return found


async def ram_backing_file(session: QmpSession) -> Path | None:
    """The file behind the VM's main RAM if it is a shared ``memory-backend-file``
    (the first one, for VMs with one RAM backend)."""
    files = await ram_backing_files(session)
    return next(iter(files.values()), None)


def refuse_shared_file(source: Path, target: Path) -> None:
    """Raise :class:`ConfigError` if both sides use the same file (device and inode):
    writing the target's RAM would then overwrite the running guest's."""
    try:
        a, b = source.stat(), target.stat()
    except OSError:
        return  # not on this host: nothing shared here
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise ConfigError(
            f"source and target RAM are the same file ({source} and {target}, device "
            f"{a.st_dev} inode {a.st_ino}): the target would overwrite the running guest"
        )


def check_ram_space(target_ram: Path) -> None:
    """Refuse (:class:`ConfigError`, with the numbers) when the filesystem holding the
    target's RAM file cannot take the rest of it: on a full tmpfs, QEMU (and any
    reader of the mapping) would die of SIGBUS mid-migration instead. Filesystems
    that reserve at mmap (hugetlbfs) already refused QEMU if they lacked room."""
    try:
        fd = os.open(target_ram, os.O_RDONLY)
    except OSError:
        return  # not on this host
    try:
        require_room(target_ram, fd, os.fstat(fd).st_size)
    except RamMappingError as exc:
        raise ConfigError(f"the target's RAM does not fit: {exc}") from exc
    finally:
        os.close(fd)


async def known_tcg_dirty_bug(session: QmpSession) -> bool:
    """Whether ``session``'s QEMU has the TCG dirty-page bug repair exists for:
    TCG (not KVM) and QEMU before 9.0 (fixed upstream by 03bfc2188f)."""
    try:
        kvm = await session.execute("query-kvm")
        version = await session.execute("query-version")
        major = int(version["qemu"]["major"])
    except (QemuError, KeyError, TypeError, ValueError):
        return False
    return not (isinstance(kvm, dict) and kvm.get("enabled")) and major < 9

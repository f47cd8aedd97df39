"""The disk data types every other disk module shares.

:class:`DiskSpec` is a disk of a VM definition (what the lab or a definition file
starts QEMU with); :class:`BlockDisk` is a disk as the running QEMU reports it
over QMP (``query-block``); :class:`DiskPlacement` is one disk classified for one
migration: how it reaches the target (:class:`DiskMode`) and why.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from migrate import validate
from migrate.errors import ConfigError

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}", re.ASCII)


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class CacheMode(StrEnum):
    """QEMU's ``cache=`` shorthands (``-drive``), as libvirt names them.

    Only ``none`` and ``directsync`` bypass the host page cache; on storage two hosts
    share, any other mode may let the target read stale blocks from its own cache,
    so libvirt refuses those unless forced (:attr:`safe_on_shared_storage`).
    """

    NONE = "none"
    DIRECTSYNC = "directsync"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    UNSAFE = "unsafe"

    @property
    def safe_on_shared_storage(self) -> bool:
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def direct(self) -> bool:
        """``cache.direct``: O_DIRECT on the image file."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def no_flush(self) -> bool:
        """``cache.no-flush``: flushes ignored."""
        return self is CacheMode.UNSAFE

    @property
    def writeback(self) -> bool:
        """The guest sees a volatile write cache (``write-cache=on`` on the device)."""
        return self not in (CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC)

    @classmethod
    def from_flags(cls, direct: bool, no_flush: bool, writeback: bool) -> CacheMode:
        """The mode QMP's ``query-block`` ``cache`` object describes."""
        if no_flush:
            return cls.UNSAFE
        if direct:
            return cls.NONE if writeback else cls.DIRECTSYNC
        return cls.WRITEBACK if writeback else cls.WRITETHROUGH


class DiskMode(StrEnum):
    """How a disk reaches the target in a migration.

    ``shared``: the target opens the same storage, nothing is copied. ``mirrored``:
    copied over NBD during the migration (``--with-local-disks``). ``replica``: a
    replica kept on the target (``livemig replicate``) is brought up to date with
    what changed since it was made (bitmap-driven), then used.
    """

    SHARED = "shared"
    MIRRORED = "mirrored"
    REPLICA = "replica"

    @property
    def copies(self) -> bool:
        return self is not DiskMode.SHARED


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk of a VM definition.

    ``id`` names the disk (QEMU's device id and, prefixed ``drive-``, its block
    node); ``path`` is the image on the host that starts QEMU (a host may put it
    elsewhere: :class:`~migrate.vmspec.LaunchSite` ``disk_paths``);
    ``size_bytes`` its virtual size; ``shared`` says the image is on storage every
    host sees (the same file at the same path), ``False`` that each host has its
    own copy (a local disk, copied by a migration with ``--with-local-disks``).
    """

    id: str
    path: Path
    size_bytes: int
    format: DiskFormat = DiskFormat.QCOW2
    cache: CacheMode = CacheMode.NONE
    shared: bool = False
    readonly: bool = False

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for a bad id, path, size, format or cache mode."""
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise ConfigError(f"bad disk id {self.id!r} (a letter, then letters, digits, _ -)")
        if not isinstance(self.path, Path) or not self.path.is_absolute():
            raise ConfigError(f"disk {self.id}: path must be an absolute Path, not {self.path!r}")
        if "," in str(self.path) or validate.has_control(str(self.path)):
            raise ConfigError(f"disk {self.id}: path {str(self.path)!r} has a comma or control")
        validate.whole(self.size_bytes, f"disk {self.id}: size_bytes", minimum=512)
        if self.size_bytes % 512:
            raise ConfigError(f"disk {self.id}: size_bytes must be a multiple of 512")
        for name, kind in (("format", DiskFormat), ("cache", CacheMode)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    known = ", ".join(m.value for m in kind)
                    raise ConfigError(
                        f"disk {self.id}: unknown {name} {value!r} (known: {known})"
                    ) from None
        validate.flag(self.shared, f"disk {self.id}: shared")
        validate.flag(self.readonly, f"disk {self.id}: readonly")

    @property
    def node_name(self) -> str:
        """The format node's name in QEMU (``-blockdev node-name``)."""
        return f"drive-{self.id}"


@dataclass(frozen=True)
class BlockDisk:
    """A disk of a running QEMU, as ``query-block`` shows it.

    ``device`` is the qdev id (or the legacy drive name), ``node_name`` the format
    node the device reads (what a mirror copies and an NBD export serves),
    ``path`` the image file, ``virtual_size`` in bytes.
    """

    device: str
    node_name: str
    path: Path
    format: str
    virtual_size: int
    cache: CacheMode
    readonly: bool
    backing: bool = False

    @property
    def name(self) -> str:
        return self.device or self.node_name

    def allocated_bytes(self) -> int:
        """About what a full copy moves: the image file's allocated size, at most the
        virtual size. (Not ``qemu-img map``: a running QEMU keeps fresh qcow2
        metadata in memory.)"""
        try:
            allocated = os.stat(self.path).st_blocks * 512
        except OSError:
            allocated = self.virtual_size
        return min(allocated, self.virtual_size)


@dataclass(frozen=True)
class DiskPlacement:
    """One writable disk classified for one move: the source's disk, how it reaches the
    target (``mode``), the target's disk of the same device when known, and why."""

    source: BlockDisk
    mode: DiskMode
    reason: str
    target: BlockDisk | None = None

    @property
    def name(self) -> str:
        return self.source.name

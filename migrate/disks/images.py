"""Disk images on this host, through ``qemu-img``: read their shape, create one like
another, map their allocated extents, remove one.

Every call has a deadline; ``qemu-img`` failures raise :class:`DiskImageError`
with its message. ``-U`` (force share) lets a running QEMU keep its lock on the
image: the callers read images whose QEMU is stopped or paused.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrate.deadline import within
from migrate.errors import LivemigError

QEMU_IMG = "qemu-img"
#: How long one qemu-img call may take (s).
QEMU_IMG_TIMEOUT_S = 60.0


class DiskImageError(LivemigError):
    """qemu-img failed, timed out or answered something unexpected."""


@dataclass(frozen=True)
class ImageInfo:
    """An image's format and virtual size (bytes), and its backing file if any."""

    path: Path
    format: str
    virtual_size: int
    backing: str | None = None


@dataclass(frozen=True)
class Extent:
    """One run of ``qemu-img map --output=json``: guest bytes ``[start, start+length)``.

    ``data``: the range holds data in a file (at ``offset`` of the image file when
    ``depth`` is 0); otherwise it reads as zeros (``zero``) or from nowhere.
    """

    start: int
    length: int
    data: bool
    zero: bool
    depth: int = 0
    offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @classmethod
    def from_map(cls, item: Any) -> Extent:
        """Raises :class:`DiskImageError` for an entry of the wrong shape."""
        if not isinstance(item, dict):
            raise DiskImageError(f"qemu-img map: unexpected entry {item!r:.80}")
        try:
            start, length = int(item["start"]), int(item["length"])
            offset = item.get("offset")
            return cls(
                start=start,
                length=length,
                data=bool(item["data"]),
                zero=bool(item.get("zero", False)),
                depth=int(item.get("depth", 0)),
                offset=int(offset) if isinstance(offset, int) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DiskImageError(f"qemu-img map: unexpected entry {item!r:.80}") from exc


async def _qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT_S) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise DiskImageError(f"cannot run {QEMU_IMG}: {exc}") from exc
    try:
        out, err = await within(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DiskImageError(f"{QEMU_IMG} {args[0]} took longer than {timeout:g} s") from None
    except asyncio.CancelledError:
        proc.kill()
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise DiskImageError(
            f"{QEMU_IMG} {args[0]} failed: {message[-1] if message else proc.returncode}"
        )
    return out.decode(errors="replace")


async def image_info(path: Path) -> ImageInfo:
    """Format, virtual size and backing file of ``path``. Raises :class:`DiskImageError`."""
    data = json.loads(await _qemu_img("info", "-U", "--output=json", str(path)))
    try:
        return ImageInfo(
            path=path,
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            backing=data.get("backing-filename"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DiskImageError(f"qemu-img info {path}: unexpected answer") from exc


async def backing_chain(path: Path) -> list[Path]:
    """``path`` and its backing files, top first (index = ``qemu-img map`` depth).
    Raises :class:`DiskImageError`."""
    data = json.loads(await _qemu_img("info", "-U", "--backing-chain", "--output=json", str(path)))
    if not isinstance(data, list) or not data:
        raise DiskImageError(f"qemu-img info --backing-chain {path}: unexpected answer")
    try:
        return [Path(str(item["filename"])) for item in data]
    except (KeyError, TypeError) as exc:
        raise DiskImageError(f"qemu-img info --backing-chain {path}: unexpected answer") from exc


async def create_image(path: Path, fmt: str, virtual_size: int) -> None:
    """A new empty image (refuses to overwrite). Raises :class:`DiskImageError`."""
    if path.exists():
        raise DiskImageError(f"{path} exists: not overwriting it")
    await _qemu_img("create", "-q", "-f", fmt, str(path), str(virtual_size))


async def create_like(path: Path, model: ImageInfo) -> ImageInfo:
    """An empty image at ``path`` with ``model``'s format and virtual size (what a
    disk's copy on the target starts as)."""
    await create_image(path, model.format, model.virtual_size)
    return ImageInfo(path, model.format, model.virtual_size)


async def extent_map(path: Path) -> list[Extent]:
    """The image's extents (``qemu-img map --output=json -U``), in guest order."""
    data = json.loads(await _qemu_img("map", "-U", "--output=json", str(path)))
    if not isinstance(data, list):
        raise DiskImageError(f"qemu-img map {path}: unexpected answer")
    return [Extent.from_map(item) for item in data]


def remove_image(path: Path) -> bool:
    """Remove the image file; whether there was one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

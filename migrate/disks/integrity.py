"""Did the disk arrive intact? The stopped source's image against the paused target's.

Both images are mapped (``qemu-img map``); the guest ranges where either holds
data are read from both image files at their host offsets, in chunks, and their
SHA-256 digests compared. Ranges both read as zeros are not read at all, so an
empty disk costs nothing. Runs while the source is stopped and the target paused
(neither QEMU writes), before the target resumes: a mismatch keeps the VM on the
source.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from migrate.disks.images import DiskImageError, Extent, extent_map, image_info
from migrate.report import Integrity

CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class DiskComparison:
    """One disk's comparison: verdict, what was compared, where the first difference is."""

    name: str
    integrity: Integrity
    detail: str
    compared_bytes: int = 0
    first_difference: int | None = None


class _Reader:
    """Reads guest ranges of one image file through its extent map (depth 0 only)."""

    def __init__(self, path: Path, extents: list[Extent]) -> None:
        self.path = path
        self.extents = extents
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, start: int, length: int) -> bytes:
        out = bytearray(length)
        end = start + length
        for ext in self.extents:
            if ext.end <= start or ext.start >= end or not ext.data or ext.zero:
                continue
            if ext.depth != 0 or ext.offset is None:
                raise DiskImageError(
                    f"{self.path}: data at guest offset {ext.start} lies in a backing file "
                    "or is compressed; cannot compare it by extent"
                )
            lo, hi = max(start, ext.start), min(end, ext.end)
            chunk = os.pread(self.fd, hi - lo, ext.offset + (lo - ext.start))
            out[lo - start : lo - start + len(chunk)] = chunk
        return bytes(out)


def data_ranges(*maps: list[Extent]) -> list[tuple[int, int]]:
    """The union of the data extents of ``maps``, merged, as ``[start, end)`` ranges."""
    spans = sorted((e.start, e.end) for m in maps for e in m if e.data)
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def compare_mapped(
    name: str,
    source: Path,
    source_map: list[Extent],
    target: Path,
    target_map: list[Extent],
    chunk_bytes: int = CHUNK_BYTES,
) -> DiskComparison:
    """Compare two mapped images by their data (blocking: run it in a thread)."""
    ranges = data_ranges(source_map, target_map)
    src, dst = _Reader(source, source_map), _Reader(target, target_map)
    compared = 0
    try:
        for lo, hi in ranges:
            for pos in range(lo, hi, chunk_bytes):
                n = min(chunk_bytes, hi - pos)
                a, b = src.read(pos, n), dst.read(pos, n)
                compared += n
                if hashlib.sha256(a).digest() != hashlib.sha256(b).digest():
                    at = pos + next(i for i in range(n) if a[i] != b[i])
                    return DiskComparison(
                        name,
                        Integrity.FAILED,
                        f"differs at guest offset {at} (source {source}, target {target})",
                        compared,
                        at,
                    )
    finally:
        src.close()
        dst.close()
    src_data = sum(e.length for e in source_map if e.data)
    dst_data = sum(e.length for e in target_map if e.data)
    return DiskComparison(
        name,
        Integrity.OK,
        f"{compared} bytes of allocated data identical (sha256 by {chunk_bytes >> 20} MiB "
        f"chunk; source {src_data} bytes allocated, target {dst_data}; the rest reads as "
        "zeros on both)",
        compared,
    )


async def compare_images(name: str, source: Path, target: Path) -> DiskComparison:
    """Compare the disk ``name``'s images; never raises (a failure to compare is
    ``unchecked`` with the reason, a difference ``failed``)."""
    try:
        src_info, dst_info = await image_info(source), await image_info(target)
        if src_info.virtual_size != dst_info.virtual_size:
            return DiskComparison(
                name,
                Integrity.FAILED,
                f"virtual sizes differ: source {src_info.virtual_size}, "
                f"target {dst_info.virtual_size}",
            )
        src_map, dst_map = await extent_map(source), await extent_map(target)
        return await asyncio.to_thread(compare_mapped, name, source, src_map, target, dst_map)
    except (DiskImageError, OSError, ValueError) as exc:
        return DiskComparison(name, Integrity.UNCHECKED, f"not compared: {exc}")

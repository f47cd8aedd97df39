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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from migrate.disks.images import DiskImageError, Extent, backing_chain, extent_map, image_info
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
    """Reads guest ranges of one image through its extent map: data at depth ``d``
    lies in ``chain[d]`` (the image, then its backing files: a target image that is
    an overlay on a replica reads most of its data from the replica)."""

    def __init__(self, path: Path, extents: list[Extent], chain: list[Path] | None = None) -> None:
        self.path = path
        self.extents = extents
        self.chain = chain or [path]
        self.fds: dict[int, int] = {0: os.open(self.chain[0], os.O_RDONLY)}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _fd(self, depth: int) -> int:
        if depth not in self.fds:
            if depth >= len(self.chain):
                raise DiskImageError(f"{self.path}: data at depth {depth} beyond its chain")
            self.fds[depth] = os.open(self.chain[depth], os.O_RDONLY)
        return self.fds[depth]

    def read(self, start: int, length: int) -> bytes:
        out = bytearray(length)
        end = start + length
        for ext in self.extents:
            if ext.end <= start or ext.start >= end or not ext.data or ext.zero:
                continue
            if ext.offset is None:
                raise DiskImageError(
                    f"{self.path}: data at guest offset {ext.start} is compressed; "
                    "cannot compare it by extent"
                )
            lo, hi = max(start, ext.start), min(end, ext.end)
            chunk = os.pread(self._fd(ext.depth), hi - lo, ext.offset + (lo - ext.start))
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


def _chunk_pairs(
    ranges: list[tuple[int, int]], src: _Reader, dst: _Reader, chunk_bytes: int
) -> Iterator[tuple[int, int, bytes, bytes]]:
    """``(offset, length, source bytes, target bytes)`` chunk by chunk over ``ranges``."""
    for lo, hi in ranges:
        for pos in range(lo, hi, chunk_bytes):
            n = min(chunk_bytes, hi - pos)
            yield pos, n, src.read(pos, n), dst.read(pos, n)


def _differ(a: bytes, b: bytes) -> bool:
    return hashlib.sha256(a).digest() != hashlib.sha256(b).digest()


def compare_mapped(
    name: str,
    source: Path,
    source_map: list[Extent],
    target: Path,
    target_map: list[Extent],
    chunk_bytes: int = CHUNK_BYTES,
    source_chain: list[Path] | None = None,
    target_chain: list[Path] | None = None,
) -> DiskComparison:
    """Compare two mapped images by their data (blocking: run it in a thread)."""
    ranges = data_ranges(source_map, target_map)
    src = _Reader(source, source_map, source_chain)
    dst = _Reader(target, target_map, target_chain)
    compared = 0
    try:
        for pos, n, a, b in _chunk_pairs(ranges, src, dst, chunk_bytes):
            compared += n
            if _differ(a, b):
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
        src_chain = await backing_chain(source) if src_info.backing else None
        dst_chain = await backing_chain(target) if dst_info.backing else None
        return await asyncio.to_thread(
            compare_mapped, name, source, src_map, target, dst_map, CHUNK_BYTES,
            src_chain, dst_chain,
        )  # fmt: skip
    except (DiskImageError, OSError, ValueError) as exc:
        return DiskComparison(name, Integrity.UNCHECKED, f"not compared: {exc}")


def compare_ranges(
    ranges: list[tuple[int, int]],
    source: Path,
    source_map: list[Extent],
    target: Path,
    target_map: list[Extent],
    chunk_bytes: int = CHUNK_BYTES,
    source_chain: list[Path] | None = None,
    target_chain: list[Path] | None = None,
    differ_bytes: int | None = None,
) -> tuple[int, list[tuple[int, int]]]:
    """Compare ``ranges`` of two mapped images chunk by chunk, to the end (blocking:
    run it in a thread): the bytes compared and the ranges that differ — whole
    chunks, or with ``differ_bytes`` the pieces of that size (from each chunk's
    start) that differ within a differing chunk."""
    src = _Reader(source, source_map, source_chain)
    dst = _Reader(target, target_map, target_chain)
    compared = 0
    differed: list[tuple[int, int]] = []
    try:
        for pos, n, a, b in _chunk_pairs(ranges, src, dst, chunk_bytes):
            compared += n
            if not _differ(a, b):
                continue
            if differ_bytes is None:
                differed.append((pos, pos + n))
                continue
            for i in range(0, n, differ_bytes):
                if a[i : i + differ_bytes] != b[i : i + differ_bytes]:
                    differed.append((pos + i, pos + min(n, i + differ_bytes)))
    finally:
        src.close()
        dst.close()
    return compared, differed

"""Keep the disk comparison out of the downtime: compare in the background, then
re-check in the downtime only what the guest wrote since.

Once every mirror is READY (write-blocking mode keeps both images in step):

* :meth:`QuickCheck.start` pauses the guest a moment (``stop``: QEMU flushes every
  node, the mirror's NBD client too, so both image files' qcow2 metadata is on
  disk — ``qemu-img map -U`` of a running QEMU's image is stale otherwise, checked
  on QEMU 7.2), adds the block dirty bitmap :data:`BITMAP` on the source's disk
  node, resumes the guest; then compares the images as
  :func:`~migrate.disks.integrity.compare_images` does, remembering the chunks
  that differ (a write may have been in flight) instead of failing.
* :meth:`QuickCheck.verify` (source stopped, target paused, mirrors completed)
  reads the bitmap's dirty ranges — the bitmap disabled, the node exported
  read-only over NBD on a UNIX socket with the bitmap, ``qemu-img map`` with
  ``x-dirty-bitmap`` (dirty ranges read as ``"data": false``) — and compares
  only those ranges (aligned to the bitmap's 64 KiB granularity) and the chunks
  that differed.

QEMU's block dirty bitmaps are reliable (only 7.2's TCG RAM dirty log is not). They
record the guest's writes, not a change of the target's image behind its QEMU's
back (another process writing the file): :meth:`QuickCheck.start` therefore watches
the target image file (inotify, before the background pass) for a writer closing
it, the file deleted or renamed (the target QEMU keeps its image open all along),
and :meth:`QuickCheck.seal` (in the source's pre-switchover pause) ends the watch.
Seen any: the fast path does not vouch for the target; the downtime compares in
full. (A writer that keeps the file open past the pause is not seen.)
Anything that goes wrong on the fast path falls back to the full comparison.
:meth:`QuickCheck.close` removes the export, the NBD server and the bitmap in
every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

from migrate.disks.images import DiskImageError, _qemu_img, backing_chain, extent_map, image_info
from migrate.disks.integrity import (
    CHUNK_BYTES,
    DiskComparison,
    compare_images,
    compare_ranges,
    data_ranges,
)
from migrate.qmp import QmpSession
from migrate.report import Integrity

BITMAP = "livemig-verify"
GRANULARITY = 64 << 10
EXPORT = "livemig-verify"
#: What another process did to the target image file that voids the fast path.
TAMPER = Mask.CLOSE_WRITE | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ATTRIB

Range = tuple[int, int]


def merge(ranges: list[Range]) -> list[Range]:
    """``ranges`` sorted and merged (touching ranges join)."""
    out: list[Range] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def recheck_ranges(
    dirty: list[Range], differed: list[Range], size: int, chunk_bytes: int = CHUNK_BYTES
) -> list[Range]:
    """The chunk-aligned ranges to compare again: every chunk that a dirty range or
    a range that differed touches, clipped to ``size``, merged."""
    out = []
    for lo, hi in [*dirty, *differed]:
        lo, hi = max(lo, 0), min(hi, size)
        if hi <= lo:
            continue
        out.append((lo - lo % chunk_bytes, min(size, -(-hi // chunk_bytes) * chunk_bytes)))
    return merge(out)


def dirty_ranges(bitmap_map: list[dict[str, Any]]) -> list[Range]:
    """The dirty ranges of a ``qemu-img map`` read with ``x-dirty-bitmap``: there,
    a dirty range reads as ``"data": false``."""
    return merge(
        [(int(e["start"]), int(e["start"]) + int(e["length"])) for e in bitmap_map
         if not e["data"]]
    )  # fmt: skip


@dataclass
class Background:
    """The background pass: what it compared, the ranges that differed."""

    compared: int = 0
    differed: list[Range] = field(default_factory=list)
    ms: float = 0.0


class QuickCheck:
    """One mirrored disk's two-pass comparison (see the module docstring)."""

    def __init__(
        self, source: QmpSession, node: str, name: str, source_path: Path, target_path: Path
    ) -> None:
        self.qmp = source
        self.node = node
        self.name = name
        self.source_path = source_path
        self.target_path = target_path
        self.background: Background | None = None
        self.problem = ""
        self._bitmap = False
        self._exported = False
        self._server = False
        self._dir: Path | None = None
        self._watch: Inotify | None = None
        #: Why the target image cannot be trusted outside the dirty ranges (None: it can).
        self.tampered: str | None = None

    def _watch_target(self) -> None:
        try:
            watch = Inotify(sync_timeout=0)
        except OSError as exc:
            self.tampered = f"cannot watch the target image ({exc})"
            return
        try:
            watch.add_watch(self.target_path, TAMPER)
        except OSError as exc:
            watch.close()
            self.tampered = f"cannot watch the target image ({exc})"
            return
        self._watch = watch

    def seal(self) -> None:
        """End the watch of the target image (the source stopped): what it saw decides
        whether the fast path may vouch for the target. Idempotent; never raises."""
        watch, self._watch = self._watch, None
        if watch is None:
            return
        try:
            for event in watch:  # what is pending (sync_timeout 0)
                if event.mask & Mask.Q_OVERFLOW:
                    self.tampered = self.tampered or "the target image's watch overflowed"
                elif event.mask & TAMPER:
                    what = (
                        "written and closed"
                        if event.mask & Mask.CLOSE_WRITE
                        else ("deleted, renamed or changed (attributes)")
                    )
                    self.tampered = self.tampered or (
                        f"the target image was {what} by another process since the background "
                        "pass (its QEMU keeps it open)"
                    )
        except OSError as exc:
            self.tampered = self.tampered or f"the target image's watch failed ({exc})"
        finally:
            watch.close()

    async def start(self) -> None:
        """Flush both sides, add the bitmap, compare in the background (guest running).
        A failure leaves :attr:`background` ``None`` (verify then compares in full)."""
        self._watch_target()
        try:
            running = await self.qmp.status() == "running"
            if running:
                await self.qmp.execute("stop")
            try:
                await self.qmp.execute(
                    "block-dirty-bitmap-add",
                    {"node": self.node, "name": BITMAP, "granularity": GRANULARITY},
                )
                self._bitmap = True
            finally:
                if running:
                    await self.qmp.execute("cont")
            t0 = time.monotonic()
            compared, differed = await self._compare(None)
            self.background = Background(compared, differed, (time.monotonic() - t0) * 1e3)
        except Exception as exc:  # noqa: BLE001 - any failure: the full comparison
            self.problem = f"background pass failed ({exc})"
            self.background = None

    async def _compare(self, ranges: list[Range] | None) -> tuple[int, list[Range]]:
        src_info, dst_info = await image_info(self.source_path), await image_info(self.target_path)
        if src_info.virtual_size != dst_info.virtual_size:
            raise DiskImageError("virtual sizes differ")
        src_map, dst_map = await extent_map(self.source_path), await extent_map(self.target_path)
        src_chain = await backing_chain(self.source_path) if src_info.backing else None
        dst_chain = await backing_chain(self.target_path) if dst_info.backing else None
        want = data_ranges(src_map, dst_map) if ranges is None else ranges
        # What differs is remembered by the bitmap's granule, not by whole chunk: the
        # downtime re-reads it (a target overlay on a replica differs in every cluster
        # the guest writes during the pass, scattered over the disk).
        return await asyncio.to_thread(
            compare_ranges, want, self.source_path, src_map, self.target_path, dst_map,
            CHUNK_BYTES, src_chain, dst_chain, GRANULARITY,
        )  # fmt: skip

    async def _read_bitmap(self) -> list[Range]:
        await self.qmp.execute("block-dirty-bitmap-disable", {"node": self.node, "name": BITMAP})
        self._dir = Path(tempfile.mkdtemp(prefix="livemig-verify-"))
        sock = self._dir / "nbd.sock"
        await self.qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
        )
        self._server = True
        await self.qmp.execute(
            "block-export-add",
            {"type": "nbd", "id": EXPORT, "node-name": self.node, "name": EXPORT,
             "writable": False, "bitmaps": [BITMAP]},
        )  # fmt: skip
        self._exported = True
        out = await _qemu_img(
            "map", "--output=json", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},export={EXPORT},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{BITMAP}",
        )  # fmt: skip
        data = json.loads(out)
        if not isinstance(data, list):
            raise DiskImageError("qemu-img map of the bitmap: unexpected answer")
        return dirty_ranges(data)

    async def verify(self) -> DiskComparison:
        """In the downtime: compare what was written since the background pass and
        what differed in it; the full comparison if the fast path is not available.
        Never raises."""
        t0 = time.monotonic()
        self.seal()
        background = self.background
        fast: DiskComparison | None = None
        if self.tampered is not None:
            self.problem = self.tampered
        elif background is not None:
            try:
                dirty = await self._read_bitmap()
                size = (await image_info(self.source_path)).virtual_size
                # Aligned to the bitmap's granularity, not to whole 4 MiB chunks: a
                # guest writing scattered blocks touches every chunk within a second
                # (the whole disk re-read in the downtime, docs/bench/disks).
                ranges = recheck_ranges(dirty, background.differed, size, GRANULARITY)
                compared, differed = await self._compare(ranges)
                ms = (time.monotonic() - t0) * 1e3
                if differed:
                    at = differed[0][0]
                    fast = DiskComparison(
                        self.name, Integrity.FAILED,
                        f"differs at guest offset {at} (source {self.source_path}, target "
                        f"{self.target_path}; re-checked {compared} bytes in the downtime "
                        f"in {ms:.0f} ms)", compared, at,
                    )  # fmt: skip
                else:
                    fast = DiskComparison(
                        self.name, Integrity.OK,
                        f"identical: {background.compared} bytes of allocated data compared "
                        f"in the background ({background.ms:.0f} ms, sha256 by "
                        f"{CHUNK_BYTES >> 20} MiB chunk), {len(background.differed)} chunk "
                        f"range(s) in flight then; re-checked {compared} bytes in the "
                        f"downtime in {ms:.0f} ms (written since: {sum(h - lo for lo, h in dirty)} "
                        "bytes by the dirty bitmap)", compared,
                    )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - any failure: the full comparison
                self.problem = f"fast re-check failed ({exc})"
        await self.close()
        if fast is not None:
            return fast
        full = await compare_images(self.name, self.source_path, self.target_path)
        ms = (time.monotonic() - t0) * 1e3
        return DiskComparison(
            full.name, full.integrity,
            f"{full.detail}; full comparison in the downtime ({ms:.0f} ms, "
            f"{full.compared_bytes} bytes re-checked): {self.problem or 'no background pass'}",
            full.compared_bytes, full.first_difference,
        )  # fmt: skip

    async def close(self) -> list[str]:
        """Remove the export, the NBD server, the bitmap (best effort, each once)."""
        self.seal()
        notes = []
        steps: list[tuple[str, str, dict[str, Any]]] = []
        if self._exported:
            steps.append(("_exported", "block-export-del", {"id": EXPORT}))
        if self._server:
            steps.append(("_server", "nbd-server-stop", {}))
        if self._bitmap:
            steps.append(("_bitmap", "block-dirty-bitmap-remove",
                          {"node": self.node, "name": BITMAP}))  # fmt: skip
        for attr, command, args in steps:
            for attempt in range(3):
                try:
                    await self.qmp.execute(command, args, timeout=2.0)
                    setattr(self, attr, False)
                    break
                except Exception as exc:  # noqa: BLE001 - retried, then noted
                    if attempt == 2:
                        notes.append(f"disk {self.name}: {command} failed: {exc}")
                    await asyncio.sleep(0.1)
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None
        return notes

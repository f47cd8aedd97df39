"""Did every page arrive? Source RAM at STOP against target RAM before it resumes.

Both sides' RAM must be in files the engine can map (``memory-backend-file,
share=on``). The source digest is taken as soon as the source has stopped (its RAM
no longer changes) while the last pages and device state are still in flight; only
the target digest sits between the target's completion and its resume.

Repair: the stopped source's RAM is the truth, and the target is paused, so pages
that differ can be copied source → target and the comparison repeated before the
target runs. This is needed in practice: QEMU before 9.0 loses dirty pages under
TCG (its dirty-bitmap fast path does not reset the TCG TLB's dirty state; fixed
upstream by commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with
TCG memory access"), and on these machines a guest dirtying 16 MiB/s arrives with
~30 stale kernel pages and crashes unless they are repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dirtytrack.digest import RamDigest, differing_pages, ram_digest
from dirtytrack.errors import RamMappingError
from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.report import Integrity

MAX_PAGES_NAMED = 8
#: The most stale pages a repair may copy (16 MiB): a larger difference is no lost
#: dirty bit but a broken migration, and copying it would hide that (and cost downtime).
MAX_REPAIR_PAGES = 4096


@dataclass(frozen=True)
class IntegrityResult:
    """The verdict; ``repaired_pages`` were copied from the source before it held."""

    integrity: Integrity
    detail: str
    differing_pages: tuple[int, ...] = ()
    repaired_pages: int = 0


class RamCheck(Protocol):
    """An integrity check of target RAM against the stopped source's. What a strategy drives: prepare early, note the source's stop, compare, close."""

    def prepare(self) -> None: ...

    async def ready(self) -> None: ...

    def source_stopped(self) -> None: ...

    async def compare(self, repair: bool = False) -> IntegrityResult: ...

    async def close(self) -> None: ...


class RamComparison:
    """Compares a source and a target RAM file; numpy/xxhash work runs in threads.

    :meth:`prepare` maps both files (paying the page faults, ~170 ms per 256 MiB
    sparse target here) off the event loop, and :meth:`ready` waits for that
    before ``migrate`` is issued so switchover never waits on it;
    :meth:`source_stopped` digests the source while the last pages travel;
    :meth:`compare` digests the target and compares. :meth:`close` unmaps.
    """

    def __init__(self, source_ram: Path, target_ram: Path) -> None:
        self.source_ram = source_ram
        self.target_ram = target_ram
        self._maps: tuple[RamMapping, RamMapping] | None = None
        self._prepared: asyncio.Task[None] | None = None
        self._source_digest: asyncio.Task[RamDigest] | None = None

    def prepare(self) -> None:
        """Start mapping both RAM files in the background."""
        if self._prepared is None:
            self._prepared = asyncio.create_task(asyncio.to_thread(self._map))

    async def ready(self) -> None:
        """Wait until both files are mapped (raises RamMappingError if one cannot be)."""
        await self._mapped()

    def _map(self) -> None:
        src = RamMapping(self.source_ram, populate=True)
        # Writable so that stale pages can be repaired in place; QEMU sees the writes.
        dst = RamMapping(self.target_ram, writable=True, populate=True)
        src.open()
        try:
            dst.open()
        except RamMappingError:
            src.close()
            raise
        self._maps = (src, dst)

    async def _mapped(self) -> tuple[RamMapping, RamMapping]:
        self.prepare()
        assert self._prepared is not None
        await self._prepared
        assert self._maps is not None
        return self._maps

    def source_stopped(self) -> None:
        """Start digesting the source RAM (call once the source VM is stopped)."""
        if self._source_digest is None:
            self._source_digest = asyncio.create_task(self._digest(0))

    async def _digest(self, side: int) -> RamDigest:
        ram = (await self._mapped())[side]
        return await asyncio.to_thread(ram_digest, ram.buffer())

    async def compare(self, repair: bool = False) -> IntegrityResult:
        """Compare the stopped source with the loaded, not yet running, target.

        With ``repair``, differing pages are copied from the source and the whole
        comparison is repeated; the result is OK only if the second one matches.
        """
        self.source_stopped()
        assert self._source_digest is not None
        try:
            target_digest = await self._digest(1)
            source_digest = await self._source_digest
        except RamMappingError as exc:
            return IntegrityResult(Integrity.UNCHECKED, f"RAM not comparable: {exc}")
        size_mib = source_digest.size >> 20
        if source_digest.size != target_digest.size:
            detail = (
                f"RAM sizes differ: source {source_digest.size} B, target {target_digest.size} B"
            )
            return IntegrityResult(Integrity.FAILED, detail)
        chunks = source_digest.differing_chunks(target_digest)
        if len(chunks) == 0:
            return IntegrityResult(Integrity.OK, f"{size_mib} MiB of RAM identical (xxh3 digests)")
        src, dst = await self._mapped()
        found = await asyncio.to_thread(
            differing_pages, src.buffer(), dst.buffer(), chunks, source_digest.chunk_size
        )
        pages = [int(p) for p in found]
        listed = _list_pages(pages)
        total = source_digest.size // PAGE_SIZE
        if not repair or len(pages) > MAX_REPAIR_PAGES:
            bound = f" (more than the {MAX_REPAIR_PAGES} a repair may copy)" if repair else ""
            detail = f"{len(pages)} of {total} pages differ{bound}: {listed}"
            return IntegrityResult(Integrity.FAILED, detail, tuple(pages[:MAX_PAGES_NAMED]))
        await asyncio.to_thread(_copy_pages, src, dst, found)
        recheck = await self._digest(1)
        if not source_digest.matches(recheck):
            detail = f"{len(pages)} of {total} pages differed and repair did not hold: {listed}"
            return IntegrityResult(Integrity.FAILED, detail, tuple(pages[:MAX_PAGES_NAMED]))
        detail = (
            f"{size_mib} MiB of RAM identical after repairing {len(pages)} stale page(s) "
            f"from the stopped source: {listed}"
        )
        return IntegrityResult(Integrity.OK, detail, tuple(pages[:MAX_PAGES_NAMED]), len(pages))

    async def close(self) -> None:
        for task in (self._source_digest, self._prepared):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, RamMappingError):
                    await task
        if self._maps is not None:
            for ram in self._maps:
                ram.close()
            self._maps = None


def _list_pages(pages: list[int]) -> str:
    named = ", ".join(str(p) for p in pages[:MAX_PAGES_NAMED])
    more = f" and {len(pages) - MAX_PAGES_NAMED} more" if len(pages) > MAX_PAGES_NAMED else ""
    return named + more


def _copy_pages(src: RamMapping, dst: RamMapping, pages: npt.NDArray[np.intp]) -> None:
    dst.pages()[pages] = src.pages()[pages]


class RamComparisons:
    """Several RAM backends compared as one (NUMA nodes, pc-dimm): the same interface
    as :class:`RamComparison`; the verdict holds only if every backend's holds."""

    def __init__(self, parts: dict[str, RamComparison]) -> None:
        self.parts = parts

    def prepare(self) -> None:
        for part in self.parts.values():
            part.prepare()

    async def ready(self) -> None:
        for part in self.parts.values():
            await part.ready()

    def source_stopped(self) -> None:
        for part in self.parts.values():
            part.source_stopped()

    async def compare(self, repair: bool = False) -> IntegrityResult:
        results = {name: await part.compare(repair) for name, part in self.parts.items()}
        failed = [r for r in results.values() if r.integrity is Integrity.FAILED]
        unchecked = [r for r in results.values() if r.integrity is Integrity.UNCHECKED]
        verdict = Integrity.FAILED if failed else Integrity.UNCHECKED if unchecked else Integrity.OK
        detail = "; ".join(f"{name}: {r.detail}" for name, r in results.items())
        pages = tuple(p for r in results.values() for p in r.differing_pages)[:MAX_PAGES_NAMED]
        repaired = sum(r.repaired_pages for r in results.values())
        return IntegrityResult(verdict, detail, pages, repaired)

    async def close(self) -> None:
        for part in self.parts.values():
            await part.close()

"""The other side's RAM when this process cannot map it: digests and page writes by its owner.

The integrity check (:mod:`migrate.integrity`) compares source RAM at STOP with
target RAM before the target resumes. On one machine the engine maps both files
(:class:`~migrate.integrity.RamComparison`). Across hosts it cannot map the
target's: the side that owns that RAM digests it and writes repaired pages into
it, reached through three async callables (:class:`RemoteRam`), e.g. HTTPS calls
to the target node's agent, which serves them with a :class:`RamOwner` over its
own QEMU's RAM file. :class:`RemoteRamComparison` is the engine's side; it maps
only the source file::

    engine (source host)                       owner (target host)
    source digest at STOP (local)  ─┐
                                    ├─ digest()            → chunk digests
    differing chunks → their pages ─┼─ page_hashes(pages)  → one xxh3 per page
    repair: the source's pages     ─┼─ write_pages(pages, data)   (target paused)
    re-check                       ─┴─ digest()

Every check that both implementations run is a :class:`RamCheck`. The digest
travels as :func:`encode_digest` / :func:`decode_digest` (a JSON object, sizes
bounded before allocating).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from dirtytrack.digest import DEFAULT_CHUNK_SIZE, RamDigest, ram_digest
from dirtytrack.errors import RamMappingError
from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.deadline import within
from migrate.errors import ConfigError
from migrate.integrity import MAX_REPAIR_PAGES, IntegrityResult, RamCheck, _list_pages
from migrate.report import Integrity

#: The largest RAM a digest may describe (4 TiB) and so the most chunks it may carry.
MAX_RAM_BYTES = 4 << 40
#: How long one call to the RAM's owner may take (s): digests of all RAM included.
DEFAULT_CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteRam:
    """The target's RAM, reached through its owner.

    ``digest()`` returns the chunk digest of all of it (``ram_digest`` with the
    default 2 MiB chunks). ``page_hashes(pages)`` returns one xxh3-64 per listed
    page number, in order (uint64 array). ``write_pages(pages, data)`` writes
    ``data`` (``len(pages)`` * 4 KiB, in order) at those page numbers; it is only
    called while the target is paused. Each may raise any exception: the check
    then reports the RAM as not comparable.
    """

    digest: Callable[[], Awaitable[RamDigest]]
    page_hashes: Callable[[npt.NDArray[np.intp]], Awaitable[npt.NDArray[np.uint64]]]
    write_pages: Callable[[npt.NDArray[np.intp], bytes], Awaitable[None]]


def page_hashes(buf: memoryview, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """One xxh3-64 per listed page of ``buf`` (raises :class:`ConfigError` for a page outside)."""
    count = len(buf) // PAGE_SIZE
    if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= count):
        raise ConfigError(f"page number outside RAM of {count} pages")
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter(
        (digest(buf[int(p) * PAGE_SIZE : (int(p) + 1) * PAGE_SIZE]) for p in pages),
        dtype=np.uint64,
        count=len(pages),
    )


class RamOwner:
    """Serves :class:`RemoteRam`'s calls over a RAM file this process maps (the owner's side).

    Open with :meth:`open` (or ``async with``); numpy/xxhash work runs in threads.
    """

    def __init__(self, ram_path: Path) -> None:
        self.ram_path = ram_path
        self._ram: RamMapping | None = None

    async def open(self) -> None:
        """Map the RAM file writable. Raises :class:`RamMappingError`."""
        ram = RamMapping(self.ram_path, writable=True)
        await asyncio.to_thread(ram.open)
        self._ram = ram

    async def __aenter__(self) -> RamOwner:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _mapped(self) -> RamMapping:
        if self._ram is None:
            raise RamMappingError(f"{self.ram_path} is not mapped")
        return self._ram

    async def digest(self) -> RamDigest:
        return await asyncio.to_thread(ram_digest, self._mapped().buffer())

    async def page_hashes(self, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        return await asyncio.to_thread(page_hashes, self._mapped().buffer(), pages)

    async def write_pages(self, pages: npt.NDArray[np.intp], data: bytes) -> None:
        """Write ``data`` at ``pages``. Raises :class:`ConfigError` for a size mismatch,
        more than :data:`~migrate.integrity.MAX_REPAIR_PAGES`, or a page outside RAM."""
        ram = self._mapped()
        if len(data) != len(pages) * PAGE_SIZE:
            raise ConfigError(f"{len(data)} bytes of data for {len(pages)} pages")
        if len(pages) > MAX_REPAIR_PAGES:
            raise ConfigError(f"{len(pages)} pages to write, more than {MAX_REPAIR_PAGES}")
        if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= ram.page_count):
            raise ConfigError(f"page number outside RAM of {ram.page_count} pages")
        rows = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)

        def write() -> None:
            ram.pages()[pages] = rows

        await asyncio.to_thread(write)

    def remote(self) -> RemoteRam:
        """This owner as the engine's :class:`RemoteRam` (in-process)."""
        return RemoteRam(self.digest, self.page_hashes, self.write_pages)

    def close(self) -> None:
        if self._ram is not None:
            self._ram.close()
            self._ram = None


def encode_digest(digest: RamDigest) -> dict[str, Any]:
    """A chunk digest as JSON: sizes and the little-endian hashes in base64."""
    return {
        "size": digest.size,
        "chunk_size": digest.chunk_size,
        "hashes": base64.b64encode(digest.hashes.astype("<u8").tobytes()).decode(),
    }


def decode_digest(data: Any) -> RamDigest:
    """The digest :func:`encode_digest` wrote. Raises :class:`ConfigError` for a bad shape."""
    if not isinstance(data, dict) or set(data) != {"size", "chunk_size", "hashes"}:
        raise ConfigError("a RAM digest needs exactly size, chunk_size and hashes")
    size, chunk = data["size"], data["chunk_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_RAM_BYTES:
        raise ConfigError(f"bad RAM digest size {size!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0 or chunk % PAGE_SIZE:
        raise ConfigError(f"bad RAM digest chunk size {chunk!r}")
    count = (size + chunk - 1) // chunk
    text = data["hashes"]
    if not isinstance(text, str) or len(text) != 4 * ((8 * count + 2) // 3):
        raise ConfigError(f"a RAM digest of {size} bytes needs {count} hashes")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ConfigError("RAM digest hashes are not base64") from None
    hashes = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    return RamDigest(size=size, chunk_size=chunk, hashes=hashes)


class RemoteRamComparison:
    """Source RAM file (mapped here) against a :class:`RemoteRam` target; a :class:`RamCheck`.

    Same verdicts and repair bound as :class:`~migrate.integrity.RamComparison`;
    each call to the owner has a deadline of ``call_timeout_s``.
    """

    def __init__(
        self,
        source_ram: Path,
        target: RemoteRam,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        self.source_ram = source_ram
        self.target = target
        self.call_timeout_s = call_timeout_s
        self._source: RamMapping | None = None
        self._prepared: asyncio.Task[None] | None = None
        self._source_digest: asyncio.Task[RamDigest] | None = None

    def prepare(self) -> None:
        if self._prepared is None:
            self._prepared = asyncio.create_task(asyncio.to_thread(self._map))

    def _map(self) -> None:
        ram = RamMapping(self.source_ram, populate=True)
        ram.open()
        self._source = ram

    async def ready(self) -> None:
        await self._mapped()

    async def _mapped(self) -> RamMapping:
        self.prepare()
        assert self._prepared is not None
        await self._prepared
        assert self._source is not None
        return self._source

    def source_stopped(self) -> None:
        if self._source_digest is None:
            self._source_digest = asyncio.create_task(self._digest_source())

    async def _digest_source(self) -> RamDigest:
        ram = await self._mapped()
        return await asyncio.to_thread(ram_digest, ram.buffer(), DEFAULT_CHUNK_SIZE)

    async def _call(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            return await within(call, self.call_timeout_s)
        except TimeoutError:
            raise _Unreachable(
                f"the target's {what} took longer than {self.call_timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the owner's transport: any failure is "not comparable"
            raise _Unreachable(f"the target's {what} failed: {exc}") from exc

    async def compare(self, repair: bool = False) -> IntegrityResult:
        """Compare the stopped source with the paused target through its owner."""
        self.source_stopped()
        assert self._source_digest is not None
        try:
            target_digest = await self._call("RAM digest", self.target.digest())
            source_digest = await self._source_digest
            result = await self._compare(source_digest, target_digest, repair)
        except RamMappingError as exc:
            return IntegrityResult(Integrity.UNCHECKED, f"RAM not comparable: {exc}")
        except _Unreachable as exc:
            return IntegrityResult(Integrity.UNCHECKED, f"RAM not comparable: {exc}")
        return result

    async def _compare(
        self, source_digest: RamDigest, target_digest: RamDigest, repair: bool
    ) -> IntegrityResult:
        size_mib = source_digest.size >> 20
        if (source_digest.size, source_digest.chunk_size) != (
            target_digest.size,
            target_digest.chunk_size,
        ):
            detail = (
                f"RAM sizes differ: source {source_digest.size} B, target {target_digest.size} B"
            )
            return IntegrityResult(Integrity.FAILED, detail)
        chunks = source_digest.differing_chunks(target_digest)
        if len(chunks) == 0:
            return IntegrityResult(
                Integrity.OK, f"{size_mib} MiB of RAM identical (xxh3 digests, remote target)"
            )
        per_chunk = source_digest.chunk_size // PAGE_SIZE
        total = source_digest.size // PAGE_SIZE
        candidates = np.concatenate(
            [np.arange(c * per_chunk, min((c + 1) * per_chunk, total)) for c in chunks]
        ).astype(np.intp)
        src = await self._mapped()
        theirs = await self._call("page hashes", self.target.page_hashes(candidates))
        ours = await asyncio.to_thread(page_hashes, src.buffer(), candidates)
        if not isinstance(theirs, np.ndarray) or theirs.shape != ours.shape:
            raise _Unreachable("page hashes: the target answered the wrong number of hashes")
        found = candidates[ours != theirs]
        pages = [int(p) for p in found]
        listed = _list_pages(pages)
        if not repair or len(pages) > MAX_REPAIR_PAGES:
            bound = f" (more than the {MAX_REPAIR_PAGES} a repair may copy)" if repair else ""
            detail = f"{len(pages)} of {total} pages differ{bound}: {listed}"
            return IntegrityResult(Integrity.FAILED, detail, tuple(pages[:8]))
        data = await asyncio.to_thread(lambda: src.pages()[found].tobytes())
        await self._call("page writes", self.target.write_pages(found, data))
        recheck = await self._call("RAM digest", self.target.digest())
        if not source_digest.matches(recheck):
            detail = f"{len(pages)} of {total} pages differed and repair did not hold: {listed}"
            return IntegrityResult(Integrity.FAILED, detail, tuple(pages[:8]))
        detail = (
            f"{size_mib} MiB of RAM identical after repairing {len(pages)} stale page(s) "
            f"from the stopped source (remote target): {listed}"
        )
        return IntegrityResult(Integrity.OK, detail, tuple(pages[:8]), len(pages))

    async def close(self) -> None:
        for task in (self._source_digest, self._prepared):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, RamMappingError):
                    await task
        if self._source is not None:
            self._source.close()
            self._source = None


__all__ = [
    "RamCheck",
    "RamOwner",
    "RemoteRam",
    "RemoteRamComparison",
    "decode_digest",
    "encode_digest",
    "page_hashes",
]


class _Unreachable(Exception):
    """A call to the RAM's owner failed or timed out (reported as UNCHECKED)."""

"""Digests of guest RAM: the integrity check that a migration moved every page.

A digest is a vector of 64-bit xxh3 hashes, one per fixed-size chunk (2 MiB by
default: ~9 ms per 256 MiB on one core here) or one per page. Two RAM images are
equal when their chunk digests are; where a chunk differs, :func:`differing_pages`
drills down to the exact pages so an error can name them.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from dirtytrack.ram import PAGE_SIZE

DEFAULT_CHUNK_SIZE = 2 << 20


@dataclass(frozen=True, eq=False)
class RamDigest:
    """Per-chunk xxh3-64 hashes of a RAM image of ``size`` bytes."""

    size: int
    chunk_size: int
    hashes: npt.NDArray[np.uint64]

    def differing_chunks(self, other: RamDigest) -> npt.NDArray[np.intp]:
        """Indices of chunks whose hashes differ; all chunks if the layouts differ."""
        if (self.size, self.chunk_size) != (other.size, other.chunk_size):
            return np.arange(max(len(self.hashes), len(other.hashes)))
        return np.flatnonzero(self.hashes != other.hashes)

    def matches(self, other: RamDigest) -> bool:
        return len(self.differing_chunks(other)) == 0


def ram_digest(
    buf: memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE, threads: int = 1
) -> RamDigest:
    """Hash ``buf`` in ``chunk_size`` pieces (the last may be shorter).

    ``threads`` > 1 splits the chunks into that many runs hashed in parallel
    (xxhash releases the GIL while it hashes a chunk); the digest is the same.
    """
    if chunk_size <= 0 or chunk_size % PAGE_SIZE:
        raise ValueError(f"chunk_size must be a positive multiple of {PAGE_SIZE}")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    size = len(buf)
    count = (size + chunk_size - 1) // chunk_size
    hashes = np.empty(count, dtype=np.uint64)

    def run(first: int, last: int) -> None:
        digest = xxhash.xxh3_64_intdigest
        for i in range(first, last):
            hashes[i] = digest(buf[i * chunk_size : (i + 1) * chunk_size])

    parts = min(threads, count)
    if parts <= 1:
        run(0, count)
    else:
        bounds = [count * k // parts for k in range(parts + 1)]
        with ThreadPoolExecutor(parts, thread_name_prefix="ram-digest") as pool:
            for job in [pool.submit(run, a, b) for a, b in itertools.pairwise(bounds)]:
                job.result()
    return RamDigest(size=size, chunk_size=chunk_size, hashes=hashes)


def page_digests(
    buf: memoryview,
    *,
    seed: int = 0,
    out: npt.NDArray[np.uint64] | None = None,
    yield_every_pages: int = 0,
) -> npt.NDArray[np.uint64]:
    """One xxh3-64 hash per 4 KiB page of ``buf``.

    ``seed`` keys the hash (0 is xxh3's default). ``out`` receives the hashes (one
    per page) instead of a new array. ``yield_every_pages`` > 0 hands the GIL to
    other threads after that many pages: the loop holds the GIL throughout (one
    Python call per page), so without it an event loop in another thread can wait
    a whole switch interval (5 ms). Raises :class:`ValueError` if ``buf`` is not a
    whole number of pages or ``out`` has the wrong shape.
    """
    view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    if len(view) % PAGE_SIZE:
        raise ValueError(f"buffer of {len(view)} bytes is not a whole number of pages")
    count = len(view) // PAGE_SIZE
    if out is None:
        out = np.empty(count, dtype=np.uint64)
    elif out.shape != (count,):
        raise ValueError(f"out has shape {out.shape}, expected ({count},)")
    step = yield_every_pages if yield_every_pages > 0 else max(count, 1)
    digest = xxhash.xxh3_64_intdigest
    for first in range(0, count, step):
        last = min(first + step, count)
        out[first:last] = np.fromiter(
            (
                digest(view[off : off + PAGE_SIZE], seed)
                for off in range(first * PAGE_SIZE, last * PAGE_SIZE, PAGE_SIZE)
            ),
            dtype=np.uint64,
            count=last - first,
        )
        if yield_every_pages > 0 and last < count:
            yield_gil()
    return out


def yield_gil() -> None:
    """Let a thread waiting for the GIL run (e.g. the event loop), then continue.

    ``time.sleep(0)`` really blocks for a few tens of microseconds with the GIL
    released, long enough for a waiting thread to take it; a bare release and
    reacquire (``os.sched_yield``) is usually won back by this thread before the
    waiter wakes up (measured: 5-60 ms stalls of a 1 ms ticker thread otherwise).
    """
    time.sleep(0)


def differing_pages(
    a: memoryview, b: memoryview, chunks: npt.NDArray[np.intp], chunk_size: int
) -> npt.NDArray[np.intp]:
    """Page numbers that differ between ``a`` and ``b`` inside the given chunks."""
    found: list[npt.NDArray[np.intp]] = []
    pages_per_chunk = chunk_size // PAGE_SIZE
    for chunk in chunks:
        start = int(chunk) * chunk_size
        end = min(start + chunk_size, len(a), len(b))
        if end <= start:
            continue
        pa = np.frombuffer(a[start:end], dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        pb = np.frombuffer(b[start:end], dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        found.append(np.flatnonzero((pa != pb).any(axis=1)) + int(chunk) * pages_per_chunk)
    if not found:
        return np.empty(0, dtype=np.intp)
    return np.concatenate(found)

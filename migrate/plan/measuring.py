"""Measure the VM before anything moves: dirty rate over QMP, a sample of its RAM.

:func:`measure` asks the source QEMU for the dirty rate (``calc-dirty-rate`` in
``page-sampling`` mode, the one QEMU 7.2 supports under TCG: the ``dirty-bitmap``
mode kills the VM there) and, when the guest's RAM is in a file this process can
map, samples pages from it: the share of zero pages (sent as flags, not data), how
well the rest compresses with zstd and how fast, and how many bytes xbzrle would
send for the sampled pages that changed during the dirty-rate window. The result
is a :class:`~migrate.plan.forecasting.Measurement`, what
:func:`~migrate.plan.forecasting.forecast` takes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from dirtytrack.errors import RamMappingError
from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.errors import QemuError
from migrate.plan.forecasting import Measurement, RamSample
from migrate.qmp import QmpSession

MIB = 1 << 20
#: calc-dirty-rate's largest sample (pages per GiB): 512 pages of a 128 MiB guest.
SAMPLE_PAGES_PER_GIB = 4096
#: QEMU's xbzrle encoding: a page goes plain once the encoding would not be shorter.
XBZRLE_HEADER = 3


async def measure_dirty_rate(
    source: QmpSession, ram_bytes: int, calc_time_s: int = 1, timeout_s: float = 10.0
) -> tuple[float, str]:
    """Dirty rate in bytes/s from ``calc-dirty-rate`` page-sampling, and how it was got.

    Never uses ``dirty-bitmap`` mode (it segfaults QEMU 7.2 under TCG). Raises
    :class:`QemuError` if QEMU refuses or does not finish within ``timeout_s``.
    """
    await source.execute(
        "calc-dirty-rate",
        {"calc-time": calc_time_s, "sample-pages": SAMPLE_PAGES_PER_GIB, "mode": "page-sampling"},
    )
    deadline = time.monotonic() + calc_time_s + timeout_s
    while True:
        result = await source.execute("query-dirty-rate")
        if result.get("status") == "measured":
            break
        if time.monotonic() > deadline:
            raise QemuError("calc-dirty-rate did not finish", command="query-dirty-rate")
        await asyncio.sleep(0.05)
    method = (
        f"calc-dirty-rate page-sampling over {calc_time_s} s "
        f"({qemu_sample_pages(ram_bytes)} pages sampled)"
    )
    return float(result.get("dirty-rate", 0)) * MIB, method


def _pick_pages(page_count: int, count: int, seed: int) -> npt.NDArray[np.intp]:
    rng = np.random.default_rng(seed)
    count = min(count, page_count)
    return np.sort(rng.choice(page_count, size=count, replace=False)).astype(np.intp)


def read_pages(ram: RamMapping, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """A copy of the chosen pages (rows of 512 words)."""
    return np.array(ram.pages()[pages])


def xbzrle_size(old: npt.NDArray[np.uint64], new: npt.NDArray[np.uint64]) -> int:
    """Bytes QEMU's xbzrle would send for ``new`` encoded against ``old`` (one page).

    The encoding alternates unchanged-run and changed-run lengths (ULEB128) with the
    changed bytes; this counts runs of differing bytes, a close upper bound.
    Returns a page's size plus header when the encoding would not be shorter.
    """
    diff = old.view(np.uint8) != new.view(np.uint8)
    changed = int(diff.sum())
    if changed == 0:
        return 0
    # Run boundaries; every run's length is a ULEB128 (1 byte below 128, else 2).
    bounds = np.flatnonzero(np.diff(diff.astype(np.int8))) + 1
    lengths = np.diff(np.concatenate(([0], bounds, [len(diff)])))
    size = changed + int(np.where(lengths < 128, 1, 2).sum())
    return size if size < PAGE_SIZE else PAGE_SIZE + XBZRLE_HEADER


def read_sample(path: Path, pages: int = 2048, seed: int = 1) -> npt.NDArray[np.uint64]:
    """A copy of ``pages`` pages of a RAM file, the same pages for the same arguments.

    Blocking: call it in a thread. Raises :class:`RamMappingError`.
    """
    with RamMapping(path) as ram:
        return read_pages(ram, _pick_pages(ram.page_count, pages, seed))


def sample_from(
    copy: npt.NDArray[np.uint64], before: npt.NDArray[np.uint64] | None = None
) -> RamSample:
    """What the sampled pages ``copy`` show (``before``: an earlier copy of them).

    With ``before`` the xbzrle ratio of the changed pages is estimated too.
    """
    nonzero = copy[np.any(copy != 0, axis=1)]
    zero_fraction = 1.0 - len(nonzero) / max(1, len(copy))
    raw = nonzero.tobytes()
    start = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=1).compress(raw) if raw else b""
    spent = time.perf_counter() - start
    zstd_ratio = len(raw) / len(packed) if packed else 1.0
    speed = len(raw) / spent if raw and spent > 0 else 0.0
    xbzrle_ratio = changed_fraction = changed_ratio = None
    if before is not None and before.shape == copy.shape:
        changed = np.flatnonzero(np.any(before != copy, axis=1))
        changed_fraction = len(changed) / max(1, len(copy))
        if len(changed):
            encoded = sum(xbzrle_size(before[i], copy[i]) for i in changed)
            xbzrle_ratio = len(changed) * PAGE_SIZE / max(1, encoded)
            hot = copy[changed].tobytes()
            changed_ratio = max(
                1.0, len(hot) / len(zstandard.ZstdCompressor(level=1).compress(hot))
            )
    return RamSample(
        pages=len(copy),
        zero_fraction=zero_fraction,
        zstd_ratio=max(1.0, zstd_ratio),
        zstd_bytes_per_s=speed,
        xbzrle_ratio=xbzrle_ratio,
        changed_fraction=changed_fraction,
        zstd_changed_ratio=changed_ratio,
    )


async def measure(
    source: QmpSession, ram_path: Path | None, calc_time_s: int = 1,
    sample_pages: int | None = None,
) -> Measurement:  # fmt: skip
    """Measure the running source VM (takes ``calc_time_s`` seconds).

    QEMU's ``calc-dirty-rate`` runs for ``calc_time_s``. When ``ram_path`` is
    mappable, a sample of its pages (``sample_pages``, by default at least as many
    as QEMU samples) is read at the start, the middle and the end of that window:
    zero pages and compression come from it, xbzrle is judged on the pages that
    changed, and the dirty rate and writable working set come from the two halves
    (:func:`dirty_rate_and_working_set`) instead of QEMU's rounded figure. Raises
    :class:`QemuError` if the dirty-rate measurement fails.
    """
    started = time.monotonic()
    size = await source.execute("query-memory-size-summary")
    ram_bytes = int(size["base-memory"])
    pages = sample_pages or max(2048, qemu_sample_pages(ram_bytes))
    copies: list[tuple[float, npt.NDArray[np.uint64]]] = []

    async def read() -> None:
        # A copy of the sample; once the file fails, no sample at all.
        nonlocal ram_path
        if ram_path is None:
            return
        try:
            copy = await asyncio.to_thread(read_sample, ram_path, pages)
        except RamMappingError:
            ram_path = None
            copies.clear()
            return
        copies.append((time.monotonic(), copy))

    await read()
    status = await source.status()
    working_set = None
    if status == "running":
        qemu = asyncio.create_task(measure_dirty_rate(source, ram_bytes, calc_time_s))
        if ram_path is not None:
            await asyncio.sleep(calc_time_s / 2)
            await read()
        rate, method = await qemu
    else:
        rate, method = 0.0, f"VM {status}: nothing dirties its memory"
    await read()
    sample = None
    if len(copies) >= 2:
        sample = await asyncio.to_thread(sample_from, copies[-1][1], copies[0][1])
    if len(copies) == 3:
        (t0, c0), (_, c1), (t2, c2) = copies
        own, working_set = dirty_rate_and_working_set(c0, c1, c2, t2 - t0, ram_bytes)
        method = (
            f"RAM sample ({pages} pages, two {(t2 - t0) / 2:.1f} s windows); "
            f"{method} said {rate / MIB:g} MiB/s"
        )
        rate = own
    return Measurement(
        ram_bytes=ram_bytes,
        dirty_rate_bytes_per_s=rate,
        dirty_rate_method=method,
        sample=sample,
        measure_time_ms=(time.monotonic() - started) * 1e3,
        working_set_bytes=working_set,
    )


def dirty_rate_and_working_set(
    first: npt.NDArray[np.uint64], middle: npt.NDArray[np.uint64], last: npt.NDArray[np.uint64],
    window_s: float, ram_bytes: int,
) -> tuple[float, int | None]:  # fmt: skip
    """Dirty rate (bytes/s) and writable working set (bytes) from three reads of a sample.

    ``first``, ``middle`` and ``last`` are the same sampled pages at the start, the
    middle and the end of ``window_s``. The rate is the pages changed per half-window
    (QEMU's page-sampling method without its rounding to whole MB/s, which reads a
    128 MiB guest's few dirty samples as 0, 1, 2 or 3 MiB/s). The working set is the
    capture-recapture (Chapman) estimate from the pages changed in both halves: a
    guest that rewrites the same hot pages dirties far fewer distinct pages in a
    10 s round than ten times its 1 s rate. ``None`` when no page changed in both
    halves (no sign of a bound).
    """
    a = np.any(first != middle, axis=1)
    b = np.any(middle != last, axis=1)
    n_a, n_b, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    page_bytes = ram_bytes / max(1, len(first))
    rate = (n_a + n_b) * page_bytes / window_s if window_s > 0 else 0.0
    if both == 0:
        return rate, None
    estimate = (n_a + 1) * (n_b + 1) / (both + 1) - 1
    pages = min(len(first), max(estimate, n_a, n_b))
    return rate, int(pages * page_bytes)


def qemu_sample_pages(ram_bytes: int) -> int:
    """How many pages ``calc-dirty-rate`` samples of ``ram_bytes`` of guest RAM."""
    return min(max(1, ram_bytes * SAMPLE_PAGES_PER_GIB // (1 << 30)), ram_bytes // PAGE_SIZE)

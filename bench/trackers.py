"""Benchmark of dirty-page trackers and zstd page compression (not a test).

For each RAM size it builds a synthetic guest image (~40 % zero pages, the rest
random, text-like and sparse "kernel structure" pages) in a ``/dev/shm`` file, as
QEMU's ``memory-backend-file,share=on`` would, and measures:

- dirty-scan throughput of each tracker on one core (a ``collect`` over all of RAM
  with ~1 % of pages dirtied), and the aggregate of two threads scanning halves
  (shows which trackers release the GIL);
- the tracker's memory overhead and its baseline set-up time;
- soft-dirty: the probe's verdict on this kernel;
- a vectorised numpy page hash (multiply/xorshift/sum) as the alternative to
  per-page xxh3 the page-digest tracker could use.

Once, on a sample of non-zero pages (the content mix is the same for every size):
zstd compression ratio and single-thread MB/s per level, per 4 KiB page and per
64 KiB batch, with content checksums on as pagestream sends them.

    python -m bench.trackers --out DIR [--sizes 256M,1G,4G] [--repeats 5]

writes ``DIR/trackers.json`` and ``DIR/trackers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

from dirtytrack.errors import TrackerUnavailable
from dirtytrack.ram import PAGE_SIZE, WORDS_PER_PAGE, RamMapping
from dirtytrack.trackers import (
    Baseline,
    PageArray,
    PageDigestTracker,
    ShadowDiffTracker,
    Tracker,
    probe_soft_dirty,
)
from migrate import cli_args

MIB: Final = 1 << 20
GIB: Final = 1 << 30
GB: Final = 1e9
ZSTD_LEVELS: Final = (-7, -3, -1, 1, 3, 6, 9)
BATCH_PAGES: Final = 16  # 64 KiB
GENERATE_CHUNK_PAGES: Final = 16384  # 64 MiB at a time


# --- synthetic guest RAM ------------------------------------------------------------


@dataclass(frozen=True)
class ContentMix:
    """Fractions of page kinds in the synthetic image."""

    zero: float = 0.40
    random: float = 0.20
    text: float = 0.25
    sparse: float = 0.15


def _text_pool(rng: np.random.Generator, size: int) -> npt.NDArray[np.uint8]:
    """Log-like text: Zipf-distributed words from a 2000-word vocabulary."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocabulary = [
        bytes(rng.choice(letters, size=int(rng.integers(2, 11)))).decode() for _ in range(2000)
    ]
    ranks = np.minimum(rng.zipf(1.3, size=size // 4), len(vocabulary)) - 1
    words: list[str] = []
    for position, rank in enumerate(ranks.tolist()):
        words.append(vocabulary[rank])
        words.append("\n" if position % 12 == 11 else " ")
    pool = np.frombuffer("".join(words).encode(), dtype=np.uint8)
    return pool[:size].copy()


def fill_guest_image(
    pages: PageArray, mix: ContentMix, rng: np.random.Generator
) -> npt.NDArray[np.int8]:
    """Write the synthetic content into ``pages``; returns each page's kind (0-3)."""
    count = len(pages)
    kinds = rng.choice(4, size=count, p=[mix.zero, mix.random, mix.text, mix.sparse]).astype(
        np.int8
    )
    pool = _text_pool(rng, 8 * MIB)
    as_bytes = pages.reshape(count, -1).view(np.uint8)
    for start in range(0, count, GENERATE_CHUNK_PAGES):
        end = min(start + GENERATE_CHUNK_PAGES, count)
        chunk_kinds = kinds[start:end]
        rows = pages[start:end]
        rows[chunk_kinds == 0] = 0
        random_rows = np.flatnonzero(chunk_kinds == 1)
        rows[random_rows] = rng.integers(
            0, np.iinfo(np.uint64).max, size=(len(random_rows), WORDS_PER_PAGE), dtype=np.uint64
        )
        text_rows = np.flatnonzero(chunk_kinds == 2)
        offsets = rng.integers(0, len(pool) - PAGE_SIZE, size=len(text_rows))
        gather = offsets[:, None] + np.arange(PAGE_SIZE)[None, :]
        as_bytes[start + text_rows] = pool[gather]
        sparse_rows = np.flatnonzero(chunk_kinds == 3)
        rows[sparse_rows] = 0
        # A few small integers and pointers per page, like page tables or structs.
        for _ in range(24):
            words = rng.integers(0, WORDS_PER_PAGE, size=len(sparse_rows))
            values = rng.integers(0, 1 << 48, size=len(sparse_rows), dtype=np.uint64)
            rows[sparse_rows, words] = values
    return kinds


@dataclass
class GuestImage:
    """A RAM file in /dev/shm (or an anonymous array), removed on close."""

    size_bytes: int
    backing: str
    path: Path | None = None
    mapping: RamMapping | None = None
    array: PageArray | None = None

    def pages(self) -> PageArray:
        if self.mapping is not None:
            return self.mapping.pages()
        assert self.array is not None
        return self.array

    def close(self) -> None:
        try:
            if self.mapping is not None:
                self.mapping.close()
        except BufferError:
            # Arrays still view the mapping (e.g. frames of a traceback being
            # raised); the mmap is unmapped when they go, the file goes now.
            self.mapping = None
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)


def make_guest_image(size_bytes: int, backing: str) -> GuestImage:
    if backing == "anon":
        return GuestImage(
            size_bytes,
            backing,
            array=np.zeros((size_bytes // PAGE_SIZE, WORDS_PER_PAGE), dtype=np.uint64),
        )
    fd, name = tempfile.mkstemp(prefix="livemig-bench-", dir="/dev/shm")
    image = GuestImage(size_bytes, backing, path=Path(name))
    try:
        os.ftruncate(fd, size_bytes)
        os.close(fd)
        # populate: a fresh mapping otherwise pays a page fault per page on its
        # first full read, which would be counted as scan time.
        image.mapping = RamMapping(name, writable=True, populate=True)
        image.mapping.open()
        return image
    except BaseException:
        image.close()
        raise


# --- measurements ---------------------------------------------------------------------


@dataclass(frozen=True)
class ScanResult:
    """One tracker on one RAM size."""

    tracker: str
    available: bool
    reason: str = ""
    setup_s: float = 0.0
    collect_s_best: float = 0.0
    collect_s_median: float = 0.0
    gb_per_s_one_core: float = 0.0
    gb_per_s_two_threads: float = 0.0
    memory_overhead_bytes: int = 0
    dirty_pages_found: int = 0
    dirty_pages_written: int = 0


@dataclass(frozen=True)
class SizeResult:
    size_bytes: int
    page_count: int
    zero_pages: int
    generate_s: float
    trackers: list[ScanResult] = field(default_factory=list)


@dataclass(frozen=True)
class ZstdResult:
    level: int
    unit: str  # "4KiB" or "64KiB"
    ratio: float
    compress_mb_per_s: float
    decompress_mb_per_s: float


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def dirty_some(pages: PageArray, fraction: float, rng: np.random.Generator) -> int:
    count = max(1, int(len(pages) * fraction))
    chosen = rng.choice(len(pages), size=count, replace=False)
    words = rng.integers(0, WORDS_PER_PAGE, size=count)
    pages[chosen, words] ^= np.uint64(0x5A5A_0000_0001)
    return count


def measure_tracker(
    name: str,
    factory: Callable[[PageArray], Tracker],
    pages: PageArray,
    repeats: int,
    dirty_fraction: float,
    rng: np.random.Generator,
) -> ScanResult:
    holder: list[Tracker] = []
    setup = _timed(lambda: holder.append(factory(pages)))
    tracker = holder[0]
    try:
        written = dirty_some(pages, dirty_fraction, rng)
        found = tracker.collect().popcount()
        times = [_timed(tracker.collect) for _ in range(repeats)]
        overhead = tracker.memory_overhead_bytes
    finally:
        tracker.close()
    two_threads = _two_thread_rate(factory, pages, repeats)
    best = min(times)
    return ScanResult(
        tracker=name,
        available=True,
        setup_s=setup,
        collect_s_best=best,
        collect_s_median=statistics.median(times),
        gb_per_s_one_core=pages.nbytes / best / GB,
        gb_per_s_two_threads=two_threads,
        memory_overhead_bytes=overhead,
        dirty_pages_found=found,
        dirty_pages_written=written,
    )


def _two_thread_rate(
    factory: Callable[[PageArray], Tracker], pages: PageArray, repeats: int
) -> float:
    """Aggregate GB/s of two trackers, one per half of RAM, collecting concurrently."""
    half = len(pages) // 2
    trackers = [factory(pages[:half]), factory(pages[half:])]
    try:
        best = float("inf")
        for _ in range(repeats):
            barrier = threading.Barrier(2)

            def run(tracker: Tracker, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                tracker.collect()

            threads = [threading.Thread(target=run, args=(t,)) for t in trackers]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            best = min(best, time.perf_counter() - start)
        return pages.nbytes / best / GB
    finally:
        for tracker in trackers:
            tracker.close()


def vectorised_hash(pages: PageArray, chunk_pages: int = 256) -> npt.NDArray[np.uint64]:
    """Per-page hash from numpy only: sum over words of mix(word * k_i).

    Each word goes through a bijection that differs per position (multiply by an
    odd constant, xorshift, multiply again), so a change confined to one word is
    always detected; multi-word changes rely on the mix. Measured here against
    xxh3; not used by the tracker (slower).
    """
    keys = np.random.default_rng(12345).integers(
        0, np.iinfo(np.uint64).max, size=(2, WORDS_PER_PAGE), dtype=np.uint64
    ) | np.uint64(1)
    out = np.empty(len(pages), dtype=np.uint64)
    mixed = np.empty((chunk_pages, WORDS_PER_PAGE), dtype=np.uint64)
    shifted = np.empty_like(mixed)
    for start in range(0, len(pages), chunk_pages):
        end = min(start + chunk_pages, len(pages))
        m, s = mixed[: end - start], shifted[: end - start]
        np.multiply(pages[start:end], keys[0], out=m)
        np.right_shift(m, np.uint64(29), out=s)
        np.bitwise_xor(m, s, out=m)
        np.multiply(m, keys[1], out=m)
        out[start:end] = m.sum(axis=1, dtype=np.uint64)
    return out


def measure_vectorised_hash(pages: PageArray, repeats: int) -> ScanResult:
    times = [_timed(lambda: vectorised_hash(pages)) for _ in range(repeats)]
    best = min(times)
    return ScanResult(
        tracker="numpy-mix-hash (candidate)",
        available=True,
        reason="not used: slower than per-page xxh3",
        collect_s_best=best,
        collect_s_median=statistics.median(times),
        gb_per_s_one_core=pages.nbytes / best / GB,
        memory_overhead_bytes=8 * len(pages),
    )


def measure_soft_dirty() -> ScanResult:
    try:
        probe_soft_dirty()
    except TrackerUnavailable as exc:
        return ScanResult(tracker="soft-dirty", available=False, reason=str(exc))
    return ScanResult(
        tracker="soft-dirty",
        available=True,
        reason="probe passed; scan cost needs a QEMU process (not measured here)",
    )


def zstd_sample(pages: PageArray, kinds: npt.NDArray[np.int8], sample_bytes: int) -> bytes:
    """Non-zero pages in batches of 16 consecutive pages, as a sender would see them."""
    nonzero = np.flatnonzero(kinds != 0)
    wanted = min(sample_bytes // PAGE_SIZE, len(nonzero))
    wanted -= wanted % BATCH_PAGES
    rng = np.random.default_rng(99)
    starts = rng.choice(len(nonzero) - BATCH_PAGES, size=wanted // BATCH_PAGES, replace=False)
    picked = nonzero[(np.sort(starts)[:, None] + np.arange(BATCH_PAGES)[None, :]).ravel()]
    sample: bytes = pages[picked].tobytes()
    return sample


def measure_zstd(sample: bytes, levels: Sequence[int]) -> list[ZstdResult]:
    results: list[ZstdResult] = []
    view = memoryview(sample)
    for unit, unit_bytes in (("4KiB", PAGE_SIZE), ("64KiB", BATCH_PAGES * PAGE_SIZE)):
        pieces = [view[off : off + unit_bytes] for off in range(0, len(view), unit_bytes)]
        for level in levels:
            compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
            decompressor = zstandard.ZstdDecompressor()
            compressed: list[bytes] = []
            start = time.perf_counter()
            for piece in pieces:
                compressed.append(compressor.compress(piece))
            compress_s = time.perf_counter() - start
            start = time.perf_counter()
            for frame in compressed:
                decompressor.decompress(frame)
            decompress_s = time.perf_counter() - start
            wire = sum(len(frame) for frame in compressed)
            results.append(
                ZstdResult(
                    level=level,
                    unit=unit,
                    ratio=len(sample) / wire,
                    compress_mb_per_s=len(sample) / compress_s / 1e6,
                    decompress_mb_per_s=len(sample) / decompress_s / 1e6,
                )
            )
    return results


# --- driver and report ------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096K`` or bytes; must be a positive multiple of 2 pages."""
    units = {"K": 1 << 10, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    if value <= 0 or value % (2 * PAGE_SIZE):
        raise argparse.ArgumentTypeError(f"size {text} is not a positive multiple of 8 KiB")
    return value


def _measure_size(
    image: GuestImage,
    repeats: int,
    dirty_fraction: float,
    zstd_sample_bytes: int,
    rng: np.random.Generator,
    log: Callable[[str], None],
) -> tuple[SizeResult, bytes]:
    """Fill one image and scan it with every tracker; every view of it dies here."""
    label = f"{image.size_bytes / MIB:.0f} MiB"
    log(f"{label}: generating content")
    pages = image.pages()
    start = time.perf_counter()
    kinds = fill_guest_image(pages, ContentMix(), rng)
    result = SizeResult(
        image.size_bytes, len(pages), int((kinds == 0).sum()), time.perf_counter() - start
    )
    log(f"{label}: shadow diff")
    result.trackers.append(
        measure_tracker(
            "shadow-diff",
            lambda p: ShadowDiffTracker(p, baseline=Baseline.LIVE),
            pages,
            repeats,
            dirty_fraction,
            rng,
        )
    )
    log(f"{label}: page digests")
    result.trackers.append(
        measure_tracker(
            "page-digests",
            lambda p: PageDigestTracker(p, baseline=Baseline.LIVE),
            pages,
            repeats,
            dirty_fraction,
            rng,
        )
    )
    log(f"{label}: numpy hash candidate")
    result.trackers.append(measure_vectorised_hash(pages, repeats))
    return result, zstd_sample(pages, kinds, zstd_sample_bytes)


def run(
    sizes: Sequence[int],
    repeats: int,
    dirty_fraction: float,
    zstd_sample_bytes: int,
    backing: str,
    log: Callable[[str], None],
) -> dict[str, object]:
    rng = np.random.default_rng(2026)
    size_results: list[SizeResult] = []
    zstd_results: list[ZstdResult] = []
    soft_dirty = measure_soft_dirty()
    for size in sizes:
        image = make_guest_image(size, backing)
        try:
            result, sample = _measure_size(
                image, repeats, dirty_fraction, zstd_sample_bytes, rng, log
            )
        finally:
            image.close()
        result.trackers.append(soft_dirty)
        size_results.append(result)
        if not zstd_results:
            log(f"zstd on {len(sample) / MIB:.0f} MiB of non-zero pages")
            zstd_results = measure_zstd(sample, ZSTD_LEVELS)
    return {
        "host": _host_info(),
        "settings": {
            "repeats": repeats,
            "dirty_fraction": dirty_fraction,
            "backing": backing,
            "content_mix": asdict(ContentMix()),
            "zstd_sample_bytes": zstd_sample_bytes,
            "zstd_checksum": True,
        },
        "sizes": [asdict(result) for result in size_results],
        "zstd": [asdict(result) for result in zstd_results],
    }


def _host_info() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = "unknown"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
    }


def render_markdown(report: dict[str, object]) -> str:
    host = report["host"]
    assert isinstance(host, dict)
    lines = [
        "# Dirty-tracker and zstd benchmark",
        "",
        f"Host: {host['cpu']}, {host['cores']} cores, kernel {host['kernel']}, "
        f"numpy {host['numpy']}, zstandard {host['zstandard']}.",
        "",
        "## Dirty scan (collect over all RAM, ~1 % of pages dirty)",
        "",
        "| RAM | tracker | GB/s 1 core | GB/s 2 threads | collect best / median | "
        "setup | memory overhead | found / written |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = report["sizes"]
    assert isinstance(sizes, list)
    for size in sizes:
        ram = _size_label(size["size_bytes"])
        for scan in size["trackers"]:
            if not scan["available"]:
                lines.append(f"| {ram} | {scan['tracker']} | unavailable: {scan['reason']} ||||||")
                continue
            two = f"{scan['gb_per_s_two_threads']:.1f}" if scan["gb_per_s_two_threads"] else "-"
            found = (
                f"{scan['dirty_pages_found']} / {scan['dirty_pages_written']}"
                if scan["dirty_pages_written"]
                else "-"
            )
            setup = f"{scan['setup_s'] * 1e3:.0f} ms" if scan["setup_s"] else "-"
            lines.append(
                f"| {ram} | {scan['tracker']} | {scan['gb_per_s_one_core']:.1f} | {two} | "
                f"{scan['collect_s_best'] * 1e3:.1f} / {scan['collect_s_median'] * 1e3:.1f} ms | "
                f"{setup} | {_size_label(scan['memory_overhead_bytes'])} | {found} |"
            )
    settings = report["settings"]
    assert isinstance(settings, dict)
    lines += [
        "",
        f"## zstd on {_size_label(settings['zstd_sample_bytes'])} of non-zero pages "
        "(one thread, content checksum on)",
        "",
        "| level | unit | ratio | compress MB/s | decompress MB/s |",
        "|---:|---|---:|---:|---:|",
    ]
    zstd_rows = report["zstd"]
    assert isinstance(zstd_rows, list)
    for row in zstd_rows:
        lines.append(
            f"| {row['level']} | {row['unit']} | {row['ratio']:.2f} | "
            f"{row['compress_mb_per_s']:.0f} | {row['decompress_mb_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _size_label(value: int) -> str:
    if value >= GIB:
        return f"{value / GIB:.4g} GiB"
    if value >= MIB:
        return f"{value / MIB:.4g} MiB"
    return f"{value / 1024:.4g} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trackers", description=__doc__)
    parser.add_argument(
        "--out", type=cli_args.out_dir, required=True, help="directory for JSON + Markdown"
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        default=[256 * MIB, GIB, 4 * GIB],
        help="comma-separated RAM sizes, e.g. 256M,1G,4G",
    )
    parser.add_argument("--repeats", type=cli_args.int_in(1, 1000), default=5)
    parser.add_argument("--dirty-fraction", type=cli_args.positive_float(1.0), default=0.01)
    parser.add_argument("--zstd-sample", type=parse_size, default=64 * MIB)
    parser.add_argument("--backing", choices=["shm", "anon"], default="shm")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run(args.sizes, args.repeats, args.dirty_fraction, args.zstd_sample, args.backing, log)
    (args.out / "trackers.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "trackers.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

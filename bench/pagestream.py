"""pagestream benchmark: scan, compression, bytes and downtime against native (not a test).

    python -m bench.pagestream --out DIR [--sizes 256M,1G,4G] [--repeats 3]
                               [--bandwidth-mbit 200] [--workload openssl+dirty:8]

For each guest RAM size it reports:

1. dirty-scan throughput of each tracker, on synthetic RAM images of that size
   (:mod:`bench.trackers`, reused as is: its tables are embedded);
2. zstd ratio and MB/s per level: on bench.trackers' synthetic page mix and on a
   sample of the real guest's non-zero RAM, encoded the way pagestream sends it
   (64-page frames, content checksums, zero pages as flags);
3. live migrations of the test guest between the lab's hosts over a tbf-capped
   migration link, native and pagestream interleaved (same guest, same policy):
   total time, guest-visible downtime (ICMP probe), STOP -> RESUME, bytes on the
   link (kernel counters), rounds, integrity, pages repaired.

The guest runs ``openssl+dirty:8`` with a memdirty working set of a quarter of its
RAM (so a bigger guest really holds more data; memdirty pages are hash patterns,
incompressible), capped at what TCG fills in reasonable time. Writes
``DIR/pagestream.json`` and ``DIR/pagestream.md``. The 2 cores may be shared with
other work: medians are reported with the load average seen before each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench import trackers as tracker_bench
from dirtytrack.ram import PAGE_SIZE, RamMapping
from lab.demo import DemoConfig, DemoHooks, Workload, run_demo
from lab.qemu import QemuProcess
from migrate import cli_args
from migrate.pagestream.protocol import FrameReader, Hello, bytes_source, encode_hello, encode_pages
from migrate.pagestream.tuning import LEVELS, level_label

MIB: Final = 1 << 20
GIB: Final = 1 << 30
FRAME_PAGES: Final = 64
STRATEGIES: Final = ("native", "pagestream")


# --- zstd on real guest RAM, as pagestream frames it ---------------------------------


@dataclass(frozen=True)
class LevelResult:
    """One zstd level on a RAM sample in pagestream frames (one thread)."""

    level: str
    ratio: float
    encode_mb_per_s: float
    decode_mb_per_s: float
    sample_bytes: int


def ram_sample(path: Path, limit_bytes: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """Up to ``limit_bytes`` of the non-zero pages of a RAM file, in page order."""
    with RamMapping(path) as ram:
        pages = ram.pages()
        nonzero = np.flatnonzero(pages.any(axis=1))
        limit = limit_bytes // PAGE_SIZE
        if len(nonzero) > limit:
            # Evenly spread runs of FRAME_PAGES, so frames still hold neighbours.
            starts = np.linspace(0, len(nonzero) - FRAME_PAGES, limit // FRAME_PAGES).astype(int)
            nonzero = nonzero[(starts[:, None] + np.arange(FRAME_PAGES)[None, :]).ravel()]
        sample = np.array(pages[nonzero])
        del pages
    return sample


def measure_levels(sample: np.ndarray[Any, np.dtype[np.uint64]]) -> list[LevelResult]:
    numbers = np.arange(len(sample), dtype=np.int64)
    hello = encode_hello(Hello(PAGE_SIZE, len(sample), bytes(16)))
    results = []
    for level in LEVELS:
        frames: list[bytes] = []
        start = time.perf_counter()
        for first in range(0, len(sample), FRAME_PAGES):
            chunk = numbers[first : first + FRAME_PAGES]
            frames.append(encode_pages(1, chunk, sample[chunk], level).frames)
        encode_s = time.perf_counter() - start
        stream = hello + b"".join(frames)
        reader = FrameReader(bytes_source(stream))
        start = time.perf_counter()
        while reader.next() is not None:
            pass
        decode_s = time.perf_counter() - start
        results.append(
            LevelResult(
                level=level_label(level),
                ratio=sample.nbytes / (len(stream) - len(hello)),
                encode_mb_per_s=sample.nbytes / encode_s / 1e6,
                decode_mb_per_s=sample.nbytes / decode_s / 1e6,
                sample_bytes=sample.nbytes,
            )
        )
    return results


# --- live migrations ------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationRun:
    """One migration of the test guest; times in ms, sizes in bytes."""

    size_mib: int
    strategy: str
    repeat: int
    status: str
    loadavg_1m: float
    total_time_ms: float
    guest_downtime_ms: float | None
    stop_to_resume_ms: float | None
    qemu_downtime_ms: float | None
    wire_bytes: int | None
    transferred_bytes: int
    rounds: int
    integrity: str
    repaired_pages: int
    guest_check: str | None
    error: str | None
    stream: dict[str, Any] | None = None


@dataclass
class _Sampler:
    """Takes one RAM sample from the source before the first pagestream run."""

    limit_bytes: int
    sample: np.ndarray[Any, np.dtype[np.uint64]] | None = None

    async def before_migration(self, source: QemuProcess, _target: QemuProcess) -> None:
        if self.sample is None and source.ram_path is not None:
            self.sample = await asyncio.to_thread(ram_sample, source.ram_path, self.limit_bytes)


def dirty_mib_for(size_mib: int, cap_mib: int) -> int:
    return max(16, min(size_mib // 4, cap_mib))


async def migrate_once(
    size_mib: int,
    strategy: str,
    repeat: int,
    workload: Workload,
    bandwidth_mbit: float | None,
    dirty_cap_mib: int,
    hooks: DemoHooks,
) -> MigrationRun:
    config = DemoConfig(
        strategy=strategy,
        workload=workload,
        memory_mib=size_mib,
        dirty_mib=dirty_mib_for(size_mib, dirty_cap_mib),
        bandwidth_mbit=bandwidth_mbit,
        warmup_s=2.0,
    )
    load = os.getloadavg()[0]
    report = (await run_demo(config, hooks=hooks)).report
    stream = None
    if report.stream is not None:
        s = report.stream
        stream = {
            "tracker": s.tracker,
            "rounds": s.rounds,
            "compression_ratio": s.compression_ratio,
            "raw_bytes": s.raw_bytes,
            "stream_bytes": s.stream_bytes,
            "device_state_bytes": s.device_state_bytes,
            "zero_pages_skipped": s.zero_pages_skipped,
            "zstd_batches": s.zstd_batches,
            "final_level": s.final_level,
            "final_round_pages": s.final_round_pages,
            "final_scan_ms": s.final_scan_ms,
            "final_round_ms": s.final_round_ms,
            "scan_ms_total": s.scan_ms_total,
            "switchover_ms": s.switchover_ms,
        }
    return MigrationRun(
        size_mib=size_mib,
        strategy=strategy,
        repeat=repeat,
        status=str(report.status),
        loadavg_1m=load,
        total_time_ms=report.total_time_ms,
        guest_downtime_ms=report.guest_downtime_ms,
        stop_to_resume_ms=report.timeline.stop_to_resume_ms,
        qemu_downtime_ms=report.downtime_ms,
        wire_bytes=report.wire_bytes,
        transferred_bytes=report.transferred_bytes,
        rounds=report.precopy_rounds,
        integrity=str(report.integrity),
        repaired_pages=report.repaired_pages,
        guest_check=report.guest_check,
        error=report.error,
        stream=stream,
    )


@dataclass
class BenchSettings:
    sizes_mib: list[int]
    repeats: int
    bandwidth_mbit: float | None
    workload: str
    dirty_cap_mib: int
    scan_repeats: int
    sample_bytes: int
    skip_trackers: bool = False
    notes: list[str] = field(default_factory=list)


async def run_migrations(
    settings: BenchSettings, log: Callable[[str], None]
) -> tuple[list[MigrationRun], list[LevelResult]]:
    workload = Workload.parse(settings.workload)
    runs: list[MigrationRun] = []
    levels: list[LevelResult] = []
    for size in settings.sizes_mib:
        sampler = _Sampler(settings.sample_bytes)
        hooks = DemoHooks(before_migration=sampler.before_migration)
        for repeat in range(settings.repeats):
            # Alternate which strategy goes first, so drift in load hits both.
            order = STRATEGIES if repeat % 2 == 0 else STRATEGIES[::-1]
            for strategy in order:
                log(f"{size} MiB, {strategy}, run {repeat + 1}/{settings.repeats}")
                run = await migrate_once(
                    size, strategy, repeat, workload, settings.bandwidth_mbit,
                    settings.dirty_cap_mib, hooks,
                )  # fmt: skip
                log(
                    f"  {run.status}: total {run.total_time_ms:.0f} ms, guest downtime "
                    f"{_num(run.guest_downtime_ms)} ms, wire {_mb(run.wire_bytes)} MB, "
                    f"integrity {run.integrity}, repaired {run.repaired_pages}"
                )
                runs.append(run)
        if sampler.sample is not None and not levels:
            log(f"zstd levels on {sampler.sample.nbytes / MIB:.0f} MiB of the guest's RAM")
            levels = await asyncio.to_thread(measure_levels, sampler.sample)
    return runs, levels


# --- report ---------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: Sequence[MigrationRun]) -> list[dict[str, Any]]:
    rows = []
    for size in sorted({r.size_mib for r in runs}):
        for strategy in STRATEGIES:
            mine = [r for r in runs if r.size_mib == size and r.strategy == strategy]
            if not mine:
                continue
            done = [r for r in mine if r.status == "completed"]
            rows.append(
                {
                    "size_mib": size,
                    "strategy": strategy,
                    "runs": len(mine),
                    "completed": len(done),
                    "integrity_ok": sum(r.integrity == "ok" for r in done),
                    "repaired_pages_max": max((r.repaired_pages for r in done), default=0),
                    "total_time_ms": _median([r.total_time_ms for r in done]),
                    "guest_downtime_ms": _median([r.guest_downtime_ms for r in done]),
                    "guest_downtime_ms_range": (_range([r.guest_downtime_ms for r in done])),
                    "stop_to_resume_ms": _median([r.stop_to_resume_ms for r in done]),
                    "wire_bytes": _median([r.wire_bytes for r in done]),
                    "rounds": _median([r.rounds for r in done]),
                    "loadavg_1m": _median([r.loadavg_1m for r in mine]),
                    "final_scan_ms": _median(
                        [r.stream["final_scan_ms"] for r in done if r.stream is not None]
                    ),
                    "compression_ratio": _median(
                        [r.stream["compression_ratio"] for r in done if r.stream is not None]
                    ),
                }
            )
    return rows


def _range(values: Sequence[float | None]) -> list[float]:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else []


def render_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    bandwidth = settings["bandwidth_mbit"]
    lines = [
        "# pagestream benchmark",
        "",
        f"Host: {report['host']['cpu']}, {report['host']['cores']} cores, "
        f"QEMU 7.2 under TCG. Guest workload `{settings['workload']}`, memdirty working "
        f"set = RAM/4 (at most {settings['dirty_cap_mib']} MiB); migration link "
        f"{f'capped at {bandwidth:g} Mbit/s (tbf)' if bandwidth else 'uncapped'}; "
        f"{settings['repeats']} runs per size and strategy, interleaved; medians. "
        "Policy `livemig` for both strategies.",
        "",
    ]
    lines += [f"- {note}" for note in settings["notes"]]
    lines += [
        "",
        "## Live migration: native vs pagestream",
        "",
        "| RAM | strategy | ok / runs | total time | guest downtime (range) | STOP→RESUME "
        "| on the wire | wire vs native | rounds | final scan | ratio | repaired | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = report["summary"]
    for row in summary:
        native = next(
            (r for r in summary if r["size_mib"] == row["size_mib"] and r["strategy"] == "native"),
            None,
        )
        versus = "-"
        if native and native["wire_bytes"] and row["wire_bytes"]:
            versus = f"{row['wire_bytes'] / native['wire_bytes']:.2f}x"
        span = row["guest_downtime_ms_range"]
        span_text = f" ({span[0]:.0f}-{span[1]:.0f})" if span else ""
        lines.append(
            f"| {row['size_mib']} MiB | {row['strategy']} | {row['integrity_ok']}/{row['runs']} "
            f"| {_num(row['total_time_ms'], 0)} ms | {_num(row['guest_downtime_ms'], 0)} ms"
            f"{span_text} | {_num(row['stop_to_resume_ms'], 1)} ms | {_mb(row['wire_bytes'])} MB "
            f"| {versus} | {_num(row['rounds'], 0)} | {_num(row['final_scan_ms'], 1)} "
            f"| {_num(row['compression_ratio'], 2)} | {row['repaired_pages_max']} "
            f"| {_num(row['loadavg_1m'], 2)} |"
        )
    lines += [
        "",
        "ok = completed with integrity ok. Guest downtime: longest gap in 1 ms ICMP "
        "replies. STOP→RESUME: QMP event timestamps (for pagestream this is its whole "
        "downtime: it stops the VM itself). On the wire: bytes on the migration link "
        "(kernel counters, both streams). Final scan: pagestream's full-RAM scan with the "
        "VM stopped (ms). Ratio: pagestream's raw/compressed page bytes. Repaired: most "
        "pages any run had to copy from the stopped source after the stream (QEMU 7.2's "
        "TCG dirty-tracking bug; pagestream finds dirty pages by content).",
        "",
        "### Every run",
        "",
        "| RAM | strategy | # | status | total | guest downtime | STOP→RESUME | wire MB "
        "| rounds | integrity | repaired | load |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['size_mib']} MiB | {run['strategy']} | {run['repeat'] + 1} | {run['status']} "
            f"| {run['total_time_ms']:.0f} | {_num(run['guest_downtime_ms'])} "
            f"| {_num(run['stop_to_resume_ms'])} | {_mb(run['wire_bytes'])} | {run['rounds']} "
            f"| {run['integrity']} | {run['repaired_pages']} | {run['loadavg_1m']:.2f} |"
        )
    levels = report["levels"]
    if levels:
        lines += [
            "",
            f"## zstd per level on the guest's own RAM ({levels[0]['sample_bytes'] / MIB:.0f} "
            "MiB of non-zero pages, 64-page frames as pagestream sends them, one thread)",
            "",
            "| level | ratio | encode MB/s | decode MB/s |",
            "|---:|---:|---:|---:|",
        ]
        for row in levels:
            lines.append(
                f"| {row['level']} | {row['ratio']:.2f} | {row['encode_mb_per_s']:.0f} "
                f"| {row['decode_mb_per_s']:.0f} |"
            )
    if report.get("trackers"):
        tracker_md = tracker_bench.render_markdown(report["trackers"])
        lines += ["", "## From bench.trackers (synthetic RAM images)", ""]
        lines += [
            "#" + line if line.startswith("## ") else line for line in tracker_md.splitlines()[2:]
        ]
    return "\n".join(lines) + "\n"


def host_info() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pagestream", description=__doc__)
    parser.add_argument(
        "--out", type=cli_args.out_dir, required=True, help="directory for JSON + Markdown"
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [tracker_bench.parse_size(part) // MIB for part in text.split(",")],
        default=[256, 1024, 4096],
        help="comma-separated guest RAM sizes, e.g. 256M,1G,4G",
    )
    parser.add_argument(
        "--repeats",
        type=cli_args.int_in(1, 1000),
        default=3,
        help="migrations per size and strategy",
    )
    parser.add_argument("--bandwidth-mbit", type=cli_args.MBIT, default=200.0)
    parser.add_argument("--workload", type=cli_args.workload, default="openssl+dirty:8")
    parser.add_argument("--dirty-cap-mib", type=cli_args.MEMORY_MIB, default=1024)
    parser.add_argument("--scan-repeats", type=cli_args.int_in(1, 1000), default=3)
    parser.add_argument("--sample", type=tracker_bench.parse_size, default=64 * MIB)
    parser.add_argument("--skip-trackers", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args(argv)
    settings = BenchSettings(
        sizes_mib=args.sizes,
        repeats=args.repeats,
        bandwidth_mbit=args.bandwidth_mbit or None,
        workload=args.workload,
        dirty_cap_mib=args.dirty_cap_mib,
        scan_repeats=args.scan_repeats,
        sample_bytes=args.sample,
        skip_trackers=args.skip_trackers,
        notes=args.note,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.time()
    trackers = None
    if not settings.skip_trackers:
        trackers = tracker_bench.run(
            [size * MIB for size in settings.sizes_mib],
            settings.scan_repeats,
            0.01,
            settings.sample_bytes,
            "shm",
            log,
        )
    runs, levels = asyncio.run(run_migrations(settings, log))
    report = {
        "host": host_info(),
        "settings": asdict(settings),
        "started_at": started,
        "duration_s": time.time() - started,
        "summary": summarise(runs),
        "runs": [asdict(run) for run in runs],
        "levels": [asdict(level) for level in levels],
        "trackers": trackers,
    }
    (args.out / "pagestream.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "pagestream.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

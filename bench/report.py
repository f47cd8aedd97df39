"""``report.md``: a suite's results as Markdown tables, with the plots linked.

Per comparison: downtime and total time (median, p90, min-max; ratios to the
baseline and to the best raw peer), what each configuration cost (bytes, rounds,
CPU, repaired pages, the guest's OpenSSL throughput), integrity (the engine's RAM
check, the guest's own check, runs that corrupted the guest), and the physical limit
(link bandwidth; non-zero RAM over it as the floor for the total time).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.errors import OutputError, PlotsUnavailable
from bench.results import CORRUPTED, BenchResults, LinkMeasurement, RunResult, check_results_dir
from bench.stats import ComparisonSummary, Distribution, summarize

REPORT_FILE = "report.md"
MIB = float(1 << 20)
DASH = "n/a"


def _num(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def _med(d: Distribution | None, scale: float = 1.0, digits: int = 1) -> str:
    return DASH if d is None else f"{d.median / scale:.{digits}f}"


def _mbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:,.0f} Mbit/s ({bytes_per_s / 1e6:,.0f} MB/s)"


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _link_text(link: LinkMeasurement | None) -> str:
    if link is None:
        return "not measured"
    cap = "uncapped veth" if link.nominal_mbit is None else f"tbf cap {link.nominal_mbit:g} Mbit/s"
    return (
        f"{cap}; one TCP stream measured {_mbps(link.measured_bytes_per_s)}; "
        f"limit used: {_mbps(link.limit_bytes_per_s)}"
    )


def render_report(results: BenchResults, plots: Sequence[Path] = ()) -> str:
    """The Markdown report of ``results``; ``plots`` are linked by file name."""
    env = results.environment
    lines = [f"# livemig benchmark: suite `{results.suite.name}`", ""]
    lines.append(results.suite.description + ".")
    lines.append("")
    lines.append(f"Command: `{results.command}`")
    lines.append("")
    took = (results.finished_at or results.started_at) - results.started_at
    ok = sum(1 for run in results.runs if run.completed)
    lines.append(
        f"Ran {_when(results.started_at)}: {len(results.runs)} runs ({ok} completed) in "
        f"{took / 60:.1f} min (budget {results.suite.budget_s / 60:.0f} min), interleaved "
        "across configurations."
    )
    load_after = "/".join(f"{v:.2f}" for v in env.load_after) if env.load_after else DASH
    lines.append(
        f"Machine: {env.cpu_count} cores, {env.memory_gib:.0f} GiB, Linux {env.host_kernel}, "
        f"{env.qemu_version}, accelerator {env.accelerator} (`-cpu {env.cpu_model}`), guest "
        f"kernel {env.guest_kernel}; livemig {env.revision}. Load average before "
        f"{'/'.join(f'{v:.2f}' for v in env.load_before)}, after {load_after}; other pytest "
        f"or QEMU processes at the start: {len(env.other_busy_processes) or 'none'}; "
        f"runs that started while others' pytest or QEMU processes ran: "
        f"{sum(1 for run in results.runs if run.other_processes)} of {len(results.runs)}."
    )
    lines.append("")
    if results.omitted:
        lines.append("**Not run** (named by the suite, not available in this build):")
        lines.append("")
        lines.extend(f"- `{o.config}`: {o.reason}" for o in results.omitted)
        lines.append("")
    for summary in summarize(results):
        lines.extend(_comparison(results, summary))
    failed = [run for run in results.runs if not run.completed]
    lines.append("## Runs that did not complete")
    lines.append("")
    if failed:
        lines.extend(_failed(run) for run in failed)
    else:
        lines.append("None: every run completed.")
    lines.append("")
    corrupted = [run for run in results.runs if run.integrity == CORRUPTED]
    lines.append("## Runs that corrupted the guest")
    lines.append("")
    if corrupted:
        lines.append("Completed migrations after which the guest's own check failed on the target:")
        lines.append("")
        lines.extend(_corrupted(run) for run in corrupted)
    else:
        lines.append("None: the guest's own check passed after every completed migration.")
    lines.append("")
    if plots:
        lines.append("## Plots")
        lines.append("")
        lines.extend(f"![{p.stem}]({p.name})" for p in plots)
        lines.append("")
    lines.extend(_definitions())
    return "\n".join(lines) + "\n"


def _failed(run: RunResult) -> str:
    return (
        f"- run {run.index} `{run.config}` #{run.repetition}: **{run.status}**: {run.error or DASH}"
    )


def _corrupted(run: RunResult) -> str:
    return f"- run {run.index} `{run.config}` #{run.repetition}: {run.guest_check or DASH}"


def _comparison(results: BenchResults, summary: ComparisonSummary) -> list[str]:
    comparison = summary.comparison
    baseline = next(
        (c.scenario.label for c in summary.configs if c.config == summary.baseline), None
    )
    best_config = next((c for c in summary.configs if c.config == summary.best_peer), None)
    kind = "peer preset"
    if best_config is not None and best_config.scenario.is_libvirt:
        kind = "peer run through libvirt as its users run it"
    elif summary.best_peer_is_raw:
        kind = "raw peer"
    best = f"`{best_config.scenario.label}`" if best_config else "no peer"
    if best_config is not None and best_config.corrupted:
        best += f" ({best_config.corrupted} of its runs corrupted the guest)"
    first = comparison.scenarios[0]
    out = [f"## {comparison.name}", "", f"{comparison.description}; {comparison.repetitions} "
           f"repetition(s) per configuration.", ""]  # fmt: skip
    out.append(f"Link: {_link_text(results.link_for(first.bandwidth_mbit))}.")
    out.append(
        "Ratios divide a configuration's median by the median of "
        f"`{baseline or comparison.baseline + ' (not run)'}` (x baseline) and of "
        f"{best} (x best peer: the {kind} with the lowest median "
        "guest downtime here)."
    )
    if any(s.is_raw or (s.is_peer and not s.is_libvirt) for s in comparison.scenarios):
        out.append(
            "`raw:` peers run as their users get them (QEMU's own switchover, the target "
            "resumed the peer's way, no RAM check); `(emulated)` presets are the peers' "
            "settings and schedule emulated in livemig's engine (its RAM check, `-S` target)."
        )
    if any(s.is_libvirt for s in comparison.scenarios):
        out.append(
            "libvirt runs migrate a libvirt domain between two libvirt daemons with libvirt's "
            "own job (`migrateToURI3`, live, peer-to-peer): `livemig libvirt` steers it and "
            "keeps the target paused until its RAM matched; `libvirt-default` leaves libvirt "
            "alone; `libvirt:nova` runs Nova's driver's schedule (no RAM check: libvirt "
            "resumes the target itself)."
        )
    out.append("")
    out.append("### Downtime and total time (ms)")
    out.append("")
    out.append(
        "| configuration | completed | guest downtime median | p90 | min-max | x baseline | "
        "x best peer | QEMU downtime median | STOP→RESUME median | total time median | p90 | "
        "x baseline | x best peer |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in summary.configs:
        r = summary.ratios[c.config]
        g, t = c.guest_downtime_ms, c.total_time_ms
        out.append(
            f"| {c.scenario.label} | {c.completed}/{c.runs} | {_med(g)} | "
            f"{_num(g.p90 if g else None)} | {_range(g)} | "
            f"{_ratio(r.guest_downtime_vs_baseline)} | {_ratio(r.guest_downtime_vs_best_peer)} | "
            f"{_med(c.downtime_ms)} | {_med(c.stop_to_resume_ms)} | {_med(t, digits=0)} | "
            f"{_num(t.p90 if t else None, 0)} | {_ratio(r.total_time_vs_baseline)} | "
            f"{_ratio(r.total_time_vs_best_peer)} |"
        )
    out.append("")
    out.append("### Cost and the guest's view (medians)")
    out.append("")
    out.append(
        "| configuration | transferred MiB | on the wire MiB | rounds | probe lost | "
        "RAM check ok / guest check ok / corrupted | repaired pages (runs) | "
        "OpenSSL MB/s before / during / after | CPU % source / target / engine |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for c in summary.configs:
        ssl = " / ".join(
            _med(d, 1e3)
            for d in (c.openssl_before_kbps, c.openssl_during_kbps, c.openssl_after_kbps)
        )
        cpu = " / ".join(
            _med(d, digits=0) for d in (c.source_cpu_pct, c.target_cpu_pct, c.engine_cpu_pct)
        )
        out.append(
            f"| {c.scenario.label} | {_med(c.transferred_bytes, MIB)} | {_med(c.wire_bytes, MIB)} | "
            f"{_med(c.precopy_rounds, digits=0)} | {_med(c.probe_lost, digits=0)} | "
            f"{c.integrity_ok} / {c.guest_check_ok} / {c.corrupted} of {c.runs} | "
            f"{c.repaired_pages} ({c.runs_repaired}) | {ssl} | {cpu} |"
        )
    out.append("")
    out.append("### Against the physical limit")
    out.append("")
    out.append(
        "| configuration | non-zero RAM MiB | floor: non-zero RAM / link (ms) | total time "
        "median (ms) | total / floor median | on the wire / non-zero RAM |"
    )
    out.append("|---|---|---|---|---|---|")
    for c in summary.configs:
        wire_ratio = None
        if c.wire_bytes is not None and c.nonzero_ram_bytes is not None:
            wire_ratio = c.wire_bytes.median / c.nonzero_ram_bytes.median
        out.append(
            f"| {c.scenario.label} | {_med(c.nonzero_ram_bytes, MIB)} | "
            f"{_num(c.floor_total_ms)} | {_med(c.total_time_ms, digits=0)} | "
            f"{_ratio(c.total_over_floor.median if c.total_over_floor else None)} | "
            f"{_ratio(wire_ratio)} |"
        )
    out.append("")
    return out


def _range(d: Distribution | None) -> str:
    return DASH if d is None else f"{d.minimum:.1f} to {d.maximum:.1f}"


def _definitions() -> list[str]:
    return [
        "## How to read this",
        "",
        "- **guest downtime**: the longest gap between ICMP echo replies (sent every 1 ms "
        "from a client namespace, kernel receive timestamps) around the switchover: what "
        "a user of the guest sees. **QEMU downtime** is QEMU's own figure (sometimes 0 "
        "under TCG); **STOP→RESUME** the time between QEMU's STOP event on the source and "
        "RESUME on the target.",
        "- **total time**: `migrate` issued → the VM runs on the target (our clock).",
        "- **on the wire**: bytes the source's end of the migration link sent (kernel "
        "counters; includes device state and TCP overhead); **transferred**: QEMU's (or "
        "pagestream's) own count.",
        "- **raw:** peers run as their users get them, driven over plain QMP by `lab.raw`: "
        "the peer's capabilities and parameters, its own poll loop and decisions, QEMU's "
        "own switchover; the target resumes the peer's way (plain QEMU: by itself, "
        "started without `-S`; Proxmox: `cont` once its poll saw the source complete; "
        "libvirt (Nova, oVirt): `cont` once the target completed), with no RAM check. "
        "**(emulated)**: the same peer preset emulated in livemig's engine (RAM check "
        "and repair before `cont`, target started with `-S`).",
        "- **libvirt runs**: a libvirt domain moved between two libvirt daemons by "
        "libvirt's own job (`migrateToURI3`, live, peer-to-peer). `livemig libvirt`: "
        "livemig's controller through libvirt's calls, the target kept paused "
        "(`VIR_MIGRATE_PAUSED`) until its RAM matched the source's; `libvirt-default`: "
        "libvirt's defaults, nobody steers; `libvirt:nova`: Nova's driver's flags and "
        "its monitor's downtime steps. The last two have no RAM check (libvirt resumes "
        "the target itself) and count as peers as their users run them. libvirt owns "
        "the QEMUs: no CPU or non-zero RAM figures.",
        "- **repaired pages**: pages QEMU 7.2's TCG pre-copy left stale on the target "
        "(upstream fix 03bfc2188f), found by livemig's RAM check and copied from the "
        "stopped source before the target resumed.",
        "- **RAM check ok / guest check ok / corrupted**: runs whose RAM livemig's engine "
        "compared and found equal (raw peers have no RAM check); runs whose guest "
        "checked itself on the target and passed (a memory-dirtying workload verifies "
        "its pattern, openssl must keep reporting, no kernel oops); runs after which the "
        "guest's check failed (listed below the comparisons).",
        "- **OpenSSL MB/s**: the guest's `openssl speed sha256` figure (guest clock, 16 KiB "
        "blocks) from lines that arrived in the warm-up before `migrate`, between `migrate` "
        "and the target's resume, and on the target after it.",
        "- **CPU %**: host CPU time (user + system, psutil) from `migrate` to the engine's "
        "end, as percent of one core, of each QEMU (all threads: the source's includes the "
        "guest's busy vCPU) and of the engine (the livemig process and the helpers it "
        "starts, e.g. pagestream's agents; not the probe).",
        "- **floor**: the guest RAM that was not zero just before the migration, divided by "
        "the link's limit: no migration that sends every non-zero page in full once can "
        "be faster. Compression (zstd, xbzrle) can beat it: a ratio below 1 says the "
        "stream carried fewer bytes than the RAM held. On an uncapped veth the link is much "
        "faster than a TCG guest's QEMU can fill it, so the ratio there shows CPU cost "
        "rather than link use.",
        "",
    ]


def require_plots() -> Callable[[BenchResults, Path], tuple[Path, ...]]:
    """``bench.plots.write_plots``, imported here so matplotlib (the optional ``bench``
    extra) loads only to draw. Raises :class:`PlotsUnavailable` without it."""
    try:
        from bench.plots import write_plots
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        raise PlotsUnavailable() from None
    return write_plots


def write_report(results: BenchResults, out_dir: Path) -> tuple[Path, ...]:
    """Write the plots and ``report.md`` of ``results`` into ``out_dir``; returns the
    files written (report last). Raises :class:`PlotsUnavailable` (nothing written)
    without matplotlib, :class:`OutputError` when ``out_dir`` cannot be written."""
    write_plots = require_plots()
    check_results_dir(out_dir)
    try:
        plots = write_plots(results, out_dir)
        report = out_dir / REPORT_FILE
        report.write_text(render_report(results, plots), encoding="utf-8")
    except OSError as exc:
        where = exc.filename or out_dir
        raise OutputError(f"cannot write {where}: {exc.strerror or exc}", out_dir) from exc
    return (*plots, report)

"""PNG plots of a suite's results (matplotlib's Agg canvas, no display needed).

- ``downtime.png``: guest-visible downtime per configuration, every run a dot over
  its box (red: the guest's own check failed afterwards), QEMU's own downtime figure
  beside it;
- ``timeline-<comparison>.png``: remaining RAM and dirty rate over time during the
  representative run (median guest downtime) of each configuration, the switchover
  (source STOP → target RESUME) marked;
- ``openssl-<comparison>.png``: the guest's OpenSSL throughput over time in the same
  runs, the migration window shaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.results import CORRUPTED, BenchResults, RunResult
from bench.stats import representative

MIB = float(1 << 20)
_DPI = 100
_SWITCHOVER = "#d62728"
_WINDOW = "#1f77b4"


def write_plots(results: BenchResults, out_dir: Path) -> tuple[Path, ...]:
    """Draw every plot of ``results`` into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_downtime(results, out_dir / "downtime.png")]
    for comparison in results.suite.comparisons:
        picked = []
        for scenario in comparison.scenarios:
            run = representative(results.runs_of(comparison.config(scenario)))
            if run is not None:
                picked.append(run)
        if not picked:
            continue
        written.append(
            _timeline(comparison.name, picked, out_dir / f"timeline-{comparison.name}.png")
        )
        written.append(
            _openssl(comparison.name, picked, out_dir / f"openssl-{comparison.name}.png")
        )
    return tuple(written)


def _downtime(results: BenchResults, path: Path) -> Path:
    comparisons = results.suite.comparisons
    widest = max(len(c.scenarios) for c in comparisons)
    fig = Figure(figsize=(max(10.0, 1.1 * widest), 4.0 * len(comparisons)), dpi=_DPI,
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(len(comparisons), 1, squeeze=False)[:, 0]
    for ax, comparison in zip(axes, comparisons, strict=True):
        labels, guest, qemu, failed, corrupted = [], [], [], [], []
        for scenario in comparison.scenarios:
            runs = results.runs_of(comparison.config(scenario))
            ok = [r for r in runs if r.completed]
            labels.append(scenario.label)
            guest.append([r.guest_downtime_ms for r in ok if r.guest_downtime_ms is not None])
            qemu.append([r.downtime_ms for r in ok if r.downtime_ms is not None])
            failed.append(len(runs) - len(ok))
            corrupted.append(
                [r.guest_downtime_ms for r in ok
                 if r.integrity == CORRUPTED and r.guest_downtime_ms is not None]
            )  # fmt: skip
        positions = list(range(1, len(labels) + 1))
        boxed = [(p, values) for p, values in zip(positions, guest, strict=True) if values]
        if boxed:
            ax.boxplot(
                [values for _, values in boxed],
                positions=[p for p, _ in boxed],
                widths=0.5,
                showfliers=False,
                medianprops={"color": "black"},
            )
        for p, values in zip(positions, guest, strict=True):
            xs = [p + _jitter(i, len(values)) for i in range(len(values))]
            ax.scatter(xs, values, s=16, color=_WINDOW, zorder=3,
                       label="guest (probe)" if p == 1 else None)  # fmt: skip
        for p, values in zip(positions, qemu, strict=True):
            ax.scatter([p + 0.32] * len(values), values, s=14, marker="x", color="gray",
                       zorder=3, label="QEMU's figure" if p == 1 else None)  # fmt: skip
        first_bad = True
        for p, values in zip(positions, corrupted, strict=True):
            if values:
                ax.scatter([p] * len(values), values, s=40, facecolors="none", zorder=4,
                           edgecolors=_SWITCHOVER, label="guest corrupted" if first_bad else None)  # fmt: skip
                first_bad = False
        for p, n in zip(positions, failed, strict=True):
            if n:
                ax.annotate(f"{n} failed", (p, 0), xytext=(0, 4), textcoords="offset points",
                            ha="center", color=_SWITCHOVER, fontsize=8)  # fmt: skip
        ax.set_xticks(positions, labels, rotation=25, ha="right", rotation_mode="anchor")
        ax.set_xlim(0.4, len(labels) + 0.6)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("downtime (ms)")
        ax.set_title(f"{comparison.name}: guest-visible downtime (longest ICMP reply gap)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path)
    return path


def _jitter(i: int, n: int) -> float:
    return 0.0 if n <= 1 else -0.12 + 0.24 * i / (n - 1)


def _grid(count: int, height: float, sharey: bool = False) -> tuple[Figure, Sequence[Axes]]:
    cols = 2 if count > 1 else 1
    rows = (count + cols - 1) // cols
    fig = Figure(figsize=(6.5 * cols, height * rows), dpi=_DPI, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=sharey).flat)
    for extra in axes[count:]:
        extra.set_visible(False)
    for ax in axes[:count]:
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides them on upper rows
    return fig, axes[:count]


def _mark_switchover(ax: Axes, run: RunResult, shade_window: bool) -> None:
    tl = run.timeline
    if tl is None:
        return
    if shade_window:
        end = tl.target_resume_ms if tl.target_resume_ms is not None else tl.ended_ms
        ax.axvspan(0, end / 1e3, color=_WINDOW, alpha=0.12, label="migration")
    if tl.source_stop_ms is not None and tl.target_resume_ms is not None:
        ax.axvspan(tl.source_stop_ms / 1e3, tl.target_resume_ms / 1e3, color=_SWITCHOVER,
                   alpha=0.35, label="STOP → RESUME")  # fmt: skip
    if tl.source_stop_ms is not None:
        ax.axvline(tl.source_stop_ms / 1e3, color=_SWITCHOVER, linewidth=1)


def _title(run: RunResult) -> str:
    figure = f"{run.guest_downtime_ms:.0f} ms" if run.guest_downtime_ms is not None else "n/a"
    state = "" if run.completed else f" [{run.status}]"
    return f"{run.scenario.label}{state}: guest downtime {figure}"


def _timeline(name: str, runs: Sequence[RunResult], path: Path) -> Path:
    fig, axes = _grid(len(runs), 2.8)
    rates: list[Axes] = []
    for ax, run in zip(axes, runs, strict=True):
        # Samples taken before QEMU sized the RAM (status "setup") carry no figures.
        samples = [s for s in run.samples if s.ram_total_bytes > 0]
        t = [s.elapsed_ms / 1e3 for s in samples]
        ax.plot(t, [s.ram_remaining_bytes / MIB for s in samples], color=_WINDOW,
                marker=".", label="remaining RAM")  # fmt: skip
        ax.set_ylabel("remaining (MiB)")
        rate = ax.twinx()
        rates.append(rate)
        rate.plot(t, [s.dirty_rate_bytes_per_s / MIB for s in samples], color="tab:orange",
                  linestyle="--", marker=".", label="dirty rate")  # fmt: skip
        rate.set_ylabel("dirty rate (MiB/s)")
        rate.set_ylim(bottom=0)
        _mark_switchover(ax, run, shade_window=False)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds after migrate")
        ax.set_title(_title(run), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    more, more_labels = rates[0].get_legend_handles_labels()
    fig.legend(handles + more, labels + more_labels, loc="outside lower center", ncols=3)
    fig.suptitle(f"{name}: migration timeline (run with the median guest downtime)")
    fig.savefig(path)
    return path


def _openssl(name: str, runs: Sequence[RunResult], path: Path) -> Path:
    fig, axes = _grid(len(runs), 2.6, sharey=True)
    for ax, run in zip(axes, runs, strict=True):
        points = run.throughput.points if run.throughput else ()
        for side, color in (("source", _WINDOW), ("target", "tab:green")):
            mine = [p for p in points if p.side == side]
            ax.plot([p.t_ms / 1e3 for p in mine], [p.kbps / 1e3 for p in mine], marker="o",
                    color=color, label=f"on {side}")  # fmt: skip
        _mark_switchover(ax, run, shade_window=True)
        ax.set_xlabel("seconds after migrate (line arrival)")
        ax.set_ylabel("sha256 MB/s (guest)")
        ax.set_title(_title(run), fontsize=10)
    peak = max((p.kbps for r in runs if r.throughput for p in r.throughput.points), default=0.0)
    axes[0].set_ylim(0, max(peak / 1e3 * 1.1, 1.0))  # shared by all panels
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4)
    fig.suptitle(f"{name}: guest OpenSSL throughput, migration window shaded")
    fig.savefig(path)
    return path

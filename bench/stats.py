"""Statistics over runs: distributions per configuration, ratios, the physical limit.

Distributions are taken over completed runs only (a failed migration has no
downtime to speak of); the run counts say how many completed. Percentiles
interpolate linearly between order statistics (numpy's default), so p90 of five
runs lies between the fourth and the fifth.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.results import CORRUPTED, BenchResults, RunResult
from bench.scenario import Comparison, Scenario


@dataclass(frozen=True)
class Distribution:
    count: int
    median: float
    p90: float
    minimum: float
    maximum: float


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation. Raises ValueError
    for no values or ``q`` outside [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float | None]) -> Distribution | None:
    """Median, p90, min and max of the values that are not None; None if none are."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Distribution(
        count=len(present),
        median=statistics.median(present),
        p90=percentile(present, 90),
        minimum=min(present),
        maximum=max(present),
    )


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


@dataclass(frozen=True)
class ConfigSummary:
    """One configuration's runs, condensed.

    ``floor_total_ms`` is the physical limit for the total time: the guest's non-zero
    RAM (median over runs) over the link's limit; ``total_over_floor`` the median of
    each run's total time divided by its own floor.
    """

    config: str
    scenario: Scenario
    runs: int
    completed: int
    integrity_ok: int
    guest_check_ok: int
    corrupted: int
    repaired_pages: int
    runs_repaired: int
    guest_downtime_ms: Distribution | None
    downtime_ms: Distribution | None
    total_time_ms: Distribution | None
    stop_to_resume_ms: Distribution | None
    transferred_bytes: Distribution | None
    wire_bytes: Distribution | None
    precopy_rounds: Distribution | None
    probe_lost: Distribution | None
    nonzero_ram_bytes: Distribution | None
    openssl_before_kbps: Distribution | None
    openssl_during_kbps: Distribution | None
    openssl_after_kbps: Distribution | None
    source_cpu_pct: Distribution | None
    target_cpu_pct: Distribution | None
    engine_cpu_pct: Distribution | None
    floor_total_ms: float | None
    total_over_floor: Distribution | None

    @property
    def median_guest_downtime_ms(self) -> float | None:
        return self.guest_downtime_ms.median if self.guest_downtime_ms else None

    @property
    def median_total_time_ms(self) -> float | None:
        return self.total_time_ms.median if self.total_time_ms else None


@dataclass(frozen=True)
class Ratios:
    """A configuration's medians relative to the baseline and to the best peer (the
    raw peer with the lowest median guest downtime in the comparison; the best
    emulated peer preset where no raw peer ran)."""

    guest_downtime_vs_baseline: float | None
    guest_downtime_vs_best_peer: float | None
    total_time_vs_baseline: float | None
    total_time_vs_best_peer: float | None


@dataclass(frozen=True)
class ComparisonSummary:
    comparison: Comparison
    configs: tuple[ConfigSummary, ...]
    baseline: str | None
    best_peer: str | None
    ratios: dict[str, Ratios]
    link_limit_bytes_per_s: float | None
    best_peer_is_raw: bool = False


def _values(
    runs: Sequence[RunResult], get: Callable[[RunResult], float | int | None]
) -> Distribution | None:
    return distribution([_float(get(run)) for run in runs])


def _float(value: float | int | None) -> float | None:
    return None if value is None else float(value)


def summarize_config(
    config: str, scenario: Scenario, runs: Sequence[RunResult], link_bytes_per_s: float | None
) -> ConfigSummary:
    ok = [run for run in runs if run.completed]

    def cpu(pick: str) -> Distribution | None:
        values = []
        for run in ok:
            if run.cpu is not None:
                values.append(run.cpu.percent(getattr(run.cpu, pick)))
        return distribution(values)

    def floor_ms(run: RunResult) -> float | None:
        if run.nonzero_ram_bytes is None or not link_bytes_per_s:
            return None
        return run.nonzero_ram_bytes / link_bytes_per_s * 1e3

    def over_floor(run: RunResult) -> float | None:
        return ratio(run.total_time_ms, floor_ms(run))

    nonzero = _values(ok, lambda r: r.nonzero_ram_bytes)
    floor = (
        nonzero.median / link_bytes_per_s * 1e3
        if nonzero is not None and link_bytes_per_s
        else None
    )
    return ConfigSummary(
        config=config,
        scenario=scenario,
        runs=len(runs),
        completed=len(ok),
        integrity_ok=sum(1 for run in runs if run.integrity == "ok"),
        guest_check_ok=sum(1 for run in runs if (run.guest_check or "").startswith("ok")),
        corrupted=sum(1 for run in runs if run.integrity == CORRUPTED),
        repaired_pages=sum(run.repaired_pages for run in runs),
        runs_repaired=sum(1 for run in runs if run.repaired_pages > 0),
        guest_downtime_ms=_values(ok, lambda r: r.guest_downtime_ms),
        downtime_ms=_values(ok, lambda r: r.downtime_ms),
        total_time_ms=_values(ok, lambda r: r.total_time_ms),
        stop_to_resume_ms=_values(ok, lambda r: r.stop_to_resume_ms),
        transferred_bytes=_values(ok, lambda r: r.transferred_bytes),
        wire_bytes=_values(ok, lambda r: r.wire_bytes),
        precopy_rounds=_values(ok, lambda r: r.precopy_rounds),
        probe_lost=_values(ok, lambda r: r.probe_lost),
        nonzero_ram_bytes=nonzero,
        openssl_before_kbps=_values(
            ok, lambda r: r.throughput.before_kbps if r.throughput else None
        ),
        openssl_during_kbps=_values(
            ok, lambda r: r.throughput.during_kbps if r.throughput else None
        ),
        openssl_after_kbps=_values(ok, lambda r: r.throughput.after_kbps if r.throughput else None),
        source_cpu_pct=cpu("source_s"),
        target_cpu_pct=cpu("target_s"),
        engine_cpu_pct=cpu("engine_s"),
        floor_total_ms=floor,
        total_over_floor=distribution([over_floor(run) for run in ok]),
    )


def summarize(results: BenchResults) -> tuple[ComparisonSummary, ...]:
    """Per comparison of the suite: every configuration's summary and its ratios."""
    out = []
    for comparison in results.suite.comparisons:
        configs = []
        link_limit: float | None = None
        for scenario in comparison.scenarios:
            link = results.link_for(scenario.bandwidth_mbit)
            limit = link.limit_bytes_per_s if link else None
            link_limit = link_limit or limit
            config = comparison.config(scenario)
            configs.append(summarize_config(config, scenario, results.runs_of(config), limit))
        baseline = _baseline(comparison, configs)
        # Raw peers when the comparison has any (even if none completed), else the
        # emulated presets (results from before raw peers).
        peers = [c for c in configs if c.scenario.as_users_run_it] or [
            c for c in configs if c.scenario.is_peer
        ]
        measured = [c for c in peers if c.median_guest_downtime_ms]
        best = min(measured, key=lambda c: c.median_guest_downtime_ms or math.inf, default=None)
        ratios = {
            c.config: Ratios(
                guest_downtime_vs_baseline=ratio(
                    c.median_guest_downtime_ms,
                    baseline.median_guest_downtime_ms if baseline else None,
                ),
                guest_downtime_vs_best_peer=ratio(
                    c.median_guest_downtime_ms, best.median_guest_downtime_ms if best else None
                ),
                total_time_vs_baseline=ratio(
                    c.median_total_time_ms, baseline.median_total_time_ms if baseline else None
                ),
                total_time_vs_best_peer=ratio(
                    c.median_total_time_ms, best.median_total_time_ms if best else None
                ),
            )
            for c in configs
        }
        out.append(
            ComparisonSummary(
                comparison=comparison,
                configs=tuple(configs),
                baseline=baseline.config if baseline else None,
                best_peer=best.config if best else None,
                ratios=ratios,
                link_limit_bytes_per_s=link_limit,
                best_peer_is_raw=best is not None and best.scenario.as_users_run_it,
            )
        )
    return tuple(out)


def _baseline(comparison: Comparison, configs: Sequence[ConfigSummary]) -> ConfigSummary | None:
    """The completed configuration named by ``comparison.baseline``: a scenario name,
    or (results from before raw peers) a policy run in the engine."""
    completed = [c for c in configs if c.completed]
    for c in completed:
        if c.scenario.name == comparison.baseline:
            return c
    for c in completed:
        if c.scenario.policy == comparison.baseline and not c.scenario.is_raw:
            return c
    return None


def representative(runs: Sequence[RunResult]) -> RunResult | None:
    """The completed run with the median guest downtime (the lower one of an even
    count), or the first run if none completed; None for no runs."""
    ok = sorted(
        (r for r in runs if r.completed and r.guest_downtime_ms is not None),
        key=lambda r: r.guest_downtime_ms or 0.0,
    )
    if ok:
        return ok[(len(ok) - 1) // 2]
    return runs[0] if runs else None

"""Running a suite: the run order, the loop, and what happens when a run fails.

Runs are interleaved across configurations (A, B, C, A, B, C, ...) so that noise
from the machine (another process, thermal state, page cache) falls on every
configuration alike. A failed or hung run is recorded with its status, never
dropped; ``results.json`` is rewritten after every run so an interrupted suite
keeps what it measured.

The work itself goes through a :class:`Backend`: :class:`bench.lab.LabBackend`
migrates real guests in the namespace lab; unit tests pass a fake.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from bench.errors import BenchError
from bench.results import (
    FORMAT_VERSION,
    BenchEnvironment,
    BenchResults,
    LinkMeasurement,
    RunResult,
    RunStatus,
    check_results_dir,
)
from bench.scenario import Omitted, Scenario, Suite
from cpumodel.errors import CpuModelError
from dirtytrack.errors import DirtyTrackError
from migrate.deadline import within
from migrate.errors import LivemigError

# What one run may raise and still be recorded as a failed run; anything else is a
# bug of the benchmark and ends the suite (after saving what was measured).
RUN_ERRORS = (LivemigError, BenchError, DirtyTrackError, CpuModelError, OSError)


@dataclass(frozen=True)
class PlannedRun:
    """One run in the suite's order."""

    index: int
    comparison: str
    scenario: Scenario
    repetition: int

    @property
    def config(self) -> str:
        return f"{self.comparison}/{self.scenario.name}"

    @property
    def slug(self) -> str:
        """A file-name-safe id: ``007-openssl-qemu-default-r2``."""
        return f"{self.index:03d}-{self.comparison}-{self.scenario.name}-r{self.repetition}"


def schedule(suite: Suite) -> tuple[PlannedRun, ...]:
    """Every run of ``suite``, interleaved: repetition r of every configuration (across
    all comparisons) before repetition r + 1 of any."""
    planned: list[PlannedRun] = []
    rounds = max(c.repetitions for c in suite.comparisons)
    for repetition in range(rounds):
        for comparison in suite.comparisons:
            if repetition >= comparison.repetitions:
                continue
            for scenario in comparison.scenarios:
                planned.append(PlannedRun(len(planned), comparison.name, scenario, repetition))
    return tuple(planned)


class Backend(Protocol):
    """Where runs happen."""

    async def environment(self) -> BenchEnvironment:
        """The machine and software, measured now."""
        ...

    async def measure_link(self, bandwidth_mbit: float | None) -> LinkMeasurement:
        """The migration link's throughput with this cap (None: uncapped)."""
        ...

    async def run(self, planned: PlannedRun, log_dir: Path) -> RunResult:
        """One migration; raises one of :data:`RUN_ERRORS` if it cannot be measured."""
        ...

    def other_activity(self) -> tuple[str, ...]:
        """Processes of others that compete for the machine now (recorded per run)."""
        ...


class Listener(Protocol):
    """Told about the suite's progress (the CLI draws a progress bar)."""

    def suite_started(self, total: int) -> None: ...

    def run_started(self, planned: PlannedRun) -> None: ...

    def run_finished(self, result: RunResult) -> None: ...


class SilentListener:
    def suite_started(self, total: int) -> None:
        del total

    def run_started(self, planned: PlannedRun) -> None:
        del planned

    def run_finished(self, result: RunResult) -> None:
        del result


def failed_run(
    planned: PlannedRun, status: RunStatus, error: str, started_at: float, wall_s: float
) -> RunResult:
    """The record of a run that produced no migration report."""
    return RunResult(
        config=planned.config,
        comparison=planned.comparison,
        scenario=planned.scenario,
        repetition=planned.repetition,
        index=planned.index,
        status=status,
        started_at=started_at,
        wall_s=wall_s,
        error=error,
    )


async def run_one(
    backend: Backend, planned: PlannedRun, log_dir: Path, timeout_s: float
) -> RunResult:
    """Run ``planned``; a run that raises one of :data:`RUN_ERRORS` or exceeds
    ``timeout_s`` comes back as a failed :class:`RunResult`."""
    started_at, t0 = time.time(), time.monotonic()
    try:
        result = await within(backend.run(planned, log_dir), timeout_s)
    except TimeoutError:
        return failed_run(
            planned,
            RunStatus.TIMEOUT,
            f"run exceeded {timeout_s:.0f} s and was ended",
            started_at,
            time.monotonic() - t0,
        )
    except RUN_ERRORS as exc:
        message = f"{type(exc).__name__}: {exc}"
        return failed_run(planned, RunStatus.ERROR, message, started_at, time.monotonic() - t0)
    return result


async def run_suite(
    suite: Suite,
    backend: Backend,
    out_dir: Path,
    *,
    command: str,
    omitted: tuple[Omitted, ...] = (),
    listener: Listener | None = None,
    keep_logs: bool = False,
) -> BenchResults:
    """Run every run of ``suite`` in interleaved order, saving ``out_dir/results.json``
    after each. Logs of failed runs stay in ``out_dir/logs/<run>``; those of completed
    runs too with ``keep_logs``. Raises :class:`BenchError` if ``out_dir`` cannot be
    written (checked first) or the link cannot be measured; a failing run never raises.
    """
    check_results_dir(out_dir)
    suite.validate()
    listener = listener or SilentListener()
    planned = schedule(suite)
    environment = await backend.environment()
    links = tuple([await backend.measure_link(bw) for bw in suite.bandwidths()])
    results = BenchResults(
        format_version=FORMAT_VERSION,
        suite=suite,
        command=command,
        started_at=time.time(),
        environment=environment,
        links=links,
        omitted=omitted,
        runs=(),
    )
    listener.suite_started(len(planned))
    runs: list[RunResult] = []
    try:
        for run in planned:
            listener.run_started(run)
            log_dir = out_dir / "logs" / run.slug
            others = backend.other_activity()
            result = await run_one(backend, run, log_dir, suite.run_timeout_s)
            result = replace(result, other_processes=others)
            if result.completed and not keep_logs:
                _remove_tree(log_dir)
            runs.append(result)
            results = replace(results, runs=tuple(runs))
            results.save(out_dir)
            listener.run_finished(result)
    finally:
        results = replace(results, runs=tuple(runs), finished_at=time.time())
        results = replace(results, environment=replace(results.environment, load_after=_loadavg()))
        results.save(out_dir)
    _remove_empty(out_dir / "logs")
    return results


def _loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (one, five, fifteen)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()

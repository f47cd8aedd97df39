"""``livemig bench``: benchmark suites, their reports and plots.

``run`` migrates the test guest in the lab over and over (root; see ``list`` for
the suites), interleaving configurations, and writes ``results.json``, ``report.md``
and PNG plots into ``--out``; ``plot DIR`` rewrites report and plots from a
``results.json``; ``list`` shows the suites.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from migrate import cli_args
from migrate.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE

# The handlers import the benchmark (and through it the lab) when they run, so
# building the parser for any other command loads neither.
if TYPE_CHECKING:
    from bench.results import RunResult
    from bench.runner import Backend, PlannedRun


#: The fault-matrix suites (``lab.faults.SUITES``), named here so that building the
#: parser loads no lab module.
FAULT_SUITES = ("faults", "faults-short")


def register(sub: Any) -> None:
    from bench.scenario import SUITES  # data only: the suites' names for --suite

    parser: argparse.ArgumentParser = sub.add_parser(
        "bench", help="benchmark suites: downtime of every strategy and peer preset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE

    parser.set_defaults(func=usage)
    cmds = parser.add_subparsers(dest="bench_command", parser_class=type(parser))
    run = cmds.add_parser("run", help="run a suite in the lab (root): results, report, plots")
    run.add_argument("--suite", default="default", choices=sorted((*SUITES, *FAULT_SUITES)),
                     help="a benchmark suite, or a fault matrix (faults, faults-short)")  # fmt: skip
    run.add_argument("--out", type=cli_args.path, default=Path("bench-results"),
                     help="directory for results.json, report.md and the plots")  # fmt: skip
    run.add_argument("--repetitions", type=cli_args.int_in(1, 1000), default=None,
                     help="override every comparison's repetitions")  # fmt: skip
    run.add_argument("--keep-logs", action="store_true",
                     help="keep logs of completed runs too (failed runs' are always kept)")  # fmt: skip
    run.set_defaults(func=_run)
    plot = cmds.add_parser("plot", help="rewrite report.md and the plots from DIR/results.json")
    plot.add_argument("dir", type=cli_args.path)
    plot.set_defaults(func=_plot)
    listing = cmds.add_parser("list", help="the suites and what they run")
    listing.set_defaults(func=_list)


def _backend() -> Backend:
    """Where ``bench run`` migrates: the namespace lab (unit tests substitute a fake)."""
    from bench.backend import LabBackend

    return LabBackend()


def _fail(message: str) -> int:
    sys.stderr.write(f"livemig: error: {message}\n")
    return EXIT_ERROR


class _ProgressBar:
    """The runner's listener: a rich progress bar on stderr and one line per run."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=2,  # the engine's own CPU use is measured
        )
        self.task: TaskID | None = None

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def suite_started(self, total: int) -> None:
        self.task = self.progress.add_task("starting", total=total)

    def run_started(self, planned: PlannedRun) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{planned.config} #{planned.repetition}")

    def run_finished(self, result: RunResult) -> None:
        if self.task is not None:
            self.progress.advance(self.task)
        figures = (
            f"guest downtime {result.guest_downtime_ms:.1f} ms, "
            f"total {result.total_time_ms or 0:.0f} ms"
            if result.guest_downtime_ms is not None
            else (result.error or "")
        )
        self.console.print(
            f"[{result.index + 1}] {result.config} #{result.repetition}: {result.status} {figures}",
            markup=False,
            highlight=False,
        )


def _run(args: argparse.Namespace) -> int:
    from bench.errors import BenchError
    from bench.policies import availability
    from bench.report import require_plots, write_report
    from bench.results import check_results_dir
    from bench.runner import run_suite
    from bench.scenario import runnable, suite_named

    if args.suite in FAULT_SUITES:
        return _run_faults(args)
    try:
        check_results_dir(args.out)  # before anything runs: a file, read-only, ...
        require_plots()  # matplotlib missing: say so before the suite runs, not after
        suite = suite_named(args.suite)
        if args.repetitions is not None:
            suite = suite.with_repetitions(args.repetitions)
        suite, omitted = runnable(suite, availability())
    except BenchError as exc:
        return _fail(str(exc))
    command = "livemig bench run " + shlex.join(
        ["--suite", args.suite, "--out", str(args.out)]
        + (["--repetitions", str(args.repetitions)] if args.repetitions else [])
    )
    console = Console(stderr=True)
    for item in omitted:
        console.print(f"not run: {item.config}: {item.reason}", markup=False)
    try:
        with _ProgressBar(console) as bar:
            results = asyncio.run(
                run_suite(
                    suite, _backend(), args.out, command=command, omitted=omitted,
                    listener=bar, keep_logs=args.keep_logs,
                )
            )  # fmt: skip
        written = write_report(results, args.out)
    except BenchError as exc:
        return _fail(str(exc))
    failed = sum(1 for run in results.runs if not run.completed)
    console.print(
        f"{len(results.runs)} runs, {failed} not completed; wrote "
        + ", ".join(str(p) for p in (args.out / "results.json", *written)),
        markup=False,
    )
    return EXIT_OK


def _run_faults(args: argparse.Namespace) -> int:
    """The fault matrix (``lab.faults``): one fresh lab per cell, no plots."""
    from lab.faults import main_run

    command = "livemig bench run " + shlex.join(["--suite", args.suite, "--out", str(args.out)])
    return main_run(args.suite, args.out, command)


def _plot(args: argparse.Namespace) -> int:
    from bench.errors import BenchError
    from bench.report import write_report
    from bench.results import BenchResults

    out_dir = args.dir if args.dir.is_dir() else args.dir.parent  # DIR or DIR/results.json
    try:
        results = BenchResults.load(args.dir)
        written = write_report(results, out_dir)
    except BenchError as exc:
        return _fail(str(exc))
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _list(_args: argparse.Namespace) -> int:
    from bench.policies import availability
    from bench.scenario import SUITES

    available = availability()
    for suite in SUITES.values():
        print(f"{suite.name}: {suite.description} ({suite.run_count} runs, "
              f"budget {suite.budget_s / 60:.0f} min)")  # fmt: skip
        for comparison in suite.comparisons:
            print(f"  {comparison.name} x{comparison.repetitions}: {comparison.description}")
            for scenario in comparison.scenarios:
                missing = available.reason_missing(scenario)
                note = f"  [not available: {missing}]" if missing else ""
                print(f"    {scenario.label}{note}")
    from lab.faults import SUITES as FAULT_MATRICES

    for matrix in FAULT_MATRICES.values():
        print(f"{matrix.name}: {matrix.description} ({len(matrix.cells)} cells)")
    return EXIT_OK


__all__ = ["register"]

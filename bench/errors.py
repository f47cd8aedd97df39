"""Errors of the benchmark package.

::

    BenchError                 root: anything the benchmark raises on purpose
    ├── SuiteError             an unknown suite, or a suite that contradicts itself
    ├── ResultsError           results.json missing, unreadable or of another format
    ├── OutputError            results, report or plots cannot be written (.path)
    ├── LinkMeasureError       the migration link's throughput could not be measured
    └── PlotsUnavailable       matplotlib (the ``bench`` extra) is not installed

A run that fails is not an error of the benchmark: it is recorded with its status.
"""

from __future__ import annotations

from pathlib import Path


class BenchError(Exception):
    """Root of the benchmark's errors."""


class SuiteError(BenchError):
    """A suite name nobody defined, or a suite with duplicate or empty entries."""

    def __init__(self, message: str, known: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.known = known


class ResultsError(BenchError):
    """``path`` holds no results this version can read."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutputError(BenchError):
    """``path`` (an output directory or a file in it) cannot be written; the message
    names it."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class LinkMeasureError(BenchError):
    """The throughput probe over the migration link failed; ``output`` is what it said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class PlotsUnavailable(BenchError):
    """The plots need matplotlib, an optional dependency (``livemig[bench]``)."""

    def __init__(self) -> None:
        super().__init__("matplotlib is not installed: install livemig[bench] for plots")

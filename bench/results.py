"""What a benchmark measured: one :class:`RunResult` per run, and the suite around them.

Everything is a frozen dataclass serialised by :mod:`migrate.codec` (one pair, so
writer and reader cannot drift apart); ``results.json`` is
``BenchResults.to_dict()``. Times named ``*_ms`` are milliseconds; ``t_ms`` of a
guest output line and the ``elapsed_ms`` of samples count from the moment
``migrate`` was issued, like the report's timeline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bench.errors import OutputError, ResultsError
from bench.scenario import Omitted, Scenario, Suite
from migrate.codec import from_dict, to_dict
from migrate.errors import ConfigError
from migrate.files import InputFileError, JsonInputError, check_output_dir, read_input_json
from migrate.report import Decision, Sample, Timeline

FORMAT_VERSION = 1
RESULTS_FILE = "results.json"
#: The largest results.json read back; the default suite's is about 0.5 MiB.
MAX_RESULTS_BYTES = 256 * 1024 * 1024
#: A run's ``integrity`` when the guest's own check failed on the target, whatever
#: the engine's RAM check said (raw peers have none: the guest's check is all there is).
CORRUPTED = "corrupted"


class RunStatus(StrEnum):
    """How a run ended: the migration's own status, or why there was none."""

    COMPLETED = "completed"
    FAILED = "failed"  # the migration failed; the VM stayed on the source
    ABORTED = "aborted"  # the controller gave up; the VM stayed on the source
    ERROR = "error"  # the run could not be set up or measured
    TIMEOUT = "timeout"  # the run exceeded the suite's run timeout and was ended


@dataclass(frozen=True)
class OpensslPoint:
    """One ``OPENSSL ... kbps=N`` line: when it arrived (ms after ``migrate``), on which
    side, and the guest's figure (kB/s of SHA-256 over 16 KiB blocks, guest clock)."""

    t_ms: float
    kbps: float
    side: str


@dataclass(frozen=True)
class GuestThroughput:
    """The guest's OpenSSL throughput around the migration (mean kB/s of the lines
    that arrived before ``migrate``, between ``migrate`` and the target's resume, and
    on the target after it); None where no line arrived in that window."""

    before_kbps: float | None
    during_kbps: float | None
    after_kbps: float | None
    points: tuple[OpensslPoint, ...] = ()


@dataclass(frozen=True)
class CpuUsage:
    """Host CPU seconds (user + system) spent during the migration window (pre-copy
    begins, i.e. ``migrate`` issued → the engine's last event) by each QEMU (all its
    threads: the guest's vCPU too) and by the engine: this process with every thread,
    plus the helper processes it started (pagestream's agents), not the ICMP probe.
    None: not measurable (the migration never began)."""

    window_s: float
    source_s: float | None
    target_s: float | None
    engine_s: float | None

    def percent(self, seconds: float | None) -> float | None:
        """``seconds`` as percent of one core over the window."""
        if seconds is None or self.window_s <= 0:
            return None
        return 100.0 * seconds / self.window_s


@dataclass(frozen=True)
class RunResult:
    """One migration of the suite, whatever its outcome.

    ``config`` is ``comparison/scenario``; ``index`` the position in the run order.
    ``guest_downtime_ms`` is the longest probe reply gap around the switchover,
    ``downtime_ms``/``qemu_total_time_ms`` QEMU's own figures, ``total_time_ms``
    ours (``migrate`` issued → VM running on the target). ``nonzero_ram_bytes`` is
    the guest RAM that was not zero just before the migration (what must cross the
    link in full at least once). ``integrity`` is the engine's RAM check (``ok``,
    ``failed``, ``unchecked``: raw peers have no RAM check), or ``corrupted`` when the
    guest's own check on the target (``guest_check``) failed. ``other_processes`` are
    the pytest or QEMU processes of others that ran on the machine when the run
    started (noise).
    """

    config: str
    comparison: str
    scenario: Scenario
    repetition: int
    index: int
    status: RunStatus
    started_at: float
    wall_s: float
    error: str | None = None
    guest_downtime_ms: float | None = None
    probe_sent: int | None = None
    probe_lost: int | None = None
    downtime_ms: float | None = None
    total_time_ms: float | None = None
    qemu_total_time_ms: float | None = None
    stop_to_resume_ms: float | None = None
    transferred_bytes: int | None = None
    wire_bytes: int | None = None
    ram_bytes: int | None = None
    nonzero_ram_bytes: int | None = None
    precopy_rounds: int | None = None
    integrity: str = "unchecked"
    repaired_pages: int = 0
    guest_check: str | None = None
    throughput: GuestThroughput | None = None
    cpu: CpuUsage | None = None
    timeline: Timeline | None = None
    samples: tuple[Sample, ...] = ()
    decisions: tuple[Decision, ...] = ()
    other_processes: tuple[str, ...] = ()

    @property
    def completed(self) -> bool:
        return self.status is RunStatus.COMPLETED


@dataclass(frozen=True)
class LinkMeasurement:
    """The migration link as measured by a TCP stream between the lab hosts.

    ``nominal_mbit`` is the tbf cap (None: uncapped veth); ``measured_bytes_per_s``
    what one TCP stream achieved over ``duration_s``.
    """

    nominal_mbit: float | None
    measured_bytes_per_s: float
    duration_s: float

    @property
    def limit_bytes_per_s(self) -> float:
        """The link's physical limit: the cap if there is one, else what was measured
        (the slower of the two when both exist)."""
        if self.nominal_mbit is None:
            return self.measured_bytes_per_s
        return min(self.nominal_mbit * 1e6 / 8, self.measured_bytes_per_s)


@dataclass(frozen=True)
class BenchEnvironment:
    """The machine and software the suite ran on, and how busy the machine was;
    ``revision`` is livemig's ``git describe --always --dirty`` (or "unknown")."""

    cpu_count: int
    memory_gib: float
    host_kernel: str
    qemu_version: str
    accelerator: str
    cpu_model: str
    guest_kernel: str
    python: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] | None = None
    other_busy_processes: tuple[str, ...] = ()
    revision: str = "unknown"


@dataclass(frozen=True)
class BenchResults:
    """A suite's results: ``results.json``."""

    format_version: int
    suite: Suite
    command: str
    started_at: float
    environment: BenchEnvironment
    links: tuple[LinkMeasurement, ...]
    omitted: tuple[Omitted, ...]
    runs: tuple[RunResult, ...]
    finished_at: float | None = None

    def link_for(self, bandwidth_mbit: float | None) -> LinkMeasurement | None:
        for link in self.links:
            if link.nominal_mbit == bandwidth_mbit:
                return link
        return None

    def runs_of(self, config: str) -> tuple[RunResult, ...]:
        return tuple(run for run in self.runs if run.config == config)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_dict(self)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResults:
        """Raises ValueError if ``data`` does not describe results."""
        return from_dict(cls, data)

    def save(self, directory: Path) -> Path:
        """Write ``directory/results.json`` atomically; returns its path.

        Raises :class:`OutputError` if it cannot be written.
        """
        path = directory / RESULTS_FILE
        tmp = path.with_suffix(".json.tmp")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}", path) from exc
        return path

    @classmethod
    def load(cls, directory_or_file: Path) -> BenchResults:
        """Read results from a directory (its ``results.json``) or a file.

        Raises :class:`ResultsError` if it is missing, not a regular file (a FIFO, a
        device), larger than :data:`MAX_RESULTS_BYTES`, not UTF-8, not strict JSON
        (or nested too deep), or not results of this format version.
        """
        path = directory_or_file
        if path.is_dir():
            path = path / RESULTS_FILE
        try:
            data = read_input_json(path, MAX_RESULTS_BYTES)
        except JsonInputError as exc:
            raise ResultsError(f"not JSON: {exc.detail}", path) from exc
        except InputFileError as exc:
            raise ResultsError(str(exc), path) from exc
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            found = data.get("format_version") if isinstance(data, dict) else None
            raise ResultsError(
                f"results format {found!r}, this version reads {FORMAT_VERSION}", path
            )
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ResultsError(f"not benchmark results: {exc}", path) from exc


def check_results_dir(directory: Path) -> Path:
    """Check ``directory`` can be created (if missing) and written, before a suite
    runs for an hour. Raises :class:`OutputError`: it is a file, cannot be created,
    is read-only, or its name is not valid UTF-8."""
    try:
        return check_output_dir(directory, "results directory")
    except ConfigError as exc:
        raise OutputError(str(exc), directory) from None

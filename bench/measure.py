"""Measurements around one migration that the engine's report does not make.

- the guest's OpenSSL throughput before, during and after the migration, from the
  ``OPENSSL sha256 bytes=16384 kbps=N`` lines of the source's and the target's
  serial consoles (timestamped on arrival);
- host CPU time of the source QEMU, the target QEMU and the engine (psutil);
- the guest RAM that is not zero (the least that must cross the link).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import psutil

from bench.results import CpuUsage, GuestThroughput, OpensslPoint
from dirtytrack.ram import PAGE_SIZE, RamMapping
from lab.qemu import ConsoleLine

_OPENSSL_RE = re.compile(r"^OPENSSL \S+ bytes=\d+ kbps=(\d+(?:\.\d+)?)")
_PAGES_PER_CHUNK = 8192  # 32 MiB of RAM per numpy reduction


def openssl_points(
    lines: Iterable[ConsoleLine], side: str, origin: float
) -> tuple[OpensslPoint, ...]:
    """The OpenSSL lines among ``lines`` as points, ``t_ms`` after ``origin`` (realtime s)."""
    points = []
    for line in lines:
        match = _OPENSSL_RE.match(line.text)
        if match is not None:
            points.append(OpensslPoint((line.timestamp - origin) * 1e3, float(match[1]), side))
    return tuple(points)


def guest_throughput(
    source: Sequence[OpensslPoint],
    target: Sequence[OpensslPoint],
    resume_ms: float | None,
    warmup_ms: float,
) -> GuestThroughput:
    """Mean throughput before (the last ``warmup_ms`` before ``migrate``), during
    (``migrate`` → target resume, on the source) and after (target, after resume).

    Each line reports the guest's previous second, so the line that arrives first
    after the resume still covers work done on the source: "after" is a mean over
    the settle window, not an instant.
    """
    before = [p.kbps for p in source if -warmup_ms <= p.t_ms < 0]
    end = resume_ms if resume_ms is not None else float("inf")
    during = [p.kbps for p in source if 0 <= p.t_ms <= end]
    after = [p.kbps for p in target if resume_ms is not None and p.t_ms > resume_ms]
    return GuestThroughput(
        before_kbps=statistics.fmean(before) if before else None,
        during_kbps=statistics.fmean(during) if during else None,
        after_kbps=statistics.fmean(after) if after else None,
        points=tuple(sorted((*source, *target), key=lambda p: p.t_ms)),
    )


def count_nonzero_bytes(ram_file: Path) -> int:
    """Bytes of guest RAM in pages that are not all zero (blocking: ~50 ms per 256 MiB;
    call it on a worker thread). Raises :class:`~dirtytrack.errors.RamMappingError`."""
    with RamMapping(ram_file) as ram:
        pages = ram.pages()
        nonzero = 0
        for first in range(0, len(pages), _PAGES_PER_CHUNK):
            nonzero += int(np.count_nonzero(pages[first : first + _PAGES_PER_CHUNK].any(axis=1)))
        del pages  # release the view before the mapping closes
    return nonzero * PAGE_SIZE


def _cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(times.user + times.system)


def is_network_probe(process: psutil.Process) -> bool:
    """The ICMP probe runs for the benchmark, not for the migration."""
    return any("lab.probe" in arg for arg in process.cmdline())


class CpuMeter:
    """CPU seconds (user + system) over a window, per role: ``source`` and ``target``
    (the QEMUs named at construction) and ``engine``.

    The engine is this process and every process it started, other than the named
    ones and those ``exclude`` picks (the ICMP probe): pagestream's sender and
    receiver agents count as engine. :meth:`start` takes the baseline (processes
    started later begin at zero); :meth:`read` may be called often (at every progress
    sample), and a process that exits keeps its last reading; :meth:`finish` closes
    the window.
    """

    ENGINE = "engine"

    def __init__(
        self,
        pids: Mapping[str, int | None],
        exclude: Callable[[psutil.Process], bool] = is_network_probe,
    ) -> None:
        self._named: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            try:
                self._named[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
        self._self = psutil.Process()
        self._exclude = exclude
        self._excluded: set[psutil.Process] = set()
        self._role: dict[psutil.Process, str] = {}
        self._base: dict[psutil.Process, float] = {}
        self._last: dict[psutil.Process, float] = {}
        self._started: float | None = None
        self._finished: float | None = None

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        found = [*self._named.items(), (self.ENGINE, self._self)]
        named = set(self._named.values())
        try:
            children = self._self.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child in named or child in self._excluded:
                continue
            if child not in self._role:
                try:
                    if self._exclude(child):
                        self._excluded.add(child)
                        continue
                except psutil.Error:
                    continue
            found.append((self.ENGINE, child))
        return found

    def start(self) -> None:
        if self._started is not None:
            return
        self._started = time.monotonic()
        for role, process in self._processes():
            if (seconds := _cpu_seconds(process)) is not None:
                self._role[process] = role
                self._base[process] = self._last[process] = seconds

    def read(self) -> None:
        if self._started is None or self._finished is not None:
            return
        for role, process in self._processes():
            if (seconds := _cpu_seconds(process)) is not None:
                self._role[process] = role
                self._base.setdefault(process, 0.0)  # started inside the window
                self._last[process] = seconds

    def finish(self) -> None:
        self.read()
        if self._started is not None and self._finished is None:
            self._finished = time.monotonic()

    def usage(self) -> CpuUsage | None:
        """The window's figures, or None if :meth:`start` and :meth:`finish` did not run."""
        if self._started is None or self._finished is None:
            return None

        def spent(role: str) -> float | None:
            mine = [p for p, r in self._role.items() if r == role]
            if not mine:
                return None
            return sum(self._last[p] - self._base[p] for p in mine)

        return CpuUsage(
            window_s=self._finished - self._started,
            source_s=spent("source"),
            target_s=spent("target"),
            engine_s=spent(self.ENGINE),
        )

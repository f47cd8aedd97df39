"""The real backend: migrations of the test guest in the namespace lab.

Each run is one :func:`lab.demo.run_demo` (its own lab, a freshly booted
source, an incoming target, the ICMP probe), for a raw peer one
:func:`lab.raw.run_raw_demo` (the same lab, guest, probe and guest check; the peer
migrates instead of livemig's engine), or for a libvirt run one
:func:`lab.libvirt_demo.run_libvirt_demo` (a libvirtd per lab host, the guest as a
domain; libvirt's job run one of ``LIBVIRT_WAYS``; no CPU meter: libvirt owns the
QEMUs). Both are observed through the demo's hooks
and the same event stream: the source's RAM is scanned for non-zero pages before
the migration task starts, CPU time is read from the start of pre-copy at every
progress sample and before the target resumes (engine runs: a raw peer's downtime
gets nothing of ours), and the guest's OpenSSL lines are taken from both serial
consoles afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.errors import LinkMeasureError
from bench.measure import CpuMeter, count_nonzero_bytes, guest_throughput, openssl_points
from bench.policies import policy_named, raw_peer_named
from bench.results import CORRUPTED, BenchEnvironment, LinkMeasurement, RunResult, RunStatus
from bench.runner import PlannedRun
from lab.accel import choose_accelerator
from lab.demo import DemoConfig, DemoHooks, Workload, run_demo
from lab.guest import ensure_guest
from lab.net import Lab
from lab.qemu import QemuProcess
from lab.raw import run_raw_demo
from migrate.deadline import within
from migrate.events import EventBus, Finished, MigrationEvent, PhaseChanged, Progress
from migrate.phase import Phase
from migrate.report import MigrationReport

LINK_PROBE_PORT = 5201
LINK_PROBE_SECONDS = 1.5
_BUSY_RE = re.compile(r"pytest|qemu-system")


class LabBackend:
    """Runs scenarios as demo migrations in a fresh lab each (needs root)."""

    async def environment(self) -> BenchEnvironment:
        guest = await asyncio.to_thread(ensure_guest)
        accel = await choose_accelerator(guest)
        one, five, fifteen = os.getloadavg()
        return BenchEnvironment(
            cpu_count=os.cpu_count() or 0,
            memory_gib=psutil.virtual_memory().total / (1 << 30),
            host_kernel=platform.release(),
            qemu_version=_qemu_version(),
            accelerator=accel.accelerator.value,
            cpu_model=accel.cpu_model,
            guest_kernel=guest.kernel_version,
            python=platform.python_version(),
            load_before=(one, five, fifteen),
            other_busy_processes=_other_busy_processes(),
            revision=_revision(),
        )

    def other_activity(self) -> tuple[str, ...]:
        return _other_busy_processes()

    async def measure_link(self, bandwidth_mbit: float | None) -> LinkMeasurement:
        """One TCP stream from host A to host B for 1.5 s. Raises :class:`LinkMeasureError`."""
        with Lab(bandwidth_mbit=bandwidth_mbit) as lab:
            addr = lab.host_b.migration_addr
            receiver = await asyncio.create_subprocess_exec(
                *lab.netns_argv(lab.host_b.netns, [sys.executable, "-m", "bench.linkprobe",
                    "receive", "--bind", addr, "--port", str(LINK_PROBE_PORT)]),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                assert receiver.stdout is not None
                ready = await within(receiver.stdout.readline(), 10)
                if b"READY" not in ready:
                    raise LinkMeasureError("link receiver did not start", ready.decode())
                sender = await asyncio.create_subprocess_exec(
                    *lab.netns_argv(lab.host_a.netns, [sys.executable, "-m", "bench.linkprobe",
                        "send", "--to", addr, "--port", str(LINK_PROBE_PORT),
                        "--seconds", str(LINK_PROBE_SECONDS)]),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
                try:
                    sent, _ = await within(sender.communicate(), 30)
                finally:
                    await _reap(sender)
                if sender.returncode != 0:
                    raise LinkMeasureError("link sender failed", sent.decode())
                out, _ = await within(receiver.communicate(), 10)
            except TimeoutError as exc:
                raise LinkMeasureError("link measurement timed out") from exc
            finally:
                await _reap(receiver)
        try:
            figures = json.loads(out.decode().strip().splitlines()[-1])
            seconds, total = float(figures["seconds"]), int(figures["bytes"])
        except (ValueError, KeyError, IndexError) as exc:
            raise LinkMeasureError("link receiver said no figures", out.decode()) from exc
        if seconds <= 0 or total <= 0:
            raise LinkMeasureError("link receiver got no data", out.decode())
        return LinkMeasurement(
            nominal_mbit=bandwidth_mbit, measured_bytes_per_s=total / seconds, duration_s=seconds
        )

    async def run(self, planned: PlannedRun, log_dir: Path) -> RunResult:
        """Raises :class:`~migrate.errors.LivemigError` (set-up failures) and
        :class:`~bench.errors.BenchError`; a failed migration is a result."""
        scenario = planned.scenario
        way = None
        if scenario.is_libvirt:
            # Imported here: only libvirt runs need libvirt-python.
            from lab.libvirt_demo import libvirt_way

            way = libvirt_way(scenario.policy)
        config = DemoConfig(
            strategy=scenario.strategy,
            workload=Workload.parse(scenario.workload),
            memory_mib=scenario.memory_mib,
            dirty_mib=scenario.dirty_mib,
            bandwidth_mbit=scenario.bandwidth_mbit,
            policy=way.policy if way is not None else policy_named(scenario.policy),
            verify=way.verify if way is not None else True,
            warmup_s=scenario.warmup_s,
            settle_s=scenario.settle_s,
            log_dir=log_dir,
        )
        observer = _RunObserver()
        events = EventBus()
        events.add_callback(observer.on_event)
        started_at, t0 = time.time(), time.monotonic()
        if way is not None:
            from lab.libvirt_demo import run_libvirt_demo

            demo = await run_libvirt_demo(config, events, observer.libvirt_hooks())
        elif scenario.is_raw:
            peer = raw_peer_named(scenario.policy)
            demo = await run_raw_demo(config, peer, events, observer.hooks())
        else:
            demo = await run_demo(config, events, observer.hooks())
        return observer.result(planned, demo.report, started_at, time.monotonic() - t0)


class _RunObserver:
    """What one run's hooks and events collect."""

    def __init__(self) -> None:
        self.source: QemuProcess | None = None
        self.target: QemuProcess | None = None
        self.meter: CpuMeter | None = None
        self.nonzero_ram_bytes: int | None = None

    def hooks(self) -> DemoHooks:
        return DemoHooks(
            before_migration=self.before_migration, before_target_resume=self.before_resume
        )

    async def before_migration(self, source: QemuProcess, target: QemuProcess) -> None:
        self.source, self.target = source, target
        if source.ram_path is not None:
            self.nonzero_ram_bytes = await asyncio.to_thread(count_nonzero_bytes, source.ram_path)
        # Started when pre-copy begins: preflight and the forecast are not migration work.
        self.meter = CpuMeter({"source": source.pid, "target": target.pid})

    def libvirt_hooks(self) -> DemoHooks:
        """For a libvirt run: the consoles only (libvirt owns the QEMUs, and the
        target's does not exist before the migration, so no CPU meter)."""
        return DemoHooks(before_migration=self.consoles)

    async def consoles(self, source: QemuProcess, target: QemuProcess) -> None:
        self.source, self.target = source, target

    async def before_resume(self, source: QemuProcess, target: QemuProcess) -> None:
        # The source has sent everything by now; it may quit before the next sample.
        if self.meter is not None:
            self.meter.read()

    def on_event(self, event: MigrationEvent) -> None:
        if self.meter is None:
            return
        if isinstance(event, PhaseChanged) and event.phase is Phase.PRECOPY:
            self.meter.start()
        elif isinstance(event, Progress):
            self.meter.read()
        elif isinstance(event, Finished):
            self.meter.finish()

    def result(
        self, planned: PlannedRun, report: MigrationReport, started_at: float, wall_s: float
    ) -> RunResult:
        tl = report.timeline
        throughput = None
        if self.source is not None and self.target is not None:
            throughput = guest_throughput(
                openssl_points(self.source.console.lines, "source", tl.started_at),
                openssl_points(self.target.console.lines, "target", tl.started_at),
                tl.target_resume_ms,
                planned.scenario.warmup_s * 1e3,
            )
        probe = report.probe
        return RunResult(
            config=planned.config,
            comparison=planned.comparison,
            scenario=planned.scenario,
            repetition=planned.repetition,
            index=planned.index,
            status=RunStatus(report.status.value),
            started_at=started_at,
            wall_s=wall_s,
            error=report.error,
            guest_downtime_ms=report.guest_downtime_ms,
            probe_sent=probe.sent if probe else None,
            probe_lost=probe.lost if probe else None,
            downtime_ms=report.downtime_ms,
            total_time_ms=report.total_time_ms,
            qemu_total_time_ms=report.qemu_total_time_ms,
            stop_to_resume_ms=tl.stop_to_resume_ms,
            transferred_bytes=report.transferred_bytes,
            wire_bytes=report.wire_bytes,
            ram_bytes=report.ram_bytes,
            nonzero_ram_bytes=self.nonzero_ram_bytes,
            precopy_rounds=report.precopy_rounds,
            integrity=run_integrity(report),
            repaired_pages=report.repaired_pages,
            guest_check=report.guest_check,
            throughput=throughput,
            cpu=self.meter.usage() if self.meter is not None else None,
            timeline=tl,
            samples=report.samples,
            decisions=report.decisions,
        )


def run_integrity(report: MigrationReport) -> str:
    """A run's integrity: ``corrupted`` if the guest's own check failed on the target,
    else the engine's RAM check (``ok``, ``failed``, ``unchecked``)."""
    if (report.guest_check or "").startswith("failed"):
        return CORRUPTED
    return report.integrity.value


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def _revision() -> str:
    """The livemig source this process runs: ``git describe --always --dirty``."""
    checkout = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _other_busy_processes() -> tuple[str, ...]:
    """pytest and QEMU processes on the machine that are neither ours nor our
    ancestors (noise sources)."""
    me = psutil.Process()
    mine = {p.pid for p in (me, *me.children(recursive=True), *me.parents())}
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
            if proc.info["pid"] not in mine and _BUSY_RE.search(cmdline):
                found.append(f"{proc.info['pid']} {cmdline[:80]}")
    return tuple(found)

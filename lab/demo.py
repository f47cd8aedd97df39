"""``livemig demo``: boot the test guest on lab host A, migrate it live to host B.

Builds what is missing (guest), picks the accelerator by probe, creates the lab,
starts the source VM with the chosen workload, probes it from the client namespace
every millisecond, starts the incoming VM (``-incoming defer -S``) on host B, runs
the migration, and returns the engine's report enriched with what only the lab can
see: the guest-visible downtime, bytes on the migration link, and the guest's own
checks after the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.accel import AccelChoice, choose_accelerator
from lab.guest import GuestImage, ensure_guest
from lab.net import Lab
from lab.probe import NetworkProbe, ProbeRecord
from lab.qemu import RAM_DIR, QemuProcess
from migrate import validate
from migrate.api import Migration
from migrate.disks.images import create_image, create_like, image_info
from migrate.disks.model import CacheMode, DiskFormat, DiskSpec
from migrate.engine import strategy_for
from migrate.errors import ConfigError, QemuError
from migrate.events import EventBus
from migrate.files import check_output_dir
from migrate.plan import BandwidthHint, plan_migration
from migrate.policy import Policy
from migrate.report import MigrationReport, Predicted, ProbeSummary, offset_ms
from migrate.strategy import HostEndpoint, MigrationHooks, MigrationRequest
from migrate.vmspec import NicSpec, VMSpec

GUEST_MAC = "52:54:00:4c:4d:01"
MIGRATION_PORT = 4444
_PART_RE = re.compile(r"openssl|(dirty|disk):([0-9]{1,6}(?:\.[0-9]{1,6})?)")
_WORKLOADS = "idle, or openssl, dirty:MIBPS, disk:MIBPS joined by + (e.g. openssl+disk:4)"


@dataclass(frozen=True)
class Workload:
    """What the guest runs: ``idle``, or parts joined by ``+``: ``openssl``,
    ``dirty:MIBPS`` (memory), ``disk:MIBPS`` (a pattern written to the guest's disk
    and read back), e.g. ``openssl+dirty:8`` or ``openssl+disk:4``."""

    text: str

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for anything else (the text goes on the guest's
        kernel command line: a space or a newline would add parameters)."""
        text = self.text
        if not isinstance(text, str) or len(text) > 64:
            raise ConfigError(f"unknown workload {text!r} ({_WORKLOADS})")
        if text == "idle":
            return
        kinds = []
        for part in text.split("+"):
            match = _PART_RE.fullmatch(part)
            if not match or (match.group(2) is not None and float(match.group(2)) <= 0):
                raise ConfigError(f"unknown workload {text!r} ({_WORKLOADS})")
            kinds.append(match.group(1) or part)
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"workload {text!r} names a part twice")

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Raises :class:`ConfigError` for anything else."""
        return cls(text)

    @property
    def parts(self) -> tuple[str, ...]:
        return () if self.text == "idle" else tuple(self.text.split("+"))

    @property
    def runs_openssl(self) -> bool:
        return "openssl" in self.parts

    @property
    def dirties_memory(self) -> bool:
        return any(p.startswith("dirty:") for p in self.parts)

    @property
    def writes_disk(self) -> bool:
        return any(p.startswith("disk:") for p in self.parts)


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. Sizes in MiB, bandwidth in Mbit/s, times in seconds."""

    strategy: str = "native"
    workload: Workload = field(default_factory=lambda: Workload("openssl"))
    memory_mib: int = 256
    dirty_mib: int = 64
    bandwidth_mbit: float | None = None
    offline: bool = False
    verify: bool = True
    repair: bool = True
    policy: Policy = field(default_factory=Policy)
    probe_interval_ms: float = 1.0
    warmup_s: float = 1.0
    settle_s: float = 1.0
    log_dir: Path | None = None
    cpu_model: str | None = None
    force: bool = False
    predict: bool = True
    with_local_disks: bool = False
    disk_mib: int = 64
    disk_copy_mode: str = "write-blocking"

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for values no guest or lab can take."""
        validate.text(self.strategy, "strategy", pattern=validate.PLAIN_NAME, max_length=64)
        if not isinstance(self.workload, Workload):
            raise ConfigError(f"workload must be a Workload, not {self.workload!r}")
        validate.whole(self.memory_mib, "memory_mib", minimum=16, maximum=1 << 20)
        validate.whole(self.dirty_mib, "dirty_mib", minimum=1, maximum=1 << 20)
        if self.dirty_mib > self.memory_mib:
            raise ConfigError(
                f"dirty_mib {self.dirty_mib} is more than the guest's memory_mib {self.memory_mib}"
            )
        if self.bandwidth_mbit is not None:
            validate.number(self.bandwidth_mbit, "bandwidth_mbit", above=0, maximum=1e7)
        for name in ("offline", "verify", "repair", "force", "predict", "with_local_disks"):
            validate.flag(getattr(self, name), name)
        validate.whole(self.disk_mib, "disk_mib", minimum=1, maximum=1 << 20)
        if self.disk_copy_mode not in ("write-blocking", "background"):
            raise ConfigError(f"unknown disk copy mode {self.disk_copy_mode!r}")
        if not isinstance(self.policy, Policy):
            raise ConfigError(f"policy must be a Policy, not {self.policy!r}")
        validate.number(self.probe_interval_ms, "probe_interval_ms", above=0, maximum=1000)
        validate.number(self.warmup_s, "warmup_s", minimum=0, maximum=3600)
        validate.number(self.settle_s, "settle_s", minimum=0, maximum=3600)
        if self.log_dir is not None and not isinstance(self.log_dir, Path):
            raise ConfigError(f"log_dir must be a Path, not {self.log_dir!r}")
        if self.cpu_model is not None:
            validate.text(self.cpu_model, "cpu_model", max_length=4096)


@dataclass(frozen=True)
class DemoEnvironment:
    """What the demo ran on, reported beside the migration report."""

    accelerator: str
    accelerator_reason: str
    cpu_model: str
    kernel: str
    guest_key: str
    workload: str
    bandwidth_mbit: float | None


@dataclass(frozen=True)
class DemoResult:
    report: MigrationReport
    environment: DemoEnvironment

    def to_dict(self) -> dict[str, object]:
        data = self.report.to_dict()
        data["environment"] = dataclasses.asdict(self.environment)
        return data


@dataclass(frozen=True)
class DemoHooks:
    """Test and benchmark seams: called with the running QEMU processes at fixed points.

    ``before_migration`` runs after the warm-up, right before the migration task is
    created (nothing of the migration overlaps it); ``after_migration_started`` right
    after; ``before_target_resume`` once the target has loaded the VM, paused.
    """

    before_migration: Callable[[QemuProcess, QemuProcess], Awaitable[None]] | None = None
    after_migration_started: Callable[[QemuProcess, QemuProcess], Awaitable[None]] | None = None
    before_target_resume: Callable[[QemuProcess, QemuProcess], Awaitable[None]] | None = None


#: The demo guest's disk (``/dev/vda`` in the guest).
DISK_ID = "disk0"


def needs_disk(config: DemoConfig) -> bool:
    return config.workload.writes_disk or config.with_local_disks


def guest_spec(
    config: DemoConfig,
    guest: GuestImage,
    accel: AccelChoice,
    address: str,
    disk_path: Path | None = None,
) -> VMSpec:
    """The demo guest; with ``disk_path`` a virtio-blk disk of ``config.disk_mib`` MiB
    (qcow2, local to each host: the target gets its own image)."""
    disks: tuple[DiskSpec, ...] = ()
    if disk_path is not None:
        disks = (
            DiskSpec(
                DISK_ID, disk_path, config.disk_mib << 20, DiskFormat.QCOW2, CacheMode.WRITEBACK
            ),
        )
    append = (
        f"console=ttyS0 quiet panic=-1 mitigations=off livemig.ip={address} "
        f"livemig.workload={config.workload.text} livemig.dirty_mib={config.dirty_mib}"
    )
    return VMSpec(
        name="demo",
        memory_mib=config.memory_mib,
        cpu_model=config.cpu_model or accel.cpu_model,
        accelerator=accel.accelerator,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=append,
        nics=(NicSpec(mac=GUEST_MAC),),
        disks=disks,
    )


@contextlib.asynccontextmanager
async def disk_site(config: DemoConfig) -> AsyncIterator[tuple[Path, Path] | None]:
    """The source's and the target's disk images (empty qcow2 files of the same
    virtual size, as a target host prepares its copy of a local disk) in a private
    directory removed on exit; None when the demo needs no disk."""
    if not needs_disk(config):
        yield None
        return
    site = Path(tempfile.mkdtemp(prefix=f"livemig-{os.getpid()}-disks-", dir=RAM_DIR))
    try:
        source, target = site / "source-disk0.qcow2", site / "target-disk0.qcow2"
        await create_image(source, "qcow2", config.disk_mib << 20)
        await create_like(target, await image_info(source))
        yield source, target
    finally:
        shutil.rmtree(site, ignore_errors=True)


async def wait_workload_started(vm: QemuProcess, workload: Workload, timeout: float = 60.0) -> None:
    """Wait until the guest is up and its workload has reported once."""
    await vm.console.wait_for(r"^LIVEMIG READY", timeout)
    if workload.runs_openssl:
        await vm.console.wait_for(r"^OPENSSL ", timeout)
    if workload.dirties_memory:
        await vm.console.wait_for(r"^MEMDIRTY pass=", timeout)
    if workload.writes_disk:
        await vm.console.wait_for(r"^DISKCHECK (pass=|error)", timeout)


async def prepare_guest(config: DemoConfig) -> tuple[GuestImage, AccelChoice, DemoEnvironment]:
    """The built test guest, the accelerator a probe allows, and what to report of both."""
    guest = await asyncio.to_thread(ensure_guest)
    accel = await choose_accelerator(guest)
    environment = DemoEnvironment(
        accelerator=accel.accelerator.value,
        accelerator_reason=accel.reason,
        cpu_model=config.cpu_model or accel.cpu_model,
        kernel=guest.kernel_version,
        guest_key=guest.key,
        workload=config.workload.text,
        bandwidth_mbit=config.bandwidth_mbit,
    )
    return guest, accel, environment


@dataclass(frozen=True)
class LabPair:
    """What a migration in the lab works with: the lab, the guest's spec, the booted
    source on host A and the incoming target on host B (both launched, QMP open)."""

    lab: Lab
    spec: VMSpec
    source: QemuProcess
    target: QemuProcess
    disk_images: tuple[Path, Path] | None = None  # source's and target's image of disk0

    @property
    def migration_uri(self) -> str:
        return self.lab.host_b.migration_uri(MIGRATION_PORT)


#: Migrates the lab's guest and returns the report (also when the migration failed).
LabMigrator = Callable[[LabPair], Awaitable[MigrationReport]]


async def run_demo(
    config: DemoConfig, events: EventBus | None = None, hooks: DemoHooks | None = None
) -> DemoResult:
    """Run the demo; the result carries the report also when the migration failed.

    Raises :class:`~migrate.errors.LivemigError` subclasses for set-up failures.
    """
    strategy_for(config.strategy)
    if config.log_dir is not None:
        check_output_dir(config.log_dir, "log directory")
    events = events or EventBus()
    hooks = hooks or DemoHooks()

    async def migrate(pair: LabPair) -> MigrationReport:
        lab, source, target = pair.lab, pair.source, pair.target
        request = MigrationRequest(
            source=HostEndpoint(
                f"host-a ({lab.host_a.netns})", source.site.qmp_socket, netns=lab.host_a.netns
            ),
            target=HostEndpoint(
                f"host-b ({lab.host_b.netns})",
                target.site.qmp_socket,
                pair.migration_uri,
                netns=lab.host_b.netns,
            ),
            strategy=config.strategy,
            policy=config.policy,
            link_mbit=config.bandwidth_mbit,
            predict=config.predict,
            offline=config.offline,
            verify=config.verify,
            repair=config.repair,
            force=config.force,
            with_local_disks=config.with_local_disks,
            disk_copy_mode=config.disk_copy_mode,
            cpu_model=pair.spec.cpu_model,
            vm=pair.spec.name,
            hooks=_engine_hooks(hooks, source, target),
        )
        migration = Migration(request, source=source.qmp, target=target.qmp, events=events)
        await migration.start()
        if hooks.after_migration_started is not None:
            await hooks.after_migration_started(source, target)
        return await migration.run()

    return await run_in_lab(config, migrate, hooks, target_paused=True)


async def run_in_lab(
    config: DemoConfig,
    migrate: LabMigrator,
    hooks: DemoHooks | None = None,
    *,
    target_paused: bool = True,
) -> DemoResult:
    """Boot the guest in a fresh lab, probe it, migrate it with ``migrate``, check it.

    The source boots on host A with ``config``'s workload; the target waits on host B
    (``-incoming defer``, plus ``-S`` when ``target_paused``: otherwise QEMU starts
    the VM by itself once the incoming migration completes). After the warm-up,
    ``hooks.before_migration`` runs, then ``migrate``; the target is watched for
    ``config.settle_s`` and, if the migration completed, the guest checks itself
    (:func:`guest_check`). The report gets the probe's view (guest-visible
    downtime) and the bytes on the migration link. Raises
    :class:`~migrate.errors.LivemigError` subclasses for set-up failures.
    """
    hooks = hooks or DemoHooks()
    guest, accel, environment = await prepare_guest(config)
    with Lab(bandwidth_mbit=config.bandwidth_mbit) as lab:
        async with disk_site(config) as disks:
            address = lab.next_guest_address()
            guest_ip = address.split("/")[0]
            spec = guest_spec(config, guest, accel, address, disks[0] if disks else None)
            tap_a, tap_b = lab.add_tap(lab.host_a), lab.add_tap(lab.host_b)
            source = QemuProcess(
                spec,
                role="source",
                netns=lab.host_a.netns,
                taps={"net0": tap_a},
                log_dir=config.log_dir,
            )
            async with source:
                await wait_workload_started(source, config.workload)
                target = QemuProcess(
                    spec,
                    role="target",
                    netns=lab.host_b.netns,
                    taps={"net0": tap_b},
                    incoming=True,
                    paused=target_paused,
                    log_dir=config.log_dir,
                    disk_paths={DISK_ID: disks[1]} if disks else None,
                )
                async with (
                    target,
                    NetworkProbe(guest_ip, lab.client_ns, config.probe_interval_ms / 1e3) as probe,
                ):
                    probe_started = time.time()
                    await asyncio.sleep(config.warmup_s)
                    link_before = lab.migration_link_stats(lab.host_a).tx_bytes
                    console_mark = len(target.console.lines)
                    if hooks.before_migration is not None:
                        await hooks.before_migration(source, target)
                    report = await migrate(LabPair(lab, spec, source, target, disks))
                    await asyncio.sleep(config.settle_s)
                    wire = lab.migration_link_stats(lab.host_a).tx_bytes - link_before
                    if report.status == "completed":
                        check = await guest_check(target, config.workload, console_mark)
                        report = dataclasses.replace(report, guest_check=check, wire_bytes=wire)
                assert probe.record is not None
                report = dataclasses.replace(
                    _with_probe(report, probe.record, probe_started), wire_bytes=wire
                )
    return DemoResult(report=report, environment=environment)


async def plan_on_lab(
    config: DemoConfig, calc_time_s: int = 1
) -> tuple[Predicted, DemoEnvironment]:
    """Boot the test guest on lab host A with ``config``'s workload and forecast it
    (``livemig plan --lab``)."""
    if config.log_dir is not None:
        check_output_dir(config.log_dir, "log directory")
    guest, accel, environment = await prepare_guest(config)
    with Lab(bandwidth_mbit=config.bandwidth_mbit) as lab:
        async with disk_site(config) as disks:
            address = lab.next_guest_address()
            spec = guest_spec(config, guest, accel, address, disks[0] if disks else None)
            tap = lab.add_tap(lab.host_a)
            vm = QemuProcess(
                spec, role="source", netns=lab.host_a.netns, taps={"net0": tap},
                log_dir=config.log_dir,
            )  # fmt: skip
            async with vm:
                await wait_workload_started(vm, config.workload)
                await asyncio.sleep(config.warmup_s)
                bandwidth = BandwidthHint.for_policy(config.policy, config.bandwidth_mbit)
                predicted = await plan_migration(
                    vm.qmp, config.policy, bandwidth, vm.ram_path, calc_time_s
                )
    return predicted, environment


def _engine_hooks(hooks: DemoHooks, source: QemuProcess, target: QemuProcess) -> MigrationHooks:
    before = hooks.before_target_resume
    if before is None:
        return MigrationHooks()

    async def _before_target_resume() -> None:
        await before(source, target)

    return MigrationHooks(before_target_resume=_before_target_resume)


def _with_probe(
    report: MigrationReport, record: ProbeRecord, probe_started: float
) -> MigrationReport:
    """Add the guest-visible downtime and the probe's view of the timeline."""
    tl = report.timeline
    start = tl.started_at
    end = start + tl.ended_ms / 1e3
    gap = record.longest_gap(start, end)
    baseline = record.longest_gap(probe_started + 0.1, start)
    resume_at = start + tl.target_resume_ms / 1e3 if tl.target_resume_ms is not None else None
    first_reply = record.first_reply_after(resume_at) if resume_at is not None else None
    timeline = dataclasses.replace(tl, first_probe_reply_ms=offset_ms(start, first_reply))
    summary = None
    if gap is not None:
        summary = ProbeSummary(
            interval_ms=record.interval_ns / 1e6,
            sent=record.sent(start, end),
            lost=record.lost(start, end),
            longest_gap_ms=gap.duration_ms,
            gap_start_ms=(gap.start - start) * 1e3,
            gap_end_ms=(gap.end - start) * 1e3,
            max_send_gap_ms=record.max_send_gap_ms(start, end),
            baseline_gap_ms=baseline.duration_ms if baseline else None,
        )
    return dataclasses.replace(
        report,
        timeline=timeline,
        probe=summary,
        guest_downtime_ms=summary.longest_gap_ms if summary else None,
    )


async def guest_check(vm: QemuProcess, workload: Workload, since: int) -> str:
    """The guest's own verdict after the move, read from the target's console.

    ``dirty`` workloads: the first full memdirty verification pass that ran entirely
    on the target must report no bad pages (and no pass may report any). ``openssl``:
    a benchmark result must arrive from the target. Returns ``ok: ...`` or
    ``failed: ...``.
    """
    verdicts = []
    try:
        if (bad := _kernel_trouble(vm, since)) is not None:
            return f"failed: guest kernel: {bad}"
        if workload.dirties_memory:
            # The pass in progress at resume began on the source; the next one did not.
            first = await vm.console.wait_for(r"^MEMDIRTY pass=", 30, since=since)
            index = vm.console.lines.index(first)
            full = await vm.console.wait_for(r"^MEMDIRTY pass=", 30, since=index + 1)
            bad_passes = [
                line.text
                for line in vm.console.matching(r"^MEMDIRTY pass=", since)
                if " bad=0 " not in line.text
            ]
            if bad_passes:
                return f"failed: {bad_passes[0]}"
            verdicts.append(f"memdirty {full.text.split()[1]} verified on target")
        if workload.writes_disk:
            # As for memory: the first read-back pass that ran entirely on the target.
            first = await vm.console.wait_for(r"^DISKCHECK (pass=|error)", 30, since=since)
            index = vm.console.lines.index(first)
            full = await vm.console.wait_for(r"^DISKCHECK (pass=|error)", 30, since=index + 1)
            bad_passes = [
                line.text
                for line in vm.console.matching(r"^DISKCHECK (pass=|error)", since)
                if " bad=0 " not in line.text
            ]
            if bad_passes:
                return f"failed: {bad_passes[0]}"
            verdicts.append(f"diskcheck {full.text.split()[1]} verified on target")
        if workload.runs_openssl:
            await vm.console.wait_for(r"^OPENSSL ", 30, since=since)
            verdicts.append("openssl running on target")
    except QemuError as exc:
        if (bad := _kernel_trouble(vm, since)) is not None:
            return f"failed: guest kernel: {bad}"
        if not vm.alive:
            return f"failed: target QEMU exited with {vm.returncode}"
        return f"failed: {exc}"
    if (bad := _kernel_trouble(vm, since)) is not None:
        return f"failed: guest kernel: {bad}"
    return "ok: " + (", ".join(verdicts) or "guest runs on target")


_KERNEL_TROUBLE = r"(BUG:|Oops|Kernel panic|general protection|is not a head|soft lockup)"


def _kernel_trouble(vm: QemuProcess, since: int) -> str | None:
    found = vm.console.matching(_KERNEL_TROUBLE, since)
    return found[0].text.split("] ", 1)[-1] if found else None

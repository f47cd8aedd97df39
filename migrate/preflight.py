"""Will this move work? Checks run before anything changes, over QMP and host readings.

Each check yields a :class:`PreflightCheck`: ``ok``, ``warning`` (the operator
should know) or ``refused`` (the move would fail or break the guest). Refusals
raise :class:`~migrate.errors.PreflightError` carrying every reason, unless the
operator forces the move; QEMU's own migration blockers can never be forced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cpumodel import CpuModelError, HostCpu, check_migration, load_host
from cpumodel.qemu import QmpCpuSession, host_from_expansion
from migrate import validate
from migrate.disks.classify import block_disks, classify
from migrate.errors import ConfigError, PreflightError, QemuError
from migrate.qmp import QmpSession
from migrate.report import PreflightCheck, Verdict

# What a QEMU process needs beyond guest RAM (measured RSS of a 128 MiB TCG guest
# here was ~70 MiB above its RAM); refuse when the target cannot hold RAM + this.
QEMU_OVERHEAD_BYTES = 256 << 20
_CPU_TYPE_SUFFIX = "-x86_64-cpu"


@dataclass(frozen=True)
class HostFacts:
    """What preflight knows about one host.

    ``cpu`` None asks that host's QEMU over QMP (``host`` under KVM, ``max`` under
    TCG: what it can give a guest); a description file overrides that.
    ``available_memory`` in bytes; None reads this machine (the lab's hosts share it).
    """

    cpu: HostCpu | None = None
    available_memory: int | None = None

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for a ``cpu`` that is no HostCpu or a negative
        (or non-integer) ``available_memory``."""
        if self.cpu is not None and not isinstance(self.cpu, HostCpu):
            raise ConfigError(f"host facts: cpu must be a HostCpu, not {self.cpu!r}")
        if self.available_memory is not None:
            validate.whole(self.available_memory, "host facts: available_memory", minimum=0)

    @classmethod
    def from_file(cls, path: Path) -> HostFacts:
        """A host described by a cpuinfo/lscpu/CPUID/libvirt/QMP file. Raises CpuModelError."""
        return cls(cpu=load_host(path))


@dataclass(frozen=True)
class PreflightReport:
    checks: tuple[PreflightCheck, ...] = field(default_factory=tuple)

    @property
    def refusals(self) -> tuple[PreflightCheck, ...]:
        return tuple(c for c in self.checks if c.verdict is Verdict.REFUSED)

    def enforce(self, force: bool) -> None:
        """Raise :class:`PreflightError` for refusals (forced ones only warn)."""
        blocking = [c for c in self.refusals if not (force and c.forceable)]
        if blocking:
            raise PreflightError(
                "preflight refused the migration"
                + ("" if force else " (--force overrides CPU and memory checks)"),
                [f"{c.name}: {c.detail}" for c in blocking],
            )


async def vm_cpu_model(session: QmpSession) -> str:
    """The running VM's CPU model name (``-cpu`` flag edits are not visible over QMP)."""
    cpus = await session.execute("query-cpus-fast")
    cpu_type = await session.execute("qom-get", {"path": cpus[0]["qom-path"], "property": "type"})
    name = str(cpu_type)
    return name[: -len(_CPU_TYPE_SUFFIX)] if name.endswith(_CPU_TYPE_SUFFIX) else name


def cpu_check(vm_cpu: str, source: HostCpu, target: HostCpu) -> PreflightCheck:
    try:
        result = check_migration(vm_cpu, source, target)
    except CpuModelError as exc:
        return PreflightCheck("cpu", Verdict.REFUSED, f"cannot judge -cpu {vm_cpu}: {exc}")
    if not result.compatible:
        return PreflightCheck("cpu", Verdict.REFUSED, "; ".join(result.reasons))
    if result.warnings:
        return PreflightCheck(
            "cpu", Verdict.WARNING, f"-cpu {vm_cpu}: " + "; ".join(result.warnings)
        )
    return PreflightCheck("cpu", Verdict.OK, f"-cpu {vm_cpu} runs on both hosts")


async def qemu_host_cpu(session: QmpSession, name: str) -> HostCpu:
    """The CPU the QEMU behind ``session`` can give guests. Raises CpuModelError."""
    cpu = QmpCpuSession(session.client)
    model = "host" if await cpu.kvm_enabled() else "max"
    return host_from_expansion((await cpu.expand(model)).props, name)


async def run_preflight(
    source: QmpSession,
    target: QmpSession,
    source_host: HostFacts,
    target_host: HostFacts,
    vm_cpu: str | None = None,
    with_local_disks: bool = False,
    shared_disks: tuple[str, ...] = (),
) -> PreflightReport:
    """All checks; never raises for a failed check (see :meth:`PreflightReport.enforce`).

    Disks: each writable disk is classified shared or local
    (:func:`migrate.disks.classify.classify`); a local one is refused unless
    ``with_local_disks``, a shared one with an unsafe cache mode unless forced.
    """
    checks: list[PreflightCheck] = []
    info = await source.execute("query-migrate")
    blocked = info.get("blocked-reasons") or []
    if blocked:
        checks.append(
            PreflightCheck(
                "migration-blockers", Verdict.REFUSED, "; ".join(blocked), forceable=False
            )
        )
    else:
        checks.append(PreflightCheck("migration-blockers", Verdict.OK, "QEMU reports none"))

    model = vm_cpu or await vm_cpu_model(source)
    try:
        src_cpu = source_host.cpu or await qemu_host_cpu(source, "source")
        dst_cpu = target_host.cpu or await qemu_host_cpu(target, "target")
        checks.append(await asyncio.to_thread(cpu_check, model, src_cpu, dst_cpu))
    except CpuModelError as exc:
        checks.append(PreflightCheck("cpu", Verdict.REFUSED, f"cannot describe a host CPU: {exc}"))

    ram = int((await source.execute("query-memory-size-summary"))["base-memory"])
    need = ram + QEMU_OVERHEAD_BYTES
    available = target_host.available_memory
    if available is None:
        available = psutil.virtual_memory().available
    verdict = Verdict.OK if available >= need else Verdict.REFUSED
    checks.append(
        PreflightCheck(
            "target-memory",
            verdict,
            f"guest RAM {ram >> 20} MiB + QEMU ~{QEMU_OVERHEAD_BYTES >> 20} MiB; "
            f"target has {available >> 20} MiB available",
        )
    )
    checks.extend(await _disk_checks(source, target, with_local_disks, shared_disks))
    checks.append(await _version_check(source, target))
    return PreflightReport(tuple(checks))


async def _disk_checks(
    source: QmpSession, target: QmpSession, with_local_disks: bool, shared_disks: tuple[str, ...]
) -> tuple[PreflightCheck, ...]:
    try:
        src, dst = await block_disks(source), await block_disks(target)
    except QemuError as exc:
        return (PreflightCheck("local-disks", Verdict.REFUSED, f"cannot list the disks: {exc}"),)
    return classify(src, dst, with_local_disks, shared_disks).checks


async def _version_check(source: QmpSession, target: QmpSession) -> PreflightCheck:
    try:
        versions = [await s.execute("query-version") for s in (source, target)]
        machines = [
            await s.execute("qom-get", {"path": "/machine", "property": "type"})
            for s in (source, target)
        ]
    except QemuError as exc:
        return PreflightCheck("qemu-versions", Verdict.WARNING, f"could not compare: {exc}")
    src, dst = ((v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]) for v in versions)
    detail = f"source QEMU {'.'.join(map(str, src))}, target {'.'.join(map(str, dst))}; machine {machines[0]}"
    if machines[0] != machines[1]:
        return PreflightCheck(
            "qemu-versions", Verdict.REFUSED, f"{detail} vs {machines[1]}", forceable=False
        )
    if dst < src:
        return PreflightCheck(
            "qemu-versions", Verdict.WARNING, f"{detail}: migrating to an older QEMU"
        )
    return PreflightCheck("qemu-versions", Verdict.OK, detail)

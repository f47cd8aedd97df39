"""Will the target daemon take this domain? Preflight through libvirt.

- ``cpu``: the domain's ``<cpu>`` against what the target's hypervisor can give a
  guest (``compareHypervisorCPU`` for the domain's virtualization type: libvirt's
  verdict); the flags missing there are named with :mod:`cpumodel` (the domain's
  model and features resolved through libvirt's cpu_map, against the target's
  ``host-model`` in its domain capabilities). Host-passthrough and maximum CPUs
  take whatever the host has: only a warning.
- ``target-memory``: the domain's memory plus QEMU's overhead against the target
  node's free memory (free + buffers + cache, from ``getMemoryStats``).
- ``target-domain``: no domain of that name or UUID already active on the target.
- ``versions``: both daemons' libvirt and hypervisor versions (older target: warning).

Refusals become :class:`~migrate.errors.PreflightError` through
:meth:`~migrate.preflight.PreflightReport.enforce`; CPU and memory are forceable.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from cpumodel import CpuModelError
from cpumodel.libvirt import load_cpu_map, parse_libvirt_cpus
from migrate.libvirt.conn import require_libvirt, translate
from migrate.preflight import QEMU_OVERHEAD_BYTES, PreflightReport
from migrate.report import PreflightCheck, Verdict

_PASSTHROUGH_MODES = {"host-passthrough", "maximum"}


@dataclass(frozen=True)
class DomainFacts:
    """What preflight reads of the domain on the source: its XML, type and memory."""

    xml: str
    virt_type: str
    memory_bytes: int
    name: str
    uuid: str
    active: bool


def domain_facts(domain: Any) -> DomainFacts:
    """Read ``domain`` (a ``virDomain``) once. Raises :class:`LibvirtError`."""
    lv = require_libvirt()
    try:
        xml = domain.XMLDesc(0)
        active = bool(domain.isActive())
        uuid = domain.UUIDString()
        name = domain.name()
    except lv.libvirtError as exc:
        raise translate(exc, "read the domain") from exc
    root = ET.fromstring(xml)
    memory = root.find("memory")
    unit = (memory.get("unit", "KiB") if memory is not None else "KiB").lower()
    scale = {"kib": 1 << 10, "k": 1 << 10, "mib": 1 << 20, "m": 1 << 20, "gib": 1 << 30,
             "g": 1 << 30, "b": 1, "bytes": 1}.get(unit, 1 << 10)  # fmt: skip
    amount = int((memory.text or "0") if memory is not None else "0") * scale
    return DomainFacts(xml, root.get("type", "kvm"), amount, name, uuid, active)


def cpu_element(domain_xml: str) -> ET.Element | None:
    return ET.fromstring(domain_xml).find("cpu")


def missing_cpu_flags(domain_xml: str, target_domcaps: str) -> tuple[str, ...]:
    """Flags of the domain's CPU that the target's ``host-model`` lacks (canonical names).

    Raises CpuModelError when either side cannot be read.
    """
    cpu_map = load_cpu_map()
    guest = parse_libvirt_cpus(domain_xml, cpu_map.model_flags, name="domain")[0]
    target = parse_libvirt_cpus(target_domcaps, cpu_map.model_flags, name="target")[0]
    return tuple(sorted(guest.flags - target.flags))


def cpu_check(facts: DomainFacts, target: Any) -> PreflightCheck:
    """The domain's CPU against the target hypervisor's (libvirt's verdict, our names)."""
    lv = require_libvirt()
    cpu = cpu_element(facts.xml)
    if cpu is None:
        return PreflightCheck("cpu", Verdict.OK, "the domain names no CPU: hypervisor default")
    mode = cpu.get("mode", "custom")
    if mode in _PASSTHROUGH_MODES:
        return PreflightCheck(
            "cpu", Verdict.WARNING, f"CPU mode {mode}: the guest sees whatever each host has"
        )
    cpu_xml = ET.tostring(cpu, encoding="unicode")
    try:
        verdict = target.compareHypervisorCPU(None, "x86_64", None, facts.virt_type, cpu_xml, 0)
        domcaps = target.getDomainCapabilities(None, "x86_64", None, facts.virt_type, 0)
    except lv.libvirtError as exc:
        return PreflightCheck("cpu", Verdict.REFUSED, f"target cannot judge the CPU: {exc}")
    model = (cpu.findtext("model") or "").strip() or "(no model)"
    if verdict in (lv.VIR_CPU_COMPARE_IDENTICAL, lv.VIR_CPU_COMPARE_SUPERSET):
        return PreflightCheck(
            "cpu", Verdict.OK, f"target {facts.virt_type} hypervisor runs {model}"
        )
    try:
        missing = missing_cpu_flags(facts.xml, domcaps)
    except CpuModelError as exc:
        missing = ()
        named = f"(flags not named: {exc})"
    else:
        named = f"target lacks {', '.join(missing)}" if missing else "(flags not named)"
    return PreflightCheck(
        "cpu",
        Verdict.REFUSED,
        f"libvirt on the target says its {facts.virt_type} hypervisor cannot run CPU "
        f"{model}: {named}",
    )


def memory_check(facts: DomainFacts, target: Any) -> PreflightCheck:
    lv = require_libvirt()
    try:
        stats = target.getMemoryStats(lv.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
    except lv.libvirtError as exc:
        return PreflightCheck("target-memory", Verdict.WARNING, f"not readable: {exc}")
    available = sum(int(stats.get(k, 0)) for k in ("free", "buffers", "cached")) << 10
    need = facts.memory_bytes + QEMU_OVERHEAD_BYTES
    verdict = Verdict.OK if available >= need else Verdict.REFUSED
    return PreflightCheck(
        "target-memory",
        verdict,
        f"guest RAM {facts.memory_bytes >> 20} MiB + QEMU ~{QEMU_OVERHEAD_BYTES >> 20} MiB; "
        f"target has {available >> 20} MiB free (free + buffers + cache)",
    )


def target_domain_check(facts: DomainFacts, target: Any) -> PreflightCheck:
    lv = require_libvirt()
    found = []
    for lookup, key in ((target.lookupByUUIDString, facts.uuid), (target.lookupByName, facts.name)):
        try:
            other = lookup(key)
        except lv.libvirtError:
            continue
        if other.isActive():
            found.append(f"{other.name()} ({other.UUIDString()})")
    if found:
        return PreflightCheck(
            "target-domain", Verdict.REFUSED, f"already running on the target: {found[0]}",
            forceable=False,
        )  # fmt: skip
    return PreflightCheck("target-domain", Verdict.OK, "no such domain running on the target")


def _version(number: int) -> tuple[int, int, int]:
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def version_check(source: Any, target: Any) -> PreflightCheck:
    lv = require_libvirt()
    try:
        libs = [_version(c.getLibVersion()) for c in (source, target)]
        hvs = [_version(c.getVersion()) for c in (source, target)]
    except lv.libvirtError as exc:
        return PreflightCheck("versions", Verdict.WARNING, f"could not compare: {exc}")

    def dotted(v: tuple[int, int, int]) -> str:
        return ".".join(map(str, v))

    detail = (
        f"libvirt {dotted(libs[0])} → {dotted(libs[1])}, "
        f"hypervisor {dotted(hvs[0])} → {dotted(hvs[1])}"
    )
    if hvs[1] < hvs[0]:
        return PreflightCheck("versions", Verdict.WARNING, f"{detail}: the target's is older")
    return PreflightCheck("versions", Verdict.OK, detail)


def run_preflight(facts: DomainFacts, source: Any, target: Any) -> PreflightReport:
    """Every check (blocking libvirt calls: run it in a thread)."""
    checks = [cpu_check(facts, target), target_domain_check(facts, target)]
    if facts.active:
        checks.append(memory_check(facts, target))
    checks.append(version_check(source, target))
    return PreflightReport(tuple(checks))

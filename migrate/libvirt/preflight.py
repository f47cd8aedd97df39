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
- ``disks``: each disk shared (network disks, files on a shared filesystem as this
  machine mounts it, ``<shareable/>``) or local (writable and on local storage:
  libvirt would need ``--copy-storage-all``, which the libvirt strategy does not do).
- ``devices``: devices QEMU or libvirt cannot migrate (host PCI/USB/mdev devices,
  virtio-fs, ivshmem, a passthrough TPM): never forceable.
- ``versions``: both daemons' libvirt and hypervisor versions (older target: warning).

Refusals become :class:`~migrate.errors.PreflightError` through
:meth:`~migrate.preflight.PreflightReport.enforce`; CPU and memory are forceable.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
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


#: Filesystems both hosts can see the same file on (as /proc/mounts names them).
SHARED_FS_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse.glusterfs", "ocfs2", "gfs2",
     "gpfs", "lustre", "beegfs", "fuse.quobyte", "9p", "virtiofs", "fuse.cephfs"}
)  # fmt: skip


@dataclass(frozen=True)
class DiskFacts:
    """One ``<disk>`` of the domain: where it lives and whether the target sees it too."""

    target: str
    device: str
    source: str
    shared: bool
    why: str


def mount_table(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) from /proc/mounts text, longest mount point first."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((fields[1].replace("\\040", " "), fields[2]))
    return sorted(mounts, key=lambda m: len(m[0]), reverse=True)


def _fs_type(path: str, mounts: Iterable[tuple[str, str]]) -> str | None:
    for point, fstype in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return fstype
    return None


def classify_disks(domain_xml: str, mounts: Iterable[tuple[str, str]] = ()) -> list[DiskFacts]:
    """Every disk of ``domain_xml``, shared or local (``mounts``: :func:`mount_table`)."""
    mounts = list(mounts)
    disks = []
    for disk in ET.fromstring(domain_xml).findall("devices/disk"):
        kind, device = disk.get("type", "file"), disk.get("device", "disk")
        target_element = disk.find("target")
        target = target_element.get("dev", "?") if target_element is not None else "?"
        src = disk.find("source")
        if kind == "network":
            name = src.get("name", "") if src is not None else ""
            protocol = src.get("protocol", "network") if src is not None else "network"
            disks.append(DiskFacts(target, device, f"{protocol}:{name}", True, "network disk"))
            continue
        path = ""
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("volume") or src.get("dir") or ""
        if not path:
            disks.append(DiskFacts(target, device, "(empty)", True, "no medium"))
            continue
        if disk.find("shareable") is not None:
            disks.append(DiskFacts(target, device, path, True, "<shareable/>"))
            continue
        fstype = _fs_type(path, mounts)
        if fstype in SHARED_FS_TYPES:
            disks.append(DiskFacts(target, device, path, True, f"on {fstype}"))
            continue
        readonly = disk.find("readonly") is not None or device == "cdrom"
        where = f"on {fstype}" if fstype else "not on a filesystem mounted here"
        why = f"read-only, {where}: the target needs the same file" if readonly else where
        disks.append(DiskFacts(target, device, path, readonly, why))
    return disks


def disk_check(facts: DomainFacts, mounts_text: str | None = None) -> PreflightCheck:
    """Shared disks migrate as they are; a local writable disk would need a storage copy."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            mounts_text = ""
    disks = classify_disks(facts.xml, mount_table(mounts_text))
    if not disks:
        return PreflightCheck("disks", Verdict.OK, "no disks (only RAM and device state move)")
    shown = "; ".join(
        f"{d.target} {d.source} {'shared' if d.shared else 'LOCAL'} ({d.why})" for d in disks
    )
    local = [d for d in disks if not d.shared]
    if local:
        return PreflightCheck(
            "disks", Verdict.REFUSED,
            f"{shown}: local disks need libvirt's storage copy (--copy-storage-all), which "
            "the libvirt strategy does not do; put them on shared storage",
        )  # fmt: skip
    readonly = [d for d in disks if d.why.startswith("read-only")]
    return PreflightCheck("disks", Verdict.WARNING if readonly else Verdict.OK, shown)


#: Devices that keep a domain from migrating: (XPath under devices/, what it is).
_BLOCKING_DEVICES = (
    ("hostdev", "a host device passed through"),
    ("interface[@type='hostdev']", "a host network device passed through (SR-IOV VF)"),
    ("filesystem/driver[@type='virtiofs']", "virtio-fs (QEMU 7.2 cannot migrate its state)"),
    ("shmem", "ivshmem shared memory"),
    ("tpm/backend[@type='passthrough']", "a passthrough TPM"),
    ("smartcard[@mode='passthrough']", "a passthrough smartcard"),
)


def blocking_devices(domain_xml: str) -> list[str]:
    """What in ``domain_xml`` blocks migration, one description per device."""
    devices = ET.fromstring(domain_xml).find("devices")
    if devices is None:
        return []
    found = []
    for path, what in _BLOCKING_DEVICES:
        for element in devices.findall(path):
            alias = element.find("alias")
            name = alias.get("name") if alias is not None else None
            found.append(f"{what}{f' ({name})' if name else ''}")
    return found


def device_check(facts: DomainFacts) -> PreflightCheck:
    blockers = blocking_devices(facts.xml)
    if blockers:
        return PreflightCheck(
            "devices", Verdict.REFUSED, "migration blocked by " + "; ".join(blockers),
            forceable=False,
        )  # fmt: skip
    return PreflightCheck("devices", Verdict.OK, "no device that blocks migration")


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
    checks = [
        cpu_check(facts, target),
        target_domain_check(facts, target),
        disk_check(facts),
        device_check(facts),
    ]
    if facts.active:
        checks.append(memory_check(facts, target))
    checks.append(version_check(source, target))
    return PreflightReport(tuple(checks))

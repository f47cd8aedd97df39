"""Host CPUs from Linux text: ``/proc/cpuinfo`` and ``lscpu`` (C locale) output.

Linux prints its own flag names, some of them synthetic (``ibrs``, ``ssbd`` mean the
Intel or the AMD bit depending on the vendor) and hides others entirely, and it never
shows the arch-capabilities MSR; those flags are recorded as unknown rather than absent.
"""

from __future__ import annotations

import re

from cpumodel import flags as F
from cpumodel.errors import CpuParseError
from cpumodel.host import AMD, HYGON, HostCpu, SourceKind, normalize_flags

# Linux's "vmx flags" line names (arch/x86/include/asm/vmxfeatures.h) that map 1:1.
_LINUX_VMX_FLAGS = {
    "vnmi": "vmx-vnmi",
    "preemption_timer": "vmx-preemption-timer",
    "posted_intr": "vmx-posted-intr",
    "invvpid": "vmx-invvpid",
    "ept_x_only": "vmx-ept-execonly",
    "ept_ad": "vmx-eptad",
    "ept_1gb": "vmx-ept-1gb",
    "flexpriority": "vmx-flexpriority",
    "tsc_offset": "vmx-tsc-offset",
    "mtf": "vmx-mtf",
    "ept": "vmx-ept",
    "vpid": "vmx-vpid",
    "unrestricted_guest": "vmx-unrestricted-guest",
    "vapic_reg": "vmx-apicv-register",
    "vid": "vmx-apicv-vid",
    "ple": "vmx-ple",
    "shadow_vmcs": "vmx-shadow-vmcs",
    "pml": "vmx-pml",
    "tsc_scaling": "vmx-tsc-scaling",
}


def _hidden_by_linux(flags: frozenset[str], vendor: str) -> frozenset[str]:
    """Flags the flags line cannot show for this CPU (feature MSRs, bits Linux hides)."""
    hidden: set[str] = set()
    if "arch-capabilities" in flags:
        hidden |= F.ARCH_CAPABILITIES_BITS
    if "vmx" in flags:
        hidden |= {f for f in F.QEMU_FLAGS if f.startswith("vmx-")}
    if "pdcm" in flags:
        hidden.add("full-width-write")
    if "core-capability" in flags:
        hidden.add("split-lock-detect")
    if vendor in (AMD, HYGON):
        hidden.add("amd-no-ssb")  # X86_FEATURE_AMD_SSB_NO has no cpuinfo name
    return frozenset(hidden) - flags


_KEY_VALUE = re.compile(r"^([^:]+?)\s*:\s*(.*)$")


def _fields(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        match = _KEY_VALUE.match(line)
        if match:
            out.setdefault(match.group(1).strip().lower(), match.group(2).strip())
    return out


def _int_field(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key, "")
    try:
        return int(value, 0)
    except ValueError:
        return None


def looks_like_cpuinfo(text: str) -> bool:
    """True if the text starts like /proc/cpuinfo (a "processor : N" line and "flags")."""
    return bool(re.search(r"^processor\s*:\s*\d+", text, re.M)) and bool(
        re.search(r"^flags\s*:", text, re.M)
    )


def looks_like_lscpu(text: str) -> bool:
    """True if the text is lscpu output (``Architecture:`` or ``Vendor ID:`` plus ``Flags:``)."""
    return bool(re.search(r"^\s*Flags:\s", text, re.M)) and bool(
        re.search(r"^\s*(Architecture|Vendor ID):", text, re.M)
    )


def _host(fields: dict[str, str], kind: SourceKind, name: str, flag_key: str) -> HostCpu:
    vendor = fields.get("vendor_id") or fields.get("vendor id") or ""
    raw_flags = fields.get(flag_key, "").split()
    if not raw_flags:
        raise CpuParseError(f"{kind.value}: no CPU flags found (expected a '{flag_key}' line)")
    flags, unrecognized = normalize_flags(raw_flags, vendor)
    if not flags:
        raise CpuParseError(f"{kind.value}: none of the {len(raw_flags)} flags is an x86 CPU flag")
    vmx_raw = fields.get("vmx flags", "").split()
    vmx = {_LINUX_VMX_FLAGS[f] for f in vmx_raw if f in _LINUX_VMX_FLAGS}
    flags = F.apply_dependencies(flags | vmx)
    model_name = fields.get("model name", "")
    return HostCpu(
        name=name or model_name or "cpu",
        vendor=vendor,
        flags=flags,
        source=kind,
        family=_int_field(fields, "cpu family"),
        model=_int_field(fields, "model"),
        stepping=_int_field(fields, "stepping"),
        model_name=model_name,
        unknown=_hidden_by_linux(flags, vendor),
        unrecognized=unrecognized,
    )


def parse_cpuinfo(text: str, name: str = "") -> HostCpu:
    """The first processor of a /proc/cpuinfo text; raises CpuParseError."""
    block: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            if block:
                break
            continue
        block.append(line)
    fields = _fields(block)
    if "processor" not in fields:
        raise CpuParseError("cpuinfo: no 'processor' line in the first block")
    return _host(fields, SourceKind.CPUINFO, name, "flags")


def parse_lscpu(text: str, name: str = "") -> HostCpu:
    """lscpu output (``LC_ALL=C lscpu``); raises CpuParseError."""
    fields = _fields(text.splitlines())
    return _host(fields, SourceKind.LSCPU, name, "flags")

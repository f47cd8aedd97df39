"""Raw CPUID (and feature-MSR) register dumps: parse the first logical CPU, decode flags.

Two text layouts are understood:

* AIDA64 / InstLatx64: ``CPUID 00000007: EAX-EBX-ECX-EDX [SL 00]`` lines in
  ``------[ CPUID Registers / Logical CPU #0 ]------`` sections, optionally followed by
  ``MSR 0000010A: 0000-0000-0002-3C6B`` lines in MSR sections;
* ``cpuid -r`` (Todd Allen's tool): ``0x00000007 0x00: eax=0x... ebx=0x... ecx=0x... edx=0x...``
  under ``CPU 0:`` headings.

Only the first logical CPU is read: hybrid parts (Alder Lake) report per-core-type
leaves, and a guest is configured from the boot CPU's view, as KVM's is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cpumodel import flags as F
from cpumodel.errors import CpuParseError
from cpumodel.host import INTEL, HostCpu, SourceKind

_HEX8 = "([0-9A-Fa-f]{8})"
_AIDA_CPUID = re.compile(
    rf"^CPUID {_HEX8}: {_HEX8}-{_HEX8}-{_HEX8}-{_HEX8}(?:\s+\[SL ([0-9A-Fa-f]+)\])?"
)
_AIDA_MSR = re.compile(
    r"^MSR ([0-9A-Fa-f]{8}): ([0-9A-Fa-f]{4})-([0-9A-Fa-f]{4})-([0-9A-Fa-f]{4})-([0-9A-Fa-f]{4})"
)
_AIDA_SECTION = re.compile(r"^-+\[ (.*?) \]-+\s*$")
_CPUID_R = re.compile(
    r"^\s*0x([0-9a-fA-F]{8}) 0x([0-9a-fA-F]{2}): "
    r"eax=0x([0-9a-fA-F]{8}) ebx=0x([0-9a-fA-F]{8}) ecx=0x([0-9a-fA-F]{8}) edx=0x([0-9a-fA-F]{8})"
)
_CPUID_R_CPU = re.compile(r"^CPU\s*(\d*):\s*$")


@dataclass(frozen=True)
class LeafKey:
    """A CPUID input: leaf (EAX) and subleaf (ECX)."""

    leaf: int
    subleaf: int = 0


@dataclass(frozen=True)
class CpuidRegisters:
    """The four CPUID output registers of one leaf/subleaf."""

    eax: int
    ebx: int
    ecx: int
    edx: int

    def get(self, register: F.Register) -> int:
        """Value of one register by name."""
        return int(getattr(self, register.value))


@dataclass(frozen=True)
class CpuidDump:
    """The first logical CPU's CPUID leaves and feature MSRs (64-bit values)."""

    leaves: Mapping[LeafKey, CpuidRegisters]
    msrs: Mapping[int, int]

    def registers(self, leaf: int, subleaf: int = 0) -> CpuidRegisters | None:
        """Registers of a leaf, or None if the dump does not have it."""
        return self.leaves.get(LeafKey(leaf, subleaf))


def looks_like_cpuid_dump(text: str) -> bool:
    """True if the text has CPUID register lines in a layout we parse."""
    return any(_AIDA_CPUID.match(line) or _CPUID_R.match(line) for line in text.splitlines()[:5000])


def parse_cpuid_dump(text: str) -> CpuidDump:
    """Registers of the first logical CPU; raises CpuParseError if none are found."""
    leaves: dict[LeafKey, CpuidRegisters] = {}
    msrs: dict[int, int] = {}
    cpuid_section_seen = 0
    in_cpuid_section = True
    msr_section_seen = 0
    in_msr_section = True
    for line in text.splitlines():
        section = _AIDA_SECTION.match(line)
        if section:
            title = section.group(1)
            in_cpuid_section = title.startswith("CPUID Registers") and cpuid_section_seen == 0
            in_msr_section = title.startswith("MSR Registers") and msr_section_seen == 0
            cpuid_section_seen += title.startswith("CPUID Registers")
            msr_section_seen += title.startswith("MSR Registers")
            continue
        cpu_heading = _CPUID_R_CPU.match(line)
        if cpu_heading:
            in_cpuid_section = cpuid_section_seen == 0
            cpuid_section_seen += 1
            continue
        match = _AIDA_CPUID.match(line)
        if match and in_cpuid_section:
            key = LeafKey(int(match.group(1), 16), int(match.group(6) or "0", 16))
            if key in leaves:  # a dump without headings: the next CPU starts here
                in_cpuid_section = False
                continue
            leaves[key] = CpuidRegisters(*(int(match.group(i), 16) for i in range(2, 6)))
            continue
        match = _CPUID_R.match(line)
        if match and in_cpuid_section:
            key = LeafKey(int(match.group(1), 16), int(match.group(2), 16))
            if key in leaves:
                in_cpuid_section = False
                continue
            leaves[key] = CpuidRegisters(*(int(match.group(i), 16) for i in range(3, 7)))
            continue
        match = _AIDA_MSR.match(line)
        if match and in_msr_section:
            index = int(match.group(1), 16)
            # Repeated samples ([S200]) of counters follow; the first one is as good.
            msrs.setdefault(index, int("".join(match.group(i) for i in range(2, 6)), 16))
    if LeafKey(0) not in leaves or LeafKey(1) not in leaves:
        raise CpuParseError("CPUID dump has no leaf 0 and leaf 1 registers for the first CPU")
    return CpuidDump(leaves=leaves, msrs=msrs)


def _vendor(leaf0: CpuidRegisters) -> str:
    raw = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    return raw.decode("ascii", errors="replace")


def _signature(eax: int) -> tuple[int, int, int]:
    base_family = (eax >> 8) & 0xF
    family = base_family + ((eax >> 20) & 0xFF) if base_family == 0xF else base_family
    model = (eax >> 4) & 0xF
    if base_family in (0x6, 0xF):
        model |= ((eax >> 16) & 0xF) << 4
    return family, model, eax & 0xF


def _brand(dump: CpuidDump) -> str:
    raw = b""
    for leaf in (0x80000002, 0x80000003, 0x80000004):
        regs = dump.registers(leaf)
        if regs is None:
            return ""
        raw += b"".join(r.to_bytes(4, "little") for r in (regs.eax, regs.ebx, regs.ecx, regs.edx))
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


def _tsc_khz(dump: CpuidDump, max_basic: int) -> int | None:
    regs = dump.registers(0x15) if max_basic >= 0x15 else None
    if regs is None or 0 in (regs.eax, regs.ebx, regs.ecx):
        return None
    # Leaf 0x15: TSC = crystal (ECX, Hz) * EBX / EAX.
    return regs.ecx * regs.ebx // regs.eax // 1000


def _leaf_present(dump: CpuidDump, leaf: int) -> bool:
    """Whether the CPU implements a leaf (below its max basic/extended/Centaur leaf)."""
    base = leaf & 0xFFFF0000
    top = dump.registers(base)
    return top is not None and top.eax >= leaf


def _msr_value(dump: CpuidDump, word: F.MsrWord, vmx_true_ctls: bool) -> int | None:
    index = word.index
    if index in F.VMX_TRUE_CTLS_FALLBACK and not vmx_true_ctls:
        index = F.VMX_TRUE_CTLS_FALLBACK[index]
    return dump.msrs.get(index)


def decode_cpuid(dump: CpuidDump, name: str = "") -> HostCpu:
    """Canonical flags and identity of the dumped CPU; raises CpuParseError without leaves 0/1."""
    leaf0, leaf1 = dump.registers(0), dump.registers(1)
    if leaf0 is None or leaf1 is None:  # parse_cpuid_dump guarantees both
        raise CpuParseError("CPUID dump has no leaf 0 and leaf 1 registers")
    if not any(r.eax or r.ebx or r.ecx or r.edx for r in dump.leaves.values()):
        raise CpuParseError("CPUID dump holds only zero registers: not a real CPU's dump")
    vendor = _vendor(leaf0)
    if not (vendor.isascii() and vendor.isprintable() and vendor.strip()):
        raise CpuParseError(
            f"CPUID leaf 0 holds no vendor string ({vendor.encode('latin-1', 'replace')!r})"
        )
    if leaf1.eax == 0:
        raise CpuParseError("CPUID leaf 1 holds no family/model/stepping signature (EAX is 0)")
    family, model, stepping = _signature(leaf1.eax)
    max_basic = leaf0.eax
    found: set[str] = set()
    for word in F.CPUID_WORDS:
        if not _leaf_present(dump, word.leaf):
            continue
        regs = dump.registers(word.leaf, word.subleaf)
        if regs is None:
            continue
        value = regs.get(word.register)
        found.update(flag for bit, flag in word.bits.items() if value >> bit & 1)

    # Intel sets CPUID.80000001H:EDX.SYSCALL only when CPUID runs in 64-bit mode; dump
    # tools such as AIDA64 are 32-bit programs, yet every long-mode Intel CPU has it.
    if vendor == INTEL and "lm" in found:
        found.add("syscall")

    unknown: set[str] = set()
    vmx_basic = dump.msrs.get(F.MSR_VMX_BASIC, 0)
    vmx_true_ctls = bool(vmx_basic >> 55 & 1)
    for msr_word in F.MSR_WORDS:
        msr = _msr_value(dump, msr_word, vmx_true_ctls)
        if msr is None:
            unknown.update(msr_word.bits.values())
            continue
        shift = 32 if msr_word.allowed1_high else 0
        found.update(flag for bit, flag in msr_word.bits.items() if msr >> (bit + shift) & 1)

    flags = F.apply_dependencies(frozenset(found))
    # A flag is only unknown if its parent is on: without vmx there are no vmx-* bits.
    unknown_flags: set[str] = set()
    while True:
        grown = {
            f
            for f in unknown - flags
            if F.DEPENDS_ON.get(f, "") in flags or F.DEPENDS_ON.get(f, "") in unknown_flags
        }
        if grown <= unknown_flags:
            break
        unknown_flags |= grown
    cpu_name = _brand(dump)
    return HostCpu(
        name=name or cpu_name or "cpu",
        vendor=vendor,
        flags=flags,
        source=SourceKind.CPUID_DUMP,
        family=family,
        model=model,
        stepping=stepping,
        model_name=cpu_name,
        tsc_khz=_tsc_khz(dump, max_basic),
        unknown=frozenset(unknown_flags),
    )


def parse_cpuid_text(text: str, name: str = "") -> HostCpu:
    """Parse and decode a CPUID dump text; raises CpuParseError."""
    return decode_cpuid(parse_cpuid_dump(text), name)

"""A host CPU as a migration check sees it, and what KVM on that host can give a guest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from cpumodel import flags as F
from cpumodel.errors import CpuParseError

INTEL = "GenuineIntel"
AMD = "AuthenticAMD"
HYGON = "HygonGenuine"

#: The highest CPUID family (base 0xF plus the 8-bit extended family).
MAX_FAMILY = 0xF + 0xFF
#: 100 GHz: no CPU's TSC runs faster; a higher rate is a broken description.
MAX_TSC_KHZ = 100_000_000

_VENDOR_LABELS = {INTEL: "Intel", AMD: "AMD", HYGON: "Hygon"}
_VENDOR_BY_LABEL = {label.lower(): vendor for vendor, label in _VENDOR_LABELS.items()}


class SourceKind(StrEnum):
    """Where a host CPU description came from; detected from a file's content."""

    CPUINFO = "cpuinfo"
    LSCPU = "lscpu"
    CPUID_DUMP = "cpuid-dump"
    QMP = "qmp"
    LIBVIRT_XML = "libvirt-xml"
    LIVEMIG_JSON = "livemig-json"


def vendor_label(vendor: str) -> str:
    """Short vendor name ("Intel", "AMD") for a CPUID vendor string; unknown ones pass through."""
    return _VENDOR_LABELS.get(vendor, vendor or "unknown")


def vendor_from_label(label: str) -> str:
    """CPUID vendor string for "Intel"/"AMD"/"Hygon" or an already-CPUID vendor string."""
    return _VENDOR_BY_LABEL.get(label.strip().lower(), label.strip())


@dataclass(frozen=True)
class HostCpu:
    """One host's CPU: identity plus the canonical (QEMU-named) flags it has.

    ``unknown`` holds flags this kind of source cannot show (e.g. arch-capabilities MSR
    bits in /proc/cpuinfo); checks neither count them as present nor as missing.
    ``tsc_khz`` is the invariant TSC rate in kHz when the source reveals it.
    """

    name: str
    vendor: str
    flags: frozenset[str]
    source: SourceKind
    family: int | None = None
    model: int | None = None
    stepping: int | None = None
    model_name: str = ""
    tsc_khz: int | None = None
    unknown: frozenset[str] = field(default_factory=frozenset)
    unrecognized: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse what no CPU reports: a zero or negative TSC rate, a negative or
        out-of-range family/model/stepping. Raises :class:`CpuParseError`."""
        if not isinstance(self.source, SourceKind):
            raise CpuParseError(f"unknown CPU description source {self.source!r}")
        if self.tsc_khz is not None and not (
            _is_int(self.tsc_khz) and 0 < self.tsc_khz <= MAX_TSC_KHZ
        ):
            raise CpuParseError(
                f"TSC frequency {self.tsc_khz!r} kHz is not a rate a CPU runs at "
                f"(want 1-{MAX_TSC_KHZ} kHz)"
            )
        for name, top in (("family", MAX_FAMILY), ("model", 0xFF), ("stepping", 0xF)):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= top):
                raise CpuParseError(f"CPU {name} {value!r} is out of range (0-{top})")

    @property
    def vendor_label(self) -> str:
        """Short vendor name, e.g. "Intel"."""
        return vendor_label(self.vendor)

    @property
    def signature(self) -> str:
        """Family/model/stepping as "family 25 model 1 stepping 1" (or "unknown")."""
        if self.family is None:
            return "unknown signature"
        return f"family {self.family} model {self.model} stepping {self.stepping}"

    def with_name(self, name: str) -> HostCpu:
        """The same CPU under another operator-facing name."""
        return replace(self, name=name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` reverses it."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "family": self.family,
            "model": self.model,
            "stepping": self.stepping,
            "model_name": self.model_name,
            "source": self.source.value,
            "tsc_khz": self.tsc_khz,
            "flags": sorted(self.flags),
            "unknown": sorted(self.unknown),
            "unrecognized": list(self.unrecognized),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostCpu:
        """Rebuild from ``to_dict`` output; raises CpuParseError on a malformed object."""
        try:
            flags = frozenset(str(f) for f in data["flags"])
            unknown_names = flags - F.QEMU_FLAGS
            if unknown_names:
                raise CpuParseError(
                    f"unknown flags in host JSON: {', '.join(sorted(unknown_names))}"
                )
            return cls(
                name=str(data["name"]),
                vendor=str(data["vendor"]),
                flags=flags,
                source=SourceKind(data["source"]),
                family=_opt_int(data.get("family")),
                model=_opt_int(data.get("model")),
                stepping=_opt_int(data.get("stepping")),
                model_name=str(data.get("model_name", "")),
                tsc_khz=_opt_int(data.get("tsc_khz")),
                unknown=frozenset(str(f) for f in data.get("unknown", ())),
                unrecognized=tuple(str(f) for f in data.get("unrecognized", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CpuParseError(f"malformed host CPU JSON: {exc!r}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(value: Any) -> int | None:
    if value is None or _is_int(value):
        return value  # type: ignore[no-any-return]
    raise ValueError(f"{value!r} is not a whole number")


def normalize_flags(
    names: Iterable[str], vendor: str | None = None
) -> tuple[frozenset[str], tuple[str, ...]]:
    """Split raw flag names into (canonical QEMU flags, sorted names QEMU has no flag for)."""
    canonical: set[str] = set()
    unrecognized: set[str] = set()
    for raw in names:
        if not raw.strip():
            continue
        name = F.normalize_flag(raw, vendor)
        if name is None:
            unrecognized.add(raw.strip().lower())
        else:
            canonical.add(name)
    return frozenset(canonical), tuple(sorted(unrecognized))


def kvm_supported(host: HostCpu) -> frozenset[str]:
    """Flags KVM on this host can offer a guest: the CPU's own minus what KVM masks, plus
    what KVM emulates or mirrors across vendors (spectre-control bits)."""
    native = host.flags - F.HOST_ONLY
    mirrored = {m.gives for m in F.KVM_SPEC_CTRL_MIRRORS if m.requires <= native}
    # KVM emulates IA32_ARCH_CAPABILITIES on every host; its bits still come from the host.
    return frozenset(native | mirrored | F.KVM_PROVIDED | F.KVM_EMULATED | {"arch-capabilities"})


def host_passthrough_flags(host: HostCpu) -> frozenset[str]:
    """What ``-cpu host`` (migratable=on, the default) shows a guest on this host.

    Features that need configuration beyond the CPU (SGX EPC, PT buffers) are left out:
    without it QEMU does not give them to the guest either.
    """
    flags = kvm_supported(host) - F.UNMIGRATABLE - F.NO_AUTOENABLE - F.KVM_PV_FLAGS - F.NEEDS_CONFIG
    return F.apply_dependencies(flags)


def tsc_scaling(host: HostCpu) -> bool | None:
    """Whether KVM on this host can run a guest TSC at another rate (None: cannot tell)."""
    scaling_flag = "vmx-tsc-scaling" if host.vendor == INTEL else "tsc-scale"
    if scaling_flag in host.flags:
        return True
    if scaling_flag in host.unknown:
        return None
    if host.vendor == INTEL and "vmx" not in host.flags:
        return None
    if host.vendor != INTEL and "svm" not in host.flags:
        return None
    return False

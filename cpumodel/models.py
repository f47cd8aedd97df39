"""Guest CPU models: QEMU's named models, psABI levels, and ``-cpu`` strings with edits.

A :class:`ModelCatalog` holds the named models of one QEMU binary as QEMU itself
expands them (``query-cpu-model-expansion type=full``, see :mod:`cpumodel.qemu`). A
:class:`CpuConfig` is a parsed ``-cpu`` string: a base (a named model, ``host``,
``max`` or a psABI level) plus ``+flag``/``-flag``/``flag=on|off`` edits and properties.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cpumodel import flags as F
from cpumodel.errors import CpuParseError, UnknownCpuFlag, UnknownCpuModel

PASSTHROUGH_MODELS = frozenset({"host", "max"})

# The vendor-neutral model psABI levels and mixed-vendor baselines are built on: no svm
# (unlike qemu64), no vendor-specific bits, accepted by every QEMU.
NEUTRAL_BASE_MODEL = "kvm64"

# QEMU's kvm_default_props: what a named model turns into under KVM.
_KVM_DEFAULTS_ON = frozenset({"x2apic"})
_KVM_DEFAULTS_OFF = frozenset({"monitor", "svm", "acpi"})


@dataclass(frozen=True)
class PsabiLevel:
    """An x86-64 psABI micro-architecture level and every flag it requires (cumulative)."""

    name: str
    flags: frozenset[str]


_V1 = frozenset({"lm", "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"})
_V2 = _V1 | {"cx16", "lahf-lm", "popcnt", "pni", "sse4.1", "sse4.2", "ssse3"}
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

PSABI_LEVELS: tuple[PsabiLevel, ...] = (
    PsabiLevel("x86-64-v1", _V1),
    PsabiLevel("x86-64-v2", _V2),
    PsabiLevel("x86-64-v3", _V3),
    PsabiLevel("x86-64-v4", _V4),
)
_PSABI_BY_NAME = {level.name: level for level in PSABI_LEVELS}


def psabi_level(name: str) -> PsabiLevel:
    """The psABI level called ``name`` (``x86-64-v3``); raises UnknownCpuModel."""
    try:
        return _PSABI_BY_NAME[name]
    except KeyError:
        raise UnknownCpuModel(f"unknown psABI level '{name}'") from None


def highest_psabi_level(flags: frozenset[str]) -> PsabiLevel | None:
    """The highest psABI level whose flags are all in ``flags`` (None: not even v1)."""
    best: PsabiLevel | None = None
    for level in PSABI_LEVELS:
        if level.flags <= flags:
            best = level
    return best


def next_psabi_level(level: PsabiLevel | None) -> PsabiLevel | None:
    """The level above ``level`` (v1 above None); None above v4."""
    if level is None:
        return PSABI_LEVELS[0]
    position = PSABI_LEVELS.index(level)
    return PSABI_LEVELS[position + 1] if position + 1 < len(PSABI_LEVELS) else None


@dataclass(frozen=True)
class GuestModel:
    """A named QEMU CPU model as QEMU expands it (``flags``: canonical names switched on)."""

    name: str
    vendor: str
    flags: frozenset[str]
    family: int | None = None
    model: int | None = None
    stepping: int | None = None
    model_id: str = ""
    alias_of: str | None = None
    migration_safe: bool = True

    @property
    def kvm_flags(self) -> frozenset[str]:
        """What a guest with this model gets under KVM (before the host filters it)."""
        return F.apply_dependencies((self.flags | _KVM_DEFAULTS_ON) - _KVM_DEFAULTS_OFF)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` reverses it."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "family": self.family,
            "model": self.model,
            "stepping": self.stepping,
            "model_id": self.model_id,
            "alias_of": self.alias_of,
            "migration_safe": self.migration_safe,
            "flags": sorted(self.flags),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuestModel:
        """Rebuild from ``to_dict`` output; raises KeyError/TypeError on malformed data."""
        return cls(
            name=str(data["name"]),
            vendor=str(data["vendor"]),
            flags=frozenset(str(f) for f in data["flags"]),
            family=data.get("family"),
            model=data.get("model"),
            stepping=data.get("stepping"),
            model_id=str(data.get("model_id", "")),
            alias_of=data.get("alias_of"),
            migration_safe=bool(data.get("migration_safe", True)),
        )


@dataclass(frozen=True)
class ModelCatalog:
    """The named CPU models one QEMU binary offers (``qemu_version`` e.g. "7.2.22")."""

    qemu_version: str
    models: Mapping[str, GuestModel]
    binary: str = ""

    def get(self, name: str) -> GuestModel:
        """The model called ``name``; raises UnknownCpuModel with close matches."""
        try:
            return self.models[name]
        except KeyError:
            close = difflib.get_close_matches(name, sorted(self.models), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownCpuModel(
                f"unknown CPU model '{name}' for QEMU {self.qemu_version}{hint}"
            ) from None

    def versioned(self) -> list[GuestModel]:
        """Models that are not aliases of another (``Skylake-Client-v4``, ``kvm64``...)."""
        return [m for m in self.models.values() if m.alias_of is None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` reverses it."""
        return {
            "qemu_version": self.qemu_version,
            "binary": self.binary,
            "models": [m.to_dict() for m in self.models.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCatalog:
        """Rebuild from ``to_dict`` output; raises CpuParseError on malformed data."""
        try:
            models = [GuestModel.from_dict(m) for m in data["models"]]
            return cls(
                qemu_version=str(data["qemu_version"]),
                binary=str(data.get("binary", "")),
                models={m.name: m for m in models},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CpuParseError(f"malformed CPU model catalogue: {exc!r}") from exc


# Properties a -cpu string may carry that are not CPUID flags.
# fmt: off
_KNOWN_PROPERTIES = frozenset(
    {
        "tsc-frequency", "enforce", "check", "migratable", "host-phys-bits", "phys-bits",
        "host-phys-bits-limit", "host-cache-info", "vendor", "model-id", "family", "model",
        "stepping", "level", "xlevel", "min-level", "min-xlevel", "l3-cache", "pmu",
        "kvm", "legacy-cache", "lbr-fmt", "ucode-rev", "hv-passthrough", "kvm-pv-enforce-cpuid",
        "full-cpuid-auto-level", "cpuid-0xb", "fill-mtrr-mask", "tcg-cpuid", "x-intel-pt-auto-level",
    }
)
# fmt: on
_PROPERTY_PREFIXES = ("hv-", "x-")
_ON = {"on", "yes", "true"}
_OFF = {"off", "no", "false"}


@dataclass(frozen=True)
class CpuConfig:
    """A parsed ``-cpu`` string. ``base`` is a catalogue model, host/max or a psABI level."""

    base: str
    enable: frozenset[str] = frozenset()
    disable: frozenset[str] = frozenset()
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_passthrough(self) -> bool:
        """True for ``host`` and ``max``: the guest sees the host it runs on."""
        return self.base in PASSTHROUGH_MODELS

    @property
    def tsc_frequency_hz(self) -> int | None:
        """The pinned ``tsc-frequency`` (Hz), if any."""
        value = self.properties.get("tsc-frequency")
        return _parse_hz(value) if value is not None else None

    def render(self) -> str:
        """The string to hand QEMU's ``-cpu``."""
        parts = [self.base]
        parts += [f"+{f}" for f in sorted(self.enable)]
        parts += [f"-{f}" for f in sorted(self.disable)]
        parts += [f"{k}={v}" for k, v in self.properties.items()]
        return ",".join(parts)


def _parse_hz(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:[hH][zZ])?\s*", value)
    if not match:
        raise CpuParseError(f"bad tsc-frequency '{value}'")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def parse_cpu_string(text: str, catalog: ModelCatalog) -> CpuConfig:
    """Parse a ``-cpu`` value; raises UnknownCpuModel / UnknownCpuFlag / CpuParseError.

    A psABI level name (``x86-64-v3``) is accepted as a base and expanded into its QEMU
    7.2 form (kvm64 plus flags), since QEMU 7.2 has no such models.
    """
    parts = [p.strip() for p in text.split(",")]
    if not parts or not parts[0]:
        raise CpuParseError("empty CPU model string")
    base, edits = parts[0], parts[1:]
    enable: set[str] = set()
    disable: set[str] = set()
    properties: dict[str, str] = {}
    if base in _PSABI_BY_NAME:
        enable |= psabi_level(base).flags - catalog.get(NEUTRAL_BASE_MODEL).flags
        base = NEUTRAL_BASE_MODEL
    elif base not in PASSTHROUGH_MODELS:
        catalog.get(base)
    plus: set[str] = set()
    minus: set[str] = set()
    for edit in edits:
        if not edit:
            continue
        if edit[0] in "+-":
            (plus if edit[0] == "+" else minus).add(F.canonical_flag(edit[1:]))
            continue
        key, _, value = edit.partition("=")
        key = key.strip()
        flag = F.normalize_flag(key)
        if flag is not None and (not value or value.lower() in _ON | _OFF):
            if not value or value.lower() in _ON:
                enable.add(flag)
                disable.discard(flag)
            else:
                disable.add(flag)
                enable.discard(flag)
        elif key in _KNOWN_PROPERTIES or key.startswith(_PROPERTY_PREFIXES):
            properties[key] = value
        else:
            raise UnknownCpuFlag(f"unknown CPU flag or property '{key}' in '{text}'")
    # QEMU applies legacy +flag/-flag after key=value edits, and -flag wins over +flag.
    enable = (enable | plus) - minus
    disable = (disable - plus) | minus
    config = CpuConfig(
        base=base, enable=frozenset(enable), disable=frozenset(disable), properties=properties
    )
    if config.tsc_frequency_hz is not None and config.tsc_frequency_hz <= 0:
        raise CpuParseError(f"tsc-frequency must be positive in '{text}'")
    return config


def named_guest_flags(config: CpuConfig, catalog: ModelCatalog) -> frozenset[str]:
    """What a guest with a named-model config gets under KVM before host filtering."""
    if config.is_passthrough:
        raise ValueError("host/max depend on the host; use host.host_passthrough_flags")
    flags = (catalog.get(config.base).kvm_flags | config.enable) - config.disable
    return F.apply_dependencies(flags - F.KVM_PV_FLAGS)


def psabi_cpu_string(level: PsabiLevel, catalog: ModelCatalog) -> str:
    """A QEMU 7.2 ``-cpu`` string for a psABI level: kvm64 plus the missing flags."""
    base = catalog.get(NEUTRAL_BASE_MODEL)
    return CpuConfig(base=base.name, enable=level.flags - base.flags).render()


def fitting_models(
    flags: frozenset[str], catalog: ModelCatalog, vendor: str | None = None
) -> list[GuestModel]:
    """Non-alias models whose every flag is in ``flags`` (ignoring what KVM always
    provides), optionally of one vendor, best (most flags) first."""
    fitting = [
        m
        for m in catalog.versioned()
        if m.migration_safe
        and (vendor is None or m.vendor == vendor)
        and (m.kvm_flags - F.KVM_PROVIDED) <= flags
    ]
    return sorted(fitting, key=lambda m: (-len(m.kvm_flags), m.name))


def sorted_flags(flags: Iterable[str]) -> list[str]:
    """Flags in a stable, human order (alphabetical)."""
    return sorted(set(flags))

"""Will a VM's CPU survive a move from one host to another?

The guest's CPU is what QEMU under KVM gave it on the source: the named model's flags
that the source host supports (QEMU filters the rest at start, or refuses with
``enforce``), or for ``host``/``max`` everything KVM passes through. The move is
compatible when KVM on the target supports every one of those flags and nothing blocks
migration; everything else an operator should know becomes a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpumodel import flags as F
from cpumodel.baseline import compute_baseline
from cpumodel.errors import CpuModelError
from cpumodel.host import HostCpu, host_passthrough_flags, kvm_supported, tsc_scaling, vendor_label
from cpumodel.models import CpuConfig, ModelCatalog, named_guest_flags, parse_cpu_string

# KVM accepts a TSC within this much of the requested rate without scaling (tsc_tolerance_ppm).
TSC_TOLERANCE_PPM = 250


@dataclass(frozen=True)
class CompatibilityResult:
    """The verdict on one move: ``missing`` flags the target cannot give the guest,
    ``blockers`` that stop QEMU from migrating at all, ``warnings`` for the operator and
    ``suggestion``, a ``-cpu`` string both hosts can run (their baseline)."""

    compatible: bool
    missing: tuple[str, ...]
    warnings: tuple[str, ...]
    blockers: tuple[str, ...]
    suggestion: str | None
    vm_cpu: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` reverses it."""
        return {
            "compatible": self.compatible,
            "missing": list(self.missing),
            "warnings": list(self.warnings),
            "blockers": list(self.blockers),
            "suggestion": self.suggestion,
            "vm_cpu": self.vm_cpu,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompatibilityResult:
        """Rebuild from ``to_dict`` output; raises KeyError/TypeError on malformed data."""
        return cls(
            compatible=bool(data["compatible"]),
            missing=tuple(data["missing"]),
            warnings=tuple(data["warnings"]),
            blockers=tuple(data["blockers"]),
            suggestion=data["suggestion"],
            vm_cpu=str(data["vm_cpu"]),
        )

    @property
    def reasons(self) -> tuple[str, ...]:
        """One line per reason the move is refused (empty when compatible)."""
        lines = list(self.blockers)
        if self.missing:
            lines.append(f"target lacks {', '.join(self.missing)}")
        if lines and self.suggestion:
            lines.append(f"a CPU model both hosts run: {self.suggestion}")
        return tuple(lines)


def _mhz(khz: int) -> str:
    return f"{khz / 1000:.3f} MHz"


def _same_cpu(source: HostCpu, target: HostCpu) -> bool:
    return (
        source.vendor == target.vendor
        and source.signature == target.signature
        and source.model_name == target.model_name
        and host_passthrough_flags(source) == host_passthrough_flags(target)
    )


def _guest_flags(
    config: CpuConfig, source: HostCpu, catalog: ModelCatalog, warnings: list[str]
) -> frozenset[str]:
    if config.is_passthrough:
        flags = (host_passthrough_flags(source) | config.enable) - config.disable
        return F.apply_dependencies(flags - source.unknown)
    wanted = named_guest_flags(config, catalog)
    filtered = wanted - kvm_supported(source) - source.unknown
    if filtered:
        warnings.append(
            f"source {source.name} lacks {', '.join(sorted(filtered))}: QEMU dropped them "
            "when the VM started (or refused to start it with enforce)"
        )
    return F.apply_dependencies(wanted - filtered)


def _tsc_checks(
    config: CpuConfig,
    guest: frozenset[str],
    source: HostCpu,
    target: HostCpu,
    warnings: list[str],
    blockers: list[str],
) -> None:
    pinned_hz = config.tsc_frequency_hz
    if "invtsc" in guest and pinned_hz is None:
        blockers.append(
            "invtsc: QEMU registers a migration blocker for an invariant TSC unless "
            "tsc-frequency is set"
        )
    if pinned_hz is not None and target.tsc_khz is not None:
        off_ppm = abs(target.tsc_khz * 1000 - pinned_hz) * 1_000_000 / pinned_hz
        scaling = tsc_scaling(target)
        if off_ppm > TSC_TOLERANCE_PPM and scaling is False:
            blockers.append(
                f"tsc-frequency {_mhz(pinned_hz // 1000)} differs from target TSC "
                f"{_mhz(target.tsc_khz)} and {target.name} has no TSC scaling: QEMU cannot "
                "start the incoming VM"
            )
        elif off_ppm > TSC_TOLERANCE_PPM and scaling is None:
            warnings.append(
                f"tsc-frequency differs from target TSC {_mhz(target.tsc_khz)}; whether "
                f"{target.name} can scale the TSC is unknown from its description"
            )
        return
    if source.tsc_khz is not None and target.tsc_khz is not None:
        off_ppm = abs(source.tsc_khz - target.tsc_khz) * 1_000_000 / source.tsc_khz
        if off_ppm > TSC_TOLERANCE_PPM:
            warnings.append(
                f"TSC frequency differs: source {_mhz(source.tsc_khz)}, target "
                f"{_mhz(target.tsc_khz)}; the guest's TSC rate changes unless tsc-frequency "
                "is pinned and the target scales TSCs"
            )
    elif "invtsc" in guest or pinned_hz is not None:
        unknown = [h.name for h in (source, target) if h.tsc_khz is None]
        warnings.append(f"TSC frequency of {', '.join(unknown)} unknown; cannot compare")


def _avx512_warning(guest: frozenset[str], source: HostCpu, target: HostCpu) -> str | None:
    on_source = "avx512f" in source.flags
    on_target = "avx512f" in target.flags
    if on_source == on_target:
        return None
    if on_source:
        used = sorted(guest & F.AVX512)
        effect = (
            f"this guest uses {', '.join(used)} and loses it"
            if used
            else "this guest's CPU config does not include AVX-512, so it is unaffected"
        )
        return f"AVX-512 on source {source.name} only: {effect}"
    return (
        f"AVX-512 on target {target.name} only: this guest does not gain it; a guest started "
        "there with AVX-512 could not come back"
    )


def check_migration(
    vm_cpu: str, source: HostCpu, target: HostCpu, catalog: ModelCatalog | None = None
) -> CompatibilityResult:
    """Judge moving a VM whose ``-cpu`` is ``vm_cpu`` from ``source`` to ``target``.

    ``catalog`` defaults to the installed QEMU's models (probed once, then cached).
    Raises UnknownCpuModel / UnknownCpuFlag / CpuParseError for a bad ``vm_cpu`` and
    QemuProbeError when QEMU cannot be asked for its models.
    """
    if catalog is None:
        from cpumodel.qemu import load_catalog

        catalog = load_catalog()
    config = parse_cpu_string(vm_cpu, catalog)
    warnings: list[str] = []
    blockers: list[str] = []

    guest = _guest_flags(config, source, catalog, warnings)
    target_supported = kvm_supported(target)
    missing = sorted(guest - target_supported - target.unknown - F.KVM_PV_FLAGS)
    unverifiable = sorted(guest & target.unknown)
    if unverifiable:
        warnings.append(
            f"cannot verify {', '.join(unverifiable)} on target {target.name}: its "
            f"{target.source.value} description does not show them"
        )
    if config.is_passthrough and source.unknown:
        warnings.append(
            f"'-cpu {config.base}' may also pass {', '.join(sorted(source.unknown))} from "
            f"source {source.name}, which its {source.source.value} description does not show"
        )

    vendor_pinned = "vendor" in config.properties
    if source.vendor != target.vendor and not vendor_pinned:
        change = f"{vendor_label(source.vendor)} to {vendor_label(target.vendor)}"
        if config.is_passthrough:
            blockers.append(
                f"'-cpu {config.base}' across vendors ({change}): the guest's vendor, "
                "family and model change under it"
            )
        else:
            warnings.append(
                f"CPU vendor changes from {change}: under KVM QEMU shows named models with "
                "the host's vendor, so the guest keeps vendor-specific code paths (32-bit "
                "syscall/sysenter, MSRs) of the old one; pin vendor= or test the guest"
            )
    elif config.is_passthrough and not _same_cpu(source, target):
        warnings.append(
            f"'-cpu {config.base}' between different CPUs ({source.name}: {source.signature}; "
            f"{target.name}: {target.signature}) is unsafe even without missing flags: the "
            "guest's model, caches and errata workarounds no longer match; use a named model"
        )

    _tsc_checks(config, guest, source, target, warnings, blockers)

    avx512 = _avx512_warning(guest, source, target)
    if avx512:
        warnings.append(avx512)

    lost_claims = sorted(set(missing) & F.ARCH_CAPABILITIES_BITS)
    if lost_claims:
        warnings.append(
            f"arch-capabilities: the guest was told {', '.join(lost_claims)} (not vulnerable) "
            f"but {target.name} does not report them; it would run without those mitigations"
        )

    compatible = not missing and not blockers
    suggestion: str | None = None
    if not compatible:
        try:
            suggestion = compute_baseline([source, target], catalog).cpu
        except CpuModelError as exc:
            warnings.append(f"no common CPU model: {exc}")
    return CompatibilityResult(
        compatible=compatible,
        missing=tuple(missing),
        warnings=tuple(warnings),
        blockers=tuple(blockers),
        suggestion=suggestion,
        vm_cpu=vm_cpu,
    )

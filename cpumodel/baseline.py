"""Cluster baseline: the best migration-safe ``-cpu`` string every host can run.

Algorithm (conservative: only what every host's CPU has natively, never what KVM could
emulate):

1. ``common`` = flags all hosts have, minus what KVM never passes to guests;
2. ``level`` = the highest x86-64 psABI level inside ``common``;
3. base = the named QEMU model of the hosts' vendor with the most flags that fits in
   ``common`` when all hosts share a vendor, else vendor-neutral ``kvm64``;
4. ``+flags`` = every other common flag worth giving a guest (not unmigratable,
   nested-virtualization, needs-configuration or KVM-provided ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpumodel import flags as F
from cpumodel.errors import CpuModelError
from cpumodel.host import HostCpu, vendor_label
from cpumodel.models import (
    NEUTRAL_BASE_MODEL,
    CpuConfig,
    ModelCatalog,
    fitting_models,
    highest_psabi_level,
    next_psabi_level,
)

# Common flags a baseline leaves to the operator (see module docstring, step 4).
NOT_ADDED: frozenset[str] = F.UNMIGRATABLE | F.NESTED | F.NEEDS_CONFIG | F.KVM_PROVIDED


@dataclass(frozen=True)
class HostGap:
    """What one host lacks for the psABI level above the baseline's."""

    name: str
    vendor: str
    lacks_for_next_level: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (vendor as "Intel"/"AMD")."""
        return {
            "name": self.name,
            "vendor": vendor_label(self.vendor),
            "lacks_for_next_level": list(self.lacks_for_next_level),
        }


@dataclass(frozen=True)
class Baseline:
    """A cluster's baseline guest CPU and why it is not higher."""

    cpu: str
    level: str | None
    base_model: str
    features: tuple[str, ...]
    hosts: tuple[HostGap, ...]
    left_out: tuple[str, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``livemig cpu baseline --json`` object."""
        return {
            "cpu": self.cpu,
            "level": self.level,
            "features": list(self.features),
            "hosts": [h.to_dict() for h in self.hosts],
        }


def native_flags(host: HostCpu) -> frozenset[str]:
    """The host's flags a guest could be given (KVM-masked ones removed)."""
    return host.flags - F.HOST_ONLY


def compute_baseline(hosts: Sequence[HostCpu], catalog: ModelCatalog) -> Baseline:
    """The baseline for ``hosts`` with models from ``catalog``; raises CpuModelError."""
    if not hosts:
        raise CpuModelError("a baseline needs at least one host")
    natives = [native_flags(h) for h in hosts]
    common = frozenset.intersection(*natives)
    level = highest_psabi_level(common)
    vendors = {h.vendor for h in hosts}
    notes: list[str] = []

    base = catalog.get(NEUTRAL_BASE_MODEL)
    if len(vendors) == 1 and next(iter(vendors)):
        vendor = next(iter(vendors))
        candidates = fitting_models(common, catalog, vendor)
        if candidates:
            base = candidates[0]
        else:
            notes.append(f"no named {vendor_label(vendor)} model fits every host; using kvm64")
    else:
        labels = ", ".join(sorted(vendor_label(v) for v in vendors))
        notes.append(
            f"hosts mix vendors ({labels}): vendor-neutral {NEUTRAL_BASE_MODEL} base; under KVM "
            "the guest sees the vendor of the host it started on"
        )

    base_flags = base.kvm_flags
    add = common - NOT_ADDED - base_flags
    remove = (base_flags - F.KVM_PROVIDED) - common
    features = F.apply_dependencies((base_flags | add) - remove) - F.KVM_PV_FLAGS
    left_out = common & (F.UNMIGRATABLE | F.NESTED | F.NEEDS_CONFIG)
    if left_out:
        notes.append(
            "common but left out (unmigratable, nested virtualization or needing "
            f"extra configuration): {', '.join(sorted(left_out))}"
        )
    cpu = CpuConfig(base=base.name, enable=add, disable=remove).render()

    above = next_psabi_level(level)
    gaps = tuple(
        HostGap(
            name=h.name,
            vendor=h.vendor,
            lacks_for_next_level=tuple(sorted(above.flags - n)) if above else (),
        )
        for h, n in zip(hosts, natives, strict=True)
    )
    return Baseline(
        cpu=cpu,
        level=level.name if level else None,
        base_model=base.name,
        features=tuple(sorted(features)),
        hosts=gaps,
        left_out=tuple(sorted(left_out)),
        notes=tuple(notes),
    )

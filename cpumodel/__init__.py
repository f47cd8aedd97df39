"""CPU flags and models, host probes, migration compatibility and cluster baselines.

The migration engine's preflight is :func:`check_migration`; ``livemig cpu`` is the
command line over the same functions.
"""

from cpumodel.baseline import Baseline, HostGap, compute_baseline
from cpumodel.compat import CompatibilityResult, check_migration
from cpumodel.errors import (
    CpuMapError,
    CpuModelError,
    CpuParseError,
    QemuProbeError,
    UnknownCpuFlag,
    UnknownCpuModel,
)
from cpumodel.host import HostCpu, SourceKind
from cpumodel.models import (
    PSABI_LEVELS,
    CpuConfig,
    GuestModel,
    ModelCatalog,
    PsabiLevel,
    parse_cpu_string,
    psabi_cpu_string,
)
from cpumodel.qemu import host_from_qmp_async, host_view_from_qmp, load_catalog
from cpumodel.sources import load_host, load_hosts, parse_hosts

__all__ = [
    "PSABI_LEVELS",
    "Baseline",
    "CompatibilityResult",
    "CpuConfig",
    "CpuMapError",
    "CpuModelError",
    "CpuParseError",
    "GuestModel",
    "HostCpu",
    "HostGap",
    "ModelCatalog",
    "PsabiLevel",
    "QemuProbeError",
    "SourceKind",
    "UnknownCpuFlag",
    "UnknownCpuModel",
    "check_migration",
    "compute_baseline",
    "host_from_qmp_async",
    "host_view_from_qmp",
    "load_catalog",
    "load_host",
    "load_hosts",
    "parse_cpu_string",
    "parse_hosts",
    "psabi_cpu_string",
]

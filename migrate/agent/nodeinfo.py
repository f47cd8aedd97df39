"""What ``GET /v1/node`` says about this host: CPU (cpumodel's probe of
``/proc/cpuinfo``) and memory (psutil)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from cpumodel.cpuinfo import parse_cpuinfo
from cpumodel.errors import CpuModelError
from cpumodel.host import HostCpu
from cpumodel.models import highest_psabi_level

CPUINFO = Path("/proc/cpuinfo")


def probe_cpu(name: str, path: Path = CPUINFO) -> HostCpu:
    """This host's CPU as cpumodel describes it; raises ``CpuModelError`` or ``OSError``."""
    return parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"), name)


def cpu_summary(host: HostCpu | None, error: str | None = None) -> dict[str, Any]:
    """Vendor, model, psABI level, flag count, logical CPUs; plus the full description
    (``host``: cpumodel's JSON form, for a peer's compatibility check)."""
    if host is None:
        return {"error": error or "unknown", "logical_cpus": psutil.cpu_count() or 0}
    level = highest_psabi_level(host.flags)
    return {
        "vendor": host.vendor_label,
        "model_name": host.model_name,
        "signature": host.signature,
        "psabi_level": level.name if level else None,
        "flag_count": len(host.flags),
        "logical_cpus": psutil.cpu_count() or 0,
        "host": host.to_dict(),
    }


def probe_cpu_summary(name: str) -> dict[str, Any]:
    try:
        return cpu_summary(probe_cpu(name))
    except (OSError, CpuModelError) as exc:
        return cpu_summary(None, str(exc))


def memory() -> dict[str, int]:
    mem = psutil.virtual_memory()
    return {"total_bytes": int(mem.total), "available_bytes": int(mem.available)}

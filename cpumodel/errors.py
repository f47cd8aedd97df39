"""Errors of the CPU-model package.

    CpuModelError
     ├── CpuParseError      a CPU description (cpuinfo, CPUID dump, XML) is unusable
     └── UnknownCpuModel    a model or flag name nobody knows
"""

from __future__ import annotations


class CpuModelError(Exception):
    """Root of cpumodel's errors."""


class CpuParseError(CpuModelError):
    """A CPU description could not be parsed."""


class UnknownCpuModel(CpuModelError):
    """A CPU model or flag name is not known to QEMU or to our tables."""

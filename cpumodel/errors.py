"""Errors of the CPU-model package.

CpuModelError
 ├── CpuParseError      a CPU description (cpuinfo, CPUID dump, XML, JSON) is unusable
 ├── UnknownCpuModel    a model or flag name nobody knows
 │    └── UnknownCpuFlag    a flag name QEMU does not recognise
 ├── QemuProbeError     the QEMU binary could not be asked about its CPU models
 └── CpuMapError        libvirt's cpu_map is missing or unreadable
"""

from __future__ import annotations


class CpuModelError(Exception):
    """Root of cpumodel's errors."""


class CpuParseError(CpuModelError):
    """A CPU description could not be parsed."""


class UnknownCpuModel(CpuModelError):
    """A CPU model or flag name is not known to QEMU or to our tables."""


class UnknownCpuFlag(UnknownCpuModel):
    """A CPU flag name is not one QEMU recognises (nor a known alias of one)."""


class QemuProbeError(CpuModelError):
    """Starting QEMU or querying it over QMP for CPU models failed (.argv, .output)."""

    def __init__(self, message: str, argv: tuple[str, ...] = (), output: str = "") -> None:
        super().__init__(message)
        self.argv = argv
        self.output = output


class CpuMapError(CpuModelError):
    """libvirt's cpu_map directory is missing or one of its files is unreadable."""

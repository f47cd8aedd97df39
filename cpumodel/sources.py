"""Reading host CPU descriptions from files whose kind is detected from their content."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from cpumodel.cpuid import looks_like_cpuid_dump, parse_cpuid_text
from cpumodel.cpuinfo import looks_like_cpuinfo, looks_like_lscpu, parse_cpuinfo, parse_lscpu
from cpumodel.errors import CpuMapError, CpuParseError, UnknownCpuModel
from cpumodel.host import HostCpu, SourceKind
from cpumodel.inputfile import (
    MAX_INPUT_BYTES,
    InputFileError,
    JsonInputError,
    decode_text,
    loads_json,
    read_input_bytes,
    read_input_json,
)
from cpumodel.libvirt import CpuMap, ModelResolver, looks_like_libvirt_xml, parse_libvirt_cpus
from cpumodel.models import ModelCatalog
from cpumodel.qemu import host_from_expansion

# The largest description we read; real ones (a 128-CPU AIDA64 dump) are under 1 MiB.
MAX_DESCRIPTION_BYTES = MAX_INPUT_BYTES


class TextKind(StrEnum):
    """What a CPU description text turned out to be."""

    CPUINFO = "cpuinfo"
    LSCPU = "lscpu"
    CPUID_DUMP = "cpuid-dump"
    LIBVIRT_XML = "libvirt-xml"
    QMP_JSON = "qmp-json"
    LIVEMIG_JSON = "livemig-json"


def detect_kind(text: str) -> TextKind:
    """Which kind of CPU description ``text`` is; raises CpuParseError for none."""
    stripped = text.strip()
    if not stripped:
        raise CpuParseError("empty CPU description")
    if stripped.startswith("{"):
        data = _json(stripped)
        if "flags" in data and "vendor" in data:
            return TextKind.LIVEMIG_JSON
        if "model" in data or "return" in data:
            return TextKind.QMP_JSON
        raise CpuParseError("JSON is neither a livemig host CPU nor a QMP CPU model expansion")
    if looks_like_libvirt_xml(stripped):
        return TextKind.LIBVIRT_XML
    if looks_like_cpuid_dump(text):
        return TextKind.CPUID_DUMP
    if looks_like_cpuinfo(text):
        return TextKind.CPUINFO
    if looks_like_lscpu(text):
        return TextKind.LSCPU
    raise CpuParseError(
        "not a CPU description (expected /proc/cpuinfo, lscpu, a CPUID dump, "
        "libvirt <cpu> XML or QMP/livemig JSON)"
    )


def _json(text: str) -> dict[str, Any]:
    try:
        data = loads_json(text)
    except JsonInputError as exc:
        raise CpuParseError(f"bad JSON: {exc.detail}") from exc
    if not isinstance(data, dict):
        raise CpuParseError("JSON CPU description must be an object")
    return data


def _qmp_props(data: dict[str, Any]) -> dict[str, Any]:
    body = data.get("return", data)
    try:
        props = body["model"]["props"]
    except (KeyError, TypeError) as exc:
        raise CpuParseError("QMP JSON has no model.props (query-cpu-model-expansion)") from exc
    if not isinstance(props, dict):
        raise CpuParseError("QMP JSON model.props is not an object")
    return props


def model_resolver(
    cpu_map: CpuMap | None, catalog_loader: Callable[[], ModelCatalog] | None
) -> ModelResolver:
    """Resolve libvirt model names via cpu_map, falling back to QEMU's catalogue."""

    def resolve(name: str) -> frozenset[str]:
        if cpu_map is not None and name in cpu_map.models:
            return cpu_map.model_flags(name)
        if catalog_loader is not None:
            model = catalog_loader().get(name)
            return model.flags - {"hypervisor"}
        if cpu_map is None:
            raise CpuMapError(f"model '{name}' needs libvirt's cpu_map, which is not installed")
        raise UnknownCpuModel(f"libvirt cpu_map has no x86 model '{name}'")

    return resolve


def parse_hosts(text: str, name: str, resolve: ModelResolver | None = None) -> list[HostCpu]:
    """Every host CPU in a description text (libvirt XML may hold several)."""
    kind = detect_kind(text)
    if kind is TextKind.LIBVIRT_XML:
        if resolve is None:
            raise CpuMapError("reading libvirt CPU XML needs a model table (cpu_map)")
        return parse_libvirt_cpus(text, resolve, name)
    if kind is TextKind.LIVEMIG_JSON:
        return [HostCpu.from_dict(_json(text)).with_name(name)]
    if kind is TextKind.QMP_JSON:
        return [host_from_expansion(_qmp_props(_json(text)), name, SourceKind.QMP)]
    if kind is TextKind.CPUID_DUMP:
        return [parse_cpuid_text(text, name)]
    if kind is TextKind.CPUINFO:
        return [parse_cpuinfo(text, name)]
    return [parse_lscpu(text, name)]


def read_description(path: Path) -> str:
    """A description file's text; raises CpuParseError naming the file if it is missing,
    not a regular file (a FIFO, a device, a directory), too big or not UTF-8 text."""
    try:
        raw = read_input_bytes(path, MAX_DESCRIPTION_BYTES)
    except InputFileError as exc:
        raise CpuParseError(f"{path}: {exc}") from exc
    try:
        return decode_text(raw)
    except InputFileError as exc:
        raise CpuParseError(f"{path}: not a CPU description: {exc}") from exc


def load_catalog_file(path: Path) -> ModelCatalog:
    """A saved model catalogue (``livemig cpu models --json``); raises CpuParseError."""
    try:
        data = read_input_json(path, MAX_DESCRIPTION_BYTES)
    except InputFileError as exc:
        raise CpuParseError(f"{path}: not a model catalogue: {exc}") from exc
    try:
        return ModelCatalog.from_dict(data)
    except CpuParseError as exc:
        raise CpuParseError(f"{path}: {exc}") from exc


def load_hosts(path: Path, resolve: ModelResolver | None = None) -> list[HostCpu]:
    """Every host CPU described in a file, named after the file; raises CpuModelError."""
    text = read_description(path)
    try:
        return parse_hosts(text, path.stem, resolve)
    except CpuParseError as exc:
        raise CpuParseError(f"{path}: {exc}") from exc


def load_host(path: Path, resolve: ModelResolver | None = None) -> HostCpu:
    """The single host CPU described in a file; raises CpuParseError if it holds several."""
    hosts = load_hosts(path, resolve)
    if len(hosts) != 1:
        raise CpuParseError(f"{path}: describes {len(hosts)} CPUs, expected one")
    return hosts[0]

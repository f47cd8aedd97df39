"""libvirt's view of CPUs: ``cpu_map`` (models and features) and ``<cpu>`` XML.

A ``<cpu>`` with ``<model>M</model>`` means "every feature of M, plus or minus the
listed ``<feature>``s", so reading one needs a model table: libvirt's own cpu_map when
installed (that is what libvirt meant), QEMU's catalogue otherwise (the names agree).

Accepted documents: one or more bare ``<cpu>`` elements (as ``virsh cpu-baseline``
takes them), ``virsh capabilities`` (``/capabilities/host/cpu``), ``virsh
domcapabilities`` (the ``host-model`` mode) and domain XML (``/domain/cpu``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from cpumodel import flags as F
from cpumodel.errors import CpuMapError, CpuParseError, UnknownCpuModel
from cpumodel.host import HostCpu, SourceKind, normalize_flags, vendor_from_label, vendor_label
from cpumodel.inputfile import InputFileError, read_input_bytes
from cpumodel.models import GuestModel, ModelCatalog

DEFAULT_CPU_MAP_DIR = Path("/usr/share/libvirt/cpu_map")

# Given a model name, return its canonical flags; raises UnknownCpuModel.
ModelResolver = Callable[[str], frozenset[str]]

_ABSENT_POLICIES = {"disable", "forbid"}


@dataclass(frozen=True)
class CpuMapFeature:
    """A libvirt x86 feature: its name, aliases, canonical QEMU name, migratability."""

    name: str
    aliases: tuple[str, ...]
    canonical: str | None
    migratable: bool


@dataclass(frozen=True)
class CpuMapModel:
    """A libvirt x86 CPU model: vendor (CPUID string, "" if none) and canonical flags."""

    name: str
    vendor: str
    flags: frozenset[str]
    unrecognized: tuple[str, ...]


@dataclass(frozen=True)
class CpuMap:
    """libvirt's x86 cpu_map: features and models, read from a cpu_map directory."""

    directory: Path
    features: Mapping[str, CpuMapFeature]
    models: Mapping[str, CpuMapModel]

    @property
    def vendor_models(self) -> tuple[CpuMapModel, ...]:
        """Models tied to a vendor, in cpu_map order."""
        return tuple(m for m in self.models.values() if m.vendor)

    def model_flags(self, name: str) -> frozenset[str]:
        """Canonical flags of a model; raises UnknownCpuModel."""
        try:
            return self.models[name].flags
        except KeyError:
            raise UnknownCpuModel(f"libvirt cpu_map has no x86 model '{name}'") from None

    def libvirt_name(self, canonical: str) -> str | None:
        """libvirt's spelling of a canonical flag, or None if libvirt has no such feature."""
        return next((f.name for f in self.features.values() if f.canonical == canonical), None)


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.fromstring(read_input_bytes(path))
    except (InputFileError, ET.ParseError) as exc:
        raise CpuMapError(f"cannot read libvirt cpu_map file {path}: {exc}") from exc


def load_cpu_map(directory: Path = DEFAULT_CPU_MAP_DIR) -> CpuMap:
    """Read libvirt's x86 cpu_map; raises CpuMapError if it is missing or unreadable."""
    index_path = directory / "index.xml"
    if not index_path.is_file():
        raise CpuMapError(f"libvirt cpu_map not found at {directory} (install libvirt-daemon)")
    index = _parse_xml(index_path)
    arch = next((a for a in index.findall("arch") if a.get("name") == "x86"), None)
    if arch is None:
        raise CpuMapError(f"{index_path} has no x86 section")
    vendors: dict[str, str] = {}
    features: dict[str, CpuMapFeature] = {}
    raw_models: list[ET.Element] = []
    for include in arch.findall("include"):
        root = _parse_xml(directory / include.get("filename", ""))
        for element in root:
            if element.tag == "vendor":
                vendors[element.get("name", "")] = element.get("string", "")
            elif element.tag == "feature":
                name = element.get("name", "")
                aliases = tuple(a.get("name", "") for a in element.findall("alias"))
                canonical = F.normalize_flag(name) or next(
                    (c for c in (F.normalize_flag(a) for a in aliases) if c), None
                )
                features[name] = CpuMapFeature(
                    name=name,
                    aliases=aliases,
                    canonical=canonical,
                    migratable=element.get("migratable", "yes") != "no",
                )
            elif element.tag == "model":
                raw_models.append(element)
    models: dict[str, CpuMapModel] = {}
    for element in raw_models:
        name = element.get("name", "")
        parent = element.find("model")
        names: set[str] = set()
        vendor = ""
        if parent is not None and parent.get("name") in models:
            base = models[parent.get("name", "")]
            vendor = base.vendor
            names |= {f for f in base.flags}
        vendor_element = element.find("vendor")
        if vendor_element is not None:
            vendor = vendors.get(vendor_element.get("name", ""), "")
        names |= {f.get("name", "") for f in element.findall("feature")}
        flags, unrecognized = normalize_flags(names)
        models[name] = CpuMapModel(name=name, vendor=vendor, flags=flags, unrecognized=unrecognized)
    return CpuMap(directory=directory, features=features, models=models)


def looks_like_libvirt_xml(text: str) -> bool:
    """True for XML text holding a libvirt CPU description."""
    stripped = text.lstrip()
    return stripped.startswith("<") and bool(
        re.search(r"<(cpu|capabilities|domainCapabilities)\b", text)
    )


def _cpu_elements(root: ET.Element) -> list[ET.Element]:
    found: list[ET.Element] = []
    for child in root:
        if child.tag == "cpu":
            found.append(child)
        elif child.tag == "capabilities":
            found.extend(child.findall("host/cpu"))
        elif child.tag == "domain":
            found.extend(child.findall("cpu"))
        elif child.tag == "domainCapabilities":
            found.extend(m for m in child.findall("cpu/mode") if m.get("name") == "host-model")
    return found


def _int_attr(element: ET.Element | None, attr: str) -> int | None:
    if element is None or element.get(attr) is None:
        return None
    try:
        return int(element.get(attr, ""), 0)
    except ValueError:
        return None


def _host_from_element(
    element: ET.Element, resolve: ModelResolver, name: str, position: int
) -> HostCpu:
    arch = (element.findtext("arch") or "x86_64").strip()
    if arch not in ("x86_64", "i686"):
        raise CpuParseError(f"libvirt CPU #{position + 1} is {arch}, not x86")
    model_name = (element.findtext("model") or "").strip()
    vendor = vendor_from_label(element.findtext("vendor") or "")
    present: set[str] = set()
    absent: set[str] = set()
    unrecognized: set[str] = set()
    if model_name:
        present |= resolve(model_name)
    for feature in element.findall("feature"):
        raw = feature.get("name", "")
        canonical = F.normalize_flag(raw)
        if canonical is None:
            unrecognized.add(raw)
            continue
        (absent if feature.get("policy") in _ABSENT_POLICIES else present).add(canonical)
    flags = F.apply_dependencies(frozenset(present - absent))
    if not flags:
        raise CpuParseError(f"libvirt CPU #{position + 1} names no model and no known feature")
    tsc = next((c for c in element.findall("counter") if c.get("name") == "tsc"), None)
    tsc_hz = _int_attr(tsc, "frequency")
    if tsc is not None and (tsc_hz is None or tsc_hz < 1000):
        raise CpuParseError(
            f"libvirt CPU #{position + 1}: TSC frequency {tsc.get('frequency')!r} Hz "
            "is not a rate a CPU runs at"
        )
    signature = element.find("signature")
    return HostCpu(
        name=name,
        vendor=vendor,
        flags=flags,
        source=SourceKind.LIBVIRT_XML,
        family=_int_attr(signature, "family"),
        model=_int_attr(signature, "model"),
        stepping=_int_attr(signature, "stepping"),
        model_name=f"libvirt {model_name}" if model_name else "",
        tsc_khz=tsc_hz // 1000 if tsc_hz else None,
        unrecognized=tuple(sorted(unrecognized)),
    )


def parse_libvirt_cpus(text: str, resolve: ModelResolver, name: str = "cpu") -> list[HostCpu]:
    """Every CPU in a libvirt XML text (named ``name``, ``name#2``...); raises CpuParseError."""
    body = re.sub(r"<\?xml[^>]*\?>", "", text)
    try:
        root = ET.fromstring(f"<livemig-container>{body}</livemig-container>")
    except ET.ParseError as exc:
        raise CpuParseError(f"libvirt XML: {exc}") from exc
    elements = _cpu_elements(root)
    if not elements:
        raise CpuParseError("libvirt XML has no <cpu> element (nor capabilities/domcapabilities)")
    return [
        _host_from_element(e, resolve, name if i == 0 else f"{name}#{i + 1}", i)
        for i, e in enumerate(elements)
    ]


def host_to_libvirt_xml(host: HostCpu, cpu_map: CpuMap, base_model: str = "kvm64") -> str:
    """A ``<cpu>`` element libvirt reads as exactly this host's flags (those libvirt knows).

    The model is ``base_model`` (vendor-neutral kvm64 by default) and every other flag
    is listed, so the result does not depend on which named model libvirt would pick.
    """
    base = cpu_map.model_flags(base_model)
    if not base <= host.flags:
        missing = ", ".join(sorted(base - host.flags))
        raise CpuParseError(f"{host.name} lacks {base_model} features ({missing})")
    names = sorted(n for n in (cpu_map.libvirt_name(f) for f in host.flags - base) if n is not None)
    lines = ["<cpu>", "  <arch>x86_64</arch>", f"  <model>{base_model}</model>"]
    if host.vendor:
        lines.append(f"  <vendor>{vendor_label(host.vendor)}</vendor>")
    lines += [f"  <feature policy='require' name={quoteattr(n)}/>" for n in names]
    lines.append("</cpu>")
    return "\n".join(lines) + "\n"


def model_to_libvirt_xml(model: CpuMapModel) -> str:
    """A host-style ``<cpu>`` element for a cpu_map model (its vendor, no extra features)."""
    lines = ["<cpu>", "  <arch>x86_64</arch>", f"  <model>{model.name}</model>"]
    if model.vendor:
        lines.append(f"  <vendor>{vendor_label(model.vendor)}</vendor>")
    lines.append("</cpu>")
    return "\n".join(lines) + "\n"


def catalog_from_cpu_map(cpu_map: CpuMap) -> ModelCatalog:
    """A model catalogue from libvirt's cpu_map, for hosts without QEMU (names match
    QEMU's unversioned models; flags are libvirt's definitions)."""
    models = {
        m.name: GuestModel(name=m.name, vendor=m.vendor, flags=m.flags)
        for m in cpu_map.models.values()
    }
    return ModelCatalog(
        qemu_version="libvirt cpu_map", models=models, binary=str(cpu_map.directory)
    )


def parse_baseline_features(text: str, cpu_map: CpuMap) -> frozenset[str]:
    """Canonical flags of a ``virsh cpu-baseline --features`` answer; raises CpuParseError."""
    hosts = parse_libvirt_cpus(text, cpu_map.model_flags, name="libvirt-baseline")
    return hosts[0].flags


def libvirt_known_flags(cpu_map: CpuMap) -> frozenset[str]:
    """Canonical flags libvirt can express at all."""
    return frozenset(f.canonical for f in cpu_map.features.values() if f.canonical is not None)


def unmigratable_flags(cpu_map: CpuMap) -> frozenset[str]:
    """Canonical flags cpu_map marks ``migratable='no'``."""
    return frozenset(
        f.canonical for f in cpu_map.features.values() if not f.migratable and f.canonical
    )

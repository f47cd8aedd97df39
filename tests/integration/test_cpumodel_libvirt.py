"""``livemig cpu baseline`` against libvirt's own ``virsh cpu-baseline``.

For each reference host (Rocket Lake and Alder Lake for Intel, Milan for AMD) and every
x86 model in libvirt's cpu_map of that vendor (plus the vendor-less generic ones), both
tools get the same file: the host as a libvirt ``<cpu>`` and the model as a second
``<cpu>``. Their baseline feature sets must agree, compared on the flags both know,
with exactly these deliberate differences:

* livemig's guest also has what KVM gives every guest (``hypervisor``, ``x2apic``);
* livemig leaves out common flags libvirt keeps: nested virtualization (svm, vmx and
  their sub-features), unmigratable ones (invtsc), ones needing extra configuration
  (SGX, PT, core-capability) and host-only bits KVM never passes (monitor, ds...).

The same comparison also runs once per vendor with every model at once, and libvirt's
feature table (x86_features.xml) is checked against our CPUID/MSR bit tables.
Nothing here skips: no virsh or cpu_map is a failure (scripts/setup-system.sh).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cpumodel import compute_baseline
from cpumodel import flags as F
from cpumodel.baseline import NOT_ADDED
from cpumodel.libvirt import (
    CpuMap,
    catalog_from_cpu_map,
    host_to_libvirt_xml,
    libvirt_known_flags,
    load_cpu_map,
    model_to_libvirt_xml,
    parse_baseline_features,
)
from cpumodel.qemu import load_catalog
from cpumodel.sources import model_resolver, parse_hosts
from migrate.cli import main as livemig_main
from tests.unit.test_cpumodel_fixtures import host

pytestmark = pytest.mark.integration

REFERENCE_HOSTS = {"GenuineIntel": ("rocketlake", "alderlake"), "AuthenticAMD": ("milan",)}
OURS_ONLY_ALLOWED = F.KVM_PROVIDED
LIBVIRT_ONLY_ALLOWED = NOT_ADDED | F.HOST_ONLY


def _cpu_map() -> CpuMap:
    return load_cpu_map()


CPU_MAP = _cpu_map()


def _cases() -> list[tuple[str, str]]:
    cases = []
    for vendor, names in REFERENCE_HOSTS.items():
        for name in names:
            cases += [(name, m.name) for m in CPU_MAP.models.values() if m.vendor in ("", vendor)]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def virsh() -> str:
    path = shutil.which("virsh")
    assert path is not None, "virsh is not installed (libvirt-clients, scripts/setup-system.sh)"
    return path


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    catalog = load_catalog(cache_dir=directory)
    path = directory / "models.json"
    path.write_text(json.dumps(catalog.to_dict()))
    return path


def libvirt_baseline(virsh: str, xml_file: Path) -> frozenset[str]:
    run = subprocess.run(
        [virsh, "-c", "test:///default", "cpu-baseline", "--features", str(xml_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return parse_baseline_features(run.stdout, CPU_MAP)


def livemig_baseline(
    xml_file: Path, models_file: Path, capsys: pytest.CaptureFixture[str]
) -> frozenset[str]:
    """The features of ``livemig cpu baseline --json`` on ``xml_file``."""
    capsys.readouterr()
    code = livemig_main(["cpu", "baseline", "--json", "--models", str(models_file), str(xml_file)])
    out = capsys.readouterr().out
    assert code == 0
    return frozenset(json.loads(out)["features"])


def assert_agree(ours: frozenset[str], theirs: frozenset[str]) -> None:
    vocabulary = libvirt_known_flags(CPU_MAP)
    ours, theirs = ours & vocabulary, theirs & vocabulary
    assert ours - theirs <= OURS_ONLY_ALLOWED, f"only livemig has {sorted(ours - theirs)}"
    assert theirs - ours <= LIBVIRT_ONLY_ALLOWED, f"only libvirt has {sorted(theirs - ours)}"
    assert ours - OURS_ONLY_ALLOWED == theirs - LIBVIRT_ONLY_ALLOWED


def test_every_vendor_model_is_covered() -> None:
    intel = {m.name for m in CPU_MAP.models.values() if m.vendor == "GenuineIntel"}
    amd = {m.name for m in CPU_MAP.models.values() if m.vendor == "AuthenticAMD"}
    assert len(intel) >= 30 and len(amd) >= 10
    covered = {model for _, model in CASES}
    assert intel | amd <= covered


@pytest.mark.parametrize(("reference", "model"), CASES, ids=[f"{h}+{m}" for h, m in CASES])
def test_baseline_agrees_with_libvirt(
    reference: str,
    model: str,
    virsh: str,
    models_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    xml_file = tmp_path / "cpus.xml"
    xml_file.write_text(
        host_to_libvirt_xml(host(reference), CPU_MAP) + model_to_libvirt_xml(CPU_MAP.models[model])
    )
    ours = livemig_baseline(xml_file, models_file, capsys)
    assert_agree(ours, libvirt_baseline(virsh, xml_file))


@pytest.mark.parametrize("vendor", sorted(REFERENCE_HOSTS))
def test_baseline_of_all_models_of_a_vendor_agrees_with_libvirt(
    vendor: str,
    virsh: str,
    models_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = "".join(host_to_libvirt_xml(host(n), CPU_MAP) for n in REFERENCE_HOSTS[vendor])
    text += "".join(model_to_libvirt_xml(m) for m in CPU_MAP.models.values() if m.vendor == vendor)
    xml_file = tmp_path / "all.xml"
    xml_file.write_text(text)
    ours = livemig_baseline(xml_file, models_file, capsys)
    assert_agree(ours, libvirt_baseline(virsh, xml_file))


def _mask_bits(value: str) -> list[int]:
    mask = int(value, 16)
    return [bit for bit in range(64) if mask >> bit & 1]


def test_cpuid_and_msr_tables_agree_with_libvirt() -> None:
    cpuid_table = {
        (w.leaf, w.subleaf, w.register.value, bit): name
        for w in F.CPUID_WORDS
        for bit, name in w.bits.items()
    }
    msr_table = {(w.index, bit): name for w in F.MSR_WORDS for bit, name in w.bits.items()}
    root = ET.parse(CPU_MAP.directory / "x86_features.xml").getroot()
    checked = 0
    for element in root.iter("feature"):
        canonical = CPU_MAP.features[element.get("name", "")].canonical
        if canonical is None:
            continue
        for cpuid in element.findall("cpuid"):
            leaf = int(cpuid.get("eax_in", "0"), 16)
            subleaf = int(cpuid.get("ecx_in", "0"), 16)
            for register in ("eax", "ebx", "ecx", "edx"):
                for bit in _mask_bits(cpuid.get(register, "0")):
                    assert cpuid_table.get((leaf, subleaf, register, bit)) == canonical, (
                        f"libvirt puts {canonical} at {leaf:#x}.{subleaf}:{register}[{bit}]"
                    )
                    checked += 1
        for msr in element.findall("msr"):
            index = int(msr.get("index", "0"), 16)
            for bit in _mask_bits(msr.get("eax", "0")):
                assert msr_table.get((index, bit)) == canonical
                checked += 1
    assert checked >= 190


def test_host_xml_round_trips_through_libvirt_names() -> None:
    rocketlake = host("rocketlake")
    xml = host_to_libvirt_xml(rocketlake, CPU_MAP)
    names = set(re.findall(r"name=[\"']([^\"']+)[\"']", xml))
    assert {"pclmuldq", "lahf_lm", "sse4.1", "tsc_adjust"} <= names  # libvirt's spellings
    (parsed,) = parse_hosts(xml, "rkl", model_resolver(CPU_MAP, None))
    assert parsed.flags == rocketlake.flags & libvirt_known_flags(CPU_MAP)


def test_cpu_map_as_a_model_source_without_qemu() -> None:
    models = catalog_from_cpu_map(CPU_MAP)
    baseline = compute_baseline([host("milan"), host("rocketlake"), host("alderlake")], models)
    assert baseline.level == "x86-64-v3" and baseline.cpu.startswith("kvm64,")
    intel = compute_baseline([host("rocketlake"), host("alderlake")], models)
    assert intel.base_model in {m.name for m in CPU_MAP.vendor_models}

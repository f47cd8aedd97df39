"""Flag names and every kind of host CPU description: cpuinfo, lscpu, CPUID dumps,
libvirt XML, QMP and livemig JSON, detected from content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpumodel import flags as F
from cpumodel.cpuid import parse_cpuid_text
from cpumodel.errors import CpuMapError, CpuParseError, UnknownCpuFlag, UnknownCpuModel
from cpumodel.host import HostCpu, SourceKind, kvm_supported
from cpumodel.sources import TextKind, detect_kind, load_host, model_resolver, parse_hosts
from tests.unit.test_cpumodel_fixtures import FIXTURES, HAND_CHECKED, catalog, host

CPUINFO = FIXTURES / "lab-vm-amd-family26-cpuinfo.txt"
LSCPU = FIXTURES / "lab-vm-amd-family26-lscpu.txt"


# --- flag names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("pni", "pni"),
        ("sse3", "pni"),
        ("lahf_lm", "lahf-lm"),
        ("sse4_1", "sse4.1"),
        ("sse4-2", "sse4.2"),
        ("lzcnt", "abm"),
        ("abm", "abm"),
        ("pclmuldq", "pclmulqdq"),
        ("fxsr_opt", "fxsr-opt"),
        ("tsc_deadline_timer", "tsc-deadline"),
        ("sha_ni", "sha-ni"),
        ("avx512_vpopcntdq", "avx512-vpopcntdq"),
        ("avx512_vbmi2", "avx512vbmi2"),
        ("nonstop_tsc", "invtsc"),
        ("cr8_legacy", "cr8legacy"),
        ("nodeid_msr", "nodeid-msr"),
        ("arch_capabilities", "arch-capabilities"),
        ("MD_CLEAR", "md-clear"),
    ],
)
def test_spellings_normalise_to_qemu_names(spelling: str, canonical: str) -> None:
    assert F.normalize_flag(spelling) == canonical
    assert canonical in F.QEMU_FLAGS


def test_linux_speculation_flags_depend_on_vendor() -> None:
    assert F.normalize_flag("ibrs", "GenuineIntel") == "spec-ctrl"
    assert F.normalize_flag("ibrs", "AuthenticAMD") == "ibrs"
    assert F.normalize_flag("stibp", "AuthenticAMD") == "amd-stibp"
    assert F.normalize_flag("ssbd", "GenuineIntel") == "ssbd"


def test_unknown_flag_is_refused_with_suggestions() -> None:
    with pytest.raises(UnknownCpuFlag, match=r"'avx513f'.*avx512f"):
        F.canonical_flag("avx513f")
    assert F.normalize_flag("constant_tsc") is None


def test_bit_tables_use_only_qemu_names_without_collisions() -> None:
    seen: set[tuple[int, int, str, int]] = set()
    for word in F.CPUID_WORDS:
        for bit, name in word.bits.items():
            assert 0 <= bit < 32 and name in F.QEMU_FLAGS
            key = (word.leaf, word.subleaf, word.register.value, bit)
            assert key not in seen
            seen.add(key)
    for msr in F.MSR_WORDS:
        assert all(0 <= bit < 64 and name in F.QEMU_FLAGS for bit, name in msr.bits.items())
    decodable = {n for w in F.CPUID_WORDS for n in w.bits.values()}
    decodable |= {n for w in F.MSR_WORDS for n in w.bits.values()}
    # Only KVM's paravirtual leaf is not a host CPUID/MSR bit.
    assert F.QEMU_FLAGS - decodable == F.KVM_PV_FLAGS
    for category in (F.HOST_ONLY, F.KVM_PROVIDED, F.NESTED, F.NEEDS_CONFIG, F.UNMIGRATABLE):
        assert category <= F.QEMU_FLAGS


def test_dependencies_drop_children_of_absent_parents() -> None:
    flags = frozenset({"vmx-ept", "vmx-ept-2mb", "mds-no", "npt", "svm"})
    assert F.apply_dependencies(flags) == frozenset({"npt", "svm"})
    with_vmx = flags | {"vmx", "vmx-secondary-ctls", "arch-capabilities"}
    assert F.apply_dependencies(with_vmx) == with_vmx


# --- CPUID dumps --------------------------------------------------------------------


def _cpuid_r(aida_text: str) -> str:
    """The same registers in ``cpuid -r`` layout."""
    lines = ["CPU 0:"]
    for line in aida_text.splitlines():
        if not line.startswith("CPUID "):
            continue
        leaf, regs = line[6:14], line[16:51].split("-")
        subleaf = line.split("[SL ")[1][:2] if "[SL " in line else "00"
        lines.append(
            f"   0x{leaf.lower()} 0x{subleaf.lower()}: eax=0x{regs[0].lower()} "
            f"ebx=0x{regs[1].lower()} ecx=0x{regs[2].lower()} edx=0x{regs[3].lower()}"
        )
    return "\n".join(lines) + "\n"


def test_cpuid_r_layout_decodes_like_aida() -> None:
    aida = parse_cpuid_text(HAND_CHECKED["milan"], "m")
    cpuid_r = parse_cpuid_text(_cpuid_r(HAND_CHECKED["milan"]), "m")
    assert cpuid_r == aida


def test_only_the_first_logical_cpu_is_read() -> None:
    p_core = HAND_CHECKED["alderlake"]
    # An E-core without AVX-VNNI in leaf 7.1 must not leak into the first CPU's view.
    e_core = p_core.replace("00400810-00000000", "00000000-00000000")
    text = (
        "------[ CPUID Registers / Logical CPU #0 ]------\n" + p_core +
        "------[ CPUID Registers / Logical CPU #1 ]------\n" + e_core
    )  # fmt: skip
    assert "avx-vnni" in parse_cpuid_text(text).flags
    e_core_first = (
        "------[ CPUID Registers / Logical CPU #0 ]------\n" + e_core +
        "------[ CPUID Registers / Logical CPU #1 ]------\n" + p_core
    )  # fmt: skip
    assert "avx-vnni" not in parse_cpuid_text(e_core_first).flags


def test_headerless_dump_stops_at_the_second_cpu() -> None:
    first = HAND_CHECKED["alderlake"]
    second = first.replace("00400810-00000000", "00000000-00000000")
    assert "avx-vnni" in parse_cpuid_text(first + second).flags
    assert "avx-vnni" not in parse_cpuid_text(second + first).flags


def test_msr_bits_are_unknown_without_an_msr_dump() -> None:
    no_msr = "\n".join(
        line for line in HAND_CHECKED["rocketlake"].splitlines() if not line.startswith("MSR")
    )
    decoded = parse_cpuid_text(no_msr)
    assert "arch-capabilities" in decoded.flags
    assert decoded.unknown >= F.ARCH_CAPABILITIES_BITS
    assert not decoded.flags & F.ARCH_CAPABILITIES_BITS
    milan = parse_cpuid_text(HAND_CHECKED["milan"])
    assert not milan.unknown & F.ARCH_CAPABILITIES_BITS  # no arch-capabilities MSR at all


def test_dump_without_leaf_1_is_refused() -> None:
    with pytest.raises(CpuParseError, match="leaf 0 and leaf 1"):
        parse_cpuid_text("CPUID 00000000: 00000010-68747541-444D4163-69746E65\n")


# --- Linux text ---------------------------------------------------------------------


def test_cpuinfo_and_lscpu_of_the_lab_vm_agree() -> None:
    cpuinfo = load_host(CPUINFO)
    lscpu = load_host(LSCPU)
    assert cpuinfo.source is SourceKind.CPUINFO and lscpu.source is SourceKind.LSCPU
    assert cpuinfo.flags == lscpu.flags
    assert (cpuinfo.vendor, cpuinfo.family, cpuinfo.model, cpuinfo.stepping) == (
        "AuthenticAMD", 26, 2, 1,
    )  # fmt: skip
    assert {"pni", "lahf-lm", "sse4.1", "abm", "tsc-deadline", "invtsc", "hypervisor"} <= (
        cpuinfo.flags
    )
    assert "constant_tsc" in cpuinfo.unrecognized
    assert "amd-no-ssb" in cpuinfo.unknown  # Linux has no cpuinfo name for it


def test_cpuinfo_hides_arch_capabilities_bits() -> None:
    text = "processor : 0\nvendor_id : GenuineIntel\nflags : fpu sse sse2 lm arch_capabilities\n"
    parsed = parse_hosts(text, "intel")[0]
    assert "arch-capabilities" in parsed.flags
    assert parsed.unknown >= F.ARCH_CAPABILITIES_BITS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty CPU description"),
        ("   \n\n", "empty CPU description"),
        ("hello world\nthis is not a cpu\n", "not a CPU description"),
        ("\x00\x01\x02garbage\xff", "not a CPU description"),
        ("processor : 0\nvendor_id : GenuineIntel\nflags :\n", "cpuinfo: no CPU flags"),
        ("processor : 0\nflags : foo bar baz\n", "none of the 3 flags"),
        ("Architecture: x86_64\nFlags: \n", "lscpu: no CPU flags"),
        ("{}", "neither a livemig host CPU nor a QMP"),
        ("{not json", "bad JSON"),
        ('{"model": {"name": "host"}}', "no model.props"),
        ("<cpu><model>Bogus</model></cpu>", "Bogus"),
        ("<cpu>", "libvirt XML"),
        ("<domain><name>x</name></domain>", "not a CPU description"),
    ],
)
def test_bad_descriptions_raise_one_clear_error(text: str, message: str) -> None:
    resolver = model_resolver(None, catalog)
    with pytest.raises((CpuParseError, UnknownCpuModel), match=message):
        parse_hosts(text, "bad", resolver)


def test_missing_file_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(CpuParseError, match="cannot read"):
        load_host(tmp_path / "nope.txt")


# --- libvirt XML --------------------------------------------------------------------

CAPABILITIES = """<?xml version="1.0"?>
<capabilities>
  <host>
    <uuid>00000000-0000-0000-0000-000000000000</uuid>
    <cpu>
      <arch>x86_64</arch>
      <model>Skylake-Client-v4</model>
      <vendor>Intel</vendor>
      <microcode version='240'/>
      <signature family='6' model='158' stepping='10'/>
      <counter name='tsc' frequency='3192000000' scaling='no'/>
      <topology sockets='1' dies='1' cores='6' threads='2'/>
      <feature name='vmx'/>
      <feature name='pdcm'/>
      <feature name='md_clear'/>
      <feature name='mbm_total'/>
      <feature name='xsaves' policy='disable'/>
    </cpu>
  </host>
</capabilities>
"""


def test_libvirt_capabilities_xml() -> None:
    (parsed,) = parse_hosts(CAPABILITIES, "skl", model_resolver(None, catalog))
    assert parsed.source is SourceKind.LIBVIRT_XML
    assert parsed.vendor == "GenuineIntel"
    assert (parsed.family, parsed.model, parsed.stepping) == (6, 158, 10)
    assert parsed.tsc_khz == 3_192_000
    assert {"vmx", "pdcm", "md-clear", "avx2", "xsavec"} <= parsed.flags
    assert "xsaves" not in parsed.flags  # policy='disable' removes a model feature
    assert parsed.unrecognized == ("mbm_total",)


def test_libvirt_bare_cpus_and_domcapabilities() -> None:
    two = "<cpu><model>kvm64</model></cpu>\n<cpu><model>qemu64</model><vendor>AMD</vendor></cpu>"
    first, second = parse_hosts(two, "pair", model_resolver(None, catalog))
    assert (first.name, second.name) == ("pair", "pair#2")
    assert second.vendor == "AuthenticAMD" and "svm" in second.flags
    domcaps = """<domainCapabilities><cpu>
      <mode name='host-passthrough' supported='yes'/>
      <mode name='host-model' supported='yes'>
        <model fallback='forbid'>kvm64</model><vendor>AMD</vendor>
        <feature policy='require' name='avx2'/>
      </mode>
      <mode name='custom' supported='yes'><model usable='yes'>qemu64</model></mode>
    </cpu></domainCapabilities>"""
    (model,) = parse_hosts(domcaps, "dc", model_resolver(None, catalog))
    assert "avx2" in model.flags and model.vendor == "AuthenticAMD"


def test_libvirt_xml_needs_a_model_table() -> None:
    with pytest.raises(CpuMapError, match="cpu_map"):
        parse_hosts("<cpu><model>Haswell</model></cpu>", "x", model_resolver(None, None))


# --- JSON ---------------------------------------------------------------------------


def test_qmp_expansion_json() -> None:
    props = {"vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1, "avx2": True,
             "sse3": True, "pni": True, "lm": True, "tsc-frequency": 2_000_000_000,
             "model-id": "AMD EPYC 7713", "vmx": False}  # fmt: skip
    text = json.dumps({"return": {"model": {"name": "host", "props": props}}})
    assert detect_kind(text) is TextKind.QMP_JSON
    (parsed,) = parse_hosts(text, "qmp")
    assert parsed.flags == frozenset({"avx2", "pni", "lm"})
    assert parsed.tsc_khz == 2_000_000
    assert parsed.source is SourceKind.QMP


@st.composite
def hosts(draw: st.DrawFn) -> HostCpu:
    flags = draw(st.frozensets(st.sampled_from(sorted(F.QEMU_FLAGS)), min_size=1))
    return HostCpu(
        name=draw(st.text(min_size=1, max_size=20)),
        vendor=draw(st.sampled_from(["GenuineIntel", "AuthenticAMD", ""])),
        flags=flags,
        source=draw(st.sampled_from(list(SourceKind))),
        family=draw(st.none() | st.integers(0, 255)),
        model=draw(st.none() | st.integers(0, 255)),
        stepping=draw(st.none() | st.integers(0, 15)),
        model_name=draw(st.text(max_size=40)),
        tsc_khz=draw(st.none() | st.integers(1, 10_000_000)),
        unknown=draw(st.frozensets(st.sampled_from(sorted(F.ARCH_CAPABILITIES_BITS)))),
        unrecognized=tuple(sorted(draw(st.frozensets(st.text(min_size=1, max_size=8))))),
    )


@given(hosts())
def test_host_json_round_trip(cpu: HostCpu) -> None:
    text = json.dumps(cpu.to_dict())
    assert detect_kind(text) is TextKind.LIVEMIG_JSON
    assert HostCpu.from_dict(json.loads(text)) == cpu


def test_kvm_view_of_a_host() -> None:
    milan = host("milan")
    supported = kvm_supported(milan)
    assert "monitor" in milan.flags and "monitor" not in supported  # KVM masks MONITOR
    assert {"hypervisor", "x2apic", "tsc-deadline"} <= supported  # KVM provides/emulates
    assert {"spec-ctrl", "stibp", "ssbd"} <= supported  # mirrored from AMD's ibpb/ibrs bits

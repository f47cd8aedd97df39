"""Guest CPU models: -cpu strings, psABI levels and the model catalogue."""

from __future__ import annotations

import itertools

import pytest

from cpumodel import flags as F
from cpumodel.errors import CpuParseError, UnknownCpuFlag, UnknownCpuModel
from cpumodel.models import (
    PSABI_LEVELS,
    CpuConfig,
    fitting_models,
    highest_psabi_level,
    named_guest_flags,
    next_psabi_level,
    parse_cpu_string,
    psabi_cpu_string,
    psabi_level,
)
from tests.unit.test_cpumodel_fixtures import catalog, host


def test_psabi_levels_are_cumulative_qemu_flags() -> None:
    for lower, upper in itertools.pairwise(PSABI_LEVELS):
        assert lower.flags < upper.flags
    for level in PSABI_LEVELS:
        assert level.flags <= F.QEMU_FLAGS
    assert psabi_level("x86-64-v3").flags - psabi_level("x86-64-v2").flags == {
        "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
    }  # fmt: skip
    assert next_psabi_level(None) == PSABI_LEVELS[0]
    assert next_psabi_level(PSABI_LEVELS[-1]) is None


def test_reference_hosts_psabi_levels() -> None:
    assert highest_psabi_level(host("milan").flags) == psabi_level("x86-64-v3")
    assert highest_psabi_level(host("alderlake").flags) == psabi_level("x86-64-v3")
    assert highest_psabi_level(host("rocketlake").flags) == psabi_level("x86-64-v4")
    assert highest_psabi_level(frozenset({"sse2"})) is None


def test_psabi_cpu_string_is_kvm64_plus_flags() -> None:
    text = psabi_cpu_string(psabi_level("x86-64-v3"), catalog())
    assert text.startswith("kvm64,+")
    config = parse_cpu_string(text, catalog())
    assert psabi_level("x86-64-v3").flags <= named_guest_flags(config, catalog())
    # The level name itself is accepted as a -cpu value and means the same.
    alias = parse_cpu_string("x86-64-v3", catalog())
    assert named_guest_flags(alias, catalog()) == named_guest_flags(config, catalog())


def test_parse_cpu_string_edits_and_properties() -> None:
    config = parse_cpu_string(
        "Skylake-Client-v4,+avx512f,-hle,sse4_1=on,rtm=off,tsc-frequency=2.5GHz,enforce",
        catalog(),
    )
    assert config.base == "Skylake-Client-v4"
    assert config.enable == {"avx512f", "sse4.1"}
    assert config.disable == {"hle", "rtm"}
    assert config.tsc_frequency_hz == 2_500_000_000
    flags = named_guest_flags(config, catalog())
    assert "avx512f" in flags and not {"hle", "rtm"} & flags
    # -flag wins over +flag, as in QEMU's legacy syntax.
    assert parse_cpu_string("kvm64,+avx,-avx", catalog()).disable == {"avx"}
    assert parse_cpu_string("host,+invtsc", catalog()).is_passthrough


def test_named_model_under_kvm() -> None:
    milan = named_guest_flags(parse_cpu_string("EPYC-Milan", catalog()), catalog())
    # QEMU's kvm_default_props: x2apic on, monitor and svm (with its sub-features) off.
    assert "x2apic" in milan
    assert not {"monitor", "svm", "npt"} & milan
    assert not milan & F.KVM_PV_FLAGS


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("Skylake-Clinet", UnknownCpuModel, r"unknown CPU model 'Skylake-Clinet'.*Skylake-Client"),
        ("kvm64,+avx513f", UnknownCpuFlag, r"unknown CPU flag 'avx513f'"),
        ("kvm64,bogus=on", UnknownCpuFlag, r"unknown CPU flag or property 'bogus'"),
        ("", CpuParseError, "empty CPU model string"),
        ("kvm64,tsc-frequency=fast", CpuParseError, "bad tsc-frequency"),
        ("x86-64-v5", UnknownCpuModel, "x86-64-v5"),
    ],
)
def test_bad_cpu_strings(text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_cpu_string(text, catalog())


def test_render_round_trips() -> None:
    config = CpuConfig(base="kvm64", enable=frozenset({"avx", "aes"}), disable=frozenset({"vme"}))
    assert config.render() == "kvm64,+aes,+avx,-vme"
    assert parse_cpu_string(config.render(), catalog()) == config


def test_fitting_models_best_first() -> None:
    milan = host("milan").flags
    fitting = fitting_models(milan, catalog(), "AuthenticAMD")
    assert fitting[0].name == "EPYC-Milan-v1"
    assert all(m.alias_of is None and m.vendor == "AuthenticAMD" for m in fitting)
    assert not fitting_models(milan, catalog(), "GenuineIntel")[0].flags & {"avx512f"}

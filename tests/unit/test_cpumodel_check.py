"""Migration compatibility checks and cluster baselines on the reference hosts.

Milan = AMD EPYC 7713, Rocket Lake = Xeon E-2356G, Alder Lake = Core i9-12900K, as
decoded from real CPUID dumps (tests/fixtures/cpu).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpumodel import CompatibilityResult, check_migration, compute_baseline
from cpumodel import flags as F
from cpumodel.host import HostCpu, SourceKind
from cpumodel.models import psabi_level
from tests.unit.test_cpumodel_fixtures import HOSTS, catalog, host

V3 = psabi_level("x86-64-v3").flags
V4_EXTRA = psabi_level("x86-64-v4").flags - V3


def test_host_from_milan_to_rocketlake_is_incompatible() -> None:
    result = check_migration("host", host("milan"), host("rocketlake"), catalog())
    assert not result.compatible
    # AMD-only instructions and bits a '-cpu host' guest on Milan has and Rocket Lake lacks.
    assert {"sse4a", "misalignsse", "clzero", "xsaveerptr", "wbnoinvd", "mmxext", "svm"} <= set(
        result.missing
    )
    assert list(result.missing) == sorted(result.missing)
    # Nothing Rocket Lake has (AVX-512, or what KVM provides itself) is reported missing.
    assert not set(result.missing) & (F.AVX512 | F.KVM_PROVIDED)
    assert any("across vendors" in b for b in result.blockers)
    assert result.suggestion is not None and result.suggestion.startswith("kvm64,")
    assert check_migration(
        result.suggestion, host("milan"), host("rocketlake"), catalog()
    ).compatible


def test_host_between_intel_generations() -> None:
    down = check_migration("host", host("rocketlake"), host("alderlake"), catalog())
    assert not down.compatible
    assert set(down.missing) >= V4_EXTRA
    assert any(w.startswith("AVX-512 on source rocketlake only") for w in down.warnings)
    up = check_migration("host", host("alderlake"), host("rocketlake"), catalog())
    assert not up.compatible
    assert {"avx-vnni", "serialize", "taa-no"} <= set(up.missing)
    assert any("told taa-no" in w for w in up.warnings)  # arch-capabilities claim lost


def test_host_on_identical_hosts_is_compatible_without_unsafe_warning() -> None:
    result = check_migration("host", host("alderlake"), host("alderlake"), catalog())
    assert result.compatible and result.missing == ()
    assert not any("unsafe" in w for w in result.warnings)


@pytest.mark.parametrize(("source", "target"), list(itertools.permutations(sorted(HOSTS), 2)))
def test_kvm64_everywhere_is_compatible(source: str, target: str) -> None:
    result = check_migration("kvm64", host(source), host(target), catalog())
    assert result.compatible
    assert result.missing == () and result.blockers == ()
    vendor_change = host(source).vendor != host(target).vendor
    assert any("vendor changes" in w for w in result.warnings) == vendor_change


def test_baseline_of_the_reference_cluster_is_x86_64_v3() -> None:
    hosts = [host("milan"), host("rocketlake"), host("alderlake")]
    baseline = compute_baseline(hosts, catalog())
    assert baseline.level == "x86-64-v3"
    assert baseline.cpu.startswith("kvm64,+")  # mixed vendors: the vendor-neutral base
    features = set(baseline.features)
    assert features >= V3
    assert not features & F.AVX512  # Rocket Lake alone has AVX-512
    assert not features & (F.UNMIGRATABLE | F.NESTED | F.HOST_ONLY)
    assert {"aes", "sha-ni", "vaes", "xsaves"} <= features  # common extras worth adding
    lacks = {h.name: h.lacks_for_next_level for h in baseline.hosts}
    assert lacks == {
        "milan": tuple(sorted(V4_EXTRA)),
        "rocketlake": (),
        "alderlake": tuple(sorted(V4_EXTRA)),
    }
    as_json = baseline.to_dict()
    assert set(as_json) == {"cpu", "level", "features", "hosts"}
    assert as_json["hosts"][0] == {
        "name": "milan", "vendor": "AMD", "lacks_for_next_level": sorted(V4_EXTRA),
    }  # fmt: skip
    for source, target in itertools.permutations(hosts, 2):
        assert check_migration(baseline.cpu, source, target, catalog()).compatible


def test_same_vendor_baseline_uses_a_named_model() -> None:
    baseline = compute_baseline([host("rocketlake"), host("alderlake")], catalog())
    assert baseline.base_model == "Skylake-Client-v4"
    assert baseline.level == "x86-64-v3"
    alone = compute_baseline([host("milan")], catalog())
    assert alone.base_model == "EPYC-Milan-v1"
    assert compute_baseline([host("rocketlake")], catalog()).level == "x86-64-v4"


def test_invtsc_blocks_migration_unless_tsc_frequency_is_pinned() -> None:
    rkl, adl = host("rocketlake"), host("alderlake")
    blocked = check_migration("Skylake-Client-v4,+invtsc", rkl, rkl, catalog())
    assert not blocked.compatible and any("invtsc" in b for b in blocked.blockers)
    pinned = check_migration(
        "Skylake-Client-v4,+invtsc,tsc-frequency=3192000000", rkl, rkl, catalog()
    )
    assert pinned.compatible
    # Pinned to Rocket Lake's rate, Alder Lake (3187.2 MHz) needs TSC scaling, which it has.
    assert "vmx-tsc-scaling" in adl.flags
    moved = check_migration(
        "Skylake-Client-v4,+invtsc,tsc-frequency=3192000000", rkl, adl, catalog()
    )
    assert moved.compatible
    no_scaling = dataclasses.replace(adl, flags=adl.flags - {"vmx-tsc-scaling"})
    refused = check_migration(
        "Skylake-Client-v4,+invtsc,tsc-frequency=3192000000", rkl, no_scaling, catalog()
    )
    assert not refused.compatible and any("no TSC scaling" in b for b in refused.blockers)


def test_tsc_frequency_difference_is_a_warning() -> None:
    result = check_migration("kvm64", host("rocketlake"), host("alderlake"), catalog())
    assert result.compatible
    assert any("TSC frequency differs: source 3192.000 MHz, target 3187.200 MHz" in w
               for w in result.warnings)  # fmt: skip


def test_pinned_vendor_silences_the_vendor_warning() -> None:
    result = check_migration(
        "kvm64,vendor=GenuineIntel", host("milan"), host("alderlake"), catalog()
    )
    assert not any("vendor" in w for w in result.warnings)


def test_named_model_features_the_source_lacks_are_reported() -> None:
    result = check_migration("Icelake-Server-v6", host("rocketlake"), host("rocketlake"), catalog())
    assert any(w.startswith("source rocketlake lacks") and "la57" in w for w in result.warnings)
    assert result.compatible  # QEMU dropped them on the source, so the guest never had them


def test_unknown_target_bits_are_warned_not_missing() -> None:
    cpuinfo_target = dataclasses.replace(
        host("rocketlake"),
        name="rkl-cpuinfo",
        source=SourceKind.CPUINFO,
        flags=host("rocketlake").flags - F.ARCH_CAPABILITIES_BITS,
        unknown=F.ARCH_CAPABILITIES_BITS,
    )
    result = check_migration("host", host("rocketlake"), cpuinfo_target, catalog())
    assert not set(result.missing) & F.ARCH_CAPABILITIES_BITS
    assert any(w.startswith("cannot verify") and "mds-no" in w for w in result.warnings)


def test_result_round_trip() -> None:
    result = check_migration("host", host("milan"), host("rocketlake"), catalog())
    assert CompatibilityResult.from_dict(result.to_dict()) == result
    assert any(line.startswith("target lacks") for line in result.reasons)


@st.composite
def weakened_hosts(draw: st.DrawFn) -> list[HostCpu]:
    names = draw(st.lists(st.sampled_from(sorted(HOSTS)), min_size=1, max_size=4))
    hosts = []
    for i, name in enumerate(names):
        base = host(name)
        dropped = draw(st.frozensets(st.sampled_from(sorted(base.flags)), max_size=12))
        hosts.append(dataclasses.replace(base, name=f"{name}-{i}", flags=base.flags - dropped))
    return hosts


@settings(max_examples=60, deadline=None)
@given(weakened_hosts())
def test_baseline_runs_on_every_host_and_moves_between_them(hosts: list[HostCpu]) -> None:
    baseline = compute_baseline(hosts, catalog())
    for source, target in itertools.product(hosts, repeat=2):
        result = check_migration(baseline.cpu, source, target, catalog())
        assert result.missing == (), (baseline.cpu, source.name, target.name)
        assert not any(w.startswith(f"source {source.name} lacks") for w in result.warnings)

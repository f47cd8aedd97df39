"""The committed CPU fixtures, and proof that the decoder still produces them.

The three reference hosts (tests/fixtures/cpu/*.json) were decoded from the raw CPUID
dumps in ../shared/fixtures/cpuid, which are not committed (their README grants no
licence). When ../shared is present the full dump is re-decoded and must give the
committed JSON exactly; on a fresh clone a few registers copied from those dumps, each
checked by hand below, are decoded instead and must agree on every flag they cover.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cpumodel import flags as F
from cpumodel.cpuid import parse_cpuid_dump, parse_cpuid_text
from cpumodel.host import HostCpu
from cpumodel.models import ModelCatalog

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "cpu"
SHARED_DUMPS = REPO.parent / "shared" / "fixtures" / "cpuid"

# Operator-facing host name -> fixture file stem.
HOSTS = {
    "milan": "milan-epyc-7713",
    "rocketlake": "rocketlake-xeon-e2356g",
    "alderlake": "alderlake-i9-12900k",
}


def fixture_json(stem: str) -> dict[str, Any]:
    """A committed host fixture as parsed JSON."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{stem}.json").read_text())
    return data


def host(name: str) -> HostCpu:
    """A reference host (milan, rocketlake, alderlake) from its committed fixture."""
    return HostCpu.from_dict(fixture_json(HOSTS[name])).with_name(name)


@functools.cache
def catalog() -> ModelCatalog:
    """QEMU 7.2's named models as committed (tests/fixtures/cpu/qemu-models.json)."""
    return ModelCatalog.from_dict(json.loads((FIXTURES / "qemu-models.json").read_text()))


# Registers copied from the first logical CPU of each dump; the flags they must give are
# checked by hand in test_hand_checked_registers.
HAND_CHECKED = {
    "milan": """
CPUID 00000000: 00000010-68747541-444D4163-69746E65 [AuthenticAMD]
CPUID 00000001: 00A00F11-00800800-7EDA320B-178BFBFF
CPUID 00000006: 00000004-00000000-00000001-00000000
CPUID 00000007: 00000000-219C97A9-0040068C-00000010 [SL 00]
CPUID 0000000D: 0000000F-00000350-00001800-00000000 [SL 01] [SSE]
CPUID 80000000: 80000023-68747541-444D4163-69746E65 [AuthenticAMD]
CPUID 80000001: 00A00F11-40000000-75C237FF-2FD3FBFF
CPUID 80000002: 20444D41-43595045-31373720-34362033 [AMD EPYC 7713 64]
CPUID 80000003: 726F432D-72502065-7365636F-20726F73 [-Core Processor ]
CPUID 80000004: 20202020-20202020-20202020-00202020 [               ]
CPUID 80000007: 00000000-0000003B-00000000-00006799
CPUID 80000008: 00003030-91BEF75F-0000707F-00010007
CPUID 8000000A: 00000001-00008000-00000000-119B9CFF
""",
    "rocketlake": """
CPUID 00000000: 0000001B-756E6547-6C65746E-49656E69 [GenuineIntel]
CPUID 00000001: 000A0671-00100800-7FFAFBFF-BFEBFBFF
CPUID 00000006: 0003EFF7-00000002-00000009-00000000
CPUID 00000007: 00000002-F2BF67EF-40405F4E-BC000410 [SL 00]
CPUID 00000007: 00000000-00000000-00000000-00000000 [SL 01]
CPUID 0000000D: 0000000F-00000A80-00002100-00000000 [SL 01] [SSE]
CPUID 00000015: 00000002-0000010A-016E3600-00000000 [133.00x / 24000000]
CPUID 80000000: 80000008-00000000-00000000-00000000
CPUID 80000001: 00000000-00000000-00000121-2C100000
CPUID 80000002: 65746E49-2952286C-6F655820-2952286E [Intel(R) Xeon(R)]
CPUID 80000003: 322D4520-47363533-55504320-33204020 [ E-2356G CPU @ 3]
CPUID 80000004: 4730322E-00007A48-00000000-00000000 [.20GHz]
CPUID 80000007: 00000000-00000000-00000000-00000100
CPUID 80000008: 00003027-00000000-00000000-00000000
MSR 0000010A: 0000-0000-0002-3C6B
""",
    "alderlake": """
CPUID 00000000: 00000020-756E6547-6C65746E-49656E69 [GenuineIntel]
CPUID 00000001: 00090672-00800800-7FFAFBFF-BFEBFBFF
CPUID 00000006: 00DFCFF5-00000002-00000409-00000003
CPUID 00000007: 00000001-239CA7EB-98C027AC-FC1CC410 [SL 00]
CPUID 00000007: 00400810-00000000-00000000-00000000 [SL 01]
CPUID 0000000D: 0000000F-000003D0-00019900-00000000 [SL 01] [SSE]
CPUID 00000015: 00000002-000000A6-0249F000-00000000 [83.00x / 38400000 / 3187.20]
CPUID 80000000: 80000008-00000000-00000000-00000000
CPUID 80000001: 00000000-00000000-00000121-2C100000
CPUID 80000002: 68743231-6E654720-746E4920-52286C65 [12th Gen Intel(R]
CPUID 80000003: 6F432029-54286572-6920294D-32312D39 [) Core(TM) i9-12]
CPUID 80000004: 4B303039-00000000-00000000-00000000 [900K]
CPUID 80000007: 00000000-00000000-00000000-00000100
CPUID 80000008: 0000302E-00000000-00000000-00000000
MSR 0000010A: 0000-0000-0000-0D6B
""",
}


def covered_flags(text: str) -> frozenset[str]:
    """Every flag whose CPUID register or MSR appears in a (partial) dump."""
    dump = parse_cpuid_dump(text)
    names = {
        flag
        for word in F.CPUID_WORDS
        if dump.registers(word.leaf, word.subleaf) is not None
        for flag in word.bits.values()
    }
    names |= {
        flag for word in F.MSR_WORDS if word.index in dump.msrs for flag in word.bits.values()
    }
    return frozenset(names)


def test_hand_checked_registers() -> None:
    milan = parse_cpuid_text(HAND_CHECKED["milan"])
    # Leaf 1 ECX 7EDA320B: bit 0 pni, 1 pclmulqdq, 9 ssse3, 12 fma, 13 cx16, 19/20 sse4.1/4.2,
    # 22 movbe, 23 popcnt, 25 aes, 26 xsave, 28 avx, 29 f16c, 30 rdrand; bit 21 (x2apic) is 0.
    assert {"pni", "ssse3", "fma", "sse4.2", "movbe", "popcnt", "avx", "f16c"} <= milan.flags
    assert "x2apic" not in milan.flags
    # Leaf 7.0 EBX 219C97A9: bit 5 avx2, 3/8 bmi1/bmi2, 29 sha-ni; bit 16 (avx512f) is 0.
    assert {"avx2", "bmi1", "bmi2", "sha-ni"} <= milan.flags
    assert not milan.flags & F.AVX512
    # 80000001 ECX 75C237FF: bits 0-10 lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a
    # misalignsse 3dnowprefetch osvw ibs; bit 22 topoext. 80000007 EDX 6799: bit 8 invtsc.
    assert {"sse4a", "misalignsse", "svm", "topoext", "abm", "invtsc"} <= milan.flags
    # 80000008 EBX 91BEF75F: bit 0 clzero, 12 ibpb, 14 ibrs, 24 amd-ssbd; bit 26 (amd-no-ssb) 0.
    assert {"clzero", "ibpb", "ibrs", "amd-ssbd"} <= milan.flags
    assert "amd-no-ssb" not in milan.flags
    # Leaf 1 EAX 00A00F11: base family F + extended 0A = 25 (0x19), model 1, stepping 1.
    assert (milan.vendor, milan.family, milan.model, milan.stepping) == ("AuthenticAMD", 25, 1, 1)
    assert milan.model_name == "AMD EPYC 7713 64-Core Processor"
    assert milan.tsc_khz is None  # AMD has no leaf 0x15

    rocketlake = parse_cpuid_text(HAND_CHECKED["rocketlake"])
    # Leaf 7.0 EBX F2BF67EF: bits 16 avx512f, 17 avx512dq, 28 avx512cd, 30/31 avx512bw/vl,
    # but bit 4 (hle) and 11 (rtm) are 0: no TSX.
    assert {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"} <= rocketlake.flags
    assert not {"hle", "rtm"} & rocketlake.flags
    # MSR 10A = 23C6B: bits 0 rdctl-no, 1 ibrs-all, 3 skip-l1dfl-vmentry, 5 mds-no,
    # 6 pschange-mc-no; bit 8 (taa-no) is 0.
    assert {"rdctl-no", "ibrs-all", "skip-l1dfl-vmentry", "mds-no", "pschange-mc-no"} <= (
        rocketlake.flags
    )
    assert "taa-no" not in rocketlake.flags
    # 80000001 EDX 2C100000 lacks bit 11 (Intel reports SYSCALL only in 64-bit mode) but
    # bit 29 (lm) is set, so the long-mode CPU has syscall.
    assert {"lm", "syscall"} <= rocketlake.flags
    # Leaf 15: 24 MHz crystal * 0x10A / 2 = 3192 MHz.
    assert rocketlake.tsc_khz == 3_192_000
    assert (rocketlake.family, rocketlake.model, rocketlake.stepping) == (6, 0xA7, 1)

    alderlake = parse_cpuid_text(HAND_CHECKED["alderlake"])
    # Leaf 7.1 EAX 00400810: bit 4 avx-vnni. Leaf 7.0 EBX 239CA7EB bit 16 is 0: no AVX-512.
    assert "avx-vnni" in alderlake.flags
    assert not alderlake.flags & F.AVX512
    # MSR 10A = D6B: as Rocket Lake plus bit 8 taa-no.
    assert "taa-no" in alderlake.flags
    # Leaf 15: 38.4 MHz crystal * 0xA6 / 2 = 3187.2 MHz.
    assert alderlake.tsc_khz == 3_187_200
    assert alderlake.model_name == "12th Gen Intel(R) Core(TM) i9-12900K"


def assert_hand_checked_registers_match_fixture(name: str) -> None:
    """Decoding the hand-checked registers gives the committed flags they cover."""
    committed = fixture_json(HOSTS[name])
    decoded = parse_cpuid_text(HAND_CHECKED[name], HOSTS[name])
    covered = covered_flags(HAND_CHECKED[name])
    assert len(covered) > 100
    assert decoded.flags & covered == frozenset(committed["flags"]) & covered
    for key in ("vendor", "family", "model", "stepping", "model_name", "tsc_khz"):
        assert decoded.to_dict()[key] == committed[key]


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_hand_checked_registers_match_fixture(name: str) -> None:
    assert_hand_checked_registers_match_fixture(name)


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_decoder_reproduces_committed_fixture(name: str) -> None:
    committed = fixture_json(HOSTS[name])
    provenance = committed.pop("provenance")
    dump = SHARED_DUMPS / provenance["dump"]
    if not dump.is_file():
        # A fresh clone has no ../shared: the registers copied above stand in for the dump.
        assert_hand_checked_registers_match_fixture(name)
        return
    raw = dump.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == provenance["sha256"]
    decoded = parse_cpuid_text(raw.decode("utf-8", errors="replace"), HOSTS[name])
    assert decoded.to_dict() == committed


def test_fixtures_load_as_hosts() -> None:
    for name in HOSTS:
        loaded = host(name)
        assert loaded.name == name
        assert loaded.flags <= F.QEMU_FLAGS
        assert HostCpu.from_dict(loaded.to_dict()) == loaded


def test_model_catalogue_fixture() -> None:
    models = catalog()
    assert models.qemu_version.startswith("7.2.")
    assert {"kvm64", "qemu64", "max", "EPYC-Milan", "Skylake-Client-v4"} <= set(models.models)
    assert models.get("kvm64").alias_of == "kvm64-v1"
    assert ModelCatalog.from_dict(models.to_dict()) == models
    for model in models.models.values():
        assert model.flags <= F.QEMU_FLAGS

"""x86 CPU feature flags: QEMU's canonical names, where they live, and how others spell them.

Canonical names are the ones ``qemu-system-x86_64 -cpu help`` lists under "Recognized
CPUID flags" (QEMU 7.2, the version Debian 12 ships). The CPUID and MSR bit positions
follow QEMU's ``feature_word_info`` table in ``target/i386/cpu.c``; Linux
(``/proc/cpuinfo``) and libvirt (``cpu_map``) spellings are mapped onto those names.

The flag categories below encode what KVM and QEMU do with a flag, because that decides
whether a difference between two hosts matters to a guest.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from cpumodel.errors import UnknownCpuFlag


class Register(StrEnum):
    """A CPUID output register."""

    EAX = "eax"
    EBX = "ebx"
    ECX = "ecx"
    EDX = "edx"


@dataclass(frozen=True)
class CpuidWord:
    """One 32-bit CPUID output register and the flag each of its bits means."""

    leaf: int
    subleaf: int
    register: Register
    bits: Mapping[int, str]


@dataclass(frozen=True)
class MsrWord:
    """One feature MSR; ``allowed1_high`` means the flags sit in bits 63..32 (VMX controls)."""

    index: int
    bits: Mapping[int, str]
    allowed1_high: bool = False


# Every flag QEMU 7.2 accepts in -cpu (its "Recognized CPUID flags"); an integration test
# checks this against the installed binary so the table cannot drift silently.
_QEMU_7_2_FLAG_NAMES = """
    3dnow 3dnowext 3dnowprefetch abm ace2 ace2-en acpi adx aes amd-no-ssb amd-ssbd
    amd-stibp amx-bf16 amx-int8 amx-tile apic arat arch-capabilities arch-lbr avic avx
    avx-vnni avx2 avx512-4fmaps avx512-4vnniw avx512-bf16 avx512-fp16 avx512-vp2intersect
    avx512-vpopcntdq avx512bitalg avx512bw avx512cd avx512dq avx512er avx512f avx512ifma
    avx512pf avx512vbmi avx512vbmi2 avx512vl avx512vnni bmi1 bmi2 bus-lock-detect cid
    cldemote clflush clflushopt clwb clzero cmov cmp-legacy core-capability cr8legacy cx16
    cx8 dca de decodeassists ds ds-cpl dtes64 erms est extapic f16c flushbyasid fma fma4
    fpu fsgsbase fsrm full-width-write fxsr fxsr-opt gfni hle ht hypervisor ia64 ibpb ibrs
    ibrs-all ibs intel-pt intel-pt-lip invpcid invtsc kvm-asyncpf kvm-asyncpf-int
    kvm-hint-dedicated kvm-mmu kvm-msi-ext-dest-id kvm-nopiodelay kvm-poll-control
    kvm-pv-eoi kvm-pv-ipi kvm-pv-sched-yield kvm-pv-tlb-flush kvm-pv-unhalt kvm-steal-time
    kvmclock kvmclock-stable-bit la57 lahf-lm lbrv lm lwp mca mce md-clear mds-no
    misalignsse mmx mmxext monitor movbe movdir64b movdiri mpx msr mtrr nodeid-msr npt
    nrip-save nx osvw pae pat pause-filter pbe pcid pclmulqdq pcommit pdcm pdpe1gb
    perfctr-core perfctr-nb pfthreshold pge phe phe-en pks pku pmm pmm-en pn pni popcnt
    pschange-mc-no pse pse36 rdctl-no rdpid rdrand rdseed rdtscp rsba rtm sep serialize
    sgx sgx-debug sgx-exinfo sgx-kss sgx-mode64 sgx-provisionkey sgx-tokenkey sgx1 sgx2
    sgxlc sha-ni skinit skip-l1dfl-vmentry smap smep smx spec-ctrl split-lock-detect ss
    ssb-no ssbd sse sse2 sse4.1 sse4.2 sse4a ssse3 stibp svm svm-lock svme-addr-chk
    syscall taa-no tbm tce tm tm2 topoext tsc tsc-adjust tsc-deadline tsc-scale tsx-ctrl
    tsx-ldtrk umip v-vmsave-vmload vaes vgif virt-ssbd vmcb-clean vme vmx
    vmx-activity-hlt vmx-activity-shutdown vmx-activity-wait-sipi vmx-apicv-register
    vmx-apicv-vid vmx-apicv-x2apic vmx-apicv-xapic vmx-cr3-load-noexit
    vmx-cr3-store-noexit vmx-cr8-load-exit vmx-cr8-store-exit vmx-desc-exit
    vmx-encls-exit vmx-entry-ia32e-mode vmx-entry-load-bndcfgs vmx-entry-load-efer
    vmx-entry-load-pat vmx-entry-load-perf-global-ctrl vmx-entry-load-pkrs
    vmx-entry-load-rtit-ctl vmx-entry-noload-debugctl vmx-ept vmx-ept-1gb vmx-ept-2mb
    vmx-ept-advanced-exitinfo vmx-ept-execonly vmx-eptad vmx-eptp-switching
    vmx-exit-ack-intr vmx-exit-clear-bndcfgs vmx-exit-clear-rtit-ctl vmx-exit-load-efer
    vmx-exit-load-pat vmx-exit-load-perf-global-ctrl vmx-exit-load-pkrs
    vmx-exit-nosave-debugctl vmx-exit-save-efer vmx-exit-save-pat
    vmx-exit-save-preemption-timer vmx-flexpriority vmx-hlt-exit vmx-ins-outs
    vmx-intr-exit vmx-invept vmx-invept-all-context vmx-invept-single-context
    vmx-invept-single-context-noglobals vmx-invlpg-exit vmx-invpcid-exit vmx-invvpid
    vmx-invvpid-all-context vmx-invvpid-single-addr vmx-io-bitmap vmx-io-exit
    vmx-monitor-exit vmx-movdr-exit vmx-msr-bitmap vmx-mtf vmx-mwait-exit vmx-nmi-exit
    vmx-page-walk-4 vmx-page-walk-5 vmx-pause-exit vmx-ple vmx-pml vmx-posted-intr
    vmx-preemption-timer vmx-rdpmc-exit vmx-rdrand-exit vmx-rdseed-exit vmx-rdtsc-exit
    vmx-rdtscp-exit vmx-secondary-ctls vmx-shadow-vmcs vmx-store-lma vmx-true-ctls
    vmx-tsc-offset vmx-tsc-scaling vmx-unrestricted-guest vmx-vintr-pending vmx-vmfunc
    vmx-vmwrite-vmexit-fields vmx-vnmi vmx-vnmi-pending vmx-vpid vmx-wbinvd-exit
    vmx-xsaves vmx-zero-len-inject vpclmulqdq waitpkg wbnoinvd wdt x2apic xcrypt
    xcrypt-en xfd xgetbv1 xop xsave xsavec xsaveerptr xsaveopt xsaves xstore xstore-en xtpr
"""
QEMU_FLAGS: frozenset[str] = frozenset(_QEMU_7_2_FLAG_NAMES.split())

_E = Register

# fmt: off
CPUID_WORDS: tuple[CpuidWord, ...] = (
    CpuidWord(
        0x1,
        0,
        _E.EDX,
        {
            0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
            8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov",
            16: "pat", 17: "pse36", 18: "pn", 19: "clflush", 21: "ds", 22: "acpi",
            23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2", 27: "ss", 28: "ht", 29: "tm",
            30: "ia64", 31: "pbe",
        },
    ),
    CpuidWord(
        0x1,
        0,
        _E.ECX,
        {
            0: "pni", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds-cpl", 5: "vmx",
            6: "smx", 7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 12: "fma", 13: "cx16",
            14: "xtpr", 15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4.1", 20: "sse4.2",
            21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc-deadline", 25: "aes",
            26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor",
        },
    ),
    CpuidWord(0x6, 0, _E.EAX, {2: "arat"}),
    CpuidWord(
        0x7,
        0,
        _E.EBX,
        {
            0: "fsgsbase", 1: "tsc-adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2",
            7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm", 14: "mpx",
            16: "avx512f", 17: "avx512dq", 18: "rdseed", 19: "adx", 20: "smap",
            21: "avx512ifma", 22: "pcommit", 23: "clflushopt", 24: "clwb", 25: "intel-pt",
            26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha-ni", 30: "avx512bw",
            31: "avx512vl",
        },
    ),
    CpuidWord(
        0x7,
        0,
        _E.ECX,
        {
            1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512vbmi2", 8: "gfni",
            9: "vaes", 10: "vpclmulqdq", 11: "avx512vnni", 12: "avx512bitalg",
            14: "avx512-vpopcntdq", 16: "la57", 22: "rdpid", 24: "bus-lock-detect",
            25: "cldemote", 27: "movdiri", 28: "movdir64b", 30: "sgxlc", 31: "pks",
        },
    ),
    CpuidWord(
        0x7,
        0,
        _E.EDX,
        {
            2: "avx512-4vnniw", 3: "avx512-4fmaps", 4: "fsrm", 8: "avx512-vp2intersect",
            10: "md-clear", 14: "serialize", 16: "tsx-ldtrk", 19: "arch-lbr", 22: "amx-bf16",
            23: "avx512-fp16", 24: "amx-tile", 25: "amx-int8", 26: "spec-ctrl", 27: "stibp",
            29: "arch-capabilities", 30: "core-capability", 31: "ssbd",
        },
    ),
    CpuidWord(0x7, 1, _E.EAX, {4: "avx-vnni", 5: "avx512-bf16"}),
    CpuidWord(0xD, 1, _E.EAX, {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves", 4: "xfd"}),
    CpuidWord(
        0x12, 0, _E.EAX, {0: "sgx1", 1: "sgx2"}
    ),
    CpuidWord(0x12, 0, _E.EBX, {0: "sgx-exinfo"}),
    CpuidWord(
        0x12,
        1,
        _E.EAX,
        {1: "sgx-debug", 2: "sgx-mode64", 4: "sgx-provisionkey", 5: "sgx-tokenkey", 7: "sgx-kss"},
    ),
    CpuidWord(0x14, 0, _E.ECX, {31: "intel-pt-lip"}),
    CpuidWord(
        0x80000001,
        0,
        _E.EDX,
        {
            11: "syscall", 20: "nx", 22: "mmxext", 25: "fxsr-opt", 26: "pdpe1gb",
            27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow",
        },
    ),
    CpuidWord(
        0x80000001,
        0,
        _E.ECX,
        {
            0: "lahf-lm", 1: "cmp-legacy", 2: "svm", 3: "extapic", 4: "cr8legacy", 5: "abm",
            6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
            12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid-msr",
            21: "tbm", 22: "topoext", 23: "perfctr-core", 24: "perfctr-nb",
        },
    ),
    CpuidWord(0x80000007, 0, _E.EDX, {8: "invtsc"}),
    CpuidWord(
        0x80000008,
        0,
        _E.EBX,
        {
            0: "clzero", 2: "xsaveerptr", 9: "wbnoinvd", 12: "ibpb", 14: "ibrs",
            15: "amd-stibp", 24: "amd-ssbd", 25: "virt-ssbd", 26: "amd-no-ssb",
        },
    ),
    CpuidWord(
        0x8000000A,
        0,
        _E.EDX,
        {
            0: "npt", 1: "lbrv", 2: "svm-lock", 3: "nrip-save", 4: "tsc-scale",
            5: "vmcb-clean", 6: "flushbyasid", 7: "decodeassists", 10: "pause-filter",
            12: "pfthreshold", 13: "avic", 15: "v-vmsave-vmload", 16: "vgif",
            28: "svme-addr-chk",
        },
    ),
    CpuidWord(
        0xC0000001,
        0,
        _E.EDX,
        {
            2: "xstore", 3: "xstore-en", 6: "xcrypt", 7: "xcrypt-en", 8: "ace2", 9: "ace2-en",
            10: "phe", 11: "phe-en", 12: "pmm", 13: "pmm-en",
        },
    ),
)
# fmt: on

MSR_ARCH_CAPABILITIES = 0x10A
MSR_CORE_CAPABILITY = 0xCF
MSR_PERF_CAPABILITIES = 0x345
MSR_VMX_BASIC = 0x480

# The VMX capability MSRs KVM reports to nested guests; for the four control MSRs QEMU
# uses the "true" variants (0x48D-0x490) and we fall back to 0x481-0x484 without them.
VMX_TRUE_CTLS_FALLBACK: dict[int, int] = {0x48D: 0x481, 0x48E: 0x482, 0x48F: 0x483, 0x490: 0x484}

# fmt: off
MSR_WORDS: tuple[MsrWord, ...] = (
    MsrWord(
        MSR_ARCH_CAPABILITIES,
        {
            0: "rdctl-no", 1: "ibrs-all", 2: "rsba", 3: "skip-l1dfl-vmentry", 4: "ssb-no",
            5: "mds-no", 6: "pschange-mc-no", 7: "tsx-ctrl", 8: "taa-no",
        },
    ),
    MsrWord(MSR_CORE_CAPABILITY, {5: "split-lock-detect"}),
    MsrWord(MSR_PERF_CAPABILITIES, {13: "full-width-write"}),
    MsrWord(MSR_VMX_BASIC, {54: "vmx-ins-outs", 55: "vmx-true-ctls"}),
    MsrWord(
        0x48D,
        {0: "vmx-intr-exit", 3: "vmx-nmi-exit", 5: "vmx-vnmi", 6: "vmx-preemption-timer",
         7: "vmx-posted-intr"},
        allowed1_high=True,
    ),
    MsrWord(
        0x48E,
        {
            2: "vmx-vintr-pending", 3: "vmx-tsc-offset", 7: "vmx-hlt-exit",
            9: "vmx-invlpg-exit", 10: "vmx-mwait-exit", 11: "vmx-rdpmc-exit",
            12: "vmx-rdtsc-exit", 15: "vmx-cr3-load-noexit", 16: "vmx-cr3-store-noexit",
            19: "vmx-cr8-load-exit", 20: "vmx-cr8-store-exit", 21: "vmx-flexpriority",
            22: "vmx-vnmi-pending", 23: "vmx-movdr-exit", 24: "vmx-io-exit",
            25: "vmx-io-bitmap", 27: "vmx-mtf", 28: "vmx-msr-bitmap", 29: "vmx-monitor-exit",
            30: "vmx-pause-exit", 31: "vmx-secondary-ctls",
        },
        allowed1_high=True,
    ),
    MsrWord(
        0x48F,
        {
            2: "vmx-exit-nosave-debugctl", 12: "vmx-exit-load-perf-global-ctrl",
            15: "vmx-exit-ack-intr", 18: "vmx-exit-save-pat", 19: "vmx-exit-load-pat",
            20: "vmx-exit-save-efer", 21: "vmx-exit-load-efer",
            22: "vmx-exit-save-preemption-timer", 23: "vmx-exit-clear-bndcfgs",
            25: "vmx-exit-clear-rtit-ctl", 29: "vmx-exit-load-pkrs",
        },
        allowed1_high=True,
    ),
    MsrWord(
        0x490,
        {
            2: "vmx-entry-noload-debugctl", 9: "vmx-entry-ia32e-mode",
            13: "vmx-entry-load-perf-global-ctrl", 14: "vmx-entry-load-pat",
            15: "vmx-entry-load-efer", 16: "vmx-entry-load-bndcfgs",
            18: "vmx-entry-load-rtit-ctl", 22: "vmx-entry-load-pkrs",
        },
        allowed1_high=True,
    ),
    MsrWord(
        0x485,
        {5: "vmx-store-lma", 6: "vmx-activity-hlt", 7: "vmx-activity-shutdown",
         8: "vmx-activity-wait-sipi", 29: "vmx-vmwrite-vmexit-fields",
         30: "vmx-zero-len-inject"},
    ),
    MsrWord(
        0x48B,
        {
            0: "vmx-apicv-xapic", 1: "vmx-ept", 2: "vmx-desc-exit", 3: "vmx-rdtscp-exit",
            4: "vmx-apicv-x2apic", 5: "vmx-vpid", 6: "vmx-wbinvd-exit",
            7: "vmx-unrestricted-guest", 8: "vmx-apicv-register", 9: "vmx-apicv-vid",
            10: "vmx-ple", 11: "vmx-rdrand-exit", 12: "vmx-invpcid-exit", 13: "vmx-vmfunc",
            14: "vmx-shadow-vmcs", 15: "vmx-encls-exit", 16: "vmx-rdseed-exit", 17: "vmx-pml",
            20: "vmx-xsaves", 25: "vmx-tsc-scaling",
        },
        allowed1_high=True,
    ),
    MsrWord(
        0x48C,
        {
            0: "vmx-ept-execonly", 6: "vmx-page-walk-4", 7: "vmx-page-walk-5",
            16: "vmx-ept-2mb", 17: "vmx-ept-1gb", 20: "vmx-invept", 21: "vmx-eptad",
            22: "vmx-ept-advanced-exitinfo", 25: "vmx-invept-single-context",
            26: "vmx-invept-all-context", 32: "vmx-invvpid", 40: "vmx-invvpid-single-addr",
            42: "vmx-invvpid-all-context", 43: "vmx-invept-single-context-noglobals",
        },
    ),
    MsrWord(0x491, {0: "vmx-eptp-switching"}),
)
# fmt: on


def _word_flags(leaf: int, register: Register) -> frozenset[str]:
    return frozenset(
        name
        for word in CPUID_WORDS
        if word.leaf == leaf and word.register == register
        for name in word.bits.values()
    )


SVM_FLAGS: frozenset[str] = _word_flags(0x8000000A, Register.EDX)

# --- What a flag means to a migrating guest -------------------------------------------

# KVM paravirtual CPUID bits (leaf 0x40000001): QEMU adds them under KVM on any host.
KVM_PV_FLAGS: frozenset[str] = frozenset(f for f in QEMU_FLAGS if f.startswith("kvm"))

# KVM gives these to every guest whatever the host CPU has, so they are never missing.
KVM_PROVIDED: frozenset[str] = frozenset({"hypervisor", "x2apic"}) | KVM_PV_FLAGS

# KVM emulates these regardless of the host (kvm_set_cpu_caps / KVM_GET_SUPPORTED_CPUID):
# a named model that has them runs anywhere; a baseline still only uses what hosts have.
KVM_EMULATED: frozenset[str] = frozenset({"tsc-deadline", "arat", "tsc-adjust"})

# Host bits KVM never passes to a guest (masked out of KVM_GET_SUPPORTED_CPUID).
# fmt: off
HOST_ONLY: frozenset[str] = frozenset(
    {
        "pn", "ds", "acpi", "ht", "tm", "ia64", "pbe",  # leaf 1 EDX
        "dtes64", "monitor", "ds-cpl", "smx", "est", "tm2", "cid", "xtpr", "dca",  # leaf 1 ECX
        "extapic", "ibs", "skinit", "wdt", "lwp", "tce", "nodeid-msr", "perfctr-nb",
        "pcommit", "intel-pt", "intel-pt-lip", "svm-lock", "avic",
    }
)
# fmt: on

# QEMU refuses to migrate a guest that has these (a migration blocker is registered).
UNMIGRATABLE: frozenset[str] = frozenset({"invtsc"})

# "-cpu host" does not switch these on by itself (QEMU's no_autoenable_flags).
NO_AUTOENABLE: frozenset[str] = frozenset({"ht", "topoext", "kvm-hint-dedicated"})

# Nested virtualization: only meaningful with vmx/svm on; left to the operator.
NESTED: frozenset[str] = frozenset(
    {"vmx", "svm"} | {f for f in QEMU_FLAGS if f.startswith("vmx-")} | SVM_FLAGS
)

# Features that need more than a CPUID bit (EPC memory, PT buffers) or that QEMU later
# found unsafe to virtualise; a baseline never adds them on its own.
NEEDS_CONFIG: frozenset[str] = frozenset(
    {f for f in QEMU_FLAGS if f.startswith("sgx")}
    | {"intel-pt", "intel-pt-lip", "core-capability", "split-lock-detect", "arch-lbr"}
)

ARCH_CAPABILITIES_BITS: frozenset[str] = frozenset(
    name for word in MSR_WORDS if word.index == MSR_ARCH_CAPABILITIES for name in word.bits.values()
)

AVX512: frozenset[str] = frozenset(f for f in QEMU_FLAGS if f.startswith("avx512"))

# QEMU's feature_dependencies: a flag only takes effect when its parent is on.
DEPENDS_ON: dict[str, str] = (
    {f: "vmx" for f in QEMU_FLAGS if f.startswith("vmx-")}
    | {f: "svm" for f in SVM_FLAGS}
    | {f: "arch-capabilities" for f in ARCH_CAPABILITIES_BITS}
    | {"split-lock-detect": "core-capability", "full-width-write": "pdcm"}
    | {"intel-pt-lip": "intel-pt", "sgxlc": "sgx"}
    | {f: "sgx" for f in QEMU_FLAGS if f.startswith("sgx") and f != "sgx"}
    | {f: "vmx-secondary-ctls" for w in MSR_WORDS if w.index == 0x48B for f in w.bits.values()}
    | {f: "vmx-ept" for w in MSR_WORDS if w.index == 0x48C for b, f in w.bits.items() if b < 32}
    | {f: "vmx-vpid" for w in MSR_WORDS if w.index == 0x48C for b, f in w.bits.items() if b >= 32}
    | {"vmx-eptp-switching": "vmx-vmfunc"}
)


@dataclass(frozen=True)
class KvmMirror:
    """KVM shows ``gives`` to a guest when the host has every flag in ``requires``."""

    requires: frozenset[str]
    gives: str


# KVM's vendor translation of speculation-control bits (kvm_set_cpu_caps): the guest sees
# both vendors' spellings when the host has either.
KVM_SPEC_CTRL_MIRRORS: tuple[KvmMirror, ...] = (
    KvmMirror(frozenset({"spec-ctrl"}), "ibpb"),
    KvmMirror(frozenset({"spec-ctrl"}), "ibrs"),
    KvmMirror(frozenset({"stibp"}), "amd-stibp"),
    KvmMirror(frozenset({"ssbd"}), "amd-ssbd"),
    KvmMirror(frozenset({"ibpb", "ibrs"}), "spec-ctrl"),
    KvmMirror(frozenset({"amd-stibp"}), "stibp"),
    KvmMirror(frozenset({"amd-ssbd"}), "ssbd"),
)

# --- Other spellings --------------------------------------------------------------------

# Linux /proc/cpuinfo, libvirt cpu_map and QEMU's own legacy aliases, after lower-casing.
# Names that become canonical by replacing "_" with "-" (lahf_lm, fxsr_opt...) need no entry.
ALIASES: dict[str, str] = {
    "sse3": "pni",
    "pclmuldq": "pclmulqdq",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "sse4-1": "sse4.1",
    "sse4-2": "sse4.2",
    "lzcnt": "abm",
    "xd": "nx",
    "i64": "lm",
    "ffxsr": "fxsr-opt",
    "dts": "ds",
    "tsc_deadline_timer": "tsc-deadline",
    "nonstop_tsc": "invtsc",
    "cr8_legacy": "cr8legacy",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vbmi": "avx512vbmi",
    "pausefilter": "pause-filter",
    "ibrs_enhanced": "ibrs-all",
    "tsxldtrk": "tsx-ldtrk",
    "sgx_lc": "sgxlc",
    "kvm_asyncpf": "kvm-asyncpf",
}

# Linux shows one synthetic name for the Intel and the AMD bit; which one the CPU has
# depends on the vendor (arch/x86/kernel/cpu/common.c init_speculation_control()).
LINUX_SPEC_CTRL: dict[str, dict[str, str]] = {
    "GenuineIntel": {"ibrs": "spec-ctrl", "ibpb": "spec-ctrl", "stibp": "stibp", "ssbd": "ssbd"},
    "AuthenticAMD": {"ibrs": "ibrs", "ibpb": "ibpb", "stibp": "amd-stibp", "ssbd": "amd-ssbd"},
    "HygonGenuine": {"ibrs": "ibrs", "ibpb": "ibpb", "stibp": "amd-stibp", "ssbd": "amd-ssbd"},
}


def normalize_flag(name: str, vendor: str | None = None) -> str | None:
    """Return QEMU's canonical name for a Linux/libvirt/QEMU spelling, or None if unknown."""
    key = name.strip().lower()
    if vendor is not None and key in LINUX_SPEC_CTRL.get(vendor, {}):
        return LINUX_SPEC_CTRL[vendor][key]
    if key in ALIASES:
        return ALIASES[key]
    if key in QEMU_FLAGS:
        return key
    dashed = key.replace("_", "-")
    if dashed in QEMU_FLAGS:
        return dashed
    return None


def canonical_flag(name: str) -> str:
    """Return the canonical name of a flag a user typed; raises UnknownCpuFlag."""
    canonical = normalize_flag(name)
    if canonical is None:
        close = difflib.get_close_matches(name.lower(), sorted(QEMU_FLAGS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownCpuFlag(f"unknown CPU flag '{name}'{hint}")
    return canonical


def apply_dependencies(flags: frozenset[str]) -> frozenset[str]:
    """Drop flags whose parent flag is off, as QEMU's feature_dependencies do."""
    result = set(flags)
    changed = True
    while changed:
        changed = False
        for flag in list(result):
            parent = DEPENDS_ON.get(flag)
            if parent is not None and parent not in result:
                result.discard(flag)
                changed = True
    return frozenset(result)

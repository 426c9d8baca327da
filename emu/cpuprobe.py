"""Every CPUID feature bit vmlab can advertise, and a start-up probe of the engine.

Which instructions execute is decided by Unicorn's CPU model, not by what
vmlab's CPUID answers (Unicorn 2.1.4: CLAC/STAC are #UD on its Haswell model,
VEX is #UD on every model).  A guest that trusts CPUID and meets a #UD loops or
dies (Linux patches CLAC into its entry code when CPUID says SMAP).  So:

* ``FEATURES`` lists each bit the CPUID model (emu.cpuid.CpuidModel) may set, with
  the SDM's leaf/register/bit (SDM Vol. 2A, CPUID, Tables 3-8, 3-10, 3-11 and
  the leaf 07H / 80000001H descriptions), an instruction **probe** where the
  feature names instructions, and the **proof**: the test or guest check that
  shows what vmlab itself does for the feature (page walker, MSR model, event
  delivery...).  ``tests/unit/test_cpu_model.py`` walks every advertised bit and
  fails on a bit without an entry or with a proof that does not exist.
* ``failing_features(model)`` runs every probe once on a bare engine of that
  Unicorn CPU model (a few ms; cached for the life of the process) and returns
  the names whose instructions raise an exception or compute a wrong result;
  the CPUID model clears them (``CpuidModel.cleared``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

#: Unicorn CPU models by vmlab name (lower case, as QEMU's -cpu names them).
DEFAULT_MODEL = "broadwell"

REGS = ("eax", "ebx", "ecx", "edx")


def unicorn_models() -> dict[str, int]:
    """{name: UC_CPU_X86_* value} for every x86 model Unicorn 2.1.4 has."""
    from unicorn import x86_const as X
    out = {}
    for attr in dir(X):
        if attr.startswith("UC_CPU_X86_") and attr != "UC_CPU_X86_ENDING":
            out[attr[len("UC_CPU_X86_"):].lower().replace("_", "-")] = getattr(X, attr)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Feature:
    """One CPUID feature bit.  ``probe``: 64-bit assembly that must run to its
    end on the engine without an exception (and leave RAX == ``expect`` when
    ``expect`` is not None); None for features without instructions of their
    own.  ``proof``: what shows vmlab's side of the feature: a pytest node id
    ``tests/...py::test_name`` or a guest check ``guests/NAME.asm: "check text"``
    (guests/*.asm all run in tests/guests/test_guests_vmlab.py)."""
    name: str
    leaf: int
    sub: int
    reg: str
    bit: int
    probe: str | None
    proof: str
    expect: int | None = None


_TWIN = "tests/unit/test_softmmu_twin.py::"
_MSR = "guests/msr_cpuid.asm: "
_EVENTS = "guests/cpu_events.asm: "
_MODEL = "tests/unit/test_cpu_model.py::"

FEATURES: tuple[Feature, ...] = (
    # CPUID.01H:ECX (SDM Vol. 2A Table 3-10)
    Feature("sse3", 1, 0, "ecx", 0, "addsubps xmm0, xmm1", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("vmx", 1, 0, "ecx", 5, None, "tests/unit/vmx/test_vmx_capabilities.py::"
            "test_capabilities_defaults_match_emu_cpuid_model"),
    Feature("ssse3", 1, 0, "ecx", 9, "pshufb xmm0, xmm1", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("cx16", 1, 0, "ecx", 13, "xor eax, eax; xor edx, edx; mov qword ptr [rsp - 32], 0; "
            "mov qword ptr [rsp - 24], 0; mov ebx, 7; xor ecx, ecx; cmpxchg16b [rsp - 32]; "
            "mov rax, [rsp - 32]", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 7),
    Feature("sse4_1", 1, 0, "ecx", 19, "ptest xmm0, xmm1", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("sse4_2", 1, 0, "ecx", 20, "xor eax, eax; mov ebx, 1; crc32 eax, ebx",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 0xDD45AAB8),
    Feature("x2apic", 1, 0, "ecx", 21, None, 'guests/x2apic.asm: "x2APIC mode: RDMSR 802H reads the x2APIC ID"'),
    Feature("tsc_deadline", 1, 0, "ecx", 24, None,
            'guests/x2apic.asm: "TSC-deadline timer: the interrupt came once the TSC passed the deadline"'),
    Feature("popcnt", 1, 0, "ecx", 23, "mov ebx, 0xf0f0; popcnt eax, ebx",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 8),
    # bit 31 only says a hypervisor is present (vmlab is one); nothing executes.
    Feature("hypervisor", 1, 0, "ecx", 31, None, _MODEL + "test_cpu_model_hypervisor_bit_is_set"),
    # CPUID.01H:EDX (Table 3-11)
    Feature("fpu", 1, 0, "edx", 0, "fld1; fistp dword ptr [rsp - 8]; mov eax, [rsp - 8]",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 1),
    Feature("de", 1, 0, "edx", 2, "mov rax, dr4", _MODEL + "test_cpu_model_cr4_de_makes_dr4_undefined"),
    Feature("pse", 1, 0, "edx", 3, None, _TWIN + "test_walk_32bit_pse_4m_page_maps_pse36_high_bits"),
    Feature("tsc", 1, 0, "edx", 4, "rdtsc", _MSR + '"RDTSC never goes backwards over 1000 reads"'),
    Feature("msr", 1, 0, "edx", 5, None, _MSR + '"CPUID.1:EDX.MSR = 1 and RDMSR of IA32_TIME_STAMP_COUNTER works"'),
    Feature("pae", 1, 0, "edx", 6, None, _TWIN + "test_walk_pae_pdpte_reserved_bit_faults_with_rsvd"),
    Feature("cx8", 1, 0, "edx", 8, "xor eax, eax; xor edx, edx; mov qword ptr [rsp - 32], 0; mov ebx, 5; "
            "xor ecx, ecx; cmpxchg8b [rsp - 32]; mov rax, [rsp - 32]",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 5),
    Feature("apic", 1, 0, "edx", 9, None, _EVENTS + '"CPUID.1:EDX.APIC reads 0 while IA32_APIC_BASE.EN = 0"'),
    Feature("sep", 1, 0, "edx", 11, None, _EVENTS + '"SYSENTER: CS = IA32_SYSENTER_CS"'),
    Feature("mtrr", 1, 0, "edx", 12, None, _MODEL + "test_cpu_model_mtrr_msrs_follow_mtrrcap"),
    Feature("pge", 1, 0, "edx", 13, None, _MSR + '"CPUID.1:EDX.PGE matches CR4.PGE being settable"'),
    Feature("cmov", 1, 0, "edx", 15, "xor eax, eax; mov ebx, 3; cmp eax, eax; cmovz eax, ebx",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 3),
    Feature("pat", 1, 0, "edx", 16, None, _MSR + '"IA32_PAT reset value, low half 0x00070406"'),
    Feature("pse36", 1, 0, "edx", 17, None, _TWIN + "test_walk_32bit_pse_4m_page_maps_pse36_high_bits"),
    Feature("clflush", 1, 0, "edx", 19, "clflush [rsp - 64]", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("mmx", 1, 0, "edx", 23, "paddb mm0, mm1; emms", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("fxsr", 1, 0, "edx", 24, "fxsave [rsp - 1024]; fxrstor [rsp - 1024]",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("sse", 1, 0, "edx", 25, "addps xmm0, xmm1", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("sse2", 1, 0, "edx", 26, "paddq xmm0, xmm1", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    # CPUID.(EAX=07H,ECX=0):EBX
    Feature("smep", 7, 0, "ebx", 7, None, _TWIN + "test_walk_smep_supervisor_fetch_from_user_page_faults_with_p_id"),
    Feature("smap", 7, 0, "ebx", 20, ".byte 0x0f, 0x01, 0xcb; .byte 0x0f, 0x01, 0xca",     # STAC; CLAC
            _TWIN + "test_walk_smap_with_ac_allows_explicit_supervisor_access"),
    Feature("arch_capabilities", 7, 0, "edx", 29, None,
            "tests/unit/test_cpu_linux.py::test_arch_capabilities_msr_reports_the_not_affected_bits"),
    # CPUID.80000001H:ECX / EDX
    Feature("lahf_lm", 0x80000001, 0, "ecx", 0, "xor eax, eax; stc; lahf; shr eax, 8; and eax, 1; sahf",
            _MODEL + "test_cpu_model_advertised_feature_runs_without_ud", 1),
    Feature("syscall", 0x80000001, 0, "edx", 11, None, _EVENTS + '"SYSCALL: RCX = address of the next instruction"'),
    Feature("nx", 0x80000001, 0, "edx", 20, None, _TWIN + "test_walk_fetch_from_xd_page_with_nxe_faults_with_p_id"),
    Feature("pdpe1gb", 0x80000001, 0, "edx", 26, None, _TWIN + "test_walk_1g_page_translates_with_offset"),
    Feature("rdtscp", 0x80000001, 0, "edx", 27, "rdtscp", _MODEL + "test_cpu_model_advertised_feature_runs_without_ud"),
    Feature("lm", 0x80000001, 0, "edx", 29, "mov rax, 1; shl rax, 40; shr rax, 39", _EVENTS + '"64-bit long mode"', 2),
)

BY_NAME = {f.name: f for f in FEATURES}
#: (leaf, subleaf, register) -> {bit: Feature}
BY_BIT: dict[tuple[int, int, str], dict[int, Feature]] = {}
for _f in FEATURES:
    BY_BIT.setdefault((_f.leaf, _f.sub, _f.reg), {})[_f.bit] = _f

#: CR4 bits a probe needs: OSFXSR | OSXMMEXCPT (SSE, SDM Vol. 3A 13.1.3)
_PROBE_CR4 = 0x600
_CODE = 0x1000
_SLOT = 0x100
_STACK = 0x10000 - 0x100


@lru_cache(maxsize=None)
def _probe_code(text: str, at: int = _CODE) -> bytes:
    return bytes(_ks64().asm(text, at)[0])


@lru_cache(maxsize=1)
def _ks64():
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    return Ks(KS_ARCH_X86, KS_MODE_64)


@lru_cache(maxsize=None)
def failing_features(model: str = DEFAULT_MODEL) -> frozenset[str]:
    """Names of the probed features whose probe fails on a bare Unicorn engine of
    this CPU model: an exception (#UD...), an invalid-instruction stop, or a
    wrong result.  Runs once per model and process (~5-15 ms)."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc, UcError
    from unicorn import unicorn_const as ucc
    from unicorn import x86_const as X

    models = unicorn_models()
    if model not in models:
        raise ValueError(f"unknown CPU model {model!r}")
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        uc.ctl_set_cpu_model(models[model])
        uc.mem_map(0, 0x10000)      # probes from 0x1000, 256 bytes each; stack below 64 KiB
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | _PROBE_CR4)
        # CR0.EM = 0, MP = 1: x87/MMX/SSE execute (SDM Vol. 3A 2.5, Table 2-2)
        uc.reg_write(X.UC_X86_REG_CR0, (uc.reg_read(X.UC_X86_REG_CR0) & ~4) | 2)
        raised: list[int] = []

        def on_intr(uc_, intno, _ud):
            raised.append(intno)
            uc_.emu_stop()
        uc.hook_add(ucc.UC_HOOK_INTR, on_intr)
        bad = set()
        # Each probe at an address of its own: Unicorn keeps translated blocks
        # across mem_write, so reusing one address would rerun the last probe.
        for i, f in enumerate(FEATURES):
            if f.probe is None:
                continue
            at = _CODE + i * _SLOT
            code = _probe_code(f.probe, at)
            uc.mem_write(at, code)
            uc.reg_write(X.UC_X86_REG_RSP, _STACK)
            uc.reg_write(X.UC_X86_REG_RAX, 0)
            raised.clear()
            try:
                uc.emu_start(at, at + len(code), count=64)
            except UcError:
                bad.add(f.name)
                continue
            if raised or uc.reg_read(X.UC_X86_REG_RIP) != at + len(code):
                bad.add(f.name)
            elif f.expect is not None and uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF != f.expect & 0xFFFFFFFF:
                bad.add(f.name)
        return frozenset(bad)
    finally:
        release = getattr(uc, "_Uc__finalizer", None)
        if release is not None:
            release()


def cleared_masks(model: str = DEFAULT_MODEL) -> dict[tuple[int, int, str], int]:
    """{(leaf, subleaf, register): bits to clear} for this Unicorn CPU model."""
    out: dict[tuple[int, int, str], int] = {}
    for name in failing_features(model):
        f = BY_NAME[name]
        key = (f.leaf, f.sub, f.reg)
        out[key] = out.get(key, 0) | (1 << f.bit)
    return out

"""Tests of vmm.capabilities: the VMX capability MSRs follow from one declaration (SDM Vol. 3C Appendix A)."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from vmlab.emu.cpuid import CpuidModel
from vmlab.vmm import capabilities as C
from vmlab.vmm.capabilities import VmxCapabilities
from vmlab.vmm.controls import (ENTRY_DEFAULT1, EXIT_DEFAULT1, PIN_DEFAULT1, PROC_DEFAULT1, PinBasedControls,
                          PrimaryProcBasedControls, SecondaryProcBasedControls, VmEntryControls, VmExitControls)
from vmlab.vmm.vmcs import MAX_FIELD_INDEX, VmInstructionFault

P, PP, S, X, N = PinBasedControls, PrimaryProcBasedControls, SecondaryProcBasedControls, VmExitControls, VmEntryControls
LEGACY = {"pin": 0x481, "proc": 0x482, "exit": 0x483, "entry": 0x484, "proc2": 0x48B}
TRUE = {"pin": 0x48D, "proc": 0x48E, "exit": 0x48F, "entry": 0x490}
DEFAULT1 = {"pin": PIN_DEFAULT1, "proc": PROC_DEFAULT1, "exit": EXIT_DEFAULT1, "entry": ENTRY_DEFAULT1, "proc2": 0}

# The controls the brief declares supported, spelled out independently of the module's defaults.
SUPPORTED = {
    "pin": [P.EXTERNAL_INTERRUPT_EXITING, P.NMI_EXITING, P.VIRTUAL_NMIS, P.ACTIVATE_PREEMPTION_TIMER],
    "proc": [c for c in PP if c not in (PP.ACTIVATE_TERTIARY_CONTROLS, PP.USE_TPR_SHADOW)],
    "proc2": [S.ENABLE_EPT, S.DESCRIPTOR_TABLE_EXITING, S.ENABLE_RDTSCP, S.ENABLE_VPID, S.WBINVD_EXITING,
              S.UNRESTRICTED_GUEST, S.RDRAND_EXITING, S.ENABLE_INVPCID, S.RDSEED_EXITING],
    "exit": [X.HOST_ADDRESS_SPACE_SIZE, X.ACK_INTERRUPT_ON_EXIT, X.SAVE_PAT, X.LOAD_PAT, X.SAVE_EFER, X.LOAD_EFER,
             X.SAVE_PREEMPTION_TIMER],
    "entry": [N.IA32E_MODE_GUEST, N.LOAD_PAT, N.LOAD_EFER],
}
UNSUPPORTED = {
    "pin": [P.PROCESS_POSTED_INTERRUPTS],
    "proc": [PP.ACTIVATE_TERTIARY_CONTROLS, PP.USE_TPR_SHADOW],
    "proc2": [S.VIRTUALIZE_APIC_ACCESSES, S.VIRTUALIZE_X2APIC, S.VMCS_SHADOWING, S.ENABLE_PML, S.ENABLE_VMFUNC,
              S.ENABLE_XSAVES, S.USE_TSC_SCALING, S.EPT_VIOLATION_VE],
    "exit": [X.LOAD_PERF_GLOBAL_CTRL, X.LOAD_CET_STATE, X.ACTIVATE_SECONDARY_CONTROLS],
    "entry": [N.ENTRY_TO_SMM, N.DEACTIVATE_DUAL_MONITOR, N.LOAD_PERF_GLOBAL_CTRL, N.LOAD_CET_STATE],
}


def allowed0(msr):
    return msr & 0xFFFF_FFFF


def allowed1(msr):
    return msr >> 32


def test_capabilities_msr_indices_match_sdm_appendix_a():
    assert (C.IA32_VMX_BASIC, C.IA32_VMX_PINBASED_CTLS, C.IA32_VMX_PROCBASED_CTLS, C.IA32_VMX_EXIT_CTLS,
            C.IA32_VMX_ENTRY_CTLS, C.IA32_VMX_MISC, C.IA32_VMX_CR0_FIXED0, C.IA32_VMX_CR0_FIXED1,
            C.IA32_VMX_CR4_FIXED0, C.IA32_VMX_CR4_FIXED1, C.IA32_VMX_VMCS_ENUM, C.IA32_VMX_PROCBASED_CTLS2,
            C.IA32_VMX_EPT_VPID_CAP, C.IA32_VMX_TRUE_PINBASED_CTLS, C.IA32_VMX_TRUE_PROCBASED_CTLS,
            C.IA32_VMX_TRUE_EXIT_CTLS, C.IA32_VMX_TRUE_ENTRY_CTLS) == tuple(range(0x480, 0x491))
    assert set(VmxCapabilities().msrs()) == set(range(0x480, 0x491))


@pytest.mark.parametrize("kind", list(SUPPORTED))
def test_capabilities_every_supported_control_is_allowed1_in_legacy_and_true_msrs(kind):
    msrs = VmxCapabilities().msrs()
    for ctl in SUPPORTED[kind]:
        assert allowed1(msrs[LEGACY[kind]]) & ctl, ctl
        if kind in TRUE:
            assert allowed1(msrs[TRUE[kind]]) & ctl, ctl
        assert VmxCapabilities().supports(ctl)


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_capabilities_unsupported_controls_are_not_allowed1(kind):
    caps = VmxCapabilities()
    for ctl in UNSUPPORTED[kind]:
        assert not allowed1(caps.msr(LEGACY[kind])) & ctl, ctl
        assert not caps.supports(ctl)


@pytest.mark.parametrize("kind", list(LEGACY))
def test_capabilities_legacy_msr_forces_every_default1_bit(kind):
    msr = VmxCapabilities().msr(LEGACY[kind])
    assert allowed0(msr) == DEFAULT1[kind]
    assert allowed1(msr) & DEFAULT1[kind] == DEFAULT1[kind]


def test_capabilities_default1_masks_match_appendix_a2():
    bits = lambda *ns: sum(1 << n for n in ns)           # noqa: E731
    assert PIN_DEFAULT1 == bits(1, 2, 4)
    assert PROC_DEFAULT1 == bits(1, 4, 5, 6, 8, 13, 14, 15, 16, 26)
    assert EXIT_DEFAULT1 == bits(*range(9), 10, 11, 13, 14, 16, 17)
    assert ENTRY_DEFAULT1 == bits(*range(9), 12)


def test_capabilities_true_msrs_clear_only_the_default1_bits_that_are_controls():
    msrs = VmxCapabilities().msrs()
    assert allowed0(msrs[0x48D]) == PIN_DEFAULT1
    assert allowed0(msrs[0x48E]) == PROC_DEFAULT1 & ~(PP.CR3_LOAD_EXITING | PP.CR3_STORE_EXITING)
    assert allowed0(msrs[0x48F]) == EXIT_DEFAULT1 & ~X.SAVE_DEBUG_CONTROLS
    assert allowed0(msrs[0x490]) == ENTRY_DEFAULT1 & ~N.LOAD_DEBUG_CONTROLS
    for kind in TRUE:
        assert allowed1(msrs[TRUE[kind]]) == allowed1(msrs[LEGACY[kind]])


def test_capabilities_true_msrs_equal_legacy_without_default1_optional():
    msrs = VmxCapabilities(default1_optional=False).msrs()
    for kind in TRUE:
        assert msrs[TRUE[kind]] == msrs[LEGACY[kind]]


@pytest.mark.parametrize("index", sorted(set(LEGACY.values()) | set(TRUE.values())))
def test_capabilities_every_must_be_one_bit_may_be_one(index):
    msr = VmxCapabilities().msr(index)
    assert allowed0(msr) & ~allowed1(msr) == 0


def test_capabilities_basic_reports_revision_size_wb_insouts_and_true_controls():
    caps = VmxCapabilities()
    basic = caps.basic
    assert basic & 0x7FFF_FFFF == caps.revision_id == C.VMLAB_VMCS_REVISION_ID
    assert basic >> 31 & 1 == 0
    assert (basic >> 32) & 0x1FFF == 4096
    assert basic >> 48 & 1 == 0                      # addresses are not limited to 32 bits
    assert (basic >> 50) & 0xF == 6                  # write-back
    assert basic >> 54 & 1 == 1 and basic >> 55 & 1 == 1
    assert not caps.replace(true_controls=False).basic >> 55 & 1
    assert 0x48D not in caps.replace(true_controls=False).msrs()


def test_capabilities_misc_reports_timer_rate_hlt_cr3_targets_and_vmwrite_any_field():
    misc = VmxCapabilities().misc
    assert misc & 0x1F == 5
    assert misc >> 5 & 1 == 1                        # EFER.LMA stored on exit
    assert (misc >> 6) & 0x7 == 0b001                # HLT only
    assert (misc >> 16) & 0x1FF == 4
    assert misc >> 29 & 1 == 1 and misc >> 30 & 1 == 1
    assert misc >> 32 == 0
    narrowed = VmxCapabilities(vmwrite_any_field=False, cr3_target_count=1, preemption_timer_rate=0).misc
    assert narrowed >> 29 & 1 == 0 and (narrowed >> 16) & 0x1FF == 1 and narrowed & 0x1F == 0


def test_capabilities_cr_fixed_msrs_force_pe_ne_pg_and_vmxe():
    caps = VmxCapabilities()
    assert caps.msr(0x486) == 0x8000_0021
    assert caps.msr(0x487) == 0xFFFF_FFFF
    assert caps.msr(0x488) == 0x2000
    assert caps.msr(0x488) & ~caps.msr(0x489) == 0          # fixed-0 bits are allowed by fixed-1
    assert caps.msr(0x486) & ~caps.msr(0x487) == 0


def test_capabilities_defaults_match_emu_cpuid_model():
    model = CpuidModel()
    caps = VmxCapabilities.from_cpuid(model)
    assert caps == VmxCapabilities()
    assert caps.cr4_fixed1 == dataclasses.replace(model, vmx=True).cr4_valid_mask()
    assert caps.physical_address_width == model.maxphyaddr


def test_capabilities_vmcs_enum_reports_highest_field_index():
    assert VmxCapabilities().msr(0x48A) == MAX_FIELD_INDEX << 1 == 0x26 << 1


def test_capabilities_ept_vpid_cap_reports_4_level_wb_large_pages_and_invalidation_types():
    cap = VmxCapabilities().msr(0x48C)
    expected_bits = [6, 8, 14, 16, 17, 20, 25, 26, 32, 40, 41, 42, 43]
    assert cap == sum(1 << b for b in expected_bits)
    assert not cap & 1                                # no execute-only
    assert VmxCapabilities(ept_ad_flags=True).msr(0x48C) >> 21 & 1


def test_capabilities_narrowed_secondary_controls_remove_their_msr_bits():
    caps = VmxCapabilities().replace(proc2=S.ENABLE_VPID)
    assert allowed1(caps.msr(0x48B)) == S.ENABLE_VPID
    assert caps.msr(0x48C) & 0xFFFF_FFFF == 0          # no EPT capabilities without ENABLE_EPT
    assert caps.msr(0x48C) >> 32 & 1
    bare = VmxCapabilities(proc=PP.HLT_EXITING, proc2=S(0))
    assert 0x48B not in bare.msrs() and 0x48C not in bare.msrs()
    assert allowed1(bare.msr(0x482)) == PP.HLT_EXITING | PROC_DEFAULT1


def test_capabilities_inconsistent_declarations_are_rejected():
    with pytest.raises(ValueError):
        VmxCapabilities(proc=PP.HLT_EXITING)                       # secondary controls without activation
    with pytest.raises(ValueError):
        VmxCapabilities(proc2=S.UNRESTRICTED_GUEST)                # unrestricted guest without EPT
    with pytest.raises(ValueError):
        VmxCapabilities(revision_id=1 << 31)


def test_capabilities_adjust_forces_must_be_one_and_drops_unsupported():
    caps = VmxCapabilities()
    pin = caps.adjust("pin", P.NMI_EXITING | P.PROCESS_POSTED_INTERRUPTS)
    assert pin == P.NMI_EXITING | PIN_DEFAULT1 and isinstance(pin, PinBasedControls)
    assert caps.adjust("proc", 0, true=False) & (PP.CR3_LOAD_EXITING | PP.CR3_STORE_EXITING)
    assert not caps.adjust("proc", 0) & PP.CR3_LOAD_EXITING


@given(kind=st.sampled_from(["pin", "proc", "proc2", "exit", "entry"]), desired=st.integers(0, 0xFFFF_FFFF),
       true=st.booleans())
def test_capabilities_adjusted_controls_always_satisfy_the_msrs(kind, desired, true):
    caps = VmxCapabilities()
    value = caps.adjust(kind, desired, true)
    assert caps.invalid_bits(kind, value, true) == (0, 0)
    msr = caps.ctls(kind, true)
    assert value & allowed0(msr) == allowed0(msr) and value & ~allowed1(msr) == 0


def test_capabilities_new_vmcs_follows_vmwrite_rule():
    with pytest.raises(VmInstructionFault):
        VmxCapabilities(vmwrite_any_field=False).new_vmcs().vm_exit_reason = 1
    vmcs = VmxCapabilities().new_vmcs()
    vmcs.vm_exit_reason = 1
    assert vmcs.revision_id == C.VMLAB_VMCS_REVISION_ID


def test_capabilities_unknown_msr_raises_key_error():
    with pytest.raises(KeyError):
        VmxCapabilities().msr(0x491)


def test_capabilities_overrides_win_over_computed_values():
    assert VmxCapabilities(overrides={0x485: 0}).msr(0x485) == 0

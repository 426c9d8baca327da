"""Tests of vmm.entry_checks: baselines pass, each single mutation fails the check the SDM names."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmlab.emu import x86
from vmlab.vmm.capabilities import VmxCapabilities
from vmlab.vmm.controls import (EptPointer, InterruptionInfo, InterruptionType, PinBasedControls,
                          PrimaryProcBasedControls, SecondaryProcBasedControls, VmEntryControls, VmExitControls)
from vmlab.vmm.entry_checks import (MODES, EntryFailure, EntryOk, VmfailValid, baseline_vmcs, check_vm_entry,
                              fill_entry_failure)
from vmlab.vmm.errors import VmConfigError
from vmlab.vmm.exit_reasons import ExitReason, ExitReasonField, VmInstructionError
from vmlab.vmm.qualification import EntryFailureQualification
from vmlab.vmm.vmcs import FIELDS, AR_DB, AR_DPL_SHIFT, AR_G, AR_P, AR_UNUSABLE, Interruptibility, Vmcs, VmcsField

F = VmcsField
P, PP, S, X, N = PinBasedControls, PrimaryProcBasedControls, SecondaryProcBasedControls, VmExitControls, VmEntryControls
CONTROL, HOST = VmInstructionError.ENTRY_INVALID_CONTROL_FIELD, VmInstructionError.ENTRY_INVALID_HOST_STATE
Q = EntryFailureQualification


@pytest.mark.parametrize("mode", MODES)
def test_entry_checks_baseline_vmcs_passes(mode):
    vmcs = baseline_vmcs(mode)
    result = check_vm_entry(vmcs, VmxCapabilities(), instruction="vmlaunch")
    assert isinstance(result, EntryOk) and result.ok, result.reason


@pytest.mark.parametrize("mode", MODES)
def test_entry_checks_baseline_passes_on_a_32bit_path_too(mode):
    """The baseline does not rely on TRUE MSRs or MISC[30]: it passes with the legacy rules."""
    caps = VmxCapabilities(true_controls=False, zero_length_injection=False, vmwrite_any_field=False)
    assert check_vm_entry(baseline_vmcs(mode, caps), caps).ok


def test_entry_checks_baseline_rejects_unknown_mode_and_unfit_capabilities():
    with pytest.raises(VmConfigError):
        baseline_vmcs("long32")
    with pytest.raises(VmConfigError):
        baseline_vmcs("long64", VmxCapabilities(proc2=S.ENABLE_EPT | S.ENABLE_VPID))


def _set(field, value):
    return lambda v: v.write(field, value)


def _or(field, bits):
    return lambda v: v.write(field, v.read(field) | bits)


def _clear(field, bits):
    return lambda v: v.write(field, v.read(field) & ~bits)


def _all(*fns):
    def apply(v):
        for fn in fns:
            fn(v)
    return apply


def _inject(info, length=None, error_code=None):
    fns = [_set(F.VM_ENTRY_INTR_INFO, info)]
    if length is not None:
        fns.append(_set(F.VM_ENTRY_INSTRUCTION_LEN, length))
    if error_code is not None:
        fns.append(_set(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code))
    return _all(*fns)


def _no_unrestricted(v):
    v.write(F.SECONDARY_VM_EXEC_CONTROL, v.read(F.SECONDARY_VM_EXEC_CONTROL) & ~S.UNRESTRICTED_GUEST)


def _pae_paging_with_pdpte(pdpte):
    return _all(_or(F.GUEST_CR0, x86.CR0_PG), _or(F.GUEST_CR4, x86.CR4_PAE), _set(F.GUEST_CR3, 0x3000),
                _set(F.GUEST_PDPTE0, 0x4001), _set(F.GUEST_PDPTE2, pdpte))


# (id, baseline mode, mutation, expected error (VmInstructionError) or qualification, field named in the reason)
MUTATIONS = [
    # 27.2.1.1 VM-execution control fields -> VMfailValid(7)
    ("pin default1 bit cleared", "long64", _clear(F.PIN_BASED_VM_EXEC_CONTROL, 1 << 1), CONTROL,
     "PIN_BASED_VM_EXEC_CONTROL"),
    ("pin posted interrupts unsupported", "long64", _or(F.PIN_BASED_VM_EXEC_CONTROL, P.PROCESS_POSTED_INTERRUPTS),
     CONTROL, "PIN_BASED_VM_EXEC_CONTROL"),
    ("primary reserved bit 0", "long64", _or(F.CPU_BASED_VM_EXEC_CONTROL, 1), CONTROL, "CPU_BASED_VM_EXEC_CONTROL"),
    ("primary tertiary controls", "long64", _or(F.CPU_BASED_VM_EXEC_CONTROL, PP.ACTIVATE_TERTIARY_CONTROLS),
     CONTROL, "CPU_BASED_VM_EXEC_CONTROL"),
    ("secondary VMCS shadowing", "long64", _or(F.SECONDARY_VM_EXEC_CONTROL, S.VMCS_SHADOWING), CONTROL,
     "SECONDARY_VM_EXEC_CONTROL"),
    ("CR3 target count 5", "long64", _set(F.CR3_TARGET_COUNT, 5), CONTROL, "CR3_TARGET_COUNT"),
    ("I/O bitmap A unaligned", "long64", _all(_or(F.CPU_BASED_VM_EXEC_CONTROL, PP.USE_IO_BITMAPS),
                                              _set(F.IO_BITMAP_A, 0x10_0800), _set(F.IO_BITMAP_B, 0x10_1000)),
     CONTROL, "IO_BITMAP_A"),
    ("MSR bitmap beyond MAXPHYADDR", "long64", _all(_or(F.CPU_BASED_VM_EXEC_CONTROL, PP.USE_MSR_BITMAPS),
                                                    _set(F.MSR_BITMAP, 1 << 40)), CONTROL, "MSR_BITMAP"),
    ("NMI-window exiting without virtual NMIs", "long64",
     _all(_clear(F.PIN_BASED_VM_EXEC_CONTROL, P.VIRTUAL_NMIS), _or(F.CPU_BASED_VM_EXEC_CONTROL,
                                                                    PP.NMI_WINDOW_EXITING)),
     CONTROL, "CPU_BASED_VM_EXEC_CONTROL"),
    ("virtual NMIs without NMI exiting", "long64", _clear(F.PIN_BASED_VM_EXEC_CONTROL, P.NMI_EXITING), CONTROL,
     "PIN_BASED_VM_EXEC_CONTROL"),
    ("unrestricted guest without EPT", "long64", _clear(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_EPT), CONTROL,
     "SECONDARY_VM_EXEC_CONTROL"),
    ("EPTP memory type 2", "long64", _set(F.EPT_POINTER, 0x10_0000 | (3 << 3) | 2), CONTROL, "EPT_POINTER"),
    ("EPTP walk length 5", "long64", _set(F.EPT_POINTER, EptPointer(0x10_0000, walk_length=5).encode()), CONTROL,
     "EPT_POINTER"),
    ("EPTP A/D without capability", "long64", _set(F.EPT_POINTER, EptPointer(0x10_0000, ad_enabled=True).encode()),
     CONTROL, "EPT_POINTER"),
    ("EPTP reserved bits 11:8", "long64", _or(F.EPT_POINTER, 1 << 9), CONTROL, "EPT_POINTER"),
    ("VPID 0 with VPID enabled", "long64", _set(F.VIRTUAL_PROCESSOR_ID, 0), CONTROL, "VIRTUAL_PROCESSOR_ID"),
    # 27.2.1.2 VM-exit control fields -> VMfailValid(7)
    ("save preemption timer without timer", "long64", _or(F.VM_EXIT_CONTROLS, X.SAVE_PREEMPTION_TIMER), CONTROL,
     "VM_EXIT_CONTROLS"),
    ("exit LOAD_CET_STATE unsupported", "long64", _or(F.VM_EXIT_CONTROLS, X.LOAD_CET_STATE), CONTROL,
     "VM_EXIT_CONTROLS"),
    ("exit MSR-store area unaligned", "long64", _all(_set(F.VM_EXIT_MSR_STORE_COUNT, 2),
                                                     _set(F.VM_EXIT_MSR_STORE_ADDR, 0x5008)),
     CONTROL, "VM_EXIT_MSR_STORE_ADDR"),
    # 27.2.1.3 VM-entry control fields -> VMfailValid(7)
    ("entry to SMM", "long64", _or(F.VM_ENTRY_CONTROLS, N.ENTRY_TO_SMM), CONTROL, "VM_ENTRY_CONTROLS"),
    ("injection type 1 reserved", "long64", _inject(0x8000_0000 | 1 << 8 | 32), CONTROL, "VM_ENTRY_INTR_INFO"),
    ("NMI with vector 3", "long64", _inject(0x8000_0000 | 2 << 8 | 3), CONTROL, "VM_ENTRY_INTR_INFO"),
    ("hardware exception vector 32", "long64", _inject(0x8000_0000 | 3 << 8 | 32), CONTROL, "VM_ENTRY_INTR_INFO"),
    ("#GP without error code", "long64", _inject(InterruptionInfo(13, InterruptionType.HARDWARE_EXCEPTION).encode()),
     CONTROL, "VM_ENTRY_INTR_INFO"),
    ("#UD with error code", "long64",
     _inject(InterruptionInfo(6, InterruptionType.HARDWARE_EXCEPTION, deliver_error_code=True).encode()),
     CONTROL, "VM_ENTRY_INTR_INFO"),
    ("real-mode #GP with error code", "real-unrestricted",
     _inject(InterruptionInfo.hardware_exception(13).encode()), CONTROL, "VM_ENTRY_INTR_INFO"),
    ("injection reserved bit 12", "long64", _inject(InterruptionInfo.external_interrupt(0x20).encode() | 1 << 12),
     CONTROL, "VM_ENTRY_INTR_INFO"),
    ("error code bits 31:16", "long64", _inject(InterruptionInfo.hardware_exception(14).encode(), error_code=0x10000),
     CONTROL, "VM_ENTRY_EXCEPTION_ERROR_CODE"),
    ("software interrupt length 16", "long64", _inject(InterruptionInfo.software_interrupt(0x80).encode(), length=16),
     CONTROL, "VM_ENTRY_INSTRUCTION_LEN"),
    ("other event with vector 1", "long64", _inject(0x8000_0000 | 7 << 8 | 1), CONTROL, "VM_ENTRY_INTR_INFO"),
    # 27.2.2-27.2.4 host state -> VMfailValid(8)
    ("host CS null", "long64", _set(F.HOST_CS_SELECTOR, 0), HOST, "HOST_CS_SELECTOR"),
    ("host SS RPL 3", "long64", _set(F.HOST_SS_SELECTOR, 0x13), HOST, "HOST_SS_SELECTOR"),
    ("host DS TI 1", "long64", _set(F.HOST_DS_SELECTOR, 0x14), HOST, "HOST_DS_SELECTOR"),
    ("host TR null", "long64", _set(F.HOST_TR_SELECTOR, 0), HOST, "HOST_TR_SELECTOR"),
    ("host CR0.PG clear", "long64", _clear(F.HOST_CR0, x86.CR0_PG), HOST, "HOST_CR0"),
    ("host CR4.VMXE clear", "long64", _clear(F.HOST_CR4, x86.CR4_VMXE), HOST, "HOST_CR4"),
    ("host CR4 unsupported LA57", "long64", _or(F.HOST_CR4, x86.CR4_LA57), HOST, "HOST_CR4"),
    ("host CR3 beyond MAXPHYADDR", "long64", _set(F.HOST_CR3, 1 << 45), HOST, "HOST_CR3"),
    ("host RIP non-canonical", "long64", _set(F.HOST_RIP, 0x0000_8000_0000_0000), HOST, "HOST_RIP"),
    ("host FS base non-canonical", "long64", _set(F.HOST_FS_BASE, 0x0001_0000_0000_0000), HOST, "HOST_FS_BASE"),
    ("host PAT entry type 2", "long64", _set(F.HOST_IA32_PAT, 0x0007_0406_0007_0402), HOST, "HOST_IA32_PAT"),
    ("host EFER.LMA without 64-bit host", "long64", _clear(F.VM_EXIT_CONTROLS, X.HOST_ADDRESS_SPACE_SIZE), HOST,
     "HOST_IA32_EFER"),
    ("32-bit host address space in IA-32e", "protected32",
     _all(_clear(F.VM_EXIT_CONTROLS, X.HOST_ADDRESS_SPACE_SIZE | X.LOAD_EFER)), HOST, "VM_EXIT_CONTROLS"),
    ("host CR4.PAE clear", "long64", _clear(F.HOST_CR4, x86.CR4_PAE), HOST, "HOST_CR4"),
    # 27.3.1 guest state -> exit reason 33 | bit 31, qualification 0 unless noted
    ("guest TR not a busy TSS", "long64", _set(F.GUEST_TR_ACCESS_RIGHTS, 0x89), Q.DEFAULT, "GUEST_TR_ACCESS_RIGHTS"),
    ("guest TR 16-bit busy TSS in IA-32e", "long64", _set(F.GUEST_TR_ACCESS_RIGHTS, 0x83), Q.DEFAULT,
     "GUEST_TR_ACCESS_RIGHTS"),
    ("guest TR selector TI", "long64", _set(F.GUEST_TR_SELECTOR, 0x1C), Q.DEFAULT, "GUEST_TR_SELECTOR"),
    ("guest SS DPL differs from CS DPL", "long64", _or(F.GUEST_SS_ACCESS_RIGHTS, 3 << AR_DPL_SHIFT), Q.DEFAULT,
     "GUEST_CS_ACCESS_RIGHTS"),
    ("guest SS RPL differs from CS RPL", "long64", _all(_no_unrestricted, _set(F.GUEST_SS_SELECTOR, 0x13)),
     Q.DEFAULT, "GUEST_SS_SELECTOR"),
    ("guest SS code segment", "protected32", _set(F.GUEST_SS_ACCESS_RIGHTS, 0xC09B), Q.DEFAULT,
     "GUEST_SS_ACCESS_RIGHTS"),
    ("guest DS not present", "long64", _clear(F.GUEST_DS_ACCESS_RIGHTS, AR_P), Q.DEFAULT, "GUEST_DS_ACCESS_RIGHTS"),
    ("guest ES not accessed", "protected32", _clear(F.GUEST_ES_ACCESS_RIGHTS, 1), Q.DEFAULT,
     "GUEST_ES_ACCESS_RIGHTS"),
    ("guest FS limit needs G", "long64", _clear(F.GUEST_FS_ACCESS_RIGHTS, AR_G), Q.DEFAULT, "GUEST_FS_ACCESS_RIGHTS"),
    ("guest CS L and D both set", "long64", _or(F.GUEST_CS_ACCESS_RIGHTS, AR_DB), Q.DEFAULT,
     "GUEST_CS_ACCESS_RIGHTS"),
    ("guest CS data type without unrestricted", "long64",
     _all(_no_unrestricted, _set(F.GUEST_CS_ACCESS_RIGHTS, 0xA093)), Q.DEFAULT, "GUEST_CS_ACCESS_RIGHTS"),
    ("guest CS data type with unrestricted but DPL 3", "protected32",
     _set(F.GUEST_CS_ACCESS_RIGHTS, 0xC0F3), Q.DEFAULT, "GUEST_CS_ACCESS_RIGHTS"),
    ("guest LDTR usable with type 3", "long64", _set(F.GUEST_LDTR_ACCESS_RIGHTS, 0x83), Q.DEFAULT,
     "GUEST_LDTR_ACCESS_RIGHTS"),
    ("guest GS base non-canonical", "long64", _set(F.GUEST_GS_BASE, 0x0000_8000_0000_0000), Q.DEFAULT,
     "GUEST_GS_BASE"),
    ("guest GDTR limit above 0xffff", "long64", _set(F.GUEST_GDTR_LIMIT, 0x1_0000), Q.DEFAULT, "GUEST_GDTR_LIMIT"),
    ("guest IDTR base non-canonical", "long64", _set(F.GUEST_IDTR_BASE, 0x0000_8000_0000_0000), Q.DEFAULT,
     "GUEST_IDTR_BASE"),
    ("guest RFLAGS bit 1 clear", "long64", _set(F.GUEST_RFLAGS, 0), Q.DEFAULT, "GUEST_RFLAGS"),
    ("guest RFLAGS reserved bit 3", "long64", _set(F.GUEST_RFLAGS, 0x2 | 1 << 3), Q.DEFAULT, "GUEST_RFLAGS"),
    ("guest RFLAGS.VM in IA-32e mode", "long64", _set(F.GUEST_RFLAGS, 0x2 | x86.RFLAGS_VM), Q.DEFAULT,
     "GUEST_RFLAGS"),
    ("guest external interrupt with IF 0", "long64", _inject(InterruptionInfo.external_interrupt(0x20).encode()),
     Q.DEFAULT, "GUEST_RFLAGS"),
    ("guest RIP non-canonical", "long64", _set(F.GUEST_RIP, 0x0000_8000_0000_0000), Q.DEFAULT, "GUEST_RIP"),
    ("guest RIP above 4 GiB in 32-bit mode", "protected32", _set(F.GUEST_RIP, 1 << 32), Q.DEFAULT, "GUEST_RIP"),
    ("guest CR0.PG without PE", "real-unrestricted", _or(F.GUEST_CR0, x86.CR0_PG), Q.DEFAULT, "GUEST_CR0"),
    ("guest CR0.PE clear without unrestricted", "real-unrestricted", _no_unrestricted, Q.DEFAULT, "GUEST_CR0"),
    ("guest CR0.NE clear", "long64", _clear(F.GUEST_CR0, x86.CR0_NE), Q.DEFAULT, "GUEST_CR0"),
    ("guest CR4.VMXE clear", "long64", _clear(F.GUEST_CR4, x86.CR4_VMXE), Q.DEFAULT, "GUEST_CR4"),
    ("guest IA-32e without CR4.PAE", "long64", _clear(F.GUEST_CR4, x86.CR4_PAE), Q.DEFAULT, "GUEST_CR4"),
    ("guest CR4.PCIDE outside IA-32e", "protected32", _or(F.GUEST_CR4, x86.CR4_PCIDE), Q.DEFAULT, "GUEST_CR4"),
    ("guest CR3 beyond MAXPHYADDR", "long64", _set(F.GUEST_CR3, 1 << 41), Q.DEFAULT, "GUEST_CR3"),
    ("guest EFER.LMA without IA-32e guest", "protected32", _set(F.GUEST_IA32_EFER, x86.EFER_LMA | x86.EFER_LME),
     Q.DEFAULT, "GUEST_IA32_EFER"),
    ("guest PAT entry type 3", "long64", _set(F.GUEST_IA32_PAT, 0x0007_0406_0007_0403), Q.DEFAULT,
     "GUEST_IA32_PAT"),
    ("guest activity shutdown unsupported", "long64", _set(F.GUEST_ACTIVITY_STATE, 2), Q.DEFAULT,
     "GUEST_ACTIVITY_STATE"),
    ("guest HLT under STI blocking", "long64",
     _all(_set(F.GUEST_ACTIVITY_STATE, 1), _set(F.GUEST_RFLAGS, 0x202),
          _set(F.GUEST_INTERRUPTIBILITY_STATE, Interruptibility.BLOCKING_BY_STI)), Q.DEFAULT, "GUEST_ACTIVITY_STATE"),
    ("guest STI and MOV SS blocking", "long64",
     _all(_set(F.GUEST_RFLAGS, 0x202), _set(F.GUEST_INTERRUPTIBILITY_STATE, 3)), Q.DEFAULT,
     "GUEST_INTERRUPTIBILITY_STATE"),
    ("guest STI blocking with IF 0", "long64", _set(F.GUEST_INTERRUPTIBILITY_STATE, 1), Q.DEFAULT,
     "GUEST_INTERRUPTIBILITY_STATE"),
    ("guest SMI blocking outside SMM", "long64", _set(F.GUEST_INTERRUPTIBILITY_STATE, 4), Q.DEFAULT,
     "GUEST_INTERRUPTIBILITY_STATE"),
    ("guest pending debug reserved bit 4", "long64", _set(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << 4), Q.DEFAULT,
     "GUEST_PENDING_DBG_EXCEPTIONS"),
    ("guest pending BS without TF under blocking", "long64",
     _all(_set(F.GUEST_RFLAGS, 0x202), _set(F.GUEST_INTERRUPTIBILITY_STATE, 1),
          _set(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << 14)), Q.DEFAULT, "GUEST_PENDING_DBG_EXCEPTIONS"),
    ("guest NMI injection under STI blocking", "long64",
     _all(_set(F.GUEST_RFLAGS, 0x202), _set(F.GUEST_INTERRUPTIBILITY_STATE, 1),
          _inject(InterruptionInfo.nmi().encode())), Q.NMI_INJECTION, "GUEST_INTERRUPTIBILITY_STATE"),
    ("guest link pointer not ~0", "long64", _set(F.VMCS_LINK_POINTER, 0x9000), Q.INVALID_VMCS_LINK_POINTER,
     "VMCS_LINK_POINTER"),
    ("guest PDPTE reserved bits", "protected32", _pae_paging_with_pdpte(0x5001 | 1 << 1), Q.PDPTE_LOADING,
     "GUEST_PDPTE2"),
]


@pytest.mark.parametrize("name,mode,mutate,expected,field", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_entry_checks_single_mutation_fails_with_expected_error(name, mode, mutate, expected, field):
    vmcs = baseline_vmcs(mode)
    mutate(vmcs)
    result = check_vm_entry(vmcs, VmxCapabilities())
    assert not result.ok
    assert result.field == field, result.reason
    assert field in result.reason and "SDM Vol. 3C 27." in result.reason
    if isinstance(expected, VmInstructionError):
        assert isinstance(result, VmfailValid), result
        assert result.error is expected
        assert result.section.startswith("27.2")
    else:
        assert isinstance(result, EntryFailure), result
        assert result.qualification is expected
        assert result.exit_reason == 0x8000_0021
        assert result.section.startswith("27.3.1")


def test_entry_checks_mutation_table_covers_each_class():
    assert len(MUTATIONS) >= 25
    assert {m[3] for m in MUTATIONS if isinstance(m[3], VmInstructionError)} == {CONTROL, HOST}
    assert {m[3] for m in MUTATIONS if isinstance(m[3], EntryFailureQualification)} == set(Q)


@pytest.mark.parametrize("mode", MODES)
def test_entry_checks_valid_injections_pass(mode):
    vmcs = baseline_vmcs(mode)
    pe = mode != "real-unrestricted"
    for info, extra in [
        (InterruptionInfo.hardware_exception(14, deliver_error_code=pe), {F.VM_ENTRY_EXCEPTION_ERROR_CODE: 2}),
        (InterruptionInfo.hardware_exception(6), {}),
        (InterruptionInfo.nmi(), {}),
        (InterruptionInfo.software_interrupt(0x80), {F.VM_ENTRY_INSTRUCTION_LEN: 2}),
        (InterruptionInfo.software_exception(3), {F.VM_ENTRY_INSTRUCTION_LEN: 0}),
        (InterruptionInfo.privileged_software_exception(), {F.VM_ENTRY_INSTRUCTION_LEN: 1}),
        (InterruptionInfo.pending_mtf(), {}),
        (InterruptionInfo.external_interrupt(0x30), {F.GUEST_RFLAGS: 0x202}),
    ]:
        v = vmcs.copy()
        v.write(F.VM_ENTRY_INTR_INFO, info)
        for f, value in extra.items():
            v.write(f, value)
        result = check_vm_entry(v)
        assert result.ok, (info, result.reason)


def test_entry_checks_zero_length_software_injection_needs_misc30():
    vmcs = baseline_vmcs("long64")
    vmcs.write(F.VM_ENTRY_INTR_INFO, InterruptionInfo.software_interrupt(0x80))
    assert check_vm_entry(vmcs, VmxCapabilities()).ok
    result = check_vm_entry(vmcs, VmxCapabilities(zero_length_injection=False))
    assert result.error is CONTROL and result.field == "VM_ENTRY_INSTRUCTION_LEN"


def test_entry_checks_hlt_state_accepts_only_its_events():
    vmcs = baseline_vmcs("long64")
    vmcs.guest_activity_state = 1
    assert check_vm_entry(vmcs).ok
    vmcs.vm_entry_intr_info = InterruptionInfo.hardware_exception(18)       # #MC may wake HLT
    assert check_vm_entry(vmcs).ok
    vmcs.vm_entry_intr_info = InterruptionInfo.hardware_exception(6)        # #UD may not
    result = check_vm_entry(vmcs)
    assert result.field == "GUEST_ACTIVITY_STATE" and result.qualification is Q.DEFAULT


def test_entry_checks_default1_controls_may_be_cleared_only_with_true_msrs():
    vmcs = baseline_vmcs("long64")
    vmcs.write(F.CPU_BASED_VM_EXEC_CONTROL, vmcs.read(F.CPU_BASED_VM_EXEC_CONTROL)
               & ~(PP.CR3_LOAD_EXITING | PP.CR3_STORE_EXITING))
    assert check_vm_entry(vmcs, VmxCapabilities()).ok
    result = check_vm_entry(vmcs, VmxCapabilities(default1_optional=False))
    assert result.error is CONTROL and "CR3_LOAD_EXITING" in result.reason


def test_entry_checks_narrowed_capabilities_reject_controls_they_drop():
    vmcs = baseline_vmcs("long64")
    caps = VmxCapabilities().replace(pin=P.EXTERNAL_INTERRUPT_EXITING | P.NMI_EXITING)
    result = check_vm_entry(vmcs, caps)
    assert result.error is CONTROL and "VIRTUAL_NMIS" in result.reason


def test_entry_checks_launch_state_checked_for_vmlaunch_and_vmresume():
    vmcs = baseline_vmcs("long64")
    assert check_vm_entry(vmcs, instruction="vmresume").error is VmInstructionError.VMRESUME_NONLAUNCHED_VMCS
    vmcs.launch()
    assert check_vm_entry(vmcs, instruction="vmlaunch").error is VmInstructionError.VMLAUNCH_NONCLEAR_VMCS
    assert check_vm_entry(vmcs, instruction="vmresume").ok
    with pytest.raises(ValueError):
        check_vm_entry(vmcs, instruction="vmcall")


def test_entry_checks_host_outside_ia32e_needs_32bit_host_controls():
    vmcs = baseline_vmcs("protected32")
    assert check_vm_entry(vmcs, host_in_ia32e=False).field == "VM_EXIT_CONTROLS"
    vmcs.write(F.VM_EXIT_CONTROLS, vmcs.read(F.VM_EXIT_CONTROLS) & ~(X.HOST_ADDRESS_SPACE_SIZE | X.LOAD_EFER))
    vmcs.host_rip = 0x1000
    assert check_vm_entry(vmcs, host_in_ia32e=False).ok
    vmcs.write(F.VM_ENTRY_CONTROLS, vmcs.read(F.VM_ENTRY_CONTROLS) | N.IA32E_MODE_GUEST)
    assert check_vm_entry(vmcs, host_in_ia32e=False).field == "VM_ENTRY_CONTROLS"


def test_entry_checks_virtual_8086_guest_needs_v86_segments():
    vmcs = baseline_vmcs("protected32")
    vmcs.guest_rflags = 0x2 | x86.RFLAGS_VM
    result = check_vm_entry(vmcs)
    assert result.field == "GUEST_ES_BASE" or result.field.endswith("_ACCESS_RIGHTS") or "LIMIT" in result.field
    for seg in ("ES", "CS", "SS", "DS", "FS", "GS"):
        vmcs[f"GUEST_{seg}_SELECTOR"] = 0x1000
        vmcs[f"GUEST_{seg}_BASE"] = 0x10000
        vmcs[f"GUEST_{seg}_LIMIT"] = 0xFFFF
        vmcs[f"GUEST_{seg}_ACCESS_RIGHTS"] = 0xF3
    assert check_vm_entry(vmcs).ok, check_vm_entry(vmcs).reason


def test_entry_checks_unusable_data_segments_are_not_checked():
    vmcs = baseline_vmcs("long64")
    for seg in ("DS", "ES", "FS", "GS"):
        vmcs[f"GUEST_{seg}_ACCESS_RIGHTS"] = AR_UNUSABLE | 0xFFF      # garbage type bits, but unusable
    assert check_vm_entry(vmcs).ok


def test_fill_entry_failure_records_exit_reason_and_qualification():
    vmcs = baseline_vmcs("long64")
    vmcs.vmcs_link_pointer = 0
    result = check_vm_entry(vmcs)
    fill_entry_failure(vmcs, result)
    assert vmcs.vm_exit_reason == 0x8000_0021
    assert vmcs.exit_reason == ExitReasonField(ExitReason.ENTRY_FAIL_GUEST_STATE, entry_failure=True)
    assert vmcs.exit_qualification == 4


def test_fill_entry_failure_records_vm_instruction_error():
    vmcs = baseline_vmcs("long64")
    vmcs.host_cs_selector = 0
    fill_entry_failure(vmcs, check_vm_entry(vmcs))
    assert vmcs.vm_instruction_error == 8
    before = vmcs.snapshot()
    fill_entry_failure(vmcs, EntryOk())
    assert vmcs.snapshot() == before


_FIELD_ENCODINGS = [f.encoding for f in FIELDS]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES),
       writes=st.lists(st.tuples(st.sampled_from(_FIELD_ENCODINGS), st.integers(0, (1 << 64) - 1)), max_size=6))
def test_entry_checks_never_raise_on_arbitrary_vmcs_contents(mode, writes):
    """The VMCS is hostile input: any contents give a result, never an exception."""
    vmcs = baseline_vmcs(mode)
    for enc, value in writes:
        vmcs.write(enc, value)
    result = check_vm_entry(vmcs)
    assert result.ok or (result.reason and result.field and result.section)
    assert isinstance(result, (EntryOk, VmfailValid, EntryFailure))


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), bit=st.integers(0, 31),
       field=st.sampled_from([F.PIN_BASED_VM_EXEC_CONTROL, F.CPU_BASED_VM_EXEC_CONTROL, F.SECONDARY_VM_EXEC_CONTROL,
                              F.VM_EXIT_CONTROLS, F.VM_ENTRY_CONTROLS]))
def test_entry_checks_flipping_a_control_bit_outside_the_msrs_fails_with_error_7(mode, bit, field):
    caps = VmxCapabilities()
    kind = {F.PIN_BASED_VM_EXEC_CONTROL: "pin", F.CPU_BASED_VM_EXEC_CONTROL: "proc",
            F.SECONDARY_VM_EXEC_CONTROL: "proc2", F.VM_EXIT_CONTROLS: "exit", F.VM_ENTRY_CONTROLS: "entry"}[field]
    vmcs = baseline_vmcs(mode)
    value = vmcs.read(field) ^ (1 << bit)
    vmcs.write(field, value)
    if caps.invalid_bits(kind, value) != (0, 0):
        result = check_vm_entry(vmcs, caps)
        assert isinstance(result, VmfailValid) and result.error is CONTROL and result.field == field.name

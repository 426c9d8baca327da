"""Tests of vmm.vmcs and vmm.exit_reasons: encodings as printed in the SDM, VMREAD/VMWRITE rules."""

import pytest
from hypothesis import given, settings, strategies as st

from vmlab.vmm import vmcs as V
from vmlab.vmm.errors import VmmError
from vmlab.vmm.exit_reasons import (ENTRY_FAILURE_REASONS, EXIT_REASON_ENTRY_FAILURE, EXIT_REASON_GAPS, ExitReason,
                              ExitReasonField, VmInstructionError, basic_exit_reason_name)
from vmlab.vmm.vmcs import (FIELDS, FIELDS_BY_ENCODING, MAX_FIELD_INDEX, Field, FieldKind, FieldWidth, LaunchState, Vmcs,
                      VmcsField, VmInstructionFault)

W16, W64, W32, WN = FieldWidth.BITS16, FieldWidth.BITS64, FieldWidth.BITS32, FieldWidth.NATURAL
CTL, RO, GST, HST = FieldKind.CONTROL, FieldKind.READ_ONLY_DATA, FieldKind.GUEST_STATE, FieldKind.HOST_STATE

# (name, encoding, width, kind, Appendix B subsection), copied from SDM Vol. 3C Appendix B, Tables B-1..B-14.
SDM_APPENDIX_B = [
    ("VIRTUAL_PROCESSOR_ID", 0x0000, W16, CTL, "B.1.1"),
    ("POSTED_INTR_NOTIFICATION_VECTOR", 0x0002, W16, CTL, "B.1.1"),
    ("EPTP_INDEX", 0x0004, W16, CTL, "B.1.1"),
    ("GUEST_ES_SELECTOR", 0x0800, W16, GST, "B.1.2"),
    ("GUEST_CS_SELECTOR", 0x0802, W16, GST, "B.1.2"),
    ("GUEST_TR_SELECTOR", 0x080E, W16, GST, "B.1.2"),
    ("GUEST_INTERRUPT_STATUS", 0x0810, W16, GST, "B.1.2"),
    ("GUEST_PML_INDEX", 0x0812, W16, GST, "B.1.2"),
    ("HOST_ES_SELECTOR", 0x0C00, W16, HST, "B.1.3"),
    ("HOST_CS_SELECTOR", 0x0C02, W16, HST, "B.1.3"),
    ("HOST_TR_SELECTOR", 0x0C0C, W16, HST, "B.1.3"),
    ("IO_BITMAP_A", 0x2000, W64, CTL, "B.2.1"),
    ("IO_BITMAP_B", 0x2002, W64, CTL, "B.2.1"),
    ("MSR_BITMAP", 0x2004, W64, CTL, "B.2.1"),
    ("VM_EXIT_MSR_STORE_ADDR", 0x2006, W64, CTL, "B.2.1"),
    ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A, W64, CTL, "B.2.1"),
    ("PML_ADDRESS", 0x200E, W64, CTL, "B.2.1"),
    ("TSC_OFFSET", 0x2010, W64, CTL, "B.2.1"),
    ("VIRTUAL_APIC_PAGE_ADDR", 0x2012, W64, CTL, "B.2.1"),
    ("APIC_ACCESS_ADDR", 0x2014, W64, CTL, "B.2.1"),
    ("EPT_POINTER", 0x201A, W64, CTL, "B.2.1"),
    ("EOI_EXIT_BITMAP3", 0x2022, W64, CTL, "B.2.1"),
    ("XSS_EXITING_BITMAP", 0x202C, W64, CTL, "B.2.1"),
    ("TSC_MULTIPLIER", 0x2032, W64, CTL, "B.2.1"),
    ("TERTIARY_VM_EXEC_CONTROL", 0x2034, W64, CTL, "B.2.1"),
    ("GUEST_PHYSICAL_ADDRESS", 0x2400, W64, RO, "B.2.2"),
    ("VMCS_LINK_POINTER", 0x2800, W64, GST, "B.2.3"),
    ("GUEST_IA32_DEBUGCTL", 0x2802, W64, GST, "B.2.3"),
    ("GUEST_IA32_PAT", 0x2804, W64, GST, "B.2.3"),
    ("GUEST_IA32_EFER", 0x2806, W64, GST, "B.2.3"),
    ("GUEST_PDPTE0", 0x280A, W64, GST, "B.2.3"),
    ("GUEST_PDPTE3", 0x2810, W64, GST, "B.2.3"),
    ("HOST_IA32_PAT", 0x2C00, W64, HST, "B.2.4"),
    ("HOST_IA32_EFER", 0x2C02, W64, HST, "B.2.4"),
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000, W32, CTL, "B.3.1"),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002, W32, CTL, "B.3.1"),
    ("EXCEPTION_BITMAP", 0x4004, W32, CTL, "B.3.1"),
    ("CR3_TARGET_COUNT", 0x400A, W32, CTL, "B.3.1"),
    ("VM_EXIT_CONTROLS", 0x400C, W32, CTL, "B.3.1"),
    ("VM_ENTRY_CONTROLS", 0x4012, W32, CTL, "B.3.1"),
    ("VM_ENTRY_INTR_INFO", 0x4016, W32, CTL, "B.3.1"),
    ("VM_ENTRY_INSTRUCTION_LEN", 0x401A, W32, CTL, "B.3.1"),
    ("SECONDARY_VM_EXEC_CONTROL", 0x401E, W32, CTL, "B.3.1"),
    ("PLE_WINDOW", 0x4022, W32, CTL, "B.3.1"),
    ("VM_INSTRUCTION_ERROR", 0x4400, W32, RO, "B.3.2"),
    ("VM_EXIT_REASON", 0x4402, W32, RO, "B.3.2"),
    ("VM_EXIT_INTR_INFO", 0x4404, W32, RO, "B.3.2"),
    ("IDT_VECTORING_INFO", 0x4408, W32, RO, "B.3.2"),
    ("VM_EXIT_INSTRUCTION_LEN", 0x440C, W32, RO, "B.3.2"),
    ("VM_EXIT_INSTRUCTION_INFO", 0x440E, W32, RO, "B.3.2"),
    ("GUEST_ES_LIMIT", 0x4800, W32, GST, "B.3.3"),
    ("GUEST_IDTR_LIMIT", 0x4812, W32, GST, "B.3.3"),
    ("GUEST_ES_ACCESS_RIGHTS", 0x4814, W32, GST, "B.3.3"),
    ("GUEST_TR_ACCESS_RIGHTS", 0x4822, W32, GST, "B.3.3"),
    ("GUEST_INTERRUPTIBILITY_STATE", 0x4824, W32, GST, "B.3.3"),
    ("GUEST_ACTIVITY_STATE", 0x4826, W32, GST, "B.3.3"),
    ("GUEST_IA32_SYSENTER_CS", 0x482A, W32, GST, "B.3.3"),
    ("VMX_PREEMPTION_TIMER_VALUE", 0x482E, W32, GST, "B.3.3"),
    ("HOST_IA32_SYSENTER_CS", 0x4C00, W32, HST, "B.3.4"),
    ("CR0_GUEST_HOST_MASK", 0x6000, WN, CTL, "B.4.1"),
    ("CR4_READ_SHADOW", 0x6006, WN, CTL, "B.4.1"),
    ("CR3_TARGET_VALUE3", 0x600E, WN, CTL, "B.4.1"),
    ("EXIT_QUALIFICATION", 0x6400, WN, RO, "B.4.2"),
    ("IO_RIP", 0x6408, WN, RO, "B.4.2"),
    ("GUEST_LINEAR_ADDRESS", 0x640A, WN, RO, "B.4.2"),
    ("GUEST_CR0", 0x6800, WN, GST, "B.4.3"),
    ("GUEST_CR3", 0x6802, WN, GST, "B.4.3"),
    ("GUEST_CR4", 0x6804, WN, GST, "B.4.3"),
    ("GUEST_ES_BASE", 0x6806, WN, GST, "B.4.3"),
    ("GUEST_IDTR_BASE", 0x6818, WN, GST, "B.4.3"),
    ("GUEST_DR7", 0x681A, WN, GST, "B.4.3"),
    ("GUEST_RSP", 0x681C, WN, GST, "B.4.3"),
    ("GUEST_RIP", 0x681E, WN, GST, "B.4.3"),
    ("GUEST_RFLAGS", 0x6820, WN, GST, "B.4.3"),
    ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822, WN, GST, "B.4.3"),
    ("GUEST_IA32_SYSENTER_EIP", 0x6826, WN, GST, "B.4.3"),
    ("HOST_CR0", 0x6C00, WN, HST, "B.4.4"),
    ("HOST_FS_BASE", 0x6C06, WN, HST, "B.4.4"),
    ("HOST_IDTR_BASE", 0x6C0E, WN, HST, "B.4.4"),
    ("HOST_RSP", 0x6C14, WN, HST, "B.4.4"),
    ("HOST_RIP", 0x6C16, WN, HST, "B.4.4"),
]


@pytest.mark.parametrize("name,encoding,width,kind,section", SDM_APPENDIX_B)
def test_vmcs_field_encoding_matches_sdm_appendix_b(name, encoding, width, kind, section):
    field = V.FIELDS_BY_NAME[name]
    assert field.encoding == encoding == VmcsField[name] == getattr(V, name)
    assert (field.width, field.kind, field.section) == (width, kind, section)


def test_vmcs_table_width_and_kind_follow_encoding_bits():
    assert len(SDM_APPENDIX_B) >= 30
    for f in FIELDS:
        assert f.encoding & V.ENC_RESERVED_MASK == 0, f.name
        assert f.encoding & 1 == 0, f"{f.name}: table lists full encodings"
        assert f.width == (f.encoding >> 13) & 3
        assert f.kind == (f.encoding >> 10) & 3
        assert f.bits == {W16: 16, W32: 32, W64: 64, WN: 64}[f.width]
        assert f.read_only == (f.kind is RO)
        assert V.make_encoding(f.width, f.kind, V.encoding_index(f.encoding)) == f.encoding
    assert len({f.encoding for f in FIELDS}) == len({f.name for f in FIELDS}) == len(FIELDS)
    assert MAX_FIELD_INDEX == max((f.encoding >> 1) & 0x1FF for f in FIELDS)


def test_vmcs_64bit_field_high_encoding_is_encoding_or_1():
    f = V.FIELDS_BY_NAME["EPT_POINTER"]
    assert f.high_encoding == 0x201B
    assert V.FIELDS_BY_NAME["GUEST_RIP"].high_encoding is None


@pytest.mark.parametrize("encoding", [
    0x682E,        # next to GUEST_IA32_INTERRUPT_SSP_TABLE_ADDR, unassigned
    0x482C,        # the gap before VMX_PREEMPTION_TIMER_VALUE
    0x4403,        # high access to a 32-bit field
    0x681F,        # high access to a natural-width field
    0x0801,        # high access to a 16-bit field
    0x1000,        # bit 12 reserved
    0x8000 | 0x681E,  # bit 15 reserved
    1 << 32 | 0x681E,  # above 32 bits
    -1,
])
def test_vmcs_read_unsupported_encoding_fails_with_error_12(encoding):
    vmcs = Vmcs()
    with pytest.raises(VmInstructionFault) as e:
        vmcs.read(encoding)
    assert e.value.error is VmInstructionError.UNSUPPORTED_VMCS_COMPONENT
    with pytest.raises(VmInstructionFault) as e:
        vmcs.write(encoding, 1)
    assert e.value.error == 12
    assert isinstance(e.value, VmmError)


@pytest.mark.parametrize("field", [f for f in FIELDS if f.read_only], ids=lambda f: f.name)
def test_vmcs_vmwrite_read_only_field_without_misc29_fails_with_error_13(field):
    vmcs = Vmcs(vmwrite_any_field=False)
    with pytest.raises(VmInstructionFault) as e:
        vmcs.write(field.encoding, 5)
    assert e.value.error is VmInstructionError.VMWRITE_READ_ONLY_COMPONENT
    assert vmcs.read(field.encoding) == 0


def test_vmcs_vmwrite_read_only_field_with_misc29_succeeds():
    vmcs = Vmcs(vmwrite_any_field=True)
    vmcs.write(V.VM_EXIT_REASON, 30)
    assert vmcs.read(V.VM_EXIT_REASON) == 30


@pytest.mark.parametrize("name,value,expected", [
    ("GUEST_CS_SELECTOR", 0x12345, 0x2345),            # 16-bit
    ("VIRTUAL_PROCESSOR_ID", -1, 0xFFFF),
    ("PIN_BASED_VM_EXEC_CONTROL", 0x1_2345_6789, 0x2345_6789),   # 32-bit
    ("GUEST_ES_LIMIT", -2, 0xFFFF_FFFE),
    ("EPT_POINTER", 0x1_0000_0000_0000_101E, 0x101E),   # 64-bit
    ("TSC_OFFSET", -1, 0xFFFF_FFFF_FFFF_FFFF),
    ("GUEST_RIP", 0xFFFF_8000_0000_1000, 0xFFFF_8000_0000_1000),   # natural: 64 bits
    ("GUEST_RSP", 1 << 64 | 7, 7),
])
def test_vmcs_vmwrite_truncates_to_field_width(name, value, expected):
    vmcs = Vmcs()
    vmcs[name] = value
    assert vmcs[name] == expected


def test_vmcs_high_encoding_accesses_bits_63_32():
    vmcs = Vmcs()
    vmcs.write(V.TSC_OFFSET, 0x1111_2222_3333_4444)
    assert vmcs.read(V.TSC_OFFSET | 1) == 0x1111_2222
    vmcs.write(V.TSC_OFFSET | 1, 0xAAAA_BBBB_CCCC_DDDD)   # only the low 32 bits of the value are used
    assert vmcs.read(V.TSC_OFFSET) == 0xCCCC_DDDD_3333_4444
    assert vmcs["TSC_OFFSET_HIGH"] == 0xCCCC_DDDD
    vmcs.tsc_offset_high = 1
    assert vmcs.tsc_offset == 0x1_3333_4444


def test_vmcs_attribute_item_and_encoding_access_agree():
    vmcs = Vmcs()
    vmcs.guest_rip = 0x1000
    assert vmcs["GUEST_RIP"] == vmcs[0x681E] == vmcs.read(VmcsField.GUEST_RIP) == 0x1000
    vmcs["guest_rsp"] = 0x2000
    assert vmcs.guest_rsp == 0x2000
    assert vmcs.snapshot(nonzero=True) == {"GUEST_RSP": 0x2000, "GUEST_RIP": 0x1000}


def test_vmcs_unknown_attribute_or_name_raises():
    vmcs = Vmcs()
    with pytest.raises(AttributeError):
        vmcs.guest_rip_typo = 1
    with pytest.raises(AttributeError):
        vmcs.guest_rip_typo
    with pytest.raises(KeyError):
        vmcs["GUEST_RIPX"]
    with pytest.raises(KeyError):
        vmcs["GUEST_RIP_HIGH"]      # natural-width fields have no high part


def test_vmcs_attribute_write_of_read_only_field_follows_vmwrite_rule():
    vmcs = Vmcs(vmwrite_any_field=False)
    with pytest.raises(VmInstructionFault):
        vmcs.exit_qualification = 1


def test_vmcs_launch_state_follows_vmclear_vmlaunch_vmresume():
    vmcs = Vmcs()
    assert vmcs.launch_state is LaunchState.CLEAR and not vmcs.launched
    with pytest.raises(VmInstructionFault) as e:
        vmcs.check_resume()
    assert e.value.error is VmInstructionError.VMRESUME_NONLAUNCHED_VMCS
    vmcs.launch()
    assert vmcs.launched
    vmcs.check_resume()
    with pytest.raises(VmInstructionFault) as e:
        vmcs.launch()
    assert e.value.error is VmInstructionError.VMLAUNCH_NONCLEAR_VMCS
    vmcs.guest_rip = 5
    vmcs.vmclear()
    assert vmcs.launch_state is LaunchState.CLEAR and vmcs.guest_rip == 5


def test_vmcs_set_exit_info_fills_read_only_fields_without_misc29():
    vmcs = Vmcs(vmwrite_any_field=False)
    vmcs.set_exit_info(ExitReason.EPT_VIOLATION, 0x18A, guest_linear_address=0x7000_1234,
                       guest_physical_address=0x1_2345_6789, instruction_length=3, instruction_info=0x10,
                       interruption_info=0x8000_0B0E, interruption_error_code=2,
                       idt_vectoring_info=0x8000_0020, idt_vectoring_error_code=0,
                       io_rcx=1, io_rsi=2, io_rdi=3, io_rip=4)
    snap = vmcs.snapshot()
    assert snap["VM_EXIT_REASON"] == 48
    assert snap["EXIT_QUALIFICATION"] == 0x18A
    assert snap["GUEST_LINEAR_ADDRESS"] == 0x7000_1234
    assert snap["GUEST_PHYSICAL_ADDRESS"] == 0x1_2345_6789
    assert snap["VM_EXIT_INSTRUCTION_LEN"] == 3 and snap["VM_EXIT_INSTRUCTION_INFO"] == 0x10
    assert snap["VM_EXIT_INTR_INFO"] == 0x8000_0B0E and snap["VM_EXIT_INTR_ERROR_CODE"] == 2
    assert snap["IDT_VECTORING_INFO"] == 0x8000_0020
    assert (snap["IO_RCX"], snap["IO_RSI"], snap["IO_RDI"], snap["IO_RIP"]) == (1, 2, 3, 4)
    assert vmcs.exit_reason.basic is ExitReason.EPT_VIOLATION


def test_vmcs_set_exit_info_clears_event_valid_bits_it_is_not_given():
    vmcs = Vmcs()
    vmcs.set_exit_info(ExitReason.EXCEPTION_NMI, 0, interruption_info=0x8000_0B0E, idt_vectoring_info=0x8000_0020)
    vmcs.set_exit_info(ExitReason.CPUID, instruction_length=2)
    assert vmcs.vm_exit_intr_info == 0 and vmcs.idt_vectoring_info == 0
    assert vmcs.exit_qualification == 0 and vmcs.vm_exit_instruction_len == 2


def test_vmcs_set_exit_info_accepts_value_objects():
    from vmlab.vmm.controls import InterruptionInfo
    from vmlab.vmm.qualification import CrAccessQualification, CrAccessType, Gpr
    vmcs = Vmcs()
    reason = ExitReasonField(ExitReason.ENTRY_FAIL_GUEST_STATE, entry_failure=True)
    vmcs.set_exit_info(reason, CrAccessQualification(4, CrAccessType.MOV_TO_CR, gpr=Gpr.RBX),
                       interruption_info=InterruptionInfo.hardware_exception(13))
    assert vmcs.vm_exit_reason == 0x8000_0021
    assert vmcs.exit_qualification == 0x304
    assert vmcs.vm_exit_intr_info == 0x8000_0B0D


def test_vmcs_set_instruction_error_writes_vm_instruction_error():
    vmcs = Vmcs(vmwrite_any_field=False)
    vmcs.set_instruction_error(VmInstructionError.ENTRY_INVALID_CONTROL_FIELD)
    assert vmcs.vm_instruction_error == 7


def test_vmcs_copy_is_independent_and_diff_names_changes():
    a = Vmcs()
    a.guest_rip = 1
    a.launch()
    b = a.copy()
    b.guest_rip = 2
    assert a.guest_rip == 1 and b.launched
    assert a.diff(b) == {"GUEST_RIP": (1, 2)}
    assert len(a.snapshot()) == len(FIELDS)


# --------------------------------------------------------------------------- model consistency (hypothesis)

_ENCODINGS = [f.encoding for f in FIELDS] + [f.high_encoding for f in FIELDS if f.high_encoding]
_op = st.one_of(
    st.tuples(st.just("w"), st.sampled_from(_ENCODINGS), st.integers(-(1 << 70), 1 << 70)),
    st.tuples(st.just("r"), st.sampled_from(_ENCODINGS), st.just(0)),
    st.tuples(st.just("w"), st.integers(0, 0xFFFF), st.integers(0, 1 << 64)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_op, max_size=40), any_field=st.booleans())
def test_vmcs_random_vmwrite_vmread_sequences_match_reference_model(ops, any_field):
    """A dict of 64-bit values per field, with high halves and truncation, predicts every VMREAD."""
    vmcs = Vmcs(vmwrite_any_field=any_field)
    model: dict[int, int] = {}
    for kind, enc, value in ops:
        field = FIELDS_BY_ENCODING.get(enc & ~1)
        valid = field is not None and (not enc & 1 or field.width is W64)
        if kind == "r":
            assert vmcs.read(enc) == (model.get(field.encoding, 0) >> 32 if enc & 1 else model.get(enc, 0))
            continue
        if not valid:
            with pytest.raises(VmInstructionFault) as e:
                vmcs.write(enc, value)
            assert e.value.error == 12
            continue
        if field.read_only and not any_field:
            with pytest.raises(VmInstructionFault) as e:
                vmcs.write(enc, value)
            assert e.value.error == 13
            continue
        vmcs.write(enc, value)
        old = model.get(field.encoding, 0)
        if enc & 1:
            new = (old & 0xFFFF_FFFF) | ((value & 0xFFFF_FFFF) << 32)
        else:
            new = value & ((1 << field.bits) - 1)
        model[field.encoding] = new
    for f in FIELDS:
        assert vmcs.read(f.encoding) == model.get(f.encoding, 0)
        assert vmcs.read(f.encoding) >> f.bits == 0


# --------------------------------------------------------------------------- exit reasons (Appendix C)

APPENDIX_C = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT", 4: "SIPI", 5: "IO_SMI",
    6: "OTHER_SMI", 7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW", 9: "TASK_SWITCH", 10: "CPUID", 11: "GETSEC",
    12: "HLT", 13: "INVD", 14: "INVLPG", 15: "RDPMC", 16: "RDTSC", 17: "RSM", 18: "VMCALL", 19: "VMCLEAR",
    20: "VMLAUNCH", 21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD", 24: "VMRESUME", 25: "VMWRITE", 26: "VMXOFF",
    27: "VMXON", 28: "CR_ACCESS", 29: "DR_ACCESS", 30: "IO_INSTRUCTION", 31: "RDMSR", 32: "WRMSR",
    33: "ENTRY_FAIL_GUEST_STATE", 34: "ENTRY_FAIL_MSR_LOADING", 36: "MWAIT", 37: "MONITOR_TRAP_FLAG",
    39: "MONITOR", 40: "PAUSE", 41: "ENTRY_FAIL_MACHINE_CHECK", 43: "TPR_BELOW_THRESHOLD", 44: "APIC_ACCESS",
    45: "VIRTUALIZED_EOI", 46: "GDTR_IDTR_ACCESS", 47: "LDTR_TR_ACCESS", 48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP", 52: "PREEMPTION_TIMER", 53: "INVVPID", 54: "WBINVD",
    55: "XSETBV", 56: "APIC_WRITE", 57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED",
    62: "PML_FULL", 63: "XSAVES", 64: "XRSTORS", 65: "PCONFIG", 66: "SPP_EVENT", 67: "UMWAIT", 68: "TPAUSE",
    69: "LOADIWKEY", 70: "ENCLV", 72: "ENQCMD_PASID_FAIL", 73: "ENQCMDS_PASID_FAIL", 74: "BUS_LOCK",
    75: "INSTRUCTION_TIMEOUT", 76: "SEAMCALL", 77: "TDCALL", 78: "RDMSRLIST", 79: "WRMSRLIST", 80: "URDMSR",
    81: "UWRMSR", 84: "RDMSR_IMM", 85: "WRMSRNS_IMM",
}


def test_exit_reason_numbers_match_sdm_appendix_c():
    assert {int(r): r.name for r in ExitReason} == APPENDIX_C
    assert set(range(max(APPENDIX_C) + 1)) - set(APPENDIX_C) == EXIT_REASON_GAPS == {35, 38, 42, 71, 82, 83}
    for gap in EXIT_REASON_GAPS:
        with pytest.raises(ValueError):
            ExitReason(gap)
        assert basic_exit_reason_name(gap) == f"UNASSIGNED_{gap}"


def test_exit_reason_field_entry_failure_sets_bit_31():
    value = ExitReasonField(ExitReason.ENTRY_FAIL_GUEST_STATE, entry_failure=True).encode()
    assert value == 0x8000_0021 == 33 | EXIT_REASON_ENTRY_FAILURE
    assert ExitReason.ENTRY_FAIL_GUEST_STATE in ENTRY_FAILURE_REASONS


@given(basic=st.integers(0, 0xFFFF), flags=st.lists(st.booleans(), min_size=5, max_size=5))
def test_exit_reason_field_roundtrips(basic, flags):
    f = ExitReasonField(basic, *flags)
    value = f.encode()
    assert value >> 27 & 1 == flags[1] and value >> 28 & 1 == flags[2] and value >> 29 & 1 == flags[3]
    assert value >> 31 == flags[0] and value >> 26 & 1 == flags[4]
    assert ExitReasonField.decode(value) == f
    assert ExitReasonField.decode(value | (1 << 16) | (1 << 30)) == f     # undefined bits ignored


def test_vm_instruction_error_numbers_match_sdm_31_4():
    expected = {1: "VMCALL_IN_VMX_ROOT", 2: "VMCLEAR_INVALID_ADDRESS", 3: "VMCLEAR_VMXON_POINTER",
                4: "VMLAUNCH_NONCLEAR_VMCS", 5: "VMRESUME_NONLAUNCHED_VMCS", 6: "VMRESUME_AFTER_VMXOFF",
                7: "ENTRY_INVALID_CONTROL_FIELD", 8: "ENTRY_INVALID_HOST_STATE", 9: "VMPTRLD_INVALID_ADDRESS",
                10: "VMPTRLD_VMXON_POINTER", 11: "VMPTRLD_INCORRECT_REVISION_ID", 12: "UNSUPPORTED_VMCS_COMPONENT",
                13: "VMWRITE_READ_ONLY_COMPONENT", 15: "VMXON_IN_VMX_ROOT",
                16: "ENTRY_INVALID_EXECUTIVE_VMCS_POINTER", 17: "ENTRY_NONLAUNCHED_EXECUTIVE_VMCS",
                18: "ENTRY_EXECUTIVE_VMCS_NOT_VMXON_POINTER", 19: "VMCALL_NONCLEAR_VMCS",
                20: "VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS", 22: "VMCALL_INCORRECT_MSEG_REVISION_ID",
                23: "VMXOFF_UNDER_DUAL_MONITOR", 24: "VMCALL_INVALID_SMM_MONITOR_FEATURES",
                25: "ENTRY_INVALID_EXECUTIVE_VMCS_CONTROLS", 26: "ENTRY_EVENTS_BLOCKED_BY_MOV_SS",
                28: "INVALID_INVEPT_INVVPID_OPERAND"}
    assert {int(e): e.name for e in VmInstructionError} == expected


def test_field_dataclass_section_and_attr_names():
    f = Field("GUEST_RIP", 0x681E, WN, GST)
    assert f.section == "B.4.3" and f.attr == "guest_rip" and f.mask == (1 << 64) - 1

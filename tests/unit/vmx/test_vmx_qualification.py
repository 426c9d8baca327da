"""Tests of vmm.qualification (exit qualifications, instruction information) and the event/EPTP formats
of vmm.controls: values worked out from the SDM tables, and round trips with hypothesis."""

from enum import IntEnum

import pytest
from hypothesis import given, strategies as st

from vmlab.vmm import qualification as Q
from vmlab.vmm.controls import (EPT_MEMTYPE_UC, EPT_MEMTYPE_WB, EptPointer, InterruptionInfo, InterruptionType)
from vmlab.vmm.qualification import (RECORDS, AddressSize, CrAccessQualification, CrAccessType, DescriptorTableInfo,
                               DescriptorTableInstruction, DrAccessQualification, EptViolationQualification, Gpr,
                               InsOutsInfo, InvalidationInfo, IoQualification, LdtrTrInfo, LdtrTrInstruction,
                               OperandSize, RdrandRdseedInfo, SegmentReg, TaskSwitchQualification,
                               TaskSwitchSource, VmreadVmwriteInfo, VmxMemoryOperandInfo)


def record_strategy(cls):
    """Any valid value of a record class, built from its LAYOUT."""
    kwargs = {}
    for name, _lo, width, t in cls.LAYOUT:
        if cls is IoQualification and name == "size":
            kwargs[name] = st.sampled_from([1, 2, 4])
        elif t is bool:
            kwargs[name] = st.booleans()
        elif isinstance(t, type) and issubclass(t, IntEnum):
            kwargs[name] = st.sampled_from(list(t))
        else:
            kwargs[name] = st.integers(0, (1 << width) - 1)
    return st.builds(cls, **kwargs)


any_record = st.sampled_from(RECORDS).flatmap(record_strategy)


@given(record=any_record)
def test_qualification_decode_of_encode_roundtrips(record):
    value = record.encode()
    assert value & ~type(record).defined_mask() == 0
    assert type(record).decode(value) == record


@given(record=any_record, noise=st.integers(0, (1 << 64) - 1))
def test_qualification_decode_ignores_undefined_bits(record, noise):
    cls = type(record)
    value = record.encode() | (noise & ~cls.defined_mask())
    assert cls.decode(value) == record
    assert cls.decode(value).encode() == value & cls.defined_mask()


def test_qualification_layouts_fit_bits_31_0():
    for cls in RECORDS:
        assert cls.defined_mask() >> 32 == 0, cls


# Values worked out bit by bit from SDM Vol. 3C Tables 28-2..28-14.
@pytest.mark.parametrize("record,value", [
    # Table 28-3: MOV CR4, RBX -> CR 4, type 0, GPR 3
    (CrAccessQualification(4, CrAccessType.MOV_TO_CR, gpr=Gpr.RBX), 0x304),
    # MOV R9, CR3 -> CR 3, type 1 (bits 5:4 = 01), GPR 9
    (CrAccessQualification(3, CrAccessType.MOV_FROM_CR, gpr=Gpr.R9), 0x913),
    # CLTS -> type 2
    (CrAccessQualification(0, CrAccessType.CLTS), 0x20),
    # LMSW [mem] with source 0x0001 -> type 3, bit 6, data in 31:16
    (CrAccessQualification(0, CrAccessType.LMSW, lmsw_memory=True, lmsw_source=1), 0x0001_0070),
    # Table 28-4: MOV DR7, RAX -> DR 7, direction 0; MOV RCX, DR6 -> bit 4, GPR 1
    (DrAccessQualification(7, mov_from_dr=False), 0x7),
    (DrAccessQualification(6, mov_from_dr=True, gpr=Gpr.RCX), 0x116),
    # Table 28-5: IN AL, DX with DX = 0x3F8 -> size 0, bit 3, port in 31:16
    (IoQualification(size=1, direction_in=True, port=0x3F8), 0x03F8_0008),
    # OUT 0x80, AL -> immediate (bit 6)
    (IoQualification(size=1, direction_in=False, port=0x80, immediate=True), 0x0080_0040),
    # REP OUTSW to 0x1F0 -> size 1, string, REP
    (IoQualification(size=2, direction_in=False, port=0x1F0, string=True, rep=True), 0x01F0_0031),
    # IN EAX, DX (port 0xCFC) -> size code 3
    (IoQualification(size=4, direction_in=True, port=0xCFC), 0x0CFC_000B),
    # Table 28-7: data write to a read-only page, linear address valid, translation of it
    (EptViolationQualification(write=True, readable=True, linear_address_valid=True, translated_access=True),
     0x18A),
    # instruction fetch from a not-present page during a paging-structure walk, after IRET unblocked NMIs
    (EptViolationQualification(fetch=True, linear_address_valid=True, nmi_unblocking=True), 0x1084),
    # Table 28-2: task switch through an IDT task gate to selector 0x28
    (TaskSwitchQualification(0x28, TaskSwitchSource.TASK_GATE_IN_IDT), 0xC000_0028),
    # Table 28-8: OUTSB with 32-bit addressing and an FS override
    (InsOutsInfo(AddressSize.BITS32, SegmentReg.FS), (1 << 7) | (4 << 15)),
    # Table 28-9: INVEPT RDX, [RAX] -> scaling 0, 64-bit, DS, no index, base RAX, reg2 RDX
    (InvalidationInfo(index_invalid=True, base_reg=Gpr.RAX, base_invalid=False, reg2=Gpr.RDX),
     (2 << 7) | (3 << 15) | (1 << 22) | (2 << 28)),
    # Table 28-10: LIDT [RBX + RSI*8] -> scaling 3, index RSI, base RBX, identity 3
    (DescriptorTableInfo(DescriptorTableInstruction.LIDT, scaling=3, index_reg=Gpr.RSI, index_invalid=False,
                         base_reg=Gpr.RBX, base_invalid=False),
     3 | (2 << 7) | (1 << 11) | (3 << 15) | (6 << 18) | (3 << 23) | (3 << 28)),
    # Table 28-11: LTR AX -> register operand (bit 10), reg1 0, identity 3
    (LdtrTrInfo(LdtrTrInstruction.LTR, register_operand=True, reg1=Gpr.RAX, index_invalid=False,
                base_invalid=False, address_size=AddressSize.BITS16, segment=SegmentReg.ES),
     (1 << 10) | (3 << 28)),
    # Table 28-12: RDRAND R10D -> destination 10, operand size 32
    (RdrandRdseedInfo(Gpr.R10, OperandSize.BITS32), (10 << 3) | (1 << 11)),
    # Table 28-13: VMPTRLD [RBP] with SS default segment
    (VmxMemoryOperandInfo(segment=SegmentReg.SS, base_reg=Gpr.RBP, base_invalid=False),
     (2 << 7) | (2 << 15) | (1 << 22) | (5 << 23)),
    # Table 28-14: VMREAD RCX, RAX (register form) -> reg1 RCX, bit 10, reg2 RAX
    (VmreadVmwriteInfo(reg2=Gpr.RAX, register_operand=True, reg1=Gpr.RCX, address_size=AddressSize.BITS16,
                       segment=SegmentReg.ES, index_invalid=False, base_invalid=False),
     (1 << 3) | (1 << 10)),
], ids=lambda x: type(x).__name__ if not isinstance(x, int) else hex(x))
def test_qualification_encodes_sdm_table_examples(record, value):
    assert record.encode() == value
    assert type(record).decode(value) == record


def test_qualification_io_size_outside_1_2_4_raises():
    with pytest.raises(ValueError):
        IoQualification(size=3, direction_in=True, port=0x60).encode()
    with pytest.raises(ValueError):
        IoQualification.decode(0x0060_0002)             # size encoding 2 is not used


def test_qualification_field_too_wide_raises():
    with pytest.raises(ValueError):
        TaskSwitchQualification(0x1_0000).encode()
    with pytest.raises(ValueError):
        DrAccessQualification(8, mov_from_dr=False).encode()


def test_qualification_entry_failure_values_match_sdm_27_8():
    assert {q.name: int(q) for q in Q.EntryFailureQualification} == {
        "DEFAULT": 0, "PDPTE_LOADING": 2, "NMI_INJECTION": 3, "INVALID_VMCS_LINK_POINTER": 4}


# --------------------------------------------------------------------------- interruption information, EPTP

@pytest.mark.parametrize("info,value", [
    (InterruptionInfo.external_interrupt(0x20), 0x8000_0020),
    (InterruptionInfo.nmi(), 0x8000_0202),
    (InterruptionInfo.hardware_exception(14), 0x8000_0B0E),        # #PF with error code
    (InterruptionInfo.hardware_exception(6), 0x8000_0306),         # #UD without
    (InterruptionInfo.software_interrupt(0x80), 0x8000_0480),
    (InterruptionInfo.privileged_software_exception(), 0x8000_0501),
    (InterruptionInfo.software_exception(3), 0x8000_0603),
    (InterruptionInfo.pending_mtf(), 0x8000_0700),
    (InterruptionInfo(2, InterruptionType.NMI, nmi_unblocking=True), 0x8000_1202),
    (InterruptionInfo(0, InterruptionType.EXTERNAL_INTERRUPT, valid=False), 0),
])
def test_interruption_info_encodes_sdm_25_8_3_format(info, value):
    assert info.encode() == value
    assert InterruptionInfo.decode(value) == info


@given(vector=st.integers(0, 255), t=st.sampled_from(list(InterruptionType)), code=st.booleans(),
       unblock=st.booleans(), valid=st.booleans())
def test_interruption_info_roundtrips(vector, t, code, unblock, valid):
    info = InterruptionInfo(vector, t, code, unblock, valid)
    assert InterruptionInfo.decode(info.encode()) == info


@given(addr=st.integers(0, (1 << 40) - 1).map(lambda a: a & ~0xFFF), mt=st.sampled_from([EPT_MEMTYPE_UC,
                                                                                          EPT_MEMTYPE_WB]),
       walk=st.sampled_from([4, 5]), ad=st.booleans())
def test_ept_pointer_roundtrips(addr, mt, walk, ad):
    eptp = EptPointer(addr, mt, walk, ad)
    assert EptPointer.decode(eptp.encode()) == eptp


def test_ept_pointer_encodes_wb_4_level():
    assert EptPointer(0x12_3000).encode() == 0x12_3000 | 6 | (3 << 3)
    with pytest.raises(ValueError):
        EptPointer(0x12_3001).encode()

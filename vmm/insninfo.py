"""VM-exit instruction information and displacement qualifications for
instructions with a memory or register operand (SDM Vol. 3C 28.2.1 and 28.2.5,
Tables 28-9 .. 28-14), built from the Capstone decode of the exiting
instruction."""
from __future__ import annotations

from capstone import x86_const as C

from vmlab.emu import x86
from vmlab.emu.decode import _STACK_BASES, _reg_table

from .qualification import (AddressSize, DescriptorTableInfo, DescriptorTableInstruction, Gpr,
                            InvalidationInfo, LdtrTrInfo, LdtrTrInstruction, OperandSize, RdrandRdseedInfo,
                            SegmentReg, VmreadVmwriteInfo, VmxMemoryOperandInfo)

_SEG = {C.X86_REG_ES: SegmentReg.ES, C.X86_REG_CS: SegmentReg.CS, C.X86_REG_SS: SegmentReg.SS,
        C.X86_REG_DS: SegmentReg.DS, C.X86_REG_FS: SegmentReg.FS, C.X86_REG_GS: SegmentReg.GS}
_ASIZE = {2: AddressSize.BITS16, 4: AddressSize.BITS32, 8: AddressSize.BITS64}


def _gpr(rid: int) -> Gpr:
    return Gpr(_reg_table()[rid][0])


def memory_fields(insn, op) -> dict:
    """The shared memory-operand fields (scaling, address size, segment,
    index/base register and their invalid bits) of one operand."""
    m = op.mem
    seg = _SEG.get(m.segment)
    if seg is None:
        seg = SegmentReg.SS if m.base in _STACK_BASES else SegmentReg.DS
    valid_base = m.base not in (0, C.X86_REG_RIP, C.X86_REG_EIP)
    return dict(scaling={1: 0, 2: 1, 4: 2, 8: 3}.get(m.scale, 0), address_size=_ASIZE[insn.addr_size],
                segment=seg, index_reg=_gpr(m.index) if m.index else Gpr.RAX, index_invalid=not m.index,
                base_reg=_gpr(m.base) if valid_base else Gpr.RAX, base_invalid=not valid_base)


def displacement(insn) -> int:
    """The exit qualification of memory-operand instructions: the displacement,
    sign-extended to 64 bits (SDM 28.2.1)."""
    for op in insn.operands:
        if op.type == C.X86_OP_MEM:
            return op.mem.disp & 0xFFFFFFFFFFFFFFFF
    return 0


def _mem(insn):
    return next((op for op in insn.operands if op.type == C.X86_OP_MEM), None)


def instruction_info(insn, mode_bits: int):
    """(reason-specific instruction-information record or None, qualification)."""
    mn = insn.mnemonic
    mem = _mem(insn)
    if mn in ("sgdt", "sidt", "lgdt", "lidt"):
        info = DescriptorTableInfo(instruction=DescriptorTableInstruction[mn.upper()],
                                   operand_size_32=not (mode_bits == 16) ^ (0x66 in insn.prefix),
                                   **memory_fields(insn, mem))
        return info, displacement(insn)
    if mn in ("sldt", "str", "lldt", "ltr"):
        op = insn.operands[0]
        if op.type == C.X86_OP_REG:
            return LdtrTrInfo(instruction=LdtrTrInstruction[mn.upper()], register_operand=True,
                              reg1=_gpr(op.reg)), 0
        return LdtrTrInfo(instruction=LdtrTrInstruction[mn.upper()], **memory_fields(insn, op)), displacement(insn)
    if mn in ("rdrand", "rdseed"):
        op = insn.operands[0]
        size = {2: OperandSize.BITS16, 4: OperandSize.BITS32, 8: OperandSize.BITS64}[op.size]
        return RdrandRdseedInfo(dest_reg=_gpr(op.reg), operand_size=size), 0
    if mn in ("invept", "invvpid", "invpcid"):
        reg = next(op for op in insn.operands if op.type == C.X86_OP_REG)
        return InvalidationInfo(reg2=_gpr(reg.reg), **memory_fields(insn, mem)), displacement(insn)
    if mn in ("vmclear", "vmptrld", "vmptrst", "vmxon"):
        return VmxMemoryOperandInfo(**memory_fields(insn, mem)), displacement(insn)
    if mn in ("vmread", "vmwrite"):
        # VMREAD r/m, r (reg2 = field encoding); VMWRITE r, r/m (reg2 = field encoding).
        rm, reg2 = (insn.operands[0], insn.operands[1]) if mn == "vmread" else (insn.operands[1], insn.operands[0])
        if rm.type == C.X86_OP_REG:
            return VmreadVmwriteInfo(register_operand=True, reg1=_gpr(rm.reg), reg2=_gpr(reg2.reg)), 0
        return VmreadVmwriteInfo(register_operand=False, reg2=_gpr(reg2.reg),
                                 **memory_fields(insn, rm)), displacement(insn)
    return None, 0

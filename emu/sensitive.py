"""Completing the instructions vmlab stops before (trap sites, MMIO).

Each function finishes one exit's instruction with architectural semantics (SDM
Vol. 2 instruction pages) and advances RIP; a check that fails raises
GuestFault for the caller to deliver.  The VMM calls these from its default
handlers; a user's VM-exit handler may call them too, or do something else.
"""
from __future__ import annotations

from capstone import x86_const as C

from . import x86
from .cpu import GuestFault
from .decode import _reg_table, set_reg_value
from .exits import CrExit, IoExit, MmioExit, MsrExit

_MASK = 0xFFFFFFFFFFFFFFFF


def _gp0():
    return GuestFault(x86.GP, 0)


def _require_cpl0(vcpu) -> None:
    if vcpu.cpl != 0:
        raise _gp0()


# ---------------------------------------------------------------- port I/O
def io_needs_permission_check(vcpu) -> bool:
    """True when IN/OUT must consult the TSS I/O bitmap (CPL > IOPL or V86)."""
    r = vcpu.regs
    if not (r.cr0 & x86.CR0_PE):
        return False
    iopl = (r.rflags >> 12) & 3
    return bool(r.rflags & x86.RFLAGS_VM) or vcpu.cpl > iopl


def check_io_permission(vcpu, port: int, size: int) -> None:
    """#GP(0) unless the TSS I/O permission bitmap allows the access (SDM Vol. 1 19.5.2)."""
    if not io_needs_permission_check(vcpu):
        return
    tr = vcpu.regs.tr
    if tr.limit < 0x67:
        raise _gp0()
    try:
        base = vcpu.read_linear_int(tr.base + 0x66, 2, implicit=True)
        off = base + port // 8
        if off + 1 > tr.limit:
            raise _gp0()
        bits = vcpu.read_linear_int(tr.base + off, 2, implicit=True)
    except GuestFault:
        raise _gp0()
    if (bits >> (port & 7)) & ((1 << size) - 1):
        raise _gp0()


def io_string_values(vcpu, ex: IoExit) -> list[int]:
    """For OUTS: the elements to write, read from DS:RSI (or the override)."""
    r = vcpu.regs
    amask = (1 << (8 * ex.addr_size)) - 1
    step = -ex.size if r.rflags & x86.RFLAGS_DF else ex.size
    out = []
    si = r.gpr[6] & amask
    for _ in range(ex.count):
        out.append(vcpu.read_linear_int((ex.seg_base + si) & _MASK, ex.size))
        si = (si + step) & amask
    return out


def complete_io(vcpu, ex: IoExit, values: list[int] | None = None) -> None:
    """Finish IN/OUT/INS/OUTS: load the IN result(s), update RSI/RDI/RCX, skip."""
    r = vcpu.regs
    if not ex.string:
        if not ex.is_write:
            vcpu.set_gpr(0, (values or [0xFFFFFFFF])[0], ex.size if ex.size != 4 else 4)
        vcpu.skip(ex.insn_len)
        return
    amask = (1 << (8 * ex.addr_size)) - 1
    step = -ex.size if r.rflags & x86.RFLAGS_DF else ex.size
    idx = 6 if ex.is_write else 7
    ptr = r.gpr[idx] & amask
    if not ex.is_write:
        for val in values or []:
            vcpu.write_linear_int((ex.seg_base + ptr) & _MASK, ex.size, val)
            ptr = (ptr + step) & amask
    else:
        ptr = (ptr + step * ex.count) & amask
    asz = ex.addr_size
    vcpu.set_gpr(idx, ptr, asz if asz != 4 else 4)
    if ex.rep:
        rcx = (r.gpr[1] & amask) - ex.count
        vcpu.set_gpr(1, rcx, asz if asz != 4 else 4)
        if rcx:
            return                       # resume the REP: RIP stays at the instruction
    vcpu.skip(ex.insn_len)


# ---------------------------------------------------------------- MMIO
def complete_mmio(vcpu, ex: MmioExit, value: int = 0) -> None:
    """Finish a decoded MOV/MOVZX/MOVSX on MMIO: load the value, skip."""
    if not ex.is_write:
        insn = ex.insn
        dst = insn.operands[0]
        val = value & ((1 << (8 * ex.size)) - 1)
        if insn.mnemonic in ("movsx", "movsxd") and val >> (8 * ex.size - 1):
            val -= 1 << (8 * ex.size)
        set_reg_value(vcpu, dst.reg, val & ((1 << (8 * dst.size)) - 1))
    vcpu.skip(ex.insn_len)


# ---------------------------------------------------------------- MSRs
def complete_rdmsr(vcpu, ex: MsrExit, value: int) -> None:
    vcpu.set_gpr(0, value & 0xFFFFFFFF, 4)
    vcpu.set_gpr(2, (value >> 32) & 0xFFFFFFFF, 4)
    vcpu.skip(ex.insn_len)


def emulate_msr(vcpu, ex: MsrExit, model) -> None:
    """RDMSR/WRMSR against the MSR model (#GP on CPL>0, unknown MSR, bad value)."""
    from .msr import MsrFault
    _require_cpl0(vcpu)
    try:
        if ex.is_write:
            model.write(ex.msr, ex.value)
            vcpu.skip(ex.insn_len)
        else:
            complete_rdmsr(vcpu, ex, model.read(ex.msr))
    except MsrFault:
        raise _gp0() from None


# ---------------------------------------------------------------- control registers
def emulate_cr(vcpu, ex: CrExit, cpuid) -> None:
    """MOV to/from CR, CLTS, LMSW with the checks of SDM Vol. 2A "MOV—Move to/from
    Control Registers" and Vol. 3A 2.5 (reserved bits, PG/PE/PAE/LME rules)."""
    r = vcpu.regs
    if ex.cr not in (0, 2, 3, 4, 8):
        raise GuestFault(x86.UD)
    _require_cpl0(vcpu)
    long_mode = bool(r.efer & x86.EFER_LMA)
    if ex.access_type == 1:                     # MOV from CR
        val = {0: r.cr0, 2: r.cr2, 3: r.cr3, 4: r.cr4, 8: r.cr8}[ex.cr]
        vcpu.set_gpr(ex.gpr, val, 8 if vcpu.mode_bits == 64 else 4)
        vcpu.skip(ex.insn_len)
        return
    if ex.access_type == 2:                     # CLTS
        vcpu.write_cr(0, r.cr0 & ~x86.CR0_TS)
        vcpu.skip(ex.insn_len)
        return
    if ex.access_type == 3:                     # LMSW: only PE (cannot clear), MP, EM, TS
        src = ex.value
        if ex.lmsw_mem:
            src = vcpu.read_linear_int(ex.lmsw_addr, 2)
        new = (r.cr0 & ~0xE) | (src & 0xF) | (r.cr0 & x86.CR0_PE)
        vcpu.write_cr(0, new)
        vcpu.skip(ex.insn_len)
        return
    value = ex.value if vcpu.mode_bits == 64 else ex.value & 0xFFFFFFFF
    if ex.cr == 0:
        if value >> 32:
            raise _gp0()
        value |= x86.CR0_ET                      # ET is hardwired to 1
        if (value & x86.CR0_PG) and not (value & x86.CR0_PE):
            raise _gp0()
        if (value & x86.CR0_NW) and not (value & x86.CR0_CD):
            raise _gp0()
        if (value & x86.CR0_PG) and not (r.cr0 & x86.CR0_PG) and (r.efer & x86.EFER_LME) \
                and not (r.cr4 & x86.CR4_PAE):
            raise _gp0()
        if long_mode and (r.hflags & x86.HF_CS64) and not (value & x86.CR0_PG):
            raise _gp0()
        if (value & x86.CR0_PG) and not (r.cr0 & x86.CR0_PG) and (r.efer & x86.EFER_LME) \
                and (r.seg[x86.R_CS].flags & x86.DESC_L):
            raise _gp0()
        vcpu.write_cr(0, value & x86.CR0_VALID)
    elif ex.cr == 2:
        vcpu.write_cr(2, value)
    elif ex.cr == 3:
        if long_mode:
            keep = value & ((1 << 63) if r.cr4 & x86.CR4_PCIDE else 0)
            v = value & ~(1 << 63)
            if v >> cpuid.maxphyaddr:
                raise _gp0()
            value = v | keep
        vcpu.write_cr(3, value & ~(1 << 63))
    elif ex.cr == 4:
        if value & ~cpuid.cr4_valid_mask():
            raise _gp0()
        if long_mode and not (value & x86.CR4_PAE):
            raise _gp0()
        vcpu.write_cr(4, value)
    elif ex.cr == 8:
        if value >> 4:
            raise _gp0()
        vcpu.write_cr(8, value)
    vcpu.skip(ex.insn_len)


def emulate_invlpg(vcpu, insn_len: int) -> None:
    """INVLPG: privileged; drops cached translations (Unicorn's whole TLB)."""
    _require_cpl0(vcpu)
    vcpu.flush_tlb()
    vcpu.skip(insn_len)

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
from .exits import CrExit, HltExit, IoExit, MmioExit, MsrExit, TrapExit

_MASK = 0xFFFFFFFFFFFFFFFF


def _gp0():
    return GuestFault(x86.GP, 0)


def _require_cpl0(vcpu) -> None:
    if vcpu.cpl != 0:
        raise _gp0()


# ---------------------------------------------------------------- faults before VM exits
#: trap kinds whose instruction needs CPL 0 (#GP(0) otherwise; SDM Vol. 2
#: "Protected Mode Exceptions" of INVLPG, WBINVD, INVD, XSETBV, MOV DR,
#: INVPCID, LGDT/LIDT/LLDT/LTR, HLT, RDMSR/WRMSR, MOV CR, CLTS, LMSW)
_CPL0_KINDS = frozenset({"invlpg", "wbinvd", "invd", "xsetbv", "dr", "invpcid"})
_DESC_LOADS = frozenset({"lgdt", "lidt", "lldt", "ltr"})
_DESC_STORES = frozenset({"sgdt", "sidt", "sldt", "str", "smsw"})
_CR4_TSD, _CR4_PCE, _CR4_UMIP, _CR4_OSXSAVE = 1 << 2, 1 << 8, 1 << 11, 1 << 18


def priority_fault(vcpu, ex) -> GuestFault | None:
    """The fault an instruction at a trap site raises before it could cause a
    VM exit, or None.  SDM Vol. 3C 26.1.1: "Certain exceptions have priority
    over VM exits. These include invalid-opcode exceptions, faults based on
    privilege level, and general-protection exceptions that are based on
    checking I/O permission bits in the task-state segment (TSS)."  So a HLT,
    RDMSR, MOV CR… at CPL > 0 is #GP(0) whatever the VM-execution controls
    say, an IN/OUT the TSS I/O bitmap refuses is #GP(0), MONITOR/MWAIT at
    CPL > 0 #UD, RDPMC at CPL > 0 without CR4.PCE and RDTSC(P) at CPL > 0
    with CR4.TSD #GP(0), SGDT/SIDT/SLDT/STR/SMSW at CPL > 0 with CR4.UMIP
    #GP(0), XSETBV without CR4.OSXSAVE #UD.  (VMX instructions are not here: in VMX non-root operation they
    VM-exit before their CPL check, SDM Vol. 3C 31.3.)"""
    if type(ex) is IoExit:
        try:
            check_io_permission(vcpu, ex.port, ex.size)
        except GuestFault as f:
            return f
        return None
    cr4 = vcpu.regs.cr4
    if type(ex) is TrapExit and ex.kind == "xsetbv" and not cr4 & _CR4_OSXSAVE:
        return GuestFault(x86.UD)          # XSETBV: #UD when CR4.OSXSAVE = 0, then the CPL check
    cpl = vcpu.cpl
    if not cpl:
        return None
    if type(ex) in (HltExit, MsrExit, CrExit):
        return _gp0()
    if type(ex) is not TrapExit:
        return None
    kind = ex.kind
    if kind in _CPL0_KINDS:
        return _gp0()
    if kind in ("monitor", "mwait"):
        return GuestFault(x86.UD)
    if kind == "rdpmc":
        return None if cr4 & _CR4_PCE else _gp0()
    if kind in ("rdtsc", "rdtscp"):
        return _gp0() if cr4 & _CR4_TSD else None
    if kind in ("desc", "smsw") and ex.insn is not None:
        m = ex.insn.mnemonic
        if m in _DESC_LOADS or (m in _DESC_STORES and cr4 & _CR4_UMIP):
            return _gp0()
    return None


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


# ---------------------------------------------------------------- fast system calls
_MSR_SYSENTER_CS, _MSR_SYSENTER_ESP, _MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
_MSR_STAR, _MSR_LSTAR, _MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
_FLAT_CODE = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A | x86.DESC_G   # type 11, G=1
_FLAT_DATA = x86.DESC_P | x86.DESC_S | x86.DESC_W | x86.DESC_A | x86.DESC_G | x86.DESC_B   # type 3, B=1, G=1


def emulate_syscall(vcpu, insn_len: int) -> None:
    """SYSCALL (SDM Vol. 2B "SYSCALL—Fast System Call", Operation): #UD unless
    CS.L = 1, IA32_EFER.LMA = 1 and IA32_EFER.SCE = 1 (Intel: not in
    compatibility mode); RCX := RIP of the next instruction, R11 := RFLAGS,
    RFLAGS &= NOT IA32_FMASK, RIP := IA32_LSTAR, CS := IA32_STAR[47:32] AND
    FFFCH and SS := IA32_STAR[47:32] + 8 with fixed flat caches, CPL := 0."""
    r = vcpu.regs
    if not (r.hflags & x86.HF_CS64) or not (r.efer & x86.EFER_LMA) or not (r.efer & x86.EFER_SCE):
        raise GuestFault(x86.UD)
    star = vcpu.read_msr_raw(_MSR_STAR)
    lstar = vcpu.read_msr_raw(_MSR_LSTAR)
    fmask = vcpu.read_msr_raw(_MSR_FMASK) & 0xFFFFFFFF
    sel = (star >> 32) & 0xFFFF
    flags = r.rflags
    vcpu.set_gpr(1, (r.rip + insn_len) & _MASK)
    vcpu.set_gpr(11, flags & ~x86.RFLAGS_RF)
    vcpu.set_rflags(flags & ~fmask & ~x86.RFLAGS_RF)
    vcpu.load_segments({x86.R_CS: (sel & 0xFFFC, 0, 0xFFFFFFFF, _FLAT_CODE | x86.DESC_L),
                        x86.R_SS: ((sel + 8) & 0xFFFF, 0, 0xFFFFFFFF, _FLAT_DATA)},
                       hflags_extra=(x86.HF_INHIBIT_IRQ, 0))
    vcpu.set_rip(lstar)


def emulate_sysenter(vcpu, insn_len: int) -> None:
    """SYSENTER (SDM Vol. 2B "SYSENTER—Fast System Call", Operation): #GP(0)
    if CR0.PE = 0 or IA32_SYSENTER_CS[15:2] = 0; RFLAGS.VM := 0, RFLAGS.IF := 0;
    (R|E)SP := IA32_SYSENTER_ESP, (R|E)IP := IA32_SYSENTER_EIP (low 32 bits
    outside IA-32e mode); CS := IA32_SYSENTER_CS AND FFFCH (L = 1, D = 0 in
    IA-32e mode, else D = 1), SS := CS + 8, flat caches, CPL := 0."""
    r = vcpu.regs
    cs = vcpu.read_msr_raw(_MSR_SYSENTER_CS) & 0xFFFF
    if not (r.cr0 & x86.CR0_PE) or not (cs & 0xFFFC):
        raise GuestFault(x86.GP, 0)
    esp = vcpu.read_msr_raw(_MSR_SYSENTER_ESP)
    eip = vcpu.read_msr_raw(_MSR_SYSENTER_EIP)
    ia32e = bool(r.efer & x86.EFER_LMA)
    if not ia32e:
        esp, eip = esp & 0xFFFFFFFF, eip & 0xFFFFFFFF
    vcpu.set_rflags(r.rflags & ~(x86.RFLAGS_VM | x86.RFLAGS_IF | x86.RFLAGS_RF))
    code = _FLAT_CODE | (x86.DESC_L if ia32e else x86.DESC_B)
    vcpu.load_segments({x86.R_CS: (cs & 0xFFFC, 0, 0xFFFFFFFF, code),
                        x86.R_SS: (((cs & 0xFFFC) + 8) & 0xFFFF, 0, 0xFFFFFFFF, _FLAT_DATA)},
                       hflags_extra=(x86.HF_INHIBIT_IRQ, 0))
    vcpu.set_gpr(4, esp)
    vcpu.set_rip(eip)


# ---------------------------------------------------------------- RDPMC
def emulate_rdpmc(vcpu, insn_len: int) -> None:
    """RDPMC (SDM Vol. 2B "RDPMC—Read Performance-Monitoring Counters"):
    "#GP(0) If the current privilege level is not 0 and the PCE flag in the
    CR4 register is clear.  If an invalid performance counter index is
    specified in ECX."  The CPU model has no performance counters
    (CPUID.0AH is not reported: architectural PMU version 0), so every index
    is invalid: RDPMC always raises #GP(0) -- never #UD."""
    raise _gp0()


# ---------------------------------------------------------------- descriptor-table instructions
def _desc_operand(vcpu, insn):
    """(memory linear address or None, capstone operand) of LGDT/SGDT/LLDT...."""
    from .decode import mem_operand_address
    op = insn.operands[0]
    if op.type == C.X86_OP_MEM:
        return mem_operand_address(vcpu, insn, op), op
    return None, op


def _opsize(vcpu, insn) -> int:
    """Operand size in bytes (2, 4 or 8) from the mode, 66H and REX.W."""
    bits = vcpu.mode_bits
    size = 2 if bits == 16 else 4
    if insn.prefix[2] == 0x66:
        size = 4 if bits == 16 else 2
    if bits == 64 and insn.rex & 8:
        size = 8
    return size


def emulate_desc(vcpu, insn, insn_len: int) -> None:
    """LGDT, LIDT, SGDT, SIDT, LLDT, LTR, SLDT, STR (SDM Vol. 2A/2B, the
    instructions' Operation and Exceptions sections).  Emulated because
    Unicorn omits checks hardware makes: in 64-bit mode LGDT/LIDT raise
    #GP(0) for a non-canonical base ("If the memory address is in a
    non-canonical form" covers the descriptor-table base loaded, Vol. 3A
    2.4.1: "the base address must be in canonical form"), LLDT/LTR raise
    #GP(selector) for a 16-byte system descriptor whose base is not
    canonical.  Checks in SDM order: #UD (LLDT/LTR/SLDT/STR in real mode or
    virtual-8086 mode), #GP(0) for CPL > 0 (the loads), then the descriptor."""
    r = vcpu.regs
    mn = insn.mnemonic
    addr, op = _desc_operand(vcpu, insn)
    bits = vcpu.mode_bits
    protected = bool(r.cr0 & x86.CR0_PE) and not (r.rflags & x86.RFLAGS_VM)
    if mn in ("sgdt", "sidt"):
        base, limit = (r.gdtr_base, r.gdtr_limit) if mn == "sgdt" else (r.idtr_base, r.idtr_limit)
        n = 8 if bits == 64 else 4
        vcpu.write_linear((addr or 0) & _MASK, (limit & 0xFFFF).to_bytes(2, "little")
                          + (base & ((1 << (8 * n)) - 1)).to_bytes(n, "little"))
        vcpu.skip(insn_len)
        return
    if mn in ("lgdt", "lidt"):
        _require_cpl0(vcpu)
        limit = vcpu.read_linear_int(addr & _MASK, 2)
        if bits == 64:
            base = vcpu.read_linear_int((addr + 2) & _MASK, 8)
            if not x86.canonical(base):
                raise _gp0()
        else:
            base = vcpu.read_linear_int((addr + 2) & _MASK, 4)
            if _opsize(vcpu, insn) == 2:
                base &= 0xFFFFFF
        if mn == "lgdt":
            vcpu.set_descriptor_tables(gdtr=(base, limit))
        else:
            vcpu.set_descriptor_tables(idtr=(base, limit))
        vcpu.skip(insn_len)
        return
    if not protected:
        raise GuestFault(x86.UD)
    if mn in ("sldt", "str"):
        sel = (r.ldtr if mn == "sldt" else r.tr).selector & 0xFFFF
        if addr is not None:
            vcpu.write_linear_int(addr & _MASK, 2, sel)
        else:
            from .decode import set_reg_value
            set_reg_value(vcpu, op.reg, sel)     # zero-extends 32/64-bit registers
        vcpu.skip(insn_len)
        return
    _require_cpl0(vcpu)
    if addr is not None:
        sel = vcpu.read_linear_int(addr & _MASK, 2)
    else:
        from .decode import reg_value
        sel = reg_value(vcpu, op.reg) & 0xFFFF
    ia32e = bool(r.efer & x86.EFER_LMA)
    if sel & 0xFFFC == 0:
        if mn == "ltr":
            raise _gp0()                       # LTR: "IF segment selector is NULL THEN #GP(0)"
        vcpu.load_segments({6: (sel, 0, 0, 0)})  # LLDT with a NULL selector: LDTR invalid
        vcpu.skip(insn_len)
        return
    err = sel & 0xFFFC
    size = 16 if ia32e else 8
    idx = sel & 0xFFF8
    if sel & 4 or idx + size - 1 > r.gdtr_limit:
        raise GuestFault(x86.GP, err)
    raw = vcpu.read_linear((r.gdtr_base + idx) & _MASK, size, implicit=True)
    lo, hi = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
    dtype = (hi >> 8) & 0x1F                    # S = 0 and the system type
    want = (0x02,) if mn == "lldt" else ((0x09,) if ia32e else (0x01, 0x09))
    if dtype not in want:
        raise GuestFault(x86.GP, err)
    if ia32e and (int.from_bytes(raw[12:16], "little") >> 8) & 0x1F:
        raise GuestFault(x86.GP, err)           # upper half's type field must be 0
    if not (hi & x86.DESC_P):
        raise GuestFault(x86.NP, err)
    base, limit, flags = x86.desc_to_cache(lo, hi)
    if ia32e:
        base |= int.from_bytes(raw[8:12], "little") << 32
        if not x86.canonical(base):
            raise GuestFault(x86.GP, err)
    if mn == "ltr":
        # Mark the TSS busy (type 1 -> 3, 9 -> B) in the GDT (a locked RMW on hardware).
        hi |= 0x200
        vcpu.write_linear_int((r.gdtr_base + idx + 4) & _MASK, 4, hi, implicit=True)
        vcpu.load_segments({7: (sel, base, limit, flags | 0x200)})
    else:
        vcpu.load_segments({6: (sel, base, limit, flags)})
    vcpu.skip(insn_len)

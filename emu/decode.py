"""Instruction decoding at exits: which address faulted, what an MMIO access or
a trapped instruction is.  Runs only at exits (Python off the hot path)."""
from __future__ import annotations

from functools import lru_cache

from capstone import CS_AC_READ, CS_AC_WRITE
from capstone import x86_const as C

from . import x86
from .exits import CrExit, HltExit, IoExit, MmioExit, MsrExit, TrapExit, InternalErrorExit

_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@lru_cache(maxsize=None)
def _reg_table():
    """capstone register id -> (gpr index, size, high-byte) for general registers."""
    from capstone import Cs, CS_ARCH_X86, CS_MODE_64
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    names = {}
    legacy = {"rax": ("eax", "ax", "al", "ah"), "rcx": ("ecx", "cx", "cl", "ch"),
              "rdx": ("edx", "dx", "dl", "dh"), "rbx": ("ebx", "bx", "bl", "bh"),
              "rsp": ("esp", "sp", "spl", None), "rbp": ("ebp", "bp", "bpl", None),
              "rsi": ("esi", "si", "sil", None), "rdi": ("edi", "di", "dil", None)}
    for i, r64 in enumerate(_GPR64):
        names[r64] = (i, 8, False)
        if r64 in legacy:
            e, w, b, h = legacy[r64]
            names[e], names[w], names[b] = (i, 4, False), (i, 2, False), (i, 1, False)
            if h:
                names[h] = (i, 1, True)
        else:
            names[r64 + "d"], names[r64 + "w"], names[r64 + "b"] = (i, 4, False), (i, 2, False), (i, 1, False)
    table = {}
    for rid in range(1, 300):
        n = md.reg_name(rid)
        if n in names:
            table[rid] = names[n]
    return table


def reg_value(vcpu, rid: int) -> int:
    t = _reg_table().get(rid)
    if t is None:
        from capstone import Cs, CS_ARCH_X86, CS_MODE_64
        name = Cs(CS_ARCH_X86, CS_MODE_64).reg_name(rid)
        if name in ("rip", "eip", "ip"):
            return vcpu.regs.rip
        raise KeyError(name)
    i, size, high = t
    v = vcpu.regs.gpr[i]
    if high:
        return (v >> 8) & 0xFF
    return v & ((1 << (8 * size)) - 1)


def set_reg_value(vcpu, rid: int, value: int) -> None:
    i, size, high = _reg_table()[rid]
    if high:
        old = vcpu.regs.gpr[i]
        vcpu.regs.gpr[i] = (old & ~0xFF00) | ((value & 0xFF) << 8)
        vcpu.set_gpr(i, vcpu.regs.gpr[i], 8)
    else:
        vcpu.set_gpr(i, value, size)


_SEG_OF = {C.X86_REG_ES: x86.R_ES, C.X86_REG_CS: x86.R_CS, C.X86_REG_SS: x86.R_SS,
           C.X86_REG_DS: x86.R_DS, C.X86_REG_FS: x86.R_FS, C.X86_REG_GS: x86.R_GS}
_STACK_BASES = {C.X86_REG_RSP, C.X86_REG_ESP, C.X86_REG_SP, C.X86_REG_RBP, C.X86_REG_EBP, C.X86_REG_BP}


def mem_operand_address(vcpu, insn, op) -> int:
    """Linear address of a capstone memory operand."""
    m = op.mem
    r = vcpu.regs
    ea = m.disp
    if m.base in (C.X86_REG_RIP, C.X86_REG_EIP):
        ea += r.rip + insn.size
    elif m.base:
        ea += reg_value(vcpu, m.base)
    if m.index:
        ea += reg_value(vcpu, m.index) * m.scale
    asize = insn.addr_size
    ea &= (1 << (8 * asize)) - 1
    seg = _SEG_OF.get(m.segment)
    if seg is None:
        seg = x86.R_SS if m.base in _STACK_BASES else x86.R_DS
    if r.hflags & x86.HF_CS64:
        base = r.seg[seg].base if seg in (x86.R_FS, x86.R_GS) else 0
        return (base + ea) & 0xFFFFFFFFFFFFFFFF
    return (r.seg[seg].base + ea) & 0xFFFFFFFF


def _stack_addr(vcpu, delta: int) -> int:
    r = vcpu.regs
    if r.hflags & x86.HF_CS64:
        return (r.gpr[4] + delta) & 0xFFFFFFFFFFFFFFFF
    sp = r.gpr[4] if r.hflags & x86.HF_SS32 else r.gpr[4] & 0xFFFF
    mask = 0xFFFFFFFF if r.hflags & x86.HF_SS32 else 0xFFFF
    return (r.seg[x86.R_SS].base + ((sp + delta) & mask)) & 0xFFFFFFFF


def _candidate_accesses(vcpu, insn):
    """(linear address, size) pairs an instruction may touch in memory."""
    out = []
    for op in insn.operands:
        if op.type == C.X86_OP_MEM and insn.mnemonic not in ("lea", "nop") and not insn.mnemonic.startswith("prefetch"):
            try:
                out.append((mem_operand_address(vcpu, insn, op), max(op.size, 1)))
            except KeyError:
                pass
    mn = insn.mnemonic
    osz = 8 if vcpu.regs.hflags & x86.HF_CS64 else (4 if vcpu.regs.hflags & x86.HF_CS32 else 2)
    if mn.startswith(("push", "call", "enter", "int")):
        out.append((_stack_addr(vcpu, -osz), osz))
    if mn.startswith(("pop", "ret", "leave", "iret")):
        out.append((_stack_addr(vcpu, 0), osz))
    r = vcpu.regs
    a_mask = (1 << (8 * insn.addr_size)) - 1
    if mn.split()[-1][:4] in ("movs", "cmps", "lods", "outs") or mn.startswith(("rep movs", "rep outs")):
        base = 0 if r.hflags & x86.HF_CS64 else r.seg[x86.R_DS].base
        out.append(((base + (r.gpr[6] & a_mask)) & 0xFFFFFFFFFFFFFFFF, 8))
    if mn.split()[-1][:4] in ("movs", "stos", "cmps", "scas", "ins") or mn.split()[-1][:3] == "ins":
        base = 0 if r.hflags & x86.HF_CS64 else r.seg[x86.R_ES].base
        out.append(((base + (r.gpr[7] & a_mask)) & 0xFFFFFFFFFFFFFFFF, 8))
    return out


def fault_address(vcpu, vpage: int, access: int) -> int:
    """The exact faulting linear address (CR2) for a failed fill of ``vpage``.
    Unicorn only reports the page; the instruction at RIP tells the byte."""
    lin = vcpu.linear_rip()
    if access & 16:  # instruction fetch
        return lin if (lin & ~0xFFF) == vpage else vpage
    insn = vcpu.fetch_insn(lin)
    if insn is None:
        return vpage
    for addr, size in _candidate_accesses(vcpu, insn):
        if (addr & ~0xFFF) == vpage:
            return addr
        if addr < vpage <= addr + size - 1:
            return vpage
    return vpage


def noncanonical_vector(vcpu) -> int:
    """#SS for a non-canonical stack reference (RSP/RBP-based or an implicit
    push/pop), #GP for everything else (SDM Vol. 3A 6.15, #SS and #GP)."""
    insn = vcpu.fetch_insn()
    if insn is None:
        return x86.GP
    if insn.mnemonic.startswith(("push", "pop", "call", "ret", "enter", "leave")):
        return x86.SS
    for op in insn.operands:
        if op.type == C.X86_OP_MEM and (op.mem.base in _STACK_BASES or op.mem.segment == C.X86_REG_SS):
            return x86.SS
    return x86.GP


def mmio_access(vcpu, vpage: int, ppage: int, access: int):
    """Decode a load/store that hit a non-RAM physical page into an MmioExit."""
    r = vcpu.regs
    if access & 16:
        return InternalErrorExit(rip=r.rip, message=f"instruction fetch from non-RAM physical address {ppage:#x}")
    insn = vcpu.fetch_insn()
    if insn is None:
        return InternalErrorExit(rip=r.rip, message="undecodable instruction accessing MMIO")
    mem = [op for op in insn.operands if op.type == C.X86_OP_MEM]
    if len(mem) != 1:
        return InternalErrorExit(
            rip=r.rip, message=f"unsupported instruction on MMIO at {ppage:#x}: {insn.mnemonic} {insn.op_str}")
    op = mem[0]
    gla = mem_operand_address(vcpu, insn, op)
    gpa = ppage | (gla & 0xFFF)
    if (gla & 0xFFF) + op.size > 4096:
        return InternalErrorExit(rip=r.rip, message=f"MMIO access straddles a page at {gpa:#x}")
    simple = insn.mnemonic in ("mov", "movzx", "movsx", "movsxd", "movabs") and all(
        o.type != C.X86_OP_REG or o.reg in _reg_table() for o in insn.operands)
    if not simple:
        # Any other instruction (ALU, TEST, XCHG, MOV to/from a segment
        # register...): the device value is read if the instruction reads the
        # operand, then the instruction is replayed.
        acc = op.access
        return MmioExit(rip=r.rip, insn_len=insn.size, gpa=gpa, gla=gla, size=op.size,
                        is_write=bool(acc & CS_AC_WRITE) if acc else bool(access & 2),
                        needs_read=bool(acc & CS_AC_READ) if acc else not (access & 2),
                        insn=insn, replay=True)
    is_write = bool(access & 2)
    value = 0
    if is_write:
        src = insn.operands[1]
        value = src.imm if src.type == C.X86_OP_IMM else reg_value(vcpu, src.reg)
        value &= (1 << (8 * op.size)) - 1
    return MmioExit(rip=r.rip, insn_len=insn.size, gpa=gpa, gla=gla, size=op.size,
                    is_write=is_write, value=value, insn=insn)


_TRAP_BY_MNEMONIC = {
    "invlpg": "invlpg", "lgdt": "desc", "lidt": "desc", "sgdt": "desc", "sidt": "desc",
    "lldt": "desc", "ltr": "desc", "sldt": "desc", "str": "desc", "smsw": "smsw",
    "wbinvd": "wbinvd", "invd": "invd", "xsetbv": "xsetbv", "mwait": "mwait", "monitor": "monitor",
    "pause": "pause", "rdpmc": "rdpmc", "rdrand": "rdrand", "rdseed": "rdseed", "cpuid": "cpuid",
    "rdtsc": "rdtsc", "rdtscp": "rdtscp", "vmcall": "vmx", "vmlaunch": "vmx", "vmresume": "vmx",
    "vmxoff": "vmx", "vmread": "vmx", "vmwrite": "vmx", "vmptrld": "vmx", "vmptrst": "vmx",
    "vmclear": "vmx", "vmxon": "vmx", "invept": "vmx", "invvpid": "vmx", "getsec": "vmx", "invpcid": "invpcid",
    "int1": "int1", "iret": "iret", "iretd": "iret", "iretq": "iret",
}


def _decode_io(vcpu, code: bytes):
    """Decode IN/OUT/INS/OUTS by hand (SDM Vol. 2 "IN", "OUT", "INS", "OUTS");
    returns the mode-dependent facts as a tuple (cached per site)."""
    mode = vcpu.mode_bits
    opsize = 2 if mode == 16 else 4
    asize = mode // 8 if mode != 16 else 2
    rep = False
    seg = x86.R_DS
    i = 0
    while i < len(code) and i < 14:
        b = code[i]
        if b == 0x66:
            opsize = 4 if mode == 16 else 2
        elif b == 0x67:
            asize = {16: 4, 32: 2, 64: 4}[mode]
        elif b in (0xF2, 0xF3):
            rep = True
        elif b in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65):
            seg = {0x26: x86.R_ES, 0x2E: x86.R_CS, 0x36: x86.R_SS, 0x3E: x86.R_DS, 0x64: x86.R_FS, 0x65: x86.R_GS}[b]
        elif b == 0xF0 or (mode == 64 and 0x40 <= b <= 0x4F):
            pass
        else:
            break
        i += 1
    op = code[i]
    size = 1 if op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E) else opsize
    imm = op in (0xE4, 0xE5, 0xE6, 0xE7)
    port = code[i + 1] if imm else None
    length = i + (2 if imm else 1)
    is_write = op in (0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F)
    string = op in (0x6C, 0x6D, 0x6E, 0x6F)
    return ("io", length, size, is_write, string, rep and string, imm, port, asize, seg, mode)


def _io_exit(vcpu, info) -> IoExit:
    _, length, size, is_write, string, rep, imm, port, asize, seg, mode = info
    r = vcpu.regs
    ex = IoExit(rip=r.rip, insn_len=length, port=port if imm else r.gpr[2] & 0xFFFF, size=size,
                is_write=is_write, string=string, rep=rep, imm=imm, addr_size=asize)
    if not string:
        if is_write:
            ex.values = [r.gpr[0] & ((1 << (8 * size)) - 1)]
        return ex
    amask = (1 << (8 * asize)) - 1
    count = (r.gpr[1] & amask) if rep else 1
    ex.count = min(count, 4096)          # bounded per exit; REP resumes for the rest
    if is_write:
        ex.seg_base = 0 if (mode == 64 and seg not in (x86.R_FS, x86.R_GS)) else r.seg[seg].base
        ex.seg = seg
        ex.gla = (ex.seg_base + (r.gpr[6] & amask)) & 0xFFFFFFFFFFFFFFFF
    else:
        ex.seg_base = 0 if mode == 64 else r.seg[x86.R_ES].base
        ex.seg = x86.R_ES
        ex.gla = (ex.seg_base + (r.gpr[7] & amask)) & 0xFFFFFFFFFFFFFFFF
    return ex


def decode_site(vcpu, lin: int):
    """Decode the instruction at an armed site (the expensive part, cached by
    the vCPU per (linear, physical, page generation, mode)).  None: not an
    instruction of any trap kind."""
    from .cpu import GuestFault
    try:
        code = vcpu.read_linear(lin, 15, implicit=True)
    except GuestFault:
        code = vcpu.read_linear(lin, 4096 - (lin & 0xFFF), implicit=True)
    j = 0
    while j < len(code) and j < 14 and (code[j] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3)
                                        or (vcpu.mode_bits == 64 and 0x40 <= code[j] <= 0x4F)):
        j += 1
    op = code[j] if j < len(code) else 0
    if op in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F):
        return _decode_io(vcpu, code)
    if op == 0xF4:
        return ("hlt", j + 1)
    insn = vcpu.fetch_insn(lin)
    if insn is None:
        return None
    return ("insn", insn)


def site_exit(vcpu, info):
    """The exit value for a decoded site with the current registers, or None if
    its kind is not armed now."""
    kinds = vcpu.trap_kinds
    r = vcpu.regs
    tag = info[0]
    if tag == "io":
        return _io_exit(vcpu, info) if "io" in kinds else None
    if tag == "hlt":
        return HltExit(rip=r.rip, insn_len=info[1]) if "hlt" in kinds else None
    insn = info[1]
    mn = insn.mnemonic
    if mn == "rdmsr" and "rdmsr" in kinds:
        return MsrExit(rip=r.rip, insn_len=insn.size, msr=r.gpr[1] & 0xFFFFFFFF)
    if mn == "wrmsr" and "wrmsr" in kinds:
        return MsrExit(rip=r.rip, insn_len=insn.size, msr=r.gpr[1] & 0xFFFFFFFF, is_write=True,
                       value=((r.gpr[2] & 0xFFFFFFFF) << 32) | (r.gpr[0] & 0xFFFFFFFF))
    if mn == "mov" and len(insn.operands) == 2:
        names = [insn.reg_name(o.reg) if o.type == C.X86_OP_REG else "" for o in insn.operands]
        if names[0].startswith("cr") and "cr_write" in kinds:
            gi = _reg_table()[insn.operands[1].reg][0]
            return CrExit(rip=r.rip, insn_len=insn.size, cr=int(names[0][2:]), access_type=0, gpr=gi,
                          value=r.gpr[gi])
        if names[1].startswith("cr") and "cr_read" in kinds:
            gi = _reg_table()[insn.operands[0].reg][0]
            return CrExit(rip=r.rip, insn_len=insn.size, cr=int(names[1][2:]), access_type=1, gpr=gi)
        if (names[0].startswith("dr") or names[1].startswith("dr")) and "dr" in kinds:
            return TrapExit(rip=r.rip, insn_len=insn.size, kind="dr", insn=insn)
        return None
    if mn == "clts" and "clts" in kinds:
        return CrExit(rip=r.rip, insn_len=insn.size, cr=0, access_type=2)
    if mn == "lmsw" and "lmsw" in kinds:
        o = insn.operands[0]
        if o.type == C.X86_OP_MEM:
            addr = mem_operand_address(vcpu, insn, o)
            return CrExit(rip=r.rip, insn_len=insn.size, cr=0, access_type=3, lmsw_mem=True, lmsw_addr=addr)
        return CrExit(rip=r.rip, insn_len=insn.size, cr=0, access_type=3, value=reg_value(vcpu, o.reg) & 0xFFFF,
                      gpr=_reg_table()[o.reg][0])
    kind = _TRAP_BY_MNEMONIC.get(mn)
    if kind is None or kind not in kinds:
        return None
    operand = None
    if kind == "invlpg":
        operand = mem_operand_address(vcpu, insn, insn.operands[0])
    return TrapExit(rip=r.rip, insn_len=insn.size, kind=kind, insn=insn, operand=operand)

"""Instruction decoding at exits: which address faulted, what an MMIO access or
a trapped instruction is.  Runs only at exits (Python off the hot path).

Whether an instruction at a trap site is one of an armed kind is decided by the
native classifier that placed the site (emu/trapscan.py, ``vmlab_classify``),
never here: Capstone only supplies operands of an instruction already
classified, and a Capstone decode that disagrees is reported, not obeyed."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from capstone import CS_AC_READ, CS_AC_WRITE
from capstone import x86_const as C

from . import trapscan, x86
from .exits import CrExit, ExceptionExit, Exit, HltExit, InternalErrorExit, IoExit, MmioExit, MsrExit, TrapExit, TrapKind

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
    return _operand_address(vcpu, insn.size, insn.addr_size, m.disp, m.base, m.index, m.scale, m.segment)


def _operand_address(vcpu, insn_size: int, asize: int, disp: int, base: int, index: int, scale: int,
                     segment: int) -> int:
    r = vcpu.regs
    ea = disp
    if base in (C.X86_REG_RIP, C.X86_REG_EIP):
        ea += r.rip + insn_size
    elif base:
        ea += reg_value(vcpu, base)
    if index:
        ea += reg_value(vcpu, index) * scale
    ea &= (1 << (8 * asize)) - 1
    seg = _SEG_OF.get(segment)
    if seg is None:
        seg = x86.R_SS if base in _STACK_BASES else x86.R_DS
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


_MMIO_PLANS: dict = {}
"""Plain MOV accesses to MMIO decoded before, by (mode, the 15 bytes at
RIP): the Capstone instruction and its operand facts, so a device's hot
register (a virtio QueueNotify, an interrupt acknowledge) costs no Capstone
decode.  The bytes are read again at every access, so rewritten code misses."""
_MMIO_PLANS_MAX = 4096
_GuestFault = None


def mmio_access(vcpu, vpage: int, ppage: int, access: int):
    """Decode a load/store that hit a non-RAM physical page into an MmioExit."""
    r = vcpu.regs
    if access & 16:
        # Unbacked physical memory reads as all ones on a PC (open bus), and
        # FF FF is FF /7, which is reserved: the CPU raises #UD at that
        # address (SDM Vol. 2 Appendix A, Table A-6, group 5).  A fetch from a
        # device window is treated the same way.
        return ExceptionExit(rip=r.rip, vector=6)
    global _GuestFault
    if _GuestFault is None:
        from .cpu import GuestFault as _GuestFault     # (emu.cpu imports this module)
    try:
        key = (vcpu.mode_bits, vcpu.read_linear(vcpu.linear_rip(), 15, implicit=True))
    except _GuestFault:
        key = None
    plan = _MMIO_PLANS.get(key) if key is not None else None
    if plan is not None:
        insn, size, addr, src = plan
        gla = _operand_address(vcpu, insn.size, *addr)
        if (gla & ~0xFFF) == (vpage & ~0xFFF) and (gla & 0xFFF) + size <= 4096:
            is_write = bool(access & 2)
            value = 0
            if is_write:
                value = (src[1] if src[0] else reg_value(vcpu, src[1])) & ((1 << (8 * size)) - 1)
            return MmioExit(rip=r.rip, insn_len=insn.size, gpa=ppage | (gla & 0xFFF), gla=gla, size=size,
                            is_write=is_write, value=value, insn=insn)
    insn = vcpu.fetch_insn()
    if insn is None:
        return InternalErrorExit(rip=r.rip, message="undecodable instruction accessing MMIO")
    from .strmmio import is_string
    if is_string(insn):
        # MOVS/CMPS (two memory operands), or any string instruction with REP.
        return MmioExit(rip=r.rip, insn_len=insn.size, gpa=ppage, gla=vpage, is_write=bool(access & 2),
                        insn=insn, string=True)
    mem = [op for op in insn.operands if op.type == C.X86_OP_MEM
           and insn.mnemonic not in ("lea", "nop") and not insn.mnemonic.startswith("prefetch")]
    gla = mem_operand_address(vcpu, insn, mem[0]) if len(mem) == 1 else None
    if gla is None or (gla & ~0xFFF) != (vpage & ~0xFFF) or (gla & 0xFFF) + mem[0].size > 4096:
        # The access is not (only) the instruction's one memory operand: a
        # descriptor-table read, a stack push, an operand straddling into the
        # page.  Replayed with the page as open bus (all ones, writes dropped).
        return MmioExit(rip=r.rip, insn_len=insn.size, gpa=ppage & ~0xFFF, gla=vpage & ~0xFFF,
                        is_write=bool(access & 2), insn=insn, implicit=True)
    op = mem[0]
    gpa = ppage | (gla & 0xFFF)
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
    if key is not None and len(_MMIO_PLANS) < _MMIO_PLANS_MAX and len(insn.operands) == 2:
        src = insn.operands[1]
        m = op.mem
        _MMIO_PLANS[key] = (insn, op.size, (insn.addr_size, m.disp, m.base, m.index, m.scale, m.segment),
                            (True, src.imm) if src.type == C.X86_OP_IMM else (False, src.reg))
    return MmioExit(rip=r.rip, insn_len=insn.size, gpa=gpa, gla=gla, size=op.size,
                    is_write=is_write, value=value, insn=insn)


# ---------------------------------------------------------------- trap sites
#: Capstone mnemonics (last word, after any "rep"/"lock") of each trap kind.
#: They never decide the kind -- the C classifier does (emu/trapscan.py) --
#: they only check that Capstone decoded the same instruction before its
#: operands are used.
_MNEMONICS = {
    "rdmsr": {"rdmsr"}, "wrmsr": {"wrmsr"}, "cr_read": {"mov"}, "cr_write": {"mov"}, "clts": {"clts"},
    "lmsw": {"lmsw"}, "invlpg": {"invlpg"}, "hlt": {"hlt"},
    "io": {"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"},
    "cpuid": {"cpuid"}, "rdtsc": {"rdtsc"}, "rdtscp": {"rdtscp"}, "rdpmc": {"rdpmc"},
    "wbinvd": {"wbinvd", "wbnoinvd"}, "invd": {"invd"}, "xsetbv": {"xsetbv"}, "mwait": {"mwait"},
    "monitor": {"monitor"}, "pause": {"pause"}, "dr": {"mov"},
    "desc": {"sgdt", "sidt", "lgdt", "lidt", "sldt", "str", "lldt", "ltr"},
    "rdrand": {"rdrand"}, "rdseed": {"rdseed"},
    "vmx": {"vmcall", "vmlaunch", "vmresume", "vmxoff", "vmread", "vmwrite", "vmptrld", "vmptrst", "vmclear",
            "vmxon", "invept", "invvpid", "getsec"},
    "invpcid": {"invpcid"}, "smsw": {"smsw"}, "int1": {"int1"}, "iret": {"iret", "iretd", "iretq"},
    "task": {"ljmp", "lcall", "jmp", "call"},     # far JMP/CALL (Capstone spells FF /3, FF /5 so)
}
#: kinds whose exit carries operands that only the Capstone decode gives
#: (LMSW with a memory operand too)
_NEEDS_INSN = frozenset({"dr", "invlpg", "desc", "smsw", "vmx", "rdrand", "rdseed", "invpcid"})


@dataclass(frozen=True, slots=True)
class TrapSite:
    """A decoded trap site (cached by the vCPU per linear address, physical
    address, page generation and mode).  ``kind`` and ``length`` are the C
    classifier's; ``insn`` is Capstone's decode when it is the same
    instruction (None otherwise); ``invalid`` marks encodings that raise #UD
    (LOCK, VEX); ``problem`` says why the operands cannot be decoded."""
    kind: str
    length: int
    modrm: int = 0
    rex: int = 0
    insn: Any = None
    io: tuple | None = None
    invalid: bool = False
    problem: str | None = None


def _decode_0f38_in_16bit_code(code: bytes, c, rip: int):
    """Capstone 5 does not decode INVEPT/INVVPID/INVPCID (66 0F 38 8x) in
    16-bit code.  The same instruction in 32-bit code with the address-size
    prefix flipped has the same operands (the register operand is 32 bits in
    both); returned with ``size`` fixed up to the 16-bit encoding's length."""
    from .cpu import _cs
    prefixes = bytes(b for b in code[:c.nprefix] if b != 0x67)
    alt = prefixes + code[c.nprefix:] if c.prefixes & trapscan.PFX_ADSIZE else b"\x67" + code
    insn = next(_cs(32).disasm(alt, rip), None)
    if insn is None or insn.size != len(alt):
        return None
    return _Resized(insn, len(code))


class _Resized:
    """A Capstone instruction seen through another encoding length."""

    def __init__(self, insn, size: int):
        self._insn, self.size = insn, size

    def __getattr__(self, name):
        return getattr(self._insn, name)


def _capstone_agrees(kind: str, insn, length: int) -> bool:
    if insn is None or insn.size != length or insn.mnemonic.split()[-1] not in _MNEMONICS[kind]:
        return False
    if kind in ("cr_read", "cr_write", "dr"):
        prefix = "cr" if kind != "dr" else "dr"
        return any(o.type == C.X86_OP_REG and insn.reg_name(o.reg).startswith(prefix) for o in insn.operands)
    return True


def _io_facts(mode: int, code: bytes, c) -> tuple:
    """IN/OUT/INS/OUTS operands (SDM Vol. 2 "IN", "OUT", "INS", "OUTS") from
    the classifier's prefix facts."""
    opsize = 2 if mode == 16 else 4
    if c.prefixes & trapscan.PFX_OPSIZE:
        opsize = 4 if mode == 16 else 2
    asize = {16: 2, 32: 4, 64: 8}[mode]
    if c.prefixes & trapscan.PFX_ADSIZE:
        asize = {16: 4, 32: 2, 64: 4}[mode]
    rep = bool(c.prefixes & (trapscan.PFX_REP | trapscan.PFX_REPNE))
    seg = x86.R_DS if c.seg == trapscan.NO_SEG else c.seg
    op = c.opcode
    size = 1 if op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E) else opsize
    imm = op in (0xE4, 0xE5, 0xE6, 0xE7)
    port = code[c.length - 1] if imm else None
    is_write = op in (0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F)
    string = op in (0x6C, 0x6D, 0x6E, 0x6F)
    return (c.length, size, is_write, string, rep and string, imm, port, asize, seg, mode)


def _io_exit(vcpu, info) -> IoExit:
    length, size, is_write, string, rep, imm, port, asize, seg, mode = info
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


def decode_site(vcpu, lin: int) -> TrapSite | None:
    """Decode the instruction at an armed site: the kind and length from the
    native classifier (the one that placed the site), operands from the bytes
    or from Capstone.  None: not an instruction of any trap kind (the site is
    stale) -- also when its bytes cannot be read any more."""
    from .cpu import EptFault, GuestFault, _cs
    try:
        code = vcpu.read_code(lin, 15)
    except (GuestFault, EptFault):
        try:   # the instruction may end before an unreadable page
            code = vcpu.read_code(lin, 4096 - (lin & 0xFFF))[:15]
        except (GuestFault, EptFault):
            return None
    mode = vcpu.mode_bits
    c = trapscan.classify_native(code, mode)
    if c.kind_name is None:
        return None
    kind = TrapKind(c.kind_name)
    invalid = bool(c.prefixes & (trapscan.PFX_LOCK | trapscan.PFX_VEX))
    if invalid:
        return TrapSite(kind, c.length, invalid=True)
    if kind == "io":
        return TrapSite(kind, c.length, io=_io_facts(mode, code, c))
    insn = next(_cs(mode).disasm(code[:c.length], vcpu.regs.rip), None)
    if insn is None and mode == 16 and c.opmap == trapscan.MAP_0F38:
        insn = _decode_0f38_in_16bit_code(code[:c.length], c, vcpu.regs.rip)
    if not _capstone_agrees(kind, insn, c.length):
        problem = None
        needs = kind in _NEEDS_INSN or (kind == "lmsw" and c.modrm >> 6 != 3)
        if needs:
            what = f"{insn.mnemonic} {insn.op_str} ({insn.size} bytes)" if insn is not None else "nothing"
            problem = (f"trap site {code[:c.length].hex()} at {lin:#x}: the classifier says {kind} "
                       f"({c.length} bytes), Capstone decodes {what}")
        insn = None
        if needs:
            return TrapSite(kind, c.length, c.modrm, c.rex, problem=problem)
    return TrapSite(kind, c.length, c.modrm, c.rex, insn=insn)


def site_exit(vcpu, site: TrapSite) -> Exit | None:
    """The exit value for a decoded site with the current registers, or None if
    its kind is not armed now."""
    kind = site.kind
    if kind not in vcpu.trap_kinds:
        return None
    r = vcpu.regs
    length = site.length
    if site.invalid:
        # A LOCK prefix (SDM Vol. 2A "LOCK") or a VEX prefix on a legacy
        # instruction: #UD, which has priority over any VM exit.
        return ExceptionExit(rip=r.rip, vector=x86.UD)
    if site.problem is not None:
        return InternalErrorExit(rip=r.rip, message=site.problem)
    if kind == "io":
        return _io_exit(vcpu, site.io)
    if kind == "hlt":
        return HltExit(rip=r.rip, insn_len=length)
    if kind == "rdmsr":
        return MsrExit(rip=r.rip, insn_len=length, msr=r.gpr[1] & 0xFFFFFFFF)
    if kind == "wrmsr":
        return MsrExit(rip=r.rip, insn_len=length, msr=r.gpr[1] & 0xFFFFFFFF, is_write=True,
                       value=((r.gpr[2] & 0xFFFFFFFF) << 32) | (r.gpr[0] & 0xFFFFFFFF))
    modrm, rex = site.modrm, site.rex
    if kind in ("cr_read", "cr_write"):
        # MOV CR: ModRM.reg (+ REX.R) is the CR, ModRM.rm (+ REX.B) the GPR (SDM Vol. 2B MOV).
        cr = ((rex >> 2) & 1) << 3 | (modrm >> 3) & 7
        gi = (rex & 1) << 3 | modrm & 7
        if kind == "cr_write":
            return CrExit(rip=r.rip, insn_len=length, cr=cr, access_type=0, gpr=gi, value=r.gpr[gi])
        return CrExit(rip=r.rip, insn_len=length, cr=cr, access_type=1, gpr=gi)
    if kind == "clts":
        return CrExit(rip=r.rip, insn_len=length, cr=0, access_type=2)
    if kind == "lmsw":
        if modrm >> 6 == 3:
            gi = (rex & 1) << 3 | modrm & 7
            return CrExit(rip=r.rip, insn_len=length, cr=0, access_type=3, value=r.gpr[gi] & 0xFFFF, gpr=gi)
        addr = mem_operand_address(vcpu, site.insn, site.insn.operands[0])
        return CrExit(rip=r.rip, insn_len=length, cr=0, access_type=3, lmsw_mem=True, lmsw_addr=addr)
    operand = None
    if kind == "invlpg":
        operand = mem_operand_address(vcpu, site.insn, site.insn.operands[0])
    return TrapExit(rip=r.rip, insn_len=length, kind=kind, insn=site.insn, operand=operand)

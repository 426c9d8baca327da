"""The trap-site classifier: one opcode table, a C matcher, a Python twin.

A trap site is an instruction vmlab stops *before* (native/hooks.c arms a
one-address code hook on it): RDMSR, WRMSR, MOV CR, HLT, IN/OUT... -- the
kinds ``VMLAB_TRAP_*`` of native/vmlab.h.  Which byte strings are such an
instruction is decided by :data:`FORMS` below and nowhere else:

* ``python -m vmlab.emu.trapscan --write`` turns FORMS into native/trap_table.h,
  which native/hooks.c compiles into ``vmlab_classify`` (one instruction) and
  ``vmlab_block_sites`` (the instruction starts of one block);
* :func:`classify` and :func:`block_sites` here are their pure-Python twins, with
  the same arguments and the same results (tests/unit/test_trapscan.py runs
  both on random bytes and compares them field by field);
* at a stop, emu/decode.py asks the C classifier (``classify_native``) what the
  instruction is; Capstone only supplies operands once the kind is decided.

The encodings come from the SDM opcode maps (Vol. 2, Appendix A: Table A-2
one-byte map, Table A-3 two-byte map (0F xx), Table A-4 three-byte map
(0F 38 xx), Table A-6 opcode extensions by ModRM.reg, including the
ModRM.mod = 11B rows of group 7) and the instruction pages' opcode columns for
the mandatory prefixes (NP: no 66/F2/F3 allowed; NFx: no F2/F3 allowed).

Decoding rules shared by both matchers:

* prefixes are the legacy ones (F0 F2 F3 2E 36 3E 26 64 65 66 67) and, in
  64-bit mode, REX (40-4F).  A REX byte counts only when it is the last prefix
  before the opcode (SDM Vol. 2A 2.2.1: otherwise it is ignored);
* the mandatory-prefix class is the last F2/F3 if any, else 66 if present,
  else none (an F2/F3 that selects an instruction wins over 66, which is then
  an operand-size prefix);
* an instruction longer than 15 bytes is not a trap site (#GP, SDM Vol. 2A
  2.3.11);
* only the bytes that decide the kind and the length are needed (prefixes,
  opcode, ModRM, SIB); displacement and immediate bytes need not be present.
  When the bytes run out earlier the answer is *truncated*, with the mask of
  the kinds the instruction may still turn out to be.

Sites are armed per block, at the block's first run (native/hooks.c
``block_icount``): Capstone gives the instruction starts of the bytes the block
covers, and ``block_sites`` classifies each in the mode the block runs in.
Only real instruction starts become sites (Unicorn walks its list of code
hooks for every instruction it translates, so the list must stay short).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

#: Trap kinds in bit order (native/vmlab.h ``VMLAB_TRAP_*``, emu.cpu.TRAP_KINDS).
KIND_NAMES = (
    "rdmsr", "wrmsr", "cr_read", "cr_write", "clts", "lmsw", "invlpg", "hlt", "io", "cpuid", "rdtsc",
    "rdtscp", "rdpmc", "wbinvd", "invd", "xsetbv", "mwait", "monitor", "pause", "dr", "desc", "rdrand",
    "rdseed", "vmx", "invpcid", "smsw", "int1", "iret", "task",
)
KIND_BIT = {n: i for i, n in enumerate(KIND_NAMES)}

# Opcode maps.
MAP_1, MAP_0F, MAP_0F38 = 0, 1, 2
# Mandatory-prefix classes a form accepts (bit per class).
P_NONE, P_66, P_F3, P_F2 = 1, 2, 4, 8
P_ANY = P_NONE | P_66 | P_F3 | P_F2
NP = P_NONE                 # "NP" in the opcode column
NFX = P_NONE | P_66         # "NFx" in the opcode column
# ModRM use.
NO_MODRM, MODRM, MODRM_REG = 0, 1, 2   # MODRM_REG: mod bits ignored, register operand (MOV CR/DR)
# ModRM.mod constraint.
MOD_ANY, MOD_MEM, MOD_REG = 0, 1, 2
ANY = 0xFF                  # ModRM.reg / ModRM.rm: any value
# Form flags.
F_NO_REX_B = 1              # not with REX.B (90 with REX.B is XCHG r8, rAX)
F_IMM_PTR = 2               # a ptr16:16/ptr16:32 immediate: 4 bytes with 16-bit operands, else 6


@dataclass(frozen=True)
class Form:
    """One encoding of a trapped instruction."""
    kind: str
    map: int
    op: int
    pfx: int = P_ANY
    modrm: int = NO_MODRM
    mod: int = MOD_ANY
    reg: int = ANY
    rm: int = ANY
    imm: int = 0
    flags: int = 0
    sdm: str = ""


def _g(kind, map_, op, reg, mod, *, rm=ANY, pfx=P_ANY, sdm=""):
    return Form(kind, map_, op, pfx=pfx, modrm=MODRM, mod=mod, reg=reg, rm=rm, sdm=sdm)


#: Every trapped encoding (SDM Vol. 2 Appendix A).  Forms of one (map, opcode)
#: never overlap (checked by ``_check_forms``), so their order does not matter.
FORMS: tuple[Form, ...] = (
    # ---- one-byte map, Table A-2
    Form("hlt", MAP_1, 0xF4, sdm="A-2 F4: HLT"),
    Form("io", MAP_1, 0xE4, imm=1, sdm="A-2 E4: IN AL, Ib"),
    Form("io", MAP_1, 0xE5, imm=1, sdm="A-2 E5: IN eAX, Ib"),
    Form("io", MAP_1, 0xE6, imm=1, sdm="A-2 E6: OUT Ib, AL"),
    Form("io", MAP_1, 0xE7, imm=1, sdm="A-2 E7: OUT Ib, eAX"),
    Form("io", MAP_1, 0xEC, sdm="A-2 EC: IN AL, DX"),
    Form("io", MAP_1, 0xED, sdm="A-2 ED: IN eAX, DX"),
    Form("io", MAP_1, 0xEE, sdm="A-2 EE: OUT DX, AL"),
    Form("io", MAP_1, 0xEF, sdm="A-2 EF: OUT DX, eAX"),
    Form("io", MAP_1, 0x6C, sdm="A-2 6C: INS Yb, DX"),
    Form("io", MAP_1, 0x6D, sdm="A-2 6D: INS Yz, DX"),
    Form("io", MAP_1, 0x6E, sdm="A-2 6E: OUTS DX, Xb"),
    Form("io", MAP_1, 0x6F, sdm="A-2 6F: OUTS DX, Xz"),
    Form("int1", MAP_1, 0xF1, sdm="A-2 F1: INT1 (ICEBP)"),
    Form("iret", MAP_1, 0xCF, sdm="A-2 CF: IRET/IRETD/IRETQ"),
    Form("pause", MAP_1, 0x90, pfx=P_F3, flags=F_NO_REX_B, sdm="A-2 90 with F3: PAUSE"),
    # far JMP/CALL, which may switch tasks (SDM Vol. 3A 8.3; a VM exit in VMX non-root operation)
    Form("task", MAP_1, 0x9A, flags=F_IMM_PTR, sdm="A-2 9A: CALL Ap (far, ptr16:16/32; invalid in 64-bit mode)"),
    Form("task", MAP_1, 0xEA, flags=F_IMM_PTR, sdm="A-2 EA: JMP Ap (far, ptr16:16/32; invalid in 64-bit mode)"),
    _g("task", MAP_1, 0xFF, 3, MOD_MEM, sdm="A-6 group 5 mem /3: CALL Ep (far)"),
    _g("task", MAP_1, 0xFF, 5, MOD_MEM, sdm="A-6 group 5 mem /5: JMP Mp (far)"),
    # ---- two-byte map, Table A-3; groups 6, 7 and 9 from Table A-6
    _g("desc", MAP_0F, 0x00, 0, MOD_ANY, sdm="A-6 group 6 /0: SLDT"),
    _g("desc", MAP_0F, 0x00, 1, MOD_ANY, sdm="A-6 group 6 /1: STR"),
    _g("desc", MAP_0F, 0x00, 2, MOD_ANY, sdm="A-6 group 6 /2: LLDT"),
    _g("desc", MAP_0F, 0x00, 3, MOD_ANY, sdm="A-6 group 6 /3: LTR"),
    _g("desc", MAP_0F, 0x01, 0, MOD_MEM, sdm="A-6 group 7 mem /0: SGDT"),
    _g("desc", MAP_0F, 0x01, 1, MOD_MEM, sdm="A-6 group 7 mem /1: SIDT"),
    _g("desc", MAP_0F, 0x01, 2, MOD_MEM, sdm="A-6 group 7 mem /2: LGDT"),
    _g("desc", MAP_0F, 0x01, 3, MOD_MEM, sdm="A-6 group 7 mem /3: LIDT"),
    _g("smsw", MAP_0F, 0x01, 4, MOD_ANY, sdm="A-6 group 7 /4: SMSW"),
    _g("lmsw", MAP_0F, 0x01, 6, MOD_ANY, sdm="A-6 group 7 /6: LMSW"),
    _g("invlpg", MAP_0F, 0x01, 7, MOD_MEM, sdm="A-6 group 7 mem /7: INVLPG"),
    _g("vmx", MAP_0F, 0x01, 0, MOD_REG, rm=1, sdm="A-6 group 7 11B /0 001: VMCALL"),
    _g("vmx", MAP_0F, 0x01, 0, MOD_REG, rm=2, sdm="A-6 group 7 11B /0 010: VMLAUNCH"),
    _g("vmx", MAP_0F, 0x01, 0, MOD_REG, rm=3, sdm="A-6 group 7 11B /0 011: VMRESUME"),
    _g("vmx", MAP_0F, 0x01, 0, MOD_REG, rm=4, sdm="A-6 group 7 11B /0 100: VMXOFF"),
    _g("monitor", MAP_0F, 0x01, 1, MOD_REG, rm=0, sdm="A-6 group 7 11B /1 000: MONITOR"),
    _g("mwait", MAP_0F, 0x01, 1, MOD_REG, rm=1, sdm="A-6 group 7 11B /1 001: MWAIT"),
    _g("xsetbv", MAP_0F, 0x01, 2, MOD_REG, rm=1, pfx=NP, sdm="A-6 group 7 11B /2 001: XSETBV (NP)"),
    _g("rdtscp", MAP_0F, 0x01, 7, MOD_REG, rm=1, sdm="A-6 group 7 11B /7 001: RDTSCP"),
    Form("clts", MAP_0F, 0x06, sdm="A-3 0F 06: CLTS"),
    Form("invd", MAP_0F, 0x08, sdm="A-3 0F 08: INVD"),
    Form("wbinvd", MAP_0F, 0x09, sdm="A-3 0F 09: WBINVD; F3 0F 09: WBNOINVD (exits like WBINVD)"),
    Form("cr_read", MAP_0F, 0x20, modrm=MODRM_REG, sdm="A-3 0F 20: MOV Rd, Cd"),
    Form("dr", MAP_0F, 0x21, modrm=MODRM_REG, sdm="A-3 0F 21: MOV Rd, Dd"),
    Form("cr_write", MAP_0F, 0x22, modrm=MODRM_REG, sdm="A-3 0F 22: MOV Cd, Rd"),
    Form("dr", MAP_0F, 0x23, modrm=MODRM_REG, sdm="A-3 0F 23: MOV Dd, Rd"),
    Form("wrmsr", MAP_0F, 0x30, sdm="A-3 0F 30: WRMSR"),
    Form("rdtsc", MAP_0F, 0x31, sdm="A-3 0F 31: RDTSC"),
    Form("rdmsr", MAP_0F, 0x32, sdm="A-3 0F 32: RDMSR"),
    Form("rdpmc", MAP_0F, 0x33, sdm="A-3 0F 33: RDPMC"),
    Form("vmx", MAP_0F, 0x37, pfx=NP, sdm="A-3 0F 37: GETSEC (NP; exits unconditionally in VMX)"),
    Form("vmx", MAP_0F, 0x78, pfx=NP, modrm=MODRM, sdm="A-3 0F 78: VMREAD Ey, Gy (NP)"),
    Form("vmx", MAP_0F, 0x79, pfx=NP, modrm=MODRM, sdm="A-3 0F 79: VMWRITE Gy, Ey (NP)"),
    Form("cpuid", MAP_0F, 0xA2, sdm="A-3 0F A2: CPUID"),
    _g("vmx", MAP_0F, 0xC7, 6, MOD_MEM, pfx=P_NONE | P_66 | P_F3,
       sdm="A-6 group 9 mem /6: VMPTRLD (NP), VMCLEAR (66), VMXON (F3)"),
    _g("vmx", MAP_0F, 0xC7, 7, MOD_MEM, pfx=NP, sdm="A-6 group 9 mem /7: VMPTRST (NP)"),
    _g("rdrand", MAP_0F, 0xC7, 6, MOD_REG, pfx=NFX, sdm="A-6 group 9 11B /6: RDRAND (NFx)"),
    _g("rdseed", MAP_0F, 0xC7, 7, MOD_REG, pfx=NFX, sdm="A-6 group 9 11B /7: RDSEED (NFx; F3 is RDPID)"),
    # ---- three-byte map 0F 38, Table A-4 (memory operand only)
    Form("vmx", MAP_0F38, 0x80, pfx=P_66, modrm=MODRM, mod=MOD_MEM, sdm="A-4 66 0F 38 80: INVEPT Gy, Mdq"),
    Form("vmx", MAP_0F38, 0x81, pfx=P_66, modrm=MODRM, mod=MOD_MEM, sdm="A-4 66 0F 38 81: INVVPID Gy, Mdq"),
    Form("invpcid", MAP_0F38, 0x82, pfx=P_66, modrm=MODRM, mod=MOD_MEM,
         sdm="A-4 66 0F 38 82: INVPCID Gy, Mdq"),
)

# ---- classification results (native/vmlab.h VMLAB_CLASS_*, VMLAB_PFX_*)
CLASS_NONE, CLASS_TRAP, CLASS_TRUNCATED = 0, 1, 2
PFX_LOCK, PFX_REPNE, PFX_REP, PFX_OPSIZE, PFX_ADSIZE, PFX_SEG, PFX_REX, PFX_VEX = 1, 2, 4, 8, 16, 32, 64, 128
NO_SEG = 255
MAX_INSN = 15

_SEG_PREFIX = {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}   # ES CS SS DS FS GS
_LEGACY = frozenset((0xF0, 0xF2, 0xF3, 0x66, 0x67) + tuple(_SEG_PREFIX))
_CLASS_BIT = {0: P_NONE, 0x66: P_66, 0xF3: P_F3, 0xF2: P_F2}


def _check_forms(forms) -> None:
    """Forms of one (map, opcode) agree on ModRM use and never match the same
    bytes; kinds are known names."""
    by_op: dict = {}
    for f in forms:
        assert f.kind in KIND_BIT, f
        by_op.setdefault((f.map, f.op), []).append(f)
    for key, fs in by_op.items():
        assert len({f.modrm for f in fs}) == 1, key
        for cls in (P_NONE, P_66, P_F3, P_F2):
            for rexb in (0, 1):
                for modrm in range(256) if fs[0].modrm else (None,):
                    hits = [f for f in fs if f.pfx & cls and not (rexb and f.flags & F_NO_REX_B)
                            and (modrm is None or _modrm_ok(f, modrm))]
                    assert len(hits) <= 1, (key, cls, rexb, modrm, hits)


def _modrm_ok(f: Form, modrm: int) -> bool:
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if f.mod == MOD_MEM and mod == 3 or f.mod == MOD_REG and mod != 3:
        return False
    return (f.reg == ANY or f.reg == reg) and (f.rm == ANY or f.rm == rm)


_check_forms(FORMS)
_BY_OP: dict[tuple[int, int], tuple[Form, ...]] = {}
for _f in FORMS:
    _BY_OP[(_f.map, _f.op)] = _BY_OP.get((_f.map, _f.op), ()) + (_f,)
ALL_KINDS = 0
for _f in FORMS:
    ALL_KINDS |= 1 << KIND_BIT[_f.kind]
#: what a VEX prefix may still turn into (any 0F or 0F 38 form)
_VEX_MAYBE = 0
for _f in FORMS:
    if _f.map != MAP_1:
        _VEX_MAYBE |= 1 << KIND_BIT[_f.kind]
#: first bytes of an instruction that may be a site (mode-independent part)
START_OPCODES = frozenset({f.op for f in FORMS if f.map == MAP_1} | {0x0F, 0xC4, 0xC5})


@dataclass(slots=True)
class Insn:
    """What the classifier says about the instruction at the start of a byte
    string (the fields of native/vmlab.h ``vmlab_insn``)."""
    status: int = CLASS_NONE
    kind: int = -1            # KIND_NAMES index when status == CLASS_TRAP
    length: int = 0           # bytes, prefixes included (CLASS_TRAP)
    nprefix: int = 0          # prefix bytes before the opcode
    prefixes: int = 0         # PFX_* seen
    maybe: int = 0            # CLASS_TRUNCATED: kinds (bit mask) still possible
    opmap: int = 0
    opcode: int = 0
    modrm: int = 0
    has_modrm: int = 0
    rex: int = 0              # REX byte in effect, 0 if none
    seg: int = NO_SEG         # last segment override (0..5 = ES CS SS DS FS GS)
    mandatory: int = 0        # 0, 0x66, 0xF3 or 0xF2

    @property
    def kind_name(self) -> str | None:
        return KIND_NAMES[self.kind] if self.status == CLASS_TRAP else None

    def astuple(self) -> tuple:
        return (self.status, self.kind, self.length, self.nprefix, self.prefixes, self.maybe, self.opmap,
                self.opcode, self.modrm, self.has_modrm, self.rex, self.seg, self.mandatory)


def _rex_ok(f: Form, rex: int) -> bool:
    return not (f.flags & F_NO_REX_B and rex & 1)


def _mask(forms, cls: int, rex: int) -> int:
    m = 0
    for f in forms:
        if f.pfx & cls and _rex_ok(f, rex):
            m |= 1 << KIND_BIT[f.kind]
    return m


def classify(code: bytes, mode: int) -> Insn:
    """Classify the instruction at ``code[0]`` in ``mode`` (16, 32 or 64-bit
    code); the twin of native ``vmlab_classify``."""
    out = Insn()
    n = len(code)
    i = 0
    pfx = rex = rep = 0
    while i < n and i < MAX_INSN:
        b = code[i]
        if mode == 64 and 0x40 <= b <= 0x4F:
            rex = b
        elif b in _LEGACY:
            rex = 0
            if b == 0xF0:
                pfx |= PFX_LOCK
            elif b == 0xF2:
                pfx |= PFX_REPNE
                rep = b
            elif b == 0xF3:
                pfx |= PFX_REP
                rep = b
            elif b == 0x66:
                pfx |= PFX_OPSIZE
            elif b == 0x67:
                pfx |= PFX_ADSIZE
            else:
                pfx |= PFX_SEG
                out.seg = _SEG_PREFIX[b]
        else:
            break
        i += 1
    if rex:
        pfx |= PFX_REX
    out.nprefix, out.prefixes, out.rex = i, pfx, rex
    out.mandatory = rep or (0x66 if pfx & PFX_OPSIZE else 0)
    cls = _CLASS_BIT[out.mandatory]

    def need(k: int, maybe: int) -> bool:
        """The instruction is at least k bytes: False (and out set) if that
        is too long or more than we have."""
        if k > MAX_INSN:
            out.status = CLASS_NONE
            return False
        if k > n:
            out.status, out.maybe = (CLASS_TRUNCATED, maybe) if maybe else (CLASS_NONE, 0)
            return False
        return True

    if not need(i + 1, ALL_KINDS):
        return out
    b = code[i]
    if b in (0xC4, 0xC5) and mode != 16:
        # VEX (SDM Vol. 2A 2.3.5): #UD for every trapped instruction, but
        # Unicorn 2.1.4 runs a VEX-encoded 0F-map opcode as the legacy
        # instruction (C5 F8 32 is RDMSR there).  So a VEX form is a site of
        # the kind its opcode has, and the stop raises #UD.  Decoded like
        # Unicorn: not in 16-bit code, in 32-bit code only when the next
        # byte's bits 7:6 are 11 (else LES/LDS), never after F0/66/F2/F3/REX.
        out.opmap, out.opcode = MAP_1, b
        if pfx & (PFX_LOCK | PFX_OPSIZE | PFX_REP | PFX_REPNE) or rex:
            return out
        if not need(i + 2, _VEX_MAYBE):
            return out
        vex2 = code[i + 1]
        if mode != 64 and vex2 & 0xC0 != 0xC0:
            return out
        if b == 0xC5:
            pp, opmap, q = vex2 & 3, MAP_0F, i + 2
        else:
            if not need(i + 3, _VEX_MAYBE):
                return out
            if vex2 & 0x1F not in (1, 2):
                return out
            pp, opmap, q = code[i + 2] & 3, MAP_0F if vex2 & 0x1F == 1 else MAP_0F38, i + 3
        pfx |= PFX_VEX
        out.prefixes, out.mandatory = pfx, (0, 0x66, 0xF3, 0xF2)[pp]
        cls = _CLASS_BIT[out.mandatory]
        if not need(q + 1, _mask([f for f in FORMS if f.map == opmap], cls, rex)):
            return out
        op, p = code[q], q + 1
    elif b == 0x0F:
        if not need(i + 2, _mask([f for f in FORMS if f.map != MAP_1], cls, rex)):
            return out
        if code[i + 1] == 0x38:
            if not need(i + 3, _mask([f for f in FORMS if f.map == MAP_0F38], cls, rex)):
                return out
            opmap, op, p = MAP_0F38, code[i + 2], i + 3
        else:
            opmap, op, p = MAP_0F, code[i + 1], i + 2
    else:
        opmap, op, p = MAP_1, b, i + 1
    out.opmap, out.opcode = opmap, op
    cands = [f for f in _BY_OP.get((opmap, op), ()) if f.pfx & cls and _rex_ok(f, rex)]
    if not cands:
        return out
    form = cands[0]
    if form.modrm != NO_MODRM:
        if not need(p + 1, _mask(cands, cls, rex)):
            return out
        modrm = code[p]
        out.modrm, out.has_modrm = modrm, 1
        p += 1
        form = next((f for f in cands if _modrm_ok(f, modrm)), None)
        if form is None:
            return out
        mod, rm = modrm >> 6, modrm & 7
        if form.modrm == MODRM and mod != 3:
            addr16 = mode != 64 and (mode == 16) != bool(pfx & PFX_ADSIZE)
            if addr16:
                disp = 2 if mod == 2 or (mod == 0 and rm == 6) else mod   # mod 1: disp8
            else:
                base = rm
                if rm == 4:
                    if not need(p + 1, 1 << KIND_BIT[form.kind]):
                        return out
                    base = code[p] & 7
                    p += 1
                disp = 4 if mod == 2 or (mod == 0 and base == 5) else mod
            p += disp
    p += form.imm
    if form.flags & F_IMM_PTR:
        p += 4 if (mode == 16) != bool(pfx & PFX_OPSIZE) else 6
    if p > MAX_INSN:
        return out
    out.status, out.kind, out.length = CLASS_TRAP, KIND_BIT[form.kind], p
    return out


def block_sites(code: bytes, starts, mode: int, kinds: int, max_sites: int) -> list[tuple[int, int]]:
    """The sites of one block: ``(offset, kind)`` for each offset of ``starts``
    (its instruction starts, ascending) where an instruction of a kind in
    ``kinds`` begins in ``mode`` (16, 32 or 64) code, at most ``max_sites``.
    ``code`` is the block's bytes and up to 15 bytes past it.  The twin of
    native ``vmlab_block_sites``."""
    out: list[tuple[int, int]] = []
    for s in starts:
        if len(out) >= max_sites or s >= len(code):
            break
        r = classify(bytes(code[s:s + MAX_INSN]), mode)
        if r.status == CLASS_TRAP and kinds >> r.kind & 1:
            out.append((s, r.kind))
    return out


# ---------------------------------------------------------------- the native classifier
def classify_native(code: bytes, mode: int) -> Insn:
    """Ask native ``vmlab_classify`` (the classifier the scanner uses)."""
    from .native import ffi, lib
    c = ffi.new("vmlab_insn *")
    lib.vmlab_classify(code, len(code), mode, c)
    return Insn(c.status, c.kind, c.length, c.nprefix, c.prefixes, c.maybe, c.opmap, c.opcode, c.modrm,
                c.has_modrm, c.rex, c.seg, c.mandatory)


# ---------------------------------------------------------------- C table generator
TABLE_PATH = Path(__file__).resolve().parent.parent / "native" / "trap_table.h"
_C_MAP = {MAP_1: "one-byte map", MAP_0F: "0F", MAP_0F38: "0F 38"}


def c_table() -> str:
    """native/trap_table.h: FORMS as C data for native/hooks.c."""
    forms = sorted(FORMS, key=lambda f: (f.map, f.op))          # stable: FORMS order within an opcode
    lines = [
        "/* GENERATED by `python -m vmlab.emu.trapscan --write` from FORMS in emu/trapscan.py:",
        " * do not edit; change FORMS and regenerate (tests/unit/test_trapscan.py checks",
        " * that this file is current).  Encodings: SDM Vol. 2 Appendix A opcode maps. */",
        "#ifndef VMLAB_TRAP_TABLE_H",
        "#define VMLAB_TRAP_TABLE_H",
        "",
        "#define TT_NO_MODRM 0",
        "#define TT_MODRM 1",
        "#define TT_MODRM_REG 2      /* mod bits ignored, register operand (MOV CR/DR) */",
        "#define TT_MOD_ANY 0",
        "#define TT_MOD_MEM 1",
        "#define TT_MOD_REG 2",
        "#define TT_ANY 0xff",
        "#define TT_NO_REX_B 1",
        "#define TT_IMM_PTR 2        /* ptr16:16 (4 bytes) or ptr16:32 (6 bytes) by operand size */",
        "#define TT_P_NONE 1         /* mandatory-prefix classes */",
        "#define TT_P_66 2",
        "#define TT_P_F3 4",
        "#define TT_P_F2 8",
        f"#define TT_NFORMS {len(forms)}",
        f"#define TT_ALL_KINDS 0x{ALL_KINDS:x}u",
        "",
        "struct trap_form {",
        "    uint8_t map, op, kind, pfx, modrm, mod, reg, rm, imm, flags;",
        "};",
        "",
        "static const struct trap_form trap_forms[TT_NFORMS] = {",
    ]
    for f in forms:
        reg = "TT_ANY" if f.reg == ANY else str(f.reg)
        rm = "TT_ANY" if f.rm == ANY else str(f.rm)
        pfx = " | ".join(n for n, b in (("TT_P_NONE", P_NONE), ("TT_P_66", P_66), ("TT_P_F3", P_F3),
                                         ("TT_P_F2", P_F2)) if f.pfx & b)
        modrm = ("TT_NO_MODRM", "TT_MODRM", "TT_MODRM_REG")[f.modrm]
        mod = ("TT_MOD_ANY", "TT_MOD_MEM", "TT_MOD_REG")[f.mod]
        flags = " | ".join(n for n, b in (("TT_NO_REX_B", F_NO_REX_B), ("TT_IMM_PTR", F_IMM_PTR))
                           if f.flags & b) or "0"
        lines.append(f"    {{{f.map}, 0x{f.op:02x}, VMLAB_TRAP_{f.kind.upper()}, {pfx}, {modrm}, {mod}, {reg}, "
                     f"{rm}, {f.imm}, {flags}}},   /* SDM {f.sdm} */")
    lines += ["};", "", "/* (map, opcode) -> first form and number of forms */",
              "static const uint8_t trap_first[3][256] = {"]
    first: dict = {}
    for idx, f in enumerate(forms):
        first.setdefault((f.map, f.op), [idx, 0])[1] += 1
    lines += [f"    [{m}][0x{op:02x}] = {v[0]}," for (m, op), v in sorted(first.items())]
    lines += ["};", "static const uint8_t trap_count[3][256] = {"]
    lines += [f"    [{m}][0x{op:02x}] = {v[1]}," for (m, op), v in sorted(first.items())]
    lines += ["};", "",
              "/* byte classes: legacy prefix, REX (a prefix in 64-bit code only), first byte",
              " * after the prefixes of some form (one-byte map opcodes, 0F, VEX C4/C5) */",
              "#define TT_BC_LEGACY 1", "#define TT_BC_REX 2", "#define TT_BC_START 4",
              "static const uint8_t trap_byte_class[256] = {"]
    for b in range(256):
        names = [n for n, on in (("TT_BC_LEGACY", b in _LEGACY), ("TT_BC_REX", 0x40 <= b <= 0x4F),
                                 ("TT_BC_START", b in START_OPCODES)) if on]
        if names:
            lines.append(f"    [0x{b:02x}] = {' | '.join(names)},")
    lines += ["};", "", "#endif", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = c_table()
    if argv[1:2] == ["--write"]:
        TABLE_PATH.write_text(text)
        print(f"wrote {TABLE_PATH}")
        return 0
    if argv[1:2] == ["--check"]:
        ok = TABLE_PATH.exists() and TABLE_PATH.read_text() == text
        print(f"{TABLE_PATH}: {'current' if ok else 'STALE: run python -m vmlab.emu.trapscan --write'}")
        return 0 if ok else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

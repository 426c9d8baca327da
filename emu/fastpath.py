"""The VM-exit fast path: policy-only exits decided at the trap site.

When the vCPU stops at a trap site, the instruction there may be a VM exit
whose reason, length and qualification follow from the bytes and the controls
alone (SDM Vol. 3C 26.1): CPUID (always), HLT/RDTSC/RDTSCP/RDPMC/MWAIT/MONITOR/
PAUSE/WBINVD/INVD/XSETBV by their controls, IN/OUT with an immediate or DX
port under unconditional I/O exiting or the I/O bitmaps, and RDMSR/WRMSR under
the MSR bitmaps (26.1.3).  The VMM
(vmm.vmx) describes the current controls in a :class:`Policy` at VM entry; the
C side (``vmlab_fast_decide`` in native/hooks.c) decides at the stop and
``Vcpu.run`` returns a :class:`emu.exits.PolicyExit` without decoding the site
in Python.  MOV CR by the masks and shadows is decided the same way, and so is
an exception the exception bitmap makes a VM exit (SDM Vol. 3C 26.2; decided
at the stop, :func:`decide_exception`; ``Vcpu.run`` then returns the
:class:`emu.exits.ExceptionExit`).  Everything else (string I/O, CLTS/LMSW,
instructions with instruction information) goes the ordinary way.

:func:`decide_bytes` is the pure-Python twin of ``vmlab_fast_decide_bytes``
(same arguments, same answer); tests/unit/test_fastpath.py compares them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import trapscan
from .exits import ExceptionExit

FAST_IO_NONE, FAST_IO_ALL, FAST_IO_BITMAPS = 0, 1, 2
FAST_MSR_NONE, FAST_MSR_ALL, FAST_MSR_BITMAPS = 0, 1, 2
#: Policy.cr_ctl bits (native VMLAB_CR3_LOAD...)
CR3_LOAD, CR3_STORE, CR8_LOAD, CR8_STORE = 1, 2, 4, 8
#: basic exit reason of control-register accesses (SDM Vol. 3C Appendix C)
EXIT_REASON_CR_ACCESS = 28
#: basic exit reasons of RDMSR and WRMSR (SDM Vol. 3C Appendix C)
EXIT_REASON_RDMSR, EXIT_REASON_WRMSR = 31, 32
#: basic exit reason of an I/O instruction (SDM Vol. 3C Appendix C)
EXIT_REASON_IO = 30


# --------------------------------------------------------------------------- the VMCS area
# The VMCS lives in native memory (vmm/vmcs.py ``Vmcs.area``; native/vmcs.c):
# one 64-bit slot per field at (width << 2 | type) << 6 | index of its
# encoding (SDM Vol. 3C 25.11.2, Table 25-21: bits 14:13 width, 11:10 type,
# 9:1 index; every supported field's index is at most 38).  The fast path
# writes a VM exit's information fields there, so the layout is known here.

#: slots of a VMCS area (VMLAB_VMCS_SLOTS)
VMCS_SLOTS = 1024


def vmcs_slot(encoding: int) -> int:
    """The slot of a field encoding (vmlab_vmcs_slot)."""
    return ((encoding >> 13 & 3) << 2 | (encoding >> 10 & 3)) << 6 | (encoding >> 1 & 0x3F)


#: VM_EXIT_REASON, EXIT_QUALIFICATION, VM_EXIT_INSTRUCTION_LEN,
#: VM_EXIT_INTR_INFO, VM_EXIT_INTR_ERROR_CODE, IDT_VECTORING_INFO (SDM Vol. 3C B.3.2, B.4.2)
_X_REASON, _X_QUAL, _X_LEN, _X_INTR_INFO, _X_INTR_EC, _X_IDT_INFO = (
    vmcs_slot(e) for e in (0x4402, 0x6400, 0x440C, 0x4404, 0x4406, 0x4408))


def store_exit(f, vmcs) -> None:
    """A fast-path VM exit's information fields from the decision in ``f``
    (a ``vmlab_fastpath``) into the VMCS area ``vmcs`` (vmlab_vmcs_store_exit):
    the exit reason and qualification (SDM Vol. 3C 28.2.1), the instruction
    length (28.2.5), the interruption information and, when its bit 11 says
    an error code was delivered, the error code (28.2.2; the field keeps its
    value otherwise), and no IDT-vectoring information (28.2.3)."""
    vmcs[_X_REASON], vmcs[_X_QUAL], vmcs[_X_LEN] = f.exit_reason, f.exit_qual, f.exit_len
    vmcs[_X_INTR_INFO] = f.exit_intr_info
    vmcs[_X_IDT_INFO] = 0
    if f.exit_intr_info & 0x800:
        vmcs[_X_INTR_EC] = f.exit_intr_error


@dataclass
class Policy:
    """What the controls say, in the terms of native ``vmlab_fastpath``."""
    exit_kinds: int = 0                  # 1 << trap-kind bit: always a VM exit with qualification 0
    io_mode: int = FAST_IO_NONE
    io_bitmap_a: int = 0
    io_bitmap_b: int = 0
    msr_mode: int = FAST_MSR_NONE
    msr_bitmap: int = 0
    reason: list[int] = field(default_factory=lambda: [0] * len(trapscan.KIND_NAMES))
    #: MOV to/from CR decided here (native cr_mode; SDM Vol. 3C 26.1.3)
    cr_mode: int = 0
    cr_ctl: int = 0                      # CR3_LOAD | CR3_STORE | CR8_LOAD | CR8_STORE
    cr0_mask: int = 0
    cr0_shadow: int = 0
    cr4_mask: int = 0
    cr4_shadow: int = 0
    cr3_count: int = 0
    cr3_target: list[int] = field(default_factory=lambda: [0] * 4)
    #: complete a MOV to/from CR0/CR3/CR4 that does not VM-exit in C (cr_value)
    cr_emulate: int = 0
    cr4_valid: int = 0                   # the CR4 bits the CPU model accepts
    maxphyaddr: int = 40
    #: exceptions decided here (native exc_mode; SDM Vol. 3C 26.2, 25.6.3)
    exc_mode: int = 0
    exc_bitmap: int = 0
    pf_mask: int = 0
    pf_match: int = 0

    def to_native(self, out) -> None:
        """Fill a cffi ``vmlab_fastpath``."""
        out.exit_kinds, out.io_mode = self.exit_kinds, self.io_mode
        out.io_bitmap_a, out.io_bitmap_b = self.io_bitmap_a, self.io_bitmap_b
        out.msr_mode, out.msr_bitmap = self.msr_mode, self.msr_bitmap
        for i, r in enumerate(self.reason):
            out.reason[i] = r
        out.cr_mode, out.cr_ctl = self.cr_mode, self.cr_ctl
        out.cr0_mask, out.cr0_shadow, out.cr4_mask, out.cr4_shadow = (self.cr0_mask, self.cr0_shadow,
                                                                      self.cr4_mask, self.cr4_shadow)
        out.cr3_count = self.cr3_count
        for i in range(4):
            out.cr3_target[i] = self.cr3_target[i]
        out.cr_emulate, out.cr4_valid, out.maxphyaddr = self.cr_emulate, self.cr4_valid, self.maxphyaddr
        out.exc_mode, out.exc_bitmap = self.exc_mode, self.exc_bitmap & 0xFFFFFFFF
        out.pf_mask, out.pf_match = self.pf_mask & 0xFFFFFFFF, self.pf_match & 0xFFFFFFFF


def io_bitmap_location(bitmap_a: int, bitmap_b: int, port: int) -> tuple[int, int]:
    """(byte address, bit) of ``port``'s bit in the I/O bitmaps: A covers ports
    0000-7FFFH, B 8000-FFFFH (SDM Vol. 3C 25.6.4)."""
    base = bitmap_a if port < 0x8000 else bitmap_b
    bit = port & 0x7FFF
    return base + bit // 8, bit & 7


def msr_bitmap_location(bitmap: int, msr: int, write: bool) -> tuple[int, int] | None:
    """(byte address, bit) of ``msr``'s bit in the MSR bitmaps (SDM Vol. 3C
    25.6.9: read-low, read-high for C0000000H-C0001FFFH, then the write
    halves at +800H), or None for an MSR outside both ranges (it always exits)."""
    if msr <= 0x1FFF:
        off, bit = 0, msr
    elif 0xC0000000 <= msr <= 0xC0001FFF:
        off, bit = 0x400, msr - 0xC0000000
    else:
        return None
    return bitmap + off + (0x800 if write else 0) + bit // 8, bit & 7


def _bitmap_bit(policy: Policy, ram, port: int) -> int:
    addr, bit = io_bitmap_location(policy.io_bitmap_a, policy.io_bitmap_b, port)
    if addr >= len(ram):
        return 0
    return (ram[addr] >> bit) & 1


def _msr_bitmap_exits(policy: Policy, ram, msr: int, write: bool) -> bool:
    """An MSR outside both ranges, or a bitmap outside RAM, exits."""
    loc = msr_bitmap_location(policy.msr_bitmap, msr, write)
    if loc is None or loc[0] >= len(ram):
        return True
    return bool(ram[loc[0]] >> loc[1] & 1)


#: ``priv`` of decide_bytes: bits 1:0 CPL, then (native VMLAB_PRIV_*)
PRIV_TSD, PRIV_PCE, PRIV_IOPL_SHIFT, PRIV_VM, PRIV_PE, PRIV_OSXSAVE = 1 << 2, 1 << 3, 4, 1 << 6, 1 << 7, 1 << 8
_ANY_CPL = frozenset(trapscan.KIND_BIT[k] for k in ("cpuid", "pause", "io"))


def priv_of(cpl: int, cr0: int, cr4: int, rflags: int) -> int:
    """``priv`` for the CPU state: CPL, CR4.TSD/PCE/OSXSAVE, RFLAGS.IOPL/VM, CR0.PE."""
    return ((cpl & 3) | (PRIV_TSD if cr4 & (1 << 2) else 0) | (PRIV_PCE if cr4 & (1 << 8) else 0)
            | ((rflags >> 12) & 3) << PRIV_IOPL_SHIFT | (PRIV_VM if rflags & (1 << 17) else 0)
            | (PRIV_PE if cr0 & 1 else 0) | (PRIV_OSXSAVE if cr4 & (1 << 18) else 0))


def _decide_cr(c, mode: int, gpr, policy: Policy) -> tuple[int, int, int] | None:
    """MOV to/from CR under the policy (native fast_decide_cr); qualification
    SDM Vol. 3C Table 28-3 (3:0 CR, 5:4 access type, 11:8 register)."""
    cr = ((c.rex >> 2) & 1) << 3 | (c.modrm >> 3) & 7
    g = (c.rex & 1) << 3 | c.modrm & 7
    write = c.kind == trapscan.KIND_BIT["cr_write"]
    if cr == 8 and mode != 64:
        return None
    if write:
        value = gpr[g] if mode == 64 else gpr[g] & 0xFFFFFFFF
        if cr == 0:
            exits = bool((value ^ policy.cr0_shadow) & policy.cr0_mask)
        elif cr == 4:
            exits = bool((value ^ policy.cr4_shadow) & policy.cr4_mask)
        elif cr == 3 and policy.cr_ctl & CR3_LOAD:
            exits = value not in policy.cr3_target[:min(policy.cr3_count, 4)]
        elif cr == 8:
            exits = bool(policy.cr_ctl & CR8_LOAD)
        else:
            return None
    elif cr == 3:
        exits = bool(policy.cr_ctl & CR3_STORE)
    elif cr == 8:
        exits = bool(policy.cr_ctl & CR8_STORE)
    else:
        return None
    if not exits:
        return None
    return EXIT_REASON_CR_ACCESS, c.length, cr | (0 if write else 1) << 4 | g << 8


def decide_bytes(code: bytes, mode: int, gpr, policy: Policy, ram,
                 priv: int) -> tuple[int, int, int] | None:
    """(exit reason, instruction length, exit qualification) of a fast VM exit
    for the instruction at ``code[0]`` in 16/32/64-bit code, or None.  ``gpr``:
    the 16 general registers (RCX for RDMSR/WRMSR, RDX for IN/OUT DX, the MOV
    CR source).
    ``priv`` (``priv_of``) says whether a fault may come first (SDM Vol. 3C
    26.1.1: invalid opcode, privilege level, the TSS I/O bitmap): then it is
    not decided here."""
    c = trapscan.classify(code, mode)
    if c.status != trapscan.CLASS_TRAP:
        return None
    if c.prefixes & (trapscan.PFX_LOCK | trapscan.PFX_VEX):
        return None            # #UD has priority over any VM exit
    rcx, rdx = gpr[1], gpr[2]
    kind = c.kind
    cpl = priv & 3
    if kind == trapscan.KIND_BIT["xsetbv"] and not priv & PRIV_OSXSAVE:
        return None            # #UD: CR4.OSXSAVE = 0
    if cpl:
        if kind in (trapscan.KIND_BIT["rdtsc"], trapscan.KIND_BIT["rdtscp"]):
            if priv & PRIV_TSD:
                return None
        elif kind == trapscan.KIND_BIT["rdpmc"]:
            if not priv & PRIV_PCE:
                return None
        elif kind not in _ANY_CPL:
            return None        # needs CPL 0 (#GP), or MONITOR/MWAIT (#UD)
    if (kind == trapscan.KIND_BIT["io"] and priv & PRIV_PE
            and (priv & PRIV_VM or cpl > (priv >> PRIV_IOPL_SHIFT) & 3)):
        return None            # the TSS I/O permission bitmap decides first
    if 0 <= kind < len(trapscan.KIND_NAMES) and policy.exit_kinds >> kind & 1:
        return policy.reason[kind], c.length, 0
    if kind in (trapscan.KIND_BIT["rdmsr"], trapscan.KIND_BIT["wrmsr"]) and policy.msr_mode != FAST_MSR_NONE:
        write = kind == trapscan.KIND_BIT["wrmsr"]
        if policy.msr_mode == FAST_MSR_BITMAPS and not _msr_bitmap_exits(policy, ram, rcx & 0xFFFFFFFF, write):
            return None
        return (EXIT_REASON_WRMSR if write else EXIT_REASON_RDMSR), c.length, 0
    if kind in (trapscan.KIND_BIT["cr_read"], trapscan.KIND_BIT["cr_write"]) and policy.cr_mode:
        return _decide_cr(c, mode, gpr, policy)
    if kind != trapscan.KIND_BIT["io"] or policy.io_mode == FAST_IO_NONE or c.opmap != trapscan.MAP_1:
        return None
    op = c.opcode
    if not (0xE4 <= op <= 0xE7 or 0xEC <= op <= 0xEF):
        return None            # INS/OUTS: instruction information needed
    imm = op < 0xEC
    if imm:
        if c.nprefix + 1 >= len(code):
            return None
        port = code[c.nprefix + 1]
    else:
        port = rdx & 0xFFFF
    size = 1
    if op & 1:
        o16 = (mode == 16) != bool(c.prefixes & trapscan.PFX_OPSIZE)
        size = 2 if o16 else 4
    is_in = not op & 2
    if policy.io_mode == FAST_IO_BITMAPS:
        if not any(_bitmap_bit(policy, ram, (port + q) & 0xFFFF) for q in range(size)):
            return None
    # SDM Vol. 3C Table 28-5
    qual = (size - 1) | (int(is_in) << 3) | (int(imm) << 6) | (port << 16)
    return EXIT_REASON_IO, c.length, qual


#: the vectors that push an error code (SDM Vol. 3A Table 6-1): #DF #TS #NP #SS #GP #PF #AC #CP
_EC_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


def decide_exception(policy: Policy, vector: int, software: bool, error_code: int,
                     cr2: int) -> tuple[int, int, int, int, int] | None:
    """The twin of ``vmlab_fast_decide_exc``: (exit reason 0, instruction
    length, exit qualification, VM-exit interruption information, its error
    code) when the exception bitmap makes this exception a VM exit (SDM Vol.
    3C 26.2; #PF by the error-code mask and match, 25.6.3), else None -- also
    for what is left to Python: #DB, NMI, #DF, INT n.  ``error_code`` is used
    for the vectors that push one; ``cr2`` is a #PF's qualification (28.2.1)."""
    if not policy.exc_mode or not 0 <= vector < 32 or vector in (1, 2, 8):
        return None
    if software and vector not in (3, 4):
        return None                # INT n: a software interrupt, not an exception
    has_ec = not software and vector in _EC_VECTORS
    error_code &= 0xFFFFFFFF
    exits = bool(policy.exc_bitmap >> vector & 1)
    if vector == 14:
        match = (error_code & policy.pf_mask & 0xFFFFFFFF) == policy.pf_match & 0xFFFFFFFF
        exits = exits if match else not exits
    if not exits:
        return None
    # SDM Vol. 3C 28.2.2: vector, type (3 hardware / 6 software exception),
    # bit 11 error code valid, bit 31 valid; 28.2.5 the INT3/INTO length
    if software:
        info, length = vector | 6 << 8 | 1 << 31, 1
    else:
        info, length = vector | 3 << 8 | (1 << 11 if has_ec else 0) | 1 << 31, 0
    return 0, length, (cr2 if vector == 14 else 0), info, (error_code if has_ec else 0)


def decide_exception_native(policy: Policy, vector: int, software: bool, error_code: int,
                            cr2: int) -> tuple[int, int, int, int, int] | None:
    """The same question asked of ``vmlab_fast_decide_exc``."""
    from .native import ffi, lib
    f = ffi.new("vmlab_fastpath *")
    policy.to_native(f)
    if lib.vmlab_fast_decide_exc(f, vector & 0xFFFFFFFF, int(bool(software)), error_code & 0xFFFFFFFF,
                                 cr2 & 0xFFFFFFFFFFFFFFFF):
        return f.exit_reason, f.exit_len, f.exit_qual, f.exit_intr_info, f.exit_intr_error
    return None


def exception_exit(f, rip: int):
    """The machine exit (emu.exits.ExceptionExit, as ``Vcpu.exit_of`` builds
    it at the stop) behind an exception the native fast path decided (``f``: a
    cffi ``vmlab_fastpath`` whose decision has reason 0); ``rip``: RIP at the
    stop (after an INT3/INTO)."""
    info = f.exit_intr_info
    vector = info & 0xFF
    return ExceptionExit(rip=rip, vector=vector, error_code=f.exit_intr_error if info >> 11 & 1 else None,
                         software=(info >> 8 & 7) == 6, cr2=f.exit_qual if vector == 14 else None)


def decide_bytes_native(code: bytes, mode: int, gpr, policy: Policy,
                        ram, priv: int) -> tuple[int, int, int] | None:
    """The same question asked of ``vmlab_fast_decide_bytes``."""
    from .native import ffi, lib
    f = ffi.new("vmlab_fastpath *")
    policy.to_native(f)
    buf = ffi.from_buffer(bytes(ram)) if len(ram) else ffi.NULL
    regs = ffi.new("uint64_t[16]", [x & 0xFFFFFFFFFFFFFFFF for x in gpr])
    if lib.vmlab_fast_decide_bytes(code, len(code), mode, regs, f, buf, len(ram), priv):
        return f.exit_reason, f.exit_len, f.exit_qual
    return None


# CR0/CR4/EFER bits cr_value reads (SDM Vol. 3A 2.5, Table 2-1/2-2)
_PE, _ET, _NW, _CD, _PG = 1, 1 << 4, 1 << 29, 1 << 30, 1 << 31
_CR0_VALID = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 1 << 16 | 1 << 18 | _NW | _CD | _PG
_PAE, _LA57, _PCIDE, _LME, _LMA = 1 << 5, 1 << 12, 1 << 17, 1 << 8, 1 << 10
_HF_CS64, _HF_INHIBIT = 1 << 15, 1 << 3


def cr_value(cr: int, write: bool, src: int, mode: int, hflags: int, cr0: int, cr3: int, cr4: int, efer: int,
             cs_flags: int, policy: Policy) -> tuple[int, int]:
    """A MOV to/from CR0/CR3/CR4 in VMX non-root operation that does not
    VM-exit, as the Python path completes it (vmm/vmx_intercept.py
    _cr_access, emu/sensitive.py emulate_cr): (1, value) -- write the CR --,
    (2, value) -- the register gets it --, or (0, 0): left to Python (a check
    that faults, CPL > 0, an interrupt shadow, a change of CR0.PE/PG or
    CR4.PAE/PCIDE/LA57, CR2, CR8).  The twin of ``vmlab_cr_value``."""
    m64 = (1 << 64) - 1
    if not policy.cr_emulate or hflags & 3 or hflags & _HF_INHIBIT:
        return 0, 0
    if not write:
        if cr == 0:
            v = (cr0 & ~policy.cr0_mask) | (policy.cr0_shadow & policy.cr0_mask)   # SDM Vol. 3C 26.3
        elif cr == 4:
            v = (cr4 & ~policy.cr4_mask) | (policy.cr4_shadow & policy.cr4_mask)
        elif cr == 3:
            v = cr3
        else:
            return 0, 0
        return 2, (v & m64) if mode == 64 else v & 0xFFFFFFFF
    v = src if mode == 64 else src & 0xFFFFFFFF
    lma = bool(efer & _LMA)
    if cr == 0:
        if v >> 32:
            return 0, 0
        v |= _ET
        if (v & _PG and not v & _PE) or (v & _NW and not v & _CD):
            return 0, 0
        if v & _PG and not cr0 & _PG and efer & _LME and (not cr4 & _PAE or cs_flags & (1 << 21)):
            return 0, 0
        if lma and hflags & _HF_CS64 and not v & _PG:
            return 0, 0
        v = (v & _CR0_VALID & ~policy.cr0_mask) | (cr0 & policy.cr0_mask)
        if (v ^ cr0) & (_PG | _PE):
            return 0, 0
    elif cr == 4:
        if v & ~policy.cr4_valid or (lma and not v & _PAE):
            return 0, 0
        v = (v & ~policy.cr4_mask) | (cr4 & policy.cr4_mask)
        if (v ^ cr4) & (_PAE | _PCIDE | _LA57):
            return 0, 0
    elif cr == 3:
        v &= ~(1 << 63)
        if lma and policy.maxphyaddr < 64 and v >> policy.maxphyaddr:
            return 0, 0
    else:
        return 0, 0
    return 1, v & m64


def cr_value_native(cr: int, write: bool, src: int, mode: int, hflags: int, cr0: int, cr3: int, cr4: int,
                    efer: int, cs_flags: int, policy: Policy) -> tuple[int, int]:
    """The same question asked of ``vmlab_cr_value``."""
    from .native import ffi, lib
    f = ffi.new("vmlab_fastpath *")
    policy.to_native(f)
    out = ffi.new("uint64_t *")
    status = lib.vmlab_cr_value(cr, int(write), src, mode, hflags, cr0, cr3, cr4, efer, cs_flags, f, out)
    return status, out[0] if status else 0

"""String instructions and implicit accesses that reach memory outside RAM.

Two cases the single-operand MMIO path (emu.decode.mmio_access, MOV or a
replay through a scratch page) cannot complete:

* **String instructions** (MOVS, CMPS, STOS, LODS, SCAS; SDM Vol. 2B "MOVS",
  "CMPS", "STOS", "LODS", "SCAS" and "REP/REPE/REPZ/REPNE/REPNZ"): MOVS and
  CMPS have two memory operands, and with a REP prefix any of them touches
  many elements.  :func:`emulate_string` runs the iterations here, one element
  at a time, each memory access going to RAM or to the bus (``bus_read`` /
  ``bus_write``), at most :data:`MAX_ITERATIONS` per exit.  When the count is
  not exhausted, RIP stays at the instruction and the registers say how far
  it got (exactly the state an interrupt between iterations leaves, SDM Vol.
  2B REP: "the instruction is restartable"); the next iteration that touches
  non-RAM exits again.
* **Implicit accesses** (a descriptor read through a GDT/LDT/IDT whose base
  lies past RAM, a stack push into unbacked memory): there is no operand to
  decode.  :func:`replay_open_bus` replays the instruction once with the
  unbacked page seen as all ones, and writes to it dropped -- what a PC's
  open bus gives (no device drives the data lines; the pull-ups read 1) and
  what QEMU does for unassigned memory.

The guest is hostile: every address is translated with the guest's own page
tables (a fault is the guest's #PF), and nothing here reads or writes host
memory outside guest RAM.  Segment limit checks are not applied to the
iterations done here (flat segments are what kernels use).
"""
from __future__ import annotations

from typing import Callable

from . import x86

#: String opcodes (one-byte map): byte form, the word/dword/qword form is +1.
MOVS, CMPS, STOS, LODS, SCAS = 0xA4, 0xA6, 0xAA, 0xAC, 0xAE
STRING_OPCODES = frozenset({0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF})
#: Iterations done per exit before returning to the engine (bounds the time
#: one exit takes, so timers and interrupts are seen during a long REP).
MAX_ITERATIONS = 4096

_ACC_READ, _ACC_WRITE = 0, 2
_CF, _PF, _AF, _ZF, _SF, _OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
_SEG_PREFIX = {0x26: x86.R_ES, 0x2E: x86.R_CS, 0x36: x86.R_SS, 0x3E: x86.R_DS, 0x64: x86.R_FS, 0x65: x86.R_GS}

BusRead = Callable[[int, int], int]
BusWrite = Callable[[int, int, int], None]


def is_string(insn) -> bool:
    """True for MOVS/CMPS/STOS/LODS/SCAS (not the SSE MOVSD/CMPSD, which are
    0F-map opcodes)."""
    return insn is not None and insn.opcode[0] in STRING_OPCODES and insn.opcode[1] == 0


def _read(vcpu, lin: int, size: int, bus_read: BusRead) -> int:
    out = bytearray()
    for pa, n, mmio in vcpu._linear_chunks(lin, size, _ACC_READ, None, False):
        if pa is not None:
            out += vcpu.mem.read(pa, n)
        elif n in (1, 2, 4, 8):
            out += (bus_read(mmio, n) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        else:
            out += bytes(bus_read(mmio + i, 1) & 0xFF for i in range(n))
        lin += n
    return int.from_bytes(out, "little")


def _write(vcpu, lin: int, size: int, value: int, bus_write: BusWrite) -> None:
    data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    off = 0
    for pa, n, mmio in vcpu._linear_chunks(lin, size, _ACC_WRITE, None, False):
        part = data[off:off + n]
        if pa is not None:
            vcpu.write_linear(lin + off, part)      # keeps translated code coherent
        elif n in (1, 2, 4, 8):
            bus_write(mmio, n, int.from_bytes(part, "little"))
        else:
            for i, b in enumerate(part):
                bus_write(mmio + i, 1, b)
        off += n


def _sub_flags(a: int, b: int, size: int, rflags: int) -> int:
    """RFLAGS after CMP a, b at ``size`` bytes (SDM Vol. 1 Appendix A, CMP)."""
    bits = 8 * size
    mask = (1 << bits) - 1
    res = (a - b) & mask
    f = rflags & ~(_CF | _PF | _AF | _ZF | _SF | _OF)
    if a < b:
        f |= _CF
    if bin(res & 0xFF).count("1") % 2 == 0:
        f |= _PF
    if (a ^ b ^ res) & 0x10:
        f |= _AF
    if res == 0:
        f |= _ZF
    if res >> (bits - 1):
        f |= _SF
    if ((a ^ b) & (a ^ res)) >> (bits - 1) & 1:
        f |= _OF
    return f


def emulate_string(vcpu, insn, bus_read: BusRead, bus_write: BusWrite,
                   limit: int = MAX_ITERATIONS) -> int:
    """Run up to ``limit`` iterations of the string instruction ``insn`` at
    RIP (see the module docstring); returns how many ran.  A #PF on an
    element raises GuestFault with the completed iterations' registers
    written back, as the CPU leaves them."""
    r = vcpu.regs
    op = insn.opcode[0]
    base_op = op & ~1
    mode = vcpu.mode_bits
    prefixes = bytes(insn.prefix)
    rex_w = bool(insn.rex & 8) if mode == 64 else False
    if not op & 1:
        size = 1
    elif rex_w:
        size = 8
    else:
        size = 2 if (mode == 16) != (0x66 in prefixes) else 4
    asize = insn.addr_size
    amask = (1 << (8 * asize)) - 1
    rep = prefixes[0] if prefixes[0] in (0xF2, 0xF3) else 0
    seg = x86.R_DS
    for p in prefixes:
        if p in _SEG_PREFIX:
            seg = _SEG_PREFIX[p]
    step = -size if r.rflags & x86.RFLAGS_DF else size
    long64 = mode == 64

    def seg_base(s: int) -> int:
        if long64 and s not in (x86.R_FS, x86.R_GS):
            return 0
        return r.seg[s].base

    src_base, dst_base = seg_base(seg), seg_base(x86.R_ES)
    lin_mask = 0xFFFFFFFFFFFFFFFF if long64 else 0xFFFFFFFF

    def set_index(i: int, value: int) -> None:
        if asize == 8:
            vcpu.set_gpr(i, value, 8)
        elif asize == 4:
            vcpu.set_gpr(i, value & 0xFFFFFFFF, 4)
        else:
            vcpu.set_gpr(i, value & 0xFFFF, 2)

    done = 0
    while done < limit:
        if rep and (r.gpr[1] & amask) == 0:
            vcpu.skip(insn.size)
            return done
        si, di = r.gpr[6] & amask, r.gpr[7] & amask
        src, dst = (src_base + si) & lin_mask, (dst_base + di) & lin_mask
        if base_op == MOVS:
            _write(vcpu, dst, size, _read(vcpu, src, size, bus_read), bus_write)
        elif base_op == STOS:
            _write(vcpu, dst, size, r.gpr[0], bus_write)
        elif base_op == LODS:
            vcpu.set_gpr(0, _read(vcpu, src, size, bus_read), size)
        elif base_op == CMPS:
            a = _read(vcpu, src, size, bus_read)
            b = _read(vcpu, dst, size, bus_read)
            vcpu.set_rflags(_sub_flags(a, b, size, r.rflags))
        else:                                    # SCAS
            b = _read(vcpu, dst, size, bus_read)
            vcpu.set_rflags(_sub_flags(r.gpr[0] & ((1 << (8 * size)) - 1), b, size, r.rflags))
        if base_op in (MOVS, LODS, CMPS):
            set_index(6, si + step)
        if base_op in (MOVS, STOS, CMPS, SCAS):
            set_index(7, di + step)
        done += 1
        if not rep:
            vcpu.skip(insn.size)
            return done
        set_index(1, (r.gpr[1] & amask) - 1)
        if base_op in (CMPS, SCAS):
            zf = bool(r.rflags & _ZF)
            if (rep == 0xF3 and not zf) or (rep == 0xF2 and zf):
                vcpu.skip(insn.size)
                return done
        if (r.gpr[1] & amask) == 0:
            vcpu.skip(insn.size)
            return done
    return done


def replay_open_bus(vcpu, vpage: int, insn_len: int) -> None:
    """Run the instruction at RIP once with the linear page ``vpage`` (which
    maps no RAM) read as all ones and its writes dropped (see the module
    docstring): the page is redirected to vmlab's hidden scratch page, filled
    with 0xFF first."""
    from types import SimpleNamespace
    if not vcpu._scratch_mapped:
        vcpu.uc.mem_map(vcpu.SCRATCH_PA, 0x1000)
        vcpu._scratch_mapped = True
    vcpu.uc.mem_write(vcpu.SCRATCH_PA, b"\xff" * 0x1000)
    vcpu.replay_mmio(SimpleNamespace(gla=vpage & ~0xFFF, size=1, insn_len=insn_len, is_write=False), 0xFF)

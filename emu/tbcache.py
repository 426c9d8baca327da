"""The translation-block registry: what code the guest ran, seen from Python.

The native block hook records every block once when it is first executed (and
again after a store to its page invalidated it), keyed like QEMU's TBs by
guest-physical address, linear pc, size and the mode bits that change decoding
(CPL, CS.D, CS.L, PE, LMA).  Discovery costs C, not a Python call per executed
block; Python drains the discovery and invalidation logs at exits and decodes
blocks with Capstone only when asked (``-d in_asm``, the debugger).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import x86


@dataclass(frozen=True, slots=True)
class Block:
    """One registry entry (a snapshot of native vmlab_tb)."""
    index: int
    pc: int
    paddr: int
    size: int
    ninsn: int
    hflags: int
    valid: bool
    translations: int
    invalidations: int
    exec_count: int

    @property
    def bits(self) -> int:
        return 64 if self.hflags & x86.HF_CS64 else 32 if self.hflags & x86.HF_CS32 else 16

    @property
    def cpl(self) -> int:
        return self.hflags & 3

    @property
    def mode(self) -> str:
        if not self.hflags & x86.HF_PE:
            return "real"
        return {64: "long", 32: "prot32", 16: "prot16"}[self.bits]


class TbCache:
    """Python view of one vCPU's block registry (see module docstring)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self._v = vcpu.native

    # ---- logs
    def drain_new(self) -> list[Block]:
        """Blocks discovered (or rediscovered after invalidation) since the last call."""
        v = self._v
        out = [self.block(v.tb_new[i]) for i in range(v.ntb_new)]
        v.ntb_new = 0
        return out

    def drain_invalidated(self) -> list[Block]:
        v = self._v
        out = [self.block(v.tb_inval[i]) for i in range(v.ntb_inval)]
        v.ntb_inval = 0
        return out

    def drain_exec(self) -> list[int]:
        """Indices of executed blocks in order (only while exec logging is on)."""
        v = self._v
        out = [v.exec_log[i] for i in range(v.nexec_log)]
        v.nexec_log = 0
        return out

    def set_exec_logging(self, on: bool) -> None:
        self._v.log_exec = 1 if on else 0

    def set_exec_counting(self, on: bool) -> None:
        self._v.count_exec = 1 if on else 0

    # ---- introspection (for the debugger)
    def block(self, index: int) -> Block:
        t = self._v.tbs[index]
        return Block(index, t.pc, t.paddr, t.size, t.ninsn, t.hflags, bool(t.valid),
                     t.translations, t.invalidations, t.exec_count)

    def blocks(self, valid_only: bool = False) -> list[Block]:
        out = [self.block(i) for i in range(self._v.ntbs)]
        return [b for b in out if b.valid] if valid_only else out

    def blocks_of_page(self, paddr: int) -> list[Block]:
        """Blocks with bytes on the guest-physical page containing paddr."""
        page = paddr & ~0xFFF
        return [b for b in self.blocks() if b.paddr < page + 4096 and b.paddr + b.size > page]

    def block_at(self, addr: int, physical: bool = False) -> Block | None:
        """The valid block containing a linear (or guest-physical) address."""
        for b in self.blocks(valid_only=True):
            start = b.paddr if physical else b.pc
            if start <= addr < start + b.size:
                return b
        return None

    def stats(self) -> dict:
        v = self._v
        return {"blocks": v.ntbs, "translations": v.stat_tb_translations,
                "invalidations": v.stat_tb_invalidations, "trap_sites": v.nexits,
                "blocks_classified": v.stat_blocks_classified, "tlb_fills": v.stat_fills,
                "code_page_writes": v.stat_code_writes}

    def disassemble(self, block: Block) -> list[tuple[int, str, str]]:
        """(linear address, mnemonic, operands) of each instruction of a block, from
        the bytes now in guest memory (read through its physical address)."""
        from .cpu import _cs
        mem = self.vcpu.mem
        first = min(block.size, 4096 - (block.paddr & 0xFFF))
        code = mem.read(block.paddr, first) if mem.contains(block.paddr, first) else b""
        if first < block.size:
            w = self.vcpu.translate(block.pc + first, implicit=True)
            if w.fault == 0:
                code += mem.read(w.paddr, block.size - first)
        return [(i.address, i.mnemonic, i.op_str) for i in _cs(block.bits).disasm(code, block.pc)]

    def format_block(self, block: Block) -> str:
        """QEMU -d in_asm style text for one block."""
        lines = [f"IN: [{block.mode} cpl={block.cpl} phys={block.paddr:#x}]"]
        for addr, mn, ops in self.disassemble(block):
            lines.append(f"0x{addr:016x}:  {mn} {ops}".rstrip())
        return "\n".join(lines) + "\n"

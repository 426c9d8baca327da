"""Breakpoints, watchpoints and debugger stops of one vCPU (Python half of
native/debug.c).

Nothing here runs on a hot path: a breakpoint is a one-address code hook (only
the instruction it covers pays, when it runs), a watchpoint makes the TLB fill
hand its page out without the watched right (only accesses to that page come
back), and mode-change/asynchronous stops are checked at block boundaries only
while armed.  While no ``DebugPoints`` is attached, ``vmlab_vcpu.dbg`` is NULL
and the native side skips every check.
"""
from __future__ import annotations

from contextlib import contextmanager

from .exits import BreakpointExit, DebugStopExit, Exit, WatchpointExit
from .native import ffi, lib

STOP_BREAK, STOP_WATCH, STOP_DEBUG = 20, 21, 22        # native/vmlab.h VMLAB_STOP_*
WATCH_WRITE, WATCH_READ = 1, 2                           # VMLAB_WATCH_*
DBG_ASYNC, DBG_MODE = 1, 2                               # VMLAB_DBG_*
MAX_BREAKS, MAX_WATCHES = 64, 16


class DebugPointError(ValueError):
    """A breakpoint or watchpoint that cannot be set (table full, bad range)."""


class DebugPoints:
    """The debugger's view of one vCPU: attach with ``DebugPoints(vcpu)``."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self._d = ffi.new("vmlab_debug *")
        vcpu.native.dbg = self._d
        vcpu.debug_points = self        # the native struct lives as long as the vCPU
        #: (addr, len, kinds, physical) of the armed watchpoints
        self.watches: list[tuple[int, int, int, bool]] = []

    @property
    def native(self):
        return self._d

    def detach(self) -> None:
        """Remove every breakpoint and watchpoint and turn the checks off."""
        d = self._d
        for a in list(d.breaks)[:d.nbreaks]:
            self.remove_break(a)
        for a in list(d.phys_breaks)[:d.nphys_breaks]:
            self.remove_break(a, physical=True)
        self.set_watches([])
        self.vcpu.native.dbg = ffi.NULL

    # ------------------------------------------------------------------ breakpoints
    def add_break(self, addr: int, physical: bool = False) -> None:
        if lib.vmlab_dbg_add_break(self.vcpu.native, self.vcpu._uch, addr, 1 if physical else 0) < 0:
            raise DebugPointError(f"too many breakpoints (at most {MAX_BREAKS} of each kind)")

    def remove_break(self, addr: int, physical: bool = False) -> bool:
        return lib.vmlab_dbg_remove_break(self.vcpu.native, self.vcpu._uch, addr, 1 if physical else 0) == 0

    # ------------------------------------------------------------------ watchpoints
    def set_watches(self, watches) -> None:
        """Arm exactly these (addr, len, kinds, physical) watchpoints."""
        watches = list(watches)
        if len(watches) > MAX_WATCHES:
            raise DebugPointError(f"too many watchpoints (at most {MAX_WATCHES})")
        d = self._d
        for i, (addr, length, kinds, phys) in enumerate(watches):
            if length <= 0 or addr < 0 or addr + length > 1 << 64:
                raise DebugPointError(f"bad watch range {addr:#x}+{length}")
            w = d.watch[i]
            w.addr, w.len, w.kinds, w.physical = addr, length, kinds, 1 if phys else 0
        d.nwatch = len(watches)
        self.watches = watches
        # Pages already in Unicorn's TLB carry their old rights.
        lib.vmlab_tlb_flush(self.vcpu._uch)

    @contextmanager
    def suspended(self, breaks: bool = True, watches: bool = False):
        """Run code with breakpoints (and/or watchpoints) off: stepping off a
        breakpoint, or executing the access that stopped at a watchpoint."""
        d = self._d
        old_b, old_w = d.suspend_breaks, d.suspend_watch
        if breaks:
            d.suspend_breaks = 1
        if watches and d.nwatch:
            d.suspend_watch = 1
            lib.vmlab_tlb_flush(self.vcpu._uch)
        try:
            yield
        finally:
            d.suspend_breaks = old_b
            if watches and d.nwatch:
                d.suspend_watch = old_w
                lib.vmlab_tlb_flush(self.vcpu._uch)

    # ------------------------------------------------------------------ block-boundary stops
    def request_stop(self) -> None:
        """Stop the running vCPU at the next block boundary (safe from any thread;
        sticky until ``clear_stop``)."""
        self._d.async_stop = 1
        lib.vmlab_request_slow_path(self.vcpu.native)

    def clear_stop(self) -> None:
        self._d.async_stop = 0

    def set_break_mode(self, on: bool) -> None:
        """Stop at the first block that runs in another CPU mode than now."""
        d = self._d
        d.mode_state = lib.vmlab_dbg_mode(self.vcpu.native)
        d.break_mode = 1 if on else 0


def debug_exit(vcpu, kind: int) -> Exit:
    """The exit value of a debugger stop kind (called by ``Vcpu.run``)."""
    d = vcpu.native.dbg
    r = vcpu.regs
    if kind == STOP_BREAK:
        return BreakpointExit(rip=r.rip, addr=d.hit_addr)
    if kind == STOP_WATCH:
        vpage = d.hit_addr
        insn = vcpu.fetch_insn()
        accesses = []
        if insn is not None:
            for addr, size in _accesses(vcpu, insn):
                if addr < vpage + 4096 and addr + size > vpage:
                    accesses.append((addr, size))
        return WatchpointExit(rip=r.rip, insn_len=insn.size if insn is not None else 0, vpage=vpage,
                              ppage=d.hit_paddr, is_write=bool(d.hit_access & 2), accesses=accesses)
    return DebugStopExit(rip=r.rip, why="interrupt" if d.hit_reason == DBG_ASYNC else "mode")


def _accesses(vcpu, insn):
    """(linear address, size) of the memory an instruction touches: its
    memory operands at their own size (string instructions included: Capstone
    lists [si]/[di] as operands) and the implicit stack slot."""
    from capstone import x86_const as C
    from .decode import _candidate_accesses, _stack_addr, mem_operand_address
    out = []
    mn = insn.mnemonic
    if mn not in ("lea", "nop") and not mn.startswith("prefetch"):
        for op in insn.operands:
            if op.type == C.X86_OP_MEM:
                try:
                    out.append((mem_operand_address(vcpu, insn, op), max(op.size, 1)))
                except KeyError:
                    pass
    hf = vcpu.regs.hflags
    osz = 8 if hf & (1 << 15) else 4 if hf & (1 << 4) else 2
    if insn.prefix[2] == 0x66 and osz != 8:
        osz = 6 - osz
    if mn.startswith(("push", "call", "enter")):
        out.append((_stack_addr(vcpu, -osz), osz))
    if mn.startswith(("pop", "ret", "leave", "iret")):
        out.append((_stack_addr(vcpu, 0), osz))
    return out or _candidate_accesses(vcpu, insn)

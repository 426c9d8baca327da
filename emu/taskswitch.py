"""Hardware task switching for events delivered through a task gate (SDM Vol. 3A
chapter 8, "Task Management").

Who does what:

* **JMP/CALL far to a TSS descriptor or a task gate, and IRET with EFLAGS.NT = 1**
  run inside Unicorn (QEMU's ``switch_tss``): the privilege and type checks,
  the busy bits, the back link, NT, CR0.TS, saving the old task and loading
  the new task's registers, EFLAGS, CR3 and selectors are QEMU's.  It then
  loads the selectors' descriptors, and a TLB fill in that phase (always
  there after a CR3 load: the TLB was flushed) makes Unicorn 2.1.4 re-run the
  switching instruction from the start, in the new task
  (docs/platform-notes.md).  The TLB-fill hook (native/hooks.c) therefore
  stops at the first fill while CS has an empty cache in protected mode (the
  state QEMU leaves the selectors in, and never seen otherwise), and
  :func:`finish_native` loads the LDT and the segments with the checks of
  Table 8-2 and jumps to the new task's EIP.  Without a fill in that phase
  (paging off, descriptors in the TLB) Unicorn completes the switch itself.
* **Interrupts and exceptions through a task gate in the IDT** are delivered by
  vmlab (emu/events.py), so the switch is done here, in the order of SDM 8.3
  "Task Switching" (steps 1-13) with the checks of Table 8-2 "Exception
  Conditions Checked During a Task Switch".

Faults before the old task's state is saved (step 8) are taken in the old
task's context; faults after it ("Any errors associated with this loading and
qualification occur in the context of the new task", step 12) are taken in the
new task: the state already loaded stays.
"""
from __future__ import annotations

from . import x86
from .cpu import EptFault, GuestFault

#: 32-bit TSS (SDM Vol. 3A Figure 8-2): offsets of the dynamic fields.
TSS32 = dict(link=0x00, cr3=0x1C, eip=0x20, eflags=0x24, gpr=0x28, seg=0x48, ldt=0x60, trap=0x64,
             min_limit=0x67, width=4)
#: 16-bit TSS (SDM Vol. 3A Figure 8-11).
TSS16 = dict(link=0x00, cr3=None, eip=0x0E, eflags=0x10, gpr=0x12, seg=0x22, ldt=0x2A, trap=None,
             min_limit=0x2B, width=2)

TYPE_TSS16_AVAIL, TYPE_TSS16_BUSY, TYPE_TASK_GATE = 0x1, 0x3, 0x5
TYPE_TSS32_AVAIL, TYPE_TSS32_BUSY = 0x9, 0xB
BUSY = 0x200                       # bit 41 of the descriptor: bit 9 of its high dword
DR7_LOCAL = 0x55                   # L0-L3 (SDM Vol. 3A 18.2.4: cleared on every task switch)
# Segment registers in the order of the TSS selector fields: ES CS SS DS FS GS.
_TSS_SEG_ORDER = (x86.R_ES, x86.R_CS, x86.R_SS, x86.R_DS, x86.R_FS, x86.R_GS)


def _gdt_entry(vcpu, selector: int) -> tuple[int, int, int]:
    """(linear address, low, high) of a GDT entry; the caller checked the limit."""
    r = vcpu.regs
    addr = r.gdtr_base + (selector & 0xFFF8)
    lo = vcpu.read_linear_int(addr, 4, implicit=True)
    hi = vcpu.read_linear_int(addr + 4, 4, implicit=True)
    return addr, lo, hi


def _descriptor(vcpu, selector: int, fault_vector: int, ext: int) -> tuple[int, int]:
    """A GDT or LDT descriptor for the new task's segment loads; a selector past
    its table's limit faults with ``fault_vector`` (selector error code)."""
    r = vcpu.regs
    idx = selector & 0xFFF8
    if selector & 4:
        base, limit = r.ldtr.base, r.ldtr.limit
        if r.ldtr.selector & 0xFFFC == 0:
            raise GuestFault(fault_vector, (selector & 0xFFFC) | ext)
    else:
        base, limit = r.gdtr_base, r.gdtr_limit
    if idx + 7 > limit:
        raise GuestFault(fault_vector, (selector & 0xFFFC) | ext)
    lo = vcpu.read_linear_int(base + idx, 4, implicit=True)
    hi = vcpu.read_linear_int(base + idx + 4, 4, implicit=True)
    return lo, hi


def task_gate_target(vcpu, gate_lo: int, ext: int) -> tuple[int, int, int, int]:
    """Follow a task gate to its TSS descriptor: (selector, descriptor address,
    low, high).  SDM Vol. 3A 8.3 steps 1-4 and Table 8-2: the TSS selector must
    point into the GDT (#GP(selector) otherwise, as for any task-gate target;
    SDM Vol. 2A "CALL" pseudo-code: "IF TSS segment selector local/global bit is
    set to local ... THEN #GP(TSS selector)"), at an available TSS descriptor
    (#GP(selector) if it is busy or no TSS), which must be present
    (#NP(selector)) with a limit of at least 67H (2BH for a 16-bit TSS;
    #TS(selector))."""
    sel = gate_lo >> 16
    err = (sel & 0xFFFC) | ext
    r = vcpu.regs
    if sel & 4 or (sel & 0xFFF8) + 7 > r.gdtr_limit or sel & 0xFFFC == 0:
        raise GuestFault(x86.GP, err)
    addr, lo, hi = _gdt_entry(vcpu, sel)
    dtype = (hi >> 8) & 0x1F                    # S = 0 and the system type
    if dtype not in (TYPE_TSS16_AVAIL, TYPE_TSS32_AVAIL):
        raise GuestFault(x86.GP, err)
    if not hi & x86.DESC_P:
        raise GuestFault(x86.NP, err)
    return sel, addr, lo, hi


def switch_to_task(vcpu, sel: int, desc_addr: int, lo: int, hi: int, *, ext: int,
                   next_eip: int, saved_eflags: int, error_code: int | None) -> None:
    """Switch to the task whose (available, present) TSS descriptor is ``lo``/``hi``
    at ``desc_addr``, as an interrupt or exception through a task gate does: a
    nested switch (SDM Vol. 3A 8.4: the new TSS's previous-task link gets the old
    TR selector, NT is set in the new task, the old task stays busy).  The old
    task's EIP and EFLAGS are saved as ``next_eip`` and ``saved_eflags`` (what an
    interrupt gate would push: the return address, RF set for a fault); the
    error code, if any, is pushed on the new task's stack (SDM Vol. 3A 6.12.2
    "Interrupt Tasks": "If the exception has an error code, it is pushed on the
    stack of the new task")."""
    r = vcpu.regs
    err = (sel & 0xFFFC) | ext
    new_base, new_limit, new_flags = x86.desc_to_cache(lo, hi)
    is32 = bool((hi >> 8) & 0x8)
    lay = TSS32 if is32 else TSS16
    if new_limit < lay["min_limit"]:
        raise GuestFault(x86.TS, err)                       # Table 8-2: TSS limit
    old = r.tr
    old32 = bool((old.flags >> 8) & 0x8)
    old_lay = TSS32 if old32 else TSS16
    if old.selector & 0xFFFC == 0 or old.limit < old_lay["min_limit"]:
        # No current task to save into: the CPU would write through a TR that
        # was never loaded.  #TS(old TR) is what QEMU raises for a TR too small.
        raise GuestFault(x86.TS, (old.selector & 0xFFFC) | ext)

    # Step 5: read everything of the new task first (a #PF here leaves the old task intact).
    w = lay["width"]
    rd = lambda off, n: vcpu.read_linear_int(new_base + off, n, implicit=True)   # noqa: E731
    new_cr3 = rd(lay["cr3"], 4) if lay["cr3"] is not None else None
    new_eip = rd(lay["eip"], w)
    new_eflags = rd(lay["eflags"], w)
    new_gpr = [rd(lay["gpr"] + w * i, w) for i in range(8)]
    # ES CS SS DS FS GS selectors (a 16-bit TSS has no FS/GS: they become null).
    new_sel = [rd(lay["seg"] + w * i, 2) for i in range(6 if is32 else 4)] + ([] if is32 else [0, 0])
    new_ldt = rd(lay["ldt"], 2)
    # The old TSS's dynamic area and the new TSS's link field must be writable
    # before anything changes (step 5): write back the bytes at both ends.
    ow = old_lay["width"]
    old_end = old_lay["ldt"] - 1
    for addr in (old.base + old_lay["eip"], old.base + old_end, new_base):
        vcpu.write_linear_int(addr, 1, vcpu.read_linear_int(addr, 1, implicit=True), implicit=True)

    # Steps 6-8: (interrupt: the old task stays busy); save the old task's state.
    old_wr = lambda off, n, val: vcpu.write_linear_int(old.base + off, n, val, implicit=True)  # noqa: E731
    mask = 0xFFFFFFFF if old32 else 0xFFFF
    old_wr(old_lay["eip"], ow, next_eip & mask)
    old_wr(old_lay["eflags"], ow, saved_eflags & mask)
    for i in range(8):
        old_wr(old_lay["gpr"] + ow * i, ow, r.gpr[i] & mask)
    for i, seg in enumerate(_TSS_SEG_ORDER if old32 else _TSS_SEG_ORDER[:4]):
        old_wr(old_lay["seg"] + ow * i, 2, r.seg[seg].selector & 0xFFFF)

    # Steps 9-11: back link, NT, busy bit of the new task, TR.
    vcpu.write_linear_int(new_base + lay["link"], 2, old.selector & 0xFFFF, implicit=True)
    vcpu.write_linear_int(desc_addr + 4, 4, hi | BUSY, implicit=True)
    vcpu.load_segments({7: (sel, new_base, new_limit, new_flags | BUSY)})
    # SDM Vol. 3A 2.5 (CR0.TS): "The processor sets this flag on every task switch".
    if r.cr0 & x86.CR0_PG and new_cr3 is not None:
        vcpu.write_cr(3, new_cr3)
    vcpu.write_cr(0, r.cr0 | x86.CR0_TS)
    if r.dr[7] & DR7_LOCAL:
        vcpu.set_dr(7, r.dr[7] & ~DR7_LOCAL)

    # Step 12: the new task's state.  Registers, EIP and EFLAGS first (with NT set:
    # a nested task), selectors without their descriptors, then each descriptor
    # checked (Table 8-2) -- a fault from here on belongs to the new task.
    for i in range(8):
        vcpu.set_gpr(i, new_gpr[i], 8 if is32 else 2)
    vcpu.set_rip(new_eip)
    eflags = new_eflags if is32 else (r.rflags & ~0xFFFF) | (new_eflags & 0xFFFF)
    vcpu.set_rflags(eflags | x86.RFLAGS_NT)
    if eflags & x86.RFLAGS_VM:
        from .errors import UnsupportedError
        raise UnsupportedError("a task switch into virtual-8086 mode (EFLAGS.VM in the new TSS) is not supported")
    vcpu.load_segments({i: (new_sel[n], 0, 0, 0) for n, i in enumerate(_TSS_SEG_ORDER)}
                       | {6: (new_ldt & 0xFFFF, 0, 0, 0)})
    _load_ldt(vcpu, new_ldt, ext)
    _load_task_segments(vcpu, new_sel, ext)
    if new_eip > vcpu.regs.seg[x86.R_CS].limit:
        raise GuestFault(x86.GP, ext)                   # Table 8-2: EIP beyond the CS limit
    if error_code is not None:
        _push_error_code(vcpu, error_code, is32)


def _load_ldt(vcpu, sel: int, ext: int) -> None:
    """Table 8-2, LDTR: TI = 1, a selector past the GDT limit, a descriptor that
    is no LDT: #TS(selector); not present: #TS(selector) too."""
    err = (sel & 0xFFFC) | ext
    if sel & 0xFFFC == 0:
        vcpu.load_segments({6: (sel & 0xFFFF, 0, 0, 0)})
        return
    r = vcpu.regs
    if sel & 4 or (sel & 0xFFF8) + 7 > r.gdtr_limit:
        raise GuestFault(x86.TS, err)
    _, lo, hi = _gdt_entry(vcpu, sel)
    if (hi >> 8) & 0x1F != 0x02 or not hi & x86.DESC_P:
        raise GuestFault(x86.TS, err)
    base, limit, flags = x86.desc_to_cache(lo, hi)
    vcpu.load_segments({6: (sel & 0xFFFF, base, limit, flags)})


def _load_task_segments(vcpu, sels: list[int], ext: int) -> None:
    """Load CS, SS, then DS/ES/FS/GS of the new task with the checks of Table 8-2:
    a bad descriptor is #TS(selector), a not-present one #NP(selector) (#SS for
    SS).  CPL is the new CS selector's RPL."""
    cs_sel = sels[1]
    cpl = cs_sel & 3
    loaded = {}
    # CS: a code segment; non-conforming: DPL = CPL; conforming: DPL <= CPL.
    err = (cs_sel & 0xFFFC) | ext
    if cs_sel & 0xFFFC == 0:
        raise GuestFault(x86.TS, err)
    lo, hi = _descriptor(vcpu, cs_sel, x86.TS, ext)
    dpl = (hi >> 13) & 3
    if not hi & x86.DESC_S or not hi & x86.DESC_CS:
        raise GuestFault(x86.TS, err)
    if (hi & x86.DESC_C and dpl > cpl) or (not hi & x86.DESC_C and dpl != cpl):
        raise GuestFault(x86.TS, err)
    if not hi & x86.DESC_P:
        raise GuestFault(x86.NP, err)
    base, limit, flags = x86.desc_to_cache(lo, hi)
    loaded[x86.R_CS] = (cs_sel, base, limit, flags | x86.DESC_A)
    # SS: a writable data segment with RPL = DPL = CPL; not present: #SS.
    ss_sel = sels[2]
    err = (ss_sel & 0xFFFC) | ext
    if ss_sel & 0xFFFC == 0:
        raise GuestFault(x86.TS, err)
    lo, hi = _descriptor(vcpu, ss_sel, x86.TS, ext)
    if (ss_sel & 3) != cpl or ((hi >> 13) & 3) != cpl or not hi & x86.DESC_S or hi & x86.DESC_CS \
            or not hi & x86.DESC_W:
        raise GuestFault(x86.TS, err)
    if not hi & x86.DESC_P:
        raise GuestFault(x86.SS, err)
    base, limit, flags = x86.desc_to_cache(lo, hi)
    loaded[x86.R_SS] = (ss_sel, base, limit, flags | x86.DESC_A)
    vcpu.load_segments(loaded)
    # DS, ES, FS, GS: null is fine; else a data or readable code segment whose DPL
    # allows CPL and RPL (conforming code: no check).
    for idx in (x86.R_DS, x86.R_ES, x86.R_FS, x86.R_GS):
        sel = sels[_TSS_SEG_ORDER.index(idx)]
        if sel & 0xFFFC == 0:
            vcpu.load_segments({idx: (sel, 0, 0, 0)})
            continue
        err = (sel & 0xFFFC) | ext
        lo, hi = _descriptor(vcpu, sel, x86.TS, ext)
        dpl = (hi >> 13) & 3
        if not hi & x86.DESC_S or (hi & x86.DESC_CS and not hi & x86.DESC_R):
            raise GuestFault(x86.TS, err)
        if not (hi & x86.DESC_CS and hi & x86.DESC_C) and (dpl < cpl or dpl < (sel & 3)):
            raise GuestFault(x86.TS, err)
        if not hi & x86.DESC_P:
            raise GuestFault(x86.NP, err)
        base, limit, flags = x86.desc_to_cache(lo, hi)
        vcpu.load_segments({idx: (sel, base, limit, flags | x86.DESC_A)})


def _push_error_code(vcpu, code: int, is32: bool) -> None:
    """Push the error code on the new task's stack (SDM Vol. 3A 6.12.2); a fault
    here is the new task's (#SS if the push leaves the stack segment)."""
    r = vcpu.regs
    ss = r.seg[x86.R_SS]
    size = 4 if is32 else 2
    sp_mask = 0xFFFFFFFF if ss.flags & x86.DESC_B else 0xFFFF
    sp = (r.gpr[4] - size) & sp_mask
    expand_down = ss.flags & x86.DESC_E
    if (not expand_down and sp + size - 1 > ss.limit) or (expand_down and sp <= ss.limit):
        raise GuestFault(x86.SS, 0)
    vcpu.write_linear_int((ss.base + sp) & 0xFFFFFFFF, size, code, implicit=True)
    vcpu.set_gpr(4, (r.gpr[4] & ~sp_mask) | sp, 8)


def finish_native(vcpu) -> None:
    """Complete a task switch Unicorn stopped in (see the module doc): the new
    task's GPRs, EFLAGS, TR, CR3 and selectors are loaded, the caches are
    empty, RIP is at the switching instruction.  Re-sync the soft-MMU (CR3
    may have changed), load LDTR and the segment caches with their checks,
    and continue at the EIP of the new TSS; a fault here is the new task's
    (SDM Vol. 3A 8.3 step 12)."""
    r = vcpu.refresh()
    vcpu.clear_exception_state()
    vcpu.write_cr(3, r.cr3)               # sync the soft-MMU, drop its TLB
    tr = r.tr
    is32 = bool((tr.flags >> 8) & 0x8)
    lay = TSS32 if is32 else TSS16
    w = lay["width"]
    rd = lambda off, n: vcpu.read_linear_int(tr.base + off, n, implicit=True)   # noqa: E731
    new_eip = rd(lay["eip"], w)
    sels = [rd(lay["seg"] + w * i, 2) for i in range(6 if is32 else 4)] + ([] if is32 else [0, 0])
    ldt = rd(lay["ldt"], 2)
    vcpu.set_rip(new_eip)
    if r.dr[7] & DR7_LOCAL:
        vcpu.set_dr(7, r.dr[7] & ~DR7_LOCAL)
    _load_ldt(vcpu, ldt, 0)
    _load_task_segments(vcpu, sels, 0)
    if new_eip > vcpu.regs.seg[x86.R_CS].limit:
        raise GuestFault(x86.GP, 0)
    vcpu.flush()


# ---------------------------------------------------------------------- VMX non-root operation
# Far JMP/CALL are trap sites (kind "task", emu/trapscan.py) while a VMCS
# governs the vCPU: "Task switches are not allowed in VMX non-root operation.
# Any attempt to effect a task switch in VMX non-root operation causes a VM
# exit" (SDM Vol. 3C 26.4.2 "Treatment of Task Switches"), exit reason 9.  The
# checks 1-4 of 26.4.2 come first and fault as outside VMX:
#   1. privilege: a task gate's DPL against CPL and RPL (and its P bit); a TSS
#      descriptor reached directly by CALL or JMP outside IA-32e mode has its
#      privilege levels checked (in IA-32e mode such a CALL/JMP is #GP);
#   2. the new TSS selector (in the GDT, within its limit);
#   3. the new TSS descriptor is read (a #PF if its GDT page is not present);
#   4. its type (for CALL/JMP an available TSS), P bit, S bit and limit.
# Only then is the transfer a VM exit.  A far JMP/CALL to a code segment or a
# call gate is no task switch: it runs natively (:func:`run_past`).

SOURCE_CALL, SOURCE_IRET, SOURCE_JMP, SOURCE_TASK_GATE = 0, 1, 2, 3    # exit qualification bits 31:30


class TaskGateIntercepted(Exception):
    """Raised by event delivery in VMX non-root operation (emu/events.py
    ``deliver(task_gates_exit=True)``) at a task gate in the IDT whose checks
    passed: the task switch is a VM exit (SDM Vol. 3C 26.4.2), whose
    IDT-vectoring information is ``event`` (28.2.4)."""

    def __init__(self, selector: int, event):
        super().__init__(f"task switch to TSS {selector:#x} through the IDT")
        self.selector, self.event = selector, event


def task_gate_exit(sel: int, lo: int, hi: int, ext: int, event) -> None:
    """A task gate in the IDT in VMX non-root operation: after the gate and
    TSS checks of task_gate_target (26.4.2 checks 1-4: "If a non-maskable
    interrupt (NMI), an exception other than breakpoint exceptions (#BP) and
    overflow exceptions (#OF), or an external interrupt accesses a task gate in
    the IDT outside IA-32e mode, no privilege checks are performed"; a
    software interrupt's gate DPL was checked with the gate), the TSS limit
    (#TS(selector), Table 8-2), then the VM exit."""
    _, limit, _ = x86.desc_to_cache(lo, hi)
    if limit < (TSS32 if (hi >> 8) & 0x8 else TSS16)["min_limit"]:
        raise GuestFault(x86.TS, (sel & 0xFFFC) | ext)
    raise TaskGateIntercepted(sel & 0xFFFF, event)
_TSS_TYPES = (TYPE_TSS16_AVAIL, TYPE_TSS16_BUSY, TYPE_TSS32_AVAIL, TYPE_TSS32_BUSY)


def _far_selector(vcpu, insn) -> int | None:
    """The selector operand of a far JMP/CALL (``insn`` from Capstone): the
    ptr16:16/32 immediate (EA, 9A), or the word after the offset of an m16:16,
    m16:32 or m16:64 operand (FF /3, FF /5).  None if Capstone gave no operands."""
    from capstone import x86_const as C

    from .decode import mem_operand_address
    ops = insn.operands
    if not ops:
        return None
    if ops[0].type == C.X86_OP_MEM:
        # The offset is as wide as the operand size (SDM Vol. 2A "JMP": m16:16,
        # m16:32, m16:64 with REX.W), the selector follows it.
        mode = vcpu.mode_bits
        opsize16 = (mode == 16) != (0x66 in insn.prefix)
        offset_size = 8 if mode == 64 and insn.rex & 8 else 2 if opsize16 else 4
        addr = mem_operand_address(vcpu, insn, ops[0])
        return vcpu.read_linear_int(addr + offset_size, 2)
    if len(ops) == 2 and ops[0].type == C.X86_OP_IMM:
        return ops[0].imm & 0xFFFF                # Capstone: "ljmp sel, offset"
    return None


def _tss_checks(vcpu, sel: int, hi: int) -> None:
    """Check 4 of SDM Vol. 3C 26.4.2 for the TSS descriptor of a CALL/JMP
    (Table 8-2 / the CALL and JMP pseudo-code of Vol. 2A): an available TSS
    (a busy one is #GP(selector)), present (#NP(selector)), limit at least
    67H for a 32-bit TSS and 2BH for a 16-bit one (#TS(selector))."""
    err = sel & 0xFFFC
    dtype = (hi >> 8) & 0x1F
    if dtype not in (TYPE_TSS16_AVAIL, TYPE_TSS32_AVAIL):
        raise GuestFault(x86.GP, err)
    if not hi & x86.DESC_P:
        raise GuestFault(x86.NP, err)


def far_task_switch(vcpu, insn) -> tuple[int, int] | None:
    """Is the far JMP/CALL ``insn`` at RIP a task switch?  (TSS selector,
    source) for the VM exit (SDM Vol. 3C Table 28-2: bits 15:0 the selector of
    the TSS switched to, bits 31:30 the source: 0 CALL, 2 JMP); None when it is
    no task switch (a code segment, a call gate, real or virtual-8086 mode,
    IA-32e mode, where CALL/JMP to a TSS is #GP) or when the selector or
    descriptor cannot be read, so the instruction runs natively and faults as
    it would.  The faults of checks 1-4 (26.4.2) are raised as GuestFault."""
    r = vcpu.regs
    if not r.cr0 & x86.CR0_PE or r.rflags & x86.RFLAGS_VM or r.efer & x86.EFER_LMA or insn is None:
        return None
    source = SOURCE_CALL if "call" in insn.mnemonic else SOURCE_JMP
    try:
        sel = _far_selector(vcpu, insn)
        if sel is None or sel & 0xFFFC == 0:
            return None
        idx = sel & 0xFFF8
        if sel & 4:
            if r.ldtr.selector & 0xFFFC == 0 or idx + 7 > r.ldtr.limit:
                return None
            base = r.ldtr.base
        else:
            if idx + 7 > r.gdtr_limit:
                return None
            base = r.gdtr_base
        hi = vcpu.read_linear_int(base + idx + 4, 4, implicit=True)
        lo = vcpu.read_linear_int(base + idx, 4, implicit=True)
    except (GuestFault, EptFault):
        return None                   # the native run takes the same fault (or EPT exit)
    if hi & x86.DESC_S:
        return None                   # a code or data segment: no task switch
    dtype = (hi >> 8) & 0x1F
    cpl, rpl, dpl = vcpu.cpl, sel & 3, (hi >> 13) & 3
    if dtype == TYPE_TASK_GATE:
        # Check 1: the gate's DPL >= CPL and >= RPL (#GP(gate selector)), P (#NP(gate selector)).
        if dpl < cpl or dpl < rpl:
            raise GuestFault(x86.GP, sel & 0xFFFC)
        if not hi & x86.DESC_P:
            raise GuestFault(x86.NP, sel & 0xFFFC)
        # Checks 2-4 on the TSS the gate names (in the GDT; available, present).
        tss_sel, _, tlo, thi = task_gate_target(vcpu, lo, 0)
    elif dtype in _TSS_TYPES:
        # Check 1 for a TSS descriptor reached directly: DPL >= CPL and >= RPL.
        if dpl < cpl or dpl < rpl:
            raise GuestFault(x86.GP, sel & 0xFFFC)
        if sel & 4:
            raise GuestFault(x86.GP, sel & 0xFFFC)         # a TSS descriptor is in the GDT only
        _tss_checks(vcpu, sel, hi)
        tss_sel, tlo, thi = sel, lo, hi
    else:
        return None                   # a call gate (or a type the native run refuses)
    _, limit, _ = x86.desc_to_cache(tlo, thi)
    if limit < (TSS32 if (thi >> 8) & 0x8 else TSS16)["min_limit"]:
        raise GuestFault(x86.TS, tss_sel & 0xFFFC)
    return tss_sel & 0xFFFF, source


def iret_task_switch(vcpu) -> int:
    """IRET with NT = 1 outside IA-32e mode in VMX non-root operation: the
    selector of the TSS it returns to, for the VM exit (SDM Vol. 3C 26.4.2:
    "If IRET is executed with RFLAGS.NT = 1 outside IA-32e mode, a TSS
    descriptor is accessed directly and no privilege checks are made"; then
    checks 2-4 as IRET's TASK-RETURN, SDM Vol. 2A "IRET": the back link of the
    current TSS in the GDT and within its limit, a busy TSS (#TS(selector)
    otherwise), present (#NP(selector)), with a large enough limit (#TS))."""
    r = vcpu.regs
    sel = vcpu.read_linear_int(r.tr.base + TSS32["link"], 2, implicit=True)    # offset 0 in both layouts
    err = sel & 0xFFFC
    if sel & 4 or err == 0 or (sel & 0xFFF8) + 7 > r.gdtr_limit:
        raise GuestFault(x86.TS, err)
    _, lo, hi = _gdt_entry(vcpu, sel)
    if (hi >> 8) & 0x1F not in (TYPE_TSS16_BUSY, TYPE_TSS32_BUSY):
        raise GuestFault(x86.TS, err)
    if not hi & x86.DESC_P:
        raise GuestFault(x86.NP, err)
    _, limit, _ = x86.desc_to_cache(lo, hi)
    if limit < (TSS32 if (hi >> 8) & 0x8 else TSS16)["min_limit"]:
        raise GuestFault(x86.TS, err)
    return sel & 0xFFFF


def run_past(vcpu, linear: int):
    """Run the trapped instruction at RIP (the trap site at ``linear``) once,
    natively (native ``vmlab_step_past_site``), and return the exit that run
    ended with: a DeadlineExit when it completed, else its fault or the like
    for the caller to handle as any exit."""
    from .errors import NativeError
    from .native import lib
    v = vcpu._v
    vcpu.flush()
    v.stop_kind = 0
    err = lib.vmlab_step_past_site(v, vcpu._uch, vcpu.regs.rip, linear)
    kind = v.stop_kind
    v.stop_kind = 0
    if lib.vmlab_regs_read(v, vcpu._uch, vcpu.regs):
        raise NativeError("register read failed")
    return vcpu.exit_of(kind, err, single_step=True)

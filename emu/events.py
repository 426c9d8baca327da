"""Event delivery: everything Unicorn does not do.

Unicorn never walks the IVT/IDT (docs/platform-notes.md): it reports an
exception or INT n through UC_HOOK_INTR and resumes as if nothing happened.
``deliver`` does what the CPU does (SDM Vol. 3A chapter 6, "Interrupt and
Exception Handling"): real-mode IVT (20.1.4), protected-mode IDT interrupt and
trap gates with privilege change through the TSS (6.12.1), IA-32e 64-bit gates
with IST (6.14), task gates (6.12.2, through emu/taskswitch.py), error codes (6.13), and #DF / triple fault by the rules of
Table 6-5.  Every table walk is bounded by its limit; a bad guest gets a fault,
never a Python traceback.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import taskswitch, x86
from .cpu import EptFault, GuestFault
from .errors import UnsupportedError

_M64 = 0xFFFFFFFFFFFFFFFF


class DeliveryIntercepted(Exception):
    """Raised by ``deliver`` when its ``intercept`` callback claims a fault met
    while delivering ``event`` (a VMM turns it into a VM exit with IDT-vectoring
    information)."""

    def __init__(self, event, fault):
        super().__init__(event, fault)
        self.event, self.fault = event, fault


class TripleFault(Exception):
    """A fault while delivering #DF: the processor shuts down (SDM 6.15, #DF)."""


@dataclass(slots=True)
class Event:
    """One event to deliver.  ``software``: INT n / INT3 / INTO (gate DPL is
    checked, RIP is after the instruction).  ``external``: an interrupt from a
    device (sets EXT in error codes of faults during its delivery)."""
    vector: int
    error_code: int | None = None
    software: bool = False
    external: bool = False
    cr2: int | None = None
    icebp: bool = False
    #: INT n (CD ib), a software interrupt -- also for vector 3 or 4; INT3 (CC)
    #: and INTO (CE) are software exceptions (SDM Vol. 3C 25.8.3, types 4 and 6)
    int_n: bool = False


def _cls(vector: int) -> str:
    if vector in x86.CONTRIBUTORY:
        return "contributory"
    if vector == x86.PF:
        return "pf"
    if vector == x86.DF:
        return "df"
    return "benign"


def deliver(vcpu, event: Event, log=None, intercept=None, task_gates_exit: bool = False) -> None:
    """Deliver an event to the guest.  Faults met on the way follow SDM Table
    6-5: contributory-on-contributory or on #PF gives #DF; any of them while
    delivering #DF raises TripleFault.  ``intercept(event, fault_event)``, if
    given, may claim a fault met during delivery: DeliveryIntercepted is raised
    instead of going on.  ``task_gates_exit`` (VMX non-root operation): a
    task gate in the IDT raises taskswitch.TaskGateIntercepted once its
    checks pass, instead of switching tasks (emu/taskswitch.py)."""
    first = event
    for _ in range(3):
        try:
            _deliver_once(vcpu, event, task_gates_exit)
            if log is not None:
                log(event)
            return
        except GuestFault as f:
            new = Event(f.vector, f.error_code, cr2=f.cr2)
            if f.error_code is not None and (event.external or not event.software):
                new.error_code = f.error_code | 1 if f.vector in (x86.TS, x86.NP, x86.SS, x86.GP) else f.error_code
            if intercept is not None and intercept(event, new):
                raise DeliveryIntercepted(event, new) from None
            if event is first and (first.software or first.icebp):
                _restart_software_interrupt(vcpu, first)
            prev, nxt = _cls(event.vector), _cls(new.vector)
            if prev == "df" and nxt in ("contributory", "pf"):
                raise TripleFault(f"{x86.EXCEPTION_NAMES.get(new.vector, new.vector)} while delivering #DF "
                                  f"(first event: vector {first.vector})") from None
            if (prev == "contributory" and nxt == "contributory") or (prev == "pf" and nxt in ("contributory", "pf")):
                event = Event(x86.DF, 0)
            else:
                event = new
    raise TripleFault("event delivery did not converge")


def _restart_software_interrupt(vcpu, ev: Event) -> None:
    """A fault while delivering INT n / INT3 / INTO / INT1 is taken in the
    context of that instruction: the saved CS:(E/R)IP point at it, so the
    handler's IRET restarts it (SDM Vol. 3A 6.5 "Exception Classifications":
    a fault's return address is that of "the faulting instruction"; 6.12.1.1:
    the software interrupt's gate checks raise #GP with "the saved contents
    of CS and EIP ... point to the INT n instruction").  Unicorn reports the
    interrupt with RIP after the instruction; its length follows from the
    bytes before RIP (CD ib, CC, CE, F1), read without faulting."""
    r = vcpu.regs
    lin = vcpu.linear_rip()
    try:
        before = vcpu.read_code((lin - 2) & _M64, 2)
    except (GuestFault, EptFault):
        return
    if ev.icebp:
        n = 1 if before[1] == 0xF1 else 0
    elif ev.vector == x86.BP and before[1] == 0xCC or ev.vector == x86.OF and before[1] == 0xCE:
        n = 1
    elif before[0] == 0xCD and before[1] == ev.vector:
        n = 2
    else:
        n = 0
    if n:
        mask = _M64 if r.hflags & x86.HF_CS64 else 0xFFFFFFFF if r.hflags & x86.HF_CS32 else 0xFFFF
        vcpu.set_rip((r.rip - n) & mask)
        vcpu.flush()


# ---------------------------------------------------------------- descriptors
def _read_descriptor(vcpu, selector: int, ext: int) -> tuple[int, int]:
    """(low, high) dwords of a GDT/LDT descriptor; #GP(selector) past the limit."""
    r = vcpu.regs
    idx = selector & ~7
    if selector & 4:
        base, limit = r.ldtr.base, r.ldtr.limit
        if not (r.ldtr.flags & x86.DESC_P) or r.ldtr.selector & ~3 == 0:
            raise GuestFault(x86.GP, (selector & 0xFFFC) | ext)
    else:
        base, limit = r.gdtr_base, r.gdtr_limit
    if idx + 7 > limit:
        raise GuestFault(x86.GP, (selector & 0xFFFC) | ext)
    lo = vcpu.read_linear_int(base + idx, 4, implicit=True)
    hi = vcpu.read_linear_int(base + idx + 4, 4, implicit=True)
    return lo, hi


def _code_segment(vcpu, selector: int, cpl: int, ext: int, need_64: bool):
    """Check the gate's target code segment (SDM 6.12.1.1); returns (base, limit, flags, dpl)."""
    if selector & 0xFFFC == 0:
        raise GuestFault(x86.GP, ext)
    lo, hi = _read_descriptor(vcpu, selector, ext)
    base, limit, flags = x86.desc_to_cache(lo, hi)
    dpl = (hi >> 13) & 3
    if not (hi & x86.DESC_S) or not (hi & x86.DESC_CS) or dpl > cpl:
        raise GuestFault(x86.GP, (selector & 0xFFFC) | ext)
    if need_64 and (not (hi & x86.DESC_L) or (hi & x86.DESC_B)):
        raise GuestFault(x86.GP, (selector & 0xFFFC) | ext)
    if not (hi & x86.DESC_P):
        raise GuestFault(x86.NP, (selector & 0xFFFC) | ext)
    if hi & x86.DESC_C:          # conforming: CPL does not change
        dpl = cpl
    return base, limit, flags | x86.DESC_A, dpl


# ---------------------------------------------------------------- delivery
def _deliver_once(vcpu, ev: Event, task_gates_exit: bool = False) -> None:
    r = vcpu.refresh()
    if ev.vector == x86.PF and ev.cr2 is not None:
        vcpu.write_cr(2, ev.cr2)
    if not (r.cr0 & x86.CR0_PE):
        _deliver_real(vcpu, ev)
    elif r.rflags & x86.RFLAGS_VM:
        raise UnsupportedError("event delivery in virtual-8086 mode is not supported")
    elif r.efer & x86.EFER_LMA:
        _deliver_long(vcpu, ev)
    else:
        _deliver_protected(vcpu, ev, task_gates_exit)


def _pushed_flags(r, ev: Event) -> int:
    fl = r.rflags
    is_fault = not ev.software and not ev.external and ev.vector not in (x86.BP, x86.OF, x86.DB, x86.NMI)
    if is_fault:
        fl |= x86.RFLAGS_RF      # faults save RF=1 so the restarted instruction is not re-trapped
    return fl


def _deliver_real(vcpu, ev: Event) -> None:
    """Real-address mode (SDM Vol. 3A 20.1.4): 4-byte IVT entries, push FLAGS, CS,
    IP; no error code."""
    r = vcpu.regs
    if ev.vector * 4 + 3 > r.idtr_limit:
        raise GuestFault(x86.GP, 0)
    ent = vcpu.read_linear_int(r.idtr_base + ev.vector * 4, 4)
    sp = r.gpr[4] & 0xFFFF
    ss_base = r.seg[x86.R_SS].base
    for val in (r.rflags & 0xFFFF, r.seg[x86.R_CS].selector, r.rip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        vcpu.write_linear_int(ss_base + sp, 2, val)
    cs = ent >> 16
    code = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A
    vcpu.load_segments({x86.R_CS: (cs, cs << 4, 0xFFFF, code)}, clear_exception=True)
    vcpu.set_gpr(4, sp, 2)
    vcpu.set_rflags(r.rflags & ~(x86.RFLAGS_IF | x86.RFLAGS_TF | x86.RFLAGS_AC | x86.RFLAGS_RF))
    vcpu.set_rip(ent & 0xFFFF)
    vcpu.flush()


def _gate(vcpu, ev: Event, size: int) -> tuple[int, int, int]:
    """Read and check an IDT gate; returns (low, high, ext) words."""
    r = vcpu.regs
    ext = 1 if (ev.external or not ev.software) else 0
    idt_err = ev.vector * 8 + 2 + ext
    if ev.vector * size + size - 1 > r.idtr_limit:
        raise GuestFault(x86.GP, idt_err)
    raw = vcpu.read_linear(r.idtr_base + ev.vector * size, size, implicit=True)
    lo = int.from_bytes(raw[0:4], "little")
    hi = int.from_bytes(raw[4:8], "little")
    gtype = (hi >> 8) & 0x1F
    dpl = (hi >> 13) & 3
    if ev.software and not ev.icebp and dpl < vcpu.cpl:
        raise GuestFault(x86.GP, ev.vector * 8 + 2)
    if size == 16:
        if gtype not in (0x0E, 0x0F):
            raise GuestFault(x86.GP, idt_err)
    elif gtype not in (0x05, 0x06, 0x07, 0x0E, 0x0F):
        raise GuestFault(x86.GP, idt_err)
    if not (hi & x86.DESC_P):
        raise GuestFault(x86.NP, idt_err)
    return lo, hi, ext


def _push(vcpu, base: int, sp: int, mask: int, size: int, values, user: bool) -> int:
    for val in values:
        sp = (sp - size) & mask
        vcpu.write_linear_int((base + sp) & _M64, size, val, user=user, implicit=not user)
    return sp


def _deliver_protected(vcpu, ev: Event, task_gates_exit: bool = False) -> None:
    """32-bit protected mode through an interrupt or trap gate (SDM 6.12.1)."""
    r = vcpu.regs
    cpl = vcpu.cpl
    lo, hi, ext = _gate(vcpu, ev, 8)
    gtype = (hi >> 8) & 0x1F
    if gtype == 0x05:
        # Task gate (SDM Vol. 3A 6.12.2 "Interrupt Tasks", 8.3): a nested task
        # switch; the error code goes on the new task's stack.
        sel, addr, dlo, dhi = taskswitch.task_gate_target(vcpu, lo, ext)
        if task_gates_exit:
            taskswitch.task_gate_exit(sel, dlo, dhi, ext, ev)
        taskswitch.switch_to_task(vcpu, sel, addr, dlo, dhi, ext=ext, next_eip=r.rip,
                                  saved_eflags=_pushed_flags(r, ev), error_code=ev.error_code)
        vcpu.clear_exception_state()
        vcpu.flush()
        return
    gsize = 4 if gtype & 0x08 else 2
    sel = lo >> 16
    offset = (lo & 0xFFFF) | (hi & 0xFFFF0000) if gsize == 4 else lo & 0xFFFF
    cbase, climit, cflags, dpl = _code_segment(vcpu, sel, cpl, ext, need_64=False)
    if offset > climit:
        raise GuestFault(x86.GP, ext)
    old_ss, old_sp = r.seg[x86.R_SS].selector, r.gpr[4]
    segs = {}
    if dpl < cpl:
        # Inter-privilege: SS:ESP for the new ring from the TSS (SDM 7.2.1).
        tr = r.tr
        tss32 = (tr.flags >> 8) & 0xF in (0x9, 0xB)
        if tss32:
            off_sp, off_ss, sp_size = 4 + 8 * dpl, 8 + 8 * dpl, 4
        else:
            off_sp, off_ss, sp_size = 2 + 4 * dpl, 4 + 4 * dpl, 2
        if off_ss + 1 > tr.limit:
            raise GuestFault(x86.TS, (tr.selector & 0xFFFC) | ext)
        new_sp = vcpu.read_linear_int(tr.base + off_sp, sp_size, implicit=True)
        new_ss = vcpu.read_linear_int(tr.base + off_ss, 2, implicit=True)
        if new_ss & 0xFFFC == 0 or (new_ss & 3) != dpl:
            raise GuestFault(x86.TS, (new_ss & 0xFFFC) | ext)
        slo, shi = _read_descriptor(vcpu, new_ss, ext)
        if ((shi >> 13) & 3) != dpl or not (shi & x86.DESC_S) or (shi & x86.DESC_CS) or not (shi & x86.DESC_W):
            raise GuestFault(x86.TS, (new_ss & 0xFFFC) | ext)
        if not (shi & x86.DESC_P):
            raise GuestFault(x86.SS, (new_ss & 0xFFFC) | ext)
        sbase, slimit, sflags = x86.desc_to_cache(slo, shi)
        sp_mask = 0xFFFFFFFF if sflags & x86.DESC_B else 0xFFFF
        frame = [old_ss, old_sp & (0xFFFFFFFF if gsize == 4 else 0xFFFF)]
        segs[x86.R_SS] = (new_ss, sbase, slimit, sflags | x86.DESC_A)
        sp, base = new_sp, sbase
    else:
        sp_mask = 0xFFFFFFFF if r.hflags & x86.HF_SS32 else 0xFFFF
        sp, base = old_sp, r.seg[x86.R_SS].base
        frame = []
    frame += [_pushed_flags(r, ev), r.seg[x86.R_CS].selector, r.rip]
    if ev.error_code is not None:
        frame.append(ev.error_code)
    sp = _push(vcpu, base, sp & sp_mask, sp_mask, gsize, frame, user=(dpl == 3))
    segs[x86.R_CS] = ((sel & 0xFFFC) | dpl, cbase, climit, cflags)
    vcpu.load_segments(segs, clear_exception=True)
    vcpu.set_gpr(4, (old_sp & ~sp_mask) | sp if sp_mask == 0xFFFF else sp, 8)
    fl = r.rflags & ~(x86.RFLAGS_TF | x86.RFLAGS_NT | x86.RFLAGS_VM | x86.RFLAGS_RF)
    if not (gtype & 1):
        fl &= ~x86.RFLAGS_IF
    vcpu.set_rflags(fl)
    vcpu.set_rip(offset)
    vcpu.flush()


def _deliver_long(vcpu, ev: Event) -> None:
    """IA-32e mode through a 64-bit gate, with IST (SDM 6.14.2-6.14.5)."""
    r = vcpu.regs
    cpl = vcpu.cpl
    lo, hi, ext = _gate(vcpu, ev, 16)
    raw_hi = vcpu.read_linear_int(r.idtr_base + ev.vector * 16 + 8, 4, implicit=True)
    gtype = (hi >> 8) & 0x1F
    sel = lo >> 16
    ist = hi & 7
    offset = (lo & 0xFFFF) | (hi & 0xFFFF0000) | (raw_hi << 32)
    cbase, climit, cflags, dpl = _code_segment(vcpu, sel, cpl, ext, need_64=True)
    if not x86.canonical(offset):
        raise GuestFault(x86.GP, ext)
    old_ss, old_rsp = r.seg[x86.R_SS].selector, r.gpr[4]
    segs = {}
    if ist or dpl < cpl:
        off = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * dpl
        if off + 7 > r.tr.limit:
            raise GuestFault(x86.TS, (r.tr.selector & 0xFFFC) | ext)
        rsp = vcpu.read_linear_int(r.tr.base + off, 8, implicit=True)
        if not x86.canonical(rsp):
            raise GuestFault(x86.SS, ext)
    else:
        rsp = old_rsp
    if dpl < cpl:
        segs[x86.R_SS] = (dpl, 0, 0, dpl << x86.DESC_DPL_SHIFT)     # NULL SS with RPL = new CPL
    rsp &= ~0xF                                                    # 16-byte alignment (6.14.2)
    frame = [old_ss, old_rsp, _pushed_flags(r, ev), r.seg[x86.R_CS].selector, r.rip]
    if ev.error_code is not None:
        frame.append(ev.error_code)
    rsp = _push(vcpu, 0, rsp, _M64, 8, frame, user=(dpl == 3))
    segs[x86.R_CS] = ((sel & 0xFFFC) | dpl, cbase, climit, cflags)
    vcpu.load_segments(segs, clear_exception=True)
    vcpu.set_gpr(4, rsp, 8)
    fl = r.rflags & ~(x86.RFLAGS_TF | x86.RFLAGS_NT | x86.RFLAGS_VM | x86.RFLAGS_RF)
    if gtype == 0x0E:
        fl &= ~x86.RFLAGS_IF
    vcpu.set_rflags(fl)
    vcpu.set_rip(offset)
    vcpu.flush()

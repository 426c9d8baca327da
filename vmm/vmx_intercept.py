"""VMX non-root operation as an intercept policy of the one run loop.

``NonRootIntercepts`` is the part of ``vmm.vmx.VmxGuest`` that the run loop
(vmm.runloop) consults: before the platform handles a machine exit
(``intercept``), between instructions (``events``: windows, NMI and
external-interrupt exiting, the preemption timer), when an event is delivered
(``deliver``: the exception bitmap, IDT-vectoring information) and when a VM
exit reaches the handlers (``on_exit``).  Every decision follows the VMCS
controls as SDM Vol. 3C ch. 26 ("VMX Non-Root Operation") specifies.
"""
from __future__ import annotations

from vmlab.emu import sensitive, taskswitch, x86
from vmlab.emu.cpu import EptFault, GuestFault
from vmlab.emu.events import DeliveryIntercepted, Event, TripleFault, deliver
from vmlab.emu.exits import (CrExit, DeadlineExit, EptExit, ExceptionExit, Exit, HltExit, IoExit, MsrExit, PolicyExit,
                             TrapExit)
from vmlab.emu.fastpath import (CR3_LOAD, CR3_STORE, CR8_LOAD, CR8_STORE, FAST_IO_ALL, FAST_IO_BITMAPS,
                                FAST_IO_NONE, FAST_MSR_ALL, FAST_MSR_BITMAPS, Policy, io_bitmap_location,
                                msr_bitmap_location)
from vmlab.emu.trapscan import KIND_BIT

from . import vmcs as F
from .controls import (InterruptionInfo, PinBasedControls, PrimaryProcBasedControls,
                       SecondaryProcBasedControls)
from .exit_reasons import ExitReason
from .insninfo import instruction_info
from .qualification import (AddressSize, CrAccessQualification, CrAccessType, DrAccessQualification, Gpr,
                            InsOutsInfo, IoQualification, SegmentReg, TaskSwitchQualification, TaskSwitchSource)
from .runloop import HALT, HANDLED, Intercepted, Outcome, Stop, StopReason

RESUME, STOP = "resume", "stop"
#: a handler's action: the exit went to a guest hypervisor (vmm.nested) -- no VM entry follows
REFLECT = "reflect"
_REASONS = {int(r): r for r in ExitReason}


class _Ints:
    """An IntFlag's members as plain ints (bit tests on every exit; enum
    arithmetic costs ~1 µs a time in CPython 3.11)."""

    def __init__(self, flag):
        for m in flag:
            setattr(self, m.name, int(m))


_PP, _SP, _PIN = _Ints(PrimaryProcBasedControls), _Ints(SecondaryProcBasedControls), _Ints(PinBasedControls)
#: trap kinds that VM-exit only under a control (SDM Vol. 3C 26.1.3): kind ->
#: (in the secondary controls, control bit); the others in ``_trap`` exit
#: unconditionally (CPUID, INVD, XSETBV, the VMX instructions) or are decided there
_KIND_CONTROL = {
    "rdtsc": (False, _PP.RDTSC_EXITING), "rdtscp": (False, _PP.RDTSC_EXITING),
    "rdpmc": (False, _PP.RDPMC_EXITING), "mwait": (False, _PP.MWAIT_EXITING),
    "monitor": (False, _PP.MONITOR_EXITING), "pause": (False, _PP.PAUSE_EXITING),
    "dr": (False, _PP.MOV_DR_EXITING),
    "wbinvd": (True, _SP.WBINVD_EXITING), "desc": (True, _SP.DESCRIPTOR_TABLE_EXITING),
    "rdrand": (True, _SP.RDRAND_EXITING), "rdseed": (True, _SP.RDSEED_EXITING),
}
#: the window-exiting controls (SDM 26.7.5, 26.7.6)
_WINDOWS = _PP.INTERRUPT_WINDOW_EXITING | _PP.NMI_WINDOW_EXITING
#: machine exits whose instruction may fault before it VM-exits (intercept)
_FAULT_FIRST = (IoExit, MsrExit, HltExit, CrExit, TrapExit)
_ENC_PRIMARY, _ENC_SECONDARY = int(F.CPU_BASED_VM_EXEC_CONTROL), int(F.SECONDARY_VM_EXEC_CONTROL)
#: slots of the VMCS area (vmm/vmcs.py ``slot``) written directly at event-delivery exits
_S_IDT_INFO, _S_IDT_EC = F.slot(F.IDT_VECTORING_INFO), F.slot(F.IDT_VECTORING_ERROR_CODE)
_S_PREEMPT_VALUE = F.slot(F.VMX_PREEMPTION_TIMER_VALUE)
_S_EXC_BITMAP, _S_PF_MASK, _S_PF_MATCH = (F.slot(F.EXCEPTION_BITMAP), F.slot(F.PAGE_FAULT_ERROR_CODE_MASK),
                                          F.slot(F.PAGE_FAULT_ERROR_CODE_MATCH))


def _event_info(ev: Event) -> InterruptionInfo:
    """The interruption-information encoding of an event being delivered."""
    if ev.vector == x86.NMI and ev.external:
        return InterruptionInfo.nmi()
    if ev.external:
        return InterruptionInfo.external_interrupt(ev.vector)
    if ev.icebp:
        return InterruptionInfo.privileged_software_exception()
    if ev.software:
        return (InterruptionInfo.software_exception(ev.vector) if ev.vector in (x86.BP, x86.OF) and not ev.int_n
                else InterruptionInfo.software_interrupt(ev.vector))
    return InterruptionInfo.hardware_exception(ev.vector, deliver_error_code=ev.error_code is not None)



class NonRootIntercepts:
    """Mixin of VmxGuest: the intercept policy (see module docstring)."""

    #: a MOV to/from CR0/CR3/CR4 that does not VM-exit is completed in C
    #: (the fast path's cr_emulate); False: by the Python path
    native_cr = True

    def _preemption_timer_exit(self):
        d = self._preempt_deadline
        if d is None or self.cpu.native.icount < d:
            return None
        self._preempt_deadline = None
        self.vmcs.mem[_S_PREEMPT_VALUE] = 0
        return self._make_exit(ExitReason.PREEMPTION_TIMER, 0, None)

    def _external_interrupt_exit(self, src: str | None):
        vm = self.vm
        if vm.init_pending:
            # INIT signals always cause a VM exit in non-root operation (SDM 26.2).
            vm.init_pending = False
            return self._make_exit(ExitReason.INIT, 0, None)
        pin, p = self._pin, self._p          # controls as of the last VM entry
        if p & _PP.INTERRUPT_WINDOW_EXITING:
            r = self.cpu.regs
            if r.rflags & x86.RFLAGS_IF and not r.hflags & x86.HF_INHIBIT_IRQ:
                return self._make_exit(ExitReason.INTERRUPT_WINDOW, 0, None)
            self.cpu.native.irq_window = 1
        if p & _PP.NMI_WINDOW_EXITING and not self.virtual_nmi_blocked and not vm.nmi_blocked:
            # The NMI window is open when there is no (virtual-)NMI blocking (SDM 26.7.6).
            return self._make_exit(ExitReason.NMI_WINDOW, 0, None)
        if src is None:
            return None
        if src == "nmi":
            if pin & _PIN.NMI_EXITING:
                vm.nmi_pending = False
                return self._make_exit(ExitReason.EXCEPTION_NMI, 0, None, interruption=InterruptionInfo.nmi())
            return None             # the arbiter delivers it
        if pin & _PIN.EXTERNAL_INTERRUPT_EXITING:
            # An external interrupt exits regardless of RFLAGS.IF (SDM 26.2).
            info = None
            if self._ctl(F.VM_EXIT_CONTROLS) & (1 << 15):          # acknowledge interrupt on exit
                info = InterruptionInfo.external_interrupt(vm.acknowledge_interrupt(src))
            return self._make_exit(ExitReason.EXTERNAL_INTERRUPT, 0, None, interruption=info)
        return None                 # the arbiter delivers it when RFLAGS.IF allows

    def intercept(self, mex: Exit) -> Outcome | None:
        """Is this machine exit a VM exit under the current controls (SDM Vol. 3C
        26.1-26.2)?  Returns Intercepted(VM exit), an outcome of VMX-specific
        handling (a MOV from CR0 reads the shadow…), or None: the platform
        handles it as on bare metal."""
        p = self._p
        if type(mex) in _FAULT_FIRST:
            # A fault the instruction raises before any VM exit (SDM Vol. 3C
            # 26.1.1: privilege level, #UD, the TSS I/O bitmap) is an
            # exception, which the exception bitmap decides.
            f = sensitive.priority_fault(self.cpu, mex)
            if f is not None:
                return self._exception(ExceptionExit(rip=mex.rip, vector=f.vector, error_code=f.error_code))
        match mex:
            case PolicyExit():
                # Decided in C by the policy this guest installed at VM entry.
                return Intercepted(self._make_exit(_REASONS[mex.reason], mex.qualification, mex,
                                                   length=mex.insn_len))
            case IoExit():
                if not self._io_exits(mex.port, mex.size):
                    return None
                q = IoQualification(size=mex.size, direction_in=not mex.is_write, port=mex.port,
                                    string=mex.string, rep=mex.rep, immediate=mex.imm)
                info = gla = None
                if mex.string:
                    # INS/OUTS: instruction information (Table 28-8, IA32_VMX_BASIC[54] is set)
                    # and the linear address of the element (SDM 28.2.1).
                    info = InsOutsInfo(AddressSize({2: 0, 4: 1, 8: 2}[mex.addr_size]), SegmentReg(mex.seg))
                    gla = mex.gla
                return Intercepted(self._make_exit(ExitReason.IO_INSTRUCTION, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q, instruction_info=info, gla=gla))
            case MsrExit():
                if not self._msr_exits(mex.msr, mex.is_write):
                    return None
                reason = ExitReason.WRMSR if mex.is_write else ExitReason.RDMSR
                return Intercepted(self._make_exit(reason, 0, mex, length=mex.insn_len))
            case HltExit():
                if p & _PP.HLT_EXITING and mex.insn_len:
                    return Intercepted(self._make_exit(ExitReason.HLT, 0, mex, length=mex.insn_len))
                return None
            case CrExit():
                return self._cr_access(mex)
            case TrapExit():
                return self._trap(mex)
            case ExceptionExit():
                return self._exception(mex)
            case EptExit():
                return Intercepted(self._ept_exit(mex.gpa, mex.gla, mex.qualification, mex.misconfig, mex))
            case DeadlineExit():
                if p & _PP.MONITOR_TRAP_FLAG:
                    # Monitor trap flag: a VM exit after one instruction (SDM 26.5.2).
                    return Intercepted(self._make_exit(ExitReason.MONITOR_TRAP_FLAG, 0, None))
                return None
            case _:
                return None

    def events(self, src: str | None) -> Outcome | None:
        """Between instructions: exits queued by VM entry (a fault while
        injecting), INIT, interrupt/NMI windows, NMI and external-interrupt
        exiting, the preemption timer (SDM 26.2, 26.5, 26.7).  None: the
        arbiter delivers what is pending as on bare metal."""
        if self._pending_exits:
            return Intercepted(self._pending_exits.pop(0))
        if src is None and not self._p & _WINDOWS and not self.vm.init_pending:
            ex = None                      # the common case: nothing pending, no window asked for
        else:
            ex = self._external_interrupt_exit(src)
        if ex is None and self._preempt_deadline is not None:
            ex = self._preemption_timer_exit()
        return Intercepted(ex) if ex is not None else None

    def deadline(self) -> int | None:
        return self._preempt_deadline

    def on_exit(self, ex) -> Outcome:
        """A VM exit: the handler registered for its reason runs; then VM entry
        (VMRESUME).  No handler, or a handler that stops, ends the run with the
        exit; so does a failed VM entry.  A VMX abort at the exit (an MSR
        area failed, VmxGuest._msr_exit) ends the run in shutdown."""
        abort = getattr(self, "_abort", None)
        if abort is not None:
            self._abort = None
            return abort
        if self.record:
            self.trace.append(ex)
        fn = self.handlers.get(ex.reason) or self.default_handler
        if fn is None:
            return Stop(StopReason.VMEXIT, exit=ex)
        self._halt_requested = False
        fn(ex)
        return self._after_handler(ex)

    def _after_handler(self, ex) -> Outcome:
        """What follows a handler (``on_exit``, the run loop's lean path): the
        handler's action, then VM entry (VMRESUME)."""
        if ex.action == STOP:
            return Stop(StopReason.VMEXIT, exit=ex)
        if ex.action == REFLECT:
            return HANDLED
        failed = self._enter()
        if failed is not None:
            return Stop(StopReason.VMEXIT, exit=failed)
        if self._halt_requested:
            self._halt_requested = False
            return HALT
        return HANDLED

    def _fast_policy(self) -> Policy:
        """The controls, as the native fast path needs them (emu/fastpath.py):
        the trap kinds that always VM-exit with qualification 0 and no
        instruction information (as ``_trap`` and ``intercept`` decide them),
        and how I/O exits (SDM Vol. 3C 26.1.2, 26.1.3)."""
        p, s = self._primary(), self._secondary()
        pol = Policy()
        kinds = {"cpuid": ExitReason.CPUID, "invd": ExitReason.INVD, "xsetbv": ExitReason.XSETBV}
        if p & _PP.HLT_EXITING:
            kinds["hlt"] = ExitReason.HLT
        if p & _PP.RDTSC_EXITING:
            kinds["rdtsc"], kinds["rdtscp"] = ExitReason.RDTSC, ExitReason.RDTSCP
        for ctl, name, reason in ((_PP.RDPMC_EXITING, "rdpmc", ExitReason.RDPMC),
                                  (_PP.MWAIT_EXITING, "mwait", ExitReason.MWAIT),
                                  (_PP.MONITOR_EXITING, "monitor", ExitReason.MONITOR),
                                  (_PP.PAUSE_EXITING, "pause", ExitReason.PAUSE)):
            if p & ctl:
                kinds[name] = reason
        if s & _SP.WBINVD_EXITING:
            kinds["wbinvd"] = ExitReason.WBINVD
        for name, reason in kinds.items():
            pol.exit_kinds |= 1 << KIND_BIT[name]
            pol.reason[KIND_BIT[name]] = int(reason)
        if p & _PP.USE_IO_BITMAPS:
            pol.io_mode = FAST_IO_BITMAPS
            pol.io_bitmap_a, pol.io_bitmap_b = self._ctl(F.IO_BITMAP_A), self._ctl(F.IO_BITMAP_B)
        elif p & _PP.UNCONDITIONAL_IO_EXITING:
            pol.io_mode = FAST_IO_ALL
        else:
            pol.io_mode = FAST_IO_NONE
        if p & _PP.USE_MSR_BITMAPS:
            pol.msr_mode, pol.msr_bitmap = FAST_MSR_BITMAPS, self._ctl(F.MSR_BITMAP)
        else:
            pol.msr_mode = FAST_MSR_ALL
        # MOV CR: what _cr_access decides by the masks, shadows and CR3/CR8
        # controls (SDM Vol. 3C 26.1.3), for MOV to/from CR0/3/4/8
        pol.cr_mode = 1
        pol.cr_ctl = ((CR3_LOAD if p & _PP.CR3_LOAD_EXITING else 0) | (CR3_STORE if p & _PP.CR3_STORE_EXITING else 0)
                      | (CR8_LOAD if p & _PP.CR8_LOAD_EXITING else 0) | (CR8_STORE if p & _PP.CR8_STORE_EXITING else 0))
        pol.cr0_mask, pol.cr0_shadow = self._ctl(F.CR0_GUEST_HOST_MASK), self._ctl(F.CR0_READ_SHADOW)
        pol.cr4_mask, pol.cr4_shadow = self._ctl(F.CR4_GUEST_HOST_MASK), self._ctl(F.CR4_READ_SHADOW)
        pol.cr3_count = self._ctl(F.CR3_TARGET_COUNT)
        pol.cr3_target = [self._ctl(int(F.CR3_TARGET_VALUE0) + 2 * i) for i in range(4)]
        # ... and a MOV CR that does not exit is completed in C (cr_value),
        # but for a guest hypervisor's L2, whose CR0/CR4 also keep VMX's
        # fixed bits (_cr_access: nested.cr_value_supported)
        model = self.vm.cpuid
        pol.cr_emulate = int(self.native_cr)
        pol.cr4_valid, pol.maxphyaddr = model.cr4_valid_mask(), model.maxphyaddr
        # Exceptions: what _exception decides by the exception bitmap and the
        # #PF error-code mask and match (SDM Vol. 3C 26.2, 25.6.3)
        pol.exc_mode = 1
        pol.exc_bitmap = self._ctl(F.EXCEPTION_BITMAP)
        pol.pf_mask = self._ctl(F.PAGE_FAULT_ERROR_CODE_MASK)
        pol.pf_match = self._ctl(F.PAGE_FAULT_ERROR_CODE_MATCH)
        return pol

    def _io_exits(self, port: int, size: int) -> bool:
        p = self._primary()
        if p & _PP.USE_IO_BITMAPS:
            # Any port of the access whose bit is set exits (SDM 26.1.3); a
            # bitmap outside RAM reads as 0 (the native fast path agrees).
            mem = self.vm.mem
            a, b = self._ctl(F.IO_BITMAP_A), self._ctl(F.IO_BITMAP_B)
            for q in range(port, port + size):
                addr, bit = io_bitmap_location(a, b, q & 0xFFFF)
                if mem.contains(addr) and mem.read(addr, 1)[0] >> bit & 1:
                    return True
            return False
        return bool(p & _PP.UNCONDITIONAL_IO_EXITING)

    def _msr_exits(self, msr: int, is_write: bool) -> bool:
        if not self._primary() & _PP.USE_MSR_BITMAPS:
            return True
        loc = msr_bitmap_location(self._ctl(F.MSR_BITMAP), msr, is_write)
        mem = self.vm.mem
        return loc is None or not mem.contains(loc[0]) or bool(mem.read(loc[0], 1)[0] >> loc[1] & 1)

    def _cr_access(self, mex: CrExit) -> Outcome:
        p = self._primary()
        v = self.vmcs
        cpu = self.cpu
        gpr = Gpr(mex.gpr)
        if mex.access_type == 0:
            exits = False
            # the source operand: 64 bits in 64-bit mode, else the low 32 (SDM Vol. 2B MOV)
            source = mex.value if cpu.mode_bits == 64 else mex.value & 0xFFFFFFFF
            if mex.cr in (0, 4):
                mask = v.read(F.CR0_GUEST_HOST_MASK if mex.cr == 0 else F.CR4_GUEST_HOST_MASK)
                shadow = v.read(F.CR0_READ_SHADOW if mex.cr == 0 else F.CR4_READ_SHADOW)
                exits = bool((source ^ shadow) & mask)
            elif mex.cr == 3:
                if p & _PP.CR3_LOAD_EXITING:
                    targets = [v.read(F.CR3_TARGET_VALUE0 + 2 * i) for i in range(min(v.read(F.CR3_TARGET_COUNT), 4))]
                    exits = source not in targets
            elif mex.cr == 8:
                exits = bool(p & _PP.CR8_LOAD_EXITING)
            if exits:
                q = CrAccessQualification(cr=mex.cr, access_type=CrAccessType.MOV_TO_CR, gpr=gpr)
                return Intercepted(self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q))
            if mex.cr not in (0, 4):
                sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
                return HANDLED
            # SDM Vol. 3C 26.3 "MOV to CR0"/"MOV to CR4": bits set in the
            # guest/host mask are not modified (the guest's value for them
            # matched the read shadow, or it would have exited).  The guest's
            # value is checked as the MOV checks it; the owned bits are then
            # put back.
            real = cpu.regs.cr0 if mex.cr == 0 else cpu.regs.cr4
            value = mex.value if cpu.mode_bits == 64 else mex.value & 0xFFFFFFFF
            nested = getattr(self.vm, "nested", None)
            if (nested is not None and nested.l2 is self and cpu.cpl == 0 and not nested.cr_value_supported(
                    mex.cr, (value & ~mask) | (real & mask),
                    unrestricted=bool(self._secondary() & _SP.UNRESTRICTED_GUEST))):
                # L2 is in VMX operation too: the fixed bits hold (24.8); a
                # fault of the instruction, which the exception bitmap decides (26.2).
                return self._exception(ExceptionExit(rip=cpu.regs.rip, vector=x86.GP, error_code=0))
            sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
            if mask:
                now = cpu.regs.cr0 if mex.cr == 0 else cpu.regs.cr4
                kept = (now & ~mask) | (real & mask)
                if kept != now:
                    cpu.write_cr(mex.cr, kept)
            return HANDLED
        if mex.access_type == 1:
            if (mex.cr == 3 and p & _PP.CR3_STORE_EXITING) or \
                    (mex.cr == 8 and p & _PP.CR8_STORE_EXITING):
                q = CrAccessQualification(cr=mex.cr, access_type=CrAccessType.MOV_FROM_CR, gpr=gpr)
                return Intercepted(self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q))
            if mex.cr in (0, 4):
                # MOV from CR0/CR4 returns the read shadow for owned bits (SDM 26.3).
                mask = v.read(F.CR0_GUEST_HOST_MASK if mex.cr == 0 else F.CR4_GUEST_HOST_MASK)
                shadow = v.read(F.CR0_READ_SHADOW if mex.cr == 0 else F.CR4_READ_SHADOW)
                real = cpu.regs.cr0 if mex.cr == 0 else cpu.regs.cr4
                cpu.set_gpr(mex.gpr, (real & ~mask) | (shadow & mask), 8 if cpu.mode_bits == 64 else 4)
                cpu.skip(mex.insn_len)
                return HANDLED
            sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
            return HANDLED
        if mex.access_type == 2:      # CLTS exits if TS is owned and set in the shadow
            if v.read(F.CR0_GUEST_HOST_MASK) & v.read(F.CR0_READ_SHADOW) & x86.CR0_TS:
                q = CrAccessQualification(cr=0, access_type=CrAccessType.CLTS)
                return Intercepted(self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q))
        elif mex.access_type == 3:
            mask, shadow = v.read(F.CR0_GUEST_HOST_MASK), v.read(F.CR0_READ_SHADOW)
            if (mex.value ^ shadow) & mask & 0xF:
                q = CrAccessQualification(cr=0, access_type=CrAccessType.LMSW, lmsw_memory=mex.lmsw_mem,
                                          lmsw_source=mex.value & 0xFFFF)
                return Intercepted(self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q))
        sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
        return HANDLED

    _TRAP_REASONS = {"cpuid": ExitReason.CPUID, "invd": ExitReason.INVD, "rdtsc": ExitReason.RDTSC,
                     "rdtscp": ExitReason.RDTSCP, "rdpmc": ExitReason.RDPMC, "wbinvd": ExitReason.WBINVD,
                     "mwait": ExitReason.MWAIT, "monitor": ExitReason.MONITOR, "pause": ExitReason.PAUSE,
                     "rdrand": ExitReason.RDRAND, "rdseed": ExitReason.RDSEED, "xsetbv": ExitReason.XSETBV}
    _VMX_REASONS = {"vmcall": ExitReason.VMCALL, "vmlaunch": ExitReason.VMLAUNCH, "vmresume": ExitReason.VMRESUME,
                    "vmxoff": ExitReason.VMXOFF, "vmread": ExitReason.VMREAD, "vmwrite": ExitReason.VMWRITE,
                    "vmptrld": ExitReason.VMPTRLD, "vmptrst": ExitReason.VMPTRST, "vmclear": ExitReason.VMCLEAR,
                    "vmxon": ExitReason.VMXON, "invept": ExitReason.INVEPT, "invvpid": ExitReason.INVVPID,
                    "getsec": ExitReason.GETSEC}

    def _trap(self, mex: TrapExit) -> Outcome | None:
        p = self._p
        cpu = self.cpu
        if mex.kind == "invlpg":
            if p & _PP.INVLPG_EXITING:
                return Intercepted(self._make_exit(ExitReason.INVLPG, mex.operand, mex, length=mex.insn_len))
            return None
        if mex.kind == "task":
            return self._far_transfer(mex)
        if mex.kind == "iret":
            r = cpu.regs
            if r.rflags & x86.RFLAGS_NT and r.cr0 & x86.CR0_PE and not r.rflags & x86.RFLAGS_VM \
                    and not r.efer & x86.EFER_LMA:
                # A task switch back to the previous task: VM exit 9, source 1
                # (SDM Vol. 3C 26.4.2, Table 28-2), after its checks.
                try:
                    sel = taskswitch.iret_task_switch(cpu)
                except GuestFault as f:
                    return self._exception(ExceptionExit(rip=r.rip, vector=f.vector, error_code=f.error_code,
                                                         cr2=f.cr2))
                except EptFault as f:
                    return Intercepted(self._ept_exit(f.gpa, f.gla, f.qualification, f.misconfig, mex))
                q = TaskSwitchQualification(selector=sel, source=TaskSwitchSource.IRET)
                return Intercepted(self._make_exit(ExitReason.TASK_SWITCH, q.encode(), mex, length=mex.insn_len,
                                                   decoded=q))
            # Ends (virtual-)NMI blocking (SDM 26.3 "Changes to NMI blocking"); the
            # IRET then runs natively once the trap is disarmed -- or past its
            # site now if the kind stays armed (RFLAGS.NT was 1 at VM entry).
            if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS:
                self.virtual_nmi_blocked = False
            else:
                self.vm.nmi_blocked = False
            self._arm_traps()
            self._armed_for = None
            if "iret" in cpu.trap_kinds:
                out = taskswitch.run_past(cpu, cpu.linear_rip())
                if not isinstance(out, DeadlineExit):
                    res = self.intercept(out)
                    if res is not None:
                        return res
                    from .runloop import platform
                    return platform(self.vm, out)
            return HANDLED
        ctl = _KIND_CONTROL.get(mex.kind)
        if ctl is not None:
            # A kind armed for another level (guest-visible VMX arms the union of
            # L1's and L2's kinds, vmm.nested): it exits only if its control says
            # so (SDM Vol. 3C 26.1.3); otherwise the platform runs it.
            secondary, bit = ctl
            if not (self._secondary() if secondary else p) & bit:
                return None
        if mex.kind == "dr":
            from vmlab.emu.decode import _reg_table
            ops = mex.insn.operands
            from_dr = mex.insn.reg_name(ops[1].reg).startswith("dr")
            dr_op, gpr_op = (ops[1], ops[0]) if from_dr else (ops[0], ops[1])
            q = DrAccessQualification(dr=int(mex.insn.reg_name(dr_op.reg)[2:]), mov_from_dr=from_dr,
                                      gpr=Gpr(_reg_table()[gpr_op.reg][0]))
            return Intercepted(self._make_exit(ExitReason.DR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q))
        if mex.kind == "vmx":
            info, qual = instruction_info(mex.insn, cpu.mode_bits)
            return Intercepted(self._make_exit(self._VMX_REASONS[mex.insn.mnemonic], qual, mex, length=mex.insn_len,
                                               instruction_info=info, decoded=info))
        if mex.kind == "smsw":
            mask, shadow = self.vmcs.read(F.CR0_GUEST_HOST_MASK), self.vmcs.read(F.CR0_READ_SHADOW)
            val = (cpu.regs.cr0 & ~mask) | (shadow & mask)
            op = mex.insn.operands[0]
            from capstone import x86_const as C
            from vmlab.emu.decode import mem_operand_address, set_reg_value
            if op.type == C.X86_OP_MEM:
                cpu.write_linear_int(mem_operand_address(cpu, mex.insn, op), 2, val)
            else:
                set_reg_value(cpu, op.reg, val)
            cpu.skip(mex.insn_len)
            return HANDLED
        if mex.kind == "desc":
            # Descriptor-table exiting (SDM 26.1.3): 46 for LGDT/LIDT/SGDT/SIDT, 47 for LLDT/LTR/SLDT/STR.
            reason = (ExitReason.GDTR_IDTR_ACCESS if mex.insn.mnemonic in ("lgdt", "lidt", "sgdt", "sidt")
                      else ExitReason.LDTR_TR_ACCESS)
            info, qual = instruction_info(mex.insn, cpu.mode_bits)
            return Intercepted(self._make_exit(reason, qual, mex, length=mex.insn_len, instruction_info=info,
                                               decoded=info))
        if mex.kind == "invpcid":
            # SDM 26.1.3 / 26.3: #UD unless "enable INVPCID"; exits if INVLPG exiting too.
            s2 = self._secondary()
            if not s2 & _SP.ENABLE_INVPCID:
                return self.deliver(Event(x86.UD))
            if p & _PP.INVLPG_EXITING:
                info, qual = instruction_info(mex.insn, cpu.mode_bits)
                return Intercepted(self._make_exit(ExitReason.INVPCID, qual, mex, length=mex.insn_len,
                                                   instruction_info=info, decoded=info))
            self.cpu.invept()
            self.cpu.skip(mex.insn_len)
            return HANDLED
        reason = self._TRAP_REASONS.get(mex.kind)
        if reason is not None:
            info = None
            if mex.kind in ("rdrand", "rdseed"):
                info, _ = instruction_info(mex.insn, cpu.mode_bits)
            return Intercepted(self._make_exit(reason, 0, mex, length=mex.insn_len, instruction_info=info,
                                               decoded=info))
        return None

    def _bitmap_exits(self, vector: int, error_code: int | None) -> bool:
        v = self._vmcs.mem
        exits = bool(v[_S_EXC_BITMAP] >> vector & 1) if vector < 32 else False
        if vector == x86.PF:
            match = ((error_code or 0) & v[_S_PF_MASK]) == v[_S_PF_MATCH]
            exits = exits if match else not exits
        return exits

    def deliver(self, ev: Event) -> Outcome:
        """Deliver an event in the guest; a fault on the way that the exception
        bitmap intercepts becomes a VM exit with IDT-vectoring information
        (SDM 28.2.4)."""
        ex = self._deliver_or_exit(ev)
        return Intercepted(ex) if ex is not None else HANDLED

    def _deliver_or_exit(self, ev: Event):
        try:
            deliver(self.cpu, ev, intercept=lambda first, f: self._bitmap_exits(f.vector, f.error_code),
                    task_gates_exit=True)
        except taskswitch.TaskGateIntercepted as t:
            # A task gate in the IDT: VM exit 9, source 3 (Table 28-2), the event
            # whose delivery met it in the IDT-vectoring information (28.2.4); a
            # software interrupt's RIP is the INT instruction, with its length
            # (28.2.5).
            first = t.event
            length = 0
            if first.software or first.icebp:
                length = 2 if first.software and (first.int_n or first.vector not in (x86.BP, x86.OF)) else 1
                self.cpu.set_rip(self.cpu.regs.rip - length)
                self.cpu.flush()
            q = TaskSwitchQualification(selector=t.selector, source=TaskSwitchSource.TASK_GATE_IN_IDT)
            ex = self._make_exit(ExitReason.TASK_SWITCH, q.encode(), None, length=length, decoded=q)
            self.vmcs.mem[_S_IDT_INFO] = _event_info(first).encode()
            if first.error_code is not None:
                self.vmcs.mem[_S_IDT_EC] = first.error_code
            return ex
        except DeliveryIntercepted as di:
            first, f = di.event, di.fault
            vinfo = _event_info(first)
            info = InterruptionInfo.hardware_exception(f.vector, deliver_error_code=f.error_code is not None)
            length = 0
            if first.software or first.icebp:
                # Saved RIP is the INT n / INT3 / INTO / INT1 itself, with its length
                # in the VM-exit instruction-length field (SDM 28.2.4, 28.2.5).
                length = 2 if first.software and (first.int_n or first.vector not in (x86.BP, x86.OF)) else 1
                self.cpu.set_rip(self.cpu.regs.rip - length)
                self.cpu.flush()
            ex = self._make_exit(ExitReason.EXCEPTION_NMI, f.cr2 if f.vector == x86.PF and f.cr2 is not None else 0,
                                 None, interruption=info, error_code=f.error_code, length=length)
            self.vmcs.mem[_S_IDT_INFO] = vinfo.encode()
            if first.error_code is not None:
                self.vmcs.mem[_S_IDT_EC] = first.error_code
            return ex
        except TripleFault:
            return self._make_exit(ExitReason.TRIPLE_FAULT, 0, None)
        except EptFault as f:
            # An EPT violation while delivering an event: IDT-vectoring information
            # says which (SDM 28.2.4).
            ex = self._ept_exit(f.gpa, f.gla, f.qualification, f.misconfig, None)
            self.vmcs.mem[_S_IDT_INFO] = _event_info(ev).encode()
            if ev.error_code is not None:
                self.vmcs.mem[_S_IDT_EC] = ev.error_code
            return ex
        return None

    def _ept_exit(self, gpa, gla, qual, misconfig, mex):
        """EPT violation (48) with the Table 28-7 qualification, guest-physical and
        (when bit 7 says so) guest-linear address; or EPT misconfiguration (49)."""
        if misconfig:
            return self._make_exit(ExitReason.EPT_MISCONFIG, 0, mex, gpa=gpa)
        from .qualification import EptViolationQualification
        q = EptViolationQualification.decode(qual & EptViolationQualification.defined_mask())
        return self._make_exit(ExitReason.EPT_VIOLATION, qual, mex, gpa=gpa, decoded=q,
                               gla=gla if qual & (1 << 7) else None)

    def _far_transfer(self, mex: TrapExit) -> Outcome:
        """A far JMP/CALL (trap kind "task", armed in every non-root
        operation): a task switch is a VM exit whatever the controls (SDM Vol.
        3C 26.4.2 "Treatment of Task Switches"), reason 9 with the Table 28-2
        qualification (bits 15:0 the new TSS's selector, bits 31:30 the source:
        0 CALL, 2 JMP) and the instruction's length (28.2.5), before the
        instruction changes anything (GUEST_RIP is the JMP's).  The checks
        26.4.2 puts first fault as they would outside VMX (the exception
        bitmap then decides); any other far transfer runs natively."""
        cpu = self.cpu
        try:
            ts = taskswitch.far_task_switch(cpu, mex.insn)
        except GuestFault as f:
            return self._exception(ExceptionExit(rip=cpu.regs.rip, vector=f.vector, error_code=f.error_code,
                                                 cr2=f.cr2))
        except EptFault as f:
            return Intercepted(self._ept_exit(f.gpa, f.gla, f.qualification, f.misconfig, mex))
        if ts is not None:
            q = TaskSwitchQualification(selector=ts[0], source=TaskSwitchSource(ts[1]))
            return Intercepted(self._make_exit(ExitReason.TASK_SWITCH, q.encode(), mex, length=mex.insn_len,
                                               decoded=q))
        out = taskswitch.run_past(cpu, cpu.linear_rip())
        if isinstance(out, DeadlineExit):
            return HANDLED
        # The native run ended in a fault, an EPT exit…: decided as any exit
        # (one level: ``out`` is never a far-transfer trap).
        res = self.intercept(out)
        if res is not None:
            return res
        from .runloop import platform
        return platform(self.vm, out)

    def _exception(self, mex: ExceptionExit) -> Outcome:
        """Exception bitmap (with the #PF error-code mask/match, SDM 26.2)."""
        vec = mex.vector
        exits = self._bitmap_exits(vec, mex.error_code)
        if mex.software and (mex.int_n or vec not in (x86.BP, x86.OF)):
            exits = False                  # INT n (also INT 3) is not an exception (software interrupt)
        if not exits:
            return self.deliver(Event(vec, mex.error_code, software=mex.software, cr2=mex.cr2, int_n=mex.int_n))
        # A VM exit instead of delivery: the exception is not in flight (QEMU's
        # old_exception, left set after UC_HOOK_INTR, would make the next
        # contributory fault or #PF a #DF, SDM Vol. 3A 6.15 Table 6-5).
        self.cpu.clear_exception_state()
        if mex.software:
            info = InterruptionInfo.software_exception(vec)
            length = 1                     # INT3 / INTO: INT n never gets here
            self.cpu.set_rip(self.cpu.regs.rip - length)   # RIP of the INT3/INTO instruction itself
            self.cpu.flush()
        else:
            info = InterruptionInfo.hardware_exception(vec, deliver_error_code=mex.error_code is not None)
            length = 0
        qual = mex.cr2 if vec == x86.PF and mex.cr2 is not None else 0
        return Intercepted(self._make_exit(ExitReason.EXCEPTION_NMI, qual, mex, length=length, interruption=info,
                                           error_code=mex.error_code))


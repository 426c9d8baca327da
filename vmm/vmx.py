"""VMX non-root operation: the guest runs under a VMCS and exits to Python handlers.

``VmxGuest`` wraps a :class:`vmm.vm.Vm`.  VM entry checks the VMCS (SDM Vol. 3C
ch. 27), loads the guest-state area into the vCPU, injects the event in the
VM-entry interruption-information field, and runs.  Each exit value of the
machine is then decided by the VMCS controls (SDM Vol. 3C ch. 26, "VMX
Non-Root Operation"): either it is a VM exit — the guest state is saved into
the VMCS, the exit-information fields are filled with the SDM's reason,
qualification, instruction length and interruption information, and the handler
registered for that reason runs — or the machine handles it as on bare metal
(a port write the I/O bitmap lets through goes to the device bus).

    vmx = VmxGuest(vm)
    vmx.vmcs.write(CPU_BASED_VM_EXEC_CONTROL, ...)
    @vmx.handler(ExitReason.CPUID)
    def on_cpuid(exit):
        exit.regs.rax = 0x1234
        exit.skip()                       # resume after the instruction
    ex = vmx.run()                        # next exit without a handler (or STOP)

GPRs other than RSP and RIP are not in the VMCS (SDM 25.4): they stay in the
vCPU, and handlers read and write them through ``exit.regs``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from emu import sensitive, x86
from emu.cpu import EptFault, GuestFault
from emu.events import DeliveryIntercepted, Event, TripleFault, deliver
from emu.exits import (CrExit, DeadlineExit, EptExit, ExceptionExit, Exit, HltExit, InternalErrorExit, IoExit,
                       IrqWindowExit, MmioExit, MsrExit, TrapExit)

from . import vmcs as F
from .capabilities import VmxCapabilities
from .controls import (InterruptionInfo, InterruptionType, PinBasedControls, PrimaryProcBasedControls,
                       SecondaryProcBasedControls)
from .entry_checks import EntryOk, check_vm_entry
from .errors import VmmError
from .exit_reasons import ExitReason
from .insninfo import instruction_info
from .qualification import (AddressSize, CrAccessQualification, CrAccessType, DrAccessQualification, Gpr,
                            InsOutsInfo, IoQualification, SegmentReg)

RESUME, STOP = "resume", "stop"


class _Ints:
    """An IntFlag's members as plain ints (bit tests on every exit; enum
    arithmetic costs ~1 µs a time in CPython 3.11)."""

    def __init__(self, flag):
        for m in flag:
            setattr(self, m.name, int(m))


_PP, _SP, _PIN = _Ints(PrimaryProcBasedControls), _Ints(SecondaryProcBasedControls), _Ints(PinBasedControls)
_ENC_PRIMARY, _ENC_SECONDARY = int(F.CPU_BASED_VM_EXEC_CONTROL), int(F.SECONDARY_VM_EXEC_CONTROL)

_SEG_ORDER = (x86.R_ES, x86.R_CS, x86.R_SS, x86.R_DS, x86.R_FS, x86.R_GS)   # VMCS field order = QEMU order


def ar_to_flags(ar: int) -> int:
    """VMX access rights (SDM Vol. 3C Table 25-2) -> QEMU SegmentCache.flags."""
    if ar & (1 << 16):                     # unusable
        return 0
    return ((ar & 0xFF) << 8) | ((ar & 0xF000) << 8)


def flags_to_ar(flags: int, selector: int, is_cs_or_tr: bool = False) -> int:
    ar = ((flags >> 8) & 0xFF) | ((flags >> 8) & 0xF000)
    if not (flags & x86.DESC_P) or (selector & ~3) == 0 and not is_cs_or_tr and not ar:
        ar |= 1 << 16
    return ar


def _event_info(ev: Event) -> InterruptionInfo:
    """The interruption-information encoding of an event being delivered."""
    if ev.vector == x86.NMI and ev.external:
        return InterruptionInfo.nmi()
    if ev.external:
        return InterruptionInfo.external_interrupt(ev.vector)
    if ev.icebp:
        return InterruptionInfo.privileged_software_exception()
    if ev.software:
        return (InterruptionInfo.software_exception(ev.vector) if ev.vector in (x86.BP, x86.OF)
                else InterruptionInfo.software_interrupt(ev.vector))
    return InterruptionInfo.hardware_exception(ev.vector, deliver_error_code=ev.error_code is not None)


class TrackedVmcs(F.Vmcs):
    """A Vmcs that remembers which fields were written since the last VM entry,
    so VM entry reruns the checks and reloads guest state only when needed."""

    __slots__ = ("dirty", "lazy")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        object.__setattr__(self, "dirty", set())
        object.__setattr__(self, "lazy", None)   # callable that fills deferred guest fields

    def __setattr__(self, name, value):
        if name in ("dirty", "lazy"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def materialize(self) -> None:
        """Store guest-state fields a VM exit deferred (segment state)."""
        fill = self.lazy
        if fill is not None:
            object.__setattr__(self, "lazy", None)
            fill()

    def read(self, encoding: int) -> int:
        if self.lazy is not None and int(encoding) in _LAZY_FIELDS:
            self.materialize()
        return super().read(encoding)

    def snapshot(self, *, nonzero: bool = False):
        self.materialize()
        return super().snapshot(nonzero=nonzero)

    def copy(self):
        self.materialize()
        return super().copy()

    def _store(self, field, value, high=False):
        self.dirty.add(field.encoding)
        super()._store(field, value, high)

    @classmethod
    def wrap(cls, vmcs: F.Vmcs) -> "TrackedVmcs":
        if isinstance(vmcs, cls):
            return vmcs
        t = cls(vmwrite_any_field=vmcs.vmwrite_any_field, revision_id=vmcs.revision_id)
        t._values = dict(vmcs._values)
        t.launch_state = vmcs.launch_state
        t.dirty = set(t._values)
        return t


class VmEntryFailed(VmmError):
    """VMLAUNCH/VMRESUME failed with VMfailValid (error number in ``error``)."""

    def __init__(self, result):
        super().__init__(f"VM entry failed: {result}")
        self.result = result


class GuestRegs:
    """Attribute access to the guest GPRs (rax…r15, rip, rflags) backed by the vCPU's
    bulk register file: no Unicorn call per register."""

    __slots__ = ("_cpu",)
    _GPR = {n: i for i, n in enumerate(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}

    def __init__(self, cpu):
        object.__setattr__(self, "_cpu", cpu)

    def __getattr__(self, name):
        i = GuestRegs._GPR.get(name)
        if i is not None:
            return self._cpu.regs.gpr[i]
        if name in ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer"):
            return getattr(self._cpu.regs, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in GuestRegs._GPR or name in ("rip", "rflags"):
            self._cpu.set_reg(name, value)
        else:
            raise AttributeError(f"{name} is not writable through exit.regs (write the VMCS guest-state field)")


@dataclass
class VmExit:
    """One VM exit as a handler sees it.  ``reason`` (ExitReason) and
    ``qualification`` (the raw exit qualification; ``decoded`` the dataclass of
    vmm.qualification where one exists) mirror what is now in the VMCS."""
    reason: ExitReason
    qualification: int
    vmcs: F.Vmcs
    guest: "VmxGuest"
    decoded: object = None
    instruction_length: int = 0
    entry_failure: bool = False
    machine_exit: Exit | None = None
    action: str = RESUME
    _skipped: bool = field(default=False, repr=False)

    @property
    def regs(self) -> GuestRegs:
        return self.guest.regs

    def skip(self) -> None:
        """Advance GUEST_RIP past the exiting instruction (VM-exit instruction length)."""
        if not self._skipped:
            self.vmcs.write(F.GUEST_RIP, self.vmcs.read(F.GUEST_RIP) + self.instruction_length)
            self._skipped = True

    def inject(self, info: InterruptionInfo, error_code: int | None = None, instruction_length: int = 0) -> None:
        """Queue an event for the next VM entry (VM-entry interruption information)."""
        self.vmcs.write(F.VM_ENTRY_INTR_INFO, info.encode())
        if error_code is not None:
            self.vmcs.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        if instruction_length:
            self.vmcs.write(F.VM_ENTRY_INSTRUCTION_LEN, instruction_length)

    def emulate(self) -> None:
        """Do what the machine does for this exit without VMX (CPUID from the CPU
        model, port I/O to the bus, MSR to the MSR model, HLT…) and skip it."""
        self.guest.emulate(self)

    def stop(self) -> None:
        self.action = STOP


class VmxGuest:
    """A guest in VMX non-root operation over a Vm (see module docstring)."""

    def __init__(self, vm, caps: VmxCapabilities | None = None, vmcs: F.Vmcs | None = None):
        self.vm = vm
        self.cpu = vm.vcpu
        self.caps = caps or VmxCapabilities()
        self._vmcs = TrackedVmcs.wrap(vmcs or self.caps.new_vmcs())
        self.regs = GuestRegs(self.cpu)
        self.handlers: dict[int, Callable] = {}
        self.trace: list[VmExit] = []
        self.record = False
        self._saved: bool | None = None       # guest state in the vCPU matches the VMCS
        self._checked: bool | None = None     # the VMCS passed the entry checks
        self._preempt_deadline: int | None = None
        self.virtual_nmi_blocked = False
        self._armed_for = None
        self._pending_exits: list[VmExit] = []

    @property
    def vmcs(self) -> TrackedVmcs:
        """The current VMCS (writes through it are tracked; assign a Vmcs to replace it)."""
        return self._vmcs

    @vmcs.setter
    def vmcs(self, value: F.Vmcs) -> None:
        self._vmcs = TrackedVmcs.wrap(value)
        self._saved = self._checked = None

    # ------------------------------------------------------------------ handler API
    def handler(self, reason):
        """Decorator registering a handler for an exit reason."""
        def deco(fn):
            self.handlers[int(reason)] = fn
            return fn
        return deco

    def use_default_handlers(self, *reasons) -> None:
        """Handle these reasons (default: CPUID, I/O, RDMSR, WRMSR, HLT, CR access,
        INVLPG) by emulation, so an ordinary guest runs."""
        for r in reasons or (ExitReason.CPUID, ExitReason.IO_INSTRUCTION, ExitReason.RDMSR, ExitReason.WRMSR,
                             ExitReason.HLT, ExitReason.CR_ACCESS, ExitReason.INVLPG, ExitReason.RDTSC):
            self.handlers[int(r)] = VmExit.emulate

    # ------------------------------------------------------------------ controls
    def _ctl(self, enc) -> int:
        return self.vmcs._values.get(enc, 0)

    def _primary(self) -> int:
        return self.vmcs._values.get(_ENC_PRIMARY, 0)

    def _secondary(self) -> int:
        if not self._primary() & _PP.ACTIVATE_SECONDARY_CONTROLS:
            return 0
        return self.vmcs._values.get(_ENC_SECONDARY, 0)

    def _arm_traps(self) -> None:
        """Trap sites follow the controls: only what may exit is armed."""
        from emu.cpu import MACHINE_TRAPS
        p, s = self._primary(), self._secondary()
        kinds = set(MACHINE_TRAPS) | {"cpuid", "vmx", "invd", "xsetbv", "cr_read", "smsw"}
        if self.vm.nmi_blocked or self.virtual_nmi_blocked:
            kinds.add("iret")
        for ctl, names in _TRAPS_BY_PRIMARY:
            if p & ctl:
                kinds |= names
        for ctl, names in _TRAPS_BY_SECONDARY:
            if s & ctl:
                kinds |= names
        if frozenset(kinds) != self.cpu.trap_kinds:
            self.cpu.set_traps(kinds)

    # ------------------------------------------------------------------ state transfer
    def _load_guest_state(self) -> None:
        """VM entry: guest-state area -> vCPU (SDM Vol. 3C 28.3.2)."""
        v, cpu = self.vmcs, self.cpu
        v.materialize()
        cpu.refresh()
        # Order as a CPU entering a mode would: paging off, EFER, CR4, CR3, CR0.
        if cpu.regs.cr0 & x86.CR0_PG:
            cpu.write_cr(0, cpu.regs.cr0 & ~x86.CR0_PG)
        cpu.write_efer(v.read(F.GUEST_IA32_EFER) & ~x86.EFER_LMA)
        cpu.write_cr(4, v.read(F.GUEST_CR4))
        cpu.write_cr(3, v.read(F.GUEST_CR3))
        cpu.write_cr(0, v.read(F.GUEST_CR0))
        segs = {}
        for i, idx in enumerate(_SEG_ORDER):
            segs[idx] = (v.read(F.GUEST_ES_SELECTOR + 2 * i), v.read(F.GUEST_ES_BASE + 2 * i),
                         v.read(F.GUEST_ES_LIMIT + 2 * i), ar_to_flags(v.read(F.GUEST_ES_ACCESS_RIGHTS + 2 * i)))
        segs[6] = (v.read(F.GUEST_LDTR_SELECTOR), v.read(F.GUEST_LDTR_BASE), v.read(F.GUEST_LDTR_LIMIT),
                   ar_to_flags(v.read(F.GUEST_LDTR_ACCESS_RIGHTS)))
        segs[7] = (v.read(F.GUEST_TR_SELECTOR), v.read(F.GUEST_TR_BASE), v.read(F.GUEST_TR_LIMIT),
                   ar_to_flags(v.read(F.GUEST_TR_ACCESS_RIGHTS)))
        cpu.set_descriptor_tables(gdtr=(v.read(F.GUEST_GDTR_BASE), v.read(F.GUEST_GDTR_LIMIT)),
                                  idtr=(v.read(F.GUEST_IDTR_BASE), v.read(F.GUEST_IDTR_LIMIT)))
        cpu.set_rflags(v.read(F.GUEST_RFLAGS))
        cpu.set_reg("rsp", v.read(F.GUEST_RSP))
        cpu.set_rip(v.read(F.GUEST_RIP))
        cpu.load_segments(segs, clear_exception=True)
        cpu.native.tsc_offset = v.read(F.TSC_OFFSET) if self._primary() & _PP.USE_TSC_OFFSETTING else 0
        self._saved = True

    def _save_guest_state(self) -> None:
        """VM exit: vCPU -> guest-state area (SDM Vol. 3C 28.3).  RIP, RSP,
        RFLAGS, control registers and EFER are stored now; segment and
        descriptor-table state when the VMCS is first read (it is only in the
        vCPU until then).  Values are in range by construction."""
        r = self.cpu.regs
        vals = self.vmcs._values
        vals[_E_RIP], vals[_E_RSP], vals[_E_RFLAGS] = r.rip, r.gpr[4], r.rflags
        vals[_E_CR0], vals[_E_CR3], vals[_E_CR4], vals[_E_EFER] = r.cr0, r.cr3, r.cr4, r.efer
        intr = vals.get(_E_INTR, 0) & ~(1 << 3)
        blocked = self.virtual_nmi_blocked if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS \
            else self.vm.nmi_blocked
        vals[_E_INTR] = intr | (8 if blocked else 0)      # bit 3: blocking by NMI (Table 25-3)
        self.vmcs.lazy = self._save_segment_state
        self._saved = True
        if self._preempt_deadline is not None and self._ctl(int(F.VM_EXIT_CONTROLS)) & (1 << 22):
            # "save VMX-preemption timer value" (SDM 28.3.4)
            rate = self.caps.misc & 0x1F
            vals[int(F.VMX_PREEMPTION_TIMER_VALUE)] = max(0, self._preempt_deadline - self.cpu.native.icount) >> rate

    def _save_segment_state(self) -> None:
        r = self.cpu.regs
        d = {F.GUEST_GDTR_BASE: r.gdtr_base, F.GUEST_GDTR_LIMIT: r.gdtr_limit,
             F.GUEST_IDTR_BASE: r.idtr_base, F.GUEST_IDTR_LIMIT: r.idtr_limit}
        for i, idx in enumerate(_SEG_ORDER):
            sg = r.seg[idx]
            d[F.GUEST_ES_SELECTOR + 2 * i] = sg.selector
            d[F.GUEST_ES_BASE + 2 * i] = sg.base
            d[F.GUEST_ES_LIMIT + 2 * i] = sg.limit
            d[F.GUEST_ES_ACCESS_RIGHTS + 2 * i] = flags_to_ar(sg.flags, sg.selector, idx == x86.R_CS)
        for sel, base, lim, ar, sg, cs_tr in ((F.GUEST_LDTR_SELECTOR, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT,
                                               F.GUEST_LDTR_ACCESS_RIGHTS, r.ldtr, False),
                                              (F.GUEST_TR_SELECTOR, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT,
                                               F.GUEST_TR_ACCESS_RIGHTS, r.tr, True)):
            d[sel], d[base], d[lim], d[ar] = sg.selector, sg.base, sg.limit, flags_to_ar(sg.flags, sg.selector, cs_tr)
        self.vmcs._values.update({int(k): v for k, v in d.items()})

    # ------------------------------------------------------------------ VM entry
    def launch(self) -> None:
        """VMLAUNCH semantics: checks (VMfailValid raises VmEntryFailed), then load."""
        self._enter()

    def _needs_checks(self) -> bool:
        """Rerun the ch. 27 checks unless only GUEST_RIP/GUEST_RSP or exit
        information were written since the last entry that passed them (state
        the CPU produced itself is valid by construction)."""
        return self._checked is None or bool(self.vmcs.dirty - _CHEAP_FIELDS)
    def _enter(self) -> VmExit | None:
        if not self._needs_checks():
            result = EntryOk()
        else:
            result = check_vm_entry(self.vmcs, self.caps)
            if isinstance(result, EntryOk):
                self._checked = True
        if not isinstance(result, EntryOk):
            if hasattr(result, "exit_reason"):
                # Failed entry due to guest state: a VM exit with bit 31 (SDM 27.8).
                from .entry_checks import fill_entry_failure
                fill_entry_failure(self.vmcs, result)
                return VmExit(ExitReason(result.exit_reason & 0xFFFF), self.vmcs.read(F.EXIT_QUALIFICATION),
                              self.vmcs, self, entry_failure=True)
            raise VmEntryFailed(result)
        self._load_guest_state_if_changed()
        ctl = (self._ctl(F.CPU_BASED_VM_EXEC_CONTROL), self._ctl(F.SECONDARY_VM_EXEC_CONTROL),
               self.vm.nmi_blocked, self.virtual_nmi_blocked)
        if ctl != self._armed_for:
            self._arm_traps()
            self._armed_for = ctl
        self.cpu.set_ept(self._ctl(int(F.EPT_POINTER)) if self._secondary() & _SP.ENABLE_EPT else None)
        self.vmcs.dirty.clear()
        self._arm_preemption_timer()
        self._inject_from_entry_field()
        return None

    def _inject_from_entry_field(self) -> None:
        raw = self.vmcs.read(F.VM_ENTRY_INTR_INFO)
        if not raw & (1 << 31):
            return
        info = InterruptionInfo.decode(raw)
        self.vmcs._values[int(F.VM_ENTRY_INTR_INFO)] = raw & ~(1 << 31)
        ec = self.vmcs.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if info.deliver_error_code else None
        cpu = self.cpu
        t = info.type
        if t in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION,
                 InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION):
            # RIP of a software event points after the instruction (SDM 27.6.1.1).
            cpu.skip(self.vmcs.read(F.VM_ENTRY_INSTRUCTION_LEN))
        ev = Event(info.vector, ec, software=t in (InterruptionType.SOFTWARE_INTERRUPT,
                                                   InterruptionType.SOFTWARE_EXCEPTION),
                   external=t in (InterruptionType.EXTERNAL_INTERRUPT, InterruptionType.NMI),
                   icebp=t == InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION)
        ex = self._deliver(ev)
        if t == InterruptionType.NMI:
            if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS:
                self.virtual_nmi_blocked = True
            else:
                self.vm.nmi_blocked = True
            self._arm_traps()
            self._armed_for = None
        if ex is not None:
            self._pending_exits.append(ex)

    # ------------------------------------------------------------------ run
    def run(self, max_insns: int | None = None) -> VmExit:
        """Enter the guest and run until a VM exit has no handler, a handler
        stops, or the instruction limit is reached (returned as None reason)."""
        vm, cpu = self.vm, self.cpu
        failed = self._enter()
        if failed is not None:
            return failed
        limit = cpu.native.icount + max_insns if max_insns is not None else None
        while True:
            if self._pending_exits:
                ex = self._pending_exits.pop(0)
            else:
                vm.timers.run_expired(vm.now_ns())
                ex = self._external_interrupt_exit() or self._preemption_timer_exit()
                if ex is None:
                    deadline = cpu.native.icount + 50_000_000
                    nxt = vm.timers.next_deadline()
                    if nxt is not None:
                        deadline = min(deadline, max(nxt, cpu.native.icount + 1))
                    if self._preempt_deadline is not None:
                        deadline = min(deadline, max(self._preempt_deadline, cpu.native.icount + 1))
                    if limit is not None:
                        if cpu.native.icount >= limit:
                            raise TimeoutError(f"no VM exit within {max_insns} instructions")
                        deadline = min(deadline, limit)
                    mtf = bool(self._primary() & _PP.MONITOR_TRAP_FLAG)
                    mex = cpu.run(deadline, single_step=mtf)
                    ex = self._decide(mex)
                    if ex is None and mtf and isinstance(mex, DeadlineExit):
                        # Monitor trap flag: a VM exit after one instruction (SDM 26.5.2).
                        ex = self._make_exit(ExitReason.MONITOR_TRAP_FLAG, 0, None)
                if ex is None:
                    if vm._stop is not None:
                        stop, vm._stop = vm._stop, None
                        raise VmmError(f"machine stopped in non-root operation: {stop.message}")
                    continue
            if self.record:
                self.trace.append(ex)
            fn = self.handlers.get(int(ex.reason))
            if fn is None:
                return ex
            fn(ex)
            if ex.action == STOP:
                return ex
            failed = self._enter()
            if failed is not None:
                return failed

    def resume(self, max_insns: int | None = None) -> VmExit:
        """VMRESUME after handling a returned exit: same as run()."""
        return self.run(max_insns)

    # ------------------------------------------------------------------ exit decisions
    def _make_exit(self, reason, qual, mex: Exit | None, *, length: int = 0, decoded=None,
                   interruption: InterruptionInfo | None = None, error_code: int | None = None,
                   gla: int | None = None, instruction_info=None, gpa: int | None = None) -> VmExit:
        self._save_guest_state()
        self.vmcs.set_exit_info(int(reason), qual, instruction_length=length, instruction_info=instruction_info,
                                guest_physical_address=gpa,
                                interruption_info=interruption.encode() if interruption else 0,
                                interruption_error_code=error_code, guest_linear_address=gla)
        return VmExit(ExitReason(reason), qual, self.vmcs, self, decoded=decoded, instruction_length=length,
                      machine_exit=mex)

    def _arm_preemption_timer(self) -> None:
        """VMX-preemption timer (SDM 26.5.1): counts down by 1 every 2^X TSC ticks
        (X = IA32_VMX_MISC[4:0]); virtual time here is the TSC."""
        if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.ACTIVATE_PREEMPTION_TIMER:
            rate = self.caps.misc & 0x1F
            self._preempt_deadline = self.cpu.native.icount + (self._ctl(int(F.VMX_PREEMPTION_TIMER_VALUE)) << rate)
        else:
            self._preempt_deadline = None

    def _preemption_timer_exit(self) -> VmExit | None:
        d = self._preempt_deadline
        if d is None or self.cpu.native.icount < d:
            return None
        self._preempt_deadline = None
        self.vmcs._values[int(F.VMX_PREEMPTION_TIMER_VALUE)] = 0
        return self._make_exit(ExitReason.PREEMPTION_TIMER, 0, None)

    def _external_interrupt_exit(self) -> VmExit | None:
        vm = self.vm
        if vm.init_pending:
            # INIT signals always cause a VM exit in non-root operation (SDM 26.2).
            vm.init_pending = False
            return self._make_exit(ExitReason.INIT, 0, None)
        pin = PinBasedControls(self._ctl(F.PIN_BASED_VM_EXEC_CONTROL))
        p = self._primary()
        src = vm._pending_interrupt()
        r = self.cpu.regs
        if_open = bool(r.rflags & x86.RFLAGS_IF) and not (r.hflags & x86.HF_INHIBIT_IRQ)
        if p & _PP.INTERRUPT_WINDOW_EXITING:
            if if_open:
                return self._make_exit(ExitReason.INTERRUPT_WINDOW, 0, None)
            self.cpu.native.irq_window = 1
        if p & _PP.NMI_WINDOW_EXITING and not self.virtual_nmi_blocked and not vm.nmi_blocked:
            # The NMI window is open when there is no (virtual-)NMI blocking (SDM 26.7.6).
            return self._make_exit(ExitReason.NMI_WINDOW, 0, None)
        if src is None:
            if not p & _PP.INTERRUPT_WINDOW_EXITING:
                self.cpu.native.irq_window = 0
            return None
        if src == "nmi":
            if pin & _PIN.NMI_EXITING:
                vm.nmi_pending = False
                return self._make_exit(ExitReason.EXCEPTION_NMI, 0, None, interruption=InterruptionInfo.nmi())
            vm.nmi_pending = False
            ex = self._deliver(Event(x86.NMI, external=True))
            vm.nmi_blocked = True
            self._armed_for = None
            self._arm_traps()
            return ex
        if pin & _PIN.EXTERNAL_INTERRUPT_EXITING:
            # An external interrupt exits regardless of RFLAGS.IF (SDM 26.2).
            info = None
            if self._ctl(F.VM_EXIT_CONTROLS) & (1 << 15):          # acknowledge interrupt on exit
                vector = vm.lapic.pending_vector() if src == "lapic" else None
                if src == "lapic":
                    vm.lapic.acknowledge(vector)
                else:
                    vector = vm.pic.acknowledge()
                info = InterruptionInfo.external_interrupt(vector)
            return self._make_exit(ExitReason.EXTERNAL_INTERRUPT, 0, None, interruption=info)
        vm._try_inject()
        return None

    def _decide(self, mex: Exit) -> VmExit | None:
        """Is this machine exit a VM exit under the current controls?  If not,
        handle it like bare metal and return None."""
        p = self._primary()
        vm, cpu = self.vm, self.cpu
        try:
            if isinstance(mex, IoExit):
                if self._io_exits(mex.port, mex.size):
                    q = IoQualification(size=mex.size, direction_in=not mex.is_write, port=mex.port,
                                        string=mex.string, rep=mex.rep, immediate=mex.imm)
                    info = gla = None
                    if mex.string:
                        # INS/OUTS: instruction information (Table 28-8, IA32_VMX_BASIC[54] is set)
                        # and the linear address of the element (SDM 28.2.1).
                        info = InsOutsInfo(AddressSize({2: 0, 4: 1, 8: 2}[mex.addr_size]), SegmentReg(mex.seg))
                        gla = mex.gla
                    return self._make_exit(ExitReason.IO_INSTRUCTION, q.encode(), mex, length=mex.insn_len,
                                           decoded=q, instruction_info=info, gla=gla)
                vm._dispatch(mex)
                return None
            if isinstance(mex, MsrExit):
                if self._msr_exits(mex.msr, mex.is_write):
                    reason = ExitReason.WRMSR if mex.is_write else ExitReason.RDMSR
                    return self._make_exit(reason, 0, mex, length=mex.insn_len)
                vm._dispatch(mex)
                return None
            if isinstance(mex, HltExit):
                if p & _PP.HLT_EXITING and mex.insn_len:
                    return self._make_exit(ExitReason.HLT, 0, mex, length=mex.insn_len)
                vm._halt(mex, None)
                return None
            if isinstance(mex, CrExit):
                return self._cr_access(mex)
            if isinstance(mex, TrapExit):
                return self._trap(mex)
            if isinstance(mex, ExceptionExit):
                return self._exception(mex)
            if isinstance(mex, EptExit):
                return self._ept_exit(mex.gpa, mex.gla, mex.qualification, mex.misconfig, mex)
            if isinstance(mex, (DeadlineExit, IrqWindowExit, MmioExit, InternalErrorExit)):
                vm._dispatch(mex)
                return None
        except GuestFault as f:
            return self._exception(ExceptionExit(rip=cpu.regs.rip, vector=f.vector, error_code=f.error_code,
                                                 cr2=f.cr2))
        except EptFault as f:
            return self._ept_exit(f.gpa, f.gla, f.qualification, f.misconfig, mex)
        vm._dispatch(mex)
        return None

    def _io_exits(self, port: int, size: int) -> bool:
        p = self._primary()
        if p & _PP.USE_IO_BITMAPS:
            # Bitmap A covers ports 0-7FFF, B 8000-FFFF; any byte of the access set exits (SDM 26.1.3).
            for q in range(port, port + size):
                q &= 0xFFFF
                base = self._ctl(F.IO_BITMAP_A) if q < 0x8000 else self._ctl(F.IO_BITMAP_B)
                bit = q & 0x7FFF
                if self.vm.mem.contains(base + bit // 8) and self.vm.mem.read(base + bit // 8, 1)[0] >> (bit & 7) & 1:
                    return True
            return False
        return bool(p & _PP.UNCONDITIONAL_IO_EXITING)

    def _msr_exits(self, msr: int, is_write: bool) -> bool:
        if not self._primary() & _PP.USE_MSR_BITMAPS:
            return True
        base = self._ctl(F.MSR_BITMAP)      # SDM 25.6.9: read-low, read-high, write-low, write-high
        if msr <= 0x1FFF:
            off, bit = 0, msr
        elif 0xC0000000 <= msr <= 0xC0001FFF:
            off, bit = 0x400, msr - 0xC0000000
        else:
            return True
        off += 0x800 if is_write else 0
        addr = base + off + bit // 8
        return not self.vm.mem.contains(addr) or bool(self.vm.mem.read(addr, 1)[0] >> (bit & 7) & 1)

    def _cr_access(self, mex: CrExit) -> VmExit | None:
        p = self._primary()
        v = self.vmcs
        cpu = self.cpu
        gpr = Gpr(mex.gpr)
        if mex.access_type == 0:
            exits = False
            if mex.cr in (0, 4):
                mask = v.read(F.CR0_GUEST_HOST_MASK if mex.cr == 0 else F.CR4_GUEST_HOST_MASK)
                shadow = v.read(F.CR0_READ_SHADOW if mex.cr == 0 else F.CR4_READ_SHADOW)
                exits = bool((mex.value ^ shadow) & mask)
            elif mex.cr == 3:
                if p & _PP.CR3_LOAD_EXITING:
                    targets = [v.read(F.CR3_TARGET_VALUE0 + 2 * i) for i in range(min(v.read(F.CR3_TARGET_COUNT), 4))]
                    exits = mex.value not in targets
            elif mex.cr == 8:
                exits = bool(p & _PP.CR8_LOAD_EXITING)
            if exits:
                q = CrAccessQualification(cr=mex.cr, access_type=CrAccessType.MOV_TO_CR, gpr=gpr)
                return self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q)
            sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
            return None
        if mex.access_type == 1:
            if (mex.cr == 3 and p & _PP.CR3_STORE_EXITING) or \
                    (mex.cr == 8 and p & _PP.CR8_STORE_EXITING):
                q = CrAccessQualification(cr=mex.cr, access_type=CrAccessType.MOV_FROM_CR, gpr=gpr)
                return self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q)
            if mex.cr in (0, 4):
                # MOV from CR0/CR4 returns the read shadow for owned bits (SDM 26.3).
                mask = v.read(F.CR0_GUEST_HOST_MASK if mex.cr == 0 else F.CR4_GUEST_HOST_MASK)
                shadow = v.read(F.CR0_READ_SHADOW if mex.cr == 0 else F.CR4_READ_SHADOW)
                real = cpu.regs.cr0 if mex.cr == 0 else cpu.regs.cr4
                cpu.set_gpr(mex.gpr, (real & ~mask) | (shadow & mask), 8 if cpu.mode_bits == 64 else 4)
                cpu.skip(mex.insn_len)
                return None
            sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
            return None
        if mex.access_type == 2:      # CLTS exits if TS is owned and set in the shadow
            if v.read(F.CR0_GUEST_HOST_MASK) & v.read(F.CR0_READ_SHADOW) & x86.CR0_TS:
                q = CrAccessQualification(cr=0, access_type=CrAccessType.CLTS)
                return self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q)
        elif mex.access_type == 3:
            mask, shadow = v.read(F.CR0_GUEST_HOST_MASK), v.read(F.CR0_READ_SHADOW)
            if (mex.value ^ shadow) & mask & 0xF:
                q = CrAccessQualification(cr=0, access_type=CrAccessType.LMSW, lmsw_memory=mex.lmsw_mem,
                                          lmsw_source=mex.value & 0xFFFF)
                return self._make_exit(ExitReason.CR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q)
        sensitive.emulate_cr(cpu, mex, self.vm.cpuid)
        return None

    _TRAP_REASONS = {"cpuid": ExitReason.CPUID, "invd": ExitReason.INVD, "rdtsc": ExitReason.RDTSC,
                     "rdtscp": ExitReason.RDTSCP, "rdpmc": ExitReason.RDPMC, "wbinvd": ExitReason.WBINVD,
                     "mwait": ExitReason.MWAIT, "monitor": ExitReason.MONITOR, "pause": ExitReason.PAUSE,
                     "rdrand": ExitReason.RDRAND, "rdseed": ExitReason.RDSEED, "xsetbv": ExitReason.XSETBV}
    _VMX_REASONS = {"vmcall": ExitReason.VMCALL, "vmlaunch": ExitReason.VMLAUNCH, "vmresume": ExitReason.VMRESUME,
                    "vmxoff": ExitReason.VMXOFF, "vmread": ExitReason.VMREAD, "vmwrite": ExitReason.VMWRITE,
                    "vmptrld": ExitReason.VMPTRLD, "vmptrst": ExitReason.VMPTRST, "vmclear": ExitReason.VMCLEAR,
                    "vmxon": ExitReason.VMXON, "invept": ExitReason.INVEPT, "invvpid": ExitReason.INVVPID,
                    "getsec": ExitReason.GETSEC}

    def _trap(self, mex: TrapExit) -> VmExit | None:
        p = self._primary()
        cpu = self.cpu
        if mex.kind == "invlpg":
            if p & _PP.INVLPG_EXITING:
                return self._make_exit(ExitReason.INVLPG, mex.operand, mex, length=mex.insn_len)
            sensitive.emulate_invlpg(cpu, mex.insn_len)
            return None
        if mex.kind == "iret":
            # Ends (virtual-)NMI blocking (SDM 26.3 "Changes to NMI blocking"); the
            # IRET then runs natively once the trap is disarmed.
            if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS:
                self.virtual_nmi_blocked = False
            else:
                self.vm.nmi_blocked = False
            self._arm_traps()
            self._armed_for = None
            return None
        if mex.kind == "dr":
            from capstone import x86_const as C
            from emu.decode import _reg_table
            ops = mex.insn.operands
            from_dr = mex.insn.reg_name(ops[1].reg).startswith("dr")
            dr_op, gpr_op = (ops[1], ops[0]) if from_dr else (ops[0], ops[1])
            q = DrAccessQualification(dr=int(mex.insn.reg_name(dr_op.reg)[2:]), mov_from_dr=from_dr,
                                      gpr=Gpr(_reg_table()[gpr_op.reg][0]))
            return self._make_exit(ExitReason.DR_ACCESS, q.encode(), mex, length=mex.insn_len, decoded=q)
        if mex.kind == "vmx":
            info, qual = instruction_info(mex.insn, cpu.mode_bits)
            return self._make_exit(self._VMX_REASONS[mex.insn.mnemonic], qual, mex, length=mex.insn_len,
                                   instruction_info=info, decoded=info)
        if mex.kind == "smsw":
            mask, shadow = self.vmcs.read(F.CR0_GUEST_HOST_MASK), self.vmcs.read(F.CR0_READ_SHADOW)
            val = (cpu.regs.cr0 & ~mask) | (shadow & mask)
            op = mex.insn.operands[0]
            from capstone import x86_const as C
            from emu.decode import mem_operand_address, set_reg_value
            if op.type == C.X86_OP_MEM:
                cpu.write_linear_int(mem_operand_address(cpu, mex.insn, op), 2, val)
            else:
                set_reg_value(cpu, op.reg, val)
            cpu.skip(mex.insn_len)
            return None
        if mex.kind == "desc":
            # Descriptor-table exiting (SDM 26.1.3): 46 for LGDT/LIDT/SGDT/SIDT, 47 for LLDT/LTR/SLDT/STR.
            reason = (ExitReason.GDTR_IDTR_ACCESS if mex.insn.mnemonic in ("lgdt", "lidt", "sgdt", "sidt")
                      else ExitReason.LDTR_TR_ACCESS)
            info, qual = instruction_info(mex.insn, cpu.mode_bits)
            return self._make_exit(reason, qual, mex, length=mex.insn_len, instruction_info=info, decoded=info)
        if mex.kind == "invpcid":
            # SDM 26.1.3 / 26.3: #UD unless "enable INVPCID"; exits if INVLPG exiting too.
            s2 = self._secondary()
            if not s2 & _SP.ENABLE_INVPCID:
                return self._deliver(Event(x86.UD))
            if p & _PP.INVLPG_EXITING:
                info, qual = instruction_info(mex.insn, cpu.mode_bits)
                return self._make_exit(ExitReason.INVPCID, qual, mex, length=mex.insn_len,
                                       instruction_info=info, decoded=info)
            self.cpu.invept()
            self.cpu.skip(mex.insn_len)
            return None
        reason = self._TRAP_REASONS.get(mex.kind)
        if reason is not None:
            info = None
            if mex.kind in ("rdrand", "rdseed"):
                info, _ = instruction_info(mex.insn, cpu.mode_bits)
            return self._make_exit(reason, 0, mex, length=mex.insn_len, instruction_info=info, decoded=info)
        self.vm._dispatch(mex)
        return None

    def _bitmap_exits(self, vector: int, error_code: int | None) -> bool:
        v = self._vmcs._values
        exits = bool(v.get(int(F.EXCEPTION_BITMAP), 0) >> vector & 1) if vector < 32 else False
        if vector == x86.PF:
            match = ((error_code or 0) & v.get(int(F.PAGE_FAULT_ERROR_CODE_MASK), 0)) == \
                v.get(int(F.PAGE_FAULT_ERROR_CODE_MATCH), 0)
            exits = exits if match else not exits
        return exits

    def _deliver(self, ev: Event) -> VmExit | None:
        """Deliver an event in the guest; a fault on the way that the exception
        bitmap intercepts becomes a VM exit with IDT-vectoring information
        (SDM 28.2.4)."""
        try:
            deliver(self.cpu, ev, intercept=lambda first, f: self._bitmap_exits(f.vector, f.error_code))
        except DeliveryIntercepted as di:
            first, f = di.event, di.fault
            vinfo = _event_info(first)
            info = InterruptionInfo.hardware_exception(f.vector, deliver_error_code=f.error_code is not None)
            length = 0
            if first.software or first.icebp:
                # Saved RIP is the INT n / INT3 / INTO / INT1 itself, with its length
                # in the VM-exit instruction-length field (SDM 28.2.4, 28.2.5).
                length = 2 if first.software and first.vector not in (x86.BP, x86.OF) else 1
                self.cpu.set_rip(self.cpu.regs.rip - length)
                self.cpu.flush()
            ex = self._make_exit(ExitReason.EXCEPTION_NMI, f.cr2 if f.vector == x86.PF and f.cr2 is not None else 0,
                                 None, interruption=info, error_code=f.error_code, length=length)
            self.vmcs._values[int(F.IDT_VECTORING_INFO)] = vinfo.encode()
            if first.error_code is not None:
                self.vmcs._values[int(F.IDT_VECTORING_ERROR_CODE)] = first.error_code
            return ex
        except TripleFault:
            return self._make_exit(ExitReason.TRIPLE_FAULT, 0, None)
        except EptFault as f:
            # An EPT violation while delivering an event: IDT-vectoring information
            # says which (SDM 28.2.4).
            ex = self._ept_exit(f.gpa, f.gla, f.qualification, f.misconfig, None)
            self.vmcs._values[int(F.IDT_VECTORING_INFO)] = _event_info(ev).encode()
            if ev.error_code is not None:
                self.vmcs._values[int(F.IDT_VECTORING_ERROR_CODE)] = ev.error_code
            return ex
        return None

    def _ept_exit(self, gpa, gla, qual, misconfig, mex) -> VmExit:
        """EPT violation (48) with the Table 28-7 qualification, guest-physical and
        (when bit 7 says so) guest-linear address; or EPT misconfiguration (49)."""
        if misconfig:
            return self._make_exit(ExitReason.EPT_MISCONFIG, 0, mex, gpa=gpa)
        from .qualification import EptViolationQualification
        q = EptViolationQualification.decode(qual & EptViolationQualification.defined_mask())
        return self._make_exit(ExitReason.EPT_VIOLATION, qual, mex, gpa=gpa, decoded=q,
                               gla=gla if qual & (1 << 7) else None)

    def _exception(self, mex: ExceptionExit) -> VmExit | None:
        """Exception bitmap (with the #PF error-code mask/match, SDM 26.2)."""
        v = self.vmcs
        vec = mex.vector
        bitmap = v.read(F.EXCEPTION_BITMAP)
        exits = bool(bitmap >> vec & 1) if vec < 32 else False
        if vec == x86.PF:
            match = (mex.error_code or 0) & v.read(F.PAGE_FAULT_ERROR_CODE_MASK) == v.read(F.PAGE_FAULT_ERROR_CODE_MATCH)
            exits = exits if match else not exits
        if mex.software and vec not in (x86.BP, x86.OF):
            exits = False                  # INT n is not an exception (software interrupt)
        if not exits:
            return self._deliver(Event(vec, mex.error_code, software=mex.software, cr2=mex.cr2))
        if mex.software:
            info = InterruptionInfo.software_exception(vec)
            length = 1 if vec in (x86.BP, x86.OF) else 2
            self.cpu.set_rip(self.cpu.regs.rip - length)   # RIP of the INT3/INTO instruction itself
            self.cpu.flush()
        else:
            info = InterruptionInfo.hardware_exception(vec, deliver_error_code=mex.error_code is not None)
            length = 0
        qual = mex.cr2 if vec == x86.PF and mex.cr2 is not None else 0
        return self._make_exit(ExitReason.EXCEPTION_NMI, qual, mex, length=length, interruption=info,
                               error_code=mex.error_code)

    # ------------------------------------------------------------------ default emulation
    def emulate(self, ex: VmExit) -> None:
        """Bare-metal semantics for an exit (used by use_default_handlers)."""
        cpu, vm = self.cpu, self.vm
        mex = ex.machine_exit
        self._load_guest_state_if_changed()
        try:
            if ex.reason == ExitReason.CPUID:
                leaf, sub = cpu.regs.gpr[0] & 0xFFFFFFFF, cpu.regs.gpr[1] & 0xFFFFFFFF
                a, b, c, d = vm.cpuid.lookup(leaf, sub)
                for i, val in ((0, a), (3, b), (1, c), (2, d)):
                    cpu.set_gpr(i, val, 4)
                cpu.skip(ex.instruction_length)
            elif ex.reason == ExitReason.HLT:
                vm._halt(HltExit(rip=cpu.regs.rip, insn_len=ex.instruction_length), None)
            elif ex.reason == ExitReason.RDTSC:
                tsc = cpu.icount + cpu.native.tsc_offset
                cpu.set_gpr(0, tsc & 0xFFFFFFFF, 4)
                cpu.set_gpr(2, tsc >> 32 & 0xFFFFFFFF, 4)
                cpu.skip(ex.instruction_length)
            elif mex is not None and not isinstance(mex, (TrapExit, ExceptionExit)):
                vm._dispatch(mex)
            elif isinstance(mex, TrapExit):
                vm._dispatch(mex)
            else:
                raise VmmError(f"no default emulation for {ex.reason.name}")
        except GuestFault as f:
            vm._deliver(Event(f.vector, f.error_code, cr2=f.cr2))
        self._save_guest_state()

    def _load_guest_state_if_changed(self) -> None:
        if _E_INTR in self.vmcs.dirty:
            blocked = bool(self.vmcs._values.get(_E_INTR, 0) & 8)
            if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS:
                self.virtual_nmi_blocked = blocked
            else:
                self.vm.nmi_blocked = blocked
        written = self.vmcs.dirty & _GUEST_STATE_SET
        if self._saved is None or written - {int(F.GUEST_RIP), int(F.GUEST_RSP)}:
            self._load_guest_state()
        elif written:
            v = self.vmcs
            self.cpu.set_rip(v.read(F.GUEST_RIP))   # the common case: a handler skipped
            self.cpu.set_reg("rsp", v.read(F.GUEST_RSP))
        self.vmcs.dirty -= _GUEST_STATE_SET
        # A VM entry with unchanged segment state keeps the vCPU's copy: the
        # deferred save is still valid as long as the guest has not run.


#: guest-state fields: a write to any of them makes VM entry reload the vCPU
_GUEST_STATE_FIELDS = tuple(
    [F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4, F.GUEST_IA32_EFER,
     F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
     F.GUEST_LDTR_SELECTOR, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT, F.GUEST_LDTR_ACCESS_RIGHTS,
     F.GUEST_TR_SELECTOR, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT, F.GUEST_TR_ACCESS_RIGHTS]
    + [F.GUEST_ES_SELECTOR + 2 * i for i in range(6)] + [F.GUEST_ES_BASE + 2 * i for i in range(6)]
    + [F.GUEST_ES_LIMIT + 2 * i for i in range(6)] + [F.GUEST_ES_ACCESS_RIGHTS + 2 * i for i in range(6)])

#: fields whose change alone does not need the VM-entry checks rerun
_CHEAP_FIELDS = frozenset(int(f.encoding) for f in F.FIELDS if f.read_only) | {int(F.GUEST_RIP), int(F.GUEST_RSP)}
_GUEST_STATE_FIELDS = tuple(int(e) for e in _GUEST_STATE_FIELDS)
_GUEST_STATE_SET = frozenset(_GUEST_STATE_FIELDS)

#: trap kinds armed when a control says their instruction exits (SDM Vol. 3C 26.1.3)
_TRAPS_BY_PRIMARY = (
    (_PP.RDTSC_EXITING, {"rdtsc", "rdtscp"}),
    (_PP.MOV_DR_EXITING, {"dr"}),
    (_PP.RDPMC_EXITING, {"rdpmc"}),
    (_PP.MWAIT_EXITING, {"mwait"}),
    (_PP.MONITOR_EXITING, {"monitor"}),
    (_PP.PAUSE_EXITING, {"pause"}),
)
_TRAPS_BY_SECONDARY = (
    (_SP.WBINVD_EXITING, {"wbinvd"}),
    (_SP.DESCRIPTOR_TABLE_EXITING, {"desc"}),
    (_SP.RDRAND_EXITING, {"rdrand"}),
    (_SP.RDSEED_EXITING, {"rdseed"}),
)
_E_RIP, _E_RSP, _E_RFLAGS = int(F.GUEST_RIP), int(F.GUEST_RSP), int(F.GUEST_RFLAGS)
_E_CR0, _E_CR3, _E_CR4, _E_EFER = int(F.GUEST_CR0), int(F.GUEST_CR3), int(F.GUEST_CR4), int(F.GUEST_IA32_EFER)
_E_INTR = int(F.GUEST_INTERRUPTIBILITY_STATE)
#: guest-state fields a VM exit stores only when first read (TrackedVmcs.lazy)
_LAZY_FIELDS = frozenset(int(e) for e in _GUEST_STATE_FIELDS) - {
    _E_RIP, _E_RSP, _E_RFLAGS, _E_CR0, _E_CR3, _E_CR4, _E_EFER}

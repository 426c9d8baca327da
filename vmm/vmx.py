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

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

from vmlab.emu import x86
from vmlab.emu.cpu import _M_RIP, REGS_Q_RIP as _Q_RIP, GuestFault
from vmlab.emu.events import Event, TripleFault, deliver
from vmlab.emu.exits import ExceptionExit, Exit, HltExit, PolicyExit
from vmlab.emu.fastpath import exception_exit
from vmlab.emu.native import ffi, lib

from . import runloop
from . import vmx_msr_areas as msr_areas
from . import vmcs as F
from .vmcs import _as_int
from .capabilities import VmxCapabilities
from .controls import InterruptionInfo, InterruptionType
from .entry_checks import EntryOk, check_vm_entry
from .errors import VmmError
from .exit_reasons import ExitReason
from .runloop import HANDLED, Deliver, Halt, RunResult, Stop, StopReason
from .vmx_intercept import (_ENC_PRIMARY, _ENC_SECONDARY, _PIN, _PP, _REASONS, _SP, _WINDOWS, RESUME,  # noqa: F401
                            STOP, NonRootIntercepts)


_set_attr, _new = object.__setattr__, object.__new__
_vmcs_read, _vmcs_store = F.Vmcs.read, F.Vmcs._store
_refcount = sys.getrefcount
_SEG_ORDER = (x86.R_ES, x86.R_CS, x86.R_SS, x86.R_DS, x86.R_FS, x86.R_GS)   # VMCS field order = QEMU order


def load_paging_state(cpu, cr0: int, cr3: int, cr4: int, efer: int) -> None:
    """Put CR0/CR3/CR4/EFER into the vCPU as a VM entry or exit does, in the
    order a CPU entering a mode would (paging off, EFER, CR4, CR3, CR0).  When
    all four already hold those values (L1 and L2 on one address space) nothing
    is written: the cached translations depend on nothing else."""
    r = cpu.regs
    if (r.cr0, r.cr3, r.cr4, r.efer & ~x86.EFER_LMA) == (cr0, cr3, cr4, efer & ~x86.EFER_LMA):
        return
    if r.cr0 & x86.CR0_PG:
        cpu.write_cr(0, r.cr0 & ~x86.CR0_PG)
    cpu.write_efer(efer & ~x86.EFER_LMA)
    cpu.write_cr(4, cr4)
    cpu.write_cr(3, cr3)
    cpu.write_cr(0, cr0)


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


class TrackedVmcs(F.Vmcs):
    """A Vmcs that remembers which fields were written since the last VM entry,
    so VM entry reruns the checks and reloads guest state only when needed."""

    __slots__ = ("dirty", "cpu_dirty", "lazy")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        object.__setattr__(self, "dirty", set())       # written by the VMM (VMWRITE): checked at entry
        object.__setattr__(self, "cpu_dirty", set())   # changed as the CPU would (skip): valid by construction
        # weakref.WeakMethod of the guest's method that fills deferred guest
        # fields: a weak reference, so the VMCS does not keep its guest (and the
        # guest RAM behind it) alive in a cycle
        object.__setattr__(self, "lazy", None)

    def materialize(self) -> None:
        """Store the guest-state fields a VM exit deferred."""
        ref = self.lazy
        if ref is not None:
            object.__setattr__(self, "lazy", None)
            fill = ref()
            if fill is not None:
                fill()

    def read(self, encoding: int) -> int:
        if self.lazy is not None and int(encoding) in _LAZY_FIELDS:
            self.materialize()
        return _vmcs_read(self, encoding)

    def snapshot(self, *, nonzero: bool = False):
        self.materialize()
        return super().snapshot(nonzero=nonzero)

    def copy(self):
        self.materialize()
        return super().copy()

    def _store(self, field, value, high=False):
        if self.lazy is not None:
            self.materialize()      # a write must not be overwritten by the deferred save
        self.dirty.add(field.encoding)
        _vmcs_store(self, field, value, high)

    @classmethod
    def wrap(cls, vmcs: F.Vmcs) -> "TrackedVmcs":
        if isinstance(vmcs, cls):
            return vmcs
        t = cls(vmwrite_any_field=vmcs.vmwrite_any_field, revision_id=vmcs.revision_id)
        t.mem[:] = vmcs.mem
        t.launch_state = vmcs.launch_state
        t.dirty = set(F.ALL_ENCODINGS)
        return t


@dataclass
class RunStopped:
    """What ``VmxGuest.run()`` returns when the run ended without a VM exit:
    ``result`` is the machine's RunResult (reason LIMIT for the instruction
    limit; DEBUG_EXIT, HALTED, SHUTDOWN, ERROR… when the machine stopped in
    non-root operation).  ``reason`` is None, so ``ex.reason == ExitReason.X``
    is simply false."""
    result: RunResult
    reason: None = None


class VmEntryFailed(VmmError):
    """VMLAUNCH/VMRESUME failed with VMfailValid (error number in ``error``)."""

    def __init__(self, result):
        super().__init__(f"VM entry failed: {result}")
        self.result = result


class GuestRegs:
    """Attribute access to the guest GPRs (rax…r15, rip, rflags) backed by the vCPU's
    bulk register file: no Unicorn call per register.  CR0, CR2, CR3, CR4 and
    EFER read only (a VMM changes them through the VMCS guest-state fields).
    Each register is a property (no __getattr__: see vmm/vmcs.py's fields)."""

    __slots__ = ("_cpu",)
    _GPR = {n: i for i, n in enumerate(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}

    def __init__(self, cpu):
        self._cpu = cpu


def _gpr_property(i: int) -> property:
    def get(self) -> int:
        return self._cpu.regs_q[i]

    def set_(self, value: int) -> None:
        cpu = self._cpu
        cpu.regs_q[i] = value & 0xFFFFFFFFFFFFFFFF      # Vcpu.set_reg, inline
        cpu._dirty |= 1 << i
    return property(get, set_)


def _reg_property(name: str, writable: bool) -> property:
    def get(self) -> int:
        return getattr(self._cpu.regs, name)

    def set_(self, value: int) -> None:
        if not writable:
            raise AttributeError(f"{name} is not writable through exit.regs (write the VMCS guest-state field)")
        self._cpu.set_reg(name, value)
    return property(get, set_)


for _name, _i in GuestRegs._GPR.items():
    setattr(GuestRegs, _name, _gpr_property(_i))
for _name in ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer"):
    setattr(GuestRegs, _name, _reg_property(_name, _name in ("rip", "rflags")))
del _name, _i


#: VmExit._mex of an exit taken by the run loop's lean path: the PolicyExit is
#: built from the fast-path decision when first asked for (VmExit.machine_exit)
_FAST_SITE = object()


class VmExit:
    """One VM exit as a handler sees it.  ``reason`` (ExitReason) and
    ``qualification`` (the raw exit qualification; ``decoded`` the dataclass of
    vmm.qualification where one exists, built when first asked for) mirror
    what is now in the VMCS."""

    __slots__ = ("reason", "qualification", "vmcs", "guest", "_decoded", "instruction_length", "entry_failure",
                 "_mex", "action", "_skipped")

    def __init__(self, reason: ExitReason, qualification: int, vmcs: F.Vmcs, guest: "VmxGuest", decoded=None,
                 instruction_length: int = 0, entry_failure: bool = False, machine_exit: Exit | None = None,
                 action: str = RESUME):
        self.reason, self.qualification, self.vmcs, self.guest = reason, qualification, vmcs, guest
        self._decoded, self.instruction_length, self.entry_failure = decoded, instruction_length, entry_failure
        self._mex, self.action, self._skipped = machine_exit, action, False

    @property
    def machine_exit(self) -> Exit | None:
        """The machine exit behind this VM exit (None for exits with none, such
        as the preemption timer).  An exit the run loop's lean path took builds
        it when first asked for, from the fast-path decision it came from."""
        mex = self._mex
        if mex is _FAST_SITE:
            mex = self._mex = self.guest.policy_exit()
        return mex

    @machine_exit.setter
    def machine_exit(self, value: Exit | None) -> None:
        self._mex = value

    @property
    def decoded(self):
        d = self._decoded
        if d is None:
            if self.reason == ExitReason.IO_INSTRUCTION:
                from .qualification import IoQualification
                d = self._decoded = IoQualification.decode(self.qualification)
            elif self.reason == ExitReason.CR_ACCESS:
                from .qualification import CrAccessQualification
                d = self._decoded = CrAccessQualification.decode(self.qualification)
        return d

    def __repr__(self) -> str:
        return (f"VmExit(reason={self.reason!r}, qualification={self.qualification:#x}, "
                f"instruction_length={self.instruction_length}, entry_failure={self.entry_failure}, "
                f"decoded={self.decoded!r})")

    @property
    def regs(self) -> GuestRegs:
        return self.guest.regs

    def skip(self) -> None:
        """Advance GUEST_RIP past the exiting instruction (VM-exit instruction length)."""
        if not self._skipped:
            self._skipped = True
            v = self.vmcs
            cpu = self.guest.cpu
            if v.lazy is not None and v is self.guest._vmcs:
                # Guest state not stored yet: it is still the vCPU's (Vcpu.set_rip,
                # inline, through the register file's memoryview)
                q = cpu.regs_q
                q[_Q_RIP] = (q[_Q_RIP] + self.instruction_length) & 0xFFFFFFFFFFFFFFFF
                cpu._dirty |= _M_RIP
                return
            if isinstance(v, TrackedVmcs):
                m = v.mem
                m[_S_RIP] = (m[_S_RIP] + self.instruction_length) & 0xFFFFFFFFFFFFFFFF
                v.cpu_dirty.add(_E_RIP)
            else:
                v.write(F.GUEST_RIP, v.read(F.GUEST_RIP) + self.instruction_length)

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


class VmxGuest(NonRootIntercepts):
    """A guest in VMX non-root operation over a Vm (see module docstring)."""

    def __init__(self, vm, caps: VmxCapabilities | None = None, vmcs: F.Vmcs | None = None):
        self.vm = vm
        self.cpu = vm.vcpu
        self.caps = caps or VmxCapabilities()
        self._vmcs = TrackedVmcs.wrap(vmcs or self.caps.new_vmcs())
        self.regs = GuestRegs(self.cpu)
        self.handlers: dict[int, Callable] = {}
        #: called for an exit whose reason has no handler (None: run() returns the exit)
        self.default_handler: Callable | None = None
        self.trace: list[VmExit] = []
        self.record = False
        self._saved: bool | None = None       # guest state in the vCPU matches the VMCS
        self._checked: bool | None = None     # the VMCS passed the entry checks
        self._preempt_deadline: int | None = None
        self.virtual_nmi_blocked = False
        self._armed_for = None
        self._pending_exits: list[VmExit] = []
        self._halt_requested = False
        self._lazy_ref = weakref.WeakMethod(self._store_guest_state)
        #: the native fast path's policy (emu/fastpath.py), refreshed at VM entry
        self._fastpath = ffi.new("vmlab_fastpath *")
        self._fastpath.vmcs = self._vmcs.area   # the lean path writes exit information there
        self._fast_key = None                 # the controls _fastpath was built from
        self._exit_nmi_blocked = False
        #: primary processor-based and pin-based controls as of the last VM
        #: entry (a control written since makes the next entry take the full path)
        self._p = self._pin = 0
        #: monitor trap flag: the loop runs one instruction at a time (SDM 26.5.2)
        self.single_step = False
        #: interrupt-window exiting: the native side stops at the next window
        self.wants_irq_window = False
        #: the run loop may take fast-path exits the lean way (``lean_exit``):
        #: set by a full VM entry whose controls ask for nothing between
        #: instructions (no windows, no monitor trap flag, no preemption
        #: timer) and that left no exit pending
        self.lean = False
        #: the exit object lean_exit made last (reused when unreferenced)
        self._lean_ex: VmExit | None = None
        #: the VMCS names MSR-load/store areas (set by a full VM entry): every
        #: entry and exit processes them (SDM 27.4, 28.4, 28.6)
        self._msr_areas = False
        #: a VMX abort at the last exit (an MSR area failed, SDM 28.7): the
        #: run ends with it instead of calling a handler
        self._abort: Stop | None = None

    @property
    def vmcs(self) -> TrackedVmcs:
        """The current VMCS (writes through it are tracked; assign a Vmcs to replace it)."""
        return self._vmcs

    @vmcs.setter
    def vmcs(self, value: F.Vmcs) -> None:
        self._vmcs = TrackedVmcs.wrap(value)
        self._fastpath.vmcs = self._vmcs.area
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
        return self.vmcs.mem[F.slot(enc)]

    def _primary(self) -> int:
        return self.vmcs.mem[_S_PRIMARY]

    def _secondary(self) -> int:
        if not self._primary() & _PP.ACTIVATE_SECONDARY_CONTROLS:
            return 0
        return self.vmcs.mem[_S_SECONDARY]

    def _arm_traps(self) -> None:
        """Trap sites follow the controls: only what may exit is armed."""
        self._set_trap_kinds(self._trap_kinds_needed())

    def _set_trap_kinds(self, kinds: frozenset) -> None:
        if kinds != self.cpu.trap_kinds:
            self.cpu.set_traps(kinds)

    def _trap_kinds_needed(self) -> frozenset:
        """The trap kinds the controls need armed in non-root operation."""
        from vmlab.emu.cpu import MACHINE_TRAPS
        p, s = self._primary(), self._secondary()
        kinds = set(MACHINE_TRAPS) | {"cpuid", "vmx", "invd", "xsetbv", "cr_read", "smsw", "task"}
        if self.vm.nmi_blocked or self.virtual_nmi_blocked or self.cpu.regs.rflags & x86.RFLAGS_NT:
            # IRET ends NMI blocking; with RFLAGS.NT = 1 (as at VM entry) it may
            # switch tasks, which is a VM exit (SDM Vol. 3C 26.4.2)
            kinds.add("iret")
        for ctl, names in _TRAPS_BY_PRIMARY:
            if p & ctl:
                kinds |= names
        for ctl, names in _TRAPS_BY_SECONDARY:
            if s & ctl:
                kinds |= names
        return frozenset(kinds)

    # ------------------------------------------------------------------ state transfer
    def _load_guest_state(self) -> None:
        """VM entry: guest-state area -> vCPU (SDM Vol. 3C 28.3.2).  The fields
        are read from the VMCS area directly (every field here is a valid
        natural-width or 16/32-bit field, whose VMREAD is the stored value)."""
        v, cpu = self.vmcs, self.cpu
        v.materialize()
        cpu.refresh()
        m = v.mem
        load_paging_state(cpu, m[_S_CR0], m[_S_CR3], m[_S_CR4], m[_S_EFER])
        segs = {idx: (m[sel], m[base], m[lim], ar_to_flags(m[ar])) for idx, sel, base, lim, ar in _SEG_SLOTS}
        cpu.set_descriptor_tables(gdtr=(m[_S_GDTR_BASE], m[_S_GDTR_LIMIT]), idtr=(m[_S_IDTR_BASE], m[_S_IDTR_LIMIT]))
        cpu.set_rflags(m[_S_RFLAGS])
        cpu.set_reg("rsp", m[_S_RSP])
        cpu.set_rip(m[_S_RIP])
        cpu.load_segments(segs, clear_exception=True)
        cpu.native.tsc_offset = m[_S_TSC_OFFSET] if self._primary() & _PP.USE_TSC_OFFSETTING else 0
        self._saved = True

    def _save_guest_state(self) -> None:
        """VM exit: vCPU -> guest-state area (SDM Vol. 3C 28.3), deferred: the
        state stays in the vCPU and is stored into the VMCS when a field of it
        is first read or written (TrackedVmcs.lazy), so an exit whose handler
        only skips the instruction stores none of it.  Only what could change
        before that is taken now: NMI blocking and the preemption timer."""
        self._exit_nmi_blocked = (self.virtual_nmi_blocked if self._pin & _PIN.VIRTUAL_NMIS
                                  else self.vm.nmi_blocked)
        object.__setattr__(self._vmcs, "lazy", self._lazy_ref)
        self._saved = True
        if self._preempt_deadline is not None and self._vmcs.mem[_S_EXIT_CTLS] & (1 << 22):
            # "save VMX-preemption timer value" (SDM 28.3.4)
            rate = self.caps.misc & 0x1F
            self._vmcs.mem[_S_PREEMPT_VALUE] = \
                max(0, self._preempt_deadline - self.cpu.native.icount) >> rate

    def _store_guest_state(self) -> None:
        """The deferred part of a VM exit (TrackedVmcs.lazy; the
        exit-information fields are in the VMCS already: the lean path's
        native call wrote them at the exit, ``_make_exit`` at the general
        path's): store the vCPU's state into the
        guest-state area (SDM Vol. 3C 28.3) in one native call on the VMCS
        area (native/vmcs.c ``vmlab_vmcs_store_guest``; twin
        vmm/nested_state.py ``store_guest``): RIP, RSP, RFLAGS, CR0, CR3,
        CR4, EFER, the segment registers with their access rights, GDTR and
        IDTR, and blocking by NMI (interruptibility bit 3, Table 25-3) as at
        the exit."""
        lib.vmlab_vmcs_store_guest(self.cpu.regs, self._vmcs.area, self._exit_nmi_blocked)

    # ------------------------------------------------------------------ VM entry
    def launch(self) -> None:
        """VMLAUNCH semantics: checks (VMfailValid raises VmEntryFailed), then load."""
        self._enter()

    def _rip_only_valid(self) -> bool:
        """Since the last entry that passed the checks, the VMM wrote nothing
        but GUEST_RIP/GUEST_RSP (a hypervisor advancing past an instruction):
        the only checks those fields have (SDM Vol. 3C 27.3.1.4: RIP bits 63:32
        zero unless IA-32e mode guest with CS.L, then canonical; RSP none) are
        made here instead of all of ch. 27."""
        dirty = self._vmcs.dirty
        if not self._checked or not dirty or not dirty <= _RIP_RSP:
            return False
        m = self._vmcs.mem
        rip = m[_S_RIP]
        long_cs = m[_S_ENTRY_CTLS] & (1 << 9) and m[_S_CS_AR] & (1 << 13)
        if not long_cs:
            return rip >> 32 == 0
        top = rip >> (self.caps.linear_address_width - 1)
        return top in (0, (1 << (65 - self.caps.linear_address_width)) - 1)

    def _needs_checks(self) -> bool:
        """Rerun the ch. 27 checks unless nothing but exit information was
        written (VMWRITE) since the last entry that passed them.  State the CPU
        produced itself (an exit's stored state, ``skip``) is valid by
        construction and is tracked apart, in ``cpu_dirty``; a VMM's write of
        GUEST_RIP is checked like any other."""
        return self._checked is None or bool(self.vmcs.dirty - _CHEAP_FIELDS)
    def _enter(self) -> VmExit | None:
        """VM entry (VMLAUNCH/VMRESUME): checks, guest-state load, injection.
        Returns the VM exit of an entry that failed on guest state."""
        vm = self.vm
        dirty = self._vmcs.dirty
        armed = self._armed_for
        if (self._checked and self._saved and not dirty and armed is not None
                and armed[2] == vm.nmi_blocked and armed[3] == self.virtual_nmi_blocked
                and not self._vmcs.mem[_S_ENTRY_INTR] & (1 << 31) and not self._msr_areas):
            # The common re-entry after a handler that at most skipped the
            # instruction: nothing in the VMCS was written since an entry that
            # passed the checks, so only RIP moves (and the preemption timer
            # reloads, SDM 26.5.1).
            cpu_dirty = self._vmcs.cpu_dirty
            if cpu_dirty:
                self.cpu.set_rip(self._vmcs.mem[_S_RIP])
                cpu_dirty.clear()
            if self._preempt_deadline is not None or self._pin & _PIN.ACTIVATE_PREEMPTION_TIMER:
                self._arm_preemption_timer()
            return None
        if not self._needs_checks() or self._rip_only_valid():
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
               self.vm.nmi_blocked, self.virtual_nmi_blocked, bool(self.cpu.regs.rflags & x86.RFLAGS_NT))
        if ctl != self._armed_for:
            self._arm_traps()
            self._armed_for = ctl
        self.cpu.set_ept(self._ctl(int(F.EPT_POINTER)) if self._secondary() & _SP.ENABLE_EPT else None)
        self._p, self._pin = self._primary(), self._vmcs.mem[_S_PIN]
        m = self._vmcs.mem
        fast_key = (self._p, m[_S_SECONDARY], m[_S_IO_A], m[_S_IO_B], m[_S_MSR_BITMAP],
                    *[m[k] for k in _CR_POLICY_SLOTS], id(self.vm.cpuid), self.native_cr)
        if fast_key != self._fast_key:
            # The fast-path policy depends on these controls only (_fast_policy).
            self._fast_policy().to_native(self._fastpath)
            self._fast_key = fast_key
        self.single_step = bool(self._p & _PP.MONITOR_TRAP_FLAG)
        self.wants_irq_window = bool(self._p & _PP.INTERRUPT_WINDOW_EXITING)
        self.vmcs.dirty.clear()
        self._arm_preemption_timer()
        self._msr_areas = self._own_msr_areas and msr_areas.counts_nonzero(m)
        if self._msr_areas:
            # SDM 27.4: the VM-entry MSR-load area, after the guest state is
            # loaded and before event injection; a failing entry n fails the
            # VM entry: exit reason 34 with bit 31, qualification n (27.8),
            # the VM-exit MSR-load area processed, nothing stored.
            n = msr_areas.load_on_entry(self.vm, m, self.caps.misc)
            if n:
                m[_S_X_REASON], m[_S_X_QUAL] = int(ExitReason.ENTRY_FAIL_MSR_LOADING) | (1 << 31), n
                self._msr_exit(store=False)
                return VmExit(ExitReason.ENTRY_FAIL_MSR_LOADING, n, self.vmcs, self, entry_failure=True)
        self._inject_from_entry_field()
        self.lean = (not self._p & (_WINDOWS | _PP.MONITOR_TRAP_FLAG)
                     and not self._pin & _PIN.ACTIVATE_PREEMPTION_TIMER and not self._pending_exits
                     and not self._msr_areas)
        return None

    #: a guest hypervisor's VMCS (vmm/nested.py) processes its MSR areas itself
    _own_msr_areas = True

    def _msr_exit(self, store: bool = True) -> None:
        """The MSR areas of a VM exit: the VM-exit MSR-store area (SDM 28.4,
        after the guest state is saved), then the VM-exit MSR-load area (28.6,
        after the host state, which the Python harness does not model -- the
        vCPU's MSRs take the host values, as on hardware).  A failing entry
        is a VMX abort (28.7: indicator 1 for the store, 4 for the load): the
        run ends in shutdown."""
        vm, vals, misc = self.vm, self._vmcs.mem, self.caps.misc
        n = msr_areas.store_on_exit(vm, vals, misc) if store else 0
        if n:
            self._abort = Stop(StopReason.SHUTDOWN, f"VMX abort (indicator {msr_areas.ABORT_SAVING_GUEST_MSRS}): "
                                                    f"VM-exit MSR-store entry {n} failed")
            return
        n = msr_areas.load_on_exit(vm, vals, misc)
        if n:
            self._abort = Stop(StopReason.SHUTDOWN, f"VMX abort (indicator {msr_areas.ABORT_LOADING_HOST_MSRS}): "
                                                    f"VM-exit MSR-load entry {n} failed")

    def _inject_from_entry_field(self) -> None:
        raw = self.vmcs.read(F.VM_ENTRY_INTR_INFO)
        if not raw & (1 << 31):
            return
        info = InterruptionInfo.decode(raw)
        self.vmcs.mem[_S_ENTRY_INTR] = raw & ~(1 << 31)
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
                   icebp=t == InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
                   int_n=t == InterruptionType.SOFTWARE_INTERRUPT)
        ex = self._deliver_or_exit(ev)
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
    def run(self, max_insns: int | None = None) -> "VmExit | RunStopped":
        """VM entry, then the machine's one run loop with this guest as its
        intercept policy, until a VM exit has no handler or a handler stops
        (that exit is returned).  A failed VM entry returns its exit (reason
        with bit 31).  Guest-caused ends that are not VM exits -- ``max_insns``
        passing without one, or the machine stopping in non-root operation
        (the guest wrote to isa-debug-exit, halted for good, hit something
        vmlab does not model) -- return a :class:`RunStopped` (``reason`` None)
        holding the machine's RunResult; nothing the guest does raises.
        VmEntryFailed (VMfailValid: the VMM's controls or host state are
        invalid) is the VMM's error and is raised."""
        failed = self._enter()
        if failed is not None:
            return failed
        with self.nonroot():
            res = self.vm.run(max_insns=max_insns)
        if res.reason == StopReason.VMEXIT:
            return res.exit
        return RunStopped(res)

    def enter(self) -> "VmExit | None":
        """VM entry (VMLAUNCH/VMRESUME) without running: the ch. 27 checks
        (VMfailValid raises VmEntryFailed), the guest-state load and event
        injection.  Returns the exit of an entry that failed on guest state.
        ``run()`` does this itself; tools that drive the loop (the debugger)
        call it, then run the machine inside ``nonroot()``."""
        return self._enter()

    @contextlib.contextmanager
    def nonroot(self):
        """While the block runs, the machine's run loop treats the vCPU as in
        VMX non-root operation under this guest's VMCS (this guest is the
        loop's intercept policy, its fast-path policy installed)."""
        vm = self.vm
        vm.intercept = self
        self.cpu.fastpath = self._fastpath
        try:
            yield self
        finally:
            vm.intercept = None
            self.cpu.fastpath = None
            self._lean_ex = None          # it refers to this guest: no cycle outlives the run

    def resume(self, max_insns: int | None = None) -> VmExit:
        """VMRESUME after handling a returned exit: same as run()."""
        return self.run(max_insns)

    # ------------------------------------------------------------------ exit decisions
    def lean_begin(self) -> None:
        """The run loop's lean path starts a stint of fast-path exits
        (``lean_exit``): what holds for all of them until one takes the
        general way.  Blocking by NMI, as stored at each of these exits (SDM
        Vol. 3C 28.3.1.5), is what it is now: in the lean state nothing the
        guest runs changes it (an NMI arrives through the general path; IRET
        is trapped while NMIs are blocked and is never a fast-path exit), and
        a handler that changes it fails the re-entry check, which ends the
        stint."""
        vm = self.vm
        self._exit_nmi_blocked = self.virtual_nmi_blocked if self._pin & _PIN.VIRTUAL_NMIS else vm.nmi_blocked
        self._halt_requested = False

    def lean_exit(self, word: int) -> "runloop.Outcome | None":
        """The run loop's lean path (vmm.runloop): the vCPU stopped at a VM
        exit the native fast path decided (``word``: the exit word of
        emu/lean.py, reason, length and qualification; ``_fastpath`` holds
        them too) and nothing else needs the loop.  Does what ``intercept`` +
        ``on_exit`` do for it -- the VM exit (SDM Vol. 3C 28.2: the
        exit-information fields are in the VMCS area already, written by the
        native call at the exit; the guest state is stored when the VMCS is
        first read or written), the handler, VM entry
        -- with one small exit object.  None: not taken here (no handler,
        exits recorded, a debugger's break-exit); the loop takes the general
        path with nothing changed."""
        reason = word & 0xFFFF
        fn = self.handlers.get(reason) or self.default_handler
        vm = self.vm
        if fn is None or self.record or vm.exit_break is not None:
            return None
        # _save_guest_state, deferred (lean_begin took the NMI blocking)
        vmcs = self._vmcs
        ref = self._lazy_ref
        if vmcs.lazy is not ref:
            _set_attr(vmcs, "lazy", ref)
        self._saved = True
        if not reason:
            # An exception (SDM Vol. 3C 28.2.2)
            if word & 0x1E0000:
                # INT3/INTO: GUEST_RIP is the instruction's own (_exception,
                # 28.2.5; the run stopped after it)
                self.cpu.set_rip(self.cpu.regs.rip - ((word >> 17) & 0xF))
        # The exit object of the last lean exit is reused when nothing but
        # this guest holds it (the cache, ``ex`` and getrefcount's argument:
        # 3; a handler that kept it, a RunResult, a trace -- any other
        # reference -- and a new one is made), as CPython's own dict-items
        # and zip iterators reuse their result tuple: an exit no one can see
        # again needs no fresh object.  Every field is set below.
        ex = self._lean_ex
        if ex is None or _refcount(ex) != 3:
            ex = self._lean_ex = _new(VmExit)     # VmExit.__init__'s fields, without its call
        ex.reason = _REASONS[reason]
        ex.qualification = word >> 21
        ex.instruction_length = (word >> 17) & 0xF
        ex.vmcs = vmcs
        ex.guest = self
        ex._decoded = None
        ex.entry_failure = False
        ex._mex = _FAST_SITE
        ex.action = RESUME
        ex._skipped = False
        fn(ex)
        armed = self._armed_for
        if (ex.action == RESUME and not vmcs.dirty and self._vmcs is vmcs and self._checked and armed is not None
                and armed[2] == vm.nmi_blocked and armed[3] == self.virtual_nmi_blocked
                and not self._halt_requested):
            # _enter's common re-entry: nothing written but what the CPU
            # itself changes (``skip``), so only RIP moves.  (No event to
            # inject either: the full entry that set ``lean`` consumed the
            # VM-entry interruption information, and a VMWRITE since would
            # be in ``dirty``.  ``_saved`` holds: only a new VMCS clears it.)
            cpu_dirty = vmcs.cpu_dirty
            if cpu_dirty:
                self.cpu.set_rip(vmcs.mem[_S_RIP])
                cpu_dirty.clear()
            return HANDLED
        # Anything else: the general way, after which the run loop looks
        # again before the next run (the controls, the policy or the
        # machine's events may have changed).
        vm._attend()
        out = self._after_handler(ex)
        if out is not HANDLED and ex._mex is _FAST_SITE:
            ex.machine_exit         # the run may end here: build it while the decision is current
        return out

    def policy_exit(self) -> Exit:
        """The machine exit of the last fast-path decision (``lean_exit``): a
        PolicyExit for a trap site, the ExceptionExit for an exception."""
        f, v = self._fastpath, self.cpu.native
        if f.exit_reason == 0:
            return exception_exit(f, f.exit_rip)
        return PolicyExit(f.exit_rip, f.exit_len, f.exit_reason, f.exit_qual,
                          (v.fault_vaddr, v.fault_paddr, v.fault_error_code))

    def _make_exit(self, reason, qual, mex: Exit | None, *, length: int = 0, decoded=None,
                   interruption: InterruptionInfo | None = None, error_code: int | None = None,
                   gla: int | None = None, instruction_info=None, gpa: int | None = None) -> VmExit:
        """A VM exit: save guest state, fill the exit-information fields (SDM
        28.2; what Vmcs.set_exit_info does, stored directly: the values come
        from the CPU and are in range by construction), build the handler's
        view."""
        self._save_guest_state()
        if self._msr_areas:
            self._msr_exit()
        m = self._vmcs.mem
        m[_S_X_REASON] = int(reason)
        m[_S_X_QUAL] = qual if type(qual) is int else _as_int(qual)
        m[_S_X_INTR_INFO] = interruption.encode() if interruption else 0
        m[_S_X_IDT_INFO] = 0
        m[_S_X_LEN] = length
        if instruction_info is not None:
            m[_S_X_INSN_INFO] = _as_int(instruction_info)
        if gpa is not None:
            m[_S_X_GPA] = gpa
        if gla is not None:
            m[_S_X_GLA] = gla
        if error_code is not None:
            m[_S_X_INTR_EC] = error_code
        return VmExit(reason if type(reason) is ExitReason else ExitReason(reason), qual, self._vmcs, self,
                      decoded, length, False, mex)

    def _arm_preemption_timer(self) -> None:
        """VMX-preemption timer (SDM 26.5.1): counts down by 1 every 2^X TSC ticks
        (X = IA32_VMX_MISC[4:0]); virtual time here is the TSC."""
        if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.ACTIVATE_PREEMPTION_TIMER:
            rate = self.caps.misc & 0x1F
            self._preempt_deadline = self.cpu.native.icount + (self._ctl(int(F.VMX_PREEMPTION_TIMER_VALUE)) << rate)
        else:
            self._preempt_deadline = None

    # ------------------------------------------------------------------ default emulation
    def emulate(self, ex: VmExit) -> None:
        """Bare-metal semantics for an exit (used by use_default_handlers): what
        the platform does with the machine exit behind it (vmm.runloop)."""
        cpu, vm = self.cpu, self.vm
        mex = ex.machine_exit
        self._load_guest_state_if_changed()
        if isinstance(mex, PolicyExit):
            mex = cpu.trap_exit_at(mex)          # the operands, decoded now
        try:
            if ex.reason == ExitReason.CPUID:
                leaf, sub = cpu.regs.gpr[0] & 0xFFFFFFFF, cpu.regs.gpr[1] & 0xFFFFFFFF
                a, b, c, d = vm.cpuid.lookup(leaf, sub)
                for i, val in ((0, a), (3, b), (1, c), (2, d)):
                    cpu.set_gpr(i, val, 4)
                cpu.skip(ex.instruction_length)
                out = HANDLED
            elif ex.reason == ExitReason.HLT:
                out = runloop.platform(vm, HltExit(rip=cpu.regs.rip, insn_len=ex.instruction_length))
            elif ex.reason == ExitReason.RDTSC:
                tsc = cpu.icount + cpu.native.tsc_offset
                cpu.set_gpr(0, tsc & 0xFFFFFFFF, 4)
                cpu.set_gpr(2, tsc >> 32 & 0xFFFFFFFF, 4)
                cpu.skip(ex.instruction_length)
                out = HANDLED
            elif mex is not None and not isinstance(mex, ExceptionExit):
                # vm.vmx_l0: guest-visible VMX (vmm.nested) sees that an L0
                # handler passed the instruction on (its guest is in non-root
                # operation under this VmxGuest).
                vm.vmx_l0 = self
                try:
                    out = runloop.platform(vm, mex)
                finally:
                    vm.vmx_l0 = None
            else:
                raise VmmError(f"no default emulation for {ex.reason.name}")
        except GuestFault as f:
            out = Deliver(Event(f.vector, f.error_code, cr2=f.cr2))
        match out:
            case Deliver(event=ev):
                # Delivered as on bare metal: the L0 handler emulates the guest's CPU.
                try:
                    deliver(cpu, ev)
                except TripleFault as exc:
                    vm.pending_stop = Stop(StopReason.SHUTDOWN, f"triple fault: {exc}")
            case Halt():
                self._halt_requested = True
            case Stop():
                vm.pending_stop = out
        self._save_guest_state()

    def _load_guest_state_if_changed(self) -> None:
        if _E_INTR in self.vmcs.dirty:
            blocked = bool(self.vmcs.mem[_S_INTR] & 8)
            if self._ctl(int(F.PIN_BASED_VM_EXEC_CONTROL)) & _PIN.VIRTUAL_NMIS:
                self.virtual_nmi_blocked = blocked
            else:
                self.vm.nmi_blocked = blocked
        written = (self.vmcs.dirty | self.vmcs.cpu_dirty) & _GUEST_STATE_SET
        if self._saved is None or written - {int(F.GUEST_RIP), int(F.GUEST_RSP)}:
            self._load_guest_state()
        elif written:
            v = self.vmcs
            self.cpu.set_rip(v.read(F.GUEST_RIP))   # the common case: a handler skipped
            self.cpu.set_reg("rsp", v.read(F.GUEST_RSP))
        self.vmcs.dirty -= _GUEST_STATE_SET
        self.vmcs.cpu_dirty.clear()
        # A VM entry with unchanged segment state keeps the vCPU's copy: the
        # deferred save is still valid as long as the guest has not run.

    def close(self) -> None:
        """Close the Vm under this guest (idempotent): its Unicorn engine, native
        state and guest RAM are freed now; later use raises ClosedError."""
        self.vm.close()


#: guest-state fields: a write to any of them makes VM entry reload the vCPU
_GUEST_STATE_FIELDS = tuple(
    [F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4, F.GUEST_IA32_EFER,
     F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
     F.GUEST_LDTR_SELECTOR, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT, F.GUEST_LDTR_ACCESS_RIGHTS,
     F.GUEST_TR_SELECTOR, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT, F.GUEST_TR_ACCESS_RIGHTS]
    + [F.GUEST_ES_SELECTOR + 2 * i for i in range(6)] + [F.GUEST_ES_BASE + 2 * i for i in range(6)]
    + [F.GUEST_ES_LIMIT + 2 * i for i in range(6)] + [F.GUEST_ES_ACCESS_RIGHTS + 2 * i for i in range(6)])

#: fields whose change alone does not need the VM-entry checks rerun
_CHEAP_FIELDS = frozenset(int(f.encoding) for f in F.FIELDS if f.read_only)
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
_E_RIP, _E_RSP = int(F.GUEST_RIP), int(F.GUEST_RSP)
_E_INTR = int(F.GUEST_INTERRUPTIBILITY_STATE)
_RIP_RSP = frozenset({_E_RIP, _E_RSP})
#: guest-state fields a VM exit stores only when first read (TrackedVmcs.lazy)
_LAZY_FIELDS = frozenset(_GUEST_STATE_FIELDS) | {_E_INTR}

# Slots of the VMCS area (vmm/vmcs.py ``slot``) the VMM reads and writes directly.
_S = F.slot
_S_RIP, _S_RSP, _S_RFLAGS = _S(F.GUEST_RIP), _S(F.GUEST_RSP), _S(F.GUEST_RFLAGS)
_S_CR0, _S_CR3, _S_CR4, _S_EFER = _S(F.GUEST_CR0), _S(F.GUEST_CR3), _S(F.GUEST_CR4), _S(F.GUEST_IA32_EFER)
#: (vCPU segment index: 0-5 ES..GS, 6 LDTR, 7 TR; selector, base, limit, access-rights slots)
_SEG_SLOTS = tuple((idx, _S(F.GUEST_ES_SELECTOR + 2 * i), _S(F.GUEST_ES_BASE + 2 * i),
                    _S(F.GUEST_ES_LIMIT + 2 * i), _S(F.GUEST_ES_ACCESS_RIGHTS + 2 * i))
                   for i, idx in enumerate(_SEG_ORDER)) + (
    (6, _S(F.GUEST_LDTR_SELECTOR), _S(F.GUEST_LDTR_BASE), _S(F.GUEST_LDTR_LIMIT), _S(F.GUEST_LDTR_ACCESS_RIGHTS)),
    (7, _S(F.GUEST_TR_SELECTOR), _S(F.GUEST_TR_BASE), _S(F.GUEST_TR_LIMIT), _S(F.GUEST_TR_ACCESS_RIGHTS)))
_S_GDTR_BASE, _S_GDTR_LIMIT = _S(F.GUEST_GDTR_BASE), _S(F.GUEST_GDTR_LIMIT)
_S_IDTR_BASE, _S_IDTR_LIMIT = _S(F.GUEST_IDTR_BASE), _S(F.GUEST_IDTR_LIMIT)
_S_TSC_OFFSET = _S(F.TSC_OFFSET)
_S_IO_A, _S_IO_B, _S_MSR_BITMAP = _S(F.IO_BITMAP_A), _S(F.IO_BITMAP_B), _S(F.MSR_BITMAP)
_S_PRIMARY, _S_SECONDARY = _S(_ENC_PRIMARY), _S(_ENC_SECONDARY)
_S_INTR, _S_ENTRY_INTR, _S_PIN = (_S(F.GUEST_INTERRUPTIBILITY_STATE), _S(F.VM_ENTRY_INTR_INFO),
                                _S(F.PIN_BASED_VM_EXEC_CONTROL))
_S_EXIT_CTLS, _S_PREEMPT_VALUE = _S(F.VM_EXIT_CONTROLS), _S(F.VMX_PREEMPTION_TIMER_VALUE)
_S_ENTRY_CTLS, _S_CS_AR = _S(F.VM_ENTRY_CONTROLS), _S(F.GUEST_CS_ACCESS_RIGHTS)
#: the VMCS fields the fast path's MOV CR and exception decisions follow (vmx_intercept._fast_policy)
_CR_POLICY_SLOTS = tuple(_S(f) for f in (F.CR0_GUEST_HOST_MASK, F.CR0_READ_SHADOW, F.CR4_GUEST_HOST_MASK,
                                         F.CR4_READ_SHADOW, F.CR3_TARGET_COUNT, F.CR3_TARGET_VALUE0,
                                         F.CR3_TARGET_VALUE1, F.CR3_TARGET_VALUE2, F.CR3_TARGET_VALUE3,
                                         F.EXCEPTION_BITMAP, F.PAGE_FAULT_ERROR_CODE_MASK,
                                         F.PAGE_FAULT_ERROR_CODE_MATCH))
_S_X_REASON, _S_X_QUAL, _S_X_INTR_INFO, _S_X_IDT_INFO = (_S(F.VM_EXIT_REASON), _S(F.EXIT_QUALIFICATION),
                                                         _S(F.VM_EXIT_INTR_INFO), _S(F.IDT_VECTORING_INFO))
_S_X_LEN, _S_X_INSN_INFO, _S_X_GPA, _S_X_GLA, _S_X_INTR_EC = (
    _S(F.VM_EXIT_INSTRUCTION_LEN), _S(F.VM_EXIT_INSTRUCTION_INFO), _S(F.GUEST_PHYSICAL_ADDRESS),
    _S(F.GUEST_LINEAR_ADDRESS), _S(F.VM_EXIT_INTR_ERROR_CODE))

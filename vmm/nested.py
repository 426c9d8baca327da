"""Guest-visible VMX: a guest's own hypervisor (L1) runs its guest (L2) on
vmlab's VMCS model.

vmlab is L0.  With ``Vm.enable_nested_vmx()`` the machine advertises VMX
(CPUID.1:ECX.VMX[bit 5], the capability MSRs of the same ``VmxCapabilities``
the Python harness uses, IA32_FEATURE_CONTROL, CR4.VMXE) and traps the guest's
VMX instructions (trap kind ``vmx``), which :class:`NestedVmx` executes as the
SDM's pseudo-code says (Vol. 3C ch. 31, "VMX Instruction Reference"): the
#UD/#GP conditions in their order, then VMsucceed / VMfailInvalid /
VMfailValid(error number) in RFLAGS and the VM-instruction error field.

VMLAUNCH/VMRESUME run L2 in the machine's one run loop with a
:class:`vmm.vmx.VmxGuest` over L1's current VMCS as the intercept policy: the
same VM-entry checks, the same exit decisions by the controls, the same
exit-information fields as the Python harness.  Every VM exit of L2 is then
*reflected* to L1 (SDM 28.5): the guest state is stored into L1's VMCS, the
host-state area is loaded into the vCPU, and L1 resumes at HOST_RIP.  A VM
entry that fails its guest-state checks is a VM exit with bit 31 set
(reason 33/34), reflected the same way; control or host-state failures are
VMfailValid(7/8) and L1 continues after the instruction.

The current VMCS lives in guest memory at the VMPTRLD address, in vmlab's own
layout (below), cached while current and written back on VMCLEAR or when
another VMCS is made current -- as real CPUs do.  Layout (SDM 25.2 leaves all
but the first 8 bytes to the implementation): bytes 0-3 revision identifier
(bit 31: shadow-VMCS indicator), 4-7 VMX-abort indicator, 8 launch state
(vmlab: 1 = launched), 16… one 8-byte value per field of ``vmm.vmcs.FIELDS``
in that order.

How it composes with the Python harness: a ``VmxGuest`` with Python handlers
over the whole machine is L0-over-L1 only; nested VMX is for a guest that has
no Python harness around it.  (Using both at once -- L0 handlers seeing L1's
VMX instructions as exits 18-27, 50, 53 -- is what VmxGuest already does when
its guest executes VMX instructions; it does not emulate them for L1.)
"""
from __future__ import annotations

import collections
import struct
import weakref

from vmlab.emu import x86
from vmlab.emu.cpu import GuestFault
from vmlab.emu.decode import mem_operand_address, reg_value, set_reg_value
from vmlab.emu.events import Event
from vmlab.emu.exits import DeadlineExit, TrapExit
from vmlab.emu.native import ffi, lib

from . import vmcs as F
from .capabilities import VmxCapabilities
from .exit_reasons import VmInstructionError as E
from .runloop import HANDLED, Deliver, Outcome, Stop, StopReason, platform
from .controls import PinBasedControls, PrimaryProcBasedControls, SecondaryProcBasedControls
from .vmx import _CHEAP_FIELDS, TrackedVmcs, VmEntryFailed, VmExit, VmxGuest
from .exit_reasons import ExitReason
from .nested_shadow import VmcsCache
from .nested_state import EFER as LEVEL_EFER, IMAGE_SLOTS, N as LEVEL_N, LevelSwitch, host_image
from .vmx_intercept import REFLECT
from . import vmx_msr_areas as msr_areas

#: layout of a VMCS region in guest memory (see the module docstring)
_OFF_REVISION, _OFF_ABORT, _OFF_LAUNCHED, _OFF_FIELDS = 0, 4, 8, 16
_FIELD_ENCODINGS = tuple(int(f.encoding) for f in F.FIELDS)
_FIELD_SLOTS = tuple(f.slot for f in F.FIELDS)
assert _OFF_FIELDS + 8 * len(_FIELD_ENCODINGS) <= 4096, "the VMCS data must fit a 4 KiB region"

IA32_FEATURE_CONTROL = 0x3A
#: IA32_FEATURE_CONTROL bit 0 (lock) and bit 2 (VMX outside SMX), SDM Vol. 3C 24.7
FC_LOCK, FC_VMX_OUTSIDE_SMX = 1, 1 << 2
INVALID_POINTER = (1 << 64) - 1

#: RFLAGS bits VMX instructions report through (SDM Vol. 3C 31.2)
_CF, _PF, _AF, _ZF, _SF, _OF = 1, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
_ARITH = _CF | _PF | _AF | _ZF | _SF | _OF

# slots of the VMCS area (vmm/vmcs.py ``slot``) read and written directly
_S_EXIT_CTLS = F.slot(F.VM_EXIT_CONTROLS)
_S_TSC_OFFSET = F.slot(F.TSC_OFFSET)
_S_ENTRY_INTR, _S_EPTP = F.slot(F.VM_ENTRY_INTR_INFO), F.slot(F.EPT_POINTER)
_S_PRIMARY, _S_SECONDARY = F.slot(F.CPU_BASED_VM_EXEC_CONTROL), F.slot(F.SECONDARY_VM_EXEC_CONTROL)
#: execution controls (SDM Vol. 3C Tables 25-5, 25-6, 25-7)
_PIN_PREEMPT = int(PinBasedControls.ACTIVATE_PREEMPTION_TIMER)
_PP_SECONDARY = int(PrimaryProcBasedControls.ACTIVATE_SECONDARY_CONTROLS)
_PP_MTF, _PP_IRQ_WINDOW = int(PrimaryProcBasedControls.MONITOR_TRAP_FLAG), int(PrimaryProcBasedControls.INTERRUPT_WINDOW_EXITING)
_SP_ENABLE_EPT = int(SecondaryProcBasedControls.ENABLE_EPT)
_S_PIN, _S_ENTRY_CTLS, _S_CS_AR = (F.slot(F.PIN_BASED_VM_EXEC_CONTROL), F.slot(F.VM_ENTRY_CONTROLS),
                                   F.slot(F.GUEST_CS_ACCESS_RIGHTS))
_ENTRY_IA32E = 1 << 9                 # VM-entry control "IA-32e mode guest" (Table 25-15)

_PP_TSC_OFFSETTING = int(PrimaryProcBasedControls.USE_TSC_OFFSETTING)
_S_ENTRY_MSR_COUNT = F.slot(F.VM_ENTRY_MSR_LOAD_COUNT)
_S_RFLAGS = F.slot(F.GUEST_RFLAGS)


#: hflags bits that send a VMREAD/VMWRITE to the full path: CPL (bits 1:0), an
#: STI/MOV SS shadow (Vcpu.skip ends it), and CS64 must be the only one set
_FAST_HFLAGS = x86.HF_CS64 | 3 | x86.HF_INHIBIT_IRQ


def _register_form(code: bytes):
    """(is_vmwrite, ModRM.reg, ModRM.rm, length) of a VMREAD (0F 78 /r) or
    VMWRITE (0F 79 /r) between registers with at most a REX prefix, else None.
    VMREAD r/m64, r64: the field encoding is in ModRM.reg, the destination in
    ModRM.rm; VMWRITE r64, r/m64: the encoding in ModRM.reg, the value in
    ModRM.rm (SDM Vol. 2B "VMREAD", "VMWRITE"; REX.R and REX.B extend them)."""
    rex, i = 0, 0
    if len(code) == 4 and 0x40 <= code[0] <= 0x4F:
        rex, i = code[0], 1
    if len(code) - i != 3 or code[i] != 0x0F or code[i + 1] not in (0x78, 0x79) or code[i + 2] >> 6 != 3:
        return None
    m = code[i + 2]
    return (code[i + 1] == 0x79, (rex >> 2 & 1) << 3 | (m >> 3 & 7), (rex & 1) << 3 | (m & 7), len(code))


class NestedVmx:
    """L1's VMX operation (see the module docstring)."""

    def __init__(self, vm, caps: VmxCapabilities | None = None):
        self._vm = weakref.ref(vm)
        self.caps = caps or VmxCapabilities.from_cpuid(vm.cpuid)
        self.vmxon: int | None = None          # VMXON region address while in VMX operation
        self.current: int | None = None        # current-VMCS pointer
        self.vmcs = None                       # the current VMCS (cached while current)
        self.l2 = None                         # the VmxGuest while L2 runs
        self._l1_traps = None                  # L1's own trap kinds (as at its first VM entry, no IRET)
        self._guest = None                     # the VmxGuest over the current VMCS (reused)
        self.reflected = 0                     # VM exits reflected to L1 (statistics)
        #: the fields native/nested.c serves while L1 runs (vmm/nested_shadow.py)
        self._cache = VmcsCache(self.caps)
        #: the image buffer of the level switch (vmm/nested_state.py), per vCPU
        self._switch: LevelSwitch | None = None
        #: the VMCS whose L2 state is in the native table's l2_img (stored at its last VM exit)
        self._img_for = None
        #: the host-state image of the last VM exit: (vmcs, _host_gen, EFER, native buffer)
        self._host_img = None
        self._host_gen = 0
        #: VMREAD/VMWRITE sites decoded for the register-form path: id(insn) -> (insn, form)
        self._sites: dict[int, tuple] = {}
        #: encodings VMWRITE may write (full access) -> the field's width mask
        self._write_masks = {int(f.encoding): f.mask for f in F.FIELDS
                             if not f.read_only or self.caps.vmwrite_any_field}
        #: L2's VM exits may be reflected to L1 in C (_arm_reflect); False keeps them in Python
        self.native_reflect = True
        #: the debugger sets it: the last reflected exits are kept in ``trace``
        self.record = False
        self.trace: collections.deque = collections.deque(maxlen=1000)

    @property
    def record(self) -> bool:
        return self._record

    @record.setter
    def record(self, on: bool) -> None:
        # A debugger attached between runs sees every exit from then on: what
        # C was armed to do without Python is not done any more.
        self._record = on
        if on:
            self._disarm_native()

    @property
    def vm(self):
        return self._vm()

    # ------------------------------------------------------------------ VMfail conventions
    def _flags(self, set_bits: int) -> None:
        cpu = self.vm.vcpu
        cpu.set_rflags((cpu.regs.rflags & ~_ARITH) | set_bits)

    def _succeed(self, ex) -> Outcome:
        self._flags(0)
        self.vm.vcpu.skip(ex.insn_len)
        return HANDLED

    def _fail_invalid(self, ex) -> Outcome:
        self._flags(_CF)
        self.vm.vcpu.skip(ex.insn_len)
        return HANDLED

    def _fail(self, ex, error: int) -> Outcome:
        """VMfail(error): VMfailValid with the error number in the current
        VMCS, or VMfailInvalid when there is none (SDM Vol. 3C 31.2)."""
        if self.vmcs is None:
            return self._fail_invalid(ex)
        self.vmcs.set_instruction_error(E(error))
        self._flags(_ZF)
        self.vm.vcpu.skip(ex.insn_len)
        return HANDLED

    # ------------------------------------------------------------------ operands
    def _mem_u64(self, ex) -> int:
        cpu = self.vm.vcpu
        op = ex.insn.operands[0]
        return cpu.read_linear_int(mem_operand_address(cpu, ex.insn, op), 8)

    def _valid_region(self, addr: int) -> bool:
        """4 KiB aligned and within the physical-address width (SDM 31.3)."""
        return not addr & 0xFFF and addr >> self.caps.physical_address_width == 0

    # ------------------------------------------------------------------ VMCS regions
    def _region_revision(self, addr: int) -> int | None:
        mem = self.vm.mem
        if not mem.contains(addr) or not mem.contains(addr + 3):
            return None
        return struct.unpack("<I", mem.read(addr, 4))[0]

    def _write_back(self) -> None:
        """Store the cached current VMCS into its region."""
        if self.vmcs is None or self.current is None:
            return
        v, mem = self.vmcs, self.vm.mem
        v.materialize()
        data = bytearray(_OFF_FIELDS + 8 * len(_FIELD_ENCODINGS))
        struct.pack_into("<I", data, _OFF_REVISION, v.revision_id)
        data[_OFF_LAUNCHED] = 1 if v.launch_state == F.LaunchState.LAUNCHED else 0
        m = v.mem
        for i, k in enumerate(_FIELD_SLOTS):
            struct.pack_into("<Q", data, _OFF_FIELDS + 8 * i, m[k])
        if mem.contains(self.current) and mem.contains(self.current + len(data) - 1):
            mem.write(self.current, bytes(data))

    def _read_region(self, addr: int):
        mem = self.vm.mem
        n = _OFF_FIELDS + 8 * len(_FIELD_ENCODINGS)
        data = mem.read(addr, n) if mem.contains(addr) and mem.contains(addr + n - 1) else bytes(n)
        v = TrackedVmcs(vmwrite_any_field=self.caps.vmwrite_any_field,
                        revision_id=struct.unpack_from("<I", data, _OFF_REVISION)[0] & 0x7FFFFFFF)
        m, written = v.mem, set()
        for i, f in enumerate(F.FIELDS):
            val = struct.unpack_from("<Q", data, _OFF_FIELDS + 8 * i)[0]
            if val:
                m[f.slot] = val & f.mask
                written.add(f.encoding)
        v.launch_state = F.LaunchState.LAUNCHED if data[_OFF_LAUNCHED] == 1 else F.LaunchState.CLEAR
        v.dirty = written
        return v

    # ------------------------------------------------------------------ the instructions
    def instruction(self, ex: TrapExit) -> Outcome:
        """Execute one VMX instruction of L1 (SDM Vol. 3C ch. 31 "Operation").
        The VMREADs and VMWRITEs native/nested.c served since the last one are
        put into the VMCS first; after it, L1 in VMX root operation with a
        current VMCS gets the native table again."""
        vcpu = self.vm.vcpu
        if vcpu.vmx_shadow is not None:
            self._cache.sync()
            vcpu.vmx_shadow = None
        out = self._instruction(ex)
        if self.vmcs is not None and self.l2 is None:
            self._cache_on()
        return out

    def _cache_on(self) -> None:
        """Let native/nested.c serve L1's VMREAD/VMWRITE of the current VMCS
        (vmm/nested_shadow.py) -- not while a debugger or a Python harness
        watches the machine (they see every instruction)."""
        vm = self.vm
        v = self.vmcs
        if (v is None or v.lazy is not None or vm.intercept is not None or getattr(vm, "vmx_l0", None) is not None
                or getattr(vm, "exit_break", None) is not None):
            return
        self._cache.fill(v)
        sh = self._cache.native
        g = self._guest
        if self._img_for is v and g is not None and g._vmcs is v:
            self._arm_resume(v, g, sh)
        vm.vcpu.vmx_shadow = sh

    def _arm_resume(self, v, g, sh) -> None:
        """Let native/nested.c execute L1's next VMRESUME itself
        (vmlab_vmx_resume_ok, whose comment lists what it checks) when what it
        cannot see holds: the VMCS is launched and passed the entry checks at
        its last entry, nothing was written to it since but by the CPU (the
        VM exit that stored l2_img), the trap sites and the fast-path policy
        are those of these controls with NMIs unblocked, no event is to be
        injected, and no control asks for one instruction at a time (monitor
        trap flag), an interrupt window or the preemption timer."""
        vm = self.vm
        m = v.mem
        p = m[_S_PRIMARY]
        if (not g._checked or v.dirty or v.cpu_dirty or v.launch_state != F.LaunchState.LAUNCHED
                or vm.nmi_blocked or g.virtual_nmi_blocked or self._l1_traps is None
                or g._armed_for != (p, m[_S_SECONDARY], False, False, False)
                or m[_S_ENTRY_INTR] >> 31 & 1 or p & (_PP_MTF | _PP_IRQ_WINDOW)
                or m[_S_PIN] & _PIN_PREEMPT or g._preempt_deadline is not None
                or g._pending_exits or g._halt_requested or msr_areas.counts_nonzero(v.mem)):
            return
        sec = m[_S_SECONDARY] if p & _PP_SECONDARY else 0
        long_cs = m[_S_ENTRY_CTLS] & _ENTRY_IA32E and m[_S_CS_AR] & (1 << 13)
        sh.rip_bits = self.caps.linear_address_width if long_cs else 0
        sh.ept_enabled = 1 if sec & _SP_ENABLE_EPT else 0
        sh.eptp = m[_S_EPTP] if sec & _SP_ENABLE_EPT else 0
        sh.tsc_offset = m[_S_TSC_OFFSET] if p & _PP_TSC_OFFSETTING else 0
        sh.l2_fastpath = g._fastpath
        vm.vcpu.vmx_entered = self._entered_natively
        sh.entry_ready = 1
        self._arm_reflect(v, g, sh)

    def _arm_reflect(self, v, g, sh) -> None:
        """Let native/nested.c reflect the VM exits of the L2 it enters
        (vmlab_vmx_reflect_ok and _store, whose comment lists what they do)
        when nothing Python tracks is in the way: no exit recorder or exit
        log, the exit goes to _reflect (no handler of L0's own), no MSR area
        to load or store at the exit or the entry, and the trap sites L1
        needs are armed already (_arm_l1 would change nothing).  The
        host-state image goes with it, built for L2's EFER as last stored."""
        vm = self.vm
        if (not self.native_reflect or self.record or g.record or g.handlers or g.default_handler != self._reflect
                or vm.log.enabled("exits") or msr_areas.counts_nonzero(v.mem)
                or self._l1_traps is None or not self._l1_traps <= vm.vcpu.trap_kinds):
            return
        efer = sh.l2_img[LEVEL_EFER]
        ffi.memmove(sh.host_img, self._host_image(v, efer), 8 * LEVEL_N)
        sh.host_efer = efer
        sh.reflect_ready = 1

    def _disarm_native(self) -> None:
        """The trap sites changed while L1 runs: the next VM entry and the
        exits after it go through Python (which arms them again)."""
        sh = self._cache.native
        sh.entry_ready = sh.reflect_ready = 0

    def _entered_natively(self) -> None:
        """native/nested.c changed the level: it executed L1's VMRESUMEs and
        maybe reflected L2's VM exits to L1 (``reflections``), and L2 runs
        (``in_l2``) or L1 does.  The VMCS gets the table's values (exit
        information, the VMWRITEs the entries consumed; L2's guest state of
        the last reflection C stored into the VMCS area itself) -- then what _vmentry and
        _L2Guest._enter do after the state load (L2's policy), or what
        _reflect does after the host-state load (L1 runs on the table)."""
        vm = self.vm
        cpu = vm.vcpu
        sh = self._cache.native
        g = self._guest
        v = g._vmcs
        n = sh.reflections
        if n:
            sh.reflections = 0
            self.reflected += n
        self._cache.store_all()
        if not sh.in_l2:
            # L1 at HOST_RIP, the table serving it (as _reflect then _cache_on)
            g._saved = None
            self._img_for = v
            self.l2 = None
            vm.intercept = None
            cpu.fastpath = None
            return
        self._cache.sync()
        cpu.vmx_shadow = None
        v.dirty.clear()
        v.cpu_dirty.clear()
        g._saved = True
        self._img_for = None
        self.l2 = g
        vm.intercept = g
        cpu.fastpath = g._fastpath

    def _instruction(self, ex: TrapExit) -> Outcome:
        cpu = self.vm.vcpu
        r = cpu.regs
        insn = ex.insn
        if insn is not None and self.vmcs is not None:
            site = self._sites.get(id(insn))
            if site is None or site[0] is not insn:
                if len(self._sites) > 4096:
                    self._sites.clear()
                site = self._sites[id(insn)] = (insn, _register_form(bytes(insn.bytes)))
            if site[1] is not None and (r.hflags & _FAST_HFLAGS) == x86.HF_CS64 and r.cr4 & x86.CR4_VMXE:
                out = self._fast_vmread_vmwrite(cpu, r, site[1])
                if out is not None:
                    return out
        name = insn.mnemonic if insn is not None else ""
        # Common #UD conditions: not in VMX operation (except VMXON), CR4.VMXE
        # clear, real/virtual-8086 mode, compatibility mode.
        if not r.cr0 & x86.CR0_PE or r.rflags & x86.RFLAGS_VM or not r.cr4 & x86.CR4_VMXE:
            return Deliver(Event(x86.UD))
        if r.efer & x86.EFER_LMA and not r.hflags & x86.HF_CS64:
            return Deliver(Event(x86.UD))
        if name == "vmxon":
            return self._vmxon(ex)
        if self.vmxon is None:
            return Deliver(Event(x86.UD))
        if name == "vmcall":
            # VMCALL in VMX root operation without the dual-monitor treatment:
            # VMfail(VMCALL executed in VMX root operation).
            return self._fail(ex, E.VMCALL_IN_VMX_ROOT)
        if cpu.cpl != 0:
            return Deliver(Event(x86.GP, 0))
        try:
            match name:
                case "vmxoff":
                    self._write_back()
                    self.vmxon = self.current = self.vmcs = self._guest = None
                    if self._l1_traps is not None:
                        # Back to L1's own trap kinds: no L2 to share them with.
                        self._arm_l1(union=False)
                        self._l1_traps = None
                    return self._succeed(ex)
                case "vmclear":
                    return self._vmclear(ex)
                case "vmptrld":
                    return self._vmptrld(ex)
                case "vmptrst":
                    op = insn.operands[0]
                    cpu.write_linear_int(mem_operand_address(cpu, insn, op), 8,
                                         self.current if self.current is not None else INVALID_POINTER)
                    return self._succeed(ex)
                case "vmread":
                    return self._vmread(ex)
                case "vmwrite":
                    return self._vmwrite(ex)
                case "vmlaunch" | "vmresume":
                    return self._vmentry(ex, name == "vmresume")
                case "invept" | "invvpid":
                    return self._invalidate(ex)
                case _:
                    return Deliver(Event(x86.UD))
        except GuestFault as f:
            return Deliver(Event(f.vector, f.error_code, cr2=f.cr2))

    def _fast_vmread_vmwrite(self, cpu, r, form) -> Outcome | None:
        """VMREAD/VMWRITE between registers, in 64-bit mode at CPL 0 with a
        current VMCS, of a field the instruction may access: the Operation
        sections of SDM Vol. 3C 31.3 reduced to what is left once every #UD,
        #GP and VMfail condition is known not to hold (64-bit mode: CR0.PE = 1,
        RFLAGS.VM = 0, CS.L = 1; the 64-bit operand size; the field encoding
        is bits 31:0 of the register, as the full path takes it).  None: take
        the full path (a high access, an unsupported or read-only field, a
        deferred guest-state store)."""
        is_write, reg, rm, length = form
        v = self.vmcs
        if v.lazy is not None:
            return None
        gpr = r.gpr
        enc = gpr[reg] & 0xFFFFFFFF
        if is_write:
            mask = self._write_masks.get(enc)
            if mask is None:
                return None
            v.mem[F.slot(enc)] = gpr[rm] & mask    # Vmcs.write: the value truncated to the field's width
            v.dirty.add(enc)                       # TrackedVmcs: the entry checks see the write
        else:
            if enc not in F.FIELDS_BY_ENCODING:
                return None
            cpu.set_gpr(rm, v.mem[F.slot(enc)], 8)
        cpu.set_rflags(r.rflags & ~_ARITH)         # VMsucceed (SDM 31.2)
        cpu.set_rip(r.rip + length)
        return HANDLED

    def _vmxon(self, ex) -> Outcome:
        vm = self.vm
        cpu = vm.vcpu
        if self.vmxon is not None:
            if cpu.cpl != 0:
                return Deliver(Event(x86.GP, 0))
            return self._fail(ex, E.VMXON_IN_VMX_ROOT)
        r = cpu.regs
        caps = self.caps
        fc = vm.msrs.read(IA32_FEATURE_CONTROL)
        if (cpu.cpl != 0 or (r.cr0 & caps.cr0_fixed0) != caps.cr0_fixed0 or r.cr0 & ~caps.cr0_fixed1
                or (r.cr4 & caps.cr4_fixed0) != caps.cr4_fixed0 or r.cr4 & ~caps.cr4_fixed1
                or not fc & FC_LOCK or not fc & FC_VMX_OUTSIDE_SMX):
            return Deliver(Event(x86.GP, 0))
        try:
            addr = self._mem_u64(ex)
        except GuestFault as f:
            return Deliver(Event(f.vector, f.error_code, cr2=f.cr2))
        if not self._valid_region(addr):
            return self._fail_invalid(ex)
        rev = self._region_revision(addr)
        if rev is None or rev & 0x7FFFFFFF != caps.revision_id or rev >> 31:
            return self._fail_invalid(ex)
        self.vmxon, self.current, self.vmcs = addr, None, None
        return self._succeed(ex)

    # ------------------------------------------------------------------ CR0/CR4 in VMX operation
    def cr_value_supported(self, cr: int, value: int, unrestricted: bool = False) -> bool:
        """May MOV to CR0/CR4 load ``value`` in VMX operation?  SDM Vol. 3C 24.8
        "Restrictions on VMX Operation": "Any attempt to set one of these bits
        to an unsupported value while in VMX operation (including VMX root
        operation) using any of the CLTS, LMSW, or MOV CR instructions causes a
        general-protection exception."  The supported values are those of
        IA32_VMX_CR0_FIXED0/FIXED1 and IA32_VMX_CR4_FIXED0/FIXED1 (App. A.7,
        A.8): a bit 1 in FIXED0 must be 1, a bit 0 in FIXED1 must be 0.  CR4.VMXE
        is fixed to 1 in FIXED0, so it cannot be cleared in VMX operation.
        (LMSW cannot clear PE and CLTS clears only TS, neither fixed here.)
        Outside VMX operation every value the MOV itself allows is fine.
        ``unrestricted``: L2 with "unrestricted guest" may clear CR0.PE and PG
        (A.7: the FIXED0 bits for PE and PG do not apply to it)."""
        if self.vmxon is None or cr not in (0, 4):
            return True
        caps = self.caps
        f0, f1 = (caps.cr0_fixed0, caps.cr0_fixed1) if cr == 0 else (caps.cr4_fixed0, caps.cr4_fixed1)
        if cr == 0 and unrestricted:
            f0 &= ~(x86.CR0_PE | x86.CR0_PG)
        if cr == 0:
            value |= x86.CR0_ET                  # hardwired to 1 (the MOV sets it)
        return (value & f0) == f0 and not value & ~f1 & 0xFFFFFFFF

    def _vmclear(self, ex) -> Outcome:
        addr = self._mem_u64(ex)
        if not self._valid_region(addr):
            return self._fail(ex, E.VMCLEAR_INVALID_ADDRESS)
        if addr == self.vmxon:
            return self._fail(ex, E.VMCLEAR_VMXON_POINTER)
        if addr == self.current:
            self.vmcs.launch_state = F.LaunchState.CLEAR
            self._write_back()
            self.current = self.vmcs = None
        elif self.vm.mem.contains(addr + _OFF_LAUNCHED):
            self.vm.mem.write(addr + _OFF_LAUNCHED, b"\0")      # launch state "clear" (SDM 31.3 VMCLEAR)
        return self._succeed(ex)

    def _vmptrld(self, ex) -> Outcome:
        addr = self._mem_u64(ex)
        if not self._valid_region(addr):
            return self._fail(ex, E.VMPTRLD_INVALID_ADDRESS)
        if addr == self.vmxon:
            return self._fail(ex, E.VMPTRLD_VMXON_POINTER)
        rev = self._region_revision(addr)
        if rev is None or rev & 0x7FFFFFFF != self.caps.revision_id or rev >> 31:
            return self._fail(ex, E.VMPTRLD_INCORRECT_REVISION_ID)
        if addr != self.current:
            self._write_back()
            self.current, self.vmcs = addr, self._read_region(addr)
        return self._succeed(ex)

    def _operand_bits(self) -> int:
        return 64 if self.vm.vcpu.regs.hflags & x86.HF_CS64 else 32

    def _vmread(self, ex) -> Outcome:
        cpu = self.vm.vcpu
        if self.vmcs is None:
            return self._fail_invalid(ex)
        dst, src = ex.insn.operands[0], ex.insn.operands[1]
        bits = self._operand_bits()
        try:
            value = self.vmcs.read(reg_value(cpu, src.reg) & 0xFFFFFFFF)
        except F.VmInstructionFault:
            return self._fail(ex, E.UNSUPPORTED_VMCS_COMPONENT)
        value &= (1 << bits) - 1
        if dst.type == 1:           # capstone X86_OP_REG
            set_reg_value(cpu, dst.reg, value)
        else:
            cpu.write_linear_int(mem_operand_address(cpu, ex.insn, dst), bits // 8, value)
        return self._succeed(ex)

    def _vmwrite(self, ex) -> Outcome:
        cpu = self.vm.vcpu
        if self.vmcs is None:
            return self._fail_invalid(ex)
        field_op, src = ex.insn.operands[0], ex.insn.operands[1]
        bits = self._operand_bits()
        if src.type == 1:
            value = reg_value(cpu, src.reg)
        else:
            value = cpu.read_linear_int(mem_operand_address(cpu, ex.insn, src), bits // 8)
        try:
            self.vmcs.write(reg_value(cpu, field_op.reg) & 0xFFFFFFFF, value & ((1 << bits) - 1))
        except F.VmInstructionFault as fault:
            return self._fail(ex, fault.error)
        return self._succeed(ex)

    def _invalidate(self, ex) -> Outcome:
        """INVEPT/INVVPID: vmlab's TLB is not tagged, so every supported type
        flushes everything (SDM 31.3: an unsupported type is VMfail 28)."""
        cpu = self.vm.vcpu
        kind = reg_value(cpu, ex.insn.operands[0].reg)
        allowed = (1, 2) if ex.insn.mnemonic == "invept" else (0, 1, 2, 3)
        if kind not in allowed:
            return self._fail(ex, E.INVALID_INVEPT_INVVPID_OPERAND)
        cpu.invept()
        return self._succeed(ex)

    # ------------------------------------------------------------------ VM entry / exit
    def _vmentry(self, ex, resume: bool) -> Outcome:
        vm = self.vm
        if getattr(vm, "vmx_l0", None) is not None or vm.intercept is not None:
            # A Python VmxGuest over the machine is L0's policy and the guest
            # (L1) runs in its non-root operation; its handler passed this
            # VMLAUNCH/VMRESUME on (ex.emulate()).  Running L2 would need the
            # two policies stacked, which vmlab does not do: say so, never
            # run L2 outside the harness's controls.
            return Stop(StopReason.ERROR, "guest-visible VMX cannot run L2 under a Python VMX harness "
                                          f"(the L0 handler emulated {ex.insn.mnemonic.upper()}); "
                                          "use one or the other")
        if self.vmcs is None:
            return self._fail_invalid(ex)
        launched = self.vmcs.launch_state == F.LaunchState.LAUNCHED
        if resume and not launched:
            return self._fail(ex, E.VMRESUME_NONLAUNCHED_VMCS)
        if not resume and launched:
            return self._fail(ex, E.VMLAUNCH_NONCLEAR_VMCS)
        if self._l1_traps is None:
            self._l1_traps = vm.vcpu.trap_kinds - {"iret"}
        g = self._guest
        if g is None or g._vmcs is not self.vmcs:
            # One VmxGuest per current VMCS: what it learnt (the entry checks
            # passed, the trap sites armed) carries over to the next VMRESUME.
            g = self._guest = _L2Guest(vm, self.caps, self.vmcs)
            g.default_handler = self._reflect
        try:
            failed = g.enter()
        except VmEntryFailed as exc:
            # VMfailValid(7 or 8): controls or host state invalid; L1 goes on.
            # (The checks come before any trap site is armed for L2.)
            err = getattr(exc.result, "error", None)
            return self._fail(ex, int(err) if err is not None else E.ENTRY_INVALID_CONTROL_FIELD)
        if failed is None and g.msr_load_failed:
            failed = self._msr_entry_failure(g)
        if failed is not None:
            # Guest-state failure: a VM exit with bit 31 set, host state loaded (SDM 27.8).
            if self.record:
                self.trace.append(failed)
            self._load_host_state(self.vmcs)
            if not self._exit_msr_load(self.vmcs):
                return HANDLED
            brk = getattr(vm, "exit_break", None)
            if brk is not None and brk(failed):
                # The debugger's break-exit: L1 is already at HOST_RIP.
                return Stop(StopReason.BREAK_EXIT, f"VM exit {failed.reason!s}", exit=failed)
            return HANDLED
        self.vmcs.launch_state = F.LaunchState.LAUNCHED
        self.l2 = g
        vm.intercept = g
        vm.vcpu.fastpath = g._fastpath
        return HANDLED

    def _reflect(self, ex) -> None:
        """A VM exit of L2 goes to L1: store the guest state into L1's VMCS,
        load the host-state area, resume L1 at HOST_RIP (SDM Vol. 3C 28.3, 28.5)."""
        vm = self.vm
        self.reflected += 1
        if self.record:
            self.trace.append(ex)
        if vm.log.enabled("exits"):
            vm.log("exits", f"L2 VM exit {ex.reason.name} ({int(ex.reason)}) qualification={ex.qualification:#x} "
                            f"length={ex.instruction_length} -> L1 at HOST_RIP {ex.vmcs.read(F.HOST_RIP):#x}")
        vmcs = ex.guest._vmcs
        vmcs.materialize()                       # the L2 state, before the vCPU changes
        vm.intercept = None
        vm.vcpu.fastpath = None
        self.l2 = None
        stored = msr_areas.store_on_exit(vm, vmcs.mem, self.caps.misc)      # SDM 28.4, after 28.3
        self._load_host_state(vmcs)
        if stored:
            self._vmx_abort(msr_areas.ABORT_SAVING_GUEST_MSRS, f"VM-exit MSR-store entry {stored}")
        else:
            self._exit_msr_load(vmcs)                                          # SDM 28.6, after 28.5
        # The vCPU holds L1 now: the next entry loads the guest state in full.
        # The trap sites stay (both levels share one set; _arm_l1 says when not).
        ex.guest._saved = None
        ex.action = REFLECT
        self._cache_on()

    def _load_host_state(self, v) -> None:
        """SDM Vol. 3C 28.5.1-28.5.2: control registers, EFER, segment registers
        with the fixed attributes of host state, descriptor-table bases, RSP,
        RIP, RFLAGS = 2 -- as one image (vmm/nested_state.py host_image) loaded
        by one native call.  (Host-state fields are read from the VMCS's dict:
        each is a valid field, whose VMREAD is the stored value.)"""
        cpu = self.vm.vcpu
        cpu.set_ept(None)
        cpu.native.tsc_offset = 0
        # the host's EFER without "load IA32_EFER" (host_image)
        self._switch_for(cpu).load_image(self._host_image(v, cpu.regs.efer))
        self._arm_l1()
        cpu.flush()

    def _host_image(self, v, efer: int):
        """The host-state image of ``v`` (a native buffer) for L2's EFER ``efer``."""
        hc = self._host_img
        if hc is None or hc[0] is not v or hc[1] != self._host_gen or hc[2] != efer:
            # The host-state fields change only by VMWRITE, and a VM entry after
            # one takes the full path, which bumps _host_gen (_L2Guest._enter).
            m = v.mem
            buf = ffi.new("uint64_t[]", LEVEL_N)
            buf[0:LEVEL_N] = host_image(lambda enc, _default=0: m[F.slot(enc)], m[_S_EXIT_CTLS], efer)
            hc = self._host_img = (v, self._host_gen, efer, buf)
        return hc[3]

    # ------------------------------------------------------------------ MSR areas (vmm/vmx_msr_areas.py)
    def _msr_entry_failure(self, g):
        """The VM-entry MSR-load area failed at entry ``g.msr_load_failed`` (SDM
        27.4): a VM-entry failure (27.8) -- exit reason 34 with bit 31, the
        exit qualification the entry's number (from 1), the other exit
        fields unmodified; the guest state stays as it was in the VMCS (the
        vCPU's copy is dropped: the host state is loaded next) and the VM-entry
        interruption information keeps its valid bit (no injection ran)."""
        n, g.msr_load_failed = g.msr_load_failed, 0
        m = self.vmcs.mem
        m[F.slot(F.VM_EXIT_REASON)] = int(ExitReason.ENTRY_FAIL_MSR_LOADING) | (1 << 31)
        m[F.slot(F.EXIT_QUALIFICATION)] = n
        g._saved = None
        g._pending_exits.clear()
        return VmExit(ExitReason.ENTRY_FAIL_MSR_LOADING, n, self.vmcs, g, entry_failure=True)

    def _exit_msr_load(self, v) -> bool:
        """SDM 28.6 (and 27.8 step 4 for a failed VM entry): load the VM-exit
        MSR-load area once the host state is loaded; a failure is a VMX abort
        (28.7).  False after an abort."""
        n = msr_areas.load_on_exit(self.vm, v.mem, self.caps.misc)
        if n:
            self._vmx_abort(msr_areas.ABORT_LOADING_HOST_MSRS, f"VM-exit MSR-load entry {n}")
            return False
        return True

    def _vmx_abort(self, indicator: int, why: str) -> None:
        """SDM 28.7 "VMX Aborts": the nonzero VMX-abort indicator is saved in
        bytes 4-7 of the current VMCS's region and the logical processor enters
        the shutdown state -- the run ends as for a triple fault."""
        vm = self.vm
        at = self.current
        if at is not None and vm.mem.contains(at + _OFF_ABORT) and vm.mem.contains(at + _OFF_ABORT + 3):
            vm.mem.write(at + _OFF_ABORT, struct.pack("<I", indicator))
        vm.pending_stop = Stop(StopReason.SHUTDOWN, f"VMX abort {indicator}: {why} failed (SDM 28.7)")

    def _switch_for(self, cpu) -> LevelSwitch:
        sw = self._switch
        if sw is None or sw.cpu is not cpu:
            sw = self._switch = LevelSwitch(cpu)
        return sw

    # ------------------------------------------------------------------ trap sites of both levels
    # Arming trap sites is costly: vmlab_trap_set_kinds drops every translated
    # block, and the next run retranslates and rescans what it executes.  So
    # L1 and L2 share one set, the union of the kinds either level needs, and
    # each exit is decided for the level that runs: in L2 by L2's controls
    # (vmm.vmx_intercept, a kind whose control is clear is not a VM exit), in
    # L1 by the platform, with ``untrapped`` for the kinds only L2 wants.
    # Switching levels then changes no trap site unless a level needs a kind
    # the set lacks (the set grows) or NMI blocking changes (IRET is armed
    # exactly while it must be trapped: its trap does not run it).

    def _arm_l2(self, needed: frozenset) -> None:
        cpu = self.vm.vcpu
        kinds = (cpu.trap_kinds - {"iret"}) | needed
        if kinds != cpu.trap_kinds:
            cpu.set_traps(kinds)

    def _arm_l1(self, union: bool = True) -> None:
        vm = self.vm
        cpu = vm.vcpu
        if self._l1_traps is None:
            return
        kinds = ((cpu.trap_kinds - {"iret"}) if union else frozenset()) | self._l1_traps
        if vm.nmi_blocked:
            kinds |= {"iret"}
        if kinds != cpu.trap_kinds:
            cpu.set_traps(kinds)
            self._disarm_native()
            if self._guest is not None:
                self._guest._armed_for = None      # L2's next entry arms its kinds again

    def untrapped(self, ex: TrapExit) -> Outcome | None:
        """A trap of a kind the platform does not handle itself, met while the
        union of both levels' kinds is armed (the kind is there for L2's
        controls).  CPUID is executed as the CPU model says; any other kind is
        disarmed, so the instruction runs natively when the loop resumes (the
        next entry to L2 arms it again if L2 still needs it)."""
        vm = self.vm
        cpu = vm.vcpu
        if self._l1_traps is None or ex.kind in self._l1_traps:
            return None
        if ex.kind == "task":
            # A far JMP/CALL of L1: it runs natively, the kind stays armed for L2
            # (disarming it would drop every translated block at each level switch).
            from vmlab.emu.taskswitch import run_past
            out = run_past(cpu, cpu.linear_rip())
            return HANDLED if isinstance(out, DeadlineExit) else platform(vm, out)
        if ex.kind == "cpuid":
            r = cpu.regs
            a, b, c, d = vm.cpuid.lookup(r.gpr[0] & 0xFFFFFFFF, r.gpr[1] & 0xFFFFFFFF)
            for i, val in ((0, a), (3, b), (1, c), (2, d)):
                cpu.set_gpr(i, val, 4)
            cpu.skip(ex.insn_len)
            return HANDLED
        cpu.set_traps(cpu.trap_kinds - {ex.kind})
        self._disarm_native()
        if self._guest is not None:
            self._guest._armed_for = None
        return HANDLED



class _L2Guest(VmxGuest):
    """The VmxGuest over L1's current VMCS: it arms its trap kinds into the set
    both levels share (NestedVmx._arm_l2) instead of replacing it, and moves
    the guest state with the native level switch (vmm/nested_state.py)."""

    #: NestedVmx processes L1's MSR areas (at entry here, at the reflection)
    _own_msr_areas = False
    #: L2's CR0/CR4 also keep VMX's fixed bits (_cr_access): Python completes MOV CR
    native_cr = False

    def _load_guest_state(self) -> None:
        """VM entry: guest-state area -> vCPU (SDM Vol. 3C 27.3.1 checked, 27.3.2
        loaded as VmxGuest._load_guest_state does), as one image."""
        v, cpu = self.vmcs, self.cpu
        v.materialize()
        m = v.mem
        self.vm.nested._switch_for(cpu).load([m[k] for k in IMAGE_SLOTS])
        cpu.native.tsc_offset = m[_S_TSC_OFFSET] if self._primary() & _PP_TSC_OFFSETTING else 0
        self._saved = True

    def _enter(self):
        """VM entry as VmxGuest._enter, with the common VMRESUME of a nested
        hypervisor taken short: the VMCS passed the entry checks before and
        since then L1 wrote nothing but exit information (read-only fields,
        which have no checks) or GUEST_RIP/GUEST_RSP (_rip_only_valid: the
        checks those fields have, SDM Vol. 3C 27.3.1.4), the trap sites are
        armed for these controls and NMI blocking, and no event is to be
        injected.  Then the controls, hence the fast-path policy, the monitor
        trap flag and interrupt-window exiting, are those of the last entry;
        what is left is the guest-state load, EPT and the preemption timer."""
        v = self._vmcs
        vals = m = v.mem
        armed = self._armed_for
        if msr_areas.counts_nonzero(vals):
            # MSR areas (SDM 27.4): the full entry, whose MSR-load step is
            # _inject_from_entry_field's first part; the vCPU's copy of the
            # guest state is loaded afresh (a failed entry dropped it).
            self._saved = None
            self.vm.nested._host_gen += 1
            return super()._enter()
        if (not self._checked or armed is None or m[_S_ENTRY_INTR] >> 31 & 1
                or armed != (m[_S_PRIMARY], m[_S_SECONDARY], self.vm.nmi_blocked,
                             self.virtual_nmi_blocked, bool(m[_S_RFLAGS] & x86.RFLAGS_NT))
                or (v.dirty - _CHEAP_FIELDS and not self._rip_only_valid())):
            self.vm.nested._host_gen += 1         # the VMM may have written host-state fields
            return super()._enter()
        self._load_guest_state_if_changed()
        p = self._p
        eptp = m[_S_EPTP] if p & _PP_SECONDARY and m[_S_SECONDARY] & _SP_ENABLE_EPT else None
        self.cpu.set_ept(eptp)
        self.single_step = bool(p & _PP_MTF)
        self.wants_irq_window = bool(p & _PP_IRQ_WINDOW)
        v.dirty.clear()
        if self._preempt_deadline is not None or self._pin & _PIN_PREEMPT:
            self._arm_preemption_timer()
        return None

    #: the VM-entry MSR-load area failed at this entry (1-based), 0 if not
    msr_load_failed = 0

    def _inject_from_entry_field(self) -> None:
        # SDM 27.4: the VM-entry MSR-load area is processed after the guest
        # state is loaded and before event injection (27.6); a failure ends
        # the VM entry (27.8, NestedVmx._msr_entry_failure) with no injection.
        vals = self._vmcs.mem
        if vals[_S_ENTRY_MSR_COUNT]:
            n = msr_areas.load_on_entry(self.vm, vals, self.caps.misc)
            if n:
                self.msr_load_failed = n
                return
        # Nothing to inject unless the VM-entry interruption-information
        # field is valid (bit 31, SDM Vol. 3C 25.8.3): the common VMRESUME.
        if self._vmcs.mem[_S_ENTRY_INTR] >> 31 & 1:
            super()._inject_from_entry_field()

    def _store_guest_state(self) -> None:
        """The deferred part of a VM exit (SDM Vol. 3C 28.3): the vCPU's
        state into the guest-state area, as one image; interruptibility bit 3
        (blocking by NMI, Table 25-3) as at the exit."""
        nested = self.vm.nested
        img = nested._cache.native.l2_img
        lib.vmlab_level_save(self.cpu.regs, img)
        lib.vmlab_vmcs_store_guest(self.cpu.regs, self._vmcs.area, self._exit_nmi_blocked)
        nested._img_for = self._vmcs

    def _set_trap_kinds(self, kinds: frozenset) -> None:
        self.vm.nested._arm_l2(kinds)

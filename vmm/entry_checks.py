"""The checks VMLAUNCH/VMRESUME make before entering the guest (SDM Vol. 3C ch. 27).

:func:`check_vm_entry` runs, in the SDM's order of classes:

1. 27.1 basic checks (launch state, only when ``instruction`` is given) ->
   VMfailValid(4 / 5);
2. 27.2.1 checks on the VMX controls -> VMfailValid(ENTRY_INVALID_CONTROL_FIELD, 7);
3. 27.2.2-27.2.4 checks on the host-state area -> VMfailValid(ENTRY_INVALID_HOST_STATE, 8);
4. 27.3.1 checks on the guest-state area -> a failed VM entry: exit reason 33
   with bit 31 set and an exit qualification of 27.8 (0 default, 2 PDPTEs,
   3 NMI injection while blocked by STI, 4 VMCS link pointer).

and returns the first failure as a value (:class:`VmfailValid` or
:class:`EntryFailure`) with ``field`` (the VMCS field name), ``section`` and
a human-readable ``reason``; or :class:`EntryOk`.  The VMCS is hostile input:
nothing here raises on any field contents.  Within a class the SDM leaves the
order open; vmlab checks in the order the SDM lists the checks.

Not modelled (they need guest memory or features vmlab does not advertise):
the virtual-APIC TPR comparison, PDPTE loading from memory when EPT is off
(the VMM must do it and fail with PDPTE_LOADING), the contents of a VMCS that
the link pointer names (vmlab supports no shadow VMCS, so any value but ~0
fails with qualification 4), MSR-load areas (exit reason 34), and the checks
for controls vmlab cannot advertise (CET, PKRS, BNDCFGS, RTIT, perf-global,
SMM, VM functions, posted-interrupt details beyond the SDM's control checks).

:func:`baseline_vmcs` builds a VMCS that passes every check for one of three
guest modes; start from it and change what you need.

Section numbers follow the 2023+ SDM (ch. 27 "VM Entries"; ch. 26 before 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from vmlab.emu import x86

from .capabilities import CONTROL_CLASSES, VmxCapabilities
from .controls import (EPT_MEMTYPE_WB, EPTP_AD_ENABLE, EPTP_MEMTYPE_MASK, EPTP_RESERVED_11_8, EPTP_SSS_ENABLE,
                       EPTP_WALK_LENGTH_MASK, EPTP_WALK_LENGTH_SHIFT, ERROR_CODE_EXCEPTIONS,
                       INTR_INFO_DELIVER_ERROR_CODE, INTR_INFO_ENTRY_RESERVED, INTR_INFO_TYPE_MASK,
                       INTR_INFO_TYPE_SHIFT, INTR_INFO_VALID, INTR_INFO_VECTOR_MASK, SOFTWARE_EVENT_TYPES,
                       EptPointer, InterruptionType, PinBasedControls,
                       PrimaryProcBasedControls, SecondaryProcBasedControls, VmEntryControls, VmExitControls)
from .errors import VmConfigError
from .exit_reasons import EXIT_REASON_ENTRY_FAILURE, ExitReason, VmInstructionError
from .qualification import EntryFailureQualification
from .vmcs import (AR_DB, AR_DPL_MASK, AR_DPL_SHIFT, AR_G, AR_L, AR_P, AR_RESERVED_11_8, AR_RESERVED_31_17, AR_S,
                   AR_TYPE_ACCESSED, AR_TYPE_CODE, AR_TYPE_MASK, AR_TYPE_READABLE, AR_UNUSABLE, PENDING_DBG_BS,
                   PENDING_DBG_RESERVED, PENDING_DBG_RTM, SEG_TYPE_LDT, SEG_TYPE_TSS16_BUSY, SEG_TYPE_TSS32_BUSY,
                   VMCS_LINK_POINTER_NONE, ActivityState, Interruptibility, LaunchState, Vmcs, VmcsField,
                   make_access_rights)

F = VmcsField
PIN, PROC, PROC2, EXIT, ENTRY = (PinBasedControls, PrimaryProcBasedControls, SecondaryProcBasedControls,
                                 VmExitControls, VmEntryControls)
U64 = (1 << 64) - 1

#: RFLAGS bits that must be 0 in the guest-state area: 63:22, 15, 5, 3 (SDM Vol. 3C 27.3.1.4).
RFLAGS_RESERVED = (U64 & ~((1 << 22) - 1)) | (1 << 15) | (1 << 5) | (1 << 3)
#: IA32_DEBUGCTL bits that may be 1: 0 LBR, 1 BTF, 2 BLD, 6-15 (tracing, freeze, RTM debug).
DEBUGCTL_VALID = 0x0000FFC7
DEBUGCTL_BTF = 1 << 1
#: EFER bits vmlab allows (emu.cpuid.CpuidModel.efer_valid_mask()).
EFER_VALID = x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA | x86.EFER_NXE
#: Memory types a PAT entry may hold: UC, WC, WT, WP, WB, UC- (SDM Vol. 3A 13.12.2).
PAT_VALID_TYPES = frozenset({0, 1, 4, 5, 6, 7})
#: PAE PDPTE bits that must be 0 when present (below MAXPHYADDR): 2:1 and 8:5 (SDM Vol. 3A 4.4.1).
PDPTE_RESERVED_LOW = 0x1E6


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class EntryOk:
    """Every check passed: the VM entry proceeds."""

    ok: ClassVar[bool] = True
    reason: str = "all VM-entry checks passed"
    field: str = ""
    section: str = ""


@dataclass(frozen=True)
class VmfailValid:
    """VMLAUNCH/VMRESUME fails with VMfailValid(``error``); the guest is not entered (SDM Vol. 3C 27.2)."""

    error: VmInstructionError
    field: str
    section: str
    reason: str
    ok: ClassVar[bool] = False


@dataclass(frozen=True)
class EntryFailure:
    """VM entry fails after the guest-state checks: a VM exit with exit reason 33 | bit 31 (SDM Vol. 3C 27.8)."""

    qualification: EntryFailureQualification
    field: str
    section: str
    reason: str
    ok: ClassVar[bool] = False

    @property
    def exit_reason(self) -> int:
        """The exit-reason field value: ENTRY_FAIL_GUEST_STATE with the VM-entry-failure bit."""
        return int(ExitReason.ENTRY_FAIL_GUEST_STATE) | EXIT_REASON_ENTRY_FAILURE


EntryResult = Union[EntryOk, VmfailValid, EntryFailure]


class _Failed(Exception):
    def __init__(self, result):
        super().__init__(result.reason)
        self.result = result


def fill_entry_failure(vmcs: Vmcs, result: EntryResult) -> None:
    """Record a failed entry in the VMCS as the processor does.

    VmfailValid: store the VM-instruction error (SDM Vol. 3C 31.2).
    EntryFailure: store exit reason 33 | bit 31 and the qualification (27.8);
    the VMM then loads host state as for any VM exit.  EntryOk: nothing.
    """
    if isinstance(result, VmfailValid):
        vmcs.set_instruction_error(result.error)
    elif isinstance(result, EntryFailure):
        vmcs.set_exit_info(result.exit_reason, int(result.qualification))


# --------------------------------------------------------------------------- helpers

def _canonical(addr: int, bits: int) -> bool:
    return x86.canonical(addr & U64, bits)


def _bit_names(cls, bits: int) -> str:
    defined = {int(m): m.name for m in cls.__members__.values()}
    names = []
    for n in range(32):
        if bits >> n & 1:
            name = defined.get(1 << n)
            names.append(f"{name} (bit {n})" if name else f"reserved bit {n}")
    return ", ".join(names)


_SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")
_DATA_SEGMENTS = ("ES", "SS", "DS", "FS", "GS")


@dataclass
class _Seg:
    name: str
    selector: int
    base: int
    limit: int
    ar: int

    @property
    def usable(self) -> bool:
        return not self.ar & AR_UNUSABLE

    @property
    def type(self) -> int:
        return self.ar & AR_TYPE_MASK

    @property
    def dpl(self) -> int:
        return (self.ar & AR_DPL_MASK) >> AR_DPL_SHIFT

    @property
    def rpl(self) -> int:
        return self.selector & 3

    def field(self, part: str) -> str:
        return f"GUEST_{self.name}_{part}"


class _Checker:
    """One run of the checks over one VMCS.  Fields are read once, up front."""

    def __init__(self, vmcs: Vmcs, caps: VmxCapabilities, host_in_ia32e: bool):
        self.v = vmcs
        self.caps = caps
        self.host_in_ia32e = host_in_ia32e
        r = vmcs.read
        self.pin = r(F.PIN_BASED_VM_EXEC_CONTROL)
        self.proc = r(F.CPU_BASED_VM_EXEC_CONTROL)
        # With "activate secondary controls" 0 the processor treats them as 0 (SDM Vol. 3C 25.6.2).
        self.proc2 = r(F.SECONDARY_VM_EXEC_CONTROL) if self.proc & PROC.ACTIVATE_SECONDARY_CONTROLS else 0
        self.exit = r(F.VM_EXIT_CONTROLS)
        self.entry = r(F.VM_ENTRY_CONTROLS)
        self.paw = caps.physical_address_width
        self.law = caps.linear_address_width
        self.intr_info = r(F.VM_ENTRY_INTR_INFO)
        self.inject = bool(self.intr_info & INTR_INFO_VALID)
        self.inject_type = (self.intr_info & INTR_INFO_TYPE_MASK) >> INTR_INFO_TYPE_SHIFT
        self.inject_vector = self.intr_info & INTR_INFO_VECTOR_MASK
        self.ia32e_guest = bool(self.entry & ENTRY.IA32E_MODE_GUEST)
        self.unrestricted = bool(self.proc2 & PROC2.UNRESTRICTED_GUEST)

    # -- failure helpers ----------------------------------------------------------------

    def control(self, ok: bool, field: str, section: str, msg: str) -> None:
        if not ok:
            raise _Failed(VmfailValid(VmInstructionError.ENTRY_INVALID_CONTROL_FIELD, field, section,
                                      f"{field}: {msg} (SDM Vol. 3C {section})"))

    def host(self, ok: bool, field: str, section: str, msg: str) -> None:
        if not ok:
            raise _Failed(VmfailValid(VmInstructionError.ENTRY_INVALID_HOST_STATE, field, section,
                                      f"{field}: {msg} (SDM Vol. 3C {section})"))

    def guest(self, ok: bool, field: str, section: str, msg: str,
              qualification: EntryFailureQualification = EntryFailureQualification.DEFAULT) -> None:
        if not ok:
            raise _Failed(EntryFailure(qualification, field, section, f"{field}: {msg} (SDM Vol. 3C {section})"))

    def fits_paw(self, addr: int) -> bool:
        return addr >> self.paw == 0

    def page_address(self, field: VmcsField, section: str, what: str, align: int = 0xFFF) -> None:
        addr = self.v.read(field)
        self.control(addr & align == 0, field.name, section, f"{what} {addr:#x} is not {align + 1}-byte aligned")
        self.control(self.fits_paw(addr), field.name, section,
                     f"{what} {addr:#x} exceeds the {self.paw}-bit physical-address width")

    def reserved_controls(self, kind: str, value: int, field: VmcsField, section: str) -> None:
        must_missing, not_allowed = self.caps.invalid_bits(kind, value)
        cls = CONTROL_CLASSES[kind]
        true = "TRUE_" if self.caps.true_controls else ""
        msr = {"pin": "PINBASED", "proc": "PROCBASED", "proc2": "PROCBASED", "exit": "EXIT", "entry": "ENTRY"}[kind]
        msr = f"IA32_VMX_{true if kind != 'proc2' else ''}{msr}_CTLS{'2' if kind == 'proc2' else ''}"
        self.control(not must_missing, field.name, section,
                     f"{_bit_names(cls, must_missing)} must be 1 ({msr} allowed-0 settings)")
        self.control(not not_allowed, field.name, section,
                     f"{_bit_names(cls, not_allowed)} may not be 1 ({msr} allowed-1 settings)")

    # -- 27.2.1 VMX controls --------------------------------------------------------------

    def check_execution_controls(self) -> None:
        s = "27.2.1.1"
        v, pin, proc, proc2 = self.v, self.pin, self.proc, self.proc2
        self.reserved_controls("pin", pin, F.PIN_BASED_VM_EXEC_CONTROL, s)
        self.reserved_controls("proc", proc, F.CPU_BASED_VM_EXEC_CONTROL, s)
        if proc & PROC.ACTIVATE_SECONDARY_CONTROLS:
            self.reserved_controls("proc2", proc2, F.SECONDARY_VM_EXEC_CONTROL, s)
        count = v.read(F.CR3_TARGET_COUNT)
        self.control(count <= self.caps.cr3_target_count, F.CR3_TARGET_COUNT.name, s,
                     f"{count} exceeds the {self.caps.cr3_target_count} CR3-target values of IA32_VMX_MISC[24:16]")
        if proc & PROC.USE_IO_BITMAPS:
            self.page_address(F.IO_BITMAP_A, s, "I/O-bitmap A address")
            self.page_address(F.IO_BITMAP_B, s, "I/O-bitmap B address")
        if proc & PROC.USE_MSR_BITMAPS:
            self.page_address(F.MSR_BITMAP, s, "MSR-bitmap address")
        if proc & PROC.USE_TPR_SHADOW:
            self.page_address(F.VIRTUAL_APIC_PAGE_ADDR, s, "virtual-APIC address")
            if not proc2 & PROC2.VIRTUAL_INTR_DELIVERY:
                tpr = v.read(F.TPR_THRESHOLD)
                self.control(tpr >> 4 == 0, F.TPR_THRESHOLD.name, s,
                             f"bits 31:4 must be 0 without virtual-interrupt delivery (value {tpr:#x})")
        else:
            bad = proc2 & (PROC2.VIRTUALIZE_X2APIC | PROC2.APIC_REGISTER_VIRT | PROC2.VIRTUAL_INTR_DELIVERY)
            self.control(not bad, F.SECONDARY_VM_EXEC_CONTROL.name, s,
                         f"{_bit_names(PROC2, bad)} need USE_TPR_SHADOW")
        self.control(pin & PIN.NMI_EXITING or not pin & PIN.VIRTUAL_NMIS, F.PIN_BASED_VM_EXEC_CONTROL.name, s,
                     "VIRTUAL_NMIS needs NMI_EXITING")
        self.control(pin & PIN.VIRTUAL_NMIS or not proc & PROC.NMI_WINDOW_EXITING, F.CPU_BASED_VM_EXEC_CONTROL.name, s,
                     "NMI_WINDOW_EXITING needs VIRTUAL_NMIS")
        if proc2 & PROC2.VIRTUALIZE_APIC_ACCESSES:
            self.page_address(F.APIC_ACCESS_ADDR, s, "APIC-access address")
        self.control(not (proc2 & PROC2.VIRTUALIZE_X2APIC and proc2 & PROC2.VIRTUALIZE_APIC_ACCESSES),
                     F.SECONDARY_VM_EXEC_CONTROL.name, s, "VIRTUALIZE_X2APIC excludes VIRTUALIZE_APIC_ACCESSES")
        self.control(not proc2 & PROC2.VIRTUAL_INTR_DELIVERY or pin & PIN.EXTERNAL_INTERRUPT_EXITING,
                     F.PIN_BASED_VM_EXEC_CONTROL.name, s, "VIRTUAL_INTR_DELIVERY needs EXTERNAL_INTERRUPT_EXITING")
        if pin & PIN.PROCESS_POSTED_INTERRUPTS:
            self.control(proc2 & PROC2.VIRTUAL_INTR_DELIVERY, F.PIN_BASED_VM_EXEC_CONTROL.name, s,
                         "PROCESS_POSTED_INTERRUPTS needs VIRTUAL_INTR_DELIVERY")
            self.control(self.exit & EXIT.ACK_INTERRUPT_ON_EXIT, F.VM_EXIT_CONTROLS.name, s,
                         "PROCESS_POSTED_INTERRUPTS needs ACK_INTERRUPT_ON_EXIT")
            pinv = v.read(F.POSTED_INTR_NOTIFICATION_VECTOR)
            self.control(pinv >> 8 == 0, F.POSTED_INTR_NOTIFICATION_VECTOR.name, s, f"bits 15:8 of {pinv:#x} must be 0")
            self.page_address(F.POSTED_INTR_DESC_ADDR, s, "posted-interrupt descriptor address", align=0x3F)
        if proc2 & PROC2.ENABLE_VPID:
            self.control(v.read(F.VIRTUAL_PROCESSOR_ID) != 0, F.VIRTUAL_PROCESSOR_ID.name, s,
                         "VPID 0 is reserved for the VMM when ENABLE_VPID is 1")
        if proc2 & PROC2.ENABLE_EPT:
            self.check_eptp(s)
        if proc2 & PROC2.ENABLE_PML:
            self.control(proc2 & PROC2.ENABLE_EPT, F.SECONDARY_VM_EXEC_CONTROL.name, s, "ENABLE_PML needs ENABLE_EPT")
            self.page_address(F.PML_ADDRESS, s, "PML address")
        for ctl in (PROC2.UNRESTRICTED_GUEST, PROC2.MODE_BASED_EPT_EXECUTE, PROC2.SUB_PAGE_WRITE_PERMISSIONS):
            self.control(not proc2 & ctl or proc2 & PROC2.ENABLE_EPT, F.SECONDARY_VM_EXEC_CONTROL.name, s,
                         f"{ctl.name} needs ENABLE_EPT")
        if proc2 & PROC2.ENABLE_VMFUNC:
            funcs = v.read(F.VM_FUNCTION_CONTROLS)
            self.control(funcs == 0, F.VM_FUNCTION_CONTROLS.name, s,
                         f"{funcs:#x} sets VM functions IA32_VMX_VMFUNC does not allow (vmlab allows none)")
        if proc2 & PROC2.VMCS_SHADOWING:
            self.page_address(F.VMREAD_BITMAP, s, "VMREAD-bitmap address")
            self.page_address(F.VMWRITE_BITMAP, s, "VMWRITE-bitmap address")
        if proc2 & PROC2.EPT_VIOLATION_VE:
            self.page_address(F.VE_INFORMATION_ADDRESS, s, "virtualization-exception information address")

    def check_eptp(self, s: str) -> None:
        eptp = self.v.read(F.EPT_POINTER)
        name = F.EPT_POINTER.name
        memtype = eptp & EPTP_MEMTYPE_MASK
        self.control(memtype in self.caps.ept_memory_types, name, s,
                     f"memory type {memtype} (bits 2:0) is not one IA32_VMX_EPT_VPID_CAP allows "
                     f"({sorted(self.caps.ept_memory_types)})")
        walk = ((eptp & EPTP_WALK_LENGTH_MASK) >> EPTP_WALK_LENGTH_SHIFT) + 1
        self.control(walk in self.caps.ept_walk_lengths, name, s,
                     f"page-walk length {walk} (bits 5:3 = {walk - 1}) is not supported "
                     f"({sorted(self.caps.ept_walk_lengths)})")
        self.control(not eptp & EPTP_AD_ENABLE or self.caps.ept_ad_flags, name, s,
                     "bit 6 (accessed/dirty flags) is 1 but IA32_VMX_EPT_VPID_CAP[21] is 0")
        self.control(not eptp & EPTP_SSS_ENABLE, name, s,
                     "bit 7 (supervisor shadow-stack control) is 1 but IA32_VMX_EPT_VPID_CAP[23] is 0")
        self.control(not eptp & EPTP_RESERVED_11_8, name, s, f"reserved bits 11:8 of {eptp:#x} are not 0")
        self.control(self.fits_paw(eptp), name, s, f"{eptp:#x} exceeds the {self.paw}-bit physical-address width")

    def check_exit_controls(self) -> None:
        s = "27.2.1.2"
        self.reserved_controls("exit", self.exit, F.VM_EXIT_CONTROLS, s)
        self.control(self.pin & PIN.ACTIVATE_PREEMPTION_TIMER or not self.exit & EXIT.SAVE_PREEMPTION_TIMER,
                     F.VM_EXIT_CONTROLS.name, s, "SAVE_PREEMPTION_TIMER needs ACTIVATE_PREEMPTION_TIMER")
        self.msr_area(F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR, s)
        self.msr_area(F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR, s)

    def msr_area(self, count_field: VmcsField, addr_field: VmcsField, s: str) -> None:
        count = self.v.read(count_field)
        if count:
            addr = self.v.read(addr_field)
            self.control(addr & 0xF == 0, addr_field.name, s, f"MSR area {addr:#x} is not 16-byte aligned")
            last = addr + count * 16 - 1
            self.control(self.fits_paw(last), addr_field.name, s,
                         f"MSR area [{addr:#x}, {last:#x}] ({count} entries) exceeds the {self.paw}-bit "
                         f"physical-address width")

    def check_entry_controls(self) -> None:
        s = "27.2.1.3"
        self.reserved_controls("entry", self.entry, F.VM_ENTRY_CONTROLS, s)
        if self.inject:
            self.check_injection(s)
        self.msr_area(F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR, s)
        smm = self.entry & (ENTRY.ENTRY_TO_SMM | ENTRY.DEACTIVATE_DUAL_MONITOR)
        self.control(not smm, F.VM_ENTRY_CONTROLS.name, s, f"{_bit_names(ENTRY, smm)} must be 0 outside SMM")

    def check_injection(self, s: str) -> None:
        info, t, vector = self.intr_info, self.inject_type, self.inject_vector
        name = F.VM_ENTRY_INTR_INFO.name
        itype = InterruptionType(t)
        self.control(itype is not InterruptionType.RESERVED, name, s, "interruption type 1 is reserved")
        self.control(itype is not InterruptionType.OTHER_EVENT or self.caps.supports(PROC.MONITOR_TRAP_FLAG), name, s,
                     "interruption type 7 (other event) needs the 1-setting of MONITOR_TRAP_FLAG")
        if itype is InterruptionType.NMI:
            self.control(vector == 2, name, s, f"an NMI must have vector 2, not {vector}")
        elif itype is InterruptionType.HARDWARE_EXCEPTION:
            self.control(vector <= 31, name, s, f"hardware exception vector {vector} is above 31")
        elif itype is InterruptionType.OTHER_EVENT:
            self.control(vector == 0, name, s, f"other event (pending MTF) must have vector 0, not {vector}")
        protected = not self.unrestricted or self.v.read(F.GUEST_CR0) & x86.CR0_PE
        needs_code = bool(protected and itype is InterruptionType.HARDWARE_EXCEPTION
                          and vector in ERROR_CODE_EXCEPTIONS)
        has_code = bool(info & INTR_INFO_DELIVER_ERROR_CODE)
        if needs_code:
            self.control(has_code, name, s, f"deliver-error-code (bit 11) must be 1 for exception vector {vector}")
        else:
            why = ("real-mode guest (unrestricted guest, CR0.PE = 0)" if not protected
                   else f"{itype.name} vector {vector}")
            self.control(not has_code, name, s, f"deliver-error-code (bit 11) must be 0: {why}")
        self.control(not info & INTR_INFO_ENTRY_RESERVED, name, s, f"reserved bits 30:12 of {info:#x} are not 0")
        if has_code:
            code = self.v.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE)
            self.control(code >> 16 == 0, F.VM_ENTRY_EXCEPTION_ERROR_CODE.name, s,
                         f"bits 31:16 of error code {code:#x} must be 0")
        if itype in SOFTWARE_EVENT_TYPES:
            length = self.v.read(F.VM_ENTRY_INSTRUCTION_LEN)
            low = 0 if self.caps.zero_length_injection else 1
            self.control(low <= length <= 15, F.VM_ENTRY_INSTRUCTION_LEN.name, s,
                         f"instruction length {length} for {itype.name} is outside {low}..15")

    # -- 27.2.2-27.2.4 host state ----------------------------------------------------------

    def check_host(self) -> None:
        v, caps = self.v, self.caps
        s = "27.2.2"
        cr0, cr4 = v.read(F.HOST_CR0), v.read(F.HOST_CR4)
        self.host(not caps.cr0_fixed0 & ~cr0, F.HOST_CR0.name, s,
                  f"bits {caps.cr0_fixed0 & ~cr0:#x} of {cr0:#x} must be 1 (IA32_VMX_CR0_FIXED0)")
        self.host(not cr0 & ~caps.cr0_fixed1, F.HOST_CR0.name, s,
                  f"bits {cr0 & ~caps.cr0_fixed1:#x} of {cr0:#x} must be 0 (IA32_VMX_CR0_FIXED1)")
        self.host(not caps.cr4_fixed0 & ~cr4, F.HOST_CR4.name, s,
                  f"bits {caps.cr4_fixed0 & ~cr4:#x} of {cr4:#x} must be 1 (IA32_VMX_CR4_FIXED0)")
        self.host(not cr4 & ~caps.cr4_fixed1, F.HOST_CR4.name, s,
                  f"bits {cr4 & ~caps.cr4_fixed1:#x} of {cr4:#x} must be 0 (IA32_VMX_CR4_FIXED1)")
        cr3 = v.read(F.HOST_CR3)
        self.host(self.fits_paw(cr3), F.HOST_CR3.name, s, f"{cr3:#x} exceeds the {self.paw}-bit physical-address width")
        for f in (F.HOST_IA32_SYSENTER_ESP, F.HOST_IA32_SYSENTER_EIP):
            self.host(_canonical(v.read(f), self.law), f.name, s, f"{v.read(f):#x} is not canonical")
        if self.exit & EXIT.LOAD_PAT:
            self.pat(v.read(F.HOST_IA32_PAT), F.HOST_IA32_PAT.name, s, self.host)
        if self.exit & EXIT.LOAD_EFER:
            efer = v.read(F.HOST_IA32_EFER)
            self.host(not efer & ~EFER_VALID, F.HOST_IA32_EFER.name, s, f"reserved bits of {efer:#x} are set")
            want = bool(self.exit & EXIT.HOST_ADDRESS_SPACE_SIZE)
            for bit, nm in ((x86.EFER_LMA, "LMA"), (x86.EFER_LME, "LME")):
                self.host(bool(efer & bit) == want, F.HOST_IA32_EFER.name, s,
                          f"EFER.{nm} = {int(bool(efer & bit))} differs from HOST_ADDRESS_SPACE_SIZE = {int(want)}")

        s = "27.2.3"
        for seg in ("ES", "CS", "SS", "DS", "FS", "GS", "TR"):
            f = F[f"HOST_{seg}_SELECTOR"]
            sel = v.read(f)
            self.host(sel & 7 == 0, f.name, s, f"selector {sel:#x} must have RPL = 0 and TI = 0")
        self.host(v.read(F.HOST_CS_SELECTOR) != 0, F.HOST_CS_SELECTOR.name, s, "CS selector must not be null")
        self.host(v.read(F.HOST_TR_SELECTOR) != 0, F.HOST_TR_SELECTOR.name, s, "TR selector must not be null")
        self.host(v.read(F.HOST_SS_SELECTOR) != 0 or self.exit & EXIT.HOST_ADDRESS_SPACE_SIZE,
                  F.HOST_SS_SELECTOR.name, s, "SS selector must not be null when HOST_ADDRESS_SPACE_SIZE is 0")
        for f in (F.HOST_FS_BASE, F.HOST_GS_BASE, F.HOST_GDTR_BASE, F.HOST_IDTR_BASE, F.HOST_TR_BASE):
            self.host(_canonical(v.read(f), self.law), f.name, s, f"{v.read(f):#x} is not canonical")

        s = "27.2.4"
        host64 = bool(self.exit & EXIT.HOST_ADDRESS_SPACE_SIZE)
        rip = v.read(F.HOST_RIP)
        if self.host_in_ia32e:
            self.host(host64, F.VM_EXIT_CONTROLS.name, s,
                      "HOST_ADDRESS_SPACE_SIZE must be 1: the VMM runs in IA-32e mode")
        else:
            self.host(not host64, F.VM_EXIT_CONTROLS.name, s,
                      "HOST_ADDRESS_SPACE_SIZE must be 0: the VMM runs outside IA-32e mode")
            self.host(not self.ia32e_guest, F.VM_ENTRY_CONTROLS.name, s,
                      "IA32E_MODE_GUEST must be 0: the VMM runs outside IA-32e mode")
        if not host64:
            self.host(not self.ia32e_guest, F.VM_ENTRY_CONTROLS.name, s,
                      "IA32E_MODE_GUEST needs HOST_ADDRESS_SPACE_SIZE")
            self.host(not cr4 & x86.CR4_PCIDE, F.HOST_CR4.name, s, "CR4.PCIDE must be 0 for a 32-bit host")
            self.host(rip >> 32 == 0, F.HOST_RIP.name, s, f"bits 63:32 of {rip:#x} must be 0 for a 32-bit host")
        else:
            self.host(cr4 & x86.CR4_PAE, F.HOST_CR4.name, s, "CR4.PAE must be 1 for a 64-bit host")
            self.host(_canonical(rip, self.law), F.HOST_RIP.name, s, f"{rip:#x} is not canonical")

    def pat(self, pat: int, field: str, s: str, fail) -> None:
        for i in range(8):
            t = (pat >> (8 * i)) & 0xFF
            fail(t in PAT_VALID_TYPES, field, s, f"PAT entry {i} = {t} is not a valid memory type")

    # -- 27.3.1 guest state ----------------------------------------------------------------

    def check_guest(self) -> None:
        self.check_guest_registers()
        self.check_guest_rip_rflags()
        self.check_guest_segments()
        self.check_guest_descriptor_tables()
        self.check_guest_non_register_state()
        self.check_guest_pdptes()

    def check_guest_registers(self) -> None:
        s = "27.3.1.1"
        v, caps = self.v, self.caps
        cr0, cr4 = v.read(F.GUEST_CR0), v.read(F.GUEST_CR4)
        fixed0 = caps.cr0_fixed0 & ~((x86.CR0_PE | x86.CR0_PG) if self.unrestricted else 0)
        exempt = " (PE and PG exempt: unrestricted guest)" if self.unrestricted else ""
        self.guest(not fixed0 & ~cr0, F.GUEST_CR0.name, s,
                   f"bits {fixed0 & ~cr0:#x} of {cr0:#x} must be 1 (IA32_VMX_CR0_FIXED0){exempt}")
        self.guest(not cr0 & ~caps.cr0_fixed1, F.GUEST_CR0.name, s,
                   f"bits {cr0 & ~caps.cr0_fixed1:#x} of {cr0:#x} must be 0 (IA32_VMX_CR0_FIXED1)")
        self.guest(not cr0 & x86.CR0_PG or cr0 & x86.CR0_PE, F.GUEST_CR0.name, s, "CR0.PG = 1 needs CR0.PE = 1")
        self.guest(not caps.cr4_fixed0 & ~cr4, F.GUEST_CR4.name, s,
                   f"bits {caps.cr4_fixed0 & ~cr4:#x} of {cr4:#x} must be 1 (IA32_VMX_CR4_FIXED0)")
        self.guest(not cr4 & ~caps.cr4_fixed1, F.GUEST_CR4.name, s,
                   f"bits {cr4 & ~caps.cr4_fixed1:#x} of {cr4:#x} must be 0 (IA32_VMX_CR4_FIXED1)")
        if self.entry & ENTRY.LOAD_DEBUG_CONTROLS:
            dbg = v.read(F.GUEST_IA32_DEBUGCTL)
            self.guest(not dbg & ~DEBUGCTL_VALID, F.GUEST_IA32_DEBUGCTL.name, s,
                       f"reserved bits {dbg & ~DEBUGCTL_VALID:#x} are set")
        if self.ia32e_guest:
            self.guest(cr0 & x86.CR0_PG, F.GUEST_CR0.name, s, "IA32E_MODE_GUEST needs CR0.PG = 1")
            self.guest(cr4 & x86.CR4_PAE, F.GUEST_CR4.name, s, "IA32E_MODE_GUEST needs CR4.PAE = 1")
        else:
            self.guest(not cr4 & x86.CR4_PCIDE, F.GUEST_CR4.name, s, "CR4.PCIDE must be 0 outside IA-32e mode")
        cr3 = v.read(F.GUEST_CR3)
        self.guest(self.fits_paw(cr3), F.GUEST_CR3.name, s, f"{cr3:#x} exceeds the {self.paw}-bit physical-address width")
        if self.entry & ENTRY.LOAD_DEBUG_CONTROLS:
            dr7 = v.read(F.GUEST_DR7)
            self.guest(dr7 >> 32 == 0, F.GUEST_DR7.name, s, f"bits 63:32 of {dr7:#x} must be 0")
        for f in (F.GUEST_IA32_SYSENTER_ESP, F.GUEST_IA32_SYSENTER_EIP):
            self.guest(_canonical(v.read(f), self.law), f.name, s, f"{v.read(f):#x} is not canonical")
        if self.entry & ENTRY.LOAD_PAT:
            self.pat(v.read(F.GUEST_IA32_PAT), F.GUEST_IA32_PAT.name, s, self.guest)
        if self.entry & ENTRY.LOAD_EFER:
            efer = v.read(F.GUEST_IA32_EFER)
            name = F.GUEST_IA32_EFER.name
            self.guest(not efer & ~EFER_VALID, name, s, f"reserved bits {efer & ~EFER_VALID:#x} are set")
            lma = bool(efer & x86.EFER_LMA)
            self.guest(lma == self.ia32e_guest, name, s,
                       f"EFER.LMA = {int(lma)} differs from IA32E_MODE_GUEST = {int(self.ia32e_guest)}")
            if cr0 & x86.CR0_PG:
                self.guest(lma == bool(efer & x86.EFER_LME), name, s, "EFER.LMA must equal EFER.LME when CR0.PG = 1")

    def check_guest_rip_rflags(self) -> None:
        s = "27.3.1.4"
        v = self.v
        rip, rflags = v.read(F.GUEST_RIP), v.read(F.GUEST_RFLAGS)
        cs_l = bool(v.read(F.GUEST_CS_ACCESS_RIGHTS) & AR_L)
        if self.ia32e_guest and cs_l:
            self.guest(_canonical(rip, self.law), F.GUEST_RIP.name, s, f"{rip:#x} is not canonical (64-bit guest)")
        else:
            self.guest(rip >> 32 == 0, F.GUEST_RIP.name, s, f"bits 63:32 of {rip:#x} must be 0 outside 64-bit mode")
        self.guest(not rflags & RFLAGS_RESERVED, F.GUEST_RFLAGS.name, s,
                   f"reserved bits {rflags & RFLAGS_RESERVED:#x} (63:22, 15, 5, 3) of {rflags:#x} must be 0")
        self.guest(rflags & x86.RFLAGS_FIXED, F.GUEST_RFLAGS.name, s, f"bit 1 of {rflags:#x} must be 1")
        if self.ia32e_guest or not v.read(F.GUEST_CR0) & x86.CR0_PE:
            self.guest(not rflags & x86.RFLAGS_VM, F.GUEST_RFLAGS.name, s,
                       "RFLAGS.VM must be 0 in IA-32e mode or with CR0.PE = 0")
        if self.inject and self.inject_type == InterruptionType.EXTERNAL_INTERRUPT:
            self.guest(rflags & x86.RFLAGS_IF, F.GUEST_RFLAGS.name, s,
                       "RFLAGS.IF must be 1 to inject an external interrupt")

    def segments(self) -> dict[str, _Seg]:
        r = self.v.read
        return {n: _Seg(n, r(F[f"GUEST_{n}_SELECTOR"]), r(F[f"GUEST_{n}_BASE"]), r(F[f"GUEST_{n}_LIMIT"]),
                        r(F[f"GUEST_{n}_ACCESS_RIGHTS"])) for n in _SEGMENTS}

    def granularity(self, seg: _Seg, s: str) -> None:
        g = bool(seg.ar & AR_G)
        if seg.limit & 0xFFF != 0xFFF:
            self.guest(not g, seg.field("ACCESS_RIGHTS"), s,
                       f"G must be 0: limit {seg.limit:#x} has a 0 in bits 11:0")
        if seg.limit >> 20:
            self.guest(g, seg.field("ACCESS_RIGHTS"), s, f"G must be 1: limit {seg.limit:#x} has a 1 in bits 31:20")

    def common_ar(self, seg: _Seg, s: str, system: bool) -> None:
        """S, P, reserved bits and G of one usable segment."""
        f = seg.field("ACCESS_RIGHTS")
        if system:
            self.guest(not seg.ar & AR_S, f, s, f"S (bit 4) must be 0 for {seg.name} (AR {seg.ar:#x})")
        else:
            self.guest(seg.ar & AR_S, f, s, f"S (bit 4) must be 1 for {seg.name} (AR {seg.ar:#x})")
        self.guest(seg.ar & AR_P, f, s, f"{seg.name} must be present (P, bit 7; AR {seg.ar:#x})")
        self.guest(not seg.ar & AR_RESERVED_11_8, f, s, f"reserved bits 11:8 of AR {seg.ar:#x} must be 0")
        self.granularity(seg, s)
        self.guest(not seg.ar & AR_RESERVED_31_17, f, s, f"reserved bits 31:17 of AR {seg.ar:#x} must be 0")

    def check_guest_segments(self) -> None:
        s = "27.3.1.2"
        segs = self.segments()
        cs, ss, tr, ldtr = segs["CS"], segs["SS"], segs["TR"], segs["LDTR"]
        rflags = self.v.read(F.GUEST_RFLAGS)
        v86 = bool(rflags & x86.RFLAGS_VM)
        pe = bool(self.v.read(F.GUEST_CR0) & x86.CR0_PE)

        # Selectors.
        self.guest(not tr.selector & 4, tr.field("SELECTOR"), s, f"TI (bit 2) of TR selector {tr.selector:#x} must be 0")
        if ldtr.usable:
            self.guest(not ldtr.selector & 4, ldtr.field("SELECTOR"), s,
                       f"TI (bit 2) of LDTR selector {ldtr.selector:#x} must be 0")
        if not v86 and not self.unrestricted:
            self.guest(ss.rpl == cs.rpl, ss.field("SELECTOR"), s,
                       f"SS RPL {ss.rpl} must equal CS RPL {cs.rpl} (unrestricted guest is 0)")

        # Bases.
        for name in ("ES", "CS", "SS", "DS", "FS", "GS"):
            seg = segs[name]
            if v86:
                self.guest(seg.base == seg.selector << 4, seg.field("BASE"), s,
                           f"virtual-8086 base {seg.base:#x} must be selector {seg.selector:#x} << 4")
        for seg in (tr, segs["FS"], segs["GS"]) + ((ldtr,) if ldtr.usable else ()):
            self.guest(_canonical(seg.base, self.law), seg.field("BASE"), s, f"{seg.base:#x} is not canonical")
        self.guest(cs.base >> 32 == 0, cs.field("BASE"), s, f"bits 63:32 of {cs.base:#x} must be 0")
        for name in ("SS", "DS", "ES"):
            seg = segs[name]
            if seg.usable:
                self.guest(seg.base >> 32 == 0, seg.field("BASE"), s, f"bits 63:32 of {seg.base:#x} must be 0")

        if v86:
            for name in ("ES", "CS", "SS", "DS", "FS", "GS"):
                seg = segs[name]
                self.guest(seg.limit == 0xFFFF, seg.field("LIMIT"), s,
                           f"virtual-8086 limit {seg.limit:#x} must be 0xffff")
                self.guest(seg.ar == 0xF3, seg.field("ACCESS_RIGHTS"), s,
                           f"virtual-8086 access rights {seg.ar:#x} must be 0xf3")
        else:
            self.check_cs(cs, ss, s)
            self.check_ss(cs, ss, pe, s)
            for name in ("DS", "ES", "FS", "GS"):
                self.check_data_segment(segs[name], s)

        # TR.
        f = tr.field("ACCESS_RIGHTS")
        allowed = (SEG_TYPE_TSS32_BUSY,) if self.ia32e_guest else (SEG_TYPE_TSS16_BUSY, SEG_TYPE_TSS32_BUSY)
        self.guest(tr.type in allowed, f, s,
                   f"TR type {tr.type} must be {' or '.join(map(str, allowed))} (busy TSS"
                   f"{', 64-bit in IA-32e mode' if self.ia32e_guest else ''})")
        self.guest(tr.usable, f, s, "TR must be usable (bit 16 = 0)")
        self.common_ar(tr, s, system=True)

        # LDTR.
        if ldtr.usable:
            self.guest(ldtr.type == SEG_TYPE_LDT, ldtr.field("ACCESS_RIGHTS"), s,
                       f"LDTR type {ldtr.type} must be 2 (LDT)")
            self.common_ar(ldtr, s, system=True)

    def check_cs(self, cs: _Seg, ss: _Seg, s: str) -> None:
        f = cs.field("ACCESS_RIGHTS")
        allowed = {9, 11, 13, 15} | ({3} if self.unrestricted else set())
        self.guest(cs.type in allowed, f, s,
                   f"CS type {cs.type} must be an accessed code segment (9, 11, 13, 15)"
                   f"{' or 3 (unrestricted guest)' if self.unrestricted else ''}")
        if cs.type == 3:
            self.guest(cs.dpl == 0, f, s, f"CS DPL {cs.dpl} must be 0 for a type-3 CS")
        elif cs.type in (9, 11):
            self.guest(cs.dpl == ss.dpl, f, s, f"non-conforming CS DPL {cs.dpl} must equal SS DPL {ss.dpl}")
        elif cs.type in (13, 15):
            self.guest(cs.dpl <= ss.dpl, f, s, f"conforming CS DPL {cs.dpl} must not exceed SS DPL {ss.dpl}")
        if self.ia32e_guest and cs.ar & AR_L:
            self.guest(not cs.ar & AR_DB, f, s, "CS.D/B must be 0 when CS.L = 1 in IA-32e mode")
        self.common_ar(cs, s, system=False)

    def check_ss(self, cs: _Seg, ss: _Seg, pe: bool, s: str) -> None:
        f = ss.field("ACCESS_RIGHTS")
        if ss.usable:
            self.guest(ss.type in (3, 7), f, s, f"SS type {ss.type} must be 3 or 7 (read/write accessed data)")
        if not self.unrestricted:
            self.guest(ss.dpl == ss.rpl, f, s, f"SS DPL {ss.dpl} must equal SS RPL {ss.rpl}")
        if cs.type == 3 or not pe:
            self.guest(ss.dpl == 0, f, s, f"SS DPL {ss.dpl} must be 0 (CS type 3 or CR0.PE = 0)")
        if ss.usable:
            self.common_ar(ss, s, system=False)

    def check_data_segment(self, seg: _Seg, s: str) -> None:
        if not seg.usable:
            return
        f = seg.field("ACCESS_RIGHTS")
        self.guest(seg.ar & AR_TYPE_ACCESSED, f, s, f"{seg.name} type {seg.type} must have the accessed bit set")
        if seg.ar & AR_TYPE_CODE:
            self.guest(seg.ar & AR_TYPE_READABLE, f, s, f"{seg.name} code segment type {seg.type} must be readable")
        if not self.unrestricted and seg.type <= 11:
            self.guest(seg.dpl >= seg.rpl, f, s, f"{seg.name} DPL {seg.dpl} must not be below its RPL {seg.rpl}")
        self.common_ar(seg, s, system=False)

    def check_guest_descriptor_tables(self) -> None:
        s = "27.3.1.3"
        for t in ("GDTR", "IDTR"):
            base, limit = F[f"GUEST_{t}_BASE"], F[f"GUEST_{t}_LIMIT"]
            b, lim = self.v.read(base), self.v.read(limit)
            self.guest(_canonical(b, self.law), base.name, s, f"{b:#x} is not canonical")
            self.guest(lim >> 16 == 0, limit.name, s, f"{lim:#x} exceeds 0xffff (bits 31:16 must be 0)")

    def check_guest_non_register_state(self) -> None:
        s = "27.3.1.5"
        v = self.v
        activity = v.read(F.GUEST_ACTIVITY_STATE)
        intr = v.read(F.GUEST_INTERRUPTIBILITY_STATE)
        rflags = v.read(F.GUEST_RFLAGS)
        ss_dpl = (v.read(F.GUEST_SS_ACCESS_RIGHTS) & AR_DPL_MASK) >> AR_DPL_SHIFT
        IB = Interruptibility
        sti, movss = bool(intr & IB.BLOCKING_BY_STI), bool(intr & IB.BLOCKING_BY_MOV_SS)

        # Activity state.
        fa = F.GUEST_ACTIVITY_STATE.name
        supported = {ActivityState.ACTIVE} | set(self.caps.activity_states)
        self.guest(activity in supported, fa, s,
                   f"activity state {activity} is not supported (IA32_VMX_MISC[8:6] allows "
                   f"{sorted(int(a) for a in supported)})")
        if activity == ActivityState.HLT:
            self.guest(ss_dpl == 0, fa, s, f"HLT state needs SS DPL 0 (SS DPL is {ss_dpl})")
        if sti or movss:
            self.guest(activity == ActivityState.ACTIVE, fa, s, "blocking by STI or MOV SS needs the active state")
        if self.inject and activity != ActivityState.ACTIVE:
            self.injectable_in(activity, fa, s)

        # Interruptibility state.
        fi = F.GUEST_INTERRUPTIBILITY_STATE.name
        self.guest(intr >> 4 == 0, fi, s,
                   f"bits 31:4 of {intr:#x} must be 0 (bit 4, enclave interruption, needs SGX)")
        self.guest(not (sti and movss), fi, s, "blocking by STI and by MOV SS cannot both be 1")
        self.guest(not sti or rflags & x86.RFLAGS_IF, fi, s, "blocking by STI needs RFLAGS.IF = 1")
        if self.inject and self.inject_type == InterruptionType.EXTERNAL_INTERRUPT:
            self.guest(not (sti or movss), fi, s, "an external interrupt cannot be injected under STI/MOV-SS blocking")
        if self.inject and self.inject_type == InterruptionType.NMI:
            self.guest(not movss, fi, s, "an NMI cannot be injected under MOV-SS blocking")
        self.guest(not intr & IB.BLOCKING_BY_SMI, fi, s, "blocking by SMI must be 0 outside SMM")
        if self.pin & PIN.VIRTUAL_NMIS and self.inject and self.inject_type == InterruptionType.NMI:
            self.guest(not intr & IB.BLOCKING_BY_NMI, fi, s,
                       "blocking by NMI must be 0 to inject an NMI with VIRTUAL_NMIS")
        if self.inject and self.inject_type == InterruptionType.NMI:
            # vmlab reports this case with qualification 3, as Bochs does.
            self.guest(not sti, fi, s, "an NMI cannot be injected under STI blocking",
                       EntryFailureQualification.NMI_INJECTION)

        # Pending debug exceptions.
        fp = F.GUEST_PENDING_DBG_EXCEPTIONS.name
        pend = v.read(F.GUEST_PENDING_DBG_EXCEPTIONS)
        self.guest(not pend & PENDING_DBG_RESERVED, fp, s,
                   f"reserved bits {pend & PENDING_DBG_RESERVED:#x} (11:4, 13, 15, 63:17) must be 0")
        self.guest(not pend & PENDING_DBG_RTM, fp, s, "bit 16 (RTM) must be 0: vmlab does not support RTM")
        if sti or movss or activity == ActivityState.HLT:
            tf = bool(rflags & x86.RFLAGS_TF)
            btf = bool(v.read(F.GUEST_IA32_DEBUGCTL) & DEBUGCTL_BTF)
            bs = bool(pend & PENDING_DBG_BS)
            if tf and not btf:
                self.guest(bs, fp, s, "BS (bit 14) must be 1 when RFLAGS.TF = 1 and DEBUGCTL.BTF = 0 under blocking/HLT")
            else:
                self.guest(not bs, fp, s, "BS (bit 14) must be 0 when RFLAGS.TF = 0 or DEBUGCTL.BTF = 1 under blocking/HLT")

        # VMCS link pointer.
        link = v.read(F.VMCS_LINK_POINTER)
        if link != VMCS_LINK_POINTER_NONE:
            fl, q = F.VMCS_LINK_POINTER.name, EntryFailureQualification.INVALID_VMCS_LINK_POINTER
            self.guest(link & 0xFFF == 0, fl, s, f"{link:#x} is not 4-KiB aligned", q)
            self.guest(self.fits_paw(link), fl, s, f"{link:#x} exceeds the {self.paw}-bit physical-address width", q)
            self.guest(False, fl, s, f"{link:#x} is not ~0 and vmlab supports no linked (shadow) VMCS", q)

    def injectable_in(self, activity: int, field: str, s: str) -> None:
        """Events that may be injected into a guest entering HLT/shutdown/wait-for-SIPI."""
        t, vec = self.inject_type, self.inject_vector
        T = InterruptionType
        if activity == ActivityState.HLT:
            ok = (t in (T.EXTERNAL_INTERRUPT, T.NMI, T.OTHER_EVENT)
                  or (t == T.HARDWARE_EXCEPTION and vec in (1, 18)))
            what = "external interrupts, NMIs, #DB, #MC and MTF"
        elif activity == ActivityState.SHUTDOWN:
            ok = t == T.NMI or (t == T.HARDWARE_EXCEPTION and vec == 18)
            what = "NMIs and #MC"
        else:
            ok, what = False, "no events"
        self.guest(ok, field, s, f"activity state {activity} allows injecting {what} only "
                                 f"(type {t}, vector {vec})")

    def check_guest_pdptes(self) -> None:
        s = "27.3.1.6"
        v = self.v
        cr0, cr4 = v.read(F.GUEST_CR0), v.read(F.GUEST_CR4)
        pae_paging = cr0 & x86.CR0_PG and cr4 & x86.CR4_PAE and not self.ia32e_guest
        if not (pae_paging and self.proc2 & PROC2.ENABLE_EPT):
            return
        reserved = PDPTE_RESERVED_LOW | (U64 & ~((1 << self.paw) - 1))
        for i in range(4):
            f = F[f"GUEST_PDPTE{i}"]
            pdpte = v.read(f)
            if pdpte & 1:
                self.guest(not pdpte & reserved, f.name, s,
                           f"present PDPTE {pdpte:#x} sets reserved bits {pdpte & reserved:#x}",
                           EntryFailureQualification.PDPTE_LOADING)


def check_vm_entry(vmcs: Vmcs, caps: VmxCapabilities | None = None, *, instruction: str | None = None,
                   host_in_ia32e: bool = True) -> EntryResult:
    """Run the VM-entry checks of SDM Vol. 3C ch. 27 on ``vmcs`` against ``caps``.

    ``instruction`` ("vmlaunch" or "vmresume") adds the 27.1 launch-state check.
    ``host_in_ia32e`` says whether the VMM runs in IA-32e mode (27.2.4); vmlab's
    VMM is modelled as a 64-bit host.  Never raises for any VMCS contents.
    """
    caps = caps or VmxCapabilities()
    try:
        if instruction is not None:
            if instruction == "vmlaunch" and vmcs.launch_state is not LaunchState.CLEAR:
                raise _Failed(VmfailValid(VmInstructionError.VMLAUNCH_NONCLEAR_VMCS, "launch state", "27.1",
                                          "launch state: VMLAUNCH needs a clear VMCS (SDM Vol. 3C 27.1)"))
            if instruction == "vmresume" and vmcs.launch_state is not LaunchState.LAUNCHED:
                raise _Failed(VmfailValid(VmInstructionError.VMRESUME_NONLAUNCHED_VMCS, "launch state", "27.1",
                                          "launch state: VMRESUME needs a launched VMCS (SDM Vol. 3C 27.1)"))
            if instruction not in ("vmlaunch", "vmresume"):
                raise ValueError(f"instruction must be 'vmlaunch' or 'vmresume', not {instruction!r}")
        c = _Checker(vmcs, caps, host_in_ia32e)
        c.check_execution_controls()
        c.check_exit_controls()
        c.check_entry_controls()
        c.check_host()
        c.check_guest()
    except _Failed as failed:
        return failed.result
    return EntryOk()


# --------------------------------------------------------------------------- baseline VMCS

MODES = ("long64", "protected32", "real-unrestricted")

#: The EPT PML4 and VPID the baseline uses (any 4-KiB-aligned address below MAXPHYADDR works).
BASELINE_EPT_PML4 = 0x00100000
BASELINE_VPID = 1
#: The power-on IA32_PAT value (SDM Vol. 3A 13.12.4).
PAT_POWER_ON = 0x0007040600070406


def baseline_vmcs(mode: str = "long64", caps: VmxCapabilities | None = None) -> Vmcs:
    """A VMCS that passes :func:`check_vm_entry` with ``caps``, for a guest in ``mode``.

    * ``long64``: 64-bit code (CS.L = 1), 4-level paging, EFER.LME/LMA, IA-32e mode guest.
    * ``protected32``: flat 32-bit protected mode, paging off (vmlab's Multiboot entry state).
    * ``real-unrestricted``: real mode at F000:FFF0, the reset state.

    All three use EPT (WB, 4 levels, PML4 at BASELINE_EPT_PML4), VPID 1 and
    unrestricted guest, so one VMCS can follow a guest through mode switches.
    Guest CR4.VMXE is 1 (IA32_VMX_CR4_FIXED0 requires it): the CR4 guest/host
    mask owns VMXE and the read shadow shows it 0; CR0.NE likewise.  The host is
    a 64-bit VMM.  Controls: external-interrupt and NMI exiting with virtual
    NMIs, HLT and unconditional I/O exiting, ack interrupt on exit, save/load
    EFER and PAT -- each adjusted to the capability MSRs.  Raises
    VmConfigError if ``caps`` cannot run the mode (no EPT/unrestricted guest).
    """
    if mode not in MODES:
        raise VmConfigError(f"unknown baseline mode {mode!r}; choose one of {', '.join(MODES)}")
    caps = caps or VmxCapabilities()
    needed = PROC2.ENABLE_EPT | PROC2.UNRESTRICTED_GUEST | PROC2.ENABLE_VPID
    if not caps.supports(needed) or not caps.supports(PROC.ACTIVATE_SECONDARY_CONTROLS):
        raise VmConfigError(f"baseline VMCS needs {needed!r}, which these capabilities do not support")
    if mode == "long64" and not caps.supports(ENTRY.IA32E_MODE_GUEST):
        raise VmConfigError("long64 baseline needs IA32E_MODE_GUEST")
    vmcs = caps.new_vmcs()
    w = vmcs.write
    long64 = mode == "long64"

    # Controls.
    w(F.PIN_BASED_VM_EXEC_CONTROL, caps.adjust("pin", PIN.EXTERNAL_INTERRUPT_EXITING | PIN.NMI_EXITING
                                                | PIN.VIRTUAL_NMIS))
    w(F.CPU_BASED_VM_EXEC_CONTROL, caps.adjust("proc", PROC.HLT_EXITING | PROC.UNCONDITIONAL_IO_EXITING
                                                | PROC.ACTIVATE_SECONDARY_CONTROLS))
    w(F.SECONDARY_VM_EXEC_CONTROL, caps.adjust("proc2", needed))
    w(F.VM_EXIT_CONTROLS, caps.adjust("exit", EXIT.HOST_ADDRESS_SPACE_SIZE | EXIT.ACK_INTERRUPT_ON_EXIT
                                      | EXIT.SAVE_EFER | EXIT.LOAD_EFER | EXIT.SAVE_PAT | EXIT.LOAD_PAT))
    entry = ENTRY.LOAD_EFER | ENTRY.LOAD_PAT | (ENTRY.IA32E_MODE_GUEST if long64 else 0)
    w(F.VM_ENTRY_CONTROLS, caps.adjust("entry", entry))
    memtype = EPT_MEMTYPE_WB if EPT_MEMTYPE_WB in caps.ept_memory_types else min(caps.ept_memory_types)
    w(F.EPT_POINTER, EptPointer(BASELINE_EPT_PML4, memtype, min(caps.ept_walk_lengths)).encode())
    w(F.VIRTUAL_PROCESSOR_ID, BASELINE_VPID)
    w(F.VMCS_LINK_POINTER, VMCS_LINK_POINTER_NONE)
    w(F.CR0_GUEST_HOST_MASK, x86.CR0_NE)
    w(F.CR4_GUEST_HOST_MASK, x86.CR4_VMXE)

    # Host state: a 64-bit VMM.
    w(F.HOST_CR0, x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_WP | x86.CR0_PG)
    w(F.HOST_CR3, 0x1000)
    w(F.HOST_CR4, x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT | x86.CR4_VMXE)
    w(F.HOST_IA32_EFER, x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA | x86.EFER_NXE)
    w(F.HOST_IA32_PAT, PAT_POWER_ON)
    for seg, sel in (("CS", 0x08), ("SS", 0x10), ("DS", 0x10), ("ES", 0x10), ("FS", 0), ("GS", 0), ("TR", 0x18)):
        w(F[f"HOST_{seg}_SELECTOR"], sel)
    w(F.HOST_TR_BASE, 0xFFFFFFFF80002000)
    w(F.HOST_GDTR_BASE, 0xFFFFFFFF80003000)
    w(F.HOST_IDTR_BASE, 0xFFFFFFFF80004000)
    w(F.HOST_RSP, 0xFFFFFFFF80010000)
    w(F.HOST_RIP, 0xFFFFFFFF80001000)

    # Guest state.
    code = 0xB        # execute/read, accessed
    data = 0x3        # read/write, accessed
    if mode == "real-unrestricted":
        cr0 = x86.CR0_ET | x86.CR0_NE
        cr4 = x86.CR4_VMXE
        efer = 0
        segs = {"CS": (0xF000, 0xF0000, 0xFFFF, make_access_rights(code))}
        for n in _DATA_SEGMENTS:
            segs[n] = (0, 0, 0xFFFF, make_access_rights(data))
        segs["TR"] = (0, 0, 0xFFFF, make_access_rights(SEG_TYPE_TSS32_BUSY, s=False))
        gdtr, idtr = (0, 0xFFFF), (0, 0x3FF)
        rip, rsp = 0xFFF0, 0
    else:
        flat = 0xFFFFFFFF
        if long64:
            cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_WP | x86.CR0_PG
            cr4 = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT | x86.CR4_VMXE
            efer = x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA | x86.EFER_NXE
            cs_ar = make_access_rights(code, l=True, g=True)
        else:
            cr0 = x86.CR0_PE | x86.CR0_ET | x86.CR0_NE
            cr4 = x86.CR4_VMXE
            efer = 0
            cs_ar = make_access_rights(code, db=True, g=True)
        segs = {"CS": (0x08, 0, flat, cs_ar)}
        for n in _DATA_SEGMENTS:
            segs[n] = (0x10, 0, flat, make_access_rights(data, db=True, g=True))
        segs["TR"] = (0x18, 0x5000, 0x67, make_access_rights(SEG_TYPE_TSS32_BUSY, s=False))
        gdtr, idtr = (0x6000, 0x27), (0x7000, 0xFFF)
        rip, rsp = 0x100000, 0x8000
    segs["LDTR"] = (0, 0, 0, AR_UNUSABLE)
    for n, (sel, base, limit, ar) in segs.items():
        w(F[f"GUEST_{n}_SELECTOR"], sel)
        w(F[f"GUEST_{n}_BASE"], base)
        w(F[f"GUEST_{n}_LIMIT"], limit)
        w(F[f"GUEST_{n}_ACCESS_RIGHTS"], ar)
    w(F.GUEST_CR0, cr0)
    w(F.GUEST_CR3, 0x2000 if long64 else 0)
    w(F.GUEST_CR4, cr4)
    w(F.CR0_READ_SHADOW, cr0 & ~x86.CR0_NE if mode == "real-unrestricted" else cr0)
    w(F.CR4_READ_SHADOW, cr4 & ~x86.CR4_VMXE)
    w(F.GUEST_IA32_EFER, efer)
    w(F.GUEST_IA32_PAT, PAT_POWER_ON)
    w(F.GUEST_GDTR_BASE, gdtr[0])
    w(F.GUEST_GDTR_LIMIT, gdtr[1])
    w(F.GUEST_IDTR_BASE, idtr[0])
    w(F.GUEST_IDTR_LIMIT, idtr[1])
    w(F.GUEST_DR7, 0x400)
    w(F.GUEST_RIP, rip)
    w(F.GUEST_RSP, rsp)
    w(F.GUEST_RFLAGS, x86.RFLAGS_FIXED)
    w(F.GUEST_ACTIVITY_STATE, ActivityState.ACTIVE)
    w(F.GUEST_INTERRUPTIBILITY_STATE, 0)
    return vmcs

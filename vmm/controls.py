"""VMX control fields: execution, exit and entry controls, event injection, EPTP.

Bit numbers are the SDM's, verbatim (2023+ numbering, SDM Vol. 3C ch. 25;
one lower before 2023):

* :class:`PinBasedControls` -- 25.6.1, Table 25-5
* :class:`PrimaryProcBasedControls` -- 25.6.2, Table 25-6
* :class:`SecondaryProcBasedControls` -- 25.6.2, Table 25-7
* :class:`TertiaryProcBasedControls` -- 25.6.2 (64-bit field)
* :class:`VmExitControls` -- 25.7.1 (primary VM-exit controls)
* :class:`VmEntryControls` -- 25.8.1
* :class:`InterruptionInfo` -- 25.8.3 (VM-entry interruption information) and
  25.9.2 (VM-exit interruption / IDT-vectoring information share the format)
* :class:`EptPointer` -- 25.6.11 (extended-page-table pointer)

"Default1" controls (Appendix A.2): bits with no function, or functions older
processors always had, that the legacy capability MSRs report as must-be-1.
The ``*_DEFAULT1`` masks below are those of Appendix A.3.1, A.3.2, A.4, A.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag


class PinBasedControls(IntFlag):
    """Pin-based VM-execution controls (``PIN_BASED_VM_EXEC_CONTROL``), SDM Vol. 3C Table 25-5."""

    EXTERNAL_INTERRUPT_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    ACTIVATE_PREEMPTION_TIMER = 1 << 6
    PROCESS_POSTED_INTERRUPTS = 1 << 7


class PrimaryProcBasedControls(IntFlag):
    """Primary processor-based VM-execution controls (``CPU_BASED_VM_EXEC_CONTROL``), SDM Vol. 3C Table 25-6."""

    INTERRUPT_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    USE_TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCONDITIONAL_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryProcBasedControls(IntFlag):
    """Secondary processor-based VM-execution controls (``SECONDARY_VM_EXEC_CONTROL``), SDM Vol. 3C Table 25-7.

    Bit 29 is not defined.
    """

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESCRIPTOR_TABLE_EXITING = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC = 1 << 4
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRT = 1 << 8
    VIRTUAL_INTR_DELIVERY = 1 << 9
    PAUSE_LOOP_EXITING = 1 << 10
    RDRAND_EXITING = 1 << 11
    ENABLE_INVPCID = 1 << 12
    ENABLE_VMFUNC = 1 << 13
    VMCS_SHADOWING = 1 << 14
    ENCLS_EXITING = 1 << 15
    RDSEED_EXITING = 1 << 16
    ENABLE_PML = 1 << 17
    EPT_VIOLATION_VE = 1 << 18
    CONCEAL_VMX_FROM_PT = 1 << 19
    ENABLE_XSAVES = 1 << 20
    PASID_TRANSLATION = 1 << 21
    MODE_BASED_EPT_EXECUTE = 1 << 22
    SUB_PAGE_WRITE_PERMISSIONS = 1 << 23
    PT_USES_GUEST_PHYSICAL = 1 << 24
    USE_TSC_SCALING = 1 << 25
    ENABLE_USER_WAIT_PAUSE = 1 << 26
    ENABLE_PCONFIG = 1 << 27
    ENCLV_EXITING = 1 << 28
    VMM_BUS_LOCK_DETECTION = 1 << 30
    INSTRUCTION_TIMEOUT = 1 << 31


class TertiaryProcBasedControls(IntFlag):
    """Tertiary processor-based VM-execution controls (``TERTIARY_VM_EXEC_CONTROL``), SDM Vol. 3C 25.6.2.

    vmlab supports none of them (it does not advertise ``ACTIVATE_TERTIARY_CONTROLS``).
    """

    LOADIWKEY_EXITING = 1 << 0
    ENABLE_HLAT = 1 << 1
    EPT_PAGING_WRITE_CONTROL = 1 << 2
    GUEST_PAGING_VERIFICATION = 1 << 3
    IPI_VIRTUALIZATION = 1 << 4
    ENABLE_MSR_LIST_INSTRUCTIONS = 1 << 6
    VIRTUALIZE_IA32_SPEC_CTRL = 1 << 7


class VmExitControls(IntFlag):
    """Primary VM-exit controls (``VM_EXIT_CONTROLS``), SDM Vol. 3C 25.7.1."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDRESS_SPACE_SIZE = 1 << 9
    LOAD_PERF_GLOBAL_CTRL = 1 << 12
    ACK_INTERRUPT_ON_EXIT = 1 << 15
    SAVE_PAT = 1 << 18
    LOAD_PAT = 1 << 19
    SAVE_EFER = 1 << 20
    LOAD_EFER = 1 << 21
    SAVE_PREEMPTION_TIMER = 1 << 22
    CLEAR_BNDCFGS = 1 << 23
    CONCEAL_VMX_FROM_PT = 1 << 24
    CLEAR_RTIT_CTL = 1 << 25
    CLEAR_LBR_CTL = 1 << 26
    CLEAR_UINV = 1 << 27
    LOAD_CET_STATE = 1 << 28
    LOAD_PKRS = 1 << 29
    SAVE_PERF_GLOBAL_CTRL = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class VmEntryControls(IntFlag):
    """VM-entry controls (``VM_ENTRY_CONTROLS``), SDM Vol. 3C 25.8.1."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE_GUEST = 1 << 9
    ENTRY_TO_SMM = 1 << 10
    DEACTIVATE_DUAL_MONITOR = 1 << 11
    LOAD_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_PAT = 1 << 14
    LOAD_EFER = 1 << 15
    LOAD_BNDCFGS = 1 << 16
    CONCEAL_VMX_FROM_PT = 1 << 17
    LOAD_RTIT_CTL = 1 << 18
    LOAD_UINV = 1 << 19
    LOAD_CET_STATE = 1 << 20
    LOAD_LBR_CTL = 1 << 21
    LOAD_PKRS = 1 << 22


# Default1 classes (SDM Vol. 3C Appendix A.2): the legacy capability MSRs report these as must-be-1.
PIN_DEFAULT1 = 0x00000016        # bits 1, 2, 4 (A.3.1)
PROC_DEFAULT1 = 0x0401E172       # bits 1, 4-6, 8, 13-16, 26 (A.3.2)
EXIT_DEFAULT1 = 0x00036DFF       # bits 0-8, 10, 11, 13, 14, 16, 17 (A.4)
ENTRY_DEFAULT1 = 0x000011FF      # bits 0-8, 12 (A.5)

#: Default1 bits that are real controls; a processor may allow them to be 0 in the TRUE
#: capability MSRs (Appendix A.2).  All other default1 bits are reserved and stay 1.
PROC_DEFAULT1_CONTROLS = PrimaryProcBasedControls.CR3_LOAD_EXITING | PrimaryProcBasedControls.CR3_STORE_EXITING
EXIT_DEFAULT1_CONTROLS = VmExitControls.SAVE_DEBUG_CONTROLS
ENTRY_DEFAULT1_CONTROLS = VmEntryControls.LOAD_DEBUG_CONTROLS


# --------------------------------------------------------------------------- event injection (25.8.3)

class InterruptionType(IntEnum):
    """Interruption type, bits 10:8 of the interruption-information formats (SDM Vol. 3C 25.8.3)."""

    EXTERNAL_INTERRUPT = 0
    RESERVED = 1
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4
    PRIVILEGED_SOFTWARE_EXCEPTION = 5   # INT1 (ICEBP)
    SOFTWARE_EXCEPTION = 6              # INT3, INTO
    OTHER_EVENT = 7                     # pending MTF VM exit (vector 0)


INTR_INFO_VECTOR_MASK = 0xFF
INTR_INFO_TYPE_SHIFT = 8
INTR_INFO_TYPE_MASK = 0x7 << INTR_INFO_TYPE_SHIFT
INTR_INFO_DELIVER_ERROR_CODE = 1 << 11
INTR_INFO_NMI_UNBLOCKING = 1 << 12      # VM-exit interruption information only ("NMI unblocking due to IRET")
INTR_INFO_VALID = 1 << 31
#: Bits 30:12 of the VM-entry interruption-information field must be 0 (SDM Vol. 3C 27.2.1.3).
INTR_INFO_ENTRY_RESERVED = 0x7FFFF000

#: Types whose injection uses the VM-entry instruction length (SDM Vol. 3C 27.2.1.3).
SOFTWARE_EVENT_TYPES = frozenset({InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION,
                                  InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION})
#: Exceptions delivered with an error code (SDM Vol. 3C 27.2.1.3; #CP too on processors with CET, not vmlab).
ERROR_CODE_EXCEPTIONS = frozenset({8, 10, 11, 12, 13, 14, 17})


@dataclass(frozen=True)
class InterruptionInfo:
    """An interruption-information value (SDM Vol. 3C 25.8.3 for VM entry, 25.9.2 for VM exit).

    ``nmi_unblocking`` is bit 12, meaningful only in the VM-exit interruption
    information field; in the VM-entry field bits 30:12 are reserved.
    """

    vector: int
    type: InterruptionType
    deliver_error_code: bool = False
    nmi_unblocking: bool = False
    valid: bool = True

    def encode(self) -> int:
        if not 0 <= self.vector <= 0xFF:
            raise ValueError(f"vector {self.vector} does not fit bits 7:0")
        return (self.vector | (int(self.type) << INTR_INFO_TYPE_SHIFT)
                | (INTR_INFO_DELIVER_ERROR_CODE if self.deliver_error_code else 0)
                | (INTR_INFO_NMI_UNBLOCKING if self.nmi_unblocking else 0)
                | (INTR_INFO_VALID if self.valid else 0))

    @classmethod
    def decode(cls, value: int) -> "InterruptionInfo":
        """Split a field value; bits 30:13 are ignored."""
        return cls(vector=value & INTR_INFO_VECTOR_MASK,
                   type=InterruptionType((value & INTR_INFO_TYPE_MASK) >> INTR_INFO_TYPE_SHIFT),
                   deliver_error_code=bool(value & INTR_INFO_DELIVER_ERROR_CODE),
                   nmi_unblocking=bool(value & INTR_INFO_NMI_UNBLOCKING),
                   valid=bool(value & INTR_INFO_VALID))

    # Constructors for the usual injections.
    @classmethod
    def external_interrupt(cls, vector: int) -> "InterruptionInfo":
        return cls(vector, InterruptionType.EXTERNAL_INTERRUPT)

    @classmethod
    def nmi(cls) -> "InterruptionInfo":
        return cls(2, InterruptionType.NMI)

    @classmethod
    def hardware_exception(cls, vector: int, deliver_error_code: bool | None = None) -> "InterruptionInfo":
        """A hardware exception; the error-code bit defaults to what the vector architecturally pushes."""
        if deliver_error_code is None:
            deliver_error_code = vector in ERROR_CODE_EXCEPTIONS
        return cls(vector, InterruptionType.HARDWARE_EXCEPTION, deliver_error_code)

    @classmethod
    def software_interrupt(cls, vector: int) -> "InterruptionInfo":
        return cls(vector, InterruptionType.SOFTWARE_INTERRUPT)

    @classmethod
    def software_exception(cls, vector: int) -> "InterruptionInfo":
        """INT3 (vector 3) or INTO (vector 4)."""
        return cls(vector, InterruptionType.SOFTWARE_EXCEPTION)

    @classmethod
    def privileged_software_exception(cls) -> "InterruptionInfo":
        """INT1 / ICEBP (vector 1)."""
        return cls(1, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION)

    @classmethod
    def pending_mtf(cls) -> "InterruptionInfo":
        """"Other event" type 7, vector 0: a pending MTF VM exit."""
        return cls(0, InterruptionType.OTHER_EVENT)


# --------------------------------------------------------------------------- EPTP (25.6.11)

EPT_MEMTYPE_UC = 0
EPT_MEMTYPE_WB = 6
EPTP_MEMTYPE_MASK = 0x7
EPTP_WALK_LENGTH_SHIFT = 3
EPTP_WALK_LENGTH_MASK = 0x7 << EPTP_WALK_LENGTH_SHIFT
EPTP_AD_ENABLE = 1 << 6
EPTP_SSS_ENABLE = 1 << 7            # supervisor shadow-stack control
EPTP_RESERVED_11_8 = 0xF << 8
EPTP_ADDRESS_MASK = ~0xFFF & ((1 << 64) - 1)


@dataclass(frozen=True)
class EptPointer:
    """The extended-page-table pointer (``EPT_POINTER``), SDM Vol. 3C 25.6.11.

    ``walk_length`` is the number of levels (4 or 5); the field holds it minus 1.
    """

    pml4_address: int
    memory_type: int = EPT_MEMTYPE_WB
    walk_length: int = 4
    ad_enabled: bool = False
    sss_enabled: bool = False

    def encode(self) -> int:
        if self.pml4_address & 0xFFF:
            raise ValueError(f"EPT PML4 address {self.pml4_address:#x} is not 4-KiB aligned")
        if not 1 <= self.walk_length <= 8:
            raise ValueError(f"EPT walk length {self.walk_length} does not fit bits 5:3")
        return (self.pml4_address | (self.memory_type & EPTP_MEMTYPE_MASK)
                | ((self.walk_length - 1) << EPTP_WALK_LENGTH_SHIFT)
                | (EPTP_AD_ENABLE if self.ad_enabled else 0) | (EPTP_SSS_ENABLE if self.sss_enabled else 0))

    @classmethod
    def decode(cls, value: int) -> "EptPointer":
        """Split a field value; reserved bits 11:8 are ignored."""
        return cls(pml4_address=value & EPTP_ADDRESS_MASK, memory_type=value & EPTP_MEMTYPE_MASK,
                   walk_length=((value & EPTP_WALK_LENGTH_MASK) >> EPTP_WALK_LENGTH_SHIFT) + 1,
                   ad_enabled=bool(value & EPTP_AD_ENABLE), sss_enabled=bool(value & EPTP_SSS_ENABLE))

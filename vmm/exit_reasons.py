"""VMX basic exit reasons, the exit-reason field, and VM-instruction error numbers.

Numbers are the Intel SDM's, verbatim.  Section numbers in vmm/ follow the 2023+
SDM numbering (Vol. 3C: ch. 25 VMCS, 26 VMX non-root operation, 27 VM entries,
28 VM exits, 31 VMX instruction reference); SDMs before 2023 number those
chapters one lower (24, 25, 26, 27, 30).  Appendices (A capability MSRs, B field
encodings, C exit reasons) keep their letters.

* :class:`ExitReason` -- SDM Vol. 3C, Appendix C "VMX Basic Exit Reasons".
* :class:`ExitReasonField` -- the 32-bit exit-reason VMCS field, SDM Vol. 3C
  25.9.1 "Basic VM-Exit Information" (bits 15:0 basic reason, 26 bus lock,
  27 enclave mode, 28 pending MTF, 29 exit from VMX root, 31 VM-entry failure).
* :class:`VmInstructionError` -- SDM Vol. 3C 31.4 "VM Instruction Error Numbers".
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitReason(IntEnum):
    """Basic exit reasons (bits 15:0 of the exit-reason field), SDM Vol. 3C Appendix C.

    Numbers Appendix C does not assign are left out, as in Bochs' vmx.h: 35 and
    38 (never used), 42 (never used), 71, 82 and 83 (not assigned as of the
    2025 SDM).  ``ExitReason(35)`` therefore raises ValueError: a VMM must not
    see them, and :func:`basic_exit_reason_name` names them for logs.
    """

    EXCEPTION_NMI = 0              # exception or NMI (exception bitmap / NMI exiting)
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT = 3                       # INIT signal
    SIPI = 4                       # start-up IPI (guest in wait-for-SIPI)
    IO_SMI = 5                     # I/O system-management interrupt
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMXOFF = 26
    VMXON = 27
    CR_ACCESS = 28                 # control-register access (qualification: Table 28-3)
    DR_ACCESS = 29                 # MOV DR (Table 28-4)
    IO_INSTRUCTION = 30            # (Table 28-5)
    RDMSR = 31
    WRMSR = 32                     # WRMSR or WRMSRNS
    ENTRY_FAIL_GUEST_STATE = 33    # VM-entry failure due to invalid guest state
    ENTRY_FAIL_MSR_LOADING = 34    # VM-entry failure due to MSR loading
    # 35: not used
    MWAIT = 36
    MONITOR_TRAP_FLAG = 37
    # 38: not used
    MONITOR = 39
    PAUSE = 40
    ENTRY_FAIL_MACHINE_CHECK = 41  # VM-entry failure due to machine-check event
    # 42: not used
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    VIRTUALIZED_EOI = 45
    GDTR_IDTR_ACCESS = 46
    LDTR_TR_ACCESS = 47
    EPT_VIOLATION = 48             # (Table 28-7)
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52          # VMX-preemption timer expired
    INVVPID = 53
    WBINVD = 54                    # WBINVD or WBNOINVD
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62                  # page-modification log full
    XSAVES = 63
    XRSTORS = 64
    PCONFIG = 65
    SPP_EVENT = 66                 # SPP-related event
    UMWAIT = 67
    TPAUSE = 68
    LOADIWKEY = 69
    ENCLV = 70
    # 71: not assigned
    ENQCMD_PASID_FAIL = 72         # ENQCMD PASID-translation failure
    ENQCMDS_PASID_FAIL = 73        # ENQCMDS PASID-translation failure
    BUS_LOCK = 74
    INSTRUCTION_TIMEOUT = 75       # "notify VM exit"
    SEAMCALL = 76
    TDCALL = 77
    RDMSRLIST = 78
    WRMSRLIST = 79
    URDMSR = 80
    UWRMSR = 81
    # 82, 83: not assigned
    RDMSR_IMM = 84                 # RDMSR with an immediate MSR index
    WRMSRNS_IMM = 85               # WRMSRNS with an immediate MSR index


#: Basic exit-reason numbers below the highest defined one that Appendix C leaves unassigned.
EXIT_REASON_GAPS = frozenset({35, 38, 42, 71, 82, 83})

#: VM-entry failures: exit reasons reported with bit 31 of the exit-reason field set.
ENTRY_FAILURE_REASONS = frozenset({ExitReason.ENTRY_FAIL_GUEST_STATE, ExitReason.ENTRY_FAIL_MSR_LOADING,
                                   ExitReason.ENTRY_FAIL_MACHINE_CHECK})

# Exit-reason field bits (SDM Vol. 3C 25.9.1, "Basic VM-Exit Information").
EXIT_REASON_BASIC_MASK = 0xFFFF
EXIT_REASON_BUS_LOCK_ASSERTED = 1 << 26    # a bus lock was asserted (bus-lock detection)
EXIT_REASON_ENCLAVE_MODE = 1 << 27         # the exit came from enclave mode
EXIT_REASON_PENDING_MTF = 1 << 28          # a monitor-trap-flag VM exit is pending
EXIT_REASON_FROM_VMX_ROOT = 1 << 29        # exit from VMX root operation (SMM dual monitor)
EXIT_REASON_ENTRY_FAILURE = 1 << 31        # VM-entry failure
#: Bits a processor writes as 0 (bit 16) or leaves undefined (24:17, 30) -- vmlab writes 0.
EXIT_REASON_DEFINED_MASK = (EXIT_REASON_BASIC_MASK | EXIT_REASON_BUS_LOCK_ASSERTED | EXIT_REASON_ENCLAVE_MODE
                            | EXIT_REASON_PENDING_MTF | EXIT_REASON_FROM_VMX_ROOT | EXIT_REASON_ENTRY_FAILURE)


def basic_exit_reason_name(basic: int) -> str:
    """A log-friendly name for a basic exit reason, including unassigned numbers."""
    try:
        return ExitReason(basic).name
    except ValueError:
        return f"UNASSIGNED_{basic}"


@dataclass(frozen=True)
class ExitReasonField:
    """The exit-reason VMCS field (``VM_EXIT_REASON``, 0x4402), SDM Vol. 3C 25.9.1.

    ``basic`` is an :class:`ExitReason` when the number is assigned, else a plain int.
    """

    basic: int
    entry_failure: bool = False
    enclave_mode: bool = False
    pending_mtf: bool = False
    from_vmx_root: bool = False
    bus_lock_asserted: bool = False

    def encode(self) -> int:
        """The 32-bit field value."""
        if not 0 <= self.basic <= EXIT_REASON_BASIC_MASK:
            raise ValueError(f"basic exit reason {self.basic} does not fit bits 15:0")
        return (int(self.basic)
                | (EXIT_REASON_ENTRY_FAILURE if self.entry_failure else 0)
                | (EXIT_REASON_ENCLAVE_MODE if self.enclave_mode else 0)
                | (EXIT_REASON_PENDING_MTF if self.pending_mtf else 0)
                | (EXIT_REASON_FROM_VMX_ROOT if self.from_vmx_root else 0)
                | (EXIT_REASON_BUS_LOCK_ASSERTED if self.bus_lock_asserted else 0))

    @classmethod
    def decode(cls, value: int) -> "ExitReasonField":
        """Split a field value; undefined bits (16, 24:17, 30) are ignored."""
        basic = value & EXIT_REASON_BASIC_MASK
        try:
            basic = ExitReason(basic)
        except ValueError:
            pass
        return cls(basic=basic,
                   entry_failure=bool(value & EXIT_REASON_ENTRY_FAILURE),
                   enclave_mode=bool(value & EXIT_REASON_ENCLAVE_MODE),
                   pending_mtf=bool(value & EXIT_REASON_PENDING_MTF),
                   from_vmx_root=bool(value & EXIT_REASON_FROM_VMX_ROOT),
                   bus_lock_asserted=bool(value & EXIT_REASON_BUS_LOCK_ASSERTED))


class VmInstructionError(IntEnum):
    """VM-instruction error numbers (``VM_INSTRUCTION_ERROR``, 0x4400), SDM Vol. 3C 31.4, Table 31-1.

    A VMX instruction that ends in VMfailValid stores one of these.  14, 21 and
    27 are reserved (not used) in the SDM and left out.
    """

    VMCALL_IN_VMX_ROOT = 1                      # VMCALL executed in VMX root operation
    VMCLEAR_INVALID_ADDRESS = 2                 # VMCLEAR with invalid physical address
    VMCLEAR_VMXON_POINTER = 3                   # VMCLEAR with VMXON pointer
    VMLAUNCH_NONCLEAR_VMCS = 4                  # VMLAUNCH with non-clear VMCS
    VMRESUME_NONLAUNCHED_VMCS = 5               # VMRESUME with non-launched VMCS
    VMRESUME_AFTER_VMXOFF = 6                   # VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)
    ENTRY_INVALID_CONTROL_FIELD = 7             # VM entry with invalid control field(s)
    ENTRY_INVALID_HOST_STATE = 8                # VM entry with invalid host-state field(s)
    VMPTRLD_INVALID_ADDRESS = 9                 # VMPTRLD with invalid physical address
    VMPTRLD_VMXON_POINTER = 10                  # VMPTRLD with VMXON pointer
    VMPTRLD_INCORRECT_REVISION_ID = 11          # VMPTRLD with incorrect VMCS revision identifier
    UNSUPPORTED_VMCS_COMPONENT = 12             # VMREAD/VMWRITE from/to unsupported VMCS component
    VMWRITE_READ_ONLY_COMPONENT = 13            # VMWRITE to read-only VMCS component
    VMXON_IN_VMX_ROOT = 15                      # VMXON executed in VMX root operation
    ENTRY_INVALID_EXECUTIVE_VMCS_POINTER = 16   # VM entry with invalid executive-VMCS pointer
    ENTRY_NONLAUNCHED_EXECUTIVE_VMCS = 17       # VM entry with non-launched executive VMCS
    ENTRY_EXECUTIVE_VMCS_NOT_VMXON_POINTER = 18  # VM entry with executive-VMCS pointer not VMXON pointer
    VMCALL_NONCLEAR_VMCS = 19                   # VMCALL with non-clear VMCS (activating dual-monitor treatment)
    VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS = 20  # VMCALL with invalid VM-exit control fields
    VMCALL_INCORRECT_MSEG_REVISION_ID = 22      # VMCALL with incorrect MSEG revision identifier
    VMXOFF_UNDER_DUAL_MONITOR = 23              # VMXOFF under dual-monitor treatment of SMIs and SMM
    VMCALL_INVALID_SMM_MONITOR_FEATURES = 24    # VMCALL with invalid SMM-monitor features
    ENTRY_INVALID_EXECUTIVE_VMCS_CONTROLS = 25  # VM entry with invalid VM-execution control fields in executive VMCS
    ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26         # VM entry with events blocked by MOV SS
    INVALID_INVEPT_INVVPID_OPERAND = 28         # invalid operand to INVEPT/INVVPID

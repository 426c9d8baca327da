"""The VMX capability MSRs vmlab advertises, computed from one declaration.

:class:`VmxCapabilities` says which VMX controls and features vmlab supports;
every capability MSR of SDM Vol. 3C Appendix A is derived from it, and the
entry checks (vmm.entry_checks) read the same object, so what is advertised and
what is enforced cannot drift apart.  Narrow it with ``dataclasses.replace``::

    caps = dataclasses.replace(VmxCapabilities(), proc2=SecondaryProcBasedControls.ENABLE_EPT)

Control MSRs (Appendix A.3-A.5): bits 31:0 are the allowed-0 settings (a 1
there means the control must be 1), bits 63:32 the allowed-1 settings (a 1
there means the control may be 1).  The legacy MSRs (0x481-0x484) report every
default1 bit (Appendix A.2) as must-be-1; the TRUE MSRs (0x48D-0x490, present
because IA32_VMX_BASIC[55] = 1) let the default1 bits that are real controls
(CR3-load/-store exiting, save/load debug controls) be 0 when
``default1_optional`` is set.  Default1 bits are always allowed-1, whatever the
supported sets say: a VMM that follows the legacy MSRs must be able to set them.

Section numbers follow the 2023+ SDM (one lower before 2023).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vmlab.emu import x86

from .controls import (ENTRY_DEFAULT1, ENTRY_DEFAULT1_CONTROLS, EPT_MEMTYPE_UC, EPT_MEMTYPE_WB, EXIT_DEFAULT1,
                       EXIT_DEFAULT1_CONTROLS, PIN_DEFAULT1, PROC_DEFAULT1, PROC_DEFAULT1_CONTROLS, PinBasedControls,
                       PrimaryProcBasedControls, SecondaryProcBasedControls, VmEntryControls, VmExitControls)
from .vmcs import MAX_FIELD_INDEX, ActivityState, Vmcs

# Capability MSR indices (SDM Vol. 4, Table 2-2; SDM Vol. 3C Appendix A).
IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_MISC = 0x485
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR0_FIXED1 = 0x487
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_CR4_FIXED1 = 0x489
IA32_VMX_VMCS_ENUM = 0x48A
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_EPT_VPID_CAP = 0x48C
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
IA32_VMX_VMFUNC = 0x491            # not advertised: vmlab does not support "enable VM functions"

#: VMCS revision identifier vmlab reports in IA32_VMX_BASIC[30:0] ("VMLB"; bit 31 is 0).
VMLAB_VMCS_REVISION_ID = 0x564D4C42

# IA32_VMX_BASIC bits (SDM Vol. 3C A.1).
BASIC_REVISION_MASK = 0x7FFFFFFF
BASIC_VMCS_SIZE_SHIFT = 32
BASIC_PHYS_ADDR_32BIT = 1 << 48
BASIC_DUAL_MONITOR = 1 << 49
BASIC_MEMORY_TYPE_SHIFT = 50
BASIC_INS_OUTS_INFO = 1 << 54
BASIC_TRUE_CONTROLS = 1 << 55
BASIC_NO_ERROR_CODE_CHECK = 1 << 56  # VM entry may inject hardware exceptions with or without error code

# IA32_VMX_MISC bits (SDM Vol. 3C A.6).
MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F
MISC_STORE_EFER_LMA = 1 << 5
MISC_ACTIVITY_HLT = 1 << 6
MISC_ACTIVITY_SHUTDOWN = 1 << 7
MISC_ACTIVITY_WAIT_SIPI = 1 << 8
MISC_CR3_TARGET_SHIFT = 16
MISC_VMWRITE_ANY_FIELD = 1 << 29
MISC_ZERO_LENGTH_INJECTION = 1 << 30

# IA32_VMX_EPT_VPID_CAP bits (SDM Vol. 3C A.10).
EPT_CAP_EXECUTE_ONLY = 1 << 0
EPT_CAP_WALK_LENGTH_4 = 1 << 6
EPT_CAP_WALK_LENGTH_5 = 1 << 7
EPT_CAP_MEMTYPE_UC = 1 << 8
EPT_CAP_MEMTYPE_WB = 1 << 14
EPT_CAP_2MB_PAGES = 1 << 16
EPT_CAP_1GB_PAGES = 1 << 17
EPT_CAP_INVEPT = 1 << 20
EPT_CAP_AD_FLAGS = 1 << 21
EPT_CAP_ADVANCED_EXIT_INFO = 1 << 22
EPT_CAP_SUPERVISOR_SHADOW_STACK = 1 << 23
EPT_CAP_INVEPT_SINGLE_CONTEXT = 1 << 25
EPT_CAP_INVEPT_ALL_CONTEXT = 1 << 26
VPID_CAP_INVVPID = 1 << 32
VPID_CAP_INDIVIDUAL_ADDRESS = 1 << 40
VPID_CAP_SINGLE_CONTEXT = 1 << 41
VPID_CAP_ALL_CONTEXT = 1 << 42
VPID_CAP_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43

# INVEPT / INVVPID types (SDM Vol. 3C 31.3, INVEPT and INVVPID).
INVEPT_SINGLE_CONTEXT = 1
INVEPT_ALL_CONTEXT = 2
INVVPID_INDIVIDUAL_ADDRESS = 0
INVVPID_SINGLE_CONTEXT = 1
INVVPID_ALL_CONTEXT = 2
INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 3

# The controls vmlab supports by default: those the VMM run loop implements.
_P, _PP, _S, _X, _N = (PinBasedControls, PrimaryProcBasedControls, SecondaryProcBasedControls, VmExitControls,
                       VmEntryControls)
DEFAULT_PIN = (_P.EXTERNAL_INTERRUPT_EXITING | _P.NMI_EXITING | _P.VIRTUAL_NMIS | _P.ACTIVATE_PREEMPTION_TIMER)
DEFAULT_PROC = (_PP.INTERRUPT_WINDOW_EXITING | _PP.USE_TSC_OFFSETTING | _PP.HLT_EXITING | _PP.INVLPG_EXITING
                | _PP.MWAIT_EXITING | _PP.RDPMC_EXITING | _PP.RDTSC_EXITING | _PP.CR3_LOAD_EXITING
                | _PP.CR3_STORE_EXITING | _PP.CR8_LOAD_EXITING | _PP.CR8_STORE_EXITING | _PP.NMI_WINDOW_EXITING
                | _PP.MOV_DR_EXITING | _PP.UNCONDITIONAL_IO_EXITING | _PP.USE_IO_BITMAPS | _PP.MONITOR_TRAP_FLAG
                | _PP.USE_MSR_BITMAPS | _PP.MONITOR_EXITING | _PP.PAUSE_EXITING | _PP.ACTIVATE_SECONDARY_CONTROLS)
DEFAULT_PROC2 = (_S.ENABLE_EPT | _S.DESCRIPTOR_TABLE_EXITING | _S.ENABLE_RDTSCP | _S.ENABLE_VPID | _S.WBINVD_EXITING
                 | _S.UNRESTRICTED_GUEST | _S.RDRAND_EXITING | _S.ENABLE_INVPCID | _S.RDSEED_EXITING)
DEFAULT_EXIT = (_X.SAVE_DEBUG_CONTROLS | _X.HOST_ADDRESS_SPACE_SIZE | _X.ACK_INTERRUPT_ON_EXIT | _X.SAVE_PAT
                | _X.LOAD_PAT | _X.SAVE_EFER | _X.LOAD_EFER | _X.SAVE_PREEMPTION_TIMER)
DEFAULT_ENTRY = _N.LOAD_DEBUG_CONTROLS | _N.IA32E_MODE_GUEST | _N.LOAD_PAT | _N.LOAD_EFER

#: CR0 bits that must be 1 in VMX operation: PE, NE, PG (SDM Vol. 3C A.7).
DEFAULT_CR0_FIXED0 = x86.CR0_PE | x86.CR0_NE | x86.CR0_PG
#: CR0 bits that may be 1: all of bits 31:0, as on hardware (bits 63:32 must be 0).
DEFAULT_CR0_FIXED1 = 0xFFFFFFFF
#: CR4 bits that must be 1 in VMX operation: VMXE (SDM Vol. 3C A.8).
DEFAULT_CR4_FIXED0 = x86.CR4_VMXE
#: CR4 bits that may be 1: what emu.cpuid.CpuidModel(vmx=True).cr4_valid_mask() allows.
DEFAULT_CR4_FIXED1 = (x86.CR4_TSD | x86.CR4_DE | x86.CR4_PSE | x86.CR4_PAE | x86.CR4_PGE | x86.CR4_PCE
                      | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT | x86.CR4_VMXE | x86.CR4_SMEP | x86.CR4_SMAP)

#: The control classes, by the short names the methods below take.
CONTROL_CLASSES = {"pin": PinBasedControls, "proc": PrimaryProcBasedControls, "proc2": SecondaryProcBasedControls,
                   "exit": VmExitControls, "entry": VmEntryControls}
_DEFAULT1 = {"pin": PIN_DEFAULT1, "proc": PROC_DEFAULT1, "proc2": 0, "exit": EXIT_DEFAULT1, "entry": ENTRY_DEFAULT1}
_DEFAULT1_CONTROLS = {"pin": 0, "proc": int(PROC_DEFAULT1_CONTROLS), "proc2": 0,
                      "exit": int(EXIT_DEFAULT1_CONTROLS), "entry": int(ENTRY_DEFAULT1_CONTROLS)}


def _ctls_msr(allowed0: int, allowed1: int) -> int:
    return (allowed1 << 32) | allowed0


@dataclass(frozen=True)
class VmxCapabilities:
    """What vmlab's VMX implementation supports; the capability MSRs follow from it.

    The control fields (``pin``, ``proc``, ``proc2``, ``exit``, ``entry``) are
    the sets of controls vmlab can run with set to 1.  The defaults are the
    controls the VMM implements (see the module constants ``DEFAULT_*``).
    """

    pin: PinBasedControls = DEFAULT_PIN
    proc: PrimaryProcBasedControls = DEFAULT_PROC
    proc2: SecondaryProcBasedControls = DEFAULT_PROC2
    exit: VmExitControls = DEFAULT_EXIT
    entry: VmEntryControls = DEFAULT_ENTRY
    #: TRUE MSRs allow CR3-load/-store exiting and save/load debug controls to be 0.
    default1_optional: bool = True
    #: IA32_VMX_BASIC[55]: the TRUE control MSRs exist (and the entry checks use them).
    true_controls: bool = True
    revision_id: int = VMLAB_VMCS_REVISION_ID
    vmcs_size: int = 4096
    vmcs_memory_type: int = EPT_MEMTYPE_WB
    #: IA32_VMX_BASIC[54]: VM exits for INS/OUTS report instruction information.
    ins_outs_info: bool = True
    #: IA32_VMX_MISC[4:0]: the preemption timer counts down every 2^rate TSC ticks.
    preemption_timer_rate: int = 5
    #: IA32_VMX_MISC[5]: VM exits store EFER.LMA into the "IA-32e mode guest" entry control.
    store_efer_lma: bool = True
    #: IA32_VMX_MISC[8:6]: activity states supported besides ACTIVE.
    activity_states: frozenset = frozenset({ActivityState.HLT})
    #: IA32_VMX_MISC[24:16]: number of CR3-target values.
    cr3_target_count: int = 4
    #: IA32_VMX_MISC[29]: VMWRITE may write the VM-exit information fields.
    vmwrite_any_field: bool = True
    #: IA32_VMX_MISC[30]: software events may be injected with instruction length 0.
    zero_length_injection: bool = True
    cr0_fixed0: int = DEFAULT_CR0_FIXED0
    cr0_fixed1: int = DEFAULT_CR0_FIXED1
    cr4_fixed0: int = DEFAULT_CR4_FIXED0
    cr4_fixed1: int = DEFAULT_CR4_FIXED1
    #: MAXPHYADDR (CPUID.80000008H:EAX[7:0]); addresses in VMCS fields must fit it.
    physical_address_width: int = 40
    #: Linear-address width for canonical checks (CPUID.80000008H:EAX[15:8]).
    linear_address_width: int = 48
    ept_execute_only: bool = False
    ept_walk_lengths: frozenset = frozenset({4})
    ept_memory_types: frozenset = frozenset({EPT_MEMTYPE_UC, EPT_MEMTYPE_WB})
    ept_2mb_pages: bool = True
    ept_1gb_pages: bool = True
    #: EPT accessed/dirty flags (EPTP bit 6 may be 1).
    ept_ad_flags: bool = False
    invept_types: frozenset = frozenset({INVEPT_SINGLE_CONTEXT, INVEPT_ALL_CONTEXT})
    invvpid_types: frozenset = frozenset({INVVPID_INDIVIDUAL_ADDRESS, INVVPID_SINGLE_CONTEXT, INVVPID_ALL_CONTEXT,
                                          INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS})
    #: Extra MSR values to report as-is (testing aid); wins over the computed ones.
    overrides: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if not 0 <= self.revision_id <= BASIC_REVISION_MASK:
            raise ValueError(f"VMCS revision id {self.revision_id:#x} does not fit bits 30:0")
        if not 0 <= self.preemption_timer_rate <= MISC_PREEMPTION_TIMER_RATE_MASK:
            raise ValueError(f"preemption-timer rate {self.preemption_timer_rate} does not fit bits 4:0")
        if not 0 <= self.cr3_target_count <= 0x1FF:
            raise ValueError(f"CR3-target count {self.cr3_target_count} does not fit bits 24:16")
        if not set(self.activity_states) <= {ActivityState.HLT, ActivityState.SHUTDOWN, ActivityState.WAIT_FOR_SIPI}:
            raise ValueError(f"unknown activity states in {set(self.activity_states)}")
        if self.proc2 and not self.proc & PrimaryProcBasedControls.ACTIVATE_SECONDARY_CONTROLS:
            raise ValueError("secondary controls declared without ACTIVATE_SECONDARY_CONTROLS")
        s = SecondaryProcBasedControls
        if self.proc2 & s.UNRESTRICTED_GUEST and not self.proc2 & s.ENABLE_EPT:
            raise ValueError("UNRESTRICTED_GUEST needs ENABLE_EPT")

    # -- the control classes -------------------------------------------------------------

    def default1(self, kind: str) -> int:
        """The default1 bits of a control class (SDM Vol. 3C A.2)."""
        return _DEFAULT1[kind]

    def must_be_one(self, kind: str, true: bool | None = None) -> int:
        """Allowed-0 settings: bits that must be 1.  ``true`` selects the TRUE MSR (default: if it exists)."""
        if true is None:
            true = self.true_controls
        must = _DEFAULT1[kind]
        if true and self.default1_optional:
            must &= ~_DEFAULT1_CONTROLS[kind]
        return must

    def may_be_one(self, kind: str) -> int:
        """Allowed-1 settings: bits that may be 1 (the supported controls plus the default1 bits)."""
        return int(getattr(self, kind)) | _DEFAULT1[kind]

    def invalid_bits(self, kind: str, value: int, true: bool | None = None) -> tuple[int, int]:
        """(bits that must be 1 but are 0, bits that are 1 but may not be) for a control value."""
        must, may = self.must_be_one(kind, true), self.may_be_one(kind)
        return must & ~value & 0xFFFFFFFF, value & ~may & 0xFFFFFFFF

    def adjust(self, kind: str, desired: int, true: bool | None = None):
        """The control value closest to ``desired`` that the capability MSRs allow.

        What a VMM does with the MSRs (KVM's adjust_vmx_controls): force the
        must-be-1 bits on and drop what may not be 1.  Returns the control class.
        """
        value = (int(desired) | self.must_be_one(kind, true)) & self.may_be_one(kind)
        return CONTROL_CLASSES[kind](value)

    # -- the MSRs (SDM Vol. 3C Appendix A) ----------------------------------------------

    @property
    def basic(self) -> int:
        """IA32_VMX_BASIC (A.1)."""
        return (self.revision_id | (self.vmcs_size << BASIC_VMCS_SIZE_SHIFT)
                | (self.vmcs_memory_type << BASIC_MEMORY_TYPE_SHIFT)
                | (BASIC_INS_OUTS_INFO if self.ins_outs_info else 0)
                | (BASIC_TRUE_CONTROLS if self.true_controls else 0))

    def ctls(self, kind: str, true: bool = False) -> int:
        """A control capability MSR: allowed-0 in bits 31:0, allowed-1 in 63:32 (A.3-A.5)."""
        return _ctls_msr(self.must_be_one(kind, true), self.may_be_one(kind))

    @property
    def misc(self) -> int:
        """IA32_VMX_MISC (A.6)."""
        states = set(self.activity_states)
        return (self.preemption_timer_rate
                | (MISC_STORE_EFER_LMA if self.store_efer_lma else 0)
                | (MISC_ACTIVITY_HLT if ActivityState.HLT in states else 0)
                | (MISC_ACTIVITY_SHUTDOWN if ActivityState.SHUTDOWN in states else 0)
                | (MISC_ACTIVITY_WAIT_SIPI if ActivityState.WAIT_FOR_SIPI in states else 0)
                | (self.cr3_target_count << MISC_CR3_TARGET_SHIFT)
                | (MISC_VMWRITE_ANY_FIELD if self.vmwrite_any_field else 0)
                | (MISC_ZERO_LENGTH_INJECTION if self.zero_length_injection else 0))

    @property
    def vmcs_enum(self) -> int:
        """IA32_VMX_VMCS_ENUM (A.9): the highest field index, in bits 9:1."""
        return MAX_FIELD_INDEX << 1

    @property
    def ept_vpid_cap(self) -> int:
        """IA32_VMX_EPT_VPID_CAP (A.10); EPT bits are 0 without ENABLE_EPT, VPID bits without ENABLE_VPID."""
        value = 0
        if self.proc2 & SecondaryProcBasedControls.ENABLE_EPT:
            value |= ((EPT_CAP_EXECUTE_ONLY if self.ept_execute_only else 0)
                      | (EPT_CAP_WALK_LENGTH_4 if 4 in self.ept_walk_lengths else 0)
                      | (EPT_CAP_WALK_LENGTH_5 if 5 in self.ept_walk_lengths else 0)
                      | (EPT_CAP_MEMTYPE_UC if EPT_MEMTYPE_UC in self.ept_memory_types else 0)
                      | (EPT_CAP_MEMTYPE_WB if EPT_MEMTYPE_WB in self.ept_memory_types else 0)
                      | (EPT_CAP_2MB_PAGES if self.ept_2mb_pages else 0)
                      | (EPT_CAP_1GB_PAGES if self.ept_1gb_pages else 0)
                      | (EPT_CAP_AD_FLAGS if self.ept_ad_flags else 0)
                      | (EPT_CAP_INVEPT if self.invept_types else 0)
                      | (EPT_CAP_INVEPT_SINGLE_CONTEXT if INVEPT_SINGLE_CONTEXT in self.invept_types else 0)
                      | (EPT_CAP_INVEPT_ALL_CONTEXT if INVEPT_ALL_CONTEXT in self.invept_types else 0))
        if self.proc2 & SecondaryProcBasedControls.ENABLE_VPID and self.invvpid_types:
            types = self.invvpid_types
            value |= (VPID_CAP_INVVPID
                      | (VPID_CAP_INDIVIDUAL_ADDRESS if INVVPID_INDIVIDUAL_ADDRESS in types else 0)
                      | (VPID_CAP_SINGLE_CONTEXT if INVVPID_SINGLE_CONTEXT in types else 0)
                      | (VPID_CAP_ALL_CONTEXT if INVVPID_ALL_CONTEXT in types else 0)
                      | (VPID_CAP_SINGLE_CONTEXT_RETAINING_GLOBALS
                         if INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS in types else 0))
        return value

    def msrs(self) -> dict[int, int]:
        """{MSR index: value} for every capability MSR vmlab implements.

        PROCBASED_CTLS2 and EPT_VPID_CAP exist only with secondary controls,
        the TRUE MSRs only with IA32_VMX_BASIC[55] (SDM Vol. 3C A.3.3, A.10, A.1).
        """
        out = {
            IA32_VMX_BASIC: self.basic,
            IA32_VMX_PINBASED_CTLS: self.ctls("pin"),
            IA32_VMX_PROCBASED_CTLS: self.ctls("proc"),
            IA32_VMX_EXIT_CTLS: self.ctls("exit"),
            IA32_VMX_ENTRY_CTLS: self.ctls("entry"),
            IA32_VMX_MISC: self.misc,
            IA32_VMX_CR0_FIXED0: self.cr0_fixed0,
            IA32_VMX_CR0_FIXED1: self.cr0_fixed1,
            IA32_VMX_CR4_FIXED0: self.cr4_fixed0,
            IA32_VMX_CR4_FIXED1: self.cr4_fixed1,
            IA32_VMX_VMCS_ENUM: self.vmcs_enum,
        }
        if self.proc & PrimaryProcBasedControls.ACTIVATE_SECONDARY_CONTROLS:
            out[IA32_VMX_PROCBASED_CTLS2] = self.ctls("proc2")
            if self.proc2 & (SecondaryProcBasedControls.ENABLE_EPT | SecondaryProcBasedControls.ENABLE_VPID):
                out[IA32_VMX_EPT_VPID_CAP] = self.ept_vpid_cap
        if self.true_controls:
            out[IA32_VMX_TRUE_PINBASED_CTLS] = self.ctls("pin", true=True)
            out[IA32_VMX_TRUE_PROCBASED_CTLS] = self.ctls("proc", true=True)
            out[IA32_VMX_TRUE_EXIT_CTLS] = self.ctls("exit", true=True)
            out[IA32_VMX_TRUE_ENTRY_CTLS] = self.ctls("entry", true=True)
        out.update(self.overrides)
        return out

    def msr(self, index: int) -> int:
        """One capability MSR; KeyError if vmlab does not implement it (RDMSR should #GP)."""
        return self.msrs()[index]

    # -- helpers for the VMM -----------------------------------------------------------

    def supports(self, control) -> bool:
        """True if every bit of ``control`` (a member of one control class) may be 1."""
        for kind, cls in CONTROL_CLASSES.items():
            if isinstance(control, cls):
                return control & ~self.may_be_one(kind) == 0
        raise TypeError(f"{control!r} is not a VMX control")

    def new_vmcs(self) -> Vmcs:
        """An empty VMCS that follows these capabilities' VMWRITE rule and revision id."""
        return Vmcs(vmwrite_any_field=self.vmwrite_any_field, revision_id=self.revision_id)

    def replace(self, **changes) -> "VmxCapabilities":
        """``dataclasses.replace`` spelled as a method."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_cpuid(cls, model, **changes) -> "VmxCapabilities":
        """Capabilities consistent with an emu.cpuid.CpuidModel: address widths and CR4_FIXED1."""
        vmx_model = dataclasses.replace(model, vmx=True)
        return cls(physical_address_width=model.maxphyaddr, linear_address_width=model.linear_bits,
                   cr4_fixed1=vmx_model.cr4_valid_mask(), **changes)

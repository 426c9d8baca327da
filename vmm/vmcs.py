"""The VMCS: every field of SDM Vol. 3C Appendix B, and a VMREAD/VMWRITE model.

Field encodings are the SDM's, verbatim (Appendix B, "Field Encoding in VMCS").
An encoding is not an opaque number: SDM Vol. 3C 25.11.2 ("VMREAD, VMWRITE,
and Encodings of VMCS Fields", Table 25-21) gives it a structure that this
module decodes instead of declaring twice::

    bit  0      access type: 0 = full, 1 = high (the upper 32 bits of a 64-bit field)
    bits 9:1    index
    bits 11:10  type: 0 control, 1 VM-exit information (read-only data),
                2 guest state, 3 host state
    bit  12     reserved (0)
    bits 14:13  width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural width
    bits 31:15  reserved (0)

vmlab models a processor that supports Intel 64, so natural-width fields are 64
bits wide.  Section numbers follow the 2023+ SDM (ch. 25 VMCS, 27 VM entries,
28 VM exits, 31 VMX instructions; one lower in older SDMs).

Python users may address a field three ways; all go through the VMWRITE checks::

    vmcs.write(GUEST_RIP, 0x1000)        # encoding (an int or a VmcsField)
    vmcs["GUEST_RIP"] = 0x1000           # name (also vmcs[0x681E])
    vmcs.guest_rip = 0x1000              # attribute, lower-case name

The VMM fills the read-only VM-exit information fields with
:meth:`Vmcs.set_exit_info` / :meth:`Vmcs.set_instruction_error`, which bypass
the read-only check exactly as the processor does on a VM exit.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from typing import Iterator

from vmlab.emu.fastpath import VMCS_SLOTS, vmcs_slot as slot
from vmlab.emu.native import ffi

from .errors import VmmError
from .exit_reasons import ExitReasonField, VmInstructionError

# --------------------------------------------------------------------------- encoding structure

ENC_ACCESS_HIGH = 1 << 0
ENC_INDEX_SHIFT, ENC_INDEX_MASK = 1, 0x1FF
ENC_TYPE_SHIFT, ENC_TYPE_MASK = 10, 0x3
ENC_WIDTH_SHIFT, ENC_WIDTH_MASK = 13, 0x3
#: Bits that must be 0 in any valid encoding (12 and 31:15).
ENC_RESERVED_MASK = (1 << 12) | (0x1FFFF << 15)


class FieldWidth(IntEnum):
    """Encoding bits 14:13 (SDM Vol. 3C 25.11.2, Table 25-21)."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3

    @property
    def bits(self) -> int:
        """Storage width in vmlab (natural width is 64 bits: an Intel 64 processor)."""
        return (16, 64, 32, 64)[self]


class FieldKind(IntEnum):
    """Encoding bits 11:10 (SDM Vol. 3C 25.11.2, Table 25-21)."""

    CONTROL = 0
    READ_ONLY_DATA = 1      # "VM-exit information"
    GUEST_STATE = 2
    HOST_STATE = 3


def encoding_width(encoding: int) -> FieldWidth:
    """Width encoded in bits 14:13."""
    return FieldWidth((encoding >> ENC_WIDTH_SHIFT) & ENC_WIDTH_MASK)


def encoding_kind(encoding: int) -> FieldKind:
    """Field type encoded in bits 11:10."""
    return FieldKind((encoding >> ENC_TYPE_SHIFT) & ENC_TYPE_MASK)


def encoding_index(encoding: int) -> int:
    """Index encoded in bits 9:1."""
    return (encoding >> ENC_INDEX_SHIFT) & ENC_INDEX_MASK


def make_encoding(width: FieldWidth, kind: FieldKind, index: int, high: bool = False) -> int:
    """Compose an encoding from its parts (the inverse of the three functions above)."""
    if not 0 <= index <= ENC_INDEX_MASK:
        raise ValueError(f"VMCS index {index} does not fit bits 9:1")
    return (int(width) << ENC_WIDTH_SHIFT) | (int(kind) << ENC_TYPE_SHIFT) | (index << ENC_INDEX_SHIFT) | int(high)


# --------------------------------------------------------------------------- the fields

class VmcsField(IntEnum):
    """Every VMCS field encoding of SDM Vol. 3C Appendix B (full access type).

    64-bit fields also have a "high" encoding, ``encoding | 1``, that reads and
    writes bits 63:32 (e.g. ``EPT_POINTER_HIGH`` = 0x201B); those are not
    listed here but are accepted by :class:`Vmcs`.  Names follow the Linux/KVM
    spelling where one exists.  The FRED and later fields of the 2024 SDM are
    not included.
    """

    # B.1.1 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NOTIFICATION_VECTOR = 0x0002
    EPTP_INDEX = 0x0004
    HLAT_PREFIX_SIZE = 0x0006
    LAST_PID_POINTER_INDEX = 0x0008
    # B.1.2 16-bit guest-state fields
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTERRUPT_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812
    GUEST_UINV = 0x0814
    # B.1.3 16-bit host-state fields
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # B.2.1 64-bit control fields
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    EXECUTIVE_VMCS_POINTER = 0x200C
    PML_ADDRESS = 0x200E
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    POSTED_INTR_DESC_ADDR = 0x2016
    VM_FUNCTION_CONTROLS = 0x2018
    EPT_POINTER = 0x201A
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP3 = 0x2022
    EPTP_LIST_ADDRESS = 0x2024
    VMREAD_BITMAP = 0x2026
    VMWRITE_BITMAP = 0x2028
    VE_INFORMATION_ADDRESS = 0x202A
    XSS_EXITING_BITMAP = 0x202C
    ENCLS_EXITING_BITMAP = 0x202E
    SPP_TABLE_POINTER = 0x2030
    TSC_MULTIPLIER = 0x2032
    TERTIARY_VM_EXEC_CONTROL = 0x2034
    ENCLV_EXITING_BITMAP = 0x2036
    LOW_PASID_DIRECTORY_ADDRESS = 0x2038
    HIGH_PASID_DIRECTORY_ADDRESS = 0x203A
    SHARED_EPT_POINTER = 0x203C
    PCONFIG_EXITING_BITMAP = 0x203E
    HLAT_POINTER = 0x2040
    PID_POINTER_TABLE_ADDRESS = 0x2042
    SECONDARY_VM_EXIT_CONTROLS = 0x2044
    IA32_SPEC_CTRL_MASK = 0x204A
    IA32_SPEC_CTRL_SHADOW = 0x204C
    # B.2.2 64-bit read-only data field
    GUEST_PHYSICAL_ADDRESS = 0x2400
    # B.2.3 64-bit guest-state fields
    VMCS_LINK_POINTER = 0x2800
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_EFER = 0x2806
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    GUEST_PDPTE0 = 0x280A
    GUEST_PDPTE1 = 0x280C
    GUEST_PDPTE2 = 0x280E
    GUEST_PDPTE3 = 0x2810
    GUEST_IA32_BNDCFGS = 0x2812
    GUEST_IA32_RTIT_CTL = 0x2814
    GUEST_IA32_LBR_CTL = 0x2816
    GUEST_IA32_PKRS = 0x2818
    # B.2.4 64-bit host-state fields
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    HOST_IA32_PKRS = 0x2C06
    # B.3.1 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002       # primary processor-based VM-execution controls
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C                # primary VM-exit controls
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO = 0x4016              # VM-entry interruption-information field
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    PLE_GAP = 0x4020
    PLE_WINDOW = 0x4022
    INSTRUCTION_TIMEOUT_CONTROL = 0x4024     # KVM: NOTIFY_WINDOW
    # B.3.2 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VM_EXIT_INSTRUCTION_INFO = 0x440E        # KVM: VMX_INSTRUCTION_INFO
    # B.3.3 32-bit guest-state fields
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_ACCESS_RIGHTS = 0x4814
    GUEST_CS_ACCESS_RIGHTS = 0x4816
    GUEST_SS_ACCESS_RIGHTS = 0x4818
    GUEST_DS_ACCESS_RIGHTS = 0x481A
    GUEST_FS_ACCESS_RIGHTS = 0x481C
    GUEST_GS_ACCESS_RIGHTS = 0x481E
    GUEST_LDTR_ACCESS_RIGHTS = 0x4820
    GUEST_TR_ACCESS_RIGHTS = 0x4822
    GUEST_INTERRUPTIBILITY_STATE = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SMBASE = 0x4828
    GUEST_IA32_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # B.3.4 32-bit host-state field
    HOST_IA32_SYSENTER_CS = 0x4C00
    # B.4.1 natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E
    # B.4.2 natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400
    IO_RCX = 0x6402
    IO_RSI = 0x6404
    IO_RDI = 0x6406
    IO_RIP = 0x6408
    GUEST_LINEAR_ADDRESS = 0x640A
    # B.4.3 natural-width guest-state fields
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_IA32_SYSENTER_ESP = 0x6824
    GUEST_IA32_SYSENTER_EIP = 0x6826
    GUEST_IA32_S_CET = 0x6828
    GUEST_SSP = 0x682A
    GUEST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x682C
    # B.4.4 natural-width host-state fields
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16
    HOST_IA32_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x6C1C


# Every field is also a module constant: ``from vmm.vmcs import GUEST_RIP``.
globals().update(VmcsField.__members__)

_APPENDIX_B_WIDTH = {FieldWidth.BITS16: 1, FieldWidth.BITS64: 2, FieldWidth.BITS32: 3, FieldWidth.NATURAL: 4}


@dataclass(frozen=True)
class Field:
    """One VMCS field: its name, full encoding, and what the encoding says about it."""

    name: str
    encoding: int
    width: FieldWidth
    kind: FieldKind
    #: where the field lives in a VMCS area (:func:`slot`; computed when not given)
    slot: int = -1

    def __post_init__(self):
        if self.slot < 0:
            object.__setattr__(self, "slot", slot(self.encoding))

    @property
    def bits(self) -> int:
        """16, 32 or 64 (natural width is 64 in vmlab)."""
        return self.width.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def read_only(self) -> bool:
        """A VM-exit information field: VMWRITE needs IA32_VMX_MISC[29]."""
        return self.kind is FieldKind.READ_ONLY_DATA

    @property
    def high_encoding(self) -> int | None:
        """The access-type-high encoding of a 64-bit field, else None."""
        return self.encoding | ENC_ACCESS_HIGH if self.width is FieldWidth.BITS64 else None

    @property
    def section(self) -> str:
        """The Appendix B subsection that lists the field (e.g. "B.4.3")."""
        sub = int(self.kind) + 1
        if self.width is FieldWidth.BITS16 and self.kind > FieldKind.CONTROL:
            sub -= 1        # B.1 has no read-only data subsection
        return f"B.{_APPENDIX_B_WIDTH[self.width]}.{sub}"

    @property
    def attr(self) -> str:
        """The attribute name on :class:`Vmcs` (``vmcs.guest_rip``)."""
        return self.name.lower()


def _make_field(f: VmcsField) -> Field:
    return Field(f.name, int(f), encoding_width(f), encoding_kind(f))


#: The field table, in encoding order.
FIELDS: tuple[Field, ...] = tuple(sorted((_make_field(f) for f in VmcsField), key=lambda x: x.encoding))
FIELDS_BY_ENCODING: dict[int, Field] = {f.encoding: f for f in FIELDS}
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
#: Highest index (bits 9:1) of any supported encoding -- IA32_VMX_VMCS_ENUM[9:1] (SDM Vol. 3C A.9).
MAX_FIELD_INDEX = max(encoding_index(f.encoding) for f in FIELDS)
#: The encodings of every field (a VMCS whose every field counts as written).
ALL_ENCODINGS = frozenset(FIELDS_BY_ENCODING)
#: every encoding VMREAD/VMWRITE accept (full, and high for 64-bit fields) ->
#: (field, high, slot, width mask, read only): what lookup() works out, ready
_ACCESS: dict[int, tuple] = {}
for _f in FIELDS:
    for _h in ((False, True) if _f.width is FieldWidth.BITS64 else (False,)):
        _ACCESS[_f.encoding | int(_h)] = (_f, _h, _f.slot, _f.mask, _f.read_only)
del _f, _h
if MAX_FIELD_INDEX > 0x3F or len({f.slot for f in FIELDS}) != len(FIELDS):
    raise ImportError("the VMCS area layout (6-bit index per width/type group) does not fit the field table")


class VmInstructionFault(VmmError):
    """A VMX instruction ended in VMfailValid; ``error`` is the VM-instruction error number.

    The run loop turns this into RFLAGS.ZF = 1 and a VM_INSTRUCTION_ERROR write
    (SDM Vol. 3C 31.2, "Conventions"); Python users just see the exception.
    """

    def __init__(self, error: VmInstructionError, message: str = ""):
        self.error = VmInstructionError(error)
        super().__init__(message or f"VMfailValid({self.error.value}: {self.error.name})")


def lookup(encoding: int) -> tuple[Field, bool]:
    """(field, high) for an encoding VMREAD/VMWRITE accepts.

    Raises :class:`VmInstructionFault` (UNSUPPORTED_VMCS_COMPONENT, 12) for an
    encoding with reserved bits set, one Appendix B does not list, or the high
    access type on a field that is not 64 bits wide (SDM Vol. 3C 25.11.2).
    """
    if not isinstance(encoding, int) or encoding < 0 or encoding & ENC_RESERVED_MASK:
        raise VmInstructionFault(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT,
                                 f"VMCS encoding {encoding!r} has reserved bits set")
    high = bool(encoding & ENC_ACCESS_HIGH)
    field = FIELDS_BY_ENCODING.get(encoding & ~ENC_ACCESS_HIGH)
    if field is None or (high and field.width is not FieldWidth.BITS64):
        raise VmInstructionFault(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT,
                                 f"no VMCS component has encoding {encoding:#x}")
    return field, high


def field_by_name(name: str) -> tuple[Field, bool]:
    """(field, high) by name, case-insensitive; ``"EPT_POINTER_HIGH"`` selects the high part."""
    key = name.upper()
    field = FIELDS_BY_NAME.get(key)
    if field is not None:
        return field, False
    if key.endswith("_HIGH"):
        field = FIELDS_BY_NAME.get(key[:-5])
        if field is not None and field.width is FieldWidth.BITS64:
            return field, True
    raise KeyError(f"no VMCS field named {name!r}")


# --------------------------------------------------------------------------- field contents (SDM 25.4)

# Segment access rights in the guest-state area (SDM Vol. 3C 25.4.1, Table 25-2).
AR_TYPE_MASK = 0xF
AR_TYPE_ACCESSED = 1 << 0
AR_TYPE_WRITABLE = 1 << 1          # data segments; "readable" for code
AR_TYPE_READABLE = 1 << 1
AR_TYPE_CONFORMING = 1 << 2        # code segments; "expand-down" for data
AR_TYPE_CODE = 1 << 3
AR_S = 1 << 4                      # descriptor type: 1 = code or data
AR_DPL_SHIFT = 5
AR_DPL_MASK = 3 << AR_DPL_SHIFT
AR_P = 1 << 7
AR_RESERVED_11_8 = 0xF << 8
AR_AVL = 1 << 12
AR_L = 1 << 13                     # 64-bit mode active (CS only)
AR_DB = 1 << 14                    # default operation size
AR_G = 1 << 15                     # granularity
AR_UNUSABLE = 1 << 16
AR_RESERVED_31_17 = 0x7FFF << 17

# System-segment types that matter for TR and LDTR (SDM Vol. 3A Table 3-2).
SEG_TYPE_LDT = 2
SEG_TYPE_TSS16_BUSY = 3
SEG_TYPE_TSS32_BUSY = 11           # also the 64-bit busy TSS in IA-32e mode


def make_access_rights(type_: int, *, s: bool = True, dpl: int = 0, p: bool = True, avl: bool = False,
                       l: bool = False, db: bool = False, g: bool = False, unusable: bool = False) -> int:
    """Compose a guest access-rights value (SDM Vol. 3C 25.4.1, Table 25-2)."""
    return ((type_ & AR_TYPE_MASK) | (AR_S if s else 0) | ((dpl & 3) << AR_DPL_SHIFT) | (AR_P if p else 0)
            | (AR_AVL if avl else 0) | (AR_L if l else 0) | (AR_DB if db else 0) | (AR_G if g else 0)
            | (AR_UNUSABLE if unusable else 0))


class ActivityState(IntEnum):
    """Guest activity state (``GUEST_ACTIVITY_STATE``), SDM Vol. 3C 25.4.2."""

    ACTIVE = 0
    HLT = 1
    SHUTDOWN = 2
    WAIT_FOR_SIPI = 3


class Interruptibility(IntFlag):
    """Guest interruptibility state (``GUEST_INTERRUPTIBILITY_STATE``), SDM Vol. 3C 25.4.2, Table 25-3."""

    BLOCKING_BY_STI = 1 << 0
    BLOCKING_BY_MOV_SS = 1 << 1
    BLOCKING_BY_SMI = 1 << 2
    BLOCKING_BY_NMI = 1 << 3
    ENCLAVE_INTERRUPTION = 1 << 4


# Pending debug exceptions (``GUEST_PENDING_DBG_EXCEPTIONS``), SDM Vol. 3C 25.4.2, Table 25-4.
PENDING_DBG_B0_B3 = 0xF            # bits 3:0, B3-B0
PENDING_DBG_ENABLED_BREAKPOINT = 1 << 12
PENDING_DBG_BS = 1 << 14           # single-step
PENDING_DBG_RTM = 1 << 16
#: Bits that must be 0: 11:4, 13, 15, 63:17.
PENDING_DBG_RESERVED = ~(PENDING_DBG_B0_B3 | PENDING_DBG_ENABLED_BREAKPOINT | PENDING_DBG_BS
                         | PENDING_DBG_RTM) & ((1 << 64) - 1)

#: The VMCS link pointer value meaning "no linked VMCS" (SDM Vol. 3C 25.4.2).
VMCS_LINK_POINTER_NONE = (1 << 64) - 1


# --------------------------------------------------------------------------- the VMCS

class LaunchState(Enum):
    """Launch state of a VMCS (SDM Vol. 3C 25.1)."""

    CLEAR = "clear"
    LAUNCHED = "launched"


def _as_int(value) -> int:
    """An int, or the encoding of a value object (InterruptionInfo, qualification dataclasses, ...)."""
    encode = getattr(value, "encode", None)
    return int(encode()) if callable(encode) else int(value)


class Vmcs:
    """The data of one VMCS, with VMREAD/VMWRITE semantics (SDM Vol. 3C 25.11.2, 31.3).

    The data live in native memory, a fixed layout as Bochs keeps its VMCS
    area: ``area`` is a cffi ``uint64_t[VMCS_SLOTS]`` with each field at
    ``Field.slot`` (:func:`slot`: width, type and index of the encoding), so C
    reads and writes the same fields in place -- the fast path writes a VM
    exit's information fields there at the exit (native/vmcs.c).  ``mem`` is
    the same memory as a memoryview of 64-bit integers, for the VMM's
    field-by-slot reads and writes that need no VMREAD checks (values must
    be within the field's width).

    ``vmwrite_any_field`` mirrors IA32_VMX_MISC[29] ("software can use VMWRITE
    to write to any supported field in the VMCS"): without it, VMWRITE to a
    VM-exit information field fails with VMWRITE_READ_ONLY_COMPONENT (13).
    Build it from a capability set with ``VmxCapabilities.new_vmcs()``.
    Unwritten fields read as 0.  The VMCS does not live in guest memory: the
    VMM owns it (vmlab models no VMPTRLD of guest-physical VMCS regions).
    """

    __slots__ = ("area", "mem", "launch_state", "vmwrite_any_field", "revision_id")

    def __init__(self, *, vmwrite_any_field: bool = True, revision_id: int = 0):
        area = ffi.new("uint64_t[]", VMCS_SLOTS)
        self.area = area
        self.mem = memoryview(ffi.buffer(area)).cast("Q")
        self.launch_state = LaunchState.CLEAR
        self.vmwrite_any_field = vmwrite_any_field
        self.revision_id = revision_id

    # -- VMREAD / VMWRITE ---------------------------------------------------------

    def read(self, encoding: int) -> int:
        """VMREAD: the field's value, zero-extended to 64 bits; bits 63:32 for a high encoding."""
        a = _access(encoding)
        value = self.mem[a[2]]
        return value >> 32 if a[1] else value

    def write(self, encoding: int, value: int) -> None:
        """VMWRITE: store ``value`` truncated to the field's width.

        A high encoding writes bits 63:32 of a 64-bit field from the low 32
        bits of ``value`` and keeps bits 31:0.  Raises
        :class:`VmInstructionFault` with error 12 or 13 (see :func:`lookup`).
        """
        a = _access(encoding)
        field = a[0]
        if a[4] and not self.vmwrite_any_field:
            raise VmInstructionFault(VmInstructionError.VMWRITE_READ_ONLY_COMPONENT,
                                     f"VMWRITE to read-only field {field.name} ({field.encoding:#06x}) "
                                     f"without IA32_VMX_MISC[29]")
        self._store(field, value if type(value) is int else _as_int(value), a[1])

    def _store(self, field: Field, value: int, high: bool = False) -> None:
        a = _ACCESS[field.encoding]
        mem, slot = self.mem, a[2]
        if high:
            value = (mem[slot] & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
        mem[slot] = value & a[3]

    # -- Python access --------------------------------------------------------------

    @staticmethod
    def _resolve(key) -> int:
        if isinstance(key, str):
            field, high = field_by_name(key)
            return field.encoding | int(high)
        return int(key)

    def __getitem__(self, key) -> int:
        return self.read(self._resolve(key))

    def __setitem__(self, key, value) -> None:
        self.write(self._resolve(key), value)

    def __iter__(self) -> Iterator[Field]:
        return iter(FIELDS)

    def __repr__(self) -> str:
        mem = self.mem
        nonzero = sum(1 for f in FIELDS if mem[f.slot])
        return f"<Vmcs {self.launch_state.value}, {nonzero} nonzero fields>"

    def snapshot(self, *, nonzero: bool = False) -> dict[str, int]:
        """{field name: value} for every field, in encoding order (only nonzero ones if asked)."""
        mem = self.mem
        out = {f.name: mem[f.slot] for f in FIELDS}
        return {k: v for k, v in out.items() if v} if nonzero else out

    def diff(self, other: "Vmcs") -> dict[str, tuple[int, int]]:
        """{field name: (self value, other value)} for the fields that differ."""
        a, b = self.snapshot(), other.snapshot()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def __copy__(self) -> "Vmcs":
        return self.copy()

    def __deepcopy__(self, memo) -> "Vmcs":
        return self.copy()

    def __reduce__(self):
        """Pickling: the area's bytes and the rest (the native memory itself
        cannot be pickled); unpickled, a plain Vmcs as :meth:`copy` makes."""
        c = self.copy()
        return _restore, (bytes(c.mem), c.launch_state, c.vmwrite_any_field, c.revision_id)

    def copy(self) -> "Vmcs":
        """An independent VMCS with the same fields, launch state and VMWRITE rule."""
        new = Vmcs(vmwrite_any_field=self.vmwrite_any_field, revision_id=self.revision_id)
        new.mem[:] = self.mem
        new.launch_state = self.launch_state
        return new

    # -- launch state (SDM Vol. 3C 25.1, 31.3 VMCLEAR/VMLAUNCH/VMRESUME) --------------

    @property
    def launched(self) -> bool:
        return self.launch_state is LaunchState.LAUNCHED

    def vmclear(self) -> None:
        """VMCLEAR: the launch state becomes clear (field data is kept)."""
        self.launch_state = LaunchState.CLEAR

    def check_launch(self) -> None:
        """The VMLAUNCH launch-state check: VMfailValid(4) unless the VMCS is clear."""
        if self.launch_state is not LaunchState.CLEAR:
            raise VmInstructionFault(VmInstructionError.VMLAUNCH_NONCLEAR_VMCS)

    def check_resume(self) -> None:
        """The VMRESUME launch-state check: VMfailValid(5) unless the VMCS is launched."""
        if self.launch_state is not LaunchState.LAUNCHED:
            raise VmInstructionFault(VmInstructionError.VMRESUME_NONLAUNCHED_VMCS)

    def launch(self) -> None:
        """VMLAUNCH succeeded: check the VMCS was clear, then mark it launched.

        Call it after the entry checks passed (``entry_checks.check_vm_entry``):
        a VM entry that fails leaves the launch state as it was.
        """
        self.check_launch()
        self.launch_state = LaunchState.LAUNCHED

    # -- VM-exit information (written by the "processor", bypassing VMWRITE rules) -----

    def set_instruction_error(self, error: VmInstructionError) -> None:
        """Store a VM-instruction error number (what VMfailValid does)."""
        self._store(FIELDS_BY_ENCODING[VmcsField.VM_INSTRUCTION_ERROR], int(error))

    def set_exit_info(self, reason, qualification=0, *,
                      guest_linear_address: int | None = None,
                      guest_physical_address: int | None = None,
                      instruction_length: int | None = None,
                      instruction_info=None,
                      interruption_info=0,
                      interruption_error_code: int | None = None,
                      idt_vectoring_info=0,
                      idt_vectoring_error_code: int | None = None,
                      io_rcx: int | None = None, io_rsi: int | None = None,
                      io_rdi: int | None = None, io_rip: int | None = None) -> None:
        """Fill the read-only VM-exit information fields for one VM exit (SDM Vol. 3C 28.2).

        ``reason`` is an :class:`ExitReason`, an int (bits such as
        EXIT_REASON_ENTRY_FAILURE may be or-ed in) or an
        :class:`ExitReasonField`.  ``qualification``, ``instruction_info`` and
        the interruption fields take ints or objects with ``encode()`` (the
        dataclasses of vmm.qualification and vmm.controls).  The exit reason
        and the qualification are always written; so are the valid bits of the
        VM-exit interruption information and IDT-vectoring information, which
        every VM exit sets (0 unless given).  Other fields are left alone when
        None: SDM 28.2 leaves them undefined for exits that do not use them.
        """
        f = FIELDS_BY_ENCODING
        self._store(f[VmcsField.VM_EXIT_REASON], _as_int(reason))
        self._store(f[VmcsField.EXIT_QUALIFICATION], _as_int(qualification))
        self._store(f[VmcsField.VM_EXIT_INTR_INFO], _as_int(interruption_info))
        self._store(f[VmcsField.IDT_VECTORING_INFO], _as_int(idt_vectoring_info))
        optional = (
            (VmcsField.GUEST_LINEAR_ADDRESS, guest_linear_address),
            (VmcsField.GUEST_PHYSICAL_ADDRESS, guest_physical_address),
            (VmcsField.VM_EXIT_INSTRUCTION_LEN, instruction_length),
            (VmcsField.VM_EXIT_INSTRUCTION_INFO, instruction_info),
            (VmcsField.VM_EXIT_INTR_ERROR_CODE, interruption_error_code),
            (VmcsField.IDT_VECTORING_ERROR_CODE, idt_vectoring_error_code),
            (VmcsField.IO_RCX, io_rcx), (VmcsField.IO_RSI, io_rsi),
            (VmcsField.IO_RDI, io_rdi), (VmcsField.IO_RIP, io_rip),
        )
        for enc, value in optional:
            if value is not None:
                self._store(f[enc], _as_int(value))

    @property
    def exit_reason(self) -> ExitReasonField:
        """The exit-reason field, decoded."""
        return ExitReasonField.decode(self.read(VmcsField.VM_EXIT_REASON))


def _access(encoding) -> tuple:
    """(field, high, slot, width mask, read only) of an encoding VMREAD and
    VMWRITE accept (the table's entry); anything else raises as lookup()."""
    a = _ACCESS.get(encoding) if type(encoding) in _INT_TYPES else None
    if a is None:
        field, high = lookup(encoding)      # raises unless an int of another type
        a = _ACCESS[field.encoding | int(high)]
    return a


_INT_TYPES = (int, VmcsField)


def _field_property(field: Field, high: bool) -> property:
    encoding = field.encoding | int(high)

    def get(self) -> int:
        return self.read(encoding)

    def set_(self, value) -> None:
        self.write(encoding, value)
    return property(get, set_, doc=f"{field.name}{'_HIGH' if high else ''} ({encoding:#06x}, SDM Vol. 3C "
                                       f"{field.section}): VMREAD/VMWRITE")


# Field attributes (``vmcs.guest_rip``, ``vmcs.GUEST_RIP``, ``vmcs.tsc_offset_high``)
# are properties made here, not a __getattr__: a class with __getattr__ takes a
# slower path for every attribute (the run loop reads the VMCS's slots per exit).
for _f in FIELDS:
    for _high in ((False, True) if _f.width is FieldWidth.BITS64 else (False,)):
        _p = _field_property(_f, _high)
        for _name in (_f.attr, _f.name):
            setattr(Vmcs, _name + ("_HIGH" if _high and _name.isupper() else "_high" if _high else ""), _p)
del _f, _high, _p, _name


def _restore(data: bytes, launch_state, vmwrite_any_field: bool, revision_id: int) -> Vmcs:
    """Unpickle a Vmcs (``Vmcs.__reduce__``): a plain Vmcs with the pickled fields."""
    v = Vmcs(vmwrite_any_field=vmwrite_any_field, revision_id=revision_id)
    v.mem[:] = memoryview(data).cast("Q")
    v.launch_state = launch_state
    return v


__all__ = [
    "ActivityState", "ENC_ACCESS_HIGH", "ENC_RESERVED_MASK", "FIELDS", "FIELDS_BY_ENCODING",
    "ALL_ENCODINGS", "FIELDS_BY_NAME", "Field", "FieldKind", "FieldWidth", "Interruptibility", "LaunchState", "MAX_FIELD_INDEX",
    "VMCS_LINK_POINTER_NONE", "VMCS_SLOTS", "Vmcs", "VmcsField", "VmInstructionFault", "encoding_index", "encoding_kind",
    "encoding_width", "field_by_name", "lookup", "make_access_rights", "make_encoding", "slot",
    *VmcsField.__members__,
]

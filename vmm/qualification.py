"""Exit qualifications and VM-exit instruction information, as dataclasses.

SDM Vol. 3C 28.2.1 ("Basic VM-Exit Information", exit qualification formats,
Tables 28-1..28-7) and 28.2.5 ("Information for VM Exits Due to Instruction
Execution", instruction-information formats, Tables 28-8..28-14).  These are
the 2023+ numbers; SDMs before 2023 number them 27-1..27-14 (section 27.2).

Every record has ``encode() -> int`` and ``decode(value) -> record``.  Encoding
writes 0 to reserved and undefined bits; decoding ignores them, so
``decode(encode(r)) == r`` for every record and ``encode(decode(v))`` is ``v``
with the undefined bits cleared.  Fields are plain ints, bools or IntEnums;
each class lists its layout in ``LAYOUT`` as (name, low bit, width, type).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar


class EntryFailureQualification(IntEnum):
    """Exit qualification of a VM-entry failure (exit reason 33 or 34), SDM Vol. 3C 27.8.

    For exit reason 34 (MSR loading) the qualification is instead the
    1-based index of the MSR-load entry that failed.
    """

    DEFAULT = 0
    PDPTE_LOADING = 2               # a problem loading the PDPTEs
    NMI_INJECTION = 3               # injecting an NMI into a guest blocking events by STI
    INVALID_VMCS_LINK_POINTER = 4


class Gpr(IntEnum):
    """General-purpose register numbers used by exit qualifications and instruction information."""

    RAX = 0
    RCX = 1
    RDX = 2
    RBX = 3
    RSP = 4
    RBP = 5
    RSI = 6
    RDI = 7
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15


class SegmentReg(IntEnum):
    """Segment-register numbers of the instruction-information formats (Tables 28-8..28-14)."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


class AddressSize(IntEnum):
    """Address-size encoding of the instruction-information formats (bits 9:7)."""

    BITS16 = 0
    BITS32 = 1
    BITS64 = 2


class _Record:
    """Shared encode/decode over ``LAYOUT``: (field name, low bit, width, type)."""

    LAYOUT: ClassVar[tuple[tuple[str, int, int, type], ...]] = ()

    @classmethod
    def defined_mask(cls) -> int:
        """The bits the record defines (everything else encodes as 0)."""
        mask = 0
        for _, lo, width, _t in cls.LAYOUT:
            mask |= ((1 << width) - 1) << lo
        return mask

    def encode(self) -> int:
        value = 0
        for name, lo, width, _t in self.LAYOUT:
            v = self._to_raw(name, getattr(self, name))
            if not 0 <= v < (1 << width):
                raise ValueError(f"{type(self).__name__}.{name} = {getattr(self, name)!r} does not fit {width} bit(s)")
            value |= v << lo
        return value

    @classmethod
    def decode(cls, value: int):
        """Split ``value``; raises ValueError for a value an IntEnum field does not define."""
        kwargs = {}
        for name, lo, width, t in cls.LAYOUT:
            raw = (value >> lo) & ((1 << width) - 1)
            kwargs[name] = cls._from_raw(name, raw, t)
        return cls(**kwargs)

    # Hooks for fields whose stored value is not the raw bits (IoQualification.size).
    def _to_raw(self, name: str, value) -> int:
        return int(value)

    @classmethod
    def _from_raw(cls, name: str, raw: int, t: type):
        return bool(raw) if t is bool else t(raw)


def _check_layout(cls):
    """Class decorator: the LAYOUT names exactly the dataclass fields, without overlaps."""
    names = [f.name for f in fields(cls)]
    if sorted(names) != sorted(n for n, *_ in cls.LAYOUT):
        raise TypeError(f"{cls.__name__}.LAYOUT does not name exactly its fields")
    seen = 0
    for name, lo, width, _t in cls.LAYOUT:
        bits = ((1 << width) - 1) << lo
        if seen & bits:
            raise TypeError(f"{cls.__name__}.LAYOUT: {name} overlaps another field")
        seen |= bits
    return cls


# --------------------------------------------------------------------------- exit qualifications (28.2.1)

@_check_layout
@dataclass(frozen=True)
class DebugExceptionQualification(_Record):
    """Debug exceptions (#DB exits, pending debug exceptions), SDM Vol. 3C Table 28-1."""

    breakpoints: int = 0            # bits 3:0: B3-B0, which breakpoint conditions were met
    bus_lock: bool = False          # bit 11: BLD, an asserted bus lock
    debug_register_access: bool = False   # bit 13: BD
    single_step: bool = False       # bit 14: BS
    rtm: bool = False               # bit 16

    LAYOUT = (("breakpoints", 0, 4, int), ("bus_lock", 11, 1, bool), ("debug_register_access", 13, 1, bool),
              ("single_step", 14, 1, bool), ("rtm", 16, 1, bool))


class TaskSwitchSource(IntEnum):
    """Bits 31:30 of the task-switch qualification."""

    CALL = 0
    IRET = 1
    JMP = 2
    TASK_GATE_IN_IDT = 3


@_check_layout
@dataclass(frozen=True)
class TaskSwitchQualification(_Record):
    """Task switch (exit reason 9), SDM Vol. 3C Table 28-2."""

    selector: int                   # bits 15:0: selector of the TSS being switched to
    source: TaskSwitchSource = TaskSwitchSource.CALL   # bits 31:30

    LAYOUT = (("selector", 0, 16, int), ("source", 30, 2, TaskSwitchSource))


class CrAccessType(IntEnum):
    """Bits 5:4 of the control-register-access qualification."""

    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


@_check_layout
@dataclass(frozen=True)
class CrAccessQualification(_Record):
    """Control-register access (exit reason 28), SDM Vol. 3C Table 28-3.

    ``cr`` is 0 for CLTS and LMSW; ``gpr`` is meaningful for MOV CR only;
    ``lmsw_memory`` and ``lmsw_source`` for LMSW only.
    """

    cr: int                         # bits 3:0
    access_type: CrAccessType       # bits 5:4
    lmsw_memory: bool = False       # bit 6: LMSW operand type, 1 = memory
    gpr: Gpr = Gpr.RAX              # bits 11:8
    lmsw_source: int = 0            # bits 31:16: LMSW source data

    LAYOUT = (("cr", 0, 4, int), ("access_type", 4, 2, CrAccessType), ("lmsw_memory", 6, 1, bool),
              ("gpr", 8, 4, Gpr), ("lmsw_source", 16, 16, int))


@_check_layout
@dataclass(frozen=True)
class DrAccessQualification(_Record):
    """MOV DR (exit reason 29), SDM Vol. 3C Table 28-4."""

    dr: int                         # bits 2:0
    mov_from_dr: bool               # bit 4: 0 = MOV to DR, 1 = MOV from DR
    gpr: Gpr = Gpr.RAX              # bits 11:8

    LAYOUT = (("dr", 0, 3, int), ("mov_from_dr", 4, 1, bool), ("gpr", 8, 4, Gpr))


@_check_layout
@dataclass(frozen=True)
class IoQualification(_Record):
    """I/O instruction (exit reason 30), SDM Vol. 3C Table 28-5.

    ``size`` is the access size in bytes (1, 2 or 4); the field holds size - 1
    in bits 2:0.
    """

    size: int                       # bits 2:0 (encoded as size - 1)
    direction_in: bool              # bit 3: 0 = OUT, 1 = IN
    port: int                       # bits 31:16
    string: bool = False            # bit 4: INS/OUTS
    rep: bool = False               # bit 5: REP prefix
    immediate: bool = False         # bit 6: operand encoding, 1 = immediate port

    LAYOUT = (("size", 0, 3, int), ("direction_in", 3, 1, bool), ("string", 4, 1, bool), ("rep", 5, 1, bool),
              ("immediate", 6, 1, bool), ("port", 16, 16, int))

    def _to_raw(self, name: str, value) -> int:
        if name == "size":
            if value not in (1, 2, 4):
                raise ValueError(f"I/O access size {value!r} is not 1, 2 or 4")
            return value - 1
        return int(value)

    @classmethod
    def _from_raw(cls, name: str, raw: int, t: type):
        if name == "size":
            if raw not in (0, 1, 3):
                raise ValueError(f"I/O qualification size encoding {raw} is not used (SDM Table 28-5)")
            return raw + 1
        return super()._from_raw(name, raw, t)


class ApicAccessType(IntEnum):
    """Bits 15:12 of the APIC-access qualification."""

    LINEAR_READ = 0
    LINEAR_WRITE = 1
    LINEAR_FETCH = 2
    LINEAR_EVENT_DELIVERY = 3
    PHYSICAL_EVENT_DELIVERY = 10
    PHYSICAL_FETCH_OR_EXECUTION = 15


@_check_layout
@dataclass(frozen=True)
class ApicAccessQualification(_Record):
    """APIC access (exit reason 44), SDM Vol. 3C Table 28-6."""

    offset: int                     # bits 11:0 (linear accesses)
    access_type: ApicAccessType     # bits 15:12
    asynchronous: bool = False      # bit 16: asynchronous to instruction execution

    LAYOUT = (("offset", 0, 12, int), ("access_type", 12, 4, ApicAccessType), ("asynchronous", 16, 1, bool))


@_check_layout
@dataclass(frozen=True)
class EptViolationQualification(_Record):
    """EPT violation (exit reason 48), SDM Vol. 3C Table 28-7.

    Bits 3-5 are the EPT permissions the walk granted (the AND of bits 0-2 of
    every EPT paging-structure entry used); with mode-based execute control,
    bit 5 is the supervisor-mode and bit 6 the user-mode execute permission.
    Bit 8 is meaningful only if bit 7 is 1.  Bits 9-11 are the "advanced
    VM-exit information" for EPT violations (IA32_VMX_EPT_VPID_CAP[22]);
    vmlab does not advertise it, so they read 0.  Bits 13 and up (shadow
    stack, guest-paging verification, asynchronous) are not modelled.
    """

    read: bool = False              # bit 0: the access was a data read
    write: bool = False             # bit 1: the access was a data write
    fetch: bool = False             # bit 2: the access was an instruction fetch
    readable: bool = False          # bit 3
    writable: bool = False          # bit 4
    executable: bool = False        # bit 5 (supervisor-mode executable with MBEC)
    user_executable: bool = False   # bit 6 (with MBEC, else undefined)
    linear_address_valid: bool = False   # bit 7: the guest-linear-address field is valid
    translated_access: bool = False      # bit 8: 1 = access to the translation, 0 = to a paging-structure entry
    user_mode_linear: bool = False       # bit 9 (advanced information)
    writable_linear: bool = False        # bit 10 (advanced information)
    execute_disable_linear: bool = False  # bit 11 (advanced information)
    nmi_unblocking: bool = False         # bit 12: NMI unblocking due to IRET

    LAYOUT = (("read", 0, 1, bool), ("write", 1, 1, bool), ("fetch", 2, 1, bool), ("readable", 3, 1, bool),
              ("writable", 4, 1, bool), ("executable", 5, 1, bool), ("user_executable", 6, 1, bool),
              ("linear_address_valid", 7, 1, bool), ("translated_access", 8, 1, bool),
              ("user_mode_linear", 9, 1, bool), ("writable_linear", 10, 1, bool),
              ("execute_disable_linear", 11, 1, bool), ("nmi_unblocking", 12, 1, bool))


# --------------------------------------------------------------------------- instruction information (28.2.5)

_MEMORY_OPERAND = (("scaling", 0, 2, int), ("address_size", 7, 3, AddressSize), ("segment", 15, 3, SegmentReg),
                   ("index_reg", 18, 4, Gpr), ("index_invalid", 22, 1, bool), ("base_reg", 23, 4, Gpr),
                   ("base_invalid", 27, 1, bool))


@_check_layout
@dataclass(frozen=True)
class InsOutsInfo(_Record):
    """VM-exit instruction information for INS and OUTS, SDM Vol. 3C Table 28-8.

    ``segment`` is meaningful for OUTS only (INS always uses ES).
    Reported only when IA32_VMX_BASIC[54] = 1.
    """

    address_size: AddressSize = AddressSize.BITS32   # bits 9:7
    segment: SegmentReg = SegmentReg.DS             # bits 17:15

    LAYOUT = (("address_size", 7, 3, AddressSize), ("segment", 15, 3, SegmentReg))


@_check_layout
@dataclass(frozen=True)
class InvalidationInfo(_Record):
    """INVEPT, INVPCID and INVVPID, SDM Vol. 3C Table 28-9.

    The memory operand is described by scaling (bits 1:0, scale = 1 << scaling),
    address size, segment, index and base registers; ``reg2`` (bits 31:28)
    holds the invalidation type.  Bit 10 is cleared to 0.
    """

    scaling: int = 0
    address_size: AddressSize = AddressSize.BITS64
    segment: SegmentReg = SegmentReg.DS
    index_reg: Gpr = Gpr.RAX
    index_invalid: bool = True
    base_reg: Gpr = Gpr.RAX
    base_invalid: bool = True
    reg2: Gpr = Gpr.RAX

    LAYOUT = _MEMORY_OPERAND + (("reg2", 28, 4, Gpr),)


class DescriptorTableInstruction(IntEnum):
    """Bits 29:28 of the LIDT/LGDT/SIDT/SGDT instruction information."""

    SGDT = 0
    SIDT = 1
    LGDT = 2
    LIDT = 3


@_check_layout
@dataclass(frozen=True)
class DescriptorTableInfo(_Record):
    """LIDT, LGDT, SIDT, SGDT (exit reason 46), SDM Vol. 3C Table 28-10.

    ``operand_size_32`` is bit 11 (0 = 16-bit, 1 = 32-bit operand size;
    ignored in 64-bit mode).
    """

    instruction: DescriptorTableInstruction
    scaling: int = 0
    address_size: AddressSize = AddressSize.BITS64
    operand_size_32: bool = True
    segment: SegmentReg = SegmentReg.DS
    index_reg: Gpr = Gpr.RAX
    index_invalid: bool = True
    base_reg: Gpr = Gpr.RAX
    base_invalid: bool = True

    LAYOUT = _MEMORY_OPERAND + (("operand_size_32", 11, 1, bool), ("instruction", 28, 2, DescriptorTableInstruction))


class LdtrTrInstruction(IntEnum):
    """Bits 29:28 of the LLDT/LTR/SLDT/STR instruction information."""

    SLDT = 0
    STR = 1
    LLDT = 2
    LTR = 3


@_check_layout
@dataclass(frozen=True)
class LdtrTrInfo(_Record):
    """LLDT, LTR, SLDT, STR (exit reason 47), SDM Vol. 3C Table 28-11.

    With ``register_operand`` (bit 10) the operand is ``reg1`` (bits 6:3) and
    the memory-operand fields are undefined; otherwise ``reg1`` is undefined.
    """

    instruction: LdtrTrInstruction
    register_operand: bool = False
    reg1: Gpr = Gpr.RAX
    scaling: int = 0
    address_size: AddressSize = AddressSize.BITS64
    segment: SegmentReg = SegmentReg.DS
    index_reg: Gpr = Gpr.RAX
    index_invalid: bool = True
    base_reg: Gpr = Gpr.RAX
    base_invalid: bool = True

    LAYOUT = _MEMORY_OPERAND + (("reg1", 3, 4, Gpr), ("register_operand", 10, 1, bool),
                                ("instruction", 28, 2, LdtrTrInstruction))


class OperandSize(IntEnum):
    """Bits 12:11 of the RDRAND/RDSEED instruction information."""

    BITS16 = 0
    BITS32 = 1
    BITS64 = 2


@_check_layout
@dataclass(frozen=True)
class RdrandRdseedInfo(_Record):
    """RDRAND, RDSEED (and TPAUSE, UMWAIT), SDM Vol. 3C Table 28-12."""

    dest_reg: Gpr                   # bits 6:3
    operand_size: OperandSize = OperandSize.BITS32   # bits 12:11

    LAYOUT = (("dest_reg", 3, 4, Gpr), ("operand_size", 11, 2, OperandSize))


@_check_layout
@dataclass(frozen=True)
class VmxMemoryOperandInfo(_Record):
    """VMCLEAR, VMPTRLD, VMPTRST, VMXON, XRSTORS, XSAVES, SDM Vol. 3C Table 28-13."""

    scaling: int = 0
    address_size: AddressSize = AddressSize.BITS64
    segment: SegmentReg = SegmentReg.DS
    index_reg: Gpr = Gpr.RAX
    index_invalid: bool = True
    base_reg: Gpr = Gpr.RAX
    base_invalid: bool = True

    LAYOUT = _MEMORY_OPERAND


@_check_layout
@dataclass(frozen=True)
class VmreadVmwriteInfo(_Record):
    """VMREAD, VMWRITE, SDM Vol. 3C Table 28-14.

    ``reg2`` (bits 31:28) holds the field encoding; the other operand is
    ``reg1`` with ``register_operand`` (bit 10), else memory.
    """

    reg2: Gpr
    register_operand: bool = True
    reg1: Gpr = Gpr.RAX
    scaling: int = 0
    address_size: AddressSize = AddressSize.BITS64
    segment: SegmentReg = SegmentReg.DS
    index_reg: Gpr = Gpr.RAX
    index_invalid: bool = True
    base_reg: Gpr = Gpr.RAX
    base_invalid: bool = True

    LAYOUT = _MEMORY_OPERAND + (("reg1", 3, 4, Gpr), ("register_operand", 10, 1, bool), ("reg2", 28, 4, Gpr))


#: Every record class, for tests and tools.
RECORDS = (DebugExceptionQualification, TaskSwitchQualification, CrAccessQualification, DrAccessQualification,
           IoQualification, ApicAccessQualification, EptViolationQualification, InsOutsInfo, InvalidationInfo,
           DescriptorTableInfo, LdtrTrInfo, RdrandRdseedInfo, VmxMemoryOperandInfo, VmreadVmwriteInfo)

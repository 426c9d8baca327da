"""Exit values: what a vCPU run returns (a closed set).

``Vcpu.run()`` returns exactly one of these.  They carry what happened, decoded;
they do not act.  The dispatcher in vmm/ decides what each means (a device
access on a bus, an MSR from the model, a VM exit to a user handler) and then
completes it through the Vcpu (``complete_io``, ``complete_mmio``,
``complete_rdmsr``…), which also advances RIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TrapKind(StrEnum):
    """Kinds of trap sites (instructions stopped before they run); the bit
    numbers are ``emu.cpu.TRAP_KINDS`` / native/vmlab.h ``VMLAB_TRAP_*``.  A
    StrEnum: members compare equal to their names."""
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    CR_READ = "cr_read"
    CR_WRITE = "cr_write"
    CLTS = "clts"
    LMSW = "lmsw"
    INVLPG = "invlpg"
    HLT = "hlt"
    IO = "io"
    CPUID = "cpuid"
    RDTSC = "rdtsc"
    RDTSCP = "rdtscp"
    RDPMC = "rdpmc"
    WBINVD = "wbinvd"
    INVD = "invd"
    XSETBV = "xsetbv"
    MWAIT = "mwait"
    MONITOR = "monitor"
    PAUSE = "pause"
    DR = "dr"
    DESC = "desc"
    RDRAND = "rdrand"
    RDSEED = "rdseed"
    VMX = "vmx"
    INVPCID = "invpcid"
    SMSW = "smsw"
    INT1 = "int1"
    IRET = "iret"
    TASK = "task"           # far JMP/CALL (may switch tasks)


@dataclass(slots=True)
class Exit:
    """Base class.  ``rip`` is the guest RIP at the exit; ``insn_len`` the length
    of the instruction the exit is about (0 when there is none)."""
    rip: int = 0
    insn_len: int = 0


@dataclass(slots=True)
class IoExit(Exit):
    """IN/OUT/INS/OUTS (port I/O).  For OUT(S) ``values`` holds the data written,
    one item per element; for IN(S) the dispatcher supplies them to
    ``Vcpu.complete_io``.  ``count`` > 1 only for string I/O."""
    port: int = 0
    size: int = 1
    is_write: bool = False
    string: bool = False
    rep: bool = False
    count: int = 1
    imm: bool = False          # port given as an 8-bit immediate
    values: list[int] = field(default_factory=list)
    # decoding details needed to complete the instruction
    addr_size: int = 2
    seg_base: int = 0
    seg: int = 3               # segment register of OUTS (ES=0 … GS=5; INS always uses ES)
    gla: int = 0               # linear address of the string element (INS/OUTS)


@dataclass(slots=True)
class MmioExit(Exit):
    """A load or store to a guest-physical address outside RAM."""
    gpa: int = 0
    gla: int = 0
    size: int = 0
    is_write: bool = False
    value: int = 0
    insn: Any = None           # decoded instruction (capstone) used to complete it
    #: not a plain MOV: the instruction reads (needs_read) and/or writes the
    #: operand and is completed by replaying it (Vcpu.replay_mmio)
    replay: bool = False
    needs_read: bool = False
    #: a string instruction (MOVS/CMPS/STOS/LODS/SCAS, REP or not): completed
    #: element by element by emu.strmmio.emulate_string
    string: bool = False
    #: no operand of the instruction is on the page (a descriptor-table read,
    #: an implicit stack access): replayed with the page as open bus
    #: (emu.strmmio.replay_open_bus); ``gla`` is then the page
    implicit: bool = False


@dataclass(slots=True)
class EptExit(Exit):
    """An access the EPT refused (``misconfig`` False: EPT violation with the
    SDM Table 28-7 ``qualification``) or an EPT misconfiguration.  ``gpa`` is
    the guest-physical address, ``gla`` the guest-linear one (when the
    qualification's bit 7 says it is valid)."""
    gpa: int = 0
    gla: int = 0
    qualification: int = 0
    misconfig: bool = False


@dataclass(slots=True)
class HltExit(Exit):
    """HLT retired; RIP is after it."""


@dataclass(slots=True)
class ExceptionExit(Exit):
    """An exception or software interrupt raised by guest code, not yet delivered.
    ``software`` is True for INT n / INT3 / INTO (RIP is after the instruction);
    ``int_n`` for INT n (CD ib) alone, whatever its vector: INT 3 is not INT3."""
    vector: int = 0
    error_code: int | None = None
    software: bool = False
    cr2: int | None = None     # for #PF: the faulting linear address
    int_n: bool = False


@dataclass(slots=True)
class MsrExit(Exit):
    """RDMSR (is_write False) or WRMSR; ``value`` is EDX:EAX for WRMSR."""
    msr: int = 0
    is_write: bool = False
    value: int = 0


@dataclass(slots=True)
class CrExit(Exit):
    """MOV to/from CRn, CLTS, LMSW (SDM Vol. 3C Table 28-3 access types:
    0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW)."""
    cr: int = 0
    access_type: int = 0
    gpr: int = 0
    value: int = 0             # value to write (MOV to CR, LMSW source)
    lmsw_mem: bool = False
    lmsw_addr: int = 0


@dataclass(slots=True)
class TrapExit(Exit):
    """Any other armed trap site (INVLPG, descriptor-table instructions, VMX…):
    the instruction at RIP has not run.  ``kind`` is a TrapKind."""
    kind: str = ""
    insn: Any = None
    operand: int | None = None  # e.g. INVLPG's linear address


@dataclass(slots=True)
class PolicyExit(Exit):
    """A trap site that the native fast path (emu/fastpath.py) found to be a VM
    exit under the policy the VMM installed: ``reason``, ``qualification`` and
    ``insn_len`` are final, the instruction at ``rip`` has not run.  ``site``
    (linear, physical, page generation) lets ``Vcpu.trap_exit_at`` decode it
    into the ordinary exit value when someone needs the operands."""
    reason: int = 0
    qualification: int = 0
    site: tuple = (0, 0, 0)


@dataclass(slots=True)
class DeadlineExit(Exit):
    """Virtual time reached the deadline the caller gave ``run()``."""


@dataclass(slots=True)
class RetryExit(Exit):
    """Nothing happened: the run stopped at a trap site that, decoded again, is
    not an armed instruction (its code changed since the scan, or it is not one
    in the current mode), and the site was dropped.  No instruction ran; the
    caller just runs again from ``rip``.  Handle it like
    DeadlineExit, except that it is not a completed step (single-stepping, the
    monitor trap flag)."""


@dataclass(slots=True)
class TaskSwitchExit(Exit):
    """A task switch Unicorn began (JMP/CALL far to a TSS or task gate, IRET
    with NT = 1) stopped after loading the new task's registers and selectors
    and before their descriptors: emu/taskswitch.finish_native completes it."""


@dataclass(slots=True)
class IrqWindowExit(Exit):
    """The guest can take an interrupt now (IF=1 at a block boundary)."""


@dataclass(slots=True)
class ShutdownExit(Exit):
    """The machine stopped: triple fault, or a state vmlab cannot continue from."""
    reason: str = ""


@dataclass(slots=True)
class InternalErrorExit(Exit):
    """Unicorn reported an error vmlab does not know how to turn into guest state."""
    message: str = ""


# ---------------------------------------------------------------------- debugger stops
@dataclass(slots=True)
class BreakpointExit(Exit):
    """A breakpoint (emu/debugpoints.py): the instruction at ``rip`` (linear
    address ``addr``) has not run."""
    addr: int = 0


@dataclass(slots=True)
class WatchpointExit(Exit):
    """An access to a page holding a watched range; the instruction at ``rip``
    has not run.  ``accesses`` are the (linear address, size) operands of the
    instruction on that page; ``is_write`` the kind of access that stopped it;
    ``vpage``/``ppage`` the linear and physical page.  Whether an access
    really touches a watched range is the debugger's decision."""
    vpage: int = 0
    ppage: int = 0
    is_write: bool = False
    accesses: list = field(default_factory=list)


@dataclass(slots=True)
class DebugStopExit(Exit):
    """A debugger stop at a block boundary: ``why`` is "interrupt" (an
    asynchronous stop request, e.g. Ctrl-C) or "mode" (the CPU mode changed
    under break-mode).  Nothing was left half done."""
    why: str = ""

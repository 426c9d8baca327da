"""The one run loop: a vCPU run returns an exit value, ``handle_exit`` decides it.

Every way of running a guest -- ``vmlab run``, ``Vm.run()``, a VMX guest under
Python handlers (``VmxGuest.run()``), and later the debugger -- goes through
:func:`run` below.  Its shape follows Firecracker's vCPU loop
(``run_emulation``: one ``match`` over the exit, a closed set of outcomes):

1. between instructions, one **arbiter** (:meth:`Machine.arbitrate`) decides
   which event the CPU takes: INIT, NMI, LAPIC or PIC interrupt -- or, in VMX
   non-root operation, an exit the controls ask for instead (interrupt/NMI
   window, external-interrupt and NMI exiting, the preemption timer);
2. ``Vcpu.run(deadline)`` runs guest code and returns one exit value
   (``emu.exits``);
3. :func:`handle_exit` decides it: the **intercept policy** first (VMX non-root
   operation: is this a VM exit under the current controls?), then the
   platform (a device on a bus, an MSR from the model, a fault to deliver);
   it returns an :data:`Outcome`;
4. the loop applies the outcome: deliver an event, halt until one arrives,
   hand a VM exit to the policy's handlers, or stop with a :class:`RunResult`.

``handle_exit`` touches the machine only through the small interface described
by :class:`Machine`, so unit tests drive it with made-up exits and a fake
machine, without Unicorn (tests/unit/test_runloop.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, Union

from vmlab.emu import sensitive, taskswitch, x86
from vmlab.emu.cpu import _M_RIP, _STOP_FAST_EXIT, EptFault, GuestFault
from vmlab.emu.errors import UnsupportedError
from vmlab.emu.events import Event
from vmlab.emu.errors import NativeError
from vmlab.emu.lean import LEAN_EXIT, LOOK, NEVER, clamp
from vmlab.emu.native import ffi, lib
from vmlab.emu.exits import BreakpointExit, DebugStopExit, WatchpointExit
from vmlab.emu.exits import (CrExit, DeadlineExit, EptExit, ExceptionExit, Exit, HltExit, InternalErrorExit, IoExit,
                       IrqWindowExit, MmioExit, MsrExit, PolicyExit, RetryExit, ShutdownExit, TaskSwitchExit,
                       TrapExit, TrapKind)

#: A halted guest with nothing able to wake it within this much virtual time stops.
IDLE_LIMIT_NS = 10 * 1_000_000_000
#: Longest stretch run without returning to the loop (bounds timeout latency).
SLICE_INSNS = 200_000_000
#: Slice length in nanoseconds when time follows the host clock.
HOST_SLICE_NS = 10_000_000


class StopReason(StrEnum):
    """Why a run ended (``RunResult.reason``).  The values are the words the CLI
    and the README use."""
    DEBUG_EXIT = "debug-exit"    # the guest wrote to isa-debug-exit; status is the process status
    HALTED = "halted"            # HLT with interrupts off, or nothing left to wake the CPU
    SHUTDOWN = "shutdown"        # triple fault
    LIMIT = "limit"              # the instruction limit was reached
    TIMEOUT = "timeout"          # the wall-clock limit was reached
    ERROR = "error"              # vmlab cannot continue (unmodelled feature, internal error)
    STOPPED = "stopped"          # Vm.stop() was called
    RESET = "reset"              # the guest asked for a reset (port 0x64 <- 0xFE, port 0xCF9 bit 2)
    POWEROFF = "poweroff"        # the guest powered the machine off (ACPI S5)
    VMEXIT = "vmexit"            # VMX: a VM exit with no handler, or a handler stopped
    # debugger stops (tools/debugger.py); the machine can always be resumed
    BREAKPOINT = "breakpoint"    # before an instruction with a breakpoint (exit: BreakpointExit)
    WATCHPOINT = "watchpoint"    # before an access to a watched page (exit: WatchpointExit)
    STEP = "step"                # run(one_step=True): one instruction completed
    INTERRUPTED = "interrupted"  # an asynchronous stop request (Ctrl-C, a gdb interrupt)
    MODE_CHANGE = "mode-change"  # break-mode: the CPU mode changed (exit: DebugStopExit)
    BREAK_INT = "break-int"      # break-int: an event with an armed vector was delivered
    BREAK_EXIT = "break-exit"    # break-exit: a matching VM exit, before its handler runs


@dataclass
class RunResult:
    """How a run ended.  ``status`` is the process status for DEBUG_EXIT (QEMU
    convention); ``exit`` the VM exit for VMEXIT."""
    reason: StopReason
    status: int | None = None
    message: str = ""
    icount: int = 0
    exit: object = None


# ---------------------------------------------------------------------- outcomes
@dataclass(frozen=True, slots=True)
class Handled:
    """The exit is complete; keep running."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """Deliver this event to the guest (through the intercept policy under VMX)."""
    event: Event


@dataclass(frozen=True, slots=True)
class Halt:
    """The CPU executed HLT (RIP is past it): wait for an event."""


@dataclass(frozen=True, slots=True)
class Stop:
    """End the run with this reason."""
    reason: StopReason
    message: str = ""
    status: int | None = None
    exit: object = None


@dataclass(frozen=True, slots=True)
class Intercepted:
    """The intercept policy turned the exit into a VM exit (``exit``) for its
    handlers."""
    exit: object


#: What ``handle_exit`` returns: a closed union.
Outcome = Union[Handled, Deliver, Halt, Stop, Intercepted]
HANDLED = Handled()
HALT = Halt()


class InterceptPolicy(Protocol):
    """VMX non-root operation as seen by the loop (vmm.vmx.VmxGuest)."""
    single_step: bool                    # monitor trap flag: one instruction per run
    lean: bool                           # nothing asked for between instructions: the loop's lean path may run

    def intercept(self, ex: Exit) -> Outcome | None: ...      # None: the platform handles it
    def events(self, src: str | None) -> Outcome | None: ...  # exits the controls ask for between instructions
    def deliver(self, ev: Event) -> Outcome: ...              # event delivery under the exception bitmap
    def on_exit(self, vmexit) -> Outcome: ...                 # handlers, then VM entry
    def deadline(self) -> int | None: ...                     # e.g. the preemption timer
    def lean_begin(self) -> None: ...                         # a stint of lean_exit calls starts
    def lean_exit(self, word: int) -> Outcome | None: ...     # a fast-path VM exit, handled whole (None: not here)
    def policy_exit(self) -> Exit: ...                        # that exit as a PolicyExit, for the general path


class Machine(Protocol):
    """What the loop and ``handle_exit`` use of a machine (vmm.vm.Vm)."""
    vcpu: object
    intercept: InterceptPolicy | None
    pending_stop: Stop | None

    def port_io(self, ex: IoExit) -> None: ...
    def mmio_access(self, ex: MmioExit) -> None: ...
    def msr_access(self, ex: MsrExit) -> None: ...
    def cr_access(self, ex: CrExit) -> None: ...
    def set_nmi_blocked(self, blocked: bool) -> None: ...
    def deliver(self, ev: Event) -> Outcome: ...


# ---------------------------------------------------------------------- the decision
def handle_exit(m: Machine, ex: Exit) -> Outcome:
    """Decide one exit: the intercept policy first, then the platform.  A fault
    raised while completing an instruction (#GP from WRMSR, #PF from string
    I/O…) becomes the exception it is, which under VMX passes the exception
    bitmap like any other."""
    policy = m.intercept
    try:
        if policy is not None:
            out = policy.intercept(ex)
            if out is not None:
                return out
        cpu = m.vcpu
        # SYSCALL/SYSENTER mask RFLAGS themselves: left to the flag masks.
        traced = (isinstance(ex, _EMULATED) and cpu.regs.rflags & x86.RFLAGS_TF
                  and not (isinstance(ex, TrapExit) and ex.kind in ("syscall", "sysenter")))
        rip = ex.rip
        out = platform(m, ex)
        if traced and out is HANDLED and cpu.regs.rip != rip:
            return _single_step_trap(cpu)
        return out
    except GuestFault as f:
        fault = ExceptionExit(rip=ex.rip, vector=f.vector, error_code=f.error_code, cr2=f.cr2)
        if policy is not None:
            out = policy.intercept(fault)   # ExceptionExit: the bitmap decides (never raises GuestFault)
            if out is not None:
                return out
        return Deliver(Event(f.vector, f.error_code, cr2=f.cr2))
    except EptFault as f:
        if policy is not None:
            return policy.intercept(EptExit(rip=ex.rip, gpa=f.gpa, gla=f.gla, qualification=f.qualification,
                                            misconfig=f.misconfig))
        return Stop(StopReason.ERROR, f"EPT fault at gpa={f.gpa:#x} without a VMM")


#: Exits whose instruction vmlab completes itself (Unicorn never runs it).
_EMULATED = (IoExit, MmioExit, MsrExit, CrExit, TrapExit)


def _single_step_trap(cpu) -> Outcome:
    """The single-step trap of an instruction vmlab completed itself (IN, OUT,
    RDMSR, MOV CR...; Unicorn raises it for those it runs).  SDM Vol. 3A
    18.3.1.4 "Single-Step Exception Condition": "The processor generates a
    single-step debug exception if (while an instruction is being executed)
    it detects that the TF flag in the EFLAGS register is set.  The exception
    is a trap-class exception, because the exception is generated after the
    instruction is executed"; DR6.BS (bit 14) says so."""
    cpu.set_dr(6, cpu.regs.dr[6] | x86.DR6_BS)
    return Deliver(Event(x86.DB))


def platform(m: Machine, ex: Exit) -> Outcome:
    """What the machine itself does with an exit (bare metal)."""
    if type(ex) is PolicyExit:
        # A fast-path decision nobody intercepted: the plain exit behind it.
        ex = m.vcpu.trap_exit_at(ex)
    match ex:
        case IoExit():
            m.port_io(ex)
            return HANDLED
        case MmioExit():
            m.mmio_access(ex)
            return HANDLED
        case MsrExit():
            m.msr_access(ex)
            return HANDLED
        case CrExit():
            m.cr_access(ex)
            return HANDLED
        case HltExit():
            cpu = m.vcpu
            if cpu.cpl != 0:                  # HLT is privileged (SDM Vol. 2A HLT)
                return Deliver(Event(x86.GP, 0))
            if ex.insn_len:
                cpu.skip(ex.insn_len)
            return HALT
        case ExceptionExit():
            if ex.vector == x86.DB and ex.insn_len and not ex.software:
                # INT1 (ICEBP, F1): a trap -- the saved RIP is after the
                # instruction (SDM Vol. 3A 6.15 "Interrupt 1—Debug Exception
                # (#DB)"; Vol. 2A "INT n/INTO/INT3/INT1"), and the gate's DPL is
                # not checked (it is not a software interrupt).
                m.vcpu.set_rip(ex.rip)
                return Deliver(Event(x86.DB, icebp=True))
            return Deliver(Event(ex.vector, ex.error_code, software=ex.software, cr2=ex.cr2, int_n=ex.int_n))
        case TrapExit():
            return _platform_trap(m, ex)
        case TaskSwitchExit():
            taskswitch.finish_native(m.vcpu)
            return HANDLED
        case DeadlineExit() | IrqWindowExit() | RetryExit():
            return HANDLED
        case ShutdownExit():
            return Stop(StopReason.SHUTDOWN, ex.reason)
        case BreakpointExit():
            return Stop(StopReason.BREAKPOINT, f"breakpoint at {ex.addr:#x}", exit=ex)
        case WatchpointExit():
            return Stop(StopReason.WATCHPOINT, f"access to watched page {ex.vpage:#x}", exit=ex)
        case DebugStopExit():
            if ex.why == "mode":
                return Stop(StopReason.MODE_CHANGE, f"CPU mode changed at rip={ex.rip:#x}", exit=ex)
            return Stop(StopReason.INTERRUPTED, "interrupted", exit=ex)
        case InternalErrorExit():
            return Stop(StopReason.ERROR, f"{ex.message} (rip={ex.rip:#x})")
        case EptExit():
            return Stop(StopReason.ERROR, f"EPT exit at gpa={ex.gpa:#x} without a VMM (rip={ex.rip:#x})")
        case _:
            return Stop(StopReason.ERROR, f"unknown exit {type(ex).__name__} at rip={ex.rip:#x}")


def _platform_trap(m: Machine, ex: TrapExit) -> Outcome:
    match ex.kind:
        case TrapKind.IRET:
            # The IRET that ends NMI blocking (SDM Vol. 3A 6.7.1); it then runs
            # natively, and a pending NMI is taken only after it: the next run
            # is one instruction long (Machine.step_next) so the arbiter sees the
            # state after the IRET.
            m.set_nmi_blocked(False)
            m.step_next = True
            return HANDLED
        case "syscall":
            sensitive.emulate_syscall(m.vcpu, ex.insn_len)
            return HANDLED
        case "sysenter":
            sensitive.emulate_sysenter(m.vcpu, ex.insn_len)
            return HANDLED
        case TrapKind.RDPMC:
            sensitive.emulate_rdpmc(m.vcpu, ex.insn_len)
            return HANDLED
        case TrapKind.DESC:
            if ex.insn is None:
                return Stop(StopReason.ERROR, f"undecodable descriptor-table instruction at rip={ex.rip:#x}")
            sensitive.emulate_desc(m.vcpu, ex.insn, ex.insn_len)
            return HANDLED
        case TrapKind.INVLPG:
            sensitive.emulate_invlpg(m.vcpu, ex.insn_len)
            return HANDLED
        case TrapKind.INVPCID:
            # CPUID.(EAX=7,ECX=0):EBX.INVPCID[10] is not advertised: #UD (SDM Vol. 2A INVPCID).
            return Deliver(Event(x86.UD))
        case TrapKind.VMX:
            # The guest's own VMX instructions (guest-visible VMX, vmm.nested);
            # without it VMX is not advertised and they are #UD.
            nested = getattr(m, "nested", None)
            if nested is not None:
                return nested.instruction(ex)
            return Deliver(Event(x86.UD))
        case _:
            # Guest-visible VMX arms the kinds L2's controls need in L1 too (vmm.nested).
            nested = getattr(m, "nested", None)
            out = nested.untrapped(ex) if nested is not None else None
            if out is not None:
                return out
            return Stop(StopReason.ERROR, f"no handler for trapped {ex.kind} at rip={ex.rip:#x}")


# ---------------------------------------------------------------------- asynchronous requests
# Another thread (the --timeout alarm, the console's input reader, a signal
# handler) makes a running vCPU come back to the loop through the debugger's
# block-boundary stop flag (emu.debugpoints.DebugPoints.request_stop): the C
# block hook tests it before each translation block, so the engine stops
# between instructions.  uc_emu_stop from another thread is not safe with
# Unicorn 2.1.4 (its request is also honoured after a guest store, which is
# then executed twice).  ``m.async_requests`` says why the flag was set; an
# interrupt stop with no reason there is the debugger's own (Ctrl-C, gdb).

def enable_async(m):
    """The DebugPoints whose stop flag asynchronous requests use (created on
    the calling thread, which must be the one that runs the vCPU)."""
    cpu = m.vcpu
    dp = getattr(cpu, "debug_points", None)
    if dp is None:
        from vmlab.emu.debugpoints import DebugPoints
        dp = DebugPoints(cpu)
    if getattr(m, "async_requests", None) is None:
        m.async_requests = set()
        m.async_lock = threading.Lock()
    m.async_points = dp
    return dp


def request_async(m, reason: str) -> None:
    """Make the running vCPU return to the loop soon (any thread): ``reason``
    is "timeout" (the run ends with TIMEOUT), "stop" (``m.pending_stop`` is
    taken), "interrupt" (SIGINT: the run ends STOPPED, "interrupted") or
    "input" (host input to feed).  Needs :func:`enable_async`."""
    dp = getattr(m, "async_points", None)
    if dp is None:
        return
    with m.async_lock:
        m.async_requests.add(reason)
        dp.request_stop()
    waiter = getattr(m, "input_event", None)
    if waiter is not None:
        waiter.set()                    # a halted loop waiting for input wakes up


def _take_async(m) -> set:
    reqs = getattr(m, "async_requests", None)
    if not reqs:
        return set()
    with m.async_lock:
        out = set(reqs)
        reqs.clear()
        m.async_points.clear_stop()
    return out


class _Alarm:
    """The --timeout: a host timer that stops the engine ``seconds`` from now
    whatever the guest does (not a check between slices)."""

    def __init__(self, m, seconds: float):
        self.m = m
        self.fired = False
        enable_async(m)
        self.timer = threading.Timer(max(seconds, 0.0), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        request_async(self.m, "timeout")

    def cancel(self) -> None:
        self.timer.cancel()
        self.timer.join()
        reqs = getattr(self.m, "async_requests", None)
        if self.fired and reqs is not None:
            with self.m.async_lock:
                reqs.discard("timeout")
                if not reqs:
                    self.m.async_points.clear_stop()


def _timeout_stop(t0: float, timeout: float) -> Stop:
    return Stop(StopReason.TIMEOUT, f"timeout after {time.monotonic() - t0:.2f} s (--timeout {timeout:g})")


# ---------------------------------------------------------------------- the loop
def run(m, max_insns: int | None = None, timeout: float | None = None, one_step: bool = False) -> RunResult:
    """Run the machine until the guest exits, halts for good, faults fatally, a
    limit hits, or (under an intercept policy) a VM exit has no handler.

    ``one_step`` (the debugger's stepi): one instruction, then stop with
    StopReason.STEP.  As with QEMU's gdbstub defaults (SSTEP_NOIRQ), no
    interrupt is taken before the instruction; an exception it raises is
    delivered (the step ends at the handler), and a HLT ends the step when the
    CPU wakes up.

    ``timeout`` (seconds of host time) is a host timer that stops the engine at
    the next block boundary (:class:`_Alarm`), so it holds within a few
    milliseconds whatever the guest runs."""
    if timeout is not None and not one_step:
        alarm = _Alarm(m, timeout)
        try:
            return _run(m, max_insns, timeout, one_step)
        finally:
            alarm.cancel()
    return _run(m, max_insns, timeout, one_step)


def _run(m, max_insns: int | None, timeout: float | None, one_step: bool) -> RunResult:
    cpu = m.vcpu
    v = cpu.native
    m.pending_stop = None
    t0 = time.monotonic()
    # max_insns counts instructions; virtual time advances 2^shift ns for each (-icount shift)
    limit = v.icount + (max_insns << getattr(v, "icount_shift", 0)) if max_insns is not None else None
    idle_since: int | None = None
    log = m.log
    log_exits, log_cpu, log_blocks = log.enabled("exits"), log.enabled("cpu"), m.log_blocks
    # MOV CR completed in C outside non-root operation (Vcpu.bare_policy),
    # unless every exit is logged or the guest may enter VMX operation.
    cpu.bare_fastpath = (cpu.bare_policy if not log_exits and not log_cpu and getattr(m, "nested", None) is None
                         else None)
    # ... and coalesced port I/O (emu/pio.py), unless port I/O is logged
    cpu.bare_policy.pio = cpu.pio if not log.enabled("io") else ffi.NULL
    pio = cpu.pio
    cpu.refresh()
    halted = False
    resume = getattr(m, "resume_outcome", None)
    if resume is not None:
        # A run that stopped at a break-exit: the VM exit goes to its handlers now.
        m.resume_outcome = None
        stop = _apply(m, resume, breaks=False)
        if stop is HALT:
            halted = True
        elif stop is not None:
            return _result(m, stop)
    # The lean path: while the machine is quiet -- no host input, no stop
    # asked for, no NMI/INIT/interrupt line raised, no timer due, no one-step
    # IRET, an intercept policy whose controls ask for nothing between
    # instructions (``policy.lean``) -- exits are taken in an inner loop of
    # one native call each (vmlab_lean_run, emu/lean.py: the deadline of the
    # slice, the next timer and the limit; run; read the registers; decide a
    # trap site) and, for a VM exit the fast path decided, the policy's
    # ``lean_exit`` (the exit, its handler, VM entry).  What would end the
    # quiet comes in through the vCPU's attention word (a stop, NMI, INIT,
    # an interrupt line, host input: Vm._attend) and the timer queue's watch
    # (a timer armed earlier than the run's deadline): the native call then
    # returns LOOK without running, and the loop looks from the top.  In the
    # quiet state the general path's arbiter would return None and its
    # deadline is the one computed here.  Any other exit is decided the
    # general way below.
    lean_ok = (not one_step and not log_exits and not log_cpu and not log_blocks and timeout is None
               and not m.wall_clock and cpu.clock != "host" and getattr(m, "lapic", None) is not None)
    if lean_ok:
        lapic, pic_master, timers, heap = m.lapic, m.pic.master, m.timers, m.timers.heap
        ctx, lean_run = cpu.lean, lib.vmlab_lean_run
        ctx.slice = SLICE_INSNS
        ctx.limit = limit if limit is not None else NEVER
    look = False                              # the general path runs this iteration
    while True:
        policy = m.intercept
        lean = False
        if look:
            look = False
        elif lean_ok and policy is not None and policy.lean:
            v.attention = 0                   # before the look: what comes in later is seen
            if (not m.host_input and m.pending_stop is None and not m.nmi_pending and not m.init_pending
                    and not m.step_next and not lapic.irr and not pic_master.int_output
                    and cpu.vmx_shadow is None and not cpu._counting and not cpu.keep_block_logs):
                lean = True
        decided = None
        if lean:
            if cpu._dirty & ~_M_RIP:
                cpu.flush()
            else:
                cpu._dirty = 0                # RIP alone: the run starts at regs.rip
            f = cpu.fastpath
            ctx.f = f if f is not None else ffi.NULL
            ctx.timer = clamp(heap[0][0]) if heap else NEVER
            runs = ctx.runs
            timers.watch = ctx
            lean_exit = policy.lean_exit
            policy.lean_begin()
            try:
                while True:
                    kind = lean_run(ctx)
                    if kind < LEAN_EXIT:
                        decided = None
                        break
                    decided = lean_exit(kind)
                    if decided is not HANDLED:
                        break
                    d = cpu._dirty
                    if d:
                        if d & ~_M_RIP:
                            cpu.flush()
                        else:
                            cpu._dirty = 0
            finally:
                timers.watch = None
                m.exit_count += ctx.runs - runs
            idle_since = None
            if kind == LOOK:
                # Nothing ran: the attention word is set (also by a handler
                # whose VM entry took the full path, VmxGuest.lean_exit), or a
                # timer or the limit is due.  The general path looks next.
                look = True
                continue
            if kind >= LEAN_EXIT or kind == _STOP_FAST_EXIT:
                if decided is None:
                    ex = policy.policy_exit()      # decided the general way below
            else:
                try:
                    if kind < 0:
                        raise NativeError("register read failed")
                    ex = cpu.exit_of(kind, ctx.err)
                except Exception as exc:   # as below: decoding an exit must not become a traceback
                    return _result(m, Stop(StopReason.ERROR, f"internal error decoding an exit at "
                                                             f"rip={cpu.regs.rip:#x}: {type(exc).__name__}: {exc}"))
        else:
            v.attention = 0                   # the general path looks at everything below
            if m.host_input:
                m.feed_input()
            timers = m.timers
            if timers.due(v.icount if not m.wall_clock else m.now_ns()):
                timers.run_expired(m.now_ns())
            out = m.arbitrate() if not one_step or halted else None
            if out is not None:
                was_halted, halted = halted, False
                idle_since = None
                stop = _apply(m, out)
                if stop is HALT:
                    halted = True
                elif stop is not None:
                    return _result(m, stop)
                elif one_step and was_halted:
                    return _result(m, Stop(StopReason.STEP, "step"))
            if m.pending_stop is not None:
                return _result(m, m.pending_stop)
            if halted:
                # HLT: skip the idle period to the next timer (virtual time), or
                # sleep until it (host time); stop if nothing can ever wake the CPU.
                if not (cpu.regs.rflags & x86.RFLAGS_IF) and (policy is None or policy.deadline() is None):
                    return _result(m, Stop(StopReason.HALTED,
                                           f"guest halted with interrupts disabled at rip={cpu.regs.rip:#x}"))
                nxt = _earliest(m.timers.next_deadline(), policy.deadline() if policy is not None else None)
                if idle_since is None:
                    idle_since = m.now_ns()
                if timeout is not None and time.monotonic() - t0 > timeout:
                    return _result(m, _timeout_stop(t0, timeout))
                waiter = getattr(m, "input_event", None)
                if nxt is None or m.now_ns() - idle_since > IDLE_LIMIT_NS:
                    if waiter is None:
                        return _result(m, Stop(StopReason.HALTED,
                                               f"guest halted with no interrupt pending at rip={cpu.regs.rip:#x}"))
                    # An interactive console is attached: the guest waits for
                    # typed input (the UART interrupt), as long as it takes.
                    _take_async(m)
                    waiter.wait(0.2 if timeout is None else max(0.0, min(0.2, t0 + timeout - time.monotonic())))
                    waiter.clear()
                    idle_since = None
                    continue
                if m.wall_clock:
                    pause = max(0, nxt - m.now_ns()) / 1e9
                    if timeout is not None:
                        pause = min(pause, max(0.0, t0 + timeout - time.monotonic()))
                    if waiter is not None:
                        waiter.wait(pause)
                        waiter.clear()
                    else:
                        time.sleep(pause)
                else:
                    v.icount = max(v.icount, nxt)
                continue
            if limit is not None and v.icount >= limit:
                return _result(m, Stop(StopReason.LIMIT, f"instruction limit reached ({max_insns})"))
            if timeout is not None and time.monotonic() - t0 > timeout:
                return _result(m, _timeout_stop(t0, timeout))
            if m.wall_clock and cpu.clock != "host":
                deadline = v.icount + 1_000_000
            else:
                # host clock: v.icount is host ns and a host timer ends the run at
                # the deadline, so it is a timer's; 10 ms slices bound input latency
                deadline = v.icount + (10_000_000 if cpu.clock == "host" else SLICE_INSNS)
                nxt = timers.peek()
                if nxt is not None:
                    deadline = min(deadline, max(nxt, v.icount + 1))
            if policy is not None:
                pd = policy.deadline()
                if pd is not None:
                    deadline = min(deadline, max(pd, v.icount + 1))
            if limit is not None:
                deadline = min(deadline, limit)
            step = getattr(m, "step_next", False)
            if step:
                m.step_next = False
            try:
                ex = cpu.run(deadline, single_step=one_step or step or (policy is not None and policy.single_step))
                if pio.nqueued:
                    m.take_queued_io()      # the device sees the queued OUTs before this exit
            except Exception as exc:   # as below: decoding an exit must not become a traceback
                return _result(m, Stop(StopReason.ERROR, f"internal error decoding an exit at rip={cpu.regs.rip:#x}: "
                                                         f"{type(exc).__name__}: {exc}"))
            m.exit_count += 1
        if decided is not None:
            out = decided                     # the lean path's handler ran: its outcome
        else:
            if log_blocks:
                m.flush_block_logs()
            if log_exits:
                # With guest-visible VMX the level the exit came from: L2 while a
                # guest hypervisor's guest runs, L1 otherwise.
                level = ("L2 " if m.intercept is not None else "L1 ") if getattr(m, "nested", None) else ""
                log("exits", f"{v.icount}: {level}{type(ex).__name__} {describe(ex)}")
            if log_cpu:
                log("cpu", m.format_regs())
            if type(ex) is DebugStopExit and ex.why != "mode":
                reqs = _take_async(m)
                if reqs:
                    # Our own asynchronous request, not the debugger's interrupt.
                    if "timeout" in reqs and timeout is not None:
                        return _result(m, _timeout_stop(t0, timeout))
                    if "interrupt" in reqs:
                        return _result(m, Stop(StopReason.STOPPED, "interrupted (SIGINT)"))
                    if m.pending_stop is not None:
                        return _result(m, m.pending_stop)
                    continue
            try:
                out = handle_exit(m, ex)
            except UnsupportedError as exc:   # the guest used what vmlab does not model: say what
                out = Stop(StopReason.ERROR, f"unsupported at rip={ex.rip:#x}: {exc}")
            except Exception as exc:   # a bug in vmlab must not become a traceback for the user
                out = Stop(StopReason.ERROR, f"internal error handling {type(ex).__name__} at "
                                             f"rip={ex.rip:#x}: {type(exc).__name__}: {exc}")
        if out is HANDLED:
            idle_since = None
            if one_step and type(ex) not in _NOT_A_STEP:
                return _result(m, Stop(StopReason.STEP, "step"))
            continue
        # A user's VMX handler may raise (an assert in a test): that propagates.
        stop = _apply(m, out)
        if stop is HALT:
            halted = True
        elif stop is not None:
            return _result(m, stop)
        else:
            idle_since = None
            if one_step:
                return _result(m, Stop(StopReason.STEP, "step"))


def _apply(m, out: Outcome, breaks: bool = True) -> Stop | Halt | None:
    """Carry out an outcome; returns the Stop that ends the run, HALT if the CPU
    is to wait for an event, or None to keep running.  Each
    step yields the next outcome (a delivery may itself become a VM exit, a
    handler's VM entry may fail), iterated, never recursed.  The debugger's
    break-int (``m.break_vectors``) and break-exit (``m.exit_break``) stops are
    checked here; ``breaks`` False skips them (resuming from one)."""
    while True:
        match out:
            case Handled():
                return None
            case Deliver(event=ev):
                vectors = getattr(m, "break_vectors", None)
                out = m.deliver(ev)
                if vectors and ev.vector in vectors and out is HANDLED:
                    return Stop(StopReason.BREAK_INT, f"event {ev.vector:#x} delivered")
            case Intercepted(exit=vmexit):
                brk = getattr(m, "exit_break", None) if breaks else None
                if brk is not None and brk(vmexit):
                    m.resume_outcome = out     # the handlers run when the machine resumes
                    return Stop(StopReason.BREAK_EXIT, f"VM exit {vmexit.reason!s}", exit=vmexit)
                out = m.intercept.on_exit(vmexit)
            case Halt():
                return HALT
            case Stop():
                return out
            case _:
                return Stop(StopReason.ERROR, f"unknown outcome {out!r}")


#: exits after which no instruction has completed (a single step goes on)
_NOT_A_STEP = (RetryExit, IrqWindowExit)


def _result(m, stop: Stop) -> RunResult:
    m.pending_stop = None
    return RunResult(stop.reason, stop.status, stop.message, m.vcpu.native.icount, stop.exit)


def _earliest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def describe(ex: Exit) -> str:
    """One line for -d exits."""
    fields = [f"rip={ex.rip:#x}"]
    for name in getattr(ex, "__slots__", ()):
        if name in ("rip", "insn", "values") or name.startswith("_"):
            continue
        val = getattr(ex, name)
        fields.append(f"{name}={val:#x}" if isinstance(val, int) and not isinstance(val, bool) else f"{name}={val}")
    return " ".join(fields)

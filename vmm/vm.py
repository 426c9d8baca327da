"""The virtual machine: memory, one vCPU, the platform devices, the run loop.

``Vm.run()`` drives ``Vcpu.run()`` and dispatches each exit value in one place
(``_dispatch``): port I/O and MMIO go to the buses where devices sit by range,
MSRs to the MSR model, control registers and INVLPG to emu/sensitive, faults
and interrupts to emu/events.  Virtual time is the guest's instruction count
(1 instruction = 1 ns), so a run is deterministic unless ``wall_clock`` is set.
"""
from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from typing import Callable

from devices.bus import Bus
from devices.clock import Clock, TimerQueue
from devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from devices.fw_cfg import FwCfg
from devices.irq import line_to
from devices.lapic import APIC_LVT_LINT0, APIC_LVT_LINT1, DM_EXTINT, DM_NMI, LVT_DELIVERY_MODE_SHIFT, LocalApic
from devices.pic8259 import Pic8259Pair
from devices.pit8254 import Pit8254
from devices.uart16550 import COM1_IRQ, COM1_PORT, Uart16550
from emu import sensitive, x86
from emu.cpu import MACHINE_TRAPS, GuestFault, Vcpu
from emu.cpuid import CpuidModel
from emu.errors import UnsupportedError
from emu.events import Event, TripleFault, deliver
from emu.exits import (CrExit, DeadlineExit, ExceptionExit, Exit, HltExit, InternalErrorExit, IoExit,
                       IrqWindowExit, MmioExit, MsrExit, ShutdownExit, TrapExit)
from emu.memory import GuestMemory
from emu.tbcache import TbCache
from emu.msr import IA32_APIC_BASE, MsrModel

from .log import DebugLog

LAPIC_BASE = 0xFEE00000
FW_CFG_PORT = 0x510
#: A halted guest with nothing able to wake it within this much virtual time stops.
IDLE_LIMIT_NS = 10 * 1_000_000_000
#: Longest stretch run without returning to the loop (bounds timeout latency).
SLICE_INSNS = 200_000_000


@dataclass
class RunResult:
    """How a run ended.  ``reason``: "debug-exit" (``status`` is the process
    status, QEMU convention), "halted", "shutdown" (triple fault), "limit"
    (instruction limit), "timeout", "error" (vmlab cannot continue), "stopped"
    (``Vm.stop()``)."""
    reason: str
    status: int | None = None
    message: str = ""
    icount: int = 0


def _stdout_sink(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


class Vm:
    """A PC-like machine with one CPU (see module docstring)."""

    def __init__(self, ram_size: int = 64 << 20, *, serial: Callable[[bytes], object] | None = _stdout_sink,
                 cpuid: CpuidModel | None = None, wall_clock: bool = False, log: DebugLog | None = None,
                 cmdline: str = ""):
        self.mem = GuestMemory(ram_size)
        self.cpuid = cpuid or CpuidModel()
        self.vcpu = Vcpu(self.mem, cpuid=self.cpuid)
        self.msrs = MsrModel(self.vcpu, self.cpuid)
        self.log = log or DebugLog()
        self.wall_clock = wall_clock
        self._wall0 = time.monotonic_ns()
        self.clock = Clock(self.now_ns)
        self.timers = TimerQueue()
        self.pio = Bus("pio", 0x10000)
        self.mmio = Bus("mmio", 1 << 64)
        self.serial_output = bytearray()
        self._serial_sink = serial

        self.pic = Pic8259Pair()
        self.pic.attach(self.pio)
        self.pit = Pit8254(self.clock, self.timers, line_to(self.pic, 0))
        self.pit.attach(self.pio)
        self.uart = Uart16550(self._on_serial, line_to(self.pic, COM1_IRQ))
        self.pio.register(COM1_PORT, 8, self.uart, "uart0")
        self.debug_exit = DebugExit(self._on_debug_exit)
        self.pio.register(DEBUG_EXIT_PORT, 4, self.debug_exit, "isa-debug-exit")
        self.fw_cfg = FwCfg(ram_size, cmdline)
        self.pio.register(FW_CFG_PORT, 2, self.fw_cfg, "fw_cfg")
        self.nmi_pending = False
        self.nmi_blocked = False          # after an NMI until the next IRET (SDM Vol. 3A 6.7.1)
        self.init_pending = False
        self.lapic = LocalApic(self.clock, self.timers, nmi=self._on_nmi, init=self._on_init)
        self.mmio.register(LAPIC_BASE, 0x1000, self.lapic, "lapic")
        # What PC firmware leaves behind (SeaBIOS does this before any boot
        # loader runs, and vmlab has no firmware): the LAPIC in virtual-wire
        # mode, LINT0 = ExtINT (the 8259 reaches the CPU), LINT1 = NMI
        # (MP spec 1.4, 3.6.2.2; SDM Vol. 3A 11.5.1).
        self.lapic.lvt[APIC_LVT_LINT0] = DM_EXTINT << LVT_DELIVERY_MODE_SHIFT
        self.lapic.lvt[APIC_LVT_LINT1] = DM_NMI << LVT_DELIVERY_MODE_SHIFT
        self.msrs.on_write.append(self._on_msr_write)
        self.vcpu.set_traps(MACHINE_TRAPS)
        self.tbs = TbCache(self.vcpu)
        self._log_blocks = any(self.log.enabled(i) for i in ("in_asm", "exec", "tb"))
        self.vcpu.keep_block_logs = self._log_blocks
        if self.log.enabled("exec"):
            self.tbs.set_exec_logging(True)

        self._stop: RunResult | None = None
        self._input: collections.deque[bytes] = collections.deque()
        self.image = None
        self.exit_count = 0
        self.event_count = 0
        #: optional hook for the VMM layer: called with each exit first; True = handled
        self.exit_hook: Callable[[Exit], bool] | None = None

    # ------------------------------------------------------------------ time
    def now_ns(self) -> int:
        if self.wall_clock:
            return time.monotonic_ns() - self._wall0
        return self.vcpu.native.icount

    # ------------------------------------------------------------------ boot
    def load(self, image) -> None:
        """Apply a loader's BootImage: copy bytes, clear bss, set the entry state."""
        for addr, data in image.writes:
            self.mem.write(addr, data)
        for addr, length in image.zero:
            self.mem.fill(addr, length)
        cpu = self.vcpu
        cpu.refresh()
        if image.mode == "real":
            cpu.enter_real(0, image.entry)
        elif image.mode == "protected32":
            # The loader's GDT (emu.loaders.x86) has 32-bit code at 0x18, data at 0x10.
            cpu.enter_protected32(image.entry, cs=0x18 if image.gdt is not None else 0x08)
        elif image.mode == "long64":
            cpu.enter_long64(image.entry, image.cr3, image.gdt)
        else:
            raise UnsupportedError(f"unknown entry mode {image.mode!r}")
        if image.gdt is not None:
            cpu.set_descriptor_tables(gdtr=image.gdt)
        for name, value in image.regs.items():
            n = name.lower()
            if n.startswith("e") and len(n) == 3:
                cpu.set_reg("r" + n[1:], value & 0xFFFFFFFF)
            elif n in ("dl", "al", "bl", "cl"):
                idx = {"al": 0, "cl": 1, "dl": 2, "bl": 3}[n]
                cpu.set_gpr(idx, value, 1)
            else:
                cpu.set_reg(n, value)
        cpu.flush()
        self.image = image

    # ------------------------------------------------------------------ devices
    def _on_serial(self, data: bytes) -> None:
        self.serial_output += data
        if self._serial_sink is not None:
            self._serial_sink(data)

    def _on_debug_exit(self, status: int) -> None:
        self._stop = RunResult("debug-exit", status, f"guest wrote to the debug-exit port (status {status})")

    def _on_nmi(self) -> None:
        self.nmi_pending = True

    def _on_init(self) -> None:
        self.init_pending = True

    def _on_msr_write(self, msr: int, value: int) -> None:
        if msr == IA32_APIC_BASE:
            self.lapic.write_base_msr(value)

    def post_input(self, data: bytes) -> None:
        """Queue host input for the UART (thread-safe; fed at the next exit)."""
        self._input.append(bytes(data))

    def _feed_input(self) -> None:
        while self._input:
            self.uart.feed(self._input.popleft())

    def stop(self, message: str = "stopped") -> None:
        self._stop = RunResult("stopped", None, message)

    # ------------------------------------------------------------------ interrupts
    def set_nmi_blocked(self, blocked: bool) -> None:
        """Block NMIs until the next IRET, which is then trapped to unblock them."""
        if blocked != self.nmi_blocked:
            self.nmi_blocked = blocked
            kinds = set(self.vcpu.trap_kinds)
            kinds = kinds | {"iret"} if blocked else kinds - {"iret"}
            self.vcpu.set_traps(kinds)

    def _take_init(self) -> None:
        """INIT outside VMX: the CPU resets and, being the only one, waits for a
        SIPI that never comes (SDM Vol. 3A 10.4.2) -- the machine stops."""
        self.init_pending = False
        self.vcpu.reset()
        self._stop = RunResult("halted", None, "INIT: the CPU is in wait-for-SIPI")

    def _pending_interrupt(self) -> str | None:
        if self.nmi_pending and not self.nmi_blocked:
            return "nmi"
        if self.lapic.pending_vector() is not None:
            return "lapic"
        if self.pic.has_interrupt() and self.lapic.accepts_pic_interrupts():
            return "pic"
        return None

    def _try_inject(self) -> bool:
        """Deliver a pending external interrupt if the CPU can take one now;
        otherwise ask the native side to stop at the next interrupt window."""
        src = self._pending_interrupt()
        v = self.vcpu.native
        if src is None:
            v.irq_window = 0
            return False
        r = self.vcpu.regs
        if src == "nmi":
            # NMIs ignore RFLAGS.IF; further NMIs are blocked until the next IRET
            # (SDM Vol. 3A 6.7.1).
            self.nmi_pending = False
            self._deliver(Event(x86.NMI, external=True))
            self.set_nmi_blocked(True)
            return True
        if not (r.rflags & x86.RFLAGS_IF) or (r.hflags & x86.HF_INHIBIT_IRQ):
            v.irq_window = 1
            return False
        v.irq_window = 0
        if src == "lapic":
            vector = self.lapic.pending_vector()
            self.lapic.acknowledge(vector)
        else:
            vector = self.pic.acknowledge()
        self._deliver(Event(vector, external=True))
        return True

    def _deliver(self, ev: Event) -> None:
        self.event_count += 1
        if self.log.enabled("int"):
            r = self.vcpu.regs
            name = x86.EXCEPTION_NAMES.get(ev.vector, "") if not ev.external else "irq"
            ec = f" e={ev.error_code:#06x}" if ev.error_code is not None else ""
            cr2 = f" cr2={ev.cr2:#x}" if ev.cr2 is not None else ""
            self.log("int", f"{self.event_count}: v={ev.vector:#04x} {name}{ec}{cr2} "
                            f"cpl={self.vcpu.cpl} cs:rip={r.seg[x86.R_CS].selector:04x}:{r.rip:#x} "
                            f"rsp={r.gpr[4]:#x} {'sw' if ev.software else 'ext' if ev.external else 'hw'}")
        try:
            deliver(self.vcpu, ev)
        except TripleFault as exc:
            self._stop = RunResult("shutdown", None, f"triple fault: {exc}")
        except UnsupportedError as exc:
            self._stop = RunResult("error", None, str(exc))

    # ------------------------------------------------------------------ the run loop
    def run(self, max_insns: int | None = None, timeout: float | None = None) -> RunResult:
        """Run until the guest exits, halts for good, faults fatally, or a limit hits."""
        cpu = self.vcpu
        v = cpu.native
        self._stop = None
        t0 = time.monotonic()
        limit = v.icount + max_insns if max_insns is not None else None
        idle_since: int | None = None
        cpu.refresh()
        while self._stop is None:
            if self._input:
                self._feed_input()
            if self.init_pending:
                self._take_init()
                break
            self.timers.run_expired(self.now_ns())
            if self._try_inject():
                idle_since = None
                if self._stop is not None:
                    break
            if limit is not None and v.icount >= limit:
                self._stop = RunResult("limit", None, f"instruction limit reached ({max_insns})")
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                self._stop = RunResult("timeout", None, f"timeout after {timeout:g} s")
                break
            deadline = v.icount + SLICE_INSNS
            nxt = self.timers.next_deadline()
            if nxt is not None and not self.wall_clock:
                deadline = min(deadline, max(nxt, v.icount + 1))
            elif self.wall_clock:
                deadline = v.icount + 1_000_000
            if limit is not None:
                deadline = min(deadline, limit)
            ex = cpu.run(deadline)
            self.exit_count += 1
            if self._log_blocks:
                self._flush_block_logs()
            if self.log.enabled("exits"):
                self.log("exits", f"{v.icount}: {type(ex).__name__} {_describe(ex)}")
            if self.log.enabled("cpu"):
                self.log("cpu", format_regs(cpu))
            if isinstance(ex, HltExit):
                idle_since = self._halt(ex, idle_since)
                continue
            idle_since = None
            try:
                self._dispatch(ex)
            except Exception as exc:   # a bug in vmlab must not become a traceback for the user
                self._stop = RunResult("error", None, f"internal error handling {type(ex).__name__} at "
                                                      f"rip={ex.rip:#x}: {type(exc).__name__}: {exc}")
        self._stop.icount = v.icount
        return self._stop

    def _flush_block_logs(self) -> None:
        """-d in_asm / exec / tb: print what the native registry logged."""
        tbs, log = self.tbs, self.log
        if log.enabled("in_asm"):
            for b in tbs.drain_new():
                log("in_asm", tbs.format_block(b))
        else:
            self.vcpu.native.ntb_new = 0
        if log.enabled("tb"):
            for b in tbs.drain_invalidated():
                log("tb", f"invalidate tb pc={b.pc:#x} phys={b.paddr:#x} size={b.size} "
                          f"(invalidations={b.invalidations})")
        else:
            self.vcpu.native.ntb_inval = 0
        if log.enabled("exec"):
            for idx in tbs.drain_exec():
                b = tbs.block(idx)
                log("exec", f"Trace: [{b.pc:016x}/{b.paddr:x}/{b.hflags:08x}] {b.mode}")

    def _halt(self, ex: HltExit, idle_since: int | None) -> int | None:
        """HLT: wait for the next interrupt in virtual time (skip the idle period)."""
        cpu = self.vcpu
        if cpu.cpl != 0:
            self._fault(GuestFault(x86.GP, 0))
            return None
        if ex.insn_len:
            cpu.skip(ex.insn_len)
        r = cpu.regs
        if not (r.rflags & x86.RFLAGS_IF):
            self._stop = RunResult("halted", None, f"guest halted with interrupts disabled at rip={r.rip:#x}")
            return None
        if idle_since is None:
            idle_since = self.now_ns()
        while self._stop is None:
            self.timers.run_expired(self.now_ns())
            if self._try_inject():
                return None
            nxt = self.timers.next_deadline()
            if nxt is None or self.now_ns() - idle_since > IDLE_LIMIT_NS:
                self._stop = RunResult("halted", None, f"guest halted with no interrupt pending at rip={r.rip:#x}")
                return None
            if self.wall_clock:
                time.sleep(max(0, nxt - self.now_ns()) / 1e9)
            else:
                cpu.native.icount = max(cpu.native.icount, nxt)
        return None

    def _fault(self, f: GuestFault) -> None:
        self._deliver(Event(f.vector, f.error_code, cr2=f.cr2))

    def _dispatch(self, ex: Exit) -> None:
        """One place that decides what each exit means."""
        cpu = self.vcpu
        if self.exit_hook is not None and self.exit_hook(ex):
            return
        try:
            if isinstance(ex, IoExit):
                self._io(ex)
            elif isinstance(ex, MmioExit):
                self._mmio(ex)
            elif isinstance(ex, ExceptionExit):
                self._deliver(Event(ex.vector, ex.error_code, software=ex.software, cr2=ex.cr2))
            elif isinstance(ex, MsrExit):
                sensitive.emulate_msr(cpu, ex, self.msrs)
            elif isinstance(ex, CrExit):
                sensitive.emulate_cr(cpu, ex, self.cpuid)
            elif isinstance(ex, TrapExit):
                if ex.kind == "iret":
                    # The IRET that ends NMI blocking; it then runs natively.
                    self.set_nmi_blocked(False)
                elif ex.kind == "invlpg":
                    sensitive.emulate_invlpg(cpu, ex.insn_len)
                elif ex.kind == "invpcid":
                    # CPUID.(EAX=7,ECX=0):EBX.INVPCID[10] is not advertised: #UD (SDM Vol. 2A INVPCID).
                    self._fault(GuestFault(x86.UD))
                else:
                    self._stop = RunResult("error", None, f"no handler for trapped {ex.kind} at rip={ex.rip:#x}")
            elif isinstance(ex, (DeadlineExit, IrqWindowExit)):
                pass
            elif isinstance(ex, ShutdownExit):
                self._stop = RunResult("shutdown", None, ex.reason)
            elif isinstance(ex, InternalErrorExit):
                self._stop = RunResult("error", None, f"{ex.message} (rip={ex.rip:#x})")
        except GuestFault as f:
            self._fault(f)

    def _io(self, ex: IoExit) -> None:
        cpu = self.vcpu
        sensitive.check_io_permission(cpu, ex.port, ex.size)
        bus = self.pio
        if ex.is_write:
            values = sensitive.io_string_values(cpu, ex) if ex.string else ex.values
            for val in values:
                if self.log.enabled("io"):
                    self.log("io", f"out port={ex.port:#06x} size={ex.size} value={val:#x}")
                self._unclaimed(bus, ex.port, "port")
                bus.write(ex.port, ex.size, val)
            sensitive.complete_io(cpu, ex)
        else:
            vals = []
            for _ in range(ex.count):
                self._unclaimed(bus, ex.port, "port")
                val = bus.read(ex.port, ex.size)
                if self.log.enabled("io"):
                    self.log("io", f"in  port={ex.port:#06x} size={ex.size} value={val:#x}")
                vals.append(val)
            sensitive.complete_io(cpu, ex, vals)

    def _mmio(self, ex: MmioExit) -> None:
        self._unclaimed(self.mmio, ex.gpa, "mmio")
        if ex.replay:
            old = self.mmio.read(ex.gpa, ex.size) if ex.needs_read else 0
            new = self.vcpu.replay_mmio(ex, old)
            if new is not None:
                self.mmio.write(ex.gpa, ex.size, new)
            if self.log.enabled("mmio"):
                self.log("mmio", f"replay {ex.insn.mnemonic} gpa={ex.gpa:#x} size={ex.size} "
                                 f"read={old:#x} write={new if new is None else hex(new)}")
            return
        if ex.is_write:
            self.mmio.write(ex.gpa, ex.size, ex.value)
            val = ex.value
        else:
            val = self.mmio.read(ex.gpa, ex.size)
        if self.log.enabled("mmio"):
            self.log("mmio", f"{'write' if ex.is_write else 'read '} gpa={ex.gpa:#x} size={ex.size} value={val:#x}")
        sensitive.complete_mmio(self.vcpu, ex, val)

    def _unclaimed(self, bus: Bus, addr: int, what: str) -> None:
        if self.log.enabled("unimp") and bus.find(addr) is None:
            self.log("unimp", f"unclaimed {what} access at {addr:#x}")


def _describe(ex: Exit) -> str:
    fields = [f"rip={ex.rip:#x}"]
    for name in getattr(ex, "__slots__", ()):
        if name in ("rip", "insn", "values") or name.startswith("_"):
            continue
        val = getattr(ex, name)
        fields.append(f"{name}={val:#x}" if isinstance(val, int) and not isinstance(val, bool) else f"{name}={val}")
    return " ".join(fields)


def format_regs(cpu: Vcpu) -> str:
    """A register dump in the spirit of QEMU's -d cpu."""
    r = cpu.regs
    names = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
             "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
    lines = []
    for i in range(0, 16, 4):
        lines.append(" ".join(f"{names[j]:<3}={r.gpr[j]:016x}" for j in range(i, i + 4)))
    lines.append(f"RIP={r.rip:016x} RFL={r.rflags:08x} CPL={r.hflags & 3} HFLAGS={r.hflags:08x}")
    for i, n in enumerate(x86.SEG_NAMES):
        s = r.seg[i]
        lines.append(f"{n.upper()} ={s.selector:04x} {s.base:016x} {s.limit:08x} {s.flags:08x}")
    lines.append(f"GDT={r.gdtr_base:016x} {r.gdtr_limit:08x} IDT={r.idtr_base:016x} {r.idtr_limit:08x}")
    lines.append(f"TR ={r.tr.selector:04x} {r.tr.base:016x} {r.tr.limit:08x} {r.tr.flags:08x}")
    lines.append(f"CR0={r.cr0:08x} CR2={r.cr2:016x} CR3={r.cr3:016x} CR4={r.cr4:08x} EFER={r.efer:016x}")
    return "\n".join(lines)

"""The virtual machine: memory, one vCPU, the platform devices, the run loop.

``Vm.run()`` is the one run loop of vmm.runloop: ``Vcpu.run()`` returns an exit
value and ``runloop.handle_exit`` decides it.  The Vm supplies the platform
side: port I/O and MMIO go to the buses where devices sit by range, MSRs to
the MSR model, control registers to emu/sensitive, events to emu/events
through one interrupt/NMI arbiter (``Vm.arbitrate``).  Virtual time is the guest's instruction count
(1 instruction = 1 ns), so a run is deterministic unless ``wall_clock`` is set.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import time
import weakref
from typing import Callable

from vmlab.devices.bus import Bus
from vmlab.devices.clock import Clock, TimerQueue
from vmlab.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from vmlab.devices.fw_cfg import FwCfg
from vmlab.devices.irq import IrqLine, line_to
from vmlab.devices.lapic import APIC_LVT_LINT0, APIC_LVT_LINT1, DM_EXTINT, DM_NMI, LVT_DELIVERY_MODE_SHIFT, LocalApic
from vmlab.devices.pic8259 import Pic8259Pair
from vmlab.devices.pit8254 import Pit8254
from vmlab.devices.acpi import SLEEP_CONTROL_PORT, SleepControl
from vmlab.devices.ioapic import IOAPIC_BASE, IoApic, IsaIrqRouter
from vmlab.devices.rtc import RTC_PORT, CmosRtc
from vmlab.devices.reset import KBC_COMMAND_PORT, RESET_CONTROL_PORT, Kbc8042Reset, ResetControl
from vmlab.devices.uart16550 import COM1_IRQ, COM1_PORT, LSR as UART_LSR, THR as UART_THR, Uart16550
from vmlab.emu import sensitive, x86
from vmlab.emu.cpu import MACHINE_TRAPS, GuestFault, Vcpu
from vmlab.emu.cpu import Closed
from vmlab.emu.errors import ClosedError, ConfigError
from vmlab.emu.cpuid import CpuidModel
from vmlab.emu.errors import UnsupportedError
from vmlab.emu.events import Event, TripleFault, deliver
from vmlab.emu.exits import CrExit, IoExit, MmioExit, MsrExit
from vmlab.emu.memory import GuestMemory
from vmlab.emu.tbcache import TbCache
from vmlab.emu.msr import IA32_APIC_BASE, IA32_TSC, MsrModel

from . import runloop
from .log import DebugLog
from .runloop import HANDLED, IDLE_LIMIT_NS, SLICE_INSNS, Outcome, RunResult, Stop, StopReason  # noqa: F401

LAPIC_BASE = 0xFEE00000
FW_CFG_PORT = 0x510
#: Trap kinds the bare machine needs on top of emu.cpu.MACHINE_TRAPS: MOV from
#: CR8 reads the LAPIC's TPR, the descriptor-table loads need checks Unicorn
#: omits, RDPMC must raise #GP rather than Unicorn's #UD (vmm.runloop).
PLATFORM_TRAPS = frozenset({"cr_read", "desc", "rdpmc"})


def _stdout_sink(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _weak(method):
    """A callback calling ``method`` (a bound method of the Vm) without keeping
    the Vm alive.  Devices hold their callbacks; a bound method there would make
    a Vm -> device -> Vm cycle, and guest RAM would stay mapped after the last
    reference to the Vm went, until the cyclic GC ran."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        m = ref()
        if m is None:
            raise ClosedError("the Vm this device belonged to no longer exists")
        return m(*args)
    return call


class _Attending:
    """A Vm attribute whose setting to a true value (a Stop, True) sets the
    vCPU's attention word (``Vm._attend``).  Only setting goes through here:
    the value lives in the instance dict under the same name, and a data
    descriptor without ``__get__`` lets reads find it there (no Python call
    on the run loop's reads)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value
        if value:
            obj._attend()


class ClosedVm(Closed):
    """A Vm after close(): every use raises ClosedError."""
    _what = "Vm"


class Vm:
    """A PC-like machine with one CPU (see module docstring)."""

    def __init__(self, ram_size: int = 64 << 20, *, serial: Callable[[bytes], object] | None = _stdout_sink,
                 cpuid: CpuidModel | None = None, wall_clock: bool = False, log: DebugLog | None = None,
                 cmdline: str = "", clock: str = "virtual", icount_shift: int = 0):
        self.mem = GuestMemory(ram_size)
        self.cpuid = cpuid or CpuidModel()
        self.vcpu = Vcpu(self.mem, cpuid=self.cpuid)
        #: sets the vCPU's attention word: the run loop's lean path looks
        #: before the next run (emu/lean.py); every source of work for the
        #: loop between runs calls it -- a stop, NMI, INIT, an interrupt line,
        #: host input
        self._attend = self.vcpu.attention_setter()
        self.msrs = MsrModel(self.vcpu, self.cpuid)
        self.log = log or DebugLog()
        # clock="host": virtual time is host time for the devices (wall_clock) and
        # for the vCPU, which then counts no instructions (Vcpu.set_clock).
        if clock not in ("virtual", "host"):
            raise ConfigError(f"unknown clock {clock!r} (virtual or host)")
        self.wall_clock = wall_clock or clock == "host"
        self._wall0 = time.monotonic_ns()
        if clock == "host":
            self.vcpu.set_clock("host", self._wall0)
        # QEMU's -icount shift=N: one instruction = 2^N ns of virtual time.
        if icount_shift and self.wall_clock:
            raise ConfigError("an icount shift needs the virtual clock (not --clock host)")
        self.vcpu.set_icount_shift(icount_shift)
        self.clock = Clock(_weak(self.now_ns))
        self.timers = TimerQueue()
        self.pio = Bus("pio", 0x10000)
        self.mmio = Bus("mmio", 1 << 64)
        self.serial_output = bytearray()
        self._serial_sink = serial

        self.pic = Pic8259Pair(IrqLine(self._attend, "intr"))
        self.pic.attach(self.pio)
        # ISA interrupt lines reach both the 8259 pair and the I/O APIC
        # (devices/ioapic.py; IRQ 0 -> pin 2, as the MADT says).
        self.ioapic = IoApic(_weak(self._on_ioapic_message))
        self.mmio.register(IOAPIC_BASE, 0x1000, self.ioapic, "ioapic")
        self.isa_irqs = IsaIrqRouter(self.pic, self.ioapic)
        self.pit = Pit8254(self.clock, self.timers, line_to(self.isa_irqs, 0))
        self.pit.attach(self.pio)
        self.uart = Uart16550(_weak(self._on_serial), line_to(self.isa_irqs, COM1_IRQ))
        self.pio.register(COM1_PORT, 8, self.uart, "uart0")
        # A polled console (read LSR, write THR: Linux's printk) is served in
        # C while the UART allows it (coalesced port I/O, emu/pio.py).
        self.uart.on_fast = _weak(self._uart_fast)
        self._uart_fast(*self.uart.fast_registers())
        self.debug_exit = DebugExit(_weak(self._on_debug_exit))
        self.pio.register(DEBUG_EXIT_PORT, 4, self.debug_exit, "isa-debug-exit")
        self.fw_cfg = FwCfg(ram_size, cmdline)
        self.pio.register(FW_CFG_PORT, 2, self.fw_cfg, "fw_cfg")
        # CMOS RTC/NVRAM on virtual time (devices/rtc.py) and the ACPI sleep
        # control register Linux powers off through (devices/acpi.py).
        self.rtc = CmosRtc(_weak(self.now_ns))
        self.pio.register(RTC_PORT, 2, self.rtc, "rtc")
        self.pio.register(SLEEP_CONTROL_PORT, 2, SleepControl(_weak(self._on_poweroff)), "acpi-sleep")
        # The reset paths (devices/reset.py): the run ends with StopReason.RESET
        # and its owner (the CLI) reboots the machine or, under -no-reboot, exits.
        self.pio.register(KBC_COMMAND_PORT, 1, Kbc8042Reset(_weak(self._on_reset)), "i8042-reset")
        self.pio.register(RESET_CONTROL_PORT, 1, ResetControl(_weak(self._on_reset)), "reset-control")
        #: warn(text): one-time notes about what the guest expected and vmlab
        #: lacks (a BIOS call); None: only the -d unimp log
        self.warn: Callable[[str], object] | None = None
        self._warned: set = set()
        self.nmi_pending = False
        #: run the next slice as one instruction (the IRET that unblocks NMIs)
        self.step_next = False
        self.nmi_blocked = False          # after an NMI until the next IRET (SDM Vol. 3A 6.7.1)
        self.init_pending = False
        self.lapic = LocalApic(self.clock, self.timers, nmi=_weak(self._on_nmi), init=_weak(self._on_init),
                               eoi_broadcast=_weak(self._on_lapic_eoi), x2apic=self.cpuid.x2apic,
                               tsc=_weak(self._tsc) if self.cpuid.tsc_deadline else None, kick=self._attend)
        self.msrs.apic = self.lapic
        self.mmio.register(LAPIC_BASE, 0x1000, self.lapic, "lapic")
        # What PC firmware leaves behind (SeaBIOS does this before any boot
        # loader runs, and vmlab has no firmware): the LAPIC in virtual-wire
        # mode, LINT0 = ExtINT (the 8259 reaches the CPU), LINT1 = NMI
        # (MP spec 1.4, 3.6.2.2; SDM Vol. 3A 11.5.1).
        self.lapic.lvt[APIC_LVT_LINT0] = DM_EXTINT << LVT_DELIVERY_MODE_SHIFT
        self.lapic.lvt[APIC_LVT_LINT1] = DM_NMI << LVT_DELIVERY_MODE_SHIFT
        self.msrs.on_write.append(_weak(self._on_msr_write))
        self.vcpu.set_traps(MACHINE_TRAPS | PLATFORM_TRAPS)
        self.tbs = TbCache(self.vcpu)
        self.log_blocks = any(self.log.enabled(i) for i in ("in_asm", "exec", "tb"))
        self.vcpu.keep_block_logs = self.log_blocks
        if self.log.enabled("exec"):
            self.tbs.set_exec_logging(True)

        self.pending_stop = None
        self.host_input: collections.deque[bytes] = collections.deque()
        self.image = None
        self.exit_count = 0
        self.event_count = 0
        #: the debugger's break-exit test (tools/debugger.py): a VM exit it
        #: matches stops the run before its handler (vmm.runloop._apply)
        self.exit_break = None
        #: the intercept policy consulted before the platform (VMX non-root
        #: operation: vmm.vmx.VmxGuest while it runs), see vmm.runloop
        self.intercept = None
        #: guest-visible VMX (enable_nested_vmx), else None
        self.nested = None

    # ------------------------------------------------------------------ life cycle
    #: True once close() has run (the instance is then a ClosedVm)
    closed = False

    def enable_nested_vmx(self, caps=None):
        """Guest-visible VMX (vmm.nested): advertise VMX in CPUID and the
        capability MSRs, and execute the guest's VMX instructions, so a
        hypervisor in the guest runs its own guests.  Returns the NestedVmx."""
        from .nested import NestedVmx
        self.cpuid.vmx = True
        self.vcpu.set_cpuid(self.cpuid)
        self.nested = NestedVmx(self, caps)
        self.msrs.read_only.update(self.nested.caps.msrs())
        self.vcpu.set_traps(set(self.vcpu.trap_kinds) | {"vmx"})
        return self.nested

    def close(self) -> None:
        """Free the machine now: the vCPU's native state and its Unicorn engine,
        then guest RAM (unmapped).  Idempotent; the Vm becomes a ClosedVm, whose
        every use raises ClosedError.  Without close(), dropping the last
        reference frees the same (no reference cycle holds the RAM)."""
        vcpu, mem = self.__dict__.get("vcpu"), self.__dict__.get("mem")
        if vcpu is not None:
            vcpu.close()            # the engine maps guest RAM: it goes first
        if mem is not None:
            mem.close()
        self.__dict__.clear()       # devices, timers, logs: nothing to keep
        self.__class__ = ClosedVm

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

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
            # The loader's GDT (emu.loaders.x86) has 32-bit code at 0x18, data at 0x10;
            # a boot protocol may name its own (Linux: __BOOT_CS 0x10, __BOOT_DS 0x18).
            cs, ds = image.selectors or (0x18 if image.gdt is not None else 0x08, 0x10)
            cpu.enter_protected32(image.entry, cs=cs, ds=ds)
        elif image.mode == "long64":
            cpu.enter_long64(image.entry, image.cr3, image.gdt)
            if image.selectors is not None:
                self._reload_selectors(*image.selectors)
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
        if image.firmware:
            self.install_firmware_tables()
        self.image = image

    def _reload_selectors(self, cs: int, ds: int) -> None:
        """The same flat 64-bit code and data segments under other selectors."""
        r = self.vcpu.regs
        segs = {x86.R_CS: (cs,) + tuple(getattr(r.seg[x86.R_CS], f) for f in ("base", "limit", "flags"))}
        for i in (0, 2, 3, 4, 5):
            segs[i] = (ds,) + tuple(getattr(r.seg[i], f) for f in ("base", "limit", "flags"))
        self.vcpu.load_segments(segs)

    def install_firmware_tables(self) -> None:
        """Write the ACPI tables (devices.acpi) describing this machine into the
        BIOS area, where the loader told the kernel the RSDP is."""
        from vmlab.devices.acpi import build_tables
        from vmlab.emu.loaders.linux import ACPI_AREA
        from vmlab.vmm.virtio_slots import transports
        virtio = [(t.base, t.irq_number) for t in transports(self)]
        blob = build_tables(ACPI_AREA[0], virtio=virtio)
        if len(blob) > ACPI_AREA[1] - ACPI_AREA[0]:
            raise ConfigError("ACPI tables do not fit the BIOS area")
        if ACPI_AREA[1] <= self.mem.size:
            self.mem.write(ACPI_AREA[0], blob)

    # ------------------------------------------------------------------ devices
    def _on_serial(self, data: bytes) -> None:
        self.serial_output += data
        if self._serial_sink is not None:
            self._serial_sink(data)

    def _uart_fast(self, lsr: int | None, thr: bool) -> None:
        self.vcpu.fast_port(COM1_PORT + UART_LSR, read_value=lsr)
        self.vcpu.fast_port(COM1_PORT + UART_THR, write=thr)

    def take_queued_io(self) -> None:
        """The OUTs the vCPU queued (coalesced port I/O) to the port bus, in order."""
        bus = self.pio
        for port, byte in self.vcpu.take_queued_io():
            bus.write(port, 1, byte)

    def _on_debug_exit(self, status: int) -> None:
        self.pending_stop = Stop(StopReason.DEBUG_EXIT, f"guest wrote to the debug-exit port (status {status})",
                                 status)

    def _on_reset(self, why: str) -> None:
        self.pending_stop = Stop(StopReason.RESET, f"the guest reset the machine: {why}")

    def _on_poweroff(self, why: str) -> None:
        self.pending_stop = Stop(StopReason.POWEROFF, f"the guest powered the machine off: {why}")

    def _on_ioapic_message(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None:
        """An I/O APIC interrupt message to the one local APIC: fixed and
        lowest-priority (SDM Vol. 3A 11.6.2) to its IRR when it is a
        destination (dest 0xFF: broadcast), NMI and INIT to the CPU; SMI and
        ExtINT (the 8259 path) are not delivered here."""
        lapic = self.lapic
        if not lapic.hw_enabled or not (dest == 0xFF or lapic._is_destination(dest, logical)):
            return
        if mode in (0, 1):
            lapic.deliver(vector, level)
        elif mode == 4:
            self._on_nmi()
        elif mode == 5:
            self._on_init()

    def _on_lapic_eoi(self, vector: int) -> None:
        self.ioapic.eoi(vector)

    def _on_nmi(self) -> None:
        self.nmi_pending = True

    def _on_init(self) -> None:
        self.init_pending = True

    def _tsc(self) -> int:
        """The guest's TSC now (RDTSC's value; the LAPIC's TSC-deadline mode)."""
        return self.msrs.read(IA32_TSC)

    def _on_msr_write(self, msr: int, value: int) -> None:
        if msr == IA32_APIC_BASE:
            self._set_apic_base(value)

    def _set_apic_base(self, value: int) -> None:
        """IA32_APIC_BASE written: move or hide the LAPIC page.  SDM Vol. 3A
        11.4.3: "When IA32_APIC_BASE[11] is 0, the processor is functionally
        equivalent to an IA-32 processor without an on-chip APIC.  The CPUID
        feature flag for the APIC (see Section 11.4.2) is also set to 0" -- the
        register page stops answering and CPUID.1:EDX.APIC[9] reads 0."""
        lapic = self.lapic
        # The page answers in xAPIC mode only: x2APIC mode disables the
        # memory-mapped interface (SDM Vol. 3A 11.12.1.2).
        old_mapped, old_base = lapic.hw_enabled and not lapic.x2apic_mode, lapic.base_address
        base = lapic.write_base_msr(value)
        mapped = lapic.hw_enabled and not lapic.x2apic_mode
        if mapped == old_mapped and base == old_base and lapic.hw_enabled == self.cpuid.apic:
            return
        if old_mapped:
            self.mmio.unregister(lapic)
        if mapped:
            self.mmio.register(base, 0x1000, lapic, "lapic")
        if lapic.hw_enabled != self.cpuid.apic:
            self.cpuid = dataclasses.replace(self.cpuid, apic=lapic.hw_enabled)
            self.vcpu.set_cpuid(self.cpuid)

    def post_input(self, data: bytes) -> None:
        """Queue host input for the UART (thread-safe; fed at the next exit)."""
        self.host_input.append(bytes(data))
        self._attend()

    def feed_input(self) -> None:
        """Move queued host input into the UART, no more than its receiver has
        room for: the rest waits until the guest drains it (a terminal's typed
        line must not overrun a 16-byte FIFO, or a 1-byte RBR)."""
        q, uart = self.host_input, self.uart
        while q:
            room = uart.rx_room()
            if room <= 0:
                return
            chunk = q.popleft()
            if len(chunk) > room:
                q.appendleft(chunk[room:])
                chunk = chunk[:room]
            uart.feed(chunk)

    #: What the run loop must look at before the next run: setting one to a
    #: true value sets the attention word (the lean path runs on until it is
    #: set, vmm/runloop.py).  ``pending_stop`` is set by a device (debug-exit,
    #: reset, power-off) or Vm.stop(), and the run loop ends with it.
    pending_stop = _Attending()
    nmi_pending = _Attending()
    init_pending = _Attending()

    def stop(self, message: str = "stopped") -> None:
        self.pending_stop = Stop(StopReason.STOPPED, message)

    # ------------------------------------------------------------------ interrupts
    def set_nmi_blocked(self, blocked: bool) -> None:
        """Block NMIs until the next IRET, which is then trapped to unblock them."""
        if blocked != self.nmi_blocked:
            self.nmi_blocked = blocked
            kinds = set(self.vcpu.trap_kinds)
            kinds = kinds | {"iret"} if blocked else kinds - {"iret"}
            self.vcpu.set_traps(kinds)

    def pending_interrupt(self) -> str | None:
        """The arbiter's view of the interrupt lines: "nmi" (unless blocked),
        "lapic", "pic" (through LINT0 in ExtINT mode) or None, in priority
        order (SDM Vol. 3A 6.9: NMI above maskable interrupts).  Checked at
        every exit, so the common "nothing pending" answer reads two fields."""
        if self.nmi_pending and not self.nmi_blocked:
            return "nmi"
        lapic = self.lapic
        if lapic.irr and lapic.pending_vector() is not None:
            return "lapic"
        if self.pic.master.int_output and lapic.accepts_pic_interrupts():
            return "pic"
        return None

    def acknowledge_interrupt(self, src: str) -> int:
        """INTA: take the vector of a maskable interrupt from its controller."""
        if src == "lapic":
            vector = self.lapic.pending_vector()
            self.lapic.acknowledge(vector)
            return vector
        return self.pic.acknowledge()

    def arbitrate(self) -> Outcome | None:
        """The one interrupt/NMI arbiter, consulted between instructions: INIT,
        then the intercept policy's own events (VMX windows, preemption timer,
        external-interrupt and NMI exiting), then delivery of a pending NMI or
        maskable interrupt if the CPU can take it now.  Otherwise it asks the
        native side to stop at the next interrupt window."""
        policy = self.intercept
        if self.step_next:
            # The IRET that unblocked NMIs runs first (one-instruction step):
            # an event pending now is taken after it (SDM Vol. 3A 6.7.1).
            return None
        src = self.pending_interrupt()
        if policy is not None:
            # INIT always exits in non-root operation (SDM 26.2), so the policy
            # sees it first.
            out = policy.events(src)
            if out is not None:
                return out
        if self.init_pending:
            return self._take_init()
        v = self.vcpu._v
        if src is None:
            if policy is None or not policy.wants_irq_window:
                v.irq_window = 0
            return None
        if src == "nmi":
            # NMIs ignore RFLAGS.IF; further NMIs are blocked until the next IRET
            # (SDM Vol. 3A 6.7.1).
            self.nmi_pending = False
            out = self.deliver(Event(x86.NMI, external=True))
            self.set_nmi_blocked(True)
            return out
        r = self.vcpu.regs
        if not (r.rflags & x86.RFLAGS_IF) or (r.hflags & x86.HF_INHIBIT_IRQ):
            v.irq_window = 1
            return None
        v.irq_window = 0
        return self.deliver(Event(self.acknowledge_interrupt(src), external=True))

    def _take_init(self) -> Outcome:
        """INIT outside VMX: the CPU resets and, being the only one, waits for a
        SIPI that never comes (SDM Vol. 3A 10.4.2) -- the machine stops."""
        self.init_pending = False
        self.vcpu.reset()
        return Stop(StopReason.HALTED, "INIT: the CPU is in wait-for-SIPI")

    def deliver(self, ev: Event) -> Outcome:
        """Deliver an event to the guest: through the intercept policy under VMX
        (the exception bitmap sees faults raised on the way), else directly.
        A triple fault shuts the machine down."""
        self.event_count += 1
        if self.log.enabled("int"):
            r = self.vcpu.regs
            name = x86.EXCEPTION_NAMES.get(ev.vector, "") if not ev.external else "irq"
            ec = f" e={ev.error_code:#06x}" if ev.error_code is not None else ""
            cr2 = f" cr2={ev.cr2:#x}" if ev.cr2 is not None else ""
            self.log("int", f"{self.event_count}: v={ev.vector:#04x} {name}{ec}{cr2} "
                            f"cpl={self.vcpu.cpl} cs:rip={r.seg[x86.R_CS].selector:04x}:{r.rip:#x} "
                            f"rsp={r.gpr[4]:#x} {'sw' if ev.software else 'ext' if ev.external else 'hw'}")
        if self.intercept is not None:
            return self.intercept.deliver(ev)
        if ev.software and not (self.vcpu.regs.cr0 & x86.CR0_PE):
            self._check_bios_call(ev.vector)
        try:
            deliver(self.vcpu, ev)
        except TripleFault as exc:
            return Stop(StopReason.SHUTDOWN, f"triple fault: {exc}")
        except UnsupportedError as exc:
            return Stop(StopReason.ERROR, str(exc))
        return HANDLED

    # ------------------------------------------------------------------ the run loop
    def run(self, max_insns: int | None = None, timeout: float | None = None, step: bool = False) -> RunResult:
        """Run until the guest exits, halts for good, faults fatally, or a limit
        hits (the one loop: vmm.runloop.run).  ``step``: one instruction, then
        StopReason.STEP (the debugger's stepi)."""
        return runloop.run(self, max_insns, timeout, one_step=step)

    def flush_block_logs(self) -> None:
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

    def format_regs(self) -> str:
        return format_regs(self.vcpu)

    # ------------------------------------------------------------------ platform handling of exits
    def msr_access(self, ex: MsrExit) -> None:
        sensitive.emulate_msr(self.vcpu, ex, self.msrs)

    def cr_access(self, ex: CrExit) -> None:
        if ex.cr == 8 and ex.access_type in (0, 1):
            self._cr8_access(ex)
            return
        nested = self.nested
        if nested is not None and nested.vmxon is not None and ex.access_type == 0 and ex.cr in (0, 4):
            # In VMX operation the CR0/CR4 fixed bits hold (vmm.nested, SDM Vol. 3C 24.8).
            value = ex.value if self.vcpu.mode_bits == 64 else ex.value & 0xFFFFFFFF
            if not nested.cr_value_supported(ex.cr, value):
                raise GuestFault(x86.GP, 0)
        sensitive.emulate_cr(self.vcpu, ex, self.cpuid)

    def _cr8_access(self, ex: CrExit) -> None:
        """MOV to/from CR8 is the LAPIC's TPR (SDM Vol. 3A 11.8.6.1, Interaction
        of Task Priorities between CR8 and APIC): a write puts CR8[3:0] in
        TPR[7:4] and clears TPR[3:0], a read returns TPR[7:4]; CR8 bits 63:4
        are reserved, #GP(0) (SDM Vol. 2B, MOV—Move to/from Control Registers)."""
        cpu = self.vcpu
        if cpu.cpl != 0:
            raise GuestFault(x86.GP, 0)
        if ex.access_type == 0:
            if ex.value >> 4:
                raise GuestFault(x86.GP, 0)
            self.lapic.tpr = (ex.value & 0xF) << 4
            cpu.write_cr(8, ex.value & 0xF)
        else:
            cpu.set_gpr(ex.gpr, self.lapic.tpr >> 4, 8)
        cpu.skip(ex.insn_len)

    def port_io(self, ex: IoExit) -> None:
        """IN/OUT/INS/OUTS to the port-I/O bus (after the TSS I/O-permission check)."""
        cpu = self.vcpu
        sensitive.check_io_permission(cpu, ex.port, ex.size)
        bus = self.pio
        log_io = self.log.enabled("io")
        if ex.is_write:
            values = sensitive.io_string_values(cpu, ex) if ex.string else ex.values
            for val in values:
                if log_io:
                    self.log("io", f"out port={ex.port:#06x} size={ex.size} value={val:#x}")
                    self._unclaimed(bus, ex.port, "port")
                bus.write(ex.port, ex.size, val)
            sensitive.complete_io(cpu, ex)
        else:
            vals = []
            for _ in range(ex.count):
                val = bus.read(ex.port, ex.size)
                if log_io:
                    self._unclaimed(bus, ex.port, "port")
                    self.log("io", f"in  port={ex.port:#06x} size={ex.size} value={val:#x}")
                vals.append(val)
            sensitive.complete_io(cpu, ex, vals)

    def mmio_access(self, ex: MmioExit) -> None:
        """A load/store outside RAM: to the MMIO bus, completing the instruction."""
        if ex.string or ex.implicit:
            self._mmio_special(ex)
            return
        self._unclaimed(self.mmio, ex.gpa, "mmio")
        self._open_bus(ex.gpa, ex.is_write)
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

    #: BIOS services tutorial boot sectors call (Ralf Brown's Interrupt List)
    BIOS_SERVICES = {0x10: "video", 0x11: "equipment list", 0x12: "memory size", 0x13: "disk",
                     0x14: "serial", 0x15: "system services", 0x16: "keyboard", 0x19: "bootstrap",
                     0x1A: "time of day"}

    def _check_bios_call(self, vector: int) -> None:
        """A real-mode INT n to a BIOS service whose IVT entry is 0000:0000
        (vmlab has no BIOS): say so once, rather than let the guest run off
        into address 0 in silence."""
        what = self.BIOS_SERVICES.get(vector)
        if what is None or vector in self._warned:
            return
        try:
            entry = self.mem.read_u32(vector * 4)
        except Exception:          # RAM always covers the IVT; never fail a delivery on it
            return
        if entry:
            return
        self._warned.add(vector)
        r = self.vcpu.regs
        text = (f"the guest called int {vector:#04x} (BIOS {what}) at {r.seg[x86.R_CS].selector:04x}:"
                f"{(r.rip - 2) & 0xFFFF:04x}, but vmlab has no BIOS (the IVT entry is 0000:0000)")
        self.log("unimp", text)
        if self.warn is not None:
            self.warn(text)

    def _mmio_special(self, ex: MmioExit) -> None:
        """String instructions and implicit accesses outside RAM (emu.strmmio):
        the former element by element through the MMIO bus (unclaimed
        addresses read all ones and drop writes), the latter replayed with the
        page as open bus."""
        from vmlab.emu import strmmio
        if ex.implicit:
            if self.log.enabled("guest_errors") or self.log.enabled("unimp"):
                self.log("guest_errors" if self.log.enabled("guest_errors") else "unimp",
                         f"{ex.insn.mnemonic} {ex.insn.op_str} at rip={ex.rip:#x}: implicit access to "
                         f"unbacked memory page {ex.gpa:#x} (open bus: reads all ones, writes dropped)")
            strmmio.replay_open_bus(self.vcpu, ex.gla, ex.insn_len)
            return
        bus, log = self.mmio, self.log
        logging = log.enabled("mmio") or log.enabled("guest_errors") or log.enabled("unimp")

        def rd(gpa: int, size: int) -> int:
            val = bus.read(gpa, size)
            if logging:
                self._unclaimed(bus, gpa, "mmio")
                self._open_bus(gpa, False)
                log("mmio", f"read  gpa={gpa:#x} size={size} value={val:#x} ({ex.insn.mnemonic})")
            return val

        def wr(gpa: int, size: int, val: int) -> None:
            if logging:
                self._unclaimed(bus, gpa, "mmio")
                self._open_bus(gpa, True)
                log("mmio", f"write gpa={gpa:#x} size={size} value={val:#x} ({ex.insn.mnemonic})")
            bus.write(gpa, size, val)
        strmmio.emulate_string(self.vcpu, ex.insn, rd, wr)

    def _open_bus(self, gpa: int, is_write: bool) -> None:
        """-d guest_errors: an access to physical memory nothing backs."""
        if self.log.enabled("guest_errors") and self.mmio.find(gpa) is None:
            self.log("guest_errors", f"{'write to' if is_write else 'read from'} unbacked memory at "
                                     f"{gpa:#x} (open bus: {'dropped' if is_write else 'all ones'})")

    def _unclaimed(self, bus: Bus, addr: int, what: str) -> None:
        if self.log.enabled("unimp") and bus.find(addr) is None:
            self.log("unimp", f"unclaimed {what} access at {addr:#x}")


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

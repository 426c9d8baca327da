"""Local APIC (xAPIC mode) of a single-processor machine, as an MMIO device.

Reference: Intel SDM Vol. 3A, chapter 11 "Advanced Programmable Interrupt
Controller (APIC)" (section numbers below are that chapter's); QEMU
hw/intc/apic.c and apic_common.c for behaviour guests are tested against.

Register page: 4 KiB at IA32_APIC_BASE (default 0xFEE00000), registers at
the offsets of Table 11-1. Every register is 32 bits wide on a 16-byte
boundary (SDM 11.4.1: "All registers must be accessed using 128-bit aligned
32-bit loads or stores"). Sanity rules for everything else, none of which
raises:

* reads/writes smaller than 4 bytes read 0 and are ignored (like QEMU);
* accesses not at a 16-byte boundary read 0 and are ignored;
* wider accesses at a register's offset use the low 32 bits (bytes 4-15 of a
  register slot are reserved and read 0);
* reserved offsets below 0x400 read 0, ignore writes and set ESR bit 7
  "Illegal Register Address" (SDM 11.5.3); writes to read-only registers
  are ignored.

Version register: 0x00060014. 0x14 is QEMU's (integrated APIC, P4 class);
bits 23:16 "Max LVT Entry" are the number of LVT entries minus one (SDM
11.4.8), and this model implements seven (CMCI, timer, thermal, perf, LINT0,
LINT1, error), where QEMU implements six and reports 5.

Timer (SDM 11.5.4): virtual time with a 1 GHz APIC bus clock like QEMU, so
one tick is 1 ns before the divider. One-shot and periodic modes. The
TSC-deadline mode is not offered (CPUID.01H:ECX[24] is for the CPU model to
clear): LVT timer bit 18 is treated as reserved and reads 0.

Interrupt delivery to the CPU: :meth:`LocalApic.pending_vector` and
:meth:`LocalApic.acknowledge`. Interrupts reach IRR from the timer and other
LVT entries, from :meth:`LocalApic.set_lint` (LINT0/LINT1 pins), from
self-IPIs through the ICR, and from :meth:`LocalApic.deliver` (for an I/O
APIC or MSIs). With one CPU, IPIs to other APICs go nowhere.

x2APIC is not supported: IA32_APIC_BASE.EXTD (bit 10) is ignored.
"""

from __future__ import annotations

from typing import Callable

from vmlab.devices.clock import Clock, TimerQueue

APIC_DEFAULT_BASE = 0xFEE00000
APIC_PAGE_SIZE = 0x1000
APIC_VERSION = 0x00060014

# Register offsets (SDM Table 11-1).
APIC_ID = 0x020
APIC_LVR = 0x030
APIC_TPR = 0x080
APIC_APR = 0x090
APIC_PPR = 0x0A0
APIC_EOI = 0x0B0
APIC_RRD = 0x0C0
APIC_LDR = 0x0D0
APIC_DFR = 0x0E0
APIC_SVR = 0x0F0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVT_CMCI = 0x2F0
APIC_ICR_LOW = 0x300
APIC_ICR_HIGH = 0x310
APIC_LVT_TIMER = 0x320
APIC_LVT_THERMAL = 0x330
APIC_LVT_PERF = 0x340
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_LVT_ERROR = 0x370
APIC_TIMER_ICR = 0x380
APIC_TIMER_CCR = 0x390
APIC_TIMER_DCR = 0x3E0
APIC_REGISTER_SPACE = 0x400

# IA32_APIC_BASE MSR (SDM 11.4.4, Figure 11-5).
MSR_IA32_APIC_BASE = 0x1B
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51 (MAXPHYADDR <= 52)

# Spurious-interrupt vector register (SDM 11.9, Figure 11-23).
SVR_VECTOR = 0xFF
SVR_APIC_ENABLE = 1 << 8
SVR_FOCUS_DISABLE = 1 << 9
SVR_WRITABLE = SVR_VECTOR | SVR_APIC_ENABLE | SVR_FOCUS_DISABLE

# LVT fields (SDM 11.5.1, Figure 11-8).
LVT_VECTOR = 0xFF
LVT_DELIVERY_MODE_SHIFT = 8
LVT_DELIVERY_STATUS = 1 << 12
LVT_POLARITY = 1 << 13
LVT_REMOTE_IRR = 1 << 14
LVT_LEVEL_TRIGGER = 1 << 15
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17
LVT_TIMER_TSC_DEADLINE = 1 << 18
LVT_RESET = LVT_MASKED

DM_FIXED = 0b000
DM_LOWEST = 0b001
DM_SMI = 0b010
DM_NMI = 0b100
DM_INIT = 0b101
DM_STARTUP = 0b110
DM_EXTINT = 0b111

# Writable bits per LVT register (Figure 11-8; delivery status and remote
# IRR are read-only).
_LVT_WRITABLE = {
    APIC_LVT_CMCI: 0x000107FF,
    APIC_LVT_TIMER: 0x000300FF,
    APIC_LVT_THERMAL: 0x000107FF,
    APIC_LVT_PERF: 0x000107FF,
    APIC_LVT_LINT0: 0x0001A7FF,
    APIC_LVT_LINT1: 0x0001A7FF,
    APIC_LVT_ERROR: 0x000100FF,
}

# ESR bits (SDM 11.5.3, Figure 11-9).
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# ICR (SDM 11.6.1, Figure 11-12).
ICR_LOW_WRITABLE = 0x000CCFFF
ICR_HIGH_WRITABLE = 0xFF000000
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
SH_NONE, SH_SELF, SH_ALL_INCLUDING_SELF, SH_ALL_EXCLUDING_SELF = 0, 1, 2, 3

DFR_FLAT = 0xF
DFR_CLUSTER = 0x0

DCR_WRITABLE = 0xB  # bits 0, 1 and 3 (SDM Figure 11-10)
APIC_BUS_HZ = 1_000_000_000


def _divisor(dcr: int) -> int:
    """Timer divide value from DCR bits 3,1,0 (SDM Figure 11-10)."""
    code = ((dcr >> 1) & 4) | (dcr & 3)
    return 1 if code == 7 else 2 << code


class LocalApic:
    """xAPIC register model with timer, self-IPIs and priority logic.

    ``nmi`` (optional) is called when an NMI is delivered through an LVT
    entry or a self-IPI. ``eoi_broadcast(vector)`` (optional) is called on
    EOI of a level-triggered vector, for an I/O APIC.
    """

    def __init__(self, clock: Clock, timers: TimerQueue, apic_id: int = 0,
                 nmi: Callable[[], None] | None = None,
                 eoi_broadcast: Callable[[int], None] | None = None,
                 init: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._timer = timers.timer(self._on_timer, "lapic-timer")
        self._nmi = nmi
        self._eoi_broadcast = eoi_broadcast
        self._init = init
        self.initial_apic_id = apic_id & 0xFF
        self.base_msr = APIC_DEFAULT_BASE | APIC_BASE_BSP | APIC_BASE_ENABLE
        self.reset()

    def reset(self) -> None:
        """Power-up/INIT state of the registers (SDM 11.4.7.1)."""
        self.id = self.initial_apic_id
        self.tpr = 0
        self.ldr = 0
        self.dfr_model = DFR_FLAT
        self.svr = 0xFF
        self.irr = 0          # 256-bit bitmaps
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr_low = 0
        self.icr_high = 0
        self.lvt = {reg: LVT_RESET for reg in _LVT_WRITABLE}
        self._lint_levels = [False, False]
        self.timer_initial = 0
        self.dcr = 0
        self._timer_start = 0
        self._timer_running = False
        self._timer.cancel()

    # -- enable state -------------------------------------------------------

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE[11], the global enable (SDM 11.4.3)."""
        return bool(self.base_msr & APIC_BASE_ENABLE)

    @property
    def software_enabled(self) -> bool:
        """SVR bit 8, the software enable (SDM 11.4.7.2)."""
        return bool(self.svr & SVR_APIC_ENABLE)

    @property
    def base_address(self) -> int:
        """Physical address of the register page."""
        return self.base_msr & APIC_BASE_ADDR_MASK

    def read_base_msr(self) -> int:
        """RDMSR IA32_APIC_BASE."""
        return self.base_msr

    def write_base_msr(self, value: int) -> int:
        """WRMSR IA32_APIC_BASE; return the (possibly moved) page address.

        BSP is read-only and EXTD is ignored (no x2APIC). Clearing the global
        enable resets the APIC to its power-up register state (SDM 11.4.3).
        Raising #GP for reserved bits is the CPU model's job; they are
        dropped here. The VMM moves the MMIO registration when the returned
        address changes.
        """
        was_enabled = self.hw_enabled
        self.base_msr = ((value & (APIC_BASE_ADDR_MASK | APIC_BASE_ENABLE))
                         | (self.base_msr & APIC_BASE_BSP))
        if was_enabled and not self.hw_enabled:
            self.reset()
        return self.base_address

    # -- priorities (SDM 11.8.3.1) ------------------------------------------

    @staticmethod
    def _highest(bitmap: int) -> int:
        return bitmap.bit_length() - 1

    @property
    def ppr(self) -> int:
        """Processor priority: TPR, or the highest in-service class."""
        isrv = max(self._highest(self.isr), 0)
        if (self.tpr >> 4) >= (isrv >> 4):
            return self.tpr
        return isrv & 0xF0

    def pending_vector(self) -> int | None:
        """Vector the APIC would interrupt the CPU with now, or None.

        The highest IRR vector is delivered when its priority class exceeds
        PPR[7:4] (SDM 11.8.3.1); nothing is delivered while the APIC is
        globally or software disabled.
        """
        if not (self.hw_enabled and self.software_enabled) or not self.irr:
            return None
        vector = self._highest(self.irr)
        if (vector >> 4) > (self.ppr >> 4):
            return vector
        return None

    def acknowledge(self, vector: int) -> None:
        """INTA for ``vector``: move it from IRR to ISR (SDM 11.8.4)."""
        bit = 1 << (vector & 0xFF)
        if self.irr & bit:
            self.irr &= ~bit
            self.isr |= bit

    def _eoi(self) -> None:
        vector = self._highest(self.isr)
        if vector < 0:
            return
        self.isr &= ~(1 << vector)
        if self.tmr & (1 << vector) and self._eoi_broadcast is not None:
            self._eoi_broadcast(vector)

    # -- interrupt acceptance -------------------------------------------------

    def deliver(self, vector: int, level_triggered: bool = False) -> None:
        """Accept a fixed interrupt (I/O APIC, MSI, LVT, self-IPI).

        Vectors 0-15 are illegal (SDM 11.5.2): they set ESR "Received
        Illegal Vector" instead of IRR.
        """
        vector &= 0xFF
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        bit = 1 << vector
        self.irr |= bit
        if level_triggered:
            self.tmr |= bit
        else:
            self.tmr &= ~bit

    def _local_deliver(self, reg: int) -> None:
        """Signal the interrupt of an LVT entry (SDM 11.5.1)."""
        lvt = self.lvt[reg]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> LVT_DELIVERY_MODE_SHIFT) & 7
        if reg in (APIC_LVT_TIMER, APIC_LVT_ERROR):
            mode = DM_FIXED  # these entries have no delivery mode field
        if mode == DM_FIXED:
            level = (reg in (APIC_LVT_LINT0, APIC_LVT_LINT1)
                     and bool(lvt & LVT_LEVEL_TRIGGER))
            self.deliver(lvt & LVT_VECTOR, level)
        elif mode == DM_NMI and self._nmi is not None:
            self._nmi()
        # SMI, INIT and ExtINT: ExtINT is the VMM's business (see
        # accepts_pic_interrupts); SMI and INIT are not modelled.

    def _error(self, bits: int) -> None:
        """Record an error and raise the LVT error interrupt (SDM 11.5.3)."""
        new = bits & ~self._esr_pending
        self._esr_pending |= bits
        if new:
            # Vectors < 16 in the error LVT must not recurse forever.
            lvt = self.lvt[APIC_LVT_ERROR]
            if not lvt & LVT_MASKED and (lvt & LVT_VECTOR) >= 16:
                self._local_deliver(APIC_LVT_ERROR)

    def set_lint(self, pin: int, level: bool) -> None:
        """Drive the LINT0 (pin 0) or LINT1 (pin 1) input.

        Fixed and NMI entries are delivered on the rising edge, or for a
        level-triggered fixed entry whenever the pin is high; ExtINT on LINT0
        is handled by the VMM through :meth:`accepts_pic_interrupts`.
        """
        reg = APIC_LVT_LINT0 if pin == 0 else APIC_LVT_LINT1
        old = self._lint_levels[pin & 1]
        self._lint_levels[pin & 1] = bool(level)
        if level and (not old or self.lvt[reg] & LVT_LEVEL_TRIGGER):
            self._local_deliver(reg)

    def accepts_pic_interrupts(self) -> bool:
        """True when the 8259's INTR reaches the CPU (virtual wire mode).

        That is the case when the APIC is globally disabled, or LINT0 is
        unmasked with ExtINT delivery (SDM 11.5.1; QEMU
        apic_accept_pic_intr also lets it through whenever LINT0 is unmasked).
        """
        if not self.hw_enabled:
            return True
        lvt0 = self.lvt[APIC_LVT_LINT0]
        return not lvt0 & LVT_MASKED and \
            (lvt0 >> LVT_DELIVERY_MODE_SHIFT) & 7 == DM_EXTINT

    # -- IPIs (SDM 11.6) ------------------------------------------------------

    def _is_destination(self, dest: int, logical: bool) -> bool:
        if not logical:
            return dest == 0xFF or dest == self.id
        if self.dfr_model == DFR_FLAT:
            return bool(dest & self.ldr)
        if self.dfr_model == DFR_CLUSTER:
            return (dest >> 4) == (self.ldr >> 4) and bool(dest & self.ldr & 0xF)
        return False

    def _send_ipi(self) -> None:
        low = self.icr_low
        vector = low & 0xFF
        mode = (low >> LVT_DELIVERY_MODE_SHIFT) & 7
        shorthand = (low >> ICR_SHORTHAND_SHIFT) & 3
        if shorthand == SH_NONE:
            to_self = self._is_destination(self.icr_high >> 24,
                                           bool(low & ICR_DEST_LOGICAL))
        else:
            to_self = shorthand in (SH_SELF, SH_ALL_INCLUDING_SELF)
        if mode in (DM_FIXED, DM_LOWEST):
            if vector < 16:
                self._error(ESR_SEND_ILLEGAL_VECTOR)
                return
            if to_self:
                self.deliver(vector, bool(low & ICR_TRIGGER_LEVEL))
        elif mode == DM_NMI and to_self and self._nmi is not None:
            self._nmi()
        elif (mode == DM_INIT and shorthand == SH_NONE and to_self and low & ICR_LEVEL_ASSERT
              and self._init is not None):
            # An INIT addressed to this APIC by its ID (the "Self" shorthand is for
            # fixed delivery only); INIT level de-assert is ignored (SDM 11.6.1).
            self._init()
        # SMI, STARTUP: there are no other processors to reach.

    # -- timer (SDM 11.5.4) ---------------------------------------------------

    @property
    def _timer_periodic(self) -> bool:
        return bool(self.lvt[APIC_LVT_TIMER] & LVT_TIMER_PERIODIC)

    def _timer_ticks(self, now: int) -> int:
        return (now - self._timer_start) // _divisor(self.dcr)

    def current_count(self) -> int:
        """Current-count register value at the clock's current time."""
        if not self._timer_running or self.timer_initial == 0:
            return 0
        ticks = self._timer_ticks(self._clock.now_ns())
        if self._timer_periodic:
            return self.timer_initial - ticks % self.timer_initial
        if ticks >= self.timer_initial:
            return 0
        return self.timer_initial - ticks

    def _arm_timer(self, now: int) -> None:
        """Arm the host timer for the next zero crossing after ``now``."""
        if not self._timer_running:
            self._timer.cancel()
            return
        div = _divisor(self.dcr)
        ticks = self._timer_ticks(now)
        if self._timer_periodic:
            periods = ticks // self.timer_initial + 1
        elif ticks < self.timer_initial:
            periods = 1
        else:
            self._timer_running = False
            self._timer.cancel()
            return
        self._timer.arm(self._timer_start + periods * self.timer_initial * div)

    def _on_timer(self, deadline: int) -> None:
        now = max(self._clock.now_ns(), deadline)
        self._local_deliver(APIC_LVT_TIMER)
        if not self._timer_periodic:
            self._timer_running = False
        self._arm_timer(now)

    def _write_initial_count(self, value: int) -> None:
        now = self._clock.now_ns()
        self.timer_initial = value
        self._timer_start = now
        # "A write of 0 to the initial-count register effectively stops the
        # local APIC timer, in both one-shot and periodic mode."
        self._timer_running = value != 0
        self._arm_timer(now)

    def _write_dcr(self, value: int) -> None:
        now = self._clock.now_ns()
        if self._timer_running:
            # Keep the current count; only the rate changes from here on.
            ticks = self._timer_ticks(now)
            self.dcr = value & DCR_WRITABLE
            self._timer_start = now - ticks * _divisor(self.dcr)
            self._arm_timer(now)
        else:
            self.dcr = value & DCR_WRITABLE

    # -- register file --------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """MMIO read (see the module docstring for odd sizes/offsets)."""
        if size < 4 or offset & 0xF:
            return 0
        return self.read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """MMIO write (see the module docstring for odd sizes/offsets)."""
        if size < 4 or offset & 0xF:
            return
        self.write_register(offset, value & 0xFFFFFFFF)

    def read_register(self, offset: int) -> int:
        """Read the 32-bit register at 16-byte aligned ``offset``."""
        if offset == APIC_ID:
            return self.id << 24
        if offset == APIC_LVR:
            return APIC_VERSION
        if offset == APIC_TPR:
            return self.tpr
        if offset in (APIC_APR, APIC_EOI, APIC_RRD):
            return 0  # APR: arbitration not modelled; EOI is write-only
        if offset == APIC_PPR:
            return self.ppr
        if offset == APIC_LDR:
            return self.ldr << 24
        if offset == APIC_DFR:
            return (self.dfr_model << 28) | 0x0FFFFFFF
        if offset == APIC_SVR:
            return self.svr
        if APIC_ISR <= offset < APIC_ESR:
            bank, index = divmod(offset - APIC_ISR, 0x80)
            bitmap = (self.isr, self.tmr, self.irr)[bank]
            return (bitmap >> (32 * (index >> 4))) & 0xFFFFFFFF
        if offset == APIC_ESR:
            return self.esr
        if offset in self.lvt:
            return self.lvt[offset]
        if offset == APIC_ICR_LOW:
            return self.icr_low  # delivery status (bit 12) is always idle
        if offset == APIC_ICR_HIGH:
            return self.icr_high
        if offset == APIC_TIMER_ICR:
            return self.timer_initial
        if offset == APIC_TIMER_CCR:
            return self.current_count()
        if offset == APIC_TIMER_DCR:
            return self.dcr
        if offset < APIC_REGISTER_SPACE:
            self._error(ESR_ILLEGAL_REGISTER)
        return 0

    def write_register(self, offset: int, value: int) -> None:
        """Write the 32-bit register at 16-byte aligned ``offset``."""
        if offset == APIC_ID:
            self.id = value >> 24
        elif offset == APIC_TPR:
            self.tpr = value & 0xFF
        elif offset == APIC_EOI:
            self._eoi()
        elif offset == APIC_LDR:
            self.ldr = value >> 24
        elif offset == APIC_DFR:
            self.dfr_model = value >> 28
        elif offset == APIC_SVR:
            self._write_svr(value)
        elif offset == APIC_ESR:
            # Write-to-update: latch the errors seen since the last write.
            self.esr = self._esr_pending
            self._esr_pending = 0
        elif offset in self.lvt:
            self._write_lvt(offset, value)
        elif offset == APIC_ICR_LOW:
            self.icr_low = value & ICR_LOW_WRITABLE
            self._send_ipi()
        elif offset == APIC_ICR_HIGH:
            self.icr_high = value & ICR_HIGH_WRITABLE
        elif offset == APIC_TIMER_ICR:
            self._write_initial_count(value)
        elif offset == APIC_TIMER_DCR:
            self._write_dcr(value)
        elif offset in (APIC_LVR, APIC_APR, APIC_PPR, APIC_RRD, APIC_TIMER_CCR) \
                or APIC_ISR <= offset < APIC_ESR:
            pass  # read-only
        elif offset < APIC_REGISTER_SPACE:
            self._error(ESR_ILLEGAL_REGISTER)

    def _write_svr(self, value: int) -> None:
        self.svr = value & SVR_WRITABLE
        if not self.software_enabled:
            # SDM 11.4.7.2: software disable sets every LVT mask bit.
            for reg in self.lvt:
                self.lvt[reg] |= LVT_MASKED

    def _write_lvt(self, reg: int, value: int) -> None:
        new = value & _LVT_WRITABLE[reg]
        if not self.software_enabled:
            # "attempts to reset the mask bits in the LVT are ignored"
            new |= LVT_MASKED
        # Keep the read-only remote IRR bit of LINT0/LINT1.
        new |= self.lvt[reg] & LVT_REMOTE_IRR
        old = self.lvt[reg]
        self.lvt[reg] = new
        if reg == APIC_LVT_TIMER and (old ^ new) & LVT_TIMER_PERIODIC:
            self._arm_timer(self._clock.now_ns())

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
one tick is 1 ns before the divider. One-shot, periodic and, when the APIC
is built with ``tsc``, TSC-deadline mode (11.5.4.1: LVT timer mode 10b, the
IA32_TSC_DEADLINE MSR through :meth:`LocalApic.read_tsc_deadline` /
:meth:`LocalApic.write_tsc_deadline`); without ``tsc`` LVT timer bit 18 is
reserved and reads 0.

Interrupt delivery to the CPU: :meth:`LocalApic.pending_vector` and
:meth:`LocalApic.acknowledge`. Interrupts reach IRR from the timer and other
LVT entries, from :meth:`LocalApic.set_lint` (LINT0/LINT1 pins), from
self-IPIs through the ICR, and from :meth:`LocalApic.deliver` (for an I/O
APIC or MSIs). With one CPU, IPIs to other APICs go nowhere.

x2APIC (SDM 11.12): with ``x2apic=True`` IA32_APIC_BASE.EXTD (bit 10) may be
set; the registers are then MSRs 800H-8FFH (:meth:`LocalApic.read_msr`,
:meth:`LocalApic.write_msr`, Table 11-6) and the MMIO page is gone (the VMM
unregisters it).  Mode transitions are checked by :meth:`base_transition_ok`
(11.12.5, Figure 11-28).  An access the SDM makes #GP raises X2ApicFault.
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


LVT_TIMER_MODE = LVT_TIMER_PERIODIC | LVT_TIMER_TSC_DEADLINE   # bits 18:17 (Figure 11-8)

# x2APIC MSRs (SDM Table 11-6 "Local APIC Register Address Map Supported by x2APIC").
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_END = 0x8FF
MSR_X2APIC_ICR = 0x830
MSR_X2APIC_SELF_IPI = 0x83F
MSR_IA32_TSC_DEADLINE = 0x6E0
#: MSR -> xAPIC offset for the registers that exist in x2APIC mode: MSR = 800H
#: + offset / 16, except the ICR (one 64-bit MSR) and SELF IPI (x2APIC only).
#: DFR (80EH), APR (809H) and RRD (80CH) do not exist in x2APIC mode.
_X2APIC_READABLE = frozenset(
    [0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, 0x828, 0x82F, 0x830]
    + list(range(0x810, 0x828)) + list(range(0x832, 0x83A)) + [0x83E])
_X2APIC_WRITABLE = frozenset(
    [0x808, 0x80B, 0x80F, 0x828, 0x82F, 0x830, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837, 0x838,
     0x83E, 0x83F])


class X2ApicFault(ValueError):
    """An x2APIC MSR access that raises #GP(0) (the MSR model, emu/msr.py,
    catches ValueError from the APIC's MSR methods)."""


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
                 init: Callable[[], None] | None = None,
                 x2apic: bool = False,
                 tsc: Callable[[], int] | None = None,
                 kick: Callable[[], None] | None = None) -> None:
        self._clock = clock
        #: called when a vector enters IRR (the CPU has something to look at)
        self._kick = kick
        self._timer = timers.timer(self._on_timer, "lapic-timer")
        #: x2APIC mode may be entered (CPUID.01H:ECX[21])
        self.x2apic_capable = x2apic
        #: the TSC now (TSC-deadline mode, CPUID.01H:ECX[24]); None: no such mode
        self._tsc = tsc
        self._lvt_timer_writable = 0x000700FF if tsc is not None else 0x000300FF
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
        self.tsc_deadline = 0
        self._timer.cancel()

    # -- enable state -------------------------------------------------------

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE[11], the global enable (SDM 11.4.3)."""
        return bool(self.base_msr & APIC_BASE_ENABLE)

    @property
    def x2apic_mode(self) -> bool:
        """IA32_APIC_BASE EN = EXTD = 1 (SDM 11.12.1)."""
        return self.base_msr & (APIC_BASE_ENABLE | APIC_BASE_EXTD) == (APIC_BASE_ENABLE | APIC_BASE_EXTD)

    def base_transition_ok(self, value: int) -> bool:
        """Whether writing ``value`` to IA32_APIC_BASE is a valid mode transition
        (SDM 11.12.5, Figure 11-28 "Local x2APIC State Transitions with
        IA32_APIC_BASE"): EN = 0 with EXTD = 1 is invalid; so are x2APIC ->
        xAPIC (EXTD 1 -> 0 with EN staying 1) and disabled -> x2APIC (EN 0 -> 1
        with EXTD = 1).  Without x2APIC support EXTD is reserved."""
        en, extd = bool(value & APIC_BASE_ENABLE), bool(value & APIC_BASE_EXTD)
        if extd and not self.x2apic_capable:
            return False
        if extd and not en:
            return False
        if self.x2apic_mode and en and not extd:
            return False
        if not self.hw_enabled and en and extd:
            return False
        return True

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

        BSP is read-only; EXTD is kept when x2APIC is supported (the caller
        checked the transition with :meth:`base_transition_ok`). Clearing the
        global enable resets the APIC to its power-up register state (SDM
        11.4.3). Raising #GP for reserved bits is the CPU model's job; they are
        dropped here. The VMM moves the MMIO registration when the returned
        address changes. Entering x2APIC mode (SDM 11.12.5.1): the APIC ID
        becomes the 32-bit x2APIC ID (the initial APIC ID here) and the
        logical ID is derived from it; the other registers keep their values.
        """
        was_enabled, was_x2 = self.hw_enabled, self.x2apic_mode
        keep = APIC_BASE_ADDR_MASK | APIC_BASE_ENABLE | (APIC_BASE_EXTD if self.x2apic_capable else 0)
        self.base_msr = (value & keep) | (self.base_msr & APIC_BASE_BSP)
        if was_enabled and not self.hw_enabled:
            self.reset()
        elif self.x2apic_mode and not was_x2:
            self.id = self.initial_apic_id
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
        if self._kick is not None:
            self._kick()
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

    @property
    def x2apic_ldr(self) -> int:
        """Logical x2APIC ID (SDM 11.12.10.2): cluster ID = x2APIC ID[19:4] in
        bits 31:16, bit (x2APIC ID[3:0]) set in bits 15:0."""
        return ((self.id & 0xFFFF0) << 12) | (1 << (self.id & 0xF))

    def _is_destination(self, dest: int, logical: bool) -> bool:
        if self.x2apic_mode:
            # SDM 11.12.9/11.12.10: 32-bit destinations, FFFFFFFFH broadcast.
            if dest == 0xFFFFFFFF:
                return True
            if not logical:
                return dest == self.id
            ldr = self.x2apic_ldr
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
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
            dest = self.icr_high if self.x2apic_mode else self.icr_high >> 24
            to_self = self._is_destination(dest, bool(low & ICR_DEST_LOGICAL))
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
        return self.lvt[APIC_LVT_TIMER] & LVT_TIMER_MODE == LVT_TIMER_PERIODIC

    @property
    def _timer_tsc_deadline(self) -> bool:
        return self.lvt[APIC_LVT_TIMER] & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE

    def read_tsc_deadline(self) -> int:
        """RDMSR IA32_TSC_DEADLINE (SDM 11.5.4.1): the armed deadline, 0 once it
        fired or when disarmed, and 0 outside TSC-deadline mode."""
        return self.tsc_deadline if self._timer_tsc_deadline else 0

    def write_tsc_deadline(self, value: int) -> None:
        """WRMSR IA32_TSC_DEADLINE: arm (non-zero) or disarm (0) the timer in
        TSC-deadline mode; outside it the write is ignored (11.5.4.1: "In
        other timer modes (LVT bit 18 = 0), the IA32_TSC_DEADLINE MSR reads
        zero and writes are ignored").  A deadline already passed fires at once."""
        if self._tsc is None or not self._timer_tsc_deadline:
            return
        self.tsc_deadline = value & 0xFFFFFFFFFFFFFFFF
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if not self.tsc_deadline:
            self._timer.cancel()
            return
        now = self._clock.now_ns()
        delta = self.tsc_deadline - self._tsc()          # TSC ticks = ns (1 GHz TSC)
        self._timer.arm(now + max(delta, 0))

    def _timer_ticks(self, now: int) -> int:
        return (now - self._timer_start) // _divisor(self.dcr)

    def current_count(self) -> int:
        """Current-count register value at the clock's current time."""
        if self._timer_tsc_deadline or not self._timer_running or self.timer_initial == 0:
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
        if self._timer_tsc_deadline:
            if self.tsc_deadline and self._tsc() >= self.tsc_deadline:
                self.tsc_deadline = 0                     # "reads 0 after the timer fired"
                self._local_deliver(APIC_LVT_TIMER)
            elif self.tsc_deadline:
                self._arm_deadline()
            return
        now = max(self._clock.now_ns(), deadline)
        self._local_deliver(APIC_LVT_TIMER)
        if not self._timer_periodic:
            self._timer_running = False
        self._arm_timer(now)

    def _write_initial_count(self, value: int) -> None:
        if self._timer_tsc_deadline:
            return      # 11.5.4.1: "writes to the initial-count register are ignored"
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
            return 0 if self._timer_tsc_deadline else self.timer_initial
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
        new = value & (self._lvt_timer_writable if reg == APIC_LVT_TIMER else _LVT_WRITABLE[reg])
        if reg == APIC_LVT_TIMER and new & LVT_TIMER_MODE == LVT_TIMER_MODE:
            new &= ~LVT_TIMER_TSC_DEADLINE                # 11b is reserved: one of the defined modes
        if not self.software_enabled:
            # "attempts to reset the mask bits in the LVT are ignored"
            new |= LVT_MASKED
        # Keep the read-only remote IRR bit of LINT0/LINT1.
        new |= self.lvt[reg] & LVT_REMOTE_IRR
        old = self.lvt[reg]
        self.lvt[reg] = new
        if reg == APIC_LVT_TIMER and (old ^ new) & LVT_TIMER_MODE:
            # 11.5.4.1: "Transitioning between TSC-deadline mode and other timer
            # modes also disarms the timer."
            if (old ^ new) & LVT_TIMER_TSC_DEADLINE:
                self.tsc_deadline = 0
                self._timer_running = False
                self._timer.cancel()
            else:
                self._arm_timer(self._clock.now_ns())

    # -- x2APIC MSRs (SDM 11.12.1.2, Table 11-6) ---------------------------

    def read_msr(self, msr: int) -> int:
        """RDMSR of x2APIC MSR ``msr`` (800H-8FFH) in x2APIC mode; X2ApicFault
        (#GP) outside x2APIC mode, for a write-only or reserved address."""
        if not self.x2apic_mode or msr not in _X2APIC_READABLE:
            raise X2ApicFault(f"RDMSR {msr:#x}")
        if msr == 0x802:
            return self.id                                # 32-bit x2APIC ID
        if msr == 0x80D:
            return self.x2apic_ldr
        if msr == MSR_X2APIC_ICR:
            return (self.icr_high << 32) | self.icr_low
        return self.read_register((msr - X2APIC_MSR_BASE) << 4)

    def write_msr(self, msr: int, value: int) -> None:
        """WRMSR of x2APIC MSR ``msr``: #GP (X2ApicFault) outside x2APIC mode, for
        a read-only or reserved address, or with a reserved bit set (11.12.1.2:
        "WRMSR ... to a read-only register or with reserved bits set ... #GP")."""
        if not self.x2apic_mode or msr not in _X2APIC_WRITABLE:
            raise X2ApicFault(f"WRMSR {msr:#x}")
        value &= 0xFFFFFFFFFFFFFFFF
        if msr == MSR_X2APIC_ICR:
            if value & 0xFFFFFFFF & ~ICR_LOW_WRITABLE & ~(1 << 12):
                raise X2ApicFault("reserved ICR bits")
            self.icr_high = value >> 32
            self.icr_low = value & ICR_LOW_WRITABLE
            self._send_ipi()
            return
        if value >> 32:
            raise X2ApicFault(f"WRMSR {msr:#x}: bits 63:32 are reserved")
        if msr == MSR_X2APIC_SELF_IPI:
            if value & ~0xFF:
                raise X2ApicFault("SELF IPI bits 31:8 are reserved")
            # 11.12.11: a fixed, edge-triggered self IPI with this vector.
            vector = value & 0xFF
            if vector < 16:
                self._error(ESR_SEND_ILLEGAL_VECTOR)
            else:
                self.deliver(vector)
            return
        reserved = {0x808: ~0xFF, 0x80B: ~0, 0x80F: ~SVR_WRITABLE, 0x828: ~0,
                    0x83E: ~DCR_WRITABLE}.get(msr)
        if msr in (0x82F, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837):
            reg = (msr - X2APIC_MSR_BASE) << 4
            reserved = ~(self._lvt_timer_writable if reg == APIC_LVT_TIMER else _LVT_WRITABLE[reg])
        if reserved is not None and value & reserved & 0xFFFFFFFF:
            raise X2ApicFault(f"WRMSR {msr:#x}: reserved bits in {value:#x}")
        self.write_register((msr - X2APIC_MSR_BASE) << 4, value)

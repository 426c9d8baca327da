"""Intel 8254 programmable interval timer, wired as on a PC.

References: Intel 8254 datasheet (order no. 231164): "Control Word Format"
(Figure 7), "Read-Back Command" (Figures 9-10), "Modes" 0-5 and Table 3 (gate
pin operations); QEMU hw/timer/i8254.c and i8254_common.c (PIT_FREQ, reset
state); IBM PC/AT technical reference for port 0x61.

Wiring: ports 0x40-0x42 are the channel data registers, 0x43 the control
word. The counters run at :data:`PIT_FREQ`. Channel 0's gate is tied high and
its OUT drives IRQ0; channel 1's gate is tied high and its OUT is unconnected
(DRAM refresh on the AT); channel 2's gate and OUT go through port 0x61
(:class:`SystemControlPortB`), which kernels use to calibrate the TSC.

Time is virtual: a counter's value is computed from ``clock.now_ns()`` and the
time it was loaded; nothing is polled. Channel 0 arms a :class:`Timer` for the
next rising edge of OUT0 and pulses IRQ0 when it fires. If the VMM services
timers late and several periods elapsed, they are coalesced into one pulse
(the PIC would merge them into one IRR bit anyway).

Simplifications (each documented where it happens):

* A count is loaded into the counting element at the write, not on the next
  CLK pulse, so mode 0 OUT rises N ticks (not N + 1) after the write.
* BCD counting (control word bit 0) is accepted and reported in the status
  byte, but the counter counts in binary. No PC OS uses BCD.
* Mode 3 with an odd count: OUT is high for (N + 1) / 2 ticks and low for
  (N - 1) / 2 ticks as the datasheet says, but the value read back follows
  QEMU's ``N - (2d mod N)`` approximation.
"""

from __future__ import annotations

from vmlab.devices.bus import read_bytewise, write_bytewise
from vmlab.devices.clock import NANOSECONDS_PER_SECOND, Clock, TimerQueue
from vmlab.devices.irq import IrqLine

PIT_FREQ = 1193182
"""Counter input clock in Hz (QEMU's PIT_FREQ; nominally 105/88 MHz / 1)."""
PIT_PORT = 0x40
PIT_PORT_COUNT = 4
PIT_IRQ = 0
PORT_B = 0x61
"""System control port B (speaker gate, channel 2 OUT, refresh toggle)."""

CONTROL = 3  # offset of the control word register

# Control word (8254 datasheet, Figure 7).
SC_SHIFT = 6
SC_READ_BACK = 3
RW_SHIFT = 4
RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_LOHI = 3
MODE_SHIFT = 1
CW_BCD = 0x01

# Read-back command (Figure 9): both flags are active low.
RB_NO_COUNT = 0x20
RB_NO_STATUS = 0x10

# Status byte (Figure 10).
STATUS_OUT = 0x80
STATUS_NULL_COUNT = 0x40

# Port 0x61 bits.
PORT_B_GATE2 = 0x01
PORT_B_SPEAKER = 0x02
PORT_B_WRITABLE = 0x0F
PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20
REFRESH_TOGGLE_NS = 15085
"""PC/AT DRAM refresh request period: port 0x61 bit 4 toggles this often."""


def _ticks(delta_ns: int) -> int:
    return delta_ns * PIT_FREQ // NANOSECONDS_PER_SECOND


def _ns_for_ticks(ticks: int) -> int:
    # Smallest delta with _ticks(delta) >= ticks.
    return -(-ticks * NANOSECONDS_PER_SECOND // PIT_FREQ)


class PitChannel:
    """One counter of the 8254.

    The counting element's elapsed ticks are ``_base + ticks(now - _start)``
    while counting and ``_base`` while stopped (``_start`` is None).
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.reset(0)

    def reset(self, now: int) -> None:
        """QEMU's reset state: mode 3, LSB-then-MSB, count 65536, running."""
        self.ctrl = (RW_LOHI << RW_SHIFT) | (3 << MODE_SHIFT)
        self.gate = self.index != 2
        self._program(self.ctrl)
        self._set_count(0x10000, now)

    # -- programming --------------------------------------------------------

    @property
    def mode(self) -> int:
        """Counter mode 0-5 (M2 M1 M0 with 'x10'/'x11' folded to 2/3)."""
        m = (self.ctrl >> MODE_SHIFT) & 7
        return m & 3 if m > 5 else m

    @property
    def rw(self) -> int:
        """Read/write format: RW_LSB, RW_MSB or RW_LOHI."""
        return (self.ctrl >> RW_SHIFT) & 3

    def _program(self, ctrl: int) -> None:
        """Control word: "all control logic is immediately reset"."""
        self.ctrl = ctrl & 0x3F
        self.count = getattr(self, "count", 0x10000)
        self.loaded = False        # no count written since the control word
        self.triggered = False     # modes 1 and 5: gate edge seen
        self.null_count = True
        self._pending: tuple[int, int | None] | None = None
        self._base = 0
        self._start: int | None = None
        self._latch: list[int] = []
        self._status: int | None = None
        self._read_hi = False
        self._write_hi = False
        self._write_lsb = 0

    def _set_count(self, value: int, now: int) -> None:
        """A complete count has been written to the count register."""
        n = value or 0x10000  # 0 means 2^16 in binary counting
        m = self.mode
        running = self.loaded and self._start is not None
        if m in (2, 3) and running:
            # A new count takes effect at the end of the current period.
            d = self.elapsed(now)
            self._pending = (n, (d // self.count + 1) * self.count)
            self.null_count = True
            return
        if m in (1, 5) and self.loaded and self.triggered:
            # Loaded into the counting element by the next trigger only.
            self._pending = (n, None)
            self.null_count = True
            return
        self.count = n
        self.loaded = True
        self._pending = None
        self._base = 0
        if m in (1, 5):
            self.triggered = False
            self._start = None
            self.null_count = True
        else:
            self._start = now if self.gate else None
            self.null_count = False

    def set_gate(self, level: bool, now: int) -> None:
        """Drive the GATE input (datasheet Table 3)."""
        level = bool(level)
        if level == self.gate:
            return
        self.gate = level
        if not self.loaded:
            return
        m = self.mode
        if m in (0, 4):
            # Gate low suspends counting; high resumes it.
            if level:
                self._start = now
            else:
                self._pause(now)
        elif m in (2, 3):
            # Low stops counting (OUT high); the rising edge reloads.
            if level:
                self._reload(now)
            else:
                self._pause(now)
        elif level:
            # Modes 1 and 5: the rising edge (re)triggers.
            self.triggered = True
            self._reload(now)

    def _pause(self, now: int) -> None:
        self._base = self.elapsed(now)
        self._start = None

    def _reload(self, now: int) -> None:
        if self._pending is not None:
            self.count = self._pending[0]
            self._pending = None
        self._base = 0
        self._start = now
        self.null_count = False

    # -- derived state ------------------------------------------------------

    def elapsed(self, now: int) -> int:
        """Ticks counted since the count was (re)loaded."""
        d = self._base
        if self._start is not None:
            d += _ticks(now - self._start)
        if self._pending is not None and self._pending[1] is not None:
            n, switch = self._pending
            if d >= switch:
                # Periodic modes: the pending count was loaded at the reload.
                self._pending = None
                self.count = n
                self._base -= switch
                d -= switch
                self.null_count = False
        return d

    def _idle(self) -> bool:
        return not self.loaded or (self.mode in (1, 5) and not self.triggered)

    def out(self, now: int) -> bool:
        """Level of the OUT pin at ``now``."""
        m = self.mode
        if self._idle():
            return m != 0  # mode 0 OUT goes low on the control word
        if m in (2, 3) and not self.gate:
            return True
        d = self.elapsed(now)
        n = self.count
        if m in (0, 1):
            return d >= n
        if m == 2:
            # Low for the one tick the count is 1 (a count of 1 is illegal).
            return n < 2 or d % n != n - 1
        if m == 3:
            return d % n < (n + 1) // 2
        return d != n  # modes 4, 5: one-tick low strobe at terminal count

    def value(self, now: int) -> int:
        """The 16-bit counting element as a read would see it."""
        n = self.count
        if self._idle():
            return n & 0xFFFF
        d = self.elapsed(now)
        m = self.mode
        if m == 2:
            v = n - d % n
        elif m == 3:
            v = n - (2 * d) % n
        else:
            v = n - d  # modes 0, 1, 4, 5 wrap around after terminal count
        return v & 0xFFFF

    def next_rising_edge_ns(self, now: int) -> int | None:
        """Time of the next OUT low-to-high transition after ``now``."""
        if self._idle() or self._start is None:
            return None
        d = self.elapsed(now)
        n = self.count
        m = self.mode
        if m in (0, 1):
            t = n if d < n else None
        elif m in (2, 3):
            t = (d // n + 1) * n if n >= 2 else None
        else:
            t = n + 1 if d < n + 1 else None
        if t is None:
            return None
        return self._start + _ns_for_ticks(t - self._base)

    # -- register access ----------------------------------------------------

    def latch_count(self, now: int) -> None:
        """Counter latch command (ignored while a latched count is unread)."""
        if self._latch:
            return
        v = self.value(now)
        if self.rw == RW_LSB:
            self._latch = [v & 0xFF]
        elif self.rw == RW_MSB:
            self._latch = [v >> 8]
        else:
            self._latch = [v & 0xFF, v >> 8]

    def latch_status(self, now: int) -> None:
        """Read-back status latch (ignored while a latched status is unread)."""
        if self._status is None:
            self._status = ((STATUS_OUT if self.out(now) else 0)
                            | (STATUS_NULL_COUNT if self.null_count else 0)
                            | self.ctrl)

    def read_byte(self, now: int) -> int:
        """A read of the channel's data port."""
        if self._status is not None:
            # Latched status is read first, then any latched count.
            v, self._status = self._status, None
            return v
        if self._latch:
            return self._latch.pop(0)
        v = self.value(now)
        if self.rw == RW_LSB:
            return v & 0xFF
        if self.rw == RW_MSB:
            return v >> 8
        self._read_hi = not self._read_hi
        return v & 0xFF if self._read_hi else v >> 8

    def write_byte(self, value: int, now: int) -> None:
        """A write of the channel's data port."""
        if self.rw == RW_LSB:
            self._set_count(value, now)
        elif self.rw == RW_MSB:
            self._set_count(value << 8, now)
        elif not self._write_hi:
            self._write_hi = True
            self._write_lsb = value
            if self.mode == 0:
                # "Writing the first byte disables counting. OUT is set low
                # immediately."
                self._pause(now)
                self.loaded = False
                self.null_count = True
        else:
            self._write_hi = False
            self._set_count(self._write_lsb | (value << 8), now)

    def write_control(self, ctrl: int) -> None:
        """Program mode/format from a control word (SC already decoded)."""
        self._program(ctrl)


class Pit8254:
    """The PC's 8254 at ports 0x40-0x43, with channel 0 driving ``irq0``."""

    def __init__(self, clock: Clock, timers: TimerQueue,
                 irq0: IrqLine | None = None) -> None:
        self._clock = clock
        self._irq0 = irq0
        self._timer = timers.timer(self._on_timer, "pit-ch0")
        self.channels = [PitChannel(i) for i in range(3)]
        self.port_b = SystemControlPortB(self)
        self._out0: bool | None = None
        self.reset()

    def reset(self) -> None:
        """Reset every channel (QEMU pit_reset: mode 3, count 65536)."""
        now = self._clock.now_ns()
        for ch in self.channels:
            ch.reset(now)
        self._out0 = None
        self._ch0_changed(now)

    def attach(self, io_bus) -> None:
        """Register ports 0x40-0x43 and 0x61."""
        io_bus.register(PIT_PORT, PIT_PORT_COUNT, self, "pit")
        io_bus.register(PORT_B, 1, self.port_b, "port61")

    # -- OUT0 / IRQ0 --------------------------------------------------------

    def _set_out0(self, level: bool) -> None:
        if level != self._out0:
            self._out0 = level
            if self._irq0 is not None:
                self._irq0.set_level(level)

    def _ch0_changed(self, now: int) -> None:
        self._set_out0(self.channels[0].out(now))
        edge = self.channels[0].next_rising_edge_ns(now)
        if edge is None:
            self._timer.cancel()
        else:
            self._timer.arm(edge)

    def _on_timer(self, deadline: int) -> None:
        # The edge at `deadline` has happened even if the VMM ran the queue
        # ahead of the clock; evaluating at `now` coalesces missed periods.
        now = max(self._clock.now_ns(), deadline)
        if self._irq0 is not None:
            self._irq0.pulse()
        self._out0 = True
        self._ch0_changed(now)

    # -- CPU/VMM helpers ----------------------------------------------------

    def out(self, channel: int) -> bool:
        """Current OUT level of ``channel``."""
        return self.channels[channel].out(self._clock.now_ns())

    def set_gate(self, channel: int, level: bool) -> None:
        """Drive the GATE input of ``channel``."""
        now = self._clock.now_ns()
        self.channels[channel].set_gate(level, now)
        if channel == 0:
            self._ch0_changed(now)

    # -- bus interface ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Bus read of ports 0x40-0x43."""
        return read_bytewise(self._read_port, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Bus write of ports 0x40-0x43."""
        write_bytewise(self._write_port, offset, size, value)

    def _read_port(self, offset: int) -> int:
        if 0 <= offset < CONTROL:
            return self.channels[offset].read_byte(self._clock.now_ns())
        # The control word register is write-only; QEMU reads it as 0.
        return 0

    def _write_port(self, offset: int, value: int) -> None:
        now = self._clock.now_ns()
        if 0 <= offset < CONTROL:
            self.channels[offset].write_byte(value, now)
            if offset == 0:
                self._ch0_changed(now)
        elif offset == CONTROL:
            self._write_control(value, now)

    def _write_control(self, value: int, now: int) -> None:
        sc = value >> SC_SHIFT
        if sc == SC_READ_BACK:
            for i, ch in enumerate(self.channels):
                if value & (2 << i):
                    # Status first so it reflects the state before a count
                    # latch could settle anything; both are snapshots.
                    if not value & RB_NO_STATUS:
                        ch.latch_status(now)
                    if not value & RB_NO_COUNT:
                        ch.latch_count(now)
            return
        ch = self.channels[sc]
        if (value >> RW_SHIFT) & 3 == RW_LATCH:
            ch.latch_count(now)
            return
        ch.write_control(value)
        if sc == 0:
            self._ch0_changed(now)


class SystemControlPortB:
    """Port 0x61: bit 0 GATE2, bit 1 speaker data, bit 4 refresh, bit 5 OUT2.

    Bits 0-3 are read/write; bit 4 toggles every :data:`REFRESH_TOGGLE_NS`
    of virtual time (old delay loops poll it); bit 5 is channel 2's OUT;
    bits 6-7 (parity/IOCHK error status) read 0.
    """

    def __init__(self, pit: Pit8254) -> None:
        self._pit = pit
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        """Read the port (only offset 0 exists)."""
        return read_bytewise(self._read, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the port (only offset 0 exists)."""
        write_bytewise(self._write, offset, size, value)

    def _read(self, offset: int) -> int:
        if offset != 0:
            return 0xFF
        now = self._pit._clock.now_ns()
        v = self.value & PORT_B_WRITABLE
        if (now // REFRESH_TOGGLE_NS) & 1:
            v |= PORT_B_REFRESH
        if self._pit.out(2):
            v |= PORT_B_OUT2
        return v

    def _write(self, offset: int, value: int) -> None:
        if offset != 0:
            return
        self.value = value & PORT_B_WRITABLE
        self._pit.set_gate(2, bool(value & PORT_B_GATE2))

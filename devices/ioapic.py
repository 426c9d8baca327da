"""I/O APIC: a register model of the Intel 82093AA (datasheet 290566-001,
§3 "Register Description"), 24 interrupt input pins, at 0xFEC00000.

Direct registers (memory-mapped, §3.1): IOREGSEL at offset 0x00 (bits 7:0
select an indirect register), IOWIN at 0x10 (32-bit window onto it).
Indirect registers (§3.2):

* 0x00 IOAPICID: bits 27:24 the APIC ID (read/write);
* 0x01 IOAPICVER: version 0x11 (bits 7:0), maximum redirection entry 23
  (bits 23:16); read-only;
* 0x02 IOAPICARB: arbitration ID (bits 27:24), read-only, = the APIC ID;
* 0x10 + 2n, 0x11 + 2n: redirection table entry n (n = 0..23), low and high
  dwords (§3.2.4, Table 3): vector (7:0), delivery mode (10:8: fixed,
  lowest priority, SMI, NMI, INIT, ExtINT), destination mode (11: 0
  physical, 1 logical), delivery status (12, read-only), interrupt input pin
  polarity (13: 1 = active low), remote IRR (14, read-only), trigger mode
  (15: 1 = level), mask (16), destination (63:56).  Entries reset masked.

Delivery: an edge-triggered pin sends its message on the inactive-to-active
edge while unmasked (an edge while masked is lost); a level-triggered pin
sends while it is active, unmasked and remote IRR is clear, and sets remote
IRR; the local APIC's EOI of that vector (broadcast to the I/O APIC,
``eoi(vector)``) clears remote IRR and, if the pin is still active, sends
again.  Unmasking an active level-triggered pin sends it.  Messages go to
``deliver(dest, logical, mode, vector, level)``; which local APIC accepts
them is the machine's business.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["IoApic", "IOAPIC_BASE", "IOAPIC_PINS"]

IOAPIC_BASE = 0xFEC00000
IOAPIC_PINS = 24
IOAPIC_VERSION = 0x11
IOREGSEL, IOWIN = 0x00, 0x10
REG_ID, REG_VER, REG_ARB = 0x00, 0x01, 0x02
REG_REDTBL = 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_DEST_SHIFT = 56
#: bits software writes (the read-only delivery status and remote IRR are not)
RTE_WRITABLE = ((1 << 17) - 1) & ~(RTE_DELIVERY_STATUS | RTE_REMOTE_IRR) | (0xFF << RTE_DEST_SHIFT)


class IoApic:
    """82093AA model.  ``deliver(dest, logical, mode, vector, level_triggered)``
    receives interrupt messages."""

    def __init__(self, deliver: Callable[[int, bool, int, int, bool], None], apic_id: int = 0) -> None:
        self._deliver = deliver
        self.initial_id = apic_id & 0xF
        self.reset()

    def reset(self) -> None:
        self.id = self.initial_id
        self.ioregsel = 0
        self.redtbl = [RTE_MASKED] * IOAPIC_PINS
        self.pins = [False] * IOAPIC_PINS          # electrical level (True = high)

    # -- pins --------------------------------------------------------------
    def _active(self, pin: int) -> bool:
        return self.pins[pin] != bool(self.redtbl[pin] & RTE_POLARITY_LOW)

    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` high (True) or low; pins beyond 23 are ignored."""
        if not 0 <= pin < IOAPIC_PINS:
            return
        was = self._active(pin)
        self.pins[pin] = bool(level)
        now = self._active(pin)
        rte = self.redtbl[pin]
        if rte & RTE_LEVEL:
            if now:
                self._service(pin)
        elif now and not was and not rte & RTE_MASKED:
            self._send(pin)

    def _service(self, pin: int) -> None:
        """Level-triggered pin: send if active, unmasked and not yet accepted."""
        rte = self.redtbl[pin]
        if rte & (RTE_MASKED | RTE_REMOTE_IRR) or not self._active(pin):
            return
        self.redtbl[pin] = rte | RTE_REMOTE_IRR
        self._send(pin)

    def _send(self, pin: int) -> None:
        rte = self.redtbl[pin]
        self._deliver((rte >> RTE_DEST_SHIFT) & 0xFF, bool(rte & RTE_DEST_LOGICAL),
                      (rte >> RTE_DELIVERY_MODE_SHIFT) & 7, rte & RTE_VECTOR, bool(rte & RTE_LEVEL))

    def eoi(self, vector: int) -> None:
        """The local APIC's EOI for a level-triggered ``vector``: clear remote
        IRR of the entries with that vector, resend those still active."""
        for pin, rte in enumerate(self.redtbl):
            if rte & RTE_LEVEL and rte & RTE_REMOTE_IRR and (rte & RTE_VECTOR) == (vector & 0xFF):
                self.redtbl[pin] = rte & ~RTE_REMOTE_IRR
                self._service(pin)

    # -- registers ---------------------------------------------------------
    def read_register(self, index: int) -> int:
        index &= 0xFF
        if index == REG_ID:
            return self.id << 24
        if index == REG_VER:
            return ((IOAPIC_PINS - 1) << 16) | IOAPIC_VERSION
        if index == REG_ARB:
            return self.id << 24
        if REG_REDTBL <= index < REG_REDTBL + 2 * IOAPIC_PINS:
            rte = self.redtbl[(index - REG_REDTBL) >> 1]
            return (rte >> 32) & 0xFFFFFFFF if index & 1 else rte & 0xFFFFFFFF
        return 0

    def write_register(self, index: int, value: int) -> None:
        index &= 0xFF
        value &= 0xFFFFFFFF
        if index == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        if not REG_REDTBL <= index < REG_REDTBL + 2 * IOAPIC_PINS:
            return                                   # version, arbitration: read-only
        pin = (index - REG_REDTBL) >> 1
        old = self.redtbl[pin]
        if index & 1:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & ~0xFFFFFFFF) | value
        new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR                   # remote IRR is undefined for edge: keep it clear
        self.redtbl[pin] = new
        if new & RTE_LEVEL and not new & RTE_MASKED:
            self._service(pin)

    # -- bus ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL:
            return self.ioregsel
        if offset == IOWIN:
            return self.read_register(self.ioregsel)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == IOREGSEL:
            self.ioregsel = value & 0xFF
        elif offset == IOWIN:
            self.write_register(self.ioregsel, value)


class IsaIrqRouter:
    """The ISA interrupt wiring of a PC: each ISA IRQ line goes to the 8259
    pair and to an I/O APIC pin (IRQ 0, the PIT, to pin 2 as the MADT's
    interrupt source override says; the others to the pin of the same
    number).  Has the ``set_irq`` of an interrupt controller."""

    def __init__(self, pic, ioapic: IoApic) -> None:
        self.pic, self.ioapic = pic, ioapic

    @staticmethod
    def gsi(irq: int) -> int:
        return 2 if irq == 0 else irq

    def set_irq(self, irq: int, level: bool) -> None:
        self.pic.set_irq(irq, level)
        self.ioapic.set_irq(self.gsi(irq), level)

"""NS16550A UART register model (the PC's COM ports).

References: National Semiconductor PC16550D datasheet (register and FIFO
description, Table II "Summary of Registers", Table IV "Interrupt Control
Functions"); QEMU hw/char/serial.c and rust-vmm vm-superio ``serial.rs`` for
the behaviour PC guests rely on.

This is a pure register model: no baud-rate timing. A byte written to THR goes
to ``sink`` at once, so THR and the transmitter are always empty
(LSR.THRE = LSR.TEMT = 1). Input arrives through :meth:`Uart16550.feed`.

Interrupt output: the 16550's INTR pin drives the ISA IRQ line through a
buffer enabled by MCR.OUT2 on every PC serial card, so the IRQ line is
``interrupt pending AND MCR.OUT2``. In loopback mode the datasheet forces the
modem-control output pins (OUT2 included) inactive, so the IRQ line is also
off then, even though the interrupt logic (IIR) keeps working.

Character timeout (IIR = 0xC) has no time base here: with FIFOs enabled and
fewer bytes than the trigger level waiting, the timeout is reported as already
expired. Drivers that program a trigger level above 1 (Linux uses 8) thus still
get an interrupt for a short input burst.
"""

from __future__ import annotations

import collections
from typing import Callable

from vmlab.devices.bus import read_bytewise, write_bytewise
from vmlab.devices.irq import IrqLine

COM1_PORT = 0x3F8
"""Base port of COM1."""
COM1_IRQ = 4
"""ISA IRQ of COM1."""
COM2_PORT = 0x2F8
COM2_IRQ = 3
REGISTER_COUNT = 8
"""The UART decodes 8 consecutive ports."""
FIFO_SIZE = 16

# Register offsets (PC16550D Table II). DLAB = LCR bit 7.
RBR = 0  # receiver buffer (read, DLAB=0)
THR = 0  # transmitter holding (write, DLAB=0)
DLL = 0  # divisor latch LSB (DLAB=1)
IER = 1  # interrupt enable (DLAB=0)
DLM = 1  # divisor latch MSB (DLAB=1)
IIR = 2  # interrupt identification (read)
FCR = 2  # FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04   # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F   # bits 4-7 are always 0 on a 16550A

IIR_NO_INT = 0x01
IIR_MSI = 0x00    # modem status (priority 4, lowest)
IIR_THRI = 0x02   # THR empty (priority 3)
IIR_RDI = 0x04    # received data available (priority 2)
IIR_RLSI = 0x06   # receiver line status (priority 1, highest)
IIR_CTI = 0x0C    # character timeout (priority 2, FIFO mode)
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F   # bits 5-7 are always 0 on a 16550A

LSR_DR = 0x01     # data ready
LSR_OE = 0x02     # overrun error
LSR_PE = 0x04     # parity error
LSR_FE = 0x08     # framing error
LSR_BI = 0x10     # break interrupt
LSR_THRE = 0x20   # THR empty
LSR_TEMT = 0x40   # transmitter empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

DEFAULT_MODEM_STATUS = MSR_DCD | MSR_DSR | MSR_CTS
"""Modem inputs when not in loopback: a connected, ready peer (as QEMU and
vm-superio report)."""

DEFAULT_DIVISOR = 12
"""115200 / 12 = 9600 baud; the value vm-superio resets to."""


class Uart16550:
    """A 16550A UART occupying :data:`REGISTER_COUNT` ports.

    ``sink(data: bytes)`` receives transmitted bytes. ``irq`` is the INTR
    output after the MCR.OUT2 gate. Host input goes in through :meth:`feed`.
    """

    def __init__(self, sink: Callable[[bytes], object] | None = None,
                 irq: IrqLine | None = None) -> None:
        self._sink = sink
        self._irq = irq
        self._irq_level = False
        #: on_fast(lsr, thr): told whenever what a polling driver's accesses
        #: may skip the model changes (:meth:`fast_registers`); None: no one asks
        self.on_fast: Callable[[int | None, bool], object] | None = None
        self._fast: tuple | None = None
        self.reset()

    def reset(self) -> None:
        """Master reset (PC16550D Table III: MR)."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.fifo_enabled = False
        self.rx_trigger = 1
        self.rx_fifo: collections.deque[int] = collections.deque()
        self._rbr_last = 0
        # THR-empty interrupt source; set when THR empties, cleared by
        # reading IIR (when it is the reported source) or writing THR.
        self._thr_int = False
        self._msr_deltas = 0
        self._update_irq()

    # -- host side ----------------------------------------------------------

    @property
    def rx_capacity(self) -> int:
        """Bytes the receiver can hold: 16 with FIFOs on, 1 (RBR) without."""
        return FIFO_SIZE if self.fifo_enabled else 1

    def rx_room(self) -> int:
        """How many bytes :meth:`feed` can take now without an overrun.

        0 in loopback mode, where the serial input is disconnected.
        """
        if self.mcr & MCR_LOOP:
            return 0
        return self.rx_capacity - len(self.rx_fifo)

    def feed(self, data: bytes) -> int:
        """Receive ``data`` from the outside; return how many bytes were kept.

        Bytes beyond the receiver's capacity are lost and set LSR.OE, like a
        character arriving in a full FIFO (in FIFO mode the new character is
        dropped; in 16450 mode it overwrites RBR). In loopback mode SIN is
        disconnected (PC16550D MCR bit 4) and everything is dropped silently.
        """
        if self.mcr & MCR_LOOP:
            return 0
        kept = 0
        for byte in data:
            kept += self._receive(byte)
        self._update_irq()
        return kept

    def _receive(self, byte: int) -> int:
        if len(self.rx_fifo) < self.rx_capacity:
            self.rx_fifo.append(byte)
            self.lsr |= LSR_DR
            return 1
        self.lsr |= LSR_OE
        if not self.fifo_enabled:
            # 16450 mode: "thereby destroying the previous character".
            self.rx_fifo[-1] = byte
            return 1
        return 0

    # -- modem lines ----------------------------------------------------------

    def _modem_inputs(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            m = self.mcr
            return (((m & MCR_RTS) and MSR_CTS) | ((m & MCR_DTR) and MSR_DSR)
                    | ((m & MCR_OUT1) and MSR_RI) | ((m & MCR_OUT2) and MSR_DCD))
        return DEFAULT_MODEM_STATUS

    def _note_modem_change(self, old: int, new: int) -> None:
        changed = old ^ new
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        # TERI is set on the trailing edge of RI only.
        if (old & MSR_RI) and not (new & MSR_RI):
            self._msr_deltas |= MSR_TERI

    # -- interrupts -------------------------------------------------------

    def _pending_iir(self) -> int:
        """Interrupt identification in priority order (PC16550D Table IV)."""
        if (self.ier & IER_ELSI) and (self.lsr & LSR_ERRORS):
            return IIR_RLSI
        if (self.ier & IER_ERBFI) and self.rx_fifo:
            if self.fifo_enabled and len(self.rx_fifo) < self.rx_trigger:
                return IIR_CTI
            return IIR_RDI
        if (self.ier & IER_ETBEI) and self._thr_int:
            return IIR_THRI
        if (self.ier & IER_EDSSI) and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = (self._pending_iir() != IIR_NO_INT
                 and bool(self.mcr & MCR_OUT2) and not self.mcr & MCR_LOOP)
        if level != self._irq_level:
            self._irq_level = level
            if self._irq is not None:
                self._irq.set_level(level)
        if self.on_fast is not None:
            fast = self.fast_registers()
            if fast != self._fast:
                self._fast = fast
                self.on_fast(*fast)

    def fast_registers(self) -> tuple[int | None, bool]:
        """(LSR value, THR) for a polling driver's accesses that need no model
        (coalesced port I/O): the LSR value a read returns while reading it
        changes nothing -- no error bit set, which a read would clear -- else
        None; and whether a THR write does nothing but send its byte -- DLAB 0,
        no loopback, no THR-empty interrupt enabled (IER.ETBEI 0) -- so it may
        be queued and handed to :meth:`write` later."""
        lsr = None if self.lsr & LSR_ERRORS else self.lsr
        thr = not (self.lcr & LCR_DLAB) and not (self.mcr & MCR_LOOP) and not (self.ier & IER_ETBEI)
        return lsr, thr

    @property
    def irq_level(self) -> bool:
        """Current level of the (OUT2-gated) interrupt output."""
        return self._irq_level

    # -- bus interface ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Bus read; each byte of a wide access reads one register."""
        return read_bytewise(self._read_reg, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Bus write; each byte of a wide access writes one register."""
        write_bytewise(self._write_reg, offset, size, value)

    def _read_reg(self, offset: int) -> int:
        if not 0 <= offset < REGISTER_COUNT:
            return 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.divisor & 0xFF
            if self.rx_fifo:
                self._rbr_last = self.rx_fifo.popleft()
            if not self.rx_fifo:
                self.lsr &= ~LSR_DR
            self._update_irq()
            # An empty receiver returns the last character again.
            return self._rbr_last
        if offset == IER:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == IIR:
            iir = self._pending_iir()
            if iir == IIR_THRI:
                # Reading IIR clears THRE when it is the reported source.
                self._thr_int = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            self.lsr &= ~LSR_ERRORS  # error bits clear on read
            self._update_irq()
            return value
        if offset == MSR:
            value = self._modem_inputs() | self._msr_deltas
            self._msr_deltas = 0
            self._update_irq()
            return value
        return self.scr

    def _write_reg(self, offset: int, value: int) -> None:
        if not 0 <= offset < REGISTER_COUNT:
            return
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            self._transmit(value)
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            old = self.ier
            self.ier = value & IER_MASK
            # Enabling ETBEI while THR is empty raises THRE at once (16550
            # behaviour that Linux's 8250 driver probes for).
            if (self.ier & IER_ETBEI) and not (old & IER_ETBEI) \
                    and (self.lsr & LSR_THRE):
                self._thr_int = True
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            old_inputs = self._modem_inputs()
            self.mcr = value & MCR_MASK
            self._note_modem_change(old_inputs, self._modem_inputs())
        elif offset == LSR or offset == MSR:
            # Status registers; writes are a factory-test feature, ignored.
            return
        else:
            self.scr = value
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self.fifo_enabled:
            # Changing FCR0 clears both FIFOs.
            self.rx_fifo.clear()
            self.lsr &= ~LSR_DR
            self.fifo_enabled = enable
        if not enable:
            # "FCR0 must be a 1 when other FCR bits are written to or they
            # will not be programmed."
            return
        if value & FCR_CLEAR_RX:
            self.rx_fifo.clear()
            self.lsr &= ~LSR_DR
        # FCR_CLEAR_TX: the TX FIFO is always empty in this model.
        self.rx_trigger = RX_TRIGGER_LEVELS[(value >> FCR_TRIGGER_SHIFT) & 3]

    def _transmit(self, byte: int) -> None:
        self._thr_int = False
        if self.mcr & MCR_LOOP:
            # The transmitter shift register feeds the receiver; SOUT idles.
            self._receive(byte)
        elif self._sink is not None:
            self._sink(bytes((byte,)))
        # The character left immediately: THR is empty again.
        self._thr_int = True

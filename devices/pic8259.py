"""Intel 8259A programmable interrupt controllers, cascaded as on a PC.

References: Intel 8259A datasheet (order no. 231468), sections "Programming
the 8259A" (ICW1-ICW4, OCW1-OCW3, Figures 6-9) and "Interrupt sequence";
PIIX3/PIIX4 datasheets for the ELCR registers; QEMU hw/intc/i8259.c for the
behaviour guests are tested against.

Wiring: master at ports 0x20/0x21, slave at 0xA0/0xA1, slave INT into master
IR2. ISA IRQ n is master input n (n < 8) or slave input n-8. ELCR at
0x4D0/0x4D1 selects edge (0) or level (1) triggering per input.

CPU-facing API on :class:`Pic8259Pair`: :meth:`~Pic8259Pair.set_irq` from
devices, :meth:`~Pic8259Pair.has_interrupt` (the master's INT pin) and
:meth:`~Pic8259Pair.acknowledge` (the two INTA pulses: returns the vector).

Reset: vmlab boots guests without firmware, so there is no BIOS to initialise
the PICs. Reset leaves IMR = 0xFF (all inputs masked) so a guest that sets
EFLAGS.IF before programming the PIC does not take IRQ0 as vector 0 (#DE).
ICW1 still clears IMR as the datasheet requires.

Not modelled: 8080/8085 mode (ICW4.uPM = 0 is treated as x86 mode), buffered
mode and ICW3 (the cascade is hard-wired to IR2 as on every PC).
"""

from __future__ import annotations

from typing import Callable

from vmlab.devices.bus import read_bytewise, write_bytewise
from vmlab.devices.errors import DeviceError
from vmlab.devices.irq import IrqLine

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
PIC_PORT_COUNT = 2
ELCR_PORT_COUNT = 2
CASCADE_IRQ = 2
NUM_IRQS = 16

# ELCR bits that can be set: IRQ0, 1, 2, 8 and 13 are always edge triggered
# (PIIX4 datasheet 4.1.12-13; QEMU's elcr_mask 0xf8 / 0xde).
ELCR_MASK_MASTER = 0xF8
ELCR_MASK_SLAVE = 0xDE

ICW1_IC4 = 0x01    # ICW4 needed
ICW1_SNGL = 0x02   # single (no ICW3)
ICW1_LTIM = 0x08   # level triggered mode for all inputs
ICW1_INIT = 0x10   # D4 = 1 marks ICW1 on A0 = 0
OCW3_SELECT = 0x08  # D4 = 0, D3 = 1 marks OCW3; D3 = 0 marks OCW2
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10


class Pic8259:
    """One 8259A chip. ``output(level)`` is called when INT changes."""

    def __init__(self, master: bool, elcr_mask: int,
                 output: Callable[[bool], None] | None = None) -> None:
        self.master = master
        self.elcr_mask = elcr_mask
        self._output = output
        #: level of the INT pin (a plain attribute: the run loop reads it at every exit)
        self.int_output = False
        self.elcr = 0
        self.levels = 0     # current level of the 8 IR input pins
        self.reset()

    def reset(self) -> None:
        """Power-on state (see the module docstring about IMR)."""
        self._init_state(clear_imr=False)
        self.imr = 0xFF
        self._update()

    def _init_state(self, clear_imr: bool) -> None:
        self.irr = 0
        self.isr = 0
        if clear_imr:
            self.imr = 0
        self.irq_base = 0
        self.priority_add = 0       # IR with the highest priority
        self.read_isr = False       # OCW3 RR/RIS: which of IRR/ISR A0=0 reads
        self.poll = False
        self.special_mask = False
        self.auto_eoi = False
        self.rotate_on_aeoi = False
        self.sfnm = False           # special fully nested mode
        self.ltim = False
        self.init_step = 0          # 0 ready, 1 want ICW2, 2 ICW3, 3 ICW4
        self.need_icw4 = False
        self.single = False
        self.icw3 = 0

    # -- input side ---------------------------------------------------------

    @property
    def level_mask(self) -> int:
        """Inputs currently level-triggered (ELCR, or all when ICW1.LTIM)."""
        return 0xFF if self.ltim else self.elcr

    def set_input(self, irq: int, level: bool) -> None:
        """Drive IR pin ``irq`` (0-7) to ``level``."""
        bit = 1 << irq
        old = self.levels & bit
        if level:
            self.levels |= bit
            # Level-triggered inputs request while high; edge-triggered ones
            # latch a request on the low-to-high transition only.
            if (self.level_mask & bit) or not old:
                self.irr |= bit
        else:
            self.levels &= ~bit
            if self.level_mask & bit:
                self.irr &= ~bit
        self._update()

    # -- priority logic (QEMU get_priority / pic_get_irq) -------------------

    def _priority(self, mask: int) -> int:
        """Priority (0 highest) of the best bit in ``mask``; 8 if none."""
        if mask == 0:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def pending_irq(self) -> int:
        """IR the chip would signal now, or -1."""
        mask = self.irr & ~self.imr
        prio = self._priority(mask)
        if prio == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            # Special mask mode: masked in-service levels do not inhibit.
            in_service &= ~self.imr
        if self.sfnm and self.master:
            # SFNM: the cascade input may interrupt its own in-service level.
            in_service &= ~(1 << CASCADE_IRQ)
        if prio < self._priority(in_service):
            return (prio + self.priority_add) & 7
        return -1

    def _update(self) -> None:
        level = self.pending_irq() >= 0
        if level != self.int_output:
            self.int_output = level
            if self._output is not None:
                self._output(level)

    def intack(self, irq: int) -> None:
        """INTA for ``irq``: set ISR (unless AEOI), clear edge IRR."""
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_aeoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        # A level-triggered request stays in IRR while the pin is high.
        if not self.level_mask & bit:
            self.irr &= ~bit
        self._update()

    # -- register interface ---------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Bus read of the chip's two ports."""
        return read_bytewise(self._read_port, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Bus write of the chip's two ports."""
        write_bytewise(self._write_port, offset, size, value)

    def _read_port(self, a0: int) -> int:
        if self.poll:
            # Poll command: the read is the INTA; I bit 7 plus the level.
            self.poll = False
            irq = self.pending_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if a0 & 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def _write_port(self, a0: int, value: int) -> None:
        if a0 & 1 == 0:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_SELECT:
                self._ocw3(value)
            else:
                self._ocw2(value)
            return
        if self.init_step == 0:
            self.imr = value  # OCW1
            self._update()
        elif self.init_step == 1:
            self.irq_base = value & 0xF8  # ICW2: T7-T3
            if not self.single:
                self.init_step = 2
            else:
                self.init_step = 3 if self.need_icw4 else 0
        elif self.init_step == 2:
            self.icw3 = value
            self.init_step = 3 if self.need_icw4 else 0
        else:
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.sfnm = bool(value & ICW4_SFNM)
            self.init_step = 0
            # SFNM changes what the priority resolver lets through (an
            # in-service cascade input no longer blocks its own level)
            self._update()

    def _icw1(self, value: int) -> None:
        # Datasheet: the edge sense circuit is reset (a new low-to-high
        # transition is needed), IMR is cleared, IR7 gets lowest priority,
        # special mask mode is cleared, status read is set to IRR, and
        # without IC4 all ICW4 functions are zero.
        self._init_state(clear_imr=True)
        self.need_icw4 = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.ltim = bool(value & ICW1_LTIM)
        # Level-triggered inputs that are high request again at once.
        self.irr = self.levels & self.level_mask
        self.init_step = 1
        self._update()

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5  # R, SL, EOI
        level = value & 7
        if cmd in (0b000, 0b100):      # clear / set rotate in AEOI mode
            self.rotate_on_aeoi = cmd == 0b100
        elif cmd in (0b001, 0b101):    # non-specific EOI (with rotate)
            prio = self._priority(self.isr)
            if prio != 8:
                irq = (prio + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if cmd == 0b101:
                    self.priority_add = (irq + 1) & 7
        elif cmd == 0b011:             # specific EOI
            self.isr &= ~(1 << level)
        elif cmd == 0b110:             # set priority: L2-L0 becomes lowest
            self.priority_add = (level + 1) & 7
        elif cmd == 0b111:             # rotate on specific EOI
            self.isr &= ~(1 << level)
            self.priority_add = (level + 1) & 7
        # 0b010: no operation.
        self._update()

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)
        self._update()

    def write_elcr(self, value: int) -> None:
        """Set the edge/level control register (reserved bits stay 0)."""
        self.elcr = value & self.elcr_mask
        # Inputs switched to level follow their pin; edge inputs keep IRR.
        self.irr = (self.irr & ~self.elcr) | (self.levels & self.level_mask)
        self._update()


class ElcrPorts:
    """The two ELCR ports (0x4D0 master, 0x4D1 slave) as one bus device."""

    def __init__(self, master: Pic8259, slave: Pic8259) -> None:
        self._chips = (master, slave)

    def read(self, offset: int, size: int) -> int:
        """Read ELCR1/ELCR2."""
        return read_bytewise(
            lambda o: self._chips[o].elcr if 0 <= o < 2 else 0xFF, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ELCR1/ELCR2."""
        def _one(o: int, v: int) -> None:
            if 0 <= o < 2:
                self._chips[o].write_elcr(v)
        write_bytewise(_one, offset, size, value)


class Pic8259Pair:
    """Master and slave 8259A as wired on a PC/AT.

    ``intr`` (optional) follows the master's INT output, for a VMM that wants
    to be told rather than poll :meth:`has_interrupt`.
    """

    def __init__(self, intr: IrqLine | None = None) -> None:
        self._intr = intr
        self.master = Pic8259(True, ELCR_MASK_MASTER, self._master_output)
        self.slave = Pic8259(False, ELCR_MASK_SLAVE, self._slave_output)
        self.elcr = ElcrPorts(self.master, self.slave)

    def _master_output(self, level: bool) -> None:
        if self._intr is not None:
            self._intr.set_level(level)

    def _slave_output(self, level: bool) -> None:
        self.master.set_input(CASCADE_IRQ, level)

    def attach(self, io_bus) -> None:
        """Register the PIC and ELCR ports at their PC addresses."""
        io_bus.register(MASTER_PORT, PIC_PORT_COUNT, self.master, "pic-master")
        io_bus.register(SLAVE_PORT, PIC_PORT_COUNT, self.slave, "pic-slave")
        io_bus.register(ELCR_PORT, ELCR_PORT_COUNT, self.elcr, "elcr")

    def reset(self) -> None:
        """Reset both chips (ELCR cleared, as PIIX reset does)."""
        for chip in (self.master, self.slave):
            chip.elcr = 0
            chip.reset()

    # -- CPU / device facing ----------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15) to ``level``."""
        if not 0 <= irq < NUM_IRQS:
            raise DeviceError(f"8259: no IRQ {irq}")
        if irq < 8:
            self.master.set_input(irq, level)
        else:
            self.slave.set_input(irq - 8, level)

    def has_interrupt(self) -> bool:
        """True while the master's INT pin is asserted."""
        return self.master.int_output

    def acknowledge(self) -> int:
        """Run the INTA cycle and return the vector the PIC puts on the bus.

        If the request went away between INT and INTA, the chip answers with
        its IR7 vector (a spurious interrupt) without setting ISR; a spurious
        slave interrupt still sets the master's ISR bit 2 (datasheet; QEMU
        pic_read_irq), so the guest must EOI the master.
        """
        irq = self.master.pending_irq()
        if irq < 0:
            return self.master.irq_base + 7
        if irq == CASCADE_IRQ:
            irq2 = self.slave.pending_irq()
            if irq2 >= 0:
                self.slave.intack(irq2)
                vector = self.slave.irq_base + irq2
            else:
                vector = self.slave.irq_base + 7
        else:
            vector = self.master.irq_base + irq
        self.master.intack(irq)
        return vector

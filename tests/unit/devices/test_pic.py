"""Tests of devices.pic8259 programmed through its ports as Linux does."""

from hypothesis import example, given, settings, strategies as st

from vmlab.devices.bus import IO_LIMIT, Bus
from vmlab.devices.irq import IrqLine, line_to
from vmlab.devices.pic8259 import Pic8259Pair


class Machine:
    def __init__(self, init=True, icw4=0x01):
        self.intr_levels = []
        self.pic = Pic8259Pair(IrqLine(self.intr_levels.append))
        self.bus = Bus("io", IO_LIMIT)
        self.pic.attach(self.bus)
        if init:
            self.init(icw4)

    def outb(self, port, value):
        self.bus.write(port, 1, value)

    def inb(self, port):
        return self.bus.read(port, 1)

    def init(self, icw4=0x01):
        # Linux init_8259A(): ICW1 edge+ICW4, ICW2 base, ICW3 cascade, ICW4.
        self.outb(0x20, 0x11)
        self.outb(0x21, 0x20)
        self.outb(0x21, 0x04)
        self.outb(0x21, icw4)
        self.outb(0xA0, 0x11)
        self.outb(0xA1, 0x28)
        self.outb(0xA1, 0x02)
        self.outb(0xA1, icw4)

    def isr(self, port):
        self.outb(port, 0x0B)
        value = self.inb(port)
        self.outb(port, 0x0A)
        return value

    def irr(self, port):
        self.outb(port, 0x0A)
        return self.inb(port)


def test_pic_reset_masks_all_and_icw1_clears_imr():
    m = Machine(init=False)
    assert m.inb(0x21) == 0xFF and m.inb(0xA1) == 0xFF
    m.init()
    assert m.inb(0x21) == 0x00 and m.inb(0xA1) == 0x00


def test_pic_ocw1_sets_and_reads_back_imr():
    m = Machine()
    m.outb(0x21, 0xFB)
    m.outb(0xA1, 0x7F)
    assert (m.inb(0x21), m.inb(0xA1)) == (0xFB, 0x7F)


def test_pic_irq1_acknowledge_returns_base_plus_one_and_sets_isr():
    m = Machine()
    m.pic.set_irq(1, True)
    assert m.pic.has_interrupt()
    assert m.intr_levels[-1] is True
    assert m.irr(0x20) == 0x02
    assert m.pic.acknowledge() == 0x21
    assert m.isr(0x20) == 0x02
    assert m.irr(0x20) == 0x00
    assert not m.pic.has_interrupt()
    m.outb(0x20, 0x20)                 # non-specific EOI
    assert m.isr(0x20) == 0x00


def test_pic_masked_irq_not_signalled_until_unmasked():
    m = Machine()
    m.outb(0x21, 0x01)
    m.pic.set_irq(0, True)
    assert not m.pic.has_interrupt()
    assert m.irr(0x20) == 0x01
    m.outb(0x21, 0x00)
    assert m.pic.has_interrupt()
    assert m.pic.acknowledge() == 0x20


def test_pic_lower_priority_waits_for_eoi_higher_preempts():
    m = Machine()
    m.pic.set_irq(3, True)
    assert m.pic.acknowledge() == 0x23
    m.pic.set_irq(5, True)
    assert not m.pic.has_interrupt()   # IR5 below in-service IR3
    m.pic.set_irq(1, True)
    assert m.pic.has_interrupt()       # IR1 above IR3: nests
    assert m.pic.acknowledge() == 0x21
    m.outb(0x20, 0x20)                 # EOI clears IR1 (highest in service)
    assert m.isr(0x20) == 0x08
    m.outb(0x20, 0x20)
    assert m.pic.acknowledge() == 0x25


def test_pic_simultaneous_requests_lowest_number_wins():
    m = Machine()
    m.pic.set_irq(4, True)
    m.pic.set_irq(0, True)
    assert m.pic.acknowledge() == 0x20


def test_pic_specific_eoi_clears_named_level():
    m = Machine()
    m.pic.set_irq(6, True)
    m.pic.acknowledge()
    m.outb(0x20, 0x60 | 2)             # specific EOI for IR2: nothing
    assert m.isr(0x20) == 0x40
    m.outb(0x20, 0x60 | 6)
    assert m.isr(0x20) == 0x00


def test_pic_cascade_irq10_vector_and_both_isrs():
    m = Machine()
    m.pic.set_irq(10, True)
    assert m.pic.has_interrupt()
    assert m.pic.acknowledge() == 0x2A
    assert m.isr(0xA0) == 0x04
    assert m.isr(0x20) == 0x04
    m.outb(0xA0, 0x20)
    m.outb(0x20, 0x20)
    assert m.isr(0xA0) == 0 and m.isr(0x20) == 0


def test_pic_edge_input_held_high_does_not_retrigger():
    m = Machine()
    m.pic.set_irq(4, True)
    m.pic.acknowledge()
    m.outb(0x20, 0x20)
    m.pic.set_irq(4, True)             # still high: no new edge
    assert not m.pic.has_interrupt()
    m.pic.set_irq(4, False)
    m.pic.set_irq(4, True)
    assert m.pic.has_interrupt()


def test_pic_level_input_via_elcr_retriggers_while_high():
    m = Machine()
    m.outb(0x4D1, 0x08)                # IRQ11 level triggered
    m.pic.set_irq(11, True)
    assert m.pic.acknowledge() == 0x2B
    m.outb(0xA0, 0x20)
    m.outb(0x20, 0x20)
    assert m.pic.has_interrupt()       # line still high
    assert m.irr(0xA0) == 0x08
    m.pic.set_irq(11, False)
    assert m.irr(0xA0) == 0x00         # level request follows the pin


def test_pic_elcr_reserved_bits_read_zero():
    m = Machine()
    m.outb(0x4D0, 0xFF)
    m.outb(0x4D1, 0xFF)
    assert (m.inb(0x4D0), m.inb(0x4D1)) == (0xF8, 0xDE)


def test_pic_vanished_level_request_gives_spurious_irq7():
    m = Machine()
    m.outb(0x4D0, 0x20)                # IRQ5 level
    m.pic.set_irq(5, True)
    assert m.pic.has_interrupt()
    m.pic.set_irq(5, False)
    assert m.pic.acknowledge() == 0x27
    assert m.isr(0x20) == 0x00


def test_pic_vanished_slave_request_gives_irq15_and_master_isr2():
    m = Machine()
    m.outb(0x4D1, 0x08)                # IRQ11 level
    m.pic.set_irq(11, True)
    m.pic.set_irq(11, False)
    # The slave's INT went away but the master latched the IR2 edge.
    assert m.pic.has_interrupt()
    assert m.pic.acknowledge() == 0x2F
    assert m.isr(0xA0) == 0x00
    assert m.isr(0x20) == 0x04


def test_pic_auto_eoi_leaves_isr_clear():
    m = Machine(icw4=0x03)
    m.pic.set_irq(3, True)
    assert m.pic.acknowledge() == 0x23
    assert m.isr(0x20) == 0x00


def test_pic_rotate_on_nonspecific_eoi_makes_serviced_level_lowest():
    m = Machine()
    m.pic.set_irq(0, True)
    m.pic.acknowledge()
    m.outb(0x20, 0xA0)                 # rotate on non-specific EOI
    m.pic.set_irq(0, False)
    m.pic.set_irq(0, True)
    m.pic.set_irq(1, True)
    assert m.pic.acknowledge() == 0x21  # IR1 is now highest priority


def test_pic_poll_command_returns_level_and_acknowledges():
    m = Machine()
    m.pic.set_irq(6, True)
    m.outb(0x20, 0x0C)                 # OCW3 poll
    assert m.inb(0x20) == 0x86
    assert m.isr(0x20) == 0x40
    m.outb(0x20, 0x0C)
    assert m.inb(0x20) == 0x00         # nothing requesting: I bit clear


def test_pic_line_to_helper_drives_pic_input():
    m = Machine()
    line = line_to(m.pic, 4)
    line.set_level(True)
    assert m.pic.acknowledge() == 0x24


def test_pic_icw2_low_bits_ignored():
    m = Machine(init=False)
    m.outb(0x20, 0x11)
    m.outb(0x21, 0x37)
    m.outb(0x21, 0x04)
    m.outb(0x21, 0x01)
    m.pic.set_irq(0, True)
    assert m.pic.acknowledge() == 0x30


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("out"), st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
              st.integers(0, 255)),
    st.tuples(st.just("in"), st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
              st.just(0)),
    st.tuples(st.just("irq"), st.integers(0, 15), st.booleans()),
    st.tuples(st.just("ack"), st.just(0), st.just(0)),
), max_size=80))
@example(ops=[("out", 0x20, 0x1D), ("out", 0xA1, 0), ("irq", 8, True), ("ack", 0, 0), ("out", 0x21, 0),
              ("out", 0x21, 0), ("out", 0xA0, 0x18), ("out", 0x21, 0x10)])   # ICW4.SFNM with the cascade in service
def test_pic_random_programming_never_raises_and_keeps_invariants(ops):
    m = Machine(init=False)
    for kind, a, b in ops:
        if kind == "out":
            m.outb(a, b)
        elif kind == "in":
            assert 0 <= m.inb(a) <= 0xFF
        elif kind == "irq":
            m.pic.set_irq(a, b)
        else:
            vector = m.pic.acknowledge()
            assert 0 <= vector <= 0xFF
            assert vector & 7 == vector % 8
        for chip in (m.pic.master, m.pic.slave):
            assert 0 <= chip.irr <= 0xFF and 0 <= chip.isr <= 0xFF
            assert chip.elcr & ~chip.elcr_mask == 0
        assert m.pic.has_interrupt() == (m.pic.master.pending_irq() >= 0)

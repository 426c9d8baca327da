"""I/O APIC register model (devices/ioapic.py; Intel 82093AA datasheet §3)."""
from vmlab.devices.ioapic import IOAPIC_PINS, IoApic, IsaIrqRouter

LEVEL, MASKED, LOW, RIRR = 1 << 15, 1 << 16, 1 << 13, 1 << 14


def make():
    sent = []
    io = IoApic(lambda dest, logical, mode, vector, level: sent.append((dest, logical, mode, vector, level)))
    return io, sent


def rte(io, pin, low, high=0):
    io.write_register(0x10 + 2 * pin + 1, high)
    io.write_register(0x10 + 2 * pin, low)


def test_ioapic_version_register_reports_0x11_and_23_entries():
    io, _ = make()
    assert io.read_register(1) == (23 << 16) | 0x11


def test_ioapic_id_register_keeps_bits_27_24():
    io, _ = make()
    io.write(0x00, 4, 0)
    io.write(0x10, 4, 0x0F00_0000 | 0x1234)
    assert io.read(0x10, 4) == 0x0F00_0000


def test_ioapic_entries_reset_masked_and_masked_edge_is_lost():
    io, sent = make()
    assert all(io.read_register(0x10 + 2 * p) & MASKED for p in range(IOAPIC_PINS))
    io.set_irq(4, True)
    rte(io, 4, 0x34)                  # unmask after the edge: nothing (edge entries do not latch)
    assert sent == []


def test_ioapic_edge_entry_sends_on_rising_edge_only():
    io, sent = make()
    rte(io, 4, 0x34, 0x01 << 24)
    io.set_irq(4, True)
    io.set_irq(4, True)
    io.set_irq(4, False)
    assert sent == [(1, False, 0, 0x34, False)]


def test_ioapic_level_entry_sets_remote_irr_until_eoi_then_resends_if_still_active():
    io, sent = make()
    rte(io, 10, LEVEL | 0x41)
    io.set_irq(10, True)
    io.set_irq(10, True)
    assert len(sent) == 1 and io.read_register(0x10 + 20) & RIRR
    io.eoi(0x41)
    assert len(sent) == 2             # still asserted: sent again
    io.set_irq(10, False)
    io.eoi(0x41)
    assert len(sent) == 2 and not io.read_register(0x10 + 20) & RIRR


def test_ioapic_eoi_of_another_vector_leaves_remote_irr():
    io, sent = make()
    rte(io, 10, LEVEL | 0x41)
    io.set_irq(10, True)
    io.eoi(0x42)
    assert io.read_register(0x10 + 20) & RIRR and len(sent) == 1


def test_ioapic_unmasking_an_active_level_pin_sends():
    io, sent = make()
    rte(io, 5, LEVEL | MASKED | 0x50)
    io.set_irq(5, True)
    assert sent == []
    rte(io, 5, LEVEL | 0x50)
    assert [s[3] for s in sent] == [0x50]


def test_ioapic_active_low_pin_is_active_when_low():
    io, sent = make()
    rte(io, 3, LOW | 0x60)
    io.set_irq(3, True)
    io.set_irq(3, False)
    assert [s[3] for s in sent] == [0x60]


def test_ioapic_remote_irr_and_delivery_status_are_read_only():
    io, _ = make()
    rte(io, 7, RIRR | (1 << 12) | 0x70)
    assert io.read_register(0x10 + 14) == 0x70


def test_ioapic_out_of_range_pin_and_register_are_ignored():
    io, sent = make()
    io.set_irq(99, True)
    io.write_register(0x70, 0xFFFFFFFF)
    assert io.read_register(0x70) == 0 and sent == []


def test_isa_router_sends_irq0_to_pin2_and_others_to_the_same_pin():
    class Pic:
        def __init__(self):
            self.calls = []

        def set_irq(self, irq, level):
            self.calls.append((irq, level))
    io, sent = make()
    rte(io, 2, 0x30)
    rte(io, 4, 0x34)
    pic = Pic()
    r = IsaIrqRouter(pic, io)
    r.set_irq(0, True)
    r.set_irq(4, True)
    assert pic.calls == [(0, True), (4, True)] and [s[3] for s in sent] == [0x30, 0x34]

"""virtio-mmio transport (virtio 1.2 §4.2.2, version 2): registers, feature
negotiation, the status state machine, queues, notifications and interrupts,
DEVICE_NEEDS_RESET on a broken ring."""
import pytest

from vmlab.devices.virtio.device import (ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK,
                                   VIRTIO_F_VERSION_1, VirtioDevice)
from vmlab.devices.virtio.mmio import MAGIC, MmioTransport
from vmlab.emu.memory import GuestMemory
from virtio_driver import FakeIrq, MockDriver, mmio_init


class EchoDevice(VirtioDevice):
    """One queue; every chain is returned with used length = readable bytes."""
    device_id = 42
    num_queues = 2
    queue_max_size = 64

    def __init__(self):
        super().__init__()
        self.cfg = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")

    def config(self):
        return bytes(self.cfg)

    def notify(self, index):
        q = self.queues[index]
        chains = q.pop_all()
        q.push_used([(c.head, c.read_len) for c in chains])
        if q.needs_notification():
            self.signal_used(index)


@pytest.fixture
def dev():
    mem = GuestMemory(1 << 20)
    irq = FakeIrq()
    d = EchoDevice()
    t = MmioTransport(d, mem, irq)
    yield mem, irq, d, t
    mem.close()


def test_mmio_identification_registers_read_spec_values(dev):
    mem, irq, d, t = dev
    assert t.read(0x000, 4) == MAGIC == 0x74726976
    assert t.read(0x004, 4) == 2
    assert t.read(0x008, 4) == 42
    t.write(0x14, 4, 1)
    assert t.read(0x10, 4) & 1          # VIRTIO_F_VERSION_1 is bit 32
    assert t.read(0x000, 2) == 0        # not a 32-bit access: ignored
    assert t.read(0x100, 4) == 0x44332211 and t.read(0x104, 1) == 0x55


def test_mmio_queue_num_max_zero_for_missing_queue(dev):
    mem, irq, d, t = dev
    t.write(0x30, 4, 0)
    assert t.read(0x34, 4) == 64
    t.write(0x30, 4, 7)
    assert t.read(0x34, 4) == 0


def test_mmio_features_without_version_1_refuse_features_ok(dev):
    mem, irq, d, t = dev
    st = mmio_init(t, features=0)
    assert st == ACKNOWLEDGE | DRIVER         # FEATURES_OK did not stick
    assert not d.active


def test_mmio_features_not_offered_refuse_features_ok(dev):
    mem, irq, d, t = dev
    st = mmio_init(t, features=(1 << VIRTIO_F_VERSION_1) | (1 << 3))
    assert not st & FEATURES_OK


def test_mmio_driver_ok_activates_and_notify_completes_chain(dev):
    mem, irq, d, t = dev
    q0 = MockDriver(mem, 8)
    assert mmio_init(t, queues=[q0]) == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert d.active and t.read(0x44, 4) == 1
    q0.publish([q0.add_chain([(0x50000, 100, False), (0x51000, 10, True)])])
    t.write(0x50, 4, 0)
    assert q0.take_used() == [(0, 100)]
    assert irq.level and t.read(0x60, 4) == 1
    t.write(0x64, 4, 1)
    assert not irq.level and t.read(0x60, 4) == 0


def test_mmio_notify_before_driver_ok_is_ignored(dev):
    mem, irq, d, t = dev
    q0 = MockDriver(mem, 8)
    q0.publish([q0.add_chain([(0x50000, 100, False)])])
    t.write(0x50, 4, 0)
    assert q0.used_idx() == 0 and not irq.level


def test_mmio_broken_ring_sets_needs_reset_and_config_interrupt(dev):
    mem, irq, d, t = dev
    q0 = MockDriver(mem, 8)
    mmio_init(t, queues=[q0])
    mem.write_int(q0.AVAIL + 2, 2, 100)        # idx 100 entries ahead of an 8-entry ring
    t.write(0x50, 4, 0)
    assert t.read(0x70, 4) & DEVICE_NEEDS_RESET
    assert t.read(0x60, 4) == 2 and irq.level
    assert "ahead" in t.error
    t.write(0x70, 4, 0)                        # reset clears everything
    assert t.read(0x70, 4) == 0 and t.read(0x60, 4) == 0 and not irq.level and not d.active
    assert t.read(0x44, 4) == 0


def test_mmio_rings_outside_ram_at_driver_ok_need_reset(dev):
    mem, irq, d, t = dev
    q0 = MockDriver(mem, 8)
    q0.USED = (1 << 20) - 16
    mmio_init(t, queues=[q0])
    assert t.read(0x70, 4) & DEVICE_NEEDS_RESET and not d.active


def test_mmio_queue_registers_frozen_while_ready(dev):
    mem, irq, d, t = dev
    q0 = MockDriver(mem, 8)
    mmio_init(t, queues=[q0])
    t.write(0x30, 4, 0)
    t.write(0x80, 4, 0x9000)
    assert t.read(0x80, 4) == q0.DESC


def test_mmio_config_generation_changes_on_config_signal(dev):
    mem, irq, d, t = dev
    mmio_init(t, queues=[MockDriver(mem, 8)])
    g = t.read(0xFC, 4)
    d.signal_config()
    assert t.read(0xFC, 4) != g and t.read(0x60, 4) & 2

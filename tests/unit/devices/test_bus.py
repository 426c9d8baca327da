"""Tests of devices.bus: registration rules, dispatch by offset, unclaimed I/O."""

import pytest
from hypothesis import given, settings, strategies as st

from vmlab.devices.bus import IO_LIMIT, MMIO_LIMIT, UNCLAIMED_TRACK_LIMIT, Bus, BusDevice
from vmlab.devices.errors import BusError


class Recorder:
    """A device that records accesses and reads back a fixed pattern."""

    def __init__(self, pattern=0x11223344AABBCCDD):
        self.pattern = pattern
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.pattern

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


class ByteRegs:
    """Byte registers whose value is their own offset plus 0x10."""

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return sum((0x10 + offset + i) << (8 * i) for i in range(size))

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_bus_device_protocol_recorder_is_bus_device():
    assert isinstance(Recorder(), BusDevice)


def test_bus_read_inside_range_passes_offset_not_address():
    bus = Bus("io", IO_LIMIT)
    dev = Recorder()
    bus.register(0x3F8, 8, dev, "com1")
    bus.read(0x3FD, 1)
    bus.write(0x3F8, 1, 0x41)
    assert dev.log == [("r", 5, 1), ("w", 0, 1, 0x41)]


def test_bus_read_result_masked_to_access_size():
    bus = Bus("io", IO_LIMIT)
    bus.register(0x60, 4, Recorder(), "dev")
    assert bus.read(0x60, 1) == 0xDD
    assert bus.read(0x60, 2) == 0xCCDD
    assert bus.read(0x60, 4) == 0xAABBCCDD


def test_bus_write_value_masked_to_access_size():
    bus = Bus("io", IO_LIMIT)
    dev = Recorder()
    bus.register(0x60, 4, dev, "dev")
    bus.write(0x60, 2, 0x12345678)
    assert dev.log == [("w", 0, 2, 0x5678)]


@pytest.mark.parametrize("size,expected", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF),
                                           (8, 0xFFFFFFFFFFFFFFFF)])
def test_bus_unclaimed_read_returns_all_ones_of_size(size, expected):
    bus = Bus("io", IO_LIMIT)
    assert bus.read(0x80, size) == expected
    assert bus.unclaimed[0x80] == 1


def test_bus_unclaimed_write_is_dropped_and_counted():
    bus = Bus("io", IO_LIMIT)
    dev = Recorder()
    bus.register(0x90, 1, dev, "dev")
    bus.write(0x80, 1, 0)
    bus.write(0x80, 1, 0)
    assert dev.log == []
    assert bus.unclaimed[0x80] == 2


def test_bus_unclaimed_tracking_bounded():
    bus = Bus("mmio", MMIO_LIMIT)
    for addr in range(UNCLAIMED_TRACK_LIMIT + 10):
        bus.read(addr * 0x1000, 4)
    assert len(bus.unclaimed) == UNCLAIMED_TRACK_LIMIT
    assert bus.unclaimed_untracked == 10


def test_bus_register_overlap_rejected_naming_both_devices():
    bus = Bus("io", IO_LIMIT)
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(BusError) as err:
        bus.register(0x3FF, 2, Recorder(), "intruder")
    assert "com1" in str(err.value) and "intruder" in str(err.value)


def test_bus_register_adjacent_ranges_accepted():
    bus = Bus("io", IO_LIMIT)
    bus.register(0x40, 4, Recorder(), "a")
    bus.register(0x44, 4, Recorder(), "b")
    bus.register(0x3C, 4, Recorder(), "c")
    assert len(bus) == 3


@pytest.mark.parametrize("base,size", [(0x10, 0), (0x10, -1), (0xFFFF, 2),
                                       (-1, 1), (IO_LIMIT, 1)])
def test_bus_register_bad_range_rejected(base, size):
    bus = Bus("io", IO_LIMIT)
    with pytest.raises(BusError):
        bus.register(base, size, Recorder(), "bad")


def test_bus_mmio_limit_allows_top_of_64bit_space():
    bus = Bus("mmio", MMIO_LIMIT)
    bus.register(MMIO_LIMIT - 0x1000, 0x1000, Recorder(), "top")
    assert bus.find(MMIO_LIMIT - 1) is not None


def test_bus_find_boundaries_exact():
    bus = Bus("io", IO_LIMIT)
    dev = Recorder()
    rng = bus.register(0x20, 2, dev, "pic")
    assert bus.find(0x1F) is None
    assert bus.find(0x20) == (rng, dev)
    assert bus.find(0x21) == (rng, dev)
    assert bus.find(0x22) is None


def test_bus_unregister_frees_range_for_reuse():
    bus = Bus("io", IO_LIMIT)
    dev = Recorder()
    bus.register(0x20, 2, dev, "pic")
    assert bus.unregister(dev) == 1
    assert bus.read(0x20, 1) == 0xFF
    bus.register(0x20, 2, Recorder(), "again")


def test_bus_unregister_unknown_device_raises():
    bus = Bus("io", IO_LIMIT)
    with pytest.raises(BusError):
        bus.unregister(Recorder())


def test_bus_straddling_read_split_bytewise_with_ones_for_gap():
    bus = Bus("io", IO_LIMIT)
    bus.register(0x100, 2, ByteRegs(), "a")   # bytes 0x10, 0x11
    bus.register(0x103, 1, ByteRegs(), "b")   # byte 0x10
    # 0x100..0x103: a[0], a[1], unclaimed, b[0]
    assert bus.read(0x100, 4) == 0x10FF1110
    assert bus.unclaimed[0x102] == 1


def test_bus_straddling_write_split_bytewise_low_byte_first():
    bus = Bus("io", IO_LIMIT)
    a = ByteRegs()
    b = ByteRegs()
    bus.register(0x101, 1, a, "a")
    bus.register(0x102, 1, b, "b")
    bus.write(0x100, 4, 0x44332211)
    assert a.writes == [(0, 1, 0x22)]
    assert b.writes == [(0, 1, 0x33)]
    assert bus.unclaimed[0x100] == 1 and bus.unclaimed[0x103] == 1


def test_bus_read_past_limit_reads_ones():
    bus = Bus("io", IO_LIMIT)
    bus.register(0xFFFE, 2, ByteRegs(), "top")
    assert bus.read(0xFFFE, 4) == 0xFFFF1110


ranges = st.lists(st.tuples(st.integers(0, 0x3FF), st.integers(1, 0x40)),
                  max_size=40)


@settings(max_examples=100, deadline=None)
@given(ranges)
def test_bus_random_registrations_never_accept_overlap(candidates):
    bus = Bus("io", 0x400)
    accepted = []
    for base, size in candidates:
        clash = any(base < b + s and b < base + size for b, s in accepted)
        out_of_limit = base + size > 0x400
        try:
            bus.register(base, size, Recorder(), f"d{base:x}")
        except BusError:
            assert clash or out_of_limit
        else:
            assert not clash and not out_of_limit
            accepted.append((base, size))
    # find() agrees with a brute-force scan at every address.
    for addr in range(0, 0x400, 7):
        owners = [b for b, s in accepted if b <= addr < b + s]
        hit = bus.find(addr)
        assert (hit is None) == (not owners)
        if hit:
            assert hit[0].base == owners[0]

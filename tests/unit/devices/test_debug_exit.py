"""Tests of devices.debug_exit against QEMU's isa-debug-exit semantics."""

import pytest

from vmlab.devices.bus import IO_LIMIT, Bus
from vmlab.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit


def make():
    statuses = []
    bus = Bus("io", IO_LIMIT)
    bus.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit(statuses.append),
                 "debug-exit")
    return bus, statuses


def test_debug_exit_port_is_qemu_test_convention():
    assert (DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE) == (0xF4, 4)


@pytest.mark.parametrize("size,value,status", [
    (1, 0x00, 0x01),
    (1, 0x10, 0x21),
    (2, 0x1234, 0x2469),
    (4, 0x7FFFFFFF, 0xFFFFFFFF),
])
def test_debug_exit_write_reports_value_shifted_or_one(size, value, status):
    bus, statuses = make()
    bus.write(DEBUG_EXIT_PORT, size, value)
    assert statuses == [status]


def test_debug_exit_write_any_offset_exits():
    bus, statuses = make()
    bus.write(DEBUG_EXIT_PORT + 3, 1, 1)
    assert statuses == [3]


def test_debug_exit_read_returns_zero_without_exit():
    bus, statuses = make()
    assert bus.read(DEBUG_EXIT_PORT, 4) == 0
    assert bus.read(DEBUG_EXIT_PORT, 1) == 0
    assert statuses == []

"""Platform devices of vmlab: buses, clocks, interrupt controllers, timers, UART.

``devices`` depends only on itself and the standard library; the VMM wires the
models to the CPU and to host I/O.
"""

from vmlab.devices.bus import Bus, BusDevice, BusRange, IO_LIMIT, MMIO_LIMIT
from vmlab.devices.clock import Clock, ManualClock, Timer, TimerQueue
from vmlab.devices.debug_exit import DebugExit
from vmlab.devices.errors import BusError, DeviceError
from vmlab.devices.fw_cfg import FwCfg
from vmlab.devices.irq import IrqLine, line_to
from vmlab.devices.lapic import LocalApic
from vmlab.devices.pic8259 import Pic8259, Pic8259Pair
from vmlab.devices.pit8254 import Pit8254
from vmlab.devices.uart16550 import Uart16550

__all__ = [
    "Bus", "BusDevice", "BusError", "BusRange", "Clock", "DebugExit",
    "DeviceError", "FwCfg", "IO_LIMIT", "IrqLine", "LocalApic", "MMIO_LIMIT",
    "ManualClock", "Pic8259", "Pic8259Pair", "Pit8254", "Timer", "TimerQueue",
    "Uart16550", "line_to",
]

"""Platform devices of vmlab: buses, clocks, interrupt controllers, timers, UART.

``devices`` depends only on itself and the standard library; the VMM wires the
models to the CPU and to host I/O.
"""

from devices.bus import Bus, BusDevice, BusRange, IO_LIMIT, MMIO_LIMIT
from devices.clock import Clock, ManualClock, Timer, TimerQueue
from devices.debug_exit import DebugExit
from devices.errors import BusError, DeviceError
from devices.fw_cfg import FwCfg
from devices.irq import IrqLine, line_to
from devices.lapic import LocalApic
from devices.pic8259 import Pic8259, Pic8259Pair
from devices.pit8254 import Pit8254
from devices.uart16550 import Uart16550

__all__ = [
    "Bus", "BusDevice", "BusError", "BusRange", "Clock", "DebugExit",
    "DeviceError", "FwCfg", "IO_LIMIT", "IrqLine", "LocalApic", "MMIO_LIMIT",
    "ManualClock", "Pic8259", "Pic8259Pair", "Pit8254", "Timer", "TimerQueue",
    "Uart16550", "line_to",
]

"""The two PC reset paths a kernel uses to reboot (or a test kernel to end):

* the 8042 keyboard controller's "pulse output port" command 0xFE written to
  its command port 0x64, which pulses the CPU's RESET line (IBM PC/AT
  Technical Reference, 8042 commands; Linux ``reboot=k``);
* the Reset Control Register at port 0xCF9 (Intel PCH datasheets, "Reset
  Control Register (RST_CNT)"; QEMU hw/isa/piix.c ``rcr_write``): a write with
  bit 2 (RST_CPU) set resets the machine, bit 1 (SYS_RST) chooses a hard reset.

Neither device models more than that.  The 8042 model sits at port 0x64 only
and answers status reads with 0 (output and input buffers empty), so a kernel
polling "input buffer full" (bit 1) before sending 0xFE does not spin forever;
its data port 0x60 stays unclaimed (reads all ones).  The reset itself is the VMM's job:
``on_reset(why)`` is called with a one-line description.
"""
from __future__ import annotations

from typing import Callable

KBC_COMMAND_PORT = 0x64
KBC_PULSE_RESET = 0xFE
RESET_CONTROL_PORT = 0xCF9
RST_CPU = 1 << 2


class Kbc8042Reset:
    """Port 0x64 (register it with size 1): reset on command 0xFE."""

    def __init__(self, on_reset: Callable[[str], object]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and (value & 0xFF) == KBC_PULSE_RESET:
            self._on_reset("keyboard controller reset (port 0x64 <- 0xfe)")


class ResetControl:
    """Port 0xCF9: a write with RST_CPU set resets the machine."""

    def __init__(self, on_reset: Callable[[str], object]) -> None:
        self._on_reset = on_reset
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        self.value = value & ~RST_CPU & 0xFF
        if value & RST_CPU:
            self._on_reset(f"reset control register (port 0xcf9 <- {value:#x})")

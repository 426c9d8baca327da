"""QEMU's isa-debug-exit device: lets a test guest end the run with a status.

Model of QEMU hw/misc/debugexit.c. QEMU's own defaults are iobase 0x501,
iosize 2; test suites conventionally run it as
``-device isa-debug-exit,iobase=0xf4,iosize=0x04``, which is what vmlab maps.

Write: QEMU's ``debug_exit_write`` ignores the offset and the width and calls
``exit((val << 1) | 1)`` with the written value. Here ``on_exit`` receives that
same status; the VMM decides what to do with it (a host process exit status
keeps only its low 8 bits, so a guest writing 0x10 makes QEMU exit with 0x21).

Read: QEMU's ``debug_exit_ops`` has no read callback. ``memory_region_dispatch_read1``
zero-fills the result before finding no accessor (it then returns MEMTX_ERROR,
which port I/O discards), so a guest ``in`` from the port reads 0, not
all-ones. This model does the same.
"""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_PORT = 0xF4
"""Port vmlab maps the device at (QEMU ``iobase=0xf4``)."""
DEBUG_EXIT_SIZE = 4
"""Ports decoded (QEMU ``iosize=0x04``)."""


def exit_status(value: int) -> int:
    """Status QEMU exits with after the guest writes ``value``."""
    return (value << 1) | 1


class DebugExit:
    """isa-debug-exit: any write calls ``on_exit((value << 1) | 1)``."""

    def __init__(self, on_exit: Callable[[int], object]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        """Reads return 0 (see the module docstring)."""
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Report the exit status derived from ``value``."""
        self._on_exit(exit_status(value))

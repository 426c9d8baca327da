"""QEMU's pc-testdev: the test device kvm-unit-tests and other test kernels use.

A model of QEMU's hw/misc/pc-testdev.c (``-device pc-testdev``).  Its regions:

* port 0xe0, 4 ports, "pc-testdev-ioport": a 32-bit register; a write of
  ``len`` bytes at offset ``addr & 3`` replaces those bytes
  (``test_ioport_write``), a read returns them (``test_ioport_read``);
* port 0xe4, 4 ports, "pc-testdev-flush-page": a 4-byte write names a guest
  page that QEMU unmaps and remaps on the host (``test_flush_page``; a KVM
  test aid).  vmlab has nothing cached outside the guest's own page tables
  that such a flush could show, so the write is accepted and does nothing.
  The region has no read callback: reads give 0 (QEMU zero-fills the result
  of a region without a read accessor, like isa-debug-exit);
* port 0xe8, 4 ports, "pc-testdev-ioport-byte": the same register as 0xe0,
  accessed one byte at a time (``impl.max_access_size = 1``), which gives
  the same result for every width;
* port 0x2000, 24 ports, "pc-testdev-irq-line": a byte write to 0x2000 + n
  sets ISA IRQ line n to ``data != 0`` (``qemu_set_irq(isa_get_irq(isa, addr),
  !!data)``); write-only (reads give 0).  vmlab's interrupt controller is the
  8259 pair: lines 0..15 reach it, 16..23 (IOAPIC-only on QEMU's pc) go nowhere;
* MMIO 0xff000000, 64 KiB (IOMEM_LEN 0x10000), "pc-testdev-iomem": plain
  little-endian storage (``test_iomem_read`` / ``test_iomem_write`` are memcpy),
  i.e. RAM behind an MMIO window.

The device sees only ``(offset, size)``; where it sits is its ``attach``'s job.
"""
from __future__ import annotations

from typing import Callable

IOPORT_BASE = 0xE0
FLUSH_PORT = 0xE4
IOPORT_BYTE_BASE = 0xE8
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_LEN = 0x10000


class _Ioport:
    """The 32-bit register behind ports 0xe0 and 0xe8 (test_ioport_read/write)."""

    def __init__(self) -> None:
        self.data = 0

    def read(self, offset: int, size: int) -> int:
        shift = (offset & 3) * 8
        mask = (0xFFFFFFFF >> (32 - size * 8)) << shift & 0xFFFFFFFF
        return (self.data & mask) >> shift

    def write(self, offset: int, size: int, value: int) -> None:
        shift = (offset & 3) * 8
        mask = (0xFFFFFFFF >> (32 - size * 8)) << shift & 0xFFFFFFFF
        self.data = (self.data & ~mask | (value << shift) & mask) & 0xFFFFFFFF


class _Flush:
    """pc-testdev-flush-page: writes accepted (see the module docstring)."""

    def __init__(self) -> None:
        self.last_page: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.last_page = value & ~0xFFF & 0xFFFFFFFF


class _IrqLines:
    """pc-testdev-irq-line: a write to offset n drives ISA IRQ n."""

    def __init__(self, set_irq: Callable[[int, bool], None]) -> None:
        self._set_irq = set_irq
        self.levels = [False] * IRQ_LINES

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        # valid.max_access_size = 1: QEMU splits wider accesses into bytes,
        # one line each.
        for k in range(size):
            line = offset + k
            if line >= IRQ_LINES:
                break
            level = ((value >> (8 * k)) & 0xFF) != 0
            self.levels[line] = level
            if line < 16:
                self._set_irq(line, level)


class _Iomem:
    """pc-testdev-iomem: 64 KiB of storage behind an MMIO window."""

    def __init__(self) -> None:
        self.buf = bytearray(IOMEM_LEN)

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > IOMEM_LEN:
            return 0
        return int.from_bytes(self.buf[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > IOMEM_LEN:
            return
        self.buf[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class PcTestdev:
    """QEMU's pc-testdev (see the module docstring); ``set_irq(line, level)``
    drives the interrupt controller's inputs."""

    def __init__(self, set_irq: Callable[[int, bool], None]) -> None:
        self.ioport = _Ioport()
        self.flush = _Flush()
        self.irq = _IrqLines(set_irq)
        self.iomem = _Iomem()

    def attach(self, pio, mmio) -> None:
        """Register the regions at QEMU's addresses on the port and MMIO buses
        (a bus refuses an overlap with a device already there)."""
        pio.register(IOPORT_BASE, 4, self.ioport, "pc-testdev-ioport")
        pio.register(FLUSH_PORT, 4, self.flush, "pc-testdev-flush-page")
        pio.register(IOPORT_BYTE_BASE, 4, self.ioport, "pc-testdev-ioport-byte")
        pio.register(IRQ_PORT_BASE, IRQ_LINES, self.irq, "pc-testdev-irq-line")
        mmio.register(IOMEM_BASE, IOMEM_LEN, self.iomem, "pc-testdev-iomem")


def attach(vm) -> PcTestdev:
    """Give a Vm a pc-testdev (``-device pc-testdev``); returns it."""
    dev = PcTestdev(vm.pic.set_irq)
    dev.attach(vm.pio, vm.mmio)
    vm.pc_testdev = dev
    return dev

"""virtio-mmio transport, version 2 (virtio 1.2 §4.2.2 "MMIO Device Register
Layout"); the legacy version 1 interface (§4.2.4) is not offered.

Each device occupies one 4 KiB slot on the MMIO bus with its own interrupt line
(the Firecracker layout; see :data:`MMIO_BASE`, :data:`IRQS`).  The driver
finds a device either from a Linux command line entry
``virtio_mmio.device=4K@0xd0000000:5`` (what vmlab adds for each device, as
Firecracker does) or by probing the slots for the magic value.

Register accesses: §4.2.2.2 "The driver MUST only use 32 bit wide and aligned
reads and writes to access the control registers"; other widths read 0 and
writes are dropped.  The configuration space at 0x100 takes any width.
"""
from __future__ import annotations

from vmlab.emu.errors import GuestMemoryError

from .device import (ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
                     VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, DeviceNeedsReset, VirtioDevice)
from .queue import QueueError, SplitQueue

MMIO_BASE = 0xD0000000
"""First virtio-mmio slot (Firecracker's MMIO_MEM_START on x86_64): in the
32-bit hole, above the RAM below 4 GiB (at most 3 GiB; more RAM continues at
4 GiB, emu/memory.py) and below the LAPIC."""
MMIO_SLOT = 0x1000
"""Bytes per device ("4K" in ``virtio_mmio.device=4K@ADDR:IRQ``)."""
IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)
"""8259 inputs free on vmlab's PC (0 PIT, 1 keyboard, 2 cascade, 3/4 COM,
8 RTC, 13 FPU are taken): device k of a machine gets IRQS[k]."""

# §4.2.2 Table "MMIO Device Register Layout"
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976
"""§4.2.2: "0x74726976 (a Little Endian equivalent of the "virt" string)"."""
VENDOR = 0x4C4D5656
"""vmlab's VendorID ("VVML"; the spec leaves the value to the device)."""

# §4.2.2 InterruptStatus bits
VIRTIO_MMIO_INT_VRING = 1
"""Used Buffer Notification."""
VIRTIO_MMIO_INT_CONFIG = 2
"""Configuration Change Notification."""


def slot_address(k: int) -> int:
    """Guest-physical base of virtio-mmio slot ``k``."""
    return MMIO_BASE + k * MMIO_SLOT


def linux_cmdline(base: int, irq: int) -> str:
    """The Linux command-line entry that declares one device
    (drivers/virtio/virtio_mmio.c, VIRTIO_MMIO_CMDLINE_DEVICES)."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


class MmioTransport:
    """The registers of one virtio-mmio device in front of ``device``.

    ``mem`` is guest RAM (GuestMemory), handed to the device and its queues at
    DRIVER_OK; ``irq`` is an IrqLine (devices.irq), high while InterruptStatus
    is non-zero.
    """

    def __init__(self, device: VirtioDevice, mem, irq) -> None:
        self.device = device
        self.mem = mem
        self.irq = irq
        self.queues = [SplitQueue(mem, device.queue_max_size) for _ in range(device.num_queues)]
        device.signal_used = self._signal_used
        device.signal_config = self._signal_config
        device.signal_needs_reset = self.needs_reset
        self.config_generation = 0
        #: why the device last set DEVICE_NEEDS_RESET (for logs and tests)
        self.error: str | None = None
        self.notifies = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()
        if self.irq.level:
            self.irq.set_level(False)

    def reset(self) -> None:
        """Device reset (§2.4: the driver writes 0 to Status)."""
        self.device.reset()
        self._reset_registers()
        self.error = None

    # -- interrupts -----------------------------------------------------------
    def _raise(self, bit: int) -> None:
        before = self.interrupt_status
        self.interrupt_status |= bit
        if not before:
            self.irq.set_level(True)

    def _signal_used(self, index: int) -> None:
        self._raise(VIRTIO_MMIO_INT_VRING)

    def _signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & DRIVER_OK:
            self._raise(VIRTIO_MMIO_INT_CONFIG)

    def needs_reset(self, why: str) -> None:
        """§2.1.2: "The device SHOULD set DEVICE_NEEDS_RESET when it enters an
        error state that a reset is needed.  If DRIVER_OK is set, after it sets
        DEVICE_NEEDS_RESET, the device MUST send a device configuration change
        notification to the driver"."""
        if self.status & DEVICE_NEEDS_RESET:
            return
        self.error = why
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self._raise(VIRTIO_MMIO_INT_CONFIG)

    # -- register file --------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            cfg = self.device.config()
            off = offset - CONFIG
            if off + size > len(cfg):
                return 0
            return int.from_bytes(cfg[off:off + size], "little")
        if size != 4 or offset % 4:
            return 0
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        match offset:
            case 0x000:
                return MAGIC
            case 0x004:
                return 2
            case 0x008:
                return self.device.device_id
            case 0x00C:
                return VENDOR
            case 0x010:
                sel = self.device_features_sel
                return (self.device.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
            case 0x034:
                return q.max_size if q is not None else 0     # 0: "the queue is not available"
            case 0x044:
                return int(q.ready) if q is not None else 0
            case 0x060:
                return self.interrupt_status
            case 0x070:
                return self.status
            case 0x0B0 | 0x0B4:
                return 0xFFFFFFFF        # §4.2.2: no shared memory region (length -1)
            case 0x0FC:
                return self.config_generation
            case 0x038:
                return q.size if q is not None else 0
            case 0x080 | 0x084 | 0x090 | 0x094 | 0x0A0 | 0x0A4 if q is not None:
                addr = {0x080: q.desc_addr, 0x084: q.desc_addr, 0x090: q.avail_addr, 0x094: q.avail_addr,
                        0x0A0: q.used_addr, 0x0A4: q.used_addr}[offset]
                return addr >> 32 if offset & 4 else addr & 0xFFFFFFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self.device.config_write(offset - CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            return
        if offset == QUEUE_NOTIFY:
            self._notify(value)
            return
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        match offset:
            case 0x014:
                self.device_features_sel = value
            case 0x020:
                # Feature bits may change only before FEATURES_OK (§3.1.1 steps 4-5).
                if self.status & DRIVER and not self.status & FEATURES_OK and self.driver_features_sel < 2:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            case 0x024:
                self.driver_features_sel = value
            case 0x030:
                self.queue_sel = value
            case 0x064:
                self.interrupt_status &= ~value
                if not self.interrupt_status and self.irq.level:
                    self.irq.set_level(False)
            case 0x070:
                self._write_status(value)
            case _ if q is not None and not q.ready and not self.status & DRIVER_OK:
                # §4.2.2.2: queue registers are written before QueueReady is set.
                match offset:
                    case 0x038:
                        q.size = value
                    case 0x044:
                        q.ready = bool(value & 1)
                    case 0x080:
                        q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
                    case 0x084:
                        q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
                    case 0x090:
                        q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
                    case 0x094:
                        q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
                    case 0x0A0:
                        q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
                    case 0x0A4:
                        q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)
            case 0x044 if q is not None and not value & 1:
                q.ready = False            # the driver may stop a queue

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        # §2.1.1: "The driver MUST NOT clear a device status bit"; vmlab keeps
        # every bit already set, and DEVICE_NEEDS_RESET is the device's own.
        new = old | (value & ~DEVICE_NEEDS_RESET)
        if new & FEATURES_OK and not old & FEATURES_OK and not self._features_acceptable():
            # §3.1.1 step 6: the driver re-reads Status; FEATURES_OK unset means
            # "the device does not support our subset of features".
            new &= ~FEATURES_OK
        if new & DRIVER_OK and not old & DRIVER_OK:
            if not new & FEATURES_OK or new & FAILED:
                new &= ~DRIVER_OK
            else:
                self.status = new
                self._activate()
                return
        self.status = new

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        # §6.1: "A device MAY fail to operate further if VIRTIO_F_VERSION_1 is
        # not accepted"; vmlab offers no legacy interface, so it refuses.
        return (f & ~self.device.device_features) == 0 and bool(f >> VIRTIO_F_VERSION_1 & 1)

    def _activate(self) -> None:
        f = self.driver_features
        for q in self.queues:
            q.event_idx = bool(f >> VIRTIO_F_EVENT_IDX & 1)
            if q.ready:
                try:
                    q.check()
                except QueueError as exc:
                    self.needs_reset(str(exc))
                    return
        self.device.activate(self.mem, self.queues, f)

    def _notify(self, index: int) -> None:
        self.notifies += 1
        if not self.status & DRIVER_OK or self.status & DEVICE_NEEDS_RESET:
            return
        if index >= len(self.queues) or not self.queues[index].ready:
            return                     # §4.2.2.1: no access to a queue that is not ready
        try:
            self.device.notify(index)
        except (QueueError, DeviceNeedsReset, GuestMemoryError) as exc:
            self.needs_reset(str(exc))

    def state(self) -> dict:
        """Registers and queues as a value (``info devices``, snapshots)."""
        return {"status": self.status, "driver_features": self.driver_features,
                "interrupt_status": self.interrupt_status, "config_generation": self.config_generation,
                "queues": [q.state() for q in self.queues], "error": self.error}

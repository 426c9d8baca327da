"""A driver-side mock of a split virtqueue in real guest memory (rust-vmm's
``MockSplitQueue`` shape): tests lay out the descriptor table and rings in a
GuestMemory, add chains as a driver would, and read back the used ring.

It writes whatever it is told to, including malformed tables, so tests can
drive the device models with hostile input.
"""
from __future__ import annotations

import struct

from vmlab.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmlab.emu.memory import GuestMemory


class RecordingMemory:
    """GuestMemory wrapper counting every access whose range lies outside RAM
    (the real object refuses them; a device model must never try)."""

    def __init__(self, mem: GuestMemory):
        self._mem = mem
        self.size = mem.size
        self.outside = []
        self.view = mem.view

    def _note(self, gpa, length):
        if not self._mem.contains(gpa, length):
            self.outside.append((gpa, length))

    def contains(self, gpa, length=1):
        return self._mem.contains(gpa, length)

    def check(self, gpa, length):
        self._note(gpa, length)
        return self._mem.check(gpa, length)

    def read(self, gpa, length):
        self._note(gpa, length)
        return self._mem.read(gpa, length)

    def write(self, gpa, data):
        self._note(gpa, len(data))
        return self._mem.write(gpa, data)

    def fill(self, gpa, length, byte=0):
        self._note(gpa, length)
        return self._mem.fill(gpa, length, byte)

    def read_int(self, gpa, size):
        self._note(gpa, size)
        return self._mem.read_int(gpa, size)

    def write_int(self, gpa, size, value):
        self._note(gpa, size)
        return self._mem.write_int(gpa, size, value)

    def buffer(self, gpa, length):
        self._note(gpa, length)
        return self._mem.buffer(gpa, length)

    def note_written(self, gpa, length):
        self._note(gpa, length)
        return self._mem.note_written(gpa, length)


class MockDriver:
    """One split virtqueue of ``size`` entries at fixed addresses in ``mem``,
    and a bump allocator for buffers and indirect tables."""

    DESC, AVAIL, USED, HEAP = 0x1000, 0x20000, 0x30000, 0x40000

    def __init__(self, mem, size: int = 16):
        self.mem = mem
        self.size = size
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.heap = self.HEAP
        mem.fill(self.DESC, 16 * size)
        mem.fill(self.AVAIL, 6 + 2 * size)
        mem.fill(self.USED, 6 + 8 * size)

    def configure(self, q) -> None:
        """What a driver writes through the transport (QueueNum, addresses, Ready)."""
        q.size = self.size
        q.desc_addr, q.avail_addr, q.used_addr = self.DESC, self.AVAIL, self.USED
        q.ready = True

    def alloc(self, length: int, data: bytes | None = None, align: int = 16) -> int:
        addr = (self.heap + align - 1) & ~(align - 1)
        self.heap = addr + max(length, 1)
        if data is not None:
            self.mem.write(addr, data)
        return addr

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1), length & 0xFFFFFFFF,
                                                   flags & 0xFFFF, nxt & 0xFFFF))

    def add_chain(self, bufs, indirect: bool = False) -> int:
        """Add ``[(addr, len, writable), …]`` as one chain (direct, or through an
        indirect table) and return its head index; the chain is not published."""
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (addr, length, w) in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0)
                self.write_desc(table, k, addr, length, flags, k + 1)
            head = self.next_desc % self.size
            self.next_desc += 1
            self.write_desc(self.DESC, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            return head
        idxs = [(self.next_desc + k) % self.size for k in range(len(bufs))]
        self.next_desc += len(bufs)
        for k, (addr, length, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(self.DESC, idxs[k], addr, length, flags, 0 if last else idxs[k + 1])
        return idxs[0]

    def publish(self, heads) -> None:
        """Put heads in the available ring and move its idx (one step)."""
        for h in heads:
            self.mem.write_int(self.AVAIL + 4 + 2 * (self.avail_idx % self.size), 2, h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(self.AVAIL + 2, 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.mem.write_int(self.AVAIL + 4 + 2 * self.size, 2, value)

    def set_avail_flags(self, value: int) -> None:
        self.mem.write_int(self.AVAIL, 2, value)

    def used_idx(self) -> int:
        return self.mem.read_int(self.USED + 2, 2)

    def avail_event(self) -> int:
        return self.mem.read_int(self.USED + 4 + 8 * self.size, 2)

    def take_used(self) -> list:
        """New used elements ``[(id, len), …]`` since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.USED + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class FakeIrq:
    """An IrqLine stand-in counting rising edges."""

    def __init__(self):
        self.level = False
        self.edges = 0

    def set_level(self, level):
        if level and not self.level:
            self.edges += 1
        self.level = bool(level)


def mmio_init(t, features: int | None = None, queues=()) -> int:
    """The §3.1.1 driver initialisation over a virtio-mmio transport ``t``:
    reset, ACKNOWLEDGE, DRIVER, features (all offered by default), FEATURES_OK,
    queues (MockDrivers, one per queue index), DRIVER_OK.  Returns Status."""
    t.write(0x70, 4, 0)
    t.write(0x70, 4, 1)
    t.write(0x70, 4, 3)
    t.write(0x14, 4, 0)
    lo = t.read(0x10, 4)
    t.write(0x14, 4, 1)
    hi = t.read(0x10, 4)
    f = (hi << 32 | lo) if features is None else features
    for sel in (0, 1):
        t.write(0x24, 4, sel)
        t.write(0x20, 4, (f >> (32 * sel)) & 0xFFFFFFFF)
    t.write(0x70, 4, 3 | 8)
    if not t.read(0x70, 4) & 8:
        return t.read(0x70, 4)
    for k, drv in enumerate(queues):
        t.write(0x30, 4, k)
        t.write(0x38, 4, drv.size)
        for off, addr in ((0x80, drv.DESC), (0x90, drv.AVAIL), (0xA0, drv.USED)):
            t.write(off, 4, addr & 0xFFFFFFFF)
            t.write(off + 4, 4, addr >> 32)
        t.write(0x44, 4, 1)
    t.write(0x70, 4, 3 | 8 | 4)
    return t.read(0x70, 4)

"""Guest-physical RAM: one host buffer shared with Unicorn and the native code.

RAM is mapped into Unicorn with ``mem_map_ptr`` from this buffer, so C hooks,
Python and Unicorn all see the same bytes without copies.  Every host-side access
by guest-physical address is bounds-checked here, in one place.
"""
from __future__ import annotations

import ctypes
import mmap
import struct

from .errors import ClosedError, ConfigError, GuestMemoryError

PAGE_SIZE = 4096
#: Largest RAM vmlab maps: RAM is one block at 0, below the 32-bit MMIO hole
#: where the local APIC (0xfee00000) and virtio-mmio devices live.
MAX_RAM = 3 << 30


class GuestMemory:
    """Guest RAM ``[0, size)`` backed by an anonymous host mapping."""

    def __init__(self, size: int):
        if size < (1 << 20) or size > MAX_RAM or size % PAGE_SIZE:
            raise ConfigError(
                f"RAM size {size:#x} must be a multiple of 4 KiB between 1 MiB and {MAX_RAM >> 20} MiB")
        self.size = size
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._cbuf = (ctypes.c_char * size).from_buffer(self._mm)
        #: host virtual address of guest-physical 0 (for Unicorn and cffi)
        self.address = ctypes.addressof(self._cbuf)
        self.view = memoryview(self._mm)

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside RAM."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            if self.closed:
                raise ClosedError("guest RAM was released (its machine was closed)")
            raise GuestMemoryError(
                f"guest-physical range [{gpa:#x}, {gpa + length:#x}) lies outside RAM (size {self.size:#x})")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa and length >= 0 and gpa + length <= self.size

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self._mm[gpa:gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        self.check(gpa, len(data))
        self._mm[gpa:gpa + len(data)] = data

    def buffer(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)`` (bounds-checked), for
        zero-copy device I/O (``os.preadv`` straight into guest RAM).  The view
        must not outlive the call that asked for it: close() releases RAM."""
        self.check(gpa, length)
        return self.view[gpa:gpa + length]

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        self._mm[gpa:gpa + length] = bytes([byte]) * length

    def read_int(self, gpa: int, size: int) -> int:
        self.check(gpa, size)
        return int.from_bytes(self._mm[gpa:gpa + size], "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.check(gpa, size)
        self._mm[gpa:gpa + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return struct.unpack_from("<Q", self._mm, gpa)[0]

    def read_u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return struct.unpack_from("<I", self._mm, gpa)[0]

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap guest RAM now (idempotent).  Whoever mapped it elsewhere (the
        Unicorn engine) must be done with it; later accesses raise ClosedError."""
        mm = self._mm
        if mm is None:
            return
        self.view.release()
        del self._cbuf
        self.size = 0               # every bounds check fails from now on
        self._mm = None
        mm.close()

"""Guest-physical RAM: one host buffer shared with Unicorn and the native code.

RAM is mapped into Unicorn with ``mem_map_ptr`` from this buffer, so C hooks,
Python and Unicorn all see the same bytes without copies.  Every host-side access
by guest-physical address is bounds-checked here, in one place.

Above 3 GiB the RAM is split around the 32-bit hole like QEMU's pc machine
(hw/i386/pc_piix.c, pc_init1: "Calculate ram split, for memory below and above
4G": ``max_ram_below_4g`` defaults to 0xe0000000 and, once RAM reaches it, the
split moves to 0xc0000000 -- "qemu -M pc -m 4G -> 3072M low, 1024M high"): RAM
is ``[0, low)`` and ``[4 GiB, 4 GiB + high)`` (:func:`split_ram`).  vmlab splits
at 3 GiB for any RAM above 3 GiB, also between 3 and 3.5 GiB where QEMU keeps it
all low, because its virtio-mmio slots start at 0xd0000000.  The hole holds the
devices (I/O APIC, local APIC, virtio-mmio, pc-testdev) and is open bus.

One host range covers ``[0, 4 GiB + high)`` so that ``address + gpa`` is valid
for every RAM address; the hole is PROT_NONE and nothing is committed until the
guest touches a page (MAP_NORESERVE): a 16 GiB guest costs what it uses.
"""
from __future__ import annotations

import ctypes
import mmap
import struct

from .errors import ClosedError, ConfigError, GuestMemoryError

PAGE_SIZE = 4096
#: Where RAM above the 32-bit hole starts.
HIGH_RAM_BASE = 1 << 32
#: QEMU pc's split point once RAM is split (pc_init1: lowmem = 0xc0000000).
LOW_RAM_SPLIT = 0xC0000000
#: Largest RAM vmlab maps (guest-physical addresses stay far below the 40-bit
#: MAXPHYADDR it advertises; host pages are committed only when touched).
MAX_RAM = 64 << 30


def split_ram(size: int) -> tuple[int, int]:
    """(bytes below 4 GiB from 0, bytes from 4 GiB) for ``size`` bytes of RAM."""
    if size > LOW_RAM_SPLIT:
        return LOW_RAM_SPLIT, size - LOW_RAM_SPLIT
    return size, 0


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """[(base, length)] of the RAM ranges of a machine with ``size`` bytes."""
    low, high = split_ram(size)
    return [(0, low)] + ([(HIGH_RAM_BASE, high)] if high else [])


_libc = None


def _mprotect_none(address: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.mprotect(address, length, 0) != 0:          # PROT_NONE
        raise ConfigError(f"cannot protect the guest-physical hole (errno {ctypes.get_errno()})")


class GuestMemory:
    """Guest RAM of ``total`` bytes: ``[0, size)`` and, above 3 GiB of RAM,
    ``[4 GiB, 4 GiB + high_size)``, backed by one anonymous host mapping.
    ``size`` stays the contiguous RAM from 0 (what every ``[0, size)`` bound in
    the code means); ``contains``/``check`` know both ranges."""

    def __init__(self, size: int):
        if size < (1 << 20) or size > MAX_RAM or size % PAGE_SIZE:
            raise ConfigError(
                f"RAM size {size:#x} must be a multiple of 4 KiB between 1 MiB and {MAX_RAM >> 30} GiB")
        self.total = size
        self.size, self.high_size = split_ram(size)
        span = HIGH_RAM_BASE + self.high_size if self.high_size else self.size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._mm = mmap.mmap(-1, span, flags=flags)
        self._cbuf = (ctypes.c_char * span).from_buffer(self._mm)
        #: host virtual address of guest-physical 0 (for Unicorn and cffi)
        self.address = ctypes.addressof(self._cbuf)
        if self.high_size:
            _mprotect_none(self.address + self.size, HIGH_RAM_BASE - self.size)
        self.view = memoryview(self._mm)
        #: called with (gpa, length) after every write made from the host side
        #: (devices' DMA, loaders, the debugger): the vCPU drops translated code
        #: of the pages it hits, as QEMU does for DMA (emu.cpu sets it).
        self.on_write = None

    def note_written(self, gpa: int, length: int) -> None:
        """Tell the machine that [gpa, gpa+length) changed behind the CPU's back
        (after I/O into a :meth:`buffer` view, or a native device path)."""
        if self.on_write is not None and length > 0:
            self.on_write(gpa, length)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """[(guest-physical base, length)] of RAM."""
        return [(0, self.size)] + ([(HIGH_RAM_BASE, self.high_size)] if self.high_size else [])

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside one RAM range."""
        if not self.contains(gpa, length):
            if self.closed:
                raise ClosedError("guest RAM was released (its machine was closed)")
            raise GuestMemoryError(
                f"guest-physical range [{gpa:#x}, {gpa + length:#x}) lies outside RAM "
                f"({', '.join(f'[{b:#x}, {b + n:#x})' for b, n in self.ranges)})")

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether [gpa, gpa+length) lies inside one RAM range (the Python twin
        of native/mmu.c vmlab_is_ram)."""
        if gpa < 0 or length < 0:
            return False
        if gpa < self.size:
            return length <= self.size - gpa
        off = gpa - HIGH_RAM_BASE
        return 0 <= off < self.high_size and length <= self.high_size - off

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self._mm[gpa:gpa + length]

    def write(self, gpa: int, data: bytes, notify: bool = True) -> None:
        """Write guest RAM from the host side (``notify=False``: the caller,
        the CPU's own store path, keeps translated code coherent itself)."""
        self.check(gpa, len(data))
        self._mm[gpa:gpa + len(data)] = data
        if notify and self.on_write is not None:
            self.on_write(gpa, len(data))

    def buffer(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)`` (bounds-checked), for
        zero-copy device I/O (``os.preadv`` straight into guest RAM).  The view
        must not outlive the call that asked for it: close() releases RAM."""
        self.check(gpa, length)
        return self.view[gpa:gpa + length]

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        self._mm[gpa:gpa + length] = bytes([byte]) * length
        if self.on_write is not None:
            self.on_write(gpa, length)

    def read_int(self, gpa: int, size: int) -> int:
        self.check(gpa, size)
        return int.from_bytes(self._mm[gpa:gpa + size], "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.check(gpa, size)
        self._mm[gpa:gpa + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.on_write is not None:
            self.on_write(gpa, size)

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
        self.size = self.high_size = 0   # every bounds check fails from now on
        self._mm = None
        mm.close()

"""Address spaces that route guest accesses to devices by range.

A :class:`Bus` is either the port-I/O space (``limit=IO_LIMIT``) or the
physical MMIO space (``limit=MMIO_LIMIT``). Devices register a ``[base,
base+size)`` range; the bus refuses empty, out-of-limit and overlapping ranges
so a wiring mistake fails loudly when the machine is built, not when the guest
first touches the port.

A device never sees its own base address: the bus hands it the *offset* inside
its range (the rust-vmm ``Bus`` convention), so the same model works wherever
it is mapped.

Unclaimed accesses behave like an ISA/PCI bus with nobody answering: reads
return all-ones of the access size (the pulled-up data lines), writes are
dropped. Each one is counted in :attr:`Bus.unclaimed` so the VMM can log it.

Straddling accesses: an access whose bytes are not all inside one registered
range (e.g. ``in eax, dx`` with ``dx = 0x3ff``, or a 16-bit ``out`` to the last
port of a device) is split byte-wise and every byte is routed on its own, as
an ISA bridge splits a wide cycle into byte cycles and as QEMU's
``flatview_read_continue`` cuts an access at region boundaries. Bytes nobody
claims read 0xff. Reads are assembled little-endian.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Callable, Protocol, runtime_checkable

from vmlab.devices.errors import BusError

IO_LIMIT = 0x10000
"""Size of the x86 port-I/O space (16-bit port numbers)."""

MMIO_LIMIT = 1 << 64
"""Upper bound of the MMIO bus (physical addresses are at most 64 bits wide)."""

UNCLAIMED_TRACK_LIMIT = 4096
"""Distinct unclaimed addresses a bus remembers; a guest probing the whole
MMIO space must not grow the VMM's memory without bound."""


@runtime_checkable
class BusDevice(Protocol):
    """What a device must provide to sit on a :class:`Bus`.

    ``offset`` is relative to the start of the device's range; ``size`` is the
    access width in bytes. ``read`` returns the value (the bus masks it to
    ``size`` bytes); ``write`` receives a value already masked to ``size``.
    Implementations must not raise because of what the guest does.
    """

    def read(self, offset: int, size: int) -> int:
        """Return the value of a ``size``-byte read at ``offset``."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """Handle a ``size``-byte write of ``value`` at ``offset``."""
        ...


@dataclasses.dataclass(frozen=True)
class BusRange:
    """A registered range ``[base, base + size)`` and its display name."""

    base: int
    size: int
    name: str

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.size

    def contains(self, addr: int) -> bool:
        """True when ``addr`` lies inside the range."""
        return self.base <= addr < self.base + self.size

    def overlaps(self, other: "BusRange") -> bool:
        """True when the two ranges share at least one address."""
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        return f"{self.name} [{self.base:#x}, {self.end:#x})"


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class Bus:
    """An address space of ``limit`` addresses with range-registered devices.

    Lookup is a bisection over the sorted range bases: O(log n) per access.
    """

    def __init__(self, name: str, limit: int) -> None:
        if limit <= 0:
            raise BusError(f"bus {name!r}: limit must be positive, got {limit}")
        self.name = name
        self.limit = limit
        # Parallel sorted lists: _bases[i] is _entries[i][0].base.
        self._bases: list[int] = []
        self._entries: list[tuple[BusRange, BusDevice]] = []
        self.unclaimed: collections.Counter[int] = collections.Counter()
        """Addresses of accesses nobody claimed, with their counts (at most
        :data:`UNCLAIMED_TRACK_LIMIT` distinct addresses)."""
        self.unclaimed_untracked = 0
        """Unclaimed accesses to addresses beyond the tracking limit."""

    def __repr__(self) -> str:
        return f"Bus({self.name!r}, limit={self.limit:#x}, ranges={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    def ranges(self) -> list[tuple[BusRange, BusDevice]]:
        """Every registration, sorted by base address."""
        return list(self._entries)

    # -- registration -----------------------------------------------------

    def register(self, base: int, size: int, device: BusDevice,
                 name: str | None = None) -> BusRange:
        """Map ``device`` at ``[base, base + size)`` and return its range.

        Raises :class:`BusError` for an empty range, a range outside
        ``[0, limit)``, or one that overlaps an existing registration (the
        message names both devices).
        """
        label = name if name is not None else type(device).__name__
        if size <= 0:
            raise BusError(f"bus {self.name}: {label}: empty range "
                           f"(base {base:#x}, size {size})")
        if base < 0 or base + size > self.limit:
            raise BusError(f"bus {self.name}: {label}: range [{base:#x}, "
                           f"{base + size:#x}) outside [0, {self.limit:#x})")
        new = BusRange(base, size, label)
        i = bisect.bisect_left(self._bases, base)
        # Ranges never overlap each other, so only the neighbours can clash.
        for j in (i - 1, i):
            if 0 <= j < len(self._entries):
                old = self._entries[j][0]
                if old.overlaps(new):
                    raise BusError(f"bus {self.name}: {new} overlaps {old}")
        self._bases.insert(i, base)
        self._entries.insert(i, (new, device))
        return new

    def unregister(self, device: BusDevice) -> int:
        """Remove every range ``device`` is registered at; return how many.

        Raises :class:`BusError` if the device is not on this bus.
        """
        keep = [(r, d) for (r, d) in self._entries if d is not device]
        removed = len(self._entries) - len(keep)
        if removed == 0:
            raise BusError(f"bus {self.name}: {device!r} is not registered")
        self._entries = keep
        self._bases = [r.base for (r, _) in keep]
        return removed

    def find(self, addr: int) -> tuple[BusRange, BusDevice] | None:
        """Return ``(range, device)`` owning ``addr``, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            entry = self._entries[i]
            if addr < entry[0].end:
                return entry
        return None

    # -- accesses ---------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        """Perform a guest read of ``size`` bytes at ``addr``."""
        self._check_size(size)
        hit = self.find(addr)
        if hit is not None and addr + size <= hit[0].end:
            rng, dev = hit
            return dev.read(addr - rng.base, size) & _mask(size)
        if hit is None and not self._any_claimed(addr, size):
            self._note_unclaimed(addr)
            return _mask(size)
        return read_bytewise(self._read_byte, addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        """Perform a guest write of ``size`` bytes of ``value`` at ``addr``."""
        self._check_size(size)
        value &= _mask(size)
        hit = self.find(addr)
        if hit is not None and addr + size <= hit[0].end:
            rng, dev = hit
            dev.write(addr - rng.base, size, value)
            return
        if hit is None and not self._any_claimed(addr, size):
            self._note_unclaimed(addr)
            return
        write_bytewise(self._write_byte, addr, size, value)

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _check_size(size: int) -> None:
        # The access width comes from the instruction decoder, never from
        # guest data, so a bad one is a VMM bug worth an exception.
        if size <= 0:
            raise BusError(f"access size must be positive, got {size}")

    def _note_unclaimed(self, addr: int) -> None:
        if addr in self.unclaimed or len(self.unclaimed) < UNCLAIMED_TRACK_LIMIT:
            self.unclaimed[addr] += 1
        else:
            self.unclaimed_untracked += 1

    def _any_claimed(self, addr: int, size: int) -> bool:
        # Is there a range starting inside (addr, addr + size)?
        i = bisect.bisect_right(self._bases, addr)
        return i < len(self._bases) and self._bases[i] < addr + size

    def _read_byte(self, addr: int) -> int:
        hit = self.find(addr) if addr < self.limit else None
        if hit is None:
            self._note_unclaimed(addr)
            return 0xFF
        rng, dev = hit
        return dev.read(addr - rng.base, 1) & 0xFF

    def _write_byte(self, addr: int, value: int) -> None:
        hit = self.find(addr) if addr < self.limit else None
        if hit is None:
            self._note_unclaimed(addr)
            return
        rng, dev = hit
        dev.write(addr - rng.base, 1, value)


# -- helpers for byte-wide register files ----------------------------------

def read_bytewise(read_byte: Callable[[int], int], offset: int, size: int) -> int:
    """Assemble a ``size``-byte little-endian read from single-byte reads.

    For devices whose registers are 8 bits wide (8259, 8254, 16550): a 16-bit
    ``in`` reads two consecutive registers, as QEMU does for regions with
    ``impl.max_access_size = 1``.
    """
    value = 0
    for i in range(size):
        value |= (read_byte(offset + i) & 0xFF) << (8 * i)
    return value


def write_bytewise(write_byte: Callable[[int, int], None], offset: int,
                   size: int, value: int) -> None:
    """Split a ``size``-byte write into single-byte writes, low byte first."""
    for i in range(size):
        write_byte(offset + i, (value >> (8 * i)) & 0xFF)

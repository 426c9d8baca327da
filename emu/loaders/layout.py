"""Guest-physical layout of a boot image: what the loader puts where, checked.

Every loader builds its :class:`~emu.loaders.image.BootImage` through one
:class:`GuestLayout`.  The layout refuses anything outside guest RAM
[0, ram_size) and any two things that overlap, with a message naming both, so
the checks live in one place instead of in each loader.  It also finds free room
for the structures the loader itself creates (page tables, GDT, stack, the
Multiboot information), first fit from a preferred address, so those never
collide with the kernel whatever addresses the kernel chose.
"""

import bisect
from dataclasses import dataclass

from vmlab.emu.loaders.errors import LoaderConfigError, LoaderFormatError
from vmlab.emu.memory import split_ram

__all__ = ["GuestLayout", "align_up", "fmt_range", "fmt_size", "KiB", "MiB", "GiB"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def fmt_range(start: int, end: int) -> str:
    """Half-open range as used in every loader message: ``[0x1000-0x2000)``."""
    return f"[{start:#x}-{end:#x})"


def fmt_size(size: int) -> str:
    """``64 MiB``, ``640 KiB``, ``4 GiB`` or ``513 bytes``."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


@dataclass(frozen=True)
class _Region:
    start: int
    end: int
    name: str


class GuestLayout:
    """Placements in guest-physical memory, with RAM and overlap checks.

    ``writes`` and ``zero`` accumulate in placement order and become the
    :class:`BootImage` fields of the same names.
    """

    def __init__(self, ram_size: int):
        # Boot data goes in the contiguous RAM from 0 (below the 32-bit hole;
        # emu/memory.py split_ram); ``total`` is all of it.
        self.total = ram_size
        self.ram_size = split_ram(ram_size)[0]
        self.writes: list[tuple[int, bytes]] = []
        self.zero: list[tuple[int, int]] = []
        # Placed regions sorted by start; kept sorted so overlap checks and the
        # free-space search stay O(log n) / O(n) for hostile files with
        # thousands of segments.
        self._starts: list[int] = []
        self._regions: list[_Region] = []
        # Ranges the allocator must not hand out but that the image itself may
        # use (firmware areas such as the EBDA and the BIOS ROM window).
        self._avoid: list[tuple[int, int]] = []

    # -- checks -----------------------------------------------------------

    def _claim(self, name: str, start: int, end: int) -> None:
        if start < 0 or end > self.ram_size:
            raise LoaderConfigError(
                f"{name} {fmt_range(start, end)} lies outside guest RAM "
                f"({fmt_size(self.ram_size)})")
        i = bisect.bisect_left(self._starts, start)
        # Regions are disjoint and sorted, so only the neighbours can overlap.
        for j in (i - 1, i):
            if 0 <= j < len(self._regions):
                other = self._regions[j]
                if other.start < end and start < other.end:
                    # Loader-built structures are placed in free space, so an
                    # overlap is always between two pieces of the image itself.
                    raise LoaderFormatError(
                        f"{name} {fmt_range(start, end)} overlaps {other.name} "
                        f"{fmt_range(other.start, other.end)}")
        self._starts.insert(i, start)
        self._regions.insert(i, _Region(start, end, name))

    # -- placements -------------------------------------------------------

    def place(self, name: str, addr: int, data: bytes, memsz: int | None = None) -> None:
        """Copy ``data`` to ``addr`` and clear up to ``memsz`` bytes in total.

        ``memsz`` defaults to ``len(data)``; callers have already checked that
        it is not smaller.  An empty placement claims nothing.
        """
        if memsz is None:
            memsz = len(data)
        if memsz == 0:
            return
        self._claim(name, addr, addr + memsz)
        if data:
            self.writes.append((addr, bytes(data)))
        if memsz > len(data):
            self.zero.append((addr + len(data), memsz - len(data)))

    def reserve(self, name: str, addr: int, size: int) -> None:
        """Claim a range without writing it (e.g. the boot stack)."""
        if size:
            self._claim(name, addr, addr + size)

    def avoid(self, start: int, end: int) -> None:
        """Keep the allocator out of ``[start, end)`` (placements may still use it)."""
        self._avoid.append((start, end))

    # -- free space -------------------------------------------------------

    @property
    def highest_end(self) -> int:
        """End of the highest placed region (0 when nothing is placed)."""
        return max((r.end for r in self._regions), default=0)

    def find_free(self, size: int, align: int, lo: int, hi: int) -> int | None:
        """Lowest ``align``-aligned address >= ``lo`` where ``size`` bytes fit.

        The range must end at or below ``min(hi, ram_size)`` and overlap neither
        a placed region nor an avoided range.  Returns None when there is none.
        """
        hi = min(hi, self.ram_size)
        addr = align_up(lo, align)
        blockers = sorted([(r.start, r.end) for r in self._regions] + self._avoid)
        for start, end in blockers:
            if addr + size <= start:
                break
            if end > addr:
                addr = align_up(end, align)
        return addr if addr + size <= hi else None

    def find_free_top(self, size: int, align: int, lo: int, hi: int) -> int | None:
        """Highest ``align``-aligned address >= ``lo`` where ``size`` bytes fit
        below ``min(hi, ram_size)``, clear of placed regions and avoided ranges
        (where an initrd goes: as high as the kernel allows).  None when none."""
        hi = min(hi, self.ram_size)
        blockers = sorted([(r.start, r.end) for r in self._regions] + self._avoid, reverse=True)
        addr = (hi - size) & ~(align - 1)
        for start, end in blockers:        # by descending start: one pass
            if addr < lo:
                break
            if start < addr + size and addr < end:
                addr = (start - size) & ~(align - 1)
        return addr if addr >= lo and addr + size <= hi else None

    def find_room(self, name: str, size: int, align: int, preferred: int,
                  low_end: int, high_limit: int) -> int:
        """Address for a loader structure of ``size`` bytes (not yet claimed).

        First fit from ``preferred`` up to ``low_end`` (conventional memory),
        else first fit above everything placed so far, below ``high_limit``.
        The caller then claims it with :meth:`place` or :meth:`reserve`.
        """
        addr = self.find_free(size, align, preferred, low_end)
        if addr is None:
            addr = self.find_free(size, align, self.highest_end, high_limit)
        if addr is None:
            raise LoaderConfigError(
                f"no room for the {name} ({fmt_size(size)}) in guest RAM "
                f"({fmt_size(self.ram_size)})")
        return addr

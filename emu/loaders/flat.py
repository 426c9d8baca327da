"""Flat binary loader: raw bytes at an address, entered at their first byte.

The whole file is copied to ``flat_addr`` and entered there in the requested
mode:

* ``real``: CS:IP = 0:flat_addr, so the entry must be below 0x10000.  No
  registers are set (all zero; SP = 0 makes the first push land at
  0000:FFFE, the top of segment 0).
* ``protected32``: the loader writes the GDT of :mod:`emu.loaders.x86`
  (CS 0x18, data 0x10) and an 8 KiB boot stack; ESP = its top.
* ``long64``: as protected32 plus identity page tables for [0, 4 GiB)
  (``cr3``); CS 0x08, RSP = top of the boot stack.

The GDT, stack and page tables go where :mod:`emu.loaders.x86` describes
(0x500, 0x7000-0x9000, 0x1000-0x6fff), or above the image when it occupies
that memory.
"""

from vmlab.emu.loaders.errors import LoaderConfigError
from vmlab.emu.loaders.image import BootImage, MODES
from vmlab.emu.loaders.layout import GiB, GuestLayout
from vmlab.emu.loaders.x86 import place_cpu_structures, reserve_firmware_areas

__all__ = ["load_flat", "REAL_MODE_ENTRY_LIMIT"]

#: CS = 0 leaves IP (16 bits) to reach the entry.
REAL_MODE_ENTRY_LIMIT = 0x10000


def load_flat(data: bytes, *, ram_size: int, addr: int = 0x7C00, mode: str = "real") -> BootImage:
    """Plan the boot of a flat binary at ``addr`` in ``mode``."""
    if mode not in MODES:
        raise LoaderConfigError(
            f"unknown flat mode {mode!r}; expected one of {', '.join(MODES)}")
    if not isinstance(addr, int) or addr < 0:
        raise LoaderConfigError(f"flat load address must be a non-negative integer, not {addr!r}")
    if mode == "real" and addr >= REAL_MODE_ENTRY_LIMIT:
        raise LoaderConfigError(
            f"real-mode entry {addr:#x} is not reachable at CS:IP = 0:{addr:#x}; "
            f"load the image below 0x10000")
    if mode != "real" and addr >= 4 * GiB:
        # protected32 cannot address it; long64 enters through the identity
        # map, which covers [0, 4 GiB).
        raise LoaderConfigError(f"{mode} entry {addr:#x} is not below 4 GiB")
    layout = GuestLayout(ram_size)
    layout.place("flat image", addr, data)
    regs: dict[str, int] = {}
    cr3 = gdt = None
    info: dict = {"size": len(data), "load_addr": addr, "warnings": []}
    if mode != "real":
        reserve_firmware_areas(layout)
        cpu = place_cpu_structures(layout, page_tables=(mode == "long64"))
        cr3, gdt = cpu.cr3, cpu.gdt
        regs["rsp" if mode == "long64" else "esp"] = cpu.stack_top
        info.update(gdt=cpu.gdt, stack_top=cpu.stack_top, page_tables=cpu.cr3)
    return BootImage(format="flat", mode=mode, entry=addr, regs=regs,
                     writes=layout.writes, zero=layout.zero, cr3=cr3, gdt=gdt, info=info)

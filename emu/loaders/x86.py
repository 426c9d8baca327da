"""x86 structures the loaders build for the guest: GDT, page tables, boot stack.

Low-memory map the loaders prefer (each structure goes to the first free,
suitably aligned place at or above its preferred address below
:data:`LOW_MEM_END`; if the kernel already uses that memory, it goes above the
highest byte placed so far instead, still below 4 GiB)::

    0x00000-0x004ff  IVT and BIOS data area        never allocated
    0x00500-0x0051f  GDT (4 descriptors)           GDT_PREFERRED
    0x01000-0x06fff  PML4, PDPT, PD0-PD3 (long64)  PAGE_TABLES_PREFERRED
    0x07000-0x08fff  boot stack, top at 0x9000     BOOT_STACK_PREFERRED
    0x09000-0x094ff  Multiboot memory map          (emu.loaders.mbinfo)
    0x09500-...      Multiboot info, modules table, strings
    0x9fc00-0xfffff  EBDA, VGA, option and BIOS ROMs   never allocated

0x9000/0x9500 are where QEMU puts its Multiboot memory map and information
structure (hw/i386/multiboot.c, ADDR_E820_MAP and ADDR_MBI), so a guest sees
the same EBX under vmlab and under ``qemu -kernel``.
"""

import struct
from dataclasses import dataclass

from vmlab.emu.loaders.layout import GiB, MiB, GuestLayout

__all__ = [
    "GDT_SEL_CODE64", "GDT_SEL_DATA", "GDT_SEL_CODE32", "GDT_ENTRIES",
    "LOW_MEM_END", "FIRMWARE_HOLE", "BOOT_STACK_SIZE", "PAGE_TABLES_SIZE",
    "CpuSetup", "build_gdt", "build_identity_page_tables", "place_cpu_structures",
    "reserve_firmware_areas",
]

# --- GDT -------------------------------------------------------------------
#
# Descriptor layout: SDM Vol. 3A §3.4.5, Figure 3-8 (Segment Descriptor);
# 64-bit code segments: SDM Vol. 3A §5.2.1 (L=1 and D=0; base and limit are
# ignored).  The accessed bit (type bit 0, §3.4.5.1) is preset in every
# descriptor: the CPU sets it in memory when it loads a selector whose bit is
# clear, and a preset bit means the GDT is never written by the CPU, so the
# guest may reclaim that page without surprises.

#: 0x08: 64-bit code, base 0, limit 0xfffff, G=1 L=1 D=0, P=1 DPL=0 S=1
#: type=0xb (execute/read, accessed).
GDT_SEL_CODE64 = 0x08
#: 0x10: flat data, base 0, limit 0xfffff, G=1 D/B=1, P=1 DPL=0 S=1
#: type=0x3 (read/write, accessed).  Valid for SS/DS/ES in both 32-bit
#: protected mode and long mode.
GDT_SEL_DATA = 0x10
#: 0x18: 32-bit code, base 0, limit 0xfffff, G=1 D=1 L=0, P=1 DPL=0 S=1
#: type=0xb (execute/read, accessed).  The flat code segment of Multiboot
#: §3.2 ("32-bit read/execute code segment with an offset of 0 and a limit
#: of 0xFFFFFFFF").
GDT_SEL_CODE32 = 0x18

GDT_ENTRIES = (
    0x0000000000000000,  # 0x00: null descriptor
    0x00AF9B000000FFFF,  # 0x08: 64-bit code  (flags 0xA = G|L, access 0x9B)
    0x00CF93000000FFFF,  # 0x10: flat data    (flags 0xC = G|DB, access 0x93)
    0x00CF9B000000FFFF,  # 0x18: 32-bit code  (flags 0xC = G|DB, access 0x9B)
)

# --- 4-level paging: SDM Vol. 3A §4.5, Tables 4-15 (PML4E), 4-17 (PDPTE that
# references a page directory) and 4-18 (PDE that maps a 2-MByte page).
PTE_P = 1 << 0   # present
PTE_RW = 1 << 1  # read/write
PTE_PS = 1 << 7  # page size: this PDE maps a 2 MiB page

PAGE_SIZE = 0x1000
#: PML4 + PDPT + 4 page directories: identity map of [0, 4 GiB) in 2 MiB pages.
PAGE_TABLES_SIZE = 6 * PAGE_SIZE
IDENTITY_MAP_END = 4 * GiB

# --- low-memory placement ----------------------------------------------------

#: End of conventional memory free for the loader: SeaBIOS on QEMU reports
#: 639 KiB through INT 12h and puts its 1 KiB EBDA at 0x9fc00.
LOW_MEM_END = 0x9FC00
#: EBDA, VGA window, option ROMs and BIOS ROM: never handed out by the allocator.
FIRMWARE_HOLE = (LOW_MEM_END, 1 * MiB)
#: IVT (0x000-0x3ff) and BIOS data area (0x400-0x4ff).
IVT_BDA = (0x0, 0x500)

GDT_PREFERRED = 0x500
PAGE_TABLES_PREFERRED = 0x1000
BOOT_STACK_PREFERRED = 0x7000
BOOT_STACK_SIZE = 0x2000

#: Loader structures are addressed through 32-bit fields (EBX, GDTR loaded
#: from 32-bit code, Multiboot pointers), so they all stay below 4 GiB.
BOOT_STRUCT_LIMIT = 4 * GiB


def build_gdt() -> bytes:
    """The four descriptors of :data:`GDT_ENTRIES`, little-endian."""
    return struct.pack("<4Q", *GDT_ENTRIES)


def build_identity_page_tables(base: int) -> bytes:
    """PML4, PDPT and four PDs at ``base`` mapping [0, 4 GiB) 1:1.

    Layout: PML4 at ``base``, PDPT at ``base + 0x1000``, PD *i* at
    ``base + 0x2000 + i * 0x1000``.  Every entry is present and writable,
    supervisor, no NX (EFER.NXE may be off).  Unused entries are zero.
    """
    pdpt = base + PAGE_SIZE
    pml4 = struct.pack("<Q", pdpt | PTE_P | PTE_RW).ljust(PAGE_SIZE, b"\0")
    pdpt_page = b"".join(
        struct.pack("<Q", (base + (2 + i) * PAGE_SIZE) | PTE_P | PTE_RW) for i in range(4)
    ).ljust(PAGE_SIZE, b"\0")
    pds = struct.pack(
        "<2048Q", *(((n << 21) | PTE_P | PTE_RW | PTE_PS) for n in range(2048)))
    return pml4 + pdpt_page + pds


@dataclass(frozen=True)
class CpuSetup:
    """Where :func:`place_cpu_structures` put things."""

    gdt: tuple[int, int]      # (base, limit)
    stack_top: int
    cr3: int | None           # PML4 address when page tables were built


def reserve_firmware_areas(layout: GuestLayout) -> None:
    """Keep the allocator out of the IVT/BDA and the EBDA-to-1 MiB hole."""
    layout.avoid(*IVT_BDA)
    layout.avoid(*FIRMWARE_HOLE)


def place_cpu_structures(layout: GuestLayout, *, page_tables: bool) -> CpuSetup:
    """Place the GDT, a boot stack and (for long mode) identity page tables.

    Call after the kernel's own segments are placed so the allocator can work
    around them.  The stack is only reserved (RAM starts zeroed); the GDT and
    page tables are written.
    """
    cr3 = None
    if page_tables:
        cr3 = layout.find_room("page tables", PAGE_TABLES_SIZE, PAGE_SIZE,
                               PAGE_TABLES_PREFERRED, LOW_MEM_END, BOOT_STRUCT_LIMIT)
        layout.place("page tables", cr3, build_identity_page_tables(cr3))
    gdt = build_gdt()
    gdt_base = layout.find_room("GDT", len(gdt), 16, GDT_PREFERRED,
                                LOW_MEM_END, BOOT_STRUCT_LIMIT)
    layout.place("GDT", gdt_base, gdt)
    stack = layout.find_room("boot stack", BOOT_STACK_SIZE, 16, BOOT_STACK_PREFERRED,
                             LOW_MEM_END, BOOT_STRUCT_LIMIT)
    layout.reserve("boot stack", stack, BOOT_STACK_SIZE)
    return CpuSetup(gdt=(gdt_base, len(gdt) - 1), stack_top=stack + BOOT_STACK_SIZE, cr3=cr3)

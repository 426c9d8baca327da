"""Multiboot v1 boot information structure (Multiboot Specification 0.6.96 §3.3).

Built by the Multiboot loader and, with the same layout, handed to ELF64
kernels.  One contiguous block holds, in this order (offsets from its base,
which is 0x9000 unless the kernel occupies that memory)::

    +0x000  memory map: entries of `size` (= 20), base_addr, length, type
    +0x500  multiboot_info (88 bytes)      <- EBX points here (0x9500 like QEMU)
    +0x558  module table, 16 bytes per module: mod_start, mod_end, string, 0
    ...     NUL-terminated strings: kernel command line, module strings,
            boot loader name "vmlab"

Modules themselves go page-aligned above the kernel (highest loaded byte),
one after the other, as QEMU does (hw/i386/multiboot.c).

The memory map describes a QEMU "pc" machine with SeaBIOS::

    [0, 0x9fc00)          available  (639 KiB conventional memory)
    [0x9fc00, 0xa0000)    reserved   (EBDA)
    [0xf0000, 0x100000)   reserved   (BIOS ROM)
    [0x100000, low)       available
    [4 GiB, 4 GiB + high) available  (RAM above 3 GiB: emu/memory.py split_ram)

mem_lower is 639, matching both the map and what QEMU's multiboot option ROM
stores (INT 12h under SeaBIOS).  mem_upper is the KiB of the available region
starting at 1 MiB, capped at 4 GiB: the field is read by 32-bit kernels and
QEMU's option ROM also ignores memory above 4 GiB when computing it.
"""

import struct

from vmlab.emu.memory import HIGH_RAM_BASE, split_ram

from vmlab.emu.loaders.errors import LoaderConfigError
from vmlab.emu.loaders.layout import GiB, KiB, MiB, GuestLayout, align_up, fmt_size
from vmlab.emu.loaders.x86 import BOOT_STRUCT_LIMIT, LOW_MEM_END

__all__ = [
    "MULTIBOOT_BOOTLOADER_MAGIC", "MBI_SIZE", "MMAP_ENTRY_SIZE", "BOOT_LOADER_NAME",
    "INFO_PREFERRED", "MBI_OFFSET", "memory_map", "mem_lower_upper", "encode_string",
    "encode_modules", "kernel_command_line", "place_boot_info",
]

#: EAX at entry (§3.2).
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002

# multiboot_info.flags (§3.3).
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_BOOTDEV = 1 << 1          # not set: vmlab did not boot from a BIOS disk
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9

# multiboot_info field offsets (§3.3), as QEMU names them.
MBI_FLAGS, MBI_MEM_LOWER, MBI_MEM_UPPER = 0, 4, 8
MBI_CMDLINE, MBI_MODS_COUNT, MBI_MODS_ADDR = 16, 20, 24
MBI_MMAP_LENGTH, MBI_MMAP_ADDR = 44, 48
MBI_BOOT_LOADER_NAME = 64
#: Through vbe_interface_len (offset 86, 2 bytes).
MBI_SIZE = 88

#: Memory map entry: u32 size, u64 base_addr, u64 length, u32 type.  `size`
#: counts the bytes after itself, so it is 20 (§3.3).
MMAP_ENTRY_SIZE = 20
MULTIBOOT_MEMORY_AVAILABLE = 1
MULTIBOOT_MEMORY_RESERVED = 2
#: Module entry: mod_start, mod_end, string, reserved (§3.3).
MOD_ENTRY_SIZE = 16

INFO_PREFERRED = 0x9000
#: QEMU: ADDR_MBI - ADDR_E820_MAP.
MBI_OFFSET = 0x500
MODULE_ALIGN = 0x1000
BOOT_LOADER_NAME = b"vmlab"

#: Conventional memory as SeaBIOS reports it (INT 12h): 639 KiB.
EBDA_START = LOW_MEM_END
BIOS_ROM = (0xF0000, 0x100000)


def memory_map(ram_size: int, bios_area: int = BIOS_ROM[0]) -> list[tuple[int, int, int]]:
    """``(base_addr, length, type)`` entries for a machine with ``ram_size``
    bytes, [bios_area, 1 MiB) reserved.  The types are also E820's (1 usable,
    2 reserved: the ACPI spec's address range types), so the Linux loader's
    E820 table is this map too."""
    ram_size, high = split_ram(ram_size)
    entries = [(0, min(ram_size, EBDA_START), MULTIBOOT_MEMORY_AVAILABLE),
               (EBDA_START, 0xA0000 - EBDA_START, MULTIBOOT_MEMORY_RESERVED),
               (bios_area, BIOS_ROM[1] - bios_area, MULTIBOOT_MEMORY_RESERVED)]
    if ram_size > 1 * MiB:
        entries.append((1 * MiB, ram_size - 1 * MiB, MULTIBOOT_MEMORY_AVAILABLE))
    if high:
        entries.append((HIGH_RAM_BASE, high, MULTIBOOT_MEMORY_AVAILABLE))
    return entries


def mem_lower_upper(ram_size: int) -> tuple[int, int]:
    """mem_lower and mem_upper in KiB (§3.3)."""
    ram_size = split_ram(ram_size)[0]         # the contiguous RAM from 0 (below 4 GiB)
    lower = min(ram_size, EBDA_START) // KiB
    upper = max(0, min(ram_size, 4 * GiB) - 1 * MiB) // KiB
    return lower, upper


def encode_string(text: str | bytes, what: str) -> bytes:
    """A NUL-terminated guest string; refuses embedded NULs."""
    if isinstance(text, str):
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise LoaderConfigError(f"{what} cannot be encoded as UTF-8") from exc
    elif isinstance(text, (bytes, bytearray)):
        raw = bytes(text)
    else:
        raise LoaderConfigError(f"{what} must be a string, not {type(text).__name__}")
    if b"\0" in raw:
        raise LoaderConfigError(f"{what} contains a NUL byte")
    return raw + b"\0"


def kernel_command_line(name: str, cmdline: str) -> bytes:
    """``"<name> <cmdline>"`` NUL-terminated, as QEMU builds it."""
    if not isinstance(cmdline, str):
        raise LoaderConfigError(
            f"kernel command line must be a string, not {type(cmdline).__name__}")
    return encode_string(f"{name} {cmdline}", "kernel command line")


def encode_modules(modules) -> list[tuple[bytes, bytes]]:
    """Validate ``(bytes, cmdline)`` pairs; strings become NUL-terminated bytes."""
    out = []
    try:
        items = list(modules)
    except TypeError as exc:
        raise LoaderConfigError("modules must be a sequence of (bytes, cmdline) pairs") from exc
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], (bytes, bytearray, memoryview))):
            raise LoaderConfigError(f"module {i} is not a (bytes, cmdline) pair")
        out.append((bytes(item[0]), encode_string(item[1], f"module {i} command line")))
    return out


def place_boot_info(layout: GuestLayout, *, ram_size: int, kernel_end: int,
                    cmdline: bytes, modules: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """Place the modules and the boot information block; return (MBI address, info).

    ``cmdline`` and each module string are already NUL-terminated
    (:func:`encode_string`).  Call after the kernel and the CPU structures are
    placed.
    """
    # Modules first, page-aligned above the kernel (so MULTIBOOT_PAGE_ALIGN
    # is always honoured); their addresses go into the block below.
    mod_ranges = []
    lo = align_up(kernel_end, MODULE_ALIGN)
    for i, (data, _) in enumerate(modules):
        start = layout.find_free(len(data), MODULE_ALIGN, lo, BOOT_STRUCT_LIMIT)
        if start is None:
            raise LoaderConfigError(
                f"module {i} ({fmt_size(len(data))}) does not fit in guest RAM "
                f"({fmt_size(ram_size)}) above the kernel")
        layout.place(f"module {i}", start, data)
        mod_ranges.append((start, start + len(data)))
        lo = start + len(data)

    mmap = memory_map(ram_size)
    mmap_bytes = b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE, base, length, kind)
                          for base, length, kind in mmap)
    strings_off = MBI_OFFSET + MBI_SIZE + MOD_ENTRY_SIZE * len(modules)
    size = (strings_off + len(cmdline) + sum(len(s) for _, s in modules)
            + len(BOOT_LOADER_NAME) + 1)
    base = layout.find_room("Multiboot information", size, 16, INFO_PREFERRED,
                            LOW_MEM_END, BOOT_STRUCT_LIMIT)

    strings = bytearray()

    def add_string(raw: bytes) -> int:
        addr = base + strings_off + len(strings)
        strings.extend(raw)
        return addr

    cmdline_addr = add_string(cmdline)
    mod_table = bytearray()
    mods_info = []
    for (start, end), (_, raw_string) in zip(mod_ranges, modules):
        mod_table += struct.pack("<IIII", start, end, add_string(raw_string), 0)
        mods_info.append({"start": start, "end": end,
                          "cmdline": raw_string[:-1].decode("utf-8", "replace")})
    name_addr = add_string(BOOT_LOADER_NAME + b"\0")

    lower, upper = mem_lower_upper(ram_size)
    mbi = bytearray(MBI_SIZE)
    mbi_addr = base + MBI_OFFSET
    struct.pack_into("<I", mbi, MBI_FLAGS,
                     MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_CMDLINE | MULTIBOOT_INFO_MODS
                     | MULTIBOOT_INFO_MEM_MAP | MULTIBOOT_INFO_BOOT_LOADER_NAME)
    struct.pack_into("<II", mbi, MBI_MEM_LOWER, lower, upper)
    struct.pack_into("<I", mbi, MBI_CMDLINE, cmdline_addr)
    struct.pack_into("<II", mbi, MBI_MODS_COUNT, len(modules), base + MBI_OFFSET + MBI_SIZE)
    struct.pack_into("<II", mbi, MBI_MMAP_LENGTH, len(mmap_bytes), base)
    struct.pack_into("<I", mbi, MBI_BOOT_LOADER_NAME, name_addr)

    block = mmap_bytes.ljust(MBI_OFFSET, b"\0") + bytes(mbi) + bytes(mod_table) + bytes(strings)
    layout.place("Multiboot information", base, block)

    info = {"mbi": mbi_addr, "mmap": mmap, "mem_lower": lower, "mem_upper": upper,
            "cmdline": cmdline[:-1].decode("utf-8", "replace"), "modules": mods_info}
    return mbi_addr, info

"""Linux loaders: the x86 boot protocol (bzImage) and PVH (an ELF vmlinux).

**bzImage** (the kernel's Documentation/arch/x86/boot.rst, "The Linux/x86 Boot
Protocol").  The file starts with the real-mode setup code; "HdrS" at 0x202
marks the setup header (boot.rst "The Real-Mode Kernel Header"), which begins
at 0x1f1.  vmlab has no BIOS, so it uses the 64-bit boot protocol (boot.rst
"64-bit Boot Protocol"): the protected-mode kernel (the file from offset
(setup_sects + 1) * 512) is loaded at a ``kernel_alignment``-aligned address
(``pref_address`` when it fits), ``init_size`` bytes are reserved there, and
the CPU enters at load address + 0x200 in 64-bit mode with:

* RSI = the zero page (``struct boot_params``), into which the setup header
  from the file was copied (offset 0x1f1, length 0x202 + byte at 0x201 - 0x1f1,
  boot.rst "Details of Header Fields"/"The Zero Page") and then filled in:
  type_of_loader 0xff ("undefined"), loadflags |= LOADED_HIGH, cmd_line_ptr,
  ramdisk_image/ramdisk_size (initrd placed page-aligned as high as possible
  below initrd_addr_max and RAM), the E820 table at 0x2d0 with its count at
  0x1e8, and acpi_rsdp_addr (0x070, protocol 2.14) = the RSDP vmlab builds;
* paging on with an identity map of [0, 4 GiB) (covering the kernel's
  init_size range, the zero page and the command line);
* a GDT with __BOOT_CS = 0x10 (64-bit code) and __BOOT_DS = 0x18 (flat data),
  CS = 0x10, DS = ES = SS = 0x18, interrupts off.

``entry="32"`` uses the 32-bit boot protocol instead (boot.rst "32-bit Boot
Protocol"): paging off, EIP = code32_start (the load address), ESI = the zero
page, EBP = EDI = EBX = 0, __BOOT_CS = 0x10 being flat 32-bit code.

The command line is the one given, as is: the image path is not prepended
(Linux would take it for a parameter).  Requirements checked: boot protocol
>= 2.12 (XLF_KERNEL_64 and the 64-bit entry exist from 2.12), XLF_KERNEL_64
set for the 64-bit entry, a protected-mode part that is not empty.

**PVH** (Xen's "x86/HVM direct boot ABI", as QEMU and Firecracker load Linux's
vmlinux): an ELF64 x86-64 executable with a PT_NOTE holding an ELF note of name
"Xen" and type 18, XEN_ELFNOTE_PHYS32_ENTRY, whose descriptor is the 32-bit
physical entry point.  PT_LOAD segments go to p_paddr; the CPU enters in
32-bit protected mode with paging off at that entry, CS a flat 32-bit code
segment, DS/ES/SS flat data, EBX = the ``hvm_start_info`` structure (version
1): magic 0x336ec578, the command line, the initrd as module 0, the RSDP and
the memory map (hvm_memmap_table_entry, E820 types).

Both place their structures through :class:`GuestLayout` (never outside RAM,
never overlapping the kernel), and both ask the machine for ACPI tables
(:attr:`BootImage.firmware`): Linux on a machine without a BIOS finds the
IOAPIC, the UART and the virtio-mmio devices through them.
"""

import struct

from vmlab.emu.loaders.elf import parse_elf, place_segments
from vmlab.emu.loaders.errors import LoaderConfigError, LoaderFormatError
from vmlab.emu.loaders.image import BootImage
from vmlab.emu.loaders.layout import GiB, MiB, GuestLayout, align_up, fmt_range, fmt_size
from vmlab.emu.loaders.mbinfo import memory_map
from vmlab.emu.loaders.x86 import (BOOT_STACK_PREFERRED, BOOT_STACK_SIZE, BOOT_STRUCT_LIMIT, GDT_PREFERRED,
                             IDENTITY_MAP_END, LOW_MEM_END, PAGE_TABLES_PREFERRED, PAGE_TABLES_SIZE,
                             build_identity_page_tables, reserve_firmware_areas)

__all__ = ["load_bzimage", "load_pvh", "is_bzimage", "pvh_entry", "e820_map",
           "ACPI_AREA", "ACPI_RSDP_ADDR", "BOOT_CS", "BOOT_DS", "HVM_START_MAGIC"]

# --- boot.rst, "The Real-Mode Kernel Header" (offsets in the file and in the
# zero page alike) ----------------------------------------------------------
HDR_START = 0x1F1
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE           # 0xAA55
OFF_JUMP = 0x200                # 2-byte jump; its byte at 0x201 gives the header's end
OFF_HEADER = 0x202              # "HdrS"
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE_KERNEL = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_HARDWARE_SUBARCH = 0x23C
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
#: end of the fields vmlab reads (boot protocol 2.12 ends the header at 0x264+)
HDR_MIN_END = 0x264
#: boot_params: the setup header ends before edd_mbr_sig_buffer at 0x290
#: (arch/x86/include/uapi/asm/bootparam.h, boot.rst "The Zero Page").
HDR_MAX_END = 0x290

# --- boot.rst "The Zero Page" (zero-page.rst): fields outside the header ----
ZP_ACPI_RSDP_ADDR = 0x070       # u64, protocol 2.14+
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8         # u8
ZP_E820_TABLE = 0x2D0           # 128 entries of 20 bytes: u64 addr, u64 size, u32 type
E820_MAX_ENTRIES_ZEROPAGE = 128
ZERO_PAGE_SIZE = 0x1000

HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
LOADED_HIGH = 0x01              # loadflags bit 0
XLF_KERNEL_64 = 0x01            # xloadflags bit 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
MIN_PROTOCOL = 0x020C           # 2.12: xloadflags, the 64-bit entry
#: the 64-bit entry point is at this offset from the load address (boot.rst
#: "64-bit Boot Protocol")
STARTUP_64_OFFSET = 0x200
#: default load address of a non-relocatable bzImage (boot.rst "code32_start")
DEFAULT_LOAD = 0x100000
PAGE = 0x1000

# E820 types (ACPI 6.5 §15.1, Table 15.1 "Address Range Types")
E820_RAM, E820_RESERVED, E820_ACPI = 1, 2, 3

#: Where vmlab's ACPI tables live: the BIOS read-only area [0xE0000, 0x100000),
#: which the OS scans for the RSDP on 16-byte boundaries (ACPI 6.5 §5.2.5.1,
#: "Finding the RSDP on IA-PC Systems").  The RSDP is the first structure.
ACPI_AREA = (0xE0000, 0x100000)
ACPI_RSDP_ADDR = ACPI_AREA[0]

#: boot.rst "64-bit Boot Protocol": "__BOOT_CS(0x10) and __BOOT_DS(0x18)".
BOOT_CS, BOOT_DS = 0x10, 0x18
#: GDT: null, null, __BOOT_CS, __BOOT_DS (SDM Vol. 3A §3.4.5 descriptors).
_GDT_CODE64 = 0x00AF9B000000FFFF   # G, L, P, DPL 0, code execute/read, accessed
_GDT_CODE32 = 0x00CF9B000000FFFF   # G, D, P, DPL 0, code execute/read, accessed
_GDT_DATA = 0x00CF93000000FFFF     # G, B, P, DPL 0, data read/write, accessed

# --- PVH: Xen's public headers, elfnote.h and arch-x86/hvm/start_info.h ------
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_SIZE = 56         # version 1: magic..memmap_entries, reserved
HVM_MODLIST_ENTRY_SIZE = 32      # paddr, size, cmdline_paddr, reserved
HVM_MEMMAP_ENTRY_SIZE = 24       # addr, size, type, reserved
#: ELF notes walked at most (a hostile file may claim millions)
MAX_NOTES = 4096

ZERO_PAGE_PREFERRED = 0x10000
CMDLINE_PREFERRED = 0x20000


def is_bzimage(data: bytes) -> bool:
    """True when ``data`` has the setup header signature "HdrS" at 0x202."""
    return data[OFF_HEADER:OFF_HEADER + 4] == HDRS_MAGIC


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """``(addr, size, type)``: what the machine looks like to Linux.

    Conventional memory up to the EBDA, the EBDA reserved, the ACPI/BIOS area
    [0xE0000, 1 MiB) reserved, RAM from 1 MiB to the end of RAM below 4 GiB,
    and the RAM above 4 GiB when there is more than 3 GiB (emu/memory.py
    split_ram, QEMU pc's split).
    """
    return memory_map(ram_size, bios_area=ACPI_AREA[0])


def _cmdline_bytes(cmdline: str, limit: int | None) -> bytes:
    if not isinstance(cmdline, str):
        raise LoaderConfigError(f"kernel command line must be a string, not {type(cmdline).__name__}")
    raw = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LoaderConfigError("kernel command line contains a NUL byte")
    if limit is not None and len(raw) > limit:
        raise LoaderConfigError(
            f"kernel command line is {len(raw)} bytes, more than the kernel's cmdline_size ({limit})")
    return raw + b"\0"


def _initrd_bytes(initrd) -> bytes | None:
    if initrd is None:
        return None
    if not isinstance(initrd, (bytes, bytearray, memoryview)):
        raise LoaderConfigError(f"initrd must be bytes, not {type(initrd).__name__}")
    return bytes(initrd) or None


def _place_top(layout: GuestLayout, name: str, data: bytes, lo: int, hi: int) -> int:
    """Place ``data`` page-aligned as high as possible in [lo, hi): where QEMU
    and GRUB put an initrd, out of the way of the kernel's decompression."""
    size = align_up(len(data), PAGE)
    addr = layout.find_free_top(size, PAGE, lo, hi)
    if addr is None:
        raise LoaderConfigError(
            f"the {name} ({fmt_size(len(data))}) does not fit in guest RAM below "
            f"{hi:#x} ({fmt_size(layout.ram_size)} of RAM)")
    layout.place(name, addr, data)
    return addr


def _place_gdt(layout: GuestLayout, code: int) -> tuple[int, int]:
    gdt = struct.pack("<4Q", 0, 0, code, _GDT_DATA)
    base = layout.find_room("GDT", len(gdt), 16, GDT_PREFERRED, LOW_MEM_END, BOOT_STRUCT_LIMIT)
    layout.place("GDT", base, gdt)
    return base, len(gdt) - 1


def _place_stack(layout: GuestLayout) -> int:
    stack = layout.find_room("boot stack", BOOT_STACK_SIZE, 16, BOOT_STACK_PREFERRED,
                             LOW_MEM_END, BOOT_STRUCT_LIMIT)
    layout.reserve("boot stack", stack, BOOT_STACK_SIZE)
    return stack + BOOT_STACK_SIZE


def _u(data: bytes, off: int, size: int) -> int:
    return int.from_bytes(data[off:off + size], "little")


# ----------------------------------------------------------------------------- bzImage

def load_bzimage(data: bytes, *, ram_size: int, cmdline: str = "", initrd: bytes | None = None,
                 entry: str = "64") -> BootImage:
    """Plan the boot of a Linux bzImage (see the module docstring).

    Raises LoaderFormatError for a file that is not a usable bzImage and
    LoaderConfigError when it does not fit the machine.
    """
    if entry not in ("64", "32"):
        raise LoaderConfigError(f"bzImage entry must be '64' or '32', not {entry!r}")
    if len(data) < HDR_MIN_END or not is_bzimage(data):
        raise LoaderFormatError("not a Linux bzImage (no \"HdrS\" setup header at 0x202)")
    version = _u(data, OFF_VERSION, 2)
    proto = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_PROTOCOL:
        raise LoaderFormatError(
            f"bzImage uses boot protocol {proto}; vmlab needs 2.12 or later (the 64-bit entry)")
    if _u(data, OFF_BOOT_FLAG, 2) != BOOT_FLAG:
        raise LoaderFormatError("bzImage boot_flag at 0x1fe is not 0xaa55")
    xloadflags = _u(data, OFF_XLOADFLAGS, 2)
    if entry == "64" and not xloadflags & XLF_KERNEL_64:
        raise LoaderFormatError("bzImage has no 64-bit entry point (xloadflags XLF_KERNEL_64 clear)")
    setup_sects = data[OFF_SETUP_SECTS] or 4        # boot.rst: "If this field is 0, the real value is 4"
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= len(data):
        raise LoaderFormatError(
            f"bzImage is truncated: its setup code ends at {pm_offset:#x}, the file is {len(data)} bytes")
    kernel = data[pm_offset:]
    hdr_end = min(OFF_HEADER + data[OFF_JUMP + 1], HDR_MAX_END)
    hdr_end = max(hdr_end, HDR_MIN_END)

    relocatable = bool(data[OFF_RELOCATABLE_KERNEL])
    align = _u(data, OFF_KERNEL_ALIGNMENT, 4)
    if align == 0 or align & (align - 1) or align > 1 * GiB:
        align = 2 * MiB if relocatable else PAGE
    init_size = max(_u(data, OFF_INIT_SIZE, 4), len(kernel))
    pref = _u(data, OFF_PREF_ADDRESS, 8)
    code32 = _u(data, OFF_CODE32_START, 4)

    layout = GuestLayout(ram_size)
    reserve_firmware_areas(layout)
    limit = min(ram_size, IDENTITY_MAP_END)
    if relocatable:
        load = pref if pref % align == 0 and pref >= 1 * MiB and pref + init_size <= limit else None
        if load is None:
            load = layout.find_free(init_size, align, 1 * MiB, limit)
        if load is None:
            raise LoaderConfigError(
                f"the kernel needs {fmt_size(init_size)} (init_size) at a {fmt_size(align)} boundary; "
                f"guest RAM ({fmt_size(ram_size)}) is too small")
    else:
        load = code32 or DEFAULT_LOAD
        if load + init_size > limit:
            raise LoaderConfigError(
                f"the kernel {fmt_range(load, load + init_size)} (init_size) does not fit in "
                f"guest RAM ({fmt_size(ram_size)})")
    layout.place("kernel", load, kernel, init_size)

    cmdline_size = _u(data, OFF_CMDLINE_SIZE, 4)
    raw_cmdline = _cmdline_bytes(cmdline, cmdline_size if cmdline_size else 255)
    cr3 = None
    if entry == "64":
        cr3 = layout.find_room("page tables", PAGE_TABLES_SIZE, PAGE, PAGE_TABLES_PREFERRED,
                               LOW_MEM_END, BOOT_STRUCT_LIMIT)
        layout.place("page tables", cr3, build_identity_page_tables(cr3))
    gdt = _place_gdt(layout, _GDT_CODE64 if entry == "64" else _GDT_CODE32)
    stack_top = _place_stack(layout)
    zp = layout.find_room("zero page", ZERO_PAGE_SIZE, PAGE, ZERO_PAGE_PREFERRED,
                          LOW_MEM_END, BOOT_STRUCT_LIMIT)
    cl = layout.find_room("kernel command line", len(raw_cmdline), 16, CMDLINE_PREFERRED,
                          LOW_MEM_END, BOOT_STRUCT_LIMIT)
    layout.place("kernel command line", cl, raw_cmdline)

    rd = _initrd_bytes(initrd)
    rd_addr = 0
    if rd is not None:
        addr_max = _u(data, OFF_INITRD_ADDR_MAX, 4) or 0x37FFFFFF   # boot.rst: 0x37ffffff before 2.03
        rd_addr = _place_top(layout, "initrd", rd, 1 * MiB, min(addr_max + 1, limit))

    boot = bytearray(ZERO_PAGE_SIZE)
    boot[HDR_START:hdr_end] = data[HDR_START:hdr_end]
    boot[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    boot[OFF_LOADFLAGS] |= LOADED_HIGH
    struct.pack_into("<I", boot, OFF_CODE32_START, load)
    struct.pack_into("<II", boot, OFF_RAMDISK_IMAGE, rd_addr, len(rd) if rd else 0)
    struct.pack_into("<I", boot, OFF_CMD_LINE_PTR, cl)
    struct.pack_into("<I", boot, OFF_HARDWARE_SUBARCH, 0)
    struct.pack_into("<III", boot, ZP_EXT_RAMDISK_IMAGE, 0, 0, 0)
    if version >= 0x020E:
        struct.pack_into("<Q", boot, ZP_ACPI_RSDP_ADDR, ACPI_RSDP_ADDR)
    e820 = e820_map(ram_size)
    boot[ZP_E820_ENTRIES] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQI", boot, ZP_E820_TABLE + 20 * i, a, s, t)
    layout.place("zero page", zp, bytes(boot))

    if entry == "64":
        mode, rip, regs = "long64", load + STARTUP_64_OFFSET, {"rsi": zp, "rsp": stack_top}
    else:
        mode, rip, regs = "protected32", load, {"esi": zp, "esp": stack_top}
    return BootImage(
        format="bzimage", mode=mode, entry=rip, regs=regs,
        writes=layout.writes, zero=layout.zero, cr3=cr3, gdt=gdt,
        selectors=(BOOT_CS, BOOT_DS), firmware=True,
        info={"protocol": proto, "load": load, "init_size": init_size, "zero_page": zp,
              "cmdline": raw_cmdline[:-1].decode("utf-8", "replace"), "cmdline_addr": cl,
              "initrd": (rd_addr, len(rd)) if rd else None, "e820": e820, "gdt": gdt,
              "page_tables": cr3, "stack_top": stack_top, "rsdp": ACPI_RSDP_ADDR,
              "warnings": []})


# ----------------------------------------------------------------------------- PVH

def _program_notes(data: bytes):
    """Yield ``(name, type, desc)`` of the notes in every PT_NOTE segment of an
    ELF64 little-endian file (gABI "Note Section"); bounded and bounds-checked."""
    if len(data) < 64:
        return
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phentsize != 56 or phnum > 4096:
        return
    count = 0
    for i in range(phnum):
        off = phoff + i * 56
        if off + 56 > len(data):
            return
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, off)
        if p_type != 4:                       # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(data))
        while pos + 12 <= end and count < MAX_NOTES:
            count += 1
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_off = pos + 12
            desc_off = name_off + align_up(namesz, 4)
            nxt = desc_off + align_up(descsz, 4)
            if desc_off + descsz > end:
                break
            yield data[name_off:name_off + namesz].rstrip(b"\0"), ntype, data[desc_off:desc_off + descsz]
            pos = nxt


def pvh_entry(data: bytes) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY of an ELF64 file, or None when it has none."""
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2 or data[5] != 1:
        return None
    for name, ntype, desc in _program_notes(data):
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little")
    return None


def load_pvh(data: bytes, *, ram_size: int, cmdline: str = "", initrd: bytes | None = None) -> BootImage:
    """Plan the PVH boot of an ELF vmlinux (see the module docstring)."""
    entry = pvh_entry(data)
    if entry is None:
        raise LoaderFormatError("ELF file has no PVH entry (no Xen note of type 18, "
                                "XEN_ELFNOTE_PHYS32_ENTRY)")
    elf = parse_elf(data, elfclass=64, machine="EM_X86_64", machine_desc="x86-64")
    layout = GuestLayout(ram_size)
    reserve_firmware_areas(layout)
    segments = place_segments(layout, data, elf)
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in elf.loads):
        raise LoaderFormatError(f"PVH entry point {entry:#x} is not inside any PT_LOAD segment")
    if entry >= min(ram_size, IDENTITY_MAP_END):
        raise LoaderConfigError(f"PVH entry point {entry:#x} lies outside guest RAM")
    raw_cmdline = _cmdline_bytes(cmdline, None)
    gdt = _place_gdt(layout, _GDT_CODE32)
    stack_top = _place_stack(layout)
    rd = _initrd_bytes(initrd)
    rd_addr = 0
    if rd is not None:
        rd_addr = _place_top(layout, "initrd", rd, layout.highest_end, min(ram_size, BOOT_STRUCT_LIMIT))
    e820 = e820_map(ram_size)
    nmods = 1 if rd else 0
    memmap_off = HVM_START_INFO_SIZE
    modlist_off = memmap_off + HVM_MEMMAP_ENTRY_SIZE * len(e820)
    cmdline_off = modlist_off + HVM_MODLIST_ENTRY_SIZE * nmods
    size = cmdline_off + len(raw_cmdline)
    base = layout.find_room("hvm_start_info", size, 16, ZERO_PAGE_PREFERRED, LOW_MEM_END, BOOT_STRUCT_LIMIT)
    blob = bytearray(size)
    struct.pack_into("<IIIIQQQQII", blob, 0, HVM_START_MAGIC, 1, 0, nmods,
                     base + modlist_off if nmods else 0, base + cmdline_off, ACPI_RSDP_ADDR,
                     base + memmap_off, len(e820), 0)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQII", blob, memmap_off + i * HVM_MEMMAP_ENTRY_SIZE, a, s, t, 0)
    if nmods:
        struct.pack_into("<QQQQ", blob, modlist_off, rd_addr, len(rd), 0, 0)
    blob[cmdline_off:] = raw_cmdline
    layout.place("hvm_start_info", base, bytes(blob))
    return BootImage(
        format="pvh", mode="protected32", entry=entry, regs={"ebx": base, "esp": stack_top},
        writes=layout.writes, zero=layout.zero, cr3=None, gdt=gdt,
        selectors=(BOOT_CS, BOOT_DS), firmware=True,
        info={"segments": segments, "start_info": base, "cmdline": raw_cmdline[:-1].decode("utf-8", "replace"),
              "initrd": (rd_addr, len(rd)) if rd else None, "e820": e820, "gdt": gdt,
              "stack_top": stack_top, "rsdp": ACPI_RSDP_ADDR, "warnings": []})


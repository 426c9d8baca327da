"""Multiboot v1 loader (Multiboot Specification version 0.6.96).

Header (§3.1.1): a 32-bit aligned structure entirely inside the first 8192
bytes of the image::

    offset  field           required when
    0       magic           0x1BADB002
    4       flags
    8       checksum        magic + flags + checksum == 0 (mod 2**32)
    12      header_addr     flags bit 16 (a.out kludge)
    16      load_addr       flags bit 16
    20      load_end_addr   flags bit 16
    24      bss_end_addr    flags bit 16
    28      entry_addr      flags bit 16
    32-44   mode_type, width, height, depth   flags bit 2

Flags (§3.1.2): bits 0-15 are requirements the loader must refuse when it
cannot honour them; bits 16-31 are optional.  vmlab honours bit 0 (modules
page-aligned: they always are), bit 1 (memory information: always given) and
bit 16 (address fields).  Bit 2 (video mode) is ignored with a warning in
``info``, as QEMU does ("multiboot knows VBE. we don't."); any other bit in
0-15 is refused.

Image (§3.1.3): with flags bit 16 the address fields say what to load, as in
QEMU hw/i386/multiboot.c: file bytes from ``header offset - (header_addr -
load_addr)`` are copied to ``load_addr`` up to ``load_end_addr`` (0: to the end
of the file), and ``[load_end_addr, bss_end_addr)`` is cleared (0: no bss).
Without bit 16 the file must be an ELF32 i386 executable whose PT_LOAD
segments are loaded at p_paddr; e_entry is translated to a physical address
through its segment, like GRUB 2.

Machine state (§3.2): EAX = 0x2BADB002, EBX = physical address of the
Multiboot information (§3.3, see :mod:`emu.loaders.mbinfo`; 0x9500 unless the
kernel occupies it).  The machine provides the rest: 32-bit protected mode,
paging off, IF=0, CS = flat 32-bit code, DS/ES/FS/GS/SS = flat data.  The
loader writes a GDT with such descriptors (:mod:`emu.loaders.x86`, CS 0x18,
data 0x10) and returns it in ``gdt`` for the machine's convenience; §3.2 says
GDTR may be invalid, so a kernel must not rely on it.  ESP is also undefined
in §3.2; vmlab sets it to the top of an 8 KiB boot stack (0x9000 unless the
kernel occupies it), which a kernel must not rely on either.

The kernel command line is "<kernel path> <cmdline>" (or "vmlab <cmdline>"
for an image given as bytes), exactly as QEMU builds it (``"%s %s"`` of the
-kernel file name and -append), so argv[0] is the kernel as under GRUB.
"""

import struct
from dataclasses import dataclass

from vmlab.emu.loaders.elf import (ElfImage, check_ident, elf_class, is_elf, parse_elf, physical_entry,
                             place_segments)
from vmlab.emu.loaders.errors import LoaderConfigError, LoaderFormatError
from vmlab.emu.loaders.image import BootImage
from vmlab.emu.loaders.layout import GiB, GuestLayout, fmt_range
from vmlab.emu.loaders.mbinfo import (MULTIBOOT_BOOTLOADER_MAGIC, encode_modules, kernel_command_line,
                                place_boot_info)
from vmlab.emu.loaders.x86 import place_cpu_structures, reserve_firmware_areas

__all__ = ["MultibootHeader", "find_header", "load_multiboot", "MULTIBOOT_HEADER_MAGIC",
           "MULTIBOOT_SEARCH"]

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
#: §3.1.1: "must be contained completely within the first 8192 bytes".
MULTIBOOT_SEARCH = 8192
MULTIBOOT_HEADER_ALIGN = 4

# Header flags (§3.1.2).
MULTIBOOT_PAGE_ALIGN = 1 << 0
MULTIBOOT_MEMORY_INFO = 1 << 1
MULTIBOOT_VIDEO_MODE = 1 << 2
MULTIBOOT_AOUT_KLUDGE = 1 << 16
REQUIRED_MASK = 0xFFFF
HONOURED_REQUIRED = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO | MULTIBOOT_VIDEO_MODE

BASE_HEADER_SIZE = 12
AOUT_HEADER_SIZE = 32
VIDEO_HEADER_SIZE = 48

#: A Multiboot kernel runs in 32-bit mode: everything must be below 4 GiB.
ADDRESS_LIMIT = 4 * GiB


@dataclass(frozen=True)
class MultibootHeader:
    """A Multiboot header found in an image, checksum verified."""

    offset: int          # file offset of `magic`
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & MULTIBOOT_AOUT_KLUDGE)


def find_header(data: bytes) -> tuple[MultibootHeader | None, str]:
    """Search the first 8192 bytes for a Multiboot header (§3.1.1).

    Returns ``(header, "")`` for the first 32-bit aligned magic whose checksum
    is valid and whose fields fit in the search window and in the file, else
    ``(None, reason)`` with one sentence saying why there is none.
    """
    window = data[:MULTIBOOT_SEARCH]
    reason = ""
    for off in range(0, len(window) - BASE_HEADER_SIZE + 1, MULTIBOOT_HEADER_ALIGN):
        magic, flags, checksum = struct.unpack_from("<III", window, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            reason = reason or (
                f"Multiboot header at offset {off:#x} has a bad checksum {checksum:#010x} "
                f"for flags {flags:#010x} (magic + flags + checksum must be 0)")
            continue
        need = BASE_HEADER_SIZE
        if flags & MULTIBOOT_AOUT_KLUDGE:
            need = AOUT_HEADER_SIZE
        if flags & MULTIBOOT_VIDEO_MODE:
            need = VIDEO_HEADER_SIZE
        if off + need > len(window):
            reason = reason or (
                f"Multiboot header at offset {off:#x} needs {need} bytes but is cut off by "
                f"the end of the file or of the first {MULTIBOOT_SEARCH} bytes")
            continue
        fields = (0, 0, 0, 0, 0)
        if flags & MULTIBOOT_AOUT_KLUDGE:
            fields = struct.unpack_from("<5I", window, off + BASE_HEADER_SIZE)
        return MultibootHeader(off, flags, *fields), ""
    return None, reason or (
        f"no Multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x}) in the first "
        f"{MULTIBOOT_SEARCH} bytes")


def _check_flags(flags: int, warnings: list[str]) -> None:
    unknown = flags & REQUIRED_MASK & ~HONOURED_REQUIRED
    if unknown:
        bits = ", ".join(str(b) for b in range(16) if unknown >> b & 1)
        raise LoaderFormatError(
            f"Multiboot header flags {flags:#010x} require features vmlab cannot provide "
            f"(bit {bits})")
    if flags & MULTIBOOT_VIDEO_MODE:
        warnings.append("video mode requested (flags bit 2); ignored, no video info given")
    optional = flags & ~REQUIRED_MASK & ~MULTIBOOT_AOUT_KLUDGE
    if optional:
        warnings.append(f"unknown optional header flags {optional:#010x} ignored")


def _load_aout(layout: GuestLayout, data: bytes, hdr: MultibootHeader) -> tuple[int, dict]:
    """Place the image described by the a.out kludge fields; return (entry, info)."""
    if hdr.load_addr > hdr.header_addr:
        raise LoaderFormatError(
            f"Multiboot load_addr {hdr.load_addr:#x} is above header_addr {hdr.header_addr:#x}")
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_start < 0:
        raise LoaderFormatError(
            f"Multiboot header_addr - load_addr ({hdr.header_addr - hdr.load_addr:#x}) is larger "
            f"than the header's file offset ({hdr.offset:#x})")
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise LoaderFormatError(
                f"Multiboot load_end_addr {hdr.load_end_addr:#x} is below "
                f"load_addr {hdr.load_addr:#x}")
        load_size = hdr.load_end_addr - hdr.load_addr
        if file_start + load_size > len(data):
            raise LoaderFormatError(
                f"Multiboot load range needs file bytes "
                f"{fmt_range(file_start, file_start + load_size)} but the file has "
                f"{len(data)} bytes")
    else:
        load_size = len(data) - file_start
    mem_size = load_size
    if hdr.bss_end_addr:
        if hdr.bss_end_addr < hdr.load_addr + load_size:
            raise LoaderFormatError(
                f"Multiboot bss_end_addr {hdr.bss_end_addr:#x} is below the end of the "
                f"loaded image {hdr.load_addr + load_size:#x}")
        mem_size = hdr.bss_end_addr - hdr.load_addr
    if hdr.load_addr + mem_size > ADDRESS_LIMIT:
        raise LoaderFormatError(
            f"Multiboot image {fmt_range(hdr.load_addr, hdr.load_addr + mem_size)} "
            f"extends past 4 GiB")
    layout.place("Multiboot image", hdr.load_addr,
                 data[file_start:file_start + load_size], mem_size)
    info = {"load_addr": hdr.load_addr, "load_size": load_size, "bss_size": mem_size - load_size,
            "file_offset": file_start}
    return hdr.entry_addr, info


def _load_elf(layout: GuestLayout, data: bytes) -> tuple[int, dict]:
    elf: ElfImage = parse_elf(data, elfclass=32, machine="EM_386", machine_desc="i386")
    for seg in elf.loads:
        if seg.paddr + seg.memsz > ADDRESS_LIMIT:
            raise LoaderFormatError(
                f"segment {seg.index} {fmt_range(seg.paddr, seg.paddr + seg.memsz)} "
                f"extends past 4 GiB")
    segments = place_segments(layout, data, elf)
    entry = physical_entry(elf)
    return entry, {"segments": segments, "entry_vaddr": elf.entry}


def load_multiboot(data: bytes, *, ram_size: int, cmdline: str = "", modules=(),
                   name: str = "vmlab") -> BootImage:
    """Plan the boot of a Multiboot v1 kernel.

    Args:
        data: the whole kernel image.
        ram_size: guest RAM in bytes.
        cmdline: appended to ``name`` to form the kernel command line.
        modules: ``(bytes, cmdline)`` pairs, loaded page-aligned above the
            kernel in this order; each cmdline becomes the module's string.
        name: the kernel path as the user gave it ("vmlab" for bytes).
    """
    if is_elf(data):
        check_ident(data)
    hdr, reason = find_header(data)
    if is_elf(data) and elf_class(data) == 64 and not (hdr and hdr.aout_kludge):
        # QEMU refuses these too: "Cannot load x86-64 image, give a 32bit one."
        raise LoaderFormatError(
            "ELF64 file cannot be loaded as a Multiboot v1 kernel without the a.out kludge "
            "(flags bit 16); give a 32-bit kernel or use the elf64 format")
    if hdr is None:
        raise LoaderFormatError(reason)
    warnings: list[str] = []
    _check_flags(hdr.flags, warnings)
    kernel_cmdline = kernel_command_line(name, cmdline)
    mods = encode_modules(modules)

    layout = GuestLayout(ram_size)
    reserve_firmware_areas(layout)
    if hdr.aout_kludge:
        entry, kinfo = _load_aout(layout, data, hdr)
    elif is_elf(data):
        entry, kinfo = _load_elf(layout, data)
    else:
        raise LoaderFormatError(
            "Multiboot header has no address fields (flags bit 16 clear) and the file is not "
            "an ELF file")
    kernel_end = layout.highest_end
    if not 0 <= entry < min(ram_size, ADDRESS_LIMIT):
        raise LoaderConfigError(
            f"entry point {entry:#x} lies outside guest RAM below 4 GiB")

    cpu = place_cpu_structures(layout, page_tables=False)
    mbi, boot_info = place_boot_info(layout, ram_size=ram_size, kernel_end=kernel_end,
                                     cmdline=kernel_cmdline, modules=mods)
    return BootImage(
        format="multiboot", mode="protected32", entry=entry,
        regs={"eax": MULTIBOOT_BOOTLOADER_MAGIC, "ebx": mbi, "esp": cpu.stack_top},
        writes=layout.writes, zero=layout.zero, cr3=None, gdt=cpu.gdt,
        info={"header_offset": hdr.offset, "header_flags": hdr.flags,
              "aout_kludge": hdr.aout_kludge, **kinfo, "kernel_end": kernel_end,
              "gdt": cpu.gdt, "stack_top": cpu.stack_top, **boot_info,
              "warnings": warnings})


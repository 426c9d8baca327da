"""ELF64 x86-64 loader: enter a 64-bit kernel directly in long mode.

The file must be an ELFCLASS64, ELFDATA2LSB, EM_X86_64, ET_EXEC executable
(System V gABI; x86-64 psABI).  Each PT_LOAD segment is copied to p_paddr
(p_filesz bytes) and cleared up to p_memsz.  Entry is e_entry translated to
a physical address through the PT_LOAD segment that contains it (the identity
map below makes physical == virtual for [0, 4 GiB)), and must be below 4 GiB.

Structures the loader builds (first free place at or above the preferred
address in conventional memory, else above the image; see
:mod:`emu.loaders.x86`):

* page tables at 0x1000-0x6fff: PML4, PDPT, PD0-PD3 identity-mapping
  [0, 4 GiB) with 2 MiB pages, present + writable, no NX; ``cr3`` = PML4.
* GDT at 0x500: null, 0x08 64-bit code, 0x10 data, 0x18 32-bit code;
  ``gdt`` = (base, 31).
* boot stack [0x7000, 0x9000).
* Multiboot information at 0x9000 (memory map) / 0x9500 (multiboot_info),
  exactly as for a Multiboot kernel (:mod:`emu.loaders.mbinfo`), with the
  command line and modules.

Machine state at entry (the machine sets up the CPU side: CR0.PE|PG,
CR4.PAE, EFER.LME|LMA, CR3, GDTR, CS = 0x08, DS/ES/SS = 0x10, IF = 0):

* RIP = entry
* RSP = top of the boot stack (0x9000), 16-byte aligned as at a SysV
  process entry: e_entry is entered by a jump, not a call.
* RAX = RDI = 0x2BADB002 and RBX = RSI = address of the Multiboot
  information.  RAX/RBX follow Multiboot §3.2 so an entry stub shared with a
  32-bit Multiboot build works unchanged; RDI/RSI are the first two SysV
  argument registers so a C entry ``kmain(uint32_t magic, uint32_t mbi)``
  can be e_entry itself.
* all other general-purpose registers are zero.
"""

from vmlab.emu.loaders.elf import parse_elf, physical_entry, place_segments
from vmlab.emu.loaders.errors import LoaderConfigError
from vmlab.emu.loaders.image import BootImage
from vmlab.emu.loaders.layout import GuestLayout
from vmlab.emu.loaders.mbinfo import (MULTIBOOT_BOOTLOADER_MAGIC, encode_modules, kernel_command_line,
                                place_boot_info)
from vmlab.emu.loaders.x86 import IDENTITY_MAP_END, place_cpu_structures, reserve_firmware_areas

__all__ = ["load_elf64"]


def load_elf64(data: bytes, *, ram_size: int, cmdline: str = "", modules=(),
               name: str = "vmlab") -> BootImage:
    """Plan the boot of an x86-64 ELF executable in long mode.

    Arguments as for :func:`emu.loaders.multiboot.load_multiboot`.
    """
    kernel_cmdline = kernel_command_line(name, cmdline)
    mods = encode_modules(modules)
    elf = parse_elf(data, elfclass=64, machine="EM_X86_64", machine_desc="x86-64")

    layout = GuestLayout(ram_size)
    reserve_firmware_areas(layout)
    segments = place_segments(layout, data, elf)
    kernel_end = layout.highest_end
    entry = physical_entry(elf)
    if entry >= min(ram_size, IDENTITY_MAP_END):
        raise LoaderConfigError(
            f"entry point {entry:#x} lies outside guest RAM mapped at entry "
            f"(the identity map covers [0, 4 GiB))")

    cpu = place_cpu_structures(layout, page_tables=True)
    mbi, boot_info = place_boot_info(layout, ram_size=ram_size, kernel_end=kernel_end,
                                     cmdline=kernel_cmdline, modules=mods)
    return BootImage(
        format="elf64", mode="long64", entry=entry,
        regs={"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rdi": MULTIBOOT_BOOTLOADER_MAGIC,
              "rbx": mbi, "rsi": mbi, "rsp": cpu.stack_top},
        writes=layout.writes, zero=layout.zero, cr3=cpu.cr3, gdt=cpu.gdt,
        info={"segments": segments, "entry_vaddr": elf.entry, "kernel_end": kernel_end,
              "page_tables": cpu.cr3, "gdt": cpu.gdt, "stack_top": cpu.stack_top,
              **boot_info, "warnings": []})

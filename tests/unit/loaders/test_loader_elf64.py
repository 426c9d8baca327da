"""ELF64 loader: long-mode entry, identity page tables, GDT, boot info."""

import struct

import pytest

from vmlab.emu.loaders import LoaderConfigError, LoaderFormatError, load
from vmlab.emu.loaders.x86 import GDT_SEL_CODE32, GDT_SEL_CODE64, GDT_SEL_DATA

from .elfbuild import (EM_AARCH64, ET_DYN, PF_R, PF_W, GuestView, Seg, assert_plan_sane,
                       build_elf, decode_mbi, multiboot_header)

MiB = 1 << 20
RAM = 64 * MiB
KERNEL = 0x200000
CODE = b"\x48\x31\xc0\xf4" * 8


def kernel(**kw) -> bytes:
    segs = kw.pop("segs", [Seg(KERNEL, CODE), Seg(KERNEL + 0x1000, b"data", memsz=0x3000,
                                                  flags=PF_R | PF_W)])
    return build_elf(64, segs, entry=kw.pop("entry", KERNEL), **kw)


def test_elf64_autodetected_and_entered_in_long_mode_with_documented_registers():
    image = load(kernel(), ram_size=RAM)
    assert (image.format, image.mode, image.entry) == ("elf64", "long64", KERNEL)
    assert image.regs == {"rax": 0x2BADB002, "rdi": 0x2BADB002, "rbx": 0x9500, "rsi": 0x9500,
                          "rsp": 0x9000}
    assert image.writes[:2] == [(KERNEL, CODE), (KERNEL + 0x1000, b"data")]
    assert image.zero == [(KERNEL + 0x1004, 0x3000 - 4)]
    assert image.cr3 == 0x1000 and image.gdt == (0x500, 31)
    assert_plan_sane(image, RAM)


def test_elf64_page_tables_identity_map_4gib_with_2mib_pages():
    image = load(kernel(), ram_size=RAM)
    view = GuestView(image)
    pml4 = struct.unpack("<512Q", view.read(image.cr3, 4096))
    assert pml4[0] == 0x2000 | 0x3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", view.read(0x2000, 4096))
    assert pdpt[:4] == (0x3003, 0x4003, 0x5003, 0x6003) and not any(pdpt[4:])
    for i in range(4):
        pd = struct.unpack("<512Q", view.read(0x3000 + i * 0x1000, 4096))
        assert pd == tuple((((i * 512 + j) << 21) | 0x83) for j in range(512))


def test_elf64_gdt_descriptors_are_the_documented_quadwords():
    image = load(kernel(), ram_size=RAM)
    base, limit = image.gdt
    gdt = struct.unpack("<4Q", GuestView(image).read(base, limit + 1))
    assert gdt[0] == 0
    assert gdt[GDT_SEL_CODE64 // 8] == 0x00AF9B000000FFFF
    assert gdt[GDT_SEL_DATA // 8] == 0x00CF93000000FFFF
    assert gdt[GDT_SEL_CODE32 // 8] == 0x00CF9B000000FFFF


def test_elf64_boot_info_matches_multiboot_layout():
    image = load(kernel(), ram_size=RAM, cmdline="x=1", modules=[(b"MOD", "m")])
    view = GuestView(image)
    mbi = decode_mbi(view, image.regs["rbx"])
    assert view.cstr(mbi["cmdline"]) == b"vmlab x=1"
    assert mbi["mem_lower"] == 639 and mbi["mem_upper"] == (RAM - MiB) // 1024
    assert mbi["mods"][0][:2] == (KERNEL + 0x4000, KERNEL + 0x4003)
    assert view.read(KERNEL + 0x4000, 3) == b"MOD"


def test_elf64_higher_half_entry_translated_to_physical():
    base = 0xFFFFFFFF80000000
    data = kernel(segs=[Seg(KERNEL, CODE, vaddr=base + KERNEL)], entry=base + KERNEL + 8)
    image = load(data, ram_size=RAM)
    assert image.entry == KERNEL + 8 and image.info["entry_vaddr"] == base + KERNEL + 8


def test_elf64_kernel_in_low_memory_moves_page_tables_out_of_its_way():
    data = kernel(segs=[Seg(0x1000, CODE, memsz=0x10000)], entry=0x1000)
    image = load(data, ram_size=RAM)
    assert image.cr3 % 0x1000 == 0 and not 0x1000 <= image.cr3 < 0x11000
    assert GuestView(image).u64(image.cr3) == (image.cr3 + 0x1000) | 3
    assert_plan_sane(image, RAM)


def test_elf64_for_aarch64_raises_format_error():
    with pytest.raises(LoaderFormatError, match="machine EM_AARCH64, not x86-64"):
        load(kernel(machine=EM_AARCH64), ram_size=RAM)


def test_elf64_shared_object_raises_format_error():
    with pytest.raises(LoaderFormatError, match="type ET_DYN, not an executable"):
        load(kernel(e_type=ET_DYN), ram_size=RAM)


def test_elf64_format_given_elf32_raises_format_error():
    data = build_elf(32, [Seg(0x100000, multiboot_header() + CODE)], entry=0x100000)
    with pytest.raises(LoaderFormatError, match="ELFCLASS32, but this loader needs ELFCLASS64"):
        load(data, fmt="elf64", ram_size=RAM)


def test_elf64_entry_above_4gib_raises_config_error():
    # With 8 GiB the RAM at 4 GiB exists (above the hole, emu/memory.py split_ram),
    # but the loader places images in the RAM below 4 GiB only.
    data = kernel(segs=[Seg(4 << 30, CODE)], entry=4 << 30)
    with pytest.raises(LoaderConfigError, match=r"0x100000000.*lies outside"):
        load(data, ram_size=8 << 30)


def test_elf64_segment_outside_ram_raises_config_error():
    data = kernel(segs=[Seg(KERNEL, CODE), Seg(RAM - 0x1000, b"x", memsz=0x2000)])
    with pytest.raises(LoaderConfigError,
                       match=r"segment 1 \[0x3fff000-0x4001000\) lies outside guest RAM"):
        load(data, ram_size=RAM)


def test_elf64_huge_memsz_raises_config_error_without_allocating():
    data = kernel(segs=[Seg(KERNEL, CODE, memsz=(1 << 64) - 1)])
    with pytest.raises(LoaderConfigError, match="lies outside guest RAM"):
        load(data, ram_size=RAM)


def test_elf64_bad_phentsize_raises_format_error():
    with pytest.raises(LoaderFormatError, match="e_phentsize is 32, expected 56"):
        load(kernel(phentsize=32), ram_size=RAM)


def test_elf64_extended_phnum_raises_format_error():
    with pytest.raises(LoaderFormatError, match="PN_XNUM"):
        load(kernel(phnum=0xFFFF), ram_size=RAM)


def test_elf64_no_program_headers_raises_format_error():
    with pytest.raises(LoaderFormatError, match="no program headers"):
        load(kernel(phnum=0), ram_size=RAM)

"""Multiboot v1 loader: ELF32 and a.out kludge images, header checks, §3.3 info."""

import pytest

from vmlab.emu.errors import LoaderError
from vmlab.emu.loaders import LoaderConfigError, LoaderFormatError, load

from .elfbuild import (EM_X86_64, PT_NOTE, GuestView, Seg, assert_plan_sane, build_elf,
                       decode_mbi, multiboot_header)

MiB = 1 << 20
RAM = 64 * MiB
KERNEL = 0x100000

# MBI flags vmlab sets: MEMORY | CMDLINE | MODS | MMAP | BOOT_LOADER_NAME.
MBI_FLAGS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)


def mb_elf(flags: int = 0x3, *, code: bytes = b"\xf4" * 20, memsz: int = 0x3000,
           paddr: int = KERNEL, vaddr: int | None = None, entry_off: int = 12,
           extra: list[Seg] | None = None, **kw) -> bytes:
    text = multiboot_header(flags) + code
    base = paddr if vaddr is None else vaddr
    return build_elf(32, [Seg(paddr, text, memsz=memsz, vaddr=vaddr)] + (extra or []),
                     entry=base + entry_off, **kw)


def aout_image(*, pad: int = 0x40, load_end: int | None = None, bss_end: int | None = None,
               header_addr: int | None = None, size: int = 0x200) -> bytes:
    """Non-ELF kernel: `pad` bytes of code, the header, then more code."""
    load_addr = KERNEL
    header_addr = KERNEL + pad if header_addr is None else header_addr
    if load_end is None:
        load_end = KERNEL + size
    if bss_end is None:
        bss_end = KERNEL + 0x2000
    hdr = multiboot_header(0x10003, aout=(header_addr, load_addr, load_end, bss_end, KERNEL))
    image = b"\xfa" * pad + hdr
    return image + b"\xf4" * (size - len(image))


# --- ELF32 images ------------------------------------------------------------

def test_multiboot_elf32_segments_loaded_at_paddr_with_bss_zeroed():
    data = mb_elf()
    image = load(data, ram_size=RAM)
    assert (image.format, image.mode, image.entry) == ("multiboot", "protected32", KERNEL + 12)
    text = multiboot_header(0x3) + b"\xf4" * 20
    assert image.writes[0] == (KERNEL, text)
    assert image.zero == [(KERNEL + len(text), 0x3000 - len(text))]
    assert image.regs == {"eax": 0x2BADB002, "ebx": 0x9500, "esp": 0x9000}
    assert image.gdt == (0x500, 31) and image.cr3 is None
    assert_plan_sane(image, RAM)


def test_multiboot_info_fields_decode_back_per_spec_3_3():
    image = load(mb_elf(), ram_size=RAM, cmdline="console=ttyS0 quiet")
    view = GuestView(image)
    mbi = decode_mbi(view, image.regs["ebx"])
    assert mbi["flags"] == MBI_FLAGS
    assert mbi["mem_lower"] == 639
    assert mbi["mem_upper"] == (RAM - MiB) // 1024
    assert view.cstr(mbi["cmdline"]) == b"vmlab console=ttyS0 quiet"
    assert view.cstr(mbi["boot_loader_name"]) == b"vmlab"
    assert mbi["mods_count"] == 0
    assert mbi["mmap_addr"] == 0x9000 and mbi["mmap_length"] == 4 * 24
    assert mbi["mmap"] == [
        (20, 0x0, 0x9FC00, 1),
        (20, 0x9FC00, 0x400, 2),
        (20, 0xF0000, 0x10000, 2),
        (20, 0x100000, RAM - MiB, 1),
    ]


def test_multiboot_path_input_puts_path_in_cmdline_like_qemu(tmp_path):
    path = tmp_path / "kernel.elf"
    path.write_bytes(mb_elf())
    image = load(str(path), ram_size=RAM, cmdline="a b")
    view = GuestView(image)
    mbi = decode_mbi(view, image.regs["ebx"])
    assert view.cstr(mbi["cmdline"]) == f"{path} a b".encode()


def test_multiboot_modules_page_aligned_above_kernel_with_own_strings():
    mod0, mod1 = b"first module" * 100, b"\x01\x02\x03"
    image = load(mb_elf(memsz=0x2345), ram_size=RAM,
                 modules=[(mod0, "initrd.img root=/dev/ram"), (mod1, "")])
    view = GuestView(image)
    mbi = decode_mbi(view, image.regs["ebx"])
    assert mbi["mods_count"] == 2
    (s0, e0, c0, r0), (s1, e1, c1, r1) = mbi["mods"]
    assert s0 == 0x103000 and e0 == s0 + len(mod0)
    assert s1 == 0x104000 and e1 == s1 + len(mod1)
    assert view.read(s0, len(mod0)) == mod0 and view.read(s1, len(mod1)) == mod1
    assert view.cstr(c0) == b"initrd.img root=/dev/ram" and view.cstr(c1) == b""
    assert r0 == r1 == 0
    assert image.info["modules"][0] == {"start": s0, "end": e0,
                                        "cmdline": "initrd.img root=/dev/ram"}
    assert_plan_sane(image, RAM)


def test_multiboot_mem_upper_below_the_hole_and_mmap_covers_all_ram():
    # 8 GiB: 3 GiB below the 32-bit hole and 5 GiB from 4 GiB (QEMU pc's split,
    # emu/memory.py split_ram); mem_upper counts the contiguous RAM from 1 MiB.
    ram = 8 << 30
    image = load(mb_elf(), ram_size=ram)
    mbi = decode_mbi(GuestView(image), image.regs["ebx"])
    assert mbi["mem_upper"] == ((3 << 30) - MiB) // 1024
    assert mbi["mmap"][-2:] == [(20, 0x100000, (3 << 30) - MiB, 1), (20, 4 << 30, 5 << 30, 1)]


def test_multiboot_higher_half_elf_entry_translated_to_physical():
    data = mb_elf(vaddr=0xC0100000, entry_off=16)
    image = load(data, ram_size=RAM)
    assert image.entry == KERNEL + 16
    assert image.info["entry_vaddr"] == 0xC0100010


def test_multiboot_kernel_over_0x9000_moves_info_out_of_its_way():
    data = mb_elf(paddr=0x8000, memsz=0x4000)
    image = load(data, ram_size=RAM)
    ebx = image.regs["ebx"]
    assert not 0x8000 <= ebx < 0xC000
    mbi = decode_mbi(GuestView(image), ebx)
    assert mbi["flags"] == MBI_FLAGS
    assert_plan_sane(image, RAM)


def test_multiboot_non_load_segments_ignored():
    note = Seg(0, b"NOTE" * 4, type=PT_NOTE)
    image = load(mb_elf(extra=[note]), ram_size=RAM)
    assert [s["index"] for s in image.info["segments"]] == [0]


def test_multiboot_video_flag_ignored_with_warning():
    hdr_flags = 0x7
    text = multiboot_header(hdr_flags, video=(0, 1024, 768, 32)) + b"\xf4" * 8
    data = build_elf(32, [Seg(KERNEL, text)], entry=KERNEL + 48)
    image = load(data, ram_size=RAM)
    assert any("video" in w for w in image.info["warnings"])


# --- a.out kludge --------------------------------------------------------------

def test_multiboot_aout_kludge_non_elf_autodetected_and_loaded():
    data = aout_image()
    image = load(data, ram_size=RAM)
    assert image.format == "multiboot" and image.info["aout_kludge"] is True
    assert image.writes[0] == (KERNEL, data)
    assert image.zero == [(KERNEL + len(data), 0x2000 - len(data))]
    assert image.entry == KERNEL
    assert_plan_sane(image, RAM)


def test_multiboot_aout_kludge_load_end_zero_loads_whole_file():
    data = aout_image(load_end=0, bss_end=0, size=0x300)
    image = load(data, ram_size=RAM)
    assert image.writes[0] == (KERNEL, data) and image.zero == []


def test_multiboot_aout_kludge_offset_file_start_skips_leading_bytes():
    # Header at file offset 0x40 claims to sit at load_addr + 0x10: loading
    # starts 0x30 bytes into the file.
    data = aout_image(header_addr=KERNEL + 0x10, load_end=0, bss_end=0)
    image = load(data, ram_size=RAM)
    assert image.writes[0] == (KERNEL, data[0x30:])


def test_multiboot_aout_header_addr_below_load_addr_raises_format_error():
    with pytest.raises(LoaderFormatError, match="load_addr 0x100000 is above header_addr"):
        load(aout_image(header_addr=KERNEL - 4), ram_size=RAM)


def test_multiboot_aout_load_range_past_eof_raises_format_error():
    with pytest.raises(LoaderFormatError, match="but the file has 512 bytes"):
        load(aout_image(load_end=KERNEL + 0x1000), ram_size=RAM)


def test_multiboot_aout_bss_end_below_load_end_raises_format_error():
    with pytest.raises(LoaderFormatError, match="bss_end_addr 0x100100 is below"):
        load(aout_image(bss_end=KERNEL + 0x100), ram_size=RAM)


def test_multiboot_aout_header_addr_before_file_start_raises_format_error():
    with pytest.raises(LoaderFormatError, match="larger than the header's file offset"):
        load(aout_image(header_addr=KERNEL + 0x1000), ram_size=RAM)


def test_multiboot_non_elf_header_without_aout_bit_raises_format_error():
    data = b"\x90" * 16 + multiboot_header(0x3) + b"\xf4" * 100
    with pytest.raises(LoaderFormatError, match="without address fields"):
        load(data, ram_size=RAM)
    with pytest.raises(LoaderFormatError, match="not an ELF file"):
        load(data, fmt="multiboot", ram_size=RAM)


# --- header errors ---------------------------------------------------------------

def test_multiboot_bad_checksum_raises_format_error():
    text = multiboot_header(0x3, checksum=0x12345678) + b"\xf4" * 8
    data = build_elf(32, [Seg(KERNEL, text)], entry=KERNEL)
    with pytest.raises(LoaderFormatError, match="bad checksum 0x12345678"):
        load(data, ram_size=RAM)


def test_multiboot_unknown_required_flag_bit_raises_format_error():
    with pytest.raises(LoaderFormatError, match=r"flags 0x00000009 require .*\(bit 3\)"):
        load(mb_elf(flags=0x9), ram_size=RAM)


def test_multiboot_header_past_8192_bytes_raises_format_error():
    pad = Seg(0x200000, b"\0" * 8192, flags=4)
    text = multiboot_header(0x3) + b"\xf4" * 8
    data = build_elf(32, [pad, Seg(KERNEL, text)], entry=KERNEL)
    with pytest.raises(LoaderFormatError, match="no Multiboot header"):
        load(data, fmt="multiboot", ram_size=RAM)


def test_multiboot_elf64_without_aout_bit_raises_format_error():
    data = build_elf(64, [Seg(KERNEL, multiboot_header(0x3) + b"\xf4" * 8)], entry=KERNEL)
    with pytest.raises(LoaderFormatError, match="ELF64 file cannot be loaded as a Multiboot"):
        load(data, fmt="multiboot", ram_size=RAM)


def test_multiboot_elf32_for_other_machine_raises_format_error():
    data = mb_elf(machine=EM_X86_64)
    with pytest.raises(LoaderFormatError, match="machine EM_X86_64, not i386"):
        load(data, ram_size=RAM)


# --- ELF validation ----------------------------------------------------------------

def test_multiboot_segment_outside_ram_raises_config_error():
    data = mb_elf(extra=[Seg(0x4000000, b"x", memsz=0x1000)])
    with pytest.raises(LoaderConfigError,
                       match=r"segment 1 \[0x4000000-0x4001000\) lies outside "
                             r"guest RAM \(64 MiB\)"):
        load(data, ram_size=RAM)


def test_multiboot_overlapping_segments_raises_format_error():
    data = mb_elf(memsz=0x3000, extra=[Seg(KERNEL + 0x2000, b"x", memsz=0x2000)])
    with pytest.raises(LoaderFormatError,
                       match=r"segment 1 \[0x102000-0x104000\) overlaps segment 0 "
                             r"\[0x100000-0x103000\)"):
        load(data, ram_size=RAM)


def test_multiboot_filesz_larger_than_memsz_raises_format_error():
    data = mb_elf(extra=[Seg(0x200000, b"abcd", memsz=2)])
    with pytest.raises(LoaderFormatError, match="p_filesz 0x4 larger than p_memsz 0x2"):
        load(data, ram_size=RAM)


def test_multiboot_segment_offset_past_eof_raises_format_error():
    data = mb_elf(extra=[Seg(0x200000, b"", offset=0x10000, filesz=0x100, memsz=0x100)])
    with pytest.raises(LoaderFormatError, match=r"segment 1 file range \[0x10000-0x10100\) "
                                                r"extends past the end of the file"):
        load(data, ram_size=RAM)


def test_multiboot_phoff_past_eof_raises_format_error():
    data = mb_elf(phoff=0x100000)
    with pytest.raises(LoaderFormatError, match="program header table .* extends past the end"):
        load(data, ram_size=RAM)


def test_multiboot_truncated_elf_header_raises_format_error():
    data = mb_elf()[:40]
    with pytest.raises(LoaderFormatError, match="ELF header is truncated"):
        load(data, fmt="multiboot", ram_size=RAM)


def test_multiboot_entry_outside_segments_raises_format_error():
    data = build_elf(32, [Seg(KERNEL, multiboot_header(0x3))], entry=0x500000)
    with pytest.raises(LoaderFormatError, match="entry point 0x500000 is not inside any PT_LOAD"):
        load(data, ram_size=RAM)


def test_multiboot_module_too_big_for_ram_raises_config_error():
    with pytest.raises(LoaderConfigError, match="module 0 .* does not fit in guest RAM"):
        load(mb_elf(), ram_size=2 * MiB, modules=[(bytes(2 * MiB), "big")])


def test_multiboot_cmdline_with_nul_raises_config_error():
    with pytest.raises(LoaderConfigError, match="contains a NUL byte"):
        load(mb_elf(), ram_size=RAM, cmdline="a\0b")


def test_multiboot_bad_module_pair_raises_config_error():
    with pytest.raises(LoaderConfigError, match="module 0 is not a"):
        load(mb_elf(), ram_size=RAM, modules=["initrd"])


def test_multiboot_errors_are_loader_errors():
    with pytest.raises(LoaderError):
        load(mb_elf(flags=0x9), ram_size=RAM)

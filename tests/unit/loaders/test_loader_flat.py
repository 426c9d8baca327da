"""Flat binary loader: placement, modes, GDT and page tables for 32/64-bit entry."""

import struct

import pytest

from vmlab.emu.loaders import LoaderConfigError, load
from vmlab.emu.loaders.x86 import GDT_ENTRIES

from .elfbuild import GuestView, assert_plan_sane

RAM = 16 << 20


def test_flat_default_real_mode_at_7c00_sets_no_registers():
    data = b"\xb8\x34\x12\xf4" * 3
    image = load(data, ram_size=RAM, fmt="flat")
    assert (image.format, image.mode, image.entry) == ("flat", "real", 0x7C00)
    assert image.writes == [(0x7C00, data)]
    assert image.regs == {} and image.zero == []
    assert image.cr3 is None and image.gdt is None


def test_flat_512_bytes_without_signature_is_not_a_bootsector():
    image = load(bytes(512), ram_size=RAM, fmt="flat")
    assert image.format == "flat"


def test_flat_real_mode_custom_address_loads_there():
    image = load(b"\xf4", ram_size=RAM, flat_addr=0x1000)
    assert image.entry == 0x1000 and image.writes == [(0x1000, b"\xf4")]


def test_flat_real_mode_above_64k_raises_config_error():
    with pytest.raises(LoaderConfigError, match="not reachable at CS:IP = 0:0x10000"):
        load(b"\xf4", ram_size=RAM, flat_addr=0x10000)


def test_flat_protected32_writes_gdt_and_stack():
    image = load(b"\xf4", fmt="flat", ram_size=RAM, flat_addr=0x100000, flat_mode="protected32")
    assert (image.mode, image.entry, image.cr3) == ("protected32", 0x100000, None)
    assert image.gdt == (0x500, 31)
    view = GuestView(image)
    assert struct.unpack("<4Q", view.read(0x500, 32)) == GDT_ENTRIES
    assert image.regs == {"esp": 0x9000}
    assert_plan_sane(image, RAM)


def test_flat_long64_builds_identity_page_tables():
    image = load(b"\xf4", ram_size=RAM, flat_addr=0x200000, flat_mode="long64")
    assert image.mode == "long64" and image.cr3 == 0x1000
    assert image.regs == {"rsp": 0x9000}
    view = GuestView(image)
    assert view.u64(0x1000) == 0x2003
    assert view.u64(0x4000 + 8 * 5) == (((512 + 5) << 21) | 0x83)
    assert_plan_sane(image, RAM)


def test_flat_long64_image_over_low_memory_moves_structures_above_it():
    data = bytes(0x20000)
    image = load(data, ram_size=RAM, flat_addr=0x0, flat_mode="long64")
    assert image.cr3 == 0x20000
    assert image.gdt[0] >= 0x20000
    assert_plan_sane(image, RAM)


def test_flat_unknown_mode_raises_config_error():
    with pytest.raises(LoaderConfigError, match="unknown flat mode 'v86'"):
        load(b"\xf4", ram_size=RAM, flat_mode="v86")


def test_flat_image_past_ram_raises_config_error():
    with pytest.raises(LoaderConfigError,
                       match=r"flat image \[0xfff000-0x1001000\) lies outside "
                             r"guest RAM \(16 MiB\)"):
        load(bytes(0x2000), ram_size=RAM, flat_addr=0xFFF000, flat_mode="protected32")

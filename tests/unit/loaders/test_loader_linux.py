"""Linux loaders (emu/loaders/linux.py): the x86 boot protocol for bzImage
(Documentation/arch/x86/boot.rst) and PVH for an ELF vmlinux, on synthetic
images (no kernel needed); the entry state checked on a running Vm."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmlab.emu.loaders import LoaderConfigError, LoaderError, LoaderFormatError, detect_format, load
from vmlab.emu.loaders.linux import (ACPI_RSDP_ADDR, BOOT_CS, BOOT_DS, HVM_START_MAGIC, e820_map, load_bzimage,
                               load_pvh, pvh_entry)

from .elfbuild import GuestView, Seg, build_elf

RAM = 64 << 20


def bzimage(*, version=0x020F, xloadflags=0x3, relocatable=1, align=0x200000, pref=0x1000000,
            init_size=0x200000, cmdline_size=2048, initrd_max=0x7FFFFFFF, body=b"\xf4" * 0x400,
            setup_sects=1, code32=0x100000) -> bytes:
    """A bzImage: boot sector + setup header (boot.rst "The Real-Mode Kernel
    Header"), ``setup_sects`` sectors of setup, then the protected-mode part."""
    d = bytearray(512 * (setup_sects + 1))
    d[0x1F1] = setup_sects
    struct.pack_into("<H", d, 0x1FE, 0xAA55)
    d[0x200:0x202] = bytes([0xEB, 0x6A])            # jmp: header ends at 0x202 + 0x6a
    d[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", d, 0x206, version)
    d[0x211] = 0x01
    struct.pack_into("<I", d, 0x214, code32)
    struct.pack_into("<I", d, 0x22C, initrd_max)
    struct.pack_into("<I", d, 0x230, align)
    d[0x234] = relocatable
    struct.pack_into("<H", d, 0x236, xloadflags)
    struct.pack_into("<I", d, 0x238, cmdline_size)
    struct.pack_into("<Q", d, 0x258, pref)
    struct.pack_into("<I", d, 0x260, init_size)
    return bytes(d) + body


def pvh_elf(entry=0x1000000, note_size=8, body=b"\xf4" * 64) -> bytes:
    desc = entry.to_bytes(note_size, "little")
    note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    return build_elf(64, [Seg(0x1000000, body, vaddr=0xFFFFFFFF81000000),
                          Seg(0, note, type=4)], entry=0xFFFFFFFF81000000)


# --------------------------------------------------------------------------- bzImage plan

def test_bzimage_64bit_entry_is_load_plus_0x200_with_rsi_zero_page():
    img = load_bzimage(bzimage(), ram_size=RAM, cmdline="console=ttyS0")
    assert img.format == "bzimage" and img.mode == "long64"
    assert img.info["load"] == 0x1000000 and img.entry == 0x1000200
    assert img.regs["rsi"] == img.info["zero_page"]
    assert img.selectors == (BOOT_CS, BOOT_DS) == (0x10, 0x18)
    assert img.firmware and img.cr3 is not None


def test_bzimage_zero_page_holds_header_loader_type_cmdline_e820():
    data = bzimage()
    img = load_bzimage(data, ram_size=RAM, cmdline="console=ttyS0 quiet")
    v, zp = GuestView(img), img.info["zero_page"]
    assert v.read(zp + 0x202, 4) == b"HdrS"
    assert v.read(zp + 0x230, 4) == data[0x230:0x234]             # copied header field
    assert v.read(zp + 0x210, 1) == b"\xff"                         # type_of_loader
    assert v.read(zp + 0x211, 1)[0] & 0x01                          # LOADED_HIGH
    assert v.cstr(v.u32(zp + 0x228)) == b"console=ttyS0 quiet"      # not prefixed with a path
    n = v.read(zp + 0x1E8, 1)[0]
    table = [struct.unpack("<QQI", v.read(zp + 0x2D0 + 20 * i, 20)) for i in range(n)]
    assert table == e820_map(RAM)
    assert (0x100000, RAM - 0x100000, 1) in table
    assert v.u64(zp + 0x70) == ACPI_RSDP_ADDR                       # acpi_rsdp_addr (2.14+)


def test_bzimage_init_size_is_reserved_after_the_load_address():
    img = load_bzimage(bzimage(init_size=0x800000), ram_size=RAM)
    load_addr = img.info["load"]
    for addr, data in img.writes:
        if addr != load_addr:
            assert addr + len(data) <= load_addr or addr >= load_addr + 0x800000
    assert (load_addr + 0x400, 0x800000 - 0x400) in img.zero


def test_bzimage_initrd_is_page_aligned_below_initrd_addr_max():
    rd = bytes(range(256)) * 100
    img = load_bzimage(bzimage(initrd_max=0x02FFFFFF), ram_size=RAM, initrd=rd)
    v, zp = GuestView(img), img.info["zero_page"]
    addr, size = v.u32(zp + 0x218), v.u32(zp + 0x21C)
    assert size == len(rd) and addr % 4096 == 0 and addr + size <= 0x03000000
    assert addr > 0x02F00000                                        # as high as it goes
    assert v.read(addr, size) == rd


def test_bzimage_initrd_too_big_is_config_error():
    with pytest.raises(LoaderConfigError, match="initrd"):
        load_bzimage(bzimage(), ram_size=RAM, initrd=bytes(RAM))


def test_bzimage_old_protocol_is_format_error():
    with pytest.raises(LoaderFormatError, match="2.12 or later"):
        load_bzimage(bzimage(version=0x020A), ram_size=RAM)


def test_bzimage_without_64bit_entry_is_format_error():
    with pytest.raises(LoaderFormatError, match="XLF_KERNEL_64"):
        load_bzimage(bzimage(xloadflags=0), ram_size=RAM)


def test_bzimage_32bit_entry_is_code32_start_with_esi():
    img = load_bzimage(bzimage(), ram_size=RAM, entry="32")
    assert img.mode == "protected32" and img.entry == img.info["load"] and img.cr3 is None
    assert img.regs["esi"] == img.info["zero_page"]


def test_bzimage_ram_too_small_for_init_size_is_config_error():
    with pytest.raises(LoaderConfigError, match="init_size"):
        load_bzimage(bzimage(init_size=0x4000000), ram_size=RAM)


def test_bzimage_non_relocatable_loads_at_code32_start():
    img = load_bzimage(bzimage(relocatable=0, code32=0x100000), ram_size=RAM)
    assert img.info["load"] == 0x100000


def test_bzimage_cmdline_longer_than_cmdline_size_is_config_error():
    with pytest.raises(LoaderConfigError, match="cmdline_size"):
        load_bzimage(bzimage(cmdline_size=8), ram_size=RAM, cmdline="console=ttyS0")


def test_bzimage_truncated_setup_is_format_error():
    with pytest.raises(LoaderFormatError, match="truncated"):
        load_bzimage(bzimage(body=b"", setup_sects=1), ram_size=RAM)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.binary(min_size=0x70, max_size=0x70), ram_mb=st.integers(1, 64))
def test_bzimage_hostile_header_gives_a_plan_inside_ram_or_a_loader_error(header, ram_mb):
    data = bytearray(bzimage())
    data[0x1F1:0x1F1 + 0x70] = header
    data[0x202:0x206] = b"HdrS"
    ram = ram_mb << 20
    try:
        img = load_bzimage(bytes(data), ram_size=ram)
    except LoaderError:
        return
    for addr, chunk in img.writes:
        assert 0 <= addr and addr + len(chunk) <= ram
    for addr, n in img.zero:
        assert 0 <= addr and addr + n <= ram


# --------------------------------------------------------------------------- PVH

@pytest.mark.parametrize("note_size", [4, 8])
def test_pvh_note_gives_the_32bit_entry(note_size):
    assert pvh_entry(pvh_elf(note_size=note_size)) == 0x1000000


def test_pvh_start_info_has_magic_cmdline_memmap_and_initrd_module():
    rd = b"initrd-bytes" * 50
    img = load_pvh(pvh_elf(), ram_size=RAM, cmdline="console=ttyS0", initrd=rd)
    assert img.format == "pvh" and img.mode == "protected32" and img.entry == 0x1000000
    v, si = GuestView(img), img.regs["ebx"]
    magic, version, flags, nmods, modlist, cmdline, rsdp, memmap, nmap, res = struct.unpack(
        "<IIIIQQQQII", v.read(si, 56))
    assert (magic, version, nmods, rsdp) == (HVM_START_MAGIC, 1, 1, ACPI_RSDP_ADDR)
    assert v.cstr(cmdline) == b"console=ttyS0"
    entries = [struct.unpack("<QQII", v.read(memmap + 24 * i, 24))[:3] for i in range(nmap)]
    assert entries == e820_map(RAM)
    paddr, size, mcmd, _ = struct.unpack("<QQQQ", v.read(modlist, 32))
    assert size == len(rd) and v.read(paddr, size) == rd


def test_pvh_entry_outside_segments_is_format_error():
    with pytest.raises(LoaderFormatError, match="PVH entry"):
        load_pvh(pvh_elf(entry=0x5000000), ram_size=RAM)


# --------------------------------------------------------------------------- load()

def test_detect_format_elf64_with_pvh_note_is_pvh_and_bzimage_is_bzimage():
    assert detect_format(pvh_elf()) == "pvh"
    assert detect_format(bzimage()) == "bzimage"


def test_load_linux_cmdline_is_not_prefixed_with_the_image_path(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage())
    img = load(str(path), ram_size=RAM, cmdline="console=ttyS0", modules=[(b"rd", "ignored")])
    assert img.info["cmdline"] == "console=ttyS0" and img.info["initrd"][1] == 2


def test_load_linux_two_initrds_is_config_error():
    with pytest.raises(LoaderConfigError, match="one initrd"):
        load(bzimage(), ram_size=RAM, modules=[(b"a", ""), (b"b", "")])


# --------------------------------------------------------------------------- entry state on a Vm

def test_bzimage_entry_state_on_the_machine_matches_the_64bit_protocol():
    from vmlab.vmm.vm import Vm
    img = load(bzimage(), ram_size=RAM, cmdline="x")
    with Vm(RAM, serial=None) as vm:
        vm.load(img)
        res = vm.run(max_insns=1000)
        r = vm.vcpu.regs
        assert res.reason == "halted" and r.rip == img.entry + 1     # ran the hlt at load + 0x200
        assert r.seg[1].selector == 0x10 and all(r.seg[i].selector == 0x18 for i in (0, 2, 3))
        assert r.gpr[6] == img.info["zero_page"] and not r.rflags & 0x200
        assert vm.mem.read(img.info["zero_page"] + 0x202, 4) == b"HdrS"
        assert vm.mem.read(ACPI_RSDP_ADDR, 8) == b"RSD PTR "         # ACPI tables installed


def test_pvh_entry_state_on_the_machine_is_flat_32bit_paging_off():
    from vmlab.vmm.vm import Vm
    img = load(pvh_elf(), ram_size=RAM)
    with Vm(RAM, serial=None) as vm:
        vm.load(img)
        vm.run(max_insns=1000)
        r = vm.vcpu.regs
        assert r.rip == 0x1000001 and not r.cr0 & 0x80000000 and r.cr0 & 1
        assert vm.mem.read_u32(r.gpr[3]) == HVM_START_MAGIC

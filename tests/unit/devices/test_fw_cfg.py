"""Tests of devices.fw_cfg through the x86 selector/data ports."""

import struct

import pytest

from vmlab.devices.bus import IO_LIMIT, Bus
from vmlab.devices.errors import DeviceError
from vmlab.devices.fw_cfg import (FW_CFG_CMDLINE_DATA, FW_CFG_CMDLINE_SIZE,
                            FW_CFG_FILE_DIR, FW_CFG_ID, FW_CFG_IO_BASE,
                            FW_CFG_IO_SIZE, FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS,
                            FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE, FwCfg)

SEL, DATA = 0x510, 0x511


def make(**kw):
    fw = FwCfg(kw.pop("ram_size", 128 << 20), **kw)
    bus = Bus("io", IO_LIMIT)
    bus.register(FW_CFG_IO_BASE, FW_CFG_IO_SIZE, fw, "fw_cfg")
    return fw, bus


def read_item(bus, key, n):
    bus.write(SEL, 2, key)
    return bytes(bus.read(DATA, 1) for _ in range(n))


def test_fw_cfg_ports_are_0x510_and_0x511():
    assert (FW_CFG_IO_BASE, FW_CFG_IO_SIZE) == (0x510, 2)


def test_fw_cfg_signature_reads_qemu():
    _, bus = make()
    assert read_item(bus, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_fw_cfg_id_reports_traditional_interface_without_dma():
    _, bus = make()
    assert read_item(bus, FW_CFG_ID, 4) == b"\x01\x00\x00\x00"


def test_fw_cfg_ram_size_is_le64():
    _, bus = make(ram_size=0x1_2345_6000)
    assert read_item(bus, FW_CFG_RAM_SIZE, 8) == bytes.fromhex("0060452301000000")


def test_fw_cfg_cpu_counts_are_one():
    _, bus = make()
    assert read_item(bus, FW_CFG_NB_CPUS, 2) == b"\x01\x00"
    assert read_item(bus, FW_CFG_MAX_CPUS, 2) == b"\x01\x00"


def test_fw_cfg_cmdline_size_counts_nul_and_data_ends_with_nul():
    _, bus = make(cmdline="console=ttyS0")
    assert read_item(bus, FW_CFG_CMDLINE_SIZE, 4) == struct.pack("<I", 14)
    assert read_item(bus, FW_CFG_CMDLINE_DATA, 14) == b"console=ttyS0\0"


def test_fw_cfg_no_cmdline_item_reads_zero():
    _, bus = make()
    assert read_item(bus, FW_CFG_CMDLINE_SIZE, 4) == b"\0\0\0\0"


def test_fw_cfg_read_past_end_returns_zero():
    _, bus = make()
    assert read_item(bus, FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"


def test_fw_cfg_reselect_rewinds_offset():
    _, bus = make()
    read_item(bus, FW_CFG_SIGNATURE, 2)
    assert read_item(bus, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_fw_cfg_unknown_key_reads_zero():
    _, bus = make()
    assert read_item(bus, 0x3FFF, 4) == b"\0\0\0\0"


def test_fw_cfg_file_dir_big_endian_sorted_entries():
    fw, bus = make()
    sel_b = fw.add_file("etc/b", b"BBB")
    sel_a = fw.add_file("etc/a", b"A" * 300)
    raw = read_item(bus, FW_CFG_FILE_DIR, 4 + 2 * 64)
    assert raw[:4] == b"\x00\x00\x00\x02"
    entries = [raw[4 + 64 * i: 4 + 64 * (i + 1)] for i in range(2)]
    # FWCfgFile: be32 size, be16 select, u16 reserved, char name[56].
    assert entries[0][:4] == b"\x00\x00\x01\x2c"
    assert entries[0][4:6] == sel_a.to_bytes(2, "big")
    assert entries[0][8:].rstrip(b"\0") == b"etc/a"
    assert entries[1][:4] == b"\x00\x00\x00\x03"
    assert entries[1][8:].rstrip(b"\0") == b"etc/b"
    assert read_item(bus, sel_b, 3) == b"BBB"
    assert sel_a >= 0x20 and sel_b >= 0x20


def test_fw_cfg_add_file_overlong_name_rejected():
    fw, _ = make()
    with pytest.raises(DeviceError):
        fw.add_file("x" * 56, b"")


def test_fw_cfg_byte_write_to_data_port_ignored():
    _, bus = make()
    bus.write(SEL, 2, FW_CFG_SIGNATURE)
    bus.write(DATA, 1, 0x55)
    assert bytes(bus.read(DATA, 1) for _ in range(4)) == b"QEMU"


def test_fw_cfg_wide_read_is_invalid_and_reads_zero_without_advancing():
    _, bus = make()
    bus.write(SEL, 2, FW_CFG_SIGNATURE)
    assert bus.read(SEL, 2) == 0
    assert bus.read(DATA, 1) == ord("Q")

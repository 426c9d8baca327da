"""Boot sector loader: placement at 0x7c00 and SeaBIOS register state."""

import pytest

from vmlab.emu.loaders import LoaderConfigError, LoaderFormatError, load
from vmlab.emu.loaders.bootsector import load_bootsector

RAM = 1 << 20


def sector(fill: int = 0x90) -> bytes:
    return bytes([fill]) * 510 + b"\x55\xaa"


def test_bootsector_signed_512_bytes_autodetected_at_7c00_in_real_mode():
    data = sector()
    image = load(data, ram_size=RAM)
    assert image.format == "bootsector"
    assert image.mode == "real"
    assert image.entry == 0x7C00
    assert image.writes == [(0x7C00, data)]
    assert image.zero == []
    assert image.regs == {"eax": 0xAA55, "edx": 0x80, "esp": 0x7000}
    assert image.cr3 is None and image.gdt is None
    assert image.info["signature"] is True


def test_bootsector_short_file_without_signature_loads_as_is():
    image = load(b"\xeb\xfe", fmt="bootsector", ram_size=RAM)
    assert image.writes == [(0x7C00, b"\xeb\xfe")]
    assert image.info["signature"] is False
    assert image.info["warnings"] == []


def test_bootsector_513_bytes_raises_format_error():
    with pytest.raises(LoaderFormatError, match="at most 512 bytes"):
        load(sector() + b"\0", fmt="bootsector", ram_size=RAM)


def test_bootsector_ram_below_sector_end_raises_config_error():
    with pytest.raises(LoaderConfigError,
                       match=r"boot sector \[0x7c00-0x7e00\) lies outside guest RAM \(31 KiB\)"):
        load_bootsector(sector(), ram_size=0x7C00)


def test_bootsector_with_cmdline_raises_config_error():
    with pytest.raises(LoaderConfigError, match="cannot receive a command line"):
        load(sector(), ram_size=RAM, cmdline="quiet")


def test_bootsector_with_modules_raises_config_error():
    with pytest.raises(LoaderConfigError, match="modules"):
        load(sector(), ram_size=RAM, modules=[(b"x", "")])

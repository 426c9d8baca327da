"""load(): argument checks, file reading errors, format detection."""

import os

import pytest

from vmlab.emu.errors import EmuError, LoaderError
from vmlab.emu.loaders import (LoaderConfigError, LoaderFileError, LoaderFormatError, detect_format,
                         load)

from .elfbuild import Seg, build_elf, multiboot_header

RAM = 16 << 20


def test_load_error_kinds_share_the_emu_loader_base():
    for kind in (LoaderFileError, LoaderFormatError, LoaderConfigError):
        assert issubclass(kind, LoaderError) and issubclass(kind, EmuError)


def test_load_missing_file_raises_file_error(tmp_path):
    with pytest.raises(LoaderFileError, match="does not exist"):
        load(str(tmp_path / "nope.elf"), ram_size=RAM)


def test_load_directory_raises_file_error(tmp_path):
    with pytest.raises(LoaderFileError, match="is a directory|not a regular file"):
        load(tmp_path, ram_size=RAM)


def test_load_device_file_raises_file_error():
    with pytest.raises(LoaderFileError, match="not a regular file"):
        load("/dev/null", ram_size=RAM)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_load_unreadable_file_raises_file_error(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(b"\xf4")
    path.chmod(0)
    with pytest.raises(LoaderFileError, match="permission denied"):
        load(path, ram_size=RAM)


def test_load_empty_file_raises_format_error(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(LoaderFormatError, match="kernel image is empty"):
        load(path, ram_size=RAM)


def test_load_flat_file_from_path_reads_it(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(b"\xeb\xfe")
    assert load(path, ram_size=RAM, fmt="flat").writes == [(0x7C00, b"\xeb\xfe")]


def test_load_unknown_format_raises_config_error():
    with pytest.raises(LoaderConfigError, match="unknown image format 'pe'"):
        load(b"\xf4", fmt="pe", ram_size=RAM)


@pytest.mark.parametrize("ram", [0, -1, True, 1.5, None])
def test_load_bad_ram_size_raises_config_error(ram):
    with pytest.raises(LoaderConfigError, match="guest RAM size"):
        load(b"\xf4", ram_size=ram)


def test_load_bad_image_argument_raises_config_error():
    with pytest.raises(LoaderConfigError, match="must be a path or bytes"):
        load(1234, ram_size=RAM)


def test_detect_elf32_with_multiboot_header_is_multiboot():
    data = build_elf(32, [Seg(0x100000, multiboot_header() + b"\xf4")], entry=0x100000)
    assert detect_format(data) == "multiboot"


def test_detect_elf32_without_multiboot_header_raises_format_error():
    data = build_elf(32, [Seg(0x100000, b"\xf4" * 16)], entry=0x100000)
    with pytest.raises(LoaderFormatError,
                       match="ELF32 file is not a Multiboot kernel: no Multiboot"):
        load(data, ram_size=RAM)


def test_detect_elf64_is_elf64_even_with_multiboot_header():
    data = build_elf(64, [Seg(0x100000, multiboot_header() + b"\xf4")], entry=0x100000)
    assert detect_format(data) == "elf64"


def test_detect_bare_elf_magic_raises_format_error():
    with pytest.raises(LoaderFormatError, match="ELF identification is truncated"):
        load(b"\x7fELF", ram_size=RAM)


def test_detect_elf_with_invalid_class_raises_format_error():
    with pytest.raises(LoaderFormatError, match="invalid class"):
        load(b"\x7fELF\x03\x01\x01" + bytes(80), ram_size=RAM)


def test_detect_big_endian_elf_raises_format_error():
    data = bytearray(build_elf(64, [Seg(0x100000, b"\xf4")], entry=0x100000))
    data[5] = 2
    with pytest.raises(LoaderFormatError, match="not little-endian"):
        load(bytes(data), ram_size=RAM)


def test_detect_signed_512_bytes_is_bootsector_and_other_sizes_refused():
    assert detect_format(bytes(510) + b"\x55\xaa") == "bootsector"
    with pytest.raises(LoaderFormatError, match="exactly 512 bytes"):
        detect_format(bytes(511) + b"\x55\xaa")
    with pytest.raises(LoaderFormatError, match="exactly 512 bytes"):
        detect_format(bytes(509) + b"\x55\xaa")
    with pytest.raises(LoaderFormatError, match="without the boot signature"):
        detect_format(bytes(512))


def test_detect_unknown_bytes_refused_unless_flat_options_given():
    with pytest.raises(LoaderFormatError, match="unrecognised kernel format"):
        load(b"\xeb\xfe", ram_size=RAM)
    assert load(b"\xeb\xfe", ram_size=RAM, flat_mode="real").format == "flat"
    assert load(b"\xeb\xfe", ram_size=RAM, flat_addr=0x8000).format == "flat"


def test_detect_bzimage_is_recognised():
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = (0x020F).to_bytes(2, "little")
    assert detect_format(bytes(data)) == "bzimage"


def test_detect_bad_multiboot_checksum_refused_with_reason():
    import struct
    data = b"\x90" * 64 + struct.pack("<III", 0x1BADB002, 0x10000, 0) + bytes(64)
    with pytest.raises(LoaderFormatError, match="bad checksum"):
        detect_format(data)

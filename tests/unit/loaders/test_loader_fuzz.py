"""Hostile images: mutated and truncated kernels load or raise LoaderError, nothing else."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmlab.emu.errors import LoaderError
from vmlab.emu.loaders import BootImage, load

from .elfbuild import PF_R, PF_W, Seg, assert_plan_sane, build_elf, multiboot_header

RAM = 16 << 20

ELF32_MB = build_elf(32, [Seg(0x100000, multiboot_header(0x3) + b"\xf4" * 64, memsz=0x2000),
                          Seg(0x103000, b"data" * 8, memsz=0x1000, flags=PF_R | PF_W)],
                     entry=0x10000C)
ELF64 = build_elf(64, [Seg(0x200000, b"\x48\x31\xc0\xf4" * 16, memsz=0x2000),
                       Seg(0x203000, b"data" * 8, memsz=0x1000, flags=PF_R | PF_W)],
                  entry=0x200000)
_AOUT_HDR = multiboot_header(0x10003, aout=(0x100010, 0x100000, 0x100100, 0x102000, 0x100000))
AOUT = (b"\xfa" * 16 + _AOUT_HDR).ljust(0x100, b"\xf4")

INTERESTING_WORDS = [0, 1, 0x7F, 0x80, 0xFF, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                     0xFFFF, 0x100000, 0x1BADB002]


def mutations(base: bytes):
    byte_edit = st.tuples(st.just("byte"), st.integers(0, len(base) - 1), st.integers(0, 255))
    word_edit = st.tuples(st.just("word"), st.integers(0, len(base) - 4),
                          st.sampled_from(INTERESTING_WORDS))
    return st.tuples(st.lists(st.one_of(byte_edit, word_edit), max_size=8),
                     st.none() | st.integers(0, len(base)))


def apply(base: bytes, edits, cut) -> bytes:
    data = bytearray(base)
    for kind, pos, value in edits:
        if kind == "byte":
            data[pos] = value
        else:
            struct.pack_into("<I", data, pos, value)
    return bytes(data if cut is None else data[:cut])


def check(data: bytes, **kw) -> None:
    """Load with and without boot arguments; only BootImage or LoaderError may come out."""
    for extra in ({"cmdline": "fuzz", "modules": [(b"mod", "m")]}, {}):
        try:
            image = load(data, ram_size=RAM, **extra, **kw)
        except LoaderError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg
            continue
        assert isinstance(image, BootImage)
        assert_plan_sane(image, RAM)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutations(ELF32_MB))
def test_fuzz_mutated_multiboot_elf32_loads_or_raises_loader_error(m):
    data = apply(ELF32_MB, *m)
    check(data)
    check(data, fmt="multiboot")


@FUZZ
@given(mutations(ELF64))
def test_fuzz_mutated_elf64_loads_or_raises_loader_error(m):
    data = apply(ELF64, *m)
    check(data)
    check(data, fmt="elf64")
    check(data, fmt="multiboot")


@FUZZ
@given(mutations(AOUT))
def test_fuzz_mutated_aout_kludge_loads_or_raises_loader_error(m):
    check(apply(AOUT, *m))


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_load_or_raise_loader_error(data):
    check(data)
    for fmt in ("multiboot", "elf64", "bootsector"):
        check(data, fmt=fmt)

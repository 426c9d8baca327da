"""Test helpers: build small ELF32/ELF64 files and Multiboot headers with struct,
and read a BootImage's writes back as guest memory.

Layouts from the System V gABI ("ELF Header", "Program Header"); Multiboot
header from Multiboot 0.6.96 §3.1.1.
"""

import struct
from dataclasses import dataclass

EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
ET_EXEC = 2
ET_DYN = 3
PT_NULL = 0
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4

MB_MAGIC = 0x1BADB002


@dataclass
class Seg:
    """One program header and its file bytes."""

    paddr: int
    data: bytes
    memsz: int | None = None       # defaults to len(data)
    vaddr: int | None = None       # defaults to paddr
    type: int = PT_LOAD
    flags: int = PF_R | PF_X
    offset: int | None = None      # file offset override (for hostile files)
    filesz: int | None = None      # p_filesz override


def multiboot_header(flags: int = 0x3, *, aout: tuple[int, int, int, int, int] | None = None,
                     video: tuple[int, int, int, int] | None = None,
                     checksum: int | None = None) -> bytes:
    """magic, flags, checksum [+ 5 address fields] [+ 4 video fields]."""
    if checksum is None:
        checksum = (-(MB_MAGIC + flags)) & 0xFFFFFFFF
    out = struct.pack("<III", MB_MAGIC, flags, checksum)
    if aout is not None or video is not None:
        out += struct.pack("<5I", *(aout or (0, 0, 0, 0, 0)))
    if video is not None:
        out += struct.pack("<4I", *video)
    return out


def build_elf(elfclass: int, segs: list[Seg], *, entry: int, machine: int | None = None,
              e_type: int = ET_EXEC, phentsize: int | None = None,
              phoff: int | None = None, phnum: int | None = None) -> bytes:
    """An ELF file: header, program headers right after it, then segment data.

    Segment data is placed in order at 16-byte aligned offsets unless a
    segment overrides its offset.
    """
    is64 = elfclass == 64
    if machine is None:
        machine = EM_X86_64 if is64 else EM_386
    ehsize = 64 if is64 else 52
    real_phentsize = 56 if is64 else 32
    table_off = ehsize
    cursor = (table_off + real_phentsize * len(segs) + 15) & ~15
    blobs = bytearray()
    phdrs = b""
    for seg in segs:
        off = seg.offset if seg.offset is not None else cursor + len(blobs)
        if seg.offset is None:
            blobs += seg.data
            blobs += b"\0" * (-len(blobs) % 16)
        filesz = len(seg.data) if seg.filesz is None else seg.filesz
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", seg.type, seg.flags, off, vaddr, seg.paddr,
                                 filesz, memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", seg.type, off, vaddr, seg.paddr, filesz, memsz,
                                 seg.flags, 0x1000)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1, 0]) + bytes(8)
    fields = (e_type, machine, 1, entry,
              table_off if phoff is None else phoff, 0, 0, ehsize,
              real_phentsize if phentsize is None else phentsize,
              len(segs) if phnum is None else phnum, 0, 0, 0)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH", *fields)
    assert len(ehdr) == ehsize
    head = ehdr + phdrs
    return head + b"\0" * (cursor - len(head)) + bytes(blobs)


class GuestView:
    """Guest memory as a BootImage would leave it (unwritten bytes read as 0)."""

    def __init__(self, image):
        self.writes = image.writes

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray(size)
        for base, data in self.writes:
            lo, hi = max(addr, base), min(addr + size, base + len(data))
            if lo < hi:
                out[lo - addr:hi - addr] = data[lo - base:hi - base]
        return bytes(out)

    def u32(self, addr: int) -> int:
        return struct.unpack("<I", self.read(addr, 4))[0]

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def cstr(self, addr: int, limit: int = 4096) -> bytes:
        raw = self.read(addr, limit)
        return raw[:raw.index(b"\0")]


def decode_mbi(view: GuestView, addr: int) -> dict:
    """Multiboot information (§3.3) fields, mmap entries and modules."""
    f = struct.unpack("<22I", view.read(addr, 88))
    mbi = {"flags": f[0], "mem_lower": f[1], "mem_upper": f[2], "boot_device": f[3],
           "cmdline": f[4], "mods_count": f[5], "mods_addr": f[6], "mmap_length": f[11],
           "mmap_addr": f[12], "boot_loader_name": f[16]}
    entries, p = [], mbi["mmap_addr"]
    while p < mbi["mmap_addr"] + mbi["mmap_length"]:
        size, base, length, kind = struct.unpack("<IQQI", view.read(p, 24))
        entries.append((size, base, length, kind))
        p += size + 4
    mbi["mmap"] = entries
    mbi["mods"] = [struct.unpack("<IIII", view.read(mbi["mods_addr"] + 16 * i, 16))
                   for i in range(mbi["mods_count"])]
    return mbi


def assert_plan_sane(image, ram_size: int) -> None:
    """Every write and zero range lies in RAM and no two of them overlap."""
    ranges = sorted([(a, a + len(d)) for a, d in image.writes]
                    + [(a, a + n) for a, n in image.zero])
    for start, end in ranges:
        assert 0 <= start < end <= ram_size, (hex(start), hex(end))
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start, (hex(end), hex(start))

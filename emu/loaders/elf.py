"""ELF parsing shared by the Multiboot (ELF32) and ELF64 loaders.

pyelftools decodes the ELF header and program headers; everything it returns is
then checked here before a loader trusts it: the program header table and
every PT_LOAD file range lie inside the file, p_filesz <= p_memsz, the entry
point lies in a PT_LOAD segment.  The file is hostile: every failure is a
:class:`LoaderFormatError` with one sentence, never a pyelftools or struct
exception.

References: System V ABI gABI, "ELF Header" and "Program Header" (ELF-64
Object File Format 1.5 for the 64-bit layouts).
"""

import io
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from vmlab.emu.loaders.errors import LoaderFormatError
from vmlab.emu.loaders.layout import GuestLayout, fmt_range

__all__ = ["ElfImage", "ElfSegment", "check_ident", "parse_elf", "is_elf", "elf_class",
           "physical_entry", "place_segments"]

ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
EI_CLASS, EI_DATA, EI_VERSION = 4, 5, 6
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EV_CURRENT = 1
EHDR_SIZE = {32: 52, 64: 64}
PHDR_SIZE = {32: 32, 64: 56}
#: e_phnum value meaning "the real count is in section header 0" (gABI).
PN_XNUM = 0xFFFF
#: Largest program header table accepted, as Linux does in
#: fs/binfmt_elf.c:elf_read_phdrs() ("size > 65536").
MAX_PHDR_TABLE = 65536


@dataclass(frozen=True)
class ElfSegment:
    """One program header, as plain integers (p_type kept as pyelftools' name)."""

    index: int
    type: str
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfImage:
    """The parts of an ELF file a loader needs, validated."""

    elfclass: int            # 32 or 64
    machine: str             # pyelftools name, e.g. "EM_386", "EM_X86_64"
    type: str                # e.g. "ET_EXEC"
    entry: int               # e_entry as written in the file (virtual)
    loads: tuple[ElfSegment, ...]   # PT_LOAD segments with p_memsz > 0


def is_elf(data: bytes) -> bool:
    """True when ``data`` starts with the ELF magic."""
    return data[:4] == ELF_MAGIC


def elf_class(data: bytes) -> int | None:
    """32 or 64 from e_ident[EI_CLASS]; None when absent or invalid."""
    if len(data) <= EI_CLASS:
        return None
    return {ELFCLASS32: 32, ELFCLASS64: 64}.get(data[EI_CLASS])


def _one_line(exc: Exception) -> str:
    """A third-party exception message squeezed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def check_ident(data: bytes) -> None:
    """Check e_ident and that the whole ELF header is present (either class)."""
    if not is_elf(data):
        raise LoaderFormatError("file is not an ELF file (no \\x7fELF magic)")
    if len(data) < EI_NIDENT:
        raise LoaderFormatError(
            f"ELF identification is truncated ({len(data)} of {EI_NIDENT} bytes)")
    found = elf_class(data)
    if found is None:
        raise LoaderFormatError(f"ELF file has an invalid class (EI_CLASS = {data[EI_CLASS]})")
    if data[EI_DATA] != ELFDATA2LSB:
        raise LoaderFormatError(
            f"ELF file is not little-endian (EI_DATA = {data[EI_DATA]}); x86 needs ELFDATA2LSB")
    if data[EI_VERSION] != EV_CURRENT:
        raise LoaderFormatError(f"ELF file has unknown version {data[EI_VERSION]}")
    if len(data) < EHDR_SIZE[found]:
        raise LoaderFormatError(
            f"ELF header is truncated ({len(data)} of {EHDR_SIZE[found]} bytes)")


def parse_elf(data: bytes, *, elfclass: int, machine: str, machine_desc: str) -> ElfImage:
    """Decode and validate an x86 ELF executable.

    Args:
        data: the whole file.
        elfclass: required class, 32 or 64.
        machine: required e_machine as pyelftools names it ("EM_386",
            "EM_X86_64").
        machine_desc: how to name that machine in messages.
    """
    check_ident(data)
    found = elf_class(data)
    if found != elfclass:
        raise LoaderFormatError(
            f"ELF file is ELFCLASS{found}, but this loader needs ELFCLASS{elfclass}")

    # pyelftools is third-party code parsing hostile input: any exception it
    # raises (ELFError, construct errors, struct.error, ValueError...) means
    # the file is malformed.  The try blocks cover only pyelftools calls.
    try:
        elf = ELFFile(io.BytesIO(data))
        hdr = elf.header
        e_type, e_machine, e_entry = hdr["e_type"], hdr["e_machine"], int(hdr["e_entry"])
        phoff, phnum, phentsize = int(hdr["e_phoff"]), int(hdr["e_phnum"]), int(hdr["e_phentsize"])
        phdr_struct = elf.structs.Elf_Phdr
    except Exception as exc:  # noqa: BLE001 - see comment above
        raise LoaderFormatError(f"ELF header is malformed ({_one_line(exc)})") from exc

    if e_machine != machine:
        raise LoaderFormatError(
            f"ELF file is for machine {e_machine}, not {machine_desc} ({machine})")
    if e_type != "ET_EXEC":
        raise LoaderFormatError(f"ELF file is of type {e_type}, not an executable (ET_EXEC)")
    if phnum == 0:
        raise LoaderFormatError("ELF file has no program headers")
    if phnum == PN_XNUM:
        raise LoaderFormatError("ELF file uses extended program header numbering (PN_XNUM)")
    if phentsize != PHDR_SIZE[elfclass]:
        raise LoaderFormatError(
            f"ELF e_phentsize is {phentsize}, expected {PHDR_SIZE[elfclass]}")
    table = phnum * phentsize
    if table > MAX_PHDR_TABLE:
        raise LoaderFormatError(
            f"ELF program header table is too large ({phnum} entries)")
    if phoff + table > len(data):
        raise LoaderFormatError(
            f"ELF program header table {fmt_range(phoff, phoff + table)} extends past "
            f"the end of the file ({len(data)} bytes)")

    loads = []
    for i in range(phnum):
        off = phoff + i * phentsize
        try:
            ph = phdr_struct.parse(data[off:off + phentsize])
            seg = ElfSegment(
                index=i, type=str(ph["p_type"]), offset=int(ph["p_offset"]),
                vaddr=int(ph["p_vaddr"]), paddr=int(ph["p_paddr"]),
                filesz=int(ph["p_filesz"]), memsz=int(ph["p_memsz"]),
                flags=int(ph["p_flags"]))
        except Exception as exc:  # noqa: BLE001 - pyelftools on hostile input
            raise LoaderFormatError(
                f"ELF program header {i} is malformed ({_one_line(exc)})") from exc
        if seg.type != "PT_LOAD":
            continue
        if seg.filesz > seg.memsz:
            raise LoaderFormatError(
                f"segment {i} has p_filesz {seg.filesz:#x} larger than p_memsz {seg.memsz:#x}")
        if seg.offset + seg.filesz > len(data):
            raise LoaderFormatError(
                f"segment {i} file range {fmt_range(seg.offset, seg.offset + seg.filesz)} "
                f"extends past the end of the file ({len(data)} bytes)")
        if seg.memsz:
            loads.append(seg)
    if not loads:
        raise LoaderFormatError("ELF file has no non-empty PT_LOAD segment")
    return ElfImage(elfclass=elfclass, machine=str(e_machine), type=str(e_type),
                    entry=e_entry, loads=tuple(loads))


def physical_entry(elf: ElfImage) -> int:
    """e_entry translated to a physical address through its PT_LOAD segment.

    Paging is off (Multiboot) or identity-mapped (elf64) at entry, so a
    higher-half kernel whose e_entry is virtual must be entered at the
    physical address of the same byte.  Like GRUB 2
    (grub-core/loader/multiboot_elfxx.c), an entry point outside every
    PT_LOAD segment is refused.
    """
    for seg in elf.loads:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
            return elf.entry - seg.vaddr + seg.paddr
    raise LoaderFormatError(f"entry point {elf.entry:#x} is not inside any PT_LOAD segment")


def place_segments(layout: GuestLayout, data: bytes, elf: ElfImage) -> list[dict]:
    """Place every PT_LOAD segment at p_paddr; returns per-segment info."""
    info = []
    for seg in elf.loads:
        layout.place(f"segment {seg.index}", seg.paddr,
                     data[seg.offset:seg.offset + seg.filesz], seg.memsz)
        info.append({"index": seg.index, "paddr": seg.paddr, "vaddr": seg.vaddr,
                     "filesz": seg.filesz, "memsz": seg.memsz, "flags": seg.flags})
    return info

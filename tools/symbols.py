"""Kernel symbols for the debugger: ``b kmain`` and ``func+off`` addresses.

An ELF kernel brings its symbol table (read with pyelftools, like the loaders:
kernels are hostile input and every value is bounds-checked by the reader); a
guest source from ``guests/`` brings its labels (tools/asm.py); a Linux bzImage
brings the ``System.map`` beside it (``/boot/System.map-VERSION`` for
``/boot/vmlinuz-VERSION``: what Debian installs; the addresses hold with
``nokaslr``).  ``--symbols FILE`` names an ELF or a System.map explicitly.  A
kernel without any has no symbols and addresses print bare.
"""
from __future__ import annotations

import bisect
import io
from pathlib import Path

#: a symbol further than this below an address does not name it (no size known)
MAX_OFFSET = 0x1000


class Symbols:
    """Name -> address and address -> ``name+off`` lookups."""

    def __init__(self, table: dict[str, int] | None = None, sizes: dict[str, int] | None = None):
        self.by_name: dict[str, int] = dict(table or {})
        self.sizes = dict(sizes or {})
        pairs = sorted((a, n) for n, a in self.by_name.items())
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self.by_name)

    def lookup(self, name: str) -> int | None:
        return self.by_name.get(name)

    def find(self, addr: int) -> tuple[str, int] | None:
        """(name, offset) of the symbol at or below addr, if it plausibly covers it."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        # several names at one address: take the first in sorted order
        base = self._addrs[i]
        j = bisect.bisect_left(self._addrs, base)
        name = self._names[j]
        off = addr - base
        size = self.sizes.get(name) or 0
        if (size and off >= size and off > 0) or off > MAX_OFFSET:
            return None
        return name, off

    def describe(self, addr: int) -> str:
        """``name`` or ``name+off`` (empty if no symbol covers addr)."""
        hit = self.find(addr)
        if hit is None:
            return ""
        name, off = hit
        return name if off == 0 else f"{name}+{off}"

    def names(self) -> list[str]:
        return sorted(self.by_name)


def from_elf(data: bytes) -> Symbols:
    """Function, object and untyped symbols of an ELF file's .symtab (empty if
    the file has none or is not a readable ELF)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    table: dict[str, int] = {}
    sizes: dict[str, int] = {}
    try:
        elf = ELFFile(io.BytesIO(data))
        for sec in elf.iter_sections():
            if sec.header.sh_type not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                continue
            for sym in sec.iter_symbols():
                if not sym.name or sym["st_info"]["type"] not in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                    continue
                if sym["st_shndx"] == "SHN_UNDEF":
                    continue
                table.setdefault(sym.name, sym["st_value"])
                sizes.setdefault(sym.name, sym["st_size"])
    except (ELFError, ValueError, KeyError, IndexError, AttributeError, TypeError, OSError):
        return Symbols()
    return Symbols(table, sizes)


#: System.map symbol types kept (nm(1): text, data, bss, read-only data, weak)
_MAP_TYPES = set("TtDdBbRrWwVv")


def from_system_map(text: str) -> Symbols:
    """``nm``-style lines ``ADDRESS TYPE NAME`` (Linux's System.map); lines
    that do not parse are skipped."""
    table: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in _MAP_TYPES:
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        if 0 <= addr < 1 << 64:
            table.setdefault(parts[2], addr)
    return Symbols(table)


def _system_map_beside(path: Path, data: bytes) -> Path | None:
    """The System.map of a bzImage (boot protocol "HdrS" at 0x202)."""
    if data[0x202:0x206] != b"HdrS" or not path.name.startswith("vmlinuz"):
        return None
    cand = path.with_name("System.map" + path.name[len("vmlinuz"):])
    return cand if cand.is_file() else None


def load_symbol_file(path: str | Path) -> Symbols:
    """An explicit symbol file (``--symbols``): an ELF's symbol table or a
    System.map.  Raises OSError if it cannot be read."""
    data = Path(path).read_bytes()
    if data[:4] == b"\x7fELF":
        return from_elf(data)
    return from_system_map(data.decode("latin-1"))


def load_symbols(kernel: str | Path) -> Symbols:
    """Symbols of a kernel file: an ELF's symbol table, or a guest source's
    labels (``.asm``).  Never raises for a file that has none."""
    path = Path(kernel)
    if path.suffix == ".asm":
        from vmlab.tools.asm import AsmError, compile_guest
        try:
            return Symbols(compile_guest(path).labels)
        except (AsmError, OSError):
            return Symbols()
    if path.suffix == ".c":
        # A C guest (tools/cguest.py): the symbols of the image it builds to.
        from vmlab.tools.cguest import CGuestError, build as cbuild
        try:
            path = cbuild(path)
        except (CGuestError, OSError):
            return Symbols()
    try:
        data = path.read_bytes()
    except OSError:
        return Symbols()
    if data[:4] == b"\x7fELF":
        return from_elf(data)
    smap = _system_map_beside(path, data)
    if smap is not None:
        try:
            return from_system_map(smap.read_text(errors="replace"))
        except OSError:
            return Symbols()
    return Symbols()

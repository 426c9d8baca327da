"""Kernel loaders: turn an image file into a :class:`BootImage` plan.

Loaders are pure: they read bytes and describe what to put in guest RAM and
the CPU state at entry; the machine applies the plan.  Formats:

* ``multiboot`` - Multiboot v1 kernels, ELF32 or a.out kludge
  (:mod:`emu.loaders.multiboot`), entered in 32-bit protected mode;
* ``elf64`` - x86-64 ELF executables entered in long mode
  (:mod:`emu.loaders.elf64`);
* ``bootsector`` - a 512-byte BIOS boot sector at 0x7c00, real mode
  (:mod:`emu.loaders.bootsector`);
* ``flat`` - raw bytes at an address, in the mode asked for
  (:mod:`emu.loaders.flat`).

Every failure is a :class:`~emu.errors.LoaderError`; its subclasses
:class:`LoaderFileError`, :class:`LoaderFormatError` and
:class:`LoaderConfigError` say whether the file could not be read, is not a
valid image, or does not fit the machine/options.
"""

import os
import stat

from vmlab.emu.loaders.bootsector import has_boot_signature, load_bootsector
from vmlab.emu.loaders.elf import check_ident, elf_class, is_elf
from vmlab.emu.loaders.elf64 import load_elf64
from vmlab.emu.loaders.errors import LoaderConfigError, LoaderError, LoaderFileError, LoaderFormatError
from vmlab.emu.loaders.flat import load_flat
from vmlab.emu.loaders.image import FORMATS, MODES, BootImage
from vmlab.emu.loaders.layout import MiB, fmt_size
from vmlab.emu.loaders.linux import load_bzimage, load_pvh, pvh_entry
from vmlab.emu.loaders.multiboot import find_header, load_multiboot

__all__ = [
    "load", "detect_format", "read_image", "BootImage", "FORMATS", "MODES",
    "LoaderError", "LoaderFileError", "LoaderFormatError", "LoaderConfigError",
    "MAX_IMAGE_SIZE",
]

#: Largest file the loaders read.  Images are read whole, and a kernel (or
#: module) bigger than this is far beyond anything vmlab runs; the limit keeps
#: a wrong path (a disk image, a core dump) from allocating gigabytes.
MAX_IMAGE_SIZE = 256 * MiB

#: Name used in the kernel command line when the image is given as bytes.
DEFAULT_IMAGE_NAME = "vmlab"


def read_image(path: str | os.PathLike, what: str = "kernel image") -> bytes:
    """Read a whole regular file of at most :data:`MAX_IMAGE_SIZE` bytes.

    Raises :class:`LoaderFileError` naming ``what`` and the path.
    """
    shown = os.fsdecode(path)
    try:
        # O_NONBLOCK: opening a FIFO (or a tty) for reading must not wait for
        # a writer; such a file is then refused as not regular.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise LoaderFileError(f"{what} {shown!r} is not a regular file")
            if st.st_size > MAX_IMAGE_SIZE:
                raise LoaderFileError(
                    f"{what} {shown!r} is {fmt_size(st.st_size)}, more than the "
                    f"{fmt_size(MAX_IMAGE_SIZE)} vmlab loads")
            data = f.read(MAX_IMAGE_SIZE + 1)
    except FileNotFoundError as exc:
        raise LoaderFileError(f"{what} {shown!r} does not exist") from exc
    except IsADirectoryError as exc:
        raise LoaderFileError(f"{what} {shown!r} is a directory") from exc
    except PermissionError as exc:
        raise LoaderFileError(f"{what} {shown!r} cannot be read: permission denied") from exc
    except OSError as exc:
        raise LoaderFileError(f"{what} {shown!r} cannot be read: {exc.strerror or exc}") from exc
    if len(data) > MAX_IMAGE_SIZE:  # the file grew while we read it
        raise LoaderFileError(f"{what} {shown!r} is larger than {fmt_size(MAX_IMAGE_SIZE)}")
    return data


#: Offset and value of the Linux boot protocol's header signature ("HdrS",
#: Documentation/x86/boot.rst, "The Real-Mode Kernel Header").
BZIMAGE_MAGIC_OFFSET, BZIMAGE_MAGIC = 0x202, b"HdrS"


def detect_format(data: bytes) -> str:
    """Pick the loader for ``data``; refuse what is not recognisably a kernel.

    * ELF magic: ELFCLASS64 -> ``elf64`` (its loader refuses machines other
      than x86-64); ELFCLASS32 -> ``multiboot``, which requires a Multiboot
      header in the first 8192 bytes, so an ELF32 file without one is an
      error rather than a flat binary.
    * a non-ELF file with a valid Multiboot header (magic and checksum, inside
      the first 8192 bytes) whose flags have bit 16 (a.out kludge) ->
      ``multiboot``; with bit 16 clear it cannot be loaded as Multiboot and is
      refused (``fmt="flat"`` loads it as raw bytes).
    * exactly 512 bytes ending in 0x55 0xAA -> ``bootsector``.
    * an ELF64 with a PVH entry note (Xen note type 18) -> ``pvh`` (Linux's
      vmlinux; :mod:`emu.loaders.linux`).
    * a Linux bzImage ("HdrS" at 0x202) -> ``bzimage``.
    * anything else raises LoaderFormatError saying why (as QEMU refuses a
      -kernel it cannot identify); raw code needs ``fmt="flat"``.
    """
    if is_elf(data):
        check_ident(data)
        if elf_class(data) == 64:
            return "pvh" if pvh_entry(data) is not None else "elf64"
        hdr, reason = find_header(data)
        if hdr is None:
            raise LoaderFormatError(
                f"ELF32 file is not a Multiboot kernel: {reason[0].lower()}{reason[1:]}")
        return "multiboot"
    hdr, mb_reason = find_header(data)
    if hdr is not None:
        if hdr.aout_kludge:
            return "multiboot"
        raise LoaderFormatError(
            f"file has a Multiboot header at offset {hdr.offset:#x} without address fields "
            f"(flags bit 16) and is not an ELF file; load it with the flat format if it is "
            f"raw code")
    if data[BZIMAGE_MAGIC_OFFSET:BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC:
        return "bzimage"
    if has_boot_signature(data):
        return "bootsector"
    if "no Multiboot header" not in mb_reason:
        raise LoaderFormatError(f"not a kernel vmlab recognises: {mb_reason[0].lower()}{mb_reason[1:]}")
    if len(data) == 512:
        why = f"a 512-byte file without the boot signature 55 aa at offset 510 (it ends in {data[-2:].hex(' ')})"
    elif len(data) < 1024 and data[-2:] == b"\x55\xaa":
        why = f"a boot sector must be exactly 512 bytes, this file is {len(data)}"
    else:
        why = f"{len(data)} bytes with no ELF header, no Multiboot header in the first 8 KiB and no boot signature"
    raise LoaderFormatError(
        f"unrecognised kernel format: {why}; use the flat format for raw code")


def load(path_or_bytes, *, fmt: str = "auto", ram_size: int, cmdline: str = "",
         modules=(), flat_addr: int | None = None, flat_mode: str | None = None) -> BootImage:
    """Load a kernel image and return its boot plan.

    Args:
        path_or_bytes: a path (``str`` or ``os.PathLike``) or the image itself
            (``bytes``, ``bytearray``, ``memoryview``).
        fmt: ``"auto"`` (see :func:`detect_format`) or one of :data:`FORMATS`.
            With ``"auto"``, giving ``flat_addr`` or ``flat_mode`` selects
            ``flat`` (raw code is never guessed).
        ram_size: guest RAM in bytes; everything loaded lies in [0, ram_size).
        cmdline: kernel command line (multiboot, elf64, bzimage, pvh).  A
            Multiboot or ELF64 kernel sees "<path> <cmdline>" ("vmlab
            <cmdline>" for bytes), like QEMU; Linux sees it as given.
        modules: ``(bytes, cmdline)`` pairs (multiboot and elf64); for
            bzimage and pvh at most one, the initrd.
        flat_addr, flat_mode: where and in which mode a flat image starts
            (default 0x7c00, real mode).

    Raises:
        LoaderFileError, LoaderFormatError, LoaderConfigError (all
        :class:`~emu.errors.LoaderError`).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise LoaderConfigError(
            f"unknown image format {fmt!r}; expected auto, {', '.join(FORMATS)}")
    if isinstance(ram_size, bool) or not isinstance(ram_size, int) or ram_size <= 0:
        raise LoaderConfigError(f"guest RAM size must be a positive integer, not {ram_size!r}")

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), DEFAULT_IMAGE_NAME
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        data, name = read_image(path_or_bytes), os.fsdecode(path_or_bytes)
    else:
        raise LoaderConfigError(
            f"kernel image must be a path or bytes, not {type(path_or_bytes).__name__}")
    if not data:
        raise LoaderFormatError("kernel image is empty")

    if fmt == "auto":
        fmt = "flat" if flat_addr is not None or flat_mode is not None else detect_format(data)
    if fmt in ("bootsector", "flat"):
        try:
            modules = list(modules)
        except TypeError as exc:
            raise LoaderConfigError("modules must be a sequence of (bytes, cmdline) pairs") from exc
        if cmdline or modules:
            raise LoaderConfigError(
                f"a {fmt} image cannot receive a command line or modules; "
                f"only multiboot, elf64 and Linux (bzimage, pvh) kernels can")
    if fmt in ("bzimage", "pvh"):
        return _load_linux(fmt, data, ram_size, cmdline, modules)
    if fmt == "multiboot":
        return load_multiboot(data, ram_size=ram_size, cmdline=cmdline, modules=modules,
                              name=name)
    if fmt == "elf64":
        return load_elf64(data, ram_size=ram_size, cmdline=cmdline, modules=modules, name=name)
    if fmt == "bootsector":
        return load_bootsector(data, ram_size=ram_size)
    return load_flat(data, ram_size=ram_size, addr=0x7C00 if flat_addr is None else flat_addr,
                     mode=flat_mode or "real")


def _load_linux(fmt: str, data: bytes, ram_size: int, cmdline: str, modules) -> BootImage:
    """bzImage or PVH: the command line as given (Linux would take an image
    path for a parameter), at most one module, the initrd (its own command
    line, if any, is ignored: Linux has no place for it)."""
    try:
        mods = list(modules)
    except TypeError as exc:
        raise LoaderConfigError("modules must be a sequence of (bytes, cmdline) pairs") from exc
    if len(mods) > 1:
        raise LoaderConfigError(f"a Linux kernel takes one initrd, not {len(mods)} files")
    initrd = None
    if mods:
        item = mods[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], (bytes, bytearray, memoryview))):
            raise LoaderConfigError("module 0 is not a (bytes, cmdline) pair")
        initrd = bytes(item[0])
    if fmt == "bzimage":
        return load_bzimage(data, ram_size=ram_size, cmdline=cmdline, initrd=initrd)
    return load_pvh(data, ram_size=ram_size, cmdline=cmdline, initrd=initrd)

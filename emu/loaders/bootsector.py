"""Boot sector loader: what a PC BIOS does with the first sector of a disk.

The image (at most 512 bytes; a shorter file is loaded as is, and the 0x55
0xAA signature at offset 510 is not required, only reported in ``info``) is
copied to 0x7c00 and entered in real mode at CS:IP = 0000:7C00.

Register state follows QEMU with SeaBIOS (src/boot.c, call_boot_entry(),
boot_disk()): the BIOS far-calls the sector with a zeroed register block
except

* DL = boot drive, 0x80 for the first hard disk (``edx`` = 0x80);
* AX = 0xAA55 (``eax``), the signature SeaBIOS leaves as a "magic number";
* FLAGS.IF = 1 (the machine's job, as are CS = DS = ES = SS = 0).

SeaBIOS's 16-bit stack is SS:SP = 0000:7000 (BUILD_STACK_ADDR in
src/config.h); the boot sector is entered a few frames below it, the exact
SP depending on the SeaBIOS build.  vmlab uses SP = 0x7000 (``esp``): the same
stack area, below the sector, and no guest may depend on the exact value.
"""

from vmlab.emu.loaders.errors import LoaderFormatError
from vmlab.emu.loaders.image import BootImage
from vmlab.emu.loaders.layout import GuestLayout

__all__ = ["load_bootsector", "BOOT_SECTOR_ADDR", "BOOT_SECTOR_SIZE", "BOOT_DRIVE",
           "BOOT_STACK_TOP"]

BOOT_SECTOR_ADDR = 0x7C00
BOOT_SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
#: First hard disk (INT 13h drive numbering).
BOOT_DRIVE = 0x80
#: SeaBIOS BUILD_STACK_ADDR.
BOOT_STACK_TOP = 0x7000
#: AX as SeaBIOS leaves it.
SEABIOS_AX = 0xAA55


def has_boot_signature(data: bytes) -> bool:
    """True for exactly 512 bytes ending in 0x55 0xAA."""
    return len(data) == BOOT_SECTOR_SIZE and data[-2:] == BOOT_SIGNATURE


def load_bootsector(data: bytes, *, ram_size: int) -> BootImage:
    """Plan the boot of a boot sector image (see the module docstring)."""
    if len(data) > BOOT_SECTOR_SIZE:
        raise LoaderFormatError(
            f"boot sector image is {len(data)} bytes; a boot sector is at most "
            f"{BOOT_SECTOR_SIZE} bytes (use the flat format for larger images)")
    layout = GuestLayout(ram_size)
    layout.place("boot sector", BOOT_SECTOR_ADDR, data)
    return BootImage(
        format="bootsector", mode="real", entry=BOOT_SECTOR_ADDR,
        regs={"eax": SEABIOS_AX, "edx": BOOT_DRIVE, "esp": BOOT_STACK_TOP},
        writes=layout.writes, zero=layout.zero,
        info={"size": len(data), "signature": has_boot_signature(data),
              "boot_drive": BOOT_DRIVE, "warnings": []})

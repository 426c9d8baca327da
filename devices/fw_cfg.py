"""QEMU firmware configuration device (fw_cfg), traditional I/O interface.

Reference: QEMU docs/specs/fw_cfg.rst and hw/nvram/fw_cfg.c.

x86 I/O ports: selector 0x510 (16-bit write), data 0x511 (8-bit read). QEMU
maps both as one 2-port region (``fw_cfg_comb_mem_ops``) and this model
decodes it the same way:

* a 16-bit write at offset 0 selects an item (and rewinds its offset to 0);
* 8-bit reads return the next byte of the selected item, on either port
  (``fw_cfg_data_read`` ignores the address);
* 8-bit writes are data writes, which QEMU ignores since 2.4;
* other widths are invalid for the region in QEMU (``fw_cfg_comb_valid``):
  here they read 0 and are otherwise ignored.

Reading past the end of an item, or any read of an unknown item, returns 0.
DMA (FW_CFG_ID bit 1) is not offered.
"""

from __future__ import annotations

import struct

from vmlab.devices.errors import DeviceError

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_IO_BASE = FW_CFG_PORT_SEL
FW_CFG_IO_SIZE = 2

# Selector keys (fw_cfg.rst, "Selector Register" and include/standard-headers/
# linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS_MIN = 0x10
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL) & 0xFFFF

FW_CFG_VERSION = 0x01
"""FW_CFG_ID bit 0: traditional interface present."""
FW_CFG_VERSION_DMA = 0x02
"""FW_CFG_ID bit 1: DMA interface present (not offered here)."""

FW_CFG_MAX_FILE_PATH = 56
"""Size of ``FWCfgFile.name``, NUL terminator included."""


class FwCfg:
    """fw_cfg item store plus its selector/data port pair.

    ``ram_size`` is reported in FW_CFG_RAM_SIZE; ``cmdline`` (if given) in
    FW_CFG_CMDLINE_SIZE/DATA, NUL-terminated as QEMU's x86 loader does.
    """

    def __init__(self, ram_size: int, cmdline: str | bytes | None = None,
                 nb_cpus: int = 1, max_cpus: int = 1) -> None:
        self._items: dict[int, bytes] = {}
        self._files: list[tuple[str, int, int]] = []  # (name, select, size)
        self._selected: int | None = None
        self._offset = 0
        self._items[FW_CFG_SIGNATURE] = b"QEMU"
        self._items[FW_CFG_ID] = struct.pack("<I", FW_CFG_VERSION)
        self._items[FW_CFG_RAM_SIZE] = struct.pack("<Q", ram_size)
        self._items[FW_CFG_NB_CPUS] = struct.pack("<H", nb_cpus)
        self._items[FW_CFG_MAX_CPUS] = struct.pack("<H", max_cpus)
        if cmdline is not None:
            raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
            data = raw + b"\0"
            self._items[FW_CFG_CMDLINE_SIZE] = struct.pack("<I", len(data))
            self._items[FW_CFG_CMDLINE_DATA] = data
        self._rebuild_dir()

    # -- VMM-side API -------------------------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Set a numbered item (e.g. FW_CFG_KERNEL_SIZE) to ``data``."""
        if not 0 <= key <= 0xFFFF or key == FW_CFG_FILE_DIR:
            raise DeviceError(f"fw_cfg: key {key:#x} cannot be set directly")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Publish ``data`` under ``name`` in the file directory.

        Returns the selector key assigned (FW_CFG_FILE_FIRST upwards, in
        order of addition). The directory lists files sorted by name, as
        QEMU does.
        """
        encoded = name.encode("ascii")
        if not encoded or len(encoded) >= FW_CFG_MAX_FILE_PATH or b"\0" in encoded:
            raise DeviceError(f"fw_cfg: bad file name {name!r}")
        if any(n == name for (n, _, _) in self._files):
            raise DeviceError(f"fw_cfg: duplicate file {name!r}")
        select = FW_CFG_FILE_FIRST + len(self._files)
        if select & ~FW_CFG_ENTRY_MASK:
            raise DeviceError("fw_cfg: file directory full")
        self._items[select] = bytes(data)
        self._files.append((name, select, len(data)))
        self._rebuild_dir()
        return select

    def item(self, key: int) -> bytes | None:
        """Contents of item ``key`` (None when absent)."""
        return self._items.get(key)

    def _rebuild_dir(self) -> None:
        # fw_cfg.rst "File Directory": big-endian count, then 64-byte
        # FWCfgFile entries {be32 size, be16 select, u16 reserved, name[56]}.
        entries = sorted(self._files)
        out = bytearray(struct.pack(">I", len(entries)))
        for name, select, size in entries:
            out += struct.pack(">IHH56s", size, select, 0, name.encode("ascii"))
        self._items[FW_CFG_FILE_DIR] = bytes(out)

    # -- guest-side ports -----------------------------------------------------

    def select(self, key: int) -> None:
        """Selector register write: pick item ``key``, rewind to offset 0."""
        key &= 0xFFFF
        self._selected = key if key in self._items else None
        self._offset = 0

    def read_data_byte(self) -> int:
        """Data register read: next byte of the selected item, or 0."""
        if self._selected is None:
            return 0
        data = self._items[self._selected]
        if self._offset >= len(data):
            return 0
        value = data[self._offset]
        self._offset += 1
        return value

    def read(self, offset: int, size: int) -> int:
        """Bus read of the 0x510/0x511 pair (see module docstring)."""
        if size != 1:
            return 0
        return self.read_data_byte()

    def write(self, offset: int, size: int, value: int) -> None:
        """Bus write of the 0x510/0x511 pair (see module docstring)."""
        if size == 2 and offset == 0:
            self.select(value)
        # 1-byte writes are legacy data writes: ignored, as in QEMU >= 2.4.

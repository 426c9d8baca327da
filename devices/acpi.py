"""ACPI tables vmlab builds for an OS booted without firmware, and the sleep
control register the OS powers the machine off through.

The tables describe a hardware-reduced ACPI platform (ACPI 6.5 §4.1,
"Hardware-Reduced ACPI"), the shape of QEMU's microvm machine:

* RSDP (§5.2.5.3, revision 2, 36 bytes) at the base address, which lies in
  the BIOS area [0xE0000, 0x100000) where the OS looks for it (§5.2.5.1);
* XSDT (§5.2.8) listing the FADT and the MADT;
* FADT (§5.2.9, revision 6, 276 bytes) with HW_REDUCED_ACPI (flags bit 20),
  the DSDT, RESET_REG = port 0xCF9 value 0x06 (RESET_REG_SUP, bit 10), the
  SLEEP_CONTROL_REG/SLEEP_STATUS_REG (§4.8.3.7) at ports 0x600/0x601,
  IAPC_BOOT_ARCH (§5.2.9.3) "VGA Not Present", no 8042, CMOS RTC present,
  CENTURY = CMOS register 0x32;
* MADT (§5.2.12): LAPIC at 0xFEE00000, PCAT_COMPAT (8259s present), one
  Processor Local APIC (§5.2.12.2), one I/O APIC (§5.2.12.3) at 0xFEC00000
  with GSI base 0, an Interrupt Source Override ISA IRQ 0 -> GSI 2
  (§5.2.12.5, the PIT as on PC hardware), and a Local APIC NMI on LINT1
  (§5.2.12.7);
* DSDT (§5.2.11.1) in AML (§20): ``\\_S5`` = {5, 0} (SLP_TYP 5 for S5,
  §7.4.2), and under ``\\_SB`` the COM1 UART (PNP0501: I/O 0x3F8-0x3FF,
  IRQ 4) and one virtio-mmio device per attached virtio slot (_HID
  "LNRO0005", Memory32Fixed base/0x200, a level, active-high Extended
  Interrupt), as QEMU's microvm describes them - Linux kernels without
  virtio_mmio.device= support find virtio-mmio devices only this way.

:class:`SleepControl` is the sleep control/status register pair.  Linux
powers off by writing SLP_TYP (bits 4:2) with SLP_EN (bit 5) to the control
register (§4.8.3.7, Table 4.19); SLP_TYP 5 (the ``\\_S5`` value) calls
``on_poweroff``.
"""
from __future__ import annotations

import struct
from typing import Callable

__all__ = ["build_tables", "aml_pkglength", "eisa_id", "checksum", "SleepControl",
           "SLEEP_CONTROL_PORT", "SLEEP_STATUS_PORT", "IOAPIC_BASE", "LAPIC_BASE", "SLP_TYP_S5"]

OEM_ID = b"VMLAB "          # 6 bytes
OEM_TABLE_ID = b"VMLABVM "  # 8 bytes
CREATOR_ID = b"VMLB"
LAPIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
IOAPIC_ID = 0
SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT, RESET_VALUE = 0xCF9, 0x06
SLP_TYP_S5 = 5
SLP_EN = 1 << 5
VIRTIO_MMIO_SIZE = 0x200
RTC_CENTURY_INDEX = 0x32

# FADT flags (§5.2.9, Table 5.10) and IA-PC boot architecture flags (Table 5.11)
FADT_WBINVD = 1 << 0
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
# Generic Address Structure (§5.2.3.2): space id 1 = System I/O
GAS_SYSTEM_IO = 1


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 modulo 256 (§5.2.6)."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """An ACPI table: the 36-byte System Description Table Header (§5.2.6)
    followed by ``body``, with its checksum."""
    length = 36 + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                      CREATOR_ID, 1)
    t = bytearray(hdr + body)
    t[9] = checksum(t)
    return bytes(t)


def _gas(port: int, width_bits: int) -> bytes:
    """Generic Address Structure (§5.2.3.2) for an I/O port; access size 1 = byte."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, 1, port)


# --- AML (§20) -------------------------------------------------------------

def aml_pkglength(body_len: int) -> bytes:
    """PkgLength (§20.2.4) for a package whose content after the PkgLength is
    ``body_len`` bytes; the encoded length counts the PkgLength bytes too."""
    for n in range(1, 5):
        total = body_len + n
        if n == 1 and total < 0x40:
            return bytes([total])
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0xF)]
            rest = total >> 4
            for _ in range(n - 1):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError("AML package too large")


def _int(v: int) -> bytes:
    """ComputationalData integer (§20.2.3): Zero/One/Byte/Word/DWord/QWord."""
    if v == 0:
        return b"\x00"
    if v == 1:
        return b"\x01"
    for prefix, fmt, lim in ((0x0A, "<B", 0xFF), (0x0B, "<H", 0xFFFF), (0x0C, "<I", 0xFFFFFFFF)):
        if v <= lim:
            return bytes([prefix]) + struct.pack(fmt, v)
    return b"\x0E" + struct.pack("<Q", v)


def _string(s: str) -> bytes:
    return b"\x0D" + s.encode("ascii") + b"\x00"


def _name(seg: str, value: bytes) -> bytes:
    """NameOp NameString DataRefObject (§20.2.5.1)."""
    return b"\x08" + _nameseg(seg) + value


def _nameseg(seg: str) -> bytes:
    root = seg.startswith("\\")
    seg = seg.lstrip("\\")
    if len(seg) > 4 or not seg:
        raise ValueError(f"bad AML NameSeg {seg!r}")
    return (b"\\" if root else b"") + seg.ljust(4, "_").encode("ascii")


def _buffer(data: bytes) -> bytes:
    body = _int(len(data)) + data
    return b"\x11" + aml_pkglength(len(body)) + body


def _package(*items: bytes) -> bytes:
    body = bytes([len(items)]) + b"".join(items)
    return b"\x12" + aml_pkglength(len(body)) + body


def _device(seg: str, *terms: bytes) -> bytes:
    body = _nameseg(seg) + b"".join(terms)
    return b"\x5B\x82" + aml_pkglength(len(body)) + body


def _scope(seg: str, *terms: bytes) -> bytes:
    body = _nameseg(seg) + b"".join(terms)
    return b"\x10" + aml_pkglength(len(body)) + body


def eisa_id(text: str) -> int:
    """EISAID("PNP0501") as a 32-bit integer (§19.6.35 EISAID macro)."""
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    raw = struct.pack(">HH", vendor, product)
    return struct.unpack("<I", raw)[0]


def _resources(*descs: bytes) -> bytes:
    """ResourceTemplate: the descriptors and an End Tag (§6.4.2.9, checksum 0)."""
    return _buffer(b"".join(descs) + b"\x79\x00")


def _io_port(base: int, length: int) -> bytes:
    """I/O Port Descriptor (§6.4.2.5), 16-bit decode."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def _irq(irq: int) -> bytes:
    """IRQ Descriptor (§6.4.2.1), 2-byte form: high-true edge ISA IRQ."""
    return struct.pack("<BH", 0x22, 1 << irq)


def _memory32_fixed(base: int, length: int) -> bytes:
    """Fixed Location Memory Range Descriptor (§6.4.3.4), read/write."""
    return struct.pack("<BHBII", 0x86, 9, 1, base, length)


def _ext_interrupt(gsi: int) -> bytes:
    """Extended Interrupt Descriptor (§6.4.3.6): consumer, level, active-high,
    exclusive, one interrupt."""
    return struct.pack("<BHBBI", 0x89, 6, 0x01, 1, gsi)


def build_dsdt(virtio: list[tuple[int, int]]) -> bytes:
    """The DSDT: \\_S5, COM1 and the virtio-mmio devices ``[(base, irq)]``."""
    devices = [_device("COM1",
                       _name("_HID", _int(eisa_id("PNP0501"))),
                       _name("_UID", _int(0)),
                       _name("_CRS", _resources(_io_port(0x3F8, 8), _irq(4))))]
    for i, (base, irq) in enumerate(virtio):
        devices.append(_device(f"VR{i:02d}",
                               _name("_HID", _string("LNRO0005")),
                               _name("_UID", _int(i)),
                               _name("_CCA", _int(1)),
                               _name("_CRS", _resources(_memory32_fixed(base, VIRTIO_MMIO_SIZE),
                                                        _ext_interrupt(irq)))))
    aml = _name("\\_S5", _package(_int(SLP_TYP_S5), _int(0))) + _scope("\\_SB", *devices)
    return _table(b"DSDT", 2, aml)


def build_madt() -> bytes:
    body = struct.pack("<II", LAPIC_BASE, 1)                       # PCAT_COMPAT
    body += struct.pack("<BBBBI", 0, 8, 0, 0, 1)                    # Processor Local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)              # ISA IRQ 0 -> GSI 2, conforming
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)                 # LAPIC NMI: all, LINT1
    return _table(b"APIC", 5, body)


def build_fadt(dsdt_addr: int) -> bytes:
    f = bytearray(276 - 36)

    def put(off: int, fmt: str, *v) -> None:
        struct.pack_into(fmt, f, off - 36, *v)
    put(40, "<I", dsdt_addr)
    put(108, "<B", RTC_CENTURY_INDEX)
    put(109, "<H", IAPC_VGA_NOT_PRESENT)
    put(112, "<I", FADT_WBINVD | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    f[116 - 36:128 - 36] = _gas(RESET_PORT, 8)
    put(128, "<B", RESET_VALUE)
    put(131, "<B", 5)                                  # FADT minor version (6.5)
    put(140, "<Q", dsdt_addr)
    f[244 - 36:256 - 36] = _gas(SLEEP_CONTROL_PORT, 8)
    f[256 - 36:268 - 36] = _gas(SLEEP_STATUS_PORT, 8)
    f[268 - 36:276 - 36] = b"VMLAB\0\0\0"
    return _table(b"FACP", 6, bytes(f))


def build_tables(base: int, virtio: list[tuple[int, int]] = ()) -> bytes:
    """All tables laid out from ``base`` (16-byte aligned, the RSDP first);
    returns the bytes to write at ``base``."""
    def align(n: int) -> int:
        return (n + 15) & ~15
    rsdp_len = 36
    dsdt = build_dsdt(list(virtio))
    dsdt_at = base + align(rsdp_len)
    fadt = build_fadt(dsdt_at)
    fadt_at = dsdt_at + align(len(dsdt))
    madt = build_madt()
    madt_at = fadt_at + align(len(fadt))
    xsdt_at = madt_at + align(len(madt))
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_at, 0, b"\0\0\0"))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    out = bytearray(xsdt_at - base + len(xsdt))
    for at, data in ((base, rsdp), (dsdt_at, dsdt), (fadt_at, fadt), (madt_at, madt), (xsdt_at, xsdt)):
        out[at - base:at - base + len(data)] = data
    return bytes(out)


class SleepControl:
    """SLEEP_CONTROL_REG (offset 0) and SLEEP_STATUS_REG (offset 1), one byte
    each (ACPI 6.5 §4.8.3.7).  Register it on two consecutive ports."""

    def __init__(self, on_poweroff: Callable[[str], object]) -> None:
        self._on_poweroff = on_poweroff
        self.status = 0

    def read(self, offset: int, size: int) -> int:
        return self.status if offset == 1 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 1:
            self.status &= ~value          # WAK_STS (bit 7) is write-1-to-clear
            return
        if value & SLP_EN and (value >> 2) & 7 == SLP_TYP_S5:
            self._on_poweroff("ACPI S5 (sleep control register <- "
                              f"{value:#04x}: SLP_TYP {SLP_TYP_S5}, SLP_EN)")

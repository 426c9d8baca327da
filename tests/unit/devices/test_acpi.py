"""ACPI tables (devices/acpi.py; ACPI 6.5 §5.2) and the sleep control register."""
import struct

from hypothesis import given
from hypothesis import strategies as st

from vmlab.devices.acpi import SleepControl, aml_pkglength, build_tables, eisa_id

BASE = 0xE0000


def tables(virtio=()):
    blob = build_tables(BASE, virtio=list(virtio))

    def at(addr, n):
        return blob[addr - BASE:addr - BASE + n]
    rsdp = at(BASE, 36)
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xlen = struct.unpack_from("<I", at(xsdt_addr, 8), 4)[0]
    xsdt = at(xsdt_addr, xlen)
    out = {"RSDP": rsdp, "XSDT": xsdt}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        length = struct.unpack_from("<I", at(addr, 8), 4)[0]
        t = at(addr, length)
        out[t[:4].decode()] = t
    dsdt_addr = struct.unpack_from("<Q", out["FACP"], 140)[0]
    out["DSDT"] = at(dsdt_addr, struct.unpack_from("<I", at(dsdt_addr, 8), 4)[0])
    return out


def test_acpi_every_table_checksums_to_zero():
    t = tables([(0xD0000000, 5)])
    assert t["RSDP"][:8] == b"RSD PTR " and sum(t["RSDP"][:20]) % 256 == 0 and sum(t["RSDP"]) % 256 == 0
    for name in ("XSDT", "FACP", "APIC", "DSDT"):
        assert sum(t[name]) % 256 == 0, name


def test_acpi_fadt_is_hardware_reduced_with_sleep_and_reset_registers():
    f = tables()["FACP"]
    assert len(f) == 276 and f[8] == 6
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & (1 << 20) and flags & (1 << 10)
    assert struct.unpack_from("<BBBBQ", f, 244) == (1, 8, 0, 1, 0x600)
    assert struct.unpack_from("<BBBBQ", f, 116)[4] == 0xCF9 and f[128] == 6
    assert f[108] == 0x32 and struct.unpack_from("<H", f, 109)[0] == 1 << 2


def test_acpi_madt_lists_lapic_ioapic_and_irq0_override():
    m = tables()["APIC"]
    assert struct.unpack_from("<I", m, 36)[0] == 0xFEE00000
    entries, off = [], 44
    while off < len(m):
        entries.append((m[off], m[off + 1], m[off:off + m[off + 1]]))
        off += m[off + 1]
    kinds = [e[0] for e in entries]
    assert kinds == [0, 1, 2, 4]
    assert struct.unpack_from("<I", entries[1][2], 4)[0] == 0xFEC00000
    assert struct.unpack_from("<BBI", entries[2][2], 2) == (0, 0, 2)


def test_acpi_dsdt_has_uart_s5_and_one_lnro0005_per_virtio_slot():
    d = tables([(0xD0000000, 5), (0xD0001000, 6)])["DSDT"]
    assert d.count(b"LNRO0005") == 2 and b"_S5_" in d and b"COM1" in d
    assert struct.pack("<I", eisa_id("PNP0501")) in d
    assert struct.pack("<BHBBI", 0x89, 6, 1, 1, 6) in d           # level, active-high GSI 6
    assert struct.pack("<BHBII", 0x86, 9, 1, 0xD0001000, 0x200) in d
    assert tables()["DSDT"].count(b"LNRO0005") == 0


def test_acpi_eisa_id_matches_the_known_pnp0501_encoding():
    assert eisa_id("PNP0501") == 0x0105D041


@given(st.integers(0, (1 << 28) - 10))
def test_acpi_pkglength_encodes_its_own_length(n):
    enc = aml_pkglength(n)
    lead = enc[0]
    count = lead >> 6
    assert len(enc) == count + 1
    if count == 0:
        total = lead & 0x3F
    else:
        total = lead & 0x0F
        for i, b in enumerate(enc[1:]):
            total |= b << (4 + 8 * i)
    assert total == n + len(enc)


def test_sleep_control_s5_with_slp_en_powers_off_only():
    calls = []
    s = SleepControl(calls.append)
    s.write(0, 1, 5 << 2)                 # SLP_TYP without SLP_EN
    s.write(0, 1, (3 << 2) | 0x20)        # another sleep type
    assert calls == []
    s.write(0, 1, (5 << 2) | 0x20)
    assert len(calls) == 1 and "S5" in calls[0]

"""RAM above 4 GiB (issue 11 item 5): the split around the 32-bit hole (QEMU
pc's rule, emu/memory.py split_ram), the two-range RAM check in C and its
Python twin, the maps the loaders report, and the CLI's -m."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import example, given, settings, strategies as st

from vmlab.emu.errors import GuestMemoryError
from vmlab.emu.loaders.linux import E820_RAM, e820_map
from vmlab.emu.loaders.mbinfo import mem_lower_upper, memory_map
from vmlab.emu.memory import HIGH_RAM_BASE, MAX_RAM, GuestMemory, split_ram
from vmlab.emu.native import ffi, lib

ROOT = Path(__file__).resolve().parents[2]
GiB, MiB = 1 << 30, 1 << 20


@pytest.mark.parametrize("size,low,high", [
    (64 * MiB, 64 * MiB, 0), (3 * GiB, 3 * GiB, 0),
    (3 * GiB + 4096, 3 * GiB, 4096),            # vmlab splits at 3 GiB (virtio-mmio at 0xd0000000)
    (4 * GiB, 3 * GiB, 1 * GiB),                # QEMU: "qemu -M pc -m 4G -> 3072M low, 1024M high"
    (16 * GiB, 3 * GiB, 13 * GiB)])
def test_split_follows_qemu_pc(size, low, high):
    assert split_ram(size) == (low, high)


_sizes = st.one_of(st.integers(1, 3 * GiB >> 12), st.integers(3 * GiB >> 12, MAX_RAM >> 12)).map(lambda n: n << 12)
_addrs = st.one_of(st.integers(0, 1 << 40), st.integers(0, 4096).map(lambda d: 3 * GiB - 2048 + d),
                   st.integers(0, 8192).map(lambda d: HIGH_RAM_BASE - 4096 + d), st.integers(0, (1 << 64) - 1))


@settings(max_examples=400)
@given(_sizes, _addrs, st.integers(0, 1 << 33) | st.integers(0, 16))
def test_native_is_ram_matches_guest_memory_contains(size, gpa, length):
    low, high = split_ram(size)
    v = ffi.new("vmlab_vcpu *")
    v.ram_size, v.ram_high = low, high
    twin = GuestMemory.contains(SimpleNamespace(size=low, high_size=high), gpa, length)
    assert bool(lib.vmlab_is_ram(v, gpa, length)) == twin


def test_guest_memory_above_4g_reads_writes_and_refuses_the_hole():
    mem = GuestMemory(4 * GiB + 8 * MiB)
    try:
        assert mem.size == 3 * GiB and mem.high_size == 1 * GiB + 8 * MiB
        mem.write(HIGH_RAM_BASE + 0x123, b"high")
        assert mem.read(HIGH_RAM_BASE + 0x123, 4) == b"high"
        assert mem.read(0x123, 4) == b"\0\0\0\0"
        end = HIGH_RAM_BASE + mem.high_size
        mem.write(end - 8, b"12345678")
        for gpa, n in ((3 * GiB, 1), (3 * GiB - 4, 8), (HIGH_RAM_BASE - 1, 2), (end - 4, 8), (0xFEE00000, 4)):
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"x" * n)
    finally:
        mem.close()


def test_maps_report_the_ram_above_4g():
    size = 16 * GiB
    assert (HIGH_RAM_BASE, 13 * GiB, E820_RAM) in e820_map(size)
    assert max(a + n for a, n, t in e820_map(size) if t == E820_RAM and a < HIGH_RAM_BASE) == 3 * GiB
    assert (HIGH_RAM_BASE, 13 * GiB, 1) in memory_map(size)
    assert mem_lower_upper(size) == (639, (3 * GiB - MiB) >> 10)
    assert all(a < HIGH_RAM_BASE for a, _, _ in e820_map(3 * GiB))


def test_cli_runs_a_guest_with_16g_and_refuses_more_than_the_machine_takes():
    run = lambda m: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "vmlab.tools", "run", str(ROOT / "guests" / "hello.asm"), "-m", m,
         "--timeout", "60"], capture_output=True, timeout=120)
    p = run("16G")
    assert p.returncode == 1, p.stderr.decode()
    p = run(f"{(MAX_RAM >> 30) + 1}G")
    assert p.returncode == 2 and b"Traceback" not in p.stderr


def test_page_tables_in_the_hole_read_as_not_present_without_touching_the_host():
    # CR3 pointing into the hole (between 3 GiB and 4 GiB, PROT_NONE on the host):
    # the walk reads the entries as 0, the fetch faults, and with no IDT the
    # machine shuts down -- never a host fault.
    from support import Machine, asm
    m = Machine(ram=4 * GiB + 16 * MiB)
    try:
        code = asm("mov rax, 0xd0001000\n mov cr3, rax\n nop\n hlt", 0x100000, 64)
        m.boot(code, 0x100000, "long64")
        res = m.run()
        assert res.reason == "shutdown", res
    finally:
        m.close()


_GiB = 1 << 30
_near = lambda base: st.integers(-8192, 8192).map(lambda d: (base + d) & ((1 << 64) - 1))  # noqa: E731


@settings(max_examples=30, deadline=None)
@given(dst=st.one_of(_near(3 * _GiB), _near(4 * _GiB), _near(5 * _GiB), _near(0xFEE00000), st.integers(0, 6 * _GiB)),
       src=st.one_of(_near(3 * _GiB), _near(4 * _GiB), _near(5 * _GiB), st.integers(0, 6 * _GiB)),
       count=st.integers(0, 20000), width=st.sampled_from(["movsb", "movsq", "cmpsb"]))
# open bus over the loader's page tables mid-copy: the MMIO decoder must read the
# REP MOVSB through the translation its block ran with, not a new walk
@example(dst=10502, src=3221223685, count=1788, width="movsb")
def test_string_copies_across_ram_hole_and_high_ram_stay_architectural(dst, src, count, width):
    # A guest with RAM above 4 GiB maps [4 GiB, 6 GiB) with 1 GiB pages and runs
    # REP MOVS/CMPS between random addresses around the RAM boundaries, the hole
    # and the LAPIC page: every run ends with a guest status, never a host fault
    # or an internal error.
    from support import Machine, asm
    m = Machine(ram=5 * _GiB)
    try:
        code = asm(f"""
            mov rax, cr3
            and rax, -4096
            mov rax, [rax]
            and rax, -4096
            mov rdx, 0x100000083
            mov [rax + 32], rdx
            mov rdx, 0x140000083
            mov [rax + 40], rdx
            mov rbx, cr3
            mov cr3, rbx
            mov rdi, {dst:#x}
            mov rsi, {src:#x}
            mov rcx, {count}
            rep {width}
            hlt
        """, 0x100000, 64)
        m.boot(code, 0x100000, "long64")
        res = m.vm.run(max_insns=200_000, timeout=20)
        assert res.reason in {"halted", "shutdown", "limit", "timeout", "debug-exit"}, res
    finally:
        m.close()


def test_hlt_after_the_guest_overwrote_its_own_page_tables_is_a_halt():
    # Found by the test above (with 64 MiB too): REP MOVSB of 4097 bytes of open
    # bus (all ones) to 0 overwrites the loader's paging structures at 0x1000;
    # the CPU runs on from its TLB to the HLT, whose byte no longer translates.
    # That run end is the HLT, not "emulation stopped for an unknown reason".
    from support import Machine, asm
    m = Machine(ram=64 * MiB)
    try:
        code = asm(f"mov rdi, 0\n mov rsi, {64 * MiB:#x}\n mov rcx, 4097\n rep movsb\n hlt", 0x100000, 64)
        m.boot(code, 0x100000, "long64")
        res = m.vm.run(max_insns=200_000, timeout=20)
        assert res.reason == "halted", res
        assert m.cpu.regs.gpr[1] == 0
    finally:
        m.close()

"""The two clocks of a vCPU (Vcpu.set_clock, Vm(clock=...), --clock).

virtual: time is the instruction count, exact per block (the block hook's
cached counts), and a run stops before the first block that starts at or past
its deadline.  host: time is the host's monotonic clock, no instruction is
counted, a host timer ends a run at its deadline (at a block boundary), and
self-modifying code and trap sites stay correct."""
import pathlib
import subprocess
import sys
import time

import pytest

from vmlab.emu.errors import ConfigError
from vmlab.emu.exits import DeadlineExit, HltExit
from support import Machine, asm

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODE = 0x100000
DATA = 0x200000


def _boot64(m, body):
    m.boot(asm(body, CODE, 64), CODE, "long64")
    m.cpu.refresh()


def _run_to_exit(cpu, slice_ns):
    """Run in slices of slice_ns until an exit other than a deadline; returns
    (exit, number of deadline stops)."""
    stops = 0
    while True:
        ex = cpu.run(cpu.icount + slice_ns)
        if not isinstance(ex, DeadlineExit):
            return ex, stops
        stops += 1


def _reference_count(code: bytes) -> int:
    """Instructions raw Unicorn executes from CODE up to and including the HLT."""
    from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(CODE, code)
    n = [0]
    uc.hook_add(UC_HOOK_CODE, lambda *a: n.__setitem__(0, n[0] + 1))
    uc.emu_start(CODE, 0)
    return n[0]


LOOP = """
    mov rbx, 0x200000
    mov ecx, 1000
l:  add rax, rcx
    mov [rbx], rax
    dec ecx
    jnz l
    hlt
"""


# ---------------------------------------------------------------- virtual clock
def test_virtual_clock_counts_exactly(machine):
    _boot64(machine, LOOP)
    start = machine.cpu.icount
    ex, stops = _run_to_exit(machine.cpu, 1 << 40)
    assert isinstance(ex, HltExit)
    assert machine.cpu.icount - start == _reference_count(asm(LOOP, CODE, 64))


def test_virtual_clock_same_count_whatever_the_slices(machine):
    # Deadline stops (slow path, then back to the fast path) do not change the
    # count: 4 instructions per loop block, stops every 37 instructions.
    _boot64(machine, LOOP)
    start = machine.cpu.icount
    ex, stops = _run_to_exit(machine.cpu, 37)
    assert isinstance(ex, HltExit) and stops > 50
    assert machine.cpu.icount - start == _reference_count(asm(LOOP, CODE, 64))


def test_virtual_deadline_stops_at_the_first_block_boundary_past_it(machine):
    _boot64(machine, LOOP)
    cpu = machine.cpu
    cpu.run(cpu.icount + 10)                  # through the first block (setup + loop body)
    for step in (1, 5, 8, 13):
        deadline = cpu.icount + step
        ex = cpu.run(deadline)
        assert isinstance(ex, DeadlineExit)
        assert deadline <= cpu.icount < deadline + 4      # loop blocks hold 4 instructions


def test_virtual_deadline_already_reached_runs_nothing(machine):
    _boot64(machine, LOOP)
    cpu = machine.cpu
    before, rip = cpu.icount, cpu.regs.rip
    ex = cpu.run(before)
    assert isinstance(ex, DeadlineExit) and cpu.icount == before and cpu.regs.rip == rip


# ---------------------------------------------------------------- host clock
def test_host_clock_time_is_host_time(machine):
    cpu = machine.cpu
    origin = time.monotonic_ns()
    cpu.set_clock("host", origin)
    assert cpu.clock == "host"
    t0 = time.monotonic_ns() - origin
    a = cpu.icount
    time.sleep(0.01)
    b = cpu.icount
    t1 = time.monotonic_ns() - origin
    assert t0 <= a <= b <= t1 and b - a >= 10_000_000


def test_host_clock_deadline_stops_a_spinning_guest(machine):
    _boot64(machine, "l: inc rax\n jmp l")
    cpu = machine.cpu
    cpu.set_clock("host")
    t = time.monotonic()
    deadline = cpu.icount + 20_000_000           # 20 ms
    ex = cpu.run(deadline)
    wall = time.monotonic() - t
    assert isinstance(ex, DeadlineExit)
    assert cpu.icount >= deadline and cpu.native.icount >= deadline
    assert 0.015 < wall < 5
    assert cpu.regs.gpr[0] > 1000                # it ran


def test_host_clock_stops_never_repeat_a_store(machine):
    # Thousands of host-timer stops in a loop of read-modify-write stores: each
    # stop is taken at a block boundary, so no increment is lost or doubled.
    # (Unicorn's uc_emu_stop from another thread would sometimes restart the
    # ADD after its store and count it twice.)
    n = 300_000
    _boot64(machine, f"""
        mov rbx, {DATA:#x}
        mov ecx, {n}
    l:  add dword ptr [rbx], 1
        lock add dword ptr [rbx + 4], 2
        dec ecx
        jnz l
        hlt
    """)
    machine.cpu.set_clock("host")
    # The count of stops depends on how fast this (shared) machine runs the
    # loop and on when its timer thread gets a core: shorter host slices, then
    # more runs, until the loop was stopped often enough in all (every run must
    # count exactly).
    total = 0
    for slice_ns in (20_000, 5_000, 1_000, 1_000, 1_000, 1_000, 1_000):
        machine.mem.write(DATA, bytes(8))
        machine.cpu.set_rip(CODE)
        ex, stops = _run_to_exit(machine.cpu, slice_ns)
        assert isinstance(ex, HltExit)
        assert machine.u32(DATA) == n and machine.u32(DATA + 4) == 2 * n
        total += stops
        if total > 20:
            break
    assert total > 20


def test_host_clock_rdtsc_reads_host_time(machine):
    _boot64(machine, f"mov rbx, {DATA:#x}\n rdtsc\n mov [rbx], eax\n mov [rbx + 4], edx\n hlt")
    cpu = machine.cpu
    origin = time.monotonic_ns()
    cpu.set_clock("host", origin)
    before = time.monotonic_ns() - origin
    ex, _ = _run_to_exit(cpu, 1_000_000_000)
    after = time.monotonic_ns() - origin
    assert isinstance(ex, HltExit)
    tsc = machine.u64(DATA)
    offset = cpu.native.tsc_offset
    assert before + offset <= tsc <= after + offset


def test_switching_back_to_the_virtual_clock_counts_again(machine):
    _boot64(machine, LOOP)
    cpu = machine.cpu
    cpu.set_clock("host")
    cpu.set_clock("virtual")
    start = cpu.icount
    ex, _ = _run_to_exit(cpu, 1 << 40)
    assert isinstance(ex, HltExit)
    assert cpu.icount - start == _reference_count(asm(LOOP, CODE, 64))


def test_unknown_clock_is_refused(machine):
    from vmlab.vmm.vm import Vm
    with pytest.raises(ConfigError):
        machine.cpu.set_clock("tsc")
    with pytest.raises(ConfigError):
        Vm(16 << 20, serial=None, clock="tsc")


def test_vm_host_clock_max_insns_is_a_time_budget():
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    vm = Vm(16 << 20, serial=None, clock="host")
    try:
        code = asm("l: inc rax\n jmp l", CODE, 64)
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=CODE, flat_mode="long64"))
        t = time.monotonic()
        res = vm.run(max_insns=50_000_000)       # 50 ms of host time, from the last exit (here: Vm creation)
        assert res.reason == "limit"
        assert res.icount >= 50_000_000 and time.monotonic() - t < 5
    finally:
        vm.close()


def test_host_clock_block_logs_still_see_blocks():
    import io
    from vmlab.emu.loaders import load
    from vmlab.vmm.log import DebugLog
    from vmlab.vmm.vm import Vm
    out = io.StringIO()
    vm = Vm(16 << 20, serial=None, log=DebugLog.parse("in_asm", out), clock="host")
    try:
        code = asm("mov ecx, 3\n l: dec ecx\n jnz l\n mov al, 0\n out 0xf4, al", CODE, 64)
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=CODE, flat_mode="long64"))
        assert vm.run(max_insns=1_000_000_000).reason == "debug-exit"
        assert "IN: [long cpl=0 phys=0x100000]" in out.getvalue()
    finally:
        vm.close()


# ---------------------------------------------------------------- guests on both clocks
@pytest.mark.parametrize("clock", ["virtual", "host"])
@pytest.mark.parametrize("guest", ["smc.asm", "modes.asm", "timer.asm"])
def test_guest_passes_on_both_clocks(guest, clock):
    from vmlab.emu.loaders import load
    from vmlab.tools.asm import build
    from vmlab.vmm.vm import Vm
    vm = Vm(64 << 20, serial=None, clock=clock)
    try:
        vm.load(load(str(build(ROOT / "guests" / guest)), ram_size=64 << 20))
        res = vm.run(max_insns=2_000_000_000 if clock == "virtual" else 60_000_000_000, timeout=120)
        text = vm.serial_output.decode(errors="replace")
        assert "PASS" in text and "FAIL" not in text and "DONE" in text, text
        assert res.reason == "debug-exit" and res.status == 1, res
    finally:
        vm.close()


@pytest.mark.parametrize("option", [["--clock", "host"], ["--wall-clock"]])
def test_cli_clock_host_runs_the_smc_guest(option):
    cmd = [sys.executable, "-m", "vmlab.tools", "run", str(ROOT / "guests" / "smc.asm"), "--timeout", "120"] + option
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stdout.decode()[-500:], p.stderr.decode()[-500:])
    assert b"FAIL" not in p.stdout and b"DONE" in p.stdout

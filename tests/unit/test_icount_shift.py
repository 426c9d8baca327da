"""Virtual time rate: QEMU's -icount shift=N (one instruction = 2^N ns of
virtual time), issue 11 Deliver item 7.  The TSC, the timers and --max-insns
follow it; the default (shift 0: 1 instruction = 1 ns) is unchanged."""
import pathlib
import subprocess
import sys

import pytest

from vmlab.emu.errors import ConfigError
from vmlab.emu.loaders import load
from tests.support import asm
from vmlab.vmm.vm import Vm

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = 0x100000
#: spin until the TSC has advanced 2^SPAN (rbx counts the iterations, 6 instructions each)
SPIN = ("rdtsc; shl rdx, 32; or rax, rdx; mov rsi, rax; mov rdi, 1; shl rdi, {span}; add rsi, rdi; xor ebx, ebx\n"
        "l: inc rbx\n rdtsc\n shl rdx, 32\n or rax, rdx\n cmp rax, rsi\n jb l\n mov al, 0\n out 0xf4, al")


def _spin(shift: int, span: int = 22):
    code = asm(SPIN.format(span=span), BASE, 64)
    with Vm(16 << 20, serial=None, icount_shift=shift) as vm:
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=BASE, flat_mode="long64"))
        res = vm.run(max_insns=50_000_000)
        assert res.reason == "debug-exit", res
        return vm.vcpu.refresh().gpr[3], res.icount


@pytest.mark.parametrize("shift", [0, 3, 7, 10])
def test_icount_shift_tsc_spin_needs_2_to_the_shift_fewer_iterations(shift):
    iters, icount = _spin(shift)
    # each iteration is 6 instructions = 6 << shift ns; the TSC counts ns (1 GHz)
    expect = (1 << 22) / (6 << shift)
    assert abs(iters - expect) <= 2, (iters, expect)
    assert icount >= 1 << 22


def test_icount_shift_default_is_one_instruction_per_ns():
    with Vm(16 << 20, serial=None) as vm:
        assert vm.vcpu.icount_shift == 0
    iters, _ = _spin(0, span=16)
    assert abs(iters - (1 << 16) / 6) <= 2


def test_icount_shift_max_insns_still_counts_instructions():
    code = asm("l: inc rax\n jmp l", BASE, 64)
    with Vm(16 << 20, serial=None, icount_shift=5) as vm:
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=BASE, flat_mode="long64"))
        t0 = vm.vcpu.native.icount
        res = vm.run(max_insns=100_000)
        assert res.reason == "limit"
        n = vm.vcpu.refresh().gpr[0]
        assert 49_000 <= n <= 51_000                     # 2 instructions per iteration
        assert abs((res.icount - t0) - (100_000 << 5)) <= 64 << 5


def test_icount_shift_pit_output_comes_2_to_the_shift_times_sooner_in_instructions():
    """The 8254 counts virtual time: with shift 4, a mode-0 count of 1 ms ends
    after 1/16 of the instructions (its OUT bit read back through the
    read-back command, Intel 8254 data sheet "Read-Back Command")."""
    def polls(shift):
        # channel 0, lobyte/hibyte, mode 0, count 1193 (1 ms at 1.193182 MHz);
        # between polls a 2000-instruction delay loop
        code = asm("mov al, 0x30; out 0x43, al; mov al, 0xa9; out 0x40, al; mov al, 0x04; out 0x40, al; "
                   "xor ebx, ebx\n"
                   "l: inc rbx\n mov ecx, 1000\n d: dec ecx\n jnz d\n mov al, 0xe2\n out 0x43, al\n "
                   "in al, 0x40\n test al, 0x80\n jz l\n mov al, 0\n out 0xf4, al", BASE, 64)
        with Vm(16 << 20, serial=None, icount_shift=shift) as vm:
            vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=BASE, flat_mode="long64"))
            assert vm.run(max_insns=50_000_000).reason == "debug-exit"
            return vm.vcpu.refresh().gpr[3]
    a, b = polls(0), polls(4)
    assert 400 < a < 600 and abs(a / b - 16) < 1.0, (a, b)


def test_icount_shift_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError):
        Vm(16 << 20, serial=None, icount_shift=11)
    with pytest.raises(ConfigError):
        Vm(16 << 20, serial=None, icount_shift=2, clock="host")


@pytest.mark.parametrize("value,ok", [("shift=7", True), ("3", True), ("shift=11", False), ("auto", False),
                                      ("shift=2,sleep=off", False)])
def test_cli_icount_shift_values_run_or_give_status_2(value, ok):
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", "guests/hello.asm", "--serial", "none",
                        "-icount", value], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 1, p.stderr
    else:
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr

"""The debugger on an ELF64 kernel built with gcc: its symbol table gives
`b helper` and `func+off` addresses (issue: symbols from ELF kernels)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

KERNEL_C = r"""
static volatile int counter;
void helper(int n) { counter += n; }
void kmain(void) {
    for (int i = 0; i < 3; i++) helper(i);
    __asm__ volatile("movb $0, %%al; outb %%al, $0xf4" ::: "al");
    for (;;) __asm__ volatile("hlt");
}
"""


@pytest.fixture(scope="module")
def elf_kernel(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("elfkernel")
    (d / "k.c").write_text(KERNEL_C)
    subprocess.run(["gcc", "-O1", "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-mno-red-zone",
                    "-fno-asynchronous-unwind-tables", "-Wl,-Ttext=0x200000", "-Wl,-e,kmain", "-o", str(d / "k.elf"),
                    str(d / "k.c")], check=True, capture_output=True, timeout=60)
    return d / "k.elf"


def test_debugger_elf_symbols_break_on_a_function_and_print_func_plus_offset(elf_kernel):
    script = "b helper\nc\ninfo symbol $pc\nc\nx/2i $pc\ninfo breakpoints\nquit\n"
    proc = subprocess.run([sys.executable, "-m", "vmlab.tools", "debug", str(elf_kernel), "--format", "elf64", "--batch"],
                          input=script, capture_output=True, text=True, timeout=60)
    out = proc.stdout
    assert "Breakpoint 1 at 0x200000 <helper>" in out, out + proc.stderr
    assert "Breakpoint 1, 0x0000000000200000 in helper ()" in out
    assert "helper in section .text" in out
    assert "<helper+" in out                       # the second instruction, named by offset
    assert "breakpoint already hit 2 times" in out
    assert "in kmain ()" in out                    # the entry point, named

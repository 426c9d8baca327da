"""Test support: a VM wrapper, inline assembly, descriptor builders."""
from __future__ import annotations

import struct

from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks


def asm(text: str, base: int, bits: int = 32) -> bytes:
    ks = Ks(KS_ARCH_X86, {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}[bits])
    enc, _ = ks.asm(text, base)
    return bytes(enc)


def prelude32(gdt: int, idt: int, stack: int, tr: int, gdt_limit: int = 0x2F, idt_limit: int = 0x7FF) -> str:
    """32-bit protected-mode prelude: load GDTR/IDTR, reload CS (0x08) and the
    data segments (0x10), set ESP and TR, continue at the label ``start``."""
    return f"""
    lgdt [gdtr]
    lidt [idtr]
    mov eax, reload_cs
    push 0x08
    push eax
    retf
reload_cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, {stack:#x}
    mov ax, {tr:#x}
    ltr ax
    jmp start
gdtr: .word {gdt_limit:#x}
      .long {gdt:#x}
idtr: .word {idt_limit:#x}
      .long {idt:#x}
start:
"""


def prelude64(gdt: int, idt: int, stack: int, gdt_limit: int, idt_limit: int = 0xFFF, tr: int | None = None) -> str:
    """64-bit prelude (the loader is in long mode already): load GDTR and IDTR,
    TR if given, set RSP, continue at the label ``start``."""
    ltr = f"    mov ax, {tr:#x}\n    ltr ax\n" if tr is not None else ""
    return f"""
    lgdt [rip + gdtr]
    lidt [rip + idtr]
{ltr}    mov rsp, {stack:#x}
    jmp start
gdtr: .word {gdt_limit:#x}
      .quad {gdt:#x}
idtr: .word {idt_limit:#x}
      .quad {idt:#x}
start:
"""


def seg_desc(base: int, limit: int, access: int, flags: int) -> int:
    """A GDT descriptor quadword (SDM Vol. 3A 3.4.5): access byte, flags nibble (G D/B L AVL)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) | (((limit >> 16) & 0xF) << 48)
            | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gate32(offset: int, selector: int, kind: int = 0xE, dpl: int = 0, present: bool = True) -> bytes:
    hi = (offset & 0xFFFF0000) | ((0x80 if present else 0) | (dpl << 5) | kind) << 8
    return struct.pack("<II", (selector << 16) | (offset & 0xFFFF), hi)


def gate64(offset: int, selector: int, kind: int = 0xE, dpl: int = 0, ist: int = 0, present: bool = True) -> bytes:
    return gate32(offset & 0xFFFFFFFF, selector, kind, dpl, present)[:4] + struct.pack(
        "<I", (offset & 0xFFFF0000) | (((0x80 if present else 0) | (dpl << 5) | kind) << 8) | ist
    ) + struct.pack("<II", offset >> 32, 0)


class Machine:
    """A Vm plus helpers for inline-assembly tests."""

    def __init__(self, ram=16 << 20, **vm_args):
        from vmlab.vmm.vm import Vm
        self.vm = Vm(ram, serial=None, **vm_args)
        self.mem = self.vm.mem
        self.cpu = self.vm.vcpu

    def close(self) -> None:
        """Free the Vm (engine, native state, guest RAM); idempotent."""
        self.vm.close()

    def boot(self, code: bytes, addr: int, mode: str):
        from vmlab.emu.loaders import load
        self.vm.load(load(code, fmt="flat", ram_size=self.mem.size, flat_addr=addr, flat_mode=mode))

    def run(self, **kw):
        kw.setdefault("max_insns", 5_000_000)
        return self.vm.run(**kw)

    def u32(self, addr):
        return self.mem.read_u32(addr)

    def u64(self, addr):
        return self.mem.read_u64(addr)

    @property
    def serial(self) -> bytes:
        return bytes(self.vm.serial_output)




def lean_or_general(g, lean: bool) -> list:
    """Make a VmxGuest take its fast-path exits the run loop's lean way,
    counted in the returned one-element list, or force the general path
    (``record``: lean_exit declines recorded runs)."""
    taken = [0]
    if lean:
        real = g.lean_exit

        def counting(word):
            taken[0] += 1
            return real(word)
        g.lean_exit = counting
    else:
        g.record = True
    return taken

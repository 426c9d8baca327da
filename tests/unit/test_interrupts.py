"""External interrupts: PIT through the 8259 PIC, the LAPIC timer, self-IPI,
HLT waking on an interrupt in virtual time, STI interrupt shadow."""
import struct

from support import asm, gate32, seg_desc

CODE, IDT, GDT, COUNT = 0x100000, 0x20000, 0x30000, 0x32000

PRELUDE = f"""
    lgdt [gdtr]
    lidt [idtr]
    mov eax, reload
    push 0x08
    push eax
    retf
reload:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x90000
    jmp start
gdtr: .word 0x17
      .long {GDT:#x}
idtr: .word 0x7ff
      .long {IDT:#x}
start:
"""
PIC_INIT = """
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
"""


def setup(machine, body, handlers):
    gdt = [0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC)]
    machine.mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
    addr = 0x180000
    for vec, text in handlers.items():
        code = asm(text, addr, 32)
        machine.mem.write(addr, code)
        machine.mem.write(IDT + 8 * vec, gate32(addr, 0x08))
        addr += 0x100
    machine.boot(asm(PRELUDE + body, CODE, 32), CODE, "protected32")


def test_pit_irq0_through_pic_counts_ticks_while_halted(machine):
    body = PIC_INIT + f"""
    mov al, 0xfe          # unmask IRQ0 only
    out 0x21, al
    mov al, 0x34          # channel 0, lobyte/hibyte, mode 2
    out 0x43, al
    mov ax, 1193          # ~1 kHz
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
wait:
    hlt
    cmp dword ptr [{COUNT:#x}], 10
    jb wait
    cli
    mov al, 0
    out 0xf4, al
"""
    irq0 = f"inc dword ptr [{COUNT:#x}]\n push eax\n mov al, 0x20\n out 0x20, al\n pop eax\n iretd"
    setup(machine, body, {0x20: irq0})
    res = machine.run(max_insns=10_000_000)
    assert res.reason == "debug-exit", res
    assert machine.u32(COUNT) == 10
    # 10 ticks of 1193/1193182 s each: ~10 ms of virtual time (1 insn = 1 ns)
    assert 9_000_000 <= res.icount <= 12_000_000


def test_lapic_periodic_timer_and_self_ipi(machine):
    body = f"""
    mov ebx, 0xfee00000
    mov dword ptr [ebx + 0xf0], 0x1ff        # SVR: enable, spurious 0xff
    mov dword ptr [ebx + 0x3e0], 0xb         # divide by 1
    mov dword ptr [ebx + 0x320], 0x20040     # LVT timer: periodic, vector 0x40
    mov dword ptr [ebx + 0x380], 100000      # initial count: 100 us
    sti
wait:
    hlt
    cmp dword ptr [{COUNT:#x}], 5
    jb wait
    cli
    mov dword ptr [ebx + 0x320], 0x10000     # mask the timer
    mov dword ptr [ebx + 0x300], 0x40041     # ICR: self, fixed, vector 0x41
    sti                                      # the IPI is taken after HLT starts
    hlt
    cli
    mov al, 0
    out 0xf4, al
"""
    lapic_eoi = "mov dword ptr [0xfee000b0], 0\n iretd"
    setup(machine, body, {0x40: f"inc dword ptr [{COUNT:#x}]\n " + lapic_eoi,
                          0x41: f"add dword ptr [{COUNT + 4:#x}], 1\n " + lapic_eoi})
    res = machine.run(max_insns=10_000_000)
    assert res.reason == "debug-exit", res
    assert machine.u32(COUNT) == 5
    assert machine.u32(COUNT + 4) == 1


def test_sti_hlt_wakes_and_returns_after_hlt(machine):
    """`sti; hlt` with an interrupt already pending: the STI shadow lets HLT start,
    the interrupt wakes it, and IRET returns after the HLT (not onto it)."""
    body = PIC_INIT + f"""
    mov al, 0xfe
    out 0x21, al
    mov al, 0x30          # channel 0, mode 0 (one-shot), lobyte/hibyte
    out 0x43, al
    mov al, 10
    out 0x40, al
    mov al, 0
    out 0x40, al
    mov ecx, 1000
spin: dec ecx
    jnz spin              # the one-shot fires while IF=0
    sti
    hlt
    cli
    mov al, byte ptr [{COUNT:#x}]
    out 0xf4, al
"""
    irq0 = f"inc dword ptr [{COUNT:#x}]\n mov al, 0x20\n out 0x20, al\n iretd"
    setup(machine, body, {0x20: irq0})
    res = machine.run(max_insns=1_000_000)
    assert res.reason == "debug-exit", res
    assert res.status == 3

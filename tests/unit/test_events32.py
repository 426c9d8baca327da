"""Event delivery in 32-bit protected mode: gates, frames, error codes, privilege
change through the TSS, #DF and triple fault (SDM Vol. 3A ch. 6, 7.2)."""
import struct

from support import asm, gate32, seg_desc, prelude32

CODE = 0x100000
GDT, IDT, TSS = 0x30000, 0x20000, 0x31000
SAVE = 0x32000         # handlers store ESP here, then exit
K_STACK, U_STACK = 0x90000, 0x80000

# Selectors: 0x08 ring-0 code, 0x10 ring-0 data, 0x1b ring-3 code, 0x23 ring-3 data, 0x28 TSS
PRELUDE = prelude32(GDT, IDT, K_STACK, 0x28)
HANDLER = 0x180000
HANDLER_CODE = f"mov dword ptr [{SAVE:#x}], esp\n mov al, 0\n out 0xf4, al\n hlt"


def setup(machine, body: str, gates=None):
    code = asm(PRELUDE + body, CODE, 32)
    gdt = [0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC),
           seg_desc(0, 0xFFFFF, 0xFA, 0xC), seg_desc(0, 0xFFFFF, 0xF2, 0xC),
           seg_desc(TSS, 0x67, 0x89, 0x0)]
    machine.mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
    tss = bytearray(0x68)
    struct.pack_into("<II", tss, 4, K_STACK, 0x10)       # ESP0, SS0
    struct.pack_into("<H", tss, 0x66, 0x68)              # no I/O bitmap
    machine.mem.write(TSS, bytes(tss))
    handler = HANDLER
    machine.mem.write(HANDLER, asm(HANDLER_CODE, HANDLER, 32))
    for vec, kw in (gates or {}).items():
        machine.mem.write(IDT + 8 * vec, gate32(handler, 0x08, **kw))
    machine.boot(code, CODE, "protected32")
    return handler


def frame(machine, n):
    esp = machine.u32(SAVE)
    return [machine.u32(esp + 4 * i) for i in range(n)]


def test_int_n_interrupt_gate_pushes_eip_after_and_clears_if(machine):
    setup(machine, "sti\n int 0x30\n hlt", {0x30: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, eflags = frame(machine, 3)
    assert cs == 0x08
    assert eflags & 0x200                      # IF was set before the INT
    assert machine.cpu.regs.rflags & 0x200 == 0  # interrupt gate cleared IF
    code = machine.mem.read(eip - 2, 2)
    assert code == b"\xcd\x30"


def test_divide_error_is_a_fault_with_eip_at_div(machine):
    setup(machine, "xor ecx, ecx\n mov eax, 5\n div ecx\n hlt", {0: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, _ = frame(machine, 3)
    assert machine.mem.read(eip, 2) == b"\xf7\xf1"   # div ecx


def test_gp_error_code_is_the_bad_selector(machine):
    setup(machine, "mov ax, 0x63\n mov ds, ax\n hlt", {13: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    ec, eip, cs, _ = frame(machine, 4)
    assert ec == 0x60
    assert machine.mem.read(eip, 3) == b"\x66\x8e\xd8"   # mov ds, ax


def test_ring3_int_switches_to_tss_stack_and_iret_returns(machine):
    body = f"""
    push 0x23
    push {U_STACK:#x}
    pushfd
    push 0x1b
    mov eax, ring3
    push eax
    iretd
ring3:
    mov eax, 0x1234
    int 0x30
    hlt
"""
    setup(machine, body, {0x30: {"dpl": 3}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, eflags, esp, ss = frame(machine, 5)
    assert cs == 0x1b and ss == 0x23 and esp == U_STACK
    assert machine.u32(SAVE) == K_STACK - 20         # 5 dwords pushed on the ring-0 stack
    assert machine.cpu.cpl == 0


def test_ring3_int_through_dpl0_gate_raises_gp_with_idt_error_code(machine):
    body = f"""
    push 0x23
    push {U_STACK:#x}
    pushfd
    push 0x1b
    mov eax, ring3
    push eax
    iretd
ring3:
    int 0x31
    hlt
"""
    setup(machine, body, {0x31: {"dpl": 0}, 13: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    ec = frame(machine, 1)[0]
    assert ec == 0x31 * 8 + 2


def test_not_present_de_gate_gives_double_fault_with_error_code_zero(machine):
    setup(machine, "xor ecx, ecx\n div ecx\n hlt", {0: {"present": False}, 8: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    ec = frame(machine, 1)[0]
    assert ec == 0


def test_empty_idt_triple_faults(machine):
    setup(machine, "xor ecx, ecx\n div ecx\n hlt", {})
    res = machine.run()
    assert res.reason == "shutdown"
    assert "triple fault" in res.message


def test_page_fault_sets_cr2_and_error_code(machine):
    # Identity-map the first 4 MiB with a 4 MiB PSE page, leave 4-8 MiB unmapped.
    pd = 0x10000
    machine.mem.write(pd, struct.pack("<I", 0x00000083))
    body = f"""
    mov eax, cr4
    or eax, 0x10
    mov cr4, eax
    mov eax, {pd:#x}
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov ebx, 0x401234
    mov eax, [ebx]
    hlt
"""
    setup(machine, body, {14: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    ec, eip, cs, _ = frame(machine, 4)
    assert ec == 0                      # not present, read, supervisor
    assert machine.cpu.regs.cr2 == 0x401234
    assert machine.mem.read(eip, 2) == b"\x8b\x03"


def test_ud2_raises_ud_with_eip_at_the_instruction(machine):
    setup(machine, "nop\n ud2\n hlt", {6: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, _ = frame(machine, 3)
    assert machine.mem.read(eip, 2) == b"\x0f\x0b"


def test_int3_is_a_trap_with_eip_after_it(machine):
    setup(machine, "int3\n hlt", {3: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, _ = frame(machine, 3)
    assert machine.mem.read(eip - 1, 1) == b"\xcc"


def test_into_with_overflow_raises_of_after_the_instruction(machine):
    setup(machine, "mov al, 0x7f\n add al, 1\n into\n hlt", {4: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    eip, cs, _ = frame(machine, 3)
    assert machine.mem.read(eip - 1, 1) == b"\xce"


def test_trap_gate_keeps_if_set(machine):
    setup(machine, "sti\n int 0x30\n hlt", {0x30: {"kind": 0xF}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    assert machine.cpu.regs.rflags & 0x200

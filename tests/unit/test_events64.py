"""Event delivery in IA-32e mode: 64-bit gates, IST, RSP0 on privilege change,
16-byte stack alignment, error codes (SDM Vol. 3A 6.14)."""
import struct

from support import asm, gate64, prelude64, seg_desc

CODE = 0x100000
HANDLER = 0x180000
GDT, IDT, TSS = 0x30000, 0x20000, 0x31000
SAVE = 0x32000
K_STACK, U_STACK, IST1 = 0x90000, 0x80000, 0xA0008     # IST1 deliberately not 16-aligned

PRELUDE = prelude64(GDT, IDT, K_STACK, 0x37, tr=0x28)
HANDLER_CODE = f"mov qword ptr [{SAVE:#x}], rsp\n mov al, 0\n out 0xf4, al\n hlt"


def setup(machine, body, gates):
    # 0x08 code64 ring 0, 0x10 data ring 0, 0x1b code64 ring 3, 0x23 data ring 3, 0x28 TSS (16 bytes)
    gdt = [0, seg_desc(0, 0xFFFFF, 0x9A, 0xA), seg_desc(0, 0xFFFFF, 0x92, 0xC),
           seg_desc(0, 0xFFFFF, 0xFA, 0xA), seg_desc(0, 0xFFFFF, 0xF2, 0xC),
           seg_desc(TSS, 0x67, 0x89, 0x0), 0]
    machine.mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, K_STACK)       # RSP0
    struct.pack_into("<Q", tss, 0x24, IST1)       # IST1
    machine.mem.write(TSS, bytes(tss))
    machine.mem.write(HANDLER, asm(HANDLER_CODE, HANDLER, 64))
    for vec, kw in gates.items():
        machine.mem.write(IDT + 16 * vec, gate64(HANDLER, 0x08, **kw))
    machine.boot(asm(PRELUDE + body, CODE, 64), CODE, "long64")


def make_user_accessible(machine, pde: int = 0):
    """Set U/S on the loader's identity map for one 2 MiB page (PML4E, PDPTE and
    PDE ``pde``; the first by default)."""
    pml4 = machine.cpu.regs.cr3 & ~0xFFF
    e = machine.u64(pml4)
    machine.mem.write_int(pml4, 8, e | 4)
    pdpt = e & 0xFFFFFFFFF000
    e = machine.u64(pdpt)
    machine.mem.write_int(pdpt, 8, e | 4)
    pd = e & 0xFFFFFFFFF000
    machine.mem.write_int(pd + 8 * pde, 8, machine.u64(pd + 8 * pde) | 4)


def _smap_to_ring3(user_code: int, user_stack: int, iopl3: bool = False) -> str:
    """Set CR4.SMAP, then IRETQ to ring 3 at user_code (IOPL 3 if asked)."""
    iopl = "    or qword ptr [rsp], 0x3000\n" if iopl3 else ""
    return f"""
    mov rax, cr4
    bts rax, 21                                     # CR4.SMAP
    mov cr4, rax
    push 0x23
    push {user_stack:#x}
    pushfq
{iopl}    push 0x1b
    push {user_code:#x}
    iretq
"""


def make_second_2m_user(machine):
    """User code and stack go in the second 2 MiB page, while the first (GDT,
    IDT, TSS, kernel stack) stays supervisor (SMAP forbids implicit supervisor
    accesses to user pages)."""
    make_user_accessible(machine, pde=1)


def frame(machine, n):
    rsp = machine.u64(SAVE)
    return rsp, [machine.u64(rsp + 8 * i) for i in range(n)]


def test_long_mode_int_pushes_five_qwords_aligned(machine):
    setup(machine, "sub rsp, 8\n int 0x40\n hlt", {0x40: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    rsp, (rip, cs, rflags, old_rsp, ss) = frame(machine, 5)
    assert cs == 0x08 and old_rsp == K_STACK - 8
    assert (rsp + 40) % 16 == 0                  # frame starts 16-byte aligned
    assert machine.mem.read(rip - 2, 2) == b"\xcd\x40"


def test_ist_handler_runs_on_ist_stack(machine):
    setup(machine, "int3\n hlt", {3: {"ist": 1}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    rsp, (rip, cs, rflags, old_rsp, ss) = frame(machine, 5)
    assert rsp == (IST1 & ~0xF) - 40
    assert old_rsp == K_STACK
    assert machine.mem.read(rip - 1, 1) == b"\xcc"


def test_long_mode_gp_error_code_for_bad_selector(machine):
    setup(machine, "mov ax, 0x7b\n mov ds, ax\n hlt", {13: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    _, (ec, rip, cs, rflags, old_rsp, ss) = frame(machine, 6)
    assert ec == 0x78


def test_ring3_to_ring0_uses_rsp0_and_null_ss(machine):
    body = f"""
    mov rax, ring3
    push 0x23
    push {U_STACK:#x}
    pushfq
    push 0x1b
    push rax
    iretq
ring3:
    int 0x40
    hlt
"""
    setup(machine, body, {0x40: {"dpl": 3}})
    make_user_accessible(machine)
    res = machine.run()
    assert res.reason == "debug-exit", res
    rsp, (rip, cs, rflags, old_rsp, ss) = frame(machine, 5)
    assert cs == 0x1b and ss == 0x23 and old_rsp == U_STACK
    assert rsp == K_STACK - 40
    assert machine.cpu.cpl == 0
    assert machine.cpu.regs.seg[2].selector == 0     # SS is NULL after the switch


def test_page_fault_user_fetch_from_supervisor_page_has_p_u(machine):
    # The loader's identity map is supervisor-only: a ring-3 store faults with P|W|U.
    body = f"""
    mov rax, ring3
    push 0x23
    push {U_STACK:#x}
    pushfq
    push 0x1b
    push rax
    iretq
ring3:
    mov qword ptr [0x5008], rax
    hlt
"""
    setup(machine, body, {14: {}})
    res = machine.run()
    # The user code itself sits on a supervisor page, so the first fault is the
    # fetch after IRETQ: P|U, and no I/D bit since neither NXE nor SMEP is on (SDM 4.7).
    assert res.reason == "debug-exit", res
    _, (ec, rip, cs, *_) = frame(machine, 4)
    assert ec == 0x5
    assert cs == 0x1b
    assert machine.cpu.regs.cr2 == rip


def test_non_canonical_data_access_is_gp_and_stack_access_is_ss(machine):
    setup(machine, "mov rbx, 0x8000000000000000\n mov rax, [rbx]\n hlt", {13: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res
    _, (ec, rip, *_) = frame(machine, 2)
    assert ec == 0 and machine.mem.read(rip, 3) == b"\x48\x8b\x03"


def test_non_canonical_rbp_access_is_ss(machine):
    setup(machine, "mov rbp, 0x8000000000000000\n mov rax, [rbp]\n hlt", {12: {}})
    res = machine.run()
    assert res.reason == "debug-exit", res


def test_page_fault_in_user_code_under_smap_reports_cr2(machine):
    """A data #PF in ring-3 code with CR4.SMAP set: the CR2 decoder reads the
    faulting instruction as the CPU fetched it (a user fetch), not as an
    implicit supervisor read, which SMAP forbids on a user page (SDM Vol. 3A
    4.6.1); that read used to fault inside vmlab and end the run with a
    Python traceback."""
    target = 0x0000_7000_0000_1238                   # no PML4 entry: not present
    user_code, user_stack = 0x200000, 0x280000       # the second 2 MiB page: user; the first stays supervisor
    setup(machine, _smap_to_ring3(user_code, user_stack), {14: {}})
    machine.mem.write(user_code, asm(f"mov rbx, {target:#x}\n mov qword ptr [rbx], rax\n hlt", user_code, 64))
    make_second_2m_user(machine)
    machine.mem.write(HANDLER, asm(f"mov rax, cr2\n mov qword ptr [{SAVE + 8:#x}], rax\n" + HANDLER_CODE,
                                   HANDLER, 64))
    res = machine.run()
    assert res.reason == "debug-exit", res
    _, (ec, rip, cs, *_) = frame(machine, 4)
    assert machine.u64(SAVE + 8) == target
    assert ec == 0x6 and cs == 0x1b and rip == user_code + 10   # not present, write, user (SDM 4.7)


def test_port_io_in_user_code_under_smap_reaches_the_device(machine):
    """Ring-3 OUT with IOPL 3 and CR4.SMAP set: the block's trap sites are
    found by reading its bytes as a user fetch; read as an implicit supervisor
    access (SMAP forbids it on a user page) the block went unclassified and
    Unicorn ran the OUT itself, so the debug-exit port never saw it."""
    user_code, user_stack = 0x200000, 0x280000
    setup(machine, _smap_to_ring3(user_code, user_stack, iopl3=True), {})
    machine.mem.write(user_code, asm("mov al, 0x21\n out 0xf4, al\n hlt", user_code, 64))
    make_second_2m_user(machine)
    res = machine.run()
    assert res.reason == "debug-exit" and res.status == (0x21 << 1) | 1, res
    assert machine.cpu.cpl == 3

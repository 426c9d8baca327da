"""Hardware task switches (SDM Vol. 3A chapter 8): through an IDT task gate
(emu/taskswitch.py, vmlab's own delivery) and through JMP/CALL that Unicorn
starts and vmlab finishes once paging is on (native/hooks.c stops at the fill).
guests/tasks.asm covers the whole set on vmlab and QEMU; these pin the fault
paths after the point of no return (Table 8-2: in the new task's context)."""
import struct

from support import asm, gate32, seg_desc, prelude32

CODE, GDT, IDT = 0x100000, 0x30000, 0x20000
TSS_A, TSS_B = 0x31000, 0x31100
SAVE = 0x32000
PD, PT = 0x40000, 0x41000
STACK_A, STACK_B = 0x90000, 0x80000
# A fault after the point of no return is delivered with the new task's SS
# still an empty cache (a 16-bit stack at base 0): give such tasks a stack
# below 64 KiB so that the frame lands where ESP says.
STACK_LOW = 0x8000
HANDLER = 0x180000
# Selectors: 0x08 code, 0x10 data, 0x18 TSS A (current), 0x20 TSS B, 0x28 not-present code
PRELUDE = prelude32(GDT, IDT, STACK_A, 0x18)
# The handler records ESP, TR and the first dword on its stack, then exits.
HANDLER_CODE = f"""
    mov dword ptr [{SAVE:#x}], esp
    str ax
    mov word ptr [{SAVE + 4:#x}], ax
    mov eax, [esp]
    mov dword ptr [{SAVE + 8:#x}], eax
    pushfd
    pop eax
    mov dword ptr [{SAVE + 12:#x}], eax
    mov al, 0
    out 0xf4, al
    hlt
"""


def tss(eip, esp, cs=0x08, ss=0x10, ds=0x10, ldt=0, cr3=0):
    t = bytearray(0x68)
    struct.pack_into("<III", t, 0x1C, cr3, eip, 2)
    struct.pack_into("<I", t, 0x38, esp)
    struct.pack_into("<6I", t, 0x48, ds, cs, ss, ds, ds, ds)
    struct.pack_into("<HH", t, 0x60, ldt, 0)
    struct.pack_into("<H", t, 0x66, 0x68)
    return bytes(t)


def setup(machine, body, tss_b, gates=None):
    gdt = [0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC),
           seg_desc(TSS_A, 0x67, 0x89, 0), seg_desc(TSS_B, 0x67, 0x89, 0),
           seg_desc(0, 0xFFFFF, 0x1A, 0xC)]       # 0x28: code, P = 0
    machine.mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
    machine.mem.write(TSS_A, tss(0, 0))
    machine.mem.write(TSS_B, tss_b)
    machine.mem.write(HANDLER, asm(HANDLER_CODE, HANDLER, 32))
    for vec, g in (gates or {}).items():
        machine.mem.write(IDT + 8 * vec, g)
    machine.boot(asm(PRELUDE + body, CODE, 32), CODE, "protected32")


def saved(machine):
    tr = struct.unpack("<H", machine.mem.read(SAVE + 4, 2))[0]
    return machine.u32(SAVE), tr, machine.u32(SAVE + 8), machine.u32(SAVE + 12)


def test_fault_through_a_task_gate_pushes_its_error_code_on_the_new_task_stack(machine):
    # #GP(0x60) (a bad DS load) through an IDT task gate: task B starts at the
    # handler with its own stack, the error code on it (SDM Vol. 3A 6.12.2).
    setup(machine, "mov ax, 0x63\n mov ds, ax\n hlt", tss(HANDLER, STACK_B),
          {13: gate32(0, 0x20, kind=0x5)})
    res = machine.run()
    assert res.reason == "debug-exit", res
    esp, tr, top, flags = saved(machine)
    assert (esp, tr, top) == (STACK_B - 4, 0x20, 0x60)
    assert flags & 0x4000                                 # NT: a nested task
    assert struct.unpack("<H", machine.mem.read(TSS_B, 2))[0] == 0x18   # back link
    assert machine.mem.read(GDT + 0x18 + 5, 1)[0] & 2     # the old task stays busy
    assert machine.mem.read(GDT + 0x20 + 5, 1)[0] & 2     # the new one is busy
    eip = machine.u32(TSS_A + 0x20)
    assert machine.mem.read(eip, 3) == b"\x66\x8e\xd8"    # saved EIP: the faulting MOV


def test_bad_ldt_in_the_new_tss_is_ts_in_the_new_task(machine):
    # Table 8-2: an LDT selector with TI = 1 -> #TS(selector), taken after the
    # switch (TR is the new task's); EXT = 0 for INT n.
    setup(machine, "int 0x30\n hlt", tss(0x1234, STACK_LOW, ldt=0x44),
          {0x30: gate32(0, 0x20, kind=0x5), 10: gate32(HANDLER, 0x08)})
    res = machine.run()
    assert res.reason == "debug-exit", res
    esp, tr, top, _ = saved(machine)
    assert tr == 0x20 and top == 0x44


def _paging_on_then_jmp_to_tss(machine) -> str:
    """Identity-map the first 4 MiB at PD/PT; the guest body turns paging on
    and far-jumps to the TSS at selector 0x20."""
    machine.mem.write(PD, struct.pack("<I", PT | 3))
    machine.mem.write(PT, b"".join(struct.pack("<I", (i << 12) | 3) for i in range(1024)))
    return f"""
    mov eax, {PD:#x}
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    .byte 0xea
    .long 0
    .word 0x20
    hlt
"""


def test_not_present_code_segment_in_a_jmp_target_with_paging_is_np_in_the_new_task(machine):
    # JMP to a TSS with paging on: Unicorn starts the switch, the TLB-fill hook
    # stops it after the CR3 load and emu/taskswitch.finish_native loads the
    # segments: CS not present -> #NP(CS selector) in the new task's context.
    body = _paging_on_then_jmp_to_tss(machine)
    setup(machine, body, tss(0x1234, STACK_LOW, cs=0x28, cr3=PD), {11: gate32(HANDLER, 0x08)})
    res = machine.run()
    # The #NP is delivered with the new task's CS (0x28, not present) loaded as a
    # selector only; the handler runs through the IDT gate's own CS.
    assert res.reason == "debug-exit", res
    esp, tr, top, _ = saved(machine)
    assert tr == 0x20 and top == 0x28
    assert machine.mem.read(GDT + 0x18 + 5, 1)[0] & 2 == 0   # JMP: the old task is not busy


def test_jmp_to_a_tss_with_paging_resumes_at_the_new_eip_once(machine):
    # The Unicorn 2.1.4 trap this guards against: the JMP re-executed in the new
    # task (#GP(0x20), the TSS now busy) instead of running the new task.
    body = _paging_on_then_jmp_to_tss(machine)
    setup(machine, body, tss(HANDLER, STACK_B, cr3=PD), {13: gate32(0x1000, 0x08)})
    res = machine.run()
    assert res.reason == "debug-exit", res
    esp, tr, _, flags = saved(machine)
    assert (esp, tr) == (STACK_B, 0x20) and not flags & 0x4000


def test_int_through_a_task_gate_to_a_16_bit_tss(machine):
    # 16-bit TSS (SDM Vol. 3A 8.6, Figure 8-11): type 1, limit >= 2BH; IP at 0EH,
    # FLAGS 10H, AX..DI 12H-20H, ES CS SS DS 22H-28H, LDT 2AH.  The back link is
    # at 0 as in a 32-bit TSS; the old (32-bit) task is saved in its own layout.
    t = bytearray(0x2C)
    struct.pack_into("<HH", t, 0x0E, HANDLER & 0xFFFF, 2)
    struct.pack_into("<8H", t, 0x12, 0x1111, 0, 0, 0, 0x8000, 0, 0, 0)
    struct.pack_into("<5H", t, 0x22, 0x10, 0x08, 0x10, 0x10, 0)
    setup(machine, "mov eax, 0xabcd0000\n int 0x30\n hlt", bytes(t), {0x30: gate32(0, 0x20, kind=0x5)})
    # TSS B as a 16-bit TSS at a 64 KiB-addressable IP: the handler must sit below 64 KiB.
    low = 0x7000
    machine.mem.write(low, asm(HANDLER_CODE, low, 32))
    struct.pack_into("<H", t, 0x0E, low)
    machine.mem.write(TSS_B, bytes(t))
    machine.mem.write(GDT + 0x20, struct.pack("<Q", seg_desc(TSS_B, 0x2B, 0x81, 0)))
    res = machine.run()
    assert res.reason == "debug-exit", res
    esp, tr, _, flags = saved(machine)
    assert tr == 0x20 and flags & 0x4000
    assert esp & 0xFFFF == 0x8000
    assert struct.unpack("<H", machine.mem.read(TSS_B, 2))[0] == 0x18
    assert machine.u32(TSS_A + 0x28) == 0xABCD0000            # the old task's EAX, 32-bit layout


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tss_bytes=st.binary(min_size=0x68, max_size=0x68), limit=st.integers(0, 0x200),
       access=st.sampled_from([0x89, 0x81, 0x8B, 0x09, 0x85, 0xE9]),
       via=st.sampled_from(["int", "jmp-paging", "call"]))
def test_random_task_state_never_escapes_as_a_traceback(tss_bytes, limit, access, via):
    # A hostile TSS (random registers, selectors, LDT, EFLAGS incl. VM, CR3) behind
    # a random descriptor, reached through an IDT task gate (vmlab's switch), a
    # JMP with paging on (Unicorn's switch finished by vmlab) or a CALL: the run
    # ends with a guest-visible outcome or a one-line refusal, never an internal error.
    from support import Machine
    machine = Machine()
    try:
        _random_task(machine, tss_bytes, limit, access, via)
    finally:
        machine.close()


def _random_task(machine, tss_bytes, limit, access, via):
    machine.mem.write(PD, struct.pack("<I", PT | 3))
    machine.mem.write(PT, b"".join(struct.pack("<I", (i << 12) | 3) for i in range(1024)))
    t = bytearray(tss_bytes)
    struct.pack_into("<I", t, 0x1C, PD if via == "jmp-paging" else struct.unpack_from("<I", t, 0x1C)[0])
    paging = f"mov eax, {PD:#x}\n mov cr3, eax\n mov eax, cr0\n or eax, 0x80000000\n mov cr0, eax\n"
    body = {"int": "int 0x30\n hlt", "jmp-paging": paging + ".byte 0xea\n .long 0\n .word 0x20\n hlt",
            "call": ".byte 0x9a\n .long 0\n .word 0x20\n hlt"}[via]
    setup(machine, body, bytes(t), {0x30: gate32(0, 0x20, kind=0x5)})
    machine.mem.write(GDT + 0x20, struct.pack("<Q", seg_desc(TSS_B, limit, access, 0)))
    res = machine.run(max_insns=50_000, timeout=10)
    assert res.reason in {"debug-exit", "halted", "shutdown", "limit", "timeout", "error"}, res
    if res.reason == "error":
        assert res.message and "internal error" not in res.message and "unknown" not in res.message, res.message

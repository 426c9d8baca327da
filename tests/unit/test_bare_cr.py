"""MOV to/from CR0, CR3 and CR4 outside VMX non-root operation, completed in C
(Vcpu.bare_policy: vmlab_cr_value and the run going on inside vmlab_run_exit)
against the Python path (emu/sensitive.py emulate_cr): a 64-bit guest writes
hypothesis-drawn values, a #GP handler counts the refused ones and skips them,
and every value read back, the fault count and the final state must be the same
both ways."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from support import Machine, asm, gate64, prelude64, seg_desc

CODE, HANDLER = 0x100000, 0x180000
GDT, IDT, SAVE = 0x30000, 0x20000, 0x40000
FAULTS = SAVE - 8

#: CR0 bits a kernel toggles (MP, EM, TS, NE, WP, AM, NW, CD) and bits that fault
#: or go to Python (PE/PG changes, bits 63:32, NW without CD)
CR0_BITS = [1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1, 1 << 31, 1 << 32]
#: CR4 bits: VME PVI TSD DE PGE PCE OSFXSR OSXMMEXCPT UMIP FSGSBASE SMEP SMAP,
#: PAE (clearing it in IA-32e mode is #GP), PCIDE and LA57 (to Python), reserved bits
CR4_BITS = [1, 2, 4, 8, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 16, 1 << 20, 1 << 21,
            1 << 5, 1 << 17, 1 << 12, 1 << 15, 1 << 30, 1 << 40]
#: CR3: the loader's tables with PWT/PCD, a bit 63 (no-flush, not kept), bits past MAXPHYADDR (#GP)
CR3_BITS = [1 << 3, 1 << 4, 1 << 63, 1 << 45, 1 << 52]

HANDLER_CODE = f"""
    add rsp, 8                              # the #GP's error code
    add qword ptr [rsp], 3                  # past the 3-byte MOV to CR
    inc qword ptr [{FAULTS:#x}]
    iretq
"""


def _body(ops) -> str:
    lines = [f"mov qword ptr [{FAULTS:#x}], 0"]
    for i, (cr, flips) in enumerate(ops):
        lines += [f"mov rax, cr{cr}", f"mov rbx, {flips:#x}", "xor rax, rbx",
                  f"mov cr{cr}, rax",              # 0F 22 /r: 3 bytes, as the handler skips
                  f"mov rcx, cr{cr}", f"mov qword ptr [{SAVE + 8 * i:#x}], rcx"]
    return "\n".join(lines) + "\n    mov al, 0\n    out 0xf4, al\n    hlt\n"


def _boot(handler: str, vector: int, body: str, native: bool) -> Machine:
    """A 64-bit machine running ``body`` with ``handler`` at IDT ``vector``
    and MOV CR completed in C or not."""
    m = Machine()
    gdt = [0, seg_desc(0, 0xFFFFF, 0x9A, 0xA), seg_desc(0, 0xFFFFF, 0x92, 0xC)]
    m.mem.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
    m.mem.write(HANDLER, asm(handler, HANDLER, 64))
    m.mem.write(IDT + 16 * vector, gate64(HANDLER, 0x08))
    m.boot(asm(prelude64(GDT, IDT, 0x90000, 0x17) + body, CODE, 64), CODE, "long64")
    m.cpu.bare_policy.cr_emulate = 1 if native else 0
    return m


def _run(ops, native: bool):
    m = _boot(HANDLER_CODE, 13, _body(ops), native)
    try:
        res = m.run()
        r = m.cpu.refresh()
        state = (res.reason, [m.u64(SAVE + 8 * i) for i in range(len(ops))], m.u64(FAULTS),
                 r.cr0, r.cr3, r.cr4, r.rip, r.rflags, list(r.gpr), m.cpu.native.icount)
        return state, m.cpu.bare_policy.cr_emulated
    finally:
        m.close()


def _flips(bits):
    return st.lists(st.sampled_from(bits), max_size=3).map(lambda bs: sum(set(bs)))


OPS = st.lists(st.one_of(st.tuples(st.just(0), _flips(CR0_BITS)), st.tuples(st.just(3), _flips(CR3_BITS)),
                         st.tuples(st.just(4), _flips(CR4_BITS))), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_c_completes_mov_cr_as_the_python_path_does(ops):
    native, completed = _run(ops, True)
    python, none = _run(ops, False)
    assert native == python
    assert none == 0


def test_the_common_writes_never_reach_python():
    """A kernel's TLB flush by CR3 rewrite and TS/PGE toggles: completed in C
    (each MOV to and from CR counts), and the values read back are the writes."""
    ops = [(3, 0), (0, 1 << 3), (4, 1 << 7), (3, 1 << 3), (0, 1 << 3), (4, 1 << 7)]
    state, completed = _run(ops, True)
    assert state[0].name == "DEBUG_EXIT" and state[2] == 0
    assert completed == 3 * len(ops)            # every MOV from and to CR of the body (3 an op)


@pytest.mark.parametrize("cr, flips", [(0, 1 << 32), (4, 1 << 15), (4, 1 << 5), (3, 1 << 52)])
def test_refused_writes_fault_both_ways(cr, flips):
    """Reserved bits (CR0 63:32, CR4 bit 15), CR4.PAE cleared in IA-32e mode,
    CR3 bits past MAXPHYADDR: #GP(0) (SDM Vol. 2B MOV; Vol. 3A 2.5), the
    register unchanged, whichever path ran."""
    native, _ = _run([(cr, flips)], True)
    python, _ = _run([(cr, flips)], False)
    assert native == python and native[2] == 1


DB_HANDLER = f"""
    mov rax, qword ptr [rsp]                # the saved RIP: right after the stepped instruction
    mov qword ptr [{SAVE:#x}], rax
    and qword ptr [rsp + 16], ~0x100        # TF off in the saved RFLAGS
    iretq
"""


def _single_step_mov_cr3(native: bool):
    body = """
        mov rbx, cr3
        pushfq
        or qword ptr [rsp], 0x100
        popfq                               # TF: #DB after the next instruction
        mov cr3, rbx
    after:
        nop
        lea rcx, [rip + after]
        mov al, 0
        out 0xf4, al
        hlt
    """
    m = _boot(DB_HANDLER, 1, body, native)
    try:
        res = m.run()
        return res.reason, m.u64(SAVE), m.cpu.refresh().gpr[1]
    finally:
        m.close()


def test_a_single_stepped_mov_cr_still_traps_after_it():
    """RFLAGS.TF: the #DB comes after the MOV to CR3 (SDM Vol. 3A 17.3.1.4),
    so a MOV CR under TF is not completed in C (the trap would be lost)."""
    native = _single_step_mov_cr3(True)
    assert native == _single_step_mov_cr3(False)
    reason, saved_rip, after = native
    assert reason.name == "DEBUG_EXIT" and saved_rip == after

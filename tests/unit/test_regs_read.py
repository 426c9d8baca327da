"""The bulk register read (native vmlab_regs_read): the fields it takes in
place from the live CPUX86State (GPRs, RIP, RFLAGS from QEMU's lazy flags,
CR0-CR4, CR8, GDTR, IDTR, EFER, DR0-DR7, FS/GS base, KERNEL_GS_BASE; offsets
checked by emu/qemu_state.py's self-test) against its twin, the same read through Unicorn's API (``ctx_cr`` = 0 selects it), on
register values drawn by hypothesis and left by a guest's own arithmetic (the
flags QEMU keeps lazily) and segment loads."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from unicorn import x86_const as X

from support import Machine, asm
from vmlab.emu.native import ffi, lib

CODE = 0x10000
u64 = st.integers(0, (1 << 64) - 1)
canonical = st.one_of(st.integers(0, (1 << 47) - 1), st.integers((1 << 64) - (1 << 47), (1 << 64) - 1))


def _both(cpu):
    """(direct, API) reads of the register file as bytes."""
    v = cpu.native
    direct, via_api = ffi.new("vmlab_regs *"), ffi.new("vmlab_regs *")
    assert lib.vmlab_regs_read(v, cpu._uch, direct) == 0
    saved, v.ctx_cr = v.ctx_cr, 0
    try:
        assert lib.vmlab_regs_read(v, cpu._uch, via_api) == 0
    finally:
        v.ctx_cr = saved
    return bytes(ffi.buffer(direct)), bytes(ffi.buffer(via_api))


@settings(max_examples=40, deadline=None)
@given(gprs=st.lists(u64, min_size=16, max_size=16), op=st.sampled_from(["add", "sub", "imul", "xor", "shl", "sar"]),
       df=st.booleans(), cr2=u64, drs=st.lists(canonical, min_size=4, max_size=4), dr7=st.integers(0, 0xFF),
       gdtr=st.tuples(canonical, st.integers(0, 0xFFFF)), idtr=st.tuples(canonical, st.integers(0, 0xFFFF)),
       fs=canonical, gs=canonical, kgs=canonical, cr8=st.integers(0, 15))
def test_direct_register_read_matches_the_api(gprs, op, df, cr2, drs, dr7, gdtr, idtr, fs, gs, kgs, cr8):
    m = Machine()
    try:
        cpu, uc = m.cpu, m.cpu.uc
        shift = op in ("shl", "sar")
        body = f"{'std' if df else 'cld'}\n {op} rax, {'cl' if shift else 'rbx'}\n hlt"
        m.boot(asm(body, CODE, 64), CODE, "long64")
        cpu.refresh()
        ids = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX, X.UC_X86_REG_RSP,
               X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_R8, X.UC_X86_REG_R9,
               X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14,
               X.UC_X86_REG_R15)
        for reg, val in zip(ids, gprs):
            uc.reg_write(reg, val)
        uc.reg_write(X.UC_X86_REG_CR2, cr2)
        for reg, val in zip((X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3), drs):
            uc.reg_write(reg, val)
        uc.reg_write(X.UC_X86_REG_DR7, dr7 | 0x400)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, gdtr[0], gdtr[1], 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, idtr[0], idtr[1], 0))
        uc.reg_write(X.UC_X86_REG_FS_BASE, fs)
        uc.reg_write(X.UC_X86_REG_GS_BASE, gs)
        uc.reg_write(X.UC_X86_REG_MSR, (0xC0000102, kgs))
        uc.reg_write(X.UC_X86_REG_CR8, cr8)
        direct, via_api = _both(cpu)
        assert direct == via_api
        # After the guest's own arithmetic: the flags are QEMU's lazy ones.
        cpu.refresh()
        cpu.run(cpu.icount + 1000)
        direct, via_api = _both(cpu)
        assert direct == via_api
    finally:
        m.close()


def test_direct_register_read_follows_segment_loads_and_efer(machine):
    # A guest that changes what the API reads from the state itself: the
    # segment registers (FS/GS base), CR4, EFER.NXE and DR7.
    m = machine
    m.boot(asm("""
        mov ax, 0x10
        mov fs, ax
        mov rax, cr4
        or rax, 0x200
        mov cr4, rax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x800
        wrmsr
        mov rax, 0x401
        mov dr7, rax
        hlt
    """, CODE, 64), CODE, "long64")
    cpu = m.cpu
    cpu.refresh()
    cpu.run(cpu.icount + 1000)
    direct, via_api = _both(cpu)
    assert direct == via_api

"""A MOV to/from CR0/CR3/CR4 that does not VM-exit, completed in C
(vmlab_cr_value and the run going on inside vmlab_run_exit) against its Python
twin (emu/fastpath.py cr_value) and against the Python path
(vmm/vmx_intercept.py _cr_access with NonRootIntercepts.native_cr off): the
same values, the same faults left to Python, the same VM exits and the same
final state."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from vmlab.emu import fastpath as fp
from vmlab.vmm.controls import PrimaryProcBasedControls as PP
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import close_guests, vmx_guest

U64 = st.one_of(st.sampled_from([0, 1, 0x20, 0x80000011, 0x80000031, 0x80050033, 0x620, 0x2620, 0x6E0,
                                 0xFFFFFFFF, 1 << 32, 1 << 63, (1 << 64) - 1]), st.integers(0, (1 << 64) - 1))


@st.composite
def policies(draw):
    return fp.Policy(cr_emulate=draw(st.integers(0, 1)), cr0_mask=draw(U64), cr0_shadow=draw(U64),
                     cr4_mask=draw(U64), cr4_shadow=draw(U64), cr4_valid=draw(U64),
                     maxphyaddr=draw(st.sampled_from([32, 36, 39, 40, 46, 52, 64])))


@settings(max_examples=2000)
@given(cr=st.sampled_from([0, 2, 3, 4, 8]), write=st.booleans(), src=U64, mode=st.sampled_from([16, 32, 64]),
       hflags=st.one_of(st.sampled_from([0, 3, 1 << 3, 1 << 15, (1 << 15) | (1 << 14)]), st.integers(0, 0xFFFF)),
       cr0=U64, cr3=U64, cr4=U64, efer=st.sampled_from([0, 1 << 8, (1 << 8) | (1 << 10), 0xD01]),
       cs_flags=st.sampled_from([0, 1 << 21, 0xFFFFFFFF]), policy=policies())
def test_cr_value_c_and_python_agree(cr, write, src, mode, hflags, cr0, cr3, cr4, efer, cs_flags, policy):
    args = (cr, write, src, mode, hflags, cr0, cr3, cr4, efer, cs_flags, policy)
    assert fp.cr_value_native(*args) == fp.cr_value(*args)


GUEST = """
    mov ecx, 5
l:  mov rax, cr0
    xor eax, 8            ; TS: not owned -> no exit, completed in C
    mov cr0, rax
    xor eax, 2            ; MP: owned, differs from the shadow on odd rounds -> exit
    mov cr0, rax
    mov rbx, cr3
    mov cr3, rbx          ; no CR3-load exiting -> no exit
    mov rdx, cr4
    xor edx, 0x80         ; PGE
    mov cr4, rdx
    mov r8, cr4
    dec ecx
    jnz l
    vmcall
"""


def _run(native: bool, skip_only: bool):
    # CR4.VMXE owned with a shadow of 0 (the guest sees and writes back 0; the
    # harness's CPU model has no VMX, so a written VMXE = 1 would be #GP)
    g = vmx_guest(GUEST, fields={"CR0_GUEST_HOST_MASK": 2, "CR0_READ_SHADOW": 2,
                                 "CR4_GUEST_HOST_MASK": (1 << 9) | (1 << 13), "CR4_READ_SHADOW": 1 << 9})
    g.native_cr = native
    seen = []

    def handler(ex):
        seen.append((int(ex.reason), ex.qualification, ex.instruction_length))
        if ex.reason not in (ExitReason.CR_ACCESS,):
            ex.stop()                          # VMCALL (or anything unexpected: the comparison shows it)
        elif skip_only:
            ex.skip()
        else:
            ex.emulate()
    g.default_handler = handler
    ex = g.run()
    assert ex.reason == ExitReason.VMCALL, seen
    cpu = g.cpu
    cpu.refresh()
    r = cpu.regs
    out = (seen, list(r.gpr), r.rip, r.cr0, r.cr3, r.cr4, cpu.native.icount, g._fastpath.cr_emulated)
    g.close()
    return out


@settings(max_examples=4, deadline=None)
@given(skip_only=st.booleans())
def test_c_completes_mov_cr_as_the_python_path_does(skip_only):
    try:
        c, py = _run(True, skip_only), _run(False, skip_only)
    finally:
        close_guests()
    assert c[:-1] == py[:-1]
    assert c[-1] > 0 and py[-1] == 0          # C did complete some, the Python path none

"""The run loop's lean path (vmm.runloop, VmxGuest.lean_exit) against the
general path: the same guest under the same handler actions gives the same VM
exits (reason, qualification, length, exit-information fields, the machine
exit behind each), the same guest state and the same instruction count.

The general path is forced by ``record`` (lean_exit declines recorded runs).
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from support import lean_or_general
from vmlab.vmm import vmcs as F
from vmlab.vmm.controls import PrimaryProcBasedControls as PP
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import close_guests, vmx_guest
from vmlab.vmm.vmx import RunStopped

GUEST = """
    mov ecx, 6
l:  mov eax, ecx
    push rcx
    cpuid
    pop rcx
    out 0x80, al
    mov dx, 0x71
    in al, dx
    rdtsc
    mov rax, cr0
    or eax, 8
    mov cr0, rax
    mov rbx, cr3
    mov cr3, rbx
    dec ecx
    jnz l
    vmcall
"""
SKIP, EMULATE, SET_RAX, WRITE_RIP, STOP, INSPECT = range(6)


def _run(actions: list[int], lean: bool):
    # CR0.TS owned (read shadow 0) and CR3-load exiting: the MOV CR exits are
    # fast-path decisions too
    g = vmx_guest(GUEST, proc=(PP.UNCONDITIONAL_IO_EXITING | PP.RDTSC_EXITING | PP.CR3_LOAD_EXITING,
                               PP.USE_IO_BITMAPS), fields={"CR0_GUEST_HOST_MASK": 8, "CR0_READ_SHADOW": 0})
    seen, taken = [], lean_or_general(g, lean)

    def handler(ex):
        k = len(seen)
        act = actions[k % len(actions)]
        v = ex.vmcs
        rec = [int(ex.reason), ex.qualification, ex.instruction_length, repr(ex.machine_exit), act]
        if ex.reason == ExitReason.VMCALL:
            seen.append(rec)
            ex.stop()
            return
        if act == INSPECT:
            rec += [v.read(F.VM_EXIT_REASON), v.read(F.EXIT_QUALIFICATION), v.read(F.VM_EXIT_INSTRUCTION_LEN),
                    v.read(F.GUEST_RIP), v.read(F.GUEST_RSP), v.read(F.GUEST_RFLAGS)]
            ex.skip()
        elif act == EMULATE:
            ex.emulate()
        elif act == SET_RAX:
            ex.regs.rax = 0x1000 + k
            ex.skip()
        elif act == WRITE_RIP:
            v.write(F.GUEST_RIP, v.read(F.GUEST_RIP) + ex.instruction_length)
        elif act == STOP:
            ex.skip()
            ex.stop()
        else:
            ex.skip()
        seen.append(rec)
    g.default_handler = handler
    ends = []
    for _ in range(64):
        ex = g.run()
        ends.append(ex.result.reason if isinstance(ex, RunStopped) else int(ex.reason))
        if isinstance(ex, RunStopped) or ex.reason == ExitReason.VMCALL:
            break
    cpu = g.cpu
    cpu.refresh()
    state = (list(cpu.regs.gpr), cpu.regs.rip, cpu.regs.rflags, cpu.native.icount, g.vm.exit_count)
    out = (seen, ends, state, taken[0])
    g.close()
    return out


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8))
def test_lean_path_matches_general_path(actions):
    try:
        lean_seen, lean_ends, lean_state, taken = _run(actions, lean=True)
        gen_seen, gen_ends, gen_state, _ = _run(actions, lean=False)
    finally:
        close_guests()
    assert lean_seen == gen_seen
    assert lean_ends == gen_ends
    assert lean_state == gen_state
    assert taken > 0                     # the lean path did run


def test_lean_exit_builds_the_machine_exit_of_the_decision():
    g = vmx_guest("mov eax, 1\n cpuid\n vmcall")
    try:
        got = []
        g.handler(ExitReason.CPUID)(lambda ex: (got.append(ex.machine_exit), ex.skip()))
        ex = g.run()
        assert ex.reason == ExitReason.VMCALL
        (mex,) = got
        assert (mex.rip, mex.insn_len, mex.reason, mex.qualification) == (0x100005, 2, int(ExitReason.CPUID), 0)
    finally:
        close_guests()


def test_kept_exits_keep_their_fields_and_unkept_ones_are_reused():
    # lean_exit reuses its exit object only when no one else holds it: a
    # handler that keeps every exit gets a new one each time, with its own
    # fields; one that keeps none gets the same object back.
    g = vmx_guest("mov ecx, 4\n l: mov eax, 1\n cpuid\n out 0x80, al\n dec ecx\n jnz l\n vmcall",
                  proc=(PP.UNCONDITIONAL_IO_EXITING, PP.USE_IO_BITMAPS))
    try:
        kept = []

        def keep(ex):
            kept.append(ex)
            ex.skip()
        g.handler(ExitReason.CPUID)(keep)
        g.handler(ExitReason.IO_INSTRUCTION)(keep)
        last = g.run()
        assert last.reason == ExitReason.VMCALL
        assert len({id(ex) for ex in kept}) == len(kept) == 8
        assert [(ex.reason, ex.instruction_length, ex.qualification) for ex in kept] == \
            [(ExitReason.CPUID, 2, 0), (ExitReason.IO_INSTRUCTION, 2, 0x800040)] * 4
        assert all(ex._skipped for ex in kept) and last not in kept

        g2 = vmx_guest("mov ecx, 4\n l: mov eax, 1\n cpuid\n dec ecx\n jnz l\n vmcall")
        ids = []

        def look(ex):
            ids.append(id(ex))
            ex.skip()
        g2.handler(ExitReason.CPUID)(look)
        assert g2.run().reason == ExitReason.VMCALL
        assert len(ids) == 4 and len(set(ids)) == 1
    finally:
        close_guests()

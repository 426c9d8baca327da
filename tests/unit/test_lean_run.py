"""The lean path's native call (vmlab_lean_run, native/hooks.c) against its
pure-Python twin (emu/lean.py), and what ends a stint of lean exits: a stop,
an NMI, an interrupt, host input or a timer that comes in from a handler must
be seen before the next run, as the general path sees it."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from vmlab.emu import lean
from vmlab.emu.native import lib
from vmlab.vmm import vmcs as F
from vmlab.vmm.controls import PinBasedControls as PIN
from vmlab.vmm.controls import PrimaryProcBasedControls as PP
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import close_guests, vmx_guest
from vmlab.vmm.runloop import StopReason
from vmlab.vmm.vmx import RunStopped

U64 = st.one_of(st.sampled_from([0, 1, 2, (1 << 63), (1 << 64) - 2, (1 << 64) - 1]), st.integers(0, (1 << 64) - 1))


@given(st.integers(0, 3), U64, U64, U64, U64)
def test_deadline_twin(attention, now, slice_, timer, limit):
    assert (lib.vmlab_lean_deadline(attention, now, slice_, timer, limit)
            == lean.lean_deadline(attention, now, slice_, timer, limit))


@given(st.integers(0, 0xFFFF), st.integers(0, 15), st.integers(0, (1 << 32) - 1))
def test_exit_word_round_trip(reason, length, qual):
    word = lean.exit_word(reason, length, qual)
    assert word >= lean.LEAN_EXIT
    assert lean.exit_fields(word) == (reason, length, qual)
    assert lean.exit_word(reason, length, 1 << 32) is None


LOOP = """
    mov ecx, 40
l:  mov eax, ecx
    push rcx
    cpuid
    pop rcx
    out 0x80, al
    mov dx, 0x1234
    in al, dx
    dec ecx
    jnz l
    hlt
"""


_EXIT_SLOTS = tuple(F.slot(e) for e in (F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN,
                                        F.VM_EXIT_INTR_INFO, F.IDT_VECTORING_INFO))


def _trace(runner, slice_: int, timer_at: int, limit_at: int):
    """Run LOOP under unconditional I/O exiting with ``runner`` as the native
    call, skipping each exit by hand; the sequence of answers and states."""
    g = vmx_guest(LOOP, proc=(PP.UNCONDITIONAL_IO_EXITING, PP.USE_IO_BITMAPS))
    try:
        first = g.run()                  # no handlers: the first CPUID comes back
        assert first.reason == ExitReason.CPUID
        cpu = g.cpu
        ctx, v = cpu.lean, cpu.native
        ctx.f = g._fastpath
        now = v.icount
        ctx.slice, ctx.timer, ctx.limit = slice_, now + timer_at, now + limit_at
        cpu.regs.rip += 2
        out = []
        for _ in range(200):
            word = runner(ctx)
            # the exit-information fields the call wrote into the VMCS area
            fields = tuple(g.vmcs.mem[k] for k in _EXIT_SLOTS)
            out.append((word, cpu.regs.rip, v.icount - now, ctx.runs, ctx.err, fields))
            if word >= lean.LEAN_EXIT:
                cpu.regs.rip += lean.exit_fields(word)[1]
            elif word == lean.LOOK:
                if v.attention:
                    break
                ctx.timer = ctx.limit = lean.NEVER    # go on to the end
            else:
                break
        return out
    finally:
        close_guests()


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 400), st.integers(0, 600), st.integers(0, 900))
def test_lean_run_twin(slice_, timer_at, limit_at):
    native = _trace(lib.vmlab_lean_run, slice_, timer_at, limit_at)
    assert native == _trace(lean.lean_run, slice_, timer_at, limit_at)
    # each exit word's fields are in the VMCS area when the call returns
    # (SDM Vol. 3C 28.2.1, 28.2.5; no interruption or IDT-vectoring information)
    for word, *_, fields in native:
        if word >= lean.LEAN_EXIT:
            reason, length, qual = lean.exit_fields(word)
            assert fields == (reason, qual, length, 0, 0)


# ---------------------------------------------------------------- what ends a stint
CPUID_LOOP = """
    mov ecx, 50
l:  mov eax, 1
    push rcx
    cpuid
    pop rcx
    dec ecx
    jnz l
    vmcall
"""


def test_a_stop_from_a_handler_ends_the_run_at_once():
    g = vmx_guest(CPUID_LOOP)
    try:
        seen = []

        def on_cpuid(ex):
            seen.append(ex.guest.cpu.regs.rip)
            ex.skip()
            if len(seen) == 3:
                g.vm.stop("test stop")
        g.handler(ExitReason.CPUID)(on_cpuid)
        res = g.run()
        assert isinstance(res, RunStopped) and res.result.reason == StopReason.STOPPED
        assert len(seen) == 3
    finally:
        close_guests()


def test_an_interrupt_raised_by_a_handler_exits_before_the_next_instruction_runs_far():
    # External-interrupt exiting: the vector a handler delivers to the LAPIC
    # is a VM exit (reason 1) right after the CPUID it came from.
    g = vmx_guest(CPUID_LOOP, pin=(PIN.EXTERNAL_INTERRUPT_EXITING, 0))
    try:
        g.vm.lapic.write(0xF0, 4, 0x1FF)     # SVR: APIC software-enabled (SDM Vol. 3A 11.9)
        log = []

        def on_cpuid(ex):
            log.append(("cpuid", ex.guest.cpu.native.icount))
            ex.skip()
            if len(log) == 2:
                g.vm.lapic.deliver(0x40)

        def on_ext(ex):
            log.append(("ext", ex.guest.cpu.native.icount))
            ex.stop()
        g.handler(ExitReason.CPUID)(on_cpuid)
        g.handler(ExitReason.EXTERNAL_INTERRUPT)(on_ext)
        g.run()
        assert [k for k, _ in log] == ["cpuid", "cpuid", "ext"]
        assert log[2][1] == log[1][1]          # not one instruction later
    finally:
        close_guests()


def test_a_timer_armed_by_a_handler_fires_at_its_deadline():
    g = vmx_guest(CPUID_LOOP)
    try:
        vm = g.vm
        fired, armed = [], []
        t = vm.timers.timer(lambda deadline: fired.append(vm.vcpu.native.icount), "test")

        def on_cpuid(ex):
            ex.skip()
            if not armed:
                armed.append(vm.vcpu.native.icount + 20)
                t.arm(armed[0])
        g.handler(ExitReason.CPUID)(on_cpuid)
        ex = g.run()
        assert ex.reason == ExitReason.VMCALL
        # Each iteration is 6 instructions: the run stops at the first block
        # boundary at or after the deadline, not at the end of the slice.
        assert len(fired) == 1 and armed[0] <= fired[0] < armed[0] + 8
    finally:
        close_guests()


def test_host_input_posted_by_a_handler_reaches_the_uart_during_the_loop():
    g = vmx_guest(CPUID_LOOP)
    try:
        vm = g.vm
        queued = []

        def on_cpuid(ex):
            ex.skip()
            if not queued:
                vm.post_input(b"k")
                queued.append(True)
            elif len(queued) == 1:
                queued.append(len(vm.host_input))   # fed before this exit
        g.handler(ExitReason.CPUID)(on_cpuid)
        g.run()
        assert queued == [True, 0]
    finally:
        close_guests()

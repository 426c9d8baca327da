"""handle_exit and the outcome loop with made-up exits and a fake machine:
no Unicorn engine is started (the way Firecracker tests its vCPU loop)."""
from __future__ import annotations

import pytest

from vmlab.emu import x86
from vmlab.emu.cpu import EptFault, GuestFault
from vmlab.emu.events import Event
from vmlab.emu import exits as E
from vmlab.emu.exits import (CrExit, DeadlineExit, EptExit, ExceptionExit, HltExit, InternalErrorExit, IoExit,
                       IrqWindowExit, MmioExit, MsrExit, ShutdownExit, TrapExit, TrapKind)
from vmlab.vmm import runloop
from vmlab.vmm.runloop import (HALT, HANDLED, Deliver, Handled, Intercepted, Stop, StopReason, _apply, handle_exit,
                         platform)


class FakeRegs:
    rip = 0x1000
    rflags = 0x2


class FakeCpu:
    def __init__(self, cpl=0):
        self.regs = FakeRegs()
        self.cpl = cpl
        self.skipped = []
        self.invlpg = []

    def skip(self, n):
        self.skipped.append(n)

    def trap_exit_at(self, ex):
        return DeadlineExit(rip=ex.rip)


class FakeMachine:
    """The Machine interface of vmm.runloop, recording what it is asked to do."""

    def __init__(self, cpl=0, raise_on=None):
        self.vcpu = FakeCpu(cpl)
        self.intercept = None
        self.pending_stop = None
        self.calls = []
        self.raise_on = raise_on
        self.nmi_blocked = True
        self.delivered = []

    def _call(self, name, ex):
        self.calls.append((name, ex))
        if self.raise_on is not None and name == self.raise_on[0]:
            raise self.raise_on[1]

    def port_io(self, ex):
        self._call("port_io", ex)

    def mmio_access(self, ex):
        self._call("mmio_access", ex)

    def msr_access(self, ex):
        self._call("msr_access", ex)

    def cr_access(self, ex):
        self._call("cr_access", ex)

    def set_nmi_blocked(self, blocked):
        self.nmi_blocked = blocked

    def deliver(self, ev):
        self.delivered.append(ev)
        return HANDLED


class FakePolicy:
    single_step = False
    wants_irq_window = False

    def __init__(self, answer=None):
        self.answer = answer
        self.seen = []
        self.exits = []

    def intercept(self, ex):
        self.seen.append(ex)
        return self.answer(ex) if callable(self.answer) else self.answer

    def events(self):
        return None

    def deliver(self, ev):
        return Intercepted(("delivery-exit", ev))

    def on_exit(self, vmexit):
        self.exits.append(vmexit)
        return Stop(StopReason.VMEXIT, exit=vmexit)

    def deadline(self):
        return None


@pytest.mark.parametrize("ex,method", [
    (IoExit(rip=0x1000, insn_len=1, port=0x3F8, is_write=True, values=[0x41]), "port_io"),
    (MmioExit(rip=0x1000, insn_len=3, gpa=0xFEE00020, size=4), "mmio_access"),
    (MsrExit(rip=0x1000, insn_len=2, msr=0x1B), "msr_access"),
    (CrExit(rip=0x1000, insn_len=3, cr=0, access_type=0, value=0x11), "cr_access"),
])
def test_handle_exit_device_and_model_exits_go_to_the_platform_once(ex, method):
    m = FakeMachine()
    assert handle_exit(m, ex) is HANDLED
    assert m.calls == [(method, ex)]


def test_handle_exit_hlt_at_cpl0_skips_and_halts():
    m = FakeMachine()
    assert handle_exit(m, HltExit(rip=0x7C00, insn_len=1)) is HALT
    assert m.vcpu.skipped == [1]


def test_handle_exit_hlt_at_cpl3_is_general_protection():
    m = FakeMachine(cpl=3)
    out = handle_exit(m, HltExit(rip=0x7C00, insn_len=1))
    assert out == Deliver(Event(x86.GP, 0)) and m.vcpu.skipped == []


def test_handle_exit_exception_becomes_a_delivery_with_its_error_code_and_cr2():
    out = handle_exit(FakeMachine(), ExceptionExit(rip=0x10, vector=x86.PF, error_code=6, cr2=0xDEAD000))
    assert out == Deliver(Event(x86.PF, 6, cr2=0xDEAD000))


def test_handle_exit_software_interrupt_keeps_its_kind():
    out = handle_exit(FakeMachine(), ExceptionExit(rip=0x12, vector=0x80, software=True))
    assert isinstance(out, Deliver) and out.event.software and out.event.vector == 0x80


@pytest.mark.parametrize("ex", [DeadlineExit(rip=1), IrqWindowExit(rip=1)])
def test_handle_exit_time_and_window_exits_are_handled_without_side_effects(ex):
    m = FakeMachine()
    assert handle_exit(m, ex) is HANDLED and m.calls == []


def test_handle_exit_shutdown_stops_with_its_reason():
    out = handle_exit(FakeMachine(), ShutdownExit(rip=5, reason="triple fault"))
    assert out == Stop(StopReason.SHUTDOWN, "triple fault")


def test_handle_exit_internal_error_stops_with_error_and_rip():
    out = handle_exit(FakeMachine(), InternalErrorExit(rip=0x1234, message="Unicorn: boom"))
    assert out.reason is StopReason.ERROR and "boom" in out.message and "0x1234" in out.message


def test_handle_exit_iret_trap_unblocks_nmis():
    m = FakeMachine()
    assert handle_exit(m, TrapExit(rip=1, insn_len=1, kind=TrapKind.IRET)) is HANDLED
    assert m.nmi_blocked is False


def test_handle_exit_invpcid_without_the_feature_is_invalid_opcode():
    out = handle_exit(FakeMachine(), TrapExit(rip=1, insn_len=5, kind=TrapKind.INVPCID))
    assert out == Deliver(Event(x86.UD))


def test_handle_exit_trap_kind_the_platform_does_not_emulate_stops_with_error():
    out = handle_exit(FakeMachine(), TrapExit(rip=0x44, insn_len=2, kind=TrapKind.CPUID))
    assert out.reason is StopReason.ERROR and "cpuid" in out.message


def test_handle_exit_vmx_instruction_without_nested_vmx_is_invalid_opcode():
    out = handle_exit(FakeMachine(), TrapExit(rip=0x44, insn_len=3, kind=TrapKind.VMX))
    assert out == Deliver(Event(x86.UD))


def test_handle_exit_ept_exit_without_a_vmm_stops_with_error():
    out = handle_exit(FakeMachine(), EptExit(rip=3, gpa=0x5000))
    assert out.reason is StopReason.ERROR


def test_handle_exit_unknown_exit_class_is_never_dropped_silently():
    class Strange(E.Exit):
        __slots__ = ()
    out = handle_exit(FakeMachine(), Strange(rip=0x99))
    assert out.reason is StopReason.ERROR and "Strange" in out.message


def test_platform_handles_every_exit_class_of_emu_exits(monkeypatch):
    """The union is closed: no exit class of emu.exits reaches the fallback."""
    from vmlab.emu import taskswitch
    monkeypatch.setattr(taskswitch, "finish_native", lambda cpu: None)   # needs a real vCPU
    classes = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.Exit) and c is not E.Exit]
    assert len(classes) >= 12
    for cls in classes:
        kw = {"kind": TrapKind.IRET} if cls is TrapExit else {}
        out = platform(FakeMachine(), cls(rip=0x10, **kw))
        assert not (isinstance(out, Stop) and "unknown exit" in out.message), cls


def test_handle_exit_guest_fault_while_completing_becomes_that_fault():
    m = FakeMachine(raise_on=("msr_access", GuestFault(x86.GP, 0)))
    out = handle_exit(m, MsrExit(rip=0x20, insn_len=2, msr=0xDEAD, is_write=True))
    assert out == Deliver(Event(x86.GP, 0))


def test_handle_exit_page_fault_from_string_io_keeps_cr2():
    m = FakeMachine(raise_on=("port_io", GuestFault(x86.PF, 2, cr2=0x400000)))
    out = handle_exit(m, IoExit(rip=0x20, insn_len=1, string=True))
    assert out == Deliver(Event(x86.PF, 2, cr2=0x400000))


def test_platform_decodes_an_unintercepted_fast_path_exit_into_the_plain_one():
    out = platform(FakeMachine(), E.PolicyExit(rip=0x10, insn_len=2, reason=10, site=(0x10, 0x10, 0)))
    assert out is HANDLED          # FakeCpu decodes it into a DeadlineExit


def test_handle_exit_policy_is_consulted_first_and_its_exit_wins():
    m = FakeMachine()
    m.intercept = FakePolicy(answer=Intercepted("vmexit-io"))
    ex = IoExit(rip=1, insn_len=1, port=0x80)
    assert handle_exit(m, ex) == Intercepted("vmexit-io")
    assert m.intercept.seen == [ex] and m.calls == []


def test_handle_exit_policy_none_lets_the_platform_handle_it():
    m = FakeMachine()
    m.intercept = FakePolicy(answer=None)
    ex = IoExit(rip=1, insn_len=1, port=0x80)
    assert handle_exit(m, ex) is HANDLED and m.calls == [("port_io", ex)]


def test_handle_exit_fault_under_a_policy_goes_through_its_exception_decision():
    m = FakeMachine(raise_on=("msr_access", GuestFault(x86.GP, 0)))
    m.intercept = FakePolicy(answer=lambda ex: Intercepted(("bitmap", ex.vector)) if isinstance(ex, ExceptionExit)
                             else None)
    out = handle_exit(m, MsrExit(rip=0x30, insn_len=2, msr=0xDEAD))
    assert out == Intercepted(("bitmap", x86.GP))
    assert isinstance(m.intercept.seen[-1], ExceptionExit) and m.intercept.seen[-1].error_code == 0


def test_handle_exit_ept_fault_under_a_policy_becomes_an_ept_exit():
    m = FakeMachine(raise_on=("port_io", EptFault(0x9000, 0x1000, 0x181, False)))
    m.intercept = FakePolicy(answer=lambda ex: Intercepted(ex) if isinstance(ex, EptExit) else None)
    out = handle_exit(m, IoExit(rip=0x30, insn_len=1, string=True))
    assert isinstance(out, Intercepted) and out.exit.gpa == 0x9000 and out.exit.qualification == 0x181


def test_apply_delivery_that_becomes_a_vm_exit_reaches_the_handlers():
    m = FakeMachine()
    m.intercept = pol = FakePolicy()
    m.deliver = pol.deliver          # under VMX the machine delivers through the policy
    stop = _apply(m, Deliver(Event(x86.UD)))
    assert stop.reason is StopReason.VMEXIT and pol.exits == [("delivery-exit", Event(x86.UD))]


def test_apply_handled_and_halt_do_not_stop():
    m = FakeMachine()
    assert _apply(m, HANDLED) is None
    assert _apply(m, HALT) is HALT


def test_stop_reasons_are_the_documented_words():
    assert [r.value for r in StopReason] == ["debug-exit", "halted", "shutdown", "limit", "timeout", "error",
                                            "stopped", "reset", "poweroff", "vmexit", "breakpoint", "watchpoint", "step",
                                            "interrupted", "mode-change", "break-int", "break-exit"]
    assert StopReason.HALTED == "halted" and isinstance(Handled(), Handled)


def test_trap_kinds_match_the_native_bit_numbers():
    from vmlab.emu.cpu import TRAP_KINDS
    assert {k.value for k in TrapKind} == set(TRAP_KINDS)
    assert runloop.IDLE_LIMIT_NS > 0

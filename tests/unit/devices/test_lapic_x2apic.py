"""x2APIC mode and the TSC-deadline timer of devices.lapic (SDM Vol. 3A 11.12,
11.5.4.1), on the device alone; guests/x2apic.asm runs them through RDMSR/WRMSR."""
import itertools

import pytest
from hypothesis import given, strategies as st

from vmlab.devices.clock import ManualClock, TimerQueue
from vmlab.devices.lapic import APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_EXTD, LocalApic, X2ApicFault

BASE = 0xFEE00000
EN, EXTD = APIC_BASE_ENABLE, APIC_BASE_EXTD


class Machine:
    def __init__(self, x2apic=True, tsc=True):
        self.clock = ManualClock()
        self.timers = TimerQueue()
        self.tsc_offset = 1000
        self.apic = LocalApic(self.clock, self.timers, x2apic=x2apic,
                              tsc=(lambda: self.clock.now_ns() + self.tsc_offset) if tsc else None)

    def x2(self):
        self.apic.write_base_msr(BASE | EN | EXTD)
        self.apic.write_msr(0x80F, 0x1FF)

    def run_until(self, t):
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > t:
                break
            self.clock.set(max(deadline, self.clock.now_ns()))
            self.timers.run_expired(self.clock.now_ns())
        self.clock.set(t)


STATES = {"disabled": 0, "xapic": EN, "x2apic": EN | EXTD, "invalid": EXTD}
# Figure 11-28: the transitions that are valid (everything else from a valid
# state is #GP); the "invalid" state itself can never be written.
VALID = {("disabled", "disabled"), ("disabled", "xapic"), ("xapic", "xapic"), ("xapic", "disabled"),
         ("xapic", "x2apic"), ("x2apic", "x2apic"), ("x2apic", "disabled")}


@pytest.mark.parametrize("src,dst", list(itertools.product(["disabled", "xapic", "x2apic"], STATES)))
def test_x2apic_base_transitions_follow_figure_11_28(src, dst):
    m = Machine()
    if src == "disabled":
        m.apic.write_base_msr(BASE)
    elif src == "x2apic":
        m.apic.write_base_msr(BASE | EN | EXTD)
    assert m.apic.base_transition_ok(BASE | STATES[dst]) == ((src, dst) in VALID)


def test_without_x2apic_extd_is_never_a_valid_write():
    m = Machine(x2apic=False)
    assert not m.apic.base_transition_ok(BASE | EN | EXTD)
    assert m.apic.base_transition_ok(BASE | EN)


def test_x2apic_msrs_fault_in_xapic_mode():
    m = Machine()
    with pytest.raises(X2ApicFault):
        m.apic.read_msr(0x802)
    with pytest.raises(X2ApicFault):
        m.apic.write_msr(0x808, 0)


@pytest.mark.parametrize("msr", [0x800, 0x801, 0x804, 0x809, 0x80B, 0x80C, 0x80E, 0x83F, 0x83A, 0x8FF])
def test_reads_of_absent_or_write_only_x2apic_msrs_fault(msr):
    m = Machine()
    m.x2()
    with pytest.raises(X2ApicFault):
        m.apic.read_msr(msr)


@pytest.mark.parametrize("msr,value", [(0x802, 0), (0x803, 0), (0x80A, 0), (0x80D, 0), (0x810, 0), (0x839, 0),
                                       (0x808, 0x100), (0x80B, 1), (0x828, 1), (0x83F, 0x100),
                                       (0x808, 1 << 32), (0x832, 1 << 19), (0x80F, 1 << 12)])
def test_writes_to_read_only_msrs_or_with_reserved_bits_fault(msr, value):
    m = Machine()
    m.x2()
    with pytest.raises(X2ApicFault):
        m.apic.write_msr(msr, value)


def test_self_ipi_and_icr_deliver_to_this_apic():
    m = Machine()
    m.x2()
    m.apic.write_msr(0x83F, 0x40)
    assert m.apic.pending_vector() == 0x40
    m.apic.acknowledge(0x40)
    m.apic.write_msr(0x80B, 0)
    m.apic.write_msr(0x830, (0 << 32) | 0x41)           # physical destination x2APIC ID 0
    assert m.apic.pending_vector() == 0x41
    m.apic.acknowledge(0x41)
    m.apic.write_msr(0x830, (5 << 32) | 0x42)           # another x2APIC ID
    assert m.apic.pending_vector() is None
    assert m.apic.read_msr(0x830) == (5 << 32) | 0x42
    m.apic.write_msr(0x830, (0xFFFFFFFF << 32) | 0x43)  # broadcast (11.12.9)
    assert m.apic.irr >> 0x43 & 1


@given(st.integers(0, 0xFFFFF))
def test_logical_x2apic_id_is_derived_from_the_id(x2id):
    m = Machine()
    m.apic.initial_apic_id = x2id
    m.x2()
    ldr = m.apic.read_msr(0x80D)
    assert ldr >> 16 == x2id >> 4 and ldr & 0xFFFF == 1 << (x2id & 0xF)


def test_tsc_deadline_fires_once_at_the_deadline_and_reads_zero_after():
    m = Machine()
    m.x2()
    m.apic.write_msr(0x832, (2 << 17) | 0x50)
    m.apic.write_tsc_deadline(1000 + 5000)            # TSC = now + 1000
    assert m.apic.read_tsc_deadline() == 6000
    m.run_until(4999)
    assert m.apic.pending_vector() is None
    m.run_until(5000)
    assert m.apic.pending_vector() == 0x50
    assert m.apic.read_tsc_deadline() == 0


def test_tsc_deadline_outside_its_mode_is_ignored_and_a_mode_change_disarms():
    m = Machine()
    m.x2()
    m.apic.write_tsc_deadline(10_000)
    assert m.apic.read_tsc_deadline() == 0              # one-shot mode: write ignored
    m.apic.write_msr(0x832, (2 << 17) | 0x50)
    m.apic.write_tsc_deadline(10_000)
    m.apic.write_msr(0x838, 77)                         # initial count ignored in this mode
    assert m.apic.read_msr(0x838) == 0 and m.apic.read_msr(0x839) == 0
    m.apic.write_msr(0x832, 0x50)                       # back to one-shot: disarmed
    m.run_until(20_000)
    assert m.apic.pending_vector() is None


def test_without_tsc_the_deadline_mode_bit_is_reserved():
    m = Machine(tsc=False)
    m.x2()
    with pytest.raises(X2ApicFault):
        m.apic.write_msr(0x832, (2 << 17) | 0x50)


def test_leaving_x2apic_mode_through_disabled_resets_the_apic():
    m = Machine()
    m.x2()
    m.apic.write_msr(0x808, 0x40)
    m.apic.write_base_msr(BASE)
    m.apic.write_base_msr(BASE | EN)
    assert m.apic.tpr == 0 and not m.apic.x2apic_mode


def test_msr_model_routes_x2apic_msrs_only_when_advertised():
    from vmlab.emu.cpuid import CpuidModel
    from vmlab.emu.msr import MsrFault
    from vmlab.vmm.vm import Vm
    vm = Vm(16 << 20, serial=None, cpuid=CpuidModel(x2apic=False, tsc_deadline=False))
    try:
        assert not vm.cpuid.leaf1()[2] >> 21 & 1 and not vm.cpuid.leaf1()[2] >> 24 & 1
        for msr in (0x802, 0x6E0):
            with pytest.raises(MsrFault):
                vm.msrs.read(msr)
        with pytest.raises(MsrFault):
            vm.msrs.write(0x1B, BASE | APIC_BASE_BSP | EN | EXTD)
    finally:
        vm.close()
    vm = Vm(16 << 20, serial=None)
    try:
        vm.msrs.write(0x1B, BASE | APIC_BASE_BSP | EN | EXTD)
        assert vm.msrs.read(0x802) == 0 and vm.lapic.x2apic_mode
        with pytest.raises(MsrFault):
            vm.msrs.write(0x1B, BASE | APIC_BASE_BSP | EN)      # x2APIC -> xAPIC
    finally:
        vm.close()

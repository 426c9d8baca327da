"""Tests of devices.lapic through MMIO at 0xFEE00000 with a fake clock."""

from hypothesis import given, settings, strategies as st

from vmlab.devices.bus import MMIO_LIMIT, Bus
from vmlab.devices.clock import ManualClock, TimerQueue
from vmlab.devices.lapic import APIC_DEFAULT_BASE, LocalApic

BASE = 0xFEE00000
ID, VER, TPR, APR, PPR, EOI, LDR, DFR, SVR = (0x20, 0x30, 0x80, 0x90, 0xA0,
                                              0xB0, 0xD0, 0xE0, 0xF0)
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LO, ICR_HI = 0x300, 0x310
LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF = 0x2F0, 0x320, 0x330, 0x340
LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x350, 0x360, 0x370
TIMER_ICR, TIMER_CCR, TIMER_DCR = 0x380, 0x390, 0x3E0


class Machine:
    def __init__(self, apic_id=0):
        self.clock = ManualClock()
        self.timers = TimerQueue()
        self.nmis = []
        self.apic = LocalApic(self.clock, self.timers, apic_id=apic_id,
                              nmi=lambda: self.nmis.append(1))
        self.bus = Bus("mmio", MMIO_LIMIT)
        self.bus.register(APIC_DEFAULT_BASE, 0x1000, self.apic, "lapic")

    def rd(self, off, size=4):
        return self.bus.read(BASE + off, size)

    def wr(self, off, value, size=4):
        self.bus.write(BASE + off, size, value)

    def enable(self, spurious=0xFF):
        self.wr(SVR, 0x100 | spurious)

    def run_until(self, t):
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > t:
                break
            self.clock.set(max(deadline, self.clock.now_ns()))
            self.timers.run_expired(self.clock.now_ns())
        self.clock.set(t)

    def irr_bit(self, vector):
        return bool(self.rd(IRR + 0x10 * (vector // 32)) >> (vector % 32) & 1)

    def isr_bit(self, vector):
        return bool(self.rd(ISR + 0x10 * (vector // 32)) >> (vector % 32) & 1)


def test_lapic_base_is_fee00000_and_msr_reset_value():
    m = Machine()
    assert APIC_DEFAULT_BASE == 0xFEE00000
    # SDM 11.4.4: base 0xFEE00000, BSP (bit 8) and global enable (bit 11).
    assert m.apic.read_base_msr() == 0xFEE00900


def test_lapic_reset_registers_match_sdm():
    m = Machine(apic_id=3)
    assert m.rd(ID) == 3 << 24
    assert m.rd(VER) & 0xFF == 0x14
    assert (m.rd(VER) >> 16) & 0xFF == 6       # seven LVT entries
    assert m.rd(SVR) == 0xFF                   # SDM 11.4.7.1
    assert m.rd(DFR) == 0xFFFFFFFF
    for lvt in (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0,
                LVT_LINT1, LVT_ERROR):
        assert m.rd(lvt) == 0x00010000
    assert m.rd(TPR) == 0 and m.rd(PPR) == 0 and m.rd(APR) == 0
    assert not m.apic.software_enabled


def test_lapic_svr_bit8_software_enables():
    m = Machine()
    m.wr(SVR, 0x1FF)
    assert m.apic.software_enabled
    assert m.rd(SVR) == 0x1FF


def test_lapic_self_ipi_shorthand_sets_irr_and_delivers():
    m = Machine()
    m.enable()
    m.wr(ICR_LO, (1 << 18) | 0x40)     # shorthand self, fixed, vector 0x40
    assert m.rd(IRR + 0x20) == 1       # vector 64 = IRR register 2, bit 0
    assert m.apic.pending_vector() == 0x40
    m.apic.acknowledge(0x40)
    assert not m.irr_bit(0x40) and m.isr_bit(0x40)
    assert m.apic.pending_vector() is None
    m.wr(EOI, 0)
    assert not m.isr_bit(0x40)


def test_lapic_fixed_ipi_to_own_id_delivered_other_id_dropped():
    m = Machine(apic_id=2)
    m.enable()
    m.wr(ICR_HI, 5 << 24)
    m.wr(ICR_LO, 0x51)                 # physical dest 5: not us
    assert m.apic.pending_vector() is None
    m.wr(ICR_HI, 2 << 24)
    m.wr(ICR_LO, 0x52)
    assert m.apic.pending_vector() == 0x52


def test_lapic_all_excluding_self_shorthand_not_delivered():
    m = Machine()
    m.enable()
    m.wr(ICR_LO, (3 << 18) | 0x60)
    assert m.apic.pending_vector() is None


def test_lapic_logical_flat_destination_matches_ldr():
    m = Machine()
    m.enable()
    m.wr(LDR, 0x04 << 24)
    m.wr(ICR_HI, 0x06 << 24)
    m.wr(ICR_LO, (1 << 11) | 0x70)     # logical, flat model (DFR reset)
    assert m.apic.pending_vector() == 0x70


def test_lapic_tpr_blocks_same_or_lower_priority_class():
    m = Machine()
    m.enable()
    m.wr(TPR, 0x50)
    m.apic.deliver(0x45)
    m.apic.deliver(0x5F)
    assert m.apic.pending_vector() is None     # classes 4, 5 <= 5
    m.apic.deliver(0x61)
    assert m.apic.pending_vector() == 0x61


def test_lapic_ppr_is_isr_class_when_above_tpr():
    m = Machine()
    m.enable()
    m.wr(TPR, 0x23)
    assert m.rd(PPR) == 0x23
    m.apic.deliver(0x61)
    m.apic.acknowledge(0x61)
    assert m.rd(PPR) == 0x60
    m.apic.deliver(0x65)
    assert m.apic.pending_vector() is None     # same class as in service
    m.apic.deliver(0x71)
    assert m.apic.pending_vector() == 0x71


def test_lapic_software_disabled_delivers_nothing():
    m = Machine()
    m.apic.deliver(0x80)
    assert m.irr_bit(0x80)
    assert m.apic.pending_vector() is None


def test_lapic_software_disabled_lvt_mask_cannot_be_cleared():
    m = Machine()
    m.wr(LVT_TIMER, 0x30)
    assert m.rd(LVT_TIMER) == 0x10030
    m.enable()
    m.wr(LVT_TIMER, 0x30)
    assert m.rd(LVT_TIMER) == 0x30
    m.wr(SVR, 0xFF)                    # software disable masks every LVT
    assert m.rd(LVT_TIMER) & 0x10000


def test_lapic_oneshot_timer_fires_after_initial_count_ns():
    m = Machine()
    m.enable()
    m.wr(TIMER_DCR, 0xB)               # divide by 1
    m.wr(LVT_TIMER, 0x30)              # one-shot, vector 0x30
    m.wr(TIMER_ICR, 1000)
    m.run_until(400)
    assert m.rd(TIMER_CCR) == 600
    m.run_until(999)
    assert m.apic.pending_vector() is None
    m.run_until(1000)
    assert m.apic.pending_vector() == 0x30
    assert m.rd(TIMER_CCR) == 0
    m.apic.acknowledge(0x30)
    m.wr(EOI, 0)
    m.run_until(10_000)
    assert m.apic.pending_vector() is None     # one-shot: no second tick


def test_lapic_timer_divide_by_16_scales_period():
    m = Machine()
    m.enable()
    m.wr(TIMER_DCR, 0x3)               # 011b: divide by 16
    m.wr(LVT_TIMER, 0x31)
    m.wr(TIMER_ICR, 100)
    m.run_until(1599)
    assert m.apic.pending_vector() is None
    assert m.rd(TIMER_CCR) == 1
    m.run_until(1600)
    assert m.apic.pending_vector() == 0x31


def test_lapic_timer_divide_encodings_match_sdm_figure_11_10():
    m = Machine()
    m.enable()
    expected = {0x0: 2, 0x1: 4, 0x2: 8, 0x3: 16, 0x8: 32, 0x9: 64, 0xA: 128,
                0xB: 1}
    for dcr, div in expected.items():
        m.wr(TIMER_DCR, dcr)
        start = m.clock.now_ns()
        m.wr(TIMER_ICR, 1000)
        m.run_until(start + div * 10)
        assert m.rd(TIMER_CCR) == 990, hex(dcr)
        m.wr(TIMER_ICR, 0)


def test_lapic_periodic_timer_fires_every_period():
    m = Machine()
    m.enable()
    m.wr(TIMER_DCR, 0xB)
    m.wr(LVT_TIMER, (1 << 17) | 0x40)
    m.wr(TIMER_ICR, 250)
    fired = 0
    for t in range(50, 2001, 50):
        m.run_until(t)
        if m.apic.pending_vector() == 0x40:
            fired += 1
            m.apic.acknowledge(0x40)
            m.wr(EOI, 0)
    assert fired == 8                  # at 250, 500, ..., 2000
    m.run_until(2100)
    assert m.rd(TIMER_CCR) == 150


def test_lapic_masked_timer_counts_without_interrupt():
    m = Machine()
    m.enable()
    m.wr(TIMER_DCR, 0xB)
    m.wr(LVT_TIMER, 0x10000 | (1 << 17) | 0x40)
    m.wr(TIMER_ICR, 100)
    m.run_until(1030)
    assert m.apic.pending_vector() is None
    assert m.rd(TIMER_CCR) == 70


def test_lapic_initial_count_zero_stops_timer():
    m = Machine()
    m.enable()
    m.wr(TIMER_DCR, 0xB)
    m.wr(LVT_TIMER, 0x40)
    m.wr(TIMER_ICR, 100)
    m.wr(TIMER_ICR, 0)
    m.run_until(1000)
    assert m.apic.pending_vector() is None
    assert m.rd(TIMER_CCR) == 0


def test_lapic_esr_write_to_update_latches_illegal_register():
    m = Machine()
    m.enable()
    m.rd(0x040)                        # reserved register
    assert m.rd(ESR) == 0              # not visible before the ESR write
    m.wr(ESR, 0)
    assert m.rd(ESR) == 0x80           # illegal register address
    m.wr(ESR, 0)
    assert m.rd(ESR) == 0


def test_lapic_illegal_vector_self_ipi_sets_send_illegal_and_error_lvt():
    m = Machine()
    m.enable()
    m.wr(LVT_ERROR, 0xFE)
    m.wr(ICR_LO, (1 << 18) | 0x05)
    m.wr(ESR, 0)
    assert m.rd(ESR) == 0x20
    assert m.apic.pending_vector() == 0xFE


def test_lapic_lint1_nmi_delivery_calls_nmi():
    m = Machine()
    m.enable()
    m.wr(LVT_LINT1, 0x400)             # NMI delivery, unmasked
    m.apic.set_lint(1, True)
    assert m.nmis == [1]


def test_lapic_lint0_extint_accepts_pic():
    m = Machine()
    assert not m.apic.accepts_pic_interrupts()     # LINT0 masked at reset
    m.enable()
    m.wr(LVT_LINT0, 0x700)
    assert m.apic.accepts_pic_interrupts()


def test_lapic_sub_dword_and_misaligned_access_ignored():
    m = Machine()
    m.wr(TPR, 0x40)
    assert m.rd(TPR, size=1) == 0
    assert m.rd(TPR + 4) == 0
    m.wr(TPR, 0x99, size=2)
    m.wr(TPR + 8, 0x99)
    assert m.rd(TPR) == 0x40


def test_lapic_readonly_registers_ignore_writes():
    m = Machine()
    m.wr(VER, 0)
    m.wr(PPR, 0xFF)
    m.wr(IRR, 0xFFFFFFFF)
    assert m.rd(VER) & 0xFF == 0x14 and m.rd(PPR) == 0 and m.rd(IRR) == 0


def test_lapic_global_disable_resets_and_blocks_delivery():
    m = Machine()
    m.enable()
    m.apic.deliver(0x50)
    m.apic.write_base_msr(0xFEE00000)  # clear bit 11
    assert not m.apic.hw_enabled
    assert m.apic.pending_vector() is None
    assert m.rd(SVR) == 0xFF


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFF), st.integers(0, 2**32 - 1),
                          st.sampled_from([1, 2, 4, 8]), st.booleans(),
                          st.integers(0, 5000)), max_size=60))
def test_lapic_random_guest_accesses_never_raise_and_keep_invariants(ops):
    m = Machine()
    for off, value, size, is_write, dt in ops:
        off &= ~(size - 1)
        if is_write:
            m.wr(off, value, size)
        else:
            assert 0 <= m.rd(off, size) < 1 << (8 * size)
        m.run_until(m.clock.now_ns() + dt)
        a = m.apic
        assert a.irr & 0xFFFF == 0     # vectors 0-15 never accepted
        v = a.pending_vector()
        if v is not None:
            assert a.software_enabled and (v >> 4) > (a.ppr >> 4)
            a.acknowledge(v)
            assert a.isr >> v & 1
        assert 0 <= m.rd(TIMER_CCR) <= a.timer_initial

"""Tests of devices.pit8254 through ports 0x40-0x43 and 0x61 with a fake clock."""

import math

from hypothesis import given, settings, strategies as st

from vmlab.devices.bus import IO_LIMIT, Bus
from vmlab.devices.clock import ManualClock, TimerQueue
from vmlab.devices.irq import IrqLine
from vmlab.devices.pit8254 import PIT_FREQ, Pit8254

NS = 1_000_000_000


def ns_for_ticks(ticks):
    """First instant (ns) at which `ticks` input clocks have elapsed."""
    return math.ceil(ticks * NS / 1193182)


class Machine:
    def __init__(self):
        self.clock = ManualClock()
        self.timers = TimerQueue()
        self.edges = []
        self._level = False
        self.pit = Pit8254(self.clock, self.timers, IrqLine(self._irq0))
        self.bus = Bus("io", IO_LIMIT)
        self.pit.attach(self.bus)

    def _irq0(self, level):
        if level and not self._level:
            self.edges.append(self.clock.now_ns())
        self._level = level

    def outb(self, port, value):
        self.bus.write(port, 1, value)

    def inb(self, port):
        return self.bus.read(port, 1)

    def run_until(self, t):
        """Advance virtual time to t, servicing timers at their deadlines."""
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > t:
                break
            self.clock.set(max(deadline, self.clock.now_ns()))
            self.timers.run_expired(self.clock.now_ns())
        self.clock.set(t)

    def read_count(self, port):
        lo = self.inb(port)
        hi = self.inb(port)
        return lo | (hi << 8)


def test_pit_input_clock_is_qemu_pit_freq():
    assert PIT_FREQ == 1193182


def test_pit_control_port_reads_zero():
    m = Machine()
    assert m.inb(0x43) == 0


def test_pit_linux_calibration_channel2_mode0_out2_rises_after_count():
    m = Machine()
    latch = 11932                      # 10 ms worth, as pit_calibrate_tsc
    m.outb(0x61, (m.inb(0x61) & ~0x02) | 0x01)
    m.outb(0x43, 0xB0)                 # ch2, lobyte/hibyte, mode 0
    m.outb(0x42, latch & 0xFF)
    m.outb(0x42, latch >> 8)
    assert not m.inb(0x61) & 0x20
    m.run_until(ns_for_ticks(latch) - 1)
    assert not m.inb(0x61) & 0x20
    m.run_until(ns_for_ticks(latch))
    assert m.inb(0x61) & 0x20


def test_pit_quick_calibrate_msb_decreases():
    m = Machine()
    m.outb(0x61, 0x01)
    m.outb(0x43, 0xB0)
    m.outb(0x42, 0xFF)
    m.outb(0x42, 0xFF)
    first = m.read_count(0x42)
    m.run_until(ns_for_ticks(256 * 3))
    second = m.read_count(0x42)
    assert first == 0xFFFF
    assert second == 0xFFFF - 256 * 3
    assert (second >> 8) < (first >> 8)


def test_pit_mode2_1000hz_raises_1000_irq0_edges_per_second():
    m = Machine()
    m.outb(0x43, 0x34)                 # ch0, lo/hi, mode 2
    m.outb(0x40, 1193 & 0xFF)
    m.outb(0x40, 1193 >> 8)
    m.edges.clear()
    m.run_until(NS)
    assert len(m.edges) == PIT_FREQ // 1193     # 1000
    assert m.edges[0] == ns_for_ticks(1193)
    assert m.edges[1] == ns_for_ticks(2 * 1193)


def test_pit_reset_channel0_runs_mode3_at_18_2_hz():
    m = Machine()
    m.edges.clear()
    m.run_until(NS)
    assert m.edges[0] == ns_for_ticks(65536)
    assert len(m.edges) == 18


def test_pit_mode0_channel0_single_irq_edge_at_terminal_count():
    m = Machine()
    m.outb(0x43, 0x30)                 # ch0, lo/hi, mode 0
    assert m.pit.out(0) is False       # OUT low after the control word
    m.outb(0x40, 100)
    m.outb(0x40, 0)
    m.edges.clear()
    m.run_until(NS // 10)
    assert m.edges == [ns_for_ticks(100)]
    assert m.pit.out(0) is True


def test_pit_mode4_strobe_one_edge_after_count_plus_one():
    m = Machine()
    m.outb(0x43, 0x38)                 # ch0, lo/hi, mode 4
    m.outb(0x40, 50)
    m.outb(0x40, 0)
    m.edges.clear()
    m.run_until(NS // 100)
    assert m.edges == [ns_for_ticks(51)]


def test_pit_counter_latch_freezes_value_until_read():
    m = Machine()
    m.outb(0x43, 0x34)
    m.outb(0x40, 0xE8)
    m.outb(0x40, 0x03)                 # 1000
    m.run_until(ns_for_ticks(100))
    m.outb(0x43, 0x00)                 # latch ch0
    m.run_until(ns_for_ticks(300))
    assert m.read_count(0x40) == 900
    assert m.read_count(0x40) == 700   # latch released: live count


def test_pit_readback_status_then_count():
    m = Machine()
    m.outb(0x43, 0x34)
    m.outb(0x43, 0xE2)                 # read-back status only, ch0
    assert m.inb(0x40) == 0x40 | 0x80 | 0x34   # null count, OUT high
    m.outb(0x40, 0x10)
    m.outb(0x40, 0x00)                 # count 16
    m.run_until(ns_for_ticks(5))
    m.outb(0x43, 0xC2)                 # latch count and status, ch0
    assert m.inb(0x40) == 0x80 | 0x34  # status first, count loaded
    assert m.read_count(0x40) == 11


def test_pit_lsb_only_access_reads_and_writes_low_byte():
    m = Machine()
    m.outb(0x43, 0x10)                 # ch0, LSB only, mode 0
    m.outb(0x40, 0x80)
    m.run_until(ns_for_ticks(0x10))
    assert m.inb(0x40) == 0x70
    assert m.inb(0x40) == 0x70


def test_pit_msb_only_access_reads_and_writes_high_byte():
    m = Machine()
    m.outb(0x43, 0x20)                 # ch0, MSB only, mode 0
    m.outb(0x40, 0x02)                 # count 0x200
    m.run_until(ns_for_ticks(0x101))
    assert m.inb(0x40) == 0x00         # 0x200 - 0x101 = 0xFF


def test_pit_mode3_channel2_square_wave_half_period():
    m = Machine()
    m.outb(0x61, 0x01)
    m.outb(0x43, 0xB6)                 # ch2, lo/hi, mode 3
    m.outb(0x42, 100)
    m.outb(0x42, 0)
    m.run_until(ns_for_ticks(49))
    assert m.inb(0x61) & 0x20
    m.run_until(ns_for_ticks(50))
    assert not m.inb(0x61) & 0x20
    m.run_until(ns_for_ticks(100))
    assert m.inb(0x61) & 0x20


def test_pit_mode2_out_low_only_while_count_is_one():
    m = Machine()
    m.outb(0x61, 0x01)
    m.outb(0x43, 0xB4)                 # ch2, lo/hi, mode 2
    m.outb(0x42, 10)
    m.outb(0x42, 0)
    m.run_until(ns_for_ticks(8))       # count 2
    assert m.inb(0x61) & 0x20
    m.run_until(ns_for_ticks(9))       # count 1: OUT low for one clock
    assert not m.inb(0x61) & 0x20
    assert m.read_count(0x42) == 1
    m.run_until(ns_for_ticks(10))      # reload: OUT high, count 10
    assert m.inb(0x61) & 0x20
    assert m.read_count(0x42) == 10


def test_pit_gate_low_holds_mode2_count_rising_gate_reloads():
    m = Machine()
    m.outb(0x61, 0x01)
    m.outb(0x43, 0xB4)                 # ch2, lo/hi, mode 2
    m.outb(0x42, 200)
    m.outb(0x42, 0)
    m.run_until(ns_for_ticks(50))
    m.outb(0x61, 0x00)                 # gate low: counting stops
    m.run_until(ns_for_ticks(120))
    assert m.read_count(0x42) == 150
    m.outb(0x61, 0x01)                 # rising gate reloads the count
    assert m.read_count(0x42) == 200


def test_pit_mode2_new_count_takes_effect_at_next_reload():
    m = Machine()
    m.outb(0x43, 0x34)
    m.outb(0x40, 100)
    m.outb(0x40, 0)
    m.run_until(ns_for_ticks(30))
    m.outb(0x40, 10)
    m.outb(0x40, 0)                    # new count 10 during the period
    assert m.read_count(0x40) == 70    # old period continues
    m.edges.clear()
    m.run_until(ns_for_ticks(125))
    assert m.edges == [ns_for_ticks(100), ns_for_ticks(110), ns_for_ticks(120)]


def test_pit_mode1_channel2_triggered_by_gate_edge():
    m = Machine()
    m.outb(0x43, 0xB2)                 # ch2, lo/hi, mode 1
    m.outb(0x42, 20)
    m.outb(0x42, 0)
    assert m.inb(0x61) & 0x20          # OUT high until triggered
    m.run_until(1000)
    trigger = m.clock.now_ns()
    m.outb(0x61, 0x01)                 # gate rising edge triggers
    assert not m.inb(0x61) & 0x20
    m.run_until(trigger + ns_for_ticks(20))
    assert m.inb(0x61) & 0x20


def test_pit_port61_refresh_bit_toggles_every_15us():
    m = Machine()
    a = m.inb(0x61) & 0x10
    m.run_until(15085)
    b = m.inb(0x61) & 0x10
    assert a != b


def test_pit_port61_speaker_bits_read_back():
    m = Machine()
    m.outb(0x61, 0x03)
    assert m.inb(0x61) & 0x0F == 0x03


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 0xFFFF), st.lists(st.integers(0, 10**7), min_size=2,
                                        max_size=30))
def test_pit_mode2_count_read_decreases_within_period(count, times):
    m = Machine()
    m.outb(0x43, 0x34)
    m.outb(0x40, count & 0xFF)
    m.outb(0x40, count >> 8)
    period_ns = count * NS // PIT_FREQ
    previous = count + 1
    for t in sorted(x % max(period_ns, 1) for x in times):
        m.run_until(max(t, m.clock.now_ns()))
        m.outb(0x43, 0x00)
        value = m.read_count(0x40)
        assert 1 <= value <= count
        assert value <= previous
        previous = value


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x40, 0x41, 0x42, 0x43, 0x61]),
                          st.integers(0, 255), st.booleans(),
                          st.integers(0, 200_000)), max_size=60))
def test_pit_random_programming_never_raises_and_timer_in_future(ops):
    m = Machine()
    for port, value, is_write, dt in ops:
        if is_write:
            m.outb(port, value)
        else:
            assert 0 <= m.inb(port) <= 0xFF
        m.run_until(m.clock.now_ns() + dt)
        deadline = m.timers.next_deadline()
        assert deadline is None or deadline > m.clock.now_ns()

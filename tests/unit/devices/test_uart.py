"""Tests of devices.uart16550 driven through port I/O like a guest driver."""

from hypothesis import given, settings, strategies as st

from vmlab.devices.bus import IO_LIMIT, Bus
from vmlab.devices.irq import IrqLine
from vmlab.devices.uart16550 import COM1_IRQ, COM1_PORT, Uart16550

BASE = 0x3F8
RBR = THR = DLL = BASE
IER = DLM = BASE + 1
IIR = FCR = BASE + 2
LCR, MCR, LSR, MSR, SCR = BASE + 3, BASE + 4, BASE + 5, BASE + 6, BASE + 7


class Machine:
    def __init__(self):
        self.out = bytearray()
        self.irq_levels = []
        self.irq = IrqLine(self.irq_levels.append, "irq4")
        self.uart = Uart16550(sink=self.out.extend, irq=self.irq)
        self.bus = Bus("io", IO_LIMIT)
        self.bus.register(COM1_PORT, 8, self.uart, "com1")

    def inb(self, port):
        return self.bus.read(port, 1)

    def outb(self, port, value):
        self.bus.write(port, 1, value)


def test_uart_com1_constants_match_pc():
    assert (COM1_PORT, COM1_IRQ) == (0x3F8, 4)


def test_uart_reset_register_values_match_datasheet():
    m = Machine()
    assert m.inb(IER) == 0x00
    assert m.inb(IIR) == 0x01          # no interrupt pending, FIFOs off
    assert m.inb(LCR) == 0x00
    assert m.inb(MCR) == 0x00
    assert m.inb(LSR) == 0x60          # THRE | TEMT
    assert m.inb(MSR) & 0xF0 == 0xB0   # DCD, DSR, CTS asserted by the peer


def test_uart_thr_write_reaches_sink():
    m = Machine()
    for ch in b"hi\n":
        m.outb(THR, ch)
    assert bytes(m.out) == b"hi\n"
    assert m.inb(LSR) & 0x60 == 0x60


def test_uart_dlab_write_sets_divisor_not_output():
    m = Machine()
    m.outb(LCR, 0x80)
    m.outb(DLL, 0x01)
    m.outb(DLM, 0x00)
    assert (m.inb(DLL), m.inb(DLM)) == (0x01, 0x00)
    m.outb(LCR, 0x03)
    assert bytes(m.out) == b""
    assert m.uart.divisor == 1


def test_uart_ier_upper_bits_read_zero():
    m = Machine()
    m.outb(IER, 0xFF)
    assert m.inb(IER) == 0x0F


def test_uart_fcr_enable_sets_iir_fifo_bits():
    m = Machine()
    m.outb(FCR, 0x01)
    assert m.inb(IIR) == 0xC1
    m.outb(FCR, 0x00)
    assert m.inb(IIR) == 0x01


def test_uart_scratch_register_holds_value():
    m = Machine()
    m.outb(SCR, 0xA5)
    assert m.inb(SCR) == 0xA5


def test_uart_feed_sets_data_ready_and_rbr_returns_bytes_in_order():
    m = Machine()
    m.outb(FCR, 0x07)
    m.uart.feed(b"ab")
    assert m.inb(LSR) & 0x01
    assert m.inb(RBR) == ord("a")
    assert m.inb(RBR) == ord("b")
    assert not m.inb(LSR) & 0x01


def test_uart_rx_interrupt_raises_irq_only_with_out2():
    m = Machine()
    m.outb(IER, 0x01)
    m.uart.feed(b"x")
    assert m.inb(IIR) == 0x04
    assert not m.irq.level
    m.outb(MCR, 0x08)                  # OUT2 enables the PC's IRQ buffer
    assert m.irq.level
    m.inb(RBR)
    assert m.inb(IIR) == 0x01
    assert not m.irq.level


def test_uart_enabling_etbei_with_empty_thr_raises_thre_cleared_by_iir_read():
    m = Machine()
    m.outb(MCR, 0x08)
    m.outb(IER, 0x02)
    assert m.irq.level
    assert m.inb(IIR) == 0x02
    assert not m.irq.level
    assert m.inb(IIR) == 0x01


def test_uart_thr_write_reraises_thre_interrupt():
    m = Machine()
    m.outb(MCR, 0x08)
    m.outb(IER, 0x02)
    m.inb(IIR)
    m.outb(THR, ord("z"))
    assert m.inb(IIR) == 0x02


def test_uart_iir_priority_line_status_over_data_over_thre():
    m = Machine()
    m.outb(IER, 0x07)                  # RLS, RDA, THRE
    m.uart.feed(b"1")
    m.uart.feed(b"2")                  # no FIFO: 1-byte RBR overruns
    assert m.inb(IIR) == 0x06          # receiver line status first
    assert m.inb(LSR) & 0x02           # OE; reading LSR clears it
    assert m.inb(IIR) == 0x04          # then received data
    m.inb(RBR)
    assert m.inb(IIR) == 0x02          # then THR empty


def test_uart_fifo_overflow_sets_oe_and_drops_new_byte():
    m = Machine()
    m.outb(FCR, 0x01)
    kept = m.uart.feed(bytes(range(20)))
    assert kept == 16
    lsr = m.inb(LSR)
    assert lsr & 0x03 == 0x03
    assert not m.inb(LSR) & 0x02       # OE cleared by the read
    assert [m.inb(RBR) for _ in range(16)] == list(range(16))


def test_uart_16450_mode_overrun_overwrites_rbr():
    m = Machine()
    m.uart.feed(b"AB")
    assert m.inb(LSR) & 0x02
    assert m.inb(RBR) == ord("B")


def test_uart_trigger_level_below_reports_timeout_at_level_reports_data():
    m = Machine()
    m.outb(FCR, 0x81)                  # FIFO on, trigger level 8
    m.outb(IER, 0x01)
    m.uart.feed(b"abc")
    assert m.inb(IIR) == 0xCC          # character timeout
    m.uart.feed(b"defgh")
    assert m.inb(IIR) == 0xC4          # trigger level reached


def test_uart_fcr_clear_rx_empties_fifo():
    m = Machine()
    m.outb(FCR, 0x01)
    m.uart.feed(b"abc")
    m.outb(FCR, 0x03)
    assert not m.inb(LSR) & 0x01


def test_uart_loopback_msr_mirrors_mcr_like_linux_probe():
    m = Machine()
    m.outb(MCR, 0x10 | 0x0A)           # LOOP | RTS | OUT2
    assert m.inb(MSR) & 0xF0 == 0x90   # CTS | DCD
    m.outb(MCR, 0x10 | 0x05)           # LOOP | DTR | OUT1
    assert m.inb(MSR) & 0xF0 == 0x60   # DSR | RI


def test_uart_loopback_thr_returns_in_rbr_not_sink():
    m = Machine()
    m.outb(MCR, 0x10)
    m.outb(THR, 0x5A)
    assert m.inb(LSR) & 0x01
    assert m.inb(RBR) == 0x5A
    assert bytes(m.out) == b""


def test_uart_loopback_disconnects_host_input():
    m = Machine()
    m.outb(MCR, 0x10)
    assert m.uart.rx_room() == 0
    assert m.uart.feed(b"x") == 0
    assert m.inb(LSR) & 0x03 == 0      # neither data nor overrun


def test_uart_loopback_forces_irq_output_off():
    m = Machine()
    m.outb(IER, 0x01)
    m.outb(MCR, 0x18)                  # LOOP | OUT2
    m.outb(THR, 0x41)
    assert m.inb(IIR) == 0x04          # interrupt logic still works
    assert not m.irq.level


def test_uart_modem_status_delta_interrupt_cleared_by_msr_read():
    m = Machine()
    m.outb(IER, 0x08)
    m.outb(MCR, 0x10)                  # loopback: CTS/DSR/DCD drop
    assert m.inb(IIR) == 0x00
    msr = m.inb(MSR)
    assert msr & 0x0B == 0x0B          # DCTS | DDSR | DDCD
    assert m.inb(IIR) == 0x01


def test_uart_word_access_reads_two_registers():
    m = Machine()
    m.outb(LCR, 0x03)
    m.outb(MCR, 0x0B)
    assert m.bus.read(LCR, 2) == 0x0B03


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 255),
                          st.sampled_from(["r", "w", "feed"])), max_size=80))
def test_uart_random_guest_accesses_never_raise_and_keep_invariants(ops):
    m = Machine()
    for off, value, kind in ops:
        if kind == "r":
            m.inb(BASE + off)
        elif kind == "w":
            m.outb(BASE + off, value)
        else:
            m.uart.feed(bytes([value]) * (value % 20))
        u = m.uart
        assert len(u.rx_fifo) <= 16
        assert u.ier & 0xF0 == 0
        assert u.mcr & 0xE0 == 0
        pending = u._pending_iir() != 0x01
        expected_irq = pending and bool(u.mcr & 0x08) and not u.mcr & 0x10
        assert m.irq.level == expected_irq
        assert bool(u.lsr & 0x01) == bool(u.rx_fifo)
    saved_lcr = m.uart.lcr
    m.outb(LCR, saved_lcr & 0x7F)
    assert m.inb(IIR) & 0x30 == 0

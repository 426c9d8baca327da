"""Coalesced port I/O (emu/pio.py; vmlab_pio_decide in native/hooks.c): the C
decision against its Python twin, and a polled UART guest run with the table
on and off -- the same serial output, the same UART state, the same registers
-- while the table serves the polling."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from support import Machine, asm
from vmlab.emu import pio as P
from vmlab.emu.native import ffi, lib

U64 = st.integers(0, (1 << 64) - 1)
PORTS = st.sampled_from([0x3F8, 0x3FD, 0x80, 0xF4, 0x3FD + 0x10000, 0])


@st.composite
def tables(draw):
    t = ffi.new("vmlab_pio *")
    n = draw(st.integers(0, 9))                 # 9: past VMLAB_PIO_PORTS, only 8 are looked at
    t.nports = n
    for k in range(min(n, 8)):
        t.port[k] = draw(PORTS) & 0xFFFF
        t.read_ok[k], t.write_ok[k] = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        t.read_value[k] = draw(st.integers(0, 255))
    t.nqueued = draw(st.sampled_from([0, 1, P.RING - 1, P.RING]))
    return t


CODE = st.one_of(st.tuples(st.sampled_from([0xE4, 0xE6, 0xEC, 0xEE, 0x66, 0xED, 0xE5, 0xF3]),
                           st.sampled_from([0xF8, 0xFD, 0x80, 0xF4])).map(bytes),
                 st.binary(min_size=0, max_size=3))
HFLAGS = st.one_of(st.sampled_from([0, 3, 0x80, 0x83, 0x81, 0x88, 0x180, 0x8080]), st.integers(0, 0x3FFFF))
RFLAGS = st.one_of(st.sampled_from([2, 0x3002, 0x1002, 0x20002, 0x23002]), U64)


@settings(max_examples=1500)
@given(CODE, HFLAGS, RFLAGS, U64, st.one_of(PORTS, U64), tables())
def test_decide_twin(code, hflags, rflags, rax, rdx, t):
    length, out = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    what = lib.vmlab_pio_decide(code, len(code), hflags, rflags, rax, rdx, t, length, out)
    assert (what, length[0] if what else 0, out[0] if what else 0) == P.pio_decide(code, hflags, rflags, rax, rdx, t)


GUEST = """
    mov dx, 0x3fb
    mov al, 0x03                # LCR: 8N1, DLAB 0
    out dx, al
    lea rsi, [rip + text]
    mov ecx, 40
nextc: mov dx, 0x3fd               # poll LSR.THRE, then THR: the served pair
poll: in al, dx
    test al, 0x20
    jz poll
    mov al, byte ptr [rsi]
    inc rsi
    mov dx, 0x3f8
    out dx, al
    dec ecx
    jnz nextc
    mov dx, 0x3f9               # IER.ETBEI on: a THR write is the model's again
    mov al, 0x02
    out dx, al
    mov dx, 0x3f8
    mov al, 0x21
    out dx, al
    mov dx, 0x3fa               # IIR: THR empty pending
    in al, dx
    mov bl, al
    mov dx, 0x3f9
    mov al, 0
    out dx, al
    mov dx, 0x3fb               # DLAB: port 0x3f8 is the divisor latch
    mov al, 0x83
    out dx, al
    mov dx, 0x3f8
    mov al, 0x07
    out dx, al
    mov dx, 0x3fb
    mov al, 0x03
    out dx, al
    mov dx, 0x3fc               # loopback: THR feeds RBR, LSR.DR set
    mov al, 0x10
    out dx, al
    mov dx, 0x3f8
    mov al, 0x5a
    out dx, al
    mov dx, 0x3fd
    in al, dx
    mov bh, al
    mov dx, 0x3f8
    in al, dx
    mov r8b, al
    mov dx, 0x3fc
    mov al, 0
    out dx, al
    mov dx, 0x3f8
    mov al, 0x0a
    out dx, al
    mov al, 0
    out 0xf4, al
    hlt
text: .ascii "coalesced port I/O: LSR then THR, 40 ch."
"""


def _run(served: bool):
    m = Machine()
    try:
        m.boot(asm(GUEST, 0x100000, 64), 0x100000, "long64")
        vm = m.vm
        if not served:
            vm.uart.on_fast = None
            vm.vcpu.fast_port(0x3F8)
            vm.vcpu.fast_port(0x3FD)
        res = m.run()
        r = m.cpu.refresh()
        u = vm.uart
        state = (res.reason, m.serial, u.ier, u.lcr, u.mcr, u.lsr, u.divisor, list(u.rx_fifo),
                 r.gpr[3] & 0xFFFF, r.gpr[8] & 0xFF, r.rip, m.cpu.native.icount)     # virtual time too
        return state, m.cpu.pio.completed
    finally:
        m.close()


def test_a_polled_uart_guest_runs_the_same_with_the_table_serving_it():
    served, completed = _run(True)
    plain, none = _run(False)
    assert served == plain
    assert served[1].startswith(b"coalesced port I/O: LSR then THR, 40 ch.!") and served[1].endswith(b"\n")
    assert plain[8] & 0xFF == 0xC2 or plain[8] & 0xF == 0x2     # IIR: THR empty (FIFOs off: 0x02)
    assert served[9] == 0x5A                                   # the looped-back byte
    # the 40 polls (LSR) and writes (THR) were served; nothing was without the table
    assert completed >= 80 and none == 0


UART_OPS = st.lists(st.tuples(st.sampled_from(["in", "out"]), st.integers(0, 7), st.integers(0, 255)),
                    min_size=1, max_size=40)


def _uart_program(ops) -> str:
    """Each op an IN or OUT of one UART register (DX form and, for the base
    port, the immediate form too); every IN's AL stored in order."""
    lines = ["    lea rdi, [rip + results]"]
    for kind, reg, val in ops:
        lines.append(f"    mov dx, {0x3F8 + reg:#x}")
        if kind == "out":
            lines += [f"    mov al, {val:#x}", "    out dx, al"]
        else:
            lines += ["    in al, dx", "    stosb"]
    lines += ["    mov al, 0", "    out 0xf4, al", "    hlt", "results: .fill 64, 1, 0xee"]
    return "\n".join(lines)


def _run_ops(ops, served: bool):
    m = Machine()
    try:
        code = asm(_uart_program(ops), 0x100000, 64)
        m.boot(code, 0x100000, "long64")
        vm = m.vm
        if not served:
            vm.uart.on_fast = None
            vm.vcpu.fast_port(0x3F8)
            vm.vcpu.fast_port(0x3FD)
        vm.host_input.append(b"xyz")          # input waiting: DR in LSR, RBR reads
        res = m.run()
        u = vm.uart
        results = m.mem.read(0x100000 + code.index(b"\xee" * 64), 64)
        return (res.reason, m.serial, bytes(results), u.ier, u.lcr, u.mcr, u.lsr, u.divisor, list(u.rx_fifo),
                u.fifo_enabled, u.irq_level, m.cpu.native.icount)
    finally:
        m.close()


@settings(max_examples=60, deadline=None)
@given(UART_OPS)
def test_random_uart_programming_is_the_same_with_the_table(ops):
    """Any sequence of UART register accesses (DLAB, loopback, FIFOs, the
    THR-empty interrupt enable, reads that clear status) reads and sends the
    same with the table serving what it may as with every access in Python."""
    assert _run_ops(ops, True) == _run_ops(ops, False)

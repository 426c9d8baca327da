"""Vcpu.regs_q: the register file's GPRs, RIP and RFLAGS as a memoryview of the
same memory as the cffi struct (Python's fast path for handlers and skip)."""
from hypothesis import HealthCheck, given, settings, strategies as st

from vmlab.emu.cpu import REGS_Q_RFLAGS, REGS_Q_RIP

U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(U64, min_size=18, max_size=18), st.integers(0, 15), U64, st.sampled_from([1, 2, 4, 8]))
def test_regs_q_is_the_register_file(machine, values, index, value, size):
    cpu = machine.cpu
    r, q = cpu.regs, cpu.regs_q
    for i in range(16):
        r.gpr[i] = values[i]
    r.rip, r.rflags = values[16], values[17]
    assert list(q) == values
    old = r.gpr[index]
    cpu.set_gpr(index, value, size)
    mask = (1 << (8 * size)) - 1
    want = value & 0xFFFFFFFF if size == 4 else value if size == 8 else (old & ~mask) | (value & mask)
    assert r.gpr[index] == want and q[index] == want and cpu._dirty & (1 << index)
    cpu.set_rip(value)
    assert r.rip == q[REGS_Q_RIP] == value
    assert q[REGS_Q_RFLAGS] == values[17]

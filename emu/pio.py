"""Coalesced port I/O: the Python twin of ``vmlab_pio_decide`` (native/hooks.c).

KVM queues a guest's writes to "coalesced" MMIO/PIO ranges in a ring that
the VMM drains later, instead of exiting for each one.  vmlab does the same
for the few ports a device model publishes in the vCPU's ``vmlab_pio`` table
(``Vcpu.fast_port``), and also serves 1-byte reads whose value has no side
effect: a polled 16550 UART's LSR (while no error bit is set, reading it
changes nothing) and THR (while no THR-empty interrupt is enabled, a write
does nothing but carry its byte out).  Linux's console writes each character
as "read LSR until THRE, write THR": two VM exits a character before.

At an IN/OUT trap site that the run's policy lets through (outside VMX
non-root operation, ``Vcpu.bare_policy``), the C run loop serves it and runs
on: an IN of a readable port gets the published value in AL, an OUT to a
writable port is queued as ``port << 8 | byte``; the run loop hands the queue
to the bus before it handles the next exit (``Vcpu.take_queued_io``), so the
device sees every write, in order, before anything else the guest does
reaches Python.
"""
from __future__ import annotations

from .native import lib

#: answers of pio_decide (and vmlab_pio_decide)
NONE, IN_SERVED, OUT_QUEUED = 0, 1, 2
PORTS, RING = lib.VMLAB_PIO_PORTS, lib.VMLAB_PIO_RING

_PE, _INHIBIT, _CPL = 1 << 7, 1 << 3, 3      # QEMU hflags bits
_TF, _RFLAGS_VM = 1 << 8, 1 << 17             # RFLAGS


def pio_decide(code: bytes, hflags: int, rflags: int, rax: int, rdx: int, t) -> tuple[int, int, int]:
    """(answer, instruction length, out) for the IN/OUT whose bytes start
    ``code`` under the table ``t`` (a cffi ``vmlab_pio``), as
    vmlab_pio_decide: IN_SERVED (``out`` the byte for AL), OUT_QUEUED (``out``
    the ring word) or NONE (length and out 0)."""
    if not code or hflags & _INHIBIT or rflags & _TF:
        return NONE, 0, 0             # a shadow to end, or the single-step #DB after it
    if hflags & _PE and (rflags & _RFLAGS_VM or hflags & _CPL > (rflags >> 12) & 3):
        return NONE, 0, 0             # the TSS I/O permission bitmap decides (SDM Vol. 1 19.5)
    op = code[0]
    if op in (0xE4, 0xE6):
        if len(code) < 2:
            return NONE, 0, 0
        port, length = code[1], 2
    elif op in (0xEC, 0xEE):
        port, length = rdx & 0xFFFF, 1
    else:
        return NONE, 0, 0
    for k in range(min(t.nports, PORTS)):
        if t.port[k] != port:
            continue
        if op in (0xE4, 0xEC):
            return (IN_SERVED, length, t.read_value[k]) if t.read_ok[k] else (NONE, 0, 0)
        if not t.write_ok[k] or t.nqueued >= RING:
            return NONE, 0, 0
        return OUT_QUEUED, length, port << 8 | (rax & 0xFF)
    return NONE, 0, 0

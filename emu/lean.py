"""The run loop's lean path, one native call per exit (``vmlab_lean_run`` in
native/hooks.c; this module is its pure-Python twin).

While the machine is quiet -- nothing asked of the run loop between exits,
see vmm/runloop.py -- an exit is one call with one argument, a
``vmlab_lean`` context the Vcpu owns (``Vcpu.lean``): the run's deadline is
the earliest of the slice, the next timer and the instruction limit, and the
call returns ``LOOK`` without running when the vCPU's attention word is set
(``Vcpu.attend``: an interrupt line, NMI, INIT, a stop or host input came in
from a device model, a handler or another thread) or a timer or the limit is
due.  The loop's general path then looks, as before every run.

:func:`lean_deadline` and :func:`lean_run` have the C routines' arguments and
answers; tests/unit/test_lean_run.py compares them.
"""
from __future__ import annotations

from .fastpath import store_exit
from .native import lib

#: vmlab_lean_run's answer when nothing ran (VMLAB_LEAN_LOOK)
LOOK = 101
#: a fast-path VM exit: LEAN_EXIT | reason | length << 17 | qualification << 21
LEAN_EXIT = 1 << 16
_STOP_FAST_EXIT = 100


def exit_word(reason: int, length: int, qual: int) -> int | None:
    """The word a fast-path VM exit comes back as, or None if its fields do
    not fit (the qualification past 32 bits, the length past 15)."""
    if qual >= 1 << 32 or length >= 16:
        return None
    return LEAN_EXIT | (reason & 0xFFFF) | length << 17 | qual << 21


def exit_fields(word: int) -> tuple[int, int, int]:
    """(reason, instruction length, qualification) of an exit word."""
    return word & 0xFFFF, (word >> 17) & 0xF, word >> 21
#: "none" for the context's timer and limit
NEVER = (1 << 64) - 1


def lean_deadline(attention: int, now: int, slice_: int, timer: int, limit: int) -> int:
    """The run's deadline: min(now + slice, timer, limit) (a slice past 2^64
    ends at the timer), or 0 -- do not run -- when ``attention`` is set or
    ``now`` has reached the timer or the limit.  (vmlab_lean_deadline)"""
    if attention or timer <= now or limit <= now:
        return 0
    deadline = now + slice_
    if deadline > NEVER or timer < deadline:
        deadline = timer
    return min(deadline, limit)


def clamp(deadline: int) -> int:
    """A timer deadline as the context's unsigned 64-bit field holds it."""
    return 0 if deadline < 0 else NEVER if deadline > NEVER else deadline


def lean_run(c) -> int:
    """One exit (vmlab_lean_run): the deadline, then vmlab_run_exit from
    ``c.r.rip`` with flags 0; ``LOOK`` without running; a fast-path VM exit
    as its exit word, its information fields written into the policy's VMCS
    area when it names one."""
    v = c.v
    deadline = lean_deadline(v.attention, v.icount, c.slice, c.timer, c.limit)
    if not deadline:
        return LOOK
    c.runs += 1
    from .native import ffi
    err = ffi.new("int *")
    kind = lib.vmlab_run_exit(v, c.uc, deadline, 0, c.r, c.f, err)
    c.err = err[0]
    if kind == _STOP_FAST_EXIT:
        f = c.f
        word = exit_word(f.exit_reason, f.exit_len, f.exit_qual)
        if word is not None:
            if f.vmcs != ffi.NULL:          # the exit-information fields, written at the exit
                store_exit(f, f.vmcs)
            return word
    return kind

"""Running several machines in one thread, for machines that talk to each
other in-process (virtio-net over a devices.backends.net.Hub).

A hub delivers a frame by writing the receiving guest's RAM and raising its
interrupt line at once, so the machines on a hub must not run on different
threads; :func:`run_together` runs them round-robin on the caller's thread.
Each machine runs until its slice of instructions ends or it halts waiting
for an interrupt (HLT with interrupts enabled and nothing else to wake it);
a waiting machine is run again once an interrupt is pending for it (its peer
sent it something).  When every machine still running is waiting and none
has an interrupt pending, nothing can wake any of them: each ends with its
halt result.
"""
from __future__ import annotations

import time

from vmlab.vmm.runloop import RunResult, StopReason

SLICE_INSNS = 5_000_000
"""Instructions a machine runs before the next one gets the CPU."""


def run_together(vms: list, max_insns: int | None = None, timeout: float | None = None,
                 slice_insns: int = SLICE_INSNS) -> list:
    """Run ``vms`` (vmm.vm.Vm) round-robin until each has stopped; returns
    their RunResults in order.  ``max_insns`` bounds each machine's
    instructions, ``timeout`` the whole run's wall time (in seconds)."""
    n = len(vms)
    results: list = [None] * n
    waiting = [False] * n
    budget = [max_insns] * n
    last = [None] * n
    t0 = time.monotonic()
    while any(r is None for r in results):
        ran = False
        for k, vm in enumerate(vms):
            if results[k] is not None:
                continue
            if waiting[k] and vm.pending_interrupt() is None:
                continue
            step = slice_insns if budget[k] is None else min(slice_insns, budget[k])
            icount = vm.vcpu.native.icount
            # No per-run timeout: a slice is short, and the whole run's
            # timeout is checked between slices below.
            res = vm.run(max_insns=step)
            ran = True
            if budget[k] is not None:
                budget[k] -= max(0, vm.vcpu.native.icount - icount)
            reason = str(res.reason)
            last[k] = res
            if reason == "limit" and (budget[k] is None or budget[k] > 0):
                waiting[k] = False
            elif reason == "halted" and "interrupts disabled" not in res.message:
                waiting[k] = True
            else:
                results[k] = res
        if not ran:
            for k in range(n):
                if results[k] is None:
                    results[k] = last[k]
            break
        if timeout is not None and time.monotonic() - t0 > timeout:
            for k in range(n):
                if results[k] is None:
                    results[k] = RunResult(StopReason.TIMEOUT, None, f"timeout after {timeout:g} s",
                                           vms[k].vcpu.native.icount)
            break
    return results

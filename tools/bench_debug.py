"""``vmlab bench debug``: what the debugger costs.

bp_ratio     guest MIPS with 16 breakpoints set on code that never runs, over
             the MIPS with no debugger attached (the mips bench's loop; best of
             3 interleaved runs).  Breakpoints are one-address code hooks, so
             the target is >= 0.95.
steps_per_s  Debugger.step() (stepi through the run loop) on guests/hello.asm,
             from the Python API; target >= 20,000.
"""
from __future__ import annotations

import time


def bench_debug(n: int = 20_000_000, reps: int = 3, steps: int = 5000) -> dict:
    from vmlab.tools.bench import _COMPUTE, CODE_ADDR, INSNS_PER_ITER, _vm_run

    def with_breaks(vm):
        from vmlab.tools.debugger import Debugger
        dbg = Debugger(vm)
        for k in range(16):                   # far from the loop: never executed
            dbg.break_at(CODE_ADDR + 0x8000 + 0x40 * k)

    plain, bps = [], []
    for _ in range(reps):
        plain.append(_vm_run(_COMPUTE, n, "virtual"))
        bps.append(_vm_run(_COMPUTE, n, "virtual", with_breaks))
    insns = n * INSNS_PER_ITER
    mips_plain, mips_bp = insns / min(plain) / 1e6, insns / min(bps) / 1e6
    return {"mips_no_debugger": round(mips_plain, 1), "mips_16_breakpoints": round(mips_bp, 1),
            "bp_ratio": round(mips_bp / mips_plain, 3), "steps_per_s": round(_steps_per_s(steps))}


def _steps_per_s(steps: int) -> float:
    from vmlab.emu.loaders import load
    from vmlab.tools.asm import build
    from vmlab.tools.debugger import Debugger
    from vmlab.vmm.vm import Vm
    from pathlib import Path

    hello = Path(__file__).resolve().parent.parent / "guests" / "hello.asm"
    with Vm(64 << 20, serial=None) as vm:
        vm.load(load(str(build(hello)), ram_size=64 << 20))
        dbg = Debugger(vm)
        dbg.step()                          # leave continue mode once (a TB flush)
        done = 0
        t = time.perf_counter()
        while done < steps:
            st = dbg.step()
            if st.reason != "step":
                break
            done += 1
        return done / (time.perf_counter() - t)

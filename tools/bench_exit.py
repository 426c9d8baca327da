"""Where the time of one VM exit goes: ``vmlab bench exit``'s breakdown.

A CPUID loop runs under a VMCS whose CPUID handler only skips the instruction
(what ``cpuid_python_us`` measures end to end; the run loop takes its lean
path, vmm/runloop.py).  The same exit is then timed stage by stage, each stage
doing everything the one before it did plus one more layer, in the same
process, so the differences are the layers' costs:

  reentry_us      the native floor: Unicorn stops at the trap site (code hook)
                  and vmlab re-enters it (RIP write + emu_start), all in C but
                  for one cffi call per exit
  regs_read_us    + the bulk register read (one native call)
  lean_run_us     the one native call of the lean path instead of the two
                  above (vmlab_lean_run, one argument: the deadline, run,
                  register read, the fast-path decision in C, the exit word),
                  in full -- less than their sum, one cffi call fewer
  lean_exit_us    + VmxGuest.lean_exit with a handler that does nothing: the
                  handler lookup, the deferred-save flags, the exit object
                  (reused when unreferenced), the handler call, the re-entry
                  check
  skip_us         + the handler's ``ex.skip()`` (RIP advanced in the register
                  file; the next run starts there)
  loop_us         the rest of the whole loop (= full_us minus lean_run_us,
                  lean_exit_us and skip_us): the inner loop's own statements
                  and the register-write check
  full_us         the whole loop (= cpuid_python_us), best of three runs
  python_call_ns  one empty Python function call on this machine (a unit to
                  read the others in)
"""
from __future__ import annotations

import time
import timeit


def _cpuid_guest(n: int):
    from vmlab.vmm.exit_reasons import ExitReason
    from vmlab.vmm.harness import vmx_guest

    g = vmx_guest(f"mov ecx, {n}\n l: mov eax, 1\n push rcx\n cpuid\n pop rcx\n dec ecx\n jnz l\n vmcall")
    g.handler(ExitReason.CPUID)(lambda ex: ex.skip())
    return g


def exit_breakdown(n: int = 20_000) -> dict:
    from vmlab.emu.lean import LEAN_EXIT, NEVER
    from vmlab.emu.native import lib
    from vmlab.vmm.exit_reasons import ExitReason

    out = {}
    # full loop, best of three runs
    for _ in range(3):
        g = _cpuid_guest(n)
        t = time.perf_counter()
        ex = g.run()
        full = (time.perf_counter() - t) / n * 1e6
        if ex.reason != ExitReason.VMCALL:
            raise RuntimeError(f"exit breakdown guest ended with {ex.reason!r}")
        g.close()
        out["full_us"] = min(full, out.get("full_us", full))

    # Stop at the first CPUID site, then time the layers on that same site.
    g = _cpuid_guest(n)
    g.handlers.clear()
    first = g.run()
    if first.reason != ExitReason.CPUID:
        raise RuntimeError(f"exit breakdown guest stopped at {first.reason!r}")
    cpu, vm = g.cpu, g.vm
    v, uch, regs = cpu.native, cpu._uch, cpu.regs
    site = cpu.regs.rip
    v.icount_deadline = 1 << 62
    k = n // 4

    def stage(body) -> float:
        # best of 5 rounds: the machine is shared, a round with a neighbour's
        # burst in it says nothing about the layer
        best = None
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(k // 5):
                body()
            dt = (time.perf_counter() - t) / (k // 5) * 1e6
            best = dt if best is None else min(best, dt)
        return best

    def reentry():
        v.stop_kind = 0
        lib.vmlab_emu_start(uch, site)

    def with_regs():
        v.stop_kind = 0
        lib.vmlab_emu_start(uch, site)
        lib.vmlab_regs_read(v, uch, regs)

    f = g._fastpath
    ctx, lean_run = cpu.lean, lib.vmlab_lean_run
    ctx.f, ctx.slice, ctx.timer, ctx.limit = f, 1 << 40, NEVER, NEVER

    def native_exit():
        regs.rip = site
        if lean_run(ctx) < LEAN_EXIT:
            raise RuntimeError("exit breakdown: the fast path did not decide the CPUID exit")

    lean_exit = g.lean_exit

    def lean():
        regs.rip = site
        lean_exit(lean_run(ctx))

    vm.intercept = g
    cpu.fastpath = f
    g.lean_begin()
    out["reentry_us"] = stage(reentry)
    out["regs_read_us"] = stage(with_regs) - out["reentry_us"]
    t_native = stage(native_exit)
    out["lean_run_us"] = t_native
    g.handler(ExitReason.CPUID)(lambda ex: None)
    t_noop = stage(lean)
    out["lean_exit_us"] = t_noop - t_native
    g.handler(ExitReason.CPUID)(lambda ex: ex.skip())
    out["skip_us"] = stage(lean) - t_noop
    vm.intercept = None
    cpu.fastpath = None
    out["loop_us"] = out["full_us"] - t_noop - out["skip_us"]
    g.close()
    out["python_call_ns"] = min(timeit.repeat("f()", "def f(): pass", number=200_000, repeat=5)) / 200_000 * 1e9
    return {key: round(val, 2) for key, val in out.items()}


if __name__ == "__main__":
    import json
    print(json.dumps(exit_breakdown()))

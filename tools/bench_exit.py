"""Where the time of one VM exit goes: ``vmlab bench exit``'s breakdown.

A CPUID loop runs under a VMCS whose CPUID handler only skips the instruction
(what ``cpuid_python_us`` measures end to end).  The same exit is then timed
stage by stage, each stage doing everything the one before it did plus one
more layer, in the same process, so the differences are the layers' costs:

  reentry_us      the native floor: Unicorn stops at the trap site (code hook)
                  and vmlab re-enters it (RIP write + emu_start), all in C but
                  for one cffi call per exit
  regs_read_us    + the bulk register read (one native call)
  vcpu_run_us     Vcpu.run: the above, plus decoding the trap site into an exit
                  value (emu/)
  decide_us       + runloop.handle_exit: the intercept policy turns it into a VM
                  exit (guest state saved, exit fields stored, handler's view)
  full_us         the whole loop: arbiter, handler, VM entry (= cpuid_python_us)
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
    from vmlab.emu.native import lib
    from vmlab.vmm import runloop
    from vmlab.vmm.exit_reasons import ExitReason

    out = {}
    # full loop
    g = _cpuid_guest(n)
    t = time.perf_counter()
    ex = g.run()
    out["full_us"] = (time.perf_counter() - t) / n * 1e6
    if ex.reason != ExitReason.VMCALL:
        raise RuntimeError(f"exit breakdown guest ended with {ex.reason!r}")
    g.close()

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
        t = time.perf_counter()
        for _ in range(k):
            body()
        return (time.perf_counter() - t) / k * 1e6

    def reentry():
        v.stop_kind = 0
        lib.vmlab_emu_start(uch, site)

    def with_regs():
        v.stop_kind = 0
        lib.vmlab_emu_start(uch, site)
        lib.vmlab_regs_read(v, uch, regs)

    def vcpu_run():
        cpu.set_rip(site)
        cpu.run(1 << 62)

    vm.intercept = g

    def decide():
        cpu.set_rip(site)
        runloop.handle_exit(vm, cpu.run(1 << 62))

    out["reentry_us"] = stage(reentry)
    out["regs_read_us"] = stage(with_regs) - out["reentry_us"]
    out["vcpu_run_us"] = stage(vcpu_run) - out["reentry_us"] - out["regs_read_us"]
    out["decide_us"] = stage(decide) - stage(vcpu_run)
    vm.intercept = None
    out["loop_handler_entry_us"] = out["full_us"] - out["reentry_us"] - out["regs_read_us"] - out["vcpu_run_us"] \
        - out["decide_us"]
    g.close()
    out["python_call_ns"] = min(timeit.repeat("f()", "def f(): pass", number=200_000, repeat=5)) / 200_000 * 1e9
    return {key: round(val, 2) for key, val in out.items()}


if __name__ == "__main__":
    import json
    print(json.dumps(exit_breakdown()))

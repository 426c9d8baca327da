"""``vmlab bench nested``: an L2 CPUID loop handled by a guest hypervisor (L1)
on vmlab's guest-visible VMX (guests/nested_vmx.c built with -DBENCH_LOOPS).

  l2_cpuid_us   wall time per L2 CPUID exit handled by L1 (two VMREADs, a
                VMWRITE and a VMRESUME of L1's own, each trapped and executed
                by vmm/nested.py), over the difference between two loop counts
                (the guest's setup cancels out); best of three runs each
  reflected     VM exits reflected to L1 in the longer run (a check that the
                loop ran)
  reflected_in_c  how many of them native/nested.c reflected itself
                (vmlab_vmx_reflect_ok), the rest went through vmm/nested.py
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
from vmlab.tools.cguest import CFLAGS_ELF64 as CFLAGS   # the flags `vmlab run guests/nested_vmx.c` uses


def build(out: pathlib.Path, loops: int | None = None) -> pathlib.Path:
    """Compile guests/nested_vmx.c into ``out`` (with -DBENCH_LOOPS when ``loops``)."""
    extra = [f"-DBENCH_LOOPS={loops}"] if loops else []
    subprocess.run(["gcc", *CFLAGS, *extra, "-o", str(out), str(ROOT / "guests" / "nested_vmx.c")],
                   check=True, capture_output=True, timeout=120)
    return out


def _run(image: pathlib.Path) -> tuple[float, int, int]:
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    with Vm(64 << 20, serial=None) as vm:
        nested = vm.enable_nested_vmx()
        vm.load(load(str(image), fmt="elf64", ram_size=64 << 20))
        t = time.perf_counter()
        res = vm.run(max_insns=2_000_000_000)
        dt = time.perf_counter() - t
        if res.reason != "debug-exit" or res.status != 1:
            raise RuntimeError(f"nested bench guest failed: {res}\n{vm.serial_output.decode(errors='replace')}")
        return dt, nested.reflected, int(nested._cache.native.reflected_total)


def bench_nested(short: int = 50, long: int = 10050) -> dict:
    if shutil.which("gcc") is None:
        return {"skipped": "gcc is not installed"}
    with tempfile.TemporaryDirectory() as d:
        a = build(pathlib.Path(d) / "short.elf", short)
        b = build(pathlib.Path(d) / "long.elf", long)
        # Best of three for each: the machines are shared and the noise is one-sided.
        t_short = min(_run(a)[0] for _ in range(3))
        runs = [_run(b) for _ in range(3)]
        t_long, reflected, in_c = min(r[0] for r in runs), runs[0][1], runs[0][2]
    return {"l2_cpuid_us": round((t_long - t_short) / (long - short) * 1e6, 2), "reflected": reflected,
            "reflected_in_c": in_c}

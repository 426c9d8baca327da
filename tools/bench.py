"""``vmlab bench``: vmlab against raw Unicorn (and QEMU when installed), measured in
the same run and reported as ratios, because these machines are shared and noisy.

Benchmarks (``vmlab bench list``):
  mips  a compute guest (load/add/xor/dec/jnz loop) on raw Unicorn and on
        vmlab's machine (soft-MMU, block accounting, machine traps armed):
        raw_unicorn_mips, vmlab_mips, ratio; ratio_long_blocks for the
        same work unrolled into 19-instruction blocks; vmlab_host_clock_mips
        and ratio_host_clock for the 5-instruction loop on the host clock
        (--clock host: no instruction counting); best of 3 interleaved runs
  tb    the mips loop with every trap kind armed and per-block execution
        counting on: raw_unicorn_mips, vmlab_mips, ratio
  smc   the smc guest's patch-and-run loop: vmlab_s, and with QEMU installed
        qemu_s (QEMU TCG, same image) and ratio = qemu_s / vmlab_s
  nested an L2 CPUID loop handled by a guest hypervisor on guest-visible VMX:
        l2_cpuid_us (tools/bench_nested.py)
  exit  one VM exit handled by a Python handler (best of three runs): cpuid_python_us, io_python_us,
        cr_python_us (MOV to CR0 changing an owned bit), exc_python_us (a #UD the exception
        bitmap intercepts);
        a CPUID answered by the native CPU model (no exit): cpuid_native_ns;
        an RDTSC from virtual time: rdtsc_native_ns; a register add: plain_insn_ns;
        breakdown: the CPUID exit layer by layer (tools/bench_exit.py)
  tlb   cold 2D TLB fills (guest x EPT) in C and in Python: c_fill_ns,
        py_fill_ns, speedup
  paging a page-hopping guest on vmlab's soft-MMU and on Unicorn's own walker:
        vmlab_mips, unicorn_walker_mips, ratio
  boot  whole-process wall time of ``vmlab run guests/hello.asm``: hello_wall_s
  churn 50 VMs created, run (guests/hello.asm) and closed in one process:
        first_ms, last_ms (create+run+close of the first and the last VM),
        ratio = last_ms / first_ms (target <= 1.2), median_ms, and
        rss_growth_mb (RSS after the last VM minus after the first; target <= 64)
  debug MIPS with 16 breakpoints on code that never runs / MIPS without a
        debugger: bp_ratio (target >= 0.95); Debugger.step() rate on hello:
        steps_per_s (target >= 20,000) (tools/bench_debug.py)
  virtio guests/virtio_blk.c reading a 64 MiB raw image over virtio-blk/virtio-mmio:
        blk_seq_read_mb_s (64 KiB requests, 32 in flight), blk_rand_read_iops
        (4 KiB, 32 in flight), blk_us_per_request (tools/bench_virtio.py)
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_ADDR, DATA_ADDR = 0x100000, 0x200000

# A load and ALU work per iteration, like the platform notes' measurement.  (Stores
# are slow in Unicorn itself: every store takes QEMU's not-dirty slow path.)
_COMPUTE = """
    mov rcx, {n}
    mov rbx, 0x200000
loop:
    mov rax, [rbx]
    add rdx, rax
    xor rdx, rcx
    dec rcx
    jnz loop
"""
INSNS_PER_ITER = 5
# The same work unrolled 4x: 17 instructions per block.
_COMPUTE_LONG = """
    mov rcx, {n}
    mov rbx, 0x200000
loop:
""" + """    mov rax, [rbx]
    add rdx, rax
    xor rdx, rcx
    add rbx, 8
""" * 4 + """    sub rbx, 32
    dec rcx
    jnz loop
"""
INSNS_PER_ITER_LONG = 19


def compute_code(n: int, tail: str, body: str = _COMPUTE) -> bytes:
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    return bytes(ks.asm(body.format(n=n) + tail, CODE_ADDR)[0])


def bench_mips(n: int = 20_000_000, reps: int = 3) -> dict:
    """Same loops, same process: raw Unicorn vs vmlab's Vm.  ``ratio`` is for a
    5-instruction loop block; ``ratio_long_blocks`` for a 19-instruction one;
    ``ratio_host_clock`` for the 5-instruction loop with clock="host".  Each
    figure is the best of ``reps`` runs, raw and vmlab interleaved (the machines
    are shared: other load only ever slows a run down)."""
    short = _mips_runs(_COMPUTE, n, INSNS_PER_ITER, reps, ("virtual", "host"))
    long_ = _mips_runs(_COMPUTE_LONG, n // 4, INSNS_PER_ITER_LONG, reps, ("virtual",))
    raw, vml, host = short["raw"], short["virtual"], short["host"]
    return {"raw_unicorn_mips": raw, "vmlab_mips": vml, "ratio": round(vml / raw, 3),
            "ratio_long_blocks": round(long_["virtual"] / long_["raw"], 3),
            "vmlab_host_clock_mips": host, "ratio_host_clock": round(host / raw, 3)}


def bench_tb(n: int = 20_000_000) -> dict:
    """The mips loop with the block registry counting executions and every trap
    kind armed: what the TB cache's bookkeeping costs."""
    from vmlab.emu.cpu import TRAP_KINDS
    raw, vml, ratio = _mips_pair(_COMPUTE, n, INSNS_PER_ITER,
                                 setup=lambda vm: (vm.vcpu.set_traps(TRAP_KINDS),
                                                   vm.tbs.set_exec_counting(True)))
    return {"raw_unicorn_mips": raw, "vmlab_mips": vml, "ratio": ratio}


def _mips_pair(body: str, n: int, per_iter: int, setup=None):
    """(raw MIPS, vmlab MIPS, ratio) of one run each."""
    r = _mips_runs(body, n, per_iter, 1, ("virtual",), setup)
    return r["raw"], r["virtual"], round(r["virtual"] / r["raw"], 3)


def _mips_runs(body: str, n: int, per_iter: int, reps: int, clocks, setup=None) -> dict:
    """Best MIPS of ``reps`` interleaved runs: {"raw": ..., clock: ...} for raw
    Unicorn and for vmlab's Vm on each clock in ``clocks``."""
    insns = n * per_iter
    best: dict[str, float] = {}
    for _ in range(reps):
        for what in ("raw",) + tuple(clocks):
            s = _raw_run(body, n) if what == "raw" else _vm_run(body, n, what, setup)
            best[what] = min(best.get(what, s), s)
    return {k: round(insns / s / 1e6, 1) for k, s in best.items()}


def _raw_run(body: str, n: int) -> float:
    """Seconds raw Unicorn takes: a UC_MODE_64 engine runs 64-bit code flat, no hooks."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    code = compute_code(n, "nop", body)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(CODE_ADDR, code)
    t = time.perf_counter()
    uc.emu_start(CODE_ADDR, CODE_ADDR + len(code))
    return time.perf_counter() - t


def _vm_run(body: str, n: int, clock: str, setup=None) -> float:
    """Seconds vmlab's Vm takes for the same loop (ended by isa-debug-exit)."""
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm

    code = compute_code(n, "mov al, 0\n out 0xf4, al", body)
    vm = Vm(16 << 20, serial=None, clock=clock)
    try:
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=CODE_ADDR, flat_mode="long64"))
        if setup is not None:
            setup(vm)
        t = time.perf_counter()
        res = vm.run()
        dt = time.perf_counter() - t
    finally:
        vm.close()
    if res.reason != "debug-exit":
        raise RuntimeError(f"mips guest did not finish: {res}")
    return dt


def _vmlab_cmd() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("vmlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vmlab.tools"]


def bench_boot(runs: int = 5) -> dict:
    """Wall time of the whole ``vmlab run guests/hello.asm`` process (best of runs)."""
    hello = ROOT / "guests" / "hello.asm"
    cmd = _vmlab_cmd() + ["run", str(hello), "--serial", "none"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True)        # warm the build cache
    best = None
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True)
        dt = time.perf_counter() - t
        if p.returncode != 1:
            raise RuntimeError(f"hello guest failed (status {p.returncode}): {p.stderr.decode()[-300:]}")
        best = dt if best is None else min(best, dt)
    return {"hello_wall_s": round(best, 3)}


def _smc_image(n: int, tmpdir: pathlib.Path) -> pathlib.Path:
    """guests/smc.asm with its patch-and-run loop set to n iterations."""
    import struct
    from vmlab.tools.asm import build
    data = bytearray(build(ROOT / "guests" / "smc.asm").read_bytes())
    marker = struct.pack("<II", 2000, 2001000)
    i = data.find(marker)
    if i < 0:
        raise RuntimeError("smc guest layout changed: iteration count not found")
    struct.pack_into("<II", data, i, n, (n * (n + 1) // 2) & 0xFFFFFFFF)
    out = tmpdir / f"smc-{n}.bin"
    out.write_bytes(bytes(data))
    return out


def _wall(cmd) -> float:
    best = None
    for _ in range(3):
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600)
        dt = time.perf_counter() - t
        if p.returncode != 1:
            raise RuntimeError(f"{cmd[0]} failed on the smc guest (status {p.returncode}): "
                               f"{p.stdout.decode()[-300:]} {p.stderr.decode()[-300:]}")
        best = dt if best is None else min(best, dt)
    return best


def bench_smc(n: int = 20_000) -> dict:
    """The smc guest's patch-and-run loop (store an immediate into a function,
    call it) for n iterations; startup is subtracted by also timing 1 iteration.
    QEMU TCG runs the same image when installed; ratio = qemu_s / vmlab_s."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as td:
        tmp = pathlib.Path(td)
        big, small = _smc_image(n, tmp), _smc_image(1, tmp)
        vm = lambda img: _vmlab_cmd() + ["run", str(img), "--serial", "none"]
        out = {"iterations": n, "vmlab_s": round(_wall(vm(big)) - _wall(vm(small)), 3)}
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            q = lambda img: [qemu, "-nographic", "-no-reboot", "-display", "none", "-monitor", "none",
                             "-serial", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                             "-m", "64", "-kernel", str(img)]
            out["qemu_s"] = round(_wall(q(big)) - _wall(q(small)), 3)
            out["ratio"] = round(out["qemu_s"] / max(out["vmlab_s"], 1e-6), 3)
    return out


def bench_exit(n: int = 20_000) -> dict:
    """Cost of one VM exit handled in Python (CPUID, OUT, MOV CR0 and #UD loops
    under a VMCS, handler = skip / emulate), and of a CPUID answered by the native policy path
    (the CPU model in C, no exit), same process."""
    from vmlab.vmm.exit_reasons import ExitReason
    from vmlab.vmm.harness import vmx_guest

    def per_exit(code: str, reason, handler, **kw) -> float:
        # best of three runs, each on a new guest: the machines are shared and
        # the noise is one-sided (as the nested and breakdown figures)
        best = None
        for _ in range(3):
            g = vmx_guest(code.format(n=n), **kw)
            g.handler(reason)(handler)
            t = time.perf_counter()
            ex = g.run()
            dt = time.perf_counter() - t
            if ex.reason != ExitReason.VMCALL:
                raise RuntimeError(f"exit bench ended with {ex.reason!r}")
            g.close()
            best = dt if best is None else min(best, dt)
        return best / n

    cpuid = per_exit("mov ecx, {n}\n l: mov eax, 1\n push rcx\n cpuid\n pop rcx\n dec ecx\n jnz l\n vmcall",
                     ExitReason.CPUID, lambda ex: ex.skip())
    io = per_exit("mov ecx, {n}\n l: out 0x80, al\n dec ecx\n jnz l\n vmcall",
                  ExitReason.IO_INSTRUCTION, lambda ex: ex.skip())
    # MOV to CR0 changing a bit the guest/host mask owns (TS; read shadow 0)
    cr = per_exit("mov ecx, {n}\n mov rax, cr0\n or eax, 8\n l: mov cr0, rax\n dec ecx\n jnz l\n vmcall",
                  ExitReason.CR_ACCESS, lambda ex: ex.skip(), fields={"CR0_GUEST_HOST_MASK": 8, "CR0_READ_SHADOW": 0})

    def skip_ud2(ex):
        # a fault's exit has instruction length 0: the handler skips the ud2's 2 bytes
        ex.instruction_length = 2
        ex.skip()
    # #UD intercepted by the exception bitmap (bit 6)
    exc = per_exit("mov ecx, {n}\n l: ud2\n dec ecx\n jnz l\n vmcall", ExitReason.EXCEPTION_NMI, skip_ud2,
                   exception_bitmap=1 << 6)

    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    big = 2_000_000

    def native(body: str) -> float:
        code = compute_code(big, "mov al, 0\n out 0xf4, al", "mov rcx, {n}\n loop:\n" + body + "\n dec rcx\n jnz loop\n")
        vm = Vm(16 << 20, serial=None)
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=CODE_ADDR, flat_mode="long64"))
        t = time.perf_counter()
        vm.run()
        return time.perf_counter() - t

    with_cpuid = native("mov r8, rcx\n mov eax, 1\n cpuid\n mov rcx, r8")
    without = native("mov r8, rcx\n mov eax, 1\n nop\n mov rcx, r8")
    with_rdtsc = native("mov r8, rcx\n mov eax, 1\n rdtsc\n mov rcx, r8")
    # a plain instruction: 32 more register adds per iteration
    plain = (native("mov r8, rcx\n mov eax, 1\n" + "add r9, 1\n" * 33 + "mov rcx, r8") - without) / (32 * big)
    from vmlab.tools.bench_exit import exit_breakdown
    return {"cpuid_python_us": round(cpuid * 1e6, 2), "io_python_us": round(io * 1e6, 2),
            "cr_python_us": round(cr * 1e6, 2), "exc_python_us": round(exc * 1e6, 2),
            "cpuid_native_ns": round(max(with_cpuid - without, 0) / big * 1e9, 1),
            "rdtsc_native_ns": round(max(with_rdtsc - without, 0) / big * 1e9, 1),
            "plain_insn_ns": round(max(plain, 0) * 1e9, 2),
            "breakdown": exit_breakdown()}


def bench_tlb() -> dict:
    """Cold 2D TLB fills (4-level guest x 4-level EPT) in C and in the Python twin."""
    from vmlab.tools.bench_tlb import bench_tlb as run
    return run()


_HOP = """
    mov rcx, {n}
    xor rbx, rbx
loop:
    mov rax, [rbx + 0x1000000]
    add rbx, 0x1000
    and rbx, 0xffffff
    dec rcx
    jnz loop
"""


def bench_paging(n: int = 4_000_000) -> dict:
    """A page-hopping guest (a load from each of 4096 pages in turn, 2 MiB
    identity paging) on vmlab's soft-MMU (C walker at every TLB miss) and on
    Unicorn's own walker (UC_TLB_CPU), same process."""
    import struct
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4

    insns = n * 5
    code = compute_code(n, "nop", _HOP)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 64 << 20)
    uc.mem_write(CODE_ADDR, code)
    uc.mem_write(0x1000, struct.pack("<Q", 0x2003))
    uc.mem_write(0x2000, struct.pack("<Q", 0x3003))
    uc.mem_write(0x3000, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(32)))
    uc.reg_write(UC_X86_REG_CR3, 0x1000)
    uc.reg_write(UC_X86_REG_CR4, 0x20)
    uc.reg_write(UC_X86_REG_CR0, 0x80000011)          # a UC_MODE_64 engine starts with LMA set
    t = time.perf_counter()
    uc.emu_start(CODE_ADDR, CODE_ADDR + len(code))
    raw_s = time.perf_counter() - t

    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    code = compute_code(n, "mov al, 0\n out 0xf4, al", _HOP)
    vm = Vm(64 << 20, serial=None)
    vm.load(load(code, fmt="flat", ram_size=64 << 20, flat_addr=CODE_ADDR, flat_mode="long64"))
    fills0 = vm.vcpu.native.stat_fills
    t = time.perf_counter()
    res = vm.run()
    vm_s = time.perf_counter() - t
    if res.reason != "debug-exit":
        raise RuntimeError(f"paging guest did not finish: {res}")
    raw, vml = insns / raw_s / 1e6, insns / vm_s / 1e6
    return {"vmlab_mips": round(vml, 1), "unicorn_walker_mips": round(raw, 1), "ratio": round(vml / raw, 3),
            "vmlab_fills": vm.vcpu.native.stat_fills - fills0}


def _rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm, field 2, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_churn(n: int = 50) -> dict:
    """Create a VM, run guests/hello.asm in it and close it, n times in one
    process.  A VM that leaves anything behind (mapped RAM, an engine, native
    state) or a per-VM cost that grows with the dead VMs shows as last_ms above
    first_ms or as RSS growth.  The first VM also pays the once-per-process
    CPU-state self-test (a few ms)."""
    from vmlab.emu.loaders import load, read_image
    from vmlab.tools.asm import build
    from vmlab.vmm.vm import Vm

    ram = 64 << 20
    data = read_image(str(build(ROOT / "guests" / "hello.asm")))
    times, rss_first = [], 0
    for i in range(n):
        t = time.perf_counter()
        with Vm(ram, serial=None) as vm:
            vm.load(load(data, ram_size=ram))
            res = vm.run(max_insns=50_000_000)
            if res.reason != "debug-exit":
                raise RuntimeError(f"hello guest did not finish in VM {i + 1}: {res}")
        times.append(time.perf_counter() - t)
        if i == 0:
            rss_first = _rss_bytes()
    growth = _rss_bytes() - rss_first
    first, last = times[0] * 1e3, times[-1] * 1e3
    return {"vms": n, "first_ms": round(first, 1), "last_ms": round(last, 1), "ratio": round(last / first, 3),
            "median_ms": round(sorted(times)[n // 2] * 1e3, 1), "rss_growth_mb": round(growth / (1 << 20), 1)}


def bench_debug() -> dict:
    from vmlab.tools.bench_debug import bench_debug as run
    return run()


def _bench_virtio() -> dict:
    from vmlab.tools.bench_virtio import bench_virtio
    return bench_virtio()


BENCHES = {"mips": bench_mips, "boot": bench_boot, "tb": bench_tb, "smc": bench_smc, "exit": bench_exit, "tlb": bench_tlb,
           "paging": bench_paging, "churn": bench_churn, "debug": bench_debug, "virtio": _bench_virtio,
           "nested": lambda: __import__("vmlab.tools.bench_nested", fromlist=["bench_nested"]).bench_nested(),
           "linux": lambda: __import__("vmlab.tools.bench_linux", fromlist=["bench_linux"]).bench_linux()}


def main(names, as_json: bool = False) -> int:
    names = list(names) or list(BENCHES)
    if names == ["list"]:
        print(__doc__.split("Benchmarks (``vmlab bench list``):\n", 1)[1].rstrip())
        return 0
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.stderr.write(f"vmlab: error: unknown benchmark(s): {', '.join(unknown)} "
                         f"(known: {', '.join(BENCHES)})\n")
        return 2
    out = {}
    for n in names:
        out[n] = BENCHES[n]()
        if not as_json:
            print(f"{n}: " + ", ".join(f"{k}={v}" for k, v in out[n].items()), flush=True)
    if as_json:
        print(json.dumps(out))
    return 0

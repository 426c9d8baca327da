"""The CPU model advertises only what runs (issue 11, Deliver item 2).

Every CPUID feature bit the model sets has an entry in emu.cpuprobe.FEATURES
whose proof exists; every feature that names instructions runs on a vCPU in long
mode without #UD (and computes the right value where the probe says one); the
start-up probe clears what the Unicorn CPU model does not execute."""
import pathlib
import re
import subprocess
import sys

import pytest

from vmlab.emu import cpuid as C
from vmlab.emu import cpuprobe as P
from tests.support import Machine, asm, gate64

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: feature leaves of SDM Vol. 2A CPUID (Tables 3-10, 3-11; leaf 07H; 80000001H)
FEATURE_LEAVES = [(1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                  (0x80000001, 0, "ecx"), (0x80000001, 0, "edx")]
PROBED = [f for f in P.FEATURES if f.probe is not None]


def _advertised(model):
    for leaf, sub, reg in FEATURE_LEAVES:
        value = model.lookup(leaf, sub)[P.REGS.index(reg)]
        for bit in range(32):
            if value >> bit & 1:
                yield leaf, sub, reg, bit


def _proof_exists(proof: str) -> bool:
    if "::" in proof:
        path, name = proof.split("::")
        f = ROOT / path
        return f.is_file() and re.search(rf"^def {re.escape(name)}\(", f.read_text(), re.M) is not None
    path, _, text = proof.partition(": ")
    f = ROOT / path
    return f.is_file() and text.strip('"') in f.read_text() and path.startswith("guests/") and path.endswith(".asm")


@pytest.mark.parametrize("vmx", [False, True], ids=["plain", "vmx"])
def test_cpu_model_every_advertised_bit_has_a_feature_with_an_existing_proof(vmx):
    model = C.CpuidModel(vmx=vmx)
    seen = 0
    for leaf, sub, reg, bit in _advertised(model):
        f = P.BY_BIT.get((leaf, sub, reg), {}).get(bit)
        assert f is not None, f"CPUID.{leaf:#x}.{sub}:{reg}[{bit}] is advertised but has no emu.cpuprobe entry"
        assert _proof_exists(f.proof), f"{f.name}: proof {f.proof!r} not found"
        seen += 1
    assert seen >= 30


def test_cpu_model_default_engine_runs_every_probe():
    """Broadwell executes every advertised instruction: nothing is cleared, so the
    CPUID answer is the full table."""
    assert P.failing_features("broadwell") == frozenset()
    model = C.CpuidModel()
    assert all(model.advertises(f.name) for f in P.FEATURES if f.name != "vmx")


@pytest.mark.parametrize("f", PROBED, ids=lambda f: f.name)
def test_cpu_model_advertised_feature_runs_without_ud(f):
    model = C.CpuidModel()
    assert model.advertises(f.name)
    # CR4.OSFXSR|OSXMMEXCPT so that SSE instructions are not #UD (SDM Vol. 3A 13.1.3)
    code = asm(f"mov rax, cr4; or eax, 0x600; mov cr4, rax; mov rsp, 0x80000; xor eax, eax; {f.probe}; "
               "mov r14, rax; mov ebx, 0x600d; hlt", 0x100000, 64)
    m = Machine()
    try:
        m.boot(code, 0x100000, "long64")
        res = m.run(max_insns=1000)
        assert res.reason == "halted", res
        regs = m.cpu.refresh()
        assert regs.gpr[3] == 0x600D, f"{f.probe} did not complete: {res}"
        if f.expect is not None:
            assert regs.gpr[14] & 0xFFFFFFFF == f.expect
    finally:
        m.close()


def test_cpu_model_probe_on_haswell_engine_clears_smap_from_cpuid_and_cr4():
    """Unicorn's Haswell model raises #UD for CLAC/STAC: the probe clears
    CPUID.(7,0):EBX.SMAP[20] and CR4.SMAP becomes reserved."""
    from vmlab.emu import x86
    assert "smap" in P.failing_features("haswell")
    model = C.CpuidModel(unicorn_model="haswell")
    assert not model.advertises("smap") and model.advertises("smep")
    assert not model.cr4_valid_mask() & x86.CR4_SMAP
    assert C.CpuidModel().cr4_valid_mask() & x86.CR4_SMAP


def _cpuid_guest(leaf: int, model) -> int:
    """EBX/ECX of CPUID(leaf, 0) as a long-mode guest on a Vm with this model sees it."""
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    code = asm(f"mov eax, {leaf}; xor ecx, ecx; cpuid; hlt", 0x100000, 64)
    with Vm(16 << 20, serial=None, cpuid=model) as vm:
        vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=0x100000, flat_mode="long64"))
        assert vm.run(max_insns=1000).reason == "halted"
        r = vm.vcpu.refresh()
        return r.gpr[3] | r.gpr[1] << 32


def test_cpu_model_guest_on_haswell_engine_sees_no_smap_and_clac_is_not_advertised():
    assert not _cpuid_guest(7, C.CpuidModel(unicorn_model="haswell")) >> 20 & 1
    assert _cpuid_guest(7, C.CpuidModel()) >> 20 & 1


def test_cpu_model_probe_is_cached_once_per_process():
    a = P.failing_features("qemu64")
    assert P.failing_features("qemu64") is a
    assert {"popcnt", "sse4_2", "smap"} <= a


def test_cpu_model_hypervisor_bit_is_set():
    """CPUID.1:ECX[31]: a hypervisor is present (vmlab is one)."""
    assert _cpuid_guest(1, C.CpuidModel()) >> 32 >> 31 & 1


def test_cpu_model_cr4_de_makes_dr4_undefined():
    """CPUID.1:EDX.DE: with CR4.DE = 1, MOV from DR4 is #UD; with DE = 0 it
    aliases DR6 (SDM Vol. 3A 18.2.2)."""
    base, handler, idt = 0x100000, 0x101000, 0x102000
    for de, expect in ((False, 0x600D), (True, 0x6)):
        code = asm(f"mov rax, {idt:#x}; mov word ptr [rax + 4096], 0xfff; mov qword ptr [rax + 4098], rax; "
                   f"lidt [rax + 4096]; mov rax, cr4; {'or eax, 8' if de else 'and eax, ~8'}; mov cr4, rax; "
                   "mov rsp, 0x80000; mov rax, dr4; mov ebx, 0x600d; hlt", base, 64)
        m = Machine()
        try:
            m.boot(code, base, "long64")
            m.mem.write(handler, asm("mov ebx, 6; hlt", handler, 64))
            m.mem.write(idt + 6 * 16, gate64(handler, 0x08))
            res = m.run(max_insns=1000)
            assert res.reason == "halted", res
            assert m.cpu.refresh().gpr[3] == expect, (de, hex(m.cpu.regs.gpr[3]))
        finally:
            m.close()


def test_cpu_model_mtrr_msrs_follow_mtrrcap():
    """CPUID.1:EDX.MTRR: IA32_MTRRCAP reports 8 variable ranges, fixed ranges
    and WC (SDM Vol. 3A 12.11.2.1); the variable and fixed MTRRs and
    IA32_MTRR_DEF_TYPE exist and round-trip; MTRRCAP is read-only."""
    from vmlab.emu.msr import IA32_MTRR_DEF_TYPE, IA32_MTRR_FIX64K_00000, IA32_MTRR_PHYSBASE0, IA32_MTRRCAP, MsrFault
    m = Machine()
    try:
        msrs = m.vm.msrs
        cap = msrs.read(IA32_MTRRCAP)
        assert cap & 0xFF == 8 and cap >> 8 & 1 and cap >> 10 & 1
        for i in range(2 * (cap & 0xFF)):
            msrs.write(IA32_MTRR_PHYSBASE0 + i, 0x800 | 0x1000 if i & 1 else 0x1006)
            assert msrs.read(IA32_MTRR_PHYSBASE0 + i) == (0x1800 if i & 1 else 0x1006)
        msrs.write(IA32_MTRR_FIX64K_00000, 0x0606060606060606)
        msrs.write(IA32_MTRR_DEF_TYPE, 0xC06)
        assert msrs.read(IA32_MTRR_DEF_TYPE) == 0xC06
        with pytest.raises(MsrFault):
            msrs.write(IA32_MTRRCAP, cap)
    finally:
        m.close()


def test_cli_cpu_help_lists_models_cleared_features_and_advertised_bits():
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", "--cpu", "help"], cwd=ROOT, capture_output=True,
                       timeout=120, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert re.search(r"^  haswell +cleared: smap$", out, re.M)
    assert re.search(r"^  broadwell +cleared: none \(default\)$", out, re.M)
    for f in P.FEATURES:
        if f.name != "vmx":
            assert re.search(rf"^  {f.name} +CPUID\.{f.leaf:X}H:{f.reg.upper()}\[{f.bit}\]", out, re.M), f.name
    assert len(re.findall(r"^  \S+ +cleared:", out, re.M)) == len(P.unicorn_models())


def test_cli_cpu_unknown_model_is_usage_status_2():
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", "--cpu", "pentium9", "guests/hello.asm"], cwd=ROOT,
                       capture_output=True, timeout=120, text=True)
    assert p.returncode == 2 and "unknown CPU model 'pentium9'" in p.stderr

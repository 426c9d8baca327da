"""The CPU model advertises only what Unicorn's CPU model (emu.cpu.UNICORN_CPU_MODEL)
executes: for every advertised CPUID feature bit that names instructions, one
of them runs on a vCPU in long mode without #UD."""
import pytest

from emu import cpuid as C
from tests.support import Machine, asm

# (leaf, subleaf, register, bit, instruction) -- SDM Vol. 2A CPUID Tables 3-10, 3-11, 3-8
FEATURES = [
    (1, 0, "ecx", C.SSE3, "addsubps xmm0, xmm1"),
    (1, 0, "ecx", C.SSSE3, "pshufb xmm0, xmm1"),
    (1, 0, "ecx", C.CX16, "cmpxchg16b [rsp - 32]"),
    (1, 0, "ecx", C.SSE41, "ptest xmm0, xmm1"),
    (1, 0, "ecx", C.SSE42, "crc32 eax, ebx"),
    (1, 0, "ecx", C.POPCNT, "popcnt eax, ebx"),
    (1, 0, "edx", C.CX8, "cmpxchg8b [rsp - 32]"),
    (1, 0, "edx", C.CMOV, "cmovz eax, ebx"),
    (1, 0, "edx", C.FXSR, "fxsave [rsp - 1024]"),
    (1, 0, "edx", C.SSE2, "paddq xmm0, xmm1"),
    (1, 0, "edx", C.SSE, "addps xmm0, xmm1"),
    (1, 0, "edx", C.MMX, "paddb mm0, mm1"),
    (1, 0, "edx", C.CLFSH, "clflush [rsp - 64]"),
    (7, 0, "ebx", C.SMAP, ".byte 0x0f, 0x01, 0xcb; .byte 0x0f, 0x01, 0xca"),   # STAC; CLAC
    (0x80000001, 0, "edx", C.RDTSCP, "rdtscp"),
    (0x80000001, 0, "ecx", C.LAHF_LM, "lahf; sahf"),
]
_REG = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


@pytest.mark.parametrize("leaf,sub,reg,bit,text", FEATURES, ids=lambda v: v if isinstance(v, str) else None)
def test_cpu_model_advertised_feature_runs_without_ud(leaf, sub, reg, bit, text):
    model = C.CpuidModel()
    assert model.lookup(leaf, sub)[_REG[reg]] >> bit & 1, "the feature is advertised"
    # CR4.OSFXSR so that SSE instructions are not #UD (SDM Vol. 3A 13.1.3)
    code = asm(f"mov rax, cr4; or eax, 0x600; mov cr4, rax; mov rsp, 0x80000; {text}; mov ebx, 0x600d; hlt",
               0x100000, 64)
    m = Machine()
    try:
        m.boot(code, 0x100000, "long64")
        res = m.run(max_insns=1000)
        assert res.reason == "halted", res
        assert m.cpu.refresh().gpr[3] == 0x600D, f"{text} did not complete: {res}"
    finally:
        m.close()

"""What the CPU model tells Linux (issue 13): the TSC rate in CPUID 15H/16H
and IA32_ARCH_CAPABILITIES with the "not affected" bits, so the kernel needs
no PIT calibration and patches in no mitigation (the ITS return thunks)."""
from vmlab.emu.cpuid import TSC_HZ, CpuidModel
from vmlab.emu.msr import IA32_ARCH_CAPABILITIES, MsrFault, MsrModel

ITS_NO, MDS_NO, RDCL_NO = 1 << 62, 1 << 5, 1 << 0


class _Vcpu:
    icount = 0


def test_cpuid_leaf_15h_gives_a_1ghz_tsc_and_crystal():
    m = CpuidModel()
    eax, ebx, ecx, _ = m.lookup(0x15)
    assert ecx * ebx // eax == TSC_HZ == 10**9 and m.lookup(0)[0] >= 0x16
    assert m.lookup(0x16)[0] == 1000


def test_arch_capabilities_msr_reports_the_not_affected_bits():
    m = CpuidModel()
    assert m.lookup(7, 0)[3] >> 29 & 1
    msrs = MsrModel(_Vcpu(), m)
    value = msrs.read(IA32_ARCH_CAPABILITIES)
    assert value & ITS_NO and value & MDS_NO and value & RDCL_NO
    try:
        msrs.write(IA32_ARCH_CAPABILITIES, 0)
    except MsrFault:
        pass
    else:
        raise AssertionError("IA32_ARCH_CAPABILITIES is read-only (#GP on WRMSR)")


def test_arch_capabilities_absent_without_the_cpuid_bit_is_gp():
    m = CpuidModel(arch_capabilities=False)
    assert not m.lookup(7, 0)[3] >> 29 & 1
    try:
        MsrModel(_Vcpu(), m).read(IA32_ARCH_CAPABILITIES)
    except MsrFault:
        return
    raise AssertionError("RDMSR of IA32_ARCH_CAPABILITIES without CPUID.7:EDX[29] must #GP")

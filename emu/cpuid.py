"""CPUID model: one consistent, configurable answer table.

It advertises nothing the machine does not emulate (no AVX/XSAVE, no PCID), because Unicorn's default Haswell model does (leaf 0xD
claims AVX state while leaf 1 has no AVX; docs/platform-notes.md).  The
table is loaded into the native CPUID hook, so CPUID costs no Python.
Bit positions: SDM Vol. 2A, CPUID, Tables 3-8 .. 3-20.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Leaf 1 EDX (SDM Vol. 2A Table 3-11)
FPU, DE, PSE, TSC, MSR, PAE, CX8, APIC, SEP, MTRR, PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2 = (
    0, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 19, 23, 24, 25, 26)
# Leaf 1 ECX (Table 3-10)
SSE3, VMX, SSSE3, CX16, SSE41, SSE42, X2APIC, POPCNT, TSC_DEADLINE, HYPERVISOR = 0, 5, 9, 13, 19, 20, 21, 23, 24, 31
# Leaf 7.0 EBX
SMEP, SMAP = 7, 20
# Leaf 0x80000001 EDX / ECX
SYSCALL, NX, PDPE1GB, RDTSCP, LM = 11, 20, 26, 27, 29
LAHF_LM = 0


#: the TSC's rate: virtual time counts 1 ns per instruction (vmm/vm.py)
TSC_HZ = 1_000_000_000


def _bits(*ns: int) -> int:
    out = 0
    for n in ns:
        out |= 1 << n
    return out


def _regs_of_string(s: bytes) -> tuple[int, int, int, int]:
    s = s.ljust(16, b"\0")
    return tuple(int.from_bytes(s[i:i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


@dataclass
class CpuidModel:
    """The CPU vmlab presents.  Change fields (or ``overrides``) to model another;
    ``overrides`` maps (leaf, subleaf) to (eax, ebx, ecx, edx)."""
    vendor: bytes = b"GenuineIntel"
    signature: int = 0x000306C3            # family 6, model 0x3C, stepping 3
    brand: bytes = b"vmlab virtual CPU"
    maxphyaddr: int = 40
    linear_bits: int = 48
    vmx: bool = False
    smep: bool = True
    smap: bool = True
    has_pdpe1gb: bool = True
    #: CPUID.(EAX=7,ECX=0):EDX[29] and the IA32_ARCH_CAPABILITIES MSR (emu/msr.py)
    arch_capabilities: bool = True
    #: CPUID.1:EDX.APIC[9]: 0 while IA32_APIC_BASE.EN = 0 (SDM Vol. 3A 11.4.3)
    apic: bool = True
    #: CPUID.1:ECX.x2APIC[21]: IA32_APIC_BASE.EXTD and MSRs 800H-8FFH (devices/lapic.py)
    x2apic: bool = True
    #: CPUID.1:ECX.TSC_DEADLINE[24]: LVT timer mode 10b and IA32_TSC_DEADLINE (6E0H)
    tsc_deadline: bool = True
    overrides: dict = field(default_factory=dict)
    #: the Unicorn CPU model the vCPU runs on (emu.cpuprobe.unicorn_models(); -cpu)
    unicorn_model: str = "broadwell"
    #: clear every feature whose instructions fail on that engine model
    #: (emu.cpuprobe.failing_features: probed once per process and model)
    probe: bool = True

    max_basic: int = 0x16
    max_ext: int = 0x80000008

    def leaf1(self) -> tuple[int, int, int, int]:
        ebx = (8 << 8) | (1 << 16)          # CLFLUSH 64-byte line, 1 logical CPU, APIC ID 0
        ecx = _bits(SSE3, SSSE3, CX16, SSE41, SSE42, POPCNT, HYPERVISOR) | (_bits(VMX) if self.vmx else 0)
        ecx |= (_bits(X2APIC) if self.x2apic else 0) | (_bits(TSC_DEADLINE) if self.tsc_deadline else 0)
        edx = _bits(FPU, DE, PSE, TSC, MSR, PAE, CX8, SEP, MTRR, PGE, CMOV, PAT, PSE36, CLFSH,
                    MMX, FXSR, SSE, SSE2) | (_bits(APIC) if self.apic else 0)
        return self._probed(1, 0, (self.signature, ebx, ecx, edx))

    def cleared(self) -> frozenset[str]:
        """Names of the features the engine probe cleared (emu.cpuprobe)."""
        if not self.probe:
            return frozenset()
        from .cpuprobe import failing_features
        return failing_features(self.unicorn_model)

    def advertises(self, name: str) -> bool:
        """Whether CPUID reports the feature ``name`` (emu.cpuprobe.FEATURES)."""
        from .cpuprobe import BY_NAME, REGS
        f = BY_NAME[name]
        return bool(self.lookup(f.leaf, f.sub)[REGS.index(f.reg)] >> f.bit & 1)

    def _probed(self, leaf: int, sub: int, regs):
        if not self.probe:
            return regs
        from .cpuprobe import REGS, cleared_masks
        masks = cleared_masks(self.unicorn_model)
        return tuple(r & ~masks.get((leaf, sub, REGS[i]), 0) for i, r in enumerate(regs))

    def entries(self):
        """[(leaf, subleaf, subleaf_significant, (eax, ebx, ecx, edx))]."""
        v = _regs_of_string(self.vendor)
        leaf7_ebx = (_bits(SMEP) if self.smep else 0) | (_bits(SMAP) if self.smap else 0)
        brand = self.brand.ljust(48, b"\0")
        ext1_edx = _bits(SYSCALL, NX, RDTSCP, LM) | (_bits(PDPE1GB) if self.has_pdpe1gb else 0)
        table = {
            (0, None): (self.max_basic, v[0], v[2], v[1]),
            (1, None): self.leaf1(),
            (2, None): (0x00000001, 0, 0, 0x002C307D),
            (4, 0): (0, 0, 0, 0),
            (5, None): (0, 0, 0, 0),
            (6, None): (0, 0, 0, 0),
            # EDX[29]: IA32_ARCH_CAPABILITIES exists (emu/msr.py): it says the CPU
            # is not affected by the speculative-execution bugs Linux otherwise
            # patches around (the ITS return thunks, MDS buffer clearing...).
            (7, 0): (0, leaf7_ebx, 0, 1 << 29 if self.arch_capabilities else 0),
            # Time Stamp Counter and Nominal Core Crystal Clock (SDM Vol. 2A CPUID
            # leaf 15H): TSC = crystal * EBX / EAX = 1 GHz, the rate of virtual
            # time (1 instruction = 1 ns); Linux then needs no PIT calibration
            # and takes the LAPIC timer rate (also 1 GHz) from ECX.
            (0x15, None): (1, 1, TSC_HZ, 0),
            # Processor Frequency Information (leaf 16H): base/max/bus in MHz.
            (0x16, None): (TSC_HZ // 10**6, TSC_HZ // 10**6, TSC_HZ // 10**6, 0),
            (0x80000000, None): (self.max_ext, 0, 0, 0),
            (0x80000001, None): (0, 0, _bits(LAHF_LM), ext1_edx),
            (0x80000002, None): _regs_of_string(brand[0:16]),
            (0x80000003, None): _regs_of_string(brand[16:32]),
            (0x80000004, None): _regs_of_string(brand[32:48]),
            (0x80000005, None): (0, 0, 0, 0),
            (0x80000006, None): (0, 0, 0x01006040, 0),
            (0x80000007, None): (0, 0, 0, 0),
            (0x80000008, None): (self.maxphyaddr | (self.linear_bits << 8), 0, 0, 0),
        }
        for (leaf, sub), regs in table.items():
            if leaf in (7, 0x80000001):
                table[(leaf, sub)] = self._probed(leaf, sub or 0, regs)
        # Overrides are deliberate: they win over the probe.
        for (leaf, sub), regs in self.overrides.items():
            table.pop((leaf, None), None)
            table[(leaf, sub)] = tuple(regs)
        out = []
        for (leaf, sub), regs in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            out.append((leaf, sub or 0, sub is not None, regs))
        return out

    def lookup(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The same answer the native hook gives (Python twin of hook_cpuid)."""
        if (leaf > self.max_basic) if leaf < 0x80000000 else (leaf > self.max_ext):
            leaf = self.max_basic
        for lf, sub, sig, regs in self.entries():
            if lf == leaf and (not sig or sub == subleaf):
                return regs
        return (0, 0, 0, 0)

    # Architectural masks that follow from what is advertised.
    def cr4_valid_mask(self) -> int:
        from . import x86
        # VME/PVI and MCE are not advertised (leaf 1 EDX bits 1 and 7), so they are reserved.
        m = (x86.CR4_TSD | x86.CR4_DE | x86.CR4_PSE | x86.CR4_PAE |
             x86.CR4_PGE | x86.CR4_PCE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT)
        if self.vmx:
            m |= x86.CR4_VMXE
        if self.smep:
            m |= x86.CR4_SMEP
        if self.smap and "smap" not in self.cleared():
            m |= x86.CR4_SMAP
        return m

    def efer_valid_mask(self) -> int:
        from . import x86
        return x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA | x86.EFER_NXE

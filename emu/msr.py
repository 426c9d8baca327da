"""MSR model: what RDMSR/WRMSR do on vmlab's CPU.

Unicorn reads unknown MSRs as 0 and drops writes, accepts non-canonical bases and
reads IA32_APIC_BASE as 0 (docs/platform-notes.md).  vmlab traps RDMSR and
WRMSR and answers here instead: unknown MSRs and reserved or non-canonical
values raise #GP(0) like hardware (SDM Vol. 2B, RDMSR/WRMSR; Vol. 4, Table 2-2).
MSRs that Unicorn itself consumes (SYSENTER_*, STAR/LSTAR/CSTAR/FMASK, FS/GS
bases, EFER) are forwarded to it so SYSCALL/SYSENTER and segment bases work.
"""
from __future__ import annotations

from . import x86

IA32_TSC = 0x10
IA32_PLATFORM_ID = 0x17
IA32_APIC_BASE = 0x1B
IA32_TSC_DEADLINE = 0x6E0
X2APIC_FIRST, X2APIC_LAST = 0x800, 0x8FF         # SDM Vol. 3A 11.12.1.2, Table 11-6
IA32_FEATURE_CONTROL = 0x3A
IA32_BIOS_SIGN_ID = 0x8B
IA32_MTRRCAP = 0xFE
IA32_ARCH_CAPABILITIES = 0x10A
#: IA32_ARCH_CAPABILITIES (SDM Vol. 4 Table 2-2): the "not affected" bits of
#: an emulated CPU that has none of the speculative-execution flaws: RDCL_NO
#: (0), SKIP_L1DFL_VMENTRY (3), SSB_NO (4), MDS_NO (5), PSCHANGE_MC_NO (6),
#: TAA_NO (8), SBDR_SSDP_NO (13), FBSDP_NO (14), PSDP_NO (15), BHI_NO (20),
#: PBRSB_NO (24), GDS_NO (26), RFDS_NO (27), ITS_NO (62).
ARCH_CAPABILITIES_VALUE = sum(1 << b for b in (0, 3, 4, 5, 6, 8, 13, 14, 15, 20, 24, 26, 27, 62))
IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
IA32_MCG_CAP, IA32_MCG_STATUS = 0x179, 0x17A
IA32_MISC_ENABLE = 0x1A0
IA32_DEBUGCTL = 0x1D9
IA32_MTRR_PHYSBASE0 = 0x200            # ..0x20F: PHYSBASEn/PHYSMASKn pairs
IA32_MTRR_FIX64K_00000 = 0x250
IA32_MTRR_FIX16K = (0x258, 0x259)
IA32_MTRR_FIX4K = tuple(range(0x268, 0x270))
IA32_PAT = 0x277
IA32_MTRR_DEF_TYPE = 0x2FF
IA32_EFER = 0xC0000080
IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103

APIC_BASE_DEFAULT = 0xFEE00000
APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_EN = 1 << 8, 1 << 10, 1 << 11
PAT_RESET = 0x0007040600070406
MTRR_VCNT = 8

MSR_NAMES = {
    IA32_TSC: "IA32_TSC", IA32_APIC_BASE: "IA32_APIC_BASE", IA32_FEATURE_CONTROL: "IA32_FEATURE_CONTROL",
    IA32_SYSENTER_CS: "IA32_SYSENTER_CS", IA32_SYSENTER_ESP: "IA32_SYSENTER_ESP",
    IA32_SYSENTER_EIP: "IA32_SYSENTER_EIP", IA32_PAT: "IA32_PAT", IA32_EFER: "IA32_EFER",
    IA32_STAR: "IA32_STAR", IA32_LSTAR: "IA32_LSTAR", IA32_CSTAR: "IA32_CSTAR", IA32_FMASK: "IA32_FMASK",
    IA32_FS_BASE: "IA32_FS_BASE", IA32_GS_BASE: "IA32_GS_BASE", IA32_KERNEL_GS_BASE: "IA32_KERNEL_GS_BASE",
    IA32_TSC_AUX: "IA32_TSC_AUX", IA32_MTRRCAP: "IA32_MTRRCAP", IA32_MTRR_DEF_TYPE: "IA32_MTRR_DEF_TYPE",
    IA32_MISC_ENABLE: "IA32_MISC_ENABLE", IA32_TSC_DEADLINE: "IA32_TSC_DEADLINE",
}

#: MSRs whose state lives inside Unicorn (it uses them itself).
_FORWARDED = {IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP, IA32_STAR, IA32_LSTAR,
              IA32_CSTAR, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE}
_CANONICAL = {IA32_SYSENTER_ESP, IA32_SYSENTER_EIP, IA32_LSTAR, IA32_CSTAR, IA32_FS_BASE,
              IA32_GS_BASE, IA32_KERNEL_GS_BASE}


class MsrFault(Exception):
    """The access raises #GP(0) in the guest."""


class MsrModel:
    """RDMSR/WRMSR semantics for one vCPU (``vcpu`` gives TSC and forwarding)."""

    def __init__(self, vcpu, cpuid):
        self.vcpu = vcpu
        self.cpuid = cpuid
        self.phys_mask = (1 << cpuid.maxphyaddr) - 1
        self.store: dict[int, int] = {
            IA32_APIC_BASE: APIC_BASE_DEFAULT | APIC_BASE_BSP | APIC_BASE_EN,
            IA32_FEATURE_CONTROL: 0,
            IA32_PAT: PAT_RESET,
            IA32_MTRR_DEF_TYPE: 0,
            IA32_MISC_ENABLE: 1,              # fast-string enable
            IA32_DEBUGCTL: 0,
            IA32_MCG_STATUS: 0,
            IA32_TSC_AUX: 0,
        }
        for i in range(2 * MTRR_VCNT):
            self.store[IA32_MTRR_PHYSBASE0 + i] = 0
        for m in (IA32_MTRR_FIX64K_00000, *IA32_MTRR_FIX16K, *IA32_MTRR_FIX4K):
            self.store[m] = 0
        #: observers called after a successful write: fn(msr, value)
        self.on_write = []
        #: MSRs with fixed values that WRMSR refuses (#GP), e.g. the VMX
        #: capability MSRs when VMX is advertised (SDM Vol. 3C Appendix A)
        self.read_only: dict[int, int] = {}
        if getattr(cpuid, "arch_capabilities", False):
            self.read_only[IA32_ARCH_CAPABILITIES] = ARCH_CAPABILITIES_VALUE
        #: the local APIC (devices/lapic.py LocalApic) for the x2APIC MSRs,
        #: IA32_TSC_DEADLINE and IA32_APIC_BASE mode transitions; its MSR
        #: methods raise ValueError for an access that is #GP(0)
        self.apic = None

    def _x2apic(self, msr: int) -> bool:
        return X2APIC_FIRST <= msr <= X2APIC_LAST and self.apic is not None and getattr(self.cpuid, "x2apic", False)

    def _deadline(self, msr: int) -> bool:
        return msr == IA32_TSC_DEADLINE and self.apic is not None and getattr(self.cpuid, "tsc_deadline", False)

    def known(self, msr: int) -> bool:
        return self._x2apic(msr) or self._deadline(msr) or msr in self.read_only or msr in self.store or msr in _FORWARDED or msr in (
            IA32_TSC, IA32_EFER, IA32_MTRRCAP, IA32_PLATFORM_ID, IA32_BIOS_SIGN_ID, IA32_MCG_CAP)

    def read(self, msr: int) -> int:
        """Value of an MSR; raises MsrFault for MSRs the CPU does not have."""
        v = self.vcpu
        if msr in self.read_only:
            return self.read_only[msr]
        if self._x2apic(msr):
            try:
                return self.apic.read_msr(msr)
            except ValueError as e:     # xAPIC mode, a write-only or reserved register
                raise MsrFault(str(e)) from None
        if self._deadline(msr):
            return self.apic.read_tsc_deadline()
        if msr == IA32_TSC:
            return (v.icount + v.native.tsc_offset) & 0xFFFFFFFFFFFFFFFF
        if msr == IA32_EFER:
            return v.read_msr_raw(IA32_EFER)
        if msr == IA32_MTRRCAP:
            return MTRR_VCNT | (1 << 8) | (1 << 10)     # VCNT, FIX, WC (SDM Vol. 3A 12.11.2.1)
        if msr in (IA32_PLATFORM_ID, IA32_BIOS_SIGN_ID, IA32_MCG_CAP):
            return 0
        if msr in _FORWARDED:
            return v.read_msr_raw(msr)
        if msr == IA32_TSC_AUX:
            return v.native.tsc_aux
        if msr in self.store:
            return self.store[msr]
        raise MsrFault(f"RDMSR of unknown MSR {msr:#x}")

    def write(self, msr: int, value: int) -> None:
        """Write an MSR; raises MsrFault for unknown MSRs and bad values."""
        if msr in self.read_only:
            raise MsrFault(f"MSR {msr:#x} is read-only")
        v = self.vcpu
        value &= 0xFFFFFFFFFFFFFFFF
        if msr in _CANONICAL and not x86.canonical(value, self.cpuid.linear_bits):
            raise MsrFault(f"WRMSR {MSR_NAMES.get(msr, hex(msr))} with non-canonical {value:#x}")
        if self._x2apic(msr):
            try:
                self.apic.write_msr(msr, value)
            except ValueError as e:     # xAPIC mode, a read-only register, reserved bits
                raise MsrFault(str(e)) from None
            return
        if self._deadline(msr):
            self.apic.write_tsc_deadline(value)
            return
        if msr == IA32_TSC:
            v.native.tsc_offset = (value - v.icount) & 0xFFFFFFFFFFFFFFFF
        elif msr == IA32_EFER:
            self._write_efer(value)
        elif msr in _FORWARDED:
            if msr == IA32_SYSENTER_CS:
                value &= 0xFFFFFFFF
            v.write_msr_raw(msr, value)
        elif msr == IA32_TSC_AUX:
            if value >> 32:
                raise MsrFault("IA32_TSC_AUX bits 63:32 are reserved")
            v.native.tsc_aux = value
            self.store[msr] = value
        elif msr == IA32_APIC_BASE:
            extd = APIC_BASE_EXTD if getattr(self.cpuid, "x2apic", False) else 0
            reserved = ~(self.phys_mask & ~0xFFF | APIC_BASE_BSP | APIC_BASE_EN | extd) & 0xFFFFFFFFFFFFFFFF
            if value & reserved:
                raise MsrFault(f"IA32_APIC_BASE reserved bits in {value:#x}")
            # SDM Vol. 3A 11.12.5 (Figure 11-28): invalid x2APIC mode transitions are #GP.
            if self.apic is not None and not self.apic.base_transition_ok(value):
                raise MsrFault(f"IA32_APIC_BASE: invalid APIC mode transition to {value:#x}")
            # BSP is read-only (SDM Vol. 3A 11.4.4).
            self.store[msr] = (value & ~APIC_BASE_BSP) | (self.store[msr] & APIC_BASE_BSP)
        elif msr == IA32_FEATURE_CONTROL:
            if self.store[msr] & 1:
                raise MsrFault("IA32_FEATURE_CONTROL is locked")
            self.store[msr] = value
        elif msr == IA32_PAT:
            for i in range(8):
                if ((value >> (8 * i)) & 0xFF) not in (0, 1, 4, 5, 6, 7):
                    raise MsrFault(f"IA32_PAT entry {i} has a reserved memory type")
            self.store[msr] = value
        elif msr == IA32_MTRR_DEF_TYPE:
            if value & ~0xCFF or (value & 0xFF) not in (0, 1, 4, 5, 6):
                raise MsrFault("IA32_MTRR_DEF_TYPE reserved bits or type")
            self.store[msr] = value
        elif IA32_MTRR_PHYSBASE0 <= msr < IA32_MTRR_PHYSBASE0 + 2 * MTRR_VCNT:
            is_mask = (msr - IA32_MTRR_PHYSBASE0) & 1
            allowed = (self.phys_mask & ~0xFFF) | (0x800 if is_mask else 0xFF)
            if value & ~allowed:
                raise MsrFault("MTRR physbase/physmask reserved bits")
            self.store[msr] = value
        elif msr in (IA32_MTRRCAP, IA32_PLATFORM_ID, IA32_MCG_CAP):
            raise MsrFault(f"MSR {msr:#x} is read-only")
        elif msr in self.store:
            self.store[msr] = value
        elif msr == IA32_BIOS_SIGN_ID:
            pass
        else:
            raise MsrFault(f"WRMSR of unknown MSR {msr:#x}")
        for fn in self.on_write:
            fn(msr, value)

    def _write_efer(self, value: int) -> None:
        v = self.vcpu
        old = v.read_msr_raw(IA32_EFER)
        valid = self.cpuid.efer_valid_mask()
        if value & ~valid:
            raise MsrFault(f"IA32_EFER reserved bits in {value:#x}")
        # LMA is read-only; LME cannot change while paging is on (SDM Vol. 3A 10.8.5).
        value = (value & ~x86.EFER_LMA) | (old & x86.EFER_LMA)
        if (v.regs.cr0 & x86.CR0_PG) and (value ^ old) & x86.EFER_LME:
            raise MsrFault("IA32_EFER.LME changed with paging enabled")
        v.write_efer(value)

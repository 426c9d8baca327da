"""x86 architectural constants used across emu/ (SDM Vol. 3A numbering)."""

# CR0 (SDM Vol. 3A 2.5)
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31
CR0_RESET = CR0_CD | CR0_NW | CR0_ET          # 0x60000010 (SDM Vol. 3A Table 10-1)
CR0_VALID = CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG

# CR4 (SDM Vol. 3A 2.5)
CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR4_MCE, CR4_PGE, CR4_PCE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10
CR4_UMIP, CR4_LA57, CR4_VMXE, CR4_SMXE, CR4_FSGSBASE = 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 16
CR4_PCIDE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 17, 1 << 18, 1 << 20, 1 << 21, 1 << 22

# EFER (SDM Vol. 3A 2.2.1)
MSR_EFER = 0xC0000080
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11

# RFLAGS (SDM Vol. 1 3.4.3)
RFLAGS_CF, RFLAGS_FIXED, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF = 1, 2, 4, 0x10, 0x40, 0x80
RFLAGS_TF, RFLAGS_IF, RFLAGS_DF, RFLAGS_OF = 1 << 8, 1 << 9, 1 << 10, 1 << 11
RFLAGS_IOPL, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 3 << 12, 1 << 14, 1 << 16, 1 << 17
RFLAGS_AC, RFLAGS_VIF, RFLAGS_VIP, RFLAGS_ID = 1 << 18, 1 << 19, 1 << 20, 1 << 21

# Segment register indices in QEMU's CPUX86State.segs[] (and vmlab_regs.seg[])
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)

# DR6 status bits (SDM Vol. 3A 18.2.3): BD, BS, BT
DR6_BD, DR6_BS, DR6_BT = 1 << 13, 1 << 14, 1 << 15
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# QEMU SegmentCache.flags: the descriptor's high dword, bits in place (SDM 3.4.5)
DESC_A = 1 << 8
DESC_W = DESC_R = 1 << 9
DESC_E = DESC_C = 1 << 10
DESC_CS = 1 << 11
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

# QEMU hflags bits (target/i386/cpu.h)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP, HF_EM, HF_TS = 1 << 9, 1 << 10, 1 << 11
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
#: hflags bits that follow from segment state (recomputed when vmlab loads segments)
HF_SEG_BITS = HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_CS64

# Exception vectors (SDM Vol. 3A Table 6-1)
DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS, GP, PF, MF, AC, MC, XM, VE, CP = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21)
EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}
#: Vectors that push an error code (SDM Vol. 3A 6.13)
ERROR_CODE_VECTORS = frozenset({DF, TS, NP, SS, GP, PF, AC, CP})
#: Contributory exceptions (SDM Vol. 3A Table 6-4)
CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})
#: Faults: RIP points at the faulting instruction (traps: after it)
TRAP_VECTORS = frozenset({BP, OF})


def canonical(addr: int, bits: int = 48) -> bool:
    """True if addr is canonical for a `bits`-wide linear address space."""
    top = addr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def desc_to_cache(lo: int, hi: int) -> tuple[int, int, int]:
    """(base, limit, flags) of a segment descriptor given as two dwords (SDM 3.4.5)."""
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0x000F0000)
    if hi & DESC_G:
        limit = (limit << 12) | 0xFFF
    return base, limit, hi & 0x00FFFF00

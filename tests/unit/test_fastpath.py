"""The VM-exit fast path: native vmlab_fast_decide_bytes against its Python twin
(emu/fastpath.py), known answers from the SDM, and the VMX layer using it."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmlab.emu import fastpath as fp
from vmlab.emu import trapscan
from vmlab.emu.fastpath import Policy, decide_bytes, decide_bytes_native

KINDS = trapscan.KIND_BIT
#: CPL 0 with CR4.OSXSAVE: nothing comes before a VM exit
P0 = fp.PRIV_OSXSAVE


def G(rcx: int = 0, rdx: int = 0, **regs) -> list[int]:
    """The 16 general registers with RCX and RDX (and others by index: r3=...)."""
    g = [0] * 16
    g[1], g[2] = rcx, rdx
    for k, val in regs.items():
        g[int(k[1:])] = val
    return g

# Instructions that matter to the fast path, with prefixes the decoder must see.
_PLANTED = [
    b"\x0f\xa2",                         # CPUID
    b"\xf4",                             # HLT
    b"\x0f\x31", b"\x0f\x01\xf9",        # RDTSC, RDTSCP
    b"\x0f\x33", b"\x0f\x09", b"\x0f\x08", b"\x0f\x01\xd1",   # RDPMC, WBINVD, INVD, XSETBV
    b"\xe4\x60", b"\xe5\x71", b"\xe6\x80", b"\xe7\xf4",       # IN/OUT imm8
    b"\xec", b"\xed", b"\xee", b"\xef",                       # IN/OUT DX
    b"\x6c", b"\xf3\x6e",                                     # INS/OUTS (never fast)
    b"\x0f\x32", b"\x0f\x30",                               # RDMSR, WRMSR
    b"\x0f\x22\xc0", b"\x0f\x22\xd8", b"\x0f\x22\xe3", b"\x0f\x22\xd0",   # MOV CR0/CR3/CR4/CR2, r
    b"\x44\x0f\x22\xc1", b"\x41\x0f\x22\xdf", b"\x0f\x20\xd8", b"\x44\x0f\x20\xc0",  # CR8, r; CR3, r15; r, CR3/CR8
    b"\x0f\x20\xc0", b"\x0f\x06", b"\x0f\x01\xf0",                # MOV r, CR0; CLTS; LMSW (never fast)
]
_PREFIXES = [b"", b"\x66", b"\x67", b"\xf0", b"\x2e", b"\xf3", b"\x48", b"\x66\x66", b"\x26\x66"]


@st.composite
def policies(draw):
    kinds = draw(st.lists(st.sampled_from(["cpuid", "hlt", "rdtsc", "rdtscp", "rdpmc", "wbinvd", "invd",
                                           "xsetbv", "io", "rdmsr"]), unique=True))
    mask = 0
    for k in kinds:
        mask |= 1 << KINDS[k]
    reason = [draw(st.integers(0, 80)) for _ in trapscan.KIND_NAMES]
    u64 = st.one_of(st.sampled_from([0, 1, 0x20, 0x80000031, 0xFFFFFFFF, (1 << 64) - 1]),
                    st.integers(0, (1 << 64) - 1))
    return Policy(exit_kinds=mask, io_mode=draw(st.sampled_from([fp.FAST_IO_NONE, fp.FAST_IO_ALL,
                                                                  fp.FAST_IO_BITMAPS])),
                  io_bitmap_a=draw(st.integers(0, 0x3000)), io_bitmap_b=draw(st.integers(0, 0x3000)),
                  msr_mode=draw(st.sampled_from([fp.FAST_MSR_NONE, fp.FAST_MSR_ALL, fp.FAST_MSR_BITMAPS])),
                  msr_bitmap=draw(st.integers(0, 0x2000)), reason=reason,
                  cr_mode=draw(st.integers(0, 1)), cr_ctl=draw(st.integers(0, 15)),
                  cr0_mask=draw(u64), cr0_shadow=draw(u64), cr4_mask=draw(u64), cr4_shadow=draw(u64),
                  cr3_count=draw(st.integers(0, 6)), cr3_target=[draw(u64) for _ in range(4)])


def msr_numbers():
    """ECX values around both bitmap ranges' edges, and anything."""
    edges = st.sampled_from([0, 1, 0x10, 0x1B, 0x1FFF, 0x2000, 0xC0000000, 0xC0000080, 0xC0001FFF, 0xC0002000,
                             0xFFFFFFFF])
    return st.one_of(edges, st.integers(0, 0x2100), st.integers(0xBFFFFF00, 0xC0002100),
                     st.integers(0, (1 << 64) - 1))


@st.composite
def codes(draw):
    if draw(st.booleans()):
        body = draw(st.sampled_from(_PREFIXES)) + draw(st.sampled_from(_PLANTED))
        return body + draw(st.binary(max_size=8))
    return draw(st.binary(min_size=0, max_size=16))


@settings(max_examples=1500)
@given(code=codes(), mode=st.sampled_from([16, 32, 64]), rcx=msr_numbers(), rdx=st.integers(0, (1 << 64) - 1),
       others=st.lists(st.one_of(st.sampled_from([0, 0x80000031, 0x2000, 0xFFFFFFFF]),
                                 st.integers(0, (1 << 64) - 1)), min_size=16, max_size=16),
       policy=policies(), ram=st.binary(min_size=0, max_size=0x2000), priv=st.integers(0, 0x1FF))
def test_fast_decide_c_and_python_agree(code, mode, rcx, rdx, others, policy, ram, priv):
    gpr = list(others)
    gpr[1], gpr[2] = rcx, rdx
    assert (decide_bytes_native(code, mode, gpr, policy, ram, priv)
            == decide_bytes(code, mode, gpr, policy, ram, priv))


def _policy(**kw):
    p = Policy(**kw)
    p.reason[KINDS["cpuid"]] = 10
    p.reason[KINDS["hlt"]] = 12
    return p


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_cpuid_in_exit_kinds_exits_with_reason_10_length_2(decide):
    assert decide(b"\x0f\xa2", 64, G(0, 0), _policy(exit_kinds=1 << KINDS["cpuid"]), b"", P0) == (10, 2, 0)


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_unarmed_kind_is_left_to_python(decide):
    assert decide(b"\xf4", 64, G(0, 0), _policy(exit_kinds=1 << KINDS["cpuid"]), b"", P0) is None


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_lock_prefix_is_left_to_python_for_ud(decide):
    assert decide(b"\xf0\x0f\xa2", 64, G(0, 0), _policy(exit_kinds=1 << KINDS["cpuid"]), b"", P0) is None


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_in_imm8_qualification_matches_table_28_5(decide):
    # in al, 0x60: size 1 (0), IN (bit 3), immediate (bit 6), port 0x60 in 31:16
    assert decide(b"\xe4\x60", 32, G(0, 0), _policy(io_mode=fp.FAST_IO_ALL), b"", P0) == (30, 2, 0x8 | 0x40 | 0x60 << 16)


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_out_dx_operand_size_follows_mode_and_66(decide):
    pol = _policy(io_mode=fp.FAST_IO_ALL)
    assert decide(b"\xef", 16, G(0, 0x3F8), pol, b"", P0) == (30, 1, 1 | 0x3F8 << 16)          # out dx, ax
    assert decide(b"\x66\xef", 16, G(0, 0x3F8), pol, b"", P0) == (30, 2, 3 | 0x3F8 << 16)      # out dx, eax
    assert decide(b"\xef", 64, G(0, 0x3F8), pol, b"", P0) == (30, 1, 3 | 0x3F8 << 16)          # out dx, eax
    assert decide(b"\x66\xef", 64, G(0, 0xFFFF3F8), pol, b"", P0) == (30, 2, 1 | 0xF3F8 << 16)  # DX only


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_io_bitmaps_exit_only_when_a_port_bit_is_set(decide):
    ram = bytearray(0x3000)
    pol = _policy(io_mode=fp.FAST_IO_BITMAPS, io_bitmap_a=0x1000, io_bitmap_b=0x2000)
    assert decide(b"\xe6\x80", 64, G(0, 0), pol, bytes(ram), P0) is None
    ram[0x1000 + 0x80 // 8] |= 1 << (0x80 & 7)
    assert decide(b"\xe6\x80", 64, G(0, 0), pol, bytes(ram), P0) == (30, 2, 0x40 | 0x80 << 16)
    # a 4-byte access exits when any of its ports' bits is set (SDM 26.1.3), bitmap B above 7FFF
    ram[0x2000 + (0x8003 & 0x7FFF) // 8] |= 1 << (0x8003 & 7)
    assert decide(b"\xef", 64, G(0, 0x8000), pol, bytes(ram), P0) == (30, 1, 3 | 0x8000 << 16)


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_string_io_needs_instruction_information(decide):
    assert decide(b"\xf3\x6e", 64, G(0, 0x80), _policy(io_mode=fp.FAST_IO_ALL), b"", P0) is None


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_bitmap_outside_ram_reads_as_zero(decide):
    pol = _policy(io_mode=fp.FAST_IO_BITMAPS, io_bitmap_a=(1 << 40), io_bitmap_b=(1 << 40))
    assert decide(b"\xe4\x10", 64, G(0, 0), pol, b"\xff" * 64, P0) is None


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_msr_bitmaps_follow_sdm_25_6_9(decide):
    ram = bytearray(0x3000)
    pol = _policy(msr_mode=fp.FAST_MSR_BITMAPS, msr_bitmap=0x1000)
    assert decide(b"\x0f\x32", 64, G(0x1B, 0), pol, bytes(ram), P0) is None            # bit clear: no exit
    ram[0x1000 + 0x1B // 8] |= 1 << (0x1B & 7)                                  # read-low bit of 1BH
    assert decide(b"\x0f\x32", 64, G(0x1B, 0), pol, bytes(ram), P0) == (31, 2, 0)
    assert decide(b"\x0f\x30", 64, G(0x1B, 0), pol, bytes(ram), P0) is None            # write-low bit still clear
    ram[0x1000 + 0xC00 + 0x80 // 8] |= 1 << (0x80 & 7)                          # write-high bit of C0000080H
    assert decide(b"\x0f\x30", 64, G(0xC0000080, 0), pol, bytes(ram), P0) == (32, 2, 0)
    assert decide(b"\x0f\x32", 64, G(0x40000000, 0), pol, bytes(ram), P0) == (31, 2, 0)  # outside both ranges


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_msr_without_bitmaps_always_exits(decide):
    assert decide(b"\x0f\x30", 32, G(0x10, 0), _policy(msr_mode=fp.FAST_MSR_ALL), b"", P0) == (32, 2, 0)


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_leaves_faults_before_vm_exits_to_python(decide):
    # SDM Vol. 3C 26.1.1: privilege-level faults, #UD and the TSS I/O bitmap's
    # #GP come before VM exits; the fast path decides none of those sites.
    kinds = 0
    for k in ("cpuid", "hlt", "rdtsc", "rdpmc", "wbinvd", "invd", "xsetbv", "pause"):
        kinds |= 1 << KINDS[k]
    pol = _policy(exit_kinds=kinds, io_mode=fp.FAST_IO_ALL, msr_mode=fp.FAST_MSR_ALL)
    ring3 = 3 | fp.PRIV_PE | fp.PRIV_OSXSAVE
    assert decide(b"\x0f\xa2", 64, G(0, 0), pol, b"", ring3) == (10, 2, 0)      # CPUID: any CPL
    assert decide(b"\xf4", 64, G(0, 0), pol, b"", ring3) is None                 # HLT: #GP
    assert decide(b"\x0f\x32", 64, G(0x10, 0), pol, b"", ring3) is None         # RDMSR: #GP
    assert decide(b"\x0f\x09", 64, G(0, 0), pol, b"", ring3) is None            # WBINVD: #GP
    assert decide(b"\x0f\x31", 64, G(0, 0), pol, b"", ring3) is not None        # RDTSC, TSD clear
    assert decide(b"\x0f\x31", 64, G(0, 0), pol, b"", ring3 | fp.PRIV_TSD) is None
    assert decide(b"\x0f\x33", 64, G(0, 0), pol, b"", ring3) is None            # RDPMC without PCE
    assert decide(b"\x0f\x33", 64, G(0, 0), pol, b"", ring3 | fp.PRIV_PCE) is not None
    assert decide(b"\x0f\x01\xd1", 64, G(0, 0), pol, b"", 0) is None           # XSETBV, OSXSAVE clear: #UD
    assert decide(b"\xe6\x80", 64, G(0, 0), pol, b"", ring3) is None            # OUT, CPL 3 > IOPL 0
    assert decide(b"\xe6\x80", 64, G(0, 0), pol, b"", ring3 | 3 << fp.PRIV_IOPL_SHIFT) is not None
    assert decide(b"\xe6\x80", 16, G(0, 0), pol, b"", 3) is not None            # real mode: no I/O check


@pytest.mark.parametrize("decide", [decide_bytes, decide_bytes_native])
def test_fast_decide_mov_cr_follows_sdm_26_1_3_and_table_28_3(decide):
    pol = _policy(cr_mode=1, cr0_mask=0x80000001, cr0_shadow=0x80000011, cr4_mask=1 << 13, cr4_shadow=0,
                  cr_ctl=fp.CR3_LOAD | fp.CR8_STORE, cr3_count=2, cr3_target=[0x5000, 0x6000, 0x7000, 0])
    # mov cr0, rax: an owned bit (PG) differs from the shadow -> exit, qualification CR0, MOV to, RAX
    assert decide(b"\x0f\x22\xc0", 64, G(r0=0x00000011), pol, b"", P0) == (28, 3, 0)
    # owned bits equal to the shadow (unowned bits differ): no exit
    assert decide(b"\x0f\x22\xc0", 64, G(r0=0x80000033), pol, b"", P0) is None
    # mov cr4, rbx with VMXE (bit 13) set, owned, shadow 0: exit, CR 4, register 3
    assert decide(b"\x0f\x22\xe3", 64, G(r3=1 << 13), pol, b"", P0) == (28, 3, 4 | 3 << 8)
    # mov cr3, r15: CR3-load exiting unless a target among the first cr3_count
    assert decide(b"\x41\x0f\x22\xdf", 64, G(r15=0x6000), pol, b"", P0) is None
    assert decide(b"\x41\x0f\x22\xdf", 64, G(r15=0x7000), pol, b"", P0) == (28, 4, 3 | 15 << 8)
    # mov rax, cr3: CR3-store exiting is off; mov rax, cr8: CR8-store exiting is on (access type 1)
    assert decide(b"\x0f\x20\xd8", 64, G(), pol, b"", P0) is None
    assert decide(b"\x44\x0f\x20\xc0", 64, G(), pol, b"", P0) == (28, 4, 8 | 1 << 4)
    # 32-bit code: the source is the low 32 bits
    assert decide(b"\x0f\x22\xc0", 32, G(r0=0x1_80000011), pol, b"", P0) is None
    # CPL 3: #GP comes first, left to Python
    assert decide(b"\x0f\x22\xc0", 64, G(r0=0x11), pol, b"", 3 | fp.PRIV_PE | fp.PRIV_OSXSAVE) is None
    # not decided without cr_mode
    assert decide(b"\x0f\x22\xc0", 64, G(r0=0x11), _policy(), b"", P0) is None


# ---- exceptions under the exception bitmap (vmlab_fast_decide_exc) ----------

@settings(max_examples=3000)
@given(vector=st.one_of(st.integers(0, 33), st.integers(0, (1 << 32) - 1)), software=st.booleans(),
       error_code=st.one_of(st.sampled_from([0, 1, 2, 4, 5, 0x10, 0x1234, 0xFFFFFFFF]), st.integers(0, (1 << 32) - 1)),
       cr2=st.integers(0, (1 << 64) - 1), exc_mode=st.integers(0, 1),
       bitmap=st.one_of(st.sampled_from([0, 0xFFFFFFFF, 1 << 14, 1 << 6, 1 << 3 | 1 << 13]),
                        st.integers(0, (1 << 32) - 1)),
       pf_mask=st.sampled_from([0, 1, 2, 4, 5, 0x1F, 0xFFFFFFFF]), pf_match=st.sampled_from([0, 1, 2, 4, 5, 0x1F]))
def test_fast_decide_exception_c_and_python_agree(vector, software, error_code, cr2, exc_mode, bitmap, pf_mask,
                                                  pf_match):
    p = Policy(exc_mode=exc_mode, exc_bitmap=bitmap, pf_mask=pf_mask, pf_match=pf_match)
    assert (fp.decide_exception_native(p, vector, software, error_code, cr2)
            == fp.decide_exception(p, vector, software, error_code, cr2))


_EXC = [fp.decide_exception, fp.decide_exception_native]


@pytest.mark.parametrize("decide", _EXC)
def test_fast_decide_exception_follows_sdm_26_2_and_28_2_2(decide):
    on = Policy(exc_mode=1, exc_bitmap=0xFFFFFFFF)
    # #UD: hardware exception (type 3), no error code, qualification 0
    assert decide(on, 6, False, 0x55, 0x1234) == (0, 0, 0, 0x80000306, 0)
    # #GP(0x1234): error code valid (bit 11)
    assert decide(on, 13, False, 0x1234, 0) == (0, 0, 0, 0x80000B0D, 0x1234)
    # INT3 / INTO: software exceptions (type 6), instruction length 1, no error code
    assert decide(on, 3, True, 7, 0) == (0, 1, 0, 0x80000603, 0)
    assert decide(on, 4, True, 7, 0) == (0, 1, 0, 0x80000604, 0)
    # #PF: the qualification is CR2 (28.2.1)
    assert decide(on, 14, False, 0x11, 0xDEAD_BEEF_000) == (0, 0, 0xDEAD_BEEF_000, 0x80000B0E, 0x11)
    # a bit of 0 in the bitmap: delivered, not decided here
    assert decide(Policy(exc_mode=1, exc_bitmap=~(1 << 6) & 0xFFFFFFFF), 6, False, 0, 0) is None
    # INT n (a software interrupt, also INT 6), vectors >= 32, #DB, NMI, #DF: never here
    for vec, sw in ((6, True), (13, True), (32, True), (0x80, True), (1, False), (2, False), (8, False)):
        assert decide(on, vec, sw, 0, 0) is None
    # exc_mode 0: nothing decided
    assert decide(Policy(exc_mode=0, exc_bitmap=0xFFFFFFFF), 6, False, 0, 0) is None


@pytest.mark.parametrize("decide", _EXC)
def test_fast_decide_page_fault_follows_the_mask_and_match_rule(decide):
    # SDM Vol. 3C 25.6.3: bit 14 = 1 -> exit iff (ec AND mask) = match;
    # bit 14 = 0 -> exit iff they differ
    set_, clear = 1 << 14, 0
    for bit in (set_, clear):
        p = Policy(exc_mode=1, exc_bitmap=bit, pf_mask=2, pf_match=2)       # write faults only
        write, read = decide(p, 14, False, 2 | 1, 0x1000), decide(p, 14, False, 1, 0x1000)
        if bit:
            assert write is not None and read is None
        else:
            assert write is None and read is not None

"""The one trap-site classifier: native ``vmlab_classify`` / ``vmlab_block_sites``
against their pure-Python twins in emu/trapscan.py (random bytes, planted
instructions of every kind, whole pages), against Capstone (every canonical
form assembled by Keystone, and a sweep over ModRM bytes of every trapped
opcode), and the stop path that uses them (emu/decode.py, Vcpu._trap_exit)."""
from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
from capstone import x86_const as CX
from hypothesis import HealthCheck, given, settings, strategies as st
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks

from vmlab.emu import trapscan as T
from vmlab.emu.native import ffi, lib

MODES = (16, 32, 64)
LEGACY_PREFIXES = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3)


def native_block_sites(code: bytes, starts, mode: int, kinds: int, max_sites: int):
    buf = ffi.new("uint8_t[]", bytes(code) or b"\0")
    st_ = ffi.new("uint32_t[]", list(starts) or [0])
    sites = ffi.new("uint32_t[]", max(max_sites, 1))
    site_kinds = ffi.new("uint8_t[]", max(max_sites, 1))
    n = lib.vmlab_block_sites(buf, len(code), st_, len(starts), mode, kinds, sites, site_kinds, max_sites)
    return [(sites[i], site_kinds[i]) for i in range(n)]


# ---------------------------------------------------------------- one source
def test_trap_table_header_matches_generator_output():
    assert T.TABLE_PATH.read_text() == T.c_table(), "native/trap_table.h is stale: python -m vmlab.emu.trapscan --write"


def test_trap_kind_numbering_is_the_same_in_c_python_and_exits():
    from vmlab.emu.cpu import TRAP_KINDS
    from vmlab.emu.exits import TrapKind
    assert TRAP_KINDS == T.KIND_BIT
    assert {str(k) for k in TrapKind} == set(T.KIND_NAMES)
    for name, bit in T.KIND_BIT.items():
        assert getattr(lib, f"VMLAB_TRAP_{name.upper()}") == bit
    assert lib.VMLAB_TRAP_COUNT == len(T.KIND_NAMES)
    for name in ("LOCK", "REPNE", "REP", "OPSIZE", "ADSIZE", "SEG", "REX", "VEX"):
        assert getattr(lib, f"VMLAB_PFX_{name}") == getattr(T, f"PFX_{name}")
    assert (lib.VMLAB_CLASS_NONE, lib.VMLAB_CLASS_TRAP, lib.VMLAB_CLASS_TRUNCATED) == (
        T.CLASS_NONE, T.CLASS_TRAP, T.CLASS_TRUNCATED)


# ---------------------------------------------------------------- C == Python
@settings(max_examples=400)
@given(code=st.binary(max_size=20), mode=st.sampled_from(MODES))
def test_classify_random_bytes_c_equals_python(code, mode):
    assert T.classify_native(code, mode).astuple() == T.classify(code, mode).astuple()


def _modrm(mod=None, reg=None, rm=None):
    """A ModRM strategy with the given fields fixed; mod "mem" = 0..2."""
    mods = st.just(mod) if isinstance(mod, int) else st.integers(0, 2) if mod == "mem" else st.integers(0, 3)
    return st.tuples(mods, st.just(reg) if reg is not None else st.integers(0, 7),
                     st.just(rm) if rm is not None else st.integers(0, 7)).map(
        lambda t: bytes([t[0] << 6 | t[1] << 3 | t[2]]))


def _op(kind, opcode: bytes, modrm=None, mandatory: bytes = b""):
    """(kind, strategy of (kind, mandatory prefix, opcode bytes + ModRM))."""
    body = modrm.map(lambda m: opcode + m) if modrm is not None else st.just(opcode)
    return kind, st.tuples(st.just(kind), st.just(mandatory), body)


def _ops(kind, variants):
    """One entry for several variants of a kind (a strategy of _op strategies)."""
    return kind, st.one_of([_op(kind, *v)[1] for v in variants])


#: Every trapped encoding, written down from the SDM opcode maps (Vol. 2
#: Appendix A) independently of emu/trapscan.FORMS.
PLANT_FORMS = [
    _op("hlt", b"\xf4"), _op("int1", b"\xf1"), _op("iret", b"\xcf"), _op("pause", b"\x90", mandatory=b"\xf3"),
    _ops("io", [(bytes([o]),) for o in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F)]),
    _ops("desc", [(b"\x0f\x00", _modrm(reg=r)) for r in range(4)] + [(b"\x0f\x01", _modrm("mem", reg=r))
                                                                      for r in range(4)]),
    _op("smsw", b"\x0f\x01", _modrm(reg=4)), _op("lmsw", b"\x0f\x01", _modrm(reg=6)),
    _op("invlpg", b"\x0f\x01", _modrm("mem", reg=7)),
    _op("monitor", b"\x0f\x01\xc8"), _op("mwait", b"\x0f\x01\xc9"), _op("xsetbv", b"\x0f\x01\xd1"),
    _op("rdtscp", b"\x0f\x01\xf9"), _op("clts", b"\x0f\x06"), _op("invd", b"\x0f\x08"),
    _ops("wbinvd", [(b"\x0f\x09",), (b"\x0f\x09", None, b"\xf3")]),
    _op("cr_read", b"\x0f\x20", _modrm()), _op("cr_write", b"\x0f\x22", _modrm()),
    _ops("dr", [(b"\x0f\x21", _modrm()), (b"\x0f\x23", _modrm())]),
    _op("wrmsr", b"\x0f\x30"), _op("rdtsc", b"\x0f\x31"), _op("rdmsr", b"\x0f\x32"), _op("rdpmc", b"\x0f\x33"),
    _op("cpuid", b"\x0f\xa2"),
    _ops("vmx", [(b"\x0f\x01", _modrm(3, 0, rm)) for rm in range(1, 5)] + [
        (b"\x0f\x37",), (b"\x0f\x78", _modrm()), (b"\x0f\x79", _modrm()),
        (b"\x0f\xc7", _modrm("mem", 6)), (b"\x0f\xc7", _modrm("mem", 6), b"\x66"),
        (b"\x0f\xc7", _modrm("mem", 6), b"\xf3"), (b"\x0f\xc7", _modrm("mem", 7)),
        (b"\x0f\x38\x80", _modrm("mem"), b"\x66"), (b"\x0f\x38\x81", _modrm("mem"), b"\x66")]),
    _op("rdrand", b"\x0f\xc7", _modrm(3, 6)), _op("rdseed", b"\x0f\xc7", _modrm(3, 7)),
    _op("invpcid", b"\x0f\x38\x82", _modrm("mem"), b"\x66"),
    _ops("task", [(b"\x9a",), (b"\xea",), (b"\xff", _modrm("mem", 3)), (b"\xff", _modrm("mem", 5))]),
]
PLANTS = st.one_of([strategy for _, strategy in PLANT_FORMS])
PLANTS_BY_KIND = {kind: strategy for kind, strategy in PLANT_FORMS}


@st.composite
def planted(draw, mode, plants=PLANTS):
    """Random prefixes, a planted trapped instruction (its mandatory prefix
    last), random bytes for SIB/displacement/immediate; sometimes the 0F-map
    opcode re-encoded with a VEX prefix.  Returns (bytes, intended kind)."""
    kind, mandatory, body = draw(plants)
    rex = tuple(range(0x40, 0x50)) if mode == 64 else ()
    prefixes = bytes(draw(st.lists(st.sampled_from(LEGACY_PREFIXES + rex), max_size=3)))
    if body[0] == 0x0F and body[1] != 0x38 and mode != 16 and draw(st.integers(0, 5)) == 0:
        pp = {b"": 0, b"\x66": 1, b"\xf3": 2, b"\xf2": 3}[mandatory]
        if draw(st.booleans()):
            vex = bytes([0xC5, 0xF8 | pp])
        else:
            vex = bytes([0xC4, 0xE1, 0x78 | pp])
        return prefixes + vex + body[1:] + draw(st.binary(min_size=0, max_size=8)), kind
    return prefixes + mandatory + body + draw(st.binary(min_size=0, max_size=8)), kind


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def _check_planted(kind, seen, data):
    mode = data.draw(st.sampled_from(MODES))
    plant = planted(mode, PLANTS_BY_KIND[kind])
    chunks = data.draw(st.lists(st.one_of(plant, st.binary(min_size=1, max_size=6).map(lambda b: (b, None))),
                                min_size=1, max_size=6))
    code = b"".join(c for c, _ in chunks) + data.draw(plant)[0]
    for off in range(len(code)):
        window = code[off:off + 15]
        c, p = T.classify_native(window, mode), T.classify(window, mode)
        assert c.astuple() == p.astuple(), (mode, window.hex())
        if c.status == T.CLASS_TRAP:
            seen.add(c.kind_name)


def test_planted_forms_cover_every_kind_once():
    assert sorted(PLANTS_BY_KIND) == sorted(T.KIND_NAMES) and len(PLANT_FORMS) == len(T.KIND_NAMES)


@pytest.mark.parametrize("kind", T.KIND_NAMES)
def test_classify_planted_instructions_c_equals_python_and_the_kind_is_seen(kind):
    seen: set[str] = set()
    _check_planted(kind, seen)
    assert kind in seen, f"{kind} never classified in any example"


@st.composite
def blocks(draw):
    """A block: planted trapped instructions among random bytes, in one mode;
    its instruction starts are Capstone's (as native/hooks.c gets them), or
    random ascending offsets now and then (a start list need not be sane)."""
    mode = draw(st.sampled_from(MODES))
    chunks = draw(st.lists(st.one_of(planted(mode).map(lambda t: t[0]), st.binary(min_size=1, max_size=12)),
                           min_size=1, max_size=24))
    code = b"".join(chunks)
    if draw(st.booleans()):
        starts = [i.address for i in _CS[mode].disasm(code, 0)]
    else:
        starts = sorted(draw(st.sets(st.integers(0, len(code) + 4), max_size=40)))
    kinds = draw(st.one_of(st.just(T.ALL_KINDS), st.integers(0, T.ALL_KINDS),
                           st.sampled_from([1 << b for b in range(len(T.KIND_NAMES))])))
    max_sites = draw(st.one_of(st.just(64), st.integers(0, 8)))
    return code, starts, mode, kinds, max_sites


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(block=blocks())
def test_block_sites_c_equals_python(block):
    code, starts, mode, kinds, max_sites = block
    assert native_block_sites(code, starts, mode, kinds, max_sites) == T.block_sites(
        code, starts, mode, kinds, max_sites)


# ---------------------------------------------------------------- decisions, spelled out
_K = T.KIND_BIT


@pytest.mark.parametrize("mode, hexcode, kind, length", [
    (32, "0f32", "rdmsr", 2),
    (32, "f00f32", "rdmsr", 3),                 # LOCK: still RDMSR (the stop raises #UD)
    (32, "f390", "pause", 2),
    (32, "f32690", "pause", 3),                 # F3 need not be right before 90
    (32, "66f390", "pause", 3),                 # F3 is the mandatory prefix, 66 operand size
    (32, "f3f290", None, 0),                    # the last of F2/F3 counts: REPNE NOP
    (64, "41f390", "pause", 3),                 # REX not right before the opcode is ignored
    (64, "f34190", None, 0),                    # REX.B: XCHG r8, eax
    (64, "f34890", "pause", 3),                 # REX.W alone keeps PAUSE
    (32, "f30fc7f8", None, 0),                  # F3 0F C7 /7 reg is RDPID, not RDSEED
    (32, "660fc7f8", "rdseed", 4),              # NFx: 66 is fine
    (32, "660f01d1", None, 0),                  # XSETBV is NP
    (32, "660f7800", None, 0),                  # 66 0F 78 is EXTRQ (AMD), not VMREAD
    (32, "f30f37", None, 0),                    # GETSEC is NP
    (32, "f30f09", "wbinvd", 3),                # WBNOINVD exits like WBINVD
    (32, "660f3880c0", None, 0),                # INVEPT needs a memory operand
    (32, "0f388000", None, 0),                  # INVEPT needs 66
    (32, "66f20f388000", None, 0),              # F2 wins over 66: not INVEPT
    (32, "660f388200", "invpcid", 5),
    (64, "670f013c24", "invlpg", 5),            # 67 in 64-bit mode: 32-bit addressing, SIB
    (32, "670f013e0010", "invlpg", 6),          # 67 in 32-bit mode: 16-bit addressing, disp16
    (16, "0f013e0010", "invlpg", 5),
    (64, "0f013d00010000", "invlpg", 7),        # RIP-relative
    (32, "0f20c0", "cr_read", 3), (32, "0f2000", "cr_read", 3),   # MOV CR ignores mod
    (32, "e460", "io", 2), (32, "e4", "io", 2),                   # imm8 need not be present
    (32, "c5f832", "rdmsr", 3),                 # VEX-encoded RDMSR (Unicorn runs it; #UD on the stop)
    (64, "c4e17832", "rdmsr", 4),
    (16, "c5f832", None, 0),                    # no VEX in 16-bit code: LDS
    (32, "c57832", None, 0),                    # bits 7:6 not 11: LDS in 32-bit code
    (64, "c57832", "rdmsr", 3),                 # ... but VEX in 64-bit code
    (64, "66c5f832", None, 0),                  # 66 before VEX: #UD in the decoder itself
    (32, "66" * 14 + "0f31", None, 0),          # 15 bytes is the limit (#GP beyond)
    (32, "66" * 13 + "0f31", "rdtsc", 15),
])
def test_classify_documented_decisions_match(mode, hexcode, kind, length):
    code = bytes.fromhex(hexcode)
    r = T.classify_native(code, mode)
    assert r.astuple() == T.classify(code, mode).astuple()
    assert (r.kind_name, r.length) == (kind, length)


def test_classify_lock_and_vex_are_reported_in_prefixes():
    assert T.classify_native(bytes.fromhex("f00f32"), 32).prefixes & T.PFX_LOCK
    assert T.classify_native(bytes.fromhex("c5f832"), 32).prefixes & T.PFX_VEX
    assert not T.classify_native(bytes.fromhex("0f32"), 32).prefixes & (T.PFX_LOCK | T.PFX_VEX)


def _mask(*names):
    m = 0
    for n in names:
        m |= 1 << _K[n]
    return m


@pytest.mark.parametrize("hexcode, maybe", [
    ("", T.ALL_KINDS),
    ("f3", T.ALL_KINDS),
    ("0f01", _mask("desc", "smsw", "lmsw", "invlpg", "vmx", "monitor", "mwait", "xsetbv", "rdtscp")),
    ("660f01", _mask("desc", "smsw", "lmsw", "invlpg", "vmx", "monitor", "mwait", "rdtscp")),   # no XSETBV
    ("0f0104", _mask("desc")),                  # SIB byte missing
    ("660f38", _mask("vmx", "invpcid")),
])
def test_classify_truncated_bytes_report_the_kinds_still_possible(hexcode, maybe):
    code = bytes.fromhex(hexcode)
    r = T.classify_native(code, 32)
    assert r.astuple() == T.classify(code, 32).astuple()
    assert (r.status, r.maybe) == (T.CLASS_TRUNCATED, maybe)


def test_classify_truncated_without_possible_kind_is_none():
    assert T.classify_native(b"\x0f", 32).status == T.CLASS_TRUNCATED
    assert T.classify_native(b"\x0f\x38", 32).status == T.CLASS_NONE     # 0F 38 forms need 66
    assert T.classify_native(b"\x90", 32).status == T.CLASS_NONE


def test_block_sites_only_at_instruction_starts():
    # mov eax, 0x320f90 (its immediate holds RDMSR's bytes); rdmsr; cpuid
    code = bytes.fromhex("b8900f3200" "0f32" "0fa2")
    starts = [0, 5, 7]
    assert native_block_sites(code, starts, 32, T.ALL_KINDS, 16) == [(5, _K["rdmsr"]), (7, _K["cpuid"])]
    assert native_block_sites(code, starts, 32, 1 << _K["cpuid"], 16) == [(7, _K["cpuid"])]
    assert native_block_sites(code, starts, 32, T.ALL_KINDS, 1) == [(5, _K["rdmsr"])]


def test_block_sites_a_prefixed_instruction_is_one_site():
    code = bytes.fromhex("2e66f30f32")                   # three prefixes, RDMSR
    assert native_block_sites(code, [0], 32, T.ALL_KINDS, 16) == [(0, _K["rdmsr"])]


def test_block_sites_an_instruction_cut_short_is_no_site():
    code = b"\x90" * 8 + b"\x0f"                          # the bytes end after 0F
    assert native_block_sites(code, [8], 32, 1 << _K["cpuid"], 16) == []
    assert native_block_sites(code + b"\xa2", [8], 32, 1 << _K["cpuid"], 16) == [(8, _K["cpuid"])]


def test_block_sites_follow_the_address_size_of_the_mode():
    # 11 prefixes + INVLPG [esi] is 14 bytes in 32-bit code, 16 (too long) in 16-bit code
    code = bytes.fromhex("26" * 11 + "0f013e0010")
    assert native_block_sites(code, [0], 32, T.ALL_KINDS, 16) == [(0, _K["invlpg"])]
    assert native_block_sites(code, [0], 16, T.ALL_KINDS, 16) == []


# ---------------------------------------------------------------- C against Capstone
_CS = {16: Cs(CS_ARCH_X86, CS_MODE_16), 32: Cs(CS_ARCH_X86, CS_MODE_32), 64: Cs(CS_ARCH_X86, CS_MODE_64)}
for _md in _CS.values():
    _md.detail = True
_KS = {16: Ks(KS_ARCH_X86, KS_MODE_16), 32: Ks(KS_ARCH_X86, KS_MODE_32), 64: Ks(KS_ARCH_X86, KS_MODE_64)}

#: Capstone mnemonic (last word) -> trap kind (MOV CR/DR by operand)
_CS_KIND = {
    "rdmsr": "rdmsr", "wrmsr": "wrmsr", "clts": "clts", "lmsw": "lmsw", "invlpg": "invlpg", "hlt": "hlt",
    "in": "io", "out": "io", "insb": "io", "insw": "io", "insd": "io", "outsb": "io", "outsw": "io", "outsd": "io",
    "cpuid": "cpuid", "rdtsc": "rdtsc", "rdtscp": "rdtscp", "rdpmc": "rdpmc", "wbinvd": "wbinvd",
    "wbnoinvd": "wbinvd", "invd": "invd", "xsetbv": "xsetbv", "mwait": "mwait", "monitor": "monitor",
    "pause": "pause", "sgdt": "desc", "sidt": "desc", "lgdt": "desc", "lidt": "desc", "sldt": "desc",
    "str": "desc", "lldt": "desc", "ltr": "desc", "rdrand": "rdrand", "rdseed": "rdseed", "vmcall": "vmx",
    "vmlaunch": "vmx", "vmresume": "vmx", "vmxoff": "vmx", "vmread": "vmx", "vmwrite": "vmx", "vmptrld": "vmx",
    "vmptrst": "vmx", "vmclear": "vmx", "vmxon": "vmx", "invept": "vmx", "invvpid": "vmx", "getsec": "vmx",
    "invpcid": "invpcid", "smsw": "smsw", "int1": "int1", "iret": "iret", "iretd": "iret", "iretq": "iret",
    "ljmp": "task", "lcall": "task",
}


def capstone_view(code: bytes, mode: int):
    """(kind, size, mnemonic) of Capstone's decode, kind None if not a trap."""
    insn = next(_CS[mode].disasm(code, 0), None)
    if insn is None:
        return None, 0, None
    mn = insn.mnemonic.split()[-1]
    if mn == "mov":
        regs = [insn.reg_name(o.reg) for o in insn.operands if o.type == CX.X86_OP_REG]
        kind = ("cr_write" if regs[0].startswith("cr") else "cr_read" if regs[1].startswith("cr")
                else "dr" if any(r.startswith("dr") for r in regs) else None)
        return kind, insn.size, mn
    if mn in ("jmp", "call") and insn.opcode[0] == 0xFF and (insn.modrm >> 3) & 7 in (3, 5):
        return "task", insn.size, mn        # Capstone spells some far FF /3, FF /5 without the l
    return _CS_KIND.get(mn), insn.size, mn


ANY_MODE, LEGACY_MODES, LONG_MODE = MODES, (16, 32), (64,)
#: Canonical forms of every kind: assembly (Keystone) or raw bytes; {m} is a memory operand.
CANONICAL = [
    ("rdmsr", ANY_MODE, ["rdmsr"]), ("wrmsr", ANY_MODE, ["wrmsr"]),
    ("cr_read", LEGACY_MODES, ["mov eax, cr0", "mov ebx, cr3", "mov esi, cr4", "mov edi, cr2"]),
    ("cr_read", LONG_MODE, ["mov rax, cr0", "mov r9, cr3", "mov rax, cr8", "mov r15, cr4"]),
    ("cr_write", LEGACY_MODES, ["mov cr0, eax", "mov cr3, ebx", "mov cr4, edi"]),
    ("cr_write", LONG_MODE, ["mov cr0, rax", "mov cr3, r10", "mov cr8, rax", "mov cr4, r15"]),
    ("clts", ANY_MODE, ["clts"]), ("lmsw", ANY_MODE, ["lmsw ax", "lmsw word ptr [{m}]"]),
    ("invlpg", ANY_MODE, ["invlpg [{m}]"]), ("hlt", ANY_MODE, ["hlt"]),
    ("io", ANY_MODE, ["in al, 0x60", "in ax, 0x60", "in eax, 0x60", "out 0x80, al", "out 0x80, ax",
                      "out 0x80, eax", "in al, dx", "in ax, dx", "in eax, dx", "out dx, al", "out dx, ax",
                      "out dx, eax", "insb", "insw", "insd", "outsb", "outsw", "outsd", "rep insb", "rep outsw",
                      "rep insd"]),
    ("cpuid", ANY_MODE, ["cpuid"]), ("rdtsc", ANY_MODE, ["rdtsc"]), ("rdtscp", ANY_MODE, ["rdtscp"]),
    ("rdpmc", ANY_MODE, ["rdpmc"]), ("wbinvd", ANY_MODE, ["wbinvd", bytes.fromhex("f30f09")]),
    ("invd", ANY_MODE, ["invd"]), ("xsetbv", ANY_MODE, ["xsetbv"]), ("mwait", ANY_MODE, ["mwait"]),
    ("monitor", ANY_MODE, ["monitor"]), ("pause", ANY_MODE, ["pause"]),
    ("dr", LEGACY_MODES, ["mov eax, dr7", "mov dr0, ebx", "mov esi, dr6"]),
    ("dr", LONG_MODE, ["mov rax, dr6", "mov dr7, r8", "mov dr1, rcx"]),
    ("desc", ANY_MODE, ["sgdt [{m}]", "sidt [{m}]", "lgdt [{m}]", "lidt [{m}]", "sldt ax", "sldt word ptr [{m}]",
                        "str ax", "lldt ax", "lldt word ptr [{m}]", "ltr ax", "ltr word ptr [{m}]"]),
    ("rdrand", ANY_MODE, ["rdrand eax", "rdrand ax"]), ("rdrand", LONG_MODE, ["rdrand rax", "rdrand r10"]),
    ("rdseed", ANY_MODE, ["rdseed eax", "rdseed ax"]), ("rdseed", LONG_MODE, ["rdseed rax", "rdseed r10"]),
    ("vmx", ANY_MODE, ["vmcall", "vmlaunch", "vmresume", "vmxoff", "getsec", "vmptrld qword ptr [{m}]",
                       "vmptrst qword ptr [{m}]", "vmclear qword ptr [{m}]", "vmxon qword ptr [{m}]"]),
    ("vmx", LEGACY_MODES, ["vmread eax, ebx", "vmwrite ebx, eax", "vmread dword ptr [{m}], ebx",
                           "vmwrite ebx, dword ptr [{m}]", "invept eax, [{m}]", "invvpid eax, [{m}]"]),
    ("vmx", LONG_MODE, ["vmread rax, rbx", "vmwrite rbx, rax", "vmread qword ptr [{m}], rbx",
                        "vmwrite r8, qword ptr [{m}]", "invept rax, [{m}]", "invvpid r11, [{m}]"]),
    ("invpcid", LEGACY_MODES, ["invpcid eax, [{m}]"]), ("invpcid", LONG_MODE, ["invpcid rax, [{m}]", "invpcid r9, [{m}]"]),
    ("smsw", ANY_MODE, ["smsw ax", "smsw eax", "smsw word ptr [{m}]"]), ("smsw", LONG_MODE, ["smsw rax"]),
    ("int1", ANY_MODE, ["int1"]), ("iret", ANY_MODE, ["iret", "iretd"]), ("iret", LONG_MODE, ["iretq"]),
    ("task", ANY_MODE, ["ljmp [{m}]", "lcall [{m}]"]),
    ("task", (16,), [bytes.fromhex("ea00102800"), bytes.fromhex("9a00102800"), bytes.fromhex("66ea001000002800")]),
    ("task", (32,), [bytes.fromhex("ea001000002800"), bytes.fromhex("9a001000002800"), bytes.fromhex("66ea00102800")]),
]
#: memory operands per mode (the other address size too: Keystone adds 67)
MEMORY = {16: ["bx+si", "bp+0x10", "0x1234", "bx+di+0x1234", "eax", "esp+8"],
          32: ["eax", "esp+8", "ebp+0x12345678", "eax+ecx*4+0x10", "0x12345678", "bx+si", "bp+0x10"],
          64: ["rax", "rsp+8", "rip+0x100", "r12+r13*8+0x80", "eax", "esp+8", "rbp"]}
#: prefixes any form may carry (segment overrides; REX in 64-bit mode where the form has none)
EXTRA_PREFIXES = [b"", b"\x2e", b"\x64", b"\x3e\x65"]
#: Capstone 5 does not decode INVEPT/INVVPID/INVPCID in 16-bit code
CAPSTONE_16BIT_GAPS = ("invept", "invvpid", "invpcid")


def _canonical_encodings():
    for kind, modes, forms in CANONICAL:
        for mode in modes:
            for form in forms:
                if isinstance(form, bytes):
                    yield kind, mode, form.hex(), form
                    continue
                for m in MEMORY[mode] if "{m}" in form else [None]:
                    text = form.format(m=m) if m else form
                    enc, _ = _KS[mode].asm(text, 0x1000)
                    yield kind, mode, text, bytes(enc)


def test_classify_every_canonical_form_agrees_with_capstone_on_kind_and_length():
    count, failures, seen = 0, [], set()
    for kind, mode, text, enc in _canonical_encodings():
        extra = EXTRA_PREFIXES + ([b"\x40"] if mode == 64 and not 0x40 <= enc[0] <= 0x4F
                                  and enc[0] not in LEGACY_PREFIXES else [])
        for pfx in extra:
            code = pfx + enc
            if len(code) > 15:
                continue
            count += 1
            r = T.classify_native(code + b"\xcc" * 4, mode)
            if (r.kind_name, r.length) != (kind, len(code)):
                failures.append(f"{mode}-bit {text!r} {code.hex()}: classify says {r.kind_name} ({r.length})")
                continue
            seen.add(kind)
            cs_kind, cs_size, mn = capstone_view(code, mode)
            if mode == 16 and text.split()[0] in CAPSTONE_16BIT_GAPS:
                assert cs_kind is None
                continue
            if (cs_kind, cs_size) != (kind, len(code)):
                failures.append(f"{mode}-bit {text!r} {code.hex()}: Capstone says {mn} -> {cs_kind} ({cs_size})")
    assert not failures, "\n".join(failures[:40])
    assert seen == set(T.KIND_NAMES) and count > 1000


#: Trapped opcodes (SDM Vol. 2 Appendix A), swept with every next byte.
SWEEP_OPCODES = [bytes([b]) for b in (0xF4, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E,
                                      0x6F, 0xF1, 0xCF, 0x90)] + \
    [bytes([0x0F, b]) for b in (0x00, 0x01, 0x06, 0x08, 0x09, 0x20, 0x21, 0x22, 0x23, 0x30, 0x31, 0x32, 0x33,
                                0x37, 0x78, 0x79, 0xA2, 0xC7)] + \
    [bytes([0x0F, 0x38, b]) for b in (0x80, 0x81, 0x82)]
SWEEP_PREFIXES = {16: [b"", b"\x66", b"\xf3", b"\xf2", b"\x67", b"\x2e"],
                  32: [b"", b"\x66", b"\xf3", b"\xf2", b"\x67", b"\x2e"],
                  64: [b"", b"\x66", b"\xf3", b"\xf2", b"\x67", b"\x48", b"\x41", b"\x66\x48"]}
#: NP/NFx forms that Capstone decodes even with a 66/F2/F3 prefix the SDM
#: does not allow (#UD, or another instruction: EXTRQ, INSERTQ, RDPID)
CAPSTONE_LENIENT = {"xsetbv", "getsec", "vmread", "vmwrite", "vmptrst"}


def test_classify_sweep_of_every_trapped_opcode_agrees_with_capstone_but_for_documented_gaps():
    disagreements: dict[str, int] = {}
    failures = []
    for mode in MODES:
        for opcode in SWEEP_OPCODES:
            for pfx in SWEEP_PREFIXES[mode]:
                for nxt in range(256):
                    sibs = (0x24, 0x25) if nxt >> 6 != 3 and nxt & 7 == 4 else (0x25,)
                    for sib in sibs:
                        code = pfx + opcode + bytes([nxt, sib]) + bytes(range(0x11, 0x19))
                        r = T.classify_native(code, mode)
                        cs_kind, cs_size, mn = capstone_view(code, mode)
                        if (r.kind_name, r.length if r.kind_name else 0) == (cs_kind, cs_size if cs_kind else 0):
                            continue
                        if cs_kind and r.kind_name is None and mn in CAPSTONE_LENIENT and r.mandatory:
                            why = "capstone-lenient-np"
                        elif mode == 16 and opcode[:2] == b"\x0f\x38" and mn is None:
                            why = "capstone-16bit-0f38"
                        else:
                            failures.append(f"{mode}-bit {code[:len(pfx) + len(opcode) + 2].hex()}: classify "
                                            f"{r.kind_name} ({r.length}), Capstone {mn} -> {cs_kind} ({cs_size})")
                            continue
                        disagreements[why] = disagreements.get(why, 0) + 1
    assert not failures, "\n".join(failures[:40])
    assert set(disagreements) == {"capstone-lenient-np", "capstone-16bit-0f38"}, disagreements


# ---------------------------------------------------------------- the stop path
def _boot32(code: bytes):
    from support import Machine
    m = Machine(ram=4 << 20)
    m.boot(code, 0x100000, "protected32")
    m.cpu.refresh()
    return m


def test_trap_exit_stale_site_is_dropped_and_returns_retry_exit():
    from vmlab.emu.exits import HltExit, MsrExit, RetryExit
    m = _boot32(bytes.fromhex("b910000000" "0f32" "f4"))      # mov ecx, 0x10; rdmsr; hlt
    cpu = m.cpu
    ex = cpu.run(cpu.icount + 10_000)
    assert isinstance(ex, MsrExit) and ex.rip == 0x100005
    assert 0x100005 in cpu.armed_sites()
    cpu.write_linear(0x100005, b"\x90\x90")                   # the code changes under the site
    ex = cpu.run(cpu.icount + 10_000)
    assert isinstance(ex, RetryExit) and ex.rip == 0x100005    # nothing ran, no recursion
    assert cpu.regs.gpr[1] == 0x10 and 0x100005 not in cpu.armed_sites()
    ex = cpu.run(cpu.icount + 10_000)
    assert isinstance(ex, HltExit)


def test_block_sites_follow_the_mode_the_block_runs_in():
    """Sites are classified in the mode the block runs in: C5 F8 32 is a VEX
    RDMSR form in 32-bit code (#UD there, a site) but LDS with a register
    operand in real mode (#UD by itself, never a site)."""
    from vmlab.emu.exits import ExceptionExit
    from support import Machine
    m = Machine(ram=4 << 20)
    m.boot(bytes.fromhex("c5f832f4"), 0x7C00, "real")
    m.cpu.refresh()
    ex = m.cpu.run(m.cpu.icount + 10_000)
    assert isinstance(ex, ExceptionExit) and ex.vector == 6 and ex.rip == 0x7C00
    assert 0x7C00 not in m.cpu.armed_sites()


@pytest.mark.parametrize("hexcode", ["f00f32", "c5f832", "c4e17832", "f00f22c0", "f0ec"])
def test_trap_exit_lock_or_vex_form_raises_ud_instead_of_running(hexcode):
    # Unicorn 2.1.4 runs these (RDMSR, MOV CR0, IN) natively; the CPU raises #UD.
    from vmlab.emu.exits import ExceptionExit
    m = _boot32(bytes.fromhex("b910000000" + hexcode + "f4"))
    ex = m.cpu.run(m.cpu.icount + 10_000)
    assert isinstance(ex, ExceptionExit) and ex.vector == 6 and ex.rip == 0x100005, ex


@pytest.mark.parametrize("text", ["invept eax, [bx+si]", "invvpid eax, [bp+0x10]", "invpcid eax, [eax]",
                                  "invept eax, [0x1234]"])
def test_decode_site_invept_family_in_16_bit_code_gets_operands_despite_capstone_gap(text):
    from types import SimpleNamespace
    from vmlab.emu.decode import decode_site, site_exit
    enc = bytes(_KS[16].asm(text, 0x7C00)[0])
    cpu = SimpleNamespace(mode_bits=16, regs=SimpleNamespace(rip=0x7C00), trap_kinds=frozenset({"vmx", "invpcid"}),
                          read_code=lambda lin, n: (enc + b"\x90" * 15)[:n])
    site = decode_site(cpu, 0x7C00)
    assert site.problem is None and site.length == len(enc)
    assert site.insn.mnemonic == text.split()[0] and site.insn.size == len(enc)
    ex = site_exit(cpu, site)
    assert ex.kind == site.kind and ex.insn_len == len(enc) and ex.insn is site.insn

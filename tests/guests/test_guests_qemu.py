"""The test guests, checked on QEMU (the reference emulator) and at build level.

QEMU tests (marked ``qemu``, skipped when qemu-system-x86_64 is missing): every
guest in guests/ prints PASS lines, DONE, no FAIL line except the QEMU
deviations its header declares, and exits with status 1 (3 when a declared
deviation showed up).  Build tests: tools/asm.py's rewrites of Keystone's
mis-encodings, checked with Capstone, and the packaging of each format.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import sys
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_REG_RIP

ROOT = Path(__file__).resolve().parents[2]
from vmlab.tools import asm, guestbuild

GUESTS = guestbuild.guest_sources(ROOT / "guests")
QEMU_TIMEOUT_S = 20
CS_MODES = {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}

needs_qemu = pytest.mark.skipif(
    shutil.which(guestbuild.QEMU) is None, reason=f"{guestbuild.QEMU} is not on PATH")


def disasm(code: bytes, mode: int, address: int):
    md = Cs(CS_ARCH_X86, CS_MODES[mode])
    md.detail = True
    return list(md.disasm(code, address))


def first_insn(text: str, mode: int, base: int = 0x100000):
    code = asm.assemble(text, mode, base)
    return disasm(code, mode, base)[0]


def effective_address(insn) -> int:
    """Absolute address of the memory operand (RIP-relative resolved)."""
    for op in insn.operands:
        if op.type == X86_OP_MEM:
            disp = op.mem.disp
            if op.mem.base == X86_REG_RIP:
                return (insn.address + insn.size + disp) & (2**64 - 1)
            return disp & (2**64 - 1)
    raise AssertionError(f"no memory operand in {insn.mnemonic} {insn.op_str}")


def immediate(insn) -> int:
    imms = [op.imm for op in insn.operands if op.type == X86_OP_IMM]
    assert imms, f"no immediate in {insn.mnemonic} {insn.op_str}"
    return imms[-1]


# ---------------------------------------------------------------- QEMU runs

@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("source", GUESTS, ids=lambda p: p.name)
def test_guest_on_qemu_passes_and_exits_through_debug_port(source):
    run = guestbuild.run_qemu(source, timeout=QEMU_TIMEOUT_S)
    header = asm.read_header(source)
    transcript = run.output[-4000:]
    assert run.passes, transcript
    assert guestbuild.qemu_verdict(run, header) is None, (
        guestbuild.qemu_verdict(run, header), transcript)
    if run.skips:  # only checks the QEMU command line switched off on purpose
        assert header.qemu_append and "skip=" in header.qemu_append, run.skips


@pytest.mark.qemu
@needs_qemu
def test_hello_on_qemu_says_hello_in_each_mode():
    run = guestbuild.run_qemu(ROOT / "guests" / "hello.asm", timeout=QEMU_TIMEOUT_S)
    lines = run.lines
    hellos = [line for line in lines if line.startswith("Hello from")]
    assert hellos == ["Hello from real mode", "Hello from protected mode", "Hello from long mode"]
    assert run.status == guestbuild.EXIT_PASSED


# ---------------------------------------------------------------- Keystone traps

def test_asm_decimal_immediates_stay_decimal():
    # Any ks_option call would switch Keystone 0.9.2 to radix 16.
    assert immediate(first_insn("mov al, 13", 32)) == 13
    assert immediate(first_insn("mov ecx, 100000", 32)) == 100000


def test_asm_far_jump_32_has_32_bit_offset():
    code = asm.assemble("ljmp 0x08:target\n.zero 0x20000\ntarget: nop", 32, 0x100000)
    insn = disasm(code, 32, 0x100000)[0]
    assert insn.bytes[0] == 0xEA and insn.size == 7
    assert struct.unpack_from("<IH", code, 1) == (0x100000 + 7 + 0x20000, 0x08)


def test_asm_far_jump_16_to_32_bit_target():
    code = asm.assemble("ljmp 0x08:pm\n.code32\npm: nop", 16, 0x7C00)
    insn = disasm(code, 16, 0x7C00)[0]
    assert bytes(insn.bytes[:2]) == b"\x66\xea"
    assert struct.unpack_from("<IH", code, 2) == (0x7C00 + 8, 0x08)


def test_asm_far_jump_in_64_bit_code_is_refused():
    with pytest.raises(asm.AsmError, match="64-bit"):
        asm.assemble("ljmp 0x08:x\nx: nop", 64)


@pytest.mark.parametrize("op", ["lgdt", "lidt", "sgdt", "sidt"])
def test_asm_descriptor_table_ops_32_have_no_operand_size_prefix(op):
    insn = first_insn(f"{op} [table]\ntable: .zero 6", 32)
    assert insn.mnemonic == op and insn.bytes[0] == 0x0F
    assert effective_address(insn) == 0x100000 + insn.size


def test_asm_push_of_constant_or_label_pushes_full_width():
    assert bytes(first_insn("K = 0x23\npush K", 32).bytes) == b"\x68\x23\x00\x00\x00"
    insn = first_insn("push lab\nlab: nop", 32)
    assert insn.bytes[0] == 0x68 and immediate(insn) == 0x100005
    assert bytes(first_insn("push 0x23", 16, 0x7C00).bytes) == b"\x68\x23\x00"


@pytest.mark.parametrize("text,expect", [
    ("mov ecx, -K", ("imm", -0x23 & 0xFFFFFFFF)),
    ("mov eax, 0 + K", ("imm", 0x23)),
    ("mov edx, (K << 3) | 2", ("imm", 0x11A)),
    ("mov eax, [ebx - K]", ("disp", -0x23)),
    ("lea eax, [ebx + K*2]", ("disp", 0x46)),
    ("mov eax, [lab + K]\nlab: nop", ("addr", 0x100005 + 0x23)),
    ("mov eax, [K + lab]\nlab: nop", ("addr", 0x100005 + 0x23)),
])
def test_asm_symbolic_constants_mean_their_value(text, expect):
    insn = first_insn("K = 0x23\n" + text, 32)
    kind, value = expect
    if kind == "imm":
        assert immediate(insn) & 0xFFFFFFFF == value
    elif kind == "disp":
        assert [op.mem.disp for op in insn.operands if op.type == X86_OP_MEM] == [value]
    else:
        assert effective_address(insn) == value


@pytest.mark.parametrize("text", [
    "mov rcx, [0x1000]", "mov rcx, qword ptr [K]", "mov dword ptr [K], 1",
    "mov dword ptr [0x800 + 0x800], 3", "mov eax, [K]", "inc dword ptr [K]",
])
def test_asm_absolute_memory_operand_in_64_bit_code_hits_its_address(text):
    insn = first_insn("K = 0x1000\n" + text, 64)
    assert effective_address(insn) == 0x1000


def test_asm_address_above_2gib_in_64_bit_memory_operand_is_refused():
    with pytest.raises(asm.AsmError, match="disp32"):
        asm.assemble("mov dword ptr [0xfee000b0], 0", 64)


def test_asm_ambiguous_operator_mix_must_be_parenthesised():
    with pytest.raises(asm.AsmError, match="parenthesise"):
        asm.assemble("mov eax, 1 << 2 + 1", 32)


@pytest.mark.parametrize("text,why", [
    ("nop\n.text", "not supported"),
    ("nop\n.balign 16, 0", "fill value"),
    ("a: nop\n.fill b - a, 1, 0\nb: nop", "constant"),
    ("nop\n.section .data", "not supported"),
])
def test_asm_directives_keystone_mishandles_are_refused(text, why):
    with pytest.raises(asm.AsmError, match=why):
        asm.assemble(text, 32)


# ---------------------------------------------------------------- errors and cache

def test_asm_error_names_file_and_line_of_an_included_file(tmp_path):
    (tmp_path / "inc.inc").write_text("nop\nnop\nmovx eax, 1\n")
    main = tmp_path / "g.asm"
    main.write_text('; vmlab-format: multiboot-aout\nnop\n%include "inc.inc"\n')
    with pytest.raises(asm.AsmError) as info:
        asm.build(main, tmp_path / "build")
    assert info.value.file == str(tmp_path / "inc.inc") and info.value.line == 3


def test_asm_error_undefined_symbol_names_it():
    with pytest.raises(asm.AsmError, match="undefined symbol 'nowhere'") as info:
        asm.assemble("nop\nnop\njmp nowhere\n", 32)
    assert info.value.line == 3


def test_asm_missing_include_is_an_error_with_line(tmp_path):
    src = tmp_path / "g.asm"
    src.write_text('; vmlab-format: bootsector\nnop\n%include "nope.inc"\n')
    with pytest.raises(asm.AsmError, match="nope.inc") as info:
        asm.build(src, tmp_path / "build")
    assert info.value.line == 3


def test_asm_build_name_changes_with_an_included_file(tmp_path):
    (tmp_path / "inc.inc").write_text("nop\n")
    src = tmp_path / "g.asm"
    src.write_text('; vmlab-format: bootsector\n%include "inc.inc"\ncli\n')
    first = asm.build(src, tmp_path / "build")
    assert asm.build(src, tmp_path / "build") == first
    (tmp_path / "inc.inc").write_text("hlt\n")
    second = asm.build(src, tmp_path / "build")
    assert second != first and second.read_bytes()[0] == 0xF4


def test_asm_bootsector_over_510_bytes_is_an_error(tmp_path):
    src = tmp_path / "big.asm"
    src.write_text("; vmlab-format: bootsector\n.zero 511\n")
    with pytest.raises(asm.AsmError, match="511 bytes"):
        asm.build(src, tmp_path / "build")


# ---------------------------------------------------------------- the guests

@pytest.mark.parametrize("source", GUESTS, ids=lambda p: p.name)
def test_guest_builds_and_declares_a_known_format(source):
    header = asm.read_header(source)
    assert header.format in asm.FORMATS
    assert asm.build(source).is_file()


def test_hello_fits_one_sector_and_its_far_jumps_reach_their_labels():
    guest = asm.compile_guest(ROOT / "guests" / "hello.asm")
    assert len(guest.image) == 512 and guest.image[-2:] == b"\x55\xaa"
    labels = guest.labels

    def far_jumps(start: str, end: str, mode: int):
        lo, hi = labels[start] - guest.org, labels[end] - guest.org
        return [i for i in disasm(guest.code[lo:hi], mode, labels[start]) if i.mnemonic == "ljmp"]

    jumps16 = far_jumps("start", "protected_mode", 16)
    assert [(struct.unpack_from("<IH", bytes(i.bytes), 2)) for i in jumps16] == [
        (labels["real_mode"], 0), (labels["protected_mode"], 0x08)]
    jumps32 = far_jumps("protected_mode", "long_mode", 32)
    assert [(struct.unpack_from("<IH", bytes(i.bytes), 1)) for i in jumps32] == [
        (labels["long_mode"], 0x18)]


def test_multiboot_aout_guests_header_matches_image():
    for source in GUESTS:
        if asm.read_header(source).format != "multiboot-aout":
            continue
        guest = asm.compile_guest(source)
        hdr = asm.find_multiboot_header(guest.image)
        assert hdr is not None and hdr.flags & asm.MB_FLAG_AOUT_KLUDGE, source
        assert hdr.load_addr == guest.org and hdr.entry_addr == guest.labels["_start"], source


@pytest.mark.parametrize("name,bits,machine", [
    ("multiboot_info.asm", 32, "EM_386"), ("long64.asm", 64, "EM_X86_64")])
def test_elf_guests_have_one_load_segment_at_org_and_entry_at_start(name, bits, machine):
    from elftools.elf.elffile import ELFFile

    guest = asm.compile_guest(ROOT / "guests" / name)
    with open(asm.build(ROOT / "guests" / name), "rb") as fh:
        elf = ELFFile(fh)
        assert elf.elfclass == bits and elf["e_machine"] == machine
        assert elf["e_entry"] == guest.labels["_start"]
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert len(loads) == 1
        assert loads[0]["p_paddr"] == loads[0]["p_vaddr"] == guest.org
        assert loads[0].data() == guest.code
        if bits == 32:
            fh.seek(0)
            hdr = asm.find_multiboot_header(fh.read())
            assert hdr is not None and not hdr.flags & asm.MB_FLAG_AOUT_KLUDGE

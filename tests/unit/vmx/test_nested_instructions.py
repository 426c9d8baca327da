"""The guest's own VMX instructions (vmm/nested.py) against SDM Vol. 3C ch. 31:
the #UD/#GP conditions and the VMfail conventions, one instruction at a time.

Each guest runs in 64-bit mode with an IDT whose #UD and #GP handlers report
their vector through isa-debug-exit; otherwise the guest reports RFLAGS' CF
and ZF after the instruction (bit 7 set to tell the two apart)."""
from __future__ import annotations

import pytest

from support import Machine, asm, gate64

CODE, IDT, HANDLERS, REGION = 0x100000, 0x9000, 0x8000, 0x20000
UD, GP = 6, 13
CF, ZF = 1, 0x40


def run_l1(body: str, nested: bool = True, caps=None) -> int:
    m = Machine(16 << 20)
    try:
        if nested:
            n = m.vm.enable_nested_vmx(caps)
            rev = n.caps.revision_id
        else:
            rev = 1
        for vec in (UD, GP):
            m.mem.write(HANDLERS + vec * 16, asm(f"mov al, {vec}\n out 0xf4, al\n hlt", HANDLERS + vec * 16, 64))
            m.mem.write(IDT + vec * 16, gate64(HANDLERS + vec * 16, 0x08))
        m.mem.write(REGION, rev.to_bytes(4, "little"))            # VMXON region
        m.mem.write(REGION + 0x1000, rev.to_bytes(4, "little"))   # a VMCS region
        m.mem.write(REGION + 0x2000, (rev ^ 1).to_bytes(4, "little"))   # wrong revision
        for i, p in enumerate((REGION, REGION + 0x1000, REGION + 0x2000, REGION + 0x123)):
            m.mem.write(0x30000 + 8 * i, p.to_bytes(8, "little"))
        prologue = f"""
            mov rax, {IDT}
            mov word ptr [0x7000], 0xfff
            mov qword ptr [0x7002], rax
            lidt [0x7000]
        """
        epilogue = """
            pushfq
            pop rax
            and al, 0x41
            or al, 0x80
            out 0xf4, al
            hlt
        """
        m.boot(asm(prologue + body + epilogue, CODE, 64), CODE, "long64")
        res = m.run(max_insns=1_000_000)
        assert res.reason == "debug-exit", res
        return res.status >> 1
    finally:
        m.close()


ENABLE = """
    mov ecx, 0x3a
    xor edx, edx
    mov eax, 5
    wrmsr
    mov rax, cr0
    or rax, 0x20
    mov cr0, rax
    mov rax, cr4
    or rax, 0x2000
    mov cr4, rax
"""
VMXON = "vmxon qword ptr [0x30000]\n"


def test_vmxon_with_cr4_vmxe_clear_is_invalid_opcode():
    assert run_l1(VMXON) == UD


def test_vmx_not_advertised_vmxon_is_invalid_opcode():
    assert run_l1(ENABLE.replace("mov cr4, rax", "nop") + VMXON, nested=False) == UD


def test_vmxon_without_feature_control_lock_is_general_protection():
    body = ENABLE.replace("mov eax, 5", "mov eax, 4") + VMXON
    assert run_l1(body) == GP


def test_vmxon_with_cr0_ne_clear_violates_fixed_bits_general_protection():
    body = ENABLE.replace("or rax, 0x20", "and eax, 0xffffffdf") + VMXON
    assert run_l1(body) == GP


def test_vmxon_succeeds_with_every_flag_clear():
    assert run_l1(ENABLE + VMXON) == 0x80


def test_vmxon_with_a_wrong_revision_identifier_is_vmfail_invalid():
    assert run_l1(ENABLE + "vmxon qword ptr [0x30010]\n") == 0x80 | CF


def test_vmxon_with_an_unaligned_region_is_vmfail_invalid():
    assert run_l1(ENABLE + "vmxon qword ptr [0x30018]\n") == 0x80 | CF


def test_vmxon_twice_without_a_current_vmcs_is_vmfail_invalid():
    assert run_l1(ENABLE + VMXON + VMXON) == 0x80 | CF


def test_vmxon_twice_with_a_current_vmcs_is_vmfail_valid():
    assert run_l1(ENABLE + VMXON + "vmptrld qword ptr [0x30008]\n" + VMXON) == 0x80 | ZF


def test_vmclear_before_vmxon_is_invalid_opcode():
    assert run_l1(ENABLE + "vmclear qword ptr [0x30008]\n") == UD


def test_vmptrld_with_a_wrong_revision_with_a_current_vmcs_is_vmfail_valid_11():
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        vmptrld qword ptr [0x30010]
        jz fail_ok
        hlt
    fail_ok:
        mov ecx, 0x4400
        vmread rax, rcx
        cmp eax, 11
        jne bad
        xor eax, eax
        add eax, 1
        jmp end
    bad:
        mov al, 0x7f
        out 0xf4, al
    end:
        cmp eax, 1
    """
    assert run_l1(body) == 0x80 | ZF            # the cmp eax, 1 sets ZF: error 11 was read back


def test_vmresume_of_a_clear_vmcs_is_vmfail_valid_5():
    body = ENABLE + VMXON + """
        vmclear qword ptr [0x30008]
        vmptrld qword ptr [0x30008]
        vmresume
        mov ecx, 0x4400
        vmread rax, rcx
        cmp eax, 5
    """
    assert run_l1(body) == 0x80 | ZF


def test_vmlaunch_with_invalid_controls_is_vmfail_valid_7():
    body = ENABLE + VMXON + """
        vmclear qword ptr [0x30008]
        vmptrld qword ptr [0x30008]
        vmlaunch
        mov ecx, 0x4400
        vmread rax, rcx
        cmp eax, 7
    """
    assert run_l1(body) == 0x80 | ZF


def test_vmwrite_then_vmread_round_trips_a_field():
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        mov ecx, 0x681e
        mov rdx, 0x123456789a
        vmwrite rcx, rdx
        vmread rax, rcx
        cmp rax, rdx
    """
    assert run_l1(body) == 0x80 | ZF


def test_vmptrst_stores_the_current_pointer():
    body = ENABLE + VMXON + f"""
        vmptrld qword ptr [0x30008]
        vmptrst qword ptr [0x7100]
        mov rax, qword ptr [0x7100]
        cmp rax, {REGION + 0x1000}
    """
    assert run_l1(body) == 0x80 | ZF


def test_vmcall_in_vmx_root_operation_is_vmfail():
    assert run_l1(ENABLE + VMXON + "vmcall\n") == 0x80 | CF       # no current VMCS: VMfailInvalid


# ---------------------------------------------------------------------- CR0/CR4 fixed bits (SDM Vol. 3C 24.8, A.7-A.8)
CLEAR_VMXE = """
    mov rax, cr4
    and eax, 0xffffdfff
    mov cr4, rax
"""
CLEAR_NE = """
    mov rax, cr0
    and eax, 0xffffffdf
    mov cr0, rax
"""


def test_in_vmx_operation_clearing_cr4_vmxe_is_general_protection():
    assert run_l1(ENABLE + VMXON + CLEAR_VMXE) == GP


def test_in_vmx_operation_clearing_cr0_ne_is_general_protection():
    assert run_l1(ENABLE + VMXON + CLEAR_NE) == GP


def test_in_vmx_operation_a_cr4_write_keeping_the_fixed_bits_is_fine():
    body = ENABLE + VMXON + """
        mov rax, cr4
        xor eax, 0x80
        mov cr4, rax
        xor eax, 0x80
        mov cr4, rax
    """
    assert run_l1(body) == 0x80                  # PGE toggled twice: not a fixed bit


def test_outside_vmx_operation_the_fixed_bits_do_not_apply():
    assert run_l1(ENABLE + CLEAR_NE + CLEAR_VMXE) == 0x80
    assert run_l1(ENABLE + VMXON + "vmxoff\n" + CLEAR_NE + CLEAR_VMXE) == 0x80


def test_cr4_bit_outside_fixed1_at_vmxon_is_general_protection():
    """VMXON's #GP(0) when CR4 holds a bit IA32_VMX_CR4_FIXED1 says must be 0
    (narrowed capabilities: PGE, which the guest sets, is not allowed-1)."""
    import dataclasses

    from vmlab.emu import x86
    from vmlab.vmm.capabilities import VmxCapabilities
    caps = VmxCapabilities()
    narrow = dataclasses.replace(caps, cr4_fixed1=caps.cr4_fixed1 & ~x86.CR4_PGE)
    set_pge = ENABLE.replace("or rax, 0x2000", "or rax, 0x2080")
    assert run_l1(set_pge + VMXON, caps=narrow) == GP
    assert run_l1(set_pge + VMXON, caps=caps) == 0x80


def test_cr4_fixed1_narrowed_in_vmx_operation_setting_the_bit_is_general_protection():
    import dataclasses

    from vmlab.emu import x86
    from vmlab.vmm.capabilities import VmxCapabilities
    caps = VmxCapabilities()
    narrow = dataclasses.replace(caps, cr4_fixed1=caps.cr4_fixed1 & ~x86.CR4_PGE)
    body = ENABLE + VMXON + """
        mov rax, cr4
        or eax, 0x80
        mov cr4, rax
    """
    assert run_l1(body, caps=narrow) == GP


# ---------------------------------------------------------------------- VMREAD/VMWRITE register forms (fast path)
def test_register_form_decoding_agrees_with_capstone_on_every_modrm_and_rex():
    """vmm.nested._register_form (the VMREAD/VMWRITE path that skips the full
    decode) against Capstone on every REX prefix and ModRM byte."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from capstone import x86_const as C

    from vmlab.emu.decode import _reg_table
    from vmlab.vmm.nested import _register_form
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    table = _reg_table()
    checked = 0
    for rex in [None] + list(range(0x40, 0x50)):
        for op in (0x78, 0x79):
            for modrm in range(256):
                code = (bytes([rex]) if rex is not None else b"") + bytes([0x0F, op, modrm]) + b"\x90" * 8
                form = _register_form(code[:len(code) - 8])
                insns = list(md.disasm(code, 0x1000, 1))
                if modrm >> 6 != 3:
                    assert form is None
                    continue
                insn = insns[0]
                assert form is not None and form[3] == insn.size
                a, b = insn.operands
                assert a.type == C.X86_OP_REG and b.type == C.X86_OP_REG
                if op == 0x78:          # vmread rm, reg: operands (dest rm, field reg)
                    assert insn.mnemonic == "vmread" and not form[0]
                    dst, field = table[a.reg][0], table[b.reg][0]
                    assert (form[1], form[2]) == (field, dst)
                else:                   # vmwrite reg, rm: operands (field reg, value rm)
                    assert insn.mnemonic == "vmwrite" and form[0]
                    field, src = table[a.reg][0], table[b.reg][0]
                    assert (form[1], form[2]) == (field, src)
                checked += 1
    assert checked == 17 * 2 * 64


def test_register_form_refuses_other_prefixes_and_memory_operands():
    from vmlab.vmm.nested import _register_form
    assert _register_form(bytes([0x66, 0x0F, 0x78, 0xC8])) is None       # EXTRQ, not VMREAD
    assert _register_form(bytes([0xF2, 0x0F, 0x79, 0xC8])) is None       # INSERTQ
    assert _register_form(bytes([0x0F, 0x78, 0x08])) is None             # memory destination
    assert _register_form(bytes([0x0F, 0x78, 0xC8])) == (False, 1, 0, 3)
    assert _register_form(bytes([0x4D, 0x0F, 0x79, 0xC8])) == (True, 9, 8, 4)


def test_vmwrite_vmread_with_r8_to_r15_and_width_truncation():
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        mov r9d, 0x4002
        mov r10, 0x1234567887654321
        vmwrite r9, r10
        vmread r11, r9
        mov eax, 0x87654321
        cmp r11, rax
    """
    assert run_l1(body) == 0x80 | ZF          # CPU_BASED_VM_EXEC_CONTROL keeps 32 bits


def test_vmwrite_of_a_read_only_field_without_vmwrite_any_field_is_vmfail_valid_13():
    import dataclasses

    from vmlab.vmm.capabilities import VmxCapabilities
    caps = dataclasses.replace(VmxCapabilities(), vmwrite_any_field=False)
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        mov ecx, 0x4402
        mov rdx, 5
        vmwrite rcx, rdx
        jnz bad
        mov ecx, 0x4400
        vmread rax, rcx
        cmp eax, 13
        jmp end
    bad:
        mov al, 0x7f
        out 0xf4, al
    end:
    """
    assert run_l1(body, caps=caps) == 0x80 | ZF


def test_vmread_of_the_high_half_of_a_64_bit_field_and_of_a_bad_encoding():
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        mov ecx, 0x201a
        mov rdx, 0x1122334455667788
        vmwrite rcx, rdx
        mov ecx, 0x201b
        vmread rax, rcx
        cmp rax, 0x11223344
        jne bad
        mov ecx, 0x0801
        vmread rax, rcx
        jnz bad
        mov ecx, 0x4400
        vmread rax, rcx
        cmp eax, 12
        jmp end
    bad:
        mov al, 0x7f
        out 0xf4, al
    end:
    """
    assert run_l1(body) == 0x80 | ZF


def test_register_forms_take_the_short_path_memory_forms_the_full_one(monkeypatch):
    """The register forms never reach the full VMREAD/VMWRITE (patched to
    report through isa-debug-exit); a memory operand does."""
    from vmlab.vmm import nested
    from vmlab.vmm.runloop import Stop, StopReason
    monkeypatch.setattr(nested.NestedVmx, "_vmread", lambda self, ex: Stop(StopReason.ERROR, "full vmread"))
    monkeypatch.setattr(nested.NestedVmx, "_vmwrite", lambda self, ex: Stop(StopReason.ERROR, "full vmwrite"))
    body = ENABLE + VMXON + """
        vmptrld qword ptr [0x30008]
        mov ecx, 0x681e
        mov r15, 0x123456789a
        vmwrite rcx, r15
        vmread r14, rcx
        cmp r14, r15
    """
    assert run_l1(body) == 0x80 | ZF
    with pytest.raises(AssertionError, match="full vmwrite"):
        run_l1(ENABLE + VMXON + "vmptrld qword ptr [0x30008]\nmov ecx, 0x681e\nvmwrite rcx, qword ptr [0x30000]\n")


# ---------------------------------------------------------------------- composition with L0 Python handlers
def _harness_l1(body: str, nested: bool):
    """A Python VmxGuest (L0) over a guest (L1) that runs ``body`` (its CR4
    has VMXE: IA32_VMX_CR4_FIXED0 makes the entry checks ask for it)."""
    from vmlab.vmm.harness import vmx_guest
    g = vmx_guest(body + "\nhlt", fields={"CR4_GUEST_HOST_MASK": 0})
    if nested:
        n = g.vm.enable_nested_vmx()
        g.vm.msrs.write(0x3A, 5)                        # IA32_FEATURE_CONTROL: lock, VMX outside SMX
        g.vm.mem.write(REGION, n.caps.revision_id.to_bytes(4, "little"))
        g.vm.mem.write(REGION + 0x1000, n.caps.revision_id.to_bytes(4, "little"))
    for i, p in enumerate((REGION, REGION + 0x1000)):
        g.vm.mem.write(0x30000 + 8 * i, p.to_bytes(8, "little"))
    return g


L1_UNDER_L0 = """
    vmxon qword ptr [0x30000]
    vmptrld qword ptr [0x30008]
    mov ecx, 0x681e
    vmread rax, rcx
    mov eax, 2
    mov rsi, 0x30000
    invept rax, [rsi]
    vmlaunch
"""


def test_l0_python_handlers_see_l1s_vmx_instructions_as_exits():
    """Under a Python harness (L0), the guest's VMX instructions are VM exits to
    the harness: VMXON 27, VMPTRLD 21, VMREAD 23, INVEPT 50, VMLAUNCH 20 (SDM
    Vol. 3C Appendix C; 26.1.2: they exit unconditionally in non-root operation)."""
    from vmlab.vmm.exit_reasons import ExitReason
    g = _harness_l1(L1_UNDER_L0, nested=False)
    seen = []
    for _ in range(5):
        ex = g.run(max_insns=100_000)
        seen.append(int(ex.reason))
        ex.skip()
    assert seen == [ExitReason.VMXON, ExitReason.VMPTRLD, ExitReason.VMREAD, ExitReason.INVEPT,
                    ExitReason.VMLAUNCH] == [27, 21, 23, 50, 20]
    g.close()


def test_l0_handlers_may_pass_l1s_vmx_instructions_to_guest_visible_vmx_but_not_run_l2():
    """An L0 handler's ex.emulate() executes the instruction for L1 with
    vmm/nested.py (VMXON, VMPTRLD, VMREAD, INVEPT succeed); a VMLAUNCH ends
    the run with an error: L2 under both policies is not supported."""
    from vmlab.vmm.exit_reasons import ExitReason
    from vmlab.vmm.vmx import RunStopped
    g = _harness_l1(L1_UNDER_L0, nested=True)
    flags = []

    def emulate(ex):
        ex.emulate()
        flags.append((ex.reason, g.regs.rflags & (CF | ZF)))

    for r in (ExitReason.VMXON, ExitReason.VMPTRLD, ExitReason.VMREAD, ExitReason.INVEPT, ExitReason.VMLAUNCH):
        g.handler(r)(emulate)
    res = g.run(max_insns=100_000)
    assert flags[:4] == [(ExitReason.VMXON, 0), (ExitReason.VMPTRLD, 0), (ExitReason.VMREAD, 0),
                         (ExitReason.INVEPT, 0)]                          # VMsucceed each
    assert g.vm.nested.vmxon == REGION and g.vm.nested.current == REGION + 0x1000
    assert isinstance(res, RunStopped) and res.result.reason == "error", res
    assert "cannot run L2 under a Python VMX harness (the L0 handler emulated VMLAUNCH)" in res.result.message
    g.close()

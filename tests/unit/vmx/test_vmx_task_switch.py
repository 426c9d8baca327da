"""Task switches in VMX non-root operation (SDM Vol. 3C 26.4.2): the Python
harness (vmm/vmx.py VmxGuest) sees a far JMP/CALL to a TSS or through a task
gate as VM exit 9 with the Table 28-2 qualification and the instruction
length, before anything of the task switch happens; the checks 26.4.2 puts
first fault as outside VMX; other far transfers run natively.  A guest
hypervisor's L2 gets the same (guests/nested_vmx.c, tests/guests/test_nested_vmx.py)."""
from __future__ import annotations

import struct

from vmlab.vmm import vmcs as F
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import vmx_guest

GDT = 0x6000      # the harness's GDT: null, code 0x08, data 0x10, busy TSS 0x18 (at 0x5000)
NEW_TSS = 0x5800


def _guest(code: str, extra: dict[int, int], mode: str = "protected32", **kw):
    g = vmx_guest(code, mode, exception_bitmap=1 << 13, **kw)
    for sel, desc in extra.items():
        g.vm.mem.write(GDT + sel, struct.pack("<Q", desc))
    g.vmcs.write(F.GUEST_GDTR_LIMIT, 0x4F)
    g.vm.mem.write(0x5000 + 0x20, struct.pack("<I", 0x5EED))      # the current TSS's EIP field
    return g


def _tss(base: int, type_: int = 0x89, dpl: int = 0) -> int:
    return 0x67 | ((base & 0xFFFFFF) << 16) | ((type_ | dpl << 5) << 40) | ((base >> 24) << 56)


def _unswitched(g) -> bool:
    mem = g.vm.mem
    return (g.cpu.regs.tr.selector == 0x18 and struct.unpack("<Q", mem.read(GDT + 0x20, 8))[0] & (1 << 41) == 0
            and struct.unpack("<I", mem.read(0x5000 + 0x20, 4))[0] == 0x5EED)


JMP_FAR_0x20 = bytes.fromhex("ea00000000" "2000" "f4")       # JMP ptr16:32 (EA), then HLT
CALL_FAR_0x28 = bytes.fromhex("9a00000000" "2800" "f4")      # CALL ptr16:32 (9A)


def test_far_jmp_to_a_tss_is_exit_9_with_selector_source_and_length():
    g = _guest(JMP_FAR_0x20, {0x20: _tss(NEW_TSS)})
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH
    assert ex.qualification == 0x20 | (2 << 30) and ex.instruction_length == 7
    assert g.vmcs.read(F.GUEST_RIP) == 0x100000 and _unswitched(g)


def test_far_jmp_with_16_bit_operands_is_6_bytes_long():
    g = _guest("ljmp 0x20:0\n hlt", {0x20: _tss(NEW_TSS)})     # Keystone: 66 EA ptr16:16
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH and ex.qualification == 0x20 | (2 << 30)
    assert ex.instruction_length == 6


def test_far_call_through_a_task_gate_names_the_tss_and_source_call():
    gate = (0x20 << 16) | (0x85 << 40)                            # present task gate, DPL 0 -> TSS 0x20
    g = _guest(CALL_FAR_0x28, {0x20: _tss(NEW_TSS), 0x28: gate})
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH
    assert ex.qualification == 0x20 and ex.instruction_length == 7
    assert _unswitched(g)


def test_far_jmp_through_memory_operand_to_a_tss_exits_with_its_length():
    g = _guest("ljmp [0x300]\n hlt", {0x20: _tss(NEW_TSS)})
    g.vm.mem.write(0x300, struct.pack("<IH", 0x1234, 0x20))
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH and ex.qualification == 0x20 | (2 << 30)
    assert ex.instruction_length == 6


def test_far_jmp_to_a_code_segment_runs_natively_without_an_exit():
    code = bytes.fromhex("ea10001000" "0800") + b"\xf4" * 9 + bytes.fromhex("b877000000" "0fa2")   # at 0x100010: mov eax, 0x77; cpuid
    g = _guest(code, {0x20: _tss(NEW_TSS)})
    ex = g.run()
    assert ex.reason == ExitReason.CPUID and g.cpu.regs.gpr[0] & 0xFFFFFFFF == 0x77


def test_the_checks_before_the_exit_fault_as_outside_vmx():
    # A busy TSS as the target of a JMP: #GP(selector) (26.4.2 check 4), which the exception bitmap turns into exit 0.
    g = _guest(JMP_FAR_0x20, {0x20: _tss(NEW_TSS, 0x8B)})
    ex = g.run()
    assert ex.reason == ExitReason.EXCEPTION_NMI and g.vmcs.read(F.VM_EXIT_INTR_ERROR_CODE) == 0x20
    # A TSS descriptor whose DPL is below the selector's RPL: #GP(selector) (check 1).
    g = _guest(bytes.fromhex("ea00000000" "2300" "f4"), {0x20: _tss(NEW_TSS)})
    assert g.run().reason == ExitReason.EXCEPTION_NMI and g.vmcs.read(F.VM_EXIT_INTR_ERROR_CODE) == 0x20
    # Not present: #NP(selector) (check 4), delivered in the guest (vector 11 is not in the bitmap).
    g = _guest(JMP_FAR_0x20, {0x20: _tss(NEW_TSS) & ~(1 << 47)}, )
    g.vmcs.write(F.EXCEPTION_BITMAP, 1 << 11)
    ex = g.run()
    assert ex.reason == ExitReason.EXCEPTION_NMI
    assert g.vmcs.read(F.VM_EXIT_INTR_INFO) & 0xFF == 11 and g.vmcs.read(F.VM_EXIT_INTR_ERROR_CODE) == 0x20


IDT = 0x7000      # the harness's IDT for protected32 (limit 0xFFF)
TASK_GATE_0x20 = (0x20 << 16) | (0x85 << 40)        # present task gate, DPL 0 -> TSS 0x20


def test_int_n_through_a_task_gate_exits_with_source_3_and_idt_vectoring_information():
    g = _guest(bytes.fromhex("cd31f4"), {0x20: _tss(NEW_TSS)})          # INT 0x31; HLT
    g.vm.mem.write(IDT + 0x31 * 8, struct.pack("<Q", TASK_GATE_0x20))
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH and ex.qualification == 0x20 | (3 << 30)
    assert ex.instruction_length == 2 and g.vmcs.read(F.GUEST_RIP) == 0x100000
    # valid, type 4 (software interrupt), vector 0x31 (the IDT-vectoring information, SDM Vol. 3C 28.2.4)
    assert g.vmcs.read(F.IDT_VECTORING_INFO) == 0x80000431
    assert _unswitched(g)


def test_an_exception_through_a_task_gate_records_it_with_its_error_code():
    # A far JMP to a busy TSS is #GP(0x20) (SDM Vol. 3C 26.4.2 check 4),
    # and #GP's IDT entry is a task gate: exit 9 with the #GP in the IDT-vectoring fields.
    g = _guest(JMP_FAR_0x20, {0x20: _tss(NEW_TSS, 0x8B), 0x28: _tss(NEW_TSS + 0x100)})
    g.vmcs.write(F.EXCEPTION_BITMAP, 0)
    g.vm.mem.write(IDT + 13 * 8, struct.pack("<Q", (0x28 << 16) | (0x85 << 40)))
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH and ex.qualification == 0x28 | (3 << 30)
    assert ex.instruction_length == 0 and g.vmcs.read(F.GUEST_RIP) == 0x100000
    # valid, error code valid (bit 11), type 3 (hardware exception), vector 13
    assert g.vmcs.read(F.IDT_VECTORING_INFO) == 0x80000B0D and g.vmcs.read(F.IDT_VECTORING_ERROR_CODE) == 0x20


def test_iret_with_nt_returns_to_the_back_link_as_exit_9_source_iret():
    """RFLAGS.NT = 1 at VM entry: IRET would switch back to the task in the
    current TSS's back link, a busy TSS: exit 9, source 1, length 1."""
    g = _guest(bytes.fromhex("cff4"), {0x20: _tss(NEW_TSS, 0x8B)})          # IRET; HLT
    g.vm.mem.write(0x5000, struct.pack("<H", 0x20))                            # back link of TSS 0x18
    g.vmcs.write(F.GUEST_RFLAGS, 0x4002)
    ex = g.run()
    assert ex.reason == ExitReason.TASK_SWITCH and ex.qualification == 0x20 | (1 << 30)
    assert ex.instruction_length == 1 and g.vmcs.read(F.GUEST_RIP) == 0x100000
    assert g.cpu.regs.tr.selector == 0x18


def test_iret_with_nt_to_an_available_tss_is_ts_before_any_exit():
    g = _guest(bytes.fromhex("cff4"), {0x20: _tss(NEW_TSS)})                   # not busy: #TS(0x20)
    g.vm.mem.write(0x5000, struct.pack("<H", 0x20))
    g.vmcs.write(F.GUEST_RFLAGS, 0x4002)
    g.vmcs.write(F.EXCEPTION_BITMAP, 1 << 10)
    ex = g.run()
    assert ex.reason == ExitReason.EXCEPTION_NMI
    assert g.vmcs.read(F.VM_EXIT_INTR_INFO) & 0xFF == 10 and g.vmcs.read(F.VM_EXIT_INTR_ERROR_CODE) == 0x20


def test_iret_without_nt_runs_natively():
    # push EFLAGS (2), CS 0x08, EIP 0x10000c; IRET; HLT HLT; at 0x10000c: CPUID
    code = bytes.fromhex("6a02" "6a08" "680c001000" "cf" "f4f4" "0fa2")
    g = _guest(code, {0x20: _tss(NEW_TSS)})
    ex = g.run()
    assert ex.reason == ExitReason.CPUID and g.vmcs.read(F.GUEST_RIP) == 0x10000c

"""VM exits decided by VMCS controls, with SDM-exact exit information
(SDM Vol. 3C ch. 26 and 28), through the vmx_guest harness."""
import struct

import pytest

from support import gate64
from vmlab.vmm import vmcs as F
from vmlab.vmm.controls import InterruptionInfo, InterruptionType, PinBasedControls, PrimaryProcBasedControls as P
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import vmx_guest
from vmlab.vmm.qualification import CrAccessQualification, CrAccessType, Gpr, IoQualification
from vmlab.vmm.vmx import VmEntryFailed


def run(g, n=100_000):
    return g.run(max_insns=n)


def test_cpuid_exits_unconditionally_with_instruction_length():
    g = vmx_guest("mov eax, 1\n cpuid\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.CPUID
    assert ex.instruction_length == 2
    assert ex.vmcs.read(F.GUEST_RIP) == 0x100005          # at the CPUID
    assert ex.vmcs.read(F.VM_EXIT_REASON) == 10
    assert ex.regs.rax == 1


def test_handler_changes_registers_and_skips():
    g = vmx_guest("mov eax, 0x40000000\n cpuid\n mov r8, rbx\n hlt")

    @g.handler(ExitReason.CPUID)
    def cpuid(ex):
        ex.regs.rbx = 0x766D6C61       # "vmla"
        ex.skip()

    ex = run(g)
    assert ex.reason == ExitReason.HLT
    assert g.regs.r8 == 0x766D6C61


def test_unconditional_io_exiting_qualification_is_sdm_table_28_5():
    g = vmx_guest("mov dx, 0x3f8\n mov al, 0x41\n out dx, al\n in al, 0x80\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.IO_INSTRUCTION
    # size-1 = 0, OUT (bit 3 = 0), DX operand (bit 6 = 0), port 0x3f8 in bits 31:16
    assert ex.qualification == 0x03F80000
    assert ex.decoded == IoQualification(size=1, direction_in=False, port=0x3F8)
    ex.emulate()
    ex = run(g)
    assert ex.qualification == IoQualification(size=1, direction_in=True, port=0x80, immediate=True).encode()
    assert ex.qualification == 0x00800048
    assert g.vm.serial_output == b"A"


def test_io_bitmap_lets_some_ports_through_to_the_devices():
    bitmap_a = 0x20000
    g = vmx_guest("mov dx, 0x3f8\n mov al, 0x42\n out dx, al\n out 0x80, al\n hlt",
                  proc=(P.USE_IO_BITMAPS, P.UNCONDITIONAL_IO_EXITING),
                  fields={"IO_BITMAP_A": bitmap_a, "IO_BITMAP_B": bitmap_a + 0x1000})
    g.vm.mem.write(bitmap_a + 0x80 // 8, bytes([1 << (0x80 % 8)]))
    ex = run(g)
    assert ex.reason == ExitReason.IO_INSTRUCTION and ex.decoded.port == 0x80
    assert g.vm.serial_output == b"B"          # 0x3f8 went straight to the UART


def test_msr_bitmap_read_exit_and_write_pass_through():
    bitmap = 0x20000
    g = vmx_guest("mov ecx, 0xc0000082\n mov eax, 0x1000\n xor edx, edx\n wrmsr\n rdmsr\n hlt",
                  proc=(P.USE_MSR_BITMAPS, 0), fields={"MSR_BITMAP": bitmap})
    g.vm.mem.write(bitmap + 0x400 + 0x82 // 8, bytes([1 << (0x82 % 8)]))   # read-high: LSTAR
    ex = run(g)
    assert ex.reason == ExitReason.RDMSR
    assert g.vm.msrs.read(0xC0000082) == 0x1000                            # the WRMSR did not exit


def test_mov_to_cr0_owned_bit_exits_with_cr_access_qualification():
    g = vmx_guest("mov rbx, cr0\n and rbx, 0xfffffffffffeffff\n mov cr0, rbx\n hlt",
                  fields={"CR0_GUEST_HOST_MASK": 1 << 16 | 1 << 5})
    g.vmcs["CR0_READ_SHADOW"] = g.vmcs["GUEST_CR0"]
    ex = run(g)
    assert ex.reason == ExitReason.CR_ACCESS
    q = CrAccessQualification.decode(ex.qualification)
    assert q == CrAccessQualification(cr=0, access_type=CrAccessType.MOV_TO_CR, gpr=Gpr.RBX)
    assert ex.qualification == 0x300


def test_mov_from_cr0_reads_the_shadow_for_owned_bits():
    g = vmx_guest("mov rax, cr0\n hlt", fields={"CR0_GUEST_HOST_MASK": 1 << 18})
    g.vmcs["CR0_READ_SHADOW"] = g.vmcs["GUEST_CR0"] | 1 << 18
    ex = run(g)
    assert ex.reason == ExitReason.HLT
    assert g.regs.rax & (1 << 18)
    assert not g.cpu.regs.cr0 & (1 << 18)


def test_cr3_load_exiting_spares_cr3_target_values():
    g = vmx_guest("mov rax, cr3\n mov cr3, rax\n mov rbx, 0x2000\n mov cr3, rbx\n hlt",
                  proc=(P.CR3_LOAD_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.CR_ACCESS and ex.decoded.cr == 3
    ex.skip()
    g.vmcs["CR3_TARGET_COUNT"] = 1
    g.vmcs["CR3_TARGET_VALUE0"] = 0x2000
    g.vmcs["GUEST_RIP"] = 0x100000
    ex = run(g)
    assert ex.reason == ExitReason.HLT


def test_invlpg_exiting_qualification_is_the_linear_address():
    g = vmx_guest("mov rbx, 0x123000\n invlpg [rbx + 0x45]\n hlt", proc=(P.INVLPG_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.INVLPG and ex.qualification == 0x123045
    assert ex.instruction_length == 4


def test_hlt_exiting_off_halts_in_the_guest():
    g = vmx_guest("mov ecx, 10\n l: dec ecx\n jnz l\n rdtsc\n hlt", proc=(P.RDTSC_EXITING, P.HLT_EXITING))
    ex = run(g)
    assert ex.reason == ExitReason.RDTSC and ex.instruction_length == 2


def test_exception_bitmap_ud_exit_has_interruption_information():
    g = vmx_guest("nop\n ud2\n hlt", exception_bitmap=1 << 6)
    ex = run(g)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    info = InterruptionInfo.decode(ex.vmcs.read(F.VM_EXIT_INTR_INFO))
    assert (info.vector, info.type, info.valid, info.deliver_error_code) == (6, InterruptionType.HARDWARE_EXCEPTION,
                                                                              True, False)
    assert ex.vmcs.read(F.GUEST_RIP) == 0x100001


def test_int3_exit_is_a_software_exception_with_length_one():
    g = vmx_guest("int3\n hlt", exception_bitmap=1 << 3)
    ex = run(g)
    info = InterruptionInfo.decode(ex.vmcs.read(F.VM_EXIT_INTR_INFO))
    assert info.type == InterruptionType.SOFTWARE_EXCEPTION and info.vector == 3
    assert ex.instruction_length == 1 and ex.vmcs.read(F.GUEST_RIP) == 0x100000


def test_page_fault_exit_follows_error_code_mask_and_match():
    code = "mov rbx, 0x100000010\n mov rax, [rbx]\n hlt"    # beyond the 4 GiB identity map
    g = vmx_guest(code, exception_bitmap=1 << 14,
                  fields={"PAGE_FAULT_ERROR_CODE_MASK": 1, "PAGE_FAULT_ERROR_CODE_MATCH": 0})
    ex = run(g)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    assert ex.qualification == 0x100000010                      # CR2 in the qualification
    assert ex.vmcs.read(F.VM_EXIT_INTR_ERROR_CODE) == 0
    # With match = 1 (P=1 faults only), the not-present fault no longer exits.
    g2 = vmx_guest(code, exception_bitmap=1 << 14,
                   fields={"PAGE_FAULT_ERROR_CODE_MASK": 1, "PAGE_FAULT_ERROR_CODE_MATCH": 1})
    ex = run(g2)
    assert ex.reason == ExitReason.TRIPLE_FAULT                 # delivered to an empty IDT


def test_vmcall_exits():
    g = vmx_guest("vmcall\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.VMCALL and ex.instruction_length == 3


def test_event_injection_reaches_the_guest_idt_handler():
    # An injected external interrupt needs RFLAGS.IF = 1 (SDM 27.3.1.5).
    g = vmx_guest("hlt\n hlt", fields={"GUEST_RFLAGS": 0x202})
    handler = 0x180000
    g.vm.mem.write(handler, bytes.fromhex("49c7c0efbeadde") + b"\x48\xcf")   # mov r8, 0xdeadbeef; iretq
    g.vm.mem.write(0x7000 + 16 * 0x30, gate64(handler, 0x08))
    g.vmcs["VM_ENTRY_INTR_INFO"] = InterruptionInfo.external_interrupt(0x30).encode()
    ex = run(g)
    assert ex.reason == ExitReason.HLT
    assert g.regs.r8 == 0xFFFFFFFFDEADBEEF          # mov r8, imm32 sign-extends


def test_interrupt_window_exiting_exits_when_if_becomes_one():
    g = vmx_guest("cli\n nop\n sti\n nop\n hlt", proc=(P.INTERRUPT_WINDOW_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.INTERRUPT_WINDOW
    assert ex.vmcs.read(F.GUEST_RFLAGS) & 0x200


def test_triple_fault_exits():
    g = vmx_guest("xor ecx, ecx\n div ecx\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.TRIPLE_FAULT


def test_bad_guest_rflags_fails_entry_with_reason_33():
    g = vmx_guest("hlt", fields={"GUEST_RFLAGS": 0})
    ex = run(g)
    assert ex.entry_failure and ex.reason == ExitReason.ENTRY_FAIL_GUEST_STATE
    assert ex.vmcs.read(F.VM_EXIT_REASON) == (1 << 31) | 33


def test_reserved_control_bit_is_vmfail_valid():
    g = vmx_guest("hlt")
    g.vmcs["CR3_TARGET_COUNT"] = 5
    with pytest.raises(VmEntryFailed):
        run(g)


def test_default_handlers_run_an_ordinary_guest():
    g = vmx_guest("mov dx, 0x3f8\n mov al, 0x4f\n out dx, al\n mov al, 0x4b\n out dx, al\n"
                  "mov eax, 0\n cpuid\n mov ecx, 0x1b\n rdmsr\n vmcall")
    g.use_default_handlers()
    ex = run(g)
    assert ex.reason == ExitReason.VMCALL
    assert g.vm.serial_output == b"OK"
    assert g.regs.rax == 0xFEE00900


def test_external_interrupt_exiting_acknowledges_the_pit_interrupt():
    code = """
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 4
        out 0x21, al
        mov al, 1
        out 0x21, al
        mov al, 0xfe
        out 0x21, al
        mov al, 0x34
        out 0x43, al
        mov al, 0xa9
        out 0x40, al
        mov al, 4
        out 0x40, al
        l: jmp l
    """
    g = vmx_guest(code)
    g.use_default_handlers(ExitReason.IO_INSTRUCTION)
    ex = run(g, 5_000_000)
    assert ex.reason == ExitReason.EXTERNAL_INTERRUPT
    info = InterruptionInfo.decode(ex.vmcs.read(F.VM_EXIT_INTR_INFO))
    assert info.vector == 0x20 and info.type == InterruptionType.EXTERNAL_INTERRUPT


def test_injecting_an_external_interrupt_with_if_clear_fails_entry():
    g = vmx_guest("hlt")
    g.vmcs["VM_ENTRY_INTR_INFO"] = InterruptionInfo.external_interrupt(0x30).encode()
    ex = run(g)
    assert ex.entry_failure and ex.reason == ExitReason.ENTRY_FAIL_GUEST_STATE


def test_mov_dr_exiting_qualification_is_sdm_table_28_4():
    from vmlab.vmm.qualification import DrAccessQualification
    g = vmx_guest("mov rdx, 0x400\n mov dr7, rdx\n hlt", proc=(P.MOV_DR_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.DR_ACCESS
    assert ex.decoded == DrAccessQualification(dr=7, mov_from_dr=False, gpr=Gpr.RDX)
    assert ex.qualification == 0x207


def test_rdrand_exiting_and_wbinvd_exiting():
    from vmlab.vmm.controls import SecondaryProcBasedControls as S
    g = vmx_guest("wbinvd\n rdrand eax\n hlt", proc2=(S.WBINVD_EXITING | S.RDRAND_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.WBINVD and ex.instruction_length == 2
    ex.skip()
    ex = run(g)
    assert ex.reason == ExitReason.RDRAND and ex.instruction_length == 3


def test_guest_state_area_after_exit_holds_the_guest_segments_and_registers():
    g = vmx_guest("mov ax, 0x10\n mov ds, ax\n mov rsp, 0x9000\n vmcall")
    ex = run(g)
    v = ex.vmcs
    assert v.read(F.GUEST_CS_SELECTOR) == 0x08 and v.read(F.GUEST_DS_SELECTOR) == 0x10
    assert v.read(F.GUEST_CS_ACCESS_RIGHTS) & 0xFF == 0x9B and v.read(F.GUEST_CS_ACCESS_RIGHTS) >> 13 & 1  # L
    assert v.read(F.GUEST_RSP) == 0x9000
    assert v.read(F.GUEST_TR_SELECTOR) == 0x18
    assert v.read(F.GUEST_CR3) == 0x2000


def test_preemption_timer_exits_after_its_count_in_virtual_time():
    g = vmx_guest("l: jmp l", pin=(PinBasedControls.ACTIVATE_PREEMPTION_TIMER, 0),
                  fields={"VMX_PREEMPTION_TIMER_VALUE": 1000})
    start = g.cpu.icount
    ex = run(g, 10_000_000)
    assert ex.reason == ExitReason.PREEMPTION_TIMER
    rate = g.caps.misc & 0x1F
    assert 1000 << rate <= g.cpu.icount - start <= (1000 << rate) + 100


def test_monitor_trap_flag_exits_after_each_instruction():
    g = vmx_guest("nop\n nop\n inc rax\n vmcall", proc=(P.MONITOR_TRAP_FLAG, 0))
    rips = []
    for _ in range(3):
        ex = run(g)
        assert ex.reason == ExitReason.MONITOR_TRAP_FLAG
        rips.append(ex.vmcs.read(F.GUEST_RIP))
    assert rips == [0x100001, 0x100002, 0x100005]


def test_rep_outsb_exit_has_ins_outs_instruction_information_and_linear_address():
    from vmlab.vmm.qualification import AddressSize, InsOutsInfo, SegmentReg
    g = vmx_guest("mov rsi, 0x200010\n mov ecx, 4\n mov dx, 0x3f8\n .byte 0x64, 0xf3, 0x6e\n hlt")   # fs rep outsb
    ex = run(g)
    assert ex.reason == ExitReason.IO_INSTRUCTION
    assert ex.decoded == IoQualification(size=1, direction_in=False, port=0x3F8, string=True, rep=True)
    info = InsOutsInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO))
    assert info == InsOutsInfo(AddressSize.BITS64, SegmentReg.FS)
    assert ex.vmcs.read(F.GUEST_LINEAR_ADDRESS) == 0x200010      # FS base is 0 here


def test_fault_during_event_delivery_exits_with_idt_vectoring_information():
    # The IDT lies beyond the 4 GiB identity map: reading the gate for INT 0x30
    # faults (#PF), which the exception bitmap intercepts.
    g = vmx_guest("int 0x30\n hlt", exception_bitmap=1 << 14,
                  fields={"GUEST_IDTR_BASE": 0x100000000})
    ex = run(g)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    info = InterruptionInfo.decode(ex.vmcs.read(F.VM_EXIT_INTR_INFO))
    assert info.vector == 14
    assert ex.qualification == 0x100000000 + 0x30 * 16
    vec = InterruptionInfo.decode(ex.vmcs.read(F.IDT_VECTORING_INFO))
    assert (vec.valid, vec.type, vec.vector) == (True, InterruptionType.SOFTWARE_INTERRUPT, 0x30)
    assert ex.instruction_length == 2 and ex.vmcs.read(F.GUEST_RIP) == 0x100000


def test_nmi_exiting_turns_a_self_nmi_into_an_exit_with_nmi_type():
    # ICR: fixed destination = own APIC ID 0, delivery mode NMI (SDM 11.6.1).
    g = vmx_guest("mov rbx, 0xfee00000\n mov dword ptr [rbx + 0x310], 0\n mov dword ptr [rbx + 0x300], 0x400\n"
                  "l: jmp l")
    ex = run(g)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    info = InterruptionInfo.decode(ex.vmcs.read(F.VM_EXIT_INTR_INFO))
    assert (info.type, info.vector) == (InterruptionType.NMI, 2)


def test_nmi_window_exiting_exits_at_entry():
    g = vmx_guest("hlt", proc=(P.NMI_WINDOW_EXITING, 0))
    assert run(g).reason == ExitReason.NMI_WINDOW


@pytest.mark.parametrize("code,proc,proc2,reason,length", [
    ("pause", P.PAUSE_EXITING, 0, ExitReason.PAUSE, 2),
    ("xor ecx, ecx\n rdpmc", P.RDPMC_EXITING, 0, ExitReason.RDPMC, 2),
    ("mov rax, rsp\n xor ecx, ecx\n xor edx, edx\n monitor", P.MONITOR_EXITING, 0, ExitReason.MONITOR, 3),
    ("xor eax, eax\n xor ecx, ecx\n mwait", P.MWAIT_EXITING, 0, ExitReason.MWAIT, 3),
    ("rdtscp", P.RDTSC_EXITING, 1 << 3, ExitReason.RDTSCP, 3),
    ("rdseed eax", 0, 1 << 16, ExitReason.RDSEED, 3),
    ("sub rsp, 16\n sgdt [rsp]", 0, 1 << 2, ExitReason.GDTR_IDTR_ACCESS, 4),
    ("str ax", 0, 1 << 2, ExitReason.LDTR_TR_ACCESS, 4),
    ("invd", 0, 0, ExitReason.INVD, 2),
    ("mov rax, 8\n mov cr8, rax", P.CR8_LOAD_EXITING, 0, ExitReason.CR_ACCESS, 4),
    ("mov rax, cr8", P.CR8_STORE_EXITING, 0, ExitReason.CR_ACCESS, 4),
])
def test_instruction_exits_by_control(code, proc, proc2, reason, length):
    g = vmx_guest(code + "\n hlt", proc=(proc, 0), proc2=(proc2, 0))
    ex = run(g)
    assert ex.reason == reason
    assert ex.instruction_length == length


def test_xsetbv_without_osxsave_is_ud_before_its_unconditional_exit():
    # XSETBV VM-exits unconditionally (SDM Vol. 3C 26.1.2), but #UD when
    # CR4.OSXSAVE = 0 comes first (26.1.1; vmlab advertises no XSAVE, so the
    # guest cannot set OSXSAVE): a VM exit for the exception, vector 6.
    g = vmx_guest("xor ecx, ecx\n xor edx, edx\n mov eax, 1\n xsetbv\n hlt", exception_bitmap=1 << 6)
    ex = run(g)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    assert ex.vmcs.read(F.VM_EXIT_INTR_INFO) == 0x80000306      # valid, hardware exception, #UD
    assert ex.vmcs.read(F.GUEST_RIP) == 0x100009                 # the fault: RIP at XSETBV


@pytest.mark.parametrize("mode,code,rip,bits", [
    ("protected32", "mov eax, 1\n cpuid\n hlt", 0x100005, 32),
    ("real-unrestricted", "mov ax, 1\n cpuid\n hlt", 0xFFF3, 16),
])
def test_baseline_modes_enter_and_exit(mode, code, rip, bits):
    g = vmx_guest(code, mode)
    ex = run(g)
    assert ex.reason == ExitReason.CPUID and ex.instruction_length == 2
    assert ex.vmcs.read(F.GUEST_RIP) == rip
    assert g.cpu.mode_bits == bits


def test_invpcid_exits_with_invlpg_exiting_and_enable_invpcid():
    from vmlab.vmm.controls import SecondaryProcBasedControls as S
    g = vmx_guest("xor eax, eax\n sub rsp, 16\n invpcid rax, [rsp]\n hlt",
                  proc=(P.INVLPG_EXITING, 0), proc2=(S.ENABLE_INVPCID, 0))
    ex = run(g)
    assert ex.reason == ExitReason.INVPCID and ex.instruction_length == 6     # 66 0f 38 82 04 24


def test_lgdt_exit_has_descriptor_table_instruction_information():
    from vmlab.vmm.controls import SecondaryProcBasedControls as S
    from vmlab.vmm.qualification import AddressSize, DescriptorTableInfo, DescriptorTableInstruction, SegmentReg
    g = vmx_guest("mov rbx, 0x200000\n mov rcx, 2\n lgdt [rbx + rcx*4 + 0x10]\n hlt", proc2=(S.DESCRIPTOR_TABLE_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.GDTR_IDTR_ACCESS and ex.qualification == 0x10
    info = DescriptorTableInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO))
    assert info == DescriptorTableInfo(instruction=DescriptorTableInstruction.LGDT, scaling=2,
                                       address_size=AddressSize.BITS64, operand_size_32=True,
                                       segment=SegmentReg.DS, index_reg=Gpr.RCX, index_invalid=False,
                                       base_reg=Gpr.RBX, base_invalid=False)


def test_str_register_operand_and_rdrand_instruction_information():
    from vmlab.vmm.controls import SecondaryProcBasedControls as S
    from vmlab.vmm.qualification import LdtrTrInfo, LdtrTrInstruction, OperandSize, RdrandRdseedInfo
    g = vmx_guest("str dx\n rdrand r9\n hlt", proc2=(S.DESCRIPTOR_TABLE_EXITING | S.RDRAND_EXITING, 0))
    ex = run(g)
    assert ex.reason == ExitReason.LDTR_TR_ACCESS
    info = LdtrTrInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO))
    assert (info.instruction, info.register_operand, info.reg1) == (LdtrTrInstruction.STR, True, Gpr.RDX)
    ex.skip()
    ex = run(g)
    assert ex.reason == ExitReason.RDRAND
    assert RdrandRdseedInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO)) == \
        RdrandRdseedInfo(dest_reg=Gpr.R9, operand_size=OperandSize.BITS64)


def test_vmptrld_and_invept_exits_carry_memory_operand_information():
    from vmlab.vmm.qualification import InvalidationInfo, VmxMemoryOperandInfo
    g = vmx_guest("mov rsi, 0x200000\n vmptrld [rsi + 8]\n mov eax, 1\n invept rax, [rsi - 0x20]\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.VMPTRLD and ex.qualification == 8
    info = VmxMemoryOperandInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO))
    assert info.base_reg == Gpr.RSI and not info.base_invalid and info.index_invalid
    ex.skip()
    ex = run(g)
    assert ex.reason == ExitReason.INVEPT
    assert ex.qualification == (-0x20) & 0xFFFFFFFFFFFFFFFF
    inv = InvalidationInfo.decode(ex.vmcs.read(F.VM_EXIT_INSTRUCTION_INFO))
    assert inv.reg2 == Gpr.RAX and inv.base_reg == Gpr.RSI


def test_getsec_exits_unconditionally():
    g = vmx_guest("xor eax, eax\n getsec\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.GETSEC and ex.instruction_length == 2


def test_tsc_offsetting_applies_to_rdtsc_in_the_guest():
    g = vmx_guest("rdtsc\n shl rdx, 32\n or rax, rdx\n vmcall", proc=(P.USE_TSC_OFFSETTING, P.RDTSC_EXITING),
                  fields={"TSC_OFFSET": 1 << 40})
    ex = run(g)
    assert ex.reason == ExitReason.VMCALL
    assert (1 << 40) <= g.regs.rax < (1 << 40) + 1_000_000


@pytest.mark.parametrize("info,error_code,length,expect_vector,expect_rip_delta", [
    (InterruptionInfo.nmi(), None, 0, 2, 0),
    (InterruptionInfo.hardware_exception(13, deliver_error_code=True), 0x1234, 0, 13, 0),
    (InterruptionInfo.software_interrupt(0x80), None, 2, 0x80, 2),
    (InterruptionInfo.software_exception(3), None, 1, 3, 1),
    (InterruptionInfo.privileged_software_exception(), None, 1, 1, 1),
])
def test_injected_event_types_reach_the_guest_idt(info, error_code, length, expect_vector, expect_rip_delta):
    # Handler for the vector: store the vector marker, the top stack qwords, then VMCALL.
    g = vmx_guest("nop\n nop\n hlt", fields={"GUEST_RFLAGS": 0x202})
    handler = 0x180000
    code = bytes.fromhex("49c7c0") + expect_vector.to_bytes(4, "little")     # mov r8, vector
    code += bytes.fromhex("4c8b0c24")                                         # mov r9, [rsp]
    code += bytes.fromhex("4c8b542408")                                       # mov r10, [rsp+8]
    code += bytes.fromhex("0f01c1")                                           # vmcall
    g.vm.mem.write(handler, code)
    g.vm.mem.write(0x7000 + 16 * expect_vector, gate64(handler, 0x08, dpl=3))
    g.vmcs["VM_ENTRY_INTR_INFO"] = info.encode()
    if error_code is not None:
        g.vmcs["VM_ENTRY_EXCEPTION_ERROR_CODE"] = error_code
    if length:
        g.vmcs["VM_ENTRY_INSTRUCTION_LEN"] = length
    ex = run(g)
    assert ex.reason == ExitReason.VMCALL
    assert g.regs.r8 == expect_vector
    if error_code is not None:
        assert g.regs.r9 == error_code and g.regs.r10 == 0x100000
    else:
        assert g.regs.r9 == 0x100000 + expect_rip_delta


def _nmi_handler(g, body: bytes):
    handler = 0x180000
    g.vm.mem.write(handler, body)
    g.vm.mem.write(0x7000 + 16 * 2, gate64(handler, 0x08))


def test_nmis_are_blocked_until_iret():
    # The NMI handler sends a second NMI to itself; it must not nest: the handler
    # sees its own count unchanged, and the second NMI comes after IRETQ.
    self_nmi = "mov dword ptr [rbx + 0x300], 0x400\n"
    g = vmx_guest("mov rbx, 0xfee00000\n mov dword ptr [rbx + 0x310], 0\n" + self_nmi +
                  "l: cmp r12, 2\n jne l\n vmcall",
                  pin=(0, PinBasedControls.NMI_EXITING | PinBasedControls.VIRTUAL_NMIS))
    from vmlab.tools.asm import assemble
    handler = assemble("inc r12\n cmp r12, 1\n jne skip\n mov dword ptr [rbx + 0x300], 0x400\n"
                       "mov ecx, 1000\n w: dec ecx\n jnz w\n mov r13, r12\n skip: iretq", 64, 0x180000)
    _nmi_handler(g, handler)
    ex = run(g, 1_000_000)
    assert ex.reason == ExitReason.VMCALL
    assert g.regs.r12 == 2 and g.regs.r13 == 1


def test_virtual_nmi_window_opens_after_the_guest_irets():
    g = vmx_guest("nop\n hlt", proc=(P.NMI_WINDOW_EXITING, 0))
    from vmlab.tools.asm import assemble
    _nmi_handler(g, assemble("mov r8, 0x77\n iretq", 64, 0x180000))
    g.vmcs["VM_ENTRY_INTR_INFO"] = InterruptionInfo.nmi().encode()
    ex = run(g)
    assert ex.reason == ExitReason.NMI_WINDOW
    assert g.regs.r8 == 0x77                                  # the window opened at the IRET
    assert not ex.vmcs.read(F.GUEST_INTERRUPTIBILITY_STATE) & 8


def test_init_ipi_to_itself_exits_with_reason_3():
    g = vmx_guest("mov rbx, 0xfee00000\n mov dword ptr [rbx + 0x310], 0\n"
                  "mov dword ptr [rbx + 0x300], 0x4500\n l: jmp l")   # INIT, level assert, APIC ID 0
    ex = run(g)
    assert ex.reason == ExitReason.INIT


@pytest.mark.parametrize("lean", [False, True])
def test_vmx_guest_dropped_without_close_frees_guest_ram_without_the_cycle_collector(lean):
    """No reference cycle keeps guest RAM alive: after an exit (the VMCS holds
    deferred guest state), dropping the guest frees its RAM at once -- also
    after exits the run loop's lean path took (lean_exit keeps its last exit
    object for reuse while the run lasts; the exit refers to the guest)."""
    import gc
    import weakref
    g = vmx_guest("mov ecx, 3\n l: cpuid\n dec ecx\n jnz l\n vmcall")
    if lean:
        g.handler(ExitReason.CPUID)(lambda ex: ex.skip())
    assert g.run().reason == (ExitReason.VMCALL if lean else ExitReason.CPUID)
    ram = weakref.ref(g.vm.mem)
    was = gc.isenabled()
    gc.disable()
    try:
        del g
        assert ram() is None
    finally:
        if was:
            gc.enable()


def test_vmcs_write_to_a_deferred_guest_field_after_an_exit_is_kept():
    """Guest state is stored into the VMCS lazily after an exit; a handler's
    VMWRITE of such a field must win over the deferred save."""
    g = vmx_guest("cpuid\n vmcall")
    assert g.run().reason == ExitReason.CPUID
    g.vmcs.write(F.GUEST_RFLAGS, 0x202)
    g.vmcs.write(F.GUEST_GS_BASE, 0x1234000)
    assert g.vmcs.read(F.GUEST_RFLAGS) == 0x202
    assert g.vmcs.read(F.GUEST_GS_BASE) == 0x1234000


def test_skip_before_any_vmcs_read_shows_in_guest_rip():
    g = vmx_guest("cpuid\n vmcall")
    ex = g.run()
    rip = ex.regs.rip
    ex.skip()
    assert g.vmcs.read(F.GUEST_RIP) == rip + 2
    assert g.run().reason == ExitReason.VMCALL


def test_l2_fetch_outside_ram_is_invalid_opcode_through_the_exception_bitmap():
    """Unbacked physical memory reads as all ones: FF FF is #UD (not a vmlab error)."""
    g = vmx_guest("mov rax, 0x90000000\n jmp rax", exception_bitmap=1 << 6)
    ex = g.run(max_insns=100_000)
    assert ex.reason == ExitReason.EXCEPTION_NMI
    info = ex.vmcs.read(F.VM_EXIT_INTR_INFO)
    assert info & 0xFF == 6 and info >> 31 == 1
    assert ex.vmcs.read(F.GUEST_RIP) == 0x90000000


def test_l2_fetch_outside_ram_without_an_idt_triple_faults_into_an_exit():
    ex = vmx_guest("mov rax, 0x90000000\n jmp rax").run(max_insns=100_000)
    assert ex.reason == ExitReason.TRIPLE_FAULT


def test_run_instruction_limit_returns_a_result_not_an_exception():
    from vmlab.vmm.runloop import StopReason
    from vmlab.vmm.vmx import RunStopped
    res = vmx_guest("l: jmp l").run(max_insns=10_000)
    assert isinstance(res, RunStopped) and res.reason is None
    assert res.result.reason == StopReason.LIMIT and res.result.icount >= 10_000


def test_run_machine_stop_in_non_root_operation_returns_a_result():
    from vmlab.vmm.runloop import StopReason
    from vmlab.vmm.vmx import RunStopped
    res = vmx_guest("mov al, 3\n out 0xf4, al\n hlt",
                    proc=(0, P.UNCONDITIONAL_IO_EXITING | P.USE_IO_BITMAPS)).run(max_insns=100_000)
    assert isinstance(res, RunStopped)
    assert res.result.reason == StopReason.DEBUG_EXIT and res.result.status == 7


def test_vmm_write_of_a_non_canonical_guest_rip_after_an_exit_fails_entry():
    """A VMWRITE of GUEST_RIP is checked at the next entry (SDM 27.3.1.4: RIP
    must be canonical in 64-bit mode); only the CPU's own skip is exempt."""
    g = vmx_guest("cpuid\n vmcall")
    assert g.run().reason == ExitReason.CPUID
    g.vmcs.write(F.GUEST_RIP, 0x0000_8000_0000_0000)
    ex = g.run()
    assert ex.entry_failure and ex.reason == ExitReason.ENTRY_FAIL_GUEST_STATE


def test_monitor_trap_flag_steps_one_instruction_in_a_block_already_translated():
    """MTF after a free run: blocks translated without instruction counting
    would run whole in Unicorn's one-instruction mode; each MTF exit must still
    come after exactly one instruction (SDM 26.5.2)."""
    g = vmx_guest("mov ecx, 3\n l: inc eax\n inc ebx\n dec ecx\n jnz l\n cpuid\n vmcall")
    start = g.vmcs.read(F.GUEST_RIP)
    ex = g.run()                                   # the loop ran freely: its block is translated
    assert ex.reason == ExitReason.CPUID
    g.vmcs.write(F.GUEST_RIP, start + 5)           # back to l: inc eax (FF C0), inc ebx (FF C3)
    g.vmcs.write(F.CPU_BASED_VM_EXEC_CONTROL, g.vmcs.read(F.CPU_BASED_VM_EXEC_CONTROL) | P.MONITOR_TRAP_FLAG)
    rips = []
    for _ in range(3):
        ex = g.run()
        assert ex.reason == ExitReason.MONITOR_TRAP_FLAG
        rips.append(g.vmcs.read(F.GUEST_RIP))
    assert rips == [start + 7, start + 9, start + 11]


def test_mov_to_cr4_keeps_the_bits_the_guest_host_mask_owns():
    """SDM Vol. 3C 26.3: MOV to CR4 in non-root operation does not modify the
    bits set in the CR4 guest/host mask.  The baseline owns CR4.VMXE with a
    read shadow of 0: the guest writing VMXE = 0 matches the shadow (no exit)
    and the real CR4 keeps VMXE."""
    g = vmx_guest("mov rax, cr4\n and eax, 0xffffdfff\n or eax, 0x80\n mov cr4, rax\n cpuid\n hlt")
    ex = run(g)
    assert ex.reason == ExitReason.CPUID
    cr4 = ex.vmcs.read(F.GUEST_CR4)
    assert cr4 & (1 << 13) and cr4 & 0x80, hex(cr4)      # VMXE kept, PGE (not owned) written


@pytest.mark.parametrize("code,info,error_code,vectoring,length", [
    # INT3 (CC): a software exception (type 6) the bitmap's bit 3 makes a VM exit
    (b"\xcc", 0x80000603, 0, 0, 1),
    # INT 3 (CD 03): a software interrupt (type 4), which the bitmap never
    # decides; delivered through the (empty) IDT it raises #GP(3*8+2), which
    # exits with the INT 3 as IDT-vectoring information, length 2
    (b"\xcd\x03", 0x80000B0D, 0x1A, 0x80000403, 2),
    (b"\xcd\x05", 0x80000B0D, 0x2A, 0x80000405, 2),
])
def test_int3_is_a_software_exception_int_n_3_a_software_interrupt(code, info, error_code, vectoring, length):
    # SDM Vol. 3C 25.8.3 (types 4 and 6), 26.2 (the exception bitmap covers
    # exceptions; INT n is not one), 28.2.4 (IDT-vectoring information).
    g = vmx_guest(b"\x90" + code + b"\x0f\x01\xc1", exception_bitmap=(1 << 3) | (1 << 13))
    ex = run(g)
    v = ex.vmcs
    assert ex.reason == ExitReason.EXCEPTION_NMI
    assert (v.read(F.VM_EXIT_INTR_INFO), v.read(F.VM_EXIT_INTR_ERROR_CODE) if error_code else 0,
            v.read(F.IDT_VECTORING_INFO), ex.instruction_length) == (info, error_code, vectoring, length)
    assert v.read(F.GUEST_RIP) == 0x100001          # the INT instruction itself

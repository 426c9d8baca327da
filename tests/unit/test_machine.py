"""The machine core: reset state, real mode, mode switches made by the guest,
MSR/CR/CPUID semantics, port I/O, MMIO to the LAPIC, virtual time."""
import pytest

from support import asm


def test_reset_state_matches_sdm_table_10_1(machine):
    r = machine.cpu.refresh()
    assert r.cr0 == 0x60000010
    assert r.seg[1].selector == 0xF000 and r.seg[1].base == 0xFFFF0000
    assert r.rip == 0xFFF0
    assert r.rflags == 2
    assert r.gpr[2] == machine.vm.cpuid.signature        # EDX = CPUID.1:EAX
    assert r.efer == 0 and r.cr4 == 0


def test_real_mode_int_uses_ivt_and_iret_returns(machine):
    # IVT entry 0x21 -> 0000:0x7e00; the handler sets BX and IRETs.
    code = asm("""
        xor ax, ax
        mov ds, ax
        mov word ptr [0x84], 0x7e00
        mov word ptr [0x86], 0
        mov sp, 0x7000
        int 0x21
        mov al, bl
        out 0xf4, al
    """, 0x7c00, 16)
    machine.mem.write(0x7E00, asm("mov bl, 0x21\n iret", 0x7E00, 16))
    machine.boot(code, 0x7c00, "real")
    res = machine.run()
    assert res.reason == "debug-exit" and res.status == (0x21 << 1) | 1


def test_guest_switches_real_to_protected_to_long_mode(machine):
    """The guest does every transition itself (trapped MOV CR, WRMSR EFER)."""
    gdt = 0x7000
    import struct
    from support import seg_desc
    machine.mem.write(gdt, b"".join(struct.pack("<Q", d) for d in (
        0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC), seg_desc(0, 0xFFFFF, 0x9A, 0xA))))
    # PML4 0x10000 -> PDPT 0x11000 -> PD 0x12000, first 2 MiB identity mapped
    machine.mem.write(0x10000, struct.pack("<Q", 0x11003))
    machine.mem.write(0x11000, struct.pack("<Q", 0x12003))
    machine.mem.write(0x12000, struct.pack("<Q", 0x83))
    machine.mem.write(0x7100, struct.pack("<HI", 0x1F, gdt))
    real = asm("""
        cli
        lgdt [0x7100]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        .byte 0x66, 0xea
        .long 0x8000
        .word 0x08
    """, 0x7c00, 16)
    prot = asm("""
        mov ax, 0x10
        mov ds, ax
        mov ss, ax
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, 0x10000
        mov cr3, eax
        mov ecx, 0xc0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        .byte 0xea
        .long 0x8100
        .word 0x18
    """, 0x8000, 32)
    long_ = asm("""
        mov rax, 0x123456789
        mov rbx, rax
        shr rbx, 32
        mov al, bl
        out 0xf4, al
    """, 0x8100, 64)
    machine.mem.write(0x8000, prot)
    machine.mem.write(0x8100, long_)
    machine.boot(real, 0x7c00, "real")
    res = machine.run()
    assert res.reason == "debug-exit", res
    assert res.status == 3                       # (1 << 1) | 1: RBX held 0x1 from the 64-bit shift
    r = machine.cpu.regs
    assert r.efer & 0x500 == 0x500               # LME | LMA
    assert machine.cpu.mode_bits == 64


def _run64(machine, body):
    code = asm(body + "\n mov al, 0\n out 0xf4, al", 0x100000, 64)
    machine.boot(code, 0x100000, "long64")
    return machine.run()


@pytest.mark.parametrize("msr", [0x12345678, 0x3B, 0xC0000105])
def test_rdmsr_unknown_msr_raises_gp_and_triple_faults_without_idt(machine, msr):
    res = _run64(machine, f"mov ecx, {msr:#x}\n rdmsr")
    assert res.reason == "shutdown"


def test_rdmsr_apic_base_reports_bsp_and_enabled(machine):
    res = _run64(machine, "mov ecx, 0x1b\n rdmsr\n mov r8, rax\n mov r9, rdx")
    assert res.reason == "debug-exit"
    assert machine.cpu.regs.gpr[8] == 0xFEE00900 and machine.cpu.regs.gpr[9] == 0


def test_wrmsr_rdmsr_round_trip_lstar_and_pat_reset(machine):
    res = _run64(machine, """
        mov ecx, 0xc0000082
        mov eax, 0x11223344
        mov edx, 0xffff8000
        wrmsr
        xor eax, eax
        xor edx, edx
        rdmsr
        mov r8, rax
        mov r9, rdx
        mov ecx, 0x277
        rdmsr
        mov r10, rax
        mov r11, rdx
    """)
    assert res.reason == "debug-exit"
    g = machine.cpu.regs.gpr
    assert (g[8], g[9]) == (0x11223344, 0xFFFF8000)
    assert (g[10], g[11]) == (0x00070406, 0x00070406)


def test_wrmsr_non_canonical_lstar_is_gp(machine):
    res = _run64(machine, "mov ecx, 0xc0000082\n xor eax, eax\n mov edx, 0x00008000\n wrmsr")
    assert res.reason == "shutdown"


def test_mov_cr4_reserved_bit_is_gp(machine):
    res = _run64(machine, "mov rax, cr4\n or rax, 0x400000\n mov cr4, rax")   # PKE: not advertised
    assert res.reason == "shutdown"


def test_cpuid_answers_from_the_model_without_avx(machine):
    res = _run64(machine, """
        xor eax, eax
        cpuid
        mov r8, rbx
        mov eax, 1
        cpuid
        mov r9, rcx
        mov eax, 0x80000001
        cpuid
        mov r10, rdx
    """)
    assert res.reason == "debug-exit"
    g = machine.cpu.regs.gpr
    assert g[8].to_bytes(4, "little") == b"Genu"
    assert not g[9] & (1 << 28)                  # no AVX
    assert not g[9] & (1 << 26)                  # no XSAVE
    assert g[10] & (1 << 29) and g[10] & (1 << 20)   # LM, NX


def test_rdtsc_follows_virtual_time(machine):
    res = _run64(machine, """
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov r8, rax
        mov ecx, 1000
    l:  dec ecx
        jnz l
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov r9, rax
    """)
    assert res.reason == "debug-exit"
    g = machine.cpu.regs.gpr
    assert 1000 <= g[9] - g[8] <= 3000


def test_lapic_mmio_reads_version_and_writes_tpr(machine):
    res = _run64(machine, """
        mov rbx, 0xfee00000
        mov eax, dword ptr [rbx + 0x30]
        mov r8, rax
        mov dword ptr [rbx + 0x80], 0x20
        mov eax, dword ptr [rbx + 0x80]
        mov r9, rax
    """)
    assert res.reason == "debug-exit", res
    g = machine.cpu.regs.gpr
    assert g[8] & 0xFF == 0x14                   # version 0x14: integrated APIC
    assert g[9] == 0x20


def test_rep_outsb_writes_string_to_uart(machine):
    machine.mem.write(0x200000, b"vmlab!\n")
    res = _run64(machine, "mov rsi, 0x200000\n mov ecx, 7\n mov dx, 0x3f8\n rep outsb")
    assert res.reason == "debug-exit"
    assert machine.serial == b"vmlab!\n"
    assert machine.cpu.regs.gpr[6] == 0x200007 and machine.cpu.regs.gpr[1] == 0


def test_code_without_sensitive_instructions_arms_no_sites(machine):
    res = _run64(machine, "mov ecx, 100000\n l: add rax, rcx\n dec ecx\n jnz l")
    assert res.reason == "debug-exit"
    sites = machine.cpu.armed_sites()
    # only the final OUT (and its prefix-free start) is armed in that page
    code = machine.mem.read(0x100000, 64)
    assert all(machine.mem.read(s, 1)[0] in (0xE6, 0xE4, 0xEE, 0xEC, 0xF4) for s in sites), [hex(s) for s in sites]


def test_self_modifying_code_rescans_for_new_sensitive_instruction(machine):
    """A store that writes `out 0xf4, al` over two NOPs already scanned must trap."""
    res = _run64(machine, """
        mov rbx, patch
        mov byte ptr [rbx], 0xe6
        mov byte ptr [rbx+1], 0xf4
        mov al, 0x2a
    patch:
        nop
        nop
        hlt
    """)
    assert res.reason == "debug-exit", res
    assert res.status == (0x2A << 1) | 1


def test_alu_instructions_on_lapic_mmio_are_replayed(machine):
    res = _run64(machine, """
        mov rbx, 0xfee00000
        mov dword ptr [rbx + 0x80], 0x10          # TPR = 0x10
        or dword ptr [rbx + 0x80], 0x20           # read-modify-write on MMIO
        mov eax, 0x0f
        or eax, dword ptr [rbx + 0x80]            # MMIO source operand
        mov r8, rax
        test dword ptr [rbx + 0x80], 0x20         # flags from an MMIO read
        setnz r9b
    """)
    assert res.reason == "debug-exit", res
    g = machine.cpu.regs.gpr
    assert g[8] == 0x3F
    assert g[9] & 0xFF == 1
    assert machine.vm.lapic.tpr == 0x30


def test_software_tlb_serves_repeated_fills_and_invlpg_flushes_it(machine):
    # Touch 512 pages twice: Unicorn's TLB cannot hold them all, the software TLB can.
    res = _run64(machine, """
        mov r9, 2
    outer:
        mov rbx, 0x400000
        mov ecx, 512
    l:  mov rax, [rbx]
        add rbx, 0x1000
        dec ecx
        jnz l
        dec r9
        jnz outer
        invlpg [rbx]
    """)
    assert res.reason == "debug-exit"
    st = machine.cpu.tlb_stats()
    assert st["fills"] >= 512 and st["walks"] < st["fills"]
    assert st["flushes"] >= 1


def test_invpcid_is_undefined_when_not_advertised(machine):
    res = _run64(machine, "xor eax, eax\n sub rsp, 16\n invpcid rax, [rsp]")
    assert res.reason == "shutdown"           # #UD with an empty IDT -> triple fault


def test_init_ipi_outside_vmx_resets_into_wait_for_sipi(machine):
    res = _run64(machine, "mov rbx, 0xfee00000\n mov dword ptr [rbx + 0x310], 0\n"
                          "mov dword ptr [rbx + 0x300], 0x4500\n l: jmp l")
    assert res.reason == "halted" and "INIT" in res.message
    assert machine.cpu.regs.cr0 == 0x60000010 and machine.cpu.regs.rip == 0xFFF0


def test_machine_runs_without_the_located_cpu_state():
    """Without the live CPU-state pointer (env NULL), native code falls back to
    context saves: same results."""
    from support import Machine, asm
    import vmlab.emu.cpu as cpu_mod
    m = Machine()
    m.cpu.native.env = cpu_mod.ffi.NULL
    m.boot(asm("mov ecx, 1000\n l: dec ecx\n jnz l\n int3", 0x100000, 64), 0x100000, "long64")
    res = m.run()
    assert res.reason == "shutdown"           # #BP with no IDT -> triple fault, via the slow path
    assert m.cpu.cpl == 0 and m.cpu.mode_bits == 64

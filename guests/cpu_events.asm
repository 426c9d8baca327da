; vmlab-format: multiboot-aout
; vmlab-qemu-known-fail: RDPMC with an invalid counter raises #GP
; vmlab-qemu-known-fail: LGDT with a non-canonical base raises #GP
; vmlab-qemu-known-fail: LIDT with a non-canonical base raises #GP
; vmlab-qemu-known-fail: LAPIC page does not answer while IA32_APIC_BASE.EN = 0
; vmlab-qemu-known-fail: CPUID.1:EDX.APIC is back after IA32_APIC_BASE.EN = 1
; vmlab-qemu-known-fail: LGDT with a non-canonical base: GDTR unchanged
; vmlab-qemu-known-fail: ICEBP (F1) raises #DB
; vmlab-qemu-known-fail: ICEBP is a trap: saved EIP is after the F1
;
; cpu_events.asm -- instructions and event-delivery corner cases kernels rely
; on (issue 11), 32-bit then 64-bit:
;   SYSEXIT to ring 3 and SYSENTER back (SDM Vol. 2B SYSENTER/SYSEXIT);
;   ICEBP (F1) is a trap: saved EIP after it (SDM Vol. 3A 6.15, #DB);
;   TF single-step trap after IN, with DR6.BS (SDM Vol. 3A 18.3.1.4);
;   a fault while delivering INT n (not-present gate: #NP) saves the EIP of the
;   INT itself (SDM Vol. 3A 6.12.1.1);
;   RDPMC with an invalid counter: #GP(0) (SDM Vol. 2B RDPMC);
;   IA32_APIC_BASE.EN = 0 clears CPUID.1:EDX.APIC and hides the page
;   (SDM Vol. 3A 11.4.3);
;   an NMI made pending while NMIs are blocked is taken after the IRET that
;   unblocks them, at the IRET's target (SDM Vol. 3A 6.7.1);
;   SYSCALL/SYSRET with STAR/LSTAR/FMASK, #UD with EFER.SCE = 0 (SDM Vol. 2B);
;   LGDT/LIDT of a non-canonical base: #GP(0), table registers unchanged;
;   MOV CR8 <-> LAPIC TPR[7:4] (SDM Vol. 3A 11.8.6.1);
;   CLAC/STAC execute when CPUID.(EAX=7,ECX=0):EBX.SMAP[20] says so.
; Known QEMU 7.2 deviations (TCG, qemu64): RDPMC always raises #UD; ICEBP
; raises #UD; LGDT/LIDT load a non-canonical base; the APIC page keeps
; answering while disabled, and CPUID.1:EDX.APIC stays 0 once the APIC was
; disabled (QEMU's APIC cannot be re-enabled without a reset).

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS   = 0x08
KERNEL_DS   = 0x10
USER_CS32   = 0x18 | 3              ; SYSEXIT: SYSENTER_CS + 16
USER_DS32   = 0x20 | 3              ; SYSEXIT: SYSENTER_CS + 24
KERNEL_CS64 = 0x30                  ; SYSCALL: STAR[47:32]
KERNEL_DS64 = 0x38                  ; SYSCALL: STAR[47:32] + 8
SYSRET_BASE = 0x40                  ; STAR[63:48]
USER_DS64   = 0x48 | 3              ; SYSRET: base + 8
USER_CS64   = 0x50 | 3              ; SYSRET (64-bit): base + 16
EFER        = 0xc0000080
APIC_BASE_MSR = 0x1b
LAPIC       = 0xfee00000

.code32
_start:
    cli
    cld
    mov esp, kstack_top
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init
    PASS "32-bit protected mode with own GDT and IDT"

; ---------------------------------------------------------------- SYSENTER/SYSEXIT
    mov ecx, 0x174
    mov eax, KERNEL_CS
    xor edx, edx
    wrmsr
    mov ecx, 0x175
    mov eax, sysenter_stack_top
    wrmsr
    mov ecx, 0x176
    mov eax, sysenter_entry
    wrmsr
    mov dword ptr [kernel_esp_save], esp
    pushfd
    or dword ptr [esp], 0x3000        ; IOPL 3: ring 3 may report a failure itself
    popfd
    mov edx, user32_code
    mov ecx, ustack_top
    sysexit
user32_code:
    mov eax, cs
    mov dword ptr [user_cs], eax
    mov eax, ss
    mov dword ptr [user_ss], eax
    sysenter
    FAIL "SYSENTER from ring 3 reaches IA32_SYSENTER_EIP (fell through)"
    DONE
sysenter_entry:
    mov eax, cs
    mov dword ptr [k_cs], eax
    mov eax, ss
    mov dword ptr [k_ss], eax
    mov dword ptr [k_sp], esp
    mov esp, dword ptr [kernel_esp_save]
    pushfd
    and dword ptr [esp], 0xffffcfff   ; IOPL back to 0
    popfd
    mov eax, dword ptr [user_cs]
    mov edx, USER_CS32
    EXPECT_EQ "SYSEXIT: CS = IA32_SYSENTER_CS + 16 with RPL 3"
    mov eax, dword ptr [user_ss]
    mov edx, USER_DS32
    EXPECT_EQ "SYSEXIT: SS = IA32_SYSENTER_CS + 24 with RPL 3"
    mov eax, dword ptr [k_cs]
    mov edx, KERNEL_CS
    EXPECT_EQ "SYSENTER: CS = IA32_SYSENTER_CS"
    mov eax, dword ptr [k_ss]
    mov edx, KERNEL_DS
    EXPECT_EQ "SYSENTER: SS = IA32_SYSENTER_CS + 8"
    mov eax, dword ptr [k_sp]
    mov edx, sysenter_stack_top
    EXPECT_EQ "SYSENTER: ESP = IA32_SYSENTER_ESP"

; ---------------------------------------------------------------- ICEBP
    TRY icebp_done
    .byte 0xf1
icebp_after:
    nop
icebp_done:
    ENDTRY
    mov edx, 1
    EXPECT_EQ "ICEBP (F1) raises #DB"
    mov eax, dword ptr [caught_eip]
    mov edx, icebp_after
    EXPECT_EQ "ICEBP is a trap: saved EIP is after the F1"

; ---------------------------------------------------------------- TF after IN
    xor eax, eax
    mov dr6, eax
    mov dx, COM1 + 5
    TRY tf_done
    pushfd
    or dword ptr [esp], 0x100
    popfd
    in al, dx                         ; the first instruction after POPF set TF
tf_after:
    nop
    nop
tf_done:
    ENDTRY
    mov edx, 1
    EXPECT_EQ "TF: single-step trap after IN raises #DB"
    mov eax, dword ptr [caught_eip]
    mov edx, tf_after
    EXPECT_EQ "TF: saved EIP is right after the IN"
    mov eax, dr6
    and eax, 0x4000
    mov edx, 0x4000
    EXPECT_EQ "TF: DR6.BS is set"

; ---------------------------------------------------------------- fault while delivering INT n
    mov eax, 0x40
    mov ebx, int_done
    mov cl, 0x0e                      ; interrupt gate, P = 0
    call idt32_set
    TRY int_done
int_insn:
    int 0x40                          ; vector 0x40 has no present gate
int_done:
    ENDTRY
    mov edx, 11
    EXPECT_EQ "INT n through a not-present gate raises #NP"
    mov eax, dword ptr [caught_err]
    mov edx, (0x40 << 3) | 2
    EXPECT_EQ "INT n #NP: error code is the IDT entry (IDT=1, EXT=0)"
    mov eax, dword ptr [caught_eip]
    mov edx, int_insn
    EXPECT_EQ "INT n #NP: saved EIP is the INT instruction (restartable)"

; ---------------------------------------------------------------- RDPMC
    TRY rdpmc_done
    mov ecx, 0x12345
    rdpmc
rdpmc_done:
    ENDTRY
    mov edx, 13
    EXPECT_EQ "RDPMC with an invalid counter raises #GP"

; ---------------------------------------------------------------- LAPIC disable
    mov ecx, APIC_BASE_MSR
    rdmsr
    mov dword ptr [apic_base_save], eax
    and eax, 0xfffff7ff               ; EN = 0
    wrmsr
    mov eax, 1
    cpuid
    mov eax, edx
    and eax, 0x200
    xor edx, edx
    EXPECT_EQ "CPUID.1:EDX.APIC reads 0 while IA32_APIC_BASE.EN = 0"
    mov eax, dword ptr [LAPIC + 0x30]
    and eax, 0xff
    cmp eax, 0x10
    jb apic_hidden
    cmp eax, 0x15
    ja apic_hidden
    FAIL "LAPIC page does not answer while IA32_APIC_BASE.EN = 0"
    jmp apic_reenable
apic_hidden:
    PASS "LAPIC page does not answer while IA32_APIC_BASE.EN = 0"
apic_reenable:
    mov ecx, APIC_BASE_MSR
    mov eax, dword ptr [apic_base_save]
    xor edx, edx
    wrmsr
    mov eax, 1
    cpuid
    mov eax, edx
    and eax, 0x200
    mov edx, 0x200
    EXPECT_EQ "CPUID.1:EDX.APIC is back after IA32_APIC_BASE.EN = 1"
    mov eax, dword ptr [LAPIC + 0x30]
    and eax, 0xf0
    mov edx, 0x10
    EXPECT_EQ "LAPIC version register answers again"

; ---------------------------------------------------------------- NMI unblocking at IRET
    mov dword ptr [LAPIC + 0xf0], 0x1ff     ; SVR: software enable
    mov eax, 2
    mov ebx, nmi_handler
    mov cl, 0x8e
    call idt32_set
    mov dword ptr [LAPIC + 0x310], 0        ; destination APIC ID 0 (this CPU)
    mov dword ptr [LAPIC + 0x300], 0x400    ; NMI
    mov ecx, 100000
nmi_wait:
    cmp dword ptr [nmi_count], 2
    jae nmi_waited
    dec ecx
    jnz nmi_wait
nmi_waited:
    mov eax, dword ptr [nmi_count]
    mov edx, 2
    EXPECT_EQ "NMI: the NMI sent from the NMI handler is taken too"
    mov eax, dword ptr [nmi_count_inside]
    mov edx, 1
    EXPECT_EQ "NMI: blocked inside the NMI handler"
    mov eax, dword ptr [nmi2_eip]
    mov edx, dword ptr [nmi1_eip]
    EXPECT_EQ "NMI: the pending NMI is taken after the IRET, at its target"

; ---------------------------------------------------------------- to long mode
    mov dword ptr [pml4], pdpt + 7
    mov dword ptr [pdpt], pd64 + 7
    mov dword ptr [pdpt + 24], pd64_apic + 3
    mov dword ptr [pd64], 0x000000 | 0x87          ; P | RW | US | PS
    mov dword ptr [pd64 + 8], 0x200000 | 0x87
    mov dword ptr [pd64_apic + 0x1f7 * 8], LAPIC | 0x9b   ; P | RW | PWT | PCD | PS
    ENTER_LONG_MODE pml4, KERNEL_CS64, long_mode

.code64
long_mode:
    mov eax, KERNEL_DS64
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov rsp, kstack_top
    call idt64_init
    PASS64 "64-bit long mode"

; ---------------------------------------------------------------- SYSCALL/SYSRET
    mov ecx, EFER
    rdmsr
    or eax, 1                         ; SCE
    wrmsr
    mov ecx, 0xc0000081               ; STAR
    xor eax, eax
    mov edx, (SYSRET_BASE << 16) | KERNEL_CS64
    wrmsr
    mov ecx, 0xc0000082               ; LSTAR
    mov rax, syscall_entry
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xc0000084               ; FMASK: DF
    mov eax, 0x400
    xor edx, edx
    wrmsr
    mov qword ptr [kernel_rsp_save], rsp
    std
syscall_insn:
    syscall
syscall_next:
    cld
    FAIL64 "SYSCALL reaches IA32_LSTAR (fell through)"
    DONE64
syscall_entry:
    mov qword ptr [sc_rcx], rcx
    mov qword ptr [sc_r11], r11
    pushfq
    pop rax
    mov qword ptr [sc_rflags], rax
    mov eax, cs
    mov qword ptr [sc_cs], rax
    mov eax, ss
    mov qword ptr [sc_ss], rax
    cmp byte ptr [sc_phase], 0
    jne syscall_back
    mov byte ptr [sc_phase], 1
    mov rax, qword ptr [sc_rcx]
    mov qword ptr [sc_first_rcx], rax
    mov rax, qword ptr [sc_r11]
    mov qword ptr [sc_first_r11], rax
    mov rax, qword ptr [sc_rflags]
    mov qword ptr [sc_first_rflags], rax
    mov rax, qword ptr [sc_cs]
    mov qword ptr [sc_first_cs], rax
    mov rax, qword ptr [sc_ss]
    mov qword ptr [sc_first_ss], rax
    mov rcx, user64_code
    mov r11, 0x3002                   ; IOPL 3, IF = 0
    mov rsp, ustack_top
    .byte 0x48, 0x0f, 0x07            ; sysretq
user64_code:
    mov eax, cs
    mov qword ptr [user_cs], rax
    mov eax, ss
    mov qword ptr [user_ss], rax
    syscall
user_syscall_next:
    FAIL64 "SYSCALL from ring 3 (fell through)"
    DONE64
syscall_back:
    mov rsp, qword ptr [kernel_rsp_save]
    push 0x2
    popfq
    cld
    mov rax, qword ptr [sc_first_rcx]
    mov rdx, syscall_next
    EXPECT_EQ64 "SYSCALL: RCX = address of the next instruction"
    mov rax, qword ptr [sc_first_r11]
    and eax, 0x400
    mov edx, 0x400
    EXPECT_EQ64 "SYSCALL: R11 = RFLAGS before (DF set)"
    mov rax, qword ptr [sc_first_rflags]
    and eax, 0x400
    xor edx, edx
    EXPECT_EQ64 "SYSCALL: RFLAGS masked by IA32_FMASK (DF clear)"
    mov rax, qword ptr [sc_first_cs]
    mov edx, KERNEL_CS64
    EXPECT_EQ64 "SYSCALL: CS = IA32_STAR[47:32]"
    mov rax, qword ptr [sc_first_ss]
    mov edx, KERNEL_DS64
    EXPECT_EQ64 "SYSCALL: SS = IA32_STAR[47:32] + 8"
    mov rax, qword ptr [user_cs]
    mov edx, USER_CS64
    EXPECT_EQ64 "SYSRET: CS = IA32_STAR[63:48] + 16 with RPL 3"
    mov rax, qword ptr [user_ss]
    mov edx, USER_DS64
    EXPECT_EQ64 "SYSRET: SS = IA32_STAR[63:48] + 8 with RPL 3"
    mov rax, qword ptr [sc_cs]
    mov edx, KERNEL_CS64
    EXPECT_EQ64 "SYSCALL from ring 3: CS = IA32_STAR[47:32]"
    mov rax, qword ptr [sc_rcx]
    mov rdx, user_syscall_next
    EXPECT_EQ64 "SYSCALL from ring 3: RCX = its next instruction"
    ; EFER.SCE = 0: #UD
    mov ecx, EFER
    rdmsr
    and eax, 0xfffffffe
    wrmsr
    TRY64 sc_ud_done
    syscall
sc_ud_done:
    ENDTRY64
    mov edx, 6
    EXPECT_EQ64 "SYSCALL with IA32_EFER.SCE = 0 raises #UD"

; ---------------------------------------------------------------- LGDT/LIDT non-canonical
    TRY64 lgdt_done
    lgdt [bad_dtr]
lgdt_done:
    ENDTRY64
    mov edx, 13
    EXPECT_EQ64 "LGDT with a non-canonical base raises #GP"
    sgdt [dtr_out]
    mov rax, qword ptr [dtr_out + 2]
    mov rdx, gdt
    EXPECT_EQ64 "LGDT with a non-canonical base: GDTR unchanged"
    sidt [dtr_out]
    mov rax, qword ptr [dtr_out + 2]
    mov qword ptr [idt_base_save], rax
    TRY64 lidt_done
    lidt [bad_dtr]
lidt_done:
    ENDTRY64
    mov edx, 13
    EXPECT_EQ64 "LIDT with a non-canonical base raises #GP"

; ---------------------------------------------------------------- CR8 <-> TPR
    mov rbx, LAPIC
    mov eax, 5
    mov cr8, rax
    mov eax, dword ptr [rbx + 0x80]
    and eax, 0xff
    mov edx, 0x50
    EXPECT_EQ64 "MOV to CR8 writes TPR[7:4]"
    mov dword ptr [rbx + 0x80], 0x30
    mov rax, cr8
    mov edx, 3
    EXPECT_EQ64 "MOV from CR8 reads TPR[7:4]"
    xor eax, eax
    mov cr8, rax

; ---------------------------------------------------------------- CLAC/STAC
    mov eax, 7
    xor ecx, ecx
    cpuid
    test ebx, 0x100000
    jz no_smap
    TRY64 smap_done
    .byte 0x0f, 0x01, 0xca            ; clac
    .byte 0x0f, 0x01, 0xcb            ; stac
    .byte 0x0f, 0x01, 0xca            ; clac
smap_done:
    ENDTRY64
    mov rdx, -1
    EXPECT_EQ64 "CLAC/STAC execute when CPUID says SMAP"
    jmp smap_end
no_smap:
    PRINT64 "INFO: SMAP not advertised, CLAC/STAC not tried"
    call newline64
smap_end:
    DONE64

; ================================================================ NMI handler (32-bit)
.code32
nmi_handler:
    push eax
    inc dword ptr [nmi_count]
    cmp dword ptr [nmi_count], 1
    jne nmi_second
    mov eax, dword ptr [esp + 4]
    mov dword ptr [nmi1_eip], eax
    mov dword ptr [LAPIC + 0x310], 0
    mov dword ptr [LAPIC + 0x300], 0x400    ; a second NMI, pending while blocked
    nop
    nop
    mov eax, dword ptr [nmi_count]
    mov dword ptr [nmi_count_inside], eax
    pop eax
    iretd
nmi_second:
    mov eax, dword ptr [esp + 4]
    mov dword ptr [nmi2_eip], eax
    pop eax
    iretd

; ================================================================ data
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 kernel code, 32-bit
    .quad 0x00cf92000000ffff    ; 0x10 kernel data
    .quad 0x00cffa000000ffff    ; 0x18 user code, 32-bit, DPL 3
    .quad 0x00cff2000000ffff    ; 0x20 user data, DPL 3
    .quad 0                     ; 0x28 unused
    .quad 0x00af9a000000ffff    ; 0x30 kernel code, 64-bit
    .quad 0x00cf92000000ffff    ; 0x38 kernel data
    .quad 0x00cffa000000ffff    ; 0x40 user code, 32-bit, DPL 3 (SYSRET to compatibility mode)
    .quad 0x00cff2000000ffff    ; 0x48 user data, DPL 3
    .quad 0x00affa000000ffff    ; 0x50 user code, 64-bit, DPL 3
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0
bad_dtr:
    .word 0xfff
    .quad 0x8000000000001000
dtr_out:
    .zero 16

.balign 8
kernel_esp_save:    .quad 0
kernel_rsp_save:    .quad 0
idt_base_save:      .quad 0
apic_base_save:     .quad 0
user_cs:            .quad 0
user_ss:            .quad 0
k_cs:               .quad 0
k_ss:               .quad 0
k_sp:               .quad 0
nmi_count:          .quad 0
nmi_count_inside:   .quad 0
nmi1_eip:           .quad 0
nmi2_eip:           .quad 0
sc_phase:           .quad 0
sc_rcx:             .quad 0
sc_r11:             .quad 0
sc_rflags:          .quad 0
sc_cs:              .quad 0
sc_ss:              .quad 0
sc_first_rcx:       .quad 0
sc_first_r11:       .quad 0
sc_first_rflags:    .quad 0
sc_first_cs:        .quad 0
sc_first_ss:        .quad 0

.balign 4096
pml4:           .zero 4096
pdpt:           .zero 4096
pd64:           .zero 4096
pd64_apic:      .zero 4096
                .zero 8192
kstack_top:
                .zero 4096
sysenter_stack_top:
                .zero 4096
ustack_top:
image_end:

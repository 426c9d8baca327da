; vmlab-format: multiboot-aout
;
; msr_cpuid.asm -- CPUID, MSRs and control registers, checked against what the
; architecture says (Intel SDM Vol. 2A CPUID, Vol. 3A 2.5 CR4, Vol. 4 MSRs; AMD
; APM Vol. 2).  32-bit protected mode, paging off.
;
;   CPUID.0 max leaf and vendor; CPUID.1 EDX features versus what works: MSR ->
;   RDMSR, PAE/PSE/PGE -> CR4 bits settable, APIC -> IA32_APIC_BASE (base
;   0xfee00000, BSP, enable) and initial APIC ID = LAPIC ID, SEP -> SYSENTER MSR
;   round-trips, PAT -> PAT reset value; CPUID.80000001 EDX LM/NX -> EFER.LME/NXE
;   writable (and #GP when absent), SYSCALL -> EFER.SCE, STAR/LSTAR round-trips;
;   RDMSR/WRMSR of an undefined MSR -> #GP(0); WRMSR of a non-canonical LSTAR ->
;   #GP(0); MOV to CR4 with a reserved bit -> #GP(0); RDTSC monotonic.
;
; This guest checks what hardware does.  QEMU 7.2 TCG deviates on some checks
; (see "QEMU deviations" in guests/README.md); the QEMU test accepts exactly the
; FAIL lines declared below and boots with the command line below, which skips
; the one check that wrecks a QEMU 7.2 guest.
;
; vmlab-qemu-append: skip=cr4-reserved
; vmlab-qemu-known-fail: WRMSR of a non-canonical LSTAR raises #GP
; vmlab-qemu-known-fail: RDMSR of an undefined MSR (0x12345678) raises #GP
; vmlab-qemu-known-fail: RDMSR of an undefined MSR: error code 0
; vmlab-qemu-known-fail: WRMSR of an undefined MSR (0x12345678) raises #GP

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS       = 0x08
KERNEL_DS       = 0x10
IA32_TSC        = 0x10
IA32_APIC_BASE  = 0x1b
SYSENTER_CS     = 0x174
SYSENTER_ESP    = 0x175
SYSENTER_EIP    = 0x176
IA32_PAT        = 0x277
EFER            = 0xc0000080
STAR            = 0xc0000081
LSTAR           = 0xc0000082
; Outside every range Intel (SDM Vol. 4: 0-0x1fff, 0x40000000-0x400000ff for
; software, 0xc0000000-0xc0001fff) and AMD (also 0xc0010000-0xc001ffff) define.
UNDEFINED_MSR   = 0x12345678
CR4_PSE         = 1 << 4
CR4_PAE         = 1 << 5
CR4_PGE         = 1 << 7
CR4_RESERVED    = 1 << 15       ; reserved on Intel and AMD
EFER_SCE        = 1 << 0
EFER_LME        = 1 << 8
EFER_NXE        = 1 << 11
LAPIC_ID        = 0xfee00020
PAT_RESET_LO    = 0x00070406
PAT_RESET_HI    = 0x00070406

_start:
    cli
    cld
    mov dword ptr [mb_magic], eax
    mov dword ptr [mb_info], ebx
    mov esp, stack_top
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init

; ---------------------------------------------------------------- CPUID.0
    xor eax, eax
    cpuid
    mov dword ptr [vendor], ebx
    mov dword ptr [vendor + 4], edx
    mov dword ptr [vendor + 8], ecx
    mov edx, 1
    EXPECT_AE "CPUID.0: maximum basic leaf >= 1"
    mov esi, vendor
    mov ecx, 12
    xor ebx, ebx                ; count of non-printable bytes
vendor_check:
    lodsb
    cmp al, 0x20
    jb vendor_bad
    cmp al, 0x7e
    jbe vendor_next
vendor_bad:
    inc ebx
vendor_next:
    dec ecx
    jnz vendor_check
    test ebx, ebx
    jnz vendor_fail
    PRINT "PASS: CPUID.0: vendor string is printable: "
    mov esi, vendor
    call puts
    call newline
    jmp vendor_done
vendor_fail:
    FAIL "CPUID.0: vendor string has non-printable bytes"
vendor_done:

; ---------------------------------------------------------------- CPUID.1
    mov eax, 1
    cpuid
    mov dword ptr [cpuid1_ebx], ebx
    mov dword ptr [cpuid1_edx], edx

    ; MSR (EDX bit 5): RDMSR works (else #UD).
    TRY msr_probe_done
    mov ecx, IA32_TSC
    rdmsr
msr_probe_done:
    ENDTRY
    test dword ptr [cpuid1_edx], 1 << 5
    jz msr_absent
    mov edx, 0xffffffff
    EXPECT_EQ "CPUID.1:EDX.MSR = 1 and RDMSR of IA32_TIME_STAMP_COUNTER works"
    jmp msr_probe_end
msr_absent:
    mov edx, 6
    EXPECT_EQ "CPUID.1:EDX.MSR = 0 and RDMSR raises #UD"
msr_probe_end:

    ; PAE (bit 6), PSE (bit 3), PGE (bit 13): the CR4 bit is settable (else #GP).
    mov ebx, CR4_PAE
    mov eax, 1 << 6
    call cr4_feature_check
    EXPECT_Z "CPUID.1:EDX.PAE matches CR4.PAE being settable"
    mov ebx, CR4_PSE
    mov eax, 1 << 3
    call cr4_feature_check
    EXPECT_Z "CPUID.1:EDX.PSE matches CR4.PSE being settable"
    mov ebx, CR4_PGE
    mov eax, 1 << 13
    call cr4_feature_check
    EXPECT_Z "CPUID.1:EDX.PGE matches CR4.PGE being settable"

    ; APIC (bit 9): IA32_APIC_BASE = 0xfee00000 | enable | BSP.
    test dword ptr [cpuid1_edx], 1 << 9
    jnz apic_present
    FAIL "CPUID.1:EDX.APIC = 0 (a test machine has a local APIC)"
    jmp apic_done
apic_present:
    mov ecx, IA32_APIC_BASE
    rdmsr
    and eax, 0xfffff900         ; base[31:12], enable (11), BSP (8)
    mov edx, 0xfee00000 | (1 << 11) | (1 << 8)
    EXPECT_EQ "IA32_APIC_BASE: base 0xfee00000, BSP and global enable set"
    mov ecx, IA32_APIC_BASE
    rdmsr
    mov eax, edx
    xor edx, edx
    EXPECT_EQ "IA32_APIC_BASE: base bits above 4 GiB are 0"
    mov eax, dword ptr [LAPIC_ID]
    shr eax, 24
    mov edx, dword ptr [cpuid1_ebx]
    shr edx, 24
    EXPECT_EQ "CPUID.1:EBX initial APIC ID = local APIC ID register"
apic_done:

    ; SEP (bit 11): SYSENTER MSRs round-trip.
    test dword ptr [cpuid1_edx], 1 << 11
    jnz sep_present
    FAIL "CPUID.1:EDX.SEP = 0 (SYSENTER MSRs not testable)"
    jmp sep_done
sep_present:
    mov ecx, SYSENTER_CS
    mov eax, 0x0008
    xor edx, edx
    call msr_roundtrip
    EXPECT_Z "WRMSR/RDMSR round-trip of IA32_SYSENTER_CS"
    mov ecx, SYSENTER_ESP
    mov eax, 0x12345670
    xor edx, edx
    call msr_roundtrip
    EXPECT_Z "WRMSR/RDMSR round-trip of IA32_SYSENTER_ESP"
    mov ecx, SYSENTER_EIP
    mov eax, 0x9abcdef0
    xor edx, edx
    call msr_roundtrip
    EXPECT_Z "WRMSR/RDMSR round-trip of IA32_SYSENTER_EIP"
sep_done:

    ; PAT (bit 16): power-up value 0x0007040600070406 (SDM Vol. 3A 11.12.4).
    test dword ptr [cpuid1_edx], 1 << 16
    jnz pat_present
    FAIL "CPUID.1:EDX.PAT = 0"
    jmp pat_done
pat_present:
    mov ecx, IA32_PAT
    rdmsr
    mov dword ptr [pat_hi], edx
    mov edx, PAT_RESET_LO
    EXPECT_EQ "IA32_PAT reset value, low half 0x00070406"
    mov eax, dword ptr [pat_hi]
    mov edx, PAT_RESET_HI
    EXPECT_EQ "IA32_PAT reset value, high half 0x00070406"
pat_done:

; ---------------------------------------------------------------- CPUID.80000001
    mov eax, 0x80000000
    cpuid
    mov edx, 0x80000001
    EXPECT_AE "CPUID.80000000: maximum extended leaf >= 0x80000001"
    mov eax, 0x80000001
    cpuid
    mov dword ptr [ext_edx], edx

    mov ebx, EFER_LME
    mov eax, 1 << 29            ; LM
    call efer_feature_check
    EXPECT_Z "CPUID.80000001:EDX.LM matches EFER.LME being writable"
    mov ebx, EFER_NXE
    mov eax, 1 << 20            ; NX
    call efer_feature_check
    EXPECT_Z "CPUID.80000001:EDX.NX matches EFER.NXE being writable"
    ; SYSCALL (bit 11): Intel reports it only in 64-bit mode, so only the
    ; "reported -> works" direction holds here.
    test dword ptr [ext_edx], 1 << 11
    jz syscall_not_reported
    mov ebx, EFER_SCE
    mov eax, 1 << 11
    call efer_feature_check
    EXPECT_Z "CPUID.80000001:EDX.SYSCALL = 1 and EFER.SCE is writable"
    jmp syscall_done
syscall_not_reported:
    PASS "CPUID.80000001:EDX.SYSCALL = 0 outside 64-bit mode (Intel): EFER.SCE not required"
syscall_done:

    mov ecx, STAR
    mov eax, 0x00c0ffee
    mov edx, 0x001b0008         ; SYSRET CS base 0x18 | 3, SYSCALL CS 0x08
    call msr_roundtrip
    EXPECT_Z "WRMSR/RDMSR round-trip of STAR (64-bit value)"

    test dword ptr [ext_edx], 1 << 29
    jnz lstar_tests
    PASS "CPUID.80000001:EDX.LM = 0: LSTAR not present, not tested"
    jmp lstar_done
lstar_tests:
    mov ecx, LSTAR
    mov eax, 0x12345678
    mov edx, 0xffff8000         ; canonical kernel-half address
    call msr_roundtrip
    EXPECT_Z "WRMSR/RDMSR round-trip of LSTAR (canonical 0xffff800012345678)"

    mov ecx, LSTAR
    rdmsr
    mov dword ptr [saved_lo], eax
    mov dword ptr [saved_hi], edx
    TRY lstar_nc_done
    mov ecx, LSTAR
    xor eax, eax
    mov edx, 0x80000000         ; 0x8000000000000000: not canonical
    wrmsr
lstar_nc_done:
    ENDTRY
    push eax
    mov ecx, LSTAR              ; put back whatever was there
    mov eax, dword ptr [saved_lo]
    mov edx, dword ptr [saved_hi]
    wrmsr
    pop eax
    mov edx, 13
    EXPECT_EQ "WRMSR of a non-canonical LSTAR raises #GP"
lstar_done:

; ---------------------------------------------------------------- #GP cases
    TRY undef_rd_done
    mov ecx, UNDEFINED_MSR
    rdmsr
undef_rd_done:
    ENDTRY
    mov edx, 13
    EXPECT_EQ "RDMSR of an undefined MSR (0x12345678) raises #GP"
    mov eax, dword ptr [caught_err]
    xor edx, edx
    EXPECT_EQ "RDMSR of an undefined MSR: error code 0"

    TRY undef_wr_done
    mov ecx, UNDEFINED_MSR
    xor eax, eax
    xor edx, edx
    wrmsr
undef_wr_done:
    ENDTRY
    mov edx, 13
    EXPECT_EQ "WRMSR of an undefined MSR (0x12345678) raises #GP"

    ; QEMU 7.2 TCG turns this into a bogus SVM #VMEXIT that wrecks the guest:
    ; "skip=cr4-reserved" on the command line skips it there.
    CMDLINE_HAS "skip=cr4-reserved"
    jnz cr4_rsvd_test
    PRINT "SKIP: MOV to CR4 with a reserved bit raises #GP (skip=cr4-reserved)\r\n"
    jmp cr4_rsvd_end
cr4_rsvd_test:
    mov eax, cr4
    mov dword ptr [saved_lo], eax
    TRY cr4_rsvd_done
    mov eax, cr4
    or eax, CR4_RESERVED
    mov cr4, eax
cr4_rsvd_done:
    ENDTRY
    mov edx, dword ptr [saved_lo]
    mov cr4, edx
    mov edx, 13
    EXPECT_EQ "MOV to CR4 with reserved bit 15 set raises #GP"
    mov eax, dword ptr [caught_err]
    xor edx, edx
    EXPECT_EQ "MOV to CR4 with a reserved bit: error code 0"
cr4_rsvd_end:

; ---------------------------------------------------------------- RDTSC
    test dword ptr [cpuid1_edx], 1 << 4
    jnz tsc_present
    FAIL "CPUID.1:EDX.TSC = 0"
    jmp tsc_done
tsc_present:
    rdtsc
    mov dword ptr [tsc_first], eax
    mov dword ptr [tsc_first + 4], edx
    mov esi, eax
    mov edi, edx
    xor ebx, ebx                ; backward steps seen
    mov ecx, 1000
tsc_loop:
    rdtsc
    cmp edx, edi
    jb tsc_backwards
    ja tsc_forward
    cmp eax, esi
    jae tsc_forward
tsc_backwards:
    inc ebx
tsc_forward:
    mov esi, eax
    mov edi, edx
    dec ecx
    jnz tsc_loop
    mov eax, ebx
    xor edx, edx
    EXPECT_EQ "RDTSC never goes backwards over 1000 reads"
    cmp edi, dword ptr [tsc_first + 4]
    ja tsc_grew
    jb tsc_not_grown
    cmp esi, dword ptr [tsc_first]
    ja tsc_grew
tsc_not_grown:
    FAIL "RDTSC did not increase over 1000 reads"
    jmp tsc_done
tsc_grew:
    PASS "RDTSC increased over 1000 reads"
tsc_done:

    DONE

; ---------------------------------------------------------------- helpers
; cr4_feature_check: EAX = CPUID.1:EDX feature bit, EBX = its CR4 bit.  If the
; feature is reported, the CR4 bit must be settable and clearable; if not,
; setting it must raise #GP.  CR4 is restored.  ZF = 1 if consistent.
cr4_feature_check:
    pushad
    mov byte ptr [check_ok], 0
    mov ecx, cr4
    mov dword ptr [saved_cr4], ecx
    test dword ptr [cpuid1_edx], eax
    jz cr4_expect_gp
    TRY cr4_check_end
    mov eax, cr4
    or eax, ebx
    mov cr4, eax
    mov eax, cr4
    test eax, ebx
    jz cr4_check_end
    xor eax, ebx
    mov cr4, eax
    mov eax, cr4
    test eax, ebx
    jnz cr4_check_end
    mov byte ptr [check_ok], 1
    jmp cr4_check_end
cr4_expect_gp:
    TRY cr4_gp_end
    mov eax, cr4
    or eax, ebx
    mov cr4, eax
cr4_gp_end:
    ENDTRY
    cmp eax, 13
    jne cr4_check_end
    mov byte ptr [check_ok], 1
cr4_check_end:
    ENDTRY
    mov ecx, dword ptr [saved_cr4]
    mov cr4, ecx
    popad
    cmp byte ptr [check_ok], 1
    ret

; efer_feature_check: EAX = CPUID.80000001:EDX feature bit, EBX = its EFER bit.
; Same contract as cr4_feature_check (paging is off, so LME may be toggled).
efer_feature_check:
    pushad
    mov byte ptr [check_ok], 0
    mov esi, eax
    mov ecx, EFER
    rdmsr
    mov dword ptr [saved_efer], eax
    test dword ptr [ext_edx], esi
    jz efer_expect_gp
    TRY efer_check_end
    mov ecx, EFER
    rdmsr
    or eax, ebx
    wrmsr
    rdmsr
    test eax, ebx
    jz efer_check_end
    xor eax, ebx
    wrmsr
    rdmsr
    test eax, ebx
    jnz efer_check_end
    mov byte ptr [check_ok], 1
    jmp efer_check_end
efer_expect_gp:
    TRY efer_gp_end
    mov ecx, EFER
    rdmsr
    or eax, ebx
    wrmsr
efer_gp_end:
    ENDTRY
    cmp eax, 13
    jne efer_check_end
    mov byte ptr [check_ok], 1
efer_check_end:
    ENDTRY
    mov ecx, EFER
    xor edx, edx
    mov eax, dword ptr [saved_efer]
    wrmsr
    popad
    cmp byte ptr [check_ok], 1
    ret

; msr_roundtrip: ECX = MSR, EDX:EAX = value.  Write it, read it back, put the
; old value back.  ZF = 1 if nothing faulted and the value read back matched;
; otherwise an "INFO:" line shows what was read.
msr_roundtrip:
    pushad
    mov byte ptr [check_ok], 0
    mov dword ptr [want_lo], eax
    mov dword ptr [want_hi], edx
    mov dword ptr [got_lo], 0xffffffff
    mov dword ptr [got_hi], 0xffffffff
    TRY roundtrip_end
    rdmsr
    mov dword ptr [saved_lo], eax
    mov dword ptr [saved_hi], edx
    mov eax, dword ptr [want_lo]
    mov edx, dword ptr [want_hi]
    wrmsr
    rdmsr
    mov dword ptr [got_lo], eax
    mov dword ptr [got_hi], edx
    mov eax, dword ptr [saved_lo]
    mov edx, dword ptr [saved_hi]
    wrmsr
    mov eax, dword ptr [got_lo]
    cmp eax, dword ptr [want_lo]
    jne roundtrip_end
    mov eax, dword ptr [got_hi]
    cmp eax, dword ptr [want_hi]
    jne roundtrip_end
    mov byte ptr [check_ok], 1
roundtrip_end:
    ENDTRY
    cmp byte ptr [check_ok], 1
    je roundtrip_ok
    PRINT "INFO: MSR read back (hi, lo) "
    mov eax, dword ptr [got_hi]
    call puthex
    mov al, ' '
    call putc
    mov eax, dword ptr [got_lo]
    call puthex
    call newline
roundtrip_ok:
    popad
    cmp byte ptr [check_ok], 1
    ret

; ---------------------------------------------------------------- data
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 code, 32-bit
    .quad 0x00cf92000000ffff    ; 0x10 data
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.balign 8
vendor:         .zero 16
cpuid1_ebx:     .long 0
cpuid1_edx:     .long 0
ext_edx:        .long 0
pat_hi:         .long 0
check_ok:       .long 0
saved_cr4:      .long 0
saved_efer:     .long 0
saved_lo:       .long 0
saved_hi:       .long 0
want_lo:        .long 0
want_hi:        .long 0
got_lo:         .long 0
got_hi:         .long 0
tsc_first:      .quad 0

.balign 16
    .zero 8192
stack_top:
image_end:

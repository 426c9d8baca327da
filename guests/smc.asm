; vmlab-format: multiboot-aout
;
; smc.asm -- self-modifying code and code/data sharing, as on hardware
; (SDM Vol. 3A 11.6 "Self-Modifying Code": a store to code that is about to run
; is seen by it).  32-bit protected mode, flat segments, no paging:
;   1. patch the immediate of an instruction later in the running block;
;   2. patch a function on another page after it ran, call it again;
;   3. copy code to a fresh page and call it there;
;   4. write data into a page that holds running code, many times, without
;      touching the code (the loop keeps running correctly);
;   5. patch a NOP pair into RDMSR after the page was scanned: it must still be
;      trapped and answered by the MSR model (IA32_APIC_BASE = 0xFEE00900; an
;      untrapped Unicorn RDMSR would return 0);
;   6. a patch-and-run loop (also the `vmlab bench smc` workload).
; Each check prints one PASS/FAIL line; see guests/README.md.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

FRESH_PAGE = 0x300000

_start:
    cli
    cld
    mov esp, stack_top
    call serial_init

; ---- 1. patch the next instruction inside the running block
    mov dword ptr [patch1 + 1], 0x12345678
patch1:
    mov eax, 0
    mov edx, 0x12345678
    EXPECT_EQ "store to an instruction ahead in the same block is executed"

; ---- 2. patch a function on another page after it ran
    call far_func
    mov edx, 1
    EXPECT_EQ "function on another page returns its original value"
    mov dword ptr [far_func + 1], 7
    call far_func
    mov edx, 7
    EXPECT_EQ "the patched function returns the new value"

; ---- 3. copy code to a fresh page and run it there
    mov esi, copy_src
    mov edi, FRESH_PAGE
    mov ecx, copy_end - copy_src
    rep movsb
    mov eax, FRESH_PAGE
    call eax
    mov edx, 0x600d
    EXPECT_EQ "code copied to a fresh page runs there"
    mov byte ptr [FRESH_PAGE + 1], 0x42
    mov eax, FRESH_PAGE
    call eax
    mov edx, 0x6042
    EXPECT_EQ "code re-copied over the fresh page runs the new bytes"

; ---- 4. data writes into a page holding running code
    mov ecx, 1000
    mov dword ptr [code_page_data], 0
data_loop:
    add dword ptr [code_page_data], 3
    dec ecx
    jnz data_loop
    mov eax, dword ptr [code_page_data]
    mov edx, 3000
    EXPECT_EQ "a loop writing data into its own code page runs correctly"

; ---- 5. a NOP pair patched into RDMSR after the page was scanned
    call msr_func
    mov word ptr [msr_site], 0x320f       ; bytes 0f 32: rdmsr
    call msr_func
    mov edx, 0xfee00900
    EXPECT_EQ "RDMSR written by the guest is trapped (IA32_APIC_BASE)"

; ---- 6. patch-and-run loop
    mov ecx, [smc_iterations]
    xor ebx, ebx
smc_loop:
    mov dword ptr [smc_target + 1], ecx
    call smc_target
    add ebx, eax
    dec ecx
    jnz smc_loop
    mov eax, ebx
    mov edx, [smc_expected]
    EXPECT_EQ "patch-and-run loop sums every patched immediate"
    DONE

; Sum of 1..N for N = 2000 (the bench patches smc_iterations and smc_expected).
smc_iterations: .long 2000
smc_expected:   .long 2001000

msr_func:
    mov ecx, 0x1b
    xor eax, eax
    xor edx, edx
msr_site:
    nop
    nop
    ret

smc_target:
    mov eax, 0
    ret

copy_src:
    mov eax, 0x600d
    ret
copy_end:

code_page_data: .long 0

    .balign 4096
far_func:
    mov eax, 1
    ret

    .balign 16
stack: .zero 4096
stack_top:
image_end:

; vmlab-format: elf64
; vmlab-entry: _start
;
; code_alias.asm -- stores to a code page through a second, non-executable
; linear mapping of the same physical page, as Linux's text_poke() patches
; kernel text (issue 13: the cloud kernel's alternatives patching took a #PF
; with a fetch error code 0x11 at the alias' page and panicked).
;
; The code page [0, 2 MiB) is identity-mapped (executable) by the loader; this
; guest adds a 2 MiB alias at 0x40000000 with XD set (EFER.NXE = 1; SDM Vol. 3A
; 4.6.2), runs a function on the page so it is translated and scanned, then:
;   * patches the function through the alias with REP MOVSB (SDM Vol. 2B MOVS:
;     data writes; XD only restricts instruction fetches, 4.6.2): no fault;
;   * the patch holds RDMSR (an instruction vmlab traps), so the page's new
;     code has a new trap site: the patched function, called through the
;     executable mapping, runs the new bytes and reads EFER;
;   * a REP MOVSB whose destination crosses from a data page into the code
;     page (both through the alias) patches the function again: the bytes of
;     both pages are written and the new code runs;
;   * a fetch through the alias still faults: #PF with error code 0x11 (P|I/D),
;     CR2 = the target (SDM Vol. 3A 4.7).

%include "common.inc"

KERNEL_CS64 = 0x08
KERNEL_DS   = 0x10
EFER        = 0xc0000080
ALIAS       = 0x40000000

.code64
_start:
    cli
    cld
    lgdt [gdtr]
    mov rsp, stack_top
    push KERNEL_CS64
    mov rax, reload_cs
    push rax
    retfq
reload_cs:
    mov eax, KERNEL_DS
    mov ds, eax
    mov es, eax
    mov ss, eax
    call serial_init64
    call idt64_init
    PRINT64 "Stores to a code page through a non-executable alias\r\n"

    mov ecx, EFER               ; EFER.NXE: XD bits are honoured
    rdmsr
    or eax, 1 << 11
    wrmsr

    mov rax, cr3                ; PML4[0] -> PDPT (whoever built the identity map)
    mov rbx, 0x000ffffffffff000
    and rax, rbx
    mov rax, qword ptr [rax]
    and rax, rbx
    mov rcx, alias_pd           ; PDPT[1] -> our PD for [1 GiB, 2 GiB)
    or rcx, 3                   ; P | RW
    mov qword ptr [rax + 8], rcx
    mov rcx, 0x8000000000000083 ; PDE 0: physical 0, P | RW | PS, XD
    mov qword ptr [alias_pd], rcx
    mov rax, cr3                ; flush the TLB (PDPT entries may be cached)
    mov cr3, rax

    call patch_target           ; translated and scanned through the identity map
    mov edx, 1
    EXPECT_EQ64 "the function runs before it is patched"

    mov rsi, patch_rdmsr
    mov rdi, patch_target       ; (Keystone reads "mov r, sym + const" as a load)
    mov rax, ALIAS
    add rdi, rax
    mov ecx, patch_rdmsr_end - patch_rdmsr
    TRY64 store_done
    rep movsb
store_done:
    ENDTRY64
    mov rdx, -1
    EXPECT_EQ64 "REP MOVSB through the XD alias: no exception"

    mov ecx, EFER
    rdmsr
    mov rbx, rax
    xor eax, eax
    call patch_target           ; the new bytes: mov ecx, EFER; rdmsr; ret
    mov rdx, rbx
    EXPECT_EQ64 "the patched function (RDMSR) runs through the executable mapping"

    ; A copy that starts on the data page before the code page.
    mov rsi, cross_src
    mov rdi, patch_page - 8
    mov rax, ALIAS
    add rdi, rax
    mov ecx, 8 + patch_two_end - patch_two
    TRY64 cross_done
    rep movsb
cross_done:
    ENDTRY64
    mov rdx, -1
    EXPECT_EQ64 "REP MOVSB across a data page into the code page: no exception"
    mov rax, qword ptr [patch_page - 8]
    mov rdx, 0x1122334455667788
    EXPECT_EQ64 "the data page's bytes were written"
    call patch_target
    mov edx, 2
    EXPECT_EQ64 "the code page's bytes were written and run"

    mov rax, patch_target
    mov rbx, ALIAS
    add rax, rbx
    mov qword ptr [alias_target], rax
    TRY64 fetch_done
    call rax
fetch_done:
    ENDTRY64
    mov edx, 14
    EXPECT_EQ64 "a fetch through the XD alias raises #PF"
    mov rax, qword ptr [caught_err]
    mov edx, 0x11
    EXPECT_EQ64 "error code 0x11 (P | I/D)"
    mov rax, qword ptr [caught_cr2]
    mov rdx, qword ptr [alias_target]
    EXPECT_EQ64 "CR2 is the fetched address"

    DONE64

patch_rdmsr:
    mov ecx, EFER
    rdmsr
    ret
patch_rdmsr_end:

alias_target:
    .quad 0
cross_src:
    .quad 0x1122334455667788
patch_two:
    mov eax, 2
    ret
patch_two_end:

serial_init64:
    mov rsi, uart_init
uart_loop:
    lodsw
    cmp al, 0xff
    je uart_done
    mov dx, COM1
    add dl, al
    mov al, ah
    out dx, al
    jmp uart_loop
uart_done:
    jmp newline64

uart_init:
    .byte 1, 0x00, 3, 0x80, 0, 0x01, 1, 0x00, 3, 0x03, 2, 0xc7, 4, 0x03, 0xff, 0

.balign 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt_end:
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt

.balign 16
    .zero 8192
stack_top:

.balign 4096
alias_pd:                       ; page directory of the alias (only entry 0 used)
    .zero 4096

; The function that is patched, alone on its page, after a data page.
.balign 4096
    .zero 4096
patch_page:
patch_target:
    mov eax, 1
    ret
    .zero 64

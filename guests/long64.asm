; vmlab-format: elf64
; vmlab-entry: _start
;
; long64.asm -- an ELF64 kernel for vmlab's own loader, which enters it in
; 64-bit long mode with identity paging at e_entry (QEMU cannot boot ELF64
; kernels; tests/guests runs it there through guests/shim/elf64_shim.asm, a
; Multiboot kernel that plays the loader).
;
; Assumes only: 64-bit code segment, paging on, RIP = _start, interrupts off.
; Loads its own GDT, data segments, stack and 64-bit IDT, then checks:
;   CR0.PE and CR0.PG, CR4.PAE, EFER.LME and EFER.LMA set; CS is a 64-bit code
;   segment (LAR: L = 1, D = 0); RIP-relative addressing sees the link address
;   (the image sits where its program header says); a #UD is delivered through
;   the 64-bit IDT.

%include "common.inc"

KERNEL_CS64 = 0x08
KERNEL_DS   = 0x10
EFER        = 0xc0000080

.code64
_start:
    cli
    cld
    lgdt [gdtr]
    mov rsp, stack_top
    push KERNEL_CS64            ; reload CS from our GDT with a far return
    mov rax, reload_cs
    push rax
    retfq
reload_cs:
    mov eax, KERNEL_DS
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    call serial_init64
    call idt64_init
    PRINT64 "Hello from a 64-bit ELF kernel\r\n"

    mov rax, cr0
    and eax, 0x80000001
    mov edx, 0x80000001
    EXPECT_EQ64 "CR0.PE and CR0.PG set"
    mov rax, cr4
    and eax, 1 << 5
    mov edx, 1 << 5
    EXPECT_EQ64 "CR4.PAE set"
    mov ecx, EFER
    rdmsr
    and eax, (1 << 8) | (1 << 10)
    mov edx, (1 << 8) | (1 << 10)
    EXPECT_EQ64 "EFER.LME and EFER.LMA set"

    xor eax, eax
    mov ax, cs
    lar eax, eax                ; access rights of CS: L = bit 21, D = bit 22
    and eax, (1 << 21) | (1 << 22)
    mov edx, 1 << 21
    EXPECT_EQ64 "CS is a 64-bit code segment (L = 1, D = 0)"

    lea rax, [rip]              ; = the address of the next instruction
here:
    mov rdx, here
    EXPECT_EQ64 "RIP-relative address equals the link address"

    TRY64 ud_done
ud_insn:
    ud2
ud_done:
    ENDTRY64
    mov edx, 6
    EXPECT_EQ64 "#UD delivered through the 64-bit IDT"
    mov rax, qword ptr [caught_eip]
    mov rdx, ud_insn
    EXPECT_EQ64 "#UD saved RIP is the ud2"

    DONE64

; serial_init64: COM1 at 115200 8N1 (the 32-bit serial_init, in 64-bit code).
serial_init64:
    mov rsi, uart_init
uart_loop:
    lodsw                       ; al = register offset, ah = value
    cmp al, 0xff
    je uart_done
    mov dx, COM1
    add dl, al
    mov al, ah
    out dx, al
    jmp uart_loop
uart_done:
    jmp newline64

; ---------------------------------------------------------------- data
uart_init:
    .byte 1, 0x00, 3, 0x80, 0, 0x01, 1, 0x00, 3, 0x03, 2, 0xc7, 4, 0x03, 0xff, 0

.balign 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    ; 0x08 code, 64-bit
    .quad 0x00cf92000000ffff    ; 0x10 data
gdt_end:
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt

.balign 16
    .zero 8192
stack_top:

; vmlab-format: bootsector
;
; hello.asm -- the default guest: one 512-byte boot sector that walks the CPU
; from real mode through 32-bit protected mode into 64-bit long mode, saying
; hello over COM1 in each, then exits through isa-debug-exit (port 0xf4).
; No BIOS service is used: the firmware only has to load the sector at 0x7c00
; (vmlab has no BIOS at all).
;
; Expected output:
;   Hello from real mode
;   Hello from protected mode
;   Hello from long mode
;   PASS: long mode (EFER.LMA=1)
;   DONE
; then exit status 1 under QEMU ((0 << 1) | 1).

COM1        = 0x3f8
PAGE_TABLES = 0x10000           ; PML4, PDPT, PD: three 4 KiB pages at 64 KiB
CODE32_SEL  = 0x08
DATA_SEL    = 0x10
CODE64_SEL  = 0x18
EFER        = 0xc0000080

.code16
start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    ljmp 0:real_mode            ; normalise CS:IP (firmware may use 07c0:0000)

real_mode:
    ; COM1: 115200 8N1, FIFOs on, no interrupts.  Table of (port, value) pairs.
    mov si, uart_init
uart_loop:
    lodsw                       ; al = port offset, ah = value
    test al, al
    js uart_done                ; 0xff ends the table
    mov dx, COM1
    add dl, al
    mov al, ah
    out dx, al
    jmp uart_loop
uart_done:
    mov si, msg_real
puts16:                         ; (inline: the only 16-bit print)
    lodsb
    test al, al
    jz puts16_end
    mov bl, al
    mov dx, COM1 + 5
puts16_wait:
    in al, dx
    test al, 0x20
    jz puts16_wait
    mov dx, COM1
    mov al, bl
    out dx, al
    jmp puts16
puts16_end:

    lgdt [gdtr]                 ; 16-bit operand size: 24-bit base, fine here
    mov eax, cr0
    or al, 1                    ; CR0.PE
    mov cr0, eax
    ljmp CODE32_SEL:protected_mode

.code32
protected_mode:
    mov eax, DATA_SEL           ; (mov sreg, eax: no 0x66 prefix)
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    mov esp, 0x7c00
    mov esi, msg_prot
    call puts

    ; Identity-map the first 2 MiB with one large page: PML4[0] -> PDPT,
    ; PDPT[0] -> PD, PD[0] = 2 MiB page at 0 (P | RW | PS).
    mov edi, PAGE_TABLES
    xor eax, eax
    mov ecx, 3 * 4096 / 4
    rep stosd
    mov dword ptr [PAGE_TABLES], PAGE_TABLES + 0x1000 + 3
    mov dword ptr [PAGE_TABLES + 0x1000], PAGE_TABLES + 0x2000 + 3
    mov dword ptr [PAGE_TABLES + 0x2000], 0x83
    mov eax, PAGE_TABLES
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                ; CR4.PAE
    mov cr4, eax
    mov ecx, EFER
    rdmsr
    or eax, 0x100               ; EFER.LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000          ; CR0.PG -> long mode (compatibility until the jump)
    mov cr0, eax
    ljmp CODE64_SEL:long_mode

.code64
long_mode:
    mov eax, DATA_SEL
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov esi, msg_long
    call puts
    mov ecx, EFER
    rdmsr
    xor ebp, ebp                ; exit value
    mov esi, msg_pass
    test eax, 0x400             ; EFER.LMA
    jnz report
    mov esi, msg_fail
    inc ebp
report:
    call puts
    mov esi, msg_done
    call puts
    mov eax, ebp
    out 0xf4, al
halt:
    cli
    hlt
    jmp halt

; ---- string output (ESI -> NUL-terminated string) ----

; puts serves 32-bit AND 64-bit callers: every instruction below encodes the
; same in both modes and does the same thing there (no REX-sensitive opcode, no
; inc/dec; lodsb uses ESI/RSI, ret pops what the caller's call pushed).  Keep
; it that way when editing, or split it.
.code32
puts:
    lodsb
    test al, al
    jz puts_end
    mov bl, al
    mov dx, COM1 + 5
puts_wait:
    in al, dx
    test al, 0x20
    jz puts_wait
    mov dx, COM1
    mov al, bl
    out dx, al
    jmp puts
puts_end:
    ret

; ---- data ----
uart_init:
    .byte 1, 0x00               ; IER: no interrupts
    .byte 3, 0x80               ; LCR: DLAB
    .byte 0, 0x01               ; DLL: divisor 1 = 115200 baud
    .byte 1, 0x00               ; DLM
    .byte 3, 0x03               ; LCR: 8N1
    .byte 2, 0xc7               ; FCR: FIFOs on and cleared
    .byte 4, 0x03               ; MCR: DTR | RTS
    .byte 0xff, 0

gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08: 32-bit code, base 0, 4 GiB
    .quad 0x00cf92000000ffff    ; 0x10: data, base 0, 4 GiB
    .quad 0x00af9a000000ffff    ; 0x18: 64-bit code (L = 1)
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

msg_real: .asciz "\r\nHello from real mode\r\n"
msg_prot: .asciz "Hello from protected mode\r\n"
msg_long: .asciz "Hello from long mode\r\n"
msg_pass: .asciz "PASS: long mode (EFER.LMA=1)\r\n"
msg_fail: .asciz "FAIL: EFER.LMA clear\r\n"
msg_done: .asciz "DONE\r\n"

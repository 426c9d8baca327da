; vmlab-format: multiboot-aout
;
; modes.asm -- the same bytes run as 16-, 32- and 64-bit code and give three
; different results, because the CPU mode changes how they decode (the TB cache
; must key blocks by the mode bits, as QEMU keys TBs by their flags):
;
;   bytes: 31 c0 48 b8 01 00 40 40 c3 90 90 90 90 c3
;   16-bit: xor ax,ax; dec ax; mov ax,1; inc ax; inc ax; ret      -> AX  = 3
;   32-bit: xor eax,eax; dec eax; mov eax,0x40400001; ret           -> EAX = 0x40400001
;   64-bit: xor eax,eax; mov rax,0x909090c340400001; nop; ret      -> RAX = 0x909090c340400001
;
; The 16-bit run is in a 16-bit protected-mode code segment whose base is the
; 64 KiB window holding the bytes; each run calls them with a near CALL.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

CODE32_SEL = 0x08
DATA_SEL   = 0x10
CODE16_SEL = 0x18
CODE64_SEL = 0x20
EFER       = 0xc0000080
WINDOW     = 0x100000           ; base of the 16-bit code segment (the image's 64 KiB)
RESULT16   = 0x8000             ; where the 16-bit run leaves AX (free low memory)

_start:
    cli
    cld
    mov esp, stack_top
    call serial_init
    lgdt [gdtr]
    ljmp CODE32_SEL:reload
reload:
    mov eax, DATA_SEL
    mov ds, eax
    mov es, eax
    mov ss, eax

; ---- 32-bit
    call same_bytes
    mov edx, 0x40400001
    EXPECT_EQ "32-bit decode: EAX = 0x40400001"

; ---- 16-bit: far jump into the 16-bit segment, call, far jump back
    ljmp CODE16_SEL:(run16 - WINDOW)
back32:
    mov eax, dword ptr [RESULT16]
    and eax, 0xffff
    mov edx, 3
    EXPECT_EQ "16-bit decode: AX = 3"

; ---- 64-bit: PAE paging (identity 0-2 MiB), EFER.LME, CR0.PG
    mov dword ptr [pml4], pdpt + 3
    mov dword ptr [pdpt], pd + 3
    mov dword ptr [pd], 0x83
    ENTER_LONG_MODE pml4, CODE64_SEL, run64

.code16
run16:
    call same_bytes
    mov word ptr [RESULT16], ax ; DS base 0: a 16-bit offset below 64 KiB
    .byte 0x66, 0xea            ; ljmp CODE32_SEL:back32 (32-bit offset)
    .long back32
    .word CODE32_SEL

.code64
run64:
    call same_bytes
    mov rdx, 0x909090c340400001
    EXPECT_EQ64 "64-bit decode: RAX = 0x909090c340400001"
    DONE64

.code32
same_bytes:
    .byte 0x31, 0xc0, 0x48, 0xb8, 0x01, 0x00, 0x40, 0x40, 0xc3, 0x90, 0x90, 0x90, 0x90, 0xc3

.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 code, 32-bit
    .quad 0x00cf92000000ffff    ; 0x10 data
    .quad 0x00009a100000ffff    ; 0x18 code, 16-bit, base 0x100000, limit 64 KiB
    .quad 0x00af9a000000ffff    ; 0x20 code, 64-bit
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.balign 4096
pml4: .zero 4096
pdpt: .zero 4096
pd:   .zero 4096
stack: .zero 4096
stack_top:
image_end:

; vmlab-format: multiboot-aout
; vmlab-memory: 5G
; vmlab-qemu-known-fail: 3 GiB (the hole): reads all ones
; vmlab-qemu-known-fail: 3.5 GiB - 64 KiB (the hole): reads all ones
;
; highmem.asm -- RAM above 4 GiB (issue 11 item 5).  Booted with 5 GiB of RAM,
; which a PC splits around the 32-bit hole like QEMU's pc machine
; (hw/i386/pc_piix.c pc_init1: at 3.5 GiB of RAM or more, 3 GiB below 4 GiB
; and the rest from 4 GiB; emu/memory.py split_ram):
;   * the Multiboot memory map (Multiboot spec 0.6.96 3.3, flags bit 6) has
;     available RAM below 4 GiB ending at or below 3 GiB, and an available
;     entry at 4 GiB of 2 GiB; mem_upper counts only the RAM below 4 GiB;
;   * in long mode with 2 MiB pages identity-mapping [0, 8 GiB): qwords
;     written at the first, a middle and the last qword of the high RAM read
;     back; a store at 4 GiB + X leaves X alone (no aliasing);
;   * code copied to high RAM (REP MOVSB) runs, and REPE CMPSB compares 8 KiB
;     copied there;
;   * the hole (3 GiB, 3.5 GiB) reads as all ones, and writes there and past
;     the high RAM do not stick (open bus).
; On QEMU the same checks run (QEMU -m 5G).  QEMU 7.2 reads unassigned
; guest-physical memory as 0 (its unassigned-memory handler); a PC's host
; bridge answers a master abort with all ones, as vmlab's open bus does: the
; two "reads all ones" checks are declared QEMU deviations.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS   = 0x08
KERNEL_DS   = 0x10
KERNEL_CS64 = 0x18
EFER        = 0xc0000080
LOW_SPLIT   = 0xc0000000

_start:
    cli
    cld
    mov esp, kstack_top
    mov dword ptr [mb_magic], eax
    mov dword ptr [mb_info], ebx
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init

    ; ------------------------------------------------ the Multiboot memory map
    mov ebx, dword ptr [mb_info]
    mov eax, dword ptr [ebx]
    and eax, 1 << 6
    mov edx, 1 << 6
    EXPECT_EQ "Multiboot flags: a memory map (bit 6)"
    mov esi, dword ptr [ebx + 48]           ; mmap_addr
    mov ecx, dword ptr [ebx + 44]           ; mmap_length
    add ecx, esi
mmap_loop:
    cmp esi, ecx
    jae mmap_done
    cmp dword ptr [esi + 20], 1             ; type 1: available
    jne mmap_next
    mov eax, dword ptr [esi + 8]            ; base_addr high
    test eax, eax
    jnz mmap_high
    mov eax, dword ptr [esi + 4]            ; base_addr low + length low = end
    add eax, dword ptr [esi + 12]
    jc mmap_low_over
    cmp eax, dword ptr [low_end]
    jbe mmap_next
    mov dword ptr [low_end], eax
    jmp mmap_next
mmap_low_over:
    mov dword ptr [low_end], 0xffffffff
    jmp mmap_next
mmap_high:
    mov dword ptr [high_base_hi], eax
    mov eax, dword ptr [esi + 4]
    mov dword ptr [high_base_lo], eax
    mov eax, dword ptr [esi + 12]
    mov dword ptr [high_len_lo], eax
    mov eax, dword ptr [esi + 16]
    mov dword ptr [high_len_hi], eax
mmap_next:
    add esi, dword ptr [esi]
    add esi, 4
    jmp mmap_loop
mmap_done:
    mov eax, dword ptr [low_end]
    mov edx, LOW_SPLIT
    cmp eax, edx
    seta al
    movzx eax, al
    mov edx, 0
    EXPECT_EQ "memory map: available RAM below 4 GiB ends at or below 3 GiB"
    mov eax, dword ptr [low_end]
    mov edx, 0xb0000000
    EXPECT_AE "memory map: ... and reaches past 2.75 GiB"
    mov eax, dword ptr [high_base_hi]
    mov edx, 1
    EXPECT_EQ "memory map: available RAM at 4 GiB (base bits 63:32)"
    mov eax, dword ptr [high_base_lo]
    mov edx, 0
    EXPECT_EQ "memory map: ... (base bits 31:0)"
    mov eax, dword ptr [high_len_hi]
    mov edx, 0
    EXPECT_EQ "memory map: 2 GiB above 4 GiB (length bits 63:32)"
    mov eax, dword ptr [high_len_lo]
    mov edx, 0x80000000
    EXPECT_EQ "memory map: ... (length bits 31:0)"
    mov ebx, dword ptr [mb_info]
    mov eax, dword ptr [ebx + 8]            ; mem_upper (KiB from 1 MiB)
    mov edx, (LOW_SPLIT >> 10) - 1024
    cmp eax, edx
    seta al
    movzx eax, al
    mov edx, 0
    EXPECT_EQ "mem_upper counts RAM below 4 GiB only"

    ; ------------------------------------------------ long mode, [0, 8 GiB) mapped
    mov dword ptr [pml4], pdpt + 3
    xor ecx, ecx
map_pdpt:
    mov eax, ecx
    shl eax, 12
    add eax, pds + 3
    mov dword ptr [pdpt + ecx*8], eax
    inc ecx
    cmp ecx, 8
    jb map_pdpt
    xor ecx, ecx                            ; 8 * 512 2 MiB pages
map_pd:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                            ; P | RW | PS
    mov edx, ecx
    shr edx, 11                             ; bits 63:32 of the page address
    mov dword ptr [pds + ecx*8], eax
    mov dword ptr [pds + ecx*8 + 4], edx
    inc ecx
    cmp ecx, 8 * 512
    jb map_pd
    ENTER_LONG_MODE pml4, KERNEL_CS64, long_mode

.code64
long_mode:
    mov eax, KERNEL_DS
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov rsp, kstack_top
    call idt64_init

    mov rbx, 0x100000000
    mov rax, 0x1111222233334444
    mov qword ptr [rbx], rax
    mov rbx, 0x140000008
    mov rax, 0x5555666677778888
    mov qword ptr [rbx], rax
    mov rbx, 0x17ffffff8
    mov rax, 0x99990000aaaabbbb
    mov qword ptr [rbx], rax
    mov rbx, 0x100000000
    mov rax, qword ptr [rbx]
    mov rdx, 0x1111222233334444
    EXPECT_EQ64 "high RAM: the first qword at 4 GiB reads back"
    mov rbx, 0x140000008
    mov rax, qword ptr [rbx]
    mov rdx, 0x5555666677778888
    EXPECT_EQ64 "high RAM: a qword at 5 GiB + 8 reads back"
    mov rbx, 0x17ffffff8
    mov rax, qword ptr [rbx]
    mov rdx, 0x99990000aaaabbbb
    EXPECT_EQ64 "high RAM: the last qword (6 GiB - 8) reads back"

    mov rbx, alias_probe
    mov qword ptr [rbx], 0x1234
    mov rcx, 0x100000000
    add rcx, rbx
    mov qword ptr [rcx], 0x5678
    mov rax, qword ptr [rbx]
    mov rdx, 0x1234
    EXPECT_EQ64 "a store at 4 GiB + X leaves X alone"
    mov rax, qword ptr [rcx]
    mov rdx, 0x5678
    EXPECT_EQ64 "... and reads back at 4 GiB + X"

    ; code in high RAM
    mov rsi, high_func
    mov rdi, 0x120000000
    mov ecx, high_func_end - high_func
    rep movsb
    mov rax, 0x120000000
    call rax
    mov edx, 0x600dc0de
    EXPECT_EQ64 "code copied to high RAM runs"

    ; 8 KiB copied to high RAM and compared with REPE CMPSB
    mov rdi, pattern
    mov ecx, 8192
    xor eax, eax
fill_pattern:
    mov byte ptr [rdi], al
    add al, 7
    inc rdi
    dec ecx
    jnz fill_pattern
    mov rsi, pattern
    mov rdi, 0x17fffe000                    ; the last 8 KiB of high RAM
    mov ecx, 8192
    rep movsb
    mov rsi, pattern
    mov rdi, 0x17fffe000
    mov ecx, 8192
    repe cmpsb
    mov eax, ecx
    mov edx, 0
    EXPECT_EQ64 "REP MOVSB / REPE CMPSB over the last 8 KiB of high RAM"

    ; the hole and the space after RAM: open bus
    mov rbx, LOW_SPLIT
    mov rax, qword ptr [rbx]
    mov rdx, -1
    EXPECT_EQ64 "3 GiB (the hole): reads all ones"
    mov rdx, 0x5555aaaa5555aaaa
    mov qword ptr [rbx], rdx
    cmp qword ptr [rbx], rdx
    EXPECT_NZ64 "3 GiB (the hole): a write does not stick"
    mov rbx, 0xdfff0000
    mov rax, qword ptr [rbx]
    mov rdx, -1
    EXPECT_EQ64 "3.5 GiB - 64 KiB (the hole): reads all ones"
    mov rbx, 0x180000000
    mov rdx, 0x5555aaaa5555aaaa
    mov qword ptr [rbx], rdx
    cmp qword ptr [rbx], rdx
    EXPECT_NZ64 "6 GiB (past the high RAM): a write does not stick"
    DONE64

high_func:
    mov eax, 0x600dc0de
    ret
high_func_end:

; ================================================================ data
.code32
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 code32
    .quad 0x00cf92000000ffff    ; 0x10 data
    .quad 0x00af9a000000ffff    ; 0x18 code64
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0

.balign 8
low_end:        .long 0
high_base_lo:   .long 0
high_base_hi:   .long 0
high_len_lo:    .long 0
high_len_hi:    .long 0
alias_probe:    .quad 0

.balign 4096
pml4:           .zero 4096
pdpt:           .zero 4096
pds:            .zero 8 * 4096
pattern:        .zero 8192
                .zero 8192
kstack_top:
image_end:

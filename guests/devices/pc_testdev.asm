; vmlab-format: multiboot-aout
;
; pc_testdev.asm -- QEMU's pc-testdev (hw/misc/pc-testdev.c), as test kernels
; use it.  Needs the device: vmlab run guests/devices/pc_testdev.asm -device
; pc-testdev (QEMU: -device pc-testdev).  It lives outside guests/*.asm because
; the generic guest runs boot without extra devices.
;
;   1. port 0xe0: a 32-bit register; dword, word and byte writes at offsets 0-3
;      replace just those bytes, reads return them (test_ioport_read/write);
;   2. port 0xe8: the same register, byte-wise (pc-testdev-ioport-byte);
;   3. MMIO 0xff000000: 64 KiB of storage (pc-testdev-iomem): dword/word/byte
;      round trips at both ends, 16 bytes copied into the window and back;
;   4. port 0x2000 + n: IRQ line n.  Line 5 (8259 master input 5, vector 0x25):
;      raised while IF = 0 and unmasked, the interrupt is taken after STI, once;
;      lowered again, no second interrupt.
;   5. port 0xe4 (flush-page): a write is accepted and memory is unchanged.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS       = 0x08
KERNEL_DS       = 0x10
TESTDEV_IOPORT  = 0xe0
TESTDEV_FLUSH   = 0xe4
TESTDEV_BYTE    = 0xe8
TESTDEV_IRQ     = 0x2000
TESTDEV_IOMEM   = 0xff000000
IOMEM_LEN       = 0x10000
IRQ_LINE        = 5
IRQ_VECTOR      = 0x20 + IRQ_LINE

_start:
    cli
    cld
    mov esp, stack_top
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init
    mov eax, IRQ_VECTOR
    mov ebx, irq_handler
    mov ecx, 0x8e
    call idt32_set

    ; ---- 1. port 0xe0
    mov dx, TESTDEV_IOPORT
    mov eax, 0x12345678
    out dx, eax
    in eax, dx
    mov edx, 0x12345678
    EXPECT_EQ "pc-testdev ioport 0xe0: dword write reads back"
    mov dx, TESTDEV_IOPORT + 2
    mov ax, 0xbeef
    out dx, ax
    mov dx, TESTDEV_IOPORT
    in eax, dx
    mov edx, 0xbeef5678
    EXPECT_EQ "pc-testdev ioport: word write at offset 2 replaces bytes 2-3 only"
    mov dx, TESTDEV_IOPORT + 1
    mov al, 0xaa
    out dx, al
    mov dx, TESTDEV_IOPORT + 1
    xor eax, eax
    in al, dx
    mov edx, 0xaa
    EXPECT_EQ "pc-testdev ioport: byte read at offset 1"
    mov dx, TESTDEV_IOPORT
    in eax, dx
    mov edx, 0xbeefaa78
    EXPECT_EQ "pc-testdev ioport: byte write at offset 1 replaces byte 1 only"

    ; ---- 2. port 0xe8: the same register, byte-wise
    mov dx, TESTDEV_BYTE
    in eax, dx
    mov edx, 0xbeefaa78
    EXPECT_EQ "pc-testdev ioport-byte 0xe8 reads the 0xe0 register"
    mov dx, TESTDEV_BYTE
    mov eax, 0xcafef00d
    out dx, eax
    mov dx, TESTDEV_IOPORT
    in eax, dx
    mov edx, 0xcafef00d
    EXPECT_EQ "pc-testdev ioport-byte: a dword write lands in all four bytes"

    ; ---- 3. MMIO window at 0xff000000
    mov edi, TESTDEV_IOMEM
    mov dword ptr [edi], 0x11223344
    mov eax, [edi]
    mov edx, 0x11223344
    EXPECT_EQ "pc-testdev iomem: dword round trip at offset 0"
    mov word ptr [edi + 1], 0xabcd
    mov eax, [edi]
    mov edx, 0x11abcd44
    EXPECT_EQ "pc-testdev iomem: word write at offset 1 is little-endian storage"
    mov byte ptr [edi + IOMEM_LEN - 1], 0x5a
    movzx eax, byte ptr [edi + IOMEM_LEN - 1]
    mov edx, 0x5a
    EXPECT_EQ "pc-testdev iomem: last byte (offset 0xffff) round trip"
    ; (string instructions on MMIO are another test's subject: plain moves here)
    xor ecx, ecx
copy_in:
    mov eax, [pattern + ecx*4]
    mov [TESTDEV_IOMEM + 0x100 + ecx*4], eax
    inc ecx
    cmp ecx, 4
    jb copy_in
    xor ecx, ecx
copy_out:
    mov eax, [TESTDEV_IOMEM + 0x100 + ecx*4]
    mov [copy_back + ecx*4], eax
    inc ecx
    cmp ecx, 4
    jb copy_out
    mov esi, pattern
    mov edi, copy_back
    mov ecx, 4
    repe cmpsd dword ptr [esi], dword ptr es:[edi]
    EXPECT_Z "pc-testdev iomem: 16 bytes copied into the window and back are unchanged"

    ; ---- 4. IRQ line 5 through the 8259
    in al, 0x21
    and al, ~(1 << IRQ_LINE)
    out 0x21, al
    mov dx, TESTDEV_IRQ + IRQ_LINE
    mov al, 1
    out dx, al
    mov eax, [irq_count]
    mov edx, 0
    EXPECT_EQ "pc-testdev IRQ line 5 raised with IF = 0: not taken yet"
    sti
    nop
    nop
    cli
    mov eax, [irq_count]
    mov edx, 1
    EXPECT_EQ "pc-testdev IRQ line 5: taken once after STI (vector 0x25)"
    mov dx, TESTDEV_IRQ + IRQ_LINE
    mov al, 0
    out dx, al
    sti
    nop
    nop
    cli
    mov eax, [irq_count]
    mov edx, 1
    EXPECT_EQ "pc-testdev IRQ line 5 lowered: no further interrupt"

    ; ---- 5. flush-page port
    mov dword ptr [flush_target], 0x600df00d
    mov dx, TESTDEV_FLUSH
    mov eax, flush_target
    out dx, eax
    mov eax, [flush_target]
    mov edx, 0x600df00d
    EXPECT_EQ "pc-testdev flush-page: write accepted, memory unchanged"
    DONE

irq_handler:
    push eax
    inc dword ptr [irq_count]
    mov al, 0x20                ; non-specific EOI to the master
    out 0x20, al
    pop eax
    iretd

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
irq_count:      .long 0
pattern:        .long 0xdeadbeef, 0x01020304, 0xa5a5a5a5, 0x7f7f0000
copy_back:      .long 0, 0, 0, 0

.balign 4096
flush_target:   .long 0
.balign 16
    .zero 8192
stack_top:
image_end:

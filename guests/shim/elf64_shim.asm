; vmlab-format: multiboot-aout
; vmlab-org: 0x800000
;
; elf64_shim.asm -- lets QEMU (which refuses ELF64 Multiboot kernels) run an
; elf64 guest: boot this with the ELF64 file as the first Multiboot module
; (-kernel elf64_shim.bin -initrd guest.elf).  It does what vmlab's loader does
; for elf64 guests: copy each PT_LOAD to its p_paddr (zeroing the bss part),
; identity-map the first 1 GiB with 2 MiB pages, enter long mode and jump to
; e_entry with interrupts off.  It lives at 8 MiB, out of the guest's way.
; Not a guest of its own: tools/guestbuild.py uses it for QEMU runs only.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

CODE32_SEL  = 0x08
DATA_SEL    = 0x10
CODE64_SEL  = 0x18
EFER        = 0xc0000080
PT_LOAD     = 1

_start:
    cli
    cld
    mov dword ptr [mb_magic], eax
    mov dword ptr [mb_info], ebx
    mov esp, stack_top
    call serial_init
    lgdt [gdtr]
    ljmp CODE32_SEL:reload_segments
reload_segments:
    mov eax, DATA_SEL
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    call pic_init
    call idt32_init

    cmp dword ptr [mb_magic], 0x2badb002
    jne no_module
    mov ebx, dword ptr [mb_info]
    test dword ptr [ebx], 1 << 3
    jz no_module
    cmp dword ptr [ebx + 20], 1
    jb no_module
    mov eax, dword ptr [ebx + 24]
    mov esi, dword ptr [eax]            ; ESI = ELF file
    mov dword ptr [elf_base], esi

    cmp dword ptr [esi], 0x464c457f     ; "\x7fELF"
    jne bad_elf
    cmp byte ptr [esi + 4], 2           ; ELFCLASS64
    jne bad_elf
    cmp word ptr [esi + 18], 62         ; EM_X86_64
    jne bad_elf
    mov eax, dword ptr [esi + 24]       ; e_entry (low half; must be < 4 GiB)
    mov dword ptr [entry], eax

    mov edi, esi
    add edi, dword ptr [esi + 32]       ; e_phoff
    movzx ecx, word ptr [esi + 56]      ; e_phnum
phdr_loop:
    test ecx, ecx
    jz phdrs_done
    cmp dword ptr [edi], PT_LOAD
    jne phdr_next
    pushad
    mov esi, dword ptr [elf_base]
    add esi, dword ptr [edi + 8]        ; p_offset
    mov ebx, dword ptr [edi + 32]       ; p_filesz
    mov edx, dword ptr [edi + 40]       ; p_memsz
    mov edi, dword ptr [edi + 24]       ; p_paddr
    mov ecx, ebx
    rep movsb
    mov ecx, edx
    sub ecx, ebx
    xor eax, eax
    rep stosb
    popad
phdr_next:
    movzx eax, word ptr [esi + 54]      ; e_phentsize
    add edi, eax
    dec ecx
    jmp phdr_loop
phdrs_done:

    ; Identity map 0-1 GiB: PML4[0] -> PDPT, PDPT[0] -> PD of 512 2 MiB pages.
    mov dword ptr [pml4], pdpt + 3
    mov dword ptr [pdpt], pd + 3
    mov edi, pd
    mov eax, 0x83               ; P | RW | PS
pd_fill:
    mov dword ptr [edi], eax
    add edi, 8
    add eax, 0x200000
    cmp edi, pd + 4096
    jb pd_fill
    mov eax, pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov ecx, EFER
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    PRINT "INFO: elf64 shim: entering the ELF64 guest at "
    mov eax, dword ptr [entry]
    call puthex
    call newline
    ljmp CODE64_SEL:long_mode

no_module:
    FAIL "elf64 shim: no Multiboot module (boot with -initrd guest.elf)"
    DONE
bad_elf:
    FAIL "elf64 shim: module 0 is not an x86-64 ELF file"
    DONE

.code64
long_mode:
    mov eax, dword ptr [entry]
    jmp rax

; ---------------------------------------------------------------- data
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 code, 32-bit
    .quad 0x00cf92000000ffff    ; 0x10 data
    .quad 0x00af9a000000ffff    ; 0x18 code, 64-bit
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.balign 8
elf_base:   .long 0
entry:      .long 0

.balign 4096
pml4:   .zero 4096
pdpt:   .zero 4096
pd:     .zero 4096
        .zero 8192
stack_top:
image_end:

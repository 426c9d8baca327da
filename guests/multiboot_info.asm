; vmlab-format: multiboot-elf
; vmlab-cmdline: vmlab-mbtest answer=42
; vmlab-module: data/mb_module1.txt arg1=one
; vmlab-module: data/mb_module2.txt arg2=two
;
; multiboot_info.asm -- what a Multiboot v1 loader hands over (Multiboot spec
; 0.6.96 §3.2, §3.3), as an ELF32 kernel (no a.out kludge: the loader must read
; the ELF program header).  Boot it with the command line and the two modules
; above (QEMU: -append "..." -initrd "mod1 args,mod2 args").
;
;   EAX = 0x2BADB002; flags has mem (0), cmdline (2), mods (3), mmap (6);
;   mem_lower/mem_upper plausible against the memory map; the memory map is
;   well formed and has RAM at 0 and at 1 MiB; the command line contains
;   "vmlab-mbtest"; two page-aligned modules above the kernel, each with its
;   cmdline args and its file content.  Everything is printed as INFO lines.

.code32
mb_header:
    .long 0x1badb002
    .long 0x00000003            ; page-align modules, memory info; ELF (no bit 16)
    .long -(0x1badb002 + 0x00000003)

%include "common.inc"

KERNEL_CS       = 0x08
KERNEL_DS       = 0x10
MB_MAGIC        = 0x2badb002
MBI_FLAGS       = 0
MBI_MEM_LOWER   = 4
MBI_MEM_UPPER   = 8
MBI_CMDLINE     = 16
MBI_MODS_COUNT  = 20
MBI_MODS_ADDR   = 24
MBI_MMAP_LENGTH = 44
MBI_MMAP_ADDR   = 48
MBI_LOADER_NAME = 64
ONE_MIB         = 0x100000

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

    mov eax, dword ptr [mb_magic]
    mov edx, MB_MAGIC
    EXPECT_EQ "EAX holds the Multiboot magic 0x2BADB002"
    cmp eax, MB_MAGIC
    jne give_up                 ; EBX means nothing then

    mov ebx, dword ptr [mb_info]
    PRINT "INFO: multiboot info at "
    mov eax, ebx
    call puthex
    PRINT ", flags "
    mov eax, dword ptr [ebx + MBI_FLAGS]
    call puthex
    call newline
    test dword ptr [ebx + MBI_FLAGS], 1 << 0
    EXPECT_NZ "flags bit 0: mem_lower/mem_upper valid"
    test dword ptr [ebx + MBI_FLAGS], 1 << 2
    EXPECT_NZ "flags bit 2: cmdline valid"
    test dword ptr [ebx + MBI_FLAGS], 1 << 3
    EXPECT_NZ "flags bit 3: mods valid"
    test dword ptr [ebx + MBI_FLAGS], 1 << 6
    EXPECT_NZ "flags bit 6: mmap valid"

; ---------------------------------------------------------------- memory map
    PRINT "INFO: mem_lower "
    mov eax, dword ptr [ebx + MBI_MEM_LOWER]
    call putdec
    PRINT " KiB, mem_upper "
    mov eax, dword ptr [ebx + MBI_MEM_UPPER]
    call putdec
    PRINT " KiB\r\n"

    ; Walk the map (at most 64 entries, within mmap_length).
    mov esi, dword ptr [ebx + MBI_MMAP_ADDR]
    mov edi, esi
    add edi, dword ptr [ebx + MBI_MMAP_LENGTH]      ; end
    mov ecx, 64
mmap_loop:
    cmp esi, edi
    jae mmap_done
    mov eax, dword ptr [esi]    ; size of the entry, without this field
    cmp eax, 20
    jae mmap_entry_ok
    inc dword ptr [mmap_bad]
    jmp mmap_done
mmap_entry_ok:
    inc dword ptr [mmap_count]
    PRINT "INFO: mmap base "
    mov eax, dword ptr [esi + 8]
    call puthex
    mov eax, dword ptr [esi + 4]
    call puthex_digits
    PRINT " length "
    mov eax, dword ptr [esi + 16]
    call puthex
    mov eax, dword ptr [esi + 12]
    call puthex_digits
    PRINT " type "
    mov eax, dword ptr [esi + 20]
    call putdec
    call newline
    cmp dword ptr [esi + 20], 1             ; available RAM?
    jne mmap_next
    cmp dword ptr [esi + 8], 0              ; below 4 GiB only
    jne mmap_next
    cmp dword ptr [esi + 16], 0
    jne mmap_next
    mov eax, dword ptr [esi + 4]            ; base
    mov edx, eax
    add edx, dword ptr [esi + 12]           ; end
    jc mmap_next
    test eax, eax
    jnz mmap_not_low
    mov dword ptr [low_ram_end], edx
mmap_not_low:
    cmp eax, ONE_MIB
    ja mmap_next
    cmp edx, ONE_MIB
    jbe mmap_next
    mov dword ptr [upper_ram_end], edx      ; the region holding 1 MiB
mmap_next:
    add esi, dword ptr [esi]
    add esi, 4
    dec ecx
    jnz mmap_loop
mmap_done:
    mov eax, dword ptr [mmap_bad]
    xor edx, edx
    EXPECT_EQ "memory map entries are well formed (size >= 20)"
    mov eax, dword ptr [mmap_count]
    mov edx, 2
    EXPECT_AE "memory map has at least two entries"

    ; mem_lower: conventional memory in KiB, at most 640, and covered by the
    ; map's RAM at 0 (give the EBDA's 1 KiB of slack: loaders differ there).
    mov eax, dword ptr [low_ram_end]
    test eax, eax
    EXPECT_NZ "memory map has RAM at address 0"
    mov eax, dword ptr [ebx + MBI_MEM_LOWER]
    cmp eax, 640
    setbe al
    movzx eax, al
    mov edx, 1
    EXPECT_EQ "mem_lower <= 640 KiB"
    mov eax, dword ptr [low_ram_end]
    shr eax, 10
    add eax, 1
    mov edx, dword ptr [ebx + MBI_MEM_LOWER]
    EXPECT_AE "mem_lower is within the RAM the map shows at 0 (+1 KiB)"

    ; mem_upper: KiB of RAM from 1 MiB up to the first hole.  Loaders compute
    ; it from RAM size or from the map; allow 1 MiB either way.
    mov eax, dword ptr [upper_ram_end]
    test eax, eax
    EXPECT_NZ "memory map has RAM at 1 MiB"
    mov eax, dword ptr [upper_ram_end]
    sub eax, ONE_MIB
    shr eax, 10                 ; KiB the map shows above 1 MiB
    mov edx, dword ptr [ebx + MBI_MEM_UPPER]
    add eax, 1024
    EXPECT_AE "mem_upper <= the map's RAM above 1 MiB + 1 MiB"
    mov eax, dword ptr [ebx + MBI_MEM_UPPER]
    add eax, 1024
    mov edx, dword ptr [upper_ram_end]
    sub edx, ONE_MIB
    shr edx, 10
    EXPECT_AE "mem_upper + 1 MiB >= the map's RAM above 1 MiB"

; ---------------------------------------------------------------- command line
    PRINT "INFO: cmdline \""
    mov esi, dword ptr [ebx + MBI_CMDLINE]
    call puts
    PRINT "\"\r\n"
    CMDLINE_HAS "vmlab-mbtest"
    EXPECT_Z "command line contains vmlab-mbtest"
    CMDLINE_HAS "answer=42"
    EXPECT_Z "command line contains answer=42"

    test dword ptr [ebx + MBI_FLAGS], 1 << 9
    jz no_loader_name
    PRINT "INFO: boot loader \""
    mov esi, dword ptr [ebx + MBI_LOADER_NAME]
    call puts
    PRINT "\"\r\n"
no_loader_name:

; ---------------------------------------------------------------- modules
    mov eax, dword ptr [ebx + MBI_MODS_COUNT]
    mov edx, 2
    EXPECT_EQ "two modules"
    cmp dword ptr [ebx + MBI_MODS_COUNT], 2
    jne give_up
    mov esi, dword ptr [ebx + MBI_MODS_ADDR]
    mov edi, module1_arg
    mov edx, module1_text
    call check_module
    add esi, 16
    mov edi, module2_arg
    mov edx, module2_text
    call check_module
    mov esi, dword ptr [ebx + MBI_MODS_ADDR]
    mov eax, dword ptr [esi + 16]           ; module 2 start
    mov edx, dword ptr [esi + 4]            ; module 1 end
    EXPECT_AE "module 2 does not overlap module 1"

give_up:
    DONE

; check_module: ESI -> module entry (mod_start, mod_end, string, reserved),
; EDI -> argument its command line must contain, EDX -> text its file starts
; with (NUL-terminated).
check_module:
    pushad
    mov dword ptr [expected_text], edx
    PRINT "INFO: module "
    mov eax, dword ptr [esi]
    call puthex
    PRINT "-"
    mov eax, dword ptr [esi + 4]
    call puthex
    PRINT " \""
    push esi
    mov esi, dword ptr [esi + 8]
    call puts
    pop esi
    PRINT "\"\r\n"
    mov eax, dword ptr [esi + 4]
    mov edx, dword ptr [esi]
    cmp eax, edx
    seta al
    movzx eax, al
    mov edx, 1
    EXPECT_EQ "module: mod_end > mod_start"
    mov eax, dword ptr [esi]
    and eax, 0xfff
    xor edx, edx
    EXPECT_EQ "module: mod_start is page aligned (header flags bit 0)"
    mov eax, dword ptr [esi]
    mov edx, image_end
    EXPECT_AE "module: placed above the kernel image"
    push esi
    mov esi, dword ptr [esi + 8]
    call str_contains                       ; EDI = argument
    pop esi
    EXPECT_Z "module: command line has its argument"
    ; The file's first bytes are the expected text (bounded by mod_end).
    mov ecx, dword ptr [esi]                ; cursor in the module
    mov ebp, dword ptr [esi + 4]            ; end
    mov edi, dword ptr [expected_text]
    xor eax, eax                            ; mismatches
module_cmp:
    mov dl, byte ptr [edi]
    test dl, dl
    jz module_cmp_done
    cmp ecx, ebp
    jae module_short
    cmp dl, byte ptr [ecx]
    je module_cmp_next
module_short:
    inc eax
    jmp module_cmp_done
module_cmp_next:
    inc ecx
    inc edi
    jmp module_cmp
module_cmp_done:
    xor edx, edx
    EXPECT_EQ "module: content is the file given to the loader"
    popad
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

module1_arg:    .asciz "arg1=one"
module2_arg:    .asciz "arg2=two"
module1_text:   .asciz "vmlab multiboot module one"
module2_text:   .asciz "vmlab multiboot module two"

.balign 8
mmap_count:     .long 0
mmap_bad:       .long 0
low_ram_end:    .long 0
upper_ram_end:  .long 0
expected_text:  .long 0

.balign 16
    .zero 8192
stack_top:
image_end:

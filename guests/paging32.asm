; vmlab-format: multiboot-aout
;
; paging32.asm -- 32-bit paging and PAE paging, checked against Intel SDM Vol. 3A
; chapter 4.  Stays in 32-bit protected mode (own GDT, IDT, TSS); markers are
; written to their physical pages before paging is turned on.
;
; 32-bit paging (4.3, Tables 4-4 to 4-6; CR0.PG, CR4.PAE = 0), identity map
; 0-4 MiB through a page table of user pages:
;   * a 4 KiB page at linear 0xde800000 reads its marker;
;   * CR4.PSE = 0: PDE.PS is ignored (Table 4-5), the PDE is used as a
;     page-table pointer; after CR4.PSE = 1 (and a CR3 reload: MOV to CR4 does
;     not flush for PSE, 4.10.4.1) the same PDE maps a 4 MiB page (Table 4-4) at
;     0xb3c00000 -> physical 0x400000; A then D set in that PDE by a read and a
;     write (4.8);
;   * rights (4.6.1) and #PF error codes (4.7): ring-3 read of a supervisor page
;     -> 5, ring-3 read of a 4 MiB supervisor page -> 5, ring-3 write to a
;     read-only user page -> 7 (the read works), supervisor write to a read-only
;     page: allowed with CR0.WP = 0, error 3 with WP = 1; not-present PDE (user
;     read, 4) and PTE (supervisor write, 2); CR2 each time.
; PAE paging (4.4, Tables 4-8 to 4-11; CR4.PAE = 1, CR3 -> 4 PDPTEs, 4.4.1):
;   * each PDPTE is used: identity map (PDPTE 0, 2 MiB user pages), a 4 KiB page
;     at 0x7f654000 (PDPTE 1), a 2 MiB page at 0xa5a00000 -> 0x400000 (PDPTE 2),
;     the code page at 0xc0de0000 (PDPTE 3), each reading its marker;
;   * ring-3 read of the 2 MiB supervisor page -> 5; not-present PDE -> 2;
;     bit MAXPHYADDR set in a PTE -> RSVD (4.4.2);
;   * execute disable (4.6.2, EFER.NXE, CPUID.80000001H:EDX.NX[20]): the code
;     page runs until its PTE gets XD (bit 63), then the fetch faults with error
;     code 0x11 (P | I/D), CR2 = saved EIP = the target.
;
; QEMU 7.2 TCG: a reserved-bit #PF has RSVD without P (8, the SDM says 9; see
; guests/README.md): the RSVD check accepts both and prints the value.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS   = 0x08
KERNEL_DS   = 0x10
USER_CS     = 0x18 | 3
USER_DS     = 0x20 | 3
TSS32_SEL   = 0x28
EFER        = 0xc0000080

; 32-bit paging
VA_PT32     = 0xde800000        ; PDE 0x37a -> pt_t
PDE_PT32    = 0x37a
VA_NPDE32   = 0xdec00345        ; PDE 0x37b: not present
VA_4M       = 0xb3c00000        ; PDE 0x2cf: 4 MiB page -> 0x400000
PDE_4M      = 0x2cf
PHYS_4M     = 0x400000
OFF_4M      = 0x2a5678          ; marker offset in the 4 MiB page
OFF_PSE0    = 0x2a5128          ; PSE = 0: PT at 0x400000, index 0x2a5, offset 0x128

; pt_t slots (VA = VA_PT32 + slot * 0x1000)
S_M4K = 0                       ; marker page, supervisor RW
S_SUP = 1                       ; supervisor RW
S_ROU = 2                       ; user read-only
S_ROS = 3                       ; supervisor read-only
S_NP  = 4                       ; not present

; PAE paging
VA_P4K      = 0x7f654000        ; PDPTE 1, PD 0x1fb, PT 0x54
PD_P4K      = 0x1fb
PT_P4K      = 0x54
PT_PRSVD    = 0x55              ; next PTE: bit MAXPHYADDR set
VA_PRSVD    = 0x7f655000
VA_P2M      = 0xa5a00000        ; PDPTE 2, PD 0x12d: 2 MiB page -> 0x400000
PD_P2M      = 0x12d
OFF_2M      = 0x1ab0f8
VA_PNP      = 0xa5c00010        ; PDPTE 2, PD 0x12e: not present
VA_PNX      = 0xc0de0000        ; PDPTE 3, PD 6, PT 0x1e0
PD_PNX      = 6
PT_PNX      = 0x1e0

MOFF    = 0x128                 ; marker offset in 4 KiB pages
MARK_4K = 0x344b0001
MARK_4M = 0x344d0002
MARK_2M = 0x324d0003
MARK_RU = 0x52550004
MARK_P4 = 0x50344b05

_start:
    cli
    cld
    mov esp, kstack_top
    call serial_init
    lgdt [gdtr]
    ljmp KERNEL_CS:reload_segments
reload_segments:
    call reload_data_segs
    mov eax, KERNEL_DS
    mov ss, eax
    call pic_init
    call idt32_init

    mov edi, gdt + TSS32_SEL
    mov eax, tss32
    call set_tss_desc
    mov dword ptr [tss32 + 4], tss_stack_top     ; ESP0
    mov dword ptr [tss32 + 8], KERNEL_DS         ; SS0
    mov word ptr [tss32 + 0x66], 0x68
    mov eax, TSS32_SEL
    ltr ax

    mov eax, 0x80000000
    cpuid
    mov dword ptr [max_ext], eax
    mov dword ptr [ext1_edx], 0
    cmp eax, 0x80000001
    jb cpuid_ext1_done
    mov eax, 0x80000001
    cpuid
    mov dword ptr [ext1_edx], edx
cpuid_ext1_done:
    mov dword ptr [maxphy], 36
    cmp dword ptr [max_ext], 0x80000008
    jb cpuid_done
    mov eax, 0x80000008
    cpuid
    and eax, 0xff
    mov dword ptr [maxphy], eax
cpuid_done:

    ; Markers, physical addresses (paging is off).
    mov dword ptr [page_m4k + MOFF], MARK_4K
    mov dword ptr [page_rou + MOFF], MARK_RU
    mov dword ptr [page_p4k + MOFF], MARK_P4
    mov edi, PHYS_4M + OFF_4M
    mov dword ptr [edi], MARK_4M
    mov edi, PHYS_4M + OFF_2M
    mov dword ptr [edi], MARK_2M
    ; The page at 0x400000 doubles as a page table while CR4.PSE = 0: its entry
    ; 0x2a5 -> page_m4k.
    mov edi, PHYS_4M + ((OFF_PSE0 >> 12) * 4)
    mov eax, page_m4k + 1
    mov dword ptr [edi], eax
    ; page_nx: mov eax, 0x600d; ret
    mov dword ptr [page_nx], 0x00600db8
    mov word ptr [page_nx + 4], 0xc300

; ================================================================ 32-bit paging
    ; Identity map 0-4 MiB, user RW 4 KiB pages.
    mov edi, pt_id
    mov eax, 7
pt_id_fill:
    mov dword ptr [edi], eax
    add edi, 4
    add eax, 0x1000
    cmp edi, pt_id + 4096
    jb pt_id_fill
    mov edi, page_dir
    mov eax, pt_id + 7
    mov dword ptr [edi], eax
    mov eax, pt_t + 7
    mov dword ptr [edi + PDE_PT32 * 4], eax
    mov eax, PHYS_4M + 0x83                     ; P | RW | PS, supervisor
    mov dword ptr [edi + PDE_4M * 4], eax
    mov edi, pt_t
    mov eax, page_m4k + 3
    mov dword ptr [edi + S_M4K * 4], eax
    mov eax, page_sup + 3
    mov dword ptr [edi + S_SUP * 4], eax
    mov eax, page_rou + 5                       ; P | US, read-only
    mov dword ptr [edi + S_ROU * 4], eax
    mov eax, page_ros + 1                       ; P, read-only, supervisor
    mov dword ptr [edi + S_ROS * 4], eax

    mov eax, cr4
    and eax, 0xffffffcf         ; PSE = 0, PAE = 0
    mov cr4, eax
    mov eax, page_dir
    mov cr3, eax
    mov eax, cr0
    and eax, 0xfffeffff         ; WP = 0
    or eax, 0x80000000          ; PG
    mov cr0, eax
    PASS "32-bit paging on (CR0.PG, CR4.PAE = 0, CR4.PSE = 0)"

    mov eax, dword ptr [VA_PT32 + MOFF]
    mov edx, MARK_4K
    EXPECT_EQ "32-bit paging, 4 KiB page: marker at 0xde800128"

    mov eax, dword ptr [VA_4M + OFF_PSE0]
    mov edx, MARK_4K
    EXPECT_EQ "CR4.PSE = 0: PDE.PS ignored, the PDE points to a page table"

    mov eax, cr4
    or eax, 0x10                ; PSE
    mov cr4, eax
    mov eax, cr3
    mov cr3, eax
    mov edi, page_dir
    and dword ptr [edi + PDE_4M * 4], 0xffffff9f   ; A = D = 0
    mov eax, dword ptr [VA_4M + OFF_4M]
    mov edx, MARK_4M
    EXPECT_EQ "CR4.PSE = 1: 4 MiB page, marker at offset 0x2a5678 of 0x400000"
    mov eax, dword ptr [edi + PDE_4M * 4]
    and eax, 0x60
    mov edx, 0x20
    EXPECT_EQ "4 MiB page: a read sets PDE.A, not PDE.D"
    mov dword ptr [VA_4M + 0x10], 1
    mov eax, dword ptr [edi + PDE_4M * 4]
    and eax, 0x60
    mov edx, 0x60
    EXPECT_EQ "4 MiB page: a write sets PDE.D"

; ---------------------------------------------------------------- rights
    mov ebx, VA_PT32 + (S_SUP * 0x1000) + 0x20
    TRY us_sup_done
    mov eax, user_read
    call enter_user
us_sup_done:
    ENDTRY
    call reload_data_segs
    mov edx, 14
    EXPECT_EQ "ring 3 read of a supervisor 4 KiB page raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 5
    EXPECT_EQ "ring 3 read of a supervisor 4 KiB page: error code 5 (P | U)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "ring 3 read of a supervisor 4 KiB page: CR2"

    mov ebx, VA_4M + 0x123454
    TRY us_4m_done
    mov eax, user_read
    call enter_user
us_4m_done:
    ENDTRY
    call reload_data_segs
    mov edx, 14
    EXPECT_EQ "ring 3 read of a supervisor 4 MiB page raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 5
    EXPECT_EQ "ring 3 read of a supervisor 4 MiB page: error code 5 (P | U)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "ring 3 read of a supervisor 4 MiB page: CR2"

    mov ebx, VA_PT32 + (S_ROU * 0x1000) + MOFF
    mov dword ptr [scratch], 0
    TRY us_ro_done
    mov eax, user_read_write
    call enter_user
us_ro_done:
    ENDTRY
    call reload_data_segs
    mov edx, 14
    EXPECT_EQ "ring 3 write to a read-only user page raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 7
    EXPECT_EQ "ring 3 write to a read-only user page: error code 7 (P | W | U)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "ring 3 write to a read-only user page: CR2"
    mov eax, dword ptr [scratch]
    mov edx, MARK_RU
    EXPECT_EQ "ring 3 read of the read-only user page worked first"

    mov ebx, VA_PT32 + (S_ROS * 0x1000) + MOFF
    TRY wp0_done
    mov dword ptr [ebx], 0x5a5a
wp0_done:
    ENDTRY
    mov edx, 0xffffffff
    EXPECT_EQ "CR0.WP = 0: supervisor write to a read-only page does not fault"
    mov eax, dword ptr [page_ros + MOFF]
    mov edx, 0x5a5a
    EXPECT_EQ "CR0.WP = 0: the write reached the page"
    mov eax, cr0
    or eax, 0x10000
    mov cr0, eax
    invlpg [ebx]
    TRY wp1_done
    mov dword ptr [ebx], 0x6b6b
wp1_done:
    ENDTRY
    mov edx, 14
    EXPECT_EQ "CR0.WP = 1: supervisor write to a read-only page raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 3
    EXPECT_EQ "CR0.WP = 1: error code 3 (P | W)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "CR0.WP = 1: CR2"
    mov eax, dword ptr [page_ros + MOFF]
    mov edx, 0x5a5a
    EXPECT_EQ "CR0.WP = 1: the page is unchanged"

    mov ebx, VA_NPDE32
    TRY npde_done
    mov eax, user_read
    call enter_user
npde_done:
    ENDTRY
    call reload_data_segs
    mov edx, 14
    EXPECT_EQ "not-present PDE: ring 3 read raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 4
    EXPECT_EQ "not-present PDE: error code 4 (U)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "not-present PDE: CR2"

    mov ebx, VA_PT32 + (S_NP * 0x1000) + 0x44
    TRY npte_done
    mov dword ptr [ebx], 1
npte_done:
    ENDTRY
    mov edx, 14
    EXPECT_EQ "not-present PTE: supervisor write raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 2
    EXPECT_EQ "not-present PTE: error code 2 (W)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "not-present PTE: CR2"

; ================================================================ PAE paging
    ; PDPTE 0 -> identity PD (2 MiB user pages 0-4 MiB), 1 -> 4 KiB test page,
    ; 2 -> 2 MiB test page, 3 -> code page.  PDPTEs hold only P (and the
    ; address): bits 2:1 and 8:5 are reserved (Table 4-8).
    mov edi, pdpt_pae
    mov eax, pd_pae0 + 1
    mov dword ptr [edi], eax
    mov eax, pd_pae1 + 1
    mov dword ptr [edi + 8], eax
    mov eax, pd_pae2 + 1
    mov dword ptr [edi + 16], eax
    mov eax, pd_pae3 + 1
    mov dword ptr [edi + 24], eax
    mov dword ptr [pd_pae0], 0x000087           ; P | RW | US | PS
    mov dword ptr [pd_pae0 + 8], 0x200087
    mov edi, pd_pae1
    mov eax, pt_pae1 + 7
    mov dword ptr [edi + PD_P4K * 8], eax
    mov edi, pt_pae1
    mov eax, page_p4k + 3
    mov dword ptr [edi + PT_P4K * 8], eax
    mov eax, page_p4k + 3                       ; + bit MAXPHYADDR below
    mov dword ptr [edi + PT_PRSVD * 8], eax
    mov edi, pd_pae2
    mov eax, PHYS_4M + 0x83                     ; 2 MiB, supervisor
    mov dword ptr [edi + PD_P2M * 8], eax
    mov edi, pd_pae3
    mov eax, pt_pae3 + 7
    mov dword ptr [edi + PD_PNX * 8], eax
    mov edi, pt_pae3
    mov eax, page_nx + 3
    mov dword ptr [edi + PT_PNX * 8], eax

    mov eax, cr0
    and eax, 0x7fffffff         ; paging off to change the paging mode
    mov cr0, eax
    mov eax, cr4
    or eax, 0x20                ; PAE
    mov cr4, eax
    mov eax, pdpt_pae
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    PASS "PAE paging on (CR4.PAE, CR3 -> 4 PDPTEs)"

    mov eax, dword ptr [pd_pae0]
    and eax, 0x20
    mov edx, 0x20
    EXPECT_EQ "PAE, PDPTE 0: identity 2 MiB page in use (PDE.A set)"
    mov eax, dword ptr [VA_P4K + MOFF]
    mov edx, MARK_P4
    EXPECT_EQ "PAE, PDPTE 1: 4 KiB page, marker at 0x7f654128"
    mov eax, dword ptr [VA_P2M + OFF_2M]
    mov edx, MARK_2M
    EXPECT_EQ "PAE, PDPTE 2: 2 MiB page, marker at offset 0x1ab0f8 of 0x400000"
    movzx eax, byte ptr [VA_PNX]
    mov edx, 0xb8
    EXPECT_EQ "PAE, PDPTE 3: 4 KiB page at 0xc0de0000 reads the code page"

    mov ebx, VA_P2M + 0x1000
    TRY pus_done
    mov eax, user_read
    call enter_user
pus_done:
    ENDTRY
    call reload_data_segs
    mov edx, 14
    EXPECT_EQ "PAE: ring 3 read of a supervisor 2 MiB page raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 5
    EXPECT_EQ "PAE: ring 3 read of a supervisor 2 MiB page: error code 5 (P | U)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "PAE: ring 3 read of a supervisor 2 MiB page: CR2"

    mov ebx, VA_PNP
    TRY pnp_done
    mov dword ptr [ebx], 1
pnp_done:
    ENDTRY
    mov edx, 14
    EXPECT_EQ "PAE: not-present PDE, supervisor write raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 2
    EXPECT_EQ "PAE: not-present PDE: error code 2 (W)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "PAE: not-present PDE: CR2"

    mov ecx, dword ptr [maxphy]
    cmp ecx, 51
    jbe prsvd_bit_ok
    mov ecx, 51
prsvd_bit_ok:
    sub ecx, 32
    mov eax, 1
    shl eax, cl
    mov edi, pt_pae1
    or dword ptr [edi + (PT_PRSVD * 8) + 4], eax
    mov ebx, VA_PRSVD + MOFF
    TRY prsvd_done
    mov eax, dword ptr [ebx]
prsvd_done:
    ENDTRY
    mov edx, 14
    EXPECT_EQ "PAE: PTE bit MAXPHYADDR set, read raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, eax
    and edx, 1
    or edx, 8
    EXPECT_EQ "PAE: PTE bit MAXPHYADDR set: error code has RSVD, not W/U/I (SDM 9, QEMU 8)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "PAE: PTE bit MAXPHYADDR set: CR2"

    bt dword ptr [ext1_edx], 20
    jc nx_reported
    FAIL "CPUID.80000001H:EDX.NX[bit 20] is not reported"
    jmp nx_end
nx_reported:
    mov ecx, EFER
    rdmsr
    or eax, 0x800               ; NXE
    wrmsr
    mov ebx, VA_PNX
    xor eax, eax
    call ebx                    ; mov eax, 0x600d; ret
    mov edx, 0x600d
    EXPECT_EQ "PAE, EFER.NXE = 1, PTE.XD = 0: code on the page runs"
    mov edi, pt_pae3
    or dword ptr [edi + (PT_PNX * 8) + 4], 0x80000000      ; XD (bit 63)
    invlpg [ebx]
    TRY nx_done
    call ebx
nx_done:
    ENDTRY
    mov edx, 14
    EXPECT_EQ "PAE, PTE.XD = 1: fetch raises #PF"
    mov eax, dword ptr [caught_err]
    mov edx, 0x11
    EXPECT_EQ "PAE, PTE.XD = 1: error code 0x11 (P | I/D)"
    mov eax, dword ptr [caught_cr2]
    mov edx, ebx
    EXPECT_EQ "PAE, PTE.XD = 1: CR2 is the fetch target"
    mov eax, dword ptr [caught_eip]
    mov edx, ebx
    EXPECT_EQ "PAE, PTE.XD = 1: saved EIP is the fetch target"
nx_end:

    DONE

; ================================================================ helpers
reload_data_segs:
    push eax
    mov eax, KERNEL_DS
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    pop eax
    ret

; enter_user: IRETD to ring 3 at EAX on ustack_top (IF = 0), EBX kept.  The
; ring-3 code ends with a fault (caught by a TRY) or ud2 (caught as #UD).
enter_user:
    push USER_DS
    mov ecx, ustack_top
    push ecx
    push 0x2
    push USER_CS
    push eax
    iretd

; Ring-3 code (IRETD to ring 3 nulled the DPL 0 data segments).
user_read:
    mov eax, USER_DS
    mov ds, eax
    mov eax, dword ptr [ebx]
    ud2
user_read_write:
    mov eax, USER_DS
    mov ds, eax
    mov eax, dword ptr [ebx]
    mov dword ptr [scratch], eax
    mov dword ptr [ebx], eax
    ud2

; ================================================================ data
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 kernel code
    .quad 0x00cf92000000ffff    ; 0x10 kernel data
    .quad 0x00cffa000000ffff    ; 0x18 user code, DPL 3
    .quad 0x00cff2000000ffff    ; 0x20 user data, DPL 3
    .quad 0                     ; 0x28 TSS (filled in at run time)
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.balign 8
max_ext:    .long 0
ext1_edx:   .long 0
maxphy:     .long 0
scratch:    .long 0

.balign 16
tss32:  .zero 104

.balign 4096
page_dir:   .zero 4096
pt_id:      .zero 4096
pt_t:       .zero 4096
pdpt_pae:   .zero 4096
pd_pae0:    .zero 4096
pd_pae1:    .zero 4096
pd_pae2:    .zero 4096
pd_pae3:    .zero 4096
pt_pae1:    .zero 4096
pt_pae3:    .zero 4096
page_m4k:   .zero 4096
page_sup:   .zero 4096
page_rou:   .zero 4096
page_ros:   .zero 4096
page_p4k:   .zero 4096
page_nx:    .zero 4096
            .zero 4096
kstack_top:
            .zero 4096
tss_stack_top:
            .zero 4096
ustack_top:
image_end:

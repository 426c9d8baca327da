; vmlab-format: multiboot-aout
;
; tasks.asm -- hardware task switching (Intel SDM Vol. 3A chapter 8), 32-bit
; protected mode with 32-bit TSSs (Figure 8-2):
;   * JMP far to a TSS descriptor (8.3): the new task's registers come from its
;     TSS, the old task's busy bit is cleared and the new one's set, NT is not
;     set, CR0.TS is set (2.5), the old task's EIP is saved after the JMP and
;     a JMP back resumes it with its registers;
;   * CALL far to a task gate in the GDT (8.3, 8.4): the new task's previous
;     task link holds the caller's TR, NT = 1, the caller stays busy; IRET
;     with NT = 1 returns to it and clears the callee's busy bit (8.4.2);
;   * CALL far to a TSS descriptor (nested, as through a gate) and JMP far
;     through a task gate (not nested: the old task is no longer busy);
;   * INT n through a task gate in the IDT (6.12.2): a nested task, as CALL;
;   * the checks of Table 8-2 and the instructions' pseudo-code: JMP to the
;     busy TSS -> #GP(selector); a TSS limit below 67H -> #TS(selector); a
;     task gate to a not-present TSS -> #NP(selector); INT n through a task
;     gate to such a TSS or to a busy one: #TS / #GP(selector) with the saved
;     EIP at the INT; IRET with NT = 1 whose back link names an available TSS
;     -> #TS(selector);
;   * the TSS's CR3 field is loaded (paging on): a task with its own page
;     directory sees its own page at the same linear address, and back;
;   * the classic double-fault handler: a #PF whose delivery overflows the
;     kernel stack into an unmapped guard page is a #DF (Table 6-5), delivered
;     through a task gate to a task with a good stack; the error code 0 is on
;     the new task's stack (6.12.2), the back link and the old task's saved
;     EIP/ESP tell where it happened.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS   = 0x08
KERNEL_DS   = 0x10
TSS_A       = 0x18              ; the main task
TSS_B       = 0x20              ; JMP target
TSS_C       = 0x28              ; CALL target (through GATE_C)
GATE_C      = 0x30              ; task gate -> TSS_C
TSS_D       = 0x38              ; INT 0x40 target (IDT task gate)
TSS_DF      = 0x40              ; double-fault task
TSS_SMALL   = 0x48              ; limit 0x60: too small
TSS_NP      = 0x50              ; not present
GATE_NP     = 0x58              ; task gate -> TSS_NP
MAGIC_B     = 0x7a5cb00b
MARK_VA     = 0x00300000        ; one linear page, two physical pages
MARK1       = 0x11112222
MARK2       = 0x33334444
NT          = 0x4000

; make_tss: EDI -> TSS, EAX = EIP, EBX = ESP; flat ring-0 segments, IF = 0.
make_tss:
    push eax
    push ecx
    push edi
    push eax
    xor eax, eax
    mov ecx, 26
    rep stosd
    pop eax
    pop edi
    mov dword ptr [edi + 0x20], eax
    mov dword ptr [edi + 0x24], 2
    mov dword ptr [edi + 0x38], ebx
    mov dword ptr [edi + 0x48], KERNEL_DS
    mov dword ptr [edi + 0x4c], KERNEL_CS
    mov dword ptr [edi + 0x50], KERNEL_DS
    mov dword ptr [edi + 0x54], KERNEL_DS
    mov dword ptr [edi + 0x58], KERNEL_DS
    mov dword ptr [edi + 0x5c], KERNEL_DS
    mov word ptr [edi + 0x66], 0x68
    pop ecx
    pop eax
    ret

; busy: ZF = 0 if the TSS descriptor at GDT offset EAX is busy (type 0xB).
busy:
    test byte ptr [gdt + eax + 5], 2
    ret

_start:
    cli
    cld
    mov esp, stack_a
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init

    ; TSS descriptors (set_tss_desc: type 9, limit 0x67).
    mov edi, gdt + TSS_A
    mov eax, tss_a
    call set_tss_desc
    mov edi, gdt + TSS_B
    mov eax, tss_b
    call set_tss_desc
    mov edi, gdt + TSS_C
    mov eax, tss_c
    call set_tss_desc
    mov edi, gdt + TSS_D
    mov eax, tss_d
    call set_tss_desc
    mov edi, gdt + TSS_DF
    mov eax, tss_df
    call set_tss_desc
    mov edi, gdt + TSS_SMALL
    mov eax, tss_small
    call set_tss_desc
    mov byte ptr [gdt + TSS_SMALL], 0x60
    mov edi, gdt + TSS_NP
    mov eax, tss_small
    call set_tss_desc
    mov byte ptr [gdt + TSS_NP + 5], 0x09       ; P = 0
    mov edi, tss_a
    mov eax, 0
    mov ebx, 0
    call make_tss
    mov edi, tss_b
    mov eax, task_b
    mov ebx, stack_b
    call make_tss
    mov dword ptr [tss_b + 0x28], MAGIC_B       ; EAX of task B
    mov edi, tss_c
    mov eax, task_c
    mov ebx, stack_c
    call make_tss
    mov edi, tss_d
    mov eax, task_d
    mov ebx, stack_d
    call make_tss
    mov edi, tss_small
    mov eax, task_d
    mov ebx, stack_d
    call make_tss
    ; IDT task gates: 0x40 -> TSS_D, 0x41 -> TSS_SMALL, 0x42 -> TSS_A (busy).
    lea edi, [idt32_table + 0x40 * 8]
    mov dword ptr [edi], TSS_D << 16
    mov dword ptr [edi + 4], 0x8500
    mov dword ptr [edi + 8], TSS_SMALL << 16
    mov dword ptr [edi + 12], 0x8500
    mov dword ptr [edi + 16], TSS_A << 16
    mov dword ptr [edi + 20], 0x8500
    mov eax, TSS_A
    ltr ax

    ; ------------------------------------------------ JMP to a TSS
    mov ebx, 0x0b0b0b0b
    mov esi, 0x5151e5e5
    clts
    .byte 0xea
    .long 0
    .word TSS_B
after_jmp:
    mov eax, ebx
    mov edx, 0x0b0b0b0b
    EXPECT_EQ "JMP back to the first task restores its EBX"
    mov eax, esi
    mov edx, 0x5151e5e5
    EXPECT_EQ "... and its ESI"
    mov eax, dword ptr [b_eax]
    mov edx, MAGIC_B
    EXPECT_EQ "the JMP target task starts with EAX from its TSS"
    mov eax, dword ptr [b_tr]
    mov edx, TSS_B
    EXPECT_EQ "STR in the JMP target task"
    mov eax, dword ptr [b_flags]
    and eax, NT
    mov edx, 0
    EXPECT_EQ "JMP to a task leaves NT clear"
    mov eax, dword ptr [b_busy_a]
    mov edx, 0
    EXPECT_EQ "JMP clears the old task's busy bit"
    mov eax, dword ptr [b_busy_b]
    mov edx, 2
    EXPECT_EQ "JMP sets the new task's busy bit"
    mov eax, dword ptr [b_cr0]
    and eax, 8
    mov edx, 8
    EXPECT_EQ "a task switch sets CR0.TS"
    mov eax, dword ptr [tss_a + 0x20]
    mov edx, after_jmp
    EXPECT_EQ "the old task's TSS holds the EIP after the JMP"
    mov eax, TSS_B
    call busy
    EXPECT_Z "JMP back clears the busy bit of the task left"
    str ax
    movzx eax, ax
    mov edx, TSS_A
    EXPECT_EQ "STR after the JMP back"
    clts

    ; ------------------------------------------------ CALL through a task gate, IRET
    pushfd
    and dword ptr [esp], ~NT
    popfd
    .byte 0x9a
    .long 0
    .word GATE_C
after_call:
    mov eax, dword ptr [c_link]
    mov edx, TSS_A
    EXPECT_EQ "CALL: the new task's previous task link is the caller's TR"
    mov eax, dword ptr [c_flags]
    and eax, NT
    mov edx, NT
    EXPECT_EQ "CALL: NT = 1 in the called task"
    mov eax, dword ptr [c_busy_a]
    mov edx, 2
    EXPECT_EQ "CALL: the caller stays busy"
    mov eax, dword ptr [c_tr]
    mov edx, TSS_C
    EXPECT_EQ "STR in the task called through a task gate"
    pushfd
    pop eax
    and eax, NT
    mov edx, 0
    EXPECT_EQ "IRET back: the caller's NT is 0"
    mov eax, TSS_C
    call busy
    EXPECT_Z "IRET clears the busy bit of the task it leaves"
    mov eax, TSS_A
    call busy
    EXPECT_NZ "IRET back: the caller is still busy"
    clts

    ; ------------------------------------------------ CALL to a TSS descriptor, JMP through a task gate
    mov edi, tss_c
    mov eax, task_c2
    mov ebx, stack_c
    call make_tss
    .byte 0x9a
    .long 0
    .word TSS_C
    mov eax, dword ptr [c2_link]
    mov edx, TSS_A
    EXPECT_EQ "CALL to a TSS descriptor: the back link is the caller's TR"
    mov eax, dword ptr [c2_flags]
    and eax, NT
    mov edx, NT
    EXPECT_EQ "CALL to a TSS descriptor: NT = 1 in the called task"
    mov eax, TSS_C
    call busy
    EXPECT_Z "... and IRET back clears its busy bit"
    mov edi, tss_c
    mov eax, task_c3
    mov ebx, stack_c
    call make_tss
    .byte 0xea
    .long 0
    .word GATE_C
    mov eax, dword ptr [c3_tr]
    mov edx, TSS_C
    EXPECT_EQ "JMP through a task gate: STR in the new task"
    mov eax, dword ptr [c3_busy_a]
    mov edx, 0
    EXPECT_EQ "JMP through a task gate: the old task is not busy"
    mov eax, dword ptr [c3_flags]
    and eax, NT
    mov edx, 0
    EXPECT_EQ "JMP through a task gate: NT = 0"
    clts

    ; ------------------------------------------------ INT n through an IDT task gate
    mov ebx, 0x12344321
    int 0x40
after_int:
    mov eax, ebx
    mov edx, 0x12344321
    EXPECT_EQ "INT through a task gate returns with EBX restored"
    mov eax, dword ptr [d_link]
    mov edx, TSS_A
    EXPECT_EQ "INT through a task gate: the previous task link"
    mov eax, dword ptr [d_flags]
    and eax, NT
    mov edx, NT
    EXPECT_EQ "INT through a task gate: NT = 1 in the interrupt task"
    mov eax, dword ptr [d_tr]
    mov edx, TSS_D
    EXPECT_EQ "STR in the interrupt task"
    mov eax, dword ptr [d_eip]
    mov edx, after_int
    EXPECT_EQ "the interrupted task's TSS holds the EIP after the INT"
    mov eax, TSS_D
    call busy
    EXPECT_Z "IRET from the interrupt task clears its busy bit"
    clts

    ; ------------------------------------------------ faults of task switches
    TRY f1
    .byte 0xea
    .long 0
    .word TSS_A
f1: ENDTRY
    mov edx, 13
    EXPECT_EQ "JMP to the busy (current) TSS raises #GP"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_A
    EXPECT_EQ "... with the TSS selector as error code"

    TRY f2
    .byte 0xea
    .long 0
    .word TSS_SMALL
f2: ENDTRY
    mov edx, 10
    EXPECT_EQ "JMP to a TSS with a limit below 67H raises #TS"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_SMALL
    EXPECT_EQ "... with the TSS selector as error code"

    TRY f3
    .byte 0x9a
    .long 0
    .word GATE_NP
f3: ENDTRY
    mov edx, 11
    EXPECT_EQ "CALL through a task gate to a not-present TSS raises #NP"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_NP
    EXPECT_EQ "... with the TSS selector as error code"

    TRY f4
int41:
    int 0x41
f4: ENDTRY
    mov edx, 10
    EXPECT_EQ "INT through a task gate to a TSS below 67H raises #TS"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_SMALL
    EXPECT_EQ "... error code: the TSS selector (EXT = 0)"
    mov eax, dword ptr [caught_eip]
    mov edx, int41
    EXPECT_EQ "... saved EIP at the INT"

    TRY f5
    int 0x42
f5: ENDTRY
    mov edx, 13
    EXPECT_EQ "INT through a task gate to the busy TSS raises #GP"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_A
    EXPECT_EQ "... with the TSS selector as error code"

    mov word ptr [tss_a], TSS_B                ; back link to an available TSS
    TRY f6
    pushfd
    or dword ptr [esp], NT
    popfd
    iretd
f6: ENDTRY
    mov edx, 10
    EXPECT_EQ "IRET with NT = 1 to a task that is not busy raises #TS"
    mov eax, dword ptr [caught_err]
    mov edx, TSS_B
    EXPECT_EQ "... with the back link as error code"
    pushfd
    and dword ptr [esp], ~NT
    popfd

    ; ------------------------------------------------ CR3 from the TSS
    ; page_dir/pt0: identity 0-4 MiB, MARK_VA -> page_m1, guard page absent;
    ; page_dir2/pt1: the same with MARK_VA -> page_m2.
    mov dword ptr [page_m1], MARK1
    mov dword ptr [page_m2], MARK2
    xor ecx, ecx
map_loop:
    mov eax, ecx
    shl eax, 12
    or eax, 3
    mov dword ptr [pt0 + ecx*4], eax
    mov dword ptr [pt1 + ecx*4], eax
    inc ecx
    cmp ecx, 1024
    jb map_loop
    mov eax, page_m1
    or eax, 3
    mov dword ptr [pt0 + (MARK_VA >> 12) * 4], eax
    mov eax, page_m2
    or eax, 3
    mov dword ptr [pt1 + (MARK_VA >> 12) * 4], eax
    mov eax, guard
    shr eax, 12
    mov dword ptr [pt0 + eax*4], 0
    mov dword ptr [pt1 + eax*4], 0
    mov eax, pt0
    or eax, 3
    mov dword ptr [page_dir], eax
    mov eax, pt1
    or eax, 3
    mov dword ptr [page_dir2], eax
    mov eax, page_dir
    mov cr3, eax
    mov dword ptr [tss_a + 0x1c], eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov eax, dword ptr [MARK_VA]
    mov edx, MARK1
    EXPECT_EQ "paging on: the first task's page"
    mov edi, tss_b
    mov eax, task_b2
    mov ebx, stack_b
    call make_tss
    mov dword ptr [tss_b + 0x1c], page_dir2
    .byte 0xea
    .long 0
    .word TSS_B
after_jmp2:
    mov eax, dword ptr [b2_cr3]
    mov edx, page_dir2
    EXPECT_EQ "the JMP target task runs on the CR3 of its TSS"
    mov eax, dword ptr [b2_mark]
    mov edx, MARK2
    EXPECT_EQ "... and sees its own page at the same linear address"
    mov eax, cr3
    mov edx, page_dir
    EXPECT_EQ "JMP back: the first task's CR3 again"
    mov eax, dword ptr [MARK_VA]
    mov edx, MARK1
    EXPECT_EQ "... and its own page"
    clts

    ; ------------------------------------------------ double fault through a task gate
    mov edi, tss_df
    mov eax, task_df
    mov ebx, stack_df
    call make_tss
    mov dword ptr [tss_df + 0x1c], page_dir
    mov dword ptr [idt32_table + 8 * 8], TSS_DF << 16
    mov dword ptr [idt32_table + 8 * 8 + 4], 0x8500
    mov esp, guard + 0x1000                    ; the stack runs into the guard page
df_fault:
    mov eax, dword ptr [guard]                 ; #PF; pushing its frame: #PF -> #DF
    FAIL "no double fault"
    DONE

; ---------------------------------------------------------------- the other tasks
task_b:
    mov dword ptr [b_eax], eax
    str ax
    movzx eax, ax
    mov dword ptr [b_tr], eax
    pushfd
    pop dword ptr [b_flags]
    movzx eax, byte ptr [gdt + TSS_A + 5]
    and eax, 2
    mov dword ptr [b_busy_a], eax
    movzx eax, byte ptr [gdt + TSS_B + 5]
    and eax, 2
    mov dword ptr [b_busy_b], eax
    mov eax, cr0
    mov dword ptr [b_cr0], eax
    .byte 0xea
    .long 0
    .word TSS_A

task_c:
    str ax
    movzx eax, ax
    mov dword ptr [c_tr], eax
    pushfd
    pop dword ptr [c_flags]
    movzx eax, word ptr [tss_c]
    mov dword ptr [c_link], eax
    movzx eax, byte ptr [gdt + TSS_A + 5]
    and eax, 2
    mov dword ptr [c_busy_a], eax
    iretd

task_c2:
    pushfd
    pop dword ptr [c2_flags]
    movzx eax, word ptr [tss_c]
    mov dword ptr [c2_link], eax
    iretd

task_c3:
    str ax
    movzx eax, ax
    mov dword ptr [c3_tr], eax
    pushfd
    pop dword ptr [c3_flags]
    movzx eax, byte ptr [gdt + TSS_A + 5]
    and eax, 2
    mov dword ptr [c3_busy_a], eax
    .byte 0xea
    .long 0
    .word TSS_A

task_d:
    str ax
    movzx eax, ax
    mov dword ptr [d_tr], eax
    pushfd
    pop dword ptr [d_flags]
    movzx eax, word ptr [tss_d]
    mov dword ptr [d_link], eax
    mov eax, dword ptr [tss_a + 0x20]
    mov dword ptr [d_eip], eax
    iretd

task_b2:
    mov eax, cr3
    mov dword ptr [b2_cr3], eax
    mov eax, dword ptr [MARK_VA]
    mov dword ptr [b2_mark], eax
    .byte 0xea
    .long 0
    .word TSS_A

task_df:
    PASS "#PF overflowing the stack became #DF, delivered through a task gate"
    pop eax
    mov edx, 0
    EXPECT_EQ "#DF task: error code 0 on the new task's stack"
    mov eax, esp
    mov edx, stack_df
    EXPECT_EQ "#DF task: ESP from its TSS (the error code popped)"
    str ax
    movzx eax, ax
    mov edx, TSS_DF
    EXPECT_EQ "#DF task: STR"
    movzx eax, word ptr [tss_df]
    mov edx, TSS_A
    EXPECT_EQ "#DF task: the previous task link"
    pushfd
    pop eax
    and eax, NT
    mov edx, NT
    EXPECT_EQ "#DF task: NT = 1"
    mov eax, dword ptr [tss_a + 0x20]
    mov edx, df_fault
    EXPECT_EQ "#DF task: the faulting task's saved EIP is the faulting instruction"
    mov eax, dword ptr [tss_a + 0x38]
    mov edx, guard + 0x1000
    EXPECT_EQ "#DF task: the faulting task's saved ESP"
    mov eax, TSS_A
    call busy
    EXPECT_NZ "#DF task: the faulting task stays busy"
    DONE

; ================================================================ data
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    ; 0x08 code
    .quad 0x00cf92000000ffff    ; 0x10 data
    .quad 0                     ; 0x18 TSS_A
    .quad 0                     ; 0x20 TSS_B
    .quad 0                     ; 0x28 TSS_C
    .long TSS_C << 16           ; 0x30 task gate -> TSS_C
    .long 0x8500
    .quad 0                     ; 0x38 TSS_D
    .quad 0                     ; 0x40 TSS_DF
    .quad 0                     ; 0x48 TSS_SMALL
    .quad 0                     ; 0x50 TSS_NP
    .long TSS_NP << 16          ; 0x58 task gate -> TSS_NP
    .long 0x8500
gdt_end:
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

.balign 4
b_eax:      .long 0
b_tr:       .long 0
b_flags:    .long 0
b_busy_a:   .long 0
b_busy_b:   .long 0
b_cr0:      .long 0
c_tr:       .long 0
c_flags:    .long 0
c_link:     .long 0
c_busy_a:   .long 0
c2_flags:   .long 0
c2_link:    .long 0
c3_tr:      .long 0
c3_flags:   .long 0
c3_busy_a:  .long 0
d_tr:       .long 0
d_flags:    .long 0
d_link:     .long 0
d_eip:      .long 0
b2_cr3:     .long 0
b2_mark:    .long 0

.balign 16
tss_a:      .zero 104
tss_b:      .zero 104
tss_c:      .zero 104
tss_d:      .zero 104
tss_df:     .zero 104
tss_small:  .zero 104

.balign 4096
page_dir:   .zero 4096
page_dir2:  .zero 4096
pt0:        .zero 4096
pt1:        .zero 4096
page_m1:    .zero 4096
page_m2:    .zero 4096
            .zero 4096
stack_a:
            .zero 2048
stack_b:
            .zero 2048
stack_c:
            .zero 2048
stack_d:
            .zero 4096
stack_df:
.balign 4096
guard:      .zero 4096
image_end:

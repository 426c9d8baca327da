; vmlab-format: multiboot-aout
;
; timer.asm -- interrupt sources: 8259 PIC + 8254 PIT, then the local APIC
; timer (periodic and one-shot) and a self-IPI through the ICR.
;
;   1. Local APIC set up by hand (IA32_APIC_BASE enable, SVR, TPR, LINT0 = ExtINT
;      so the 8259 reaches the CPU, LINT1 = NMI); nothing is left to firmware.
;   2. PIC remapped to 0x20/0x28 (ICW1-ICW4), PIT channel 0 mode 2 at ~1 kHz,
;      sti/hlt until TICKS IRQ0s were counted, EOI each; counter read-back and
;      PIC ISR checked.
;   3. LAPIC timer periodic (divide 16, vector 0x30) until TICKS interrupts,
;      LAPIC EOI each.
;   4. LAPIC timer one-shot (vector 0x31): exactly one interrupt, current count
;      stops at 0 (checked over 5 PIT periods).
;   5. Self-IPI through the ICR (vector 0x32): pending in IRR while IF = 0,
;      delivered after STI, delivery status idle.

.code32
image_start:
%include "multiboot.inc"

%include "common.inc"

KERNEL_CS       = 0x08
KERNEL_DS       = 0x10
TICKS           = 10
PIT_HZ          = 1193182
PIT_DIVISOR     = 1193          ; ~1000 Hz
LAPIC           = 0xfee00000
LAPIC_ID        = LAPIC + 0x020
LAPIC_VERSION   = LAPIC + 0x030
LAPIC_TPR       = LAPIC + 0x080
LAPIC_EOI       = LAPIC + 0x0b0
LAPIC_SVR       = LAPIC + 0x0f0
LAPIC_ISR1      = LAPIC + 0x110   ; vectors 0x20-0x3f
LAPIC_IRR1      = LAPIC + 0x210
LAPIC_ICR_LOW   = LAPIC + 0x300
LAPIC_ICR_HIGH  = LAPIC + 0x310
LAPIC_LVT_TIMER = LAPIC + 0x320
LAPIC_LVT_LINT0 = LAPIC + 0x350
LAPIC_LVT_LINT1 = LAPIC + 0x360
LAPIC_LVT_ERROR = LAPIC + 0x370
LAPIC_TIMER_ICR = LAPIC + 0x380
LAPIC_TIMER_CCR = LAPIC + 0x390
LAPIC_TIMER_DCR = LAPIC + 0x3e0
IA32_APIC_BASE  = 0x1b
LVT_MASKED      = 1 << 16
LVT_PERIODIC    = 1 << 17
PIT_VECTOR      = 0x20
PERIODIC_VECTOR = 0x30
ONESHOT_VECTOR  = 0x31
IPI_VECTOR      = 0x32
SPURIOUS_VECTOR = 0xff
PERIODIC_COUNT  = 50000         ; x16 bus clocks per tick
ONESHOT_COUNT   = 100000

_start:
    cli
    cld
    mov esp, stack_top
    call serial_init
    LOAD_GDT gdtr, KERNEL_CS, KERNEL_DS
    call pic_init
    call idt32_init
    mov ecx, 0x8e
    mov eax, PIT_VECTOR
    mov ebx, pit_handler
    call idt32_set
    mov eax, PERIODIC_VECTOR
    mov ebx, periodic_handler
    call idt32_set
    mov eax, ONESHOT_VECTOR
    mov ebx, oneshot_handler
    call idt32_set
    mov eax, IPI_VECTOR
    mov ebx, ipi_handler
    call idt32_set
    mov eax, SPURIOUS_VECTOR
    mov ebx, spurious_handler
    call idt32_set

; ---------------------------------------------------------------- local APIC
    mov ecx, IA32_APIC_BASE
    rdmsr
    or eax, 1 << 11             ; global enable
    wrmsr
    mov dword ptr [LAPIC_SVR], 0x100 | SPURIOUS_VECTOR
    mov dword ptr [LAPIC_TPR], 0
    mov dword ptr [LAPIC_LVT_TIMER], LVT_MASKED
    mov dword ptr [LAPIC_LVT_LINT0], 0x700      ; ExtINT: the 8259 via LINT0
    mov dword ptr [LAPIC_LVT_LINT1], 0x400      ; NMI
    mov dword ptr [LAPIC_LVT_ERROR], LVT_MASKED
    mov eax, dword ptr [LAPIC_SVR]
    and eax, 0x1ff
    mov edx, 0x100 | SPURIOUS_VECTOR
    EXPECT_EQ "LAPIC SVR reads back software-enabled, spurious vector 0xff"
    mov eax, dword ptr [LAPIC_VERSION]
    and eax, 0xff
    mov edx, 0x10
    EXPECT_AE "LAPIC version register is an integrated APIC (>= 0x10)"

; ---------------------------------------------------------------- PIC + PIT
    mov al, 0x34                ; channel 0, lobyte/hibyte, mode 2, binary
    out 0x43, al
    mov al, PIT_DIVISOR & 0xff
    out 0x40, al
    mov al, PIT_DIVISOR >> 8
    out 0x40, al
    mov dword ptr [pit_ticks], 0
    mov al, 0xfe                ; unmask IRQ0 only
    out 0x21, al
pit_wait:
    sti
    hlt
    cli
    cmp dword ptr [pit_ticks], TICKS
    jb pit_wait
    mov eax, dword ptr [pit_ticks]
    mov edx, TICKS
    EXPECT_AE "PIT IRQ0 through the 8259 (remapped to 0x20), counted with hlt"

    mov al, 0x00                ; latch channel 0
    out 0x43, al
    in al, 0x40
    mov ah, al
    in al, 0x40
    xchg al, ah
    movzx eax, ax
    cmp eax, PIT_DIVISOR
    setbe al
    movzx eax, al
    mov edx, 1
    EXPECT_EQ "PIT channel 0 latched count is within the divisor"

    mov al, 0x0b                ; OCW3: read ISR
    out 0x20, al
    in al, 0x20
    movzx eax, al
    xor edx, edx
    EXPECT_EQ "PIC in-service register is clear after EOI"
    mov al, 0xff
    out 0x21, al

; ---------------------------------------------------------------- LAPIC periodic
    mov dword ptr [lapic_ticks], 0
    mov dword ptr [LAPIC_TIMER_DCR], 0x3        ; divide by 16
    mov dword ptr [LAPIC_LVT_TIMER], LVT_PERIODIC | PERIODIC_VECTOR
    mov dword ptr [LAPIC_TIMER_ICR], PERIODIC_COUNT
    mov eax, dword ptr [LAPIC_TIMER_CCR]
    mov dword ptr [ccr_sample], eax
periodic_wait:
    sti
    hlt
    cli
    cmp dword ptr [lapic_ticks], TICKS
    jb periodic_wait
    mov eax, dword ptr [LAPIC_TIMER_CCR]
    mov dword ptr [ccr_sample2], eax
    mov dword ptr [LAPIC_LVT_TIMER], LVT_MASKED | PERIODIC_VECTOR
    mov dword ptr [LAPIC_TIMER_ICR], 0
    mov eax, dword ptr [lapic_ticks]
    mov edx, TICKS
    EXPECT_AE "LAPIC timer periodic interrupts (vector 0x30), LAPIC EOI each"
    mov eax, dword ptr [ccr_sample]
    mov edx, PERIODIC_COUNT
    cmp eax, edx
    setbe al
    movzx eax, al
    mov edx, 1
    EXPECT_EQ "LAPIC current count starts at or below the initial count"
    mov eax, dword ptr [ccr_sample2]
    test eax, eax
    EXPECT_NZ "LAPIC periodic current count reloads (non-zero while running)"

; ---------------------------------------------------------------- LAPIC one-shot
    mov dword ptr [oneshot_ticks], 0
    mov dword ptr [LAPIC_LVT_TIMER], ONESHOT_VECTOR
    mov dword ptr [LAPIC_TIMER_ICR], ONESHOT_COUNT
oneshot_wait:
    sti
    hlt
    cli
    cmp dword ptr [oneshot_ticks], 0
    je oneshot_wait
    ; Let 5 PIT periods (~5 ms, > 3 one-shot periods) pass: a periodic timer
    ; would fire again.
    mov dword ptr [pit_ticks], 0
    mov al, 0xfe
    out 0x21, al
oneshot_linger:
    sti
    hlt
    cli
    cmp dword ptr [pit_ticks], 5
    jb oneshot_linger
    mov al, 0xff
    out 0x21, al
    mov eax, dword ptr [oneshot_ticks]
    mov edx, 1
    EXPECT_EQ "LAPIC one-shot timer fired exactly once (vector 0x31)"
    mov eax, dword ptr [LAPIC_TIMER_CCR]
    xor edx, edx
    EXPECT_EQ "LAPIC one-shot current count stays at 0"
    mov dword ptr [LAPIC_LVT_TIMER], LVT_MASKED

; ---------------------------------------------------------------- self-IPI
    mov dword ptr [ipi_count], 0
    mov dword ptr [LAPIC_ICR_HIGH], 0
    mov dword ptr [LAPIC_ICR_LOW], (1 << 18) | IPI_VECTOR  ; shorthand self, fixed
    mov eax, dword ptr [LAPIC_IRR1]
    and eax, 1 << (IPI_VECTOR - 0x20)
    mov edx, 1 << (IPI_VECTOR - 0x20)
    EXPECT_EQ "self-IPI is pending in the IRR while IF = 0"
    sti
    nop                         ; the interrupt is taken after the STI shadow
    cli
    mov eax, dword ptr [ipi_count]
    mov edx, 1
    EXPECT_EQ "self-IPI delivered once after STI (vector 0x32)"
    mov eax, dword ptr [LAPIC_IRR1]
    or eax, dword ptr [LAPIC_ISR1]
    and eax, 1 << (IPI_VECTOR - 0x20)
    xor edx, edx
    EXPECT_EQ "self-IPI: IRR and ISR bits clear after EOI"
    mov eax, dword ptr [LAPIC_ICR_LOW]
    and eax, 1 << 12
    xor edx, edx
    EXPECT_EQ "ICR delivery status is idle"
    mov eax, dword ptr [spurious_count]
    xor edx, edx
    EXPECT_EQ "no spurious LAPIC interrupts"

    DONE

; ---------------------------------------------------------------- handlers
pit_handler:
    push eax
    inc dword ptr [pit_ticks]
    mov al, 0x20                ; non-specific EOI to the master PIC
    out 0x20, al
    pop eax
    iretd

periodic_handler:
    inc dword ptr [lapic_ticks]
    mov dword ptr [LAPIC_EOI], 0
    iretd

oneshot_handler:
    inc dword ptr [oneshot_ticks]
    mov dword ptr [LAPIC_EOI], 0
    iretd

ipi_handler:
    inc dword ptr [ipi_count]
    mov dword ptr [LAPIC_EOI], 0
    iretd

spurious_handler:               ; no EOI for the spurious vector
    inc dword ptr [spurious_count]
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
pit_ticks:      .long 0
lapic_ticks:    .long 0
oneshot_ticks:  .long 0
ipi_count:      .long 0
spurious_count: .long 0
ccr_sample:     .long 0
ccr_sample2:    .long 0

.balign 16
    .zero 8192
stack_top:
image_end:
